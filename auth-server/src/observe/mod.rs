//! What the server reports about itself for operators: one event port
//! ([`Events`]) that the Prometheus metrics and the audit trail both consume.
//!
//! - **Domain events.** A handler (or a flow, when only it knows) hands an
//!   [`Event`] to `AuthCore::events` at the one place an outcome is decided:
//!   a token issued ([`Event::Issued`]), a call refused ([`Event::Denied`],
//!   where an [`AuthError`] becomes a `Status`, and in the rate-limit
//!   layer), a revocation made durable ([`Event::Revoked`]), a refresh token
//!   presented twice ([`Event::RefreshReuse`]), a key set loaded
//!   ([`Event::KeysLoaded`]). Flows hold no metrics calls.
//! - **Sinks.** [`audit::AuditLog`] writes each event as one JSON line
//!   (stdout or `audit.path`) from a writer thread, never in the call's way; [`metrics::EventMetrics`] counts them through
//!   the `metrics` facade. [`Fanout`] hands an event to both.
//! - **Per-RPC metrics** are a tower layer in the gRPC stack
//!   ([`rpc::RpcMetricsLayer`]), store latency a decorator around the store
//!   port ([`store::MeteredStore`]), and the gauges that need polling are
//!   read when `/metrics` is scraped ([`metrics::Scrape`]).
//!
//! Labels come from fixed sets only ([`Rpc`], [`DenyReason`], grant kinds,
//! algorithms, store operations, gRPC codes, and the published `kid`s):
//! never a client id, a path or any other string a client chose. Those go to
//! the audit trail, which never holds a secret, a password or a token.

pub mod audit;
pub mod metrics;
pub mod rpc;
pub mod store;

use std::sync::Arc;

use crate::error::AuthError;
use crate::grant::Issued;
use crate::revoke::Authority;
use crate::store::Revocation;

/// The RPCs of the gRPC port, as a fixed label set: the `auth.v1.Auth`
/// methods, health, reflection, and anything else as `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `auth.v1.Auth/Login`
    Login,
    /// `auth.v1.Auth/ExchangeToken`
    ExchangeToken,
    /// `auth.v1.Auth/ExchangeTokens`
    ExchangeTokens,
    /// `auth.v1.Auth/Refresh`
    Refresh,
    /// `auth.v1.Auth/Revoke`
    Revoke,
    /// `auth.v1.Auth/GetJwks`
    GetJwks,
    /// `auth.v1.Auth/WatchRevocations`
    WatchRevocations,
    /// `grpc.health.v1.Health/*`
    Health,
    /// `grpc.reflection.*.ServerReflection/*`
    Reflection,
    /// Any other path (unknown methods, probes): never the path itself.
    Other,
}

impl Rpc {
    /// Every value, in label-table order.
    pub const ALL: [Rpc; 10] = [
        Rpc::Login,
        Rpc::ExchangeToken,
        Rpc::ExchangeTokens,
        Rpc::Refresh,
        Rpc::Revoke,
        Rpc::GetJwks,
        Rpc::WatchRevocations,
        Rpc::Health,
        Rpc::Reflection,
        Rpc::Other,
    ];

