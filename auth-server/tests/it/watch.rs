//! The WatchRevocations feed end to end: a replica that cannot hear Redis
//! stops looking fresh, a resubscription resyncs open streams in place,
//! shutdown ends streams at once, and the per-replica and per-client caps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use auth_proto::auth::v1::revocation_event::Event;
use auth_proto::auth::v1::{RevocationEvent, RevokeRequest, TokenResponse, WatchRevocationsRequest, revoke_request};
use service_sdk::{FeedOptions, Verifier, VerifyError};
use testkit::{RedisProcess, TcpProxy, TestServer};
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};

use crate::flows::{client, login_user};
use crate::within;

/// A replica on the Redis at `url`, sharing `dir`'s PKI, keys and accounts
/// when given; heartbeats every second, short Redis timeouts.
pub(crate) async fn replica(url: String, dir: Option<&std::path::Path>) -> TestServer {
    let mut b = TestServer::builder().store_url(url).configure(|c| {
        c.redis.command_timeout_ms = 500;
        c.watch.heartbeat_secs = 1;
    });
    if let Some(dir) = dir {
        b = b.dev_dir(dir);
    }
    b.start().await
}

async fn login(srv: &TestServer, user: &str) -> TokenResponse {
    login_user(&mut client(srv, "order").await, srv, user).await
}

async fn revoke(srv: &TestServer, access_token: &str) {
    let target = revoke_request::Target::AccessToken(access_token.into());
    client(srv, "order").await.revoke(RevokeRequest { target: Some(target) }).await.unwrap();
}

/// A verifier for audience `order` whose revocation feed and JWKS come
/// over `channel`, stale after `stale_after` of silence (reconnecting at
/// least twice within it).
fn verifier(srv: &TestServer, channel: tonic::transport::Channel, stale_after: Duration) -> Verifier {
    Verifier::builder(srv.config().issuer.clone(), "order")
        .channel(channel)
        .feed_options(FeedOptions { stale_after, max_backoff: stale_after / 2, ..FeedOptions::default() })
        .build()
        .unwrap()
}

fn refused(result: &Result<service_sdk::Claims, VerifyError>) -> bool {
    matches!(result, Err(VerifyError::Revoked | VerifyError::FeedStale))
}

