//! The seed scenario: a partitioned disk image served read-only, exposed as
//! a file with nbdfuse, attached to a loop device at the partition's
//! offset, and mounted.  Only where the machine allows it (root, FUSE, a
//! free loop device); elsewhere it prints SKIP and passes.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Undo everything on the way out, even after a failed assertion.
#[derive(Default)]
struct Cleanup {
    mounted: Option<PathBuf>,
    loopdev: Option<String>,
    fuse_dir: Option<PathBuf>,
    nbdfuse: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        if let Some(d) = self.fuse_dir.take() {
            let unmounted = have_quietly("fusermount3")
                && Command::new("fusermount3")
                    .arg("-u")
                    .arg(&d)
                    .status()
                    .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount").arg(&d).status();
            }
        }
        if let Some(mut c) = self.nbdfuse.take() {
            // nbdfuse exits by itself once unmounted; kill it if not.
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn have_quietly(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why this machine cannot run the scenario, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    for tool in [
        "nbdfuse",
        "sfdisk",
        "mkfs.ext4",
        "losetup",
        "mount",
        "umount",
    ] {
        if !have(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    match Command::new("losetup").arg("-f").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "no free loop device: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("losetup -f: {e}")),
    }
}

/// Serve the image as `serve(disk_path)` says, then mount its partition
/// through nbdfuse and a loop device and read the files back.
fn scenario(serve: impl FnOnce(&Path) -> Vec<String>) {
    if let Some(why) = unsupported() {
        eprintln!("SKIP: loop-mount scenario: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let known = pseudo_random(300_000, 42);
    let disk = disk::gpt_ext4(
        dir.path(),
        16,
        &[
            ("hello.txt", b"hello from nbdkit-rs\n"),
            ("data/known.bin", &known),
        ],
    );
    let disk_len = std::fs::metadata(&disk.path).unwrap().len();
    let args = serve(&disk.path);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let s = Server::start(&args);
    let mut guard = Cleanup::default();
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let fuse_file = fuse_dir.join("disk");
    let child = Command::new("nbdfuse")
        .arg("-r")
        .arg(&fuse_file)
        .arg("--unix")
        .arg(&s.socket)
        .stdin(Stdio::null())
        .spawn()
        .expect("nbdfuse");
    guard.fuse_dir = Some(fuse_dir.clone());
    guard.nbdfuse = Some(child);

    // Wait for the FUSE file system to appear (or nbdfuse to fail).
    let mut tries = 0;
    while !fuse_file.exists() {
        if let Ok(Some(st)) = guard.nbdfuse.as_mut().unwrap().try_wait() {
            // Mounting FUSE can be forbidden even for root in a container.
            eprintln!("SKIP: loop-mount scenario: nbdfuse exited with {st} before mounting");
            guard.fuse_dir = None;
            return;
        }
        tries += 1;
        assert!(tries < 1000, "nbdfuse did not mount within 10 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        std::fs::metadata(&fuse_file).unwrap().len(),
        disk_len,
        "nbdfuse shows the whole disk"
    );

    let loopdev = stdout_of(
        Command::new("losetup")
            .args(["-r", "-f", "--show", "-o"])
            .arg(disk.part_offset.to_string())
            .arg("--sizelimit")
            .arg(disk.part_size.to_string())
            .arg(&fuse_file),
    )
    .trim()
    .to_string();
    assert!(loopdev.starts_with("/dev/loop"), "{loopdev}");
    guard.loopdev = Some(loopdev.clone());

    run_ok(
        Command::new("mount")
            .args(["-t", "ext4", "-o", "ro"])
            .arg(&loopdev)
            .arg(&mnt),
    );
    guard.mounted = Some(mnt.clone());

    assert_eq!(
        std::fs::read(mnt.join("hello.txt")).unwrap(),
        b"hello from nbdkit-rs\n"
    );
    assert!(
        std::fs::read(mnt.join("data/known.bin")).unwrap() == known,
        "known.bin differs after the trip through NBD, FUSE and the loop device"
    );

    drop(guard);
    assert!(s.stop().success());
}

#[test]
fn mount_ext4_partition_through_nbdfuse_and_loop() {
    scenario(|disk| vec!["-r".into(), "file".into(), disk.display().to_string()]);
}

/// The headline: the same disk compressed with xz (1 MiB blocks), never
/// unpacked, mounted through the xz filter.
#[test]
fn mount_xz_compressed_disk_through_nbdfuse_and_loop() {
    if !have("xz") {
        return;
    }
    scenario(|disk| {
        run_ok(
            Command::new("xz")
                .args(["-T0", "--block-size=1MiB", "-k"])
                .arg(disk),
        );
        let xz = format!("{}.xz", disk.display());
        std::fs::remove_file(disk).unwrap();
        vec!["--filter=xz".into(), "file".into(), xz]
    });
}

/// And with gzip, whose index is built while the client reads.
#[test]
fn mount_gzip_compressed_disk_through_nbdfuse_and_loop() {
    if !have("gzip") {
        return;
    }
    scenario(|disk| {
        run_ok(Command::new("gzip").arg(disk));
        let gz = format!("{}.gz", disk.display());
        vec![
            "--filter=gzip".into(),
            "file".into(),
            gz,
            "gzip-save-index=false".into(),
        ]
    });
}
