//! nbdkit's own C plugins (Debian's `nbdkit` package) and two small C test
//! plugins (API v1 and v2, compiled here) served by nbdkit-rs and driven
//! with real clients.  Tests skip with a message when the plugin files, the
//! header or a C compiler are missing, unless NBDKIT_RS_REQUIRE_TOOLS=1.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const M: u64 = 1024 * 1024;

/// A plugin from Debian's nbdkit package, by its short name.
fn debian(name: &str) -> Option<String> {
    let p = nbdkit_cplugin::find(name);
    available(
        p.is_some(),
        &format!("nbdkit-{name}-plugin.so (Debian's nbdkit package)"),
    )
    .then(|| p.unwrap().display().to_string())
}

/// Compile tests/cplugins/NAME.c into a plugin .so in `dir`.
fn compile(name: &str, dir: &Path) -> Option<String> {
    let have_header = Path::new("/usr/include/nbdkit-plugin.h").exists();
    let have_cc = Command::new("cc").arg("--version").output().is_ok();
    if !available(have_header, "nbdkit-plugin.h (nbdkit-plugin-dev)")
        || !available(have_cc, "a C compiler (cc)")
    {
        return None;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/cplugins/{name}.c"));
    let out = dir.join(format!("{name}.so"));
    run_ok(
        Command::new("cc")
            .args(["-Wall", "-Werror", "-shared", "-fPIC", "-o"])
            .arg(&out)
            .arg(&src)
            .arg("-lpthread"),
    );
    Some(out.display().to_string())
}

/// nbdkit-rs ARGS... that must fail; returns stderr.
fn fails(args: &[&str]) -> String {
    fails_stderr(&[&["-U", "-"], args, &["--run", "true"]].concat())
}

/// The memory tests every memory plugin must pass: ours (`memory`) and
/// Debian's nbdkit-memory-plugin.so run exactly the same code.
fn memory_suite(plugin: &str) {
    let s = Server::start(&[plugin, "size=64M"]);

    // qemu-io: patterns written at odd places read back; other data stays
    // zero; it persists across connections.
    qemu_io_ok(
        &s.uri,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1000000 5000",
            "write -P 0x33 63M 1M",
            "read -P 0x11 0 64k",
            "read -P 0x22 1000000 5000",
            "read -P 0 64k 100k",
        ],
    );
    qemu_io_ok(
        &s.uri,
        &["read -P 0x33 63M 1M", "read -P 0x22 1000000 5000"],
    );

    // nbdinfo --json: the same capabilities as our memory plugin.
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["export-size"], (64 * M).to_string());
    for k in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert_eq!(j[k], "true", "{plugin}: {k}: {j:?}");
    }
    assert_eq!(j["is_read_only"], "false");

    // nbdcopy round trip.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    make_file(&src, 8 * M as usize, 7);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&s.uri));
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(got.len() as u64, 64 * M);
    assert!(got[..want.len()] == want[..], "{plugin}: copy differs");

    // Block status after trim and zero: those ranges become holes.
    qemu_io_ok(&s.uri, &["discard 1M 1M", "write -z -u 4M 1M"]);
    let map = map_of(&s.uri);
    let hole_at = |off: u64| {
        map.iter()
            .find(|r| r.0 <= off && off < r.0 + r.1)
            .map(|r| r.2)
    };
    assert_eq!(hole_at(0), Some(false), "{map:?}");
    assert_eq!(hole_at(M + 4096), Some(true), "{map:?}");
    assert_eq!(hole_at(4 * M + 4096), Some(true), "{map:?}");
    assert_eq!(hole_at(3 * M), Some(false), "{map:?}");
    assert_eq!(hole_at(40 * M), Some(true), "{map:?}");
    qemu_io_ok(&s.uri, &["read -P 0 1M 1M", "read -P 0 4M 1M"]);

    // nbdsh (libnbd): FUA write, flush, cache, fast zero.
    nbd_script(
        "assert h.can_fua() and h.can_flush() and h.can_cache() and h.can_fast_zero()\n\
         h.pwrite(b'\\xab'*4096, 8192, nbd.CMD_FLAG_FUA)\n\
         h.flush()\n\
         h.cache(65536, 0)\n\
         h.pwrite(b'\\x01'*4096, 0)\n\
         h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)\n\
         assert h.pread(4096, 0) == b'\\0'*4096\n\
         assert h.pread(4096, 8192) == b'\\xab'*4096\n\
         h.shutdown()",
        &[&s.uri],
    );
    assert!(s.stop().success());
}

