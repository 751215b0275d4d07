//! `file`: serve a local file or block device (`file=`), or every file in a
//! directory as a separate export (`dir=`); or the same, already open on a
//! descriptor inherited from the parent process (`fd=`, `dirfd=`), for
//! sandboxed servers that cannot open the path themselves.
//!
//! Reads and writes use pread/pwrite at the client's offsets; trim and zero
//! punch holes (fallocate); block status comes from SEEK_DATA/SEEK_HOLE;
//! FUA and flush use fdatasync, so an acknowledged write is on disk.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nbdkit_backend::{
    Backend, CacheMode, Config, ConfigError, DirectPiece, DirectRead, Error, ErrorKind,
    ExportEntry, Extents, FuaMode, Handle, Param, PluginSpec, Result, ZeroFlags, ZeroMode,
    EXTENT_HOLE, EXTENT_ZERO,
};
use tracing::debug;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CachePolicy {
    Default,
    /// Evict what we read or wrote from the page cache afterwards.
    None,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fadvise {
    Normal,
    Random,
    Sequential,
}

enum Source {
    File(PathBuf),
    Dir(PathBuf),
    /// `fd=`: a file or block device the parent process opened; each
    /// connection gets its own duplicate.
    Fd(OwnedFd),
    /// `dirfd=`: a directory the parent process opened, served as `dir=`
    /// is; exports are opened relative to it (openat), so the server
    /// needs no path to it (it may run where it has none).
    DirFd(OwnedFd),
}

struct FilePlugin {
    source: Source,
    cache: CachePolicy,
    fadvise: Fadvise,
}

impl Backend for FilePlugin {
    fn name(&self) -> &str {
        "file"
    }

    fn list_exports(&self, _readonly: bool) -> Result<Vec<ExportEntry>> {
        match &self.source {
            Source::File(_) | Source::Fd(_) => Ok(vec![ExportEntry::default()]),
            Source::DirFd(fd) => Ok(list_dirfd(fd)?
                .into_iter()
                .map(|name| ExportEntry {
                    name,
                    description: None,
                })
                .collect()),
            Source::Dir(d) => {
                let mut names = Vec::new();
                let rd = std::fs::read_dir(d).map_err(|e| Error::from_io(d.display(), e))?;
                for entry in rd.flatten() {
                    let Ok(ft) = entry.file_type() else { continue };
                    let name = entry.file_name().to_string_lossy().into_owned();
                    // Follow symlinks to decide, as a client would see them.
                    let ok = if ft.is_symlink() {
                        std::fs::metadata(entry.path())
                            .is_ok_and(|m| m.is_file() || m.file_type().is_block_device())
                    } else {
                        ft.is_file() || ft.is_block_device()
                    };
                    if ok {
                        names.push(name);
                    }
                }
                // In the directory's own (readdir) order, as nbdkit lists.
                Ok(names
                    .into_iter()
                    .map(|name| ExportEntry {
                        name,
                        description: None,
                    })
                    .collect())
            }
        }
    }

    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let handle = match &self.source {
            Source::File(p) => FileHandle::open(p, readonly, self.cache)?,
            Source::Dir(d) => {
                check_export_name(export)?;
                FileHandle::open(&d.join(export), readonly, self.cache)?
            }
            Source::DirFd(fd) => {
                check_export_name(export)?;
                let name = std::ffi::CString::new(export)
                    .map_err(|_| Error::invalid("invalid export name (it contains a NUL byte)"))?;
                FileHandle::open_with(PathBuf::from(export), readonly, self.cache, |write| {
                    open_at(fd, &name, write)
                })?
            }
            Source::Fd(fd) => FileHandle::from_fd(fd, readonly, self.cache)?,
        };
        if matches!(self.source, Source::Dir(_) | Source::DirFd(_)) && !handle.is_servable()? {
            // As listed: a subdirectory, pipe or socket is not an export
            // (opened read-only, a directory would otherwise be served).
            return Err(Error::invalid(format!(
                "'{export}' is not a regular file or block device"
            )));
        }
        handle.advise(self.fadvise);
        Ok(Box::new(handle))
    }
}

/// An export name in directory mode names a file directly in it.
fn check_export_name(export: &str) -> Result<()> {
    if export.is_empty() {
        return Err(Error::invalid(
            "this server serves a directory: choose an export name (list them with nbdinfo --list)",
        ));
    }
    if export.contains('/') || export == "." || export == ".." {
        return Err(Error::invalid(format!("invalid export name '{export}'")));
    }
    Ok(())
}

