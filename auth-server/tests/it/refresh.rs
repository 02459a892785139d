//! A lost reply must not log the user out: a failure before the commit
//! spends nothing; a signing failure after it is undone, so the retry is a
//! plain refresh, and so is a Refresh cancelled while it signs (undone at
//! once, without waiting for the signing) or one that panics; a reply
//! lost after the commit can be retried within
//! `tokens.refresh_reuse_grace_secs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use auth_proto::auth::v1::RefreshRequest;
use auth_server::clock::{Clock, ManualClock, SystemClock};
use auth_server::config::{RecordIssued, RedisConfig, TokensConfig};
use auth_server::core::Policy;
use auth_server::keys::{KeyError, PublicKeys, SigningKeys};
use auth_server::store::{MemoryStore, Revocation, RevocationKind, Store, StoreError};
use testkit::{HookedStore, Intercept, RedisProcess, StoreCall, StoreHook, TestServer};
use tonic::Code;

use crate::flows::{client, login_user};

/// What the next refresh commit suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Fault {
    #[default]
    None,
    /// The store fails before the commit is applied (a refused write).
    FailCommit,
    /// The commit is applied, but its reply never reaches the server (a
    /// timeout, a dropped connection).
    LoseReply,
}

/// A hook that injects one fault into the next refresh commit.
#[derive(Default)]
struct Faults {
    next: Mutex<Fault>,
}

impl Faults {
    fn arm(&self, fault: Fault) {
        *self.next.lock().unwrap() = fault;
    }
}

impl StoreHook for Faults {
    fn intercept(&self, call: StoreCall) -> Intercept {
        if call != StoreCall::CommitRefresh {
            return Intercept::Pass;
        }
        match std::mem::replace(&mut *self.next.lock().unwrap(), Fault::None) {
            Fault::None => Intercept::Pass,
            Fault::FailCommit => Intercept::Refuse(StoreError::Unavailable("injected: write refused".into())),
            Fault::LoseReply => Intercept::LoseReply(StoreError::Unavailable("injected: reply lost".into())),
        }
    }
}

/// A store whose next refresh commit suffers the armed fault.
type Faulty = HookedStore<Faults>;

fn faulty(inner: Arc<dyn Store>) -> Arc<Faulty> {
    Arc::new(HookedStore::new(inner, Faults::default()))
}

async fn redis_store(redis: &RedisProcess) -> Arc<dyn Store> {
    let config = RedisConfig { url: redis.url(), command_timeout_ms: 500, ..RedisConfig::default() };
    Arc::new(auth_server::store::RedisStore::connect(&config).await.unwrap())
}

fn refresh(token: &str) -> RefreshRequest {
    RefreshRequest { refresh_token: token.into() }
}

async fn a_failure_before_the_commit_spends_nothing(inner: Arc<dyn Store>) {
    let store = faulty(inner);
    let srv = TestServer::builder().store(store.clone()).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::FailCommit);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The honest retry is a plain refresh, not a reuse.
    let next = c.refresh(refresh(&alice.refresh_token)).await.expect("nothing was spent").into_inner();
    c.refresh(refresh(&next.refresh_token)).await.expect("the family is alive");
    // Now it is spent: a third presentation is a reuse.
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
}

#[tokio::test]
async fn a_store_failure_before_the_commit_spends_nothing_in_memory() {
    a_failure_before_the_commit_spends_nothing(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_store_failure_before_the_commit_spends_nothing_in_redis() {
    let redis = RedisProcess::start();
    a_failure_before_the_commit_spends_nothing(redis_store(&redis).await).await;
}

/// A server whose refresh commits go through `store`, with a reuse grace
/// window of `grace` seconds.
async fn server(store: Arc<Faulty>, grace: u64, clock: ManualClock) -> TestServer {
    TestServer::builder()
        .store(store)
        .clock(Arc::new(clock))
        .configure(move |c| c.tokens.refresh_reuse_grace_secs = grace)
        .start()
        .await
}

fn family_revoked(snapshot: &[Revocation]) -> bool {
    snapshot.iter().any(|r| r.kind == RevocationKind::Family)
}

#[tokio::test]
async fn a_lost_reply_is_retried_within_the_grace_window() {
    let redis = RedisProcess::start();
    let store = faulty(redis_store(&redis).await);
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 10, clock.clone()).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    clock.advance(5);
    let retried = c.refresh(refresh(&alice.refresh_token)).await.expect("a retry in the window").into_inner();
    assert!(!family_revoked(&srv.core().store.revoked_snapshot(clock.now_unix()).await.unwrap()));
    // The retry's pair is the live one.
    let next = c.refresh(refresh(&retried.refresh_token)).await.expect("the new pair works").into_inner();
    assert!(!next.access_token.is_empty());
}

#[tokio::test]
async fn a_retry_after_the_grace_window_revokes_the_family() {
    let redis = RedisProcess::start();
    let store = faulty(redis_store(&redis).await);
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 10, clock.clone()).await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    clock.advance(11);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
    assert!(family_revoked(&srv.core().store.revoked_snapshot(clock.now_unix()).await.unwrap()));
}

