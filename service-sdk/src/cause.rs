//! What a failed call says, for the SDK's log lines: a gRPC status's code
//! and message with the causes beneath it (a TLS handshake's refusal, with
//! the name expected and the names the certificate presents, sits several
//! layers down a transport error).

use std::error::Error;

/// `error` and every cause beneath it, joined by `: `; a cause whose text
/// its parent already shows is left out.
pub(crate) fn chain(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    append(&mut out, error.source());
    out
}

/// Appends `first` and the causes beneath it to `out`, each one whose text
/// `out` does not show yet.
fn append(out: &mut String, first: Option<&(dyn Error + 'static)>) {
    let mut next = first;
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
}

/// A gRPC status as the SDK logs it: `Code: message`, then its causes
/// (a transport failure's connect or TLS error).
pub(crate) fn status(s: &tonic::Status) -> String {
    let mut out = format!("{:?}", s.code());
    if !s.message().is_empty() {
        out.push_str(": ");
        out.push_str(s.message());
    }
    append(&mut out, s.source());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Transport(#[source] std::io::Error);

    #[test]
    fn a_status_shows_its_code_message_and_the_tls_refusal_beneath() {
        let refusal = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
            expected: rustls_pki_types::ServerName::try_from("auth").unwrap().to_owned(),
            presented: vec!["DnsName(\"localhost\")".into(), "IpAddress(127.0.0.1)".into()],
        });
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refusal);
        let status = tonic::Status::from_error(Box::new(Transport(io)));
        let shown = self::status(&status);
        assert!(shown.starts_with("Unknown: transport error: invalid peer certificate: "), "{shown}");
        assert!(shown.contains("not valid for name \"auth\""), "{shown}");
        assert!(shown.contains("localhost") && shown.contains("127.0.0.1"), "{shown}");
        assert_eq!(
            self::status(&tonic::Status::unauthenticated("invalid client credentials")),
            "Unauthenticated: invalid client credentials"
        );
    }
}
