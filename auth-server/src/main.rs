//! The `auth-server` binary.

use auth_server::config::{Config, Overrides};
use auth_server::keys::KeyAlg;
use auth_server::server::{Listeners, Server};
use auth_server::{admin, dev, directory, keys};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// The auth.v1.Auth token service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file.
    Serve {
        /// The TOML configuration file. Keys can be overridden by
        /// `AUTH_SERVER_*` variables (nested keys joined by `__`, e.g.
        /// `AUTH_SERVER_STORE`, `AUTH_SERVER_LIMITS__PASSWORD_QUEUE`).
        #[arg(long, short, env = auth_server::config::CONFIG_PATH_VAR)]
        config: PathBuf,
        #[command(flatten)]
        flags: Flags,
    },
    /// Create (once) a dev environment with certificates, keys, users and
    /// accounts, then serve it with the in-memory store; or, with a
    /// subcommand, admit one more service or user to it.
    Dev {
        /// Where the dev environment lives.
        #[arg(long, default_value = ".auth-dev", global = true)]
        dir: PathBuf,
        #[command(flatten)]
        flags: Flags,
        #[command(subcommand)]
        command: Option<DevCommand>,
    },
    /// Print the argon2id hash of a password read from standard input.
    HashPassword,
    /// Print a new client secret and the digest for the accounts file.
    NewSecret,
    /// Write a new PKCS#8 PEM signing key.
    Keygen {
        /// ES256, EdDSA, RS256 or PS256.
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// Output file (created with mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Operator commands against a running server, over mTLS with an admin
    /// certificate (defaults: the `auth-server dev` environment).
    Admin {
        #[command(flatten)]
        conn: ConnFlags,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Print a token's header and claims; with a JWKS, say whether it
    /// verifies and why not (exit 1 when it does not). Reads the token from
    /// standard input when TOKEN is `-` or absent (keeps it out of shell
    /// history and the process list).
    Decode {
        /// The token, or `-` for standard input.
        token: Option<String>,
        /// Check against this JWKS: a file, or an http(s):// URL.
        #[arg(long, conflicts_with = "jwks_from_server")]
        jwks: Option<String>,
        /// For an https:// --jwks: trust only this CA (PEM); default: the
        /// system's roots.
        #[arg(long, env = "AUTH_SERVER_ADMIN_JWKS_CA")]
        jwks_ca: Option<PathBuf>,
        /// Check against the server's keys (GetJwks over mTLS, with the
        /// connection flags).
        #[arg(long)]
        jwks_from_server: bool,
        /// The issuer to require (default: the token's own `iss`, not checked).
        #[arg(long)]
        issuer: Option<String>,
        /// The audience to require (default: not checked).
        #[arg(long)]
        audience: Option<String>,
        #[command(flatten)]
        conn: ConnFlags,
    },
    /// Create a service account: print the block for the accounts file and
    /// the credentials document (with a new secret, shown once) that the
    /// service reads.
    NewAccount {
        /// The client id, also the service's own audience name.
        name: String,
        /// An audience it may request and its scopes: AUD=scope,scope
        /// (repeat for more audiences).
        #[arg(long = "audience", value_name = "AUD=SCOPES", required = true)]
        audiences: Vec<String>,
        /// The identity its mTLS certificate must carry (URI SAN, e.g.
        /// spiffe://cluster.local/ns/billing/sa/billing).
        #[arg(long)]
        mtls_identity: Option<String>,
        /// The role claim of its tokens.
        #[arg(long, default_value = "service")]
        role: String,
        /// A permission of its own at the auth service (repeatable), e.g. the
        /// admin permission.
        #[arg(long = "perm")]
        perms: Vec<String>,
        /// Write the credentials document to this new file (mode 0600)
        /// instead of printing the secret.
        #[arg(long)]
        credentials_out: Option<PathBuf>,
    },
    /// Exit 0 if the URL answers HTTP 200 (container health checks).
    Healthcheck {
        /// e.g. http://127.0.0.1:8080/readyz, or https://… when the side
        /// port serves TLS (`[http_tls]`).
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// For an https:// URL: trust only this CA (PEM); default: the
        /// system's roots.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Admit a service: its certificate from the dev CA (ca-key.pem), its
    /// account bound to that identity at the end of the accounts file, its
    /// credentials in credentials/NAME.json; prints what to set in the
    /// service's environment. A running dev server picks the account up.
    AddService {
        /// Its name: client id, audience, `spiffe://auth.dev/NAME`, TLS name.
        name: String,
        /// An audience it may call and its scopes there: AUD=scope,scope
        /// (repeat for more audiences).
        #[arg(long = "audience", value_name = "AUD=SCOPES")]
        audiences: Vec<String>,
        /// Let users log in for it (adds NAME to tokens.user_audiences), for
        /// a service users call directly.
        #[arg(long)]
        for_users: bool,
        /// Let an existing service call it with these scopes:
        /// SERVICE=scope,scope (adds NAME to that account's audiences;
        /// repeatable).
        #[arg(long = "caller", value_name = "SERVICE=SCOPES")]
        callers: Vec<String>,
        /// The role claim of its own tokens.
        #[arg(long, default_value = "service")]
        role: String,
        /// A permission of its own at the auth service (repeatable).
        #[arg(long = "perm")]
        perms: Vec<String>,
    },
    /// Admit a user: a random password, its hash at the end of the users
    /// file, the password in credentials/NAME.json.
    AddUser {
        /// The login name.
        name: String,
        /// A permission the user may be granted (repeatable), e.g.
        /// payments:charge.
        #[arg(long = "perm")]
        perms: Vec<String>,
        /// The role claim of the user's tokens.
        #[arg(long, default_value = "customer")]
        role: String,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Revoke a token by its jti, or a whole login session by its sid, as
    /// the admin service account (needs tokens.admin_perm).
    Revoke {
        /// The access token's id.
        #[arg(long, required_unless_present = "sid", conflicts_with = "sid")]
        jti: Option<String>,
        /// The login session's id (logout: every token of it).
        #[arg(long)]
        sid: Option<String>,
        /// The admin account's credentials (JSON or TOML with client_id and
        /// client_secret).
        #[arg(long, env = "AUTH_SERVER_ADMIN_CREDENTIALS", default_value = ".auth-dev/credentials/admin.json")]
        credentials: PathBuf,
        /// The auth service's own audience (tokens.self_audience; by
        /// default the issuer).
        #[arg(long, env = "AUTH_SERVER_ADMIN_AUDIENCE", default_value = "auth-service")]
        audience: String,
    },
    /// List the keys the server publishes: kid, algorithm, key type.
    Keys,
}

/// Where the admin commands reach the server, and the admin's mTLS files.
#[derive(clap::Args)]
struct ConnFlags {
    /// The gRPC address.
    #[arg(long, env = "AUTH_SERVER_ADMIN_ADDR", default_value = "https://localhost:50051")]
    addr: String,
    /// The CA that signs the server's certificate (PEM).
    #[arg(long, env = "AUTH_SERVER_ADMIN_CA", default_value = ".auth-dev/ca.pem")]
    ca: PathBuf,
    /// The admin's client certificate (PEM).
    #[arg(long, env = "AUTH_SERVER_ADMIN_CERT", default_value = ".auth-dev/clients/admin.pem")]
    cert: PathBuf,
    /// The admin's client key (PEM).
    #[arg(long, env = "AUTH_SERVER_ADMIN_KEY", default_value = ".auth-dev/clients/admin-key.pem")]
    key: PathBuf,
    /// The server's SPIFFE ID (default: spiffe://<trust domain of the admin
    /// certificate>/auth-server).
    #[arg(long, env = "AUTH_SERVER_ADMIN_SERVER_ID")]
    server_id: Option<String>,
}

impl ConnFlags {
    fn connection(self) -> admin::Connection {
        admin::Connection { addr: self.addr, ca: self.ca, cert: self.cert, key: self.key, server_id: self.server_id }
    }
}

#[derive(clap::Args)]
struct Flags {
    /// gRPC listen address.
    #[arg(long)]
    grpc_addr: Option<SocketAddr>,
    /// HTTP side-port listen address.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// `memory` or a Redis URL.
    #[arg(long)]
    store: Option<String>,
    /// `text` or `json`.
    #[arg(long)]
    log_format: Option<String>,
}

impl Flags {
    fn overrides(&self) -> Overrides {
        Overrides {
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            store: self.store.clone(),
            log_format: self.log_format.clone(),
        }
    }
}

fn parse_alg(s: &str) -> Result<KeyAlg, String> {
    match s {
        "ES256" => Ok(KeyAlg::ES256),
        "EdDSA" => Ok(KeyAlg::EdDSA),
        "RS256" => Ok(KeyAlg::RS256),
        "PS256" => Ok(KeyAlg::PS256),
        _ => Err(format!("unknown alg {s:?}: use ES256, EdDSA, RS256 or PS256")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("auth-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve { config, flags } => {
            let cfg = Config::load(&config, &flags.overrides()).map_err(|e| e.to_string())?;
            run_server(cfg, None).await
        }
        Command::Dev { dir, command: Some(command), .. } => run_dev(&dir, command),
        Command::Dev { dir, flags, command: None } => {
            // A new dev config records the addresses of its first run, so
            // `dev add-service` prints the AUTH_URL that reaches it.
            let addr = |a: Option<SocketAddr>, default: &str| a.map_or_else(|| default.to_owned(), |a| a.to_string());
            let env = dev::ensure_with(
                &dir,
                &addr(flags.grpc_addr, "127.0.0.1:50051"),
                &addr(flags.http_addr, "127.0.0.1:8080"),
            )
            .map_err(|e| e.to_string())?;
            let cfg = Config::load(&env.config_path, &flags.overrides()).map_err(|e| e.to_string())?;
            run_server(cfg, Some(env)).await
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err("empty password on standard input".into());
            }
            println!("{}", directory::hash_password(password).map_err(|e| e.to_string())?);
            Ok(())
        }
        Command::NewSecret => {
            let secret = directory::generate_secret().map_err(|e| e.to_string())?;
            println!("client_secret = \"{secret}\"   # give to the service (Vault / Secret), never commit");
            println!("secret_sha256 = \"{}\"   # goes in the accounts file", directory::secret_digest_hex(&secret));
            Ok(())
        }
        Command::Keygen { alg, out } => {
            let alg = parse_alg(&alg)?;
            let pem = keys::generate_pkcs8_pem(alg).map_err(|e| e.to_string())?;
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            f.write_all(pem.as_bytes()).map_err(|e| e.to_string())?;
            let key = keys::LoadedKey::from_pem(alg, pem.as_bytes()).map_err(|e| e.to_string())?;
            println!("wrote {} ({}), kid {}", out.display(), alg.as_str(), key.kid());
            Ok(())
        }
        Command::Healthcheck { url, ca } if url.starts_with("https://") => {
            admin::healthcheck_https(&url, ca.as_deref()).await
        }
        Command::Healthcheck { url, .. } => healthcheck(&url).await,
        Command::Admin { conn, command } => run_admin(conn.connection(), command).await,
        Command::Decode { token, jwks, jwks_ca, jwks_from_server, issuer, audience, conn } => {
            let token = match token.as_deref() {
                None | Some("-") => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).map_err(|e| format!("standard input: {e}"))?;
                    line.trim().to_owned()
                }
                Some(t) => t.to_owned(),
            };
            let keys = match (jwks, jwks_from_server) {
                (Some(from), _) => Some(admin::load_jwks(&from, jwks_ca.as_deref()).await.map_err(|e| e.to_string())?),
                (None, true) => Some(admin::server_jwks(&conn.connection()).await.map_err(|e| e.to_string())?),
                (None, false) => None,
            };
            let now = auth_server::clock::Clock::now_unix(&auth_server::clock::SystemClock);
            let decoded = admin::Decoded::parse(&token).map_err(|e| e.to_string())?;
            print!("{}", decoded.render(now));
            let Some(keys) = keys else {
                println!("signature: not checked (give --jwks FILE|URL or --jwks-from-server)");
                return Ok(());
            };
            let verdict = admin::check(&token, &keys, issuer.as_deref(), audience.as_deref(), now);
            println!("{verdict}");
            match verdict {
                admin::Verdict::Valid { .. } => Ok(()),
                admin::Verdict::Invalid { .. } => Err("the token does not verify".into()),
            }
        }
        Command::NewAccount { name, audiences, mtls_identity, role, perms, credentials_out } => {
            let mut spec = admin::AccountSpec { name, mtls_identity, role: Some(role), perms, ..Default::default() };
            for a in &audiences {
                admin::add_audience(&mut spec, a).map_err(|e| e.to_string())?;
            }
            let made = admin::new_account(&spec).map_err(|e| e.to_string())?;
            if let Some(path) = &credentials_out {
                admin::write_new_private(path, &made.credentials_json).map_err(|e| e.to_string())?;
            }
            print!("{}", made.render(credentials_out.as_deref()));
            Ok(())
        }
    }
}

fn run_dev(dir: &std::path::Path, command: DevCommand) -> Result<(), String> {
    match command {
        DevCommand::AddService { name, audiences, for_users, callers, role, perms } => {
            let mut spec = dev::ServiceSpec { name, for_users, role, perms, ..Default::default() };
            for a in &audiences {
                dev::parse_audience(&mut spec.audiences, a).map_err(|e| e.to_string())?;
            }
            for c in &callers {
                dev::parse_audience(&mut spec.callers, c).map_err(|e| e.to_string())?;
            }
            let added = dev::add_service(dir, &spec).map_err(|e| e.to_string())?;
            print!("{}", added.render());
            Ok(())
        }
        DevCommand::AddUser { name, perms, role } => {
            let added = dev::add_user(dir, &dev::UserSpec { name, role, perms }).map_err(|e| e.to_string())?;
            print!("{}", added.render());
            Ok(())
        }
    }
}

async fn run_admin(conn: admin::Connection, command: AdminCommand) -> Result<(), String> {
    match command {
        AdminCommand::Keys => {
            let keys = admin::keys(&conn).await.map_err(|e| e.to_string())?;
            print!("{}", admin::render_keys(&keys));
            Ok(())
        }
        AdminCommand::Revoke { jti, sid, credentials, audience } => {
            let target = match (jti, sid) {
                (Some(j), _) => admin::RevokeTarget::Jti(j),
                (None, Some(s)) => admin::RevokeTarget::Sid(s),
                (None, None) => return Err("give --jti or --sid".into()),
            };
            let revoked = admin::revoke(&conn, &credentials, &audience, target).await.map_err(|e| e.to_string())?;
            println!("revoked: {revoked}");
            Ok(())
        }
    }
}

async fn run_server(cfg: Config, dev_env: Option<dev::DevEnv>) -> Result<(), String> {
    let telemetry = auth_server::logs::init(cfg.log_format, &cfg.otel).map_err(|e| e.to_string())?;
    let served = serve(cfg, dev_env).await;
    // The last spans go out after the last RPC.
    telemetry.shutdown().await;
    served
}

async fn serve(cfg: Config, dev_env: Option<dev::DevEnv>) -> Result<(), String> {
    // The process's metrics recorder, installed before the server registers
    // its metrics; `/metrics` renders it.
    let mut builder = Server::builder(cfg);
    match auth_server::observe::metrics::install_prometheus() {
        Ok(handle) => builder = builder.metrics(handle),
        Err(e) => tracing::warn!(error = %e, "metrics recorder not installed: no /metrics"),
    }
    let server = builder.build().await.map_err(|e| e.to_string())?;
    tracing::info!(store = server.core().store.name(), "state store selected");
    let listeners = Listeners::bind(server.config()).await.map_err(|e| e.to_string())?;
    if let Some(env) = &dev_env {
        print_dev_banner(env, server.config());
    }

    // SIGHUP re-reads the config file and swaps the policy (token settings,
    // users and accounts, signing keys) without a restart.
    let reloader = server.reloader();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            // The outcome is logged by reload itself.
            let _ = reloader.reload().await;
        }
    });
    server.serve(listeners, shutdown_signal()).await.map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