#[tokio::test]
async fn without_a_grace_window_a_retry_after_a_lost_reply_revokes_the_family() {
    let store = faulty(Arc::new(MemoryStore::new()));
    let clock = ManualClock::new(SystemClock.now_unix());
    let srv = server(store.clone(), 0, clock.clone()).await;
    assert_eq!(TokensConfig::default().refresh_reuse_grace_secs, 0, "off by default");
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    store.hook().arm(Fault::LoseReply);
    assert_eq!(c.refresh(refresh(&alice.refresh_token)).await.unwrap_err().code(), Code::Unavailable);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
}

/// A hook that refuses every undo of a refresh rotation while `fail` is set.
#[derive(Default)]
struct UndoFaults {
    fail: AtomicBool,
}

impl StoreHook for UndoFaults {
    fn intercept(&self, call: StoreCall) -> Intercept {
        if call == StoreCall::UndoRefresh && self.fail.load(Ordering::SeqCst) {
            return Intercept::Refuse(StoreError::Unavailable("injected: undo refused".into()));
        }
        Intercept::Pass
    }
}

/// Refresh commits before it signs: a signing failure after the commit is
/// undone (one more store step), so the token is live again and the
/// client's retry is a plain refresh, not a reuse; the pair that retry gets
/// works, and the token is spent once that retry has it. With the
/// registry on, nothing of the undone rotation stays recorded.
async fn a_signing_failure_leaves_the_presented_token_usable(inner: Arc<dyn Store>) {
    let store = Arc::new(HookedStore::new(inner, UndoFaults::default()));
    let srv = TestServer::builder()
        .store(store.clone())
        .configure(|raw| raw.tokens.record_issued = RecordIssued::Sessions)
        .start()
        .await;
    let signer = held_signer(&srv);
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;

    signer.fail.store(true, Ordering::SeqCst);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unavailable, "signer unavailable"));
    signer.fail.store(false, Ordering::SeqCst);
    let next = c.refresh(refresh(&alice.refresh_token)).await.expect("the token is live again").into_inner();
    c.refresh(refresh(&next.refresh_token)).await.expect("the family is alive");
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked", "spent by the retry");

    // Should the undo fail too, the signing error is still the answer, and
    // the retry (without a grace window) counts as a reuse: as documented.
    let bob = login_user(&mut c, &srv, "bob").await;
    signer.fail.store(true, Ordering::SeqCst);
    store.hook().fail.store(true, Ordering::SeqCst);
    let err = c.refresh(refresh(&bob.refresh_token)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unavailable, "signer unavailable"));
    signer.fail.store(false, Ordering::SeqCst);
    store.hook().fail.store(false, Ordering::SeqCst);
    let err = c.refresh(refresh(&bob.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked");
}

#[tokio::test]
async fn a_signing_failure_leaves_the_presented_token_usable_in_memory() {
    a_signing_failure_leaves_the_presented_token_usable(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_signing_failure_leaves_the_presented_token_usable_in_redis() {
    let redis = RedisProcess::start();
    a_signing_failure_leaves_the_presented_token_usable(redis_store(&redis).await).await;
}

/// A user removed after the commit: the refresh is refused, and the token
/// stays spent (nothing is undone for a refusal).
#[tokio::test]
async fn a_refusal_after_the_commit_leaves_the_token_spent() {
    let store = faulty(Arc::new(MemoryStore::new()));
    let srv = TestServer::builder().store(store.clone()).start().await;
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    let digest = auth_server::grant::refresh_digest(&alice.refresh_token);
    let now = SystemClock.now_unix();
    let record = srv.core().store.refresh_record(&digest, now).await.unwrap().expect("the login's refresh token");

    // The record's user is unknown to the directory: refused.
    let orphan = auth_server::store::RefreshRecord { sub: "nobody".into(), ..record };
    let orphan_token = auth_server::grant::refresh_token(&orphan.family, "orphan-secret");
    srv.core().store.put_refresh(&auth_server::grant::refresh_digest(&orphan_token), &orphan, now).await.unwrap();
    let err = c.refresh(refresh(&orphan_token)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "user no longer exists"));
    let err = c.refresh(refresh(&orphan_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked", "the refused token stays spent");
}

/// Signing keys that, while `hold` is set, say so on `entered` and wait
/// for `release` before answering, as a transit call that hangs does; then
/// they refuse while `fail` is set (a transit key that cannot be reached),
/// panic while `panic` is set (a defect in the signing path), else sign.
/// The public keys stay the inner ones.
struct HeldSigner {
    inner: Arc<dyn SigningKeys>,
    hold: AtomicBool,
    fail: AtomicBool,
    panic: AtomicBool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl SigningKeys for HeldSigner {
    async fn sign(&self, claims: &service_sdk::Claims) -> Result<String, KeyError> {
        if self.hold.load(Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(KeyError::Unavailable("injected: transit key unreachable".into()));
        }
        if self.panic.load(Ordering::SeqCst) {
            panic!("injected: the signer panicked");
        }
        self.inner.sign(claims).await
    }

    fn public_keys(&self) -> Arc<PublicKeys> {
        self.inner.public_keys()
    }

    fn signing_kid(&self) -> Option<String> {
        self.inner.signing_kid()
    }
}

/// Puts a [`HeldSigner`] in front of `srv`'s keys.
fn held_signer(srv: &TestServer) -> Arc<HeldSigner> {
    let current = srv.core().policy();
    let signer = Arc::new(HeldSigner {
        inner: Arc::clone(&current.keys),
        hold: AtomicBool::new(false),
        fail: AtomicBool::new(false),
        panic: AtomicBool::new(false),
        entered: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    srv.core().swap_policy(Policy {
        tokens: current.tokens.clone(),
        directory: Arc::clone(&current.directory),
        keys: Arc::clone(&signer) as Arc<dyn SigningKeys>,
        jwks_max_age_secs: current.jwks_max_age_secs,
    });
    signer
}

/// A hook that lets every call through and says when an undo of a refresh
/// rotation has been answered.
#[derive(Default)]
struct Undos {
    answered: tokio::sync::Notify,
}

impl StoreHook for Undos {
    fn intercept(&self, _call: StoreCall) -> Intercept {
        Intercept::Pass
    }

    fn answered(&self, call: StoreCall) {
        if call == StoreCall::UndoRefresh {
            self.answered.notify_one();
        }
    }
}

/// A Refresh cancelled while it signs (the client's deadline passed, or it
/// went away, or the server's request timeout fired: the handler's future
/// is dropped) leaves the presented token usable: the commit, the signing
/// and the undo run in a task of their own, which drops the signing
/// (whether it would succeed or fail) and undoes the rotation once nobody
/// is left to hand the pair to. The client's retry is a plain refresh, not
/// a reuse.
async fn a_refresh_cancelled_while_signing_leaves_the_token_usable(inner: Arc<dyn Store>) {
    let store = Arc::new(HookedStore::new(inner, Undos::default()));
    let srv = TestServer::builder()
        .store(store.clone())
        .configure(|raw| raw.tokens.record_issued = RecordIssued::Sessions)
        .start()
        .await;
    let signer = held_signer(&srv);
    let mut c = client(&srv, "order").await;
    // Signing succeeds once released (alice), or fails (bob).
    for (user, fail) in [("alice", false), ("bob", true)] {
        let login = login_user(&mut c, &srv, user).await;
        signer.fail.store(fail, Ordering::SeqCst);
        signer.hold.store(true, Ordering::SeqCst);
        {
            // The handler's future, dropped while it signs.
            let call = auth_server::refresh::refresh(srv.core(), &login.refresh_token);
            tokio::select! {
                result = call => panic!("{user}: the refresh answered while signing was held: {:?}", result.err()),
                () = signer.entered.notified() => {}
            }
        }
        signer.hold.store(false, Ordering::SeqCst);
        // Releases the signing if it still waits (it is dropped once its
        // caller is gone); no permit is left for a later one.
        signer.release.notify_waiters();
        crate::within("the undo of the cancelled refresh", store.hook().answered.notified()).await;
        signer.fail.store(false, Ordering::SeqCst);
        let next = c.refresh(refresh(&login.refresh_token)).await.expect("the token is live again").into_inner();
        c.refresh(refresh(&next.refresh_token)).await.expect("the family is alive");
        let err = c.refresh(refresh(&login.refresh_token)).await.unwrap_err();
        assert_eq!(err.message(), "refresh token reused; its family is revoked", "{user}: spent by the retry");
    }
}

#[tokio::test]
async fn a_refresh_cancelled_while_signing_leaves_the_token_usable_in_memory() {
    a_refresh_cancelled_while_signing_leaves_the_token_usable(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_refresh_cancelled_while_signing_leaves_the_token_usable_in_redis() {
    let redis = RedisProcess::start();
    a_refresh_cancelled_while_signing_leaves_the_token_usable(redis_store(&redis).await).await;
}

/// A Refresh cancelled while its signing still hangs (a transit call can
/// take seconds) is undone at once, not once the signing ends: the task
/// drops the signing when its caller goes away. So the client's immediate
/// retry, made while the cancelled signing would still be hanging, is a
/// plain refresh, not a reuse that revokes the family.
async fn a_refresh_cancelled_while_signing_is_undone_before_the_signing_ends(inner: Arc<dyn Store>) {
    let store = Arc::new(HookedStore::new(inner, Undos::default()));
    let srv = TestServer::builder()
        .store(store.clone())
        .configure(|raw| raw.tokens.record_issued = RecordIssued::Sessions)
        .start()
        .await;
    let signer = held_signer(&srv);
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    signer.hold.store(true, Ordering::SeqCst);
    {
        // The handler's future, dropped while it signs.
        let call = auth_server::refresh::refresh(srv.core(), &alice.refresh_token);
        tokio::select! {
            result = call => panic!("the refresh answered while signing was held: {:?}", result.err()),
            () = signer.entered.notified() => {}
        }
    }
    // The cancelled signing is never released: only an undo that does not
    // wait for it lets the retry through.
    crate::within("the undo of the refresh cancelled while its signing hangs", store.hook().answered.notified()).await;
    signer.hold.store(false, Ordering::SeqCst);
    let next = c.refresh(refresh(&alice.refresh_token)).await.expect("a plain refresh, not a reuse").into_inner();
    c.refresh(refresh(&next.refresh_token)).await.expect("the family is alive");
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked", "spent by the retry");
}

#[tokio::test]
async fn a_refresh_cancelled_while_signing_is_undone_before_the_signing_ends_in_memory() {
    a_refresh_cancelled_while_signing_is_undone_before_the_signing_ends(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_refresh_cancelled_while_signing_is_undone_before_the_signing_ends_in_redis() {
    let redis = RedisProcess::start();
    a_refresh_cancelled_while_signing_is_undone_before_the_signing_ends(redis_store(&redis).await).await;
}

/// A refresh whose task panics after the commit (here in the signer) has
/// no answer, and its commit is undone all the same: the retry is a plain
/// refresh, not a reuse.
#[tokio::test]
async fn a_refresh_that_panics_after_the_commit_leaves_the_token_usable() {
    let store = Arc::new(HookedStore::new(Arc::new(MemoryStore::new()) as Arc<dyn Store>, Undos::default()));
    let srv = TestServer::builder().store(store.clone()).start().await;
    let signer = held_signer(&srv);
    let mut c = client(&srv, "order").await;
    let alice = login_user(&mut c, &srv, "alice").await;
    signer.panic.store(true, Ordering::SeqCst);
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    crate::within("the undo of the refresh that panicked", store.hook().answered.notified()).await;
    signer.panic.store(false, Ordering::SeqCst);
    let next = c.refresh(refresh(&alice.refresh_token)).await.expect("the token is live again").into_inner();
    c.refresh(refresh(&next.refresh_token)).await.expect("the family is alive");
    let err = c.refresh(refresh(&alice.refresh_token)).await.unwrap_err();
    assert_eq!(err.message(), "refresh token reused; its family is revoked", "spent by the retry");
}
