//! The real Debian NBD clients (qemu-img, qemu-io, qemu-nbd, nbdinfo,
//! nbdcopy, nbdsh and the libnbd Python bindings) against the real binary.
mod common;
use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn cmp(a: &Path, b: &Path) {
    run_ok(Command::new("cmp").arg(a).arg(b));
}

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

#[test]
fn qemu_img_info_convert_compare() {
    if !have("qemu-img") {
        return;
    }
    let (dir, orig, _) = temp_file("orig.img", 3 * M as usize + 512, 1);
    let s = Server::start(&["-r", "file", orig.to_str().unwrap()]);

    let info = stdout_of(Command::new("qemu-img").args(["info", "--output=json", &s.uri]));
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 3 * M + 512)),
        "{info}"
    );

    let copy = dir.path().join("copy.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &s.uri])
            .arg(&copy),
    );
    cmp(&orig, &copy);

    // Identical, then one byte different.
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &s.uri])
        .arg(&orig)
        .output()
        .unwrap();
    assert_eq!(same.status.code(), Some(0), "{same:?}");
    let mut data = std::fs::read(&orig).unwrap();
    data[2 * M as usize + 7] ^= 0xff;
    std::fs::write(&copy, &data).unwrap();
    let differ = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &s.uri])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(differ.status.code(), Some(1), "{differ:?}");
    let text = String::from_utf8_lossy(&differ.stdout);
    assert!(text.contains("Content mismatch at offset"), "{text}");
    assert!(s.stop().success());
}

#[test]
fn qemu_io_fua_discard_write_zeroes() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let s = Server::start(&["--filter=log", "memory", "size=16M", &logarg]);
    // writeback: qemu only sets FUA when asked to with -f.
    let out = stdout_of(Command::new("qemu-io").args([
        "-t",
        "writeback",
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 128k",
        "-c",
        "write -f -P 0x22 128k 64k",
        "-c",
        "write -P 0x33 1M 256k",
        "-c",
        "discard 1M 64k",
        "-c",
        "write -z 1088k 64k",
        "-c",
        "write -z -u 1152k 64k",
        "-c",
        "read -P 0x11 0 128k",
        "-c",
        "read -P 0x22 128k 64k",
        "-c",
        "read -P 0 1M 192k",
        "-c",
        "read -P 0x33 1216k 64k",
        "-c",
        "read -P 0 2M 64k",
        &s.uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    assert_eq!(out.matches("read ").count(), 5, "{out}");

    // The holes are where the data was trimmed or zeroed with unmap and
    // where nothing was ever written.
    let map = map_of(&s.uri);
    assert_eq!(
        map,
        vec![
            (0, 192 * K, false),
            (192 * K, 1216 * K - 192 * K, true),
            (1216 * K, 64 * K, false),
            (1280 * K, 16 * M - 1280 * K, true),
        ]
    );

    assert!(s.stop().success());
    let log = without_ids(&std::fs::read_to_string(&log).unwrap());
    let has = |needle: &str| log.lines().any(|l| l.contains(needle));
    assert!(
        has("Write offset=0x0 count=0x20000 fua=0 "),
        "plain write: {log}"
    );
    assert!(
        has("Write offset=0x20000 count=0x10000 fua=1 "),
        "write -f sends FUA: {log}"
    );
    assert!(has("Trim offset=0x100000 count=0x10000 "), "discard: {log}");
    assert!(
        has("Zero offset=0x110000 count=0x10000 trim=0 "),
        "write -z without -u must not punch holes: {log}"
    );
    assert!(
        has("Zero offset=0x120000 count=0x10000 trim=1 "),
        "write -z -u may punch holes: {log}"
    );
}

#[test]
fn nbdinfo_json_flags_and_block_sizes() {
    if !have("nbdinfo") {
        return;
    }
    let s = Server::start(&["memory", "size=64M"]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["export-size"], (64 * M).to_string());
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], "true");
    for flag in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(j[flag], "true", "{flag}: {j:?}");
    }
    assert_eq!(j["is_read_only"], "false");
    assert_eq!(
        j["contexts"],
        "[\"base:allocation\", \"qemu:allocation-depth\"]"
    );
    assert_eq!(j["block_size_minimum"], "1");
    assert_eq!(j["block_size_preferred"], "4096");
    assert_eq!(j["block_size_maximum"], (64 * M).to_string());
    // The --can/--is checks exit 0 for true and 2 for false.
    let check = |args: &[&str]| {
        Command::new("nbdinfo")
            .args(args)
            .arg(&s.uri)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(check(&["--can", "trim"]), Some(0));
    assert_eq!(check(&["--is", "read-only"]), Some(2));
    assert_eq!(
        stdout_of(Command::new("nbdinfo").arg("--size").arg(&s.uri)).trim(),
        (64 * M).to_string()
    );
    assert!(s.stop().success());

    let ro = Server::start(&["-r", "memory", "size=1M"]);
    let j = nbdinfo_json(&[], &ro.uri);
    assert_eq!(j["is_read_only"], "true");
    for flag in ["can_trim", "can_zero", "can_fua", "can_fast_zero"] {
        assert_eq!(j[flag], "false", "{flag} with -r: {j:?}");
    }
    assert_eq!(j["can_flush"], "true");
    drop(ro);

    // A plugin that cannot write is read-only without -r.
    let p = Server::start(&["pattern", "size=1M"]);
    let j = nbdinfo_json(&[], &p.uri);
    assert_eq!(j["is_read_only"], "true");
    assert_eq!(j["can_zero"], "false");
}

