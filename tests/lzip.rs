//! The lzip filter against files made by lzip and plzip: every byte read
//! back through nbdcopy, a damaged member failing its reads (and only
//! those) with EIO, and truncated or trailing-data files refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// Random data, then zeroes, then more random data: 9 MiB + a bit.
fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = pseudo_random(4 << 20, 21);
    data.extend(vec![0u8; 3 << 20]);
    data.extend(pseudo_random((2 << 20) + 777, 22));
    let p = dir.join("disk.img");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// `tool args < input > out`.
fn compress(tool: &str, args: &[&str], input: &Path, out: &Path) {
    let st = Command::new(tool)
        .args(args)
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(st.success(), "{tool} {args:?}");
}

fn have_tools() -> bool {
    have("lzip") && have("plzip") && have("nbdcopy") && have_python_nbd()
}

#[test]
fn lzip_files_of_one_and_many_members_read_back_exactly() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = image(dir.path());
    for (name, tool, args) in [
        ("single.lz", "lzip", &["-c"][..]),
        ("plzip.lz", "plzip", &["-c", "-B", "512KiB", "-n", "2"][..]),
    ] {
        let lz = dir.path().join(name);
        compress(tool, args, &raw, &lz);
        let s = Server::start(&["--filter=lzip", "file", lz.to_str().unwrap()]);
        assert!(read_all(&s.uri) == data, "{name}");
        // Random reads, out of order, through one connection.
        python(
            "import nbd,sys,random\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
             data=open(sys.argv[2],'rb').read()\nr=random.Random(5)\n\
             for _ in range(200):\n    o=r.randrange(0,len(data)-70000)\n    n=r.randrange(1,70000)\n\
             \x20   assert h.pread(n,o)==data[o:o+n], (o,n)\nprint('OK')",
            &[&s.uri, raw.to_str().unwrap()],
        );
    }
}

#[test]
fn damaged_truncated_and_trailing_lzip_files_are_errors() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = image(dir.path());
    let good = dir.path().join("good.lz");
    compress("plzip", &["-c", "-B", "1MiB"], &raw, &good);
    let bytes = std::fs::read(&good).unwrap();

    // One byte flipped inside the second member: reads touching its
    // decompressed range fail with EIO, the rest are right, and the log
    // names the file and offset.
    let members = lzip_member_starts(&bytes);
    assert!(members.len() >= 9, "{members:?}");
    let mut bad = bytes.clone();
    let at = members[1] + 1000;
    bad[at] ^= 0x55;
    let badp = dir.path().join("bad.lz");
    std::fs::write(&badp, &bad).unwrap();
    let s = Server::start(&["--filter=lzip", "file", badp.to_str().unwrap()]);
    let out = python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         data=open(sys.argv[2],'rb').read()\nM=1<<20\n\
         assert h.pread(4096,0)==data[:4096]\nassert h.pread(4096,2*M)==data[2*M:2*M+4096]\n\
         for _ in range(2):\n    try:\n        h.pread(4096, M+100)\n        print('SERVED')\n\
         \x20   except nbd.Error as e:\n        print('EIO')\nprint('OK')",
        &[&s.uri, raw.to_str().unwrap()],
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["EIO", "EIO", "OK"],
        "{out}"
    );
    let log = s.log();
    assert!(log.contains("bad.lz") && log.contains("CRC32"), "{log}");
    drop(s);
    let _ = data;

    // Truncated, and with trailing data: refused when the client opens.
    let cut = dir.path().join("cut.lz");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    let tail = dir.path().join("tail.lz");
    let mut t = bytes.clone();
    t.extend_from_slice(b"some trailing junk");
    std::fs::write(&tail, &t).unwrap();
    for p in [&cut, &tail] {
        let s = Server::start(&["--filter=lzip", "file", p.to_str().unwrap()]);
        assert!(!nbdinfo_ok(&[&s.uri]), "{}", p.display());
        assert!(s.log().contains("trailer"), "{}", s.log());
    }
}

/// Member start offsets, found from the trailers as lzip defines them.
fn lzip_member_starts(b: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut end = b.len();
    while end > 0 {
        let size = u64::from_le_bytes(b[end - 8..end].try_into().unwrap()) as usize;
        end -= size;
        starts.push(end);
    }
    starts.reverse();
    starts
}

#[test]
fn a_qcow2_inside_lzip_reads_through_both_filters() {
    if !have_tools() || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = image(dir.path());
    let q = dir.path().join("disk.qcow2");
    common::qemu::convert_to_qcow2(&raw, &q, &[]);
    let lz = dir.path().join("disk.qcow2.lz");
    compress("plzip", &["-c", "-B", "1MiB"], &q, &lz);
    let s = Server::start(&[
        "--filter=qcow2dec",
        "--filter=lzip",
        "file",
        lz.to_str().unwrap(),
    ]);
    // qcow2's virtual size is the raw size rounded up to a sector.
    let mut want = data;
    want.resize(want.len().next_multiple_of(512), 0);
    assert!(read_all(&s.uri) == want);
}
