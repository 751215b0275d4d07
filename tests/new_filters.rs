//! The filters added for nbdkit 1.32 parity (nofilter, checkwrite,
//! exportname, extentlist, cacheextents, retry-request, scan, ddrescue,
//! tls-fallback, luks), each driven through the real binary by a real
//! client (nbdcopy, nbdinfo, nbdsh's libnbd, qemu-img, qemu-io).
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const M: u64 = 1024 * 1024;

/// `nbdinfo --list --json` as sorted (name, description) pairs.
fn export_list(uri: &str) -> Vec<(String, Option<String>)> {
    let json = stdout_of(Command::new("nbdinfo").args(["--list", "--json", uri]));
    let out = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import json,sys\nd=json.loads(sys.argv[1])\n\
         for e in sorted(d['exports'], key=lambda e: e['export-name']):\n  \
         print(e['export-name']+'\\t'+str(e.get('description')))",
            )
            .arg(&json),
    );
    out.lines()
        .map(|l| {
            let (n, d) = l.split_once('\t').unwrap();
            (n.to_string(), (d != "None").then(|| d.to_string()))
        })
        .collect()
}

#[test]
fn nofilter_passes_reads_and_writes_through() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    let s = Server::start(&["--filter=nofilter", "--filter=nofilter", "memory", "1M"]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'abc'*100, 4096)\nassert h.pread(300, 4096)==b'abc'*100\n\
         assert h.can_trim() and h.can_zero()\nprint('OK')",
        &[&s.uri],
    );
    let all = read_all(&s.uri);
    assert_eq!(all.len(), M as usize);
    assert_eq!(&all[4096..4099], b"abc");
}

#[test]
fn checkwrite_accepts_a_faithful_copy_and_refuses_different_data() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    // A copy of the export onto itself succeeds.
    let out = Command::new(binary())
        .args([
            "-U",
            "-",
            "--filter=checkwrite",
            "data",
            "1 2 3 @32768 4 @1048575 5",
        ])
        .args(["--run", "nbdcopy \"$uri\" \"$uri\""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = Server::start(&["--filter=checkwrite", "data", "1 2 3 @32768 4", "size=1M"]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert h.can_trim() and h.can_zero() and h.can_multi_conn()\n\
         h.pwrite(b'\\x01\\x02\\x03', 0)\n\
         h.zero(8192, 4096)\nh.trim(65536, 65536)\nh.flush()\n\
         for f in (lambda: h.pwrite(b'\\x09', 1), lambda: h.zero(1, 32768), lambda: h.trim(4096, 0)):\n  \
           try:\n    f()\n    assert False\n  except nbd.Error as e:\n    assert e.errno == 'EIO', e\n\
         assert h.pread(4, 0) == b'\\x01\\x02\\x03\\x00'\nprint('OK')",
        &[&s.uri],
    );
}

#[test]
fn exportname_changes_list_default_strictness_and_descriptions() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [("a", 1024), ("b", 2048), ("c", 3072)] {
        std::fs::write(dir.path().join(n), vec![0u8; size]).unwrap();
    }
    let d = format!("dir={}", dir.path().display());
    let plain = |s: &str| (s.to_string(), None);
    let s = Server::start(&[
        "--filter=exportname",
        "file",
        &d,
        "default-export=b",
        "exportname-list=explicit",
        "exportname=c",
        "exportname=a",
    ]);
    assert_eq!(export_list(&s.uri), vec![plain("a"), plain("c")]);
    // "" is b, by its own name.
    let info = nbdinfo_json(&["--no-content"], &s.uri);
    assert_eq!(info["export-size"], "2048");
    assert_eq!(info["export-name"], "b");
    drop(s);

    let s = Server::start(&["--filter=exportname", "file", &d, "exportname-list=empty"]);
    assert!(export_list(&s.uri).is_empty());
    drop(s);
    let s = Server::start(&["--filter=exportname", "file", &d, "exportname-list=error"]);
    assert!(!nbdinfo_ok(&["--list", &s.uri]));
    drop(s);

    let s = Server::start(&[
        "--filter=exportname",
        "file",
        &d,
        "exportdesc=script:echo \"[$name]\"",
    ]);
    let l = export_list(&s.uri);
    assert_eq!(l.len(), 3);
    assert_eq!(l[1], ("b".to_string(), Some("[b]".to_string())));
    drop(s);

    // Strict: only a and b may be opened.
    let s = Server::start(&[
        "--filter=exportname",
        "file",
        &d,
        "exportname-strict=true",
        "exportname=a",
        "exportname=b",
        "exportdesc=fixed:hi",
    ]);
    let info = nbdinfo_json(&["--no-content"], &s.uri_for("a"));
    assert_eq!(info["description"], "hi");
    assert!(!nbdinfo_ok(&[&s.uri_for("c")]), "strict let c through");
    drop(s);

    refused(
        &["--filter=exportname", "file", &d, "exportname-list=bogus"],
        "exportname-list",
    );
    refused(
        &["--filter=exportname", "file", &d, "exportdesc=x"],
        "exportdesc",
    );
}

