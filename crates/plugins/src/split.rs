//! `split`: several files served as one disk, concatenated in order.
//!
//! Why: disk images are sometimes stored in pieces (split for file-size
//! limits or media, or a set of raw partitions made separately), and
//! nbdkit's split plugin serves them without joining them first.  Reads
//! and writes that cross a file boundary are split between the files;
//! block status comes from each file's SEEK_DATA/SEEK_HOLE.  The files must
//! not change size while served.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use nbdkit_backend::{
    Backend, CacheMode, ConfigError, Error, Extents, Handle, Param, PluginSpec, Result,
};

struct Piece {
    path: PathBuf,
    file: File,
    /// Where the file starts on the disk.
    start: u64,
    len: u64,
}

struct Split {
    pieces: Arc<Vec<Piece>>,
    writable: bool,
}

impl Backend for Split {
    fn name(&self) -> &str {
        "split"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(SplitHandle {
            pieces: self.pieces.clone(),
            writable: self.writable,
        }))
    }
}

struct SplitHandle {
    pieces: Arc<Vec<Piece>>,
    writable: bool,
}

impl SplitHandle {
    /// The pieces covering `[offset, offset+len)`, as (piece, offset in
    /// the file, offset in the request, length).
    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Piece, u64, usize, usize)> {
        let end = offset + len;
        let first = self.pieces.partition_point(|p| p.start + p.len <= offset);
        self.pieces[first..]
            .iter()
            .take_while(move |p| p.start < end)
            .filter(|p| p.len > 0)
            .map(move |p| {
                let from = offset.max(p.start);
                let to = end.min(p.start + p.len);
                (
                    p,
                    from - p.start,
                    (from - offset) as usize,
                    (to - from) as usize,
                )
            })
    }

    fn sync(&self) -> Result<()> {
        for p in self.pieces.iter() {
            p.file
                .sync_data()
                .map_err(|e| Error::from_io(format_args!("fdatasync {}", p.path.display()), e))?;
        }
        Ok(())
    }
}

impl Handle for SplitHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.pieces.last().map_or(0, |p| p.start + p.len))
    }
    fn source_name(&self) -> Option<String> {
        self.pieces.first().map(|p| p.path.display().to_string())
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.writable)
    }
    nbdkit_backend::capabilities! {
        can_extents: true,
        // Every connection uses the same files (one page cache) and a
        // flush syncs all of them.
        can_multi_conn: true,
        can_cache: CacheMode::Emulate,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (p, at, i, n) in self.spans(offset, buf.len() as u64) {
            p.file
                .read_exact_at(&mut buf[i..i + n], at)
                .map_err(|e| Error::from_io(format_args!("pread {}", p.path.display()), e))?;
        }
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("split: the files are open read-only"));
        }
        for (p, at, i, n) in self.spans(offset, buf.len() as u64) {
            p.file
                .write_all_at(&buf[i..i + n], at)
                .map_err(|e| Error::from_io(format_args!("pwrite {}", p.path.display()), e))?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.sync()
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        for (p, at, _, n) in self.spans(offset, count) {
            crate::file::seek_extents(p.file.as_raw_fd(), at, n as u64, p.start, req_one, extents)
                .map_err(|(what, e)| {
                    Error::from_io(format_args!("{what} {}", p.path.display()), e)
                })?;
            if req_one {
                break;
            }
        }
        Ok(())
    }
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "split",
    summary: "several files concatenated into one disk",
    description: "file= may be repeated; the files are joined in the order given.  Writable \
                  unless -r (or a file cannot be opened for writing); block status comes from \
                  each file's holes.\n\n\
                  Example:\n  nbdkit-rs split file=disk.part1 file=disk.part2 file=disk.part3",
    magic_config_key: Some("file"),
    params: &[Param {
        name: "file",
        help: "a file to serve; repeat for each piece, in order (the magic key)",
    }],
    create: |cfg| {
        let files = cfg.take_all("file");
        if files.is_empty() {
            return Err(ConfigError::new(
                "split: at least one file= is required, e.g. split file=a.img file=b.img",
            ));
        }
        let mut pieces = Vec::new();
        let mut writable = true;
        let mut start = 0u64;
        for f in files {
            let path = std::fs::canonicalize(&f)
                .map_err(|e| ConfigError::new(format!("split: file={f}: {e}")))?;
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => file,
                Err(_) => {
                    writable = false;
                    File::open(&path)
                        .map_err(|e| ConfigError::new(format!("split: file={f}: {e}")))?
                }
            };
            let meta = file
                .metadata()
                .map_err(|e| ConfigError::new(format!("split: file={f}: {e}")))?;
            if !meta.is_file() {
                return Err(ConfigError::new(format!(
                    "split: file={f}: not a regular file (the split plugin serves only files)"
                )));
            }
            let len = meta.len();
            pieces.push(Piece {
                path,
                file,
                start,
                len,
            });
            start = start
                .checked_add(len)
                .filter(|&s| s <= i64::MAX as u64)
                .ok_or_else(|| ConfigError::new("split: the files are too large together"))?;
        }
        if !writable {
            tracing::info!("split: a file cannot be opened for writing; serving read-only");
        }
        Ok(Arc::new(Split {
            pieces: Arc::new(pieces),
            writable,
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    #[test]
    fn reads_and_writes_cross_file_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b", "c", "d"];
        let sizes = [10usize, 0, 7, 20];
        let mut all = Vec::new();
        for (i, (n, s)) in names.iter().zip(sizes).enumerate() {
            let d: Vec<u8> = (0..s).map(|j| (i * 50 + j) as u8).collect();
            std::fs::write(dir.path().join(n), &d).unwrap();
            all.extend(d);
        }
        let mut cfg = Config::new(
            names
                .iter()
                .map(|n| ("file".into(), dir.path().join(n).display().to_string()))
                .collect(),
        );
        let b = (SPEC.create)(&mut cfg).unwrap();
        let h = b.open(false, "").unwrap();
        assert_eq!(h.size().unwrap(), 37);
        let mut buf = vec![0u8; 37];
        h.pread(&mut buf, 0).unwrap();
        assert_eq!(buf, all);
        let mut part = vec![0u8; 12];
        h.pread(&mut part, 5).unwrap();
        assert_eq!(part, all[5..17]);
        h.pwrite(&[0xee; 9], 8, false).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap()[8..], [0xee; 2]);
        assert_eq!(std::fs::read(dir.path().join("c")).unwrap(), [0xee; 7]);
        let mut ex = Extents::new(0, 37);
        h.extents(0, 37, false, &mut ex).unwrap();
        assert_eq!(ex.list().iter().map(|e| e.length).sum::<u64>(), 37);
    }
}
