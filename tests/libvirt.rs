//! The libvirt plugin against libvirt's built-in `test:` driver: a domain
//! defined in an XML file, whose disk is a file made here.  The test driver
//! has no block peek, so these cover the domain/disk resolution and the
//! fallback to the disk's source; block peek itself needs a hypervisor
//! (see docs/plugins.md).

mod common;

use common::*;
use std::process::Command;

/// True if libvirt's client library is installed (Debian's libvirt0).
fn have_libvirt() -> bool {
    let found = std::path::Path::new("/usr/lib/x86_64-linux-gnu/libvirt.so.0").exists()
        || Command::new("sh")
            .arg("-c")
            .arg("ldconfig -p | grep -q 'libvirt.so.0 '")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    available(found, "libvirt.so.0 (Debian's libvirt0)")
}

/// A test-driver connection URI for a domain `guest1` with disks vda
/// (`image`) and vdb (a file that does not exist).
fn test_uri(dir: &std::path::Path, image: &std::path::Path) -> String {
    let xml = dir.join("node.xml");
    std::fs::write(
        &xml,
        format!(
            "<node>
  <domain type='test'>
    <name>guest1</name>
    <memory>1048576</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <source file='{}'/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='disk'>
        <source file='{}/missing.img'/>
        <target dev='vdb' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</node>
",
            image.display(),
            dir.display()
        ),
    )
    .unwrap();
    format!("connect=test://{}", xml.display())
}

#[test]
fn serves_a_guest_disk_by_target_and_by_source_path() {
    if !have_libvirt() || !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let (dir, image, _) = temp_file("guest.img", (3 << 20) + 1536, 11);
    let connect = test_uri(dir.path(), &image);
    let by_source = format!("disk={}", image.display());
    for disk in ["disk=vda", by_source.as_str()] {
        let s = Server::start(&["libvirt", &connect, "domain=guest1", disk]);
        let info = nbdinfo_json(&[], &s.uri);
        assert_eq!(info["is_read_only"], "true", "{info:?}");
        assert_eq!(info["export-size"], ((3 << 20) + 1536).to_string());
        let out = run_ok(Command::new("nbdcopy").arg(&s.uri).arg("-")).stdout;
        assert!(
            out == std::fs::read(&image).unwrap(),
            "bytes differ for {disk}"
        );
        // Writes are refused (read-only export).
        if have_python_nbd() {
            let w = Command::new(PYTHON)
                .args(["-m", "nbd", "-u", &s.uri, "-c", "h.pwrite(b'x', 0)"])
                .output()
                .unwrap();
            assert!(!w.status.success());
        }
    }
}

#[test]
fn bad_domain_or_disk_is_a_clear_startup_error() {
    if !have_libvirt() {
        return;
    }
    let (dir, image, _) = temp_file("guest.img", 1 << 20, 1);
    let connect = test_uri(dir.path(), &image);
    let fails = |domain: &str, disk: &str| {
        fails_stderr(&["-f", "-U", "-", "libvirt", &connect, domain, disk])
    };
    let e = fails("domain=nosuch", "disk=vda");
    assert!(e.contains("no domain \"nosuch\""), "{e}");
    let e = fails("domain=guest1", "disk=vdz");
    assert!(
        e.contains("has no disk \"vdz\"") && e.contains("vda, vdb"),
        "{e}"
    );
    let e = fails("domain=guest1", "disk=vdb");
    assert!(e.contains("missing.img"), "{e}");
    let e = fails_stderr(&["libvirt", "disk=vda"]);
    assert!(e.contains("domain"), "{e}");
}
