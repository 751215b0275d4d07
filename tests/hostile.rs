//! Hostile clients: garbage at every stage of the handshake and of
//! transmission, truncated and giant messages, wrong magic, requests after
//! NBD_CMD_DISC, clients that never read their replies or leave in the
//! middle of a write.  After each case a well-behaved client connects and
//! checks that the data is intact and the server still reads and writes
//! correctly; the harness fails any test whose server panicked.

mod common;

use std::io::{Read, Write};

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

const CANARY_AT: u64 = 1 << 20;
const CANARY_LEN: usize = 64 * 1024;

/// A memory disk with a known block written at [`CANARY_AT`].
struct Target {
    s: Server,
    canary: Vec<u8>,
    checks: u64,
}

fn target(args: &[&str]) -> Target {
    let mut all = args.to_vec();
    all.extend(["memory", "size=16M"]);
    let s = Server::start(&all);
    let canary = pseudo_random(CANARY_LEN, 4242);
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    c.request(CMD_WRITE, 0, 1, CANARY_AT, CANARY_LEN as u64, &canary);
    assert_eq!(c.reply(0).error, 0);
    Target {
        s,
        canary,
        checks: 0,
    }
}

impl Target {
    /// A fresh client finds the canary intact, and a new write reads back.
    fn check(&mut self, case: &str) {
        self.checks += 1;
        let mut c = RawClient::start(&self.s.socket);
        c.go(false, false, false);
        c.request(CMD_READ, 0, 1, CANARY_AT, CANARY_LEN as u64, &[]);
        let r = c.reply(CANARY_LEN);
        assert_eq!(r.error, 0, "after {case}");
        assert!(r.data == self.canary, "canary changed after {case}");
        let off = (4 << 20) + (self.checks * 4096) % (4 << 20);
        let data = pseudo_random(4096, self.checks);
        c.request(CMD_WRITE, 0, 2, off, 4096, &data);
        assert_eq!(c.reply(0).error, 0, "write after {case}");
        c.request(CMD_READ, 0, 3, off, 4096, &[]);
        assert!(c.reply(4096).data == data, "read back after {case}");
        c.request(CMD_DISC, 0, 4, 0, 0, &[]);
        assert!(c.is_closed());
    }
}

/// Send `bytes`, stop writing, and expect the server to close.  Write
/// errors are fine: the server may have hung up already.
fn send_and_expect_close(c: &mut RawClient, bytes: &[u8]) {
    let _ = c.s.write_all(bytes);
    let _ = c.s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    // Whatever the server answered before closing, then EOF (not a hang,
    // which would be the client's 30 s read timeout: an error here).
    let r = c.s.read_to_end(&mut sink);
    assert!(
        r.is_ok() || matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "server did not close: {r:?}"
    );
}

fn option_header(option: u32, length: u32) -> Vec<u8> {
    OptionHeader { option, length }.encode().to_vec()
}

#[test]
fn garbage_before_the_client_flags() {
    let mut t = target(&[]);
    let mut rng = Rng(7);
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 0, 0],
        // Unknown flags.
        vec![0xff, 0xff, 0xff, 0xff],
        (FLAG_C_FIXED_NEWSTYLE | 0x100).to_be_bytes().to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        pseudo_random(1 << 20, rng.next()),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let (mut c, _) = RawClient::connect(&t.s.socket);
        send_and_expect_close(&mut c, bytes);
        t.check(&format!("client flags case {i}"));
    }
}

#[test]
fn garbage_in_option_headers() {
    let mut t = target(&[]);
    let mut wrong_magic = option_header(OPT_LIST, 0);
    wrong_magic[..8].copy_from_slice(b"IHAVEOPS");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("wrong option magic", wrong_magic),
        ("truncated header", option_header(OPT_GO, 0)[..10].to_vec()),
        ("giant option length", option_header(OPT_INFO, u32::MAX)),
        (
            "option length past the skip limit",
            option_header(OPT_SET_META_CONTEXT, 17 << 20),
        ),
        (
            "payload shorter than its header says",
            [option_header(OPT_INFO, 100), vec![0; 50]].concat(),
        ),
        ("random bytes", pseudo_random(4096, 99)),
    ];
    for (what, bytes) in cases {
        let mut c = RawClient::start(&t.s.socket);
        send_and_expect_close(&mut c, &bytes);
        t.check(what);
    }
    // A giant declared length must not be allocated: the server's memory
    // stays small while it waits for the payload.
    let before = rss_kib(t.s.child.id());
    let mut c = RawClient::start(&t.s.socket);
    c.send(&option_header(OPT_INFO, 16 << 20));
    c.send(&vec![0u8; 1 << 20]);
    let during = rss_kib(t.s.child.id());
    assert!(
        during < before + 8 * 1024,
        "{before} KiB before, {during} KiB while a 16 MiB option payload arrives"
    );
    drop(c);
    t.check("half of a skipped 16 MiB option");
}