/// Open `name` in the directory `dir` (close-on-exec), read-write when
/// `write`.
fn open_at(dir: &OwnedFd, name: &std::ffi::CStr, write: bool) -> std::io::Result<File> {
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    // SAFETY: `dir` is an open descriptor we own and `name` a NUL-terminated
    // string that outlives the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The regular files and block devices directly in the directory `dir`
/// (symbolic links followed), in readdir order as `dir=` lists them.
fn list_dirfd(dir: &OwnedFd) -> Result<Vec<String>> {
    // A fresh open file description of the same directory, so that its
    // read position is our own: concurrent listings do not interleave.
    let fresh = open_at(dir, c".", false)
        .map_err(|e| Error::from_io("dirfd: reopening the directory", e))?;
    let raw = OwnedFd::from(fresh).into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; on success
    // fdopendir takes it over (closedir below closes it).
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let e = std::io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(Error::from_io("dirfd: reading the directory", e));
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: `stream` is a valid DIR* until closedir; the entry it
        // returns is valid until the next readdir on it, and is copied
        // out before that.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: as above; d_name is NUL-terminated.
        let (name, kind) = unsafe {
            (
                std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()).to_owned(),
                (*entry).d_type,
            )
        };
        let wanted = match kind {
            libc::DT_REG | libc::DT_BLK => true,
            // Follow links (and ask when the file system did not say).
            libc::DT_LNK | libc::DT_UNKNOWN => stat_at(dir, &name)
                .is_some_and(|m| matches!(m & libc::S_IFMT, libc::S_IFREG | libc::S_IFBLK)),
            _ => false,
        };
        if wanted {
            names.push(name.to_string_lossy().into_owned());
        }
    }
    // SAFETY: `stream` came from fdopendir and is closed once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// The file type bits of `name` in `dir`, following symbolic links.
fn stat_at(dir: &OwnedFd, name: &std::ffi::CStr) -> Option<libc::mode_t> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstatat fills `st` on success; both pointers are valid.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), 0) };
    // SAFETY: initialised by the successful call.
    (r == 0).then(|| unsafe { st.assume_init() }.st_mode)
}

pub(crate) struct FileHandle {
    file: File,
    path: PathBuf,
    writable: bool,
    is_block: bool,
    cache: CachePolicy,
    /// Cleared after the first EOPNOTSUPP so we stop asking the kernel.
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
}

impl FileHandle {
    pub(crate) fn open(path: &Path, readonly: bool, cache: CachePolicy) -> Result<Self> {
        Self::open_with(path.to_path_buf(), readonly, cache, |write| {
            OpenOptions::new().read(true).write(write).open(path)
        })
    }

