//! The store conformance suite: what every [`Store`] must do, whatever keeps
//! its state. The in-memory store is the reference; the Redis store passes
//! the same suite against a real `redis-server`, and so must any other store
//! or key layout.
//!
//! [`run_all`] plays one story of operations on an empty store and checks
//! every outcome, as a sequence of named checks: a failure names the check
//! and what differed. It covers the issued-`jti` registry (for deployments
//! that keep one: `tokens.record_issued`), deny entries by
//! `jti`, session and family (never shortened, forgotten at expiry),
//! refresh rotation (returning the spent token's record), reuse and expiry,
//! the undo of a rotation, revocation by refresh token, the snapshot at
//! several times, and the events subscribers hear.
//!
//! ```no_run
//! # async fn demo() -> Result<(), auth_server::store::conformance::Failure> {
//! use auth_server::store::{MemoryStore, conformance};
//! conformance::run_all(&MemoryStore::new()).await
//! # }
//! ```

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::broadcast;

use super::{
    Committed, ConsumeOutcome, DenyListSize, IssuedToken, RefreshCommit, RefreshRecord, RefreshRevoke, Revocation,
    RevocationKind, Store, StoreError,
};

/// The time (Unix seconds) the suite passes as `now`, and moves forward from.
/// Stores judge expiry by the caller's clock, so any value works.
pub const NOW: u64 = 1_800_000_000;

/// How long an event may take to reach a subscriber before the check fails.
/// A bound on waiting, never a performance target.
const PATIENCE: Duration = Duration::from_secs(30);

/// A check the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store conformance check `{check}` failed: {detail}")]
pub struct Failure {
    /// The check's name.
    pub check: &'static str,
    /// What the store did, and what it should have done.
    pub detail: String,
}

type Check = Result<(), String>;

/// Awaits a store call; a store error fails the check, naming the call.
macro_rules! call {
    ($store:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        $store.$method($($arg),*).await.map_err(|e: StoreError| format!("{} failed: {e}", stringify!($method)))?
    };
}

/// Fails the check unless `left == right`.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($what:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: got {left:?}, expected {right:?}", format!($($what)+)));
        }
    }};
}

/// Fails the check unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err(format!($($what)+));
        }
    };
}

/// Runs every check, in order, on `store`, which must start empty (a fresh
/// store, or a fresh prefix of a shared backend).
pub async fn run_all(store: &dyn Store) -> Result<(), Failure> {
    let named = |check: &'static str| move |detail: String| Failure { check, detail };
    let mut events = store.subscribe();
    issued_registry(store).await.map_err(named("issued_registry"))?;
    deny_by_jti(store).await.map_err(named("deny_by_jti"))?;
    deny_unrecorded_jti(store).await.map_err(named("deny_unrecorded_jti"))?;
    deny_never_shortens(store).await.map_err(named("deny_never_shortens"))?;
    refresh_rotation_and_reuse(store).await.map_err(named("refresh_rotation_and_reuse"))?;
    expired_refresh_is_invalid(store).await.map_err(named("expired_refresh_is_invalid"))?;
    rotation_without_a_registry_record(store).await.map_err(named("rotation_without_a_registry_record"))?;
    logout_revokes_the_session(store).await.map_err(named("logout_revokes_the_session"))?;
    family_revocation(store).await.map_err(named("family_revocation"))?;
    snapshot_holds_what_is_in_force(store).await.map_err(named("snapshot_holds_what_is_in_force"))?;
    subscribers_hear_every_revocation(&mut events).await.map_err(named("subscribers_hear_every_revocation"))?;
    // Last: its reuses add revocations the two checks above do not expect.
    refresh_retry_within_the_grace_window(store).await.map_err(named("refresh_retry_within_the_grace_window"))?;
    undo_puts_a_rotated_token_back(store).await.map_err(named("undo_puts_a_rotated_token_back"))?;
    undo_leaves_a_retried_token_spent(store).await.map_err(named("undo_leaves_a_retried_token_spent"))?;
    undo_leaves_a_rotation_that_moved_on(store).await.map_err(named("undo_leaves_a_rotation_that_moved_on"))?;
    revoke_by_refresh_token(store, &mut events).await.map_err(named("revoke_by_refresh_token"))?;
    deny_list_size_counts_each_kind(store).await.map_err(named("deny_list_size_counts_each_kind"))?;
    Ok(())
}

