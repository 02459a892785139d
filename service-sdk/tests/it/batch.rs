//! The token source's batch exchange (declared audiences, `ready`) and
//! certificate-bound tokens (RFC 8705) end to end: a real auth-server, real
//! mTLS, a real verifier in front of a downstream service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use auth_proto::auth::v1 as pb;
use auth_proto::auth::v1::auth_client::AuthClient;
use service_sdk::{AuthChannel, TokenError, TokenSource};
use testkit::TestServer;
use tonic::Code;

use crate::client::{Stub, channel_to, creds, echoed, mtls, serve_behind_verifier};

/// Lets dev account `order` ask for `billing` too (accounts file, reload).
async fn order_may_call_billing(srv: &TestServer) {
    let path = srv.config().accounts_file.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    let marker = "[account.audiences]\ninventory = ";
    assert!(text.contains(marker), "{text}");
    std::fs::write(
        &path,
        text.replacen(marker, "[account.audiences]\nbilling = [\"billing:charge\"]\ninventory = ", 1),
    )
    .unwrap();
    srv.reload().await.unwrap();
}

#[tokio::test]
async fn declared_audiences_are_fetched_in_one_call_and_ready_reports_a_refusal() {
    let srv = TestServer::start().await;
    order_may_call_billing(&srv).await;
    let files = mtls(&srv.dir, "order");
    let thumb = service_sdk_thumbprint(&files.client_certificate_der().unwrap());

    let source = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), creds(&srv, "order"))
        .audiences(["inventory", "billing"])
        .build();
    tokio::time::timeout(Duration::from_secs(30), source.ready()).await.unwrap().unwrap();
    let stats = source.stats();
    assert_eq!((stats.batches, stats.exchanges, stats.failures), (1, 2, 0), "{stats:?}");
    for audience in ["inventory", "billing"] {
        let token = source.cached(audience).unwrap_or_else(|| panic!("no {audience} token"));
        let claims = crate::client::verify(&srv, token.as_str(), audience, crate::client::now()).await;
        assert_eq!(claims.sub, "svc:order");
        assert_eq!(claims.cnf.unwrap().x5t_s256, thumb, "bound to order's certificate");
    }

    let refused = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), creds(&srv, "order"))
        .audiences(["inventory", "payments", "billing"])
        .build();
    let err = tokio::time::timeout(Duration::from_secs(30), refused.ready()).await.unwrap().unwrap_err();
    assert!(matches!(&err, TokenError::PermissionDenied { audience, .. } if audience == "payments"), "{err:?}");
    assert!(refused.cached("inventory").is_some() && refused.cached("billing").is_some(), "the others were granted");
    assert_eq!(refused.stats().batches, 1);
}

