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
//! requests per second in total (for latency at a fixed fraction of peak),
//! on a fixed schedule with latency counted from each request's intended
//! send time, so a stall is never hidden (see `examples::loadgen`); the
//! report then adds how many sends were late and how many were never sent.
//! A closed standard output (`loadgen ... | head`) ends the run quietly.
//!
//! `--batch N` (with `--rpc exchange`) drives ExchangeTokens with N
//! audiences per call instead: `--audience` and `batch-2` ... `batch-N`,
//! which the account must be allowed (examples/scripts/batch.sh allows
//! them in a dev directory); the report adds the tokens granted per second.
//!
//! `--rpc login-wrong` drives wrong-password Logins, each for a new unknown
//! username (a password flood). `--flood N` measures the chosen RPC twice in
//! one run: alone, then with N wrong-password Logins kept in flight from
//! another client identity (`--flood-client`); with `--server-pid` it also
//! prints the server's resident memory before, at most during, and after
//! each phase, and the CPU time the server spent per answered call.
//! `--rpc exchange-for-user` exchanges a user's access token (one password
//! login per worker) as the subject token.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    AudienceRequest, ClientCredentialsGrant, ExchangeTokenRequest, ExchangeTokensRequest, GetJwksRequest, LoginRequest,
    PasswordGrant, RefreshRequest, audience_result, login_request,
};
use auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
use clap::{Parser, ValueEnum};
use examples::loadgen::{Pacer, Report, ReportError, dev_channel};
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Rpc {
    /// ExchangeToken with client credentials (service acting as itself).
    Exchange,
    /// ExchangeToken for a user: each worker logs `--user` in once
    /// (password) and exchanges that access token as the subject token.
    ExchangeForUser,
    /// Login with the client-credentials grant.
    LoginClientCredentials,
    /// Refresh (each worker rotates its own family).
    Refresh,
    /// Login with a wrong password, for a new unknown username each time.
    LoginWrong,
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
    /// User for `--rpc refresh` and `--rpc exchange-for-user`.
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
    /// With `--rpc exchange`: ExchangeTokens for this many audiences per
    /// call (`--audience`, then `batch-2` ... `batch-N`; at most 16); 0
    /// drives ExchangeToken.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Total requests per second to pace at (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Also measure with this many wrong-password Logins in flight (0: no
    /// flood phase).
    #[arg(long, default_value_t = 0)]
    flood: usize,
    /// The client identity (certificate) the flood comes from.
    #[arg(long, default_value = "inventory")]
    flood_client: String,
    /// The auth-server's process id, to print its resident memory and
    /// the CPU time it spent per answered call in the measured window.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn connect(args: &Args, client: &str) -> Result<Channel, String> {
    dev_channel(&args.addr, &args.dir, client).await
}

#[derive(Default)]
struct Tally {
    /// Latencies of the answered requests, from their intended send time
    /// when paced.
    latencies_us: Vec<u32>,
    /// Tokens granted by the answered requests (a batch grants several).
    tokens: u64,
    errors: BTreeMap<String, u64>,
    /// Paced only: measured requests sent more than one interval late, and
    /// the largest lag.
    late: u64,
    max_lag: Duration,
    /// Paced only: requests due in the measured window that were never
    /// sent (the workers were still behind when it ended).
    unsent: u64,
    paced: bool,
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

/// Why a run ended early.
enum Stop {
    /// The report could not be written (standard output closed: quietly).
    Report(ReportError),
    /// Anything else.
    Failed(String),
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Stop::Failed(e)
    }
}

impl From<&str> for Stop {
    fn from(e: &str) -> Self {
        Stop::Failed(e.to_owned())
    }
}

impl From<ReportError> for Stop {
    fn from(e: ReportError) -> Self {
        Stop::Report(e)
    }
}

/// The report on standard output.
type Out = Report<std::io::Stdout>;

