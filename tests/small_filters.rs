//! The small filters of nbdkit 1.46 (rotational, count, time-limit,
//! readonly, evil, spinning, map, openonce, pause), each through the real
//! binary with a real client.
mod common;
use common::*;
use std::process::Command;

/// `--help` for `--filter=NAME` lists each of `params` (and succeeds).
fn help_lists(filter: &str, params: &[&str]) {
    let out = run_ok(
        Command::new(binary())
            .arg(format!("--filter={filter}"))
            .args(["null", "--help"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(filter), "{text}");
    for p in params {
        assert!(text.contains(&format!("{p}=")), "{p} missing: {text}");
    }
}

#[test]
fn rotational_sets_and_clears_the_flag() {
    if !have("nbdinfo") {
        return;
    }
    help_lists("rotational", &["rotational"]);
    let s = Server::start(&["--filter=rotational", "memory", "1M"]);
    assert_eq!(
        nbdinfo_json(&["--no-content"], &s.uri)["is_rotational"],
        "true"
    );
    drop(s);
    let s = Server::start(&["--filter=rotational", "memory", "1M", "rotational=false"]);
    assert_eq!(
        nbdinfo_json(&["--no-content"], &s.uri)["is_rotational"],
        "false"
    );
    drop(s);
    // Without the filter the memory plugin is not rotational: the filter
    // is what set it above.
    let s = Server::start(&["memory", "1M"]);
    assert_eq!(
        nbdinfo_json(&["--no-content"], &s.uri)["is_rotational"],
        "false"
    );
    drop(s);
    refused(
        &[
            "--filter=rotational",
            "memory",
            "1M",
            "rotational=sometimes",
        ],
        "rotational",
    );
}

#[test]
fn count_reports_bytes_at_exit() {
    if !have_python_nbd() {
        return;
    }
    help_lists("count", &[]);
    let s = Server::start(&["-v", "--filter=count", "memory", "1M"]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'x'*4096, 0)\nh.pwrite(b'y'*100, 8192)\n\
         assert h.pread(512, 0) == b'x'*512\n\
         h.zero(1000, 65536)\nh.trim(4096, 131072)\nh.flush()\n\
         try:\n  h.pwrite(b'z', 1<<20)\n  assert False\nexcept nbd.Error:\n  pass\nprint('OK')",
        &[&s.uri],
    );
    // Stop it gracefully and read its log before the harness removes it.
    let mut s = s;
    run_ok(Command::new("kill").arg(s.child.id().to_string()));
    let st = s.child.wait().unwrap();
    assert!(st.success(), "{st}");
    let log = s.log();
    // The write past the end never reached the filter's total.  The line
    // is nbdkit's (1.48.1 prints it so), with nothing between "debug:" and
    // the totals.
    assert!(
        log.lines().any(|l| l
            == "nbdkit: debug: count bytes: read 512, written 4196, zeroed 1000, trimmed 4096"),
        "{log}"
    );
}

#[test]
fn time_limit_ends_a_connection_but_not_the_next_one() {
    if !have_python_nbd() {
        return;
    }
    help_lists("time-limit", &["time-limit"]);
    let s = Server::start(&["--filter=time-limit", "memory", "1M", "time-limit=2"]);
    let script = "import nbd,sys,time\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'a'*512, 0)\ntime.sleep(2.5)\n\
         try:\n  h.pread(512, 0)\n  assert False, 'read after the limit worked'\n\
         except nbd.Error as e:\n  assert e.errno == 'ESHUTDOWN', e\n\
         # The server hangs up after that reply.\n\
         try:\n  h.pread(512, 0)\n  assert False, 'still connected'\nexcept nbd.Error:\n  pass\n\
         print('OK')";
    python(script, &[&s.uri]);
    // A new connection has its own two seconds; the write before the limit
    // was kept.
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert h.pread(512, 0) == b'a'*512\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    refused(
        &["--filter=time-limit", "memory", "1M", "time-limit=later"],
        "time-limit",
    );
}

#[test]
fn readonly_always_and_while_a_file_exists() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    help_lists("readonly", &["readonly-file"]);
    let s = Server::start(&["--filter=readonly", "memory", "1M"]);
    assert_eq!(
        nbdinfo_json(&["--no-content"], &s.uri)["is_read_only"],
        "true"
    );
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let ro = dir.path().join("ro");
    let s = Server::start(&[
        "--filter=readonly",
        "file",
        disk.to_str().unwrap(),
        &format!("readonly-file={}", ro.display()),
    ]);
    python(
        "import nbd,sys,os\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nro=sys.argv[2]\n\
         assert not h.is_read_only()\n\
         h.pwrite(b'A'*4096, 0)\n\
         open(ro, 'w').close()\n\
         for f in (lambda: h.pwrite(b'B'*4096, 0), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):\n  \
           try:\n    f()\n    assert False, 'write while read-only'\n  except nbd.Error as e:\n    assert e.errno == 'EPERM', e\n\
         h.flush()\n\
         assert h.pread(4096, 0) == b'A'*4096\n\
         os.unlink(ro)\n\
         h.pwrite(b'C'*4096, 8192)\nh.flush()\nprint('OK')",
        &[&s.uri, ro.to_str().unwrap()],
    );
    drop(s);
    // Every acknowledged write is in the file; the refused ones are not.
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[..4096], &[b'A'; 4096][..]);
    assert_eq!(&data[8192..12288], &[b'C'; 4096][..]);
    assert!(data[12288..].iter().all(|&b| b == 0));
    refused(
        &["--filter=readonly", "memory", "1M", "readonly-file="],
        "readonly-file",
    );
}

