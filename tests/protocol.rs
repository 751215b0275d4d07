//! Protocol edge cases that real clients never produce, driven with our
//! own byte-level client: the right error for each bad request, and the
//! connection (or at least the server) lives on.

mod common;

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

fn memory() -> Server {
    Server::start(&["memory", "size=16M"])
}

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let s = memory();
    let (_c, flags) = RawClient::connect(&s.socket);
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn unknown_and_malformed_options_get_errors_and_the_session_continues() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::Unknown(77)), REP_ERR_UNSUP);
    // STARTTLS without TLS configured.
    assert_eq!(c.simple_option(OptionRequest::StartTls), REP_ERR_UNSUP);
    // INFO whose name length runs past the payload.
    let mut bad = OptionHeader {
        option: OPT_INFO,
        length: 6,
    }
    .encode()
    .to_vec();
    bad.extend_from_slice(&[0, 0, 0, 9, 0, 0]);
    c.send(&bad);
    assert_eq!(c.read_until_final().0, REP_ERR_INVALID);
    // LIST with a payload is invalid.
    let mut bad = OptionHeader {
        option: OPT_LIST,
        length: 1,
    }
    .encode()
    .to_vec();
    bad.push(0);
    c.send(&bad);
    assert_eq!(c.read_until_final().0, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    c.option(&OptionRequest::MetaContext {
        set: false,
        export: String::new(),
        queries: vec![],
    });
    assert_eq!(c.read_until_final().0, REP_ERR_INVALID);
    // An oversized payload is skipped, answered with TOO_BIG.
    let mut big = OptionHeader {
        option: OPT_INFO,
        length: 100_000,
    }
    .encode()
    .to_vec();
    big.extend(vec![0u8; 100_000]);
    c.send(&big);
    assert_eq!(c.read_until_final().0, REP_ERR_TOO_BIG);
    // And the session still works.
    let (size, _) = c.go(true, false, true);
    assert_eq!(size, 16 << 20);
}

#[test]
fn list_and_meta_context_queries() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::List);
    let (r, all) = c.read_until_final();
    assert_eq!(r, REP_ACK);
    assert_eq!(all.iter().filter(|(t, _)| *t == REP_SERVER).count(), 1);
    assert_eq!(c.simple_option(OptionRequest::StructuredReply), REP_ACK);
    let both: &[&str] = &["base:allocation", "qemu:allocation-depth"];
    for (queries, expect) in [
        (vec![], both),
        (vec!["base:".to_string()], &both[..1]),
        (vec!["qemu:".to_string()], &both[1..]),
        (vec!["qemu:dirty-bitmap:x".to_string()], &[][..]),
    ] {
        c.option(&OptionRequest::MetaContext {
            set: false,
            export: String::new(),
            queries,
        });
        let (r, all) = c.read_until_final();
        assert_eq!(r, REP_ACK);
        let contexts: Vec<_> = all
            .iter()
            .filter(|(t, _)| *t == REP_META_CONTEXT)
            .map(|(_, d)| {
                // LIST replies carry context id 0.
                assert_eq!(d[..4], [0; 4]);
                std::str::from_utf8(&d[4..]).unwrap()
            })
            .collect();
        assert_eq!(contexts, expect);
    }
}

#[test]
fn export_name_with_no_zeroes() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::ExportName(String::new()));
    let r = c.read_exact(10).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 16 << 20);
    // No 124 zero bytes: the next thing is our request's reply.
    c.request(CMD_READ, 0, 5, 0, 512, &[]);
    let rep = c.reply(512);
    assert_eq!(rep.cookie, 5);
    assert_eq!(rep.error, 0);
    assert_eq!(rep.data, vec![0u8; 512]);
}

#[test]
fn too_many_options_close_the_connection() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    let mut all = Vec::new();
    for _ in 0..1100 {
        all.extend(OptionRequest::Unknown(99).encode());
    }
    // The server stops reading after its limit, so ignore write errors.
    let _ = std::io::Write::write_all(&mut c.s, &all);
    let mut n = 0;
    while let Ok(h) = c.read_exact(20) {
        let h = nbdkit_proto::option::OptionReplyHeader::parse(&h).unwrap();
        let _ = c.read_exact(h.length as usize);
        n += 1;
    }
    assert!((1000..1100).contains(&n), "{n} replies");
    // The server itself is fine.
    let mut c2 = RawClient::start(&s.socket);
    c2.go(false, false, false);
}