    /// Open with `open(write)`, falling back to read-only where writing is
    /// not allowed.  `path` names the file in messages.
    fn open_with(
        path: PathBuf,
        readonly: bool,
        cache: CachePolicy,
        open: impl Fn(bool) -> std::io::Result<File>,
    ) -> Result<Self> {
        let (file, writable) = if readonly {
            (open(false), false)
        } else {
            match open(true) {
                // A read-only file or file system is served read-only.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
                    ) =>
                {
                    debug!("{}: opening read-only: {e}", path.display());
                    (open(false), false)
                }
                r => (r, true),
            }
        };
        let file = file.map_err(|e| Error::from_io(path.display(), e))?;
        Self::from_file(file, path, writable, cache)
    }

    /// `fd=`: a duplicate of the inherited descriptor, writable when it
    /// was opened for writing and the client may write.
    fn from_fd(fd: &OwnedFd, readonly: bool, cache: CachePolicy) -> Result<Self> {
        let label = PathBuf::from(format!("fd={}", fd.as_raw_fd()));
        let dup = fd
            .try_clone()
            .map_err(|e| Error::from_io(format_args!("duplicating {}", label.display()), e))?;
        let writable = !readonly && fd_access_mode(fd) != Some(libc::O_RDONLY);
        Self::from_file(File::from(dup), label, writable, cache)
    }

    fn from_file(file: File, path: PathBuf, writable: bool, cache: CachePolicy) -> Result<Self> {
        let meta = file
            .metadata()
            .map_err(|e| Error::from_io(path.display(), e))?;
        Ok(FileHandle {
            file,
            path,
            writable,
            is_block: meta.file_type().is_block_device(),
            cache,
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
        })
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// A regular file or a block device (what directory modes serve).
    fn is_servable(&self) -> Result<bool> {
        let meta = self.file.metadata().map_err(|e| self.err("stat", e))?;
        Ok(meta.is_file() || self.is_block)
    }

    fn err(&self, what: &str, e: std::io::Error) -> Error {
        Error::from_io(format_args!("{what} {}", self.path.display()), e)
    }

    fn advise(&self, f: Fadvise) {
        let advice = match f {
            Fadvise::Normal => libc::POSIX_FADV_NORMAL,
            Fadvise::Random => libc::POSIX_FADV_RANDOM,
            Fadvise::Sequential => libc::POSIX_FADV_SEQUENTIAL,
        };
        // SAFETY: plain syscall on our own descriptor; advice is only a hint.
        unsafe { libc::posix_fadvise(self.fd(), 0, 0, advice) };
    }

    /// cache=none: push a range out of the page cache after using it.
    fn evict(&self, offset: u64, len: usize, written: bool) {
        if self.cache != CachePolicy::None {
            return;
        }
        // SAFETY: syscalls on our own descriptor with in-range arguments.
        unsafe {
            if written {
                libc::sync_file_range(
                    self.fd(),
                    offset as i64,
                    len as i64,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
            libc::posix_fadvise(
                self.fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, count: u64) -> std::io::Result<()> {
        // SAFETY: plain syscall on our own descriptor.
        let r = unsafe { libc::fallocate(self.fd(), mode, offset as i64, count as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn is_unsupported(e: &std::io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
        )
    }

    /// Try to punch a hole (reads back as zeroes, frees space).
    fn punch(&self, offset: u64, count: u64) -> Result<bool> {
        if self.is_block || !self.can_punch.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            count,
        ) {
            Ok(()) => Ok(true),
            Err(e) if Self::is_unsupported(&e) => {
                debug!("{}: hole punching not supported: {e}", self.path.display());
                self.can_punch.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(self.err("punch hole in", e)),
        }
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.err("fdatasync", e))
    }
}

impl Handle for FileHandle {
    fn source_name(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }
    fn size(&self) -> Result<u64> {
        // lseek(SEEK_END) works for block devices as well as files.
        // SAFETY: plain syscall on our own descriptor.
        let end = unsafe { libc::lseek(self.fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(self.err("size of", std::io::Error::last_os_error()));
        }
        Ok(end as u64)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    nbdkit_backend::capabilities! {
        can_flush: true, can_fua: FuaMode::Native,
        // Zeroing is fast when the kernel does it; when it cannot, zero()
        // says NotSupported for fast requests instead of writing.
        can_fast_zero: true,
        // All connections share the kernel's page cache for this file, and
        // fdatasync on any descriptor persists everyone's writes.
        can_multi_conn: true,
        can_cache: CacheMode::Native, is_rotational: false,
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.writable && !self.is_block)
    }
    /// A regular file grows with ftruncate; a block device has the size
    /// it has.
    fn can_extend(&self) -> Result<bool> {
        Ok(self.writable && !self.is_block)
    }
    fn extend(&self, new_size: u64) -> Result<()> {
        if !self.writable || self.is_block {
            return Err(Error::not_supported(format!(
                "{}: cannot grow a {}",
                self.path.display(),
                if self.is_block {
                    "block device"
                } else {
                    "read-only file"
                }
            )));
        }
        if new_size > self.size()? {
            self.file
                .set_len(new_size)
                .map_err(|e| self.err("ftruncate", e))?;
        }
        Ok(())
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.writable {
            ZeroMode::Native
        } else {
            ZeroMode::None
        })
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(!self.is_block)
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => {}
            // The file shrank under us: what is past the end reads as zeroes.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let mut done = 0;
                while done < buf.len() {
                    match self.file.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => {
                            buf[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) => return Err(self.err("read", e)),
                    }
                }
            }
            Err(e) => return Err(self.err("read", e)),
        }
        self.evict(offset, buf.len(), false);
        Ok(())
    }

    /// Large reads go straight from the page cache to the socket: the
    /// pieces are the file's data and holes (holes go out as zero chunks).
    fn pread_direct(&self, offset: u64, count: u64) -> Result<Option<DirectRead<'_>>> {
        if self.cache == CachePolicy::None {
            // Each read must be followed by an eviction: keep to pread.
            return Ok(None);
        }
        let fd = self.file.as_fd();
        if self.is_block {
            let pieces = vec![DirectPiece::File { offset, len: count }];
            return Ok(Some(DirectRead { fd, pieces }));
        }
        let mut extents = Extents::new(offset, offset + count);
        if seek_extents(self.fd(), offset, count, 0, false, &mut extents).is_err() {
            // Let pread report whatever is wrong.
            return Ok(None);
        }
        let mut pieces = Vec::new();
        let mut pos = offset;
        for e in extents.list() {
            let lo = e.offset.max(pos);
            let hi = (e.offset + e.length).min(offset + count);
            if hi <= lo {
                continue;
            }
            pieces.push(if e.flags & EXTENT_HOLE != 0 {
                DirectPiece::Zero { len: hi - lo }
            } else {
                DirectPiece::File {
                    offset: lo,
                    len: hi - lo,
                }
            });
            pos = hi;
        }
        if pos != offset + count {
            return Ok(None);
        }
        Ok(Some(DirectRead { fd, pieces }))
    }

    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err("write", e))?;
        if fua {
            self.sync()?;
        }
        self.evict(offset, buf.len(), true);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.sync()
    }

    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        // Trim is advisory: where holes cannot be punched it does nothing.
        self.punch(offset, count)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let mut done = flags.may_trim && self.punch(offset, count)?;
        if !done && !self.is_block && self.can_zero_range.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                count,
            ) {
                Ok(()) => done = true,
                Err(e) if Self::is_unsupported(&e) => {
                    self.can_zero_range.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(self.err("zero range in", e)),
            }
        }
        if !done {
            // The server falls back to writing zeroes unless the client
            // asked for a fast zero.
            return Err(Error::new(
                ErrorKind::NotSupported,
                "no fast way to zero this file",
            ));
        }
        if flags.fua {
            self.sync()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        seek_extents(self.fd(), offset, count, 0, req_one, extents)
            .map_err(|(what, e)| self.err(what, e))
    }

    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        // SAFETY: advisory syscall on our own descriptor.
        let r = unsafe {
            libc::posix_fadvise(
                self.fd(),
                offset as i64,
                count as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r != 0 {
            return Err(self.err("fadvise", std::io::Error::from_raw_os_error(r)));
        }
        Ok(())
    }
}

