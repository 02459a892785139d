//! The password pool: argon2id verifications run on a few dedicated threads.
//! Each verification holds about 19 MiB, so a burst of logins queues here
//! instead of spreading that memory over every blocking thread of the
//! runtime, and token exchanges never wait behind it.

use std::sync::Arc;

use crate::error::AuthError;

type PasswordJob = Box<dyn FnOnce() + Send>;

/// A small fixed pool of threads for password hashing.
pub struct PasswordPool {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<PasswordJob>>,
}

impl PasswordPool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<PasswordJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new().name(format!("password-{i}")).spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password thread");
            }
        }
        Self { jobs: std::sync::Mutex::new(tx) }
    }

    /// A pool sized for this machine: one thread per core, two to four.
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
    }

    /// Runs `f` on the pool and waits for its result.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, AuthError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: PasswordJob = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .map_err(|_| AuthError::Internal("password pool poisoned"))?
            .send(job)
            .map_err(|_| AuthError::Internal("password pool stopped"))?;
        rx.await.map_err(|_| AuthError::Internal("password check failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_off_the_runtime_and_return_their_result() {
        let pool = PasswordPool::new(2);
        let name = pool.run(|| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert!(name.is_some_and(|n| n.starts_with("password-")));
        let results = futures_util::future::join_all((0..8).map(|i| pool.run(move || i * 2))).await;
        assert_eq!(
            results.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            (0..8).map(|i| i * 2).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn zero_threads_still_means_one_worker() {
        let pool = PasswordPool::new(0);
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }
}
