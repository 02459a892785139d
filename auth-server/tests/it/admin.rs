//! The operator subcommands of the real binary (`admin keys`, `admin
//! revoke`, `decode`, `new-account`) against a running test server over
//! mTLS, as an operator would run them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use auth_proto::auth::v1::{ClientCredentialsGrant, ExchangeTokenRequest, LoginRequest, login_request};
use service_sdk::Credentials as _;
use testkit::TestServer;
use tonic::Code;

use crate::flows::{claims_of, client, exchange_req, login_user};
use crate::within;

/// The binary's admin connection flags for `srv`, as the admin.
fn conn_args(srv: &TestServer) -> Vec<String> {
    let d = &srv.dir;
    vec![
        format!("--addr=https://localhost:{}", srv.grpc_addr.port()),
        format!("--ca={}", d.join("ca.pem").display()),
        format!("--cert={}", d.join("clients/admin.pem").display()),
        format!("--key={}", d.join("clients/admin-key.pem").display()),
    ]
}

/// Runs `auth-server ARGS` (with `env` set and `stdin` fed) in an empty
/// directory, off the runtime's thread, so the server keeps serving.
async fn auth_server(args: Vec<String>, env: Vec<(&'static str, String)>, stdin: Option<String>) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    let run = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_auth-server"));
        cmd.args(&args).current_dir(cwd.path()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AUTH_")) {
            cmd.env_remove(k);
        }
        cmd.envs(env);
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write as _;
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    });
    within("the auth-server command", run).await.unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn admin_keys_lists_the_signing_kid_and_its_algorithm() {
    let srv = TestServer::start().await;
    // The connection from the documented environment variables.
    let d = &srv.dir;
    let env = vec![
        ("AUTH_SERVER_ADMIN_ADDR", format!("https://localhost:{}", srv.grpc_addr.port())),
        ("AUTH_SERVER_ADMIN_CA", d.join("ca.pem").display().to_string()),
        ("AUTH_SERVER_ADMIN_CERT", d.join("clients/admin.pem").display().to_string()),
        ("AUTH_SERVER_ADMIN_KEY", d.join("clients/admin-key.pem").display().to_string()),
    ];
    let out = auth_server(vec!["admin".into(), "keys".into()], env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}  ES256  EC P-256\n", srv.keys().active_kid()));
}

#[tokio::test]
async fn admin_revoke_by_jti_makes_the_token_refused() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let jti = claims_of(&mut c, &alice.access_token, "order").await.jti;
    c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();

    let mut args = vec!["admin".to_owned()];
    args.extend(conn_args(&srv));
    args.extend([
        "revoke".into(),
        format!("--jti={jti}"),
        format!("--credentials={}", srv.dir.join("credentials/admin.json").display()),
    ]);
    let out = auth_server(args, vec![], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "revoked: jti\n");

    let err = c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "token revoked"));
}

#[tokio::test]
async fn admin_revoke_needs_the_admin_permission() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let jti = claims_of(&mut c, &alice.access_token, "order").await.jti;
    // order's own credentials, with order's certificate: no admin perm, and
    // no token for the auth service either.
    let d = &srv.dir;
    let args = vec![
        "admin".into(),
        format!("--addr=https://localhost:{}", srv.grpc_addr.port()),
        format!("--ca={}", d.join("ca.pem").display()),
        format!("--cert={}", d.join("clients/order.pem").display()),
        format!("--key={}", d.join("clients/order-key.pem").display()),
        "revoke".into(),
        format!("--jti={jti}"),
        format!("--credentials={}", d.join("credentials/order.json").display()),
    ];
    let out = auth_server(args, vec![], None).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Login at https://localhost:") && err.contains("PermissionDenied"), "{err}");
    c.exchange_token(exchange_req(&srv, "order", &alice.access_token, "inventory")).await.unwrap();
}