/// Refresh commits as the refresh flow makes them: the successor `next`
/// and a new access token `jti-<next>` (recorded with the spent token's
/// `sub` and `sid`, expiring 900 s after `now`), with a reuse grace window
/// of `grace` seconds. Public so that tests of a particular
/// store (races, outages) commit the same way as the suite.
#[allow(async_fn_in_trait)] // test helper: callers need no `Send` bound
pub trait Rotate {
    /// Commits `digest` -> `next` with no reuse grace window.
    async fn rotate(
        &self,
        digest: &str,
        next: &str,
        next_expires_at: u64,
        now: u64,
    ) -> Result<ConsumeOutcome, StoreError>;
    /// Commits `digest` -> `next` with a reuse grace window of `grace` s.
    async fn rotate_with_grace(
        &self,
        digest: &str,
        next: &str,
        next_expires_at: u64,
        now: u64,
        grace: u64,
    ) -> Result<ConsumeOutcome, StoreError>;
}

impl<S: Store + ?Sized> Rotate for S {
    async fn rotate(
        &self,
        digest: &str,
        next: &str,
        next_expires_at: u64,
        now: u64,
    ) -> Result<ConsumeOutcome, StoreError> {
        self.rotate_with_grace(digest, next, next_expires_at, now, 0).await
    }

    async fn rotate_with_grace(
        &self,
        digest: &str,
        next: &str,
        next_expires_at: u64,
        now: u64,
        grace: u64,
    ) -> Result<ConsumeOutcome, StoreError> {
        let jti = format!("jti-{next}");
        self.commit_refresh(&rotation(digest, next, &jti, next_expires_at, now, grace), now).await
    }
}

/// The commit [`Rotate`] makes, access token `jti` recorded.
fn rotation<'a>(
    digest: &'a str,
    next: &'a str,
    jti: &'a str,
    next_expires_at: u64,
    now: u64,
    grace: u64,
) -> RefreshCommit<'a> {
    RefreshCommit {
        digest,
        next_digest: next,
        next_expires_at,
        jti,
        issued_exp: Some(now + 900),
        reuse_grace_secs: grace,
    }
}

fn revocation(kind: RevocationKind, id: &str, expires_at: u64) -> Revocation {
    Revocation { kind, id: id.into(), expires_at }
}

/// The refresh record the suite stores: `alice`'s, from client `order`.
pub fn refresh_record(family: &str, sid: &str, expires_at: u64) -> RefreshRecord {
    RefreshRecord {
        family: family.into(),
        sid: sid.into(),
        sub: "alice".into(),
        client_id: "order".into(),
        // Separators and spaces survive the round trip.
        audience: vec!["order".into(), "a b|c".into()],
        scope: vec!["inventory:read".into()],
        expires_at,
    }
}

fn alice() -> IssuedToken {
    IssuedToken { sub: "alice".into(), sid: Some("sid-1".into()), exp: NOW + 600 }
}

/// The issued-jti registry: recorded, found until expiry, unknown is `None`.
async fn issued_registry(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.record_issued("jti-1", &alice(), now));
    let service = IssuedToken { sub: "svc:order".into(), sid: None, exp: now + 300 };
    call!(store.record_issued("jti-2", &service, now));
    ensure_eq!(call!(store.issued("jti-1", now)), Some(alice()), "a user's token");
    ensure_eq!(call!(store.issued("jti-2", now)), Some(service), "a service's token (no sid)");
    ensure_eq!(call!(store.issued("jti-1", now + 600)), None, "an expired token");
    ensure_eq!(call!(store.issued("unknown", now)), None, "an unknown jti");
    ensure!(!call!(store.is_revoked("jti-1", Some("sid-1"), now)), "a fresh token is revoked");
    Ok(())
}

/// The deny list by jti, for the token's remaining life.
async fn deny_by_jti(store: &dyn Store) -> Check {
    use RevocationKind::Jti;
    let now = NOW;
    call!(store.revoke(revocation(Jti, "jti-1", now + 600), now));
    ensure!(call!(store.is_revoked("jti-1", None, now)), "a revoked jti is not revoked");
    ensure!(call!(store.is_revoked("jti-1", Some("sid-other"), now + 599)), "not revoked until its expiry");
    ensure!(!call!(store.is_revoked("jti-1", None, now + 600)), "not forgotten at expiry");
    ensure_eq!(call!(store.issued("jti-1", now)), Some(alice()), "a revoked token is still on record");
    ensure!(!call!(store.is_revoked("jti-2", None, now)), "revoking one jti revoked another");
    Ok(())
}