#[test]
fn bad_requests_get_the_right_errors_and_the_connection_lives() {
    let s = Server::start(&["-r", "memory", "size=1M"]);
    let mut c = RawClient::start(&s.socket);
    let (size, flags) = c.go(true, false, false);
    assert_eq!(size, 1 << 20);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    /// command, flags, offset, length, payload, expected error
    type Case = (u16, u16, u64, u64, &'static [u8], u32);
    let cases: &[Case] = &[
        // Write on a read-only export: EPERM, payload consumed.
        (CMD_WRITE, 0, 0, 4, b"abcd", EPERM),
        // Read beyond the end.
        (CMD_READ, 0, (1 << 20) - 1, 2, b"", EINVAL),
        // Zero-length read.
        (CMD_READ, 0, 0, 0, b"", EINVAL),
        // A flag that READ does not take.
        (CMD_READ, CMD_FLAG_FUA, 0, 1, b"", EINVAL),
        // An unknown command.
        (42, 0, 0, 1, b"", EINVAL),
        // Block status without a negotiated context.
        (CMD_BLOCK_STATUS, 0, 0, 512, b"", EINVAL),
        // Over the maximum payload.
        (CMD_READ, 0, 0, (64 << 20) + 1, b"", EOVERFLOW),
        // Trim on a read-only export.
        (CMD_TRIM, 0, 0, 512, b"", EPERM),
        // Read-only is checked first, as nbdkit: a FUA write (FUA is not
        // advertised on a read-only export), a write past the end and a
        // fast zero are all EPERM.
        (CMD_WRITE, CMD_FLAG_FUA, 0, 4, b"abcd", EPERM),
        (CMD_WRITE, 0, (1 << 20) - 2, 4, b"abcd", EPERM),
        (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512, b"", EPERM),
    ];
    for (i, &(cmd, flags, offset, len, payload, want)) in cases.iter().enumerate() {
        c.request(cmd, flags, i as u64, offset, len, payload);
        let r = c.reply(0);
        assert_eq!(r.cookie, i as u64);
        assert_eq!(r.error, want, "case {i}: {}", r.error_message);
        assert!(!r.error_message.is_empty(), "error chunks carry a message");
        // Still in step: a good read works.
        c.request(CMD_READ, 0, 1000 + i as u64, 0, 8, &[]);
        let ok = c.reply(8);
        assert_eq!(ok.error, 0, "case {i} broke the stream");
    }
}

#[test]
fn refused_write_payload_is_consumed_with_simple_replies() {
    let s = Server::start(&["memory", "size=1M"]);
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    // Beyond the end: ENOSPC; the 4 KiB payload must be skipped.
    c.request(CMD_WRITE, 0, 1, 1 << 20, 4096, &[0xee; 4096]);
    let r = c.reply(0);
    assert_eq!(r.error, ENOSPC);
    c.request(CMD_WRITE, 0, 2, 0, 4, b"wxyz");
    assert_eq!(c.reply(0).error, 0);
    c.request(CMD_READ, 0, 3, 0, 4, &[]);
    assert_eq!(c.reply(4).data, b"wxyz");
}

#[test]
fn bad_magic_closes_only_that_connection() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.go(true, false, false);
    c.send(&[0xde; 28]);
    assert!(c.is_closed());
    let mut c2 = RawClient::start(&s.socket);
    c2.go(true, false, false);
    c2.request(CMD_READ, 0, 1, 0, 1, &[]);
    assert_eq!(c2.reply(0).error, 0);
}

#[test]
fn garbage_during_handshake_closes_only_that_connection() {
    let s = memory();
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff; 4],
        &[0, 0, 0, 3, 1, 2, 3],
    ] {
        let (mut c, _) = RawClient::connect(&s.socket);
        c.send(garbage);
        // A truncated message followed by EOF must not wedge the server.
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.is_closed());
    }
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
}

