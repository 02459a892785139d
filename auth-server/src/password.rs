//! The password pool: argon2id checks run on a few dedicated threads behind
//! a bounded queue, each thread reusing one argon2 memory block.
//!
//! - **Bounded.** At most [`PoolConfig::queue`] checks wait. When the queue
//!   is full, [`PasswordPool::run`] fails at once with
//!   [`AuthError::ResourceExhausted`], so a flood of Logins costs a bounded
//!   amount of CPU and memory, and a real user gets a prompt answer instead
//!   of a timeout.
//! - **Abandoned checks are skipped.** A check whose caller has gone (the
//!   request was cancelled, its deadline passed or its connection closed) is
//!   dropped unrun, and dropped from a full queue to make room.
//! - **Memory comes back.** A thread keeps one argon2 block (19 MiB at the
//!   default parameters) while it has work and frees it after
//!   [`PoolConfig::linger`] without any. The block is reserved with a
//!   capacity of at least [`MMAP_FLOOR_BYTES`]: glibc serves requests above
//!   its dynamic mmap threshold, which never rises past 32 MiB, with `mmap`,
//!   so freeing the block gives its pages back to the kernel. A plain 19 MiB
//!   allocation would come from a per-thread arena that glibc does not trim,
//!   and each password thread would pin it for good.
//!
//! ExchangeToken, Refresh and Revoke never touch this pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

use crate::error::AuthError;

/// The smallest capacity reserved for an argon2 block, in bytes: above
/// glibc's largest dynamic mmap threshold (32 MiB on 64-bit), so the block
/// is always mapped and unmapped, never kept in an arena.
pub const MMAP_FLOOR_BYTES: usize = 32 * 1024 * 1024 + 64 * 1024;

/// Largest argon2 memory cost accepted in a password hash, in KiB (256 MiB):
/// each password thread may hold one block of this size.
pub const MAX_M_COST_KIB: u32 = 256 * 1024;

/// The argon2 working memory of one password thread, reused from one check
/// to the next.
#[derive(Default)]
pub struct PasswordMemory {
    blocks: Vec<Block>,
}

impl std::fmt::Debug for PasswordMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordMemory").field("held_bytes", &self.held_bytes()).finish()
    }
}

impl PasswordMemory {
    /// `count` blocks, grown (never shrunk) as needed. Their contents are
    /// whatever the last check left: argon2 overwrites every block before it
    /// reads it.
    fn blocks(&mut self, count: usize) -> &mut [Block] {
        if self.blocks.capacity() < count {
            let floor = MMAP_FLOOR_BYTES.div_ceil(Block::SIZE);
            self.blocks = Vec::with_capacity(count.max(floor));
        }
        if self.blocks.len() < count {
            self.blocks.resize(count, Block::default());
        }
        &mut self.blocks[..count]
    }

    /// Bytes of blocks in use (those touched, so resident).
    pub fn held_bytes(&self) -> usize {
        self.blocks.len() * Block::SIZE
    }

    /// Frees the blocks.
    pub fn release(&mut self) {
        self.blocks = Vec::new();
    }
}

/// Checks `password` against an argon2 PHC string, computing in `memory`.
/// Any unusable hash is a mismatch.
pub fn verify(phc: &str, password: &[u8], memory: &mut PasswordMemory) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else { return false };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&hash) else { return false };
    if params.m_cost() > MAX_M_COST_KIB {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    let count = params.block_count();
    let argon = Argon2::new(algorithm, version, params);
    if argon.hash_password_into_with_memory(password, salt, out, memory.blocks(count)).is_err() {
        return false;
    }
    expected.as_bytes().ct_eq(out).into()
}

/// An argon2id PHC hash of `password` with the default parameters and a
/// random salt, computed in `memory`.
pub fn hash(password: &[u8], memory: &mut PasswordMemory) -> Result<String, AuthError> {
    hash_as(password, Algorithm::Argon2id, Version::V0x13, Params::default(), memory)
}