#[test]
fn garbage_inside_option_payloads_is_answered_and_the_session_goes_on() {
    let mut t = target(&[]);
    let mut rng = Rng(12345);
    let mut c = RawClient::start(&t.s.socket);
    // Options that have an error reply, with random payloads.  (GO and
    // EXPORT_NAME are left out: a random payload might be a valid request
    // for an export, and EXPORT_NAME has no error reply.)
    let options = [
        OPT_INFO,
        OPT_LIST,
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        0x7777,
    ];
    let mut errors = 0;
    for i in 0..600 {
        let option = options[rng.below(options.len() as u64) as usize];
        let len = match rng.below(4) {
            0 => 0,
            1 => rng.below(16),
            2 => rng.below(300),
            _ => rng.below(70_000),
        } as usize;
        let mut payload = pseudo_random(len, rng.next());
        // Sometimes a plausible length prefix, so parsing goes deeper.
        if len >= 8 && rng.below(2) == 0 {
            let inner = rng.below(len as u64 + 8) as u32;
            payload[..4].copy_from_slice(&inner.to_be_bytes());
        }
        c.send(&[option_header(option, len as u32), payload].concat());
        let (reply, _) = c.read_until_final();
        if reply & (1 << 31) != 0 {
            errors += 1;
        } else {
            assert_eq!(reply, REP_ACK, "option {option} case {i}");
        }
    }
    assert!(errors > 300, "only {errors} of 600 garbage options refused");
    // The same connection still negotiates (structured replies may or may
    // not have been switched on by the garbage; ask for them plainly).
    c.option(&OptionRequest::Info {
        go: true,
        name: String::new(),
        requests: vec![],
    });
    assert_eq!(c.read_until_final().0, REP_ACK);
    drop(c);
    // Export names that are too long, or not UTF-8.
    let mut c = RawClient::start(&t.s.socket);
    let long = "x".repeat(5000);
    c.option(&OptionRequest::Info {
        go: false,
        name: long,
        requests: vec![],
    });
    assert!(c.read_until_final().0 & (1 << 31) != 0, "5000-byte name");
    let mut p = 3u32.to_be_bytes().to_vec();
    p.extend([0xff, 0xfe, 0x80, 0, 0]);
    c.send(&[option_header(OPT_INFO, p.len() as u32), p].concat());
    assert!(
        c.read_until_final().0 & (1 << 31) != 0,
        "invalid UTF-8 name"
    );
    // EXPORT_NAME with garbage: no error reply exists, so a hang-up.
    send_and_expect_close(
        &mut c,
        &[option_header(OPT_EXPORT_NAME, 3), vec![0xff, 0xfe, 0x80]].concat(),
    );
    t.check("garbage option payloads");
}

#[test]
fn garbage_and_giant_lengths_during_transmission() {
    let mut t = target(&[]);
    let pid = t.s.child.id();
    // Garbage instead of a request; a wrong request magic; a header cut
    // short.
    let mut wrong_magic = RequestHeader {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode(false);
    wrong_magic[0] ^= 0x55;
    let truncated = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        cookie: 1,
        offset: CANARY_AT,
        length: 4,
    }
    .encode(false)[..20]
        .to_vec();
    for (what, bytes) in [
        ("garbage request", pseudo_random(1024, 5)),
        ("wrong request magic", wrong_magic),
        ("truncated request header", truncated),
    ] {
        let mut c = RawClient::start(&t.s.socket);
        c.go(true, false, false);
        send_and_expect_close(&mut c, &bytes);
        t.check(what);
    }

    // Giant lengths that can be refused keep the connection.
    let mut c = RawClient::start(&t.s.socket);
    c.go(true, false, false);
    c.request(CMD_READ, 0, 1, 0, u32::MAX as u64, &[]);
    assert_eq!(c.reply(0).error, EOVERFLOW, "4 GiB read");
    c.request(CMD_TRIM, 0, 2, 0, u32::MAX as u64, &[]);
    assert_eq!(c.reply(0).error, EINVAL, "4 GiB trim on a 16 MiB disk");
    // A 72 MiB write (over the 64 MiB maximum): its payload is skipped
    // without being held in memory, then refused.
    let before = rss_kib(pid);
    let big = 72u64 << 20;
    c.request(CMD_WRITE, 0, 3, 0, big, &vec![0xaa; big as usize]);
    assert_eq!(c.reply(0).error, EOVERFLOW, "72 MiB write");
    let after = rss_kib(pid);
    assert!(
        after < before + 16 * 1024,
        "skipping a 72 MiB payload grew the server from {before} to {after} KiB"
    );
    c.request(CMD_READ, 0, 4, CANARY_AT, 8, &[]);
    let r = c.reply(0);
    assert_eq!(r.error, 0, "the connection is still in step");
    assert_eq!(&r.chunks[0].1[8..], &t.canary[..8]);
    drop(c);

    // A write announcing 4 GiB - 1, followed by a little data and a
    // hang-up: nothing is allocated for it, nothing is written.
    let mut c = RawClient::start(&t.s.socket);
    c.go(false, false, false);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX as u64, &[0xbb; 1 << 20]);
    assert!(rss_kib(pid) < before + 16 * 1024);
    drop(c);
    t.check("a 4 GiB write cut short");

    // Extended headers: 64-bit lengths.  A read is refused; a write whose
    // payload is over 4 GiB cannot be skipped in reasonable time, so the
    // connection ends.
    let mut c = RawClient::start(&t.s.socket);
    c.go(true, true, false);
    c.request(CMD_READ, 0, 1, 0, 1 << 40, &[]);
    assert_eq!(c.reply(0).error, EOVERFLOW, "1 TiB read");
    c.request(CMD_WRITE, 0, 2, 0, 1 << 40, &[]);
    assert!(c.is_closed(), "1 TiB write payload");
    t.check("extended-header giant lengths");
}