#[test]
fn extentlist_serves_the_listed_extents() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list");
    std::fs::write(&list, "# data at 0 and 2M\n2M 1M\n0 1M\n4M 512K zero\n").unwrap();
    let arg = format!("extentlist={}", list.display());
    let s = Server::start(&["-r", "--filter=extentlist", "null", "size=6M", &arg]);
    let map = stdout_of(Command::new("nbdinfo").args(["--map", &s.uri]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, M, 0),
            (M, M, 3),
            (2 * M, M, 0),
            (3 * M, M, 3),
            (4 * M, M / 2, 2),
            (4 * M + M / 2, 3 * M / 2, 3)
        ]
    );
    std::fs::write(&list, "0 2M\n1M 1M\n").unwrap();
    refused(&["--filter=extentlist", "null", "size=6M", &arg], "overlap");
    std::fs::write(&list, "0 1M hole,bogus\n").unwrap();
    refused(
        &["--filter=extentlist", "null", "size=6M", &arg],
        "extentlist=",
    );
    refused(&["--filter=extentlist", "null", "size=6M"], "extentlist");
}

/// Lines of the log filter's file that record `what` requests.
/// Calls of `what` in a log filter's file (nbdkit's format: the call line
/// is `... Extents id=N ... ...`, its return line `...Extents id=N ...`).
fn log_count(log: &Path, what: &str) -> usize {
    let call = format!(" {what} id=");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&call))
        .count()
}

#[test]
fn cacheextents_answers_repeat_block_status_from_its_cache() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    sparse_file(&img, 4 * M);
    std::fs::write(dir.path().join("x"), b"").unwrap();
    let log = dir.path().join("log");
    let s = Server::start(&[
        "--filter=cacheextents",
        "--filter=log",
        "file",
        img.to_str().unwrap(),
        &format!("logfile={}", log.display()),
    ]);
    let qemu_io = |cmds: &[&str]| qemu_io_ok(&s.uri, cmds);
    qemu_io(&["map", "map", "map"]);
    let first = log_count(&log, "Extents");
    assert!(first >= 1, "no block status reached the plugin");
    qemu_io(&["map", "alloc 0"]);
    assert_eq!(log_count(&log, "Extents"), first, "the cache was not used");
    // A write forgets the cache.
    qemu_io(&["write 0 512", "map"]);
    assert!(
        log_count(&log, "Extents") > first,
        "a write did not forget the cache"
    );
}

#[test]
fn retry_request_retries_a_failing_read() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    std::fs::write(&count, "0\n").unwrap();
    let script = dir.path().join("flaky.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\ncase \"$1\" in\n  get_size) echo 512 ;;\n  pread)\n    \
             read i < {c}; i=$((i+1)); echo $i > {c}\n    \
             if [ $i -le 2 ]; then echo 'EIO flaky' >&2; exit 1; fi\n    \
             head -c $3 /dev/zero ;;\n  *) exit 2 ;;\nesac\n",
            c = count.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = dir.path().join("out");
    let ok = Command::new(binary())
        .args(["-U", "-", "--filter=retry-request", "sh"])
        .arg(&script)
        .args(["retry-request-retries=2", "retry-request-delay=1", "--run"])
        .arg(format!("nbdcopy --synchronous \"$uri\" {}", out.display()))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
    // One retry is not enough for two failures.
    std::fs::write(&count, "0\n").unwrap();
    let bad = Command::new(binary())
        .args(["-U", "-", "--filter=retry-request", "sh"])
        .arg(&script)
        .args(["retry-request-retries=1", "retry-request-delay=1", "--run"])
        .arg(format!("nbdcopy --synchronous \"$uri\" {}", out.display()))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    refused(
        &[
            "--filter=retry-request",
            "memory",
            "1M",
            "retry-request-delay=0",
        ],
        "retry-request-delay",
    );
    refused(
        &[
            "--filter=retry-request",
            "memory",
            "1M",
            "retry-request-retries=x",
        ],
        "retry-request-retries",
    );
}

