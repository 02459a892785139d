//! SDK metrics (feature `metrics`) as a service's exporter sees them: a real
//! Prometheus recorder installed as the global recorder, real flows
//! against a real auth-server over mTLS, and the exact series the flows
//! must have moved.
//!
//! The recorder is shared by every test of this binary, and other modules'
//! verifiers and token sources record into it too once it is installed, so
//! each test here reads only series labelled with audiences no other test
//! uses (granted to `order` in its own dev environment).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use service_sdk::{Clock, FeedOptions, FileCredentials, ManualClock, TokenError, TokenSource, Verifier, VerifyError};
use testkit::{TcpProxy, TestServer};

use crate::client::{channel_to, creds, now};

// ---------------------------------------------------------------------------
// The recorder and reading it

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The binary's one global recorder, installed by the first test that asks
/// (before it builds anything that registers series).
fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        PrometheusBuilder::new().install_recorder().expect("only this module installs a global recorder")
    })
}

/// Every sample of the rendered exposition: `(name, labels) -> value`.
fn samples() -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let text = prometheus().render();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
            None => (series, BTreeMap::new()),
        };
        out.insert((name.to_owned(), labels), value);
    }
    out
}

/// `a="x",b="y"` (values here never hold quotes or commas).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    s.split("\",")
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair:?}"));
            (k.to_owned(), v.trim_end_matches('"').to_owned())
        })
        .collect()
}

/// The series `name` with exactly `labels`, if registered.
fn series(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    samples().get(&(name.to_owned(), labels)).copied()
}

/// Like [`series`], 0 when not registered (a counter never incremented).
fn count(name: &str, labels: &[(&str, &str)]) -> u64 {
    series(name, labels).unwrap_or(0.0) as u64
}

/// Waits (bounded) until the series `name` with `labels` reads `want`.
async fn wait_value(name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = series(name, labels);
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} is {got:?}, want {want} (30 s)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `promtool check metrics` on the SDK's part of the rendered exposition
/// (names, types, help text and units as Prometheus lints them). The
/// auth servers these tests run in-process record into the same recorder;
/// their metrics are the server's own tests' concern.
fn promtool_check() {
    let sdk = |line: &str| {
        let name = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")).unwrap_or(line);
        name.starts_with("auth_sdk_")
    };
    let text: String = prometheus().render().lines().filter(|l| sdk(l)).map(|l| format!("{l}\n")).collect();
    assert!(text.contains("# HELP auth_sdk_"), "no SDK metrics rendered");
    let spawned = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("promtool is not installed; install it with `apt-get install -y prometheus`")
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// A server whose `order` account may ask for this module's audiences

/// An auth server on a dev environment whose `order` account may also get
/// tokens for `audiences`. Keep the directory alive as long as the server.
async fn server_granting(audiences: &[&str]) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    testkit::auth_server::dev::ensure(dir.path()).unwrap();
    let path = dir.path().join("accounts.toml");
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let accounts = doc.get_mut("account").unwrap().as_array_mut().unwrap();
    let order = accounts.iter_mut().find(|a| a["client_id"].as_str() == Some("order")).unwrap();
    let granted = order.get_mut("audiences").unwrap().as_table_mut().unwrap();
    for audience in audiences {
        granted.insert((*audience).to_owned(), toml::Value::Array(vec![]));
    }
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    let srv = TestServer::builder().dev_dir(dir.path()).start().await;
    (srv, dir)
}

/// `order` as itself, for `audience` (client-credentials grant).
async fn service_token(srv: &TestServer, audience: &str) -> String {
    let (client_id, client_secret) = srv.client_credentials("order");
    let mut auth = AuthClient::new(srv.channel("order").await);
    let grant = pb::login_request::Grant::ClientCredentials(pb::ClientCredentialsGrant { client_id, client_secret });
    let req = pb::LoginRequest { grant: Some(grant), audience: vec![audience.into()], scope: vec![] };
    auth.login(req).await.unwrap().into_inner().access_token
}

