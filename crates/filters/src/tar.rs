//! `tar`: serve one file from inside a tar archive without unpacking it.
//! Disk images often travel as tarballs (an OVA is a tar of VMDKs); this
//! filter finds the entry's data in the archive that the next backend
//! serves, and then acts as a byte-range window onto it, so reads, writes
//! (when the archive is writable) and block status go straight to the
//! entry's bytes.  Over the `xz`/`gzip`/`zstd` filters it serves a file
//! from a compressed tarball with random access.
//!
//! The headers are parsed with the `tar` crate (ustar prefixes, GNU long
//! names, pax headers, pax `size` overrides), reading the archive through
//! [`ArchiveReader`], a `Read + Seek` adapter over `pread` that skips the
//! data of the entries passed over instead of reading it.  Only regular
//! files can be served; GNU sparse entries are refused, since their data is
//! not one contiguous range of the archive.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, ConfigError, Error, FilterSpec, Handle, Param, Result};

use crate::window::Window;

/// Where an entry's data lies in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryData {
    pub offset: u64,
    pub size: u64,
}

/// Why an entry could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindError {
    /// The archive ended without it; `seen` holds the first few names.
    NotFound { seen: Vec<String>, more: bool },
    /// The search reached `tar-limit` bytes without finding it.
    LimitReached,
    /// It is there but is not a plain regular file.
    NotRegular(String),
    /// The archive is corrupt or truncated (or could not be read).
    Corrupt { at: u64, why: String },
}

/// How many entry names a "not found" message lists.
const NAMES_SHOWN: usize = 5;

/// Find the first entry named exactly `name` in the tar archive `r` of
/// `size` bytes.  The data of the entries passed over is skipped with
/// `seek`, so only headers are read.
pub fn find_entry<R: Read + Seek>(
    r: &mut R,
    size: u64,
    name: &[u8],
) -> std::result::Result<EntryData, FindError> {
    let mut ar = ::tar::Archive::new(r);
    let mut seen = Vec::new();
    let mut more = false;
    // Where the next header should start, for messages.
    let mut next_header = 0u64;
    let corrupt = |at: u64, e: std::io::Error| FindError::Corrupt {
        at,
        why: e.to_string(),
    };
    let entries = ar.entries_with_seek().map_err(|e| corrupt(0, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(next_header, e))?;
        let data = entry.raw_file_position();
        let len = entry.size();
        next_header = len
            .checked_add(511)
            .and_then(|n| data.checked_add(n & !511))
            .ok_or_else(|| FindError::Corrupt {
                at: entry.raw_header_position(),
                why: format!("entry size {len} is too large"),
            })?;
        // GNU tar's pax sparse format (1.0) stores the real name in the
        // `GNU.sparse.name` record, and a made-up one in the header.
        let header_at = entry.raw_header_position();
        let mut pax_sparse = false;
        let mut sparse_name = None;
        if let Some(exts) = entry.pax_extensions().map_err(|e| corrupt(header_at, e))? {
            for x in exts {
                let x = x.map_err(|e| corrupt(header_at, e))?;
                if x.key_bytes().starts_with(b"GNU.sparse.") {
                    pax_sparse = true;
                    if x.key_bytes() == b"GNU.sparse.name" {
                        sparse_name = Some(x.value_bytes().to_vec());
                    }
                }
            }
        }
        let path = sparse_name.unwrap_or_else(|| entry.path_bytes().into_owned());
        if path != name {
            if seen.len() < NAMES_SHOWN {
                seen.push(String::from_utf8_lossy(&path).into_owned());
            } else {
                more = true;
            }
            continue;
        }
        let shown = String::from_utf8_lossy(&path).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_gnu_sparse() {
            return Err(FindError::NotRegular(format!(
                "'{shown}' is a GNU sparse file, whose data is not stored contiguously \
                 (re-create the archive without --sparse)"
            )));
        }
        if pax_sparse {
            return Err(FindError::NotRegular(format!(
                "'{shown}' is a sparse file (pax GNU.sparse format), whose data is not stored \
                 contiguously (re-create the archive without --sparse)"
            )));
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            let what = if kind.is_dir() {
                "a directory"
            } else if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_hard_link() {
                "a hard link"
            } else {
                "not a regular file"
            };
            return Err(FindError::NotRegular(format!(
                "'{shown}' is {what}; only regular files can be served"
            )));
        }
        if data.checked_add(len).is_none_or(|end| end > size) {
            return Err(FindError::Corrupt {
                at: entry.raw_header_position(),
                why: format!(
                    "'{shown}' says it holds {len} bytes at offset {data}, past the end of the \
                     archive ({size} bytes): the archive is truncated"
                ),
            });
        }
        return Ok(EntryData {
            offset: data,
            size: len,
        });
    }
    if next_header > size {
        // The parser saw end-of-file where the last entry's data should
        // be: it was cut short, not ended.
        return Err(FindError::Corrupt {
            at: size,
            why: format!(
                "the archive ends at {size} bytes but its last entry runs to {next_header}: \
                 the archive is truncated"
            ),
        });
    }
    Err(FindError::NotFound { seen, more })
}

