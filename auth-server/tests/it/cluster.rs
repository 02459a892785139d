//! The sharded key layout on a real Redis Cluster (three primaries, started
//! and joined by the test): the store conformance suite, keys spread over
//! the primaries, the refresh race, revocation propagation across nodes,
//! the SDK's Redis check, and every flow through real auth-servers over
//! mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use auth_proto::auth::v1::revocation_event::Event;
use auth_proto::auth::v1::{
    ExchangeTokenRequest, GetJwksRequest, RefreshRequest, RevokeRequest, WatchRevocationsRequest, revoke_request,
};
use auth_server::clock::{Clock as _, SystemClock};
use auth_server::config::RedisConfig;
use auth_server::store::conformance::{self, NOW, Rotate as _, refresh_record};
use auth_server::store::{ConsumeOutcome, RedisStore, Revocation, RevocationKind, Store};
use service_sdk::redis_layout::{KeyLayout, hash_slot};
use service_sdk::verify::{RedisRevocation, RevocationCheck, RevocationLookup, VerifyError};
use service_sdk::{Claims, KeySet, Validator};
use testkit::{RedisCluster, TestServer};
use tokio::sync::broadcast;
use tonic::Code;

use crate::redis::replicas::{client, password_login};
use crate::within;

async fn connect(cluster: &RedisCluster) -> RedisStore {
    let config = RedisConfig { url: cluster.url(), command_timeout_ms: 1_000, ..RedisConfig::default() };
    assert!(config.key_layout().is_sharded(), "a cluster URL picks the sharded layout");
    RedisStore::connect(&config).await.unwrap()
}

fn revocation(kind: RevocationKind, id: &str, expires_at: u64) -> Revocation {
    Revocation { kind, id: id.into(), expires_at }
}

/// The port of the primary that owns `key`'s slot.
fn owner(cluster: &RedisCluster, key: &str) -> u16 {
    let slot = hash_slot(key);
    cluster.nodes().iter().find(|n| owns(n, slot)).unwrap_or_else(|| panic!("no node owns {key}")).port()
}

#[tokio::test]
async fn the_store_passes_the_conformance_suite_on_a_cluster_and_its_keys_land_on_several_primaries() {
    let cluster = RedisCluster::start();
    let store = connect(&cluster).await;
    store.ping().await.unwrap();
    conformance::run_all(&store).await.unwrap();

    // A spread of ids, as a real deployment writes them.
    for i in 0..60 {
        store.revoke(revocation(RevocationKind::Jti, &format!("jti-spread-{i}"), NOW + 600), NOW).await.unwrap();
        let family = format!("fam-spread-{i}");
        let record = refresh_record(&family, &format!("sid-spread-{i}"), NOW + 3600);
        store.put_refresh(&format!("{family}.d"), &record, NOW).await.unwrap();
    }
    let sizes = cluster.dbsizes();
    for (port, keys) in &sizes {
        println!("cluster node 127.0.0.1:{port}: DBSIZE {keys}");
    }
    let used = sizes.iter().filter(|(_, keys)| *keys > 0).count();
    assert!(used >= 2, "keys on {used} primaries: {sizes:?}");
    // A family's refresh tokens and its deny entry share a node; deny
    // shards sit on every primary.
    let layout = KeyLayout::sharded("auth");
    assert_eq!(owner(&cluster, &layout.refresh("fam-a.a1")), owner(&cluster, &layout.refresh("fam-a.a2")));
    let shard_nodes: HashSet<u16> = layout.deny_shards().iter().map(|s| owner(&cluster, s.jti_index())).collect();
    assert_eq!(shard_nodes.len(), 3, "the deny shards spread over all three primaries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_refreshes_on_a_cluster_rotate_exactly_once_and_revoke_the_family() {
    let cluster = RedisCluster::start();
    let stores = [Arc::new(connect(&cluster).await), Arc::new(connect(&cluster).await)];
    stores[0].put_refresh("fam-race.r0", &refresh_record("fam-race", "sid-race", NOW + 3600), NOW).await.unwrap();
    let mut events = stores[1].subscribe();
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let racers: Vec<_> = (0..50)
        .map(|i| {
            let (store, start) = (Arc::clone(&stores[i % 2]), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                let next = format!("fam-race.r1-{i}");
                (next.clone(), store.rotate("fam-race.r0", &next, NOW + 7200, NOW).await.unwrap())
            })
        })
        .collect();
    let (mut rotated, mut reused, mut refused) = (Vec::new(), 0, 0);
    for racer in racers {
        match racer.await.unwrap() {
            (next, ConsumeOutcome::Rotated(_)) => rotated.push(next),
            (_, ConsumeOutcome::Reused(_)) => reused += 1,
            (_, ConsumeOutcome::Invalid) => refused += 1,
            (_, ConsumeOutcome::Retried(_)) => panic!("no grace window: never a retry"),
        }
    }
    assert_eq!(rotated.len(), 1, "exactly one refresh succeeds");
    assert!(reused >= 1);
    assert_eq!(reused + refused, 49);
    assert_eq!(
        stores[0].rotate(&rotated[0], "fam-race.r2", NOW + 7300, NOW + 1).await.unwrap(),
        ConsumeOutcome::Invalid
    );
    let snapshot = stores[1].revoked_snapshot(NOW + 1).await.unwrap();
    assert!(snapshot.iter().any(|r| r.kind == RevocationKind::Family && r.id == "fam-race"));
    let event = within("the family's revocation event", events.recv()).await.unwrap();
    assert_eq!((event.kind, event.id.as_str()), (RevocationKind::Family, "fam-race"));
}

