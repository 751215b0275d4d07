//! How far the background index walk has got, for people waiting on it:
//! [`GzipReader::walk_progress`] for `seekable-index build`'s progress
//! bar, and a debug line every few seconds while a long walk runs (the
//! server's `-v`).  Kept apart from the walk itself, which only publishes
//! checkpoints: progress is read from what it has already published.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{GzipReader, Shared};
use crate::sync::{CondvarExt, LockExt};

/// A snapshot of the index walk.  The compressed side is what a progress
/// bar can use: its total is known from the start, the output's is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkProgress {
    /// Compressed bytes behind the walk's last checkpoint (all of them
    /// once the walk has finished).
    pub compressed_done: u64,
    pub compressed_total: u64,
    /// Decompressed bytes indexed so far.
    pub output_done: u64,
    /// The walk has ended (successfully or not: the reader's
    /// `wait_size` says which), or a saved index was loaded.
    pub done: bool,
}

impl Shared {
    fn walk_progress(&self) -> WalkProgress {
        let st = self.state.lock_unpoisoned();
        let finished = st.done && st.failed.is_none();
        WalkProgress {
            compressed_done: if finished {
                self.comp_size
            } else {
                st.cps.last().map_or(0, |c| c.inp)
            },
            compressed_total: self.comp_size,
            output_done: st.frontier,
            done: st.done,
        }
    }
}

impl GzipReader {
    /// How far the index walk has got (done at once for a saved index).
    pub fn walk_progress(&self) -> WalkProgress {
        self.sh.walk_progress()
    }
}

/// While the walk runs, log its progress at debug level every
/// `GzipOptions::progress_every` (a shorter walk logs nothing).  Nothing is
/// started unless debug logging is on.
pub(super) fn log_while_walking(sh: &Arc<Shared>) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let name = sh.name.clone();
    let sh = sh.clone();
    let spawned = std::thread::Builder::new()
        .name("gzip-index-log".into())
        .spawn(move || {
            let t0 = Instant::now();
            loop {
                let st = sh.state.lock_unpoisoned();
                // Woken early only by the walk's end (or the reader's
                // drop, which ends the walk).
                let st = sh
                    .cv
                    .wait_timeout_while_unpoisoned(st, sh.progress_every, |st| !st.done);
                if st.done || sh.stop.load(Ordering::Relaxed) {
                    return;
                }
                drop(st);
                let p = sh.walk_progress();
                let secs = t0.elapsed().as_secs_f64();
                let rate = p.compressed_done as f64 / secs;
                let left = if rate > 0.0 {
                    format!(
                        ", about {:.0} s left",
                        (p.compressed_total - p.compressed_done) as f64 / rate
                    )
                } else {
                    String::new()
                };
                tracing::debug!(
                    "{}: building the gzip index: {}% ({} of {} compressed bytes, {} bytes out), {:.1} MiB/s{left}",
                    sh.name,
                    p.compressed_done * 100 / p.compressed_total.max(1),
                    p.compressed_done,
                    p.compressed_total,
                    p.output_done,
                    rate / (1024.0 * 1024.0),
                );
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("{name}: no index progress log: {e}");
    }
}