#[test]
fn our_memory_plugin_passes_the_memory_suite() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    memory_suite("memory");
}

#[test]
fn debian_memory_so_passes_the_same_memory_suite() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") || !have_python_nbd() {
        return;
    }
    let Some(so) = debian("memory") else { return };
    memory_suite(&so);
}

#[test]
fn debian_file_so_reads_writes_and_reports_extents() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let Some(so) = debian("file") else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    // 1 MiB of data, then a 3 MiB hole.
    make_file(&img, M as usize, 3);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 * M)
        .unwrap();
    let s = Server::start(&[&so, img.to_str().unwrap()]);
    let map = map_of(&s.uri);
    assert_eq!(map.first().map(|r| (r.0, r.2)), Some((0, false)), "{map:?}");
    assert!(
        map.iter().any(|r| r.2 && r.0 >= M),
        "the sparse tail is a hole: {map:?}"
    );
    let before = std::fs::read(&img).unwrap();
    qemu_io_ok(&s.uri, &["write -P 0x5a 2M 64k", "flush"]);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(&after[..M as usize], &before[..M as usize]);
    assert!(after[2 * M as usize..2 * M as usize + 65536]
        .iter()
        .all(|&b| b == 0x5a));
    // Reads through the plugin match the file.
    let copy = dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == after);
    assert!(s.stop().success());
}

#[test]
fn debian_data_pattern_null_full_random_info() {
    if !have("nbdcopy") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let read_all =
        |uri: &str| -> Vec<u8> { run_ok(Command::new("nbdcopy").arg(uri).arg("-")).stdout };
    // data: a little expression language, parsed by the plugin.
    if let Some(so) = debian("data") {
        let s = Server::start(&[&so, "data=1 2 3 @512 4 \"hi\"", "size=1024"]);
        let d = read_all(&s.uri);
        assert_eq!(d.len(), 1024);
        assert_eq!(&d[..4], &[1, 2, 3, 0]);
        assert_eq!(&d[512..515], &[4, b'h', b'i']);
        assert!(d[515..].iter().all(|&b| b == 0));
        // The name alone finds it in nbdkit's plugin directory (no built-in
        // plugin is called "data").
        let s = Server::start(&["data", "raw=xyz"]);
        assert_eq!(read_all(&s.uri), b"xyz");
    }
    // pattern: each 8-byte word holds its offset (big-endian).
    if let Some(so) = debian("pattern") {
        let s = Server::start(&[&so, "1M"]);
        let d = read_all(&s.uri);
        assert_eq!(d.len() as u64, M);
        for off in [0usize, 8, 4096, 1048568] {
            assert_eq!(
                u64::from_be_bytes(d[off..off + 8].try_into().unwrap()),
                off as u64
            );
        }
    }
    // null: all zero, writes discarded.
    if let Some(so) = debian("null") {
        let s = Server::start(&[&so, "size=1M"]);
        qemu_io_ok(&s.uri, &["write -P 9 0 4k", "read -P 0 0 4k"]);
    }
    // full: every write fails with ENOSPC, reads are zero.
    if let Some(so) = debian("full") {
        let s = Server::start(&[&so, "1M"]);
        let out = qemu_io_raw(&s.uri, &["write -P 1 0 512"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("No space left on device"), "{text}");
        qemu_io_ok(&s.uri, &["read -P 0 0 4k"]);
    }
    // random: the same seed gives the same (non-zero) bytes.
    if let Some(so) = debian("random") {
        let a = Server::start(&[&so, "1M", "seed=42"]);
        let b = Server::start(&[&so, "1M", "seed=42"]);
        let (da, db) = (read_all(&a.uri), read_all(&b.uri));
        assert_eq!(da.len() as u64, M);
        assert_eq!(da, db);
        assert!(da.iter().any(|&x| x != 0));
    }
    // sparse-random: serves its size (its content and map are the same as
    // under nbdkit itself, which this does not need to run).
    if let Some(so) = debian("sparse-random") {
        let s = Server::start(&[&so, "64M", "seed=1"]);
        let map = map_of(&s.uri);
        assert_eq!(map.iter().map(|r| r.1).sum::<u64>(), 64 * M, "{map:?}");
        assert_eq!(read_all(&s.uri).len() as u64, 64 * M);
    }
    // info: the content is the export name the client asked for
    // (nbdkit_export_name).
    if let Some(so) = debian("info") {
        let s = Server::start(&[&so]);
        assert_eq!(read_all(&s.uri_for("hello-there")), b"hello-there");
        // mode=address: the client's address (nbdkit_peer_name); a Unix
        // socket client's is unnamed.
        let s = Server::start(&[&so, "mode=address"]);
        assert_eq!(read_all(&s.uri), b"unix");
    }
}

#[test]
fn filters_stack_on_a_c_plugin() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let Some(so) = debian("memory") else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logarg = format!("logfile={}", log.display());
    let s = Server::start(&[
        "--filter=log",
        "--filter=truncate",
        &so,
        "size=4M",
        "truncate=1M",
        &logarg,
    ]);
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["export-size"], M.to_string());
    qemu_io_ok(&s.uri, &["write -P 3 0 4k", "read -P 3 0 4k"]);
    drop(s);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("Write"), "{text}");
}

