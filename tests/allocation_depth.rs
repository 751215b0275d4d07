//! The `qemu:allocation-depth` metadata context, against qemu-nbd -A (the
//! server that defined it) serving the same images: qcow2 backing chains
//! through the qcow2dec filter, a raw file with holes through the file
//! plugin, and filters that move offsets over them.  Then the handshake
//! side with libnbd (listing, selecting, both contexts in one block
//! status, --no-mc) and with our own client (extended headers' 64-bit
//! chunks).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::client::RawClient;
use common::qemu::*;
use common::*;
use nbdkit_proto::*;

const M: u64 = 1 << 20;
const K: u64 = 1 << 10;

fn have_tools() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-nbd") && have("nbdinfo")
}

/// `nbdinfo --map=qemu:allocation-depth` as merged (offset, length, depth)
/// runs: servers may split runs differently, the depths must agree.
fn depth_runs(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = stdout_of(
        Command::new("nbdinfo")
            .arg("--map=qemu:allocation-depth")
            .arg(uri),
    );
    let mut runs: Vec<(u64, u64, u32)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, depth) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        match runs.last_mut() {
            Some(last) if last.2 == depth => {
                assert_eq!(last.0 + last.1, off, "gap in {out}");
                last.1 += len;
            }
            _ => runs.push((off, len, depth)),
        }
    }
    assert!(!runs.is_empty(), "no map from {uri}");
    runs
}

/// The depth the context must give each byte, from `qemu-img map` of the
/// file itself: its depth counts from 0 and its "present" false means
/// allocated nowhere.  (It disagrees with qemu-nbd -A only past the end
/// of a short backing image, which these images do not have.)
fn depth_from_file_map(img: &Path) -> Vec<(u64, u64, u32)> {
    let json = stdout_of(
        Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(img),
    );
    let flat = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import json,sys\n\
         for e in json.loads(sys.argv[1]):\n\
         \x20   print(e['start'], e['length'], e['depth'] + 1 if e['present'] else 0)",
            )
            .arg(&json),
    );
    let mut runs: Vec<(u64, u64, u32)> = Vec::new();
    for l in flat.lines() {
        let f: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
        match runs.last_mut() {
            Some(last) if u64::from(last.2) == f[2] => last.1 += f[1],
            _ => runs.push((f[0], f[1], f[2] as u32)),
        }
    }
    runs
}

/// `qemu-img map --output=json` through qemu's NBD client reading the
/// context in place of base:allocation (its `x-dirty-bitmap` option, how
/// qemu's own tests read qemu:allocation-depth).
fn qemu_map_of_context(socket: &Path) -> String {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:allocation-depth",
        socket.display()
    );
    stdout_of(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", &opts]))
}

/// base (4M) <- mid <- top: data, zero clusters and a compressed cluster
/// at every level, subclusters in the top, so each depth 0..=3 occurs.
fn chain(dir: &Path) -> PathBuf {
    let d = |n: &str| dir.join(n);
    create_qcow2(&d("base.qcow2"), None, &[], Some("4M"));
    qemu_io(
        &d("base.qcow2"),
        &["write -P 1 0 64k", "write -P 2 1M 64k", "write -z 3M 64k"],
    );
    create_qcow2(&d("mid.qcow2"), Some(("base.qcow2", "qcow2")), &[], None);
    qemu_io(
        &d("mid.qcow2"),
        &[
            "write -P 3 64k 64k",
            "write -P 4 1M 64k",
            "write -z 2M 128k",
            "write -c -P 5 512k 64k",
        ],
    );
    let top = d("top.qcow2");
    create_qcow2(
        &top,
        Some(("mid.qcow2", "qcow2")),
        &["-o", "extended_l2=on,cluster_size=64k"],
        None,
    );
    qemu_io(
        &top,
        &["write -P 6 132k 4k", "write -z 2M 64k", "write -P 7 3M 8k"],
    );
    top
}