#[tokio::test]
async fn revocations_written_on_every_primary_reach_every_subscriber_and_the_sdk_check() {
    let cluster = RedisCluster::start();
    let (a, b) = (connect(&cluster).await, connect(&cluster).await);
    let (mut at_a, mut at_b) = (a.subscribe(), b.subscribe());
    let layout = KeyLayout::sharded("auth");
    // jtis whose deny marks live on each of the three primaries.
    let mut by_node = std::collections::BTreeMap::new();
    for i in 0.. {
        let jti = format!("jti-node-{i}");
        by_node.entry(owner(&cluster, &layout.deny_jti(&jti))).or_insert(jti);
        if by_node.len() == 3 {
            break;
        }
    }
    let mut sent = Vec::new();
    for (i, jti) in by_node.values().enumerate() {
        let r = revocation(RevocationKind::Jti, jti, NOW + 600);
        [&a, &b][i % 2].revoke(r.clone(), NOW).await.unwrap();
        sent.push(r);
    }
    let session = revocation(RevocationKind::Sid, "sid-cluster", NOW + 3600);
    b.revoke(session.clone(), NOW).await.unwrap();
    sent.push(session);
    // Each exactly once (messages from different nodes may overtake each
    // other on the cluster bus: the order is not kept).
    let want: HashSet<Revocation> = sent.iter().cloned().collect();
    for rx in [&mut at_a, &mut at_b] {
        let mut heard = HashSet::new();
        for _ in &sent {
            heard.insert(within("a revocation event", rx.recv()).await.unwrap());
        }
        assert_eq!(heard, want);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Empty)), "heard one twice");
    }
    for r in &sent[..3] {
        assert!(a.is_revoked(&r.id, None, NOW).await.unwrap());
    }
    // A jti in one shard, its session in another: both found.
    assert!(b.is_revoked("jti-never-revoked", Some("sid-cluster"), NOW).await.unwrap());
    assert!(!b.is_revoked("jti-never-revoked", Some("sid-live"), NOW).await.unwrap());

    // The SDK's per-request Redis check reads the same layout from the URL.
    let check = RedisRevocation::connect(&cluster.url(), "auth", Duration::from_secs(1)).unwrap();
    check.ready().await;
    let lookup = |jti: &str, sid: Option<&str>| match check.check(jti, sid, NOW) {
        RevocationLookup::Pending(f) => f,
        RevocationLookup::Ready(_) => panic!("redis mode looks up"),
    };
    for r in &sent[..3] {
        assert!(matches!(lookup(&r.id, None).await, Err(VerifyError::Revoked)), "{}", r.id);
    }
    assert!(matches!(lookup("jti-other", Some("sid-cluster")).await, Err(VerifyError::Revoked)));
    assert!(lookup("jti-other", Some("sid-live")).await.is_ok());
}

