//! Plugin parameters as nbdkit users type them (issue #13, group 3):
//! file directory=, memory/data allocator=, data extents and slices,
//! curl file: URLs and header-script=, eval's default export, ondemand,
//! protect= forms, and the `--dump-plugin` feature lines scripts probe.
//! Each is driven by a real client.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// The server must refuse to start with `args`, saying `why`.
fn start_fails(args: &[&str], why: &str) {
    let err = start_refused(args, &[]);
    assert!(err.contains(why), "{args:?}: wanted '{why}' in: {err}");
}

/// The export names `nbdinfo --list` shows, in the server's order.
fn export_names(uri: &str) -> Vec<String> {
    let out = stdout_of(Command::new("nbdinfo").args(["--list", uri]));
    out.lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_string)
        .collect()
}

// ------------------------------------------------------------------- file

#[test]
fn file_directory_is_dir_and_lists_in_directory_order() {
    if !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (n, c) in [("b", b'2'), ("a", b'1'), ("c", b'3')] {
        std::fs::write(dir.path().join(n), [c; 512]).unwrap();
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let raw: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let d = format!("directory={}", dir.path().display());
    let s = Server::start(&["file", &d]);
    assert_eq!(export_names(&s.uri), raw);
    nbd_script(
        r#"
assert h.pread(1, 0) == b"1"
h2 = nbd.NBD()
try:
    h2.connect_uri(sys.argv[2])
    raise SystemExit("connected to a subdirectory")
except nbd.Error:
    pass
"#,
        &[&s.uri_for("a"), &s.uri_for("sub")],
    );
    assert!(s.stop().success());
    start_fails(&["file", "rdelay=1"], "--filter=delay");
}

// ----------------------------------------------------------------- memory

#[test]
fn memory_allocators_all_serve_the_same_disk() {
    if !have_python_nbd() {
        return;
    }
    for (alloc, sparse) in [
        ("sparse", true),
        ("zstd", true),
        ("malloc", false),
        ("malloc,mlock=true", false),
    ] {
        let a = format!("allocator={alloc}");
        let s = Server::start(&["memory", "1M", &a]);
        python(
            r#"
import nbd, sys
sparse = sys.argv[2] == "1"
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.get_size() == 1 << 20
pat = bytes(range(256)) * 40
h.pwrite(pat, 70000)
h.pwrite(b"\x07" * 512, (1 << 20) - 512)
assert h.pread(len(pat), 70000) == pat
assert h.pread(512, (1 << 20) - 512) == b"\x07" * 512
assert h.pread(1000, 0) == bytes(1000)
h.zero(4096, 71000)
assert h.pread(4096, 71000) == bytes(4096)
assert h.pread(100, 70000) == pat[:100]
flags = []
def cb(meta, off, ents, err):
    flags.extend(ents[1::2])
h.block_status(65536, 0, cb)
# Untouched memory is a hole with a sparse allocator, data with malloc.
assert (flags[0] & 1 == 1) == sparse, (sys.argv, flags)
print("OK")
"#,
            &[&s.uri, if sparse { "1" } else { "0" }],
        );
        assert!(s.stop().success(), "{alloc}");
    }
    for (bad, why) in [
        ("foo", "allocator=foo"),
        ("sparse,mlock=true", "allocator=sparse,mlock=true"),
        ("malloc,mlock=maybe", "mlock=maybe"),
    ] {
        let a = format!("allocator={bad}");
        start_fails(&["memory", "1M", &a], why);
        start_fails(&["data", "1", &a], why);
    }
}

#[test]
fn dump_plugin_says_which_features_are_built_in() {
    for (plugin, lines) in [
        ("memory", &["mlock=yes", "zstd=yes"][..]),
        ("data", &["data_base64=yes", "mlock=yes", "zstd=yes"][..]),
        ("info", &["info_address=yes", "info_base64=yes"][..]),
        ("eval", &["max_known_status=3"][..]),
        ("sh", &["max_known_status=3"][..]),
    ] {
        let (code, out, err) = run_binary(&[plugin, "--dump-plugin"]);
        assert_eq!(code, Some(0), "{plugin}: {err}");
        for l in lines {
            assert!(out.lines().any(|x| x == *l), "{plugin}: no {l} in {out}");
        }
    }
    // eval needs no get_size= just to dump its script's lines.
    let (code, out, err) = run_binary(&["--dump-plugin", "eval", "dump_plugin=echo extra=stuff"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().any(|l| l == "extra=stuff"), "{out}");
}

// ------------------------------------------------------------------- data

#[test]
fn data_written_zeroes_are_allocated_zero_not_holes() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["data", "@32768 1 @131072 0", "size=1M"]);
    nbd_script_allocation(
        r#"
ext = []
def cb(meta, off, ents, err):
    ext.extend(zip(ents[0::2], ents[1::2]))
h.block_status(1 << 20, 0, cb)
got, pos = [], 0
for length, flags in ext:
    got.append((pos, length, flags))
    pos += length
# hole+zero, data, hole+zero, zero (allocated), hole+zero
assert got == [(0, 32768, 3), (32768, 32768, 0), (65536, 65536, 3),
               (131072, 32768, 2), (163840, 1048576 - 163840, 3)], got
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    // An empty slice is empty wherever it starts; others must fit.
    let s = Server::start(&["data", "\"Hello\"[99:99] \"x\""]);
    assert_eq!(read_all(&s.uri), b"x");
    assert!(s.stop().success());
    start_fails(&["data", "\"Hello\"[2:99]"], "slice");
}

// ------------------------------------------------------------------- curl

#[test]
fn curl_serves_file_urls_and_runs_header_scripts() {
    if !have("nbdcopy") {
        return;
    }
    let (dir, img, want) = temp_file("disk.img", 300_000, 5);
    let runs = dir.path().join("runs");
    let url = format!("file:{}", img.display());
    let script = format!(
        "echo \"$iteration $url\" >> '{}'; echo 'X-A: b'",
        runs.display()
    );
    let hs = format!("header-script={script}");
    let jar = format!("cookiejar={}", dir.path().join("jar").display());
    for extra in [
        "protocols=file",
        "header=X-Empty;",
        &hs,
        "cookie-script=echo a=b",
        &jar,
    ] {
        let s = Server::start(&["-r", "curl", &url, extra]);
        assert_eq!(read_all(&s.uri), want, "{extra}");
        assert!(s.stop().success());
    }
    // The script ran (once: no renew) with $iteration and $url set.
    let log = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(log, format!("0 {url}\n"));
    let file_url = format!("file://{}", img.display());
    let s = Server::start(&["curl", &file_url]);
    assert_eq!(read_all(&s.uri), want);
    assert!(s.stop().success());

    start_fails(
        &["curl", &url, "header-script=echo BAD THING >&2; exit 1"],
        "header-script failed: BAD THING",
    );
    start_fails(
        &["curl", &url, "header-script=true", "header=A: b"],
        "header-script= cannot be used with header=",
    );
    start_fails(
        &["curl", &url, "cookie-script-renew=x"],
        "cookie-script-renew=x",
    );
    start_fails(
        &["curl", "ftp://127.0.0.1/x"],
        "only http://, https:// and file:",
    );
}

// ------------------------------------------------------------------- eval

#[test]
fn eval_default_export_names_the_export_and_can_refuse_it() {
    if !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    // "" is opened as the script's default export.
    let s = Server::start(&[
        "eval",
        "default_export=echo hello",
        "open=echo \"$3\"",
        "get_size=echo \"$2\" | wc -c",
        "export_description=echo \"$2 world\"",
    ]);
    python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_full_info(True)
h.connect_uri(sys.argv[1])
assert h.get_size() == 6, h.get_size()
assert h.get_canonical_export_name() == "hello"
assert h.get_export_description() == "hello world"
print("OK")
"#,
        &[&s.uri_for("")],
    );
    assert_eq!(export_names(&s.uri), vec!["hello".to_string()]);
    assert!(s.stop().success());
    // A failing default_export: no list entry and no default export,
    // but named exports still work.
    let s = Server::start(&[
        "eval",
        "default_export=echo ENOENT >&2; exit 1",
        "get_size=echo 0",
    ]);
    assert!(export_names(&s.uri).is_empty());
    python(
        r#"
import nbd, sys
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    raise SystemExit("connected to a refused default export")
except nbd.Error:
    pass
h = nbd.NBD()
h.connect_uri(sys.argv[2])
print("OK")
"#,
        &[&s.uri_for(""), &s.uri_for("name")],
    );
    assert!(s.stop().success());
}

