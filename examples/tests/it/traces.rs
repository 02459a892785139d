//! One trace across three processes. The real auth-server, inventory and
//! order binaries export their spans over OTLP to a receiver in this test
//! (the official collector service definitions); alice's order must show as
//! one trace: order's `POST /orders`, the auth server's `ExchangeToken`
//! made on her behalf, and inventory's `Reserve`, the last two children of
//! the first. No span, attribute or event may hold a token, a client
//! secret or a password. The processes log without colours, their standard
//! output being a pipe.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::{LoginRequest, PasswordGrant, login_request};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use service_sdk::ServiceEnv;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{PATIENCE, Proc, auth_server_binary, command, free_port};

/// A received span with the name of the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received { service: service.clone(), span });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// An attribute value as text (arrays and maps flattened).
fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::ArrayValue(a)) => a.values.iter().map(|v| text(Some(v))).collect::<Vec<_>>().join(" "),
        Some(Value::KvlistValue(l)) => pairs(&l.values),
        Some(other) => format!("{other:?}"),
    }
}

fn pairs(kvs: &[KeyValue]) -> String {
    kvs.iter().map(|kv| format!("{}={}\n", kv.key, text(kv.value.as_ref()))).collect()
}

/// Everything a span says: its name, attributes, events (names and
/// attributes), links and status message.
fn everything(span: &Span) -> String {
    let mut all = format!("{}\n{}", span.name, pairs(&span.attributes));
    for e in &span.events {
        all.push_str(&format!("{}\n{}", e.name, pairs(&e.attributes)));
    }
    for l in &span.links {
        all.push_str(&pairs(&l.attributes));
    }
    if let Some(s) = &span.status {
        all.push_str(&s.message);
    }
    all
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a KeyValue> {
    span.attributes.iter().find(|kv| kv.key == key)
}

/// GET `path` on `addr`; the status code, 0 when nothing answered.
async fn http_status(addr: &str, path: &str) -> u16 {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return 0 };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// POST /orders on order's HTTP front as the bearer of `token`.
async fn place_order(addr: &str, token: &str) -> (u16, String) {
    let body = r#"{"sku":"sku-1","quantity":1}"#;
    let req = format!(
        "POST /orders HTTP/1.1\r\nHost: order\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return (0, String::new()) };
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Every client secret and password of the dev environment.
fn dev_secrets(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir.join("credentials")).unwrap() {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        for key in ["client_secret", "password"] {
            if let Some(s) = doc[key].as_str() {
                out.push(s.to_owned());
            }
        }
    }
    assert!(out.len() >= 3, "the dev environment has secrets and passwords: {out:?}");
    out
}

/// What every process of the test is given: the receiver, and batches so
/// rare that only the flush at shutdown sends them.
fn traced(mut cmd: Command, receiver: &str) -> Command {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver).env("OTEL_BSP_SCHEDULE_DELAY", "3600000").env("RUST_LOG", "info");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_order_through_three_processes_and_holds_no_secret() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let auth_bin = auth_server_binary();

    // The receiver.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let receiving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );

    // The auth server, from its config file, as `auth-server serve` runs.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let (grpc, http) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let dev = auth_server::dev::ensure_with(&dir, &grpc, &http).unwrap();
    let mut cmd = command(auth_bin);
    cmd.arg("serve").arg("--config").arg(&dev.config_path);
    let mut auth = Proc::spawn("auth-server", traced(cmd, &receiver_url));
    let start = Instant::now();
    while http_status(&http, "/readyz").await != 200 {
        auth.assert_running();
        assert!(start.elapsed() < PATIENCE, "auth-server not ready; output:\n{}", auth.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let auth_uri = format!("https://{grpc}");

    // inventory and order, configured as in a cluster.
    let service = |name: &'static str, bin: &str, vars: &[(&str, &str)]| {
        let mut cmd = command(bin);
        cmd.env("AUTH_DEV_DIR", &dir).env("AUTH_URL", &auth_uri).envs(vars.iter().copied());
        Proc::spawn(name, traced(cmd, &receiver_url))
    };
    let inventory_addr = format!("127.0.0.1:{}", free_port());
    let mut inventory = service("inventory", env!("CARGO_BIN_EXE_inventory"), &[("LISTEN", &inventory_addr)]);
    let (order_http, order_grpc) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut order = service(
        "order",
        env!("CARGO_BIN_EXE_order"),
        &[
            ("LISTEN", &order_http),
            ("GRPC_LISTEN", &order_grpc),
            ("INVENTORY_URL", &format!("https://{inventory_addr}")),
        ],
    );

    // alice logs in and orders (503 until order's verifier is ready).
    let mut client = AuthClient::new(ServiceEnv::dev(&dir, "admin", &auth_uri).auth_channel().unwrap());
    let alice: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("credentials/alice.json")).unwrap()).unwrap();
    let tokens = client
        .login(LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant {
                username: "alice".into(),
                password: alice["password"].as_str().unwrap().into(),
            })),
            audience: vec!["order".into()],
            scope: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let start = Instant::now();
    let (status, body) = loop {
        let (status, body) = place_order(&order_http, &tokens.access_token).await;
        if !matches!(status, 0 | 503) || start.elapsed() > PATIENCE {
            break (status, body);
        }
        order.assert_running();
        inventory.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200, "POST /orders: {body}\norder:\n{}\ninventory:\n{}", order.output(), inventory.output());
    drop(client);

    // Stop everything: the spans are still in the processes' batches, and
    // their flush at shutdown is what sends them.
    for p in [&mut order, &mut inventory, &mut auth] {
        let status = p.terminate();
        assert!(status.success(), "{} exited with {status}; output:\n{}", p.name, p.output());
    }

    // Each process logged, and without colours: standard output is a pipe.
    for p in [&order, &inventory, &auth] {
        let out = p.output();
        assert!(out.contains("exporting spans over OTLP"), "{} logged no line:\n{out}", p.name);
        assert!(!out.contains("\x1b["), "{} coloured its log lines:\n{out}", p.name);
    }

    let spans = receiver.spans.lock().unwrap().clone();
    let _ = stop_tx.send(());
    let _ = receiving.await;
    let find = |service: &str, name: &str| -> Vec<&Span> {
        spans.iter().filter(|r| r.service == service && r.span.name == name).map(|r| &r.span).collect()
    };
    let summary = || spans.iter().map(|r| format!("{} {}", r.service, r.span.name)).collect::<Vec<_>>().join("\n");

    // Tries answered 503 while order's verifier was starting have spans of
    // their own, marked refused; one try got through.
    let tries = find("order", "POST /orders");
    let (refused, placed): (Vec<&Span>, Vec<&Span>) = tries.into_iter().partition(|s| attr(s, "refused").is_some());
    assert_eq!(placed.len(), 1, "order's request span, among:\n{}", summary());
    for span in refused {
        assert_ne!(span.trace_id, placed[0].trace_id, "a refused try is a trace of its own");
    }
    let root = placed[0];
    assert!(root.parent_span_id.is_empty(), "the test sent no trace context: order starts the trace");
    // Order's own token for inventory, fetched at its start-up, is a trace
    // of its own: only the exchange on alice's behalf is in hers.
    let exchanges: Vec<&Span> =
        find("auth-server", "auth.v1.Auth/ExchangeToken").into_iter().filter(|s| s.trace_id == root.trace_id).collect();
    let reserves = find("inventory", "shop.v1.Inventory/Reserve");
    assert_eq!((exchanges.len(), reserves.len()), (1, 1), "spans received:\n{}", summary());
    for (what, span) in [("the exchange", exchanges[0]), ("the reservation", reserves[0])] {
        assert_eq!(span.trace_id, root.trace_id, "{what} is in the order's trace");
        assert_eq!(span.parent_span_id, root.span_id, "{what} is a child of the order's span");
    }
    // The exchange's span says who asked for what (a sign the attributes
    // below were looked at at all).
    let exchange = exchanges[0];
    assert_eq!(attr(exchange, "client_id").map(|kv| text(kv.value.as_ref())).as_deref(), Some("\"order\""));
    assert!(attr(exchange, "audience").is_some_and(|kv| text(kv.value.as_ref()).contains("inventory")));
    // The verifiers' background calls (keys, revocations) are other traces.
    let traces: HashMap<&[u8], usize> = spans.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.span.trace_id.as_slice()).or_default() += 1;
        m
    });
    assert!(traces.len() > 1, "background calls start their own traces:\n{}", summary());

    // No span holds a secret, a password or a token, in any form.
    let mut secrets = dev_secrets(&dir);
    secrets.push(tokens.access_token.clone());
    secrets.push(tokens.refresh_token.clone());
    let resources_and_spans = spans.iter().map(|r| format!("{}\n{}", r.service, everything(&r.span)));
    for (i, said) in resources_and_spans.enumerate() {
        for secret in &secrets {
            assert!(!said.contains(secret.as_str()), "span {i} holds a secret:\n{said}");
        }
        // Every JWT (the exchanged token too) starts with `eyJ`, its
        // base64url-encoded `{"`.
        assert!(!said.contains("eyJ"), "span {i} holds a token:\n{said}");
        assert!(!said.to_ascii_lowercase().contains("bearer"), "span {i} holds an authorization header:\n{said}");
    }
}