/// A jti never recorded can be denied, and stays denied if recorded later.
async fn deny_unrecorded_jti(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.revoke(revocation(RevocationKind::Jti, "ghost", now + 120), now));
    ensure!(call!(store.is_revoked("ghost", None, now)), "an unrecorded jti is not denied");
    ensure_eq!(call!(store.issued("ghost", now)), None, "a deny entry is not an issued token");
    let late = IssuedToken { sub: "bob".into(), sid: None, exp: now + 60 };
    call!(store.record_issued("ghost", &late, now));
    ensure_eq!(call!(store.issued("ghost", now)), Some(late), "recorded after its revocation");
    ensure!(call!(store.is_revoked("ghost", None, now + 100)), "recording a denied jti lifted its deny entry");
    Ok(())
}

/// Revoking again with a shorter life never shortens the deny entry.
async fn deny_never_shortens(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.revoke(revocation(RevocationKind::Jti, "jti-1", now + 10), now));
    ensure!(call!(store.is_revoked("jti-1", None, now + 500)), "a shorter revocation shortened the deny entry");
    Ok(())
}

/// Refresh tokens: rotation, successor, reuse revoking the family.
async fn refresh_rotation_and_reuse(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-a.a1", &refresh_record("fam-a", "sid-a", now + 3600), now));
    ensure_eq!(
        call!(store.refresh_record("fam-a.a1", now)),
        Some(refresh_record("fam-a", "sid-a", now + 3600)),
        "a stored refresh token"
    );
    ensure_eq!(call!(store.refresh_record("fam-a.a1", now + 3600)), None, "an expired refresh token");
    ensure_eq!(call!(store.refresh_record("unknown", now)), None, "an unknown refresh token");
    ensure_eq!(
        call!(store.rotate("fam-a.a1", "fam-a.a2", now + 7200, now)),
        ConsumeOutcome::Rotated(refresh_record("fam-a", "sid-a", now + 3600)),
        "spending a live token"
    );
    ensure_eq!(
        call!(store.refresh_record("fam-a.a2", now)),
        Some(refresh_record("fam-a", "sid-a", now + 7200)),
        "the successor keeps the grant with its own expiry"
    );
    ensure_eq!(
        call!(store.refresh_record("fam-a.a1", now)),
        Some(refresh_record("fam-a", "sid-a", now + 3600)),
        "a spent token is still on record"
    );
    ensure_eq!(
        call!(store.rotate("fam-a.a2", "fam-a.a3", now + 7300, now + 10)),
        ConsumeOutcome::Rotated(refresh_record("fam-a", "sid-a", now + 7200)),
        "spending the successor"
    );
    ensure_eq!(
        call!(store.rotate("fam-a.a1", "fam-a.x", now + 7400, now + 20)),
        ConsumeOutcome::Reused(refresh_record("fam-a", "sid-a", now + 3600)),
        "presenting a spent token again"
    );
    ensure_eq!(
        call!(store.rotate("fam-a.a3", "fam-a.a4", now + 7500, now + 30)),
        ConsumeOutcome::Invalid,
        "the family is revoked"
    );
    ensure_eq!(
        call!(store.rotate("fam-a.x", "fam-a.y", now + 7500, now + 30)),
        ConsumeOutcome::Invalid,
        "a reuse stores no successor"
    );
    ensure_eq!(
        call!(store.rotate("unknown", "rt-z", now + 7500, now)),
        ConsumeOutcome::Invalid,
        "an unknown refresh token"
    );
    // A rotation records the new access token in the same step; a refused
    // commit writes nothing.
    // With the spent record's user and session.
    let recorded = IssuedToken { sub: "alice".into(), sid: Some("sid-a".into()), exp: now + 900 };
    ensure_eq!(call!(store.issued("jti-fam-a.a2", now)), Some(recorded), "the rotation's access token");
    ensure_eq!(call!(store.issued("jti-fam-a.x", now)), None, "a reuse's access token");
    ensure_eq!(call!(store.issued("jti-fam-a.a4", now)), None, "an invalid commit's access token");
    Ok(())
}