/// Bits that differ between `a` and `b`.
fn flipped(a: &[u8], b: &[u8]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x ^ y).count_ones() as u64)
        .sum()
}

#[test]
fn evil_corrupts_reads_consistently_but_never_the_data() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    help_lists(
        "evil",
        &[
            "evil",
            "evil-probability",
            "evil-stuck-probability",
            "evil-seed",
        ],
    );
    let (_dir, disk, clean) = temp_file("disk.img", 1 << 20, 3);
    let file = disk.to_str().unwrap();

    // stuck-bits: the same corruption on every read and connection, at
    // about the requested rate (8 Mi bits at 1e-3, half of them stuck at
    // the value they already have: about 4200 visible).
    let s = Server::start(&[
        "--filter=evil",
        "file",
        file,
        "evil-probability=1e-3",
        "evil-seed=42",
    ]);
    let a = read_all(&s.uri);
    let b = read_all(&s.uri);
    assert_eq!(a, b, "stuck bits moved between reads");
    let n = flipped(&a, &clean);
    assert!((3000..6000).contains(&n), "{n} bits differ");
    // Writes go through untouched: the file gets exactly what was written.
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'\\xa5'*65536, 0)\nh.flush()\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(on_disk[..65536].iter().all(|&b| b == 0xa5));
    assert_eq!(on_disk[65536..], clean[65536..]);

    // The same seed gives the same corruption in another server.
    std::fs::write(&disk, &clean).unwrap();
    let s = Server::start(&[
        "--filter=evil",
        "file",
        file,
        "evil-probability=1e-3",
        "evil-seed=42",
    ]);
    assert_eq!(read_all(&s.uri), a);
    drop(s);

    // cosmic-rays: fresh flips on every read.
    let s = Server::start(&[
        "--filter=evil",
        "file",
        file,
        "evil=cosmic-rays",
        "evil-probability=1:1000",
    ]);
    let a = read_all(&s.uri);
    let b = read_all(&s.uri);
    assert_ne!(a, b);
    let n = flipped(&a, &clean);
    assert!((7000..10000).contains(&n), "{n} bits flipped");
    drop(s);

    // stuck-wires: the corruption follows the position in the request,
    // not on the disk: two reads of zeroes at different offsets agree.
    let s = Server::start(&[
        "--filter=evil",
        "memory",
        "16M",
        "evil=stuck-wires",
        "evil-probability=1e-3",
    ]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         a=h.pread(65536, 0)\nb=h.pread(65536, 8<<20)\n\
         assert a == b, 'wires depend on the offset'\nassert a != bytes(65536)\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    refused(&["--filter=evil", "memory", "1M", "evil=gamma"], "evil");
    refused(
        &["--filter=evil", "memory", "1M", "evil-probability=2"],
        "evil-probability",
    );
    refused(
        &["--filter=evil", "memory", "1M", "evil-seed=x"],
        "evil-seed",
    );
}

#[test]
fn spinning_delays_far_seeks_and_not_sequential_ones() {
    if !have_python_nbd() || !have("nbdinfo") {
        return;
    }
    help_lists(
        "spinning",
        &[
            "heads",
            "separate-heads",
            "max-seek-time",
            "half-seek-time",
            "min-seek-time",
        ],
    );
    let s = Server::start(&[
        "--filter=spinning",
        "memory",
        "64M",
        "min-seek-time=0",
        "half-seek-time=400ms",
        "max-seek-time=800ms",
    ]);
    assert_eq!(
        nbdinfo_json(&["--no-content"], &s.uri)["is_rotational"],
        "true"
    );
    // Only lower bounds are checked: a loaded machine can make anything
    // slower, never faster than the simulated seek.
    let out = python(
        "import nbd,sys,time\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         t=time.monotonic()\nh.pread(4096, (64<<20)-4096)\nfar=time.monotonic()-t\n\
         t=time.monotonic()\nh.pread(4096, 32<<20)\nhalf=time.monotonic()-t\n\
         print(far, half)\nprint('OK')",
        &[&s.uri],
    );
    let times: Vec<f64> = out
        .split_whitespace()
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(times[0] >= 0.79, "a full seek took {}s", times[0]);
    assert!(times[1] >= 0.39, "a half seek took {}s", times[1]);
    drop(s);
    refused(&["--filter=spinning", "memory", "1M", "heads=0"], "heads");
    refused(
        &[
            "--filter=spinning",
            "memory",
            "1M",
            "max-seek-time=1ms",
            "min-seek-time=2ms",
        ],
        "min-seek-time",
    );
}

