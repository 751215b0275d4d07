//! The qcow2dec filter against images qemu-img makes: every byte compared
//! with `qemu-img convert -O raw` of the same image (read through nbdcopy),
//! block status through nbdinfo --map, and clear errors for what is
//! refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::qemu::*;
use common::*;

fn have_tools() -> bool {
    have("qemu-img") && have("qemu-io") && have("nbdcopy") && have("nbdinfo")
}

/// What nbdkit-rs serves for `img` with `extra` filter parameters.
fn served(img: &Path, extra: &[&str]) -> Vec<u8> {
    read_all(&serve_qcow2(&[], img, extra).uri)
}

fn assert_same(img: &Path, extra: &[&str]) {
    let want = qemu_raw(img);
    let got = served(img, extra);
    assert_eq!(got.len(), want.len(), "{}: size", img.display());
    assert!(got == want, "{}: contents differ", img.display());
}

/// Start the server on `args` and expect the first client to fail, with a
/// log line containing `what`.
fn open_fails(args: &[&str], what: &str) {
    let s = Server::start(args);
    assert!(!nbdinfo_ok(&[&s.uri]), "{args:?}: opened");
    let log = s.log();
    assert!(log.contains(what), "{args:?}: log lacks {what:?}: {log}");
}

#[test]
fn every_layout_qemu_img_writes_reads_back_byte_exact() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = guest_disk(dir.path());
    let raw = raw.to_str().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("v3-64k", &[]),
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("zlib", &["-c"]),
        ("zlib-4k", &["-c", "-o", "cluster_size=4k"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ("lazy", &["-o", "lazy_refcounts=on"]),
        ("prealloc", &["-o", "preallocation=metadata"]),
    ];
    for (name, opts) in cases {
        let img = dir.path().join(format!("{name}.qcow2"));
        convert_to_qcow2(Path::new(raw), &img, opts);
        // Zero clusters (plain and over allocated ones) and a write that
        // covers part of a cluster.
        qemu_io(
            &img,
            &[
                "write -z 1M 128k",
                "write -z -u 6M 64k",
                "write -P 0x5a 100k 3k",
            ],
        );
        assert_same(&img, &[]);
    }
}

#[test]
fn backing_chains_read_through_to_the_base() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    guest_disk(dir.path());
    let d = |n: &str| dir.path().join(n);
    // raw base <- qcow2 middle <- qcow2 top (extended L2, so half-written
    // clusters read their other subclusters from below), names relative.
    create_qcow2(&d("mid.qcow2"), Some(("guest.raw", "raw")), &[], None);
    qemu_io(&d("mid.qcow2"), &["write -P 0x11 0 64k", "write -z 2M 1M"]);
    create_qcow2(
        &d("top.qcow2"),
        Some(("mid.qcow2", "qcow2")),
        &["-o", "extended_l2=on,cluster_size=64k"],
        None,
    );
    qemu_io(
        &d("top.qcow2"),
        &[
            "write -P 0x22 4k 4k",
            "write -P 0x33 3M 2k",
            "write -z 8M 4k",
        ],
    );
    assert_same(&d("top.qcow2"), &[]);

    // A smaller backing file reads as zeroes past its end.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        d("small.raw").to_str().unwrap(),
        "1M",
    ]);
    std::fs::write(d("small.raw"), pseudo_random(1 << 20, 9)).unwrap();
    create_qcow2(
        &d("grown.qcow2"),
        Some(("small.raw", "raw")),
        &[],
        Some("4M"),
    );
    assert_same(&d("grown.qcow2"), &[]);

    // backing=none: unallocated clusters are zeroes; backing=PATH: another
    // base instead of the header's.
    let got = served(&d("mid.qcow2"), &["backing=none"]);
    let mut want = vec![0u8; 16 << 20];
    want[..64 << 10].fill(0x11);
    assert!(got == want, "backing=none");
    let other = d("other.raw");
    make_file(&other, 16 << 20, 10);
    let got = served(
        &d("mid.qcow2"),
        &[
            &format!("backing={}", other.display()),
            "backing-format=raw",
        ],
    );
    let mut want = pseudo_random(16 << 20, 10);
    want[..64 << 10].fill(0x11);
    want[2 << 20..3 << 20].fill(0);
    assert!(got == want, "backing=PATH");

    // Block status: data here, zeroes, and what is allocated nowhere.
    create_qcow2(&d("sparse.qcow2"), None, &[], Some("8M"));
    qemu_io(
        &d("sparse.qcow2"),
        &["write -P 1 1M 64k", "write -z 3M 64k"],
    );
    let s = Server::start(&[
        "--filter=qcow2dec",
        "file",
        d("sparse.qcow2").to_str().unwrap(),
    ]);
    let map = stdout_of(Command::new("nbdinfo").args(["--map", &s.uri]));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l[0] == "1048576" && l[1] == "65536" && l[2] == "0"),
        "data extent: {map}"
    );
    assert!(
        lines.iter().any(|l| l[0] == "0" && l[2] == "3"),
        "leading hole: {map}"
    );
}

