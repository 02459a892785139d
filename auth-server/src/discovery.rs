//! RFC 8414 authorization server metadata, served on the HTTP side port at
//! `/.well-known/oauth-authorization-server`.
//!
//! Only what is true of this server is published:
//!
//! - `issuer`: the configured `iss` of every token, as is;
//! - `jwks_uri`: the side port's JWKS, under its public base URL
//!   (`http_public_url`);
//! - `grant_types_supported`: `password`, `client_credentials`,
//!   `refresh_token` and the RFC 8693 token exchange
//!   (`urn:ietf:params:oauth:grant-type:token-exchange`);
//! - `response_types_supported`: empty, since there is no authorization
//!   endpoint (the member is required by RFC 8414);
//! - `tls_client_certificate_bound_access_tokens` (RFC 8705): `true`, the
//!   tokens of service accounts that bind them (by default those bound to
//!   an mTLS identity) carry `cnf.x5t#S256` of the caller's certificate.
//!
//! There is no HTTP token, revocation or introspection endpoint: the grants
//! run over gRPC (mTLS). So `token_endpoint` and its
//! `token_endpoint_auth_*` members are left out (a client that POSTs a
//! form would find nothing there), and `token_endpoint_auth_signing_alg_values_supported`
//! does not apply either: it names the algorithms of JWT *client*
//! authentication, which this server does not accept. Extension members
//! (RFC 8414 section 2 allows them) say where the grants are instead:
//!
//! - `grpc_service`: `auth.v1.Auth`;
//! - `grpc_methods`: the full gRPC method of each role (`token`,
//!   `token_exchange`, `token_exchange_batch`, `refresh`, `revocation`, `jwks`,
//!   `revocation_feed`);
//! - `access_token_signing_alg_values_supported`: the `alg`s of the keys in
//!   the JWKS right now (each key is pinned to one);
//! - `token_types_supported`: the RFC 8693 token type identifiers the
//!   token exchange accepts as `subject_token` and issues
//!   (`urn:ietf:params:oauth:token-type:access_token`).

use serde_json::{Value, json};

/// The path of the metadata document.
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
/// The path of the JWK Set.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The RFC 8693 grant type of the token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The RFC 8693 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// The metadata document of a server with this `issuer` whose side port is
/// reached at `public_url` (no trailing `/`), publishing keys of `algs`.
pub fn metadata(issuer: &str, public_url: &str, algs: &[String]) -> Value {
    let method = |m: &str| format!("/{}/{m}", auth_proto::SERVICE_NAME);
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{public_url}{JWKS_PATH}"),
        "response_types_supported": [],
        "grant_types_supported": ["password", "client_credentials", "refresh_token", TOKEN_EXCHANGE_GRANT],
        "tls_client_certificate_bound_access_tokens": true,
        "access_token_signing_alg_values_supported": algs,
        "token_types_supported": [ACCESS_TOKEN_TYPE],
        "grpc_service": auth_proto::SERVICE_NAME,
        "grpc_methods": {
            "token": method("Login"),
            "token_exchange": method("ExchangeToken"),
            "token_exchange_batch": method("ExchangeTokens"),
            "refresh": method("Refresh"),
            "revocation": method("Revoke"),
            "jwks": method("GetJwks"),
            "revocation_feed": method("WatchRevocations"),
        },
    })
}

/// The distinct `alg`s of a JWK Set document, sorted.
pub fn jwks_algs(jwks_json: &str) -> Vec<String> {
    let doc: Value = serde_json::from_str(jwks_json).unwrap_or(Value::Null);
    let mut algs: Vec<String> = doc
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|k| k.get("alg").and_then(Value::as_str).map(str::to_owned))
        .collect();
    algs.sort_unstable();
    algs.dedup();
    algs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_the_jwks_grants_and_grpc_methods_and_no_http_token_endpoint() {
        let doc = metadata("auth-service", "https://auth.example.com", &["ES256".into()]);
        assert_eq!(doc["issuer"], "auth-service");
        assert_eq!(doc["jwks_uri"], "https://auth.example.com/.well-known/jwks.json");
        assert_eq!(doc["grant_types_supported"][3], TOKEN_EXCHANGE_GRANT);
        assert_eq!(doc["response_types_supported"], json!([]));
        assert_eq!(doc["grpc_methods"]["token_exchange"], "/auth.v1.Auth/ExchangeToken");
        assert_eq!(doc["grpc_methods"]["token_exchange_batch"], "/auth.v1.Auth/ExchangeTokens");
        assert_eq!(doc["tls_client_certificate_bound_access_tokens"], true);
        for absent in ["token_endpoint", "revocation_endpoint", "token_endpoint_auth_signing_alg_values_supported"] {
            assert!(doc.get(absent).is_none(), "{absent}");
        }
    }

    #[test]
    fn algs_come_from_the_published_keys() {
        let jwks = r#"{"keys":[{"kid":"a","alg":"ES256"},{"kid":"b","alg":"EdDSA"},{"kid":"c","alg":"ES256"}]}"#;
        assert_eq!(jwks_algs(jwks), ["ES256", "EdDSA"]);
        assert!(jwks_algs("not json").is_empty());
    }
}
