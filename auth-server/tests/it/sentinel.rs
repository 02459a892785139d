//! Durability with replicas (`redis.min_replicas_acked`, `WAIT`) and
//! Sentinel failover: a real primary, a real replica and three real
//! sentinels, all started by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use auth_proto::auth::v1::auth_client::AuthClient;
use auth_proto::auth::v1::revocation_event::Event;
use auth_proto::auth::v1::{
    ExchangeTokenRequest, GetJwksRequest, LoginRequest, PasswordGrant, RevokeRequest, WatchRevocationsRequest,
    login_request, revoke_request,
};
use auth_server::clock::{Clock as _, SystemClock};
use auth_server::config::RedisConfig;
use auth_server::store::conformance::NOW;
use auth_server::store::{RedisStore, Revocation, RevocationKind, Store, StoreError};
use service_sdk::redis_layout::KeyLayout;
use service_sdk::{KeySet, Validator};
use testkit::{RedisProcess, RedisReply, Sentinels, TestServer};
use tonic::Code;
use tonic::transport::Channel;

use crate::within;

/// How long the failover test waits for the sentinels to promote the
/// replica, and for the server to follow: a bound on waiting, not a
/// performance target (the figures are printed).
const FAILOVER_PATIENCE: Duration = Duration::from_secs(60);

fn jti_revocation(id: &str) -> Revocation {
    Revocation { kind: RevocationKind::Jti, id: id.into(), expires_at: NOW + 600 }
}

/// Whether the replica holds `jti`'s deny mark (read on the replica itself).
fn replica_has(replica: &RedisProcess, jti: &str) -> bool {
    let key = KeyLayout::new("auth").deny_jti(jti);
    replica.command(&["EXISTS", &key]) == RedisReply::Int(1)
}