/// An expired refresh token is invalid, not reused.
async fn expired_refresh_is_invalid(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-b.b1", &refresh_record("fam-b", "sid-b", now + 50), now));
    ensure_eq!(
        call!(store.rotate("fam-b.b1", "fam-b.b2", now + 500, now + 50)),
        ConsumeOutcome::Invalid,
        "spending an expired token"
    );
    Ok(())
}

/// With the registry off (`tokens.record_issued`), a rotation stores the
/// successor and records no access token.
async fn rotation_without_a_registry_record(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-n.n1", &refresh_record("fam-n", "sid-n", now + 3600), now));
    let commit = RefreshCommit {
        digest: "fam-n.n1",
        next_digest: "fam-n.n2",
        next_expires_at: now + 7200,
        jti: "jti-fam-n.n2",
        issued_exp: None,
        reuse_grace_secs: 0,
    };
    ensure_eq!(
        call!(store.commit_refresh(&commit, now)),
        ConsumeOutcome::Rotated(refresh_record("fam-n", "sid-n", now + 3600)),
        "spending a live token"
    );
    ensure_eq!(
        call!(store.refresh_record("fam-n.n2", now)),
        Some(refresh_record("fam-n", "sid-n", now + 7200)),
        "the successor"
    );
    ensure_eq!(call!(store.issued("jti-fam-n.n2", now)), None, "an access token the registry does not record");
    Ok(())
}

/// Logout: the session's tokens and refresh tokens die.
async fn logout_revokes_the_session(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-c.c1", &refresh_record("fam-c", "sid-1", now + 3600), now));
    call!(store.revoke(revocation(RevocationKind::Sid, "sid-1", now + 3600), now));
    ensure!(call!(store.is_revoked("any-jti", Some("sid-1"), now)), "a token of a revoked session is not revoked");
    ensure!(!call!(store.is_revoked("any-jti", None, now)), "a token without a session is revoked");
    ensure_eq!(
        call!(store.rotate("fam-c.c1", "fam-c.c2", now + 7200, now)),
        ConsumeOutcome::Invalid,
        "a refresh token of a revoked session"
    );
    Ok(())
}

/// Revoking a family by hand.
async fn family_revocation(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-d.d1", &refresh_record("fam-d", "sid-d", now + 3600), now));
    call!(store.revoke(revocation(RevocationKind::Family, "fam-d", now + 3600), now));
    ensure_eq!(
        call!(store.rotate("fam-d.d1", "fam-d.d2", now + 7200, now)),
        ConsumeOutcome::Invalid,
        "a refresh token of a revoked family"
    );
    Ok(())
}

fn as_set(revocations: Vec<Revocation>) -> HashSet<Revocation> {
    revocations.into_iter().collect()
}

/// The snapshot: everything still in force, nothing expired.
async fn snapshot_holds_what_is_in_force(store: &dyn Store) -> Check {
    use RevocationKind::{Family, Jti, Sid};
    let now = NOW;
    let expected = as_set(vec![
        revocation(Jti, "jti-1", now + 600),
        revocation(Jti, "ghost", now + 120),
        revocation(Family, "fam-a", now + 7400),
        revocation(Sid, "sid-1", now + 3600),
        revocation(Family, "fam-d", now + 3600),
    ]);
    ensure_eq!(as_set(call!(store.revoked_snapshot(now + 30))), expected, "the snapshot after 30 s");
    let later = as_set(vec![
        revocation(Family, "fam-a", now + 7400),
        revocation(Sid, "sid-1", now + 3600),
        revocation(Family, "fam-d", now + 3600),
    ]);
    ensure_eq!(as_set(call!(store.revoked_snapshot(now + 600))), later, "the snapshot once the jtis expired");
    ensure_eq!(
        as_set(call!(store.revoked_snapshot(now + 3600))),
        as_set(vec![revocation(Family, "fam-a", now + 7400)]),
        "the snapshot after an hour"
    );
    Ok(())
}