// --------------------------------------------------------------- ondemand

#[test]
fn ondemand_makes_one_locked_disk_per_export_name() {
    if !have("nbdinfo") || !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("default"), b"").unwrap();
    std::fs::write(dir.path().join("old"), b"").unwrap();
    std::fs::write(dir.path().join("skip.me"), b"").unwrap();
    let d = format!("dir={}", dir.path().display());
    let s = Server::start(&[
        "ondemand",
        &d,
        "size=1M",
        "command=truncate -s $size \"$disk\" && printf '%s' \"$greeting\" | dd of=\"$disk\" conv=notrunc 2>/dev/null",
        "greeting=hi",
    ]);
    let mut names = export_names(&s.uri);
    names.sort();
    assert_eq!(names, vec!["".to_string(), "old".to_string()]);
    python(
        r#"
import nbd, sys
uri, uri_bad = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_size() == 1 << 20
assert h.pread(2, 0) == b"hi"
h.pwrite(b"kept", 100)
# A second client is refused while the first holds the filesystem.
h2 = nbd.NBD()
try:
    h2.connect_uri(uri)
    raise SystemExit("two clients on one filesystem")
except nbd.Error:
    pass
h.shutdown()
h2 = nbd.NBD()
h2.connect_uri(uri)
assert h2.pread(4, 100) == b"kept"
h3 = nbd.NBD()
try:
    h3.connect_uri(uri_bad)
    raise SystemExit("connected to an invalid name")
except nbd.Error:
    pass
print("OK")
"#,
        &[&s.uri_for("new"), &s.uri_for("a.b")],
    );
    assert!(dir.path().join("new").is_file());
    assert!(!dir.path().join("a.b").exists());
    assert!(export_names(&s.uri).contains(&"new".to_string()));
    assert!(s.stop().success());
    start_fails(&["ondemand", "size=1M"], "'dir'");
    start_fails(&["ondemand", &d, "size=1M", "wait=perhaps"], "wait");
    start_fails(
        &["ondemand", &d, "size=1M", "disk=x", "command=true"],
        "'disk'",
    );
}