#[tokio::test]
async fn a_write_no_replica_acknowledged_is_refused_as_not_durable() {
    let primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    let config = RedisConfig {
        url: primary.url(),
        // Generous: a busy test host may delay the replica's ack.
        command_timeout_ms: 3_000,
        min_replicas_acked: 1,
        replica_ack_timeout_ms: 1_000,
        ..RedisConfig::default()
    };
    let store = RedisStore::connect(&config).await.unwrap();

    // Acknowledged only once the replica has it.
    store.revoke(jti_revocation("jti-acked"), NOW).await.unwrap();
    assert!(replica_has(&replica, "jti-acked"), "an acknowledged revocation is on the replica");

    // A replica that stops acknowledging: the primary applies the write,
    // but it is not durable, so it is refused.
    replica.pause();
    match store.revoke(jti_revocation("jti-unacked"), NOW).await {
        Err(StoreError::NotDurable { acked: 0, wanted: 1 }) => {}
        other => panic!("a write no replica acknowledged: expected NotDurable, got {other:?}"),
    }
    let record = auth_server::store::conformance::refresh_record("fam-w", "sid-w", NOW + 3600);
    assert!(matches!(store.put_refresh("fam-w.d1", &record, NOW).await, Err(StoreError::NotDurable { .. })));

    // Through a real auth-server: the RPC answers UNAVAILABLE.
    let srv = TestServer::builder()
        .store_url(primary.url())
        .configure(|c| {
            c.redis.command_timeout_ms = 3_000;
            c.redis.min_replicas_acked = 1;
            c.redis.replica_ack_timeout_ms = 1_000;
        })
        .start()
        .await;
    let mut client = AuthClient::new(srv.channel("order").await);
    let token = exchange(&mut client, &srv, None).await.unwrap();
    let err = revoke(&mut client, &token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "a revocation that is not durable is not acknowledged: {err:?}");

    // The replica back: writes are acknowledged again.
    replica.resume();
    within("writes to be acknowledged again", async {
        while store.revoke(jti_revocation("jti-after"), NOW).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(replica_has(&replica, "jti-after"));
    revoke(&mut client, &token).await.unwrap();
}

/// Durable writes wait in `WAIT` on their own connections: with the replica
/// stopped (SIGSTOP), writes block there for up to `replica_ack_timeout_ms`,
/// and reads (a refresh record, a snapshot, readiness) answer meanwhile.
/// With one pooled connection shared by both, every read queued behind the
/// `WAIT`s until they timed out.
#[tokio::test]
async fn reads_answer_while_durable_writes_wait_for_a_stopped_replica() {
    let primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    let config = RedisConfig {
        url: primary.url(),
        pool_size: 1,
        command_timeout_ms: 30_000,
        min_replicas_acked: 1,
        // Long enough that the reads below are done before it runs out:
        // writes wait until the replica resumes.
        replica_ack_timeout_ms: 20_000,
        ..RedisConfig::default()
    };
    let store = std::sync::Arc::new(RedisStore::connect(&config).await.unwrap());
    let record = auth_server::store::conformance::refresh_record("fam-r", "sid-r", NOW + 3600);
    store.put_refresh("fam-r.d1", &record, NOW).await.unwrap();
    store.revoke(jti_revocation("jti-before"), NOW).await.unwrap();

    replica.pause();
    let writes: Vec<_> = (0..3)
        .map(|i| {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move { store.revoke(jti_revocation(&format!("jti-waiting-{i}")), NOW).await })
        })
        .collect();
    within("a durable write to wait for its replica", async {
        while !primary
            .command(&["INFO", "clients"])
            .text()
            .lines()
            .any(|l| l.strip_prefix("blocked_clients:").is_some_and(|n| n.trim().parse::<u32>().is_ok_and(|n| n > 0)))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    assert_eq!(store.refresh_record("fam-r.d1", NOW).await.unwrap(), Some(record));
    let snapshot = store.revoked_snapshot(NOW).await.unwrap();
    assert!(snapshot.contains(&jti_revocation("jti-before")), "{snapshot:?}");
    store.ping().await.unwrap();
    assert!(writes.iter().all(|w| !w.is_finished()), "the reads answered while the writes waited");

    // The replica back: the writes are acknowledged.
    replica.resume();
    for write in writes {
        within("the durable writes", write).await.unwrap().unwrap();
    }
    assert!(replica_has(&replica, "jti-waiting-2"));
}

async fn exchange(
    client: &mut AuthClient<Channel>,
    srv: &TestServer,
    subject: Option<&str>,
) -> Result<String, tonic::Status> {
    let mut request = ExchangeTokenRequest { audience: "inventory".into(), ..Default::default() };
    (request.client_id, request.client_secret) = srv.client_credentials("order");
    request.subject_token = subject.unwrap_or_default().to_owned();
    Ok(client.exchange_token(request).await?.into_inner().access_token)
}

async fn revoke(client: &mut AuthClient<Channel>, token: &str) -> Result<(), tonic::Status> {
    let target = revoke_request::Target::AccessToken(token.to_owned());
    client.revoke(RevokeRequest { target: Some(target) }).await.map(drop)
}

async fn jti_of(client: &mut AuthClient<Channel>, token: &str) -> String {
    let json = client.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let keys = KeySet::from_jwks_json(&json).unwrap();
    Validator::new("auth-service", "inventory").validate(token, &keys, SystemClock.now_unix()).unwrap().jti
}

/// The revoked `jti`s in the snapshot a fresh WatchRevocations stream
/// starts with, once the server can hear revocations again.
///
/// After a failover the server refuses streams (UNAVAILABLE: it fails
/// closed) until its Redis subscriber is live on the new primary. The feed
/// may also still read live from before the failover (a gap shorter than
/// one subscriber ping plus the command timeout keeps it live) and drop
/// only once that runs out, after ExchangeToken has already answered. So
/// each attempt first waits for the store's feed to be live, and a stream
/// refused or ended UNAVAILABLE before its snapshot is opened again, up to
/// [`FAILOVER_PATIENCE`].
async fn snapshot_jtis(srv: &TestServer) -> Vec<String> {
    let mut client = AuthClient::new(srv.channel("inventory").await);
    let mut feed = srv.core().store.feed_state();
    let live_at_first = feed.borrow().live;
    let (mut refused, mut last) = (0u32, None);
    let attempts = async {
        loop {
            feed.wait_for(|s| s.live).await.expect("the store's feed state");
            match read_snapshot(&mut client).await {
                Ok(ids) => return ids,
                Err(status) if status.code() == Code::Unavailable => {
                    refused += 1;
                    last = Some(status);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("WatchRevocations after the failover: {status:?}"),
            }
        }
    };
    match tokio::time::timeout(FAILOVER_PATIENCE, attempts).await {
        Ok(ids) => {
            println!(
                "sentinel failover: the server's revocation feed was {}live when the snapshot was first asked for; \
                 WatchRevocations refused {refused} time(s) before a stream started",
                if live_at_first { "" } else { "not " }
            );
            ids
        }
        Err(_) => panic!(
            "gave up waiting for the server's revocation feed to be live and a WatchRevocations stream to start \
             with a snapshot after the failover; last refusal: {last:?}"
        ),
    }
}

/// Opens a WatchRevocations stream and reads its whole (possibly chunked)
/// snapshot: the ids it holds, or the status the stream was refused or
/// ended with.
async fn read_snapshot(client: &mut AuthClient<Channel>) -> Result<Vec<String>, tonic::Status> {
    let mut stream = client.watch_revocations(WatchRevocationsRequest {}).await?.into_inner();
    let mut ids = Vec::new();
    loop {
        let Some(event) = within("a snapshot chunk", stream.message()).await? else {
            panic!("the stream ended without a status before its snapshot was complete");
        };
        let Some(Event::Snapshot(snapshot)) = event.event else {
            panic!("the stream starts with a snapshot, got {:?}", event.event);
        };
        ids.extend(snapshot.entries.into_iter().map(|e| e.id));
        if !snapshot.more {
            return Ok(ids);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_revocations_survive_a_sentinel_failover_and_the_server_follows() {
    const REVOKED: usize = 40;
    let mut primary = RedisProcess::start();
    let replica = RedisProcess::start_replica_of(&primary);
    let sentinels = Sentinels::start(&primary, 1);
    let url = sentinels.url();
    let srv = TestServer::builder()
        .store_url(url.clone())
        .configure(|c| {
            c.redis.command_timeout_ms = 2_000;
            c.redis.min_replicas_acked = 1;
            c.redis.replica_ack_timeout_ms = 1_000;
        })
        .start()
        .await;
    let mut client = AuthClient::new(srv.channel("order").await);
    let (username, password) = srv.user_password("alice");
    let grant = login_request::Grant::Password(PasswordGrant { username, password });
    let login = LoginRequest { grant: Some(grant), audience: vec!["order".into()], scope: vec![] };
    let alice = client.login(login).await.unwrap().into_inner().access_token;

    // 1. Revoke a set of tokens; each acknowledgement means the replica
    // has it.
    let mut revoked = Vec::new();
    for _ in 0..REVOKED {
        let token = exchange(&mut client, &srv, None).await.unwrap();
        revoke(&mut client, &token).await.unwrap();
        revoked.push(jti_of(&mut client, &token).await);
    }

    // 2. SIGKILL the primary: no shutdown, nothing flushed.
    let killed = Instant::now();
    primary.kill();

    // 3. The sentinels promote the replica; the server follows.
    let promoted = sentinels.wait_for_primary(replica.port(), FAILOVER_PATIENCE);
    let mut back = None;
    while back.is_none() {
        match exchange(&mut client, &srv, Some(&alice)).await {
            Ok(_) => back = Some(killed.elapsed()),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "while failing over: {status:?}");
                assert!(killed.elapsed() < FAILOVER_PATIENCE, "ExchangeToken did not work again: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let back = back.unwrap();
    println!(
        "sentinel failover: replica promoted {:.1} s after the primary's SIGKILL; ExchangeToken (with a subject \
         token) works again after {:.1} s",
        promoted.as_secs_f64(),
        back.as_secs_f64()
    );

    // 4. Every acknowledged revocation is still there: on the promoted
    // replica, through the sentinels, and in the server's snapshot.
    for jti in &revoked {
        assert!(replica_has(&replica, jti), "revocation {jti} lost in the failover");
    }
    let store = RedisStore::connect(&RedisConfig { url: url.clone(), ..RedisConfig::default() }).await.unwrap();
    for jti in &revoked {
        assert!(store.is_revoked(jti, None, SystemClock.now_unix()).await.unwrap(), "{jti} not revoked");
    }
    let snapshot = snapshot_jtis(&srv).await;
    assert!(revoked.iter().all(|j| snapshot.contains(j)), "the server's snapshot after the failover misses some");

    // 5. With its only replica promoted, the new primary has no replica:
    // a write cannot be durable and is refused, until the old primary is
    // back (the sentinels turn it into the new primary's replica).
    let token = exchange(&mut client, &srv, None).await.unwrap();
    let err = revoke(&mut client, &token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "no replica left: not durable");
    primary.restart();
    let restarted = Instant::now();
    loop {
        match revoke(&mut client, &token).await {
            Ok(()) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(restarted.elapsed() < FAILOVER_PATIENCE, "writes never became durable again: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!(
        "sentinel failover: writes durable again {:.1} s after the old primary restarted (as a replica)",
        restarted.elapsed().as_secs_f64()
    );
    let jti = jti_of(&mut client, &token).await;
    assert!(primary.command(&["INFO", "replication"]).text().contains("role:slave"), "the old primary is a replica");
    assert!(replica_has(&primary, &jti), "the old primary, now a replica, has the new revocation");
}