#[test]
fn nbdinfo_map_on_sparse_file() {
    if !have("nbdinfo") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sparse.img");
    let f = sparse_file(&p, 8 * M);
    f.write_all_at(&pseudo_random(64 * K as usize, 2), M)
        .unwrap();
    f.write_all_at(&pseudo_random(4 * K as usize, 3), 5 * M)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let s = Server::start(&["-r", "file", p.to_str().unwrap()]);
    let map = map_of(&s.uri);
    assert_eq!(
        map,
        vec![
            (0, M, true),
            (M, 64 * K, false),
            (M + 64 * K, 4 * M - 64 * K, true),
            (5 * M, 4 * K, false),
            (5 * M + 4 * K, 3 * M - 4 * K, true),
        ]
    );
}

#[test]
fn directory_exports_listed_and_readable() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();
    make_file(&exports.join("a.img"), M as usize, 4);
    make_file(&exports.join("b.img"), 2 * M as usize, 5);
    std::fs::create_dir(exports.join("subdir")).unwrap();
    let dirarg = format!("dir={}", exports.display());
    let s = Server::start(&["file", &dirarg]);

    let list = stdout_of(Command::new("nbdinfo").arg("--list").arg(&s.uri));
    let mut names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.strip_prefix("export=\""))
        .map(|l| l.trim_end_matches("\":"))
        .collect();
    // Listed in the directory's own order, as nbdkit does.
    names.sort();
    assert_eq!(names, ["a.img", "b.img"], "{list}");
    assert!(list.contains("export-size: 2097152"), "{list}");

    let out = dir.path().join("b.out");
    run_ok(Command::new("nbdcopy").arg(s.uri_for("b.img")).arg(&out));
    cmp(&exports.join("b.img"), &out);
    assert_eq!(
        stdout_of(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(s.uri_for("a.img"))
        )
        .trim(),
        M.to_string()
    );
    // A name that is not a file is refused, and the server carries on.
    let bad = Command::new("nbdinfo")
        .arg(s.uri_for("nosuch.img"))
        .output()
        .unwrap();
    assert!(!bad.status.success());

    if have("qemu-nbd") {
        let l = stdout_of(
            Command::new("qemu-nbd")
                .arg("--list")
                .arg("-k")
                .arg(&s.socket),
        );
        assert!(l.contains("exports available: 2"), "{l}");
        assert!(l.contains(" export: 'a.img'"), "{l}");
        assert!(l.contains(" export: 'b.img'"), "{l}");
        assert!(l.contains("size:  2097152"), "{l}");
        assert!(l.contains("base:allocation"), "{l}");
    }
    assert!(s.stop().success());
}

#[test]
fn qemu_nbd_list_single_export() {
    if !have("qemu-nbd") {
        return;
    }
    let s = Server::start(&["-e", "disk0", "memory", "size=1M"]);
    let l = stdout_of(
        Command::new("qemu-nbd")
            .arg("--list")
            .arg("-k")
            .arg(&s.socket),
    );
    assert!(l.contains("exports available: 1"), "{l}");
    assert!(l.contains(" export: 'disk0'"), "{l}");
    assert!(l.contains("size:  1048576"), "{l}");
    assert!(l.contains("flags:"), "{l}");
    assert!(l.contains("trim") && l.contains("zeroes"), "{l}");
}

