//! Load tool for the auth service over mTLS.
//!
//! ```text
//! cargo run --release -p examples --bin loadgen -- --dir .auth-dev \
//!     --rpc exchange --connections 4 --concurrency 64 --duration 20
//! ```
//!
//! Prints achieved RPS, p50/p90/p99/max latency, errors by status code, and
//! the raw single-core sign rate of the server's algorithm measured in the
//! same run, with the ratio between the two. `--rate R` paces the load to R
//! requests per second in total (for latency at a fixed fraction of peak).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, ExchangeTokenRequest, GetJwksRequest, LoginRequest, PasswordGrant, RefreshRequest,
    login_request,
};
use auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
use clap::{Parser, ValueEnum};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Rpc {
    /// ExchangeToken with client credentials (service acting as itself).
    Exchange,
    /// Login with the client-credentials grant.
    LoginClientCredentials,
    /// Refresh (each worker rotates its own family).
    Refresh,
}

/// Load generator for auth.v1.Auth.
#[derive(Parser, Debug)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    addr: String,
    /// Dev directory with ca.pem, clients/ and credentials/.
    #[arg(long, default_value = ".auth-dev")]
    dir: PathBuf,
    /// Which service account (and client certificate) to use.
    #[arg(long, default_value = "order")]
    client: String,
    /// User for `--rpc refresh`.
    #[arg(long, default_value = "alice")]
    user: String,
    /// Number of HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent requests in flight, in total.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of measured load (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The RPC to drive.
    #[arg(long, value_enum, default_value = "exchange")]
    rpc: Rpc,
    /// Target audience.
    #[arg(long, default_value = "inventory")]
    audience: String,
    /// Total requests per second to pace at (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn connect(args: &Args) -> Result<Channel, String> {
    let ca = read(&args.dir.join("ca.pem"))?;
    let cert = read(&args.dir.join("clients").join(format!("{}.pem", args.client)))?;
    let key = read(&args.dir.join("clients").join(format!("{}-key.pem", args.client)))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    Channel::from_shared(args.addr.clone())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect {}: {e}", args.addr))
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

