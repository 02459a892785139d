//! What operators see of a running server: `/metrics` (exact counts after a
//! scripted flow, accepted by `promtool check metrics`) and the audit trail
//! (the expected events and members, and no secret, password or token in
//! anything the process printed).
//!
//! Each test runs the real `auth-server` binary in a child process: it
//! installs its own global metrics recorder, so counts are exact, and every
//! byte it prints (diagnostics on stdout and stderr, the audit trail) is
//! captured for the sweep.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, ExchangeTokenRequest, GetJwksRequest, LoginRequest, PasswordGrant, RefreshRequest,
    RevokeRequest, TokenResponse, WatchRevocationsRequest, login_request, revoke_request,
};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

use crate::within;

/// The real binary, its output captured; killed when dropped.
pub(crate) struct AuthProcess {
    pub(crate) child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    pub(crate) grpc: SocketAddr,
    pub(crate) http: SocketAddr,
    dir: PathBuf,
}

impl Drop for AuthProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Copies everything `from` yields into `to`, on its own thread.
fn capture(mut from: impl std::io::Read + Send + 'static, to: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            to.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

impl AuthProcess {
    /// A dev environment in `dir` on free ports; `extra` is appended to its
    /// config file. Runs `auth-server serve` on it at debug level, so the
    /// sweep covers every line the server and its libraries can log.
    pub(crate) async fn start(dir: &Path, extra: &str) -> Self {
        Self::start_with(dir, |config| config + extra).await
    }

    /// Like [`AuthProcess::start`], with the config file's text rewritten
    /// by `edit` first.
    pub(crate) async fn start_with(dir: &Path, edit: impl FnOnce(String) -> String) -> Self {
        let (grpc, http) = (free_addr(), free_addr());
        let env = auth_server::dev::ensure_with(dir, &grpc.to_string(), &http.to_string()).unwrap();
        let config = std::fs::read_to_string(&env.config_path).unwrap();
        std::fs::write(&env.config_path, edit(config)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_auth-server"))
            .arg("serve")
            .arg("--config")
            .arg(&env.config_path)
            .env("RUST_LOG", "debug")
            .env_remove("AUTH_SERVER_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the auth-server binary");
        let output = Arc::new(Mutex::new(Vec::new()));
        capture(child.stdout.take().unwrap(), Arc::clone(&output));
        capture(child.stderr.take().unwrap(), Arc::clone(&output));
        let proc = Self { child, output, grpc, http, dir: dir.to_owned() };
        within("the auth-server binary to answer", async {
            loop {
                if let Some(mut c) = proc.try_client("order").await
                    && c.get_jwks(GetJwksRequest {}).await.is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        proc
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.join(rel)).unwrap()
    }

    async fn try_client(&self, name: &str) -> Option<AuthClient<Channel>> {
        let identity = Identity::from_pem(
            self.read(&format!("clients/{name}.pem")),
            self.read(&format!("clients/{name}-key.pem")),
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read("ca.pem")))
            .identity(identity)
            .domain_name("localhost");
        let channel =
            Channel::from_shared(format!("https://{}", self.grpc)).ok()?.tls_config(tls).ok()?.connect().await.ok()?;
        Some(AuthClient::new(channel))
    }

    pub(crate) async fn client(&self, name: &str) -> AuthClient<Channel> {
        self.try_client(name).await.expect("mTLS channel to the auth-server binary")
    }

    /// A dev credential file's member.
    pub(crate) fn credential(&self, name: &str, member: &str) -> String {
        let v: Value = serde_json::from_str(&self.read(&format!("credentials/{name}.json"))).unwrap();
        v[member].as_str().unwrap().to_owned()
    }

    /// `GET path` on the side port: status line and body.
    async fn get(&self, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        within("an HTTP answer", s.read_to_end(&mut buf)).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.lines().next().unwrap().to_owned();
        // The router answers with a length or in chunks; de-chunk simply.
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (status, body)
    }

    async fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{body}");
        Metrics::parse(&body)
    }

    pub(crate) fn printed(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// A scraped Prometheus text: each sample by name and labels.
pub(crate) struct Metrics {
    pub(crate) text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub(crate) fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap();
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Self { text: text.to_owned(), samples }
    }

    /// The value of the one sample of `name` whose labels include `labels`;
    /// `None` when there is none.
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| *v)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches several series:\n{}", self.text);
        found.first().copied()
    }

    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.text))
    }

    /// The sum of every sample of `name`.
    fn total(&self, name: &str) -> f64 {
        self.samples.iter().filter(|(n, _, _)| n == name).map(|(_, _, v)| *v).sum()
    }
}