#[test]
fn nbdcopy_round_trip() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    // Data with a zero gap in the middle, so nbdcopy uses zero requests
    // and block status too.
    let mut data = pseudo_random(8 * M as usize, 6);
    data[3 * M as usize..5 * M as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    let size = format!("size={}", 8 * M);
    let s = Server::start(&["memory", &size]);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&s.uri));
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&back));
    cmp(&src, &back);
    // Reading it again through one connection and stdout.
    let out = Command::new("nbdcopy")
        .args(["-C", "1", &s.uri, "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == data, "nbdcopy to stdout differs");
    assert!(s.stop().success());
}

#[test]
fn python_commands_and_block_status() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["memory", "size=4M"]);
    nbd_script_allocation(
        r#"
assert h.get_size() == 4 << 20
assert h.can_meta_context("base:allocation")
assert h.get_structured_replies_negotiated()
def status(off, count):
    out = []
    def cb(ctx, o, entries, err):
        assert ctx == "base:allocation"
        out.extend(zip(entries[0::2], entries[1::2]))
    h.block_status(count, off, cb)
    return out
# Nothing written: one hole (hole|zero = 3) covering the request.
st = status(0, 1 << 20)
assert st[0][1] == 3 and sum(l for l, f in st) >= 1 << 20, st
buf = bytes(range(256)) * 256                      # 64 KiB
h.pwrite(buf, 65536)
h.pwrite(b"xyz", 3 << 20, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, 65536) == buf
assert h.pread(3, 3 << 20) == b"xyz"
assert h.pread(7, 65536 + 1) == buf[1:8]           # unaligned
st = status(65536, 65536)
assert st[0] == (65536, 0), st
h.zero(4096, 65536 + 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 65536 + 4096) == bytes(4096)
assert h.pread(4096, 65536 + 8192) == buf[8192:12288]
h.trim(65536, 65536)
assert h.pread(65536, 65536) == bytes(65536)
assert status(65536, 65536)[0][1] == 3
h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)
h.cache(1 << 20, 0)
# REQ_ONE: exactly one extent.
h.pwrite(b"\1" * 32768, 0)
out = []
h.block_status(1 << 20, 0, lambda c, o, e, err: out.extend(e), nbd.CMD_FLAG_REQ_ONE)
assert len(out) == 2 and out[1] == 0, out
# Past the end: EINVAL from the server, connection still usable.
h.set_strict_mode(0)
try:
    h.pread(512, (4 << 20) - 256)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"a" * 512, (4 << 20) - 256)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
assert h.pread(3, 3 << 20) == b"xyz"
h.shutdown()
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
}

#[test]
fn nbdsh_script() {
    if !have("nbdsh") {
        return;
    }
    let s = Server::start(&["memory", "size=1M"]);
    // nbdsh runs "python3" from PATH: make it the system one, which has
    // the nbd module.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = stdout_of(Command::new("nbdsh").env("PATH", path).args([
        "-u",
        &s.uri,
        "-c",
        "h.pwrite(b'hello', 100)",
        "-c",
        "print(h.pread(5, 100).decode(), h.get_size(), h.is_read_only())",
    ]));
    assert_eq!(out.trim(), "hello 1048576 False");
}

#[test]
fn many_reads_in_flight_reply_out_of_order() {
    if !have_python_nbd() {
        return;
    }
    // Pattern: every 8-byte word holds its own offset, so each reply
    // proves it belongs to its request.
    let s = Server::start(&["pattern", "size=256M"]);
    let out = nbd_script(
        r#"
import struct
def expect(off, n):
    start = off & ~7
    words = b"".join(struct.pack(">Q", w) for w in range(start, off + n + 8, 8))
    return words[off - start: off - start + n]
reqs = []
# Large and small reads interleaved, all in flight at once.
for i in range(64):
    n = (4 << 20) if i % 8 == 0 else 512 + i * 7
    off = i * (3 << 20) + i * 13
    buf = nbd.Buffer(n)
    cookie = h.aio_pread(buf, off)
    reqs.append((cookie, buf, off, n))
order = []
max_in_flight = h.aio_in_flight()
while h.aio_in_flight() > 0:
    h.poll(-1)
    for c, buf, off, n in reqs:
        if c not in order and h.aio_command_completed(c):
            order.append(c)
            assert buf.to_bytearray() == expect(off, n), (off, n)
assert len(order) == 64
print("in_flight", max_in_flight)
print("out_of_order", order != sorted(order))
"#,
        &[&s.uri],
    );
    assert!(out.contains("in_flight 64"), "{out}");
    assert!(s.stop().success());
}