fn owns(node: &testkit::RedisProcess, slot: u16) -> bool {
    // CLUSTER SHARDS is 7.0+; CLUSTER NODES lists `myself` with its ranges.
    let nodes = node.command(&["CLUSTER", "NODES"]).text();
    let me = nodes.lines().find(|l| l.contains("myself")).unwrap();
    me.split_whitespace().skip(8).any(|range| match range.split_once('-') {
        Some((lo, hi)) => (lo.parse::<u16>().unwrap()..=hi.parse::<u16>().unwrap()).contains(&slot),
        None => range.parse::<u16>().ok() == Some(slot),
    })
}

// ---------------------------------------------------------------------------
// Every flow through two real auth-servers on the cluster, over mTLS.

async fn claims(srv: &TestServer, token: &str, aud: &str) -> Claims {
    let json = client(srv, "order").await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let keys = KeySet::from_jwks_json(&json).unwrap();
    Validator::new("auth-service", aud).validate(token, &keys, SystemClock.now_unix()).unwrap()
}

fn exchange_request(srv: &TestServer, subject: &str) -> ExchangeTokenRequest {
    let mut request = ExchangeTokenRequest { audience: "inventory".into(), ..Default::default() };
    (request.client_id, request.client_secret) = srv.client_credentials("order");
    request.subject_token = subject.to_owned();
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_passes_through_auth_servers_on_a_cluster() {
    let cluster = RedisCluster::start();
    let a = TestServer::builder().store_url(cluster.url()).start().await;
    let b = TestServer::builder().dev_dir(&a.dir).store_url(cluster.url()).start().await;
    let (mut ca, mut cb) = (client(&a, "order").await, client(&b, "order").await);
    let mut watch =
        client(&a, "inventory").await.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
    let first = within("the snapshot", watch.message()).await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Snapshot(_))));

    // Login at A, refresh at B (the token names its family), again at A.
    let login = ca.login(password_login(&a, "alice")).await.unwrap().into_inner();
    assert!(login.refresh_token.contains('.'), "refresh tokens are <family>.<secret>");
    let refreshed =
        cb.refresh(RefreshRequest { refresh_token: login.refresh_token.clone() }).await.unwrap().into_inner();
    let (old, new) =
        (claims(&a, &login.access_token, "order").await, claims(&a, &refreshed.access_token, "order").await);
    assert_eq!((new.sub.as_str(), &new.sid), ("alice", &old.sid));
    assert_eq!(
        login.refresh_token.split_once('.').unwrap().0,
        refreshed.refresh_token.split_once('.').unwrap().0,
        "the successor is in the same family"
    );
    let second =
        ca.refresh(RefreshRequest { refresh_token: refreshed.refresh_token.clone() }).await.unwrap().into_inner();

    // Reuse at B of the spent token revokes the family made at A.
    let err = cb.refresh(RefreshRequest { refresh_token: login.refresh_token.clone() }).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
    let err = ca.refresh(RefreshRequest { refresh_token: second.refresh_token.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the family is dead");

    // Exchange on behalf of a user, at either replica.
    let bob = cb.login(password_login(&b, "bob")).await.unwrap().into_inner();
    ca.exchange_token(exchange_request(&a, &bob.access_token)).await.unwrap();
    cb.exchange_token(exchange_request(&b, &bob.access_token)).await.unwrap();

    // Revoke a token at B: A's watcher hears it and A refuses it.
    let service = ca.exchange_token(exchange_request(&a, "")).await.unwrap().into_inner().access_token;
    let jti = claims(&a, &service, "inventory").await.jti;
    let target = revoke_request::Target::AccessToken(service.clone());
    cb.revoke(RevokeRequest { target: Some(target) }).await.unwrap();
    within("the revocation on A's watch stream", async {
        loop {
            if let Some(Event::Revoked(r)) = watch.message().await.unwrap().unwrap().event
                && r.id == jti
            {
                break;
            }
        }
    })
    .await;

    // Logout at A (by the session's refresh token): bob's tokens and
    // refresh token die at B.
    let target = revoke_request::Target::SessionRefreshToken(bob.refresh_token.clone());
    ca.revoke(RevokeRequest { target: Some(target) }).await.unwrap();
    let err = cb.refresh(RefreshRequest { refresh_token: bob.refresh_token.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "a refresh token of a logged-out session");
    within("B to refuse bob's logged-out session", async {
        while cb.exchange_token(exchange_request(&b, &bob.access_token)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let err = cb.exchange_token(exchange_request(&b, &bob.access_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Both replicas' snapshots hold the shared deny list.
    for srv in [&a, &b] {
        let mut stream =
            client(srv, "inventory").await.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
        let Some(Event::Snapshot(s)) = within("a snapshot", stream.message()).await.unwrap().unwrap().event else {
            panic!("the stream starts with a snapshot");
        };
        let ids: HashSet<String> = s.entries.into_iter().map(|e| e.id).collect();
        assert!(ids.contains(&jti) && ids.contains(bob_sid(srv, &bob.access_token).await.as_str()), "{ids:?}");
    }
    let sizes = cluster.dbsizes();
    println!("cluster after every flow: {sizes:?}");
}

async fn bob_sid(srv: &TestServer, token: &str) -> String {
    claims(srv, token, "order").await.sid.unwrap()
}

#[tokio::test]
async fn a_durable_write_on_a_cluster_runs_and_waits_on_the_slots_primary() {
    // No replicas: with `min_replicas_acked = 1` every write is applied on
    // its slot's primary and refused as not durable. A script sent to
    // another node would meet `MOVED`, which the durable pipeline does not
    // follow (its `WAIT` must run where the write ran): that would be an
    // outage error, not `NotDurable`.
    let cluster = RedisCluster::start();
    let config = RedisConfig {
        url: cluster.url(),
        command_timeout_ms: 2_000,
        min_replicas_acked: 1,
        replica_ack_timeout_ms: 100,
        ..RedisConfig::default()
    };
    let durable = RedisStore::connect(&config).await.unwrap();
    let plain = connect(&cluster).await;
    let layout = KeyLayout::sharded("auth");
    let mut nodes = HashSet::new();
    for i in 0..12 {
        let jti = format!("jti-durable-{i}");
        nodes.insert(owner(&cluster, &layout.deny_jti(&jti)));
        match durable.revoke(revocation(RevocationKind::Jti, &jti, NOW + 600), NOW).await {
            Err(auth_server::store::StoreError::NotDurable { acked: 0, wanted: 1 }) => {}
            other => panic!("{jti}: expected NotDurable, got {other:?}"),
        }
        assert!(plain.is_revoked(&jti, None, NOW).await.unwrap(), "{jti}: applied on its primary");
    }
    assert_eq!(nodes.len(), 3, "the writes went to every primary");
    let family = revocation(RevocationKind::Family, "fam-durable", NOW + 600);
    assert!(matches!(durable.revoke(family, NOW).await, Err(auth_server::store::StoreError::NotDurable { .. })));
}

#[tokio::test]
async fn a_cluster_write_waits_for_its_own_primarys_replica() {
    // One replica per primary. A write is acknowledged once its slot's
    // primary's replica has it; with that replica stopped it is refused,
    // while a write to another primary still goes through. A `WAIT` sent to
    // another node would count that node's replica and acknowledge it.
    let cluster = RedisCluster::start_with_replicas(1);
    let config = RedisConfig {
        url: cluster.url(),
        command_timeout_ms: 3_000,
        min_replicas_acked: 1,
        replica_ack_timeout_ms: 1_000,
        ..RedisConfig::default()
    };
    let store = RedisStore::connect(&config).await.unwrap();
    let layout = KeyLayout::sharded("auth");
    let jti_on = |port: u16| {
        (0..).map(|i| format!("jti-wait-{i}")).find(|j| owner(&cluster, &layout.deny_jti(j)) == port).unwrap()
    };
    let (first, second) = (cluster.nodes()[0].port(), cluster.nodes()[1].port());
    let (x, y) = (jti_on(first), jti_on(second));
    store.revoke(revocation(RevocationKind::Jti, &x, NOW + 600), NOW).await.unwrap();

    let replicas = cluster.replicas_of(first);
    assert_eq!(replicas.len(), 1, "one replica per primary");
    replicas[0].pause();
    let stalled = store.revoke(revocation(RevocationKind::Jti, &x, NOW + 900), NOW).await;
    let other = store.revoke(revocation(RevocationKind::Jti, &y, NOW + 600), NOW).await;
    replicas[0].resume();
    assert!(
        matches!(stalled, Err(auth_server::store::StoreError::NotDurable { acked: 0, wanted: 1 })),
        "its primary's replica stopped: {stalled:?}"
    );
    other.expect("another primary's replica acknowledges its own writes");
}
