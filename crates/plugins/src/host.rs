//! What the plugins that run the system's tools (tmpdisk, ondemand,
//! linuxdisk, floppy, iso) share: where their scratch files go and where
//! those tools are looked for.

use std::path::{Path, PathBuf};

/// `$TMPDIR`, else /var/tmp (not /tmp: their images can be large).
pub(crate) fn scratch_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
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