#[test]
fn load_and_config_errors_are_one_clear_line() {
    // A file that does not exist.
    let e = fails(&["/nonexistent/nbdkit-nothing-plugin.so"]);
    assert!(
        e.contains("/nonexistent/nbdkit-nothing-plugin.so") && e.trim_end().lines().count() == 1,
        "{e}"
    );
    // A file that is not a shared object.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.so");
    std::fs::write(&bogus, "#!/bin/sh\n").unwrap();
    let e = fails(&[bogus.to_str().unwrap()]);
    assert!(
        e.contains("bogus.so: cannot load the plugin") && e.trim_end().lines().count() == 1,
        "{e}"
    );
    // A shared object that is not an nbdkit plugin.
    let libz = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    if let Some(lib) = libz {
        let e = fails(&[lib]);
        assert!(e.contains("not an nbdkit plugin"), "{e}");
    }
    // A name that is neither built in nor installed.
    let e = fails(&["no-such-plugin-anywhere"]);
    assert!(
        e.contains("nbdkit-no-such-plugin-anywhere-plugin.so"),
        "{e}"
    );
    // The plugin's own configuration error.
    if let Some(so) = debian("memory") {
        let e = fails(&[&so, "size=lots"]);
        assert!(e.contains("memory: ") && e.contains("lots"), "{e}");
        let e = fails(&[&so, "size=1M", "colour=blue"]);
        assert!(e.contains("colour"), "{e}");
    }
}

#[test]
fn help_dump_plugin_and_dump_config() {
    let Some(so) = debian("memory") else { return };
    let out = stdout_of(Command::new(binary()).args([&so, "--dump-plugin"]));
    for line in [
        "name=memory",
        "api_version=2",
        "max_thread_model=parallel",
        "magic_config_key=size",
        "has_pread=1",
        "has_extents=1",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}: {out}");
    }
    assert!(out.contains(&format!("path={so}")), "{out}");
    // The plugin's struct is 1.32's, which is the one this host knows.
    assert!(out.contains("struct_size=384"), "{out}");
    let help = stdout_of(Command::new(binary()).args([&so, "--help"]));
    assert!(help.starts_with("memory plugin"), "{help}");
    assert!(help.contains("size="), "{help}");
    let cfg = stdout_of(Command::new(binary()).arg("--dump-config"));
    let dir = Path::new(&so).parent().unwrap().display().to_string();
    assert!(
        cfg.lines().any(|l| l == format!("plugindir={dir}")),
        "{cfg}"
    );
}

