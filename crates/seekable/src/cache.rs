//! A byte-bounded LRU cache of decompressed blocks, shared by all readers
//! (all NBD connections) of one image.

use std::sync::{Arc, Mutex};

use crate::sync::LockExt;
use lru::LruCache;

/// Decompressed blocks keyed by a reader-chosen `u64` (block number or the
/// block's uncompressed offset), evicted least-recently-used once the total
/// size exceeds the bound.
pub struct BlockCache {
    inner: Mutex<Inner>,
}

struct Inner {
    map: LruCache<u64, Arc<[u8]>>,
    bytes: u64,
    max_bytes: u64,
}

impl BlockCache {
    /// A cache holding at most `max_bytes` of block data (at least one block
    /// is always kept, whatever its size, so a huge block can still be used).
    pub fn new(max_bytes: u64) -> Self {
        BlockCache {
            inner: Mutex::new(Inner {
                map: LruCache::unbounded(),
                bytes: 0,
                max_bytes,
            }),
        }
    }

    /// Look a block up, marking it most recently used.
    pub fn get(&self, key: u64) -> Option<Arc<[u8]>> {
        let mut inner = self.inner.lock_unpoisoned();
        inner.map.get(&key).cloned()
    }

    /// Insert a block, evicting old ones beyond the bound.
    pub fn insert(&self, key: u64, data: Arc<[u8]>) {
        drop(self.insert_evicting(key, data));
    }

    /// Insert a block and return the blocks evicted to make room (so a
    /// caller can keep them in a slower tier); they are returned rather
    /// than handled here so no I/O happens under the cache lock.
    pub fn insert_evicting(&self, key: u64, data: Arc<[u8]>) -> Vec<(u64, Arc<[u8]>)> {
        let mut inner = self.inner.lock_unpoisoned();
        let len = data.len() as u64;
        if let Some(old) = inner.map.put(key, data) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        let mut evicted = Vec::new();
        while inner.bytes > inner.max_bytes && inner.map.len() > 1 {
            match inner.map.pop_lru() {
                Some((k, old)) => {
                    inner.bytes -= old.len() as u64;
                    evicted.push((k, old));
                }
                None => break,
            }
        }
        evicted
    }

    /// Whether a block is cached, without touching its LRU position (used to
    /// skip scheduling decode-ahead of blocks already present).
    pub fn contains(&self, key: u64) -> bool {
        let inner = self.inner.lock_unpoisoned();
        inner.map.contains(&key)
    }

    /// Bytes of block data held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock_unpoisoned().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_exceeds_bound_beyond_one_block(sizes in proptest::collection::vec(1usize..5000, 1..100), bound in 1u64..20000) {
            let cache = BlockCache::new(bound);
            for (i, s) in sizes.iter().enumerate() {
                cache.insert(i as u64, vec![i as u8; *s].into());
                let last = cache.get(i as u64).expect("just inserted");
                prop_assert_eq!(last.len(), *s);
                prop_assert!(cache.bytes() <= bound.max(*s as u64));
            }
        }
    }
}