#[tokio::test]
async fn a_replica_cut_off_from_redis_fails_closed_then_recovers() {
    let redis = RedisProcess::start();
    let link = TcpProxy::start(redis.addr()).await;
    let a = replica(format!("redis://{}", link.addr()), None).await;
    let b = replica(redis.url(), Some(&a.dir)).await;
    let stale_after = Duration::from_secs(4);
    let v = verifier(&a, a.channel("inventory").await, stale_after);
    within("the verifier's first snapshot", v.ready()).await;
    let alice = login(&b, "alice").await;
    let bob = login(&b, "bob").await;
    v.verify(&alice.access_token, None).await.unwrap();

    // A silent partition between A and Redis: A's sockets stay open, but
    // nothing flows. The revocation, made at B, can never reach A.
    link.freeze();
    let frozen_at = Instant::now();
    revoke(&b, &alice.access_token).await;
    // A's last heartbeat may come up to one subscriber ping plus one
    // command timeout after the freeze (detection time); the verifier then
    // waits out its stale bound, counted in whole seconds (one more), and
    // the rest is slack for a loaded machine. A replica that kept
    // heartbeating while partitioned would never get there.
    let redis_config = a.config().redis().expect("a Redis store");
    let detection = Duration::from_millis(redis_config.subscriber_ping_ms + redis_config.command_timeout_ms);
    let bound = stale_after + Duration::from_secs(1) + detection + Duration::from_secs(2);
    loop {
        let result = v.verify(&alice.access_token, None).await;
        if refused(&result) {
            break;
        }
        assert!(
            frozen_at.elapsed() < bound,
            "the verifier behind a partitioned replica still accepts a token revoked {:?} after the partition: \
             {result:?}",
            frozen_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From then on, never accepted while the partition lasts.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let result = v.verify(&alice.access_token, None).await;
        assert!(refused(&result), "the revoked token was accepted during the partition: {result:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Healed: A resubscribes and its watchers load a fresh snapshot. The
    // live token passes again; the revoked one never does.
    link.resume();
    within("the verifier to accept a live token again", async {
        loop {
            let result = v.verify(&alice.access_token, None).await;
            assert!(refused(&result), "the revoked token was accepted after the partition: {result:?}");
            if v.verify(&bob.access_token, None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let err = v.verify(&alice.access_token, None).await.unwrap_err();
    assert!(matches!(err, VerifyError::Revoked), "{err:?}");
}

/// Reads a whole (possibly chunked) snapshot; the ids it holds.
async fn read_snapshot(stream: &mut Streaming<RevocationEvent>) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let event = stream.message().await.unwrap().expect("stream ended");
        match event.event {
            Some(Event::Snapshot(s)) => {
                ids.extend(s.entries.into_iter().map(|r| r.id));
                if !s.more {
                    return ids;
                }
            }
            other => assert!(ids.is_empty(), "a snapshot chunk was interleaved with {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_resubscription_resyncs_open_watchers_with_a_large_deny_list() {
    use auth_server::clock::{Clock, SystemClock};
    use auth_server::store::{Revocation, RevocationKind};
    use futures_util::StreamExt as _;

    const ENTRIES: usize = 50_000;
    let redis = RedisProcess::start();
    // Reading 50,000 entries takes a while in a debug build on a busy machine.
    let srv =
        TestServer::builder().store_url(redis.url()).configure(|c| c.redis.command_timeout_ms = 9_000).start().await;
    let store = std::sync::Arc::clone(&srv.core().store);
    let expires_at = SystemClock.now_unix() + 3_600;
    futures_util::stream::iter(0..ENTRIES)
        .map(|i| {
            let store = std::sync::Arc::clone(&store);
            async move {
                let r = Revocation { kind: RevocationKind::Jti, id: format!("bulk-{i:08}"), expires_at };
                store.revoke(r, SystemClock.now_unix()).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;

    let mut watchers = Vec::new();
    for _ in 0..3 {
        let mut c = client(&srv, "inventory").await;
        let mut stream = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
        assert_eq!(within("the first snapshot", read_snapshot(&mut stream)).await.len(), ENTRIES);
        watchers.push(stream);
    }

    // Drop the store's pub/sub connection: it reconnects and resubscribes,
    // and messages published meanwhile are lost. A revocation made at
    // another replica in that gap can reach the watchers only through the
    // resent snapshot (or as an event, if it lands after the resubscription).
    let other = TestServer::builder().dev_dir(&srv.dir).store_url(redis.url()).start().await;
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).int();
    assert!(killed >= 1, "no pub/sub connection to kill");
    let gap = Revocation { kind: RevocationKind::Jti, id: "revoked-in-the-gap".into(), expires_at };
    other.core().store.revoke(gap, SystemClock.now_unix()).await.unwrap();
    for stream in &mut watchers {
        // The same stream carries a fresh, complete snapshot.
        let ids = within("a fresh snapshot on the open stream", async {
            loop {
                let event = stream.message().await.expect("the stream stays open").expect("stream ended");
                match event.event {
                    Some(Event::Heartbeat(_)) => continue,
                    Some(Event::Snapshot(s)) => {
                        let mut ids: Vec<String> = s.entries.into_iter().map(|r| r.id).collect();
                        if s.more {
                            ids.extend(read_snapshot(stream).await);
                        }
                        return ids;
                    }
                    other => panic!("unexpected event before the resync: {other:?}"),
                }
            }
        })
        .await;
        assert!(ids.len() >= ENTRIES, "{} entries", ids.len());
        if !ids.iter().any(|id| id == "revoked-in-the-gap") {
            within("the revocation made during the gap", async {
                loop {
                    let event = stream.message().await.expect("the stream stays open").expect("stream ended");
                    match event.event {
                        Some(Event::Revoked(r)) if r.id == "revoked-in-the-gap" => return,
                        Some(Event::Heartbeat(_)) => {}
                        other => panic!("the resync lost the revocation made during the gap: got {other:?}"),
                    }
                }
            })
            .await;
        }
    }
    // And it still carries revocations as they happen.
    let alice = login(&srv, "alice").await;
    revoke(&srv, &alice.access_token).await;
    for stream in &mut watchers {
        within("the new revocation on the resynced stream", async {
            loop {
                let event = stream.message().await.expect("the stream stays open").expect("stream ended");
                if let Some(Event::Revoked(_)) = event.event {
                    return;
                }
            }
        })
        .await;
    }
}

#[tokio::test]
async fn shutdown_ends_watch_streams_so_verifiers_move_on_without_going_stale() {
    const GRACE_SECS: u64 = 60;
    let redis = RedisProcess::start();
    let b = replica(redis.url(), None).await;
    let a = TestServer::builder()
        .dev_dir(&b.dir)
        .store_url(redis.url())
        .configure(|c| {
            c.redis.command_timeout_ms = 500;
            c.watch.heartbeat_secs = 1;
            c.limits.shutdown_grace_secs = GRACE_SECS;
        })
        .start()
        .await;
    // A Service in front of the replicas: new connections go to A for now.
    let service = TcpProxy::start(a.grpc_addr).await;
    let v = verifier(&b, b.channel_via(service.addr(), "inventory").await, Duration::from_secs(4));
    within("the verifier's first snapshot", v.ready()).await;
    let live = login(&b, "bob").await;
    let alice = login(&b, "alice").await;
    v.verify(&live.access_token, None).await.unwrap();

    // Check the live token throughout: it must never be refused.
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let checker = {
        let (v, token) = (v.clone(), live.access_token.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut checks = 0u32;
            while !*done.borrow() {
                checks += 1;
                if let Err(e) = v.verify(&token, None).await {
                    failures.push(e);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = done.changed() => {}
                }
            }
            (checks, failures)
        })
    };

    // A goes: the Service stops sending it connections, and it shuts down
    // with the verifier's stream open. The stream must not hold it for the
    // grace period.
    service.set_target(b.grpc_addr);
    let shutdown = tokio::spawn(a.shutdown());
    tokio::time::timeout(Duration::from_secs(GRACE_SECS / 4), shutdown)
        .await
        .expect("A waited out its shutdown grace: its watch stream kept it open")
        .unwrap();

    // A is gone; the verifier now hears B.
    revoke(&b, &alice.access_token).await;
    within("the revocation made at B to reach the verifier", async {
        loop {
            match v.verify(&alice.access_token, None).await {
                Err(VerifyError::Revoked) => return,
                Err(VerifyError::FeedStale) => panic!("the verifier went stale"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    // And keeps hearing it: past the stale bound, the live token still passes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    done_tx.send_replace(true);
    let (checks, failures) = checker.await.unwrap();
    assert!(checks > 10, "only {checks} checks ran");
    assert!(failures.is_empty(), "the live token was refused while A shut down: {failures:?}");
}

/// Opens a watch stream as dev client `name` and reads its first message.
async fn open_watch(srv: &TestServer, name: &str) -> Result<Streaming<RevocationEvent>, Status> {
    let mut stream = client(srv, name).await.watch_revocations(WatchRevocationsRequest {}).await?.into_inner();
    let first = within("the snapshot", stream.message()).await?.expect("stream ended");
    assert!(matches!(first.event, Some(Event::Snapshot(_))), "the stream starts with a snapshot");
    Ok(stream)
}

fn exhausted(result: Result<Streaming<RevocationEvent>, Status>) -> String {
    let Err(err) = result else { panic!("a stream over the cap was opened") };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    err.message().to_owned()
}

#[tokio::test]
async fn watch_streams_are_capped_per_replica_and_per_client_identity() {
    let srv = TestServer::builder()
        .configure(|c| {
            c.limits.watch_max_streams = 3;
            c.limits.watch_max_streams_per_client = 2;
        })
        .start()
        .await;
    let first = open_watch(&srv, "inventory").await.unwrap();
    let _second = open_watch(&srv, "inventory").await.unwrap();
    let message = exhausted(open_watch(&srv, "inventory").await);
    assert_eq!(message, "too many revocation watchers for this client");
    // Another identity still gets one, up to the replica's cap.
    let _third = open_watch(&srv, "order").await.unwrap();
    let message = exhausted(open_watch(&srv, "admin").await);
    assert_eq!(message, "too many revocation watchers on this replica");

    // A closed stream frees its slot.
    drop(first);
    within("the closed stream's slot", async {
        loop {
            match open_watch(&srv, "inventory").await {
                Ok(_) => return,
                Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_watcher_blocked_on_a_client_that_stops_reading_ends_at_shutdown() {
    use auth_server::clock::{Clock, SystemClock};
    use auth_server::store::{Revocation, RevocationKind};

    // About a dozen 1 MiB snapshot chunks: far more than the stream's
    // buffers and the client's HTTP/2 window hold, so the watcher blocks
    // sending them to a client that does not read.
    const ENTRIES: usize = 480_000;
    let srv = TestServer::builder().configure(|c| c.limits.shutdown_grace_secs = 600).start().await;
    let store = std::sync::Arc::clone(&srv.core().store);
    let expires_at = SystemClock.now_unix() + 3_600;
    for i in 0..ENTRIES {
        let r = Revocation { kind: RevocationKind::Jti, id: format!("bulk-{i:08}"), expires_at };
        store.revoke(r, SystemClock.now_unix()).await.unwrap();
    }
    let mut c = client(&srv, "inventory").await;
    let mut stream = c.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    // The client reads nothing while the server shuts down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shutdown = tokio::spawn(srv.shutdown());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Then it reads what is left: the watcher gave up the rest of the
    // snapshot at shutdown instead of waiting on the client, and the
    // stream ends.
    let mut chunks = 0;
    let status = within("the stream to end", async {
        loop {
            match stream.message().await {
                Ok(Some(RevocationEvent { event: Some(Event::Snapshot(s)) })) => {
                    chunks += 1;
                    assert!(s.more, "the whole snapshot was sent after shutdown began ({chunks} chunks)");
                }
                Ok(other) => panic!("unexpected before the end: {other:?}"),
                Err(status) => return status,
            }
        }
    })
    .await;
    // UNAVAILABLE, or a reset when the server closes the connection, its
    // last stream done, before the client has read all it sent.
    match status.code() {
        Code::Unavailable => assert_eq!(status.message(), "server shutting down"),
        Code::Unknown => assert!(status.message().contains("h2 protocol error"), "{status:?}"),
        _ => panic!("{status:?}"),
    }
    within("the shutdown", shutdown).await.unwrap();
}