#[tokio::test]
async fn admin_errors_name_the_file_or_address_that_failed() {
    let srv = TestServer::start().await;
    let mut args = vec!["admin".to_owned()];
    args.extend(conn_args(&srv));
    args.extend(["revoke".into(), "--jti=x".into(), "--credentials=/nonexistent/admin.json".into()]);
    let out = auth_server(args, vec![], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/admin.json"), "{}", stderr(&out));

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut args = vec!["admin".to_owned()];
    args.extend(conn_args(&srv).into_iter().filter(|a| !a.starts_with("--addr=")));
    args.extend([format!("--addr=https://localhost:{closed}"), "keys".into()]);
    let out = auth_server(args, vec![], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("GetJwks at https://localhost:{closed}")), "{}", stderr(&out));

    // A missing certificate file is named (the dev defaults, here in an
    // empty directory).
    let out = auth_server(vec!["admin".into(), "keys".into()], vec![], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains(".auth-dev/"), "{}", stderr(&out));
}

#[tokio::test]
async fn decode_prints_the_claims_and_checks_the_signature_against_the_jwks() {
    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let jwks_url = format!("http://{}/.well-known/jwks.json", srv.http_addr);

    // From standard input, checked against the side port's JWKS.
    let args = vec!["decode".into(), "-".into(), format!("--jwks={jwks_url}"), "--audience=order".into()];
    let out = auth_server(args, vec![], Some(format!("{}\n", alice.access_token))).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(shown.contains("\"sub\": \"alice\""), "{shown}");
    assert!(shown.contains("\"typ\": \"at+jwt\""), "{shown}");
    assert!(shown.contains(&format!("valid: signature verified with kid {}", srv.keys().active_kid())), "{shown}");
    let signature = alice.access_token.rsplit('.').next().unwrap();
    assert!(!shown.contains(signature), "the token's signature is not printed");

    // The wrong audience, and another server's keys (a file), are refused
    // with the reason.
    let args = vec!["decode".into(), "-".into(), format!("--jwks={jwks_url}"), "--audience=inventory".into()];
    let out = auth_server(args, vec![], Some(alice.access_token.clone())).await;
    assert!(!out.status.success());
    assert!(stdout(&out).contains("invalid: wrong audience (the signature itself verifies)"), "{}", stdout(&out));

    let other = TestServer::start().await;
    let mut oc = client(&other, "order").await;
    let other_jwks = oc.get_jwks(auth_proto::auth::v1::GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let file = srv.dir.join("other-jwks.json");
    std::fs::write(&file, other_jwks).unwrap();
    let args = vec!["decode".into(), format!("--jwks={}", file.display())];
    let out = auth_server(args, vec![], Some(alice.access_token.clone())).await;
    assert!(!out.status.success());
    assert!(stdout(&out).contains("invalid: unknown key id"), "{}", stdout(&out));

    // Against the server's keys over mTLS.
    let mut args = vec!["decode".into(), "--jwks-from-server".into()];
    args.extend(conn_args(&srv));
    let out = auth_server(args, vec![], Some(alice.access_token.clone())).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("valid: signature verified"), "{}", stdout(&out));

    // Without a JWKS: decoded, not checked.
    let out = auth_server(vec!["decode".into(), alice.access_token.clone()], vec![], None).await;
    assert!(out.status.success());
    assert!(stdout(&out).contains("signature: not checked"), "{}", stdout(&out));
}