fn service_sdk_thumbprint(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

#[tokio::test]
async fn a_bound_token_replayed_from_another_services_certificate_is_refused() {
    let srv = TestServer::start().await;
    let (inventory, task) = serve_behind_verifier(&srv, "inventory", Stub::Inventory).await;
    let source = TokenSource::builder(channel_to(&srv.dir, "order", srv.grpc_addr), creds(&srv, "order")).build();
    // Order's own call, over its own certificate: accepted.
    let through_order = AuthChannel::new(channel_to(&srv.dir, "order", inventory), source.clone(), "inventory");
    let seen = echoed(AuthClient::new(through_order).get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner());
    assert_eq!(seen.sub, "svc:order");
    assert!(seen.cnf.is_some());

    // The same token, stolen and presented by another workload of the mesh
    // (a certificate of the same CA): refused.
    let token = source.cached("inventory").unwrap();
    for thief in ["admin", "inventory"] {
        let mut c = AuthClient::new(channel_to(&srv.dir, thief, inventory));
        let mut req = tonic::Request::new(pb::GetJwksRequest {});
        req.metadata_mut().insert("authorization", token.bearer().to_str().unwrap().parse().unwrap());
        let err = c.get_jwks(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "replayed from {thief}'s certificate");
    }
    task.abort();
}

#[tokio::test]
async fn certificate_rotation_under_load_fails_no_call() {
    use testkit::auth_server::dev::pki::Ca;
    let srv = TestServer::start().await;
    let (inventory, task) = serve_behind_verifier(&srv, "inventory", Stub::Inventory).await;

    // Order's certificate files, in a directory of its own that is rotated.
    let dir = tempfile::tempdir().unwrap();
    let files = service_sdk::MtlsFiles::new(
        srv.dir.join("ca.pem"),
        dir.path().join("order.pem"),
        dir.path().join("order-key.pem"),
    );
    let (cert, key) = srv.client_identity("order");
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    let auth_uri = format!("https://{}", srv.grpc_addr);
    let target = format!("https://{inventory}");
    let outgoing = |source: &TokenSource| {
        let der = files.client_certificate_der().unwrap();
        let ch = files.channel(&target, "localhost").unwrap();
        AuthChannel::new(ch, source.clone(), "inventory").client_certificate(&der)
    };
    let old_der = files.client_certificate_der().unwrap();
    let source = TokenSource::builder(files.auth_channel_as(&auth_uri, &auth_id()).unwrap(), creds(&srv, "order"))
        .audiences(["inventory"])
        .build();
    source.rotate_certificate(files.auth_channel_as(&auth_uri, &auth_id()).unwrap(), &old_der).await;
    source.ready().await.unwrap();
    let channel = Arc::new(ArcSwap::from_pointee(outgoing(&source)));

    // A loop of calls on 8 tasks, each call on the channel current when it starts.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let last_seen = Arc::new(std::sync::Mutex::new(String::new()));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (channel, stop, ok, failed, last_seen) =
                (channel.clone(), stop.clone(), ok.clone(), failed.clone(), last_seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut c = AuthClient::new(AuthChannel::clone(&channel.load()));
                    match c.get_jwks(pb::GetJwksRequest {}).await {
                        Ok(r) => {
                            let cnf = echoed(r.into_inner()).cnf.map(|c| c.x5t_s256).unwrap_or_default();
                            *last_seen.lock().unwrap() = cnf;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("call failed: {e:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let wait_calls = |n: u64| {
        let ok = ok.clone();
        async move {
            let start = ok.load(Ordering::Relaxed);
            crate::client::eventually("calls", || ok.load(Ordering::Relaxed) >= start + n).await;
        }
    };
    wait_calls(50).await;
    assert_eq!(*last_seen.lock().unwrap(), service_sdk_thumbprint(&old_der));

    // Rotate: a new certificate and key for the same identity, written over
    // the files; then what a watcher of the files does.
    let ca = Ca::from_pem(&srv.ca_pem(), &std::fs::read_to_string(srv.dir.join("ca-key.pem")).unwrap()).unwrap();
    let fresh = ca.client_cert("auth.dev", "order").unwrap();
    std::fs::write(&files.key, &fresh.key_pem).unwrap();
    std::fs::write(&files.cert, &fresh.cert_pem).unwrap();
    let new_der = files.client_certificate_der().unwrap();
    assert_ne!(new_der, old_der);
    source.rotate_certificate(files.auth_channel_as(&auth_uri, &auth_id()).unwrap(), &new_der).await;
    channel.store(Arc::new(outgoing(&source)));
    wait_calls(20).await;
    source.retire_previous_certificate();
    wait_calls(50).await;

    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{} calls succeeded", ok.load(Ordering::Relaxed));
    assert_eq!(
        *last_seen.lock().unwrap(),
        service_sdk_thumbprint(&new_der),
        "calls now carry tokens bound to the new certificate"
    );
    task.abort();
}

fn auth_id() -> service_sdk::AuthServerId {
    service_sdk::AuthServerId::new(testkit::auth_server::dev::DEV_AUTH_SERVER_ID).unwrap()
}