fn ours(img: &Path, filters: &[&str]) -> Server {
    serve_qcow2(filters, img, &[])
}

#[test]
fn a_qcow2_chain_reports_the_depths_qemu_nbd_does() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let q = QemuNbd::start("qcow2", &top);
    let s = ours(&top, &[]);
    let want = depth_runs(&q.uri);
    let got = depth_runs(&s.uri);
    assert_eq!(got, want);
    // Not a vacuous agreement: every depth is there, at the places the
    // chain was written.
    let at = |runs: &[(u64, u64, u32)], off: u64| {
        runs.iter()
            .find(|r| r.0 <= off && off < r.0 + r.1)
            .unwrap()
            .2
    };
    assert_eq!(at(&got, 0), 3, "base data: {got:?}");
    assert_eq!(at(&got, 64 * K), 2, "mid data: {got:?}");
    assert_eq!(at(&got, 132 * K), 1, "top subcluster: {got:?}");
    assert_eq!(at(&got, 136 * K), 0, "nowhere: {got:?}");
    assert_eq!(at(&got, 512 * K), 2, "mid compressed: {got:?}");
    assert_eq!(at(&got, 2 * M), 1, "top zero cluster: {got:?}");
    assert_eq!(at(&got, 2 * M + 64 * K), 2, "mid zero cluster: {got:?}");
    assert_eq!(at(&got, 3 * M), 1, "top data over a base zero: {got:?}");
    assert_eq!(at(&got, 3 * M + 8 * K), 3, "base zero cluster: {got:?}");
    // What qemu-img map says of the file itself, renumbered.
    assert_eq!(got, depth_from_file_map(&top));
    // qemu's own NBD client reading the context: the same JSON from both.
    assert_eq!(
        qemu_map_of_context(&s.socket),
        qemu_map_of_context(&q.socket)
    );
    // base:allocation is still its own context, unchanged: the zero and
    // unallocated clusters are holes.
    let alloc = map_of(&s.uri);
    assert!(alloc
        .iter()
        .any(|r| r.0 <= 136 * K && 136 * K < r.0 + r.1 && r.2));
}

/// The nbd plugin in front of qemu-nbd -A passes the upstream's depths
/// through (negotiating the context with it); in front of a server that
/// does not offer the context, it is one image: depth 1 everywhere.
#[test]
fn the_nbd_plugin_passes_the_upstream_depths_through() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let q = QemuNbd::start("qcow2", &top);
    let s = Server::start(&["nbd", &format!("uri={}", q.uri)]);
    let want = depth_runs(&q.uri);
    assert!(want.iter().any(|r| r.2 == 3) && want.iter().any(|r| r.2 == 0));
    assert_eq!(depth_runs(&s.uri), want);
    // base:allocation is still the upstream's, beside it.
    assert_eq!(map_of(&s.uri), map_of(&q.uri));
    // An upstream without metadata contexts.
    let plain = Server::start(&["--no-mc", "--filter=qcow2dec", "file", p(&top)]);
    let s = Server::start(&["nbd", &format!("uri={}", plain.uri)]);
    assert_eq!(depth_runs(&s.uri), [(0, 4 * M, 1)]);
}