/// The deny list's size, by kind, follows new revocations (what came before
/// is whatever the checks above left).
async fn deny_list_size_counts_each_kind(store: &dyn Store) -> Check {
    use RevocationKind::{Family, Jti, Sid};
    let now = NOW + 3_600;
    let Some(before) = call!(store.deny_list_size(now)) else {
        return Err("the store cannot tell its deny list's size".into());
    };
    call!(store.revoke(revocation(Jti, "jti-counted", now + 300), now));
    call!(store.revoke(revocation(Sid, "sid-counted", now + 300), now));
    call!(store.revoke(revocation(Family, "fam-counted-1", now + 300), now));
    call!(store.revoke(revocation(Family, "fam-counted-2", now + 300), now));
    let after = call!(store.deny_list_size(now));
    let want = DenyListSize { jti: before.jti + 1, sid: before.sid + 1, family: before.family + 2 };
    ensure_eq!(after, Some(want), "the deny list's size after one jti, one session and two families");
    Ok(())
}

/// Every revocation made above reached a subscriber taken before them,
/// each exactly once (a reuse publishes its family's). Not necessarily in
/// the order made: a Redis Cluster forwards a message published on another
/// node over its bus, so messages from different nodes may overtake each
/// other. No consumer needs the order: applying a revocation twice, or an
/// older one after a newer one, keeps the latest deny-until.
async fn subscribers_hear_every_revocation(events: &mut broadcast::Receiver<Revocation>) -> Check {
    use RevocationKind::{Family, Jti, Sid};
    let now = NOW;
    let mut expected = vec![
        revocation(Jti, "jti-1", now + 600),
        revocation(Jti, "ghost", now + 120),
        revocation(Jti, "jti-1", now + 10),
        revocation(Family, "fam-a", now + 7400),
        revocation(Sid, "sid-1", now + 3600),
        revocation(Family, "fam-d", now + 3600),
    ];
    let mut heard = Vec::new();
    for i in 0..expected.len() {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Ok(got)) => heard.push(got),
            Ok(Err(e)) => return Err(format!("event {i}: the subscription failed: {e}")),
            Err(_) => return Err(format!("only {i} of {} events arrived: {heard:?}", expected.len())),
        }
    }
    let key = |r: &Revocation| (r.id.clone(), r.expires_at);
    heard.sort_by_key(key);
    expected.sort_by_key(key);
    ensure_eq!(heard, expected, "the events heard");
    Ok(())
}

/// With a reuse grace window, a second presentation soon after the spend,
/// while the successor stored then is unused, is a retry after a lost
/// reply: the successor is replaced and the family lives. A retry after the
/// window, after the successor was used, or without a window, is a reuse.
async fn refresh_retry_within_the_grace_window(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-g.g1", &refresh_record("fam-g", "sid-g", now + 3600), now));
    ensure_eq!(
        call!(store.rotate_with_grace("fam-g.g1", "fam-g.g2", now + 7200, now, 10)),
        ConsumeOutcome::Rotated(refresh_record("fam-g", "sid-g", now + 3600)),
        "spending a live token with a window"
    );
    ensure_eq!(
        call!(store.rotate_with_grace("fam-g.g1", "fam-g.g3", now + 7205, now + 5, 10)),
        ConsumeOutcome::Retried(refresh_record("fam-g", "sid-g", now + 3600)),
        "presenting it again within the window"
    );
    ensure!(call!(store.issued("jti-fam-g.g3", now + 5)).is_some(), "the retry's access token is not recorded");
    ensure_eq!(
        call!(store.rotate_with_grace("fam-g.g2", "fam-g.x2", now + 7206, now + 6, 10)),
        ConsumeOutcome::Invalid,
        "the successor the retry replaced"
    );
    ensure!(
        matches!(
            call!(store.rotate_with_grace("fam-g.g3", "fam-g.g4", now + 7207, now + 7, 10)),
            ConsumeOutcome::Rotated(_)
        ),
        "the retry's successor does not rotate"
    );
    ensure_eq!(
        call!(store.rotate_with_grace("fam-g.g1", "fam-g.g5", now + 7208, now + 8, 10)),
        ConsumeOutcome::Reused(refresh_record("fam-g", "sid-g", now + 3600)),
        "a retry after its successor was used"
    );
    ensure_eq!(
        call!(store.rotate_with_grace("fam-g.g4", "fam-g.g6", now + 7209, now + 9, 10)),
        ConsumeOutcome::Invalid,
        "the family after that reuse"
    );

    call!(store.put_refresh("fam-h.h1", &refresh_record("fam-h", "sid-h", now + 3600), now));
    ensure!(
        matches!(
            call!(store.rotate_with_grace("fam-h.h1", "fam-h.h2", now + 7200, now, 10)),
            ConsumeOutcome::Rotated(_)
        ),
        "spending a live token with a window"
    );
    ensure_eq!(
        call!(store.rotate_with_grace("fam-h.h1", "fam-h.h3", now + 7211, now + 11, 10)),
        ConsumeOutcome::Reused(refresh_record("fam-h", "sid-h", now + 3600)),
        "presenting it again after the window"
    );
    ensure_eq!(
        call!(store.rotate_with_grace("fam-h.h2", "fam-h.h4", now + 7212, now + 12, 10)),
        ConsumeOutcome::Invalid,
        "the family after a late retry"
    );

    call!(store.put_refresh("fam-i.i1", &refresh_record("fam-i", "sid-i", now + 3600), now));
    ensure!(
        matches!(call!(store.rotate("fam-i.i1", "fam-i.i2", now + 7200, now)), ConsumeOutcome::Rotated(_)),
        "spending a live token"
    );
    ensure_eq!(
        call!(store.rotate("fam-i.i1", "fam-i.i3", now + 7200, now)),
        ConsumeOutcome::Reused(refresh_record("fam-i", "sid-i", now + 3600)),
        "without a window"
    );
    Ok(())
}

