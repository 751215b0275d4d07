//! Locks that survive a panic: a plugin or filter that panics while holding
//! a lock fails its own request (the server turns the panic into EIO), and
//! the data behind the lock is as the panicking code left it — the same as
//! in nbdkit, where a crashed callback leaves no poison behind.  Every
//! crate takes its locks through these instead of repeating
//! `.lock().unwrap_or_else(|e| e.into_inner())`.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] without poisoning.
pub trait LockExt<T: ?Sized> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`RwLock::read`] and [`RwLock::write`] without poisoning.
pub trait RwLockExt<T: ?Sized> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T>;
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_unpoisoned(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write_unpoisoned(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`Condvar::wait`] without poisoning, for the waits on a lock taken with
/// [`LockExt::lock_unpoisoned`].
pub trait CondvarExt {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;
    /// [`Condvar::wait_timeout`]: woken by a notification or after `timeout`.
    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
    ) -> MutexGuard<'a, T>;
}

impl CondvarExt for Condvar {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        self.wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_under_the_lock_does_not_poison_it() {
        let m = Mutex::new(1);
        let r = RwLock::new(2);
        let _ = std::panic::catch_unwind(|| {
            let _g = m.lock_unpoisoned();
            let _w = r.write_unpoisoned();
            panic!("while holding both");
        });
        assert!(m.is_poisoned() && r.is_poisoned());
        *m.lock_unpoisoned() += 1;
        *r.write_unpoisoned() += 1;
        assert_eq!((*m.lock_unpoisoned(), *r.read_unpoisoned()), (2, 3));
    }
}