#[test]
fn map_swaps_sectors_for_reads_writes_and_block_status() {
    if !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    help_lists("map", &["map", "map-size"]);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut data = vec![b'A'; 512];
    data.extend(vec![b'B'; 512]);
    data.extend(vec![b'C'; 1024]);
    std::fs::write(&disk, &data).unwrap();
    let file = disk.to_str().unwrap();
    let s = Server::start(&[
        "--filter=map",
        "file",
        file,
        "map=0-511:512",
        "map=512-1023:0",
    ]);
    let got = read_all(&s.uri);
    assert_eq!(&got[..512], &[b'B'; 512][..]);
    assert_eq!(&got[512..1024], &[b'A'; 512][..]);
    assert_eq!(&got[1024..], &[b'C'; 1024][..]);
    // A write across the swap lands where the map says.
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'x'*8, 508)\nh.flush()\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    let on_disk = std::fs::read(&disk).unwrap();
    assert_eq!(&on_disk[1020..1024], b"xxxx"); // export 508..512 -> 1020..1024
    assert_eq!(&on_disk[0..4], b"xxxx"); // export 512..516 -> 0..4

    // map-size, and a map past the plugin's end: EIO there only.
    let s = Server::start(&[
        "--filter=map",
        "memory",
        "1M",
        "map-size=3M",
        "map=1M-2097151:0",
    ]);
    assert_eq!(
        nbdinfo_json(&["--no-content"], &s.uri)["export-size"],
        "3145728"
    );
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.pwrite(b'q'*512, 1<<20)\nassert h.pread(512, 0) == b'q'*512\n\
         try:\n  h.pread(512, (3<<20)-512)\n  assert False, 'read past the plugin'\n\
         except nbd.Error as e:\n  assert e.errno == 'EIO', e\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    refused(&["--filter=map", "memory", "1M", "map=5-1:0"], "map=5-1:0");
    refused(&["--filter=map", "memory", "1M", "map=0-1"], "map=0-1");
    refused(
        &["--filter=map", "memory", "1M", "map-size=big"],
        "map-size",
    );
}

#[test]
fn map_block_status_follows_the_map() {
    if !have("nbdinfo") {
        return;
    }
    // data plugin: bytes at 0..4096 only; the map shows them at 1M.
    let s = Server::start(&[
        "--filter=map",
        "data",
        "1 @4095 2",
        "size=2M",
        "map=0-1048575:1M",
        "map=1M-2097151:0",
    ]);
    let runs = map_of(&s.uri);
    // Somewhere in the second megabyte is data, the first is a hole.
    assert!(
        runs.iter().any(|&(off, len, hole)| !hole
            && ((1 << 20)..(1 << 20) + 4096).contains(&off)
            && len > 0),
        "{runs:?}"
    );
    assert!(
        runs.iter().any(|&(off, _, hole)| hole && off == 0),
        "{runs:?}"
    );
}

#[test]
fn openonce_opens_the_plugin_once_and_keeps_every_write() {
    if !have_python_nbd() {
        return;
    }
    help_lists("openonce", &[]);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let log = dir.path().join("log");
    let s = Server::start(&[
        "--filter=openonce",
        "--filter=log",
        "file",
        disk.to_str().unwrap(),
        &format!("logfile={}", log.display()),
    ]);
    // Three clients, one after the other and two at once.
    for i in 0..3u8 {
        python(
            "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\ni=int(sys.argv[2])\n\
             h.pwrite(bytes([65+i])*4096, i*4096)\nprint('OK')",
            &[&s.uri, &i.to_string()],
        );
    }
    python(
        "import nbd,sys\na=nbd.NBD()\na.connect_uri(sys.argv[1])\nb=nbd.NBD()\nb.connect_uri(sys.argv[1])\n\
         a.pwrite(b'D'*4096, 12288)\nassert b.pread(4096, 12288) == b'D'*4096\n\
         assert a.pread(4096, 0) == b'A'*4096\nprint('OK')",
        &[&s.uri],
    );
    assert!(s.stop().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log.lines().filter(|l| l.contains(" Connect ")).count(),
        1,
        "the plugin was opened more than once:\n{log}"
    );
    let on_disk = std::fs::read(&disk).unwrap();
    for (i, c) in [b'A', b'B', b'C', b'D'].iter().enumerate() {
        assert!(
            on_disk[i * 4096..(i + 1) * 4096].iter().all(|b| b == c),
            "block {i}"
        );
    }
}

