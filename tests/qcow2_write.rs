//! Writing qcow2 through the qcow2dec filter, checked by qemu: the same
//! writes made with `qemu-io` on a copy must give an image `qemu-img
//! compare` calls identical, `qemu-img check` must find ours clean, a
//! server killed with SIGKILL in the middle of a write workload must
//! leave an image with at most leaks and every flushed write in it, and
//! parallel connections must not lose each other's writes.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::qemu::*;
use common::*;

fn have_tools() -> bool {
    have("qemu-img") && have("qemu-io") && have_python_nbd()
}

/// Serve `img` writable, run `qemu-io` with `cmds` against it over NBD,
/// stop the server (which writes the metadata back) and return its log.
fn write_through_server(img: &Path, cmds: &[&str]) -> String {
    let s = serve_qcow2(&[], img, &[]);
    let mut c = Command::new("qemu-io");
    // Discards are ignored unless asked for.
    c.args(["-f", "raw", "--discard=unmap"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(&s.uri));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io over NBD: {text}");
    let log = s.log();
    assert!(s.stop().success());
    log
}

/// Writes of every kind: partial and whole clusters, across clusters,
/// into allocated, zero, unallocated and (for compressed images)
/// compressed clusters, zeroes with and without unmapping, a discard,
/// FUA, and writes after a flush.
const WRITES: &[&str] = &[
    "write -P 0x11 0 4k",
    "write -P 0x22 100k 300k",
    "write -P 0x33 7M 64k",
    "write -f -P 0x44 12M 1k",
    "write -z 1M 64k",
    "write -z -u 2M 2M",
    "write -z 3M 5k",
    "discard 4M 2M",
    "flush",
    "write -P 0x55 4M 4k",
    "write -P 0x66 15M 1M",
    "write -P 0x77 5000000 70000",
];

#[test]
fn writes_through_the_server_match_qemu_io_on_a_copy() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = guest_disk(dir.path());
    let cases: &[(&str, &[&str])] = &[
        ("v3-64k", &[]),
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c4k", &["-o", "cluster_size=4k"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("zlib", &["-c"]),
        ("zlib-4k", &["-c", "-o", "cluster_size=4k"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("refcount1", &["-o", "refcount_bits=1"]),
        ("refcount64", &["-o", "refcount_bits=64"]),
        ("prealloc", &["-o", "preallocation=metadata"]),
    ];
    for (name, opts) in cases {
        let img = dir.path().join(format!("{name}.qcow2"));
        let twin = dir.path().join(format!("{name}-twin.qcow2"));
        convert_to_qcow2(&raw, &img, opts);
        std::fs::copy(&img, &twin).unwrap();
        let log = write_through_server(&img, WRITES);
        assert!(!log.contains("read-only"), "{name}: {log}");
        qemu_io(&twin, WRITES);
        assert_clean(&img);
        assert_identical(&img, &twin);
        // And the bytes are the writes: spot checks against the guest.
        let got = qemu_raw(&img);
        assert_eq!(&got[100 << 10..400 << 10], &vec![0x22; 300 << 10][..]);
        assert_eq!(&got[4 << 20..(4 << 20) + 4096], &[0x55; 4096][..]);
        assert!(got[(4 << 20) + 4096..5_000_000].iter().all(|&b| b == 0));
        assert_eq!(&got[5_000_000..5_070_000], &[0x77; 70_000][..]);
    }
}

#[test]
fn writes_over_a_backing_chain_copy_the_backing_data() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    guest_disk(dir.path());
    let d = |n: &str| dir.path().join(n);
    // raw base <- qcow2 mid <- qcow2 top (version 3 and version 2 tops).
    create_qcow2(&d("mid.qcow2"), Some(("guest.raw", "raw")), &[], None);
    qemu_io(&d("mid.qcow2"), &["write -P 0x99 0 64k", "write -z 2M 1M"]);
    for (name, opts) in [("top", "compat=1.1"), ("top2", "compat=0.10")] {
        let top = d(&format!("{name}.qcow2"));
        let twin = d(&format!("{name}-twin.qcow2"));
        create_qcow2(&top, Some(("mid.qcow2", "qcow2")), &["-o", opts], None);
        std::fs::copy(&top, &twin).unwrap();
        // v2 has no zero clusters: its discard must not let the backing
        // show through, so leave discard out there (qemu refuses it too).
        let cmds: Vec<&str> = WRITES
            .iter()
            .copied()
            .filter(|c| opts == "compat=1.1" || !c.starts_with("discard"))
            .collect();
        write_through_server(&top, &cmds);
        qemu_io(&twin, &cmds);
        assert_clean(&top);
        assert_identical(&top, &twin);
        // The partial writes kept the backing file's bytes around them.
        let got = qemu_raw(&top);
        let base = std::fs::read(d("guest.raw")).unwrap();
        assert_eq!(&got[4096..64 << 10], &[0x99; (64 << 10) - 4096][..]);
        assert_eq!(&got[400 << 10..1 << 20], &base[400 << 10..1 << 20]);
        // mid and the base are untouched.
        assert_clean(&d("mid.qcow2"));
    }
}

/// Writes that each cover a partial cluster, whole clusters and a
/// partial cluster, over every kind of cluster and across kinds: the
/// writer splits them into runs to allocate and runs to overwrite in
/// place, and copies the old bytes into the partial ends.
#[test]
fn multi_cluster_writes_over_every_kind_of_cluster_match_qemu() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    std::fs::write(d("base.raw"), pseudo_random(8 << 20, 9)).unwrap();
    // What the images hold before: [4M, 5M) compressed clusters, [6M,
    // 6.5M) zero clusters, [6.5M, 6.75M) data; the rest unallocated
    // (the backing file's bytes in `backed`, zeroes in `alone`).
    let setup = [
        "write -c -P 0x21 4M 1M",
        "write -z 6M 512k",
        "write -P 0x31 6656k 256k",
    ];
    let writes = [
        // Unallocated: 1000 bytes into cluster 0, three whole, a part.
        "write -P 0x41 64536 200k",
        // Compressed: a part, whole clusters, a part.
        "write -P 0x42 4195304 300k",
        // From compressed clusters into unallocated ones.
        "write -P 0x43 5212345 100k",
        // Zero clusters, then data (in place), then unallocated.
        "write -P 0x44 6303737 500k",
        // Into clusters written just above, and past them.
        "write -P 0x45 100000 300k",
    ];
    for (name, backing) in [("backed", true), ("alone", false)] {
        let img = d(&format!("{name}.qcow2"));
        let twin = d(&format!("{name}-twin.qcow2"));
        let under = backing.then_some(("base.raw", "raw"));
        create_qcow2(&img, under, &[], Some("8M"));
        qemu_io(&img, &setup);
        std::fs::copy(&img, &twin).unwrap();
        write_through_server(&img, &writes);
        qemu_io(&twin, &writes);
        assert_clean(&img);
        assert_identical(&img, &twin);
        // Spot checks of the partial ends' old bytes.
        let got = qemu_raw(&img);
        let base = std::fs::read(d("base.raw")).unwrap();
        let under = |at: usize, n: usize| -> Vec<u8> {
            if backing {
                base[at..at + n].to_vec()
            } else {
                vec![0; n]
            }
        };
        assert_eq!(&got[..64536], &under(0, 64536)[..], "{name}");
        assert_eq!(&got[64536..100000], &[0x41; 100000 - 64536][..], "{name}");
        assert_eq!(&got[4 << 20..4195304], &[0x21; 1000][..], "{name}");
        let after = 4195304 + (300 << 10);
        assert_eq!(
            &got[after..5212345],
            &vec![0x21; 5212345 - after][..],
            "{name}"
        );
        let end: usize = 5212345 + (100 << 10);
        assert!(end > 5 << 20);
        let cluster_end = end.next_multiple_of(64 << 10);
        assert_eq!(
            &got[end..cluster_end],
            &under(end, cluster_end - end)[..],
            "{name}"
        );
        assert!(got[6 << 20..6303737].iter().all(|&b| b == 0), "{name}");
    }
}