#[test]
fn reads_of_zeroes_are_sent_as_holes() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.go(true, false, false);
    c.request(CMD_WRITE, 0, 1, 4096, 4, b"data");
    assert_eq!(c.reply(0).error, 0);
    c.request(CMD_READ, 0, 2, 1 << 20, 65536, &[]);
    let r = c.reply(0);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_OFFSET_HOLE);
    let p = &r.chunks[0].1;
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 1 << 20);
    assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 65536);
    c.request(CMD_READ, 0, 3, 4096, 4, &[]);
    let r = c.reply(0);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&r.chunks[0].1[8..], b"data");
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    let s = Server::start(&["memory", "size=16G"]);
    let mut c = RawClient::start(&s.socket);
    let (size, _) = c.go(true, true, true);
    assert_eq!(size, 16 << 30);
    c.request(CMD_WRITE, 0, 1, 8 << 30, 5, b"hello");
    let r = c.reply(0);
    assert_eq!(r.error, 0);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_NONE);
    // Block status over more than 4 GiB in one request.
    c.request(CMD_BLOCK_STATUS, 0, 2, 0, 12 << 30, &[]);
    let r = c.reply(0);
    assert_eq!(r.error, 0);
    let (kind, p) = &r.chunks[0];
    assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS_EXT);
    let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert_eq!(p.len(), 8 + 16 * count);
    let first_len = u64::from_be_bytes(p[8..16].try_into().unwrap());
    let first_flags = u64::from_be_bytes(p[16..24].try_into().unwrap());
    assert_eq!(
        first_len,
        8 << 30,
        "one hole descriptor longer than 32 bits"
    );
    assert_eq!(first_flags, (STATE_HOLE | STATE_ZERO) as u64);
    // A 64-bit zero request.
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 10 << 30, &[]);
    assert_eq!(c.reply(0).error, 0);
    c.request(CMD_READ, 0, 4, 8 << 30, 5, &[]);
    let r = c.reply(0);
    assert_eq!(r.chunks[0].0, REPLY_TYPE_OFFSET_HOLE, "zeroed");
}

#[test]
fn many_requests_in_flight_all_get_answered() {
    let s = Server::start(&["pattern", "size=64M"]);
    let mut c = RawClient::start(&s.socket);
    c.go(true, false, false);
    let n = 200u64;
    for i in 0..n {
        c.request(CMD_READ, 0, i, i * 65536 + 8, 4096, &[]);
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let r = c.reply(0);
        assert!(
            !seen[r.cookie as usize],
            "cookie {} answered twice",
            r.cookie
        );
        seen[r.cookie as usize] = true;
        let (kind, p) = &r.chunks[0];
        assert_eq!(*kind, REPLY_TYPE_OFFSET_DATA);
        let off = u64::from_be_bytes(p[..8].try_into().unwrap());
        assert_eq!(off, r.cookie * 65536 + 8);
        assert_eq!(
            u64::from_be_bytes(p[8..16].try_into().unwrap()),
            off,
            "pattern data"
        );
    }
}

#[test]
fn disc_finishes_in_flight_requests_then_closes() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    c.request(CMD_WRITE, 0, 1, 0, 3, b"xyz");
    c.request(CMD_DISC, 0, 2, 0, 0, &[]);
    assert_eq!(c.reply(0).cookie, 1);
    assert!(c.is_closed());
    let mut c2 = RawClient::start(&s.socket);
    c2.go(false, false, false);
    c2.request(CMD_READ, 0, 1, 0, 3, &[]);
    assert_eq!(c2.reply(3).data, b"xyz", "the write before DISC landed");
}

#[test]
fn client_that_disconnects_mid_payload_does_not_hurt_the_server() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    let h = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 65536,
    };
    c.send(&h.encode(false));
    c.send(&[1u8; 1000]);
    drop(c);
    let mut c2 = RawClient::start(&s.socket);
    c2.go(false, false, false);
    c2.request(CMD_READ, 0, 9, 0, 4, &[]);
    assert_eq!(
        c2.reply(4).data,
        vec![0u8; 4],
        "the partial write was not applied"
    );
}

#[test]
fn client_that_never_reads_replies_neither_grows_memory_nor_blocks_shutdown() {
    let s = Server::start(&["pattern", "size=1G"]);
    let mut c = RawClient::start(&s.socket);
    c.go(true, false, false);
    // Far more reply data than socket buffers hold; we never read it.
    c.s.set_write_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut sent = 0;
    for i in 0..4096u64 {
        let h = RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie: i,
            offset: (i % 1000) << 20,
            length: 1 << 20,
        };
        if std::io::Write::write_all(&mut c.s, &h.encode(false)).is_err() {
            break;
        }
        sent += 1;
    }
    let pid = s.child.id();
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:").map(|v| {
                v.trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
            })
        })
        .unwrap();
    // 16 requests of 1 MiB in flight at most, plus the program itself.
    assert!(
        rss_kib < 200 * 1024,
        "server holds {rss_kib} KiB after {sent} unread 1 MiB replies"
    );
    assert!(
        s.stop().success(),
        "SIGTERM still shuts the server down cleanly"
    );
}