#[test]
fn requests_after_disc_are_not_run() {
    let mut t = target(&[]);
    let mut c = RawClient::start(&t.s.socket);
    c.go(false, false, false);
    // DISC, then in the same packet a write over the canary and a read.
    let mut bytes = RequestHeader {
        flags: 0,
        command: CMD_DISC,
        cookie: 1,
        offset: 0,
        length: 0,
    }
    .encode(false);
    for (cmd, cookie) in [(CMD_WRITE, 2), (CMD_READ, 3)] {
        bytes.extend(
            RequestHeader {
                flags: 0,
                command: cmd,
                cookie,
                offset: CANARY_AT,
                length: 512,
            }
            .encode(false),
        );
        if cmd == CMD_WRITE {
            bytes.extend([0xcc; 512]);
        }
    }
    c.send(&bytes);
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "replies after DISC: {} bytes", rest.len());
    t.check("requests after NBD_CMD_DISC");
}

#[test]
fn many_connections_that_leave_mid_write_leak_nothing() {
    let mut t = target(&[]);
    let pid = t.s.child.id();
    t.check("warm-up");
    let fds = fd_count(pid);
    for i in 0..50u64 {
        let mut c = RawClient::start(&t.s.socket);
        c.go(i % 2 == 0, false, false);
        // A few complete writes, then one cut off in its payload.
        for k in 0..3 {
            let d = pseudo_random(4096, i * 10 + k);
            c.request(CMD_WRITE, 0, k, (8 << 20) + k * 4096, 4096, &d);
        }
        c.request(CMD_WRITE, 0, 9, CANARY_AT, 65536, &[0xdd; 1000]);
        drop(c);
    }
    t.check("50 clients leaving mid-write");
    let now = settle_fds(pid, fds);
    assert!(
        now <= fds,
        "{fds} descriptors before, {now} after 50 abandoned connections"
    );
}

#[test]
fn stalled_readers_hold_bounded_memory_and_lose_nothing() {
    // Documented bound (docs/security.md): a connection holds at most -t
    // requests (16) in flight, so at most -t read buffers: 16 MiB for
    // 1 MiB reads.  Two stalled connections: 32 MiB, plus slack.
    let s = Server::start(&["pattern", "size=1G"]);
    let pid = s.child.id();
    let base = rss_kib(pid);
    const N: u64 = 300;
    let mut clients: Vec<RawClient> = (0..2)
        .map(|_| {
            let mut c = RawClient::start(&s.socket);
            c.go(true, false, false);
            // All headers in one write (8.4 KB).  Written one by one, each
            // 28-byte message costs about 1 KB of the client's Unix socket
            // send buffer while the server, whose workers are all blocked
            // writing replies, leaves them unread: the client would block
            // before it ever reads a reply.
            let all: Vec<u8> = (0..N)
                .flat_map(|i| {
                    RequestHeader {
                        flags: 0,
                        command: CMD_READ,
                        cookie: i,
                        offset: i << 20,
                        length: 1 << 20,
                    }
                    .encode(false)
                })
                .collect();
            c.send(&all);
            c
        })
        .collect();
    let mut peak = 0;
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        peak = peak.max(rss_kib(pid));
    }
    assert!(
        peak < base + 48 * 1024,
        "server grew from {base} KiB to {peak} KiB with 2 x {N} unread 1 MiB replies"
    );
    // Now read everything: every request answered once, with the right data.
    for c in &mut clients {
        let mut seen = vec![false; N as usize];
        for _ in 0..N {
            let r = c.reply(0);
            assert!(!std::mem::replace(&mut seen[r.cookie as usize], true));
            let (kind, p) = &r.chunks[0];
            assert_eq!(*kind, REPLY_TYPE_OFFSET_DATA);
            let off = u64::from_be_bytes(p[..8].try_into().unwrap());
            assert_eq!(off, r.cookie << 20);
            assert_eq!(p.len(), 8 + (1 << 20));
            // pattern: each 8-byte word holds its offset.
            let last = u64::from_be_bytes(p[p.len() - 8..].try_into().unwrap());
            assert_eq!(last, off + (1 << 20) - 8);
        }
    }
    eprintln!("stalled readers: base {base} KiB, peak {peak} KiB");
}