#[test]
fn internal_snapshots_serve_their_own_state() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = guest_disk(dir.path());
    let img = dir.path().join("snap.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "before", img.to_str().unwrap()]);
    let before = qemu_raw(&img);
    qemu_io(&img, &["write -P 0x77 0 1M", "write -z 5M 1M"]);
    qemu_img(&["snapshot", "-c", "after", img.to_str().unwrap()]);
    assert!(served(&img, &["snapshot=before"]) == before, "by name");
    assert!(served(&img, &["snapshot=1"]) == before, "by ID");
    assert_same(&img, &["snapshot=after"]);
    assert_same(&img, &[]);
    open_fails(
        &[
            "--filter=qcow2dec",
            "file",
            img.to_str().unwrap(),
            "snapshot=nosuch",
        ],
        "no snapshot nosuch",
    );
}

#[test]
fn a_qcow2_inside_xz_reads_without_unpacking() {
    if !have_tools() || !have("xz") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = guest_disk(dir.path());
    let img = dir.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let want = qemu_raw(&img);
    run_ok(
        Command::new("xz")
            .args(["-k", "-T2", "--block-size=256KiB"])
            .arg(&img),
    );
    let xz = dir.path().join("disk.qcow2.xz");
    let s = Server::start(&[
        "--filter=qcow2dec",
        "--filter=xz",
        "file",
        xz.to_str().unwrap(),
    ]);
    assert!(read_all(&s.uri) == want);
}

/// A zlib-compressed qcow2 of the guest disk and what qemu reads from it.
fn compressed_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let raw = guest_disk(dir);
    let img = dir.join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let want = qemu_raw(&img);
    (img, want)
}

#[test]
fn qcow2dec_reads_over_curl_and_the_nbd_plugin() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, want) = compressed_image(dir.path());
    let bytes = std::fs::read(&img).unwrap();

    let http = common::http::HttpServer::start();
    http.add_file("/disk.qcow2", bytes.clone());
    let s = Server::start(&["--filter=qcow2dec", "curl", &http.url("/disk.qcow2")]);
    assert!(read_all(&s.uri) == want, "over curl");
    drop(s);
    // A single sector costs the metadata and one cluster, not the file.
    let s = Server::start(&["--filter=qcow2dec", "curl", &http.url("/disk.qcow2")]);
    let before: u64 = ranged_bytes(&http);
    run_ok(Command::new(PYTHON).arg("-c").arg(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nassert len(h.pread(4096, 12 << 20)) == 4096\n",
    ).arg(&s.uri));
    let fetched = ranged_bytes(&http) - before;
    assert!(
        fetched < bytes.len() as u64 / 4,
        "one sector fetched {fetched} of {} bytes",
        bytes.len()
    );
    drop(s);

    // The qcow2 file served raw by another server, read through nbd.
    let inner = Server::start(&["file", img.to_str().unwrap()]);
    let s = Server::start(&["--filter=qcow2dec", "nbd", &format!("uri={}", inner.uri)]);
    assert!(read_all(&s.uri) == want, "over nbd");
}

/// Bytes the HTTP server has sent in answer to ranged GETs so far.
fn ranged_bytes(http: &common::http::HttpServer) -> u64 {
    http.requests()
        .iter()
        .filter_map(|r| {
            let range = r.header("range")?.strip_prefix("bytes=")?;
            let (a, b) = range.split_once('-')?;
            Some(b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1)
        })
        .sum()
}