/// The Python client for the crash test: `S ...` before each request,
/// `A` after its reply, so the test knows what was acknowledged.
const WORKLOAD: &str = r#"
import nbd, random, sys
uri, seed, ops, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
r = random.Random(seed)
for i in range(ops):
    k = r.random()
    if k < 0.08:
        print("S F", flush=True)
        h.flush()
    elif k < 0.16:
        b = r.randrange(blocks); n = min(r.randint(1, 32), blocks - b)
        print(f"S Z {b} {n}", flush=True)
        h.zero(n * 4096, b * 4096)
    else:
        b = r.randrange(blocks); n = min(r.randint(1, 16), blocks - b)
        v = r.randrange(1, 256); fua = r.random() < 0.1
        print(f"S W {b} {n} {v} {int(fua)}", flush=True)
        h.pwrite(bytes([v]) * (n * 4096), b * 4096, nbd.CMD_FLAG_FUA if fua else 0)
    print("A", flush=True)
print("OK")
"#;

/// What a block may hold after a crash.
#[derive(Clone, Default)]
struct BlockState {
    /// Its value as of the last completed flush (or FUA write on it).
    stable: u8,
    /// Values written since, acknowledged or in flight.
    maybe: Vec<u8>,
}

fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

#[test]
fn a_server_killed_mid_workload_leaves_a_consistent_image_with_flushed_writes() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    let blocks = 2048u64; // 8 MiB of 4 KiB blocks
    create_qcow2(&img, None, &[], Some("8M"));
    let mut state = vec![BlockState::default(); blocks as usize];
    let mut rng = 0x5eed_u64;
    let mut leaked_once = false;
    for iteration in 0..20u64 {
        let s = serve_qcow2(&[], &img, &[]);
        let mut py = Command::new(PYTHON)
            .arg("-c")
            .arg(WORKLOAD)
            .args([&s.uri, &iteration.to_string(), "400", &blocks.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let kill_after = 20 + lcg(&mut rng) % 700;
        let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
        let mut pending: Option<Vec<String>> = None;
        let mut seen = 0;
        let apply = |req: &[String], state: &mut [BlockState], acked: bool| {
            let n = |i: usize| req[i].parse::<u64>().unwrap();
            match req[1].as_str() {
                "F" if acked => {
                    for b in state.iter_mut() {
                        if let Some(&v) = b.maybe.last() {
                            b.stable = v;
                        }
                        b.maybe.clear();
                    }
                }
                "F" => {}
                "W" | "Z" => {
                    let (first, count) = (n(2), n(3));
                    let v = if req[1] == "W" { n(4) as u8 } else { 0 };
                    let fua = req[1] == "W" && req[5] == "1";
                    for b in &mut state[first as usize..(first + count) as usize] {
                        if acked && fua {
                            b.stable = v;
                            b.maybe.clear();
                        } else {
                            b.maybe.push(v);
                        }
                    }
                }
                other => panic!("unknown request {other}"),
            }
        };
        let mut s = s;
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen += 1;
            if line.starts_with('S') {
                pending = Some(line.split(' ').map(String::from).collect());
            } else if line == "A" {
                let req = pending.take().expect("an ack follows a request");
                apply(&req, &mut state, true);
            }
            if seen == kill_after {
                // SIGKILL: no write-back, no flush, nothing the server
                // can do.  The client's lines still in the pipe are
                // requests answered before this: read on to its end.
                s.child.kill().unwrap();
                s.child.wait().unwrap();
            }
        }
        if seen < kill_after {
            s.child.kill().unwrap();
            s.child.wait().unwrap();
        }
        drop(lines);
        let _ = py.wait();
        // An unacknowledged request may or may not have happened.
        if let Some(req) = pending.take() {
            apply(&req, &mut state, false);
        }
        drop(s);

        let (code, text) = check_status(&img);
        assert!(
            code == 0 || code == 3,
            "iteration {iteration}: qemu-img check says corrupt ({code}): {text}"
        );
        leaked_once |= code == 3;
        let got = qemu_raw(&img);
        for (i, b) in state.iter_mut().enumerate() {
            let block = &got[i * 4096..(i + 1) * 4096];
            let v = block[0];
            assert!(
                block.iter().all(|&x| x == v),
                "iteration {iteration}: block {i} is torn"
            );
            assert!(
                v == b.stable || b.maybe.contains(&v),
                "iteration {iteration}: block {i} holds {v:#x}, expected {:#x} or one of {:?}",
                b.stable,
                b.maybe
            );
            // What is there now is what the next round starts from.
            b.stable = v;
            b.maybe.clear();
        }
    }
    // Leaks are what a crash may leave; qemu-img repairs them, and the
    // image is then clean.
    if leaked_once {
        run_ok(Command::new("qemu-img").args(["check", "-q", "-r", "leaks", p(&img)]));
    }
    assert_clean(&img);
}