/// A PHC hash of `password` with this algorithm, version and parameters and
/// a random salt, computed in `memory`.
pub fn hash_as(
    password: &[u8],
    algorithm: Algorithm,
    version: Version,
    params: Params,
    memory: &mut PasswordMemory,
) -> Result<String, AuthError> {
    const FAILED: AuthError = AuthError::Internal("password hashing failed");
    let mut salt_bytes = [0u8; 16];
    SystemRandom::new().fill(&mut salt_bytes).map_err(|_| AuthError::Internal("random generator failed"))?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| FAILED)?;
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
    let count = params.block_count();
    let params_string = ParamsString::try_from(&params).map_err(|_| FAILED)?;
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, &salt_bytes, out, memory.blocks(count))
        .map_err(|_| FAILED)?;
    let phc = PasswordHash {
        algorithm: algorithm.ident(),
        version: Some(version.into()),
        params: params_string,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(out).map_err(|_| FAILED)?),
    };
    Ok(phc.to_string())
}

/// Sizes of a [`PasswordPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Worker threads (at least one).
    pub threads: usize,
    /// Checks that may wait for a thread (at least one).
    pub queue: usize,
    /// How long an idle thread keeps its argon2 block.
    pub linger: Duration,
    /// Niceness of the worker threads (0-19): above 0, token calls on the
    /// runtime's threads win the CPU from a busy pool.
    pub nice: u8,
}

impl PoolConfig {
    /// The default linger: long enough to keep the block through a burst.
    pub const LINGER: Duration = Duration::from_secs(1);

    /// One thread per core, two to four (one on a one-core machine).
    pub fn threads_for_this_machine() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self { threads: Self::threads_for_this_machine(), queue: 64, linger: Self::LINGER, nice: 10 }
    }
}

/// What a [`PasswordPool`] has done, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Worker threads.
    pub threads: usize,
    /// Queue capacity.
    pub capacity: usize,
    /// Checks waiting now.
    pub waiting: usize,
    /// Checks run (counted as they start).
    pub ran: u64,
    /// Checks skipped because their caller had gone.
    pub skipped: u64,
    /// Checks refused because the queue was full.
    pub refused: u64,
}

/// A queued check.
trait Job: Send {
    /// The caller has gone: nobody waits for the result.
    fn abandoned(&self) -> bool;
    /// Runs the check and hands over the result.
    fn run(self: Box<Self>, memory: &mut PasswordMemory);
}

struct Task<F, T> {
    f: F,
    reply: tokio::sync::oneshot::Sender<T>,
}

impl<F, T> Job for Task<F, T>
where
    F: FnOnce(&mut PasswordMemory) -> T + Send,
    T: Send,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(self: Box<Self>, memory: &mut PasswordMemory) {
        let Task { f, reply } = *self;
        let _ = reply.send(f(memory));
    }
}

struct State {
    jobs: VecDeque<Box<dyn Job>>,
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    config: PoolConfig,
    ran: AtomicU64,
    skipped: AtomicU64,
    refused: AtomicU64,
}

/// A small fixed pool of threads for password hashing, behind a bounded
/// queue. Dropping it stops the threads; checks still queued then fail.
pub struct PasswordPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PasswordPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordPool").field("stats", &self.stats()).finish()
    }
}

impl PasswordPool {
    /// Starts `config.threads` workers (at least one) with a queue of
    /// `config.queue` (at least one).
    pub fn new(config: PoolConfig) -> Self {
        let config = PoolConfig { threads: config.threads.max(1), queue: config.queue.max(1), ..config };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { jobs: VecDeque::new(), stopped: false }),
            work: Condvar::new(),
            config,
            ran: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        for i in 0..config.threads {
            let shared = Arc::clone(&shared);
            let nice = config.nice;
            let spawned = std::thread::Builder::new().name(format!("password-{i}")).spawn(move || {
                lower_priority(nice);
                worker(&shared)
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password thread");
            }
        }
        Self { shared }
    }