/// Raw single-core sign rate of `alg` through aws-lc-rs, measured now.
fn raw_sign_rate(alg: KeyAlg) -> Result<f64, String> {
    let pem = generate_pkcs8_pem(alg).map_err(|e| e.to_string())?;
    let key = LoadedKey::from_pem(alg, pem.as_bytes()).map_err(|e| e.to_string())?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let msg = [b'x'; 400];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..50 {
            key.sign_raw(&rng, &msg).map_err(|e| e.to_string())?;
        }
        n += 50;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let creds: serde_json::Value =
        serde_json::from_str(&read(&args.dir.join("credentials").join(format!("{}.json", args.client)))?)
            .map_err(|e| e.to_string())?;
    let client_id = creds["client_id"].as_str().ok_or("credentials: client_id")?.to_owned();
    let client_secret = creds["client_secret"].as_str().ok_or("credentials: client_secret")?.to_owned();

    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&args).await?);
    }
    let jwks = AuthClient::new(channels[0].clone())
        .get_jwks(GetJwksRequest {})
        .await
        .map_err(|e| format!("GetJwks: {e}"))?
        .into_inner()
        .jwks_json;
    let doc: serde_json::Value = serde_json::from_str(&jwks).map_err(|e| e.to_string())?;
    let alg = match doc["keys"][0]["alg"].as_str() {
        Some("EdDSA") => KeyAlg::EdDSA,
        Some("RS256") => KeyAlg::RS256,
        Some("PS256") => KeyAlg::PS256,
        _ => KeyAlg::ES256,
    };

    let user = if matches!(args.rpc, Rpc::Refresh) {
        let u: serde_json::Value =
            serde_json::from_str(&read(&args.dir.join("credentials").join(format!("{}.json", args.user)))?)
                .map_err(|e| e.to_string())?;
        Some((
            u["username"].as_str().ok_or("user credentials: username")?.to_owned(),
            u["password"].as_str().ok_or("user credentials: password")?.to_owned(),
        ))
    } else {
        None
    };

    let warmup = Duration::from_secs(2);
    let measure = Duration::from_secs(args.duration);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + measure;
    let per_worker_interval =
        if args.rate > 0.0 { Some(Duration::from_secs_f64(args.concurrency.max(1) as f64 / args.rate)) } else { None };
    let shared = Arc::new((client_id, client_secret, args.audience.clone()));
    let mut tasks = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let mut client = AuthClient::new(channels[w % channels.len()].clone());
        let shared = Arc::clone(&shared);
        let rpc = args.rpc;
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut refresh_token = String::new();
            if let Some((username, password)) = &user {
                match client
                    .login(LoginRequest {
                        grant: Some(login_request::Grant::Password(PasswordGrant {
                            username: username.clone(),
                            password: password.clone(),
                        })),
                        audience: vec![],
                        scope: vec![],
                    })
                    .await
                {
                    Ok(r) => refresh_token = r.into_inner().refresh_token,
                    Err(e) => {
                        *tally.errors.entry(format!("login {:?}", e.code())).or_default() += 1;
                        return tally;
                    }
                }
            }
            let mut next = Instant::now();
            loop {
                if let Some(iv) = per_worker_interval {
                    next += iv;
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                }
                let t0 = Instant::now();
                if t0 >= stop_at {
                    break;
                }
                let (id, secret, aud) = (&shared.0, &shared.1, &shared.2);
                let res = match rpc {
                    Rpc::Exchange => client
                        .exchange_token(ExchangeTokenRequest {
                            client_id: id.clone(),
                            client_secret: secret.clone(),
                            audience: aud.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Rpc::LoginClientCredentials => client
                        .login(LoginRequest {
                            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant {
                                client_id: id.clone(),
                                client_secret: secret.clone(),
                            })),
                            audience: vec![aud.clone()],
                            scope: vec![],
                        })
                        .await
                        .map(|_| ()),
                    Rpc::Refresh => client
                        .refresh(RefreshRequest { refresh_token: refresh_token.clone() })
                        .await
                        .map(|r| refresh_token = r.into_inner().refresh_token),
                };
                let done = Instant::now();
                if t0 >= measure_from {
                    match res {
                        Ok(()) => tally
                            .latencies_us
                            .push(u32::try_from(done.duration_since(t0).as_micros()).unwrap_or(u32::MAX)),
                        Err(e) => *tally.errors.entry(format!("{:?}", e.code())).or_default() += 1,
                    }
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.map_err(|e| e.to_string())?;
        all.latencies_us.extend(t.latencies_us);
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    all.latencies_us.sort_unstable();
    let ok = all.latencies_us.len() as f64;
    let rps = ok / measure.as_secs_f64();
    println!(
        "rpc={:?} connections={} concurrency={} duration={}s rate={}",
        args.rpc,
        args.connections,
        args.concurrency,
        args.duration,
        if args.rate > 0.0 { format!("{}/s", args.rate) } else { "max".into() }
    );
    println!("ok: {} ({rps:.0}/s)", all.latencies_us.len());
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&all.latencies_us, 0.50),
        percentile(&all.latencies_us, 0.90),
        percentile(&all.latencies_us, 0.99),
        all.latencies_us.last().map_or(0.0, |v| f64::from(*v) / 1000.0)
    );
    if all.errors.is_empty() {
        println!("errors: none");
    } else {
        for (code, n) in &all.errors {
            println!("errors: {code} x{n}");
        }
    }
    let raw = tokio::task::spawn_blocking(move || raw_sign_rate(alg)).await.map_err(|e| e.to_string())??;
    println!(
        "raw {} sign rate (one core, this process): {raw:.0}/s; achieved/raw = {:.1}%",
        alg.as_str(),
        100.0 * rps / raw
    );
    Ok(())
}
