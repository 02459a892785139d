//! ExchangeToken's handler against the floor's, in process: no transport,
//! no TLS, no tower layers. What separates the two is what the auth server
//! does per call beyond signing: authentication, the exchange policy, the
//! `cnf` binding, the audit line, the metrics.
//!
//! `cargo bench -p examples --bench handler` prints, per call, the CPU time
//! of the whole process (user + system, so the audit writer thread counts)
//! of:
//! - `floor`: `examples::floor` in `sign` mode (a fresh ES256 token of the
//!   same shape, its own key);
//! - `handler`: the auth server's `AuthService::exchange_token` for `order`
//!   acting as itself over its dev certificate, with the audit trail to a
//!   file and a Prometheus recorder installed, as `auth-server serve` runs;
//! - `handler, no audit`: the same with `[audit] enabled = false`;
//!
//! and floor ÷ handler. Five interleaved rounds; each reports its best.
//! `BENCH_SECS` (default 2) sets the CPU time per measurement.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_server::Auth as _;
use auth_server::config::{Config, Overrides};
use auth_server::edge::ConnInfo;
use auth_server::grpc::AuthService;
use auth_server::server::Server;
use auth_server::tls::PeerIdentity;
use examples::floor::{Floor, FloorMode};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// CPU time of the whole process so far (user + system), in clock ticks of
/// 10 ms (Linux fixes USER_HZ at 100).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat (Linux)");
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Runs `call` until the process has spent about `secs` of CPU and returns
/// microseconds of CPU per call.
async fn cpu_per_call<F, Fut>(secs: f64, mut call: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..200 {
        call().await;
    }
    let budget = (secs * 100.0).ceil().max(1.0) as u64;
    let start = cpu_ticks();
    let mut n = 0u64;
    let mut last = Instant::now();
    loop {
        for _ in 0..20 {
            call().await;
        }
        n += 20;
        if last.elapsed() >= Duration::from_millis(50) {
            last = Instant::now();
            let used = cpu_ticks() - start;
            if used >= budget {
                return used as f64 * 10_000.0 / n as f64;
            }
        }
    }
}

/// The auth server's gRPC service on a fresh dev environment in `dir`,
/// with the audit trail to a file there (or off).
async fn auth_service(dir: &std::path::Path, audit: bool) -> (AuthService, auth_server::dev::DevEnv) {
    let env = auth_server::dev::ensure(dir).expect("dev environment");
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let audit_section = if audit { "\n[audit]\npath = \"audit.jsonl\"\n" } else { "\n[audit]\nenabled = false\n" };
    std::fs::write(&env.config_path, text + audit_section).unwrap();
    let config = Config::load_with(&env.config_path, &Overrides::default(), |_| {}).expect("config");
    let server = Server::builder(config).build().await.expect("server");
    (AuthService::new(Arc::clone(server.core())), env)
}

/// A request as the edge hands it over: `order`'s credentials, from the
/// connection of `order`'s dev certificate.
fn request(env: &auth_server::dev::DevEnv) -> impl Fn() -> tonic::Request<pb::ExchangeTokenRequest> + use<> {
    let creds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.credentials_path("order")).unwrap()).unwrap();
    let pem = std::fs::read(env.client_cert_path("order")).unwrap();
    let der = CertificateDer::from_pem_slice(&pem).expect("order's certificate");
    let peer = Arc::new(PeerIdentity::from_der(&der).expect("order's identity"));
    let msg = pb::ExchangeTokenRequest {
        client_id: creds["client_id"].as_str().unwrap().into(),
        client_secret: creds["client_secret"].as_str().unwrap().into(),
        audience: "inventory".into(),
        ..Default::default()
    };
    move || {
        let mut req = tonic::Request::new(msg.clone());
        req.extensions_mut().insert(ConnInfo { remote_addr: None, peer: Some(Arc::clone(&peer)) });
        req
    }
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let secs: f64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let _metrics = auth_server::observe::metrics::install_prometheus().expect("metrics recorder");
        let with_audit = tempfile::tempdir().unwrap();
        let without_audit = tempfile::tempdir().unwrap();
        let (audited, audited_env) = auth_service(with_audit.path(), true).await;
        let (plain, plain_env) = auth_service(without_audit.path(), false).await;
        let audited_req = request(&audited_env);
        let plain_req = request(&plain_env);
        let floor = Floor::with_own_key(FloorMode::Sign).unwrap();
        // Each must answer a token before it is measured.
        assert!(!audited.exchange_token(audited_req()).await.unwrap().into_inner().access_token.is_empty());
        assert!(!plain.exchange_token(plain_req()).await.unwrap().into_inner().access_token.is_empty());
        assert!(!floor.exchange_token(audited_req()).await.unwrap().into_inner().access_token.is_empty());

        let (mut f, mut h, mut n) = (f64::MAX, f64::MAX, f64::MAX);
        for round in 1..=5 {
            let fr = cpu_per_call(secs, || async {
                floor.exchange_token(audited_req()).await.unwrap();
            })
            .await;
            let hr = cpu_per_call(secs, || async {
                audited.exchange_token(audited_req()).await.unwrap();
            })
            .await;
            let nr = cpu_per_call(secs, || async {
                plain.exchange_token(plain_req()).await.unwrap();
            })
            .await;
            println!("round {round}: floor {fr:.2} us  handler {hr:.2} us  handler, no audit {nr:.2} us");
            (f, h, n) = (f.min(fr), h.min(hr), n.min(nr));
        }
        println!("best, CPU per call (whole process):");
        println!("  floor (sign)       {f:8.2} us");
        println!(
            "  handler            {h:8.2} us   floor/handler {:.1}%   beyond the floor {:.2} us",
            100.0 * f / h,
            h - f
        );
        println!(
            "  handler, no audit  {n:8.2} us   floor/handler {:.1}%   the audit line {:.2} us",
            100.0 * f / n,
            h - n
        );
    });
}