#[test]
fn scan_prefetches_the_whole_disk_in_the_background() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // The log filter sits between scan and cache and sees the prefetches.
    let s = Server::start(&[
        "--filter=scan",
        "--filter=log",
        "--filter=cache",
        "memory",
        "1M",
        &format!("logfile={}", log.display()),
        "scan-size=64K",
        "scan-ahead=false",
    ]);
    // Hold a connection open until the last block has been prefetched.
    python(
        "import nbd,sys,time\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         want='offset=0xf0000 count=0x10000'\n\
         while want not in open(sys.argv[2]).read():\n  time.sleep(0.05)\n\
         print('OK')",
        &[&s.uri, log.to_str().unwrap()],
    );
    let text = std::fs::read_to_string(&log).unwrap();
    // Every 64K block of the disk was prefetched.
    for i in 0..16u64 {
        let want = format!("offset={:#x} count=0x10000", i * 65536);
        assert!(
            text.lines()
                .any(|l| l.contains("Cache") && l.contains(&want)),
            "no prefetch {want}: {text}"
        );
    }
    refused(
        &["--filter=scan", "memory", "1M", "scan-size=3000"],
        "scan-size",
    );
}

#[test]
fn ddrescue_fails_reads_of_unrescued_blocks() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map");
    std::fs::write(
        &map,
        "# Mapfile\n0x00000000     +               1\n\
         0x00000000  0x00000200  +\n0x00000200  0x00000200  -\n\
         0x00000400  0x00000200  +\n0x00000600  0x00000200  +\n0x00000800 0x200 *\n",
    )
    .unwrap();
    let s = Server::start(&[
        "--filter=ddrescue",
        "pattern",
        "size=1M",
        &format!("ddrescue-mapfile={}", map.display()),
    ]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert h.is_read_only()\n\
         assert len(h.pread(512, 0)) == 512\nassert len(h.pread(1024, 1024)) == 1024\n\
         for off, n in ((512, 512), (0, 1024), (1536, 1024), (4096, 512)):\n  \
           try:\n    h.pread(n, off)\n    assert False, off\n  except nbd.Error as e:\n    assert e.errno == 'EIO'\n\
         print('OK')",
        &[&s.uri],
    );
    refused(&["--filter=ddrescue", "memory", "1M"], "ddrescue-mapfile");
}

#[cfg(feature = "tls-psk")]
#[test]
fn tls_fallback_shows_plaintext_clients_only_the_message() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.psk");
    std::fs::write(&keys, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let s = Server::start(&[
        "--tls=on",
        &format!("--tls-psk={}", keys.display()),
        "--filter=tls-fallback",
        "memory",
        "1M",
        "tlsreadme=use TLS",
    ]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.set_export_name('secret')\nh.connect_uri(sys.argv[1])\n\
         assert h.get_size() == 512\nassert not h.can_trim() and h.is_read_only()\n\
         assert h.pread(512, 0) == b'use TLS' + bytes(505)\n\
         h2=nbd.NBD()\nh2.set_tls(nbd.TLS_REQUIRE)\nh2.set_tls_psk_file(sys.argv[2])\n\
         h2.set_tls_username('alice')\nh2.connect_unix(sys.argv[3])\n\
         assert h2.get_size() == 1048576\nh2.pwrite(b'x', 0)\nprint('OK')",
        &[
            &format!("nbd+unix:///?socket={}", s.socket.display()),
            keys.to_str().unwrap(),
            s.socket.to_str().unwrap(),
        ],
    );
}

