//! Locks that survive a panic.  A decoder that panics while holding a lock
//! (a bug, or a codec library's assertion) fails the read it was serving;
//! the cache, the in-flight maps and the walk's state stay usable for every
//! other reader.  Every lock and condition-variable wait in this crate goes
//! through these instead of repeating `.unwrap_or_else(|e| e.into_inner())`.
//!
//! The server's `nbdkit-backend` crate has the same helpers; this crate
//! keeps its own so that it stays usable without the server.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] without poisoning.
pub(crate) trait LockExt<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
    /// [`Mutex::into_inner`] without poisoning.
    fn into_inner_unpoisoned(self) -> T;
}

impl<T> LockExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn into_inner_unpoisoned(self) -> T {
        self.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`RwLock::read`] and [`RwLock::write`] without poisoning.
pub(crate) trait RwLockExt<T: ?Sized> {
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

/// [`Condvar::wait`] and [`Condvar::wait_timeout_while`] without poisoning.
pub(crate) trait CondvarExt {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;
    /// Wait until `keep_waiting` is false or `timeout` has passed.
    fn wait_timeout_while_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
        keep_waiting: impl FnMut(&mut T) -> bool,
    ) -> MutexGuard<'a, T>;
}

impl CondvarExt for Condvar {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
    fn wait_timeout_while_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: std::time::Duration,
        keep_waiting: impl FnMut(&mut T) -> bool,
    ) -> MutexGuard<'a, T> {
        self.wait_timeout_while(guard, timeout, keep_waiting)
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

    #[test]
    fn a_poisoned_mutex_can_still_be_waited_on() {
        let m = std::sync::Arc::new(Mutex::new(false));
        let cv = std::sync::Arc::new(Condvar::new());
        let _ = std::panic::catch_unwind(|| {
            let _g = m.lock_unpoisoned();
            panic!("poison it");
        });
        let (m2, cv2) = (m.clone(), cv.clone());
        let t = std::thread::spawn(move || {
            *m2.lock_unpoisoned() = true;
            cv2.notify_all();
        });
        let mut g = m.lock_unpoisoned();
        while !*g {
            g = cv.wait_unpoisoned(g);
        }
        drop(g);
        t.join().unwrap();
        assert!(m.is_poisoned());
    }
}
