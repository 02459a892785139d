//! The key rotation runbook of docs/OPERATIONS.md ("Key rotation (file
//! keys)"), followed literally against the real binary: `auth-server keygen`,
//! edits of `[keys]` in the config file, `SIGHUP` for each step, the waits
//! the runbook computes from the config. An SDK verifier is attached (JWKS
//! over gRPC and the revocation feed) and load runs throughout: no restart,
//! and no token is ever refused while it is valid.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{ClientCredentialsGrant, GetJwksRequest, LoginRequest, login_request};
use service_sdk::{JwksOptions, KeySet, MtlsFiles, Verifier};
use tonic::transport::Channel;

use crate::observe::AuthProcess;
use crate::within;

// The runbook's settings, shrunk so the whole rotation takes seconds: the
// waits are computed from them exactly as the runbook says.
const PREPUBLISH_SECS: u64 = 2;
const JWKS_MAX_AGE_SECS: u64 = 1;
const ACCESS_TTL_SECS: u64 = 3;
const EXCHANGE_MAX_TTL_SECS: u64 = 3;
const VERIFIER_LEEWAY_SECS: u64 = 1;
/// The verifier's JWKS refresh: at most `keys.prepublish_secs`, as step 2
/// requires.
const VERIFIER_REFRESH: Duration = Duration::from_secs(1);

const SIGNING: &str = r#"signing = { path = "keys/signing.pem", alg = "ES256" }"#;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn sighup(proc: &AuthProcess) {
    let pid = proc.child.id().to_string();
    let sent = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill (procps)");
    assert!(sent.success(), "kill -HUP {pid}");
}

/// Rewrites the `[keys]` lines of the config file: `signing` and `publish`.
fn set_keys(config: &std::path::Path, signing: &str, publish: &[&str]) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("signing = ") {
            out.push_str(&format!("signing = {{ path = \"{signing}\", alg = \"ES256\" }}\n"));
            let entries: Vec<String> =
                publish.iter().map(|p| format!("{{ path = \"{p}\", alg = \"ES256\" }}")).collect();
            out.push_str(&format!("publish = [{}]\n", entries.join(", ")));
        } else if !line.starts_with("publish = ") {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(config, out).unwrap();
}

async fn published(c: &mut AuthClient<Channel>) -> BTreeSet<String> {
    let json = c.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    KeySet::from_jwks_json(&json).unwrap().kids().map(str::to_owned).collect()
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    verified: AtomicU64,
    refused: Mutex<Vec<String>>,
    kids: Mutex<BTreeSet<String>>,
}