/// Past the end of a backing image shorter than the image above it, qemu
/// counts the zeroes as the short image's (its depth), not as allocated
/// nowhere; and a raw backing file has every byte.
#[test]
fn short_and_raw_backing_images_count_as_qemu_nbd_counts_them() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    create_qcow2(&d("short.qcow2"), None, &[], Some("1M"));
    qemu_io(&d("short.qcow2"), &["write -P 1 0 64k"]);
    create_qcow2(
        &d("grown.qcow2"),
        Some(("short.qcow2", "qcow2")),
        &[],
        Some("4M"),
    );
    create_qcow2(
        &d("over.qcow2"),
        Some(("grown.qcow2", "qcow2")),
        &[],
        Some("4M"),
    );
    qemu_io(&d("over.qcow2"), &["write -P 2 2M 64k"]);
    // A sparse raw base, 2M, under a 4M qcow2.
    let raw = d("base.raw");
    sparse_file(&raw, 2 * M);
    create_qcow2(
        &d("onraw.qcow2"),
        Some(("base.raw", "raw")),
        &[],
        Some("4M"),
    );
    qemu_io(&d("onraw.qcow2"), &["write -P 3 1M 64k"]);
    for img in ["over.qcow2", "onraw.qcow2"] {
        let q = QemuNbd::start("qcow2", &d(img));
        let s = ours(&d(img), &[]);
        let want = depth_runs(&q.uri);
        assert_eq!(depth_runs(&s.uri), want, "{img}");
        if img == "onraw.qcow2" {
            // Raw has every byte, its holes and past its end included.
            assert!(want.iter().all(|r| r.2 != 0), "{want:?}");
        }
    }
    // over: 64k of short's data (3), short's unwritten clusters (0), our
    // data at 2M (1), and short's synthesised zeroes past 1M (3).
    let s = ours(&d("over.qcow2"), &[]);
    assert_eq!(
        depth_runs(&s.uri),
        [
            (0, 64 * K, 3),
            (64 * K, M - 64 * K, 0),
            (M, M, 3),
            (2 * M, 64 * K, 1),
            (2 * M + 64 * K, 2 * M - 64 * K, 3)
        ]
    );
}

/// A raw file with holes is one image: depth 1 everywhere, as qemu-nbd -A
/// -f raw says, while base:allocation shows its holes.
#[test]
fn a_raw_file_with_holes_is_depth_one_everywhere() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("holes.raw");
    sparse_file_with(&raw, 4 * M, M, &[7u8; 65536]);
    let q = QemuNbd::start("raw", &raw);
    let s = Server::start(&["-r", "file", raw.to_str().unwrap()]);
    let want = depth_runs(&q.uri);
    assert_eq!(want, [(0, 4 * M, 1)]);
    assert_eq!(depth_runs(&s.uri), want);
    assert_eq!(
        qemu_map_of_context(&s.socket),
        qemu_map_of_context(&q.socket)
    );
    assert!(
        map_of(&s.uri).iter().any(|r| r.2),
        "the holes show in base:allocation"
    );
}

/// Filters that move offsets move the depths with the bytes (offset,
/// truncate), and cow is a layer of its own over what it wraps.
#[test]
fn filters_move_depths_with_the_bytes() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let q = QemuNbd::start("qcow2", &top);
    let whole = depth_runs(&q.uri);
    // The runs of `whole` within [from, to), moved down by `from`.
    let window = |from: u64, to: u64| -> Vec<(u64, u64, u32)> {
        whole
            .iter()
            .filter(|r| r.0 < to && r.0 + r.1 > from)
            .map(|r| {
                let (a, b) = (r.0.max(from), (r.0 + r.1).min(to));
                (a - from, b - a, r.2)
            })
            .collect()
    };
    let s = Server::start(&[
        "--filter=offset",
        "--filter=qcow2dec",
        "file",
        top.to_str().unwrap(),
        "offset=1M",
        "range=2M",
    ]);
    assert_eq!(depth_runs(&s.uri), window(M, 3 * M));

    // Grown to 8M: qemu's runs, then the added zeroes as this export's own.
    let s = Server::start(&[
        "--filter=truncate",
        "--filter=qcow2dec",
        "file",
        top.to_str().unwrap(),
        "truncate=8M",
    ]);
    let mut want = whole.clone();
    want.push((4 * M, 4 * M, 1));
    assert_eq!(depth_runs(&s.uri), want);

    // cow over the chain, before any write: one deeper everywhere
    // anything is allocated.
    let s = Server::start(&[
        "--filter=cow",
        "--filter=qcow2dec",
        "file",
        top.to_str().unwrap(),
    ]);
    let deeper: Vec<_> = whole
        .iter()
        .map(|r| (r.0, r.1, if r.2 == 0 { 0 } else { r.2 + 1 }))
        .collect();
    assert_eq!(depth_runs(&s.uri), deeper);
}