const PARALLEL: &str = r#"
import nbd, random, sys, threading
uri, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
N = 4
model = bytearray(size)
lock = threading.Lock()
SHARED = 1 << 20          # [0, 1M): every thread writes its own sectors of the same clusters
OWN = (size - SHARED) // N
def worker(t):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn()
    r = random.Random(t)
    for i in range(300):
        k = r.random()
        if k < 0.5:
            s = r.randrange(SHARED // 512 // N) * N + t
            v = bytes([(t * 64 + i) % 255 + 1]) * 512
            h.pwrite(v, s * 512)
            with lock:
                model[s * 512:(s + 1) * 512] = v
        else:
            base = SHARED + t * OWN
            off = base + r.randrange(OWN // 4096 - 16) * 4096
            n = r.randint(1, 16) * 4096
            if k < 0.8:
                v = bytes([r.randrange(1, 256)]) * n
                h.pwrite(v, off)
            elif k < 0.9:
                h.zero(n, off, 0 if r.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE)
                v = bytes(n)
            else:
                h.trim(n, off)
                # Trim leaves whole clusters as zeroes and the rest as it was.
                v = h.pread(n, off)
                assert all(x == 0 or x == y for x, y in zip(v, model[off:off + n]))
            with lock:
                model[off:off + n] = v
    h.flush()
    h.shutdown()
threads = [threading.Thread(target=worker, args=(t,)) for t in range(N)]
for th in threads: th.start()
for th in threads: th.join()
h = nbd.NBD()
h.connect_uri(uri)
got = b"".join(h.pread(1 << 20, o) for o in range(0, size, 1 << 20))
assert got == bytes(model), "a connection's view differs from the model"
open(out, "wb").write(model)
print("OK")
"#;

#[test]
fn parallel_connections_allocate_distinct_clusters() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [("c64k", "cluster_size=64k"), ("c4k", "cluster_size=4k")] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let model = dir.path().join(format!("{name}.model"));
        create_qcow2(&img, None, &["-o", opts], Some("9M"));
        let s = serve_qcow2(&[], &img, &[]);
        python(PARALLEL, &[&s.uri, &(9u64 << 20).to_string(), p(&model)]);
        assert!(s.stop().success());
        assert_clean(&img);
        assert!(
            qemu_raw(&img) == std::fs::read(&model).unwrap(),
            "{name}: the image differs from the model"
        );
    }
}

