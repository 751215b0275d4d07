//! `iso`: one or more directories as an ISO 9660 (CD-ROM) image, served
//! read-only.
//!
//! The image is made once at start-up by an mkisofs-style program
//! (xorriso, else genisoimage, else mkisofs: the tools that write ISO 9660
//! and its Joliet and Rock Ridge extensions) into an unlinked file under
//! `$TMPDIR` (default /var/tmp), then served as the file plugin serves a
//! file.  `params=` is handed to the program through the shell, as with
//! nbdkit, so it may hold quoted words.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use nbdkit_backend::{Backend, Config, ConfigError, Handle, Param, PluginSpec, Result};

use crate::file::{CachePolicy, FileHandle};

/// The programs tried, in order, and how each is invoked as mkisofs.
const PROGRAMS: &[(&str, &str)] = &[
    ("xorriso", "xorriso -as mkisofs"),
    ("genisoimage", "genisoimage"),
    ("mkisofs", "mkisofs"),
];

/// The first mkisofs-like program installed, as (name, command).
pub fn default_program() -> Option<(&'static str, &'static str)> {
    PROGRAMS
        .iter()
        .copied()
        .find(|(p, _)| crate::host::installed(p))
}

/// Single-quote `s` for /bin/sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

struct Iso {
    /// Opened read-only; its name is already gone.
    path_for_messages: PathBuf,
    file: Arc<FileHandle>,
}

impl Backend for Iso {
    fn name(&self) -> &str {
        "iso"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(IsoHandle(self.file.clone())))
    }
}

/// The file plugin's handle on the image, shared by every connection
/// (read-only, so they agree: multi-conn is safe).
struct IsoHandle(Arc<FileHandle>);

impl Handle for IsoHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.0)
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("iso: {m}"));
    let dirs = cfg.take_all("dir");
    if dirs.is_empty() {
        return Err(cerr("at least one dir= is required".into()));
    }
    let mut quoted = Vec::new();
    for d in &dirs {
        let p = std::fs::canonicalize(d).map_err(|e| cerr(format!("dir={d}: {e}")))?;
        if !p.is_dir() {
            return Err(cerr(format!("dir={d}: not a directory")));
        }
        quoted.push(quote(&p.to_string_lossy()));
    }
    let program = match cfg.take("prog") {
        Some(p) if p.is_empty() => return Err(cerr("prog=: expected a program name".into())),
        // xorriso is only mkisofs-compatible in its -as mkisofs mode.
        Some(p) if p == "xorriso" || p.ends_with("/xorriso") => format!("{p} -as mkisofs"),
        Some(p) => p,
        None => default_program()
            .map(|(_, cmd)| cmd.to_string())
            .ok_or_else(|| {
                cerr("none of xorriso, genisoimage or mkisofs is installed (or give prog=)".into())
            })?,
    };
    let params = cfg.take("params").unwrap_or_default();
    let tmp = crate::host::scratch_tempdir("iso")?;
    let image = tmp.path().join("image.iso");
    let command = format!(
        "{program} -quiet {params} -o {} {}",
        quote(&image.to_string_lossy()),
        quoted.join(" ")
    );
    tracing::debug!("iso: {command}");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| cerr(format!("running /bin/sh: {e}")))?;
    if !out.status.success() || !image.is_file() {
        return Err(cerr(format!(
            "{command}: failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let file = FileHandle::open(&image, true, CachePolicy::Default)
        .map_err(|e| cerr(e.message().to_string()))?;
    Ok(Arc::new(Iso {
        path_for_messages: image,
        file: Arc::new(file),
    }))
}

impl Drop for Iso {
    fn drop(&mut self) {
        tracing::debug!("iso: closing {}", self.path_for_messages.display());
    }
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "iso",
    summary: "directories as an ISO 9660 (CD-ROM) image, read-only",
    description: "The image is made once at start-up in $TMPDIR (default /var/tmp) by xorriso,\n\
genisoimage or mkisofs (the first installed, or prog=).  Several dir= are merged.\n\
Without Joliet or Rock Ridge (params='-JrT'), ISO 9660 shortens file names.\n\n\
Example:\n  nbdkit-rs iso /path/to/directory params='-JrT -V \"My Disk\"'",
    magic_config_key: Some("dir"),
    params: &[
        Param {
            name: "dir",
            help: "a directory to put in the image (required, may be repeated; the magic key)",
        },
        Param {
            name: "params",
            help: "more options for the program, through the shell (e.g. '-JrT')",
        },
        Param {
            name: "prog",
            help: "the mkisofs-style program (default: xorriso, genisoimage or mkisofs)",
        },
    ],
    create,
};