// ---------------------------------------------------------------- protect

#[test]
fn protect_accepts_nbdkits_range_forms() {
    if !have_python_nbd() {
        return;
    }
    // No protect= at all is allowed (nothing protected).
    let s = Server::start(&["--filter=protect", "memory", "64K"]);
    nbd_script(
        r#"
h.pwrite(b"x" * 512, 0)
"#,
        &[&s.uri],
    );
    assert!(s.stop().success());
    // ~START-END protects everything outside; offsets may be hex or octal.
    for args in [
        &["protect=~512-1023"][..],
        &["protect=~0x200-01777"][..],
        &["protect=-511", "protect=1024-"][..],
    ] {
        let mut a = vec!["--filter=protect", "memory", "64K"];
        a.extend_from_slice(args);
        let s = Server::start(&a);
        nbd_script(
            r#"
h.pwrite(b"x" * 512, 512)
for off in (0, 1024, 60000):
    try:
        h.pwrite(b"x" * 512, off)
        raise SystemExit("wrote protected bytes at %d" % off)
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
"#,
            &[&s.uri],
        );
        assert!(s.stop().success(), "{args:?}");
    }
    start_fails(
        &["--filter=protect", "memory", "64K", "protect=0xzz-"],
        "protect=0xzz-",
    );
}