#[test]
fn qcow2dec_under_cow_cache_and_readahead() {
    if !have_tools() || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, want) = compressed_image(dir.path());
    let path = img.to_str().unwrap();
    for top in ["--filter=cache", "--filter=readahead", "--filter=cow"] {
        let s = Server::start(&[top, "--filter=qcow2dec", "file", path]);
        assert!(read_all(&s.uri) == want, "{top}: contents differ");
    }
    // cow makes the read-only qcow2 view writable in its overlay: writes
    // read back, and the image file is not touched.
    let before = std::fs::read(&img).unwrap();
    let s = Server::start(&["--filter=cow", "--filter=qcow2dec", "file", path]);
    python(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert not h.is_read_only()\nh.pwrite(b'\\xab' * 65536, 5 << 20)\nh.flush()\n\
         assert h.pread(65536, 5 << 20) == b'\\xab' * 65536\n\
         h.zero(4096, 0)\nassert h.pread(4096, 0) == bytes(4096)\nprint('OK')\n",
        &[&s.uri],
    );
    drop(s);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "cow wrote to the image"
    );
}

/// Reads that fall on data clusters and unallocated ones are sent from
/// the file as they are (the server's direct path: data chunks for the
/// clusters, a hole chunk for the unallocated run); a compressed image's
/// reads are decoded and come as one data chunk.  Same bytes either way.
#[test]
fn reads_of_plain_clusters_go_straight_from_the_file() {
    if !have_tools() || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Data, a 1 MiB run of zeroes (unallocated in the qcow2), data: random
    // for the plain image, text for the compressed one (qemu-img stores a
    // cluster that does not compress uncompressed).
    let sparse = |name: &str, part: &dyn Fn(u64) -> Vec<u8>| {
        let raw = dir.path().join(name);
        let mut whole = part(8);
        whole.extend(vec![0u8; 1 << 20]);
        whole.extend(part(9));
        std::fs::write(&raw, &whole).unwrap();
        raw
    };
    let random = sparse("random.raw", &|seed| pseudo_random(512 << 10, seed));
    let text = sparse("text.raw", &|seed| {
        format!("sector {seed} of a compressible disk\n")
            .repeat(20000)
            .into_bytes()[..512 << 10]
            .to_vec()
    });
    let script = r#"
import nbd, sys
whole = open(sys.argv[2], "rb").read()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status))
    return 0
assert h.pread_structured(2 << 20, 0, chunk) == whole
if sys.argv[3] == "direct":
    assert chunks == [(0, 512 << 10, nbd.READ_DATA),
                      (512 << 10, 1 << 20, nbd.READ_HOLE),
                      (1536 << 10, 512 << 10, nbd.READ_DATA)], chunks
else:
    assert chunks == [(0, 2 << 20, nbd.READ_DATA)], chunks
assert h.pread(700000, 400000) == whole[400000:1100000]
print("OK")
"#;
    for (raw, compress, how) in [(&random, false, "direct"), (&text, true, "decoded")] {
        let img = dir.path().join(format!("{how}.qcow2"));
        convert_to_qcow2(raw, &img, if compress { &["-c"] } else { &[] });
        for ro in [true, false] {
            let mut a = vec!["--filter=qcow2dec", "file", img.to_str().unwrap()];
            if ro {
                a.insert(0, "-r");
            }
            let s = Server::start(&a);
            python(script, &[&s.uri, raw.to_str().unwrap(), how]);
        }
    }
}

/// Sum of the `count=` of the reads in a log filter's file.
fn logged_read_bytes(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" Read id="))
        .filter_map(|l| {
            let hex = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("count=0x"))?;
            u64::from_str_radix(hex, 16).ok()
        })
        .sum()
}