/// Make a 1 MiB LUKS image with qemu-img, passphrase `123456`.
fn luks_image(path: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,data=123456,id=sec0",
            ])
            .args(["-o", "key-secret=sec0,iter-time=10"])
            .arg(path)
            .arg("1M"),
    );
}

fn qemu_luks_opts(path: &Path) -> String {
    format!(
        "driver=luks,file.filename={},key-secret=sec0",
        path.display()
    )
}

#[test]
fn luks_reads_and_writes_what_qemu_reads_and_writes() {
    if !have("qemu-img") || !have("qemu-io") || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("enc.img");
    luks_image(&img);
    // qemu writes a pattern; we must read it back decrypted.
    run_ok(
        Command::new("qemu-io")
            .args(["--object", "secret,data=123456,id=sec0", "--image-opts"])
            .args([
                "-c",
                "write -P 0 0 1M",
                "-c",
                "write -P 0x5a 4096 65536",
                "-c",
                "write -P 0x33 1000 7",
            ])
            .arg(qemu_luks_opts(&img)),
    );
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "123456\n").unwrap();
    let s = Server::start(&[
        "file",
        img.to_str().unwrap(),
        "--filter=luks",
        &format!("passphrase=+{}", pw.display()),
    ]);
    let all = read_all(&s.uri);
    assert_eq!(all.len(), M as usize);
    assert!(all[..1000].iter().all(|&b| b == 0));
    assert_eq!(&all[1000..1007], &[0x33; 7]);
    assert!(all[4096..4096 + 65536].iter().all(|&b| b == 0x5a));
    assert!(all[4096 + 65536..].iter().all(|&b| b == 0));
    // Our writes, aligned and not, as qemu decrypts them.
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'1'*65536, 131072)\nh.pwrite(b'2'*100, 500)\nh.zero(4096, 8192)\nh.flush()\n\
         assert h.pread(100, 500) == b'2'*100\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    run_ok(
        Command::new("qemu-io")
            .args(["--object", "secret,data=123456,id=sec0", "--image-opts"])
            .args([
                "-c",
                "read -P 0x31 131072 65536",
                "-c",
                "read -P 0x32 500 100",
            ])
            .args(["-c", "read -P 0 8192 4096", "-c", "read -P 0x5a 4096 4096"])
            .args(["-c", "read -P 0x33 1000 7", "-c", "read -P 0x5a 12288 4096"])
            .arg(qemu_luks_opts(&img)),
    );
    // The check can fail: the zeroed range is not 0x5a.
    let out = Command::new("qemu-io")
        .args(["--object", "secret,data=123456,id=sec0", "--image-opts"])
        .args(["-c", "read -P 0x5a 8192 4096"])
        .arg(qemu_luks_opts(&img))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "qemu-io must be able to fail: {out:?}"
    );

    // A wrong passphrase opens nothing.
    let s = Server::start(&[
        "file",
        img.to_str().unwrap(),
        "--filter=luks",
        "passphrase=wrong",
    ]);
    assert!(!nbdinfo_ok(&[&s.uri]));
    assert!(s.log().contains("passphrase"), "{}", s.log());
    refused(&["--filter=luks", "memory", "1M"], "passphrase");
}

/// An ext filesystem image of `kind` holding `/dir/file` (`data`),
/// `/small` and `/sparse` (4 MiB, all hole).
fn ext_image(dir: &Path, kind: &str, data: &[u8]) -> std::path::PathBuf {
    let root = dir.join(format!("root-{kind}"));
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::write(root.join("dir/file"), data).unwrap();
    std::fs::write(root.join("small"), b"hello\n").unwrap();
    sparse_file(&root.join("sparse"), 4 * M);
    let img = dir.join(format!("{kind}.img"));
    run_ok(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", kind, "-d"])
            .arg(&root)
            .arg(&img)
            .arg("16M"),
    );
    img
}

/// `path`'s contents in the filesystem image, as e2fsprogs' debugfs reads
/// them (not through nbdkit-rs).
fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs: {out:?}");
    out.stdout
}