/// The nbd plugin with dynamic-export=true shows the server's name for its
/// default export (nbdkit's `libnbd_dynamic_list`), and a listing with a
/// description over 4096 bytes fails, as from nbdkit.
#[test]
fn nbd_dynamic_export_names_the_default_and_long_listings_fail() {
    if !have("nbdinfo") {
        return;
    }
    let long = "d".repeat(4097);
    let list = format!("list_exports=echo NAMES+DESCRIPTIONS; echo name; echo {long}");
    let up = Server::start(&[
        "eval",
        "get_size=echo 1M",
        "pread=exit 1",
        "default_export=echo name",
        &list,
    ]);
    let sock = format!("socket={}", up.socket.display());
    let px = Server::start(&["nbd", &sock, "dynamic-export=true"]);
    let out = stdout_of(Command::new("nbdinfo").args(["--no-content", &px.uri]));
    assert!(out.contains("export=\"name\":"), "{out}");
    for s in [&up, &px] {
        let out = Command::new("nbdinfo")
            .args(["--list", &s.uri])
            .output()
            .unwrap();
        assert!(!out.status.success(), "listing succeeded: {out:?}");
    }
    let dump = stdout_of(Command::new(binary()).args(["--dump-plugin", "nbd"]));
    assert!(dump.contains("libnbd_dynamic_list=1"), "{dump}");
}

/// What `nbdinfo` says a plugin can do, as Debian's nbdkit 1.32.5 says it
/// for the same command line: the flags and the size (block sizes left
/// out: nbdkit-rs advertises its request limits where nbdkit says
/// nothing). The file plugin's fast zero and split's flush, FUA and
/// multi-conn are left out too: nbdkit-rs offers them on purpose (a fast
/// zero that fails when the kernel cannot zero; split flushes its files).
#[test]
fn capabilities_match_nbdkit() {
    if !have("nbdinfo") || !have("nbdkit") {
        return;
    }
    let caps = |bin: &std::path::Path, args: &[&str]| -> String {
        let mut full = vec!["-U", "-"];
        full.extend_from_slice(args);
        full.extend(["--run", "nbdinfo \"$uri\""]);
        let out = Command::new(bin)
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{} {args:?}: {out:?}", bin.display());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                let l = l.trim();
                l.starts_with("can_") || l.starts_with("is_") || l.starts_with("export-size")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let nbdkit = std::path::Path::new("nbdkit");
    for args in [
        &["memory", "1M"][..],
        &["null", "1M"],
        &["zero"],
        &["full", "1M"],
        &["pattern", "1M"],
        &["random", "1M"],
        &["sparse-random", "4M"],
        &["info"],
        &["data", "1 2 3", "size=1M"],
        &["-r", "memory", "1M"],
    ] {
        assert_eq!(caps(&binary(), args), caps(nbdkit, args), "{args:?}");
    }
    // Filters over memory, with no parameters beyond what they need
    // (rate with no limit passes everything, as nbdkit's).
    for filter in [
        "blocksize",
        "cache",
        "cacheextents",
        "checkwrite",
        "delay",
        "error",
        "exitlast",
        "exportname",
        "fua",
        "ip",
        "limit",
        "multi-conn",
        "nocache",
        "noextents",
        "nofilter",
        "noparallel",
        "nozero",
        "offset",
        "protect",
        "rate",
        "readahead",
        "retry",
        "retry-request",
        "swab",
        "truncate",
    ] {
        let f = format!("--filter={filter}");
        let args = [f.as_str(), "memory", "1M"];
        assert_eq!(caps(&binary(), &args), caps(nbdkit, &args), "{args:?}");
    }
    // nbdkit's zero plugin takes nothing, in nbdkit's words.
    let (code, _, err) = run_binary(&["-U", "-", "zero", "1M", "--run", "exit 0"]);
    assert!(
        code != Some(0) && err.contains("this plugin does not need command line configuration"),
        "{err}"
    );
}
