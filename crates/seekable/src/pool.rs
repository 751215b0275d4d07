//! A fixed set of worker threads fed through a bounded queue: the one
//! place this crate runs work in the background.  Readers use it for
//! decode-ahead and for the later blocks of a read that spans several
//! (`offer`: a hint, dropped when the queue is full, so neither threads nor
//! queued work grow without bound); the gzip index walk uses one for its
//! parallel inflating (`submit`: work that must run, so it waits for room).
//!
//! Jobs must not keep their reader alive (they hold a `Weak` to it, or
//! what they need and no more).  Dropping the pool discards the jobs still
//! queued, lets the running ones finish and joins the workers, so no
//! thread outlives the reader that owned the pool.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::sync::LockExt;

pub(crate) type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Pool {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    closed: Arc<AtomicBool>,
}

impl Pool {
    /// `threads` workers named `name-N`, and room for `queue` jobs waiting
    /// for one.  `what` names the owner in the warning logged when a
    /// thread cannot be started (the pool then runs with fewer).
    pub(crate) fn new(threads: usize, queue: usize, name: &str, what: &str) -> Pool {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let closed = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, closed) = (rx.clone(), closed.clone());
            match std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work(&rx, &closed))
            {
                Ok(h) => workers.push(h),
                Err(e) => tracing::warn!("{what}: cannot start {name} thread: {e}"),
            }
        }
        Pool {
            tx: Some(tx),
            workers,
            closed,
        }
    }

    /// Number of workers running.
    pub(crate) fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Run `job` if there is room in the queue; otherwise drop it (it is
    /// only a hint).  Returns whether it was queued.
    pub(crate) fn offer(&self, job: Job) -> bool {
        match &self.tx {
            Some(tx) if !self.workers.is_empty() => !matches!(
                tx.try_send(job),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
            ),
            _ => false,
        }
    }

    /// Queue `job`, waiting for room.  False (and `job` dropped unrun)
    /// only when the pool has no workers.
    pub(crate) fn submit(&self, job: Job) -> bool {
        match &self.tx {
            Some(tx) if !self.workers.is_empty() => tx.send(job).is_ok(),
            _ => false,
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>, closed: &AtomicBool) {
    loop {
        let job = rx.lock_unpoisoned().recv();
        let Ok(job) = job else { break };
        if closed.load(Ordering::Acquire) {
            // The owner is gone: what is still queued has nobody to serve.
            continue;
        }
        // A panicking job (a decoder bug) must not take the worker with
        // it: the pool would shrink silently.  Its waiters learn of it
        // through the job's own channel or flight.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        // Closing the queue ends each worker once it has emptied it.
        drop(self.tx.take());
        let me = std::thread::current().id();
        for h in self.workers.drain(..) {
            // A job never owns its pool, but if one ever did, the pool
            // would be dropped on its own worker: that one cannot wait
            // for itself, and it ends when the job returns anyway.
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{mpsc, Barrier};

    #[test]
    fn offered_jobs_beyond_the_queue_are_dropped_and_submitted_ones_all_run() {
        let pool = Pool::new(1, 2, "test", "pool test");
        let ran = Arc::new(AtomicUsize::new(0));
        // Hold the only worker (once it has taken this job off the
        // queue) so the queue fills.
        let started = Arc::new(Barrier::new(2));
        let hold = Arc::new(Barrier::new(2));
        let (s, h) = (started.clone(), hold.clone());
        assert!(pool.submit(Box::new(move || {
            s.wait();
            h.wait();
        })));
        started.wait();
        let queued = (0..10)
            .filter(|_| {
                let ran = ran.clone();
                pool.offer(Box::new(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                }))
            })
            .count();
        assert_eq!(queued, 2);
        hold.wait();
        let (tx, rx) = mpsc::channel();
        for i in 0..20 {
            let tx = tx.clone();
            assert!(pool.submit(Box::new(move || tx.send(i).unwrap())));
        }
        let mut got: Vec<i32> = rx.iter().take(20).collect();
        got.sort();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        drop(pool);
        assert_eq!(ran.load(Ordering::SeqCst), queued);
    }

    #[test]
    fn a_panicking_job_keeps_its_worker() {
        let pool = Pool::new(1, 4, "test", "pool test");
        assert!(pool.submit(Box::new(|| panic!("decoder bug"))));
        let (tx, rx) = mpsc::channel();
        assert!(pool.submit(Box::new(move || tx.send(5).unwrap())));
        assert_eq!(rx.recv().unwrap(), 5);
    }

    #[test]
    fn drop_discards_queued_jobs_and_joins_the_workers() {
        let pool = Pool::new(2, 8, "test", "pool test");
        assert_eq!(pool.threads(), 2);
        let started = Arc::new(Barrier::new(3));
        let ran = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let (s, d, closed) = (started.clone(), done.clone(), pool.closed.clone());
            pool.submit(Box::new(move || {
                s.wait();
                // Still running when the pool is dropped.
                while !closed.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                d.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for _ in 0..6 {
            let r = ran.clone();
            pool.submit(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }));
        }
        // Both workers are busy; the six jobs wait in the queue.
        started.wait();
        drop(pool);
        // The running jobs finished before drop returned; the queued ones
        // never ran.
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn no_workers_means_nothing_is_accepted() {
        let pool = Pool::new(0, 4, "test", "pool test");
        assert!(!pool.offer(Box::new(|| {})));
        assert!(!pool.submit(Box::new(|| {})));
    }
}