/// `e2fsck -fn`: the filesystem is consistent (exit status 0).
fn assert_fsck_clean(img: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ext2_reads_and_writes_a_file_in_ext2_ext3_and_ext4() {
    if !have("mke2fs") || !have("debugfs") || !have("e2fsck") || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 * M as usize + 12345, 11);
    for kind in ["ext2", "ext3", "ext4"] {
        let img = ext_image(dir.path(), kind, &data);
        let s = Server::start(&[
            "--filter=ext2",
            "file",
            img.to_str().unwrap(),
            "ext2file=/dir/file",
        ]);
        assert!(read_all(&s.uri) == data, "{kind}: contents differ");
        // Overwrite a range across block boundaries, flushed; then a
        // second write that only the disconnect persists.
        python(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
             assert not h.is_read_only() and h.can_flush() and h.can_fua()\n\
             assert h.get_size()==int(sys.argv[2])\n\
             h.pwrite(b'A'*70000, 5000)\nh.flush()\n\
             h.pwrite(b'B'*3, 1000000, nbd.CMD_FLAG_FUA)\n\
             h.pwrite(b'C'*10, 2000000)\nh.shutdown()\nprint('OK')",
            &[&s.uri, &data.len().to_string()],
        );
        drop(s);
        let mut want = data.clone();
        want[5000..75000].fill(b'A');
        want[1000000..1000003].fill(b'B');
        want[2000000..2000010].fill(b'C');
        assert!(debugfs_cat(&img, "/dir/file") == want, "{kind}: write lost");
        assert_fsck_clean(&img);

        // Writes into holes allocate blocks (and, in ext4, extents): the
        // bitmaps and counters must stay consistent.
        let s = Server::start(&[
            "--filter=ext2",
            "file",
            img.to_str().unwrap(),
            "ext2file=/sparse",
        ]);
        python(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
             for i in range(0, 4<<20, 300000):\n    h.pwrite(bytes([i%251+1])*4096, i)\n\
             h.flush()\nprint('OK')",
            &[&s.uri],
        );
        drop(s);
        let mut want = vec![0u8; 4 * M as usize];
        for i in (0..4 * M as usize).step_by(300000) {
            let end = (i + 4096).min(want.len());
            want[i..end].fill((i % 251 + 1) as u8);
        }
        assert!(debugfs_cat(&img, "/sparse") == want, "{kind}: hole writes");
        assert_fsck_clean(&img);
    }

    // -r: read-only to the client, and the image is not written at all.
    let img = dir.path().join("ext4.img");
    let before = std::fs::read(&img).unwrap();
    let s = Server::start(&[
        "-r",
        "--filter=ext2",
        "file",
        img.to_str().unwrap(),
        "ext2file=/small",
    ]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert h.is_read_only()\nassert h.pread(6,0)==b'hello\\n'\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");

    let s = Server::start(&[
        "--filter=ext2",
        "file",
        img.to_str().unwrap(),
        "ext2file=exportname",
    ]);
    assert_eq!(read_all(&s.uri_for("small")), b"hello\n");
    assert!(export_list(&s.uri).is_empty());
    assert!(!nbdinfo_ok(&[&s.uri_for("missing")]));
    assert!(!nbdinfo_ok(&[&s.uri]), "the default export is not a file");
    let log = s.log();
    assert!(log.contains("/missing"), "{log}");
    assert!(log.contains("/: not a regular file"), "{log}");
    drop(s);

    // A journal that needs recovery: refused for writing, naming why;
    // served with -r.
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&img),
    );
    let s = Server::start(&[
        "--filter=ext2",
        "file",
        img.to_str().unwrap(),
        "ext2file=/small",
    ]);
    assert!(!nbdinfo_ok(&[&s.uri]));
    assert!(s.log().contains("journal needs recovery"), "{}", s.log());
    drop(s);
    let s = Server::start(&[
        "-r",
        "--filter=ext2",
        "file",
        img.to_str().unwrap(),
        "ext2file=/small",
    ]);
    assert_eq!(read_all(&s.uri), b"hello\n");
    drop(s);
    refused(
        &[
            "--filter=ext2",
            "file",
            img.to_str().unwrap(),
            "ext2file=dir/file",
        ],
        "ext2file",
    );
}