    /// Runs `f` on the pool with the thread's argon2 memory and waits for its
    /// result. Fails at once with [`AuthError::ResourceExhausted`] when the
    /// queue is full. Dropping the returned future abandons the check: a
    /// thread skips it.
    pub async fn run<T, F>(&self, f: F) -> Result<T, AuthError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PasswordMemory) -> T + Send + 'static,
    {
        let (reply, result) = tokio::sync::oneshot::channel();
        {
            let mut state = self.shared.state.lock().map_err(|_| AuthError::Internal("password pool poisoned"))?;
            if state.stopped {
                return Err(AuthError::Internal("password pool stopped"));
            }
            if state.jobs.len() >= self.shared.config.queue {
                // Make room from callers that have gone before refusing.
                let before = state.jobs.len();
                state.jobs.retain(|job| !job.abandoned());
                let gone = before - state.jobs.len();
                self.shared.skipped.fetch_add(gone as u64, Ordering::Relaxed);
            }
            if state.jobs.len() >= self.shared.config.queue {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                return Err(AuthError::ResourceExhausted("server busy: too many password checks waiting"));
            }
            state.jobs.push_back(Box::new(Task { f, reply }));
        }
        self.shared.work.notify_one();
        result.await.map_err(|_| AuthError::Internal("password check failed"))
    }

    /// Counters and the current queue length.
    pub fn stats(&self) -> PoolStats {
        let waiting = self.shared.state.lock().map_or(0, |s| s.jobs.len());
        PoolStats {
            threads: self.shared.config.threads,
            capacity: self.shared.config.queue,
            waiting,
            ran: self.shared.ran.load(Ordering::Relaxed),
            skipped: self.shared.skipped.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PasswordPool {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stopped = true;
            state.jobs.clear();
        }
        self.shared.work.notify_all();
    }
}

/// What a worker does next.
enum Next {
    Run(Box<dyn Job>),
    Release,
    Stop,
}

fn next(shared: &Shared, holding_memory: bool) -> Next {
    let Ok(mut state) = shared.state.lock() else { return Next::Stop };
    loop {
        if state.stopped {
            return Next::Stop;
        }
        while let Some(job) = state.jobs.pop_front() {
            if !job.abandoned() {
                return Next::Run(job);
            }
            shared.skipped.fetch_add(1, Ordering::Relaxed);
        }
        if holding_memory {
            let Ok((s, wait)) = shared.work.wait_timeout(state, shared.config.linger) else { return Next::Stop };
            state = s;
            if wait.timed_out() && state.jobs.is_empty() && !state.stopped {
                return Next::Release;
            }
        } else {
            let Ok(s) = shared.work.wait(state) else { return Next::Stop };
            state = s;
        }
    }
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux applies
/// `setpriority(PRIO_PROCESS, tid)` to that one thread). Raising niceness
/// needs no privilege; a failure is logged and the thread runs as is.
#[allow(unsafe_code)] // two libc calls on the calling thread; std has no thread priority API
fn lower_priority(nice: u8) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread, with no pointers.
        let done = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, libc::c_int::from(nice))
        };
        if done != 0 {
            tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower a password thread's priority");
        }
    }
}