/// Block status of `[offset, offset+count)` of the file `fd` from
/// SEEK_DATA/SEEK_HOLE, added to `extents` shifted by `shift` (where the
/// file starts on the disk).  Errors say which seek failed.
pub(crate) fn seek_extents(
    fd: i32,
    offset: u64,
    count: u64,
    shift: u64,
    req_one: bool,
    extents: &mut Extents,
) -> std::result::Result<(), (&'static str, std::io::Error)> {
    let add = |ex: &mut Extents, o: u64, l: u64, f: u32| {
        ex.add(o + shift, l, f)
            .map_err(|e| ("extents of", std::io::Error::other(e.to_string())))
    };
    let end = offset + count;
    let mut pos = offset;
    while pos < end {
        // SAFETY: lseek on a descriptor the caller owns.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data after pos: the rest is a hole.
                Some(libc::ENXIO) => add(extents, pos, end - pos, EXTENT_HOLE | EXTENT_ZERO),
                // File system without SEEK_DATA: all data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => add(extents, pos, end - pos, 0),
                _ => Err(("SEEK_DATA in", e)),
            };
        }
        let data = data as u64;
        if data > pos {
            add(extents, pos, data.min(end) - pos, EXTENT_HOLE | EXTENT_ZERO)?;
            pos = data.min(end);
            if req_one || pos >= end {
                return Ok(());
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(("SEEK_HOLE in", std::io::Error::last_os_error()));
        }
        let hole = (hole as u64).min(end);
        add(extents, pos, hole - pos, 0)?;
        pos = hole;
        if req_one {
            return Ok(());
        }
    }
    Ok(())
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let file = cfg.take("file");
    // nbdkit accepts both spellings; the last one given wins.
    let dir = match (cfg.take("dir"), cfg.take("directory")) {
        (d, None) => d,
        (_, d) => d,
    };
    if let Some(k) = ["rdelay", "wdelay"]
        .into_iter()
        .find(|k| cfg.take(k).is_some())
    {
        return Err(ConfigError::new(format!(
            "file: {k}= is not a file parameter: add --filter=delay on the command line"
        )));
    }
    let fd = cfg.take("fd");
    let dirfd = cfg.take("dirfd");
    let given: Vec<&str> = [
        ("file", file.is_some()),
        ("dir", dir.is_some()),
        ("fd", fd.is_some()),
        ("dirfd", dirfd.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if given.len() > 1 {
        return Err(ConfigError::new(format!(
            "file: give only one of file=, dir=, fd= or dirfd= (got {}=)",
            given.join("=, ")
        )));
    }
    let source = match (file, dir) {
        _ if fd.is_some() || dirfd.is_some() => {
            let (key, v, want_dir) = match (&fd, &dirfd) {
                (Some(v), _) => ("fd", v, false),
                (_, Some(v)) => ("dirfd", v, true),
                _ => unreachable!("one of fd= or dirfd= was given"),
            };
            let owned = inherited_fd(key, v, want_dir)?;
            if want_dir {
                Source::DirFd(owned)
            } else {
                Source::Fd(owned)
            }
        }
        (Some(_), Some(_)) => unreachable!("checked above"),
        (None, None) => {
            return Err(ConfigError::new(
                "file: the 'file' parameter is required (or dir=DIRECTORY, fd=N or dirfd=N), e.g. nbdkit-rs file disk.img",
            ))
        }
        (Some(f), None) => {
            let p = PathBuf::from(&f);
            let m = std::fs::metadata(&p).map_err(|e| ConfigError::new(format!("file: {f}: {e}")))?;
            if m.is_dir() {
                return Err(ConfigError::new(format!("file: {f} is a directory (use dir={f} to serve the files in it)")));
            }
            Source::File(absolute(p))
        }
        (None, Some(d)) => {
            let p = PathBuf::from(&d);
            let m = std::fs::metadata(&p).map_err(|e| ConfigError::new(format!("file: {d}: {e}")))?;
            if !m.is_dir() {
                return Err(ConfigError::new(format!("file: dir={d} is not a directory")));
            }
            Source::Dir(absolute(p))
        }
    };
    let cache = match cfg.take("cache").as_deref() {
        None | Some("default") => CachePolicy::Default,
        Some("none") => CachePolicy::None,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "file: cache={v}: expected default or none"
            )))
        }
    };
    let fadvise = match cfg.take("fadvise").as_deref() {
        None | Some("normal") => Fadvise::Normal,
        Some("random") => Fadvise::Random,
        Some("sequential") => Fadvise::Sequential,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "file: fadvise={v}: expected normal, random or sequential"
            )))
        }
    };
    Ok(Arc::new(FilePlugin {
        source,
        cache,
        fadvise,
    }))
}