/// Undoing a rotation (the flow could not sign): the presented token is
/// live again, its successor and the new access token's record are gone, and
/// the next presentation is a plain rotation, not a reuse. With or without
/// a grace window.
async fn undo_puts_a_rotated_token_back(store: &dyn Store) -> Check {
    let now = NOW;
    for (family, grace) in [("fam-u", 0), ("fam-v", 10)] {
        let (t1, t2, t3) = (format!("{family}.1"), format!("{family}.2"), format!("{family}.3"));
        let (j2, j3) = (format!("jti-{t2}"), format!("jti-{t3}"));
        let sid = format!("sid-{family}");
        call!(store.put_refresh(&t1, &refresh_record(family, &sid, now + 3600), now));
        let commit = rotation(&t1, &t2, &j2, now + 7200, now, grace);
        ensure_eq!(
            call!(store.commit_refresh(&commit, now)),
            ConsumeOutcome::Rotated(refresh_record(family, &sid, now + 3600)),
            "spending a live token (grace {grace})"
        );
        ensure!(call!(store.issued(&j2, now)).is_some(), "the rotation's access token is not recorded");
        ensure!(
            call!(store.undo_refresh(&commit, Committed::Rotated, now)),
            "the undo did not restore the token (grace {grace})"
        );
        ensure_eq!(call!(store.issued(&j2, now)), None, "the undone rotation's access token record");
        ensure_eq!(
            call!(store.rotate_with_grace(&t2, &format!("{family}.x"), now + 7200, now + 1, grace)),
            ConsumeOutcome::Invalid,
            "the undone rotation's successor (grace {grace})"
        );
        ensure_eq!(
            call!(store.commit_refresh(&rotation(&t1, &t3, &j3, now + 7200, now + 2, grace), now + 2)),
            ConsumeOutcome::Rotated(refresh_record(family, &sid, now + 3600)),
            "presenting the token again after the undo (grace {grace})"
        );
        ensure!(call!(store.issued(&j3, now + 2)).is_some(), "the new rotation's access token is not recorded");
        ensure!(
            matches!(
                call!(store.rotate_with_grace(&t3, &format!("{family}.4"), now + 7200, now + 3, grace)),
                ConsumeOutcome::Rotated(_)
            ),
            "the new successor does not rotate (grace {grace})"
        );
    }
    Ok(())
}