#[test]
fn read_only_refuses_writes_with_eperm() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["-r", "memory", "size=1M"]);
    nbd_script(
        r#"
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
h.set_strict_mode(0)      # send the requests anyway: the server must refuse
for what, call in [("write", lambda: h.pwrite(b"x" * 512, 0)),
                   ("trim", lambda: h.trim(512, 0)),
                   ("zero", lambda: h.zero(512, 0))]:
    try:
        call()
        raise SystemExit(what + " succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (what, e)
# The connection lives on.
assert h.pread(512, 0) == bytes(512)
h.flush()
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
}

#[test]
fn full_plugin_fails_writes_with_enospc() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["full", "size=1M"]);
    nbd_script(
        r#"
for what, call in [("write", lambda: h.pwrite(b"x" * 4096, 8192)),
                   ("zero", lambda: h.zero(4096, 0)),
                   ("trim", lambda: h.trim(4096, 0))]:
    try:
        call()
        raise SystemExit(what + " succeeded on a full disk")
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, (what, e)
assert h.pread(4096, 0) == bytes(4096)
"#,
        &[&s.uri],
    );
    if have("qemu-io") {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 0 4k", &s.uri])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("No space left on device"), "{text}");
    }
    assert!(s.stop().success());
}

#[test]
fn pattern_plugin_returns_offsets() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pattern.img");
    let s = Server::start(&["pattern", "3M"]);
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&out));
    let data = std::fs::read(&out).unwrap();
    assert_eq!(data.len() as u64, 3 * M);
    for (i, w) in data.chunks_exact(8).enumerate() {
        assert_eq!(u64::from_be_bytes(w.try_into().unwrap()), i as u64 * 8);
    }
    if have_python_nbd() {
        nbd_script(
            r#"
import struct
assert h.pread(8, 0x123458) == struct.pack(">Q", 0x123458)
assert h.pread(5, 0x10003) == struct.pack(">Q", 0x10000)[3:]
"#,
            &[&s.uri],
        );
    }
}

#[test]
fn log_filter_one_line_per_request() {
    if !have("nbdcopy") {
        return;
    }
    let (dir, src, _) = temp_file("src.img", 4 * M as usize, 7);
    let log = dir.path().join("access.log");
    let logarg = format!("logfile={}", log.display());
    let s = Server::start(&["--filter=log", "memory", "size=4M", &logarg]);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&s.uri));
    // Stopping the server closes every handle, so the log is complete.
    assert!(s.stop().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let mut written = vec![false; (4 * M) as usize];
    // nbdkit's format: a call is an ENTER line ending in " ..." and a
    // LEAVE line whose action starts with "...", matched by connection
    // and id; Disconnect counts the connection's transactions.
    let mut entered: HashMap<(String, String), String> = HashMap::new();
    let mut requests: HashMap<String, usize> = HashMap::new();
    let mut disconnects: HashMap<String, usize> = HashMap::new();
    let field = |l: &str, k: &str| -> Option<String> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    let hex = |s: String| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    for l in text.lines() {
        let Some(conn) = field(l, "connection") else {
            // Server-wide entries: Ready, Preconnect.
            assert!(l.contains(" Ready ") || l.contains("Preconnect "), "{l}");
            continue;
        };
        if l.contains(" Connect ") {
            continue;
        }
        if l.contains(" Disconnect ") {
            let n = field(l, "transactions").unwrap().parse().unwrap();
            assert!(disconnects.insert(conn, n).is_none(), "{text}");
            continue;
        }
        let id = field(l, "id").unwrap_or_else(|| panic!("no id= in {l:?}"));
        if l.ends_with(" ...") {
            assert!(
                entered.insert((conn.clone(), id), l.to_string()).is_none(),
                "{text}"
            );
            *requests.entry(conn).or_default() += 1;
            continue;
        }
        assert_eq!(field(l, "return").as_deref(), Some("0"), "{l}");
        let call = entered
            .remove(&(conn, id))
            .unwrap_or_else(|| panic!("a LEAVE line without its ENTER: {l}"));
        if call.contains(" Write ") {
            let off = hex(field(&call, "offset").unwrap()) as usize;
            let n = hex(field(&call, "count").unwrap()) as usize;
            written[off..off + n].iter_mut().for_each(|w| *w = true);
        } else if !call.contains(" Flush ") {
            assert!(
                field(&call, "offset").is_some() && field(&call, "count").is_some(),
                "{call}"
            );
        }
    }
    assert!(entered.is_empty(), "calls that never returned: {entered:?}");
    assert!(written.iter().all(|&w| w), "every byte was written: {text}");
    // nbdcopy may open a connection it never uses.
    for (conn, n) in &requests {
        assert_eq!(
            disconnects.get(conn),
            Some(n),
            "one call per request: {text}"
        );
    }
    for (conn, n) in &disconnects {
        assert_eq!(requests.get(conn).copied().unwrap_or(0), *n, "{text}");
    }
}