/// How much an [`ArchiveReader`] reads from the backend at once: headers
/// are 512 bytes, and runs of small entries are common.
const CHUNK: u64 = 64 * 1024;

/// The most header bytes (headers, long names, pax records: everything the
/// parser reads rather than skips) one search may read.  The `tar` crate
/// holds a whole long-name or pax entry in memory, so a corrupt header
/// claiming one of many gigabytes would otherwise be read in full.  64 MiB
/// is 131072 plain headers.
pub const HEADER_BUDGET: u64 = 64 << 20;

/// The next handle as a `Read + Seek` stream, for the `tar` crate.  Reads
/// stop (as at end of file) at `end`, which is the archive's size or the
/// `tar-limit`, whichever is smaller; `hit_limit` records that the parser
/// wanted bytes beyond a limit that is short of the real end.  A backend
/// error is kept whole in `error` (the `io::Error` passed to the parser
/// only carries its text).
pub struct ArchiveReader<'a> {
    h: &'a dyn Handle,
    size: u64,
    end: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
    pub hit_limit: bool,
    pub error: Option<Error>,
    /// Bytes the parser may still read (see [`HEADER_BUDGET`]).
    pub budget: u64,
    pub over_budget: bool,
}

impl<'a> ArchiveReader<'a> {
    pub fn new(h: &'a dyn Handle, size: u64, limit: Option<u64>) -> Self {
        ArchiveReader {
            h,
            size,
            end: limit.map_or(size, |l| l.min(size)),
            pos: 0,
            buf: Vec::new(),
            buf_at: 0,
            hit_limit: false,
            error: None,
            budget: HEADER_BUDGET,
            over_budget: false,
        }
    }
}

impl Read for ArchiveReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.end {
            if self.end < self.size {
                self.hit_limit = true;
            }
            return Ok(0);
        }
        let cached = self.pos >= self.buf_at && self.pos < self.buf_at + self.buf.len() as u64;
        if !cached {
            let n = CHUNK.min(self.end - self.pos) as usize;
            self.buf.resize(n, 0);
            if let Err(e) = self.h.pread(&mut self.buf, self.pos) {
                self.buf.clear();
                let msg = e.to_string();
                self.error = Some(e);
                return Err(std::io::Error::other(msg));
            }
            self.buf_at = self.pos;
        }
        let from = (self.pos - self.buf_at) as usize;
        let n = out.len().min(self.buf.len() - from);
        if n as u64 > self.budget {
            self.over_budget = true;
            return Err(std::io::Error::other("too many header bytes"));
        }
        self.budget -= n as u64;
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ArchiveReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        Ok(self.pos)
    }
}

struct TarBackend {
    next: Arc<dyn Backend>,
    entry: String,
    limit: Option<u64>,
}

impl TarBackend {
    fn locate(&self, next: &dyn Handle) -> Result<EntryData> {
        let size = next.size()?;
        let archive = next
            .source_name()
            .map_or_else(|| "the tar archive".to_string(), |n| format!("archive {n}"));
        let mut reader = ArchiveReader::new(next, size, self.limit);
        let found = find_entry(&mut reader, size, self.entry.as_bytes());
        let entry = &self.entry;
        if found.is_err() {
            if let Some(e) = reader.error {
                // The backend failed: its error (and kind) is what matters.
                return Err(Error::new(
                    e.kind(),
                    format!("tar filter: reading {archive} while looking for '{entry}': {e}"),
                ));
            }
        }
        if reader.over_budget {
            return Err(Error::invalid(format!(
                "tar filter: read {} MiB of headers in {archive} without finding '{entry}': \
                 an entry claims a huge long name or pax header (a corrupt archive?), or there \
                 are too many entries before it",
                HEADER_BUDGET >> 20
            )));
        }
        // A search cut short by tar-limit looks like the end of the
        // archive, or like a header cut in the middle.
        let found = match found {
            Err(FindError::NotFound { .. } | FindError::Corrupt { .. }) if reader.hit_limit => {
                Err(FindError::LimitReached)
            }
            other => other,
        };
        found.map_err(|e| match e {
            FindError::NotFound { seen, more } => {
                let names = if seen.is_empty() {
                    "it has no entries".to_string()
                } else {
                    format!(
                        "entries: {}{}",
                        seen.join(", "),
                        if more { ", …" } else { "" }
                    )
                };
                Error::invalid(format!(
                    "tar filter: no entry '{entry}' in {archive} ({names})"
                ))
            }
            FindError::LimitReached => Error::invalid(format!(
                "tar filter: entry '{entry}' was not found in the first {} bytes of {archive} \
                 (tar-limit); raise tar-limit= to search further",
                self.limit.unwrap_or(0)
            )),
            FindError::NotRegular(why) => {
                Error::invalid(format!("tar filter: in {archive}, {why}"))
            }
            FindError::Corrupt { at, why } => Error::invalid(format!(
                "tar filter: {archive} is not a valid tar archive \
                 (looking for '{entry}', at offset {at}): {why}"
            )),
        })
    }
}

