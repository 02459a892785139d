//! Log injection: strings a client chose (client id, audience, username)
//! reach the logs escaped and capped, so a request cannot forge a log line
//! or flood the log with one huge line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use auth_proto::auth::v1::{ClientCredentialsGrant, ExchangeTokenRequest, LoginRequest, PasswordGrant, login_request};
use testkit::TestServer;

use crate::edge::Captured;
use crate::flows::client;

/// A forged log line, and enough bulk to make one line huge.
fn hostile(bulk: usize) -> String {
    format!("evil\nFORGED level=ERROR admin logged in\r\n{}", "A".repeat(bulk))
}

// The server runs on this test's (single-threaded) runtime, so a
// subscriber set as this thread's default sees every event it logs.
#[tokio::test(flavor = "current_thread")]
async fn client_chosen_strings_cannot_forge_or_flood_log_lines() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let srv = TestServer::start().await;
    let mut c = client(&srv, "order").await;
    // Under the 8 KiB field limit, so the flows see them (and refuse them).
    let (_, secret) = srv.client_credentials("order");
    for bulk in [7_000, 10_000] {
        let evil = hostile(bulk);
        let err = c
            .exchange_token(ExchangeTokenRequest {
                client_id: evil.clone(),
                client_secret: secret.clone(),
                audience: evil.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err.code(), tonic::Code::Unauthenticated | tonic::Code::InvalidArgument), "{err:?}");
        let err = c
            .login(LoginRequest {
                grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant {
                    client_id: evil.clone(),
                    client_secret: secret.clone(),
                })),
                audience: vec![hostile(100)],
                scope: vec![],
            })
            .await
            .unwrap_err();
        assert!(matches!(err.code(), tonic::Code::Unauthenticated | tonic::Code::InvalidArgument), "{err:?}");
        let err = c
            .login(LoginRequest {
                grant: Some(login_request::Grant::Password(PasswordGrant {
                    username: evil.clone(),
                    password: "wrong".into(),
                })),
                audience: vec![],
                scope: vec![],
            })
            .await
            .unwrap_err();
        assert!(matches!(err.code(), tonic::Code::Unauthenticated | tonic::Code::InvalidArgument), "{err:?}");
    }
    drop(srv);

    let logs = captured.text();
    assert!(logs.contains("evil"), "the requests were logged at all:\n{logs}");
    for line in logs.lines() {
        assert!(!line.trim_start().starts_with("FORGED"), "a forged log line: {line}");
        assert!(line.len() <= 2_048, "a {}-byte log line: {}…", line.len(), &line[..200]);
    }
}

/// Log lines written to a pipe (a container's log, a file) carry no ANSI
/// colour codes; the binary colours only a terminal.
#[tokio::test]
async fn log_lines_to_a_pipe_carry_no_colour_codes() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_auth-server"))
        .arg("dev")
        .arg("--dir")
        .arg(dir.path())
        .args(["--grpc-addr", &format!("127.0.0.1:{}", free()), "--http-addr", &format!("127.0.0.1:{}", free())])
        .env_clear()
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start auth-server");
    let mut stdout = child.stdout.take().unwrap();
    // Read until the server says it listens (a log line), then stop it.
    let out = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains("auth-server listening") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let out = crate::within("the listening line", out).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.contains("auth-server listening"), "no log line:\n{out}");
    assert!(!out.contains("\x1b["), "colour codes in piped logs:\n{out}");
}