/// Listing and selecting through libnbd, both contexts in one block
/// status request (REQ_ONE too), one context alone, and --no-mc.
#[test]
fn libnbd_lists_selects_and_gets_both_contexts_in_one_request() {
    if !have_tools() || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let s = ours(&top, &[]);
    let out = python(
        r#"
import nbd, sys
uri = sys.argv[1]

def listed(queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    got = []
    n = h.opt_list_meta_context(lambda name: got.append(name))
    assert n == len(got), (n, got)
    h.opt_abort()
    return got

assert listed([]) == ["base:allocation", "qemu:allocation-depth"], listed([])
assert listed(["qemu:"]) == ["qemu:allocation-depth"], listed(["qemu:"])
assert listed(["base:"]) == ["base:allocation"], listed(["base:"])
assert listed(["qemu:allocation-depth", "qemu:"]) == ["qemu:allocation-depth"]
assert listed(["qemu:dirty-bitmap:x", "QEMU:allocation-depth", "qemu"]) == []

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(uri)
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:allocation-depth")
got = {}
def f(ctx, offset, e, err):
    assert ctx not in got, ctx
    got[ctx] = list(zip(e[0::2], e[1::2]))
# [128k, 192k): top's 4k subcluster at 132k (depth 1) in a cluster that
# is otherwise allocated nowhere.
h.block_status(64 * 1024, 128 * 1024, f)  # count, offset
assert sorted(got) == ["base:allocation", "qemu:allocation-depth"], got
d = got["qemu:allocation-depth"]
assert d[:3] == [(4096, 0), (4096, 1), (57344, 0)], d
a = got["base:allocation"]
assert a[:3] == [(4096, 3), (4096, 0), (57344, 3)], a
got.clear()
h.block_status(128 * 1024, 64 * 1024, f, nbd.CMD_FLAG_REQ_ONE)
assert got["qemu:allocation-depth"] == [(65536, 2)], got
assert got["base:allocation"] == [(65536, 0)], got
h.shutdown()

# One context alone: one chunk, for that context.
h = nbd.NBD()
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(uri)
assert not h.can_meta_context("base:allocation")
got.clear()
h.block_status(65536, 0, f)
assert list(got) == ["qemu:allocation-depth"] and got["qemu:allocation-depth"][0] == (65536, 3), got
h.shutdown()
print("OK")
"#,
        &[&s.uri],
    );
    assert_eq!(out.trim(), "OK");

    let s = Server::start(&["--no-mc", "memory", "size=1M"]);
    let out = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
try:
    h.opt_list_meta_context(lambda name: None)
    raise SystemExit("listing succeeded under --no-mc")
except nbd.Error:
    pass
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.opt_go()
assert not h.can_meta_context("base:allocation")
assert not h.can_meta_context("qemu:allocation-depth")
h.shutdown()
print("OK")
"#,
        &[&s.uri],
    );
    assert_eq!(out.trim(), "OK");
}