impl Backend for TarBackend {
    fn name(&self) -> &str {
        "tar"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        // Looked up per connection, like a partition table: the archive may
        // differ between exports.
        let found = self.locate(&*next)?;
        tracing::debug!(
            "tar: '{}' is at offset {} for {} bytes",
            self.entry,
            found.offset,
            found.size
        );
        Ok(Box::new(Window {
            next,
            start: found.offset,
            len: found.size,
        }))
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "tar",
    summary: "serve one file from inside a tar archive, without unpacking it",
    description: "Finds tar-entry= in the tar archive the plugin serves (ustar, GNU and pax\n\
formats; long names; the first entry of that name) and serves its bytes.\n\
Writes change the entry's bytes in the archive in place (use -r to be sure\n\
the archive is not modified); the size cannot change.  Only regular files\n\
can be served: directories, links and GNU sparse entries are refused.\n\
For a compressed tarball, put the decompressing filter after this one.\n\n\
Example:\n  nbdkit-rs --filter=tar file vm.ova tar-entry=disk1.vmdk\n  \
nbdkit-rs --filter=tar --filter=xz file disk.tar.xz tar-entry=disk.img",
    params: &[
        Param {
            name: "tar-entry",
            help: "the name of the file inside the archive, exactly as `tar tf` lists it (required)",
        },
        Param {
            name: "tar-limit",
            help: "read at most this many bytes of the archive while looking for the entry (default 0: no limit)",
        },
        Param {
            name: "tar",
            help: "accepted for nbdkit compatibility and ignored: no external tar program is run",
        },
    ],
    configure: |cfg| {
        let entries = cfg.take_all("tar-entry");
        let entry = match entries.as_slice() {
            [] => {
                return Err(ConfigError::new(
                    "tar filter: the 'tar-entry' parameter is required",
                ))
            }
            [one] if !one.is_empty() => one.clone(),
            [_] => return Err(ConfigError::new("tar filter: tar-entry= is empty")),
            _ => {
                return Err(ConfigError::new(
                    "tar filter: only one tar-entry parameter can be given",
                ))
            }
        };
        let limit = cfg
            .take_size("tar-limit")
            .map_err(|e| ConfigError::new(format!("tar filter: {e}")))?
            .filter(|&l| l > 0);
        if let Some(program) = cfg.take("tar") {
            tracing::debug!("tar filter: tar={program} ignored: headers are parsed in-process");
        }
        Ok(layer_fn(move |next| {
            Ok(Arc::new(TarBackend {
                next,
                entry,
                limit,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An archive built with the `tar` crate's writer (the integration
    /// tests use archives made by GNU tar).
    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn find(bytes: &[u8], name: &str) -> std::result::Result<EntryData, FindError> {
        find_entry(&mut Cursor::new(bytes), bytes.len() as u64, name.as_bytes())
    }

    #[test]
    fn finds_entries_and_long_names() {
        let long = format!("{}/disk.img", "d".repeat(150));
        let a = archive(&[("a.txt", b"hello"), (&long, &[7u8; 1000]), ("b", b"")]);
        let e = find(&a, &long).unwrap();
        assert_eq!(e.size, 1000);
        assert_eq!(&a[e.offset as usize..][..1000], &[7u8; 1000][..]);
        let e = find(&a, "a.txt").unwrap();
        assert_eq!(&a[e.offset as usize..][..5], b"hello");
        assert_eq!(find(&a, "b").unwrap().size, 0);
        match find(&a, "nope") {
            Err(FindError::NotFound { seen, more }) => {
                assert_eq!(seen.len(), 3);
                assert!(!more);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupt_truncated_and_limited_archives_are_errors() {
        let mut a = archive(&[("a", &[1u8; 600]), ("disk.img", &[2u8; 100])]);
        let good = a.clone();
        // "a": header at 0, data 512..1112 padded to 1536; then disk.img.
        a[1536 + 10] ^= 0x55;
        assert!(matches!(
            find(&a, "disk.img"),
            Err(FindError::Corrupt { at: 1536, .. })
        ));
        assert_eq!(find(&good, "disk.img").unwrap().offset, 2048);
        // Cut inside the entry's data.
        let cut = &good[..2048 + 50];
        assert!(matches!(
            find(cut, "disk.img"),
            Err(FindError::Corrupt { .. })
        ));
        // Garbage is not an archive.
        assert!(find(&[0xa5; 3000], "x").is_err());
        assert!(matches!(find(&[], "x"), Err(FindError::NotFound { .. })));
    }

    /// A disk in memory, for the adapter.
    struct Bytes(Vec<u8>);
    impl Handle for Bytes {
        fn size(&self) -> Result<u64> {
            Ok(self.0.len() as u64)
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn the_adapter_skips_data_and_bounds_what_it_reads() {
        let long = "x".repeat(5000);
        let a = archive(&[
            ("big", &vec![1u8; 300_000]),
            (&long, b"abc"),
            ("disk.img", b"d"),
        ]);
        let disk = Bytes(a.clone());
        let size = a.len() as u64;
        let mut r = ArchiveReader::new(&disk, size, None);
        assert_eq!(find_entry(&mut r, size, b"disk.img").unwrap().size, 1);
        // The 300 KB of data was skipped: headers and the long name only.
        assert!(
            HEADER_BUDGET - r.budget < 10_000,
            "{}",
            HEADER_BUDGET - r.budget
        );
        // A small budget stops at the long name.
        let mut r = ArchiveReader::new(&disk, size, None);
        r.budget = 2048;
        assert!(find_entry(&mut r, size, b"disk.img").is_err());
        assert!(r.over_budget);
        // A limit short of the entry.
        let mut r = ArchiveReader::new(&disk, size, Some(4096));
        assert!(find_entry(&mut r, size, b"disk.img").is_err());
        assert!(r.hit_limit);
        // Cut inside the first entry's data: truncated, not "not found".
        let cut = &a[..100_000];
        assert!(matches!(
            find(cut, "disk.img"),
            Err(FindError::Corrupt { .. })
        ));
    }

    /// The fuzz seeds are archives made by GNU tar in each format: the
    /// plain ones must give disk.img, the sparse ones a refusal.
    #[test]
    fn gnu_tar_seeds_from_the_fuzz_corpus() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/tar_entry");
        let mut checked = 0;
        for f in std::fs::read_dir(dir).unwrap() {
            let path = f.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            match find(&bytes, "disk.img") {
                Err(FindError::NotRegular(why)) if name.contains("sparse") => {
                    assert!(why.contains("sparse"), "{name}: {why}")
                }
                Ok(e) if !name.contains("sparse") => {
                    assert_eq!(e.size, 3000, "{name}");
                    checked += 1;
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(checked >= 6, "{checked}");
    }

    fn corpus() -> Vec<Vec<u8>> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/tar_entry");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|f| f.unwrap().path())
            .collect();
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Recompute a header block's checksum, so that damage gets past the
    /// first check and into the parsing behind it.
    fn fix_checksum(block: &mut [u8]) {
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| b as u32).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    proptest::proptest! {
        /// GNU tar archives with bytes changed (checksums fixed up) and cut
        /// short: the lookup returns an answer, never panics, and what it
        /// finds lies inside the archive.
        #[test]
        fn damaged_archives_never_panic(
            which in 0..8usize,
            flips in proptest::collection::vec((0..10240usize, 1..=255u8), 0..12),
            cut in 0..10241usize,
            limit in proptest::option::of(0..12000u64),
        ) {
            let seeds = corpus();
            let mut a = seeds[which % seeds.len()].clone();
            for (i, x) in flips {
                let i = i % a.len();
                a[i] ^= x;
                let block = i / 512 * 512;
                fix_checksum(&mut a[block..block + 512]);
            }
            a.truncate(cut);
            let size = a.len() as u64;
            let disk = Bytes(a);
            for name in [&b"disk.img"[..], b"a.txt"] {
                let mut r = ArchiveReader::new(&disk, size, limit);
                if let Ok(e) = find_entry(&mut r, size, name) {
                    proptest::prop_assert!(e.offset + e.size <= size);
                }
            }
        }
    }

    #[test]
    fn directories_are_not_served() {
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_gnu();
        h.set_entry_type(::tar::EntryType::Directory);
        h.set_size(0);
        b.append_data(&mut h, "dir/", std::io::empty()).unwrap();
        let a = b.into_inner().unwrap();
        match find(&a, "dir/") {
            Err(FindError::NotRegular(why)) => assert!(why.contains("directory"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