#[test]
fn the_binary_exports_every_nbdkit_function_plugins_use() {
    if !have("nm") {
        return;
    }
    let out = stdout_of(Command::new("nm").arg("-D").arg(binary()));
    let exported: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" T "))
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for f in nbdkit_cplugin::exported_function_names() {
        assert!(exported.contains(&f), "{f} is not exported");
    }
    // Every function an installed plugin references.
    let Some(any) = debian("memory") else { return };
    let dir = Path::new(&any).parent().unwrap().to_path_buf();
    let sos: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    let undefined = stdout_of(
        Command::new("nm")
            .args(["-D", "--undefined-only"])
            .args(&sos),
    );
    for sym in undefined
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("nbdkit_"))
    {
        assert!(
            exported.contains(&sym),
            "{sym} (used by a Debian plugin) is not exported"
        );
    }
}

#[test]
fn api_v1_plugin_reads_writes_flushes() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(so) = compile("v1", dir.path()) else {
        return;
    };
    let s = Server::start(&["-v", &so]);
    qemu_io_ok(
        &s.uri,
        &[
            "write -P 0x42 4096 8k",
            "flush",
            "read -P 0x42 4096 8k",
            "read -P 0 0 4k",
            "discard 4096 4k",
            "read -P 0 4096 4k",
            "write -z 8192 4k",
            "read -P 0 8192 4k",
        ],
    );
    // The last sector fails with the plugin's errno (EIO).
    let out = qemu_io_raw(&s.uri, &["read 1048064 512"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Input/output error"),
        "{out:?}"
    );
    let j = nbdinfo_json(&[], &s.uri);
    assert_eq!(j["can_flush"], "true");
    assert_eq!(j["can_trim"], "true");
    // v1 calls carry no flags: FUA is emulated with flush.
    assert_eq!(j["can_fua"], "true");
    drop(j);
    let log = s.log();
    for want in [
        "v1test: pwrite count=8192 offset=4096",
        "v1test: flush",
        "v1test: trim count=4096 offset=4096",
        "v1test: zero count=4096 offset=8192",
        "sector at 1048064 is unreadable",
    ] {
        assert!(log.contains(want), "{want}: {log}");
    }
    let dump = stdout_of(Command::new(binary()).args([&so, "--dump-plugin"]));
    assert!(dump.contains("api_version=1"), "{dump}");
    assert!(
        dump.contains("max_thread_model=serialize_all_requests"),
        "{dump}"
    );
}