/// The DER of dev client `name`'s certificate.
fn cert_der(srv: &TestServer, name: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let (pem, _) = srv.client_identity(name);
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

async fn revoke(srv: &TestServer, token: &str) {
    let mut auth = AuthClient::new(srv.channel("order").await);
    let target = pb::revoke_request::Target::AccessToken(token.into());
    auth.revoke(pb::RevokeRequest { target: Some(target) }).await.unwrap();
}

// ---------------------------------------------------------------------------
// Verifier

const VERIFICATIONS: &str = "auth_sdk_verifications_total";
const HITS: &str = "auth_sdk_verify_cache_hits_total";
const MISSES: &str = "auth_sdk_verify_cache_misses_total";
const JWKS: &str = "auth_sdk_jwks_refreshes_total";
const CONNECTED: &str = "auth_sdk_revocation_feed_connected";
const CONNECTS: &str = "auth_sdk_revocation_feed_connects_total";
const STALENESS: &str = "auth_sdk_revocation_feed_staleness_seconds";
const LAST_HEARD: &str = "auth_sdk_revocation_feed_last_heard_timestamp_seconds";
const ENTRIES: &str = "auth_sdk_revocation_feed_entries";

#[tokio::test]
async fn verifier_counts_outcomes_cache_keys_and_feed_state_under_its_own_audience() {
    const AUD: &str = "metrics-verify";
    let a = ("audience", AUD);
    let refused = |outcome, reason| count(VERIFICATIONS, &[a, ("outcome", outcome), ("reason", reason)]);
    let accepted = || count(VERIFICATIONS, &[a, ("outcome", "accepted")]);
    prometheus();
    let (srv, _dir) = server_granting(&[AUD]).await;
    let proxy = TcpProxy::start(srv.grpc_addr).await;
    let clock = ManualClock::new(now());
    let start = clock.now_unix() as f64;
    let verifier = Verifier::builder(srv.config().issuer.clone(), AUD)
        .channel(srv.channel_via(proxy.addr(), "inventory").await)
        .clock(clock.clone())
        .feed_options(FeedOptions { max_backoff: Duration::from_millis(200), ..FeedOptions::default() })
        .build()
        .unwrap();
    // The verification series exist from the start, at zero.
    assert_eq!(series(VERIFICATIONS, &[a, ("outcome", "accepted")]), Some(0.0));
    for e in [VerifyError::Expired, VerifyError::Revoked, VerifyError::FeedStale, VerifyError::NoKeys] {
        let outcome = if e.is_unavailable() { "unavailable" } else { "refused" };
        assert_eq!(series(VERIFICATIONS, &[a, ("outcome", outcome), ("reason", e.reason())]), Some(0.0), "{e:?}");
    }
    assert_eq!((series(HITS, &[a]), series(MISSES, &[a])), (Some(0.0), Some(0.0)));

    // Keys loaded once, the feed connected and heard from now.
    verifier.ready().await;
    assert_eq!(count(JWKS, &[a, ("trigger", "initial"), ("outcome", "ok")]), 1);
    assert_eq!((series(CONNECTED, &[a]), count(CONNECTS, &[a])), (Some(1.0), 1));
    assert_eq!(series(LAST_HEARD, &[a]), Some(start));
    wait_value(STALENESS, &[a], 0.0).await;
    wait_value(ENTRIES, &[a], 0.0).await;

    // One of each: accepted (a miss, then a hit), refused for the token's
    // faults, a key refetch for an unknown kid.
    // Order's tokens are bound to its certificate (RFC 8705): verified as
    // presented over it.
    let order = cert_der(&srv, "order");
    let token = service_token(&srv, AUD).await;
    verifier.verify(&token, Some(&order)).await.unwrap();
    verifier.verify(&token, Some(&order)).await.unwrap();
    let elsewhere = service_token(&srv, "inventory").await;
    assert_eq!(verifier.verify(&elsewhere, None).await.unwrap_err(), VerifyError::WrongAudience);
    assert_eq!(verifier.verify("not.a.token", None).await.unwrap_err(), VerifyError::Malformed);
    assert_eq!(verifier.verify(&"a".repeat(9 * 1024), None).await.unwrap_err(), VerifyError::TooLarge);
    let header = serde_json::json!({ "alg": "ES256", "kid": "metrics-unknown-kid", "typ": "at+jwt" });
    let (_, rest) = token.split_once('.').unwrap();
    let unknown_kid = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(header.to_string()));
    assert_eq!(verifier.verify(&unknown_kid, None).await.unwrap_err(), VerifyError::UnknownKid);

    assert_eq!(accepted(), 2);
    assert_eq!(
        ["wrong_aud", "malformed", "too_large", "unknown_kid", "expired"].map(|r| refused("refused", r)),
        [1, 1, 1, 1, 0]
    );
    assert_eq!((count(HITS, &[a]), count(MISSES, &[a])), (1, 4), "the oversized token never reached the cache");
    assert_eq!(count(JWKS, &[a, ("trigger", "unknown_kid"), ("outcome", "ok")]), 1);

    // A revocation, pushed: refused once the feed has it.
    revoke(&srv, &token).await;
    let mut passed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while verifier.verify(&token, Some(&order)).await.is_ok() {
        passed += 1;
        assert!(Instant::now() < deadline, "the revocation never reached the verifier");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!((accepted(), refused("refused", "revoked")), (2 + passed, 1));
    wait_value(ENTRIES, &[a], 1.0).await;

    // The feed cut off: disconnected, and stale as the clock moves on.
    proxy.cut();
    wait_value(CONNECTED, &[a], 0.0).await;
    clock.advance(31);
    let fresh = service_token(&srv, AUD).await;
    assert_eq!(verifier.verify(&fresh, Some(&order)).await.unwrap_err(), VerifyError::FeedStale);
    assert_eq!(refused("unavailable", "feed_stale"), 1);
    wait_value(STALENESS, &[a], 31.0).await;
    assert_eq!(series(LAST_HEARD, &[a]), Some(start), "nothing heard since");

    // Back: connected again, heard from now, fresh.
    proxy.restore();
    wait_value(CONNECTED, &[a], 1.0).await;
    wait_value(STALENESS, &[a], 0.0).await;
    assert_eq!(count(CONNECTS, &[a]), 2);
    assert_eq!(series(LAST_HEARD, &[a]), Some(start + 31.0));
    verifier.verify(&fresh, Some(&order)).await.unwrap();

    // The metrics and the verifier's own counters are the same events.
    let stats = verifier.stats();
    assert_eq!(accepted(), stats.accepted);
    assert_eq!((count(HITS, &[a]), count(MISSES, &[a])), (stats.cache_hits, stats.cache_misses));
    for (reason, n) in &stats.rejected {
        let outcome = if *reason == "feed_stale" { "unavailable" } else { "refused" };
        assert_eq!(refused(outcome, reason), *n, "{reason}");
    }
    promtool_check();
}

// ---------------------------------------------------------------------------
// Token source

const EXCHANGES: &str = "auth_sdk_token_exchanges_total";
const RENEWALS: &str = "auth_sdk_token_renewals_total";
const WAITS: &str = "auth_sdk_token_waits_total";

#[tokio::test]
async fn token_source_counts_exchanges_renewals_and_waits_by_target_audience() {
    const AUD: &str = "metrics-source";
    const DENIED: &str = "metrics-source-denied";
    const CUT: &str = "metrics-source-cut";
    const NO_CREDS: &str = "metrics-source-no-creds";
    let exchanges = |aud, outcome| count(EXCHANGES, &[("audience", aud), ("outcome", outcome)]);
    prometheus();
    let (srv, _dir) = server_granting(&[AUD]).await;
    let proxy = TcpProxy::start(srv.grpc_addr).await;
    let clock = ManualClock::new(now());
    let source = TokenSource::builder(channel_to(&srv.dir, "order", proxy.addr()), creds(&srv, "order"))
        .clock(Arc::new(clock.clone()))
        .renew_check_interval(Duration::from_millis(10))
        .build();

    // Three first calls at once: all wait, one exchange.
    let (first, second, third) = tokio::join!(source.token(AUD), source.token(AUD), source.token(AUD));
    let first = first.unwrap();
    assert_eq!(second.unwrap().as_str(), first.as_str());
    assert_eq!(third.unwrap().as_str(), first.as_str());
    assert_eq!((count(WAITS, &[("audience", AUD)]), exchanges(AUD, "ok")), (3, 1));
    source.token(AUD).await.unwrap();
    assert_eq!(count(WAITS, &[("audience", AUD)]), 3, "a cached token is no wait");

    // Past the renewal point: one renewal, in the background.
    let life = first.expires_at() - clock.now_unix();
    clock.advance(life * 85 / 100);
    wait_value(EXCHANGES, &[("audience", AUD), ("outcome", "ok")], 2.0).await;
    assert_eq!((count(RENEWALS, &[("audience", AUD)]), count(WAITS, &[("audience", AUD)])), (1, 3));

    // Refused by the policy, and the auth server out of reach.
    assert!(matches!(source.token(DENIED).await.unwrap_err(), TokenError::PermissionDenied { .. }));
    assert_eq!((exchanges(DENIED, "permission_denied"), count(WAITS, &[("audience", DENIED)])), (1, 1));
    proxy.cut();
    assert!(matches!(source.token(CUT).await.unwrap_err(), TokenError::Unavailable { .. }));
    assert_eq!(exchanges(CUT, "unavailable"), 1);

    // The metrics and the source's own counters are the same events.
    let stats = source.stats();
    let sent = exchanges(AUD, "ok") + exchanges(DENIED, "permission_denied") + exchanges(CUT, "unavailable");
    assert_eq!((sent, stats.exchanges, stats.renewals, stats.waited), (4, 4, 1, 5));

    // Credentials that cannot be read: nothing sent, counted as such.
    let missing = tempfile::tempdir().unwrap();
    let unreadable = FileCredentials::document(missing.path().join("absent.json"));
    let broken = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), unreadable).build();
    assert!(matches!(broken.token(NO_CREDS).await.unwrap_err(), TokenError::Credentials(_)));
    assert_eq!((exchanges(NO_CREDS, "credentials"), broken.stats().exchanges), (1, 0));
    promtool_check();
}
