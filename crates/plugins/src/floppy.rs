//! `floppy`: a directory as a disk with an MBR partition table and one
//! FAT32 partition holding the directory's files (long names kept),
//! served read-only.
//!
//! The filesystem is written once at start-up into a sparse, unlinked
//! file under `$TMPDIR` (default /var/tmp) by dosfstools' `mkfs.fat` and
//! mtools' `mmd`/`mcopy` (the standard tools that write FAT without
//! mounting it), so later changes to the directory do not reach clients.
//! (The `fatfs` crate was tried first: its 0.3 release writes subdirectory
//! `..` entries that dosfstools' fsck.fat rejects.)  As with nbdkit, FAT32
//! is used whatever the size, and files that are not regular files or
//! directories (symlinks, devices, sockets) are left out.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbdkit_backend::{parse_size, Backend, Config, ConfigError, Param, PluginSpec};

const DEFAULT_LABEL: &str = "NBDKITFLOPY";
/// MBR partition type for FAT32 with LBA addressing.
const MBR_FAT32_LBA: u8 = 0x0c;
/// The partition starts 1 MiB in.
const PARTITION_START: u64 = 1 << 20;
/// FAT32 needs at least 65525 clusters; with 512-byte clusters that is
/// about 33 MiB, and the file is sparse, so smaller disks are not worth
/// the trouble.
const MIN_FS: u64 = 40 << 20;

/// Bytes the files need on FAT, rounded to 4 KiB per file and directory.
fn usage(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            total += m.len().next_multiple_of(4096) + 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

/// The directories and the regular files under `dir`, as paths relative
/// to it, in a stable order (parents before children).
fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), String> {
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&abs)
            .map_err(|e| format!("{}: {e}", abs.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", abs.display()))?;
        entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
        for e in entries {
            let r = rel.join(e.file_name());
            let m = e
                .path()
                .symlink_metadata()
                .map_err(|err| format!("{}: {err}", e.path().display()))?;
            if m.is_dir() {
                dirs.push(r.clone());
                stack.push(r);
            } else if m.is_file() {
                if m.len() > u64::from(u32::MAX) {
                    return Err(format!(
                        "{}: larger than FAT's 4 GiB file limit",
                        e.path().display()
                    ));
                }
                files.push(r);
            } else {
                tracing::debug!(
                    "floppy: {}: not a regular file or directory; left out",
                    e.path().display()
                );
            }
        }
    }
    dirs.sort_by_key(|d| d.components().count());
    Ok((dirs, files))
}

/// Run an mtools or dosfstools command on the image; Err(its message).
fn tool(args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let name = args[0].to_string_lossy().into_owned();
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        // The image is a plain file, not a drive mtools must check.
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("PATH", crate::host::search_path())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "running {name} (from {}): {e}",
                if name.starts_with('m') && name != "mkfs.fat" {
                    "mtools"
                } else {
                    "dosfstools"
                }
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `::/rel` in mtools' notation.
fn on_image(rel: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from("::/");
    s.push(rel.as_os_str());
    s
}

fn make_fat32(dir: &Path, label: &str, fs_size: u64, out: &Path) -> Result<(), String> {
    let f = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    f.set_len(fs_size)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    drop(f);
    let o = out.as_os_str();
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    tool(&[
        os("mkfs.fat"),
        os("-F"),
        os("32"),
        os("-n"),
        std::ffi::OsStr::new(label),
        o,
    ])?;
    let (dirs, files) = walk(dir)?;
    // Many names per command: one process per batch, not per file.
    for batch in dirs.chunks(256) {
        let names: Vec<_> = batch.iter().map(|d| on_image(d)).collect();
        let mut args = vec![os("mmd"), os("-i"), o];
        args.extend(names.iter().map(|n| n.as_os_str()));
        tool(&args)?;
    }
    let mut by_dir: std::collections::BTreeMap<PathBuf, Vec<PathBuf>> = Default::default();
    for f in files {
        let parent = f.parent().map(Path::to_path_buf).unwrap_or_default();
        by_dir.entry(parent).or_default().push(dir.join(f));
    }
    for (parent, files) in &by_dir {
        let mut target = on_image(parent);
        if !parent.as_os_str().is_empty() {
            target.push("/");
        }
        for batch in files.chunks(256) {
            // -p keeps modification times; -D o overwrites (never prompts)
            // when two names differ only in case.
            let mut args = vec![os("mcopy"), os("-p"), os("-D"), os("o"), os("-i"), o];
            args.extend(batch.iter().map(|p| p.as_os_str()));
            args.push(target.as_os_str());
            tool(&args)?;
        }
    }
    Ok(())
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("floppy: {m}"));
    let dir = cfg.require("dir", "floppy")?;
    let label = cfg.take("label").unwrap_or_else(|| DEFAULT_LABEL.into());
    if label.is_empty() || label.len() > 11 || !label.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(cerr(format!(
            "label={label}: expected 1 to 11 ASCII characters"
        )));
    }
    let size = match cfg.take("size") {
        None => None,
        Some(v) => Some(parse_size(&v).map_err(|e| cerr(format!("size={v}: {e}")))?),
    };
    let dir = std::fs::canonicalize(&dir).map_err(|e| cerr(format!("dir={dir}: {e}")))?;
    if !dir.is_dir() {
        return Err(cerr(format!("dir={}: not a directory", dir.display())));
    }
    let need = usage(&dir).map_err(|e| cerr(e.to_string()))?;
    let fs_size = match size {
        Some(total) => total
            .checked_sub(PARTITION_START)
            .map(|s| s / 512 * 512)
            .filter(|&s| s >= MIN_FS)
            .ok_or_else(|| {
                cerr(format!(
                    "size={total}: FAT32 needs at least {} bytes",
                    MIN_FS + PARTITION_START
                ))
            })?,
        // FATs, directories and slack on top of the data.
        None => ((need + need / 8 + (4 << 20)).max(MIN_FS)).next_multiple_of(1 << 20),
    };
    let tmp = crate::host::scratch_tempdir("floppy")?;
    let fs = tmp.path().join("fat32");
    make_fat32(&dir, &label, fs_size, &fs).map_err(|e| {
        cerr(match size {
            Some(s) => format!("size={s}: {e}"),
            None => e,
        })
    })?;
    crate::partitioning::single_partition_disk(&fs, Some(MBR_FAT32_LBA))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "floppy",
    summary: "a directory as an MBR disk holding a FAT32 filesystem, read-only",
    description: "Long file names are kept; symlinks and special files are left out.  The\n\
filesystem is written once at start-up in $TMPDIR (default /var/tmp).\n\n\
Examples:\n  nbdkit-rs floppy /path/to/directory label=MYFILES\n  \
nbdkit-rs --filter=cow floppy /path/to/directory size=1G",
    magic_config_key: Some("dir"),
    params: &[
        Param {
            name: "dir",
            help: "the directory whose files the filesystem holds (required; the magic key)",
        },
        Param {
            name: "label",
            help: "the volume label, up to 11 ASCII characters (default NBDKITFLOPY)",
        },
        Param {
            name: "size",
            help: "the whole disk's size (default: enough for the files, at least 41 MiB)",
        },
    ],
    create,
};