/// Send one command byte to the pause filter's socket and read its answer.
fn pause_command(sock: &std::path::Path, cmd: u8) -> u8 {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.write_all(&[cmd]).unwrap();
    let mut r = [0u8];
    c.read_exact(&mut r).unwrap();
    r[0]
}

#[test]
fn pause_holds_requests_and_loses_none() {
    if !have_python_nbd() {
        return;
    }
    help_lists("pause", &["pause-control"]);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("pause.sock");
    let log = dir.path().join("log");
    // The delay filter below makes every write take a second, so a pause
    // can arrive while one is running; the log filter between them shows
    // when it has started.
    let s = Server::start(&[
        "--filter=pause",
        "--filter=log",
        "--filter=delay",
        "file",
        disk.to_str().unwrap(),
        &format!("pause-control={}", sock.display()),
        &format!("logfile={}", log.display()),
        "delay-write=1",
    ]);
    assert_eq!(pause_command(&sock, b'x'), b'X');

    let writer = |off: u64, byte: u8| {
        Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                 h.pwrite(bytes([int(sys.argv[3])])*4096, int(sys.argv[2]))\nh.flush()\nprint('OK')",
            )
            .args([&s.uri, &off.to_string(), &byte.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let block = |off: usize| std::fs::read(&disk).unwrap()[off..off + 4096].to_vec();
    let writes_started = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" Write id="))
            .count()
    };

    // A write in flight when the pause comes finishes before P.
    let first = writer(0, b'a');
    let mut polls = 0;
    while writes_started() == 0 {
        polls += 1;
        assert!(polls < 1200, "the first write never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(pause_command(&sock, b'p'), b'P');
    assert_eq!(
        block(0),
        vec![b'a'; 4096],
        "P came before the running write finished"
    );

    // A write sent while paused waits...
    let mut second = writer(4096, b'b');
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        second.try_wait().unwrap().is_none(),
        "a write finished while paused"
    );
    assert_eq!(block(4096), vec![0; 4096]);
    assert_eq!(
        writes_started(),
        1,
        "a paused write reached the layer below"
    );
    // ...and goes through after resume.
    assert_eq!(pause_command(&sock, b'r'), b'R');
    let out = second.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    assert!(first.wait_with_output().unwrap().status.success());
    assert_eq!(block(4096), vec![b'b'; 4096]);
    drop(s);
    refused(&["--filter=pause", "memory", "1M"], "pause-control");
}

#[test]
fn indexed_gzip_takes_nbdkits_parameters() {
    if !have("nbdcopy") || !have("gzip") {
        return;
    }
    help_lists("indexed-gzip", &["gzip-index-path", "gzip-index-span"]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut data = pseudo_random(3 << 20, 11);
    data.extend(vec![0u8; 2 << 20]);
    std::fs::write(&img, &data).unwrap();
    let gz = dir.path().join("disk.img.gz");
    run_ok(Command::new("gzip").arg("-k").arg(&img));
    let index = dir.path().join("disk.gzi");
    let args = |idx: &std::path::Path| {
        vec![
            "--filter=indexed-gzip".to_string(),
            "file".to_string(),
            gz.display().to_string(),
            format!("gzip-index-path={}", idx.display()),
            "gzip-index-span=256K".to_string(),
        ]
    };
    let a = args(&index);
    let s = Server::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(read_all(&s.uri), data);
    assert!(s.stop().success());
    assert!(index.exists(), "the index was not saved");
    let saved = std::fs::metadata(&index).unwrap().modified().unwrap();
    // The next start reuses it (and leaves it as it was).
    let s = Server::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(read_all(&s.uri), data);
    assert!(s.stop().success());
    assert_eq!(
        std::fs::metadata(&index).unwrap().modified().unwrap(),
        saved
    );
    refused(
        &["--filter=indexed-gzip", "file", gz.to_str().unwrap()],
        "gzip-index-path",
    );
    refused(
        &[
            "--filter=indexed-gzip",
            "file",
            gz.to_str().unwrap(),
            &format!("gzip-index-path={}", index.display()),
            "gzip-index-span=1",
        ],
        "gzip-index-span",
    );
}