fn print_dev_banner(env: &dev::DevEnv, cfg: &Config) {
    let d = env.dir.display();
    println!(
        "auth-server dev mode ({}) in {d}\n  gRPC (mTLS): {}\n  HTTP:        http://{http}/.well-known/jwks.json\n  discovery:   http://{http}/.well-known/oauth-authorization-server\n  credentials: {d}/credentials/*.json\n  dev CA key:  {d}/ca-key.pem (mode 0600: `auth-server dev add-service NAME` issues from it)\n\nTry (needs grpcurl):\n  grpcurl -cacert {d}/ca.pem -cert {d}/clients/order.pem -key {d}/clients/order-key.pem \\\n    -d \"$(jq -c '{{client_credentials: .}} + {{audience: [\"inventory\"]}}' {d}/credentials/order.json)\" \\\n    localhost:{port} auth.v1.Auth/Login\nAs the admin (see README, \"Operator commands\"):\n  auth-server admin --addr https://localhost:{port} --ca {d}/ca.pem \\\n    --cert {d}/clients/admin.pem --key {d}/clients/admin-key.pem keys\n",
        if env.created { "created" } else { "reused" },
        cfg.grpc_addr,
        http = cfg.http_addr,
        port = cfg.grpc_addr.port()
    );
}

/// Exits 0 if `url` answers 200; any failure names the URL.
async fn healthcheck(url: &str) -> Result<(), String> {
    probe(url).await.map_err(|e| format!("healthcheck {url}: {e}"))
}

async fn probe(url: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::TcpStream::connect(host))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // A readiness answer is a few bytes; read at most 4 KiB of it.
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(3), (&mut s).take(4096).read_to_end(&mut buf))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if status.starts_with("HTTP/1.1 200") {
        return Ok(());
    }
    // The body says why (`/readyz`), on one short line.
    let why: String = body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(300).collect();
    Err(if why.is_empty() { format!("unhealthy: {status}") } else { format!("unhealthy: {status}: {why}") })
}