/// Until `stop`: logs in as `order` for `inventory`, verifies the new token
/// at once, and verifies again the oldest token it still holds that has not
/// expired (so tokens signed before a step are checked after it).
async fn load(
    mut c: AuthClient<Channel>,
    creds: (String, String),
    verifier: Verifier,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    presenter: Arc<Vec<u8>>,
) {
    let mut held: VecDeque<(String, u64)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        let login = LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant {
                client_id: creds.0.clone(),
                client_secret: creds.1.clone(),
            })),
            audience: vec!["inventory".into()],
            scope: vec![],
        };
        let token = c.login(login).await.expect("login under load").into_inner().access_token;
        tally.kids.lock().unwrap().insert(kid_of(&token));
        let exp = auth_server::admin::Decoded::parse(&token).unwrap().claims["exp"].as_u64().unwrap();
        held.push_back((token.clone(), exp));
        while held.front().is_some_and(|(_, exp)| *exp <= now()) {
            held.pop_front();
        }
        for t in [Some(token), held.front().map(|(t, _)| t.clone())].into_iter().flatten() {
            // Order's tokens are bound to its certificate (RFC 8705): they
            // are verified as order presents them.
            match verifier.verify(&t, Some(&presenter)).await {
                Ok(_) => {
                    tally.verified.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tally.refused.lock().unwrap().push(format!("kid {}: {e}", kid_of(&t))),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotation_runbook_by_sighup_refuses_no_valid_token_with_a_verifier_attached_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut proc = AuthProcess::start_with(dir.path(), |config| {
        let config = config.replace(
            SIGNING,
            &format!("{SIGNING}\nprepublish_secs = {PREPUBLISH_SECS}\njwks_max_age_secs = {JWKS_MAX_AGE_SECS}"),
        );
        format!(
            "{config}access_ttl_secs = {ACCESS_TTL_SECS}\nexchange_max_ttl_secs = {EXCHANGE_MAX_TTL_SECS}\n\
             exchange_default_ttl_secs = {EXCHANGE_MAX_TTL_SECS}\nverifier_leeway_secs = {VERIFIER_LEEWAY_SECS}\n"
        )
    })
    .await;
    let config = dir.path().join("auth-server.toml");
    let mut admin = proc.client("order").await;
    let old_kid = published(&mut admin).await.into_iter().next().unwrap();

    // The verifier of `inventory`, as a service builds it.
    let files = MtlsFiles::new(
        dir.path().join("ca.pem"),
        dir.path().join("clients/inventory.pem"),
        dir.path().join("clients/inventory-key.pem"),
    );
    let channel = files.auth_channel_as(&format!("https://{}", proc.grpc), &files.auth_server_id().unwrap()).unwrap();
    let verifier = Verifier::builder("auth-service", "inventory")
        .channel(channel)
        .jwks_options(JwksOptions { refresh_interval: VERIFIER_REFRESH, ..JwksOptions::default() })
        .leeway_secs(VERIFIER_LEEWAY_SECS)
        .build()
        .unwrap();
    within("the verifier's first keys", verifier.ready()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let creds = (proc.credential("order", "client_id"), proc.credential("order", "client_secret"));
    let order_cert = MtlsFiles::new(
        dir.path().join("ca.pem"),
        dir.path().join("clients/order.pem"),
        dir.path().join("clients/order-key.pem"),
    )
    .client_certificate_der()
    .unwrap();
    let presenter = Arc::new(order_cert);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let c = admin.clone();
            tokio::spawn(load(
                c,
                creds.clone(),
                verifier.clone(),
                Arc::clone(&stop),
                Arc::clone(&tally),
                presenter.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. Pre-publish: keygen, add under keys.publish, SIGHUP.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_auth-server"))
        .args(["keygen", "--alg", "ES256", "--out"])
        .arg(dir.path().join("keys/next.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let new_kid = printed.rsplit("kid ").next().unwrap().trim().to_owned();
    set_keys(&config, "keys/signing.pem", &["keys/next.pem"]);
    sighup(&proc);
    within("both keys in the JWKS", async {
        while published(&mut admin).await != BTreeSet::from([old_kid.clone(), new_kid.clone()]) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // 2. Wait keys.prepublish_secs.
    tokio::time::sleep(Duration::from_secs(PREPUBLISH_SECS)).await;

    // 3. Switch: the new key signs, the old one is published only; SIGHUP.
    set_keys(&config, "keys/next.pem", &["keys/signing.pem"]);
    sighup(&proc);
    within("tokens signed with the new key", async {
        while !tally.kids.lock().unwrap().contains(&new_kid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // 4. Retire after max(access_ttl, exchange_max_ttl) + verifier leeway.
    tokio::time::sleep(Duration::from_secs(ACCESS_TTL_SECS.max(EXCHANGE_MAX_TTL_SECS) + VERIFIER_LEEWAY_SECS)).await;
    set_keys(&config, "keys/next.pem", &[]);
    sighup(&proc);
    within("only the new key in the JWKS", async {
        while published(&mut admin).await != BTreeSet::from([new_kid.clone()]) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The verifier drops the old key at its next refresh; load goes on past it.
    tokio::time::sleep(VERIFIER_REFRESH * 3).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let refused = tally.refused.lock().unwrap().clone();
    let verified = tally.verified.load(Ordering::Relaxed);
    println!("rotation under load: {verified} verifications, {} refused", refused.len());
    assert!(refused.is_empty(), "valid tokens refused during the rotation: {refused:?}");
    assert!(verified > 100, "the load ran: {verified} verifications");
    assert_eq!(*tally.kids.lock().unwrap(), BTreeSet::from([old_kid, new_kid.clone()]), "both keys signed");
    // No restart: the same process, started once, reloaded three times.
    assert!(proc.child.try_wait().unwrap().is_none(), "the server is still running");
    let log = proc.printed();
    assert_eq!(log.matches("auth-server listening").count(), 1, "{log}");
    let reloads: Vec<&str> = log.lines().filter(|l| l.contains("policy reloaded")).collect();
    assert_eq!(reloads.len(), 3, "one reload per SIGHUP:\n{log}");
    assert!(reloads[2].contains(&format!("new_kids=[\"{new_kid}\"]")), "old and new kid sets logged: {reloads:?}");
}
