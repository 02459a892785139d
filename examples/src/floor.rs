//! The transport floor: a bare `auth.v1.Auth` server over the auth server's
//! own mTLS edge, to measure ExchangeToken against.
//!
//! It accepts connections through the same [`TlsIncoming`] (the dev PKI's
//! server certificate, client certificates required) and serves on the same
//! HTTP/2 transport settings ([`grpc_transport`]), but has no
//! authentication, no policy, no store, no layers and no events. Its
//! `ExchangeToken` answers, by [`FloorMode`]:
//!
//! - `fixed`: one token signed at start-up, the same for every call: what
//!   TLS, HTTP/2 and tonic cost per RPC;
//! - `sign`: a freshly signed token per call, with the claims of the auth
//!   server's answer to a service acting as itself (`sub: svc:<client_id>`,
//!   the requested audience, a random `jti`, the dev account's role and
//!   scopes), signed by a key of the floor's own: transport plus signature.
//!
//! No tonic-based exchange can beat these two; the auth server's rate is
//! read as a ratio to them, measured in the same run
//! (`examples/scripts/floor.sh`, BENCHMARKS.md). `GetJwks` answers the
//! key's JWK Set (loadgen reads the algorithm from it); `ExchangeTokens`
//! answers each audience as `ExchangeToken` would (the batch floor); the
//! other RPCs are `UNIMPLEMENTED`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use auth_proto::auth::v1 as pb;
use auth_server::clock::{Clock as _, SystemClock};
use auth_server::config::LimitsConfig;
use auth_server::directory::random_token;
use auth_server::edge::TlsIncoming;
use auth_server::grpc::ACCESS_TOKEN_TYPE;
use auth_server::keys::{KeyAlg, LoadedKey, PublicKeys};
use auth_server::server::grpc_transport;
use aws_lc_rs::rand::SystemRandom;
use service_sdk::{Audience, Claims};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// What the floor's `ExchangeToken` does per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorMode {
    /// Answer one token signed at start-up.
    Fixed,
    /// Sign a fresh token per call.
    Sign,
}

/// The issuer of the floor's tokens (the dev auth server's).
const ISSUER: &str = "auth-service";
/// The role and scopes of the dev `order` account's tokens for `inventory`:
/// the same claims, so the same size, as the auth server's answer.
const ROLE: &str = "service";
const SCOPES: [&str; 2] = ["inventory:read", "inventory:reserve"];
/// Lifetime of the floor's tokens (the auth server's exchange default).
const TTL_SECS: u64 = 300;

/// Why the floor could not start.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// A file of the dev directory is missing or unreadable.
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The signing key is unusable.
    #[error(transparent)]
    Key(#[from] auth_server::keys::KeyError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] auth_server::config::ConfigError),
    /// The random generator failed.
    #[error("random generator failed")]
    Random,
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The floor's `auth.v1.Auth` service.
pub struct Floor {
    mode: FloorMode,
    key: LoadedKey,
    rng: SystemRandom,
    jwks_json: String,
    fixed: pb::TokenResponse,
}

impl std::fmt::Debug for Floor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Floor").field("mode", &self.mode).field("key", &self.key).finish_non_exhaustive()
    }
}

impl Floor {
    /// A floor signing with `key` (its JWK Set served by `GetJwks`).
    pub fn new(mode: FloorMode, key: LoadedKey) -> Result<Self, FloorError> {
        let jwks_json = PublicKeys::from_jwks(vec![key.jwk().clone()])?.jwks_json;
        let rng = SystemRandom::new();
        let fixed = response(&key, &rng, "order", "inventory")?;
        Ok(Self { mode, key, rng, jwks_json, fixed })
    }

    /// A floor signing with a fresh ES256 key of its own (the same cost per
    /// signature as the dev key). Never the dev signing key: the floor signs
    /// whatever it is asked, so its tokens must verify nowhere but against
    /// its own `GetJwks`.
    pub fn with_own_key(mode: FloorMode) -> Result<Self, FloorError> {
        let pem = auth_server::keys::generate_pkcs8_pem(KeyAlg::ES256)?;
        Self::new(mode, LoadedKey::from_pem(KeyAlg::ES256, pem.as_bytes())?)
    }

    /// The answer to one ExchangeToken.
    fn exchange(&self, req: &pb::ExchangeTokenRequest) -> Result<pb::TokenResponse, FloorError> {
        match self.mode {
            FloorMode::Fixed => Ok(self.fixed.clone()),
            FloorMode::Sign => response(&self.key, &self.rng, &req.client_id, &req.audience),
        }
    }
}

/// A freshly signed token for `client_id` acting as itself towards
/// `audience`, as the auth server answers it.
fn response(
    key: &LoadedKey,
    rng: &SystemRandom,
    client_id: &str,
    audience: &str,
) -> Result<pb::TokenResponse, FloorError> {
    let now = SystemClock.now_unix();
    let claims = Claims {
        iss: ISSUER.into(),
        sub: format!("svc:{client_id}"),
        aud: Audience::One(audience.to_owned()),
        exp: now + TTL_SECS,
        nbf: now,
        iat: now,
        jti: random_token(16).map_err(|_| FloorError::Random)?,
        sid: None,
        client_id: client_id.to_owned(),
        role: Some(ROLE.into()),
        perms: SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        act: None,
        cnf: None,
    };
    let access_token = key.sign_claims(rng, &claims)?;
    Ok(pb::TokenResponse {
        access_token,
        token_type: "Bearer".into(),
        expires_in: TTL_SECS as u32,
        refresh_token: String::new(),
        scope: claims.perms,
        issued_token_type: ACCESS_TOKEN_TYPE.into(),
    })
}