/// Undoing a retry's commit (the flow could not sign the retry's pair):
/// the presented token was spent before the retry and stays spent, from
/// its first spend, so its reuse grace window keeps running from then; the
/// retry's successor, never handed out, stays stored for another retry
/// within that window, and the retry's access token record is deleted. A
/// token the retry could not make live again gives a stolen copy replayed
/// during a signing outage no more than the grace window.
async fn undo_leaves_a_retried_token_spent(store: &dyn Store) -> Check {
    let now = NOW;
    let mut restored = Vec::new();
    for family in ["fam-w", "fam-x"] {
        let (t1, t2, t3) = (format!("{family}.1"), format!("{family}.2"), format!("{family}.3"));
        let sid = format!("sid-{family}");
        call!(store.put_refresh(&t1, &refresh_record(family, &sid, now + 3600), now));
        call!(store.rotate_with_grace(&t1, &t2, now + 7200, now, 10));
        let j3 = format!("jti-{t3}");
        let retry = rotation(&t1, &t3, &j3, now + 7200, now + 1, 10);
        ensure_eq!(
            call!(store.commit_refresh(&retry, now + 1)),
            ConsumeOutcome::Retried(refresh_record(family, &sid, now + 3600)),
            "a retry within the window"
        );
        restored.push(call!(store.undo_refresh(&retry, Committed::Retried, now + 1)));
        ensure_eq!(call!(store.issued(&j3, now + 1)), None, "the undone retry's access token record");
    }
    // Within the window of the first spend: another retry, which replaces
    // the undone retry's successor.
    ensure_eq!(
        call!(store.rotate_with_grace("fam-w.1", "fam-w.4", now + 7200, now + 5, 10)),
        ConsumeOutcome::Retried(refresh_record("fam-w", "sid-fam-w", now + 3600)),
        "a retry within the window after a retry's undo"
    );
    ensure_eq!(
        call!(store.rotate_with_grace("fam-w.3", "fam-w.x", now + 7200, now + 6, 10)),
        ConsumeOutcome::Invalid,
        "the undone retry's successor, replaced"
    );
    ensure!(
        matches!(
            call!(store.rotate_with_grace("fam-w.4", "fam-w.5", now + 7200, now + 7, 10)),
            ConsumeOutcome::Rotated(_)
        ),
        "the new retry's successor does not rotate"
    );
    // Past the window of the first spend (though within 10 s of the
    // retry): a reuse.
    ensure_eq!(
        call!(store.rotate_with_grace("fam-x.1", "fam-x.4", now + 7200, now + 11, 10)),
        ConsumeOutcome::Reused(refresh_record("fam-x", "sid-fam-x", now + 3600)),
        "presenting a retried token after the window of its first spend"
    );
    ensure_eq!(restored, [false, false], "what the retries' undos answered (the token is live again)");
    Ok(())
}

/// An undo changes nothing once another commit moved on: its successor
/// was replaced by a retry, or used; and an undo of a commit that never
/// happened restores nothing.
async fn undo_leaves_a_rotation_that_moved_on(store: &dyn Store) -> Check {
    let now = NOW;
    call!(store.put_refresh("fam-m.1", &refresh_record("fam-m", "sid-m", now + 3600), now));
    let first = rotation("fam-m.1", "fam-m.2", "jti-fam-m.2", now + 7200, now, 10);
    call!(store.commit_refresh(&first, now));
    let retry = rotation("fam-m.1", "fam-m.3", "jti-fam-m.3", now + 7200, now + 1, 10);
    ensure!(matches!(call!(store.commit_refresh(&retry, now + 1)), ConsumeOutcome::Retried(_)), "a retry");
    ensure!(!call!(store.undo_refresh(&first, Committed::Rotated, now + 2)), "undid a rotation a retry replaced");
    let used = rotation("fam-m.3", "fam-m.4", "jti-fam-m.4", now + 7200, now + 3, 10);
    ensure!(
        matches!(call!(store.commit_refresh(&used, now + 3)), ConsumeOutcome::Rotated(_)),
        "the retry's successor after an undo of the replaced rotation"
    );
    ensure!(
        matches!(call!(store.rotate("fam-m.4", "fam-m.5", now + 7200, now + 4)), ConsumeOutcome::Rotated(_)),
        "the rotation's successor"
    );
    ensure!(
        !call!(store.undo_refresh(&used, Committed::Rotated, now + 5)),
        "undid a rotation whose successor was used"
    );
    ensure!(
        matches!(call!(store.rotate("fam-m.5", "fam-m.6", now + 7200, now + 6)), ConsumeOutcome::Rotated(_)),
        "the family after an undo of a used rotation"
    );
    let never = rotation("fam-m.9", "fam-m.10", "jti-fam-m.10", now + 7200, now, 0);
    for committed in [Committed::Rotated, Committed::Retried] {
        ensure!(
            !call!(store.undo_refresh(&never, committed, now)),
            "undid a commit that never happened ({committed:?})"
        );
    }
    call!(store.put_refresh("fam-m.20", &refresh_record("fam-m", "sid-m", now + 3600), now));
    let live = rotation("fam-m.20", "fam-m.21", "jti-fam-m.21", now + 7200, now, 0);
    ensure!(!call!(store.undo_refresh(&live, Committed::Rotated, now)), "undid a rotation of a token never spent");
    Ok(())
}

