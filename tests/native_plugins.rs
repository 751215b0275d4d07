//! Plugins nbdkit users know that nbdkit-rs now has natively: floppy (a
//! directory as an MBR disk with FAT32), linuxdisk
//! (a directory as a partitioned ext2/3/4 disk) and iso (directories as
//! an ISO 9660 image), and cc (a plugin in C source, compiled at
//! start-up).  Each disk is copied out with nbdcopy and checked
//! with the filesystem's own tools (sfdisk, e2fsck, debugfs, xorriso,
//! fsck.fat, mtools).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A small tree: text, random data in a subdirectory, a symlink.
fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(root.join("sub/random.bin"), pseudo_random(300_000, 5)).unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
}

/// Serve `args`, copy the whole export to `out`, return its size.
fn copy_out(args: &[&str], out: &Path) -> u64 {
    let s = Server::start(args);
    run_ok(Command::new("nbdcopy").arg(&s.uri).arg(out));
    std::fs::metadata(out).unwrap().len()
}

#[test]
fn linuxdisk_makes_a_partitioned_ext_filesystem_of_a_directory() {
    if !have("mke2fs") || !have("debugfs") || !have("e2fsck") || !have("sfdisk") || !have("nbdcopy")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    tree(&src);
    let disk = dir.path().join("disk.img");
    let part = dir.path().join("part.img");
    for fstype in ["ext2", "ext3", "ext4"] {
        let t = format!("type={fstype}");
        copy_out(
            &["linuxdisk", src.to_str().unwrap(), &t, "label=ROOTFS"],
            &disk,
        );
        // One GPT partition of the Linux filesystem type, 1 MiB in.
        let table = stdout_of(Command::new("sfdisk").arg("-d").arg(&disk));
        assert!(table.contains("label: gpt"), "{table}");
        assert!(table.contains("start=        2048"), "{table}");
        assert!(
            table.contains("0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
            "{table}"
        );
        let bytes = std::fs::read(&disk).unwrap();
        std::fs::write(&part, &bytes[1 << 20..]).unwrap();
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&part)
            .output()
            .unwrap();
        assert!(fsck.status.success(), "{fstype}: {fsck:?}");
        let sb = stdout_of(Command::new("dumpe2fs").arg("-h").arg(&part));
        assert!(sb.contains("Filesystem volume name:   ROOTFS"), "{sb}");
        assert_eq!(
            sb.contains("has_journal"),
            fstype != "ext2",
            "{fstype}: journal: {sb}"
        );
        let cat = |p: &str| {
            Command::new("debugfs")
                .args(["-R", &format!("cat {p}")])
                .arg(&part)
                .output()
                .unwrap()
                .stdout
        };
        assert_eq!(cat("/hello.txt"), b"hello, world\n");
        assert!(
            cat("/sub/random.bin") == pseudo_random(300_000, 5),
            "{fstype}"
        );
        let link = stdout_of(
            Command::new("debugfs")
                .args(["-R", "stat /link"])
                .arg(&part),
        );
        assert!(link.contains("Type: symlink"), "{link}");
    }

    // size=+N leaves at least N free; size=N is the filesystem's size.
    copy_out(&["linuxdisk", src.to_str().unwrap(), "size=+20M"], &disk);
    let bytes = std::fs::read(&disk).unwrap();
    std::fs::write(&part, &bytes[1 << 20..]).unwrap();
    let sb = stdout_of(Command::new("dumpe2fs").arg("-h").arg(&part));
    let field = |name: &str| -> u64 {
        sb.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name}: {sb}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(
        field("Free blocks:") * field("Block size:") >= 20 << 20,
        "{sb}"
    );
    copy_out(&["linuxdisk", src.to_str().unwrap(), "size=64M"], &disk);
    let bytes = std::fs::read(&disk).unwrap();
    std::fs::write(&part, &bytes[1 << 20..]).unwrap();
    let sb = stdout_of(Command::new("dumpe2fs").arg("-h").arg(&part));
    assert!(sb.contains("Block count:              16384"), "{sb}");
    refused(
        &["linuxdisk", src.to_str().unwrap(), "size=256K"],
        "do not fit",
    );
    refused(
        &["linuxdisk", src.to_str().unwrap(), "type=xfs"],
        "type=xfs",
    );
    refused(&["linuxdisk", "/nonexistent"], "dir=/nonexistent");
    refused(&["linuxdisk"], "dir");
}

#[test]
fn iso_makes_an_iso9660_image_of_directories() {
    if !have("xorriso") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    tree(&a);
    let b = dir.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("second.txt"), b"from b\n").unwrap();
    let iso = dir.path().join("out.iso");
    copy_out(
        &[
            "iso",
            a.to_str().unwrap(),
            &format!("dir={}", b.display()),
            "params=-JrT -V 'My Disk'",
        ],
        &iso,
    );
    let x = dir.path().join("x");
    run_ok(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&iso)
            .args(["-extract", "/"])
            .arg(&x),
    );
    assert_eq!(
        std::fs::read(x.join("hello.txt")).unwrap(),
        b"hello, world\n"
    );
    assert!(std::fs::read(x.join("sub/random.bin")).unwrap() == pseudo_random(300_000, 5));
    assert_eq!(std::fs::read(x.join("second.txt")).unwrap(), b"from b\n");
    assert_eq!(
        std::fs::read_link(x.join("link")).unwrap(),
        Path::new("hello.txt")
    );
    let info = stdout_of(
        Command::new("xorriso")
            .args(["-indev"])
            .arg(&iso)
            .args(["-pvd_info"]),
    );
    assert!(info.contains("My Disk"), "{info}");
    let dump = stdout_of(Command::new(binary()).args(["iso", "--dump-plugin"]));
    assert!(dump.contains("iso_prog=xorriso"), "{dump}");
    refused(
        &["iso", a.to_str().unwrap(), "prog=/nonexistent/mkisofs"],
        "failed",
    );
    refused(&["iso"], "dir=");
}