/// The calling thread's niceness (Linux), for tests.
#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)] // as in `lower_priority`
fn current_nice() -> i32 {
    // SAFETY: as in `lower_priority`.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}

fn worker(shared: &Shared) {
    let mut memory = PasswordMemory::default();
    loop {
        match next(shared, memory.held_bytes() > 0) {
            Next::Run(job) => {
                // Counted as it starts, so a caller that has its result sees
                // it counted.
                shared.ran.fetch_add(1, Ordering::Relaxed);
                // A panicking check fails its caller (the reply is dropped),
                // not the thread.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(&mut memory)));
                if run.is_err() {
                    memory.release();
                }
            }
            // Outside the lock: unmapping takes a moment.
            Next::Release => memory.release(),
            Next::Stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::FutureExt as _;

    use super::*;

    fn pool(threads: usize, queue: usize) -> PasswordPool {
        PasswordPool::new(PoolConfig { threads, queue, linger: Duration::from_millis(50), nice: 0 })
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn password_threads_run_at_the_configured_niceness() {
        let niced = PasswordPool::new(PoolConfig { threads: 1, queue: 1, linger: Duration::ZERO, nice: 7 });
        assert_eq!(niced.run(|_| current_nice()).await.unwrap(), 7);
        assert_eq!(pool(1, 1).run(|_| current_nice()).await.unwrap(), 0, "nice 0 leaves the thread as it is");
    }

    /// Occupies every thread of `pool` until the returned sender is dropped
    /// (or sent to); resolves once they are all busy.
    async fn block_threads(pool: &Arc<PasswordPool>) -> Vec<std::sync::mpsc::Sender<()>> {
        let mut gates = Vec::new();
        for _ in 0..pool.stats().threads {
            let (gate, wait) = std::sync::mpsc::channel::<()>();
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let p = Arc::clone(pool);
            tokio::spawn(async move {
                p.run(move |_| {
                    let _ = started_tx.send(());
                    let _ = wait.recv();
                })
                .await
            });
            started.await.unwrap();
            gates.push(gate);
        }
        gates
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached in 5 s");
    }

    #[tokio::test]
    async fn jobs_run_off_the_runtime_and_return_their_result() {
        let pool = pool(2, 16);
        let name = pool.run(|_| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert!(name.is_some_and(|n| n.starts_with("password-")));
        let results = futures_util::future::join_all((0..8).map(|i| pool.run(move |_| i * 2))).await;
        assert_eq!(
            results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            (0..8).map(|i| i * 2).collect::<Vec<_>>()
        );
        assert_eq!(pool.stats().ran, 9);
    }

    #[tokio::test]
    async fn zero_threads_still_means_one_worker() {
        let pool = pool(0, 0);
        assert_eq!(pool.run(|_| 7).await.unwrap(), 7);
        assert_eq!((pool.stats().threads, pool.stats().capacity), (1, 1));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let pool = Arc::new(pool(1, 2));
        let gates = block_threads(&pool).await;
        let waiting: Vec<_> = (0..2)
            .map(|i| {
                tokio::spawn({
                    let p = Arc::clone(&pool);
                    async move { p.run(move |_| i).await }
                })
            })
            .collect();
        until(|| pool.stats().waiting == 2).await;
        // Refused without waiting: the future is ready on its first poll.
        let refused = pool.run(|_| 99).now_or_never().expect("answered at once");
        assert!(matches!(refused, Err(AuthError::ResourceExhausted(_))), "{refused:?}");
        assert_eq!(pool.stats().refused, 1);
        drop(gates);
        for (i, w) in waiting.into_iter().enumerate() {
            assert_eq!(w.await.unwrap().unwrap(), i);
        }
    }

    #[tokio::test]
    async fn checks_whose_caller_has_gone_are_skipped() {
        let pool = Arc::new(pool(1, 16));
        let gates = block_threads(&pool).await;
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..5 {
            let ran = Arc::clone(&ran);
            // Polled once (queued), then dropped: the caller has gone.
            assert!(pool.run(move |_| ran.fetch_add(1, Ordering::SeqCst)).now_or_never().is_none());
        }
        assert_eq!(pool.stats().waiting, 5);
        let kept = tokio::spawn({
            let p = Arc::clone(&pool);
            async move { p.run(|_| "kept").await }
        });
        drop(gates);
        assert_eq!(kept.await.unwrap().unwrap(), "kept");
        until(|| pool.stats().skipped == 5).await;
        assert_eq!(ran.load(Ordering::SeqCst), 0, "an abandoned check ran");
        assert_eq!(pool.stats().ran, 2, "the blocking check and the kept one");
    }

    #[tokio::test]
    async fn a_full_queue_makes_room_from_abandoned_checks() {
        let pool = Arc::new(pool(1, 2));
        let gates = block_threads(&pool).await;
        for _ in 0..2 {
            assert!(pool.run(|_| ()).now_or_never().is_none());
        }
        let kept = tokio::spawn({
            let p = Arc::clone(&pool);
            async move { p.run(|_| "room").await }
        });
        until(|| pool.stats().skipped == 2).await;
        drop(gates);
        assert_eq!(kept.await.unwrap().unwrap(), "room");
        assert_eq!(pool.stats().refused, 0);
    }

    #[tokio::test]
    async fn a_panicking_check_fails_its_caller_and_the_thread_goes_on() {
        let pool = pool(1, 4);
        let err = pool.run(|_| -> u8 { panic!("boom") }).await.unwrap_err();
        assert!(matches!(err, AuthError::Internal(_)));
        assert_eq!(pool.run(|_| 1).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_idle_thread_frees_its_argon2_block() {
        let pool = pool(1, 4);
        let phc = hash(b"pw", &mut PasswordMemory::default()).unwrap();
        let p = phc.clone();
        let held = pool
            .run(move |mem| {
                assert!(verify(&p, b"pw", mem));
                mem.held_bytes()
            })
            .await
            .unwrap();
        assert_eq!(held, 19 * 1024 * 1024, "default argon2id parameters use 19 MiB");
        // The block is kept through a burst...
        let p = phc.clone();
        assert_eq!(
            pool.run(move |mem| {
                verify(&p, b"x", mem);
                mem.held_bytes()
            })
            .await
            .unwrap(),
            held
        );
        // ...and freed once the thread has been idle for the linger time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.run(|mem| mem.held_bytes()).await.unwrap(), 0);
    }

    #[test]
    fn hashes_verify_with_reused_memory_and_interoperate_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let mut mem = PasswordMemory::default();
        let ours = hash(b"correct horse", &mut mem).unwrap();
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{ours}");
        assert!(verify(&ours, b"correct horse", &mut mem));
        assert!(!verify(&ours, b"correct horse!", &mut mem));
        // Theirs, checked by us; ours, checked by them.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default().hash_password(b"battery", &salt).unwrap().to_string();
        assert!(verify(&theirs, b"battery", &mut mem));
        assert!(!verify(&theirs, b"staple", &mut mem));
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        // Other parameters and algorithms, in the same memory.
        let small = Argon2::new(Algorithm::Argon2i, Version::V0x10, Params::new(64, 3, 2, Some(24)).unwrap())
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        assert!(verify(&small, b"pw", &mut mem));
        assert!(!verify(&small, b"pW", &mut mem));
        // Hashing with other parameters, as the argon2 crate would.
        let params = Params::new(64, 3, 2, Some(24)).unwrap();
        let ours = hash_as(b"pw", Algorithm::Argon2i, Version::V0x10, params, &mut mem).unwrap();
        assert!(ours.starts_with("$argon2i$v=16$m=64,t=3,p=2$"), "{ours}");
        assert!(verify(&ours, b"pw", &mut mem));
        assert!(Argon2::default().verify_password(b"pw", &PasswordHash::new(&ours).unwrap()).is_ok());
    }

    #[test]
    fn unusable_hashes_never_match() {
        let mut mem = PasswordMemory::default();
        for phc in [
            "",
            "not a hash",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
            "$argon2id$v=99$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "$scrypt$ln=16,r=8,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            // 1 TiB of memory: refused before anything is allocated.
            "$argon2id$v=19$m=1073741824,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(!verify(phc, b"", &mut mem), "{phc}");
        }
        assert_eq!(mem.held_bytes(), 0);
    }
}