    /// The RPC a request path names.
    pub fn from_path(path: &str) -> Self {
        if let Some(method) = path.strip_prefix("/auth.v1.Auth/") {
            return match method {
                "Login" => Rpc::Login,
                "ExchangeToken" => Rpc::ExchangeToken,
                "ExchangeTokens" => Rpc::ExchangeTokens,
                "Refresh" => Rpc::Refresh,
                "Revoke" => Rpc::Revoke,
                "GetJwks" => Rpc::GetJwks,
                "WatchRevocations" => Rpc::WatchRevocations,
                _ => Rpc::Other,
            };
        }
        let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(s, _)| s);
        match service {
            Some("grpc.health.v1.Health") => Rpc::Health,
            Some("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection") => Rpc::Reflection,
            _ => Rpc::Other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rpc::Login => "Login",
            Rpc::ExchangeToken => "ExchangeToken",
            Rpc::ExchangeTokens => "ExchangeTokens",
            Rpc::Refresh => "Refresh",
            Rpc::Revoke => "Revoke",
            Rpc::GetJwks => "GetJwks",
            Rpc::WatchRevocations => "WatchRevocations",
            Rpc::Health => "health",
            Rpc::Reflection => "reflection",
            Rpc::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a call was refused: a short fixed set, mapped from the refusal's
/// [`AuthError`] ([`DenyReason::of`]), never from client input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// Malformed or oversized request (`INVALID_ARGUMENT`).
    InvalidRequest,
    /// Wrong client id, secret or certificate.
    BadClientCredentials,
    /// Wrong username or password.
    BadPassword,
    /// A presented token has expired (or a subject token's life is spent).
    TokenExpired,
    /// A presented token is revoked.
    TokenRevoked,
    /// A presented token is invalid (signature, issuer, audience, times,
    /// size, `alg`, `typ`).
    InvalidToken,
    /// An unknown, expired or revoked refresh token, or one whose user is
    /// gone.
    InvalidRefreshToken,
    /// A spent refresh token presented again: its family is revoked.
    RefreshReused,
    /// Any other failed authentication (e.g. no bearer token to revoke by
    /// `jti` or `sid`).
    Unauthenticated,
    /// An audience off the caller's allow-list.
    AudienceNotAllowed,
    /// The policy refuses otherwise (not the caller's token or session,
    /// delegation too deep, acting for itself).
    Forbidden,
    /// The per-client rate limit is spent.
    RateLimited,
    /// A username backing off after failed logins.
    LoginBackoff,
    /// A bounded resource is full (password queue, watch streams).
    Overloaded,
}

impl DenyReason {
    /// Every value.
    pub const ALL: [DenyReason; 14] = [
        DenyReason::InvalidRequest,
        DenyReason::BadClientCredentials,
        DenyReason::BadPassword,
        DenyReason::TokenExpired,
        DenyReason::TokenRevoked,
        DenyReason::InvalidToken,
        DenyReason::InvalidRefreshToken,
        DenyReason::RefreshReused,
        DenyReason::Unauthenticated,
        DenyReason::AudienceNotAllowed,
        DenyReason::Forbidden,
        DenyReason::RateLimited,
        DenyReason::LoginBackoff,
        DenyReason::Overloaded,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::InvalidRequest => "invalid_request",
            DenyReason::BadClientCredentials => "bad_client_credentials",
            DenyReason::BadPassword => "bad_password",
            DenyReason::TokenExpired => "token_expired",
            DenyReason::TokenRevoked => "token_revoked",
            DenyReason::InvalidToken => "invalid_token",
            DenyReason::InvalidRefreshToken => "invalid_refresh_token",
            DenyReason::RefreshReused => "refresh_reused",
            DenyReason::Unauthenticated => "unauthenticated",
            DenyReason::AudienceNotAllowed => "audience_not_allowed",
            DenyReason::Forbidden => "forbidden",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::LoginBackoff => "login_backoff",
            DenyReason::Overloaded => "overloaded",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The reason of a refusal; `None` for a failure of the server's own
    /// parts (store, signer, a bug), which is no denial. Each variant has
    /// its default; the fixed messages of the flows refine it.
    pub fn of(e: &AuthError) -> Option<Self> {
        Some(match e {
            AuthError::InvalidArgument(_) => DenyReason::InvalidRequest,
            AuthError::Unauthenticated(m) => match *m {
                "invalid client credentials" => DenyReason::BadClientCredentials,
                "invalid username or password" => DenyReason::BadPassword,
                "token expired" | "subject token expired" => DenyReason::TokenExpired,
                "token revoked" => DenyReason::TokenRevoked,
                "invalid token"
                | "token not yet valid"
                | "token from another issuer"
                | "token not addressed to the caller"
                | "token too large"
                | "token bound to another certificate" => DenyReason::InvalidToken,
                "invalid refresh token" | "user no longer exists" => DenyReason::InvalidRefreshToken,
                "refresh token reused; its family is revoked" => DenyReason::RefreshReused,
                _ => DenyReason::Unauthenticated,
            },
            AuthError::PermissionDenied(m) => match *m {
                "audience not allowed for this account" | "audience not allowed for users" => {
                    DenyReason::AudienceNotAllowed
                }
                _ => DenyReason::Forbidden,
            },
            AuthError::ResourceExhausted(m) => match *m {
                "rate limit exceeded" => DenyReason::RateLimited,
                "too many failed logins; retry later" => DenyReason::LoginBackoff,
                _ => DenyReason::Overloaded,
            },
            AuthError::Store(_) | AuthError::RevocationFeed(_) | AuthError::Keys(_) | AuthError::Internal(_) => {
                return None;
            }
        })
    }
}

/// Who made a call, as far as the server knows: the `client_id` it named
/// (a client's string: audit only, never a label) and its mTLS identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The `client_id` of the request, when it named one.
    pub client_id: Option<&'a str>,
    /// The identity of the caller's certificate.
    pub peer: Option<&'a str>,
}

/// One published key: its `kid` and algorithm.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedKey {
    /// The key id.
    pub kid: String,
    /// The JWS algorithm pinned to it (`ES256`, `EdDSA`, `RS256`, `PS256`).
    pub alg: &'static str,
}