#[test]
fn cc_compiles_a_c_plugin_and_serves_it() {
    let header = Path::new("/usr/include/nbdkit-plugin.h").exists();
    if !have("cc")
        || !have_python_nbd()
        || !available(header, "nbdkit-plugin.h (nbdkit-plugin-dev)")
    {
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cc/ramdisk.c");
    let src = src.to_str().unwrap();
    // Flags reach the compiler, parameters reach the plugin, and writes
    // read back.
    let s = Server::start(&["cc", src, "size=2M", "EXTRA_CFLAGS=-DFILL=7"]);
    python(
        "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         assert h.get_size()==2*1024*1024\nassert h.pread(4,0)==b'\\x07'*4\n\
         h.pwrite(b'abc',10)\nassert h.pread(4,9)==b'\\x07abc'\nprint('OK')",
        &[&s.uri],
    );
    drop(s);
    // The source from standard input; CC= before the source.
    let out = Command::new(binary())
        .args([
            "-U",
            "-",
            "cc",
            "CC=gcc",
            "-",
            "size=4096",
            "--run",
            "nbdinfo --size \"$uri\"",
        ])
        .stdin(std::fs::File::open(src).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4096");
    // CFLAGS replaces the defaults: without -shared there is no plugin.
    refused(&["cc", src, "CFLAGS=-fPIC"], "compiling");
    let bad = tempfile::Builder::new().suffix(".c").tempfile().unwrap();
    std::fs::write(bad.path(), "int x = ;\n").unwrap();
    refused(&["cc", bad.path().to_str().unwrap()], "expected expression");
    refused(&["cc"], "must be the first parameter");
    refused(&["cc", src, "nosuch=1"], "unknown parameter 'nosuch'");
    let err = fails_stderr(&["-s", "cc", "-"]);
    assert!(err.contains("-s"), "{err}");
    let dump = stdout_of(Command::new(binary()).args(["cc", "--dump-plugin"]));
    assert!(
        dump.contains("CC=cc\n") && dump.contains("CFLAGS=-g -O2 -fPIC -shared\n"),
        "{dump}"
    );
}

#[test]
fn floppy_makes_an_mbr_disk_with_a_fat32_filesystem_of_a_directory() {
    if !have("fsck.fat") || !have("mcopy") || !have("sfdisk") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    tree(&src);
    std::fs::create_dir_all(src.join("A Long Directory Name")).unwrap();
    std::fs::write(
        src.join("A Long Directory Name/Some Long File.txt"),
        b"long\n",
    )
    .unwrap();
    let disk = dir.path().join("floppy.img");
    copy_out(&["floppy", src.to_str().unwrap(), "label=MYFILES"], &disk);
    let table = stdout_of(Command::new("sfdisk").arg("-d").arg(&disk));
    assert!(table.contains("label: dos"), "{table}");
    assert!(
        table.contains("start=        2048") && table.contains("type=c"),
        "{table}"
    );
    let bytes = std::fs::read(&disk).unwrap();
    let fat = dir.path().join("fat.img");
    std::fs::write(&fat, &bytes[1 << 20..]).unwrap();
    let fsck = Command::new("fsck.fat")
        .arg("-n")
        .arg(&fat)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{fsck:?}");
    let mtools = |args: &[&str]| {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]).env("MTOOLS_SKIP_CHECK", "1");
        c
    };
    let label = stdout_of(&mut mtools(&[
        "mlabel",
        "-s",
        "-i",
        fat.to_str().unwrap(),
        "::",
    ]));
    assert!(label.contains("MYFILES"), "{label}");
    let x = dir.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    run_ok(&mut mtools(&[
        "mcopy",
        "-s",
        "-i",
        fat.to_str().unwrap(),
        "::/",
        x.to_str().unwrap(),
    ]));
    assert_eq!(
        std::fs::read(x.join("hello.txt")).unwrap(),
        b"hello, world\n"
    );
    assert!(std::fs::read(x.join("sub/random.bin")).unwrap() == pseudo_random(300_000, 5));
    assert_eq!(
        std::fs::read(x.join("A Long Directory Name/Some Long File.txt")).unwrap(),
        b"long\n"
    );
    // Symlinks are left out, as nbdkit does.
    assert!(!x.join("link").exists());
    assert_eq!(
        copy_out(&["floppy", src.to_str().unwrap(), "size=64M"], &disk),
        64 << 20
    );
    refused(&["floppy", src.to_str().unwrap(), "size=8M"], "size=");
    refused(
        &["floppy", src.to_str().unwrap(), "label=MUCH TOO LONG"],
        "label=",
    );
}