#[test]
fn fio_random_writes_verified_at_queue_depth_16() {
    if !have("fio") {
        return;
    }
    let s = Server::start(&["memory", "size=16M"]);
    // fio leaves a verify state file in its working directory.
    let out = stdout_of(Command::new("fio").current_dir(s.dir.path()).args([
        "--name=nbd",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--minimal",
    ]));
    // Terse format: field 5 is the error count, field 6 the KiB read back
    // by the verify pass.
    let line = out
        .lines()
        .find(|l| l.starts_with("3;"))
        .unwrap_or_else(|| panic!("{out}"));
    let f: Vec<&str> = line.split(';').collect();
    assert_eq!(f[4], "0", "fio errors: {out}");
    assert_eq!(
        f[5], "16384",
        "everything was read back and verified: {out}"
    );
    assert!(s.stop().success());
}

/// Large reads of a file go straight from the page cache to the socket
/// (sendfile): data chunks for the file's data and hole chunks for its
/// holes, in structured replies; data then zeroes in simple replies; and
/// zeroes past the end of a file that shrank while served.  Over TCP and
/// Unix sockets, and through qemu-img (extended headers with qemu 10).
#[test]
fn large_reads_of_files_are_sent_directly_with_holes_as_hole_chunks() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    // 512 KiB of data, a 1 MiB hole, 512 KiB of data.
    let head = pseudo_random(512 * K as usize, 1);
    let tail = pseudo_random(512 * K as usize, 2);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&img).unwrap();
        f.write_all_at(&head, 0).unwrap();
        f.write_all_at(&tail, 1536 * K).unwrap();
    }
    let mut whole = head.clone();
    whole.extend(std::iter::repeat_n(0u8, M as usize));
    whole.extend(&tail);
    let script = r#"
import nbd, sys
whole = open(sys.argv[2], "rb").read()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
data = h.pread_structured(2 << 20, 0, chunk)
assert data == whole
assert chunks == [(0, 512 << 10, nbd.READ_DATA),
                  (512 << 10, 1 << 20, nbd.READ_HOLE),
                  (1536 << 10, 512 << 10, nbd.READ_DATA)], chunks
# Unaligned, starting inside the hole.
assert h.pread(700000, 1000000) == whole[1000000:1700000]
h.shutdown()
# Simple replies: the hole goes out as zero bytes.
s = nbd.NBD()
s.set_request_structured_replies(False)
s.connect_uri(sys.argv[1])
assert not s.get_structured_replies_negotiated()
assert s.pread(2 << 20, 0) == whole
assert s.pread(300000, 400000) == whole[400000:700000]
s.shutdown()
print("OK")
"#;
    // What the test compares against, for the script.
    let want = dir.path().join("want.img");
    std::fs::write(&want, &whole).unwrap();
    let want_s = want.to_str().unwrap();
    for s in [
        Server::start(&["-r", "file", img.to_str().unwrap()]),
        Server::start_tcp(&["-r", "file", img.to_str().unwrap()]),
    ] {
        python(script, &[&s.uri, want_s]);
        if have("qemu-img") {
            assert_same_raw(&want, &s.uri);
        }
        assert!(s.stop().success());
    }
    // A window filter moves reads without changing them: still direct.
    let s = Server::start(&[
        "-r",
        "--filter=offset",
        "file",
        img.to_str().unwrap(),
        "offset=512K",
    ]);
    python(
        r#"
import nbd, sys
whole = open(sys.argv[2], "rb").read()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
assert h.pread_structured(1536 << 10, 0, chunk) == whole[512 << 10:]
assert chunks == [(0, 1 << 20, nbd.READ_HOLE), (1 << 20, 512 << 10, nbd.READ_DATA)], chunks
h.shutdown()
print("OK")
"#,
        &[&s.uri, want_s],
    );
    assert!(s.stop().success());
    // The file shrinks while served: what is gone reads as zeroes.
    let s = Server::start(&["file", img.to_str().unwrap()]);
    let mut shrunk = head[..256 * K as usize].to_vec();
    shrunk.resize(2 * M as usize, 0);
    std::fs::write(&want, &shrunk).unwrap();
    nbd_script(
        r#"
import os
assert h.get_size() == 2 << 20
os.truncate(sys.argv[3], 256 << 10)
assert h.pread(2 << 20, 0) == open(sys.argv[2], "rb").read()
h.shutdown()
"#,
        &[&s.uri, want_s, img.to_str().unwrap()],
    );
    assert!(s.stop().success());
}
