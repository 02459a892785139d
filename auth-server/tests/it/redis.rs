//! The Redis store against a real `redis-server` (started per test on a free
//! port), and auth-server replicas sharing one Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use auth_server::config::{Config, Overrides, RedisConfig, RedisLayout};
use auth_server::server::Server;
use auth_server::store::conformance::{self, Rotate as _, refresh_record};
use auth_server::store::{ConsumeOutcome, IssuedToken, RedisStore, Revocation, RevocationKind, Store, StoreError};
use service_sdk::redis_layout::KeyLayout;
use testkit::RedisProcess;
use tokio::sync::broadcast;

use crate::within;

// The store-level tests pass the suite's `NOW` (Redis TTLs are relative to
// it, so any value works).
use conformance::NOW;

fn redis_config(redis: &RedisProcess) -> RedisConfig {
    RedisConfig { url: redis.url(), command_timeout_ms: 500, ..RedisConfig::default() }
}

async fn connect(redis: &RedisProcess) -> RedisStore {
    RedisStore::connect(&redis_config(redis)).await.unwrap()
}

async fn next_event(rx: &mut broadcast::Receiver<Revocation>) -> Revocation {
    within("a revocation event", rx.recv()).await.unwrap()
}

/// Polls `ping` until the store (and its subscriber) is back.
async fn until_ready(store: &dyn Store) {
    within("the store to reconnect", async {
        while store.ping().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

fn revocation(kind: RevocationKind, id: &str, expires_at: u64) -> Revocation {
    Revocation { kind, id: id.into(), expires_at }
}

fn as_set(revocations: Vec<Revocation>) -> HashSet<Revocation> {
    revocations.into_iter().collect()
}

#[tokio::test]
async fn redis_store_passes_the_store_conformance_suite() {
    let redis = RedisProcess::start();
    let store = connect(&redis).await;
    assert_eq!(store.name(), "redis");
    store.ping().await.unwrap();
    conformance::run_all(&store).await.unwrap();
    // A second deployment on the same Redis passes it too, untouched by the
    // first one's entries.
    let green = RedisStore::connect(&RedisConfig { prefix: "green".into(), ..redis_config(&redis) }).await.unwrap();
    conformance::run_all(&green).await.unwrap();
}

/// Fifty presentations of `rt-0` at once, alternating between the two
/// stores, each committing its own successor `rt-1-<i>` with a reuse grace
/// window of `grace` seconds; the successors and outcomes, in racer order.
async fn race_fifty(stores: &[Arc<RedisStore>; 2], grace: u64) -> Vec<(String, ConsumeOutcome)> {
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let racers: Vec<_> = (0..50)
        .map(|i| {
            let store = Arc::clone(&stores[i % 2]);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                let next = format!("rt-1-{i}");
                let outcome = store.rotate_with_grace("rt-0", &next, NOW + 7200, NOW, grace).await.unwrap();
                (next, outcome)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_refreshes_rotate_exactly_once_and_revoke_the_family() {
    let redis = RedisProcess::start();
    // Two replicas' stores racing on one token.
    let stores = [Arc::new(connect(&redis).await), Arc::new(connect(&redis).await)];
    stores[0].put_refresh("rt-0", &refresh_record("fam-race", "sid-race", NOW + 3600), NOW).await.unwrap();
    let mut events = stores[1].subscribe();

    let (mut rotated, mut reused, mut refused) = (Vec::new(), 0, 0);
    for outcome in race_fifty(&stores, 0).await {
        match outcome {
            (next, ConsumeOutcome::Rotated(record)) => {
                assert_eq!(record, refresh_record("fam-race", "sid-race", NOW + 3600));
                rotated.push(next);
            }
            (_, ConsumeOutcome::Reused(_)) => reused += 1,
            // Once a reuse has revoked the family, the token is just invalid.
            (_, ConsumeOutcome::Invalid) => refused += 1,
            (_, ConsumeOutcome::Retried(_)) => panic!("no grace window: a second presentation is never a retry"),
        }
    }
    assert_eq!(rotated.len(), 1, "exactly one refresh succeeds");
    assert!(reused >= 1, "the first loser is detected as a reuse");
    assert_eq!(reused + refused, 49);

    // The family is revoked: the winner's successor is dead too.
    assert_eq!(stores[0].rotate(&rotated[0], "rt-2", NOW + 7300, NOW + 1).await.unwrap(), ConsumeOutcome::Invalid);
    let snapshot = stores[1].revoked_snapshot(NOW + 1).await.unwrap();
    assert!(snapshot.iter().any(|r| r.kind == RevocationKind::Family && r.id == "fam-race"));
    let event = next_event(&mut events).await;
    assert_eq!((event.kind, event.id.as_str()), (RevocationKind::Family, "fam-race"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_refreshes_in_the_grace_window_leave_exactly_one_live_successor() {
    let redis = RedisProcess::start();
    let stores = [Arc::new(connect(&redis).await), Arc::new(connect(&redis).await)];
    stores[0].put_refresh("rt-0", &refresh_record("fam-grace", "sid-grace", NOW + 3600), NOW).await.unwrap();
    let mut issued = Vec::new();
    for outcome in race_fifty(&stores, 10).await {
        match outcome {
            (next, ConsumeOutcome::Rotated(_) | ConsumeOutcome::Retried(_)) => issued.push(next),
            (_, other) => panic!("within the window every presentation is a retry: {other:?}"),
        }
    }
    assert_eq!(issued.len(), 50);
    // Of the successors handed out, exactly one is live.
    let mut live = 0;
    for (i, next) in issued.iter().enumerate() {
        match stores[i % 2].rotate(next, &format!("rt-2-{i}"), NOW + 7300, NOW + 1).await.unwrap() {
            ConsumeOutcome::Rotated(_) => live += 1,
            ConsumeOutcome::Invalid => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(live, 1, "exactly one live member of the family");
    let snapshot = stores[1].revoked_snapshot(NOW + 1).await.unwrap();
    assert!(!snapshot.iter().any(|r| r.id == "fam-grace"), "the family is not revoked");
}

#[tokio::test]
async fn revocation_reaches_every_replica_subscriber_exactly_once() {
    let redis = RedisProcess::start();
    let a = connect(&redis).await;
    let b = connect(&redis).await;
    let mut at_a = a.subscribe();
    let mut at_b = b.subscribe();

    let first = revocation(RevocationKind::Jti, "jti-pub", NOW + 600);
    let second = revocation(RevocationKind::Sid, "sid-pub", NOW + 3600);
    a.revoke(first.clone(), NOW).await.unwrap();
    b.revoke(second.clone(), NOW).await.unwrap();
    // A reuse detected at B is published too.
    b.put_refresh("rt-p1", &refresh_record("fam-pub", "sid-p", NOW + 3600), NOW).await.unwrap();
    b.rotate("rt-p1", "rt-p2", NOW + 7200, NOW).await.unwrap();
    assert_eq!(
        b.rotate("rt-p1", "rt-p3", NOW + 7200, NOW).await.unwrap(),
        ConsumeOutcome::Reused(refresh_record("fam-pub", "sid-p", NOW + 3600))
    );
    let third = revocation(RevocationKind::Family, "fam-pub", NOW + 7200);

    for rx in [&mut at_a, &mut at_b] {
        // In order, and the replica's own revocation exactly once.
        assert_eq!(next_event(rx).await, first);
        assert_eq!(next_event(rx).await, second);
        assert_eq!(next_event(rx).await, third);
        assert!(matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Empty)));
    }
}

/// A replica whose `redis.layout` differs from the layout the Redis already
/// holds (recorded in the layout marker by the first replica) refuses to
/// start, naming both layouts and the setting to change: two layouts on one
/// prefix would split the state and hide revocations.
#[tokio::test]
async fn a_replica_with_another_layout_refuses_to_start_and_says_which() {
    let redis = RedisProcess::start();
    let single = connect(&redis).await;
    assert_eq!(redis.command(&["GET", "{auth}:layout"]).text(), "single|1", "auto on a plain URL");
    let sharded = RedisConfig { layout: RedisLayout::Sharded, ..redis_config(&redis) };
    let err = RedisStore::connect(&sharded).await.unwrap_err();
    let StoreError::LayoutMismatch { configured, found, marker } = &err else { panic!("{err}") };
    assert_eq!((*configured, found.as_str(), marker.as_str()), ("sharded", "single|1", "{auth}:layout"));
    let text = err.to_string();
    assert!(text.contains("redis.layout gives \"sharded\"") && text.contains("holds \"single|1\""), "{text}");

    // Through the server: it does not start, and says why.
    let dir = tempfile::tempdir().unwrap();
    let env = auth_server::dev::ensure(dir.path()).unwrap();
    let url = redis.url();
    let config = Config::load_with(&env.config_path, &Overrides::default(), |raw| {
        raw.store = url;
        raw.redis.layout = RedisLayout::Sharded;
    })
    .unwrap();
    let Err(err) = Server::builder(config).build().await else { panic!("a replica of another layout started") };
    assert!(err.to_string().contains("redis key layout mismatch: redis.layout gives \"sharded\""), "{err}");

    // The first replica is untouched, and the marker too; another prefix is
    // another deployment, free to use the other layout.
    single.ping().await.unwrap();
    assert_eq!(redis.command(&["GET", "{auth}:layout"]).text(), "single|1");
    let green = RedisStore::connect(&RedisConfig { prefix: "green".into(), ..sharded }).await.unwrap();
    green.ping().await.unwrap();
    assert_eq!(redis.command(&["GET", "{green}:layout"]).text(), "sharded|1");
}

/// A store that started while Redis did not answer claims the layout marker
/// before its first command, and readiness claims it again: a marker lost
/// (a flush, a failover) is written back, and one replaced by another
/// layout's makes every call and readiness fail.
#[tokio::test]
async fn the_layout_marker_is_checked_before_the_first_command_and_by_readiness() {
    let redis = RedisProcess::start();
    redis.command(&["SET", "{auth}:layout", "single|1"]);
    // Not answering (SIGSTOP) while the store starts: it starts unchecked.
    redis.pause();
    let store =
        RedisStore::connect(&RedisConfig { layout: RedisLayout::Sharded, ..redis_config(&redis) }).await.unwrap();
    redis.resume();
    until_connected(&store).await;
    let err = store.revoke(revocation(RevocationKind::Jti, "jti-m", NOW + 600), NOW).await.unwrap_err();
    assert!(matches!(err, StoreError::LayoutMismatch { configured: "sharded", .. }), "{err}");
    assert!(matches!(store.is_revoked("jti-m", None, NOW).await, Err(StoreError::LayoutMismatch { .. })));
    assert!(matches!(store.ping().await, Err(StoreError::LayoutMismatch { .. })));
    // Nothing was written in either layout.
    assert_eq!(redis.command(&["DBSIZE"]).int(), 1);

    // With the marker gone (a flush), readiness writes it back.
    redis.command(&["FLUSHALL"]);
    until_ready(&store).await;
    assert_eq!(redis.command(&["GET", "{auth}:layout"]).text(), "sharded|1");
    store.revoke(revocation(RevocationKind::Jti, "jti-m", NOW + 600), NOW).await.unwrap();
    assert!(store.is_revoked("jti-m", None, NOW).await.unwrap());
    // Replaced under a running store: not ready, and calls are refused.
    redis.command(&["SET", "{auth}:layout", "single|1"]);
    assert!(matches!(store.ping().await, Err(StoreError::LayoutMismatch { .. })));
    assert!(matches!(store.is_revoked("jti-m", None, NOW).await, Err(StoreError::LayoutMismatch { .. })));
}

/// Revocations of one layout written before the layout marker existed
/// (no marker, say, after an upgrade): a replica of the other layout finds
/// their keys and refuses to start, leaving the marker absent, rather than
/// claiming it and hiding them; a replica of their layout claims it. Both
/// ways round: the single-slot layout's keys share the marker's slot (the
/// claim script sees them), the sharded layout's deny shards do not (the
/// claim looks before it writes).
#[tokio::test]
async fn without_a_marker_a_replica_finds_the_other_layouts_revocations_and_refuses_to_start() {
    let redis = RedisProcess::start();
    for (prefix, written, other) in
        [("auth", RedisLayout::Single, RedisLayout::Sharded), ("green", RedisLayout::Sharded, RedisLayout::Single)]
    {
        let config = RedisConfig { prefix: prefix.into(), ..redis_config(&redis) };
        let marker = KeyLayout::marker_key(prefix);
        let before = RedisStore::connect(&RedisConfig { layout: written, ..config.clone() }).await.unwrap();
        before.revoke(revocation(RevocationKind::Sid, "sid-old", NOW + 600), NOW).await.unwrap();
        drop(before);
        // As a store of a version without the marker left it.
        redis.command(&["DEL", &marker]);

        let err = RedisStore::connect(&RedisConfig { layout: other, ..config.clone() }).await.unwrap_err();
        let StoreError::UnmarkedLayout { configured, found, key, marker: named } = &err else { panic!("{err}") };
        let layout = if written == RedisLayout::Single { KeyLayout::new(prefix) } else { KeyLayout::sharded(prefix) };
        assert_eq!(
            (*found, *configured, key.as_str(), named.as_str()),
            (
                layout.name(),
                if layout.is_sharded() { "single" } else { "sharded" },
                &*layout.deny_sid("sid-old"),
                &*marker
            ),
            "{prefix}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("holds keys of the {:?} layout", layout.name())), "{text}");
        assert_eq!(redis.command(&["EXISTS", &marker]).int(), 0, "{prefix}: the marker stays absent");

        // The layout the revocations follow claims the marker, and sees them.
        let store = RedisStore::connect(&RedisConfig { layout: written, ..config }).await.unwrap();
        assert_eq!(redis.command(&["GET", &marker]).text(), layout.marker_value());
        assert!(store.is_revoked("jti-x", Some("sid-old"), NOW).await.unwrap(), "{prefix}");
    }
}

/// A store on `primary` whose writes wait for one replica's acknowledgement.
fn acked_by_one_replica(primary: &RedisProcess) -> RedisConfig {
    RedisConfig {
        // Generous: a busy test host may delay the replica's ack.
        command_timeout_ms: 3_000,
        min_replicas_acked: 1,
        replica_ack_timeout_ms: 500,
        ..redis_config(primary)
    }
}

/// With `min_replicas_acked`, the marker's claim goes through the durable
/// write path: while no replica acknowledges it, the store is not ready
/// (readiness claims it again, `NotDurable`), though calls go on (each
/// durable write waits for its own replicas); once the replica has it, the
/// store is ready, and the marker is on the replica.
#[tokio::test]
async fn the_layout_marker_claim_waits_for_replicas_and_readiness_with_it() {
    let primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    let config = acked_by_one_replica(&primary);
    replica.pause();
    let store = RedisStore::connect(&config).await.unwrap();
    assert!(matches!(store.ping().await, Err(StoreError::NotDurable { acked: 0, wanted: 1 })), "not ready");
    assert!(!store.is_revoked("jti-d", None, NOW).await.unwrap(), "calls go on");
    assert!(matches!(
        store.revoke(revocation(RevocationKind::Jti, "jti-d", NOW + 600), NOW).await,
        Err(StoreError::NotDurable { .. })
    ));
    replica.resume();
    until_ready(&store).await;
    assert_eq!(replica.command(&["GET", "{auth}:layout"]).text(), "single|1");
    store.revoke(revocation(RevocationKind::Jti, "jti-d", NOW + 600), NOW).await.unwrap();
    // Acknowledged once: readiness only reads it now, replica or not.
    replica.pause();
    let ready = store.ping().await;
    replica.resume();
    ready.unwrap();
}

#[tokio::test]
async fn a_lost_layout_marker_is_not_durable_again_until_a_claim_is_acknowledged() {
    let primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    let config = acked_by_one_replica(&primary);
    let store = RedisStore::connect(&config).await.unwrap();
    until_ready(&store).await;
    // Acknowledged once; then the marker is lost (a flush, a failover) and
    // the replica stops answering.
    primary.command(&["DEL", "{auth}:layout"]);
    replica.pause();
    // The first check writes the marker back, unacknowledged; the second
    // finds it on the primary only: neither is ready.
    let first = store.ping().await;
    let second = store.ping().await;
    replica.resume();
    assert!(matches!(first, Err(StoreError::NotDurable { acked: 0, wanted: 1 })), "rewritten: {first:?}");
    assert!(matches!(second, Err(StoreError::NotDurable { acked: 0, wanted: 1 })), "on the primary only: {second:?}");
    assert_eq!(primary.command(&["GET", "{auth}:layout"]).text(), "single|1");
    until_ready(&store).await;
    assert_eq!(replica.command(&["GET", "{auth}:layout"]).text(), "single|1");
}

/// Polls until a store call gets an answer from Redis (any but an outage).
async fn until_connected(store: &RedisStore) {
    within("the store to reconnect", async {
        while matches!(store.is_revoked("jti-probe", None, NOW).await, Err(StoreError::Unavailable(_))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn prefixes_keep_deployments_apart() {
    let redis = RedisProcess::start();
    let blue = connect(&redis).await;
    let green = RedisStore::connect(&RedisConfig { prefix: "green".into(), ..redis_config(&redis) }).await.unwrap();
    let mut green_events = green.subscribe();
    blue.revoke(revocation(RevocationKind::Jti, "shared-jti", NOW + 600), NOW).await.unwrap();
    green.revoke(revocation(RevocationKind::Jti, "green-jti", NOW + 600), NOW).await.unwrap();
    assert!(blue.is_revoked("shared-jti", None, NOW).await.unwrap());
    assert!(!green.is_revoked("shared-jti", None, NOW).await.unwrap());
    assert!(green.revoked_snapshot(NOW).await.unwrap().iter().all(|r| r.id != "shared-jti"));
    assert_eq!(next_event(&mut green_events).await.id, "green-jti", "blue's revocation is not on green's channel");
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
    match result {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("{what} with Redis down: expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn redis_down_answers_unavailable_then_recovers_with_nothing_lost() {
    let mut redis = RedisProcess::start_with_aof();
    let store = connect(&redis).await;
    let mut events = store.subscribe();
    let mut feed = store.feed_state();
    let connected = *feed.borrow_and_update();
    assert!(connected.live, "connected and subscribed: live");
    let before = revocation(RevocationKind::Jti, "jti-before", NOW + 600);
    store.revoke(before.clone(), NOW).await.unwrap();
    store.put_refresh("rt-k1", &refresh_record("fam-k", "sid-k", NOW + 3600), NOW).await.unwrap();
    assert_eq!(next_event(&mut events).await, before);

    redis.kill();
    within("the feed to stop being live", feed.wait_for(|s| !s.live)).await.unwrap();
    let token = IssuedToken { sub: "alice".into(), sid: None, exp: NOW + 600 };
    assert_unavailable("ping", store.ping().await);
    assert_unavailable("record_issued", store.record_issued("jti-down", &token, NOW).await);
    assert_unavailable("issued", store.issued("jti-before", NOW).await);
    assert_unavailable("is_revoked", store.is_revoked("jti-before", None, NOW).await);
    let during = revocation(RevocationKind::Jti, "jti-during", NOW + 600);
    assert_unavailable("revoke", store.revoke(during, NOW).await);
    assert_unavailable("put_refresh", store.put_refresh("rt-z", &refresh_record("f", "s", NOW + 60), NOW).await);
    assert_unavailable("refresh_record", store.refresh_record("rt-k1", NOW).await);
    assert_unavailable("commit_refresh", store.rotate("rt-k1", "rt-k2", NOW + 7200, NOW).await);
    assert_unavailable("revoked_snapshot", store.revoked_snapshot(NOW).await);

    redis.restart();
    until_ready(&store).await;
    // Acknowledged state survived the SIGKILL; the unacknowledged revocation
    // was never written.
    assert!(store.is_revoked("jti-before", None, NOW).await.unwrap());
    assert!(!store.is_revoked("jti-during", None, NOW).await.unwrap());
    assert!(matches!(store.rotate("rt-k1", "rt-k2", NOW + 7200, NOW).await.unwrap(), ConsumeOutcome::Rotated(_)));
    // The subscriber is back, live in a new epoch (messages may have been
    // missed), and streams new revocations.
    let back = *within("the feed to be live again", feed.wait_for(|s| s.live)).await.unwrap();
    assert!(back.epoch > connected.epoch, "{back:?} after {connected:?}");
    let after = revocation(RevocationKind::Sid, "sid-after", NOW + 600);
    store.revoke(after.clone(), NOW).await.unwrap();
    within("the post-restart revocation", async {
        loop {
            if next_event(&mut events).await == after {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn aof_revocations_and_spent_tokens_survive_sigkill() {
    let mut redis = RedisProcess::start_with_aof();
    {
        let store = connect(&redis).await;
        store.revoke(revocation(RevocationKind::Jti, "jti-aof", NOW + 600), NOW).await.unwrap();
        store.revoke(revocation(RevocationKind::Sid, "sid-aof", NOW + 3600), NOW).await.unwrap();
        store.put_refresh("rt-aof1", &refresh_record("fam-aof", "sid-live", NOW + 3600), NOW).await.unwrap();
        assert!(matches!(
            store.rotate("rt-aof1", "rt-aof2", NOW + 7200, NOW).await.unwrap(),
            ConsumeOutcome::Rotated(_)
        ));
    }
    redis.kill();
    redis.restart();

    let store = connect(&redis).await;
    assert!(store.is_revoked("jti-aof", None, NOW).await.unwrap());
    assert!(store.is_revoked("other", Some("sid-aof"), NOW).await.unwrap());
    let snapshot = as_set(store.revoked_snapshot(NOW).await.unwrap());
    assert!(snapshot.contains(&revocation(RevocationKind::Jti, "jti-aof", NOW + 600)));
    assert!(snapshot.contains(&revocation(RevocationKind::Sid, "sid-aof", NOW + 3600)));
    // The spent flag survived too: presenting the old token is a reuse.
    assert_eq!(
        store.rotate("rt-aof1", "rt-aof3", NOW + 7200, NOW).await.unwrap(),
        ConsumeOutcome::Reused(refresh_record("fam-aof", "sid-live", NOW + 3600))
    );
}

#[tokio::test]
async fn a_store_started_while_redis_is_down_becomes_ready_when_it_comes_up() {
    let mut redis = RedisProcess::start();
    redis.kill();
    let store = connect(&redis).await;
    assert_unavailable("ping", store.ping().await);
    assert_unavailable("is_revoked", store.is_revoked("j", None, NOW).await);
    redis.restart();
    until_ready(&store).await;
    let mut events = store.subscribe();
    let r = revocation(RevocationKind::Jti, "jti-late", NOW + 600);
    store.revoke(r.clone(), NOW).await.unwrap();
    assert_eq!(next_event(&mut events).await, r);
}

#[tokio::test]
async fn revoked_live_token_costs_at_most_200_bytes_of_redis_memory() {
    const TOKENS: usize = 1000;
    let redis = RedisProcess::start();
    let store = connect(&redis).await;
    // Realistic sizes: 128-bit ids in base64url (22 characters).
    let id = |tag: &str, i: usize| format!("{tag}{i:0>20}");
    for i in 0..TOKENS {
        let token = IssuedToken { sub: "alice".into(), sid: Some(id("S-", i % 10)), exp: NOW + 900 };
        store.record_issued(&id("J-", i), &token, NOW).await.unwrap();
    }
    let usage = |key: &str| redis.command(&["MEMORY", "USAGE", key, "SAMPLES", "0"]).int();
    let layout = KeyLayout::new(&redis_config(&redis).prefix);
    let registry: i64 = (0..TOKENS).map(|i| usage(&layout.issued(&id("J-", i)))).sum();
    for i in 0..TOKENS {
        store.revoke(revocation(RevocationKind::Jti, &id("J-", i), NOW + 900), NOW).await.unwrap();
    }
    let revoked_registry: i64 = (0..TOKENS).map(|i| usage(&layout.issued(&id("J-", i)))).sum();
    let minute = (NOW + 900) / 60;
    let buckets: i64 =
        layout.deny_shards().iter().map(|shard| usage(&shard.jti_bucket(minute)) + usage(shard.jti_index())).sum();
    let live = registry as f64 / TOKENS as f64;
    let revoked = (revoked_registry + buckets) as f64 / TOKENS as f64;
    println!("redis memory per live token: {live:.0} B; per revoked live token: {revoked:.0} B");
    assert!(revoked <= 200.0, "a revoked live token costs {revoked:.0} bytes");
}

// ---------------------------------------------------------------------------
// Two auth-server replicas on one Redis, over gRPC with mTLS.

pub(crate) mod replicas {
    use auth_proto::auth::v1::auth_client::AuthClient;
    use auth_proto::auth::v1::revocation_event::Event;
    use auth_proto::auth::v1::{
        ExchangeTokenRequest, LoginRequest, PasswordGrant, RefreshRequest, RevocationKind as PbKind, RevokeRequest,
        TokenResponse, WatchRevocationsRequest, login_request, revoke_request,
    };
    use auth_server::clock::{Clock, SystemClock};
    use service_sdk::{Claims, KeySet, Validator};
    use testkit::{RedisProcess, TestServer};
    use tonic::transport::Channel;
    use tonic::{Code, Streaming};

    use super::within;

    /// Two replicas sharing the dev environment (PKI, signing key, accounts)
    /// and one Redis.
    async fn two_replicas(redis: &RedisProcess) -> (TestServer, TestServer) {
        let a =
            TestServer::builder().store_url(redis.url()).configure(|c| c.redis.command_timeout_ms = 500).start().await;
        let b = TestServer::builder()
            .dev_dir(&a.dir)
            .store_url(redis.url())
            .configure(|c| c.redis.command_timeout_ms = 500)
            .start()
            .await;
        (a, b)
    }

    /// An Auth client of `srv` as dev client `name`, over mTLS.
    pub(crate) async fn client(srv: &TestServer, name: &str) -> AuthClient<Channel> {
        AuthClient::new(srv.channel(name).await)
    }

    /// A password Login of dev user `user` for audience `order`.
    pub(crate) fn password_login(srv: &TestServer, user: &str) -> LoginRequest {
        let (username, password) = srv.user_password(user);
        LoginRequest {
            grant: Some(login_request::Grant::Password(PasswordGrant { username, password })),
            audience: vec!["order".into()],
            scope: vec![],
        }
    }

    async fn login(srv: &TestServer, user: &str) -> TokenResponse {
        client(srv, "order").await.login(password_login(srv, user)).await.unwrap().into_inner()
    }

    async fn claims(srv: &TestServer, token: &str) -> Claims {
        let mut c = client(srv, "order").await;
        let json = c.get_jwks(auth_proto::auth::v1::GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
        let keys = KeySet::from_jwks_json(&json).unwrap();
        Validator::new("auth-service", "order").validate(token, &keys, SystemClock.now_unix()).unwrap()
    }

    fn refresh(token: &str) -> RefreshRequest {
        RefreshRequest { refresh_token: token.into() }
    }

    async fn watch(srv: &TestServer) -> Streaming<auth_proto::auth::v1::RevocationEvent> {
        let mut stream =
            client(srv, "inventory").await.watch_revocations(WatchRevocationsRequest {}).await.unwrap().into_inner();
        let first = within("the snapshot", stream.message()).await.unwrap().unwrap();
        assert!(matches!(first.event, Some(Event::Snapshot(_))), "the stream starts with a snapshot");
        stream
    }

    /// Reads the stream until a revocation of `id` arrives (skipping
    /// heartbeats and other revocations).
    async fn until_revoked(stream: &mut Streaming<auth_proto::auth::v1::RevocationEvent>, id: &str) -> PbKind {
        within("the revocation on the watch stream", async {
            loop {
                let event = stream.message().await.unwrap().expect("stream ended");
                if let Some(Event::Revoked(r)) = event.event
                    && r.id == id
                {
                    return r.kind();
                }
            }
        })
        .await
    }

    async fn ready(srv: &TestServer) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(srv.http_addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.starts_with("HTTP/1.1 200")
    }

    #[tokio::test]
    async fn token_issued_at_one_replica_is_refreshed_at_the_other() {
        let redis = RedisProcess::start();
        let (a, b) = two_replicas(&redis).await;
        let first = login(&a, "alice").await;
        let second = client(&b, "order").await.refresh(refresh(&first.refresh_token)).await.unwrap().into_inner();
        let (old, new) = (claims(&a, &first.access_token).await, claims(&a, &second.access_token).await);
        assert_eq!((new.sub.as_str(), &new.sid), ("alice", &old.sid), "same user, same session");
        // And back at A: the successor B stored is live there.
        client(&a, "order").await.refresh(refresh(&second.refresh_token)).await.unwrap();
    }

    #[tokio::test]
    async fn reuse_at_one_replica_revokes_the_family_made_at_the_other() {
        let redis = RedisProcess::start();
        let (a, b) = two_replicas(&redis).await;
        let first = login(&b, "alice").await;
        let second = client(&b, "order").await.refresh(refresh(&first.refresh_token)).await.unwrap().into_inner();
        let reuse = client(&a, "order").await.refresh(refresh(&first.refresh_token)).await.unwrap_err();
        assert_eq!(reuse.code(), Code::Unauthenticated);
        assert_eq!(reuse.message(), "refresh token reused; its family is revoked");
        let err = client(&b, "order").await.refresh(refresh(&second.refresh_token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "the successor made at B is dead");
    }

    #[tokio::test]
    async fn revocation_at_one_replica_reaches_a_watcher_on_the_other() {
        let redis = RedisProcess::start();
        let (a, b) = two_replicas(&redis).await;
        let mut at_a = watch(&a).await;
        let alice = login(&b, "alice").await;
        let jti = claims(&b, &alice.access_token).await.jti;
        let target = revoke_request::Target::AccessToken(alice.access_token.clone());
        client(&b, "order").await.revoke(RevokeRequest { target: Some(target) }).await.unwrap();
        assert_eq!(until_revoked(&mut at_a, &jti).await, PbKind::Jti);

        // A fresh watcher on A sees it in its snapshot; A refuses the token.
        let mut fresh = client(&a, "inventory").await.watch_revocations(WatchRevocationsRequest {}).await.unwrap();
        let Some(Event::Snapshot(snapshot)) = fresh.get_mut().message().await.unwrap().unwrap().event else {
            panic!("the stream starts with a snapshot");
        };
        assert!(snapshot.entries.iter().any(|r| r.id == jti));
        let mut exchange = ExchangeTokenRequest { audience: "inventory".into(), ..Default::default() };
        (exchange.client_id, exchange.client_secret) = a.client_credentials("order");
        exchange.subject_token = alice.access_token;
        let err = client(&a, "order").await.exchange_token(exchange).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn redis_outage_fails_closed_and_unready_then_recovers() {
        let mut redis = RedisProcess::start_with_aof();
        let (a, b) = two_replicas(&redis).await;
        let alice = login(&a, "alice").await;
        let revoked = login(&a, "alice").await;
        let target = revoke_request::Target::AccessToken(revoked.access_token.clone());
        client(&a, "order").await.revoke(RevokeRequest { target: Some(target) }).await.unwrap();
        assert!(ready(&a).await && ready(&b).await);

        redis.kill();
        let mut c = client(&b, "order").await;
        // /readyz answers from a ping at most `limits.readyz_cache_ms` old.
        within("readiness false while Redis is down", async {
            while ready(&a).await || ready(&b).await {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        let target = revoke_request::Target::AccessToken(alice.access_token.clone());
        let err = c.revoke(RevokeRequest { target: Some(target) }).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "a revocation that was not written is never acknowledged");
        let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        let err = c.login(password_login(&b, "bob")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "login fails closed");
        let mut exchange = ExchangeTokenRequest { audience: "inventory".into(), ..Default::default() };
        (exchange.client_id, exchange.client_secret) = b.client_credentials("order");
        exchange.subject_token = alice.access_token.clone();
        // A subject token is checked against B's own deny set, which
        // fails closed once B's subscriber finds Redis gone.
        within("B's deny set to stop vouching", async {
            while b.core().revocations.is_current() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        let err = c.exchange_token(exchange.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "exchange fails closed");
        let mut own = exchange.clone();
        own.subject_token.clear();
        c.exchange_token(own).await.expect("a service acting as itself needs no store");

        redis.restart();
        within("readiness after Redis is back", async {
            while !(ready(&a).await && ready(&b).await && b.core().revocations.is_current()) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
        // Nothing lost: the earlier revocation holds, the failed one never
        // happened, and every flow works again.
        let mut revoked_exchange = exchange.clone();
        revoked_exchange.subject_token = revoked.access_token;
        let err = c.exchange_token(revoked_exchange).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        c.exchange_token(exchange).await.unwrap();
        c.refresh(refresh(&alice.refresh_token)).await.unwrap();
        c.login(password_login(&b, "bob")).await.unwrap();
    }
}

/// A deny list far larger than one command should carry: 400,000 revoked
/// `jti`s over an hour of minute buckets and 25,000 revoked sessions,
/// written straight into the layout's keys.
const LARGE_JTIS: usize = 400_000;
const LARGE_SIDS: usize = 25_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_deny_list_is_read_in_short_commands_within_the_command_timeout() {
    let redis = RedisProcess::start();
    let layout = KeyLayout::new("auth");
    let shard = &layout.deny_shards()[0];
    // As the revoke script writes them: `<seconds into the minute>|<jti>`
    // in the bucket of the deny-until minute, the minute in the index, and
    // sessions scored by deny-until.
    let fill = r"
        local now, n, sids = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
        for i = 1, n do
          local until_ = now + 120 + (i % 3600)
          local m = math.floor(until_ / 60)
          redis.call('RPUSH', ARGV[4] .. m, (until_ % 60) .. '|' .. string.format('jti-%09d', i))
          redis.call('ZADD', ARGV[5], m, m)
        end
        for i = 1, sids do
          redis.call('ZADD', ARGV[6], now + 600 + i, string.format('sid-%09d', i))
        end
        return n + sids";
    let (now, n, sids) = (NOW.to_string(), LARGE_JTIS.to_string(), LARGE_SIDS.to_string());
    let reply = redis.command(&[
        "EVAL",
        fill,
        "0",
        &now,
        &n,
        &sids,
        shard.jti_bucket_prefix(),
        shard.jti_index(),
        shard.sessions(),
    ]);
    assert_eq!(reply.int(), (LARGE_JTIS + LARGE_SIDS) as i64);

    // Each command must fit a short timeout: reading the whole list in one
    // script takes longer than that, and holds Redis meanwhile.
    let store = RedisStore::connect(&RedisConfig { command_timeout_ms: 250, ..redis_config(&redis) }).await.unwrap();
    let snapshot =
        store.revoked_snapshot(NOW).await.expect("the snapshot is read in commands that each fit the timeout");
    let count = |kind| snapshot.iter().filter(|r| r.kind == kind).count();
    assert_eq!((count(RevocationKind::Jti), count(RevocationKind::Sid)), (LARGE_JTIS, LARGE_SIDS));
    for probe in [1, LARGE_JTIS / 2, LARGE_JTIS] {
        let id = format!("jti-{probe:09}");
        let r = snapshot.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(r.expires_at, NOW + 120 + (probe % 3600) as u64);
    }
    assert!(snapshot.iter().any(|r| r.id == format!("sid-{LARGE_SIDS:09}")), "the last page of sessions");
}