/// Writes a line of the report (`say!(out, "...", args)?`).
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        $out.line(format_args!($($arg)*))
    };
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::io::Write as _;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut out = Report::new(std::io::stdout());
    match run(Args::parse(), &mut out).await {
        // A closed pipe (`loadgen ... | head`) is how a reader says it has
        // read enough.
        Ok(()) | Err(Stop::Report(ReportError::Closed)) => std::process::ExitCode::SUCCESS,
        Err(Stop::Report(e)) => {
            let _ = writeln!(std::io::stderr(), "loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
        Err(Stop::Failed(e)) => {
            let _ = writeln!(std::io::stderr(), "loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What every worker of one load shares.
struct Load {
    rpc: Rpc,
    client_id: String,
    client_secret: String,
    audience: String,
    /// The audiences of each ExchangeTokens call (empty: ExchangeToken).
    batch: Vec<AudienceRequest>,
    user: Option<(String, String)>,
    concurrency: usize,
    rate: f64,
}

/// Drives `load` over `channels` from `start` until `stop_at`, recording
/// from `measure_from`. Paced, each worker keeps its own schedule (see
/// `examples::loadgen`), the workers' ticks spread evenly over an interval.
async fn drive(
    load: Arc<Load>,
    channels: &[Channel],
    start: Instant,
    measure_from: Instant,
    stop_at: Instant,
) -> Result<Tally, String> {
    let workers = load.concurrency.max(1);
    let per_worker_interval =
        if load.rate > 0.0 { Some(Duration::from_secs_f64(workers as f64 / load.rate)) } else { None };
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut client = AuthClient::new(channels[w % channels.len()].clone());
        let load = Arc::clone(&load);
        let mut pacer = per_worker_interval.map(|iv| Pacer::new(start + iv.mul_f64(w as f64 / workers as f64), iv));
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally { paced: pacer.is_some(), ..Tally::default() };
            let mut sent_measured = 0u64;
            let mut refresh_token = String::new();
            let mut subject_token = String::new();
            if let (Rpc::Refresh | Rpc::ExchangeForUser, Some((username, password))) = (load.rpc, &load.user) {
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
                    Ok(r) => {
                        let r = r.into_inner();
                        (refresh_token, subject_token) = (r.refresh_token, r.access_token);
                    }
                    Err(e) => {
                        *tally.errors.entry(format!("login {:?}", e.code())).or_default() += 1;
                        return tally;
                    }
                }
            }
            let mut n = 0u64;
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                // When this request is meant to leave: its tick when paced
                // (latency counts from there), else now.
                let t0 = match pacer.as_mut() {
                    Some(pacer) => {
                        let tick = pacer.next(now);
                        if tick.due >= stop_at {
                            break;
                        }
                        if tick.due >= measure_from {
                            sent_measured += 1;
                            if let Some(lag) = tick.late {
                                tally.late += 1;
                                tally.max_lag = tally.max_lag.max(lag);
                            }
                        }
                        tokio::time::sleep(tick.wait).await;
                        tick.due
                    }
                    None => now,
                };
                n += 1;
                let mut granted = 1u64;
                let (id, secret, aud) = (&load.client_id, &load.client_secret, &load.audience);
                let res = match load.rpc {
                    Rpc::Exchange if !load.batch.is_empty() => client
                        .exchange_tokens(ExchangeTokensRequest {
                            client_id: id.clone(),
                            client_secret: secret.clone(),
                            audiences: load.batch.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|r| {
                            let results = r.into_inner().results;
                            granted = results
                                .iter()
                                .filter(|r| matches!(r.result, Some(audience_result::Result::Token(_))))
                                .count() as u64;
                            let refused = results.len() as u64 - granted;
                            if refused > 0 && t0 >= measure_from {
                                *tally.errors.entry("audience refused".into()).or_default() += refused;
                            }
                        }),
                    Rpc::Exchange => client
                        .exchange_token(ExchangeTokenRequest {
                            client_id: id.clone(),
                            client_secret: secret.clone(),
                            audience: aud.clone(),
                            ..Default::default()
                        })
                        .await
                        .map(|_| ()),
                    Rpc::ExchangeForUser => client
                        .exchange_token(ExchangeTokenRequest {
                            client_id: id.clone(),
                            client_secret: secret.clone(),
                            subject_token: subject_token.clone(),
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
                    Rpc::LoginWrong => client
                        .login(LoginRequest {
                            grant: Some(login_request::Grant::Password(PasswordGrant {
                                username: format!("flood-{w}-{n}"),
                                password: "wrong".into(),
                            })),
                            audience: vec![],
                            scope: vec![],
                        })
                        .await
                        .map(|_| ()),
                };
                let done = Instant::now();
                if t0 >= measure_from {
                    match res {
                        Ok(()) => {
                            tally.tokens += granted;
                            tally
                                .latencies_us
                                .push(u32::try_from(done.duration_since(t0).as_micros()).unwrap_or(u32::MAX))
                        }
                        Err(e) => *tally.errors.entry(format!("{:?}", e.code())).or_default() += 1,
                    }
                }
            }
            if let Some(pacer) = &pacer {
                // The ticks of the measured window this worker never sent.
                let last = stop_at - Duration::from_nanos(1);
                let due = pacer.due_by(last).saturating_sub(pacer.due_by(measure_from - Duration::from_nanos(1)));
                tally.unsent = due.saturating_sub(sent_measured);
            }
            tally
        }));
    }
    let mut all = Tally { paced: per_worker_interval.is_some(), ..Tally::default() };
    for t in tasks {
        let t = t.await.map_err(|e| e.to_string())?;
        all.latencies_us.extend(t.latencies_us);
        all.tokens += t.tokens;
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
        all.late += t.late;
        all.max_lag = all.max_lag.max(t.max_lag);
        all.unsent += t.unsent;
    }
    all.latencies_us.sort_unstable();
    Ok(all)
}

/// Prints a tally's rate, latencies and statuses; returns its rate.
fn print_tally(out: &mut Out, label: &str, tally: &Tally, measure: Duration) -> Result<f64, ReportError> {
    let ok = tally.latencies_us.len() as f64;
    let rps = ok / measure.as_secs_f64();
    say!(out, "{label}ok: {} ({rps:.0}/s)", tally.latencies_us.len())?;
    say!(out, "{label}tokens: {} ({:.0}/s)", tally.tokens, tally.tokens as f64 / measure.as_secs_f64())?;
    say!(
        out,
        "{label}latency ms{}: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        if tally.paced { " (from the intended send time)" } else { "" },
        percentile(&tally.latencies_us, 0.50),
        percentile(&tally.latencies_us, 0.90),
        percentile(&tally.latencies_us, 0.99),
        tally.latencies_us.last().map_or(0.0, |v| f64::from(*v) / 1000.0)
    )?;
    if tally.paced {
        say!(
            out,
            "{label}pace: {} sent late (over one interval; max lag {:.2} ms), {} never sent",
            tally.late,
            tally.max_lag.as_secs_f64() * 1000.0,
            tally.unsent
        )?;
    }
    if tally.errors.is_empty() {
        say!(out, "{label}errors: none")?;
    } else {
        for (code, n) in &tally.errors {
            say!(out, "{label}errors: {code} x{n}")?;
        }
    }
    Ok(rps)
}

/// Resident memory of `pid` in MiB, from /proc.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Samples the server's RSS every 100 ms until `stop`; returns the largest.
fn watch_rss(pid: Option<u32>, stop: Instant) -> tokio::task::JoinHandle<Option<f64>> {
    tokio::spawn(async move {
        let pid = pid?;
        let mut max = rss_mib(pid)?;
        while Instant::now() < stop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            max = max.max(rss_mib(pid).unwrap_or(0.0));
        }
        Some(max)
    })
}

/// CPU time (user + system) `pid` has used, from /proc.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 14th and 15th fields of the line.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // Clock ticks: 100 per second on Linux (USER_HZ).
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The CPU time `pid` uses between `from` and `to`.
fn watch_cpu(pid: Option<u32>, from: Instant, to: Instant) -> tokio::task::JoinHandle<Option<Duration>> {
    tokio::spawn(async move {
        let pid = pid?;
        tokio::time::sleep_until(from.into()).await;
        let start = cpu_time(pid)?;
        tokio::time::sleep_until(to.into()).await;
        Some(cpu_time(pid)?.saturating_sub(start))
    })
}

fn credentials(args: &Args, name: &str) -> Result<(String, String), String> {
    let creds: serde_json::Value =
        serde_json::from_str(&read(&args.dir.join("credentials").join(format!("{name}.json")))?)
            .map_err(|e| e.to_string())?;
    Ok((
        creds["client_id"].as_str().ok_or("credentials: client_id")?.to_owned(),
        creds["client_secret"].as_str().ok_or("credentials: client_secret")?.to_owned(),
    ))
}

/// The audiences of a batch of `n`: `first`, then `batch-2` ... `batch-n`.
fn batch_audiences(first: &str, n: usize) -> Vec<AudienceRequest> {
    let names = std::iter::once(first.to_owned()).chain((2..=n).map(|i| format!("batch-{i}")));
    names.take(n).map(|audience| AudienceRequest { audience, scope: vec![] }).collect()
}

async fn run(args: Args, out: &mut Out) -> Result<(), Stop> {
    if args.batch > 16 {
        return Err("--batch: at most 16 audiences per call".into());
    }
    let (client_id, client_secret) = credentials(&args, &args.client)?;
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&args, &args.client).await?);
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

    let user = if matches!(args.rpc, Rpc::Refresh | Rpc::ExchangeForUser) {
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
    let load = Arc::new(Load {
        rpc: args.rpc,
        client_id,
        client_secret,
        audience: args.audience.clone(),
        batch: if matches!(args.rpc, Rpc::Exchange) { batch_audiences(&args.audience, args.batch) } else { vec![] },
        user,
        concurrency: args.concurrency,
        rate: args.rate,
    });

    say!(
        out,
        "rpc={:?}{} connections={} concurrency={} duration={}s rate={}",
        args.rpc,
        if args.batch > 0 { format!(" batch={}", args.batch) } else { String::new() },
        args.connections,
        args.concurrency,
        args.duration,
        if args.rate > 0.0 { format!("{}/s", args.rate) } else { "max".into() }
    )?;
    let warmup = Duration::from_secs(2);
    let measure = Duration::from_secs(args.duration);
    let rss_before = args.server_pid.and_then(rss_mib);
    let start = Instant::now();
    let stop_at = start + warmup + measure;
    let rss_watch = watch_rss(args.server_pid, stop_at);
    let cpu_watch = watch_cpu(args.server_pid, start + warmup, stop_at);
    let alone = drive(Arc::clone(&load), &channels, start, start + warmup, stop_at).await?;
    let label = if args.flood > 0 { "alone: " } else { "" };
    let rps = print_tally(out, label, &alone, measure)?;
    if let (Some(before), Ok(Some(max))) = (rss_before, rss_watch.await) {
        say!(out, "{label}server RSS MiB: before {before:.1}, max {max:.1}")?;
    }
    if let Ok(Some(cpu)) = cpu_watch.await
        && !alone.latencies_us.is_empty()
    {
        let per_call_us = cpu.as_secs_f64() * 1e6 / alone.latencies_us.len() as f64;
        say!(
            out,
            "{label}server CPU: {per_call_us:.1} us per answered call ({:.0}% of one core over the measured window)",
            cpu.as_secs_f64() * 100.0 / measure.as_secs_f64()
        )?;
    }

    if args.flood > 0 {
        let mut flood_channels = Vec::new();
        for _ in 0..args.connections.max(1) {
            flood_channels.push(connect(&args, &args.flood_client).await?);
        }
        let flood = Arc::new(Load {
            rpc: Rpc::LoginWrong,
            client_id: String::new(),
            client_secret: String::new(),
            audience: String::new(),
            batch: vec![],
            user: None,
            concurrency: args.flood,
            rate: 0.0,
        });
        let rss_before = args.server_pid.and_then(rss_mib);
        let start = Instant::now();
        let stop_at = start + warmup + measure;
        let rss_watch = watch_rss(args.server_pid, stop_at);
        let flood_task = {
            let flood_channels = flood_channels.clone();
            tokio::spawn(async move { drive(flood, &flood_channels, start, start + warmup, stop_at).await })
        };
        let with_flood = drive(Arc::clone(&load), &channels, start, start + warmup, stop_at).await?;
        let flood_tally = flood_task.await.map_err(|e| e.to_string())??;
        print_tally(out, "with flood: ", &with_flood, measure)?;
        let total: u64 = flood_tally.errors.values().sum::<u64>() + flood_tally.latencies_us.len() as u64;
        say!(
            out,
            "flood: {} wrong-password Logins in flight from {}: {total} answered ({:.0}/s)",
            args.flood,
            args.flood_client,
            total as f64 / measure.as_secs_f64()
        )?;
        for (code, n) in &flood_tally.errors {
            say!(out, "flood: {code} x{n}")?;
        }
        let max = rss_watch.await.ok().flatten();
        // The pool's idle threads give their memory back within a second or two.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = args.server_pid.and_then(rss_mib);
        if let (Some(before), Some(max), Some(after)) = (rss_before, max, after) {
            say!(out, "with flood: server RSS MiB: before {before:.1}, max {max:.1}, 3 s after {after:.1}")?;
        }
        let (p99_alone, p99_flood) =
            (percentile(&alone.latencies_us, 0.99), percentile(&with_flood.latencies_us, 0.99));
        say!(
            out,
            "{:?} p99: alone {p99_alone:.2} ms, with flood {p99_flood:.2} ms ({:.2}x)",
            args.rpc,
            if p99_alone > 0.0 { p99_flood / p99_alone } else { 0.0 }
        )?;
    }

    let raw = tokio::task::spawn_blocking(move || raw_sign_rate(alg)).await.map_err(|e| e.to_string())??;
    say!(
        out,
        "raw {} sign rate (one core, this process): {raw:.0}/s; achieved/raw = {:.1}%",
        alg.as_str(),
        100.0 * rps / raw
    )?;
    Ok(())
}