/// Start a server that should serve `img` read-only, and check it does,
/// with `why` in its log.
fn served_read_only(args: &[&str], why: &str) {
    let s = Server::start(args);
    let out = nbd_script(
        r#"
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    print("written")
except nbd.Error as e:
    print("refused", e)
"#,
        &[&s.uri],
    );
    assert!(out.contains("refused"), "{args:?}: {out}");
    let log = s.log();
    assert!(log.contains(why), "{args:?}: log lacks {why:?}: {log}");
}

#[test]
fn images_it_cannot_keep_consistent_are_served_read_only_with_the_reason() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let make = |name: &str, opts: &str| {
        let img = d(name);
        create_qcow2(&img, None, &["-o", opts], Some("4M"));
        img
    };
    let corrupt = make("corrupt.qcow2", "compat=1.1");
    or_u64(&corrupt, 72, 1 << 1);
    served_read_only(
        &["--filter=qcow2dec", "file", p(&corrupt)],
        "marked corrupt: repair it first with qemu-img check -r all",
    );
    let dirty = make("dirty.qcow2", "lazy_refcounts=on");
    or_u64(&dirty, 72, 1 << 0);
    served_read_only(
        &["--filter=qcow2dec", "file", p(&dirty)],
        "run qemu-img check -r all first",
    );
    let snap = make("snap.qcow2", "compat=1.1");
    qemu_img(&["snapshot", "-c", "s1", p(&snap)]);
    served_read_only(
        &["--filter=qcow2dec", "file", p(&snap)],
        "1 internal snapshot(s)",
    );
    let extl2 = make("extl2.qcow2", "extended_l2=on,cluster_size=64k");
    served_read_only(
        &["--filter=qcow2dec", "file", p(&extl2)],
        "extended L2 entries",
    );
    let plain = make("plain.qcow2", "compat=1.1");
    // -r: read-only on request, nothing to say.
    served_read_only(&["-r", "--filter=qcow2dec", "file", p(&plain)], "");
    // A layer below that cannot write, or cannot grow.
    served_read_only(
        &["--filter=qcow2dec", "--filter=readonly", "file", p(&plain)],
        "the layer below is read-only",
    );
    served_read_only(
        &["--filter=qcow2dec", "--filter=cow", "file", p(&plain)],
        "the layer below cannot grow",
    );
    // None of them was changed.
    for img in [&corrupt, &snap, &extl2, &plain] {
        assert!(
            qemu_raw(img).iter().all(|&b| b == 0),
            "{}: changed",
            img.display()
        );
    }
    assert_clean(&plain);
}