#[test]
fn qcow2dec_over_xz_gzip_and_zstd_reads_only_what_it_needs() {
    if !have_tools() || !have_python_nbd() || !have("xz") || !have("zstd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, want) = compressed_image(dir.path());
    let path = img.to_str().unwrap();
    let size = std::fs::metadata(&img).unwrap().len();
    run_ok(Command::new("xz").args(["-k", "-T2", "--block-size=256KiB", path]));
    run_ok(Command::new("gzip").args(["-k", path]));
    run_ok(Command::new("zstd").args(["-q", "-k", path]));
    for (filter, suffix) in [("xz", "xz"), ("gzip", "gz"), ("zstd", "zst")] {
        let packed = format!("{path}.{suffix}");
        let s = Server::start(&[
            "--filter=qcow2dec",
            &format!("--filter={filter}"),
            "file",
            &packed,
        ]);
        assert!(read_all(&s.uri) == want, "{filter}: contents differ");
        drop(s);
        // The log filter between the two records what qcow2dec asks the
        // decompressing layer for: one sector needs the header, its
        // tables and one cluster.
        let log = dir.path().join(format!("{filter}.log"));
        let s = Server::start(&[
            "--filter=qcow2dec",
            "--filter=log",
            &format!("--filter={filter}"),
            "file",
            &packed,
            &format!("logfile={}", log.display()),
        ]);
        python(
            "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
             assert len(h.pread(4096, 12 << 20)) == 4096\nprint('OK')\n",
            &[&s.uri],
        );
        drop(s);
        let read = logged_read_bytes(&log);
        assert!(read > 0, "{filter}: the log filter saw no reads");
        assert!(
            read < size / 4,
            "{filter}: one sector read {read} bytes of a {size}-byte qcow2"
        );
    }
}

#[test]
fn refused_and_hostile_images_get_clear_errors() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let p = |n: &str| d(n).to_str().unwrap().to_string();

    // Encryption.
    run_ok(Command::new("qemu-img").args([
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        &p("enc.qcow2"),
        "1M",
    ]));
    open_fails(
        &["--filter=qcow2dec", "file", &p("enc.qcow2")],
        "encryption",
    );
    // An external data file.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p("data.raw")),
        &p("ext.qcow2"),
        "1M",
    ]);
    open_fails(
        &["--filter=qcow2dec", "file", &p("ext.qcow2")],
        "external data file",
    );
    // A backing loop: a -> b -> a.
    create_qcow2(&d("a.qcow2"), None, &[], Some("1M"));
    create_qcow2(&d("b.qcow2"), Some(("a.qcow2", "qcow2")), &[], None);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        &p("a.qcow2"),
    ]);
    open_fails(
        &["--filter=qcow2dec", "file", &p("a.qcow2")],
        "backing chain deeper",
    );
    // A missing backing file names it.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "gone.raw",
        "-F",
        "raw",
        "-u",
        &p("orphan.qcow2"),
        "1M",
    ]);
    open_fails(
        &["--filter=qcow2dec", "file", &p("orphan.qcow2")],
        "gone.raw",
    );
    // An L1 table outside the file, and an absurd size its L1 cannot map.
    create_qcow2(&d("l1.qcow2"), None, &[], Some("1M"));
    or_u64(&d("l1.qcow2"), 40, 1 << 40);
    open_fails(&["--filter=qcow2dec", "file", &p("l1.qcow2")], "L1 table");
    create_qcow2(&d("huge.qcow2"), None, &[], Some("1M"));
    or_u64(&d("huge.qcow2"), 24, 1 << 60);
    open_fails(
        &["--filter=qcow2dec", "file", &p("huge.qcow2")],
        "cannot map a virtual size",
    );
    // An L2 entry pointing past the end of the file: the read fails with
    // the offset named, and the connection lives on.
    create_qcow2(&d("l2.qcow2"), None, &[], Some("1M"));
    qemu_io(&d("l2.qcow2"), &["write -P 1 0 64k"]);
    let mut b = std::fs::read(d("l2.qcow2")).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | (1 << 44)).to_be_bytes());
    std::fs::write(d("l2.qcow2"), b).unwrap();
    let s = serve_qcow2(&[], &d("l2.qcow2"), &[]);
    let out = python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         try:\n    h.pread(4096, 0)\n    print('READ')\nexcept nbd.Error as e:\n    print('EIO' if e.errno==5 or '(EIO)' in str(e) else e)\n\
         print(len(h.pread(4096, 512*1024)))\nprint('OK')",
        &[&s.uri],
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["EIO", "4096", "OK"]
    );
    assert!(s.log().contains("l2.qcow2"), "{}", s.log());

    // Dirty and corrupt bits: still readable.
    create_qcow2(&d("dirty.qcow2"), None, &[], Some("1M"));
    qemu_io(&d("dirty.qcow2"), &["write -P 3 0 4k"]);
    or_u64(&d("dirty.qcow2"), 72, 0b11);
    let s = serve_qcow2(&[], &d("dirty.qcow2"), &[]);
    assert_eq!(&read_all(&s.uri)[..4096], &[3u8; 4096][..]);
    assert!(s.log().contains("corrupt"), "{}", s.log());

    // Bad parameters.
    for (arg, what) in [
        ("backing-format=vmdk", "backing-format"),
        ("snapshot=", "snapshot"),
        ("backing=", "backing"),
    ] {
        let out = Command::new(binary())
            .args(["-U", "-", "--run", "true", "--filter=qcow2dec", "null", arg])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{arg} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains(what), "{arg}");
    }
}
