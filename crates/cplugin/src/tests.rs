//! Unit tests: the struct layout against nbdkit's real header, and the
//! Debian memory plugin driven in-process through the Backend traits.

use super::*;
use std::process::Command;

/// Skip (or fail under NBDKIT_RS_REQUIRE_TOOLS=1) when something the test
/// needs is missing.
fn have(what: &str, ok: bool) -> bool {
    if !ok {
        if std::env::var("NBDKIT_RS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{what} is required but missing (scripts/test.sh installs it)");
        }
        eprintln!("SKIP: {what} is missing");
    }
    ok
}

#[test]
fn struct_layout_matches_nbdkit_plugin_h() {
    let header = Path::new("/usr/include/nbdkit-plugin.h");
    if !have("nbdkit-plugin.h (nbdkit-plugin-dev)", header.exists())
        || !have(
            "a C compiler (cc)",
            Command::new("cc").arg("--version").output().is_ok(),
        )
    {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cplugin-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fields = ffi::field_offsets();
    let mut c = String::from(
        "#define NBDKIT_API_VERSION 2\n#include <stdio.h>\n#include <stddef.h>\n#include <nbdkit-plugin.h>\nint main(void){\n",
    );
    c.push_str("printf(\"size %zu\\n\", sizeof(struct nbdkit_plugin));\n");
    for (name, _) in &fields {
        c.push_str(&format!(
            "printf(\"{name} %zu\\n\", offsetof(struct nbdkit_plugin, {name}));\n"
        ));
    }
    c.push_str("return 0;}\n");
    std::fs::write(dir.join("layout.c"), c).unwrap();
    let out = Command::new("cc")
        .arg("-o")
        .arg(dir.join("layout"))
        .arg(dir.join("layout.c"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(dir.join("layout")).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("size {}", ffi::STRUCT_SIZE),
        "struct size"
    );
    for ((name, ours), line) in fields.iter().zip(lines) {
        assert_eq!(line, format!("{name} {ours}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// dlopen of one path gives one copy of the library, so tests that load the
/// same plugin share its globals (memory's `size`: a failed `size=lots` in one
/// test left -1 there for another running beside it). The guard serialises
/// them.
fn debian_plugin(name: &str) -> Option<(PathBuf, std::sync::MutexGuard<'static, ()>)> {
    static LOADED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let p = find(name);
    if have(
        &format!("nbdkit-{name}-plugin.so (Debian's nbdkit)"),
        p.is_some(),
    ) {
        let guard = LOADED.lock_unpoisoned();
        p.map(|p| (p, guard))
    } else {
        None
    }
}

#[test]
fn memory_plugin_in_process() {
    let Some((path, _loaded)) = debian_plugin("memory") else {
        return;
    };
    let p = CPlugin::open(&path).unwrap();
    assert_eq!(p.name(), "memory");
    assert_eq!(p.magic_config_key(), Some("size"));
    let b = p.configure(&[("size".into(), "1M".into())]).unwrap();
    assert_eq!(b.thread_model(), ThreadModel::Parallel);
    b.after_fork().unwrap();
    let h = b.open(false, "").unwrap();
    assert_eq!(h.size().unwrap(), 1 << 20);
    assert!(h.can_write().unwrap());
    assert_eq!(h.can_fua().unwrap(), FuaMode::Native);
    h.pwrite(&[1, 2, 3, 4], 4096, true).unwrap();
    let mut buf = [0u8; 6];
    h.pread(&mut buf, 4095).unwrap();
    assert_eq!(buf, [0, 1, 2, 3, 4, 0]);
    let mut e = Extents::new(0, 1 << 20);
    h.extents(0, 1 << 20, false, &mut e).unwrap();
    assert!(e.list().iter().any(|x| x.flags == 0), "{:?}", e.list());
    assert_eq!(
        e.list().last().unwrap().offset + e.list().last().unwrap().length,
        1 << 20
    );
    drop(h);
    b.shutdown();
}

#[test]
fn config_errors_carry_the_plugins_message() {
    let Some((path, _loaded)) = debian_plugin("memory") else {
        return;
    };
    let p = CPlugin::open(&path).unwrap();
    let e = p
        .configure(&[("size".into(), "lots".into())])
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("memory: "), "{e}");
    assert!(e.contains("lots"), "{e}");
}

#[test]
fn not_a_plugin() {
    let e = CPlugin::open(Path::new("/nonexistent/x.so"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/nonexistent/x.so") && !e.contains('\n'), "{e}");
    let dir = std::env::temp_dir().join(format!("cplugin-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("text.so");
    std::fs::write(&f, "not an ELF file").unwrap();
    let e = CPlugin::open(&f).err().unwrap().to_string();
    assert!(e.contains("cannot load the plugin"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
