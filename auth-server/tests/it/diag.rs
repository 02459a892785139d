//! Honest diagnostics: what an operator reads when something is wrong names
//! the cause. The server's environment variables cannot collide with the
//! SDK's and an error names the variable; Redis failures name fred's error
//! and the (redacted) URL; a Redis that refuses writes is not ready, and
//! `/readyz` says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use auth_server::config::{Config, Overrides, RedisConfig};
use auth_server::store::{RedisStore, Store};
use testkit::{RedisProcess, TestServer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::edge::Captured;
use crate::within;

// ---------------------------------------------------------------------------
// Environment variables

/// The binary, with the environment cleared of every `AUTH_*` variable the
/// test runner may have, then `vars`.
fn auth_server(vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auth-server"));
    for (name, _) in std::env::vars() {
        if name.to_ascii_uppercase().starts_with("AUTH_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(vars.iter().copied()).stdin(Stdio::null());
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on the HTTP side port: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// A started binary, killed on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_server_starts_with_the_sdk_variables_set_and_its_config_path_from_auth_server_config() {
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    let (grpc, http) = (free_port(), free_port());
    let ca = env.ca_path();
    let config = env.config_path.to_str().unwrap();
    // What a shell or pod running services next to the server exports: the
    // SDK's variables, including AUTH_SERVER_ID under the server's prefix.
    let mut child = auth_server(&[
        ("AUTH_SERVER_CONFIG", config),
        ("AUTH_URL", "https://127.0.0.1:50051"),
        ("AUTH_TLS_CA", ca.to_str().unwrap()),
        ("AUTH_TLS_CERT", "/nonexistent/cert.pem"),
        ("AUTH_CREDENTIALS_FILE", "/nonexistent/credentials.json"),
        ("AUTH_SERVER_ID", "spiffe://auth.dev/auth-server"),
    ])
    .args(["serve", "--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    let ready = within("the server to answer /readyz", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                return Err(format!("auth-server exited with {status}: {stderr}"));
            }
            if let Ok((code, body)) = http_get(addr, "/readyz").await {
                return Ok((code, body));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let _running = Running(child);
    assert_eq!(ready.unwrap(), (200, "ready".to_owned()));
}

/// Runs `serve --config` of a fresh dev environment with `vars`; expects it
/// to fail at start-up and returns its standard error.
fn failed_start(dir: &Path, vars: &[(&str, &str)]) -> String {
    let env = auth_server::dev::ensure(dir).unwrap();
    let out = auth_server(vars)
        .args(["serve", "--config", env.config_path.to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started although {vars:?} is wrong: {stderr}");
    stderr
}

#[test]
fn a_bad_server_variable_is_named_in_the_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown key.
    let err = failed_start(dir.path(), &[("AUTH_SERVER_LIMITS__FOO", "1")]);
    assert!(err.contains("AUTH_SERVER_LIMITS__FOO: unknown field"), "{err}");
    // A value of the wrong type.
    let err = failed_start(dir.path(), &[("AUTH_SERVER_LIMITS__PASSWORD_QUEUE", "many")]);
    assert!(err.contains("AUTH_SERVER_LIMITS__PASSWORD_QUEUE"), "{err}");
    // A value that fails validation: the key and the variable, and never
    // the password.
    let err = failed_start(dir.path(), &[("AUTH_SERVER_TOKENS__ACCESS_TTL_SECS", "0")]);
    assert!(err.contains("tokens.access_ttl_secs") && err.contains("AUTH_SERVER_TOKENS__ACCESS_TTL_SECS"), "{err}");
    let err = failed_start(dir.path(), &[("AUTH_SERVER_STORE", "redis://:hunter2@127.0.0.1:notaport")]);
    assert!(err.contains("store: not a valid Redis URL") && err.contains("AUTH_SERVER_STORE"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_malformed_redis_url_is_a_config_error_naming_store() {
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    for url in [
        "redis://:hunter2@127.0.0.1:notaport",
        "redis://:hunter2@127.0.0.1:6379/0/1",
        "redis://:hunter2@:6379",
        "redis-sentinel://:hunter2@127.0.0.1:26379",
    ] {
        let err = Config::load_with(&env.config_path, &Overrides::default(), |raw| raw.store = url.into()).unwrap_err();
        assert_eq!(err.keys(), ["store"], "{url}: {err}");
        let shown = err.to_string();
        assert!(shown.contains("not a valid Redis URL"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
    // Well-formed URLs pass, whether or not anything listens there.
    Config::load_with(&env.config_path, &Overrides::default(), |raw| raw.store = "redis://:pw@127.0.0.1:1/2".into())
        .unwrap();
}

// ---------------------------------------------------------------------------
// Redis connection errors

/// Captures this thread's logs. The runtime is single-threaded, so the
/// store's tasks log here too. Interest is recomputed once this thread's
/// subscriber is set, since another test's thread may have cached "never"
/// for a callsite first.
pub(crate) fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    (captured, guard)
}

/// Connects a store to `url`, waits until its ping fails naming `cause`,
/// and returns that error's text.
async fn ping_error_naming(url: &str, cause: &str) -> String {
    let store =
        RedisStore::connect(&RedisConfig { url: url.into(), command_timeout_ms: 500, ..RedisConfig::default() })
            .await
            .unwrap();
    within(&format!("a ping error naming {cause}"), async {
        loop {
            match store.ping().await {
                Err(e) if e.to_string().contains(cause) => return e.to_string(),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
}

/// The log lines that hold every one of `parts`.
pub(crate) fn lines_with(logs: &Captured, parts: &[&str]) -> Vec<String> {
    logs.text().lines().filter(|l| parts.iter().all(|p| l.contains(p))).map(str::to_owned).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn redis_auth_failures_name_noauth_and_wrongpass_and_the_redacted_url() {
    let (logs, _guard) = capture();
    let redis = RedisProcess::start();
    assert_eq!(redis.command(&["CONFIG", "SET", "requirepass", "right-pw-3141"]).text(), "OK");
    let host = format!("127.0.0.1:{}", redis.port());

    let wrong = format!("redis://:wrong-pw-hunter2@{host}");
    let err = ping_error_naming(&wrong, "WRONGPASS").await;
    let shown = format!("redis://:***@{host}");
    assert!(
        !lines_with(&logs, &["redis connection failed", "WRONGPASS", &shown]).is_empty(),
        "no log line names WRONGPASS and {shown}:\n{}",
        logs.text()
    );

    let none = format!("redis://{host}");
    let err_none = ping_error_naming(&none, "NOAUTH").await;
    assert!(!lines_with(&logs, &["NOAUTH", &none]).is_empty(), "no log line names NOAUTH and {none}:\n{}", logs.text());

    let all = format!("{}\n{err}\n{err_none}", logs.text());
    assert!(!all.contains("hunter2") && !all.contains("right-pw"), "a password reached the output:\n{all}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_connection_and_a_failed_lookup_are_named() {
    let (logs, _guard) = capture();
    let port = free_port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let err = ping_error_naming(&url, "Connection refused").await;
    assert!(err.contains("not connected"), "{err}");
    let shown = format!("redis://:***@127.0.0.1:{port}");
    assert!(
        !lines_with(&logs, &["redis connection failed", "Connection refused", &shown]).is_empty(),
        "no log line names the refused connection and {shown}:\n{}",
        logs.text()
    );
    // The start-up line says why too.
    assert!(
        !lines_with(&logs, &["redis not reachable yet", "Connection refused", &shown]).is_empty(),
        "{}",
        logs.text()
    );

    // A name that cannot resolve (the .invalid TLD never does).
    let url = "redis://no-such-host.invalid:6379";
    ping_error_naming(url, "lookup").await;
    assert!(!lines_with(&logs, &["redis connection failed", "lookup", url]).is_empty(), "{}", logs.text());
    assert!(!logs.text().contains("hunter2"), "{}", logs.text());
}

// ---------------------------------------------------------------------------
// Readiness of a Redis that refuses writes

async fn health_status(srv: &TestServer) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut c = HealthClient::new(srv.channel("order").await);
    c.check(HealthCheckRequest { service: "auth.v1.Auth".into() }).await.unwrap().into_inner().status
}

#[tokio::test]
async fn a_redis_out_of_memory_is_not_ready_and_says_why_until_memory_is_raised() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let redis = RedisProcess::start();
    let srv =
        TestServer::builder().store_url(redis.url()).configure(|raw| raw.limits.readyz_cache_ms = 0).start().await;
    assert_eq!(http_get(srv.http_addr, "/readyz").await.unwrap(), (200, "ready".to_owned()));

    // Full: every write is refused (OOM) while PING still answers.
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    let (code, body) = http_get(srv.http_addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("refuses writes") && body.contains("OOM"), "{body}");
    within("gRPC health to say NOT_SERVING", async {
        while health_status(&srv).await != ServingStatus::NotServing as i32 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // Room again: ready and serving.
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(http_get(srv.http_addr, "/readyz").await.unwrap(), (200, "ready".to_owned()));
    within("gRPC health to say SERVING", async {
        while health_status(&srv).await != ServingStatus::Serving as i32 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_read_only_redis_is_not_ready_and_says_why() {
    let redis = RedisProcess::start();
    let store =
        RedisStore::connect(&RedisConfig { url: redis.url(), command_timeout_ms: 500, ..RedisConfig::default() })
            .await
            .unwrap();
    store.ping().await.unwrap();
    // A replica refuses writes (READONLY); it still answers PING. The
    // replica's primary need not exist for that.
    redis.command(&["REPLICAOF", "127.0.0.1", &free_port().to_string()]);
    let err = store.ping().await.unwrap_err().to_string();
    assert!(err.contains("refuses writes") && err.contains("READONLY"), "{err}");
    redis.command(&["REPLICAOF", "NO", "ONE"]);
    store.ping().await.unwrap();
}

// ---------------------------------------------------------------------------
// The active signing key

#[tokio::test(flavor = "current_thread")]
async fn the_signing_kid_is_logged_at_start_up_and_after_each_reload() {
    use auth_server::keys::{KeyAlg, LoadedKey, generate_pkcs8_pem};
    let (logs, _guard) = capture();
    let srv = TestServer::builder().keys_from_config().start().await;
    let first = srv.core().policy().keys.signing_kid().unwrap();
    // `serve` runs in a task of this runtime: let it log.
    within("the server to log that it listens", async {
        while lines_with(&logs, &["auth-server listening"]).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let started = lines_with(&logs, &["auth-server listening", &format!("signing_kid={first}")]);
    assert_eq!(started.len(), 1, "{}", logs.text());

    let pem = generate_pkcs8_pem(KeyAlg::EdDSA).unwrap();
    let next = LoadedKey::from_pem(KeyAlg::EdDSA, pem.as_bytes()).unwrap().kid().to_owned();
    crate::write_key_file(srv.dir.join("keys/next.pem"), &pem);
    let path = srv.config_path();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "signing = { path = \"keys/signing.pem\", alg = \"ES256\" }",
        "signing = { path = \"keys/next.pem\", alg = \"EdDSA\" }\npublish = [{ path = \"keys/signing.pem\", alg = \"ES256\" }]",
    );
    std::fs::write(&path, text).unwrap();
    srv.reload().await.unwrap();
    let reloaded = lines_with(&logs, &["policy reloaded", &format!("signing_kid={next}")]);
    assert_eq!(reloaded.len(), 1, "{}", logs.text());
}

// ---------------------------------------------------------------------------
// Small things an operator reads

#[tokio::test]
async fn healthcheck_names_the_url_it_failed_on() {
    // Nothing listens here.
    let url = format!("http://127.0.0.1:{}/readyz", free_port());
    let out = auth_server(&[]).args(["healthcheck", "--url", &url]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&url), "{stderr}");

    // A server that answers 503: the URL and the status line.
    let redis = RedisProcess::start();
    let srv =
        TestServer::builder().store_url(redis.url()).configure(|raw| raw.limits.readyz_cache_ms = 0).start().await;
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    let url = format!("http://{}/readyz", srv.http_addr);
    let out = tokio::task::spawn_blocking(move || auth_server(&[]).args(["healthcheck", "--url", &url]).output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("http://{}/readyz", srv.http_addr)), "{stderr}");
    assert!(stderr.contains("503") && stderr.contains("refuses writes"), "{stderr}");
}

/// The HTTP paths the deploy manifests probe: `path:` of the Kubernetes
/// probes (not the scrape annotations, which validate.sh checks against
/// the metrics route) and the image's HEALTHCHECK URL.
fn advertised_paths() -> Vec<String> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files = vec![deploy.join("Dockerfile")];
    let mut dirs = vec![deploy.join("k8s")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let line = line.trim();
            if line.starts_with('#') || line.contains("prometheus.io") {
                continue;
            }
            if let Some(path) = line.strip_prefix("path: ") {
                paths.push(path.trim_matches('"').to_owned());
            }
            if let Some((_, rest)) = line.split_once("http://127.0.0.1:8080") {
                paths.push(rest.split('"').next().unwrap().to_owned());
            }
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

#[tokio::test]
async fn every_path_the_deploy_manifests_probe_answers() {
    let paths = advertised_paths();
    assert!(paths.contains(&"/readyz".to_owned()) && paths.contains(&"/healthz".to_owned()), "{paths:?}");
    let srv = TestServer::start().await;
    for path in &paths {
        let (code, body) = http_get(srv.http_addr, path).await.unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
}
