//! `tmpdisk`: a fresh, empty filesystem for each client, deleted when it
//! disconnects.
//!
//! Why: thin clients want scratch space ("a remote tmpfs") that starts
//! empty every time and never leaks between clients, as nbdkit's tmpdisk
//! plugin gives.  On each connection a sparse file is made in `$TMPDIR`
//! (default /var/tmp) and `mkfs` (or the user's `command=`) prepares it;
//! the file is unlinked as soon as it is open, so nothing is left behind
//! even if the server is killed.  Reads and writes are the file plugin's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use nbdkit_backend::registry::ANY_KEY;
use nbdkit_backend::{Backend, Config, ConfigError, Error, Handle, Param, PluginSpec, Result};

use crate::file::{CachePolicy, FileHandle};

/// The default command: an empty file of `$size` bytes, then mkfs with the
/// options each family of mkfs needs to work on a plain file unattended.
pub(crate) const MKFS: &str = r#"
labelopt=-L
case "$type" in
    ext2|ext3|ext4) extra=-F ;;
    xfs|btrfs) extra=-f ;;
    vfat|fat|msdos) extra=-I; labelopt=-n ;;
    ntfs) extra='-Q -F' ;;
    *) extra= ;;
esac
truncate -s "$size" "$disk" || exit 1
if [ -n "$label" ]; then
    mkfs -t "$type" $extra $labelopt "$label" "$disk"
else
    mkfs -t "$type" $extra "$disk"
fi
"#;

struct TmpDisk {
    /// Shell variables for the command: size, type, label, and every other
    /// parameter.
    vars: BTreeMap<String, String>,
    command: String,
    dir: PathBuf,
}

impl TmpDisk {
    fn make(&self) -> Result<FileHandle> {
        let tmp = tempfile::Builder::new()
            .prefix("tmpdisk")
            .tempdir_in(&self.dir)
            .map_err(|e| Error::from_io(format_args!("tmpdisk: {}", self.dir.display()), e))?;
        let disk = tmp.path().join("disk");
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&self.command)
            .envs(&self.vars)
            .env("disk", &disk)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::from_io("tmpdisk: running the command", e))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(Error::io(format!(
                "tmpdisk: the command failed ({}): {}",
                out.status,
                err.trim()
            )));
        }
        let h = FileHandle::open(&disk, false, CachePolicy::Default)?;
        // The open file keeps the disk; the directory goes now, so nothing
        // is left on disk once the client goes.
        drop(tmp);
        Ok(h)
    }
}

impl Backend for TmpDisk {
    fn name(&self) -> &str {
        "tmpdisk"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(TmpHandle(self.make()?)))
    }
}

/// The file plugin's handle on the private disk, except that connections
/// do not share a disk, so multi-conn is off.
struct TmpHandle(FileHandle);

impl Handle for TmpHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&self.0)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(false)
    }
}

/// Is `mkfs.TYPE` installed (in PATH or the sbin directories)?
fn have_mkfs(fs: &str) -> bool {
    crate::host::installed(&format!("mkfs.{fs}"))
}

/// The parameters tmpdisk and ondemand share: `command=` (`None`: run
/// [`MKFS`]), and the shell variables for it: every other parameter, then
/// `size`, `type` (default ext4) and `label`.  `disk` is refused with
/// `disk_taken`, as it is the disk's path.
pub(crate) fn mkfs_recipe(
    cfg: &mut Config,
    who: &str,
    size: u64,
    disk_taken: &str,
) -> std::result::Result<(Option<String>, BTreeMap<String, String>), ConfigError> {
    let command = cfg.take("command");
    let fs = cfg.take("type").unwrap_or_else(|| "ext4".into());
    let label = cfg.take("label");
    let mut vars = BTreeMap::new();
    for (k, v) in cfg.take_rest() {
        if k == "disk" {
            return Err(ConfigError::new(format!("{who}: {disk_taken}")));
        }
        vars.insert(k, v);
    }
    if command.is_none() {
        if let Some(k) = vars.keys().next() {
            return Err(ConfigError::new(format!(
                "{who}: unknown parameter '{k}' (extra parameters are variables for command=)"
            )));
        }
        if !have_mkfs(&fs) {
            return Err(ConfigError::new(format!(
                "{who}: type={fs}: mkfs.{fs} is not installed"
            )));
        }
    }
    vars.insert("size".into(), size.to_string());
    vars.insert("type".into(), fs);
    vars.insert("label".into(), label.unwrap_or_default());
    Ok((command, vars))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "tmpdisk",
    summary: "a fresh empty filesystem (or command= output) for each client, deleted after",
    description: "Each connection gets its own sparse file in $TMPDIR (default /var/tmp), \
                  formatted with mkfs -t TYPE, or made by command= (a /bin/sh fragment given \
                  $disk, $size and every parameter as a variable).  Deleted when the client \
                  disconnects.\n\n\
                  Example:\n  nbdkit-rs tmpdisk 16G type=ext4 label=scratch",
    magic_config_key: Some("size"),
    params: &[
        Param {
            name: "size",
            help: "virtual size (required; with command= only a suggestion)",
        },
        Param {
            name: "type",
            help: "filesystem type for mkfs -t (default ext4)",
        },
        Param {
            name: "label",
            help: "filesystem label (default none)",
        },
        Param {
            name: "command",
            help: "shell fragment that creates \"$disk\" instead of mkfs",
        },
        Param {
            name: ANY_KEY,
            help: "any other parameter becomes a shell variable for command=",
        },
    ],
    create: |cfg| {
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("tmpdisk: the 'size' parameter is required"))?;
        let (command, vars) = mkfs_recipe(
            cfg,
            "tmpdisk",
            size,
            "'disk' is reserved for the disk's path",
        )?;
        if command.is_none() && size == 0 {
            return Err(ConfigError::new("tmpdisk: size=0: mkfs needs a size"));
        }
        let dir = crate::host::scratch_dir();
        if !dir.is_dir() {
            return Err(ConfigError::new(format!(
                "tmpdisk: {}: not a directory (set TMPDIR)",
                dir.display()
            )));
        }
        Ok(Arc::new(TmpDisk {
            vars,
            command: command.unwrap_or_else(|| MKFS.to_string()),
            dir,
        }))
    },
};
