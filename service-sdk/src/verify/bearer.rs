//! The `authorization: Bearer …` credential of a request (RFC 6750 section
//! 2.1), parsed one way for the SDK's layer and the auth server alike.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use super::VerifyError;

/// The token of the one `authorization: Bearer …` header.
///
/// The scheme is case-insensitive and surrounding spaces are trimmed. No
/// header, another scheme or an empty token is [`VerifyError::Missing`];
/// two `authorization` headers or a value that is not visible ASCII is
/// [`VerifyError::Malformed`]. A tonic request's metadata is a header map
/// too: `parse_bearer(request.metadata().as_ref())`.
///
/// ```
/// use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
/// use service_sdk::{VerifyError, parse_bearer};
/// let mut headers = HeaderMap::new();
/// assert_eq!(parse_bearer(&headers), Err(VerifyError::Missing));
/// headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer eyJ.x.y"));
/// assert_eq!(parse_bearer(&headers), Ok("eyJ.x.y"));
/// ```
pub fn parse_bearer(headers: &HeaderMap) -> Result<&str, VerifyError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(VerifyError::Missing)?;
    if values.next().is_some() {
        return Err(VerifyError::Malformed);
    }
    let value = value.to_str().map_err(|_| VerifyError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(VerifyError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(VerifyError::Missing);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(VerifyError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_required() {
        assert_eq!(parse_bearer(&headers(&["Bearer abc"])), Ok("abc"));
        assert_eq!(parse_bearer(&headers(&["bearer abc"])), Ok("abc"));
        assert_eq!(parse_bearer(&headers(&[])), Err(VerifyError::Missing));
        assert_eq!(parse_bearer(&headers(&["Basic abc"])), Err(VerifyError::Missing));
        assert_eq!(parse_bearer(&headers(&["Bearer "])), Err(VerifyError::Missing));
        assert_eq!(parse_bearer(&headers(&["Bearer a", "Bearer b"])), Err(VerifyError::Malformed));
    }

    #[test]
    fn tonic_metadata_parses_the_same_way() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(parse_bearer(md.as_ref()), Ok("abc"));
    }
}
