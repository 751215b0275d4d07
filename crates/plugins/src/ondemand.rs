//! `ondemand`: a persistent filesystem per export name, made the first
//! time a client asks for that name.
//!
//! Why: clients that want their own scratch filesystem which survives
//! reconnects (and server restarts) just pick an export name, as with
//! nbdkit's ondemand plugin.  Each name is a sparse file in `dir=` (the
//! default export "" is the file `default`), formatted with `mkfs -t TYPE`
//! (or made by the user's `command=`) when it does not exist yet.  A file
//! is locked while a client uses it (an OFD lock: exclusive for writers,
//! shared for `-r`), so two clients never write one filesystem; a second
//! client is refused, or with `wait=true` waits its turn; `share=true`
//! (nbdkit >= 1.42) takes no lock, for clients that coordinate themselves
//! (a cluster filesystem, or readers only).  Listing the exports lists the
//! files.  Reads and writes are the file plugin's.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use nbdkit_backend::registry::ANY_KEY;
use nbdkit_backend::LockExt;
use nbdkit_backend::{
    Backend, ConfigError, Error, ErrorKind, ExportEntry, Handle, Param, PluginSpec, Result,
};

use crate::file::{CachePolicy, FileHandle};
use crate::tmpdisk::{mkfs_recipe, MKFS};

/// The longest export name (a file name: NAME_MAX).
const NAME_MAX: usize = 255;

struct OnDemand {
    dir: PathBuf,
    /// Shell variables for the command: size, type, label, and every other
    /// parameter.
    vars: BTreeMap<String, String>,
    command: String,
    /// wait=true: a client wanting a locked filesystem waits for it.
    wait: bool,
    /// share=true: no lock, any number of clients use one filesystem.
    share: bool,
    /// Held while a filesystem is being made, so two clients asking for a
    /// new name at once do not both run mkfs on it.
    creating: Mutex<()>,
}

/// The file an export name is kept in, or why the name is refused.
fn file_name(export: &str) -> Result<&str> {
    if export.is_empty() {
        return Ok("default");
    }
    if export.len() > NAME_MAX || export.contains(['.', '/', ':']) || export.contains('\0') {
        return Err(Error::invalid(format!(
            "ondemand: invalid export name '{export}' rejected (at most {NAME_MAX} bytes, without '.', '/' or ':')"
        )));
    }
    Ok(export)
}

impl OnDemand {
    /// Run the command that makes `disk` (mkfs by default).
    fn make(&self, disk: &std::path::Path) -> Result<()> {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&self.command)
            .envs(&self.vars)
            .env("disk", disk)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::from_io("ondemand: running the command", e))?;
        if !out.status.success() {
            // A half-made filesystem is not left to be served next time.
            let _ = std::fs::remove_file(disk);
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(Error::io(format!(
                "ondemand: the command failed ({}): {}",
                out.status,
                err.trim()
            )));
        }
        Ok(())
    }

    /// Take the lock on `file`: shared when read-only, else exclusive.
    fn lock(&self, file: &File, readonly: bool, export: &str) -> Result<()> {
        // SAFETY: flock is plain data; zeroed is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as _;
        fl.l_whence = libc::SEEK_SET as _;
        let cmd = if self.wait {
            libc::F_OFD_SETLKW
        } else {
            libc::F_OFD_SETLK
        };
        loop {
            // SAFETY: a valid open fd and a pointer to a live flock.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) if self.wait => continue,
                Some(libc::EACCES | libc::EAGAIN) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("ondemand: {export}: filesystem is locked by another client"),
                    ))
                }
                _ => {
                    return Err(Error::from_io(
                        format_args!("ondemand: locking {export}"),
                        e,
                    ))
                }
            }
        }
    }
}

impl Backend for OnDemand {
    fn name(&self) -> &str {
        "ondemand"
    }

    fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        // The default export first, then every other file that is a
        // valid export name, in the directory's (readdir) order.
        let mut out = vec![ExportEntry {
            name: String::new(),
            description: None,
        }];
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::from_io(format_args!("ondemand: {}", self.dir.display()), e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry
                .map_err(|e| Error::from_io(format_args!("ondemand: {}", self.dir.display()), e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name == "default" || file_name(&name).is_err() {
                continue;
            }
            names.push(name);
        }
        out.extend(names.into_iter().map(|name| ExportEntry {
            name,
            description: None,
        }));
        Ok(out)
    }

    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let name = file_name(export)?;
        let path = self.dir.join(name);
        if !path.exists() {
            let _guard = self.creating.lock_unpoisoned();
            if !path.exists() {
                self.make(&path)?;
            }
        }
        let lock = if readonly {
            File::open(&path)
        } else {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
        }
        .map_err(|e| Error::from_io(format_args!("ondemand: {}", path.display()), e))?;
        if !self.share {
            self.lock(&lock, readonly, name)?;
        }
        let file = FileHandle::open(&path, readonly, CachePolicy::Default)?;
        Ok(Box::new(OnDemandHandle {
            file,
            _lock: lock,
            shared: self.share,
        }))
    }
}

/// The file plugin's handle on the export's file, holding its lock until
/// the client goes.
struct OnDemandHandle {
    file: FileHandle,
    _lock: File,
    shared: bool,
}

impl Handle for OnDemandHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&self.file)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // Locked: one client per filesystem, so multi-conn is off.
        // Shared: the connections share the file (and its page cache), as
        // the file plugin's do.
        if self.shared {
            self.file.can_multi_conn()
        } else {
            Ok(false)
        }
    }
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "ondemand",
    summary:
        "a persistent filesystem per export name, made with mkfs the first time it is asked for",
    description: "Each export name is a sparse file in dir= (\"\" is the file 'default'), made \
                  when first asked for with mkfs -t TYPE, or by command= (a /bin/sh fragment \
                  given $disk, $size and every parameter as a variable).  A filesystem is \
                  locked while a client uses it: a second client is refused (wait=true: it \
                  waits; share=true: no lock, clients share it).  Names are at most 255 bytes, without '.', '/' or ':'.\n\n\
                  Example:\n  nbdkit-rs ondemand dir=/var/tmp/exports 1G",
    magic_config_key: Some("size"),
    params: &[
        Param {
            name: "dir",
            help: "the directory holding one file per export (required)",
        },
        Param {
            name: "size",
            help: "virtual size of each filesystem (required; with command= only a suggestion)",
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
            name: "wait",
            help: "true: a client wanting a filesystem in use waits for it (default: refused)",
        },
        Param {
            name: "share",
            help: "true: no lock, any number of clients may use one filesystem at once (default false)",
        },
        Param {
            name: ANY_KEY,
            help: "any other parameter becomes a shell variable for command=",
        },
    ],
    create: |cfg| {
        let dir = cfg.take("dir").ok_or_else(|| {
            ConfigError::new("ondemand: the 'dir' parameter is required (the exports directory)")
        })?;
        let size = cfg
            .take_size("size")?
            .ok_or_else(|| ConfigError::new("ondemand: the 'size' parameter is required"))?;
        let wait = cfg
            .take_bool("wait")
            .map_err(|e| ConfigError::new(format!("ondemand: {e}")))?
            .unwrap_or(false);
        let share = cfg
            .take_bool("share")
            .map_err(|e| ConfigError::new(format!("ondemand: {e}")))?
            .unwrap_or(false);
        let (command, vars) = mkfs_recipe(
            cfg,
            "ondemand",
            size,
            "'disk' cannot be set on the command line (it is the disk's path)",
        )?;
        let path = PathBuf::from(&dir);
        if !path.is_dir() {
            return Err(ConfigError::new(format!(
                "ondemand: dir={dir}: not a directory"
            )));
        }
        // The server may change directory when it forks to the background.
        let path = std::fs::canonicalize(&path)
            .map_err(|e| ConfigError::new(format!("ondemand: dir={dir}: {e}")))?;
        Ok(Arc::new(OnDemand {
            dir: path,
            vars,
            command: command.unwrap_or_else(|| MKFS.to_string()),
            wait,
            share,
            creating: Mutex::new(()),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        assert_eq!(file_name("").unwrap(), "default");
        assert_eq!(file_name("export1").unwrap(), "export1");
        for bad in ["a.b", "../x", "a/b", "a:b", &"x".repeat(256)] {
            assert!(file_name(bad).is_err(), "{bad}");
        }
    }
}
