//! The client side: what a service uses to call other services.
//!
//! - [`Credentials`]: where the service's own client id and secret come
//!   from ([`EnvCredentials`], [`FileCredentials`], and with the `vault`
//!   feature `VaultCredentials`). Secrets are [`ClientSecret`]s, which
//!   redact themselves.
//! - [`TokenSource`]: exchanges those credentials (and, on behalf of a user,
//!   the user's token) for short-lived tokens whose `aud` is the target
//!   service; caches them per (audience, subject) and renews them in the
//!   background. The exchange itself is a tower service
//!   ([`ExchangeService`], by default [`GrpcExchange`]) that takes layers.
//! - [`AuthChannel`]: a tower service over a tonic channel that attaches the
//!   bearer token for one audience to every call.
//! - [`MtlsFiles`]: mTLS channels from certificate, key and CA files, with
//!   rotation; `https://` only. Channels to the auth server
//!   ([`MtlsFiles::auth_channel`]) also demand its SPIFFE ID
//!   ([`AuthServerId`]), so no other workload can pass as the auth server.

mod channel;
mod clock;
mod credentials;
mod identity;
mod secret;
mod session;
mod source;
mod tls;

pub use channel::{AuthChannel, AuthFuture, BoxError};
pub use clock::{Clock, ManualClock, SystemClock};
pub use credentials::{
    CLIENT_ID_VAR, CLIENT_SECRET_VAR, Credentials, CredentialsError, EnvCredentials, FileCredentials,
};
#[cfg(feature = "vault")]
pub use credentials::{KUBERNETES_JWT_PATH, SecretSource, VaultAuth, VaultCredentials, VaultCredentialsBuilder};
pub use identity::{AUTH_SERVER_NAME, AuthServerId};
pub use secret::{ClientCredentials, ClientSecret};
pub use session::{SessionError, UserChannel, UserSession, login};
pub use source::{
    AccessToken, ExchangeRequest, ExchangeResponse, ExchangeService, GrpcExchange, TokenError, TokenRequest,
    TokenSource, TokenSourceBuilder, TokenSourceStats,
};
pub use tls::{MtlsFiles, TlsError};
pub(crate) use tls::{Stamp, is_https_with_host, read as read_file, shown_uri};