#[test]
fn no_sr_no_mc_and_mask_handshake_change_what_is_offered() {
    let s = Server::start(&["--no-sr", "memory", "size=1M"]);
    let mut c = RawClient::start(&s.socket);
    assert_eq!(
        c.simple_option(OptionRequest::StructuredReply),
        REP_ERR_UNSUP
    );
    assert_eq!(
        c.simple_option(OptionRequest::ExtendedHeaders),
        REP_ERR_UNSUP
    );
    let (_, flags) = c.go(false, false, false);
    assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");

    let s = Server::start(&["--no-mc", "memory", "size=1M"]);
    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::StructuredReply), REP_ACK);
    c.option(&OptionRequest::MetaContext {
        set: true,
        export: String::new(),
        queries: vec!["base:allocation".into()],
    });
    assert_eq!(c.read_until_final().0, REP_ERR_UNSUP);

    let s = Server::start(&["--mask-handshake=1", "memory", "size=1M"]);
    let (mut c, flags) = RawClient::connect(&s.socket);
    assert_eq!(flags, FLAG_FIXED_NEWSTYLE, "NO_ZEROES masked off");
    // A client asking for the masked-off flag is refused.
    c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    assert!(c.is_closed());
}

#[test]
fn a_failed_export_open_is_answered_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.img"), vec![0u8; 4096]).unwrap();
    let s = Server::start(&["file", &format!("dir={}", dir.path().display())]);
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::Info {
        go: true,
        name: "missing.img".into(),
        requests: vec![],
    });
    let (reply, all) = c.read_until_final();
    assert_eq!(reply, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&all[0].1).contains("missing.img"));
    drop(c);
    // The server's own log says why, for clients that do not show it.
    let log = s.log();
    assert!(
        log.contains("cannot open export") && log.contains("missing.img"),
        "{log}"
    );
}

#[test]
fn an_export_name_over_4096_bytes_is_refused_as_too_long() {
    let s = memory();
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::Info {
        go: true,
        name: "a".repeat(5000),
        requests: vec![],
    });
    let (code, replies) = c.read_until_final();
    assert_eq!(code, REP_ERR_TOO_BIG);
    let msg = String::from_utf8_lossy(&replies.last().unwrap().1).into_owned();
    assert!(msg.contains("too long"), "{msg}");
    // A name of exactly 4096 bytes is within the limit (the memory plugin
    // serves every name), and the session goes on.
    c.option(&OptionRequest::Info {
        go: false,
        name: "b".repeat(4096),
        requests: vec![],
    });
    assert_eq!(c.read_until_final().0, REP_ACK);
}

/// nbdkit serves reads and writes up to 64 MiB and advertises that as the
/// maximum block size: a client that uses the whole of it works.
#[test]
fn a_64_mib_read_and_write_work_as_with_nbdkit() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["memory", "size=80M"]);
    let out = nbd_script(
        r#"
n = 64 * 1024 * 1024
assert h.get_block_size(nbd.SIZE_MAXIMUM) == n, h.get_block_size(nbd.SIZE_MAXIMUM)
h.pwrite(b"\x5a" * n, 4096)
buf = h.pread(n, 4096)
assert buf == b"\x5a" * n
h.shutdown()
"#,
        &[&s.uri],
    );
    assert_eq!(out.trim(), "OK");
}

/// As nbdkit: the last block status descriptor may run past the request
/// (what the backend knows, up to the end of the export), while REQ_ONE
/// gets one descriptor within the request.
#[test]
fn block_status_may_run_past_the_request_but_not_with_req_one() {
    if !have_python_nbd() {
        return;
    }
    // A hole in the first 8 KiB, data after it.
    let s = Server::start(&[
        "eval",
        "get_size=echo 64K",
        "pread=exit 1",
        "extents=echo 0 8192 hole,zero; echo 8192 57344",
    ]);
    let out = nbd_script_allocation(
        r#"
got = []
def f(ctx, offset, e, err):
    got.extend(zip(e[0::2], e[1::2]))
h.block_status(512, 512, f)
assert got[0] == (7680, 3), got
got.clear()
h.block_status(512, 512, f, nbd.CMD_FLAG_REQ_ONE)
assert got == [(512, 3)], got
h.shutdown()
"#,
        &[&s.uri],
    );
    assert_eq!(out.trim(), "OK");
}
