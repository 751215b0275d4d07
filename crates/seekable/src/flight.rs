//! Single-flight decoding: however many readers miss the same block at
//! once, one of them (the *leader*) decodes it and the others wait for its
//! result, errors included.  Decoding a block costs milliseconds of CPU and
//! a block-sized buffer, and a client with many requests in flight (nbdcopy
//! keeps 64) sends most of them into the same block, so without this every
//! one of them would decode it.
//!
//! Used by the engine (xz blocks, zstd frames, bzip2 blocks) and by gzip
//! (spans), with the caller's cache as the place a finished result is
//! found afterwards.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};

use crate::sync::{CondvarExt, LockExt};

/// The decodes in progress, by key.
pub(crate) struct Flights<K, T> {
    map: Mutex<HashMap<K, Arc<Flight<T>>>>,
}

struct Flight<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

enum State<T> {
    Running,
    Done(T),
    /// The leader panicked: a waiter starts again (and may lead).
    Abandoned,
}

impl<K: Hash + Eq + Copy, T: Clone> Flights<K, T> {
    pub(crate) fn new() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a decode of `key` is in progress (for read-ahead, which
    /// then has nothing to do).
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.map.lock_unpoisoned().contains_key(key)
    }

    /// The result for `key`: the one in flight if there is one, else what
    /// `cached` finds, else `decode`'s, run on this thread while others
    /// wait for it.  `cached` is asked under the map's lock and `decode`
    /// must leave a good result where `cached` finds it before returning:
    /// then a caller cannot miss both the flight and the result.
    pub(crate) fn run(
        &self,
        key: K,
        cached: impl Fn() -> Option<T>,
        decode: impl FnOnce() -> T,
    ) -> T {
        loop {
            let flight = {
                let mut map = self.map.lock_unpoisoned();
                match map.get(&key) {
                    Some(f) => f.clone(),
                    None => {
                        if let Some(v) = cached() {
                            return v;
                        }
                        let flight = Arc::new(Flight {
                            state: Mutex::new(State::Running),
                            cv: Condvar::new(),
                        });
                        map.insert(key, flight.clone());
                        drop(map);
                        let mut lead = Lead {
                            flights: self,
                            key,
                            flight,
                            result: None,
                        };
                        let v = decode();
                        lead.result = Some(v.clone());
                        return v;
                    }
                }
            };
            let mut st = flight.state.lock_unpoisoned();
            loop {
                match &*st {
                    State::Running => st = flight.cv.wait_unpoisoned(st),
                    State::Done(v) => return v.clone(),
                    State::Abandoned => break,
                }
            }
        }
    }
}

/// The leader's side of a flight: dropping it (also by a panic in the
/// decode) ends the flight and wakes its waiters.
struct Lead<'a, K: Hash + Eq, T> {
    flights: &'a Flights<K, T>,
    key: K,
    flight: Arc<Flight<T>>,
    result: Option<T>,
}

impl<K: Hash + Eq, T> Drop for Lead<'_, K, T> {
    fn drop(&mut self) {
        // Out of the map first: a caller arriving from now on finds the
        // result through `cached` (or, after a failure, decodes afresh).
        self.flights.map.lock_unpoisoned().remove(&self.key);
        let mut st = self.flight.state.lock_unpoisoned();
        *st = match self.result.take() {
            Some(v) => State::Done(v),
            None => State::Abandoned,
        };
        drop(st);
        self.flight.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn one_decode_for_many_readers_and_its_error_reaches_all() {
        let flights: Flights<u64, Result<u64, String>> = Flights::new();
        let decodes = AtomicUsize::new(0);
        // The leader holds its decode open until every other reader has
        // joined the flight.
        let joined = Barrier::new(2);
        let readers = 8;
        let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
            let leader = s.spawn(|| {
                flights.run(
                    7,
                    || None,
                    || {
                        decodes.fetch_add(1, Ordering::SeqCst);
                        joined.wait();
                        Err("corrupt block 7".to_string())
                    },
                )
            });
            // Wait until the leader is inside its decode.
            while !flights.contains(&7) {
                std::thread::yield_now();
            }
            let others: Vec<_> = (0..readers)
                .map(|_| {
                    s.spawn(|| {
                        flights.run(
                            7,
                            || None,
                            || {
                                decodes.fetch_add(1, Ordering::SeqCst);
                                Ok(1)
                            },
                        )
                    })
                })
                .collect();
            // Waiters block on the flight's condition variable; once the
            // leader is released they all get its result.
            while Arc::strong_count(flights.map.lock_unpoisoned().get(&7).unwrap()) < readers + 2 {
                std::thread::yield_now();
            }
            joined.wait();
            let mut all = vec![leader.join().unwrap()];
            all.extend(others.into_iter().map(|h| h.join().unwrap()));
            all
        });
        assert_eq!(decodes.load(Ordering::SeqCst), 1);
        assert!(results
            .iter()
            .all(|r| r.as_ref().map_err(|e| e.as_str()) == Err("corrupt block 7")));
        assert!(!flights.contains(&7));
    }

    #[test]
    fn a_finished_result_is_found_through_cached() {
        let flights: Flights<u64, u64> = Flights::new();
        assert_eq!(flights.run(1, || None, || 10), 10);
        assert_eq!(flights.run(1, || Some(11), || panic!("decoded twice")), 11);
    }

    #[test]
    fn a_panicking_leader_lets_a_waiter_take_over() {
        let flights: Flights<u64, u64> = Flights::new();
        let go = Barrier::new(2);
        let got = std::thread::scope(|s| {
            let leader = s.spawn(|| {
                flights.run(
                    3,
                    || None,
                    || {
                        go.wait();
                        // Let the waiter join the flight before failing.
                        while Arc::strong_count(flights.map.lock_unpoisoned().get(&3).unwrap()) < 3
                        {
                            std::thread::yield_now();
                        }
                        panic!("decoder bug")
                    },
                )
            });
            go.wait();
            let waiter = s.spawn(|| flights.run(3, || None, || 42));
            assert!(leader.join().is_err());
            waiter.join().unwrap()
        });
        assert_eq!(got, 42);
        assert!(!flights.contains(&3));
    }
}
