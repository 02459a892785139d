//! The edge as layers: every RPC gets its span, method and gRPC code from
//! the trace layer in the server's stack, and client-chosen strings reach
//! the logs escaped. Bad input over a raw HTTP/2 client on real mTLS: a
//! request that does not decode gets `INVALID_ARGUMENT` with a fixed
//! message, and a content-type that is not gRPC is refused.

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

/// Call once the server is up, before the calls whose logs are checked.
/// Other tests of this binary run on other threads with no subscriber, and
/// the first of them to reach a callsite (the RPC span, say) may store its
/// "never" after `set_default` computed "always": tracing caches interest
/// per callsite, process-wide. Computing it again now, with this thread's
/// subscriber registered and every callsite of the calls long registered,
/// closes that race.
fn settle_interest() {
    tracing::callsite::rebuild_interest_cache();
}

#[tokio::test]
async fn every_rpc_is_traced_with_its_method_and_grpc_code() {
    let (logs, _guard) = capture();
    let srv = TestServer::start().await;
    settle_interest();
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
    settle_interest();
    let mut c = AuthClient::new(srv.channel("order").await);
    let forged = ExchangeTokenRequest {
        client_id: "order\nINFO forged line".into(),
        client_secret: "x".into(),
        audience: "inventory".into(),
        ..Default::default()
    };
    // Now and then, under parallel tests, the RPC's span is not recorded
    // by this thread's subscriber (tracing's per-callsite interest cache is
    // process-wide); another call then shows the field. Each attempt's
    // output is checked below for forged lines all the same.
    for _ in 0..3 {
        assert_eq!(c.exchange_token(forged.clone()).await.unwrap_err().code(), Code::Unauthenticated);
        if logs.text().contains("order\\nINFO forged line") {
            break;
        }
        settle_interest();
    }
    let text = logs.text();
    assert!(text.contains("order\\nINFO forged line"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("INFO forged line")), "{text}");
}

/// The message of every request that does not decode.
const MALFORMED: &str = "malformed request";

#[tokio::test]
async fn undecodable_requests_get_invalid_argument_with_a_fixed_message() {
    use crate::transport::{RawH2, grpc_frame};
    use prost::Message as _;

    let srv = TestServer::start().await;
    let mut h2 = RawH2::connect(&srv, "order").await;
    let call = |path: &'static str, message: Vec<u8>| (path, grpc_frame(&message));

    // Bytes from a fixed xorshift sequence.
    let mut x: u32 = 0x9e37_79b9;
    let random: Vec<u8> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect();
    let whole = ExchangeTokenRequest {
        client_id: "order".into(),
        client_secret: "secret".into(),
        audience: "inventory".into(),
        ..Default::default()
    }
    .encode_to_vec();
    // client_id (field 1) holding bytes that are not UTF-8.
    let bad_utf8 = vec![0x0a, 0x02, 0xc3, 0x28];
    // Login's client_credentials grant (field 2) holding a broken varint.
    let garbage_nested = vec![0x12, 0x04, 0xff, 0xff, 0xff, 0xff];
    // An unknown field nested in 200 groups, past prost's recursion limit.
    let deep: Vec<u8> = std::iter::repeat_n(0x7b, 200).chain(std::iter::repeat_n(0x7c, 200)).collect();

    let cases = [
        ("random bytes", call("/auth.v1.Auth/ExchangeToken", random.clone())),
        ("random bytes to Login", call("/auth.v1.Auth/Login", random)),
        ("a truncated message", call("/auth.v1.Auth/ExchangeToken", whole[..whole.len() - 3].to_vec())),
        ("invalid UTF-8 in client_id", call("/auth.v1.Auth/ExchangeToken", bad_utf8)),
        ("garbage in a nested message", call("/auth.v1.Auth/Login", garbage_nested)),
        ("nesting past the recursion limit", call("/auth.v1.Auth/Login", deep)),
        // Broken framing rather than a broken message.
        (
            "a frame cut short of its length prefix",
            ("/auth.v1.Auth/ExchangeToken", {
                let mut frame = grpc_frame(&whole);
                frame.truncate(frame.len() - 3);
                frame
            }),
        ),
        ("a cut length prefix", ("/auth.v1.Auth/Login", vec![0, 0, 0])),
        ("no message at all", ("/auth.v1.Auth/ExchangeToken", Vec::new())),
    ];
    let mut wrong = Vec::new();
    for (what, (path, body)) in cases {
        let reply = h2.call(path, "application/grpc", body).await.unwrap();
        let status = reply.grpc.as_ref().map(|s| (s.code(), s.message().to_owned()));
        if reply.http != http::StatusCode::OK || status != Some((Code::InvalidArgument, MALFORMED.into())) {
            wrong.push(format!("{what}: HTTP {} {status:?}", reply.http));
        }
    }
    assert!(wrong.is_empty(), "not INVALID_ARGUMENT \"{MALFORMED}\":\n{}", wrong.join("\n"));
    // The same connection still serves a well-formed call.
    h2.get_jwks().await;
    let reply = h2.call("/auth.v1.Auth/ExchangeToken", "application/grpc+proto", grpc_frame(&whole)).await.unwrap();
    assert_eq!(reply.grpc.map(|s| s.code()), Some(Code::Unauthenticated), "a wrong secret decodes and is judged");
}

#[tokio::test]
async fn a_content_type_that_is_not_grpc_is_refused_with_415() {
    use crate::transport::{RawH2, grpc_frame};
    use prost::Message as _;

    let srv = TestServer::start().await;
    let mut h2 = RawH2::connect(&srv, "order").await;
    let jwks = grpc_frame(&GetJwksRequest {}.encode_to_vec());
    for content_type in ["text/plain", "application/json", "application/grpc-web"] {
        let reply = h2.call("/auth.v1.Auth/GetJwks", content_type, jwks.clone()).await.unwrap();
        assert_eq!(reply.http, http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type}");
        assert!(reply.grpc.is_none() && reply.body.is_empty(), "{content_type}: {reply:?}");
    }
    h2.get_jwks().await;
}