/// The keys a policy publishes, sorted by `kid`.
pub fn published_keys(keys: &crate::keys::PublicKeys) -> Vec<PublishedKey> {
    let mut out: Vec<PublishedKey> = keys
        .keys
        .kids()
        .map(|kid| PublishedKey {
            kid: kid.to_owned(),
            alg: keys.keys.get(kid).map_or("other", |k| alg_label(&format!("{:?}", k.alg))),
        })
        .collect();
    out.sort();
    out
}

/// The algorithm label of a JWS `alg` name: one of the four the server
/// signs with, else `other`.
pub fn alg_label(alg: &str) -> &'static str {
    match alg {
        "ES256" => "ES256",
        "EdDSA" => "EdDSA",
        "RS256" => "RS256",
        "PS256" => "PS256",
        _ => "other",
    }
}

/// The protected header of a compact JWS (only what the server reports).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct JwsHeader {
    /// `alg`
    pub alg: String,
    /// `kid`
    #[serde(default)]
    pub kid: Option<String>,
}

/// Reads the protected header of a compact JWS the server signed.
pub fn jws_header(token: &str) -> Option<JwsHeader> {
    use base64::Engine as _;
    let (header, _) = token.split_once('.')?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Something the server decided that operators watch.
#[derive(Debug)]
pub enum Event<'a> {
    /// An access token (and for the password grant and refresh, a refresh
    /// token) was handed out.
    Issued {
        /// What was issued: grant, token and claims.
        issued: &'a Issued,
        /// Who asked.
        caller: Caller<'a>,
    },
    /// A call was refused.
    Denied {
        /// The RPC.
        rpc: Rpc,
        /// Why.
        reason: DenyReason,
        /// Who asked.
        caller: Caller<'a>,
    },
    /// A revocation is durable on the deny list.
    Revoked {
        /// What was revoked.
        revocation: &'a Revocation,
        /// On whose authority.
        by: &'a Authority,
        /// Who asked.
        caller: Caller<'a>,
    },
    /// A spent refresh token was presented again: its family is revoked.
    RefreshReuse {
        /// The refresh family.
        family: &'a str,
        /// Its login session.
        sid: &'a str,
    },
    /// A key set was loaded (at start) or swapped in (reload).
    KeysLoaded {
        /// The published keys, sorted by `kid`.
        keys: &'a [PublishedKey],
        /// The `kid` that signs, when known.
        signing_kid: Option<&'a str>,
        /// `false` at start, `true` on a reload.
        reload: bool,
    },
}

/// The event port: every sink (audit, metrics) implements it.
pub trait Events: Send + Sync + 'static {
    /// Takes one event. Never fails or slows the call that emitted it: a
    /// sink that cannot record an event counts and logs why.
    fn emit(&self, event: &Event<'_>);

    /// Reopens files the sink writes to (SIGHUP, after log rotation).
    fn reopen(&self) {}

    /// Writes out what the sink still holds (at shutdown); blocks for a
    /// bounded time.
    fn flush(&self) {}
}

/// A sink that drops every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl Events for NoEvents {
    fn emit(&self, _event: &Event<'_>) {}
}

/// Hands each event to several sinks, in order.
#[derive(Clone, Default)]
pub struct Fanout(Vec<Arc<dyn Events>>);

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout").field("sinks", &self.0.len()).finish()
    }
}

impl Fanout {
    /// No sinks yet.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds a sink.
    pub fn with(mut self, sink: Arc<dyn Events>) -> Self {
        self.0.push(sink);
        self
    }
}

