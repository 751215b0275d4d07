//! What the plugins that run the system's tools (tmpdisk, ondemand,
//! linuxdisk, floppy, iso) share: where their scratch files go and where
//! those tools are looked for.

use std::path::{Path, PathBuf};

use nbdkit_backend::ConfigError;

/// `$TMPDIR`, else /var/tmp (not /tmp: their images can be large).
pub(crate) fn scratch_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// A fresh directory in [`scratch_dir`] for `who`'s image files, removed
/// when dropped.
pub(crate) fn scratch_tempdir(who: &str) -> Result<tempfile::TempDir, ConfigError> {
    let dir = scratch_dir();
    tempfile::Builder::new()
        .prefix(who)
        .tempdir_in(&dir)
        .map_err(|e| ConfigError::new(format!("{who}: {}: {e} (set TMPDIR)", dir.display())))
}

/// `$PATH` plus the sbin directories, where mkfs and mke2fs live but a
/// user's PATH often does not reach.
pub(crate) fn search_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")
}

/// Is `prog` installed (somewhere on [`search_path`])?
pub(crate) fn installed(prog: &str) -> bool {
    let found = search_path()
        .split(':')
        .any(|d| !d.is_empty() && Path::new(d).join(prog).is_file());
    found
}
