//! nbdkit's language plugins (Debian's nbdkit-plugin-python, -perl, -lua,
//! -tcl) hosted by nbdkit-rs, started the way nbdkit users type it
//! (`nbdkit-rs python plugin.py`: a bare first parameter is `script=`),
//! and used through real clients: writes read back, and for Python (the
//! only one whose plugin API has them) export lists and extents.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn script(ext: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/language/plugin.{ext}"))
}

fn have_plugin(lang: &str) -> bool {
    let so = format!("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-{lang}-plugin.so");
    available(
        std::path::Path::new(&so).exists(),
        &format!("{so} (Debian package nbdkit-plugin-{lang})"),
    )
}

/// Write, read back, and check the size through Python nbd.
fn read_write(uri: &str) {
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert h.get_size()==1048576, h.get_size()\n\
         assert not h.is_read_only()\n\
         h.pwrite(b'xyz'*1000, 5000)\nh.pwrite(b'\\x01'*512, 1048576-512)\n\
         assert h.pread(3000, 5000)==b'xyz'*1000\n\
         assert h.pread(512, 1048576-512)==b'\\x01'*512\n\
         assert h.pread(100, 0)==bytes(100)\nprint('OK')",
        &[uri],
    );
}

#[test]
fn perl_lua_and_tcl_plugins_read_and_write() {
    for (lang, ext) in [("perl", "pl"), ("lua", "lua"), ("tcl", "tcl")] {
        if !have_python_nbd() || !have_plugin(lang) {
            continue;
        }
        let s = Server::start(&[lang, script(ext).to_str().unwrap()]);
        read_write(&s.uri);
        drop(s);
        // The long form works too.
        let arg = format!("script={}", script(ext).display());
        let s = Server::start(&[lang, &arg]);
        read_write(&s.uri);
    }
}

#[test]
fn python_plugin_reads_writes_lists_exports_and_reports_extents() {
    if !have_python_nbd() || !have_plugin("python") || !have("nbdinfo") {
        return;
    }
    let s = Server::start(&["python", script("py").to_str().unwrap()]);
    read_write(&s.uri);
    let list = stdout_of(Command::new("nbdinfo").args(["--list", "--json", &s.uri]));
    assert!(list.contains("\"export-name\": \"first\""), "{list}");
    assert!(list.contains("\"export-name\": \"second\""), "{list}");
    assert!(list.contains("the first export"), "{list}");
    let map = stdout_of(Command::new("nbdinfo").args(["--map", &s.uri]));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "524288", "0"], "{map}");
    assert_eq!(rows[1][..3], ["524288", "524288", "3"], "{map}");
    // A second bare parameter is not a script: refused, naming it.
    let py = script("py");
    let py = py.to_str().unwrap();
    let err = fails_stderr(&["-U", "-", "--run", "true", "python", py, "extra"]);
    assert!(err.contains("'extra'"), "{err}");
}
