//! Single-flight decoding: one decode per block, other readers wait for it.

use std::sync::{Arc, Condvar, Mutex};

use crate::sync::{CondvarExt, LockExt};
use crate::{clone_error, Result};

/// A decode in progress that other readers can wait for.
#[derive(Default)]
pub(crate) struct Flight {
    result: Mutex<Option<Result<Arc<[u8]>>>>,
    cv: Condvar,
}

impl Flight {
    pub(crate) fn wait(&self) -> Result<Arc<[u8]>> {
        let mut r = self.result.lock_unpoisoned();
        loop {
            match &*r {
                Some(Ok(b)) => return Ok(b.clone()),
                Some(Err(e)) => return Err(clone_error(e)),
                None => r = self.cv.wait_unpoisoned(r),
            }
        }
    }
    pub(crate) fn complete(&self, res: &Result<Arc<[u8]>>) {
        let mut r = self.result.lock_unpoisoned();
        *r = Some(match res {
            Ok(b) => Ok(b.clone()),
            Err(e) => Err(clone_error(e)),
        });
        self.cv.notify_all();
    }
}