#[test]
fn an_image_in_memory_grows_as_clusters_are_appended() {
    if !have_tools() {
        return;
    }
    // The data plugin holds the image in the memory plugin's pages, which
    // grow on demand: 3 MiB of new clusters go past its end.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    create_qcow2(&img, None, &[], Some("4M"));
    let before = std::fs::metadata(&img).unwrap().len();
    assert!(before < 1 << 20);
    let s = Server::start(&["--filter=qcow2dec", "data", &format!("data=<{}", p(&img))]);
    nbd_script(
        r#"
assert not h.is_read_only()
h.pwrite(b"\xab" * (3 << 20), 1 << 20)
h.pwrite(b"\xcd" * 100, 12345)
h.flush()
h.shutdown()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.pread(3 << 20, 1 << 20) == b"\xab" * (3 << 20)
assert h.pread(200, 12300) == bytes(45) + b"\xcd" * 100 + bytes(55)
"#,
        &[&s.uri],
    );
    assert!(!s.log().contains("read-only"), "{}", s.log());
}

#[test]
fn nbdcopy_fills_a_small_cluster_image_past_its_refcount_table() {
    if !have_tools() || !have("nbdcopy") {
        return;
    }
    // 512-byte clusters: qemu-img create's one-cluster refcount table
    // maps 8 MiB of file, so filling 12 MiB moves it to a larger one.
    // nbdcopy writes over several connections at once (multi-conn).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.qcow2");
    let raw = dir.path().join("data.raw");
    let mut data = pseudo_random(12 << 20, 21);
    data.extend(vec![0u8; 2 << 20]);
    data.extend(pseudo_random(2 << 20, 22));
    std::fs::write(&raw, &data).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&img),
        "16M",
    ]);
    let s = serve_qcow2(&[], &img, &[]);
    run_ok(Command::new("nbdcopy").arg(&raw).arg(&s.uri));
    assert!(s.stop().success());
    assert_clean(&img);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", p(&img), p(&raw)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