type EventStream = tokio_stream::Empty<Result<pb::RevocationEvent, Status>>;

#[tonic::async_trait]
impl pb::auth_server::Auth for Floor {
    async fn login(&self, _req: Request<pb::LoginRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        Err(Status::unimplemented("the floor answers ExchangeToken only"))
    }

    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::TokenResponse>, Status> {
        self.exchange(req.get_ref()).map(Response::new).map_err(|e| Status::internal(e.to_string()))
    }

    async fn exchange_tokens(
        &self,
        req: Request<pb::ExchangeTokensRequest>,
    ) -> Result<Response<pb::ExchangeTokensResponse>, Status> {
        // The batch floor: one answer per audience, as ExchangeToken's.
        let r = req.get_ref();
        let results = r
            .audiences
            .iter()
            .map(|a| {
                let one = pb::ExchangeTokenRequest {
                    client_id: r.client_id.clone(),
                    audience: a.audience.clone(),
                    ..Default::default()
                };
                let token = self.exchange(&one).map_err(|e| Status::internal(e.to_string()))?;
                Ok(pb::AudienceResult {
                    audience: a.audience.clone(),
                    result: Some(pb::audience_result::Result::Token(token)),
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(pb::ExchangeTokensResponse { results }))
    }

    async fn refresh(&self, _req: Request<pb::RefreshRequest>) -> Result<Response<pb::TokenResponse>, Status> {
        Err(Status::unimplemented("the floor answers ExchangeToken only"))
    }

    async fn revoke(&self, _req: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented("the floor answers ExchangeToken only"))
    }

    async fn get_jwks(&self, _req: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(pb::GetJwksResponse { jwks_json: self.jwks_json.clone() }))
    }

    type WatchRevocationsStream = EventStream;

    async fn watch_revocations(
        &self,
        _req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        Err(Status::unimplemented("the floor answers ExchangeToken only"))
    }
}

/// Serves `floor` as [`serve`] does, behind the auth server's whole edge:
/// the connection limits and read deadlines of [`TlsIncoming::with_limits`]
/// and the gRPC layers of `auth-server serve` (the `rpc` span, the
/// content-type check, per-RPC metrics, framing checks and the per-client
/// rate limit, lifted as `floor.sh` lifts it). With the process's log
/// subscriber and metrics recorder installed by the caller, this is the
/// auth server's stack around a handler that only signs: its cost beyond
/// [`serve`] is the edge's.
pub async fn serve_with_edge(
    listener: TcpListener,
    dir: &Path,
    floor: Floor,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), FloorError> {
    let tls = dev_tls(dir)?;
    let limits =
        LimitsConfig { client_rate_per_sec: 10_000_000, client_rate_burst: 10_000_000, ..LimitsConfig::default() };
    grpc_transport(&limits)
        .layer(auth_server::edge::rpc_trace(false))
        .layer(auth_server::edge::GrpcContentTypeLayer)
        .layer(auth_server::observe::rpc::RpcMetricsLayer::new())
        .layer(auth_server::edge::GrpcFramingLayer)
        .layer(auth_server::ratelimit::ClientRateLimitLayer::from_config(&limits))
        .add_service(pb::auth_server::AuthServer::from_arc(Arc::new(floor)).max_decoding_message_size(64 * 1024))
        .serve_with_incoming_shutdown(
            TlsIncoming::with_limits(listener, tls, auth_server::edge::ConnLimits::from_config(&limits)),
            shutdown,
        )
        .await?;
    Ok(())
}

/// The mTLS identity of the `auth-server dev` directory `dir`: its server
/// certificate and key, clients of its CA.
fn dev_tls(dir: &Path) -> Result<std::sync::Arc<rustls::ServerConfig>, FloorError> {
    Ok(auth_server::tls::server_config_from_pem(
        &read(dir.join("server.pem"))?,
        &read(dir.join("server-key.pem"))?,
        &read(dir.join("ca.pem"))?,
    )?)
}

fn read(path: PathBuf) -> Result<Vec<u8>, FloorError> {
    std::fs::read(&path).map_err(|e| FloorError::Read(path, e))
}

/// Serves `floor` on `listener` until `shutdown`, with the mTLS identity of
/// the `auth-server dev` directory `dir` (`server.pem`, `server-key.pem`,
/// clients of `ca.pem`), under the auth server's default limits.
pub async fn serve(
    listener: TcpListener,
    dir: &Path,
    floor: Floor,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), FloorError> {
    let tls = dev_tls(dir)?;
    let limits = LimitsConfig::default();
    grpc_transport(&limits)
        .add_service(pb::auth_server::AuthServer::from_arc(Arc::new(floor)).max_decoding_message_size(64 * 1024))
        .serve_with_incoming_shutdown(TlsIncoming::new(listener, tls), shutdown)
        .await?;
    Ok(())
}