/// Both contexts selected by SET_META_CONTEXT with their own ids; a block
/// status reply is one chunk per context, 32-bit descriptors with
/// structured replies and 64-bit ones with extended headers, DONE on the
/// last only.
#[test]
fn one_chunk_per_context_in_compact_and_extended_replies() {
    for extended in [false, true] {
        let s = Server::start(&["memory", "size=16M"]);
        let mut c = RawClient::start(&s.socket);
        let o = if extended {
            OptionRequest::ExtendedHeaders
        } else {
            OptionRequest::StructuredReply
        };
        assert_eq!(c.simple_option(o), REP_ACK);
        c.extended = extended;
        c.structured = true;
        c.option(&OptionRequest::MetaContext {
            set: true,
            export: String::new(),
            queries: vec![
                "qemu:allocation-depth".into(),
                "x-unknown:thing".into(),
                "base:allocation".into(),
            ],
        });
        let (r, all) = c.read_until_final();
        assert_eq!(r, REP_ACK);
        let mut ids = std::collections::HashMap::new();
        for (t, d) in &all[..all.len() - 1] {
            assert_eq!(*t, REP_META_CONTEXT);
            let id = u32::from_be_bytes(d[..4].try_into().unwrap());
            ids.insert(String::from_utf8(d[4..].to_vec()).unwrap(), id);
        }
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_ne!(ids["base:allocation"], ids["qemu:allocation-depth"]);
        c.option(&OptionRequest::Info {
            go: true,
            name: String::new(),
            requests: vec![],
        });
        assert_eq!(c.read_until_final().0, REP_ACK);
        c.request(CMD_WRITE, 0, 1, 0, 4096, &[9u8; 4096]);
        assert_eq!(c.reply(0).error, 0);
        c.request(CMD_BLOCK_STATUS, 0, 2, 0, 16 * M, &[]);
        let rep = c.reply(0);
        assert_eq!(rep.error, 0);
        assert_eq!(rep.chunks.len(), 2, "{:?}", rep.chunks);
        let mut seen = std::collections::HashMap::new();
        for (kind, p) in &rep.chunks {
            let id = u32::from_be_bytes(p[..4].try_into().unwrap());
            // (length, status) descriptors.
            let descs: Vec<(u64, u32)> = if extended {
                assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS_EXT);
                let n = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
                assert_eq!(p.len(), 8 + 16 * n);
                p[8..]
                    .chunks(16)
                    .map(|d| {
                        let len = u64::from_be_bytes(d[..8].try_into().unwrap());
                        (len, u64::from_be_bytes(d[8..].try_into().unwrap()) as u32)
                    })
                    .collect()
            } else {
                assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS);
                p[4..]
                    .chunks(8)
                    .map(|d| {
                        let len = u32::from_be_bytes(d[..4].try_into().unwrap());
                        (len as u64, u32::from_be_bytes(d[4..].try_into().unwrap()))
                    })
                    .collect()
            };
            seen.insert(id, descs);
        }
        // The memory plugin: a hole after the written page; one image.
        let alloc = &seen[&ids["base:allocation"]];
        assert_eq!(alloc[0].1, 0, "{alloc:?}");
        assert_eq!(alloc[1].1, STATE_HOLE | STATE_ZERO, "{alloc:?}");
        assert_eq!(seen[&ids["qemu:allocation-depth"]], [(16 * M, 1)]);
    }
}

/// A write through the (writable) qcow2dec filter is depth 1 at once,
/// and after the server has written its metadata back and exited,
/// qemu-nbd -A reads the same depths from the file.
#[test]
fn a_write_through_qcow2dec_is_this_image_at_once() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    create_qcow2(&d("base.qcow2"), None, &[], Some("4M"));
    qemu_io(&d("base.qcow2"), &["write -P 1 0 64k"]);
    let img = d("over.qcow2");
    create_qcow2(&img, Some(("base.qcow2", "qcow2")), &[], None);
    let s = ours(&img, &[]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 9 1536k 64k", &s.uri]));
    let got = depth_runs(&s.uri);
    assert_eq!(
        got,
        [
            (0, 64 * K, 2),
            (64 * K, 1536 * K - 64 * K, 0),
            (1536 * K, 64 * K, 1),
            (1600 * K, 4 * M - 1600 * K, 0)
        ]
    );
    assert!(s.stop().success());
    let q = QemuNbd::start("qcow2", &img);
    assert_eq!(depth_runs(&q.uri), got);
}
