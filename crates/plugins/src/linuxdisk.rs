//! `linuxdisk`: a directory turned into a GPT-partitioned disk whose one
//! partition is an ext2, ext3 or ext4 filesystem holding the directory's
//! files (owners, modes, links and special files kept), served read-only.
//!
//! The filesystem is made once at start-up by e2fsprogs' `mke2fs -d`
//! (the tool that knows how to lay out ext2/3/4, journal included) in an
//! unlinked file under `$TMPDIR` (default /var/tmp); the partition table
//! around it is the partitioning plugin's.  Without `size=`, the
//! filesystem is made just big enough: sized from the files, and grown
//! and remade if mke2fs finds it too small.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use nbdkit_backend::{parse_size, Backend, Config, ConfigError, Param, PluginSpec};

/// How big the filesystem should be.
#[derive(Clone, Copy)]
enum Size {
    /// Just enough for the files.
    Fit,
    /// The filesystem's size, exactly (the disk adds its partition table).
    Exact(u64),
    /// At least this much free space after the files.
    Extra(u64),
}

/// mke2fs leaves the journal out, silently, of a filesystem under 2048
/// blocks (8 MiB of 4 KiB blocks); ext3 and ext4 are made at least this
/// big so that they have one.
const MIN_JOURNALED: u64 = 16 << 20;

/// Bytes and inodes the directory's contents need.
fn usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 1u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            inodes += 1;
            // Allocated blocks, at least a 4 KiB block per file.
            bytes += (m.blocks() * 512).max(m.len().next_multiple_of(4096));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

struct Mkfs<'a> {
    dir: &'a Path,
    fstype: &'a str,
    label: Option<&'a str>,
    inodes: u64,
    out: &'a Path,
}

impl Mkfs<'_> {
    /// Make a filesystem of `size` bytes; Err(mke2fs's message) if it
    /// does not fit or fails.
    fn run(&self, size: u64) -> std::result::Result<(), String> {
        let size = size / 4096 * 4096;
        std::fs::write(self.out, b"").map_err(|e| format!("{}: {e}", self.out.display()))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.out)
            .map_err(|e| format!("{}: {e}", self.out.display()))?;
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", self.out.display()))?;
        drop(f);
        let mut c = Command::new("mke2fs");
        c.args(["-q", "-F", "-t", self.fstype, "-b", "4096"])
            .arg("-N")
            .arg(self.inodes.to_string())
            .arg("-d")
            .arg(self.dir);
        if let Some(l) = self.label {
            c.args(["-L", l]);
        }
        c.arg(self.out).env("PATH", crate::host::search_path());
        let out = c
            .output()
            .map_err(|e| format!("running mke2fs (from e2fsprogs): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("linuxdisk: {m}"));
    let dir = cfg.require("dir", "linuxdisk")?;
    let label = cfg.take("label");
    let fstype = cfg.take("type").unwrap_or_else(|| "ext2".into());
    if !matches!(fstype.as_str(), "ext2" | "ext3" | "ext4") {
        return Err(cerr(format!("type={fstype}: expected ext2, ext3 or ext4")));
    }
    let size = match cfg.take("size") {
        None => Size::Fit,
        Some(v) => match v.strip_prefix('+') {
            Some(extra) => {
                Size::Extra(parse_size(extra).map_err(|e| cerr(format!("size={v}: {e}")))?)
            }
            None => Size::Exact(parse_size(&v).map_err(|e| cerr(format!("size={v}: {e}")))?),
        },
    };
    let dir = std::fs::canonicalize(&dir).map_err(|e| cerr(format!("dir={dir}: {e}")))?;
    if !dir.is_dir() {
        return Err(cerr(format!("dir={}: not a directory", dir.display())));
    }
    let (bytes, inodes) = usage(&dir).map_err(|e| cerr(format!("{}: {e}", dir.display())))?;
    let tmp = crate::host::scratch_tempdir("linuxdisk")?;
    let fs = tmp.path().join("fs");
    let mkfs = Mkfs {
        dir: &dir,
        fstype: &fstype,
        label: label.as_deref(),
        // Room for a few more, as mke2fs rounds per block group anyway.
        inodes: inodes + inodes / 8 + 16,
        out: &fs,
    };
    match size {
        Size::Exact(fs_size) => {
            if fstype != "ext2" && fs_size < MIN_JOURNALED {
                return Err(cerr(format!(
                    "size={fs_size}: too small for an {fstype} journal (at least {MIN_JOURNALED} bytes)"
                )));
            }
            mkfs.run(fs_size)
                .map_err(|e| cerr(format!("size={fs_size}: the files do not fit ({e})")))?;
        }
        Size::Fit | Size::Extra(_) => {
            // Metadata (inode tables, bitmaps, directories, a journal for
            // ext3/4) on top of the data; grow until mke2fs is content.
            let journal = if fstype == "ext2" { 0 } else { 4 << 20 };
            let mut guess = (bytes + inodes * 512 + journal) * 11 / 10 + (2 << 20);
            if fstype != "ext2" {
                guess = guess.max(MIN_JOURNALED);
            }
            let mut tries = 0;
            loop {
                match mkfs.run(guess) {
                    Ok(()) => break,
                    Err(e) if tries < 12 => {
                        tracing::debug!("linuxdisk: {guess} bytes is too small ({e}); growing");
                        guess = guess * 3 / 2;
                        tries += 1;
                    }
                    Err(e) => return Err(cerr(format!("mke2fs failed: {e}"))),
                }
            }
            if let Size::Extra(extra) = size {
                mkfs.run(guess + extra)
                    .map_err(|e| cerr(format!("mke2fs failed: {e}")))?;
            }
        }
    }
    // The disk holds the file open; the directory (and the file's name)
    // go when `tmp` drops, so nothing is left behind.
    crate::partitioning::single_partition_disk(&fs, None)
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "linuxdisk",
    summary: "a directory as a GPT disk holding an ext2/3/4 filesystem, read-only",
    description: "The filesystem is made once at start-up with mke2fs -d in $TMPDIR (default\n\
/var/tmp): owners, modes, hard and symbolic links and special files are kept.\n\
Add --filter=cow to let clients write (one client at a time), or\n\
--filter=partition partition=1 to serve the bare filesystem.\n\n\
Examples:\n  nbdkit-rs linuxdisk /path/to/directory label=ROOTFS\n  \
nbdkit-rs --filter=cow linuxdisk /path/to/directory type=ext4 size=+1G",
    magic_config_key: Some("dir"),
    params: &[
        Param {
            name: "dir",
            help: "the directory whose files the filesystem holds (required; the magic key)",
        },
        Param {
            name: "label",
            help: "the filesystem label",
        },
        Param {
            name: "type",
            help: "ext2 (default), ext3 or ext4",
        },
        Param {
            name: "size",
            help: "SIZE: the filesystem's size; +SIZE: at least this much free space (default: just enough)",
        },
    ],
    create,
};