/// `fd=N` / `dirfd=N`: take over descriptor N, inherited from the parent
/// process, after checking that it is open and is what the key needs (a
/// file or block device, or a directory).
fn inherited_fd(key: &str, v: &str, want_dir: bool) -> std::result::Result<OwnedFd, ConfigError> {
    let bad = |why: String| ConfigError::new(format!("file: {key}={v}: {why}"));
    let n: i32 = v
        .trim()
        .parse()
        .map_err(|_| bad("expected a file descriptor number".into()))?;
    if n <= 2 {
        return Err(bad(
            "must be greater than 2 (0, 1 and 2 are stdin, stdout and stderr)".into(),
        ));
    }
    // SAFETY: F_GETFD only reads the flags of descriptor n, if it is open.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(bad(format!(
            "not an open file descriptor ({}): was it inherited from the parent process?",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: n is open (checked above) and the command line hands it to
    // this plugin; nothing else in the server uses a descriptor it did not
    // open itself.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    // Keep it out of --run commands and scripts the server starts.
    // SAFETY: sets the close-on-exec flag of a descriptor we own.
    unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) };
    let ft = File::from(fd.try_clone().map_err(|e| bad(e.to_string()))?)
        .metadata()
        .map_err(|e| bad(e.to_string()))?
        .file_type();
    let servable = ft.is_file() || ft.is_block_device();
    if want_dir && !ft.is_dir() {
        return Err(bad("not a directory".into()));
    }
    if !want_dir && !servable {
        return Err(bad(if ft.is_dir() {
            "is a directory (use dirfd= to serve the files in it)".into()
        } else {
            "not a regular file or block device".into()
        }));
    }
    Ok(fd)
}

