//! The edge as layers: every RPC gets its span, method and gRPC code from
//! the trace layer in the server's stack, and client-chosen strings reach
//! the logs escaped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{
    ClientCredentialsGrant, ExchangeTokenRequest, GetJwksRequest, LoginRequest, WatchRevocationsRequest, login_request,
};
use testkit::TestServer;
use tonic::Code;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Log lines written by a test's own subscriber (shared with the log
/// injection tests).
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines with every one of `parts`.
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.text().lines().filter(|l| parts.iter().all(|p| l.contains(p))).map(str::to_owned).collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Captures this thread's logs at debug level, span openings included. The
/// test runtime is single-threaded, so the server's tasks log here too.
fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_span_events(FmtSpan::NEW)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn every_rpc_is_traced_with_its_method_and_grpc_code() {
    let (logs, _guard) = capture();
    let srv = TestServer::start().await;
    let mut c = AuthClient::new(srv.channel("order").await);

    c.get_jwks(GetJwksRequest {}).await.unwrap();
    let err = c.exchange_token(ExchangeTokenRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (client_id, client_secret) = srv.client_credentials("order");
    let refused = ExchangeTokenRequest {
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        audience: "nowhere".into(),
        ..Default::default()
    };
    assert_eq!(c.exchange_token(refused).await.unwrap_err().code(), Code::PermissionDenied);
    let login = LoginRequest {
        grant: Some(login_request::Grant::ClientCredentials(ClientCredentialsGrant { client_id, client_secret })),
        audience: vec!["inventory".into()],
        scope: vec![],
    };
    c.login(login).await.unwrap();
    let mut watch = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    watch.message().await.unwrap().expect("snapshot");

    let done = |method: &str, code: &str| {
        logs.lines_with(&["rpc{", &format!("method=\"{method}\""), "rpc done", &format!("code={code}")])
    };
    assert_eq!(done("GetJwks", "Ok").len(), 1, "{}", logs.text());
    assert_eq!(done("ExchangeToken", "InvalidArgument").len(), 1, "{}", logs.text());
    let denied = done("ExchangeToken", "PermissionDenied");
    assert_eq!(denied.len(), 1, "{}", logs.text());
    assert!(denied[0].contains("client_id=\"order\"") && denied[0].contains("audience=[\"nowhere\"]"), "{denied:?}");
    assert!(denied[0].contains("peer=Some(\"spiffe://auth.dev/order\")"), "{denied:?}");
    assert_eq!(done("Login", "Ok").len(), 1, "{}", logs.text());
    // A stream's code comes at its end; its span opens with the call.
    assert_eq!(logs.lines_with(&["rpc{", "method=\"WatchRevocations\"", "new"]).len(), 1, "{}", logs.text());
}

#[tokio::test]
async fn client_chosen_strings_reach_the_logs_escaped() {
    let (logs, _guard) = capture();
    let srv = TestServer::start().await;
    let mut c = AuthClient::new(srv.channel("order").await);
    let forged = ExchangeTokenRequest {
        client_id: "order\nINFO forged line".into(),
        client_secret: "x".into(),
        audience: "inventory".into(),
        ..Default::default()
    };
    assert_eq!(c.exchange_token(forged).await.unwrap_err().code(), Code::Unauthenticated);
    let text = logs.text();
    assert!(text.contains("order\\nINFO forged line"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("INFO forged line")), "{text}");
}