#[test]
fn api_v2_plugin_errors_reach_the_client() {
    use common::client::RawClient;
    use nbdkit_proto::{CMD_FLAG_FUA, CMD_READ, CMD_TRIM, CMD_WRITE, FLAG_SEND_FUA};
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(so) = compile("v2", dir.path()) else {
        return;
    };
    let s = Server::start(&["-v", "-D", "v2test.verbose=1", &so, "2M", "label=L1"]);

    // Our own client reads the structured error replies.
    let mut c = RawClient::start(&s.socket);
    let (size, flags) = c.go(true, false, false);
    assert_eq!(size, 2 * M);
    assert_ne!(flags & FLAG_SEND_FUA, 0);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 4, b"abcd");
    assert_eq!(c.reply(0).error, 0);
    c.request(CMD_WRITE, 0, 2, M + 4096, 4, b"abcd");
    let r = c.reply(0);
    assert_eq!(r.error, 28, "ENOSPC: {r:?}");
    assert!(
        r.error_message
            .contains("the second half is full (write at 1052672)"),
        "{r:?}"
    );
    c.request(CMD_TRIM, 0, 3, 0, 4096, b"");
    let r = c.reply(0);
    assert_eq!(r.error, 1, "EPERM: {r:?}");
    assert!(
        r.error_message.contains("trim is not allowed here"),
        "{r:?}"
    );
    c.request(CMD_READ, 0, 4, 4096, 4, b"");
    let r = c.reply(4);
    assert_eq!(r.error, 0);
    let data: Vec<u8> = r
        .chunks
        .iter()
        .filter(|(k, _)| *k == 1)
        .flat_map(|(_, d)| d[8..].to_vec())
        .collect();
    assert_eq!(data, b"abcd");
    drop(c);

    // Export list, default export, description, block size, extents.
    let list = stdout_of(Command::new("nbdinfo").args(["--list", "--json", &s.uri]));
    assert!(list.contains("\"export-name\": \"a\""), "{list}");
    assert!(list.contains("\"export-name\": \"b\""), "{list}");
    assert!(list.contains("the first export"), "{list}");
    let j = nbdinfo_json(&[], &s.uri_for("b"));
    assert_eq!(j["description"], "export b L1");
    assert_eq!(j["block_size_preferred"], "4096");
    assert_eq!(j["can_multi_conn"], "true");
    let map = map_of(&s.uri);
    assert_eq!(map, vec![(0, 65536, false), (65536, 2 * M - 65536, true)]);
    // An export the plugin refuses.
    assert!(!nbdinfo_ok(&[&s.uri_for("zzz")]));

    // FUA passed natively; the -D flag reached the plugin's variable.
    qemu_io_ok(&s.uri, &["write -f 0 4k", "write -z -u 0 4k"]);
    let log = s.log();
    assert!(log.contains("v2test: pwrite offset=4096 fua=1"), "{log}");
    assert!(log.contains("v2test: open export 'a'"), "{log}");
    assert!(log.contains("v2test: open export 'b'"), "{log}");
    assert!(log.contains("may_trim=1"), "{log}");

    // The peer's credentials (Unix socket) reached the plugin.
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert!(
        log.contains(&format!("v2test: peer uid={uid} pid=")),
        "{log}"
    );
    assert!(log.contains("tls=0"), "{log}");

    // nbdkit_disconnect(0) answers the read, then closes the connection;
    // nbdkit_disconnect(1) drops it without a reply.  The server carries on.
    python(
        "import nbd, sys\n\
         for name, uri, answered in (('disconnect', sys.argv[1], True), ('disconnect-now', sys.argv[2], False)):\n\
         \x20   h = nbd.NBD()\n\
         \x20   h.connect_uri(uri)\n\
         \x20   h.pread(512, 0)\n\
         \x20   try:\n\
         \x20       h.pread(512, 512)\n\
         \x20       got = True\n\
         \x20   except nbd.Error:\n\
         \x20       got = False\n\
         \x20   assert got == answered, name\n\
         \x20   try:\n\
         \x20       h.pread(512, 1024)\n\
         \x20       raise SystemExit(name + ': still connected')\n\
         \x20   except nbd.Error:\n\
         \x20       pass\n\
         print('OK')",
        &[&s.uri_for("disconnect"), &s.uri_for("disconnect-now")],
    );
    assert!(s.log().contains("the plugin called nbdkit_disconnect(1)"));

    // nbdkit_shutdown: the server exits gracefully.
    assert!(!nbdinfo_ok(&[&s.uri_for("shutdown")]));
    let mut s = s;
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(s.log().contains("shutting down as asked"));

    // Its own parameter errors and help.
    let e = fails(&[&so, "size=1M", "colour=blue"]);
    assert!(e.contains("v2test: unknown parameter 'colour'"), "{e}");
    let help = stdout_of(Command::new(binary()).args([&so, "--help"]));
    assert!(help.contains("nbdkit-rs API v2 test plugin"), "{help}");
    assert!(help.contains("label=<TEXT>"), "{help}");
    // A debug flag the plugin does not have is a warning (as nbdkit's),
    // and the server still serves.
    let out = Command::new(binary())
        .args(["-U", "-", "-D", "v2test.nosuchflag=1", &so, "2M"])
        .args(["--run", "nbdinfo --size \"$uri\""])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(String::from_utf8_lossy(&out.stdout).trim() == "2097152");
    assert!(
        e.contains("warning") && e.contains("global variable called v2test_debug_nosuchflag"),
        "{e}"
    );
}