#[tokio::test]
async fn new_account_output_pasted_into_the_accounts_file_lets_the_service_exchange() {
    let srv = TestServer::start().await;
    let args = vec![
        "new-account".into(),
        "billing".into(),
        "--audience=inventory=inventory:read".into(),
        "--audience=order".into(),
    ];
    let out = auth_server(args, vec![], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    // The block: from [[account]] to the blank line before the credentials.
    let start = shown.find("[[account]]").unwrap();
    let end = shown[start..].find("\n\n#").map(|i| start + i).unwrap();
    let block = &shown[start..end];
    let json = shown.lines().find(|l| l.starts_with('{')).unwrap();

    // Pasted at the end of the accounts file; the credentials document
    // mounted for the service, which the SDK reads.
    let accounts = srv.dir.join("accounts.toml");
    let mut text = std::fs::read_to_string(&accounts).unwrap();
    text.push('\n');
    text.push_str(block);
    text.push('\n');
    std::fs::write(&accounts, text).unwrap();
    let mounted = srv.dir.join("billing.json");
    std::fs::write(&mounted, json).unwrap();
    let creds = service_sdk::FileCredentials::document(&mounted).current().await.unwrap();
    assert_eq!(creds.client_id, "billing");
    assert!(!block.contains(creds.client_secret.expose()), "the block holds only the digest");
    srv.reload().await.unwrap();

    // billing gets a token for inventory, on its own and for alice.
    let mut c = client(&srv, "order").await;
    let exchange = |subject: &str| ExchangeTokenRequest {
        client_id: creds.client_id.clone(),
        client_secret: creds.client_secret.expose().to_owned(),
        subject_token: subject.into(),
        audience: "inventory".into(),
        scope: vec![],
        requested_ttl_seconds: 0,
    };
    let own = c.exchange_token(exchange("")).await.unwrap().into_inner();
    assert_eq!(own.scope, ["inventory:read"]);
    let claims = claims_of(&mut c, &own.access_token, "inventory").await;
    assert_eq!(claims.sub, "svc:billing");
    let login = c
        .login(LoginRequest {
            grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant {
                client_id: "billing".into(),
                client_secret: creds.client_secret.expose().to_owned(),
            })),
            audience: vec!["order".into()],
            scope: vec![],
        })
        .await;
    assert!(login.is_ok(), "{login:?}");
    // Not on its allow-list.
    let mut off = exchange("");
    off.audience = "payments".into();
    assert_eq!(c.exchange_token(off).await.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn new_account_writes_the_credentials_to_a_private_file_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing.json");
    let args = vec![
        "new-account".into(),
        "billing".into(),
        "--audience=inventory".into(),
        format!("--credentials-out={}", path.display()),
    ];
    let out = auth_server(args, vec![], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let secret = doc["client_secret"].as_str().unwrap();
    assert!(!stdout(&out).contains(secret), "the secret is not printed");
    assert_eq!(mode(&path) & 0o777, 0o600);
    // An existing file is never overwritten.
    let again = auth_server(
        vec![
            "new-account".into(),
            "billing".into(),
            "--audience=inventory".into(),
            format!("--credentials-out={}", path.display()),
        ],
        vec![],
        None,
    )
    .await;
    assert!(!again.status.success());
    assert!(stderr(&again).contains(&path.display().to_string()), "{}", stderr(&again));
    let unchanged: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(unchanged["client_secret"], secret);
}

#[tokio::test]
async fn the_admin_variables_in_the_environment_do_not_break_serve() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    let config = env.config_path.display().to_string();
    let run = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_auth-server"))
            .args(["serve", "--config", &config, "--grpc-addr=127.0.0.1:0", "--http-addr=127.0.0.1:0"])
            .env("AUTH_SERVER_ADMIN_ADDR", "https://localhost:1")
            .env("AUTH_SERVER_ADMIN_CREDENTIALS", "admin.json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = lines.map_while(Result::ok).any(|l| l.contains("auth-server listening"));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        (listening, String::from_utf8_lossy(&out.stderr).into_owned())
    });
    let (listening, stderr) = within("serve to start", run).await.unwrap();
    assert!(listening, "serve did not start with AUTH_SERVER_ADMIN_* set: {stderr}");
}

#[tokio::test]
async fn healthcheck_probes_the_https_side_port_with_the_given_ca() {
    let srv = TestServer::builder()
        .configure(|raw| {
            raw.http_tls = Some(auth_server::config::HttpTlsConfig {
                cert: "server.pem".into(),
                key: "server-key.pem".into(),
                client_ca: None,
            })
        })
        .start()
        .await;
    let url = format!("https://localhost:{}/readyz", srv.http_addr.port());
    let ca = format!("--ca={}", srv.dir.join("ca.pem").display());
    let out = auth_server(vec!["healthcheck".into(), format!("--url={url}"), ca], vec![], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Without the CA the system's roots do not trust the dev certificate.
    let out = auth_server(vec!["healthcheck".into(), format!("--url={url}")], vec![], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("healthcheck {url}")), "{}", stderr(&out));
    // Plain HTTP to the TLS port gets no answer.
    let plain = format!("--url=http://127.0.0.1:{}/readyz", srv.http_addr.port());
    assert!(!auth_server(vec!["healthcheck".into(), plain], vec![], None).await.status.success());
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode()
}