impl Events for Fanout {
    fn emit(&self, event: &Event<'_>) {
        for sink in &self.0 {
            sink.emit(event);
        }
    }

    fn reopen(&self) {
        for sink in &self.0 {
            sink.reopen();
        }
    }

    fn flush(&self) {
        for sink in &self.0 {
            sink.flush();
        }
    }
}

/// Emits [`Event::Denied`] for `e` when it is a refusal (not a failure of
/// the server's own parts).
pub fn denied(events: &dyn Events, rpc: Rpc, caller: Caller<'_>, e: &AuthError) {
    if let Some(reason) = DenyReason::of(e) {
        events.emit(&Event::Denied { rpc, reason, caller });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use service_sdk::VerifyError;

    use super::*;
    use crate::store::StoreError;

    #[test]
    fn rpc_labels_come_from_a_fixed_set_never_from_the_path() {
        assert_eq!(Rpc::from_path("/auth.v1.Auth/ExchangeToken"), Rpc::ExchangeToken);
        assert_eq!(Rpc::from_path("/auth.v1.Auth/ExchangeTokens"), Rpc::ExchangeTokens);
        assert_eq!(Rpc::from_path("/auth.v1.Auth/WatchRevocations"), Rpc::WatchRevocations);
        assert_eq!(Rpc::from_path("/grpc.health.v1.Health/Check"), Rpc::Health);
        assert_eq!(Rpc::from_path("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Rpc::Reflection);
        for hostile in ["/auth.v1.Auth/Evil\nline", "/x/y", "", "/", "/auth.v1.Auth/", "/grpc.health.v1.Healthy/X"] {
            assert_eq!(Rpc::from_path(hostile), Rpc::Other, "{hostile:?}");
        }
        for (i, rpc) in Rpc::ALL.iter().enumerate() {
            assert_eq!(rpc.index(), i);
        }
    }

    #[test]
    fn denial_reasons_map_from_the_error_and_failures_are_not_denials() {
        let cases = [
            (AuthError::InvalidArgument("audience is required"), "invalid_request"),
            (AuthError::Unauthenticated("invalid client credentials"), "bad_client_credentials"),
            (AuthError::Unauthenticated("invalid username or password"), "bad_password"),
            (AuthError::token_rejected(VerifyError::Expired), "token_expired"),
            (AuthError::token_rejected(VerifyError::Revoked), "token_revoked"),
            (AuthError::token_rejected(VerifyError::BadSignature), "invalid_token"),
            (AuthError::token_rejected(VerifyError::WrongAudience), "invalid_token"),
            (AuthError::Unauthenticated("token revoked"), "token_revoked"),
            (AuthError::Unauthenticated("invalid refresh token"), "invalid_refresh_token"),
            (AuthError::Unauthenticated("refresh token reused; its family is revoked"), "refresh_reused"),
            (AuthError::Unauthenticated("revoking by jti or sid needs the caller's bearer token"), "unauthenticated"),
            (AuthError::PermissionDenied("audience not allowed for this account"), "audience_not_allowed"),
            (AuthError::PermissionDenied("not your token"), "forbidden"),
            (AuthError::ResourceExhausted("rate limit exceeded"), "rate_limited"),
            (AuthError::ResourceExhausted("too many failed logins; retry later"), "login_backoff"),
            (AuthError::ResourceExhausted("server busy: too many password checks waiting"), "overloaded"),
            (AuthError::ResourceExhausted("too many revocation watchers on this replica"), "overloaded"),
        ];
        for (e, want) in cases {
            assert_eq!(DenyReason::of(&e).map(DenyReason::as_str), Some(want), "{e:?}");
        }
        assert_eq!(DenyReason::of(&AuthError::Store(StoreError::Unavailable("down".into()))), None);
        assert_eq!(DenyReason::of(&AuthError::Internal("bug")), None);
        for (i, r) in DenyReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn the_header_of_a_jws_names_its_alg_and_kid() {
        use base64::Engine as _;
        let header =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#);
        let h = jws_header(&format!("{header}.e30.sig")).unwrap();
        assert_eq!((h.alg.as_str(), h.kid.as_deref()), ("ES256", Some("k1")));
        assert_eq!(alg_label(&h.alg), "ES256");
        assert_eq!(alg_label("HS256"), "other");
        assert!(jws_header("not a token").is_none());
    }
}