/// The O_ACCMODE part of a descriptor's status flags.
fn fd_access_mode(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: F_GETFL only reads the flags of an open descriptor we own.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    (r >= 0).then_some(r & libc::O_ACCMODE)
}

/// The server may change directory when it forks to the background, so
/// paths are made absolute at configuration time.
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "file",
    summary: "serve a local file or block device, or each file of a directory",
    description: "Reads and writes go straight to the file; trim and zero punch holes; block\n\
                  status comes from SEEK_DATA/SEEK_HOLE; FUA and flush call fdatasync.\n\n\
                  Examples:\n  nbdkit-rs file disk.img\n  nbdkit-rs -r file file=/dev/sdb\n  nbdkit-rs file dir=/var/images     (one export per file)\n  nbdkit-rs file fd=3 3<>disk.img    (an inherited descriptor)",
    magic_config_key: Some("file"),
    params: &[
        Param { name: "file", help: "the file or block device to serve" },
        Param { name: "dir", help: "serve every file in this directory as its own export" },
        Param { name: "directory", help: "the same as dir=" },
        Param { name: "fd", help: "serve the file or block device open on this inherited descriptor (> 2)" },
        Param { name: "dirfd", help: "as dir=, for a directory open on this inherited descriptor (> 2)" },
        Param { name: "rdelay", help: "not a file parameter: use --filter=delay" },
        Param { name: "wdelay", help: "not a file parameter: use --filter=delay" },
        Param { name: "cache", help: "default, or none to keep the page cache small (evicts after each request)" },
        Param { name: "fadvise", help: "normal, random or sequential access hint" },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::is_zero;

    fn handle(path: &Path) -> FileHandle {
        FileHandle::open(path, false, CachePolicy::Default).unwrap()
    }

    #[test]
    fn zero_punches_and_extents_see_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::write(&p, vec![0xaau8; 4 << 20]).unwrap();
        let h = handle(&p);
        h.zero(
            1 << 20,
            1 << 20,
            ZeroFlags {
                may_trim: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut buf = vec![1u8; 1 << 20];
        h.pread(&mut buf, 1 << 20).unwrap();
        assert!(is_zero(&buf));
        let mut ex = Extents::new(0, 4 << 20);
        h.extents(0, 4 << 20, false, &mut ex).unwrap();
        // tmpfs and ext4 both report the punched range as a hole.
        assert!(ex
            .list()
            .iter()
            .any(|e| e.flags == EXTENT_HOLE | EXTENT_ZERO && e.offset == 1 << 20));
        h.pread(&mut buf[..4], 0).unwrap();
        assert_eq!(&buf[..4], &[0xaa; 4]);
    }

    #[test]
    fn a_writable_file_grows_and_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::write(&p, b"hello").unwrap();
        let h = handle(&p);
        assert!(h.can_extend().unwrap());
        h.extend(8192).unwrap();
        assert_eq!(h.size().unwrap(), 8192);
        h.extend(100).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        let mut b = [1u8; 8];
        h.pread(&mut b, 8184).unwrap();
        assert_eq!(b, [0; 8]);
        let ro = FileHandle::open(&p, true, CachePolicy::Default).unwrap();
        assert!(!ro.can_extend().unwrap());
        assert!(ro.extend(1 << 20).is_err());
    }

    #[test]
    fn read_only_file_is_served_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::write(&p, b"hello").unwrap();
        let h = FileHandle::open(&p, true, CachePolicy::None).unwrap();
        assert!(!h.can_write().unwrap());
        let mut b = [0u8; 5];
        h.pread(&mut b, 0).unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn dir_rejects_escaping_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), b"x").unwrap();
        let mut cfg = Config::new(vec![("dir".into(), dir.path().display().to_string())]);
        let b = create(&mut cfg).unwrap();
        let list = b.list_exports(false).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "a.img");
        assert!(b.open(false, "../etc").is_err());
        assert!(b.open(false, "").is_err());
        assert!(b.open(false, "a.img").is_ok());
    }
}
