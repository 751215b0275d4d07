//! Soak: many concurrent clients doing verified random I/O against
//! `memory` and `file`, plus connection churn, in two identical rounds.
//! Bounded by operation counts, not time.  Checks: every read matches a
//! model of the disk, the whole disk matches it at the end of each round,
//! the server's descriptors return to their baseline once the clients have
//! gone, and its RSS after the second round is not meaningfully above the
//! RSS after the first (no per-request or per-connection leak).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

const SIZE: usize = 32 << 20;
const BLOCK: usize = 64 * 1024;
const THREADS: usize = 8;
/// Batches per thread per round; a batch is 1 to 4 pipelined requests.
const BATCHES: usize = 600;
/// Reconnect every this many batches.
const RECONNECT: usize = 25;
/// Connect/negotiate/leave cycles of the churn thread per round.
const CHURN: usize = 100;

fn connect(s: &Server, rng: &mut Rng) -> RawClient {
    let mut c = RawClient::start(&s.socket);
    // Mix simple and structured replies.
    c.go(rng.below(2) == 0, false, false);
    c
}

enum Pending {
    Ack,
    Read { offset: usize, len: usize },
}

/// One client thread: `BATCHES` batches of writes, zeroes, flushes and
/// verified reads on the blocks it owns (block % THREADS == id).
fn client_thread(s: &Server, model: &Mutex<Vec<u8>>, id: usize, seed: u64) -> usize {
    let mut rng = Rng(seed * 1000 + id as u64 + 1);
    let mut c = connect(s, &mut rng);
    let mut ops = 0;
    let owned = SIZE / BLOCK / THREADS;
    for batch in 0..BATCHES {
        if batch > 0 && batch % RECONNECT == 0 {
            c.request(CMD_DISC, 0, 0, 0, 0, &[]);
            c = connect(s, &mut rng);
        }
        let k = 1 + rng.below(4) as usize;
        // Distinct blocks, so the requests in a batch commute.
        let mut blocks = Vec::new();
        while blocks.len() < k {
            let b = (rng.below(owned as u64) as usize) * THREADS + id;
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        for (n, b) in blocks.into_iter().enumerate() {
            let within = rng.below(BLOCK as u64) as usize;
            let len = 1 + rng.below((BLOCK - within) as u64) as usize;
            let offset = b * BLOCK + within;
            let cookie = (batch * 8 + n) as u64;
            let fua = if rng.below(4) == 0 { CMD_FLAG_FUA } else { 0 };
            match rng.below(10) {
                0..=4 => {
                    let data = pseudo_random(len, rng.next());
                    model.lock().unwrap()[offset..offset + len].copy_from_slice(&data);
                    c.request(CMD_WRITE, fua, cookie, offset as u64, len as u64, &data);
                    pending.insert(cookie, Pending::Ack);
                }
                5 => {
                    model.lock().unwrap()[offset..offset + len].fill(0);
                    c.request(
                        CMD_WRITE_ZEROES,
                        fua,
                        cookie,
                        offset as u64,
                        len as u64,
                        &[],
                    );
                    pending.insert(cookie, Pending::Ack);
                }
                6 => {
                    c.request(CMD_FLUSH, 0, cookie, 0, 0, &[]);
                    pending.insert(cookie, Pending::Ack);
                }
                _ => {
                    c.request(CMD_READ, 0, cookie, offset as u64, len as u64, &[]);
                    pending.insert(cookie, Pending::Read { offset, len });
                }
            }
            ops += 1;
        }
        // Replies come in any order.  Reads are checked against the model
        // (the blocks are ours and distinct from the batch's writes).
        while !pending.is_empty() {
            let (cookie, error, data) = if c.structured {
                // Read data comes in chunks at absolute offsets (holes
                // for zeroes); put them together.
                let r = c.reply(0);
                let mut data = Vec::new();
                if let Some(Pending::Read { offset, len }) = pending.get(&r.cookie) {
                    data = vec![0xee; *len];
                    for (kind, p) in &r.chunks {
                        let at = u64::from_be_bytes(p[..8].try_into().unwrap()) as usize - offset;
                        match *kind {
                            REPLY_TYPE_OFFSET_DATA => {
                                data[at..at + p.len() - 8].copy_from_slice(&p[8..])
                            }
                            REPLY_TYPE_OFFSET_HOLE => {
                                let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                                data[at..at + n as usize].fill(0)
                            }
                            k => panic!("unexpected chunk type {k}"),
                        }
                    }
                }
                (r.cookie, r.error, data)
            } else {
                // Simple replies: the header says which request; the data
                // of a read follows.
                let h = c.read_exact(16).expect("simple reply");
                let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                let data = match pending.get(&cookie) {
                    Some(Pending::Read { len, .. }) if error == 0 => {
                        c.read_exact(*len).expect("read data")
                    }
                    _ => Vec::new(),
                };
                (cookie, error, data)
            };
            assert_eq!(error, 0, "thread {id} cookie {cookie}");
            match pending.remove(&cookie).expect("known cookie") {
                Pending::Ack => {}
                Pending::Read { offset, len } => {
                    assert_eq!(data.len(), len);
                    let m = model.lock().unwrap();
                    assert!(
                        data == m[offset..offset + len],
                        "thread {id}: read of {len} at {offset} differs from the model"
                    );
                }
            }
        }
    }
    c.request(CMD_DISC, 0, 0, 0, 0, &[]);
    ops
}

/// Connections that come and go: full negotiations, aborts, and clients
/// that leave in the middle of the handshake.
fn churn(s: &Server) {
    for i in 0..CHURN {
        match i % 3 {
            0 => {
                let mut c = RawClient::start(&s.socket);
                c.go(true, false, true);
                c.request(CMD_READ, 0, 1, 0, 512, &[]);
                assert_eq!(c.reply(0).error, 0);
            }
            1 => {
                let mut c = RawClient::start(&s.socket);
                assert_eq!(c.simple_option(OptionRequest::Abort), REP_ACK);
            }
            _ => {
                let (c, _) = RawClient::connect(&s.socket);
                drop(c);
            }
        }
    }
}

/// The whole disk, read by a fresh client, equals the model.
fn full_check(s: &Server, model: &[u8]) {
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    for (i, chunk) in model.chunks(1 << 20).enumerate() {
        c.request(
            CMD_READ,
            0,
            i as u64,
            (i << 20) as u64,
            chunk.len() as u64,
            &[],
        );
        let r = c.reply(chunk.len());
        assert_eq!(r.error, 0);
        assert!(r.data == chunk, "MiB {i} differs from the model");
    }
    c.request(CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(c.is_closed());
}

fn soak(args: &[&str]) {
    let s = Server::start(args);
    let pid = s.child.id();
    let model = Arc::new(Mutex::new(vec![0u8; SIZE]));
    // The baseline is taken once the server has served a client: the
    // async runtime's own descriptors (epoll, eventfd, the signal pipe)
    // appear only after the URI that says it is ready.
    full_check(&s, &model.lock().unwrap());
    let fds0 = settle_fds(pid, 0);
    let mut rss = Vec::new();
    for round in 0..2 {
        // The same seed both rounds: identical work.
        let total: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|id| {
                    let (s, m) = (&s, &*model);
                    scope.spawn(move || client_thread(s, m, id, 1))
                })
                .collect();
            let ch = scope.spawn(|| churn(&s));
            let n = workers.into_iter().map(|w| w.join().unwrap()).sum();
            ch.join().unwrap();
            n
        });
        full_check(&s, &model.lock().unwrap());
        let fds = settle_fds(pid, fds0);
        assert_eq!(fds, fds0, "round {round}: descriptors left open");
        rss.push(rss_kib(pid));
        eprintln!(
            "soak {args:?} round {round}: {total} requests by {THREADS} clients, \
             {} reconnects, {CHURN} churn connections; fds {fds0} -> {fds}; RSS {} KiB",
            THREADS * (BATCHES / RECONNECT),
            rss[round]
        );
    }
    assert!(
        rss[1] < rss[0] + 8 * 1024,
        "RSS grew from {} KiB after round 1 to {} KiB after the identical round 2",
        rss[0],
        rss[1]
    );
}

#[test]
fn soak_memory() {
    soak(&["memory", "size=32M"]);
}

#[test]
fn soak_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    sparse_file(&path, SIZE as u64);
    soak(&["file", &format!("file={}", path.display())]);
}