/// `promtool check metrics` on `text`; fails loudly when promtool is absent.
pub(crate) fn promtool_check(text: &str) {
    use std::io::Write as _;
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool not found ({e}): install it with `apt-get install -y prometheus` (Debian), or run .ci/test, \
             which installs it"
        ),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let mut report = String::new();
    out.stdout.as_slice().read_to_string(&mut report).unwrap();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {report}\n{text}");
}

fn exchange(client_id: &str, client_secret: &str, subject_token: &str, audience: &str) -> ExchangeTokenRequest {
    ExchangeTokenRequest {
        client_id: client_id.into(),
        client_secret: client_secret.into(),
        subject_token: subject_token.into(),
        audience: audience.into(),
        scope: vec![],
        requested_ttl_seconds: 0,
    }
}

fn password(username: &str, password: &str, audience: &str) -> LoginRequest {
    LoginRequest {
        grant: Some(login_request::Grant::Password(PasswordGrant {
            username: username.into(),
            password: password.into(),
        })),
        audience: vec![audience.into()],
        scope: vec![],
    }
}

/// The claims of a compact JWS (unverified: the test's own tokens).
fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let json: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    json["kid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn metrics_count_exactly_what_a_scripted_flow_did_and_promtool_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let srv = AuthProcess::start(dir.path(), "").await;
    let secret = srv.credential("order", "client_secret");
    let mut order = srv.client("order").await;

    // Three exchanges, one denial (a wrong secret), one revocation.
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(order.exchange_token(exchange("order", &secret, "", "inventory")).await.unwrap().into_inner());
    }
    let err = order.exchange_token(exchange("order", "not-the-secret", "", "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let revoke = RevokeRequest { target: Some(revoke_request::Target::AccessToken(tokens[0].access_token.clone())) };
    assert_eq!(order.revoke(revoke).await.unwrap().into_inner().revoked, "jti");
    // One open watch stream, its snapshot read.
    let mut watch = order.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    within("the watch snapshot", watch.message()).await.unwrap().unwrap();

    let m = srv.metrics().await;
    promtool_check(&m.text);
    let issued = "auth_tokens_issued_total";
    assert_eq!(m.value(issued, &[("grant", "exchange"), ("alg", "ES256")]), 3.0);
    assert_eq!(m.total(issued), 3.0, "nothing else was issued");
    assert_eq!(m.value("auth_denials_total", &[("rpc", "ExchangeToken"), ("reason", "bad_client_credentials")]), 1.0);
    assert_eq!(m.total("auth_denials_total"), 1.0);
    assert_eq!(m.value("auth_revocations_total", &[("kind", "jti")]), 1.0);
    assert_eq!(m.total("auth_revocations_total"), 1.0);
    assert_eq!(m.value("auth_refresh_reuse_detected_total", &[]), 0.0);
    let rpc = "auth_rpc_requests_total";
    assert_eq!(m.value(rpc, &[("method", "ExchangeToken"), ("code", "OK")]), 3.0);
    assert_eq!(m.value(rpc, &[("method", "ExchangeToken"), ("code", "UNAUTHENTICATED")]), 1.0);
    assert_eq!(m.value(rpc, &[("method", "Revoke"), ("code", "OK")]), 1.0);
    assert_eq!(m.get(rpc, &[("method", "WatchRevocations")]), None, "the open stream has not finished");
    let latency = "auth_rpc_duration_seconds_count";
    assert_eq!(m.value(latency, &[("method", "ExchangeToken"), ("code", "OK")]), 3.0);
    assert_eq!(m.value(latency, &[("method", "ExchangeToken"), ("code", "UNAUTHENTICATED")]), 1.0);
    let store = "auth_store_operation_duration_seconds_count";
    assert_eq!(m.value(store, &[("op", "record_issued")]), 0.0, "no store write per exchange");
    assert_eq!(m.value(store, &[("op", "revoke")]), 1.0);
    assert_eq!(m.value("auth_store_operation_errors_total", &[("op", "revoke")]), 0.0);
    assert_eq!(m.value("auth_deny_list_entries", &[("kind", "jti")]), 1.0);
    assert_eq!(m.value("auth_deny_list_entries", &[("kind", "session")]), 0.0);
    assert_eq!(m.value("auth_watch_streams", &[]), 1.0);
    assert_eq!(m.value("auth_store_subscription_up", &[]), 1.0);
    assert_eq!(m.value("auth_deny_set_current", &[]), 1.0);
    assert_eq!(m.value("auth_password_queue_depth", &[]), 0.0);
    assert_eq!(m.value("auth_password_queue_capacity", &[]), 64.0);
    let old_kid = kid_of(&tokens[0].access_token);
    assert_eq!(m.value("auth_published_keys", &[("kid", &old_kid), ("alg", "ES256")]), 1.0);
    for (_, labels, _) in &m.samples {
        for (k, v) in labels {
            assert!(!v.contains("order") && !v.contains('/'), "label {k}={v}: no client id or path as a label");
        }
    }

    // The stream ends with its client: then it counts, and the gauge falls
    // once the server's stream task has noticed.
    drop(watch);
    within("the watch stream to end", async {
        loop {
            let m = srv.metrics().await;
            let cancelled = m.get(rpc, &[("method", "WatchRevocations"), ("code", "CANCELLED")]);
            if cancelled == Some(1.0) && m.value("auth_watch_streams", &[]) == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // A new signing key, swapped in by SIGHUP: the old kid drops to 0.
    let pem = auth_server::keys::generate_pkcs8_pem(auth_server::keys::KeyAlg::EdDSA).unwrap();
    crate::write_key_file(dir.path().join("keys/next.pem"), &pem);
    let config_path = dir.path().join("auth-server.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let rotated = config.replace(
        r#"signing = { path = "keys/signing.pem", alg = "ES256" }"#,
        r#"signing = { path = "keys/next.pem", alg = "EdDSA" }"#,
    );
    assert_ne!(config, rotated, "the dev config names its signing key as expected");
    std::fs::write(&config_path, rotated).unwrap();
    let hup = Command::new("kill").args(["-HUP", &srv.child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    let m = within("the reloaded key set in /metrics", async {
        loop {
            let m = srv.metrics().await;
            if m.get("auth_published_keys", &[("kid", &old_kid)]) == Some(0.0) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let new = order.exchange_token(exchange("order", &secret, "", "inventory")).await.unwrap().into_inner();
    let new_kid = kid_of(&new.access_token);
    assert_eq!(m.value("auth_published_keys", &[("kid", &new_kid), ("alg", "EdDSA")]), 1.0);
    assert_eq!(m.total("auth_published_keys"), 1.0, "one key published");
    let m = srv.metrics().await;
    assert_eq!(m.value(issued, &[("grant", "exchange"), ("alg", "EdDSA")]), 1.0);
    promtool_check(&m.text);

    // Audit lines went to stdout (the default), one JSON object each, from
    // the trail's writer thread: soon after the calls returned.
    let counts = within("the audit lines on stdout", async {
        loop {
            let printed = srv.printed();
            let audit: Vec<Value> = printed
                .lines()
                .filter(|l| l.starts_with("{\"audit\""))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let count = |name: &str| audit.iter().filter(|e| e["audit"] == name).count();
            let counts = (count("token_issued"), count("denied"), count("revoked"), count("keys_loaded"));
            if counts.3 == 2 && counts.0 == 4 {
                return counts;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(counts, (4, 1, 1, 2));
}

/// Every audit line of the file, parsed.
fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

fn member<'a>(e: &'a Value, name: &str) -> &'a str {
    e[name].as_str().unwrap_or_else(|| panic!("{name} in {e}"))
}

#[tokio::test]
async fn the_audit_trail_records_each_decision_and_nothing_printed_holds_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = AuthProcess::start(dir.path(), "\n[audit]\npath = \"audit.jsonl\"\n").await;
    let audit_path = dir.path().join("audit.jsonl");
    let mut secrets: Vec<String> = Vec::new();
    let cred = |name: &str, member: &str| srv.credential(name, member);
    let (order_secret, admin_secret) = (cred("order", "client_secret"), cred("admin", "client_secret"));
    let alice_password = cred("alice", "password");
    secrets.extend([order_secret.clone(), admin_secret.clone(), alice_password.clone()]);
    secrets.extend([cred("inventory", "client_secret"), cred("bob", "password")]);
    let mut tokens: Vec<String> = Vec::new();
    let keep = |t: &TokenResponse, tokens: &mut Vec<String>| {
        tokens.push(t.access_token.clone());
        if !t.refresh_token.is_empty() {
            tokens.push(t.refresh_token.clone());
        }
    };

    let mut order = srv.client("order").await;
    // alice logs in (through order's connection, as a web front would).
    let alice = order.login(password("alice", &alice_password, "order")).await.unwrap().into_inner();
    keep(&alice, &mut tokens);
    // order acts for alice toward inventory.
    let acting =
        order.exchange_token(exchange("order", &order_secret, &alice.access_token, "inventory")).await.unwrap();
    let acting = acting.into_inner();
    keep(&acting, &mut tokens);
    // Refusals: a wrong password, a password typed as the username, a
    // wrong client secret.
    for (user, pass) in [("alice", "wrong-password-1"), (alice_password.as_str(), "x")] {
        let err = order.login(password(user, pass, "order")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    secrets.push("wrong-password-1".into());
    let err = order.exchange_token(exchange("order", "wrong-secret-2", "", "inventory")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    secrets.push("wrong-secret-2".into());
    // A refresh, then the spent refresh token again: reuse.
    let refreshed = order.refresh(RefreshRequest { refresh_token: alice.refresh_token.clone() }).await.unwrap();
    let refreshed = refreshed.into_inner();
    keep(&refreshed, &mut tokens);
    let err = order.refresh(RefreshRequest { refresh_token: alice.refresh_token.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // An admin ends alice's session by sid.
    let mut admin = srv.client("admin").await;
    let admin_token = admin
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant {
                client_id: "admin".into(),
                client_secret: admin_secret.clone(),
            })),
            audience: vec!["auth-service".into()],
            scope: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    keep(&admin_token, &mut tokens);
    let sid = {
        let claims = claims_of(&alice.access_token);
        claims["sid"].as_str().unwrap().to_owned()
    };
    let mut req = Request::new(RevokeRequest { target: Some(revoke_request::Target::Sid(sid.clone())) });
    req.metadata_mut().insert("authorization", format!("Bearer {}", admin_token.access_token).parse().unwrap());
    assert_eq!(admin.revoke(req).await.unwrap().into_inner().revoked, "session");

    let events = within("the audit trail", async {
        loop {
            let events = audit_lines(&audit_path);
            if events.iter().any(|e| e["audit"] == "revoked") {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let names: Vec<&str> = events.iter().map(|e| member(e, "audit")).collect();
    assert_eq!(
        names,
        [
            "keys_loaded",
            "token_issued",
            "token_issued",
            "denied",
            "denied",
            "denied",
            "token_issued",
            "refresh_reuse",
            "denied",
            "token_issued",
            "revoked"
        ],
        "{events:#?}"
    );
    for e in &events {
        let ts = member(e, "ts");
        assert!(ts.len() == 24 && ts.ends_with('Z'), "{ts}");
    }
    let keys = &events[0];
    assert_eq!(keys["reload"], false);
    let kid = kid_of(&alice.access_token);
    assert_eq!(keys["kids"], serde_json::json!([{ "kid": kid, "alg": "ES256" }]));
    assert_eq!(member(keys, "signing_kid"), kid);

    let order_peer = "spiffe://auth.dev/order";
    let login = &events[1];
    let alice_claims = claims_of(&alice.access_token);
    assert_eq!(
        (member(login, "grant"), member(login, "sub"), member(login, "client_id"), member(login, "peer")),
        ("password", "alice", "login", order_peer)
    );
    assert_eq!(login["jti"], alice_claims["jti"]);
    assert_eq!(login["exp"], alice_claims["exp"]);
    assert_eq!((login["aud"].clone(), login["act"].clone()), (serde_json::json!(["order"]), serde_json::json!([])));
    assert_eq!(member(login, "sid"), sid);
    assert_eq!((member(login, "alg"), member(login, "kid")), ("ES256", kid.as_str()));

    let exchanged = &events[2];
    let acting_claims = claims_of(&acting.access_token);
    assert_eq!(
        (member(exchanged, "grant"), member(exchanged, "sub"), member(exchanged, "client_id")),
        ("exchange", "alice", "order")
    );
    assert_eq!(exchanged["act"], serde_json::json!(["svc:order"]));
    assert_eq!(exchanged["aud"], serde_json::json!(["inventory"]));
    assert_eq!(exchanged["scope"], acting_claims["perms"]);
    assert_eq!(exchanged["jti"], acting_claims["jti"]);
    assert_eq!(member(exchanged, "sid"), sid, "the exchanged token carries alice's session");

    let denied: Vec<(&str, &str, Value)> = events
        .iter()
        .filter(|e| e["audit"] == "denied")
        .map(|e| (member(e, "rpc"), member(e, "reason"), e["client_id"].clone()))
        .collect();
    assert_eq!(
        denied,
        [
            ("Login", "bad_password", Value::Null),
            ("Login", "bad_password", Value::Null),
            ("ExchangeToken", "bad_client_credentials", Value::from("order")),
            ("Refresh", "refresh_reused", Value::Null),
        ]
    );
    assert!(events.iter().filter(|e| e["audit"] == "denied").all(|e| e["peer"] == order_peer));

    assert_eq!(member(&events[6], "grant"), "refresh");
    let reuse = &events[7];
    assert_eq!(member(reuse, "sid"), sid);
    assert!(!member(reuse, "family").is_empty());
    assert_eq!(member(&events[9], "grant"), "client_credentials");
    let revoked = &events[10];
    assert_eq!(
        (member(revoked, "kind"), member(revoked, "id"), member(revoked, "by"), member(revoked, "sub")),
        ("session", sid.as_str(), "admin", "svc:admin")
    );
    assert_eq!(member(revoked, "peer"), "spiffe://auth.dev/admin");

    // The file is private, and the trail did not go to stdout too.
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&audit_path).unwrap().permissions().mode() & 0o777, 0o600);
    let printed = srv.printed();
    assert!(!printed.lines().any(|l| l.starts_with("{\"audit\"")), "audit lines on stdout");
    assert!(printed.contains("DEBUG"), "the sweep covers debug output:\n{printed}");

    // The sweep: nothing printed or audited holds a secret, a password or
    // a token (nor a token's signature alone).
    let audited = std::fs::read_to_string(&audit_path).unwrap();
    let metrics = srv.metrics().await.text;
    for (what, text) in [("output", &printed), ("audit trail", &audited), ("metrics", &metrics)] {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret or password in the {what}");
        }
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "a token in the {what}");
            if let Some(sig) = t.rsplit('.').next().filter(|_| t.contains('.')) {
                assert!(!text.contains(sig), "a token's signature in the {what}");
            }
        }
    }

    // Rotation: the file moved aside, then SIGHUP; the server writes on
    // into a new file at `audit.path`, and no line is lost between them.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&audit_path, &rotated).unwrap();
    let hup = Command::new("kill").args(["-HUP", &srv.child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    let denied_in = |p: &Path| -> usize {
        if !p.exists() {
            return 0;
        }
        audit_lines(p).iter().filter(|e| e["audit"] == "denied").count()
    };
    let before = denied_in(&rotated);
    let mut calls = 0;
    within("a line in the reopened file", async {
        while denied_in(&audit_path) == 0 {
            let err = order.exchange_token(exchange("order", "not-the-secret", "", "inventory")).await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
            calls += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The lines of the last calls at SIGTERM are written before the exit.
    for _ in 0..20 {
        order.exchange_token(exchange("order", "not-the-secret", "", "inventory")).await.unwrap_err();
    }
    calls += 20;
    let term = Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let exited = srv.child.wait().unwrap();
    assert!(exited.success(), "{exited}");
    assert_eq!(denied_in(&rotated) + denied_in(&audit_path), before + calls, "every refusal has its line");
}

/// Concurrent and repeated scrapes within the deny-list TTL share one store
/// read: `/metrics` cannot multiply load onto the store.
#[tokio::test]
async fn scrapes_within_the_deny_list_ttl_share_one_store_read() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use auth_server::observe::metrics::Scrape;
    use auth_server::store::MemoryStore;
    use testkit::{HookedStore, Intercept, StoreCall, TestServer};

    let reads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&reads);
    let store = HookedStore::new(Arc::new(MemoryStore::new()), move |call| {
        if call == StoreCall::DenyListSize {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        Intercept::Pass
    });
    let srv = TestServer::builder().store(Arc::new(store)).start().await;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let scrape = Scrape::new(handle, Arc::clone(srv.core()), Arc::new(|| 0));
    tokio::join!(scrape.refresh(), scrape.refresh());
    scrape.refresh().await;
    assert_eq!(reads.load(Ordering::SeqCst), 1, "three scrapes within the TTL, one store read");

    // With no TTL each scrape reads again (the hook does count reads).
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    let uncached = Scrape::new(handle, Arc::clone(srv.core()), Arc::new(|| 0)).deny_list_ttl(Duration::ZERO);
    uncached.refresh().await;
    uncached.refresh().await;
    assert_eq!(reads.load(Ordering::SeqCst), 3);
    srv.shutdown().await;
}

/// A reload that keeps the key set writes no `keys_loaded` line.
#[tokio::test]
async fn a_reload_that_keeps_the_keys_writes_no_keys_loaded_line() {
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    let mut config = std::fs::read_to_string(&env.config_path).unwrap();
    config.push_str("\n[audit]\npath = \"audit.jsonl\"\n");
    std::fs::write(&env.config_path, config).unwrap();
    let srv = testkit::TestServer::builder().dev_dir(dir.path()).start().await;
    let audit_path = dir.path().join("audit.jsonl");
    let lines_of = |name: &'static str| {
        let path = audit_path.clone();
        move || audit_lines(&path).into_iter().filter(|e| e["audit"] == name).collect::<Vec<_>>()
    };
    let keys_loaded = lines_of("keys_loaded");
    // The trail is written by its own thread, in order: a line the test
    // causes and then sees marks everything before it as written.
    let mut order = AuthClient::new(srv.channel("order").await);
    let mut mark = async |n: usize| {
        let err = order.exchange_token(exchange("order", "not-the-secret", "", "inventory")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let denied = lines_of("denied");
        within("the audit trail", async {
            while denied().len() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    };
    mark(1).await;
    assert_eq!(keys_loaded().len(), 1, "one at start");
    assert_eq!(keys_loaded()[0]["reload"], false);
    let reloaded = srv.reload().await.unwrap();
    assert_eq!(reloaded.old_kids, reloaded.new_kids);
    srv.reload().await.unwrap();
    mark(2).await;
    assert_eq!(keys_loaded().len(), 1, "the key set did not change: no keys_loaded line");
    srv.shutdown().await;
}
