//! The worker pool that decodes ahead of readers.

use crate::sync::LockExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of worker threads fed through a bounded queue.  Jobs that do
/// not fit are dropped (they are only hints), so neither threads nor queued
/// work grow without bound.  Jobs hold a `Weak` to the reader, and dropping
/// the pool closes the queue, so workers exit when the reader goes away.
pub(crate) struct Pool {
    tx: SyncSender<Job>,
}

impl Pool {
    pub(crate) fn new(threads: usize, name: &str) -> Pool {
        let (tx, rx) = sync_channel::<Job>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("decode-{i}"))
                .spawn(move || loop {
                    let job = rx.lock_unpoisoned().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("{name}: cannot start decode thread: {e}");
            }
        }
        Pool { tx }
    }

    pub(crate) fn submit(&self, job: Job) {
        let _ = self.tx.try_send(job);
    }
}