/// Revoking by refresh token in one step: the token's family (at least as
/// long as the token itself lives) or its session, spent or not, returned
/// with the token's record, made durable and published; an unknown or
/// expired token revokes nothing.
async fn revoke_by_refresh_token(store: &dyn Store, events: &mut broadcast::Receiver<Revocation>) -> Check {
    use RevocationKind::{Family, Sid};
    let now = NOW;
    call!(store.put_refresh("fam-r.1", &refresh_record("fam-r", "sid-rv", now + 3600), now));
    call!(store.put_refresh("fam-r2.1", &refresh_record("fam-r2", "sid-rv", now + 3600), now));
    // A floor below the token's own expiry: the token's wins.
    let family = RefreshRevoke { digest: "fam-r.1", kind: Family, until: now + 60 };
    ensure_eq!(
        call!(store.revoke_refresh(&family, now)),
        Some((refresh_record("fam-r", "sid-rv", now + 3600), revocation(Family, "fam-r", now + 3600))),
        "revoking a family by its token"
    );
    ensure_eq!(
        call!(store.rotate("fam-r.1", "fam-r.2", now + 7200, now + 1)),
        ConsumeOutcome::Invalid,
        "a token of the family revoked by refresh token"
    );
    ensure!(!call!(store.is_revoked("any-jti", Some("sid-rv"), now)), "revoking a family revoked its session");
    // A spent token still revokes; the floor above the expiry wins.
    call!(store.rotate("fam-r2.1", "fam-r2.2", now + 7200, now));
    let session = RefreshRevoke { digest: "fam-r2.1", kind: Sid, until: now + 9000 };
    ensure_eq!(
        call!(store.revoke_refresh(&session, now + 1)),
        Some((refresh_record("fam-r2", "sid-rv", now + 3600), revocation(Sid, "sid-rv", now + 9000))),
        "ending a session by a spent token of it"
    );
    ensure!(call!(store.is_revoked("any-jti", Some("sid-rv"), now + 8999)), "the session is not revoked");
    ensure_eq!(
        call!(store.rotate("fam-r2.2", "fam-r2.3", now + 7200, now + 2)),
        ConsumeOutcome::Invalid,
        "a refresh token of the session ended by refresh token"
    );
    let family_until = RefreshRevoke { digest: "fam-r2.2", kind: Family, until: now + 9500 };
    ensure_eq!(
        call!(store.revoke_refresh(&family_until, now + 2)).map(|(_, r)| r),
        Some(revocation(Family, "fam-r2", now + 9500)),
        "a family until a floor past the token's expiry"
    );
    for (digest, at, what) in
        [("fam-r.unknown", now, "an unknown token"), ("fam-r.1", now + 3600, "an expired token"), ("", now, "no token")]
    {
        for kind in [Family, Sid] {
            let r = RefreshRevoke { digest, kind, until: now + 99_999 };
            ensure_eq!(call!(store.revoke_refresh(&r, at)), None, "{what} ({kind:?})");
        }
    }
    // Events of earlier checks (their reuses) may still be arriving: only
    // this check's ids count.
    let mut heard = Vec::new();
    while heard.len() < 3 {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Ok(got)) if ["fam-r", "fam-r2", "sid-rv"].contains(&got.id.as_str()) => heard.push(got),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("the subscription failed: {e}")),
            Err(_) => return Err(format!("only {} of 3 events arrived: {heard:?}", heard.len())),
        }
    }
    let key = |r: &Revocation| (r.id.clone(), r.expires_at);
    heard.sort_by_key(key);
    let mut expected = vec![
        revocation(Family, "fam-r", now + 3600),
        revocation(Sid, "sid-rv", now + 9000),
        revocation(Family, "fam-r2", now + 9500),
    ];
    expected.sort_by_key(key);
    ensure_eq!(heard, expected, "the events heard");
    Ok(())
}
