//! The qcow2 header, its extensions and the snapshot table: the parsers of
//! untrusted bytes, kept free of I/O so they can be fuzzed and tested
//! directly.  Field layout from qemu's docs/interop/qcow2.txt.

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits this reader understands.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

/// qemu's limits, which also bound what a hostile header can make us do.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: u32 = 1023;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// What the header says, checked for internal consistency (not yet
/// against the file's size).
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub dirty: bool,
    pub corrupt: bool,
    pub extended_l2: bool,
    pub compression: Compression,
    /// Where the refcount table is, and its length in clusters (for
    /// writing; reading needs no refcounts).
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// Refcounts are `1 << refcount_order` bits wide (4, i.e. 16 bits, in
    /// version 2).
    pub refcount_order: u32,
    /// Autoclear feature bits (version 3): a writer that does not keep
    /// what they stand for (bitmaps, a raw external data file) clears them.
    pub autoclear_features: u64,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// L2 entries per table (16 bytes each with extended L2, else 8).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Why a header was refused: corrupt (it contradicts itself or the
/// format) or unsupported (valid, but a feature this reader lacks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Corrupt { offset: u64, reason: String },
    Unsupported(String),
}

fn corrupt(offset: u64, reason: impl Into<String>) -> HeaderError {
    HeaderError::Corrupt {
        offset,
        reason: reason.into(),
    }
}

/// Parse the header from the image's first cluster (or as much of the
/// file as there is, up to 2 MiB).
pub fn parse(first: &[u8]) -> Result<Header, HeaderError> {
    if first.len() < 72 {
        return Err(corrupt(0, "shorter than a qcow2 header"));
    }
    if be32(first, 0) != MAGIC {
        return Err(corrupt(0, "no qcow2 magic"));
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Unsupported(format!("version {version}")));
    }
    let backing_file_offset = be64(first, 8);
    let backing_file_size = be32(first, 16);
    let cluster_bits = be32(first, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(
            20,
            format!("cluster_bits {cluster_bits} (512 B to 2 MiB clusters)"),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(first, 24);
    if size > i64::MAX as u64 {
        return Err(corrupt(24, format!("virtual size {size}")));
    }
    let crypt_method = be32(first, 32);
    if crypt_method != 0 {
        return Err(HeaderError::Unsupported(format!(
            "encryption (crypt_method {crypt_method}): decrypt it first, e.g. with qemu-img convert"
        )));
    }
    let l1_size = be32(first, 36);
    let l1_table_offset = be64(first, 40);
    let nb_snapshots = be32(first, 60);
    let snapshots_offset = be64(first, 64);

    let (incompat, header_length, compression_byte, refcount_order, autoclear) = if version == 3 {
        if first.len() < 104 {
            return Err(corrupt(0, "shorter than a version 3 header"));
        }
        let header_length = be32(first, 100);
        if header_length < 104 || u64::from(header_length) > cluster_size.min(first.len() as u64) {
            return Err(corrupt(100, format!("header_length {header_length}")));
        }
        let refcount_order = be32(first, 96);
        if refcount_order > 6 {
            return Err(corrupt(96, format!("refcount_order {refcount_order}")));
        }
        let compression = if header_length >= 105 { first[104] } else { 0 };
        (
            be64(first, 72),
            header_length as usize,
            compression,
            refcount_order,
            be64(first, 88),
        )
    } else {
        (0, 72, 0, 4, 0)
    };
    let known = INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2;
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(HeaderError::Unsupported(
            "an external data file (data-file=): serve the data file itself, or convert the image"
                .into(),
        ));
    }
    let compression = match (incompat & INCOMPAT_COMPRESSION != 0, compression_byte) {
        (false, 0) | (true, 0) => Compression::Zlib,
        (true, 1) => Compression::Zstd,
        (false, t) => {
            return Err(corrupt(
                104,
                format!("compression type {t} without its incompatible feature bit"),
            ))
        }
        (true, t) => return Err(HeaderError::Unsupported(format!("compression type {t}"))),
    };
    let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(corrupt(
            20,
            "extended L2 entries need clusters of at least 16 KiB",
        ));
    }

    // Header extensions: type, length, data padded to 8 bytes; within the
    // first cluster.
    let limit = (cluster_size as usize).min(first.len());
    let mut backing_format = None;
    let mut feature_names = Vec::new();
    // Version 2 images may carry extensions too (qemu writes the backing
    // format one); there a malformed list just ends the list.
    let strict = version == 3;
    let mut at = header_length;
    loop {
        if at + 8 > limit {
            if strict {
                return Err(corrupt(
                    at as u64,
                    "header extensions run past the first cluster",
                ));
            }
            break;
        }
        let ty = be32(first, at);
        let len = be32(first, at + 4) as usize;
        let data = at + 8;
        if len > limit - data {
            if strict {
                return Err(corrupt(
                    at as u64,
                    format!("header extension of {len} bytes"),
                ));
            }
            break;
        }
        match ty {
            EXT_END => break,
            EXT_BACKING_FORMAT => {
                backing_format =
                    Some(String::from_utf8_lossy(&first[data..data + len]).into_owned())
            }
            EXT_FEATURE_NAMES => {
                for e in first[data..data + len].chunks_exact(48) {
                    let name = &e[2..];
                    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    feature_names.push((
                        e[0],
                        e[1],
                        String::from_utf8_lossy(&name[..end]).into_owned(),
                    ));
                }
            }
            _ => {}
        }
        at = data + len.next_multiple_of(8);
    }
    let unknown = incompat & !known;
    if unknown != 0 {
        let names: Vec<String> = (0..64)
            .filter(|b| unknown & (1 << b) != 0)
            .map(|b| {
                feature_names
                    .iter()
                    .find(|(t, bit, _)| *t == 0 && u64::from(*bit) == b)
                    .map_or(format!("bit {b}"), |(_, _, n)| format!("'{n}' (bit {b})"))
            })
            .collect();
        return Err(HeaderError::Unsupported(format!(
            "incompatible feature {}",
            names.join(", ")
        )));
    }

    let backing_file = if backing_file_offset != 0 {
        if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
            return Err(corrupt(
                16,
                format!("backing file name of {backing_file_size} bytes"),
            ));
        }
        let start = backing_file_offset;
        let end = start + u64::from(backing_file_size);
        if end > limit as u64 {
            return Err(corrupt(
                8,
                "the backing file name lies outside the first cluster",
            ));
        }
        Some(String::from_utf8_lossy(&first[start as usize..end as usize]).into_owned())
    } else {
        None
    };

    if u64::from(l1_size) * 8 > MAX_L1_BYTES {
        return Err(corrupt(36, format!("L1 table of {l1_size} entries")));
    }
    if l1_size > 0 && l1_table_offset % cluster_size != 0 {
        return Err(corrupt(
            40,
            format!("L1 table offset {l1_table_offset:#x} is not cluster-aligned"),
        ));
    }
    let header = Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        nb_snapshots,
        snapshots_offset,
        backing_file,
        backing_format,
        dirty: incompat & INCOMPAT_DIRTY != 0,
        corrupt: incompat & INCOMPAT_CORRUPT != 0,
        extended_l2,
        compression,
        refcount_table_offset: be64(first, 48),
        refcount_table_clusters: be32(first, 56),
        refcount_order,
        autoclear_features: autoclear,
    };
    check_l1_covers(&header, l1_size, size, 36)?;
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(corrupt(60, format!("{nb_snapshots} snapshots")));
    }
    Ok(header)
}

/// The L1 table must map every cluster of the virtual size.
pub fn check_l1_covers(h: &Header, l1_size: u32, size: u64, at: u64) -> Result<(), HeaderError> {
    let per_l1 = h.l2_entries() * h.cluster_size();
    let needed = size.div_ceil(per_l1);
    if u64::from(l1_size) < needed {
        return Err(corrupt(
            at,
            format!("an L1 table of {l1_size} entries cannot map a virtual size of {size} bytes"),
        ));
    }
    Ok(())
}

/// One internal snapshot's table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    /// The guest disk size when the snapshot was taken, if recorded.
    pub disk_size: Option<u64>,
}

/// Parse `count` snapshot table entries from `table` (which starts at the
/// table's offset `base` in the file, for messages).
pub fn parse_snapshots(table: &[u8], count: u32, base: u64) -> Result<Vec<Snapshot>, HeaderError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        if table.len() < at + 40 {
            return Err(corrupt(
                base + at as u64,
                format!("snapshot {i} runs past the table"),
            ));
        }
        let l1_table_offset = be64(table, at);
        let l1_size = be32(table, at + 8);
        let id_len = usize::from(be16(table, at + 12));
        let name_len = usize::from(be16(table, at + 14));
        let extra_len = be32(table, at + 36) as usize;
        let extra = at + 40;
        let id_at = extra.checked_add(extra_len);
        let end = id_at.and_then(|i| i.checked_add(id_len + name_len));
        let (Some(id_at), Some(end)) = (id_at, end) else {
            return Err(corrupt(
                base + at as u64,
                format!("snapshot {i} is too large"),
            ));
        };
        if end > table.len() {
            return Err(corrupt(
                base + at as u64,
                format!("snapshot {i} runs past the table"),
            ));
        }
        let disk_size = (extra_len >= 16).then(|| be64(table, extra + 8));
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&table[id_at..id_at + id_len]).into_owned(),
            name: String::from_utf8_lossy(&table[id_at + id_len..end]).into_owned(),
            disk_size,
        });
        at = end.next_multiple_of(8);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32, size: u64, l1_size: u32) -> Vec<u8> {
        let mut h = vec![0u8; 1 << cluster_bits];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << cluster_bits).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    proptest::proptest! {
        /// Untrusted bytes never panic the parsers; whatever parses is
        /// internally consistent.
        #[test]
        fn hostile_headers_never_panic(
            edits in proptest::collection::vec((0usize..512, proptest::num::u8::ANY), 0..24),
            cut in 0usize..1024,
        ) {
            let mut h = v3(9, 1 << 20, 4);
            for (at, b) in edits {
                h[at] = b;
            }
            h.truncate(cut.max(4));
            if let Ok(p) = parse(&h) {
                proptest::prop_assert!(u64::from(p.l1_size) * 8 <= MAX_L1_BYTES);
                proptest::prop_assert!((9..=21).contains(&p.cluster_bits));
                proptest::prop_assert!(
                    u64::from(p.l1_size) * p.l2_entries() * p.cluster_size() >= p.size
                );
            }
        }

        #[test]
        fn hostile_snapshot_tables_never_panic(
            table in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            count in 0u32..40,
        ) {
            let _ = parse_snapshots(&table, count, 0);
        }
    }

    #[test]
    fn a_minimal_v3_header_parses() {
        let h = parse(&v3(16, 1 << 30, 2)).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size), (3, 65536, 1 << 30));
        assert_eq!(h.l2_entries(), 8192);
        assert_eq!(h.compression, Compression::Zlib);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn an_l1_too_small_for_the_size_is_corrupt() {
        // 64 KiB clusters map 512 MiB per L1 entry.
        assert!(matches!(
            parse(&v3(16, (1 << 30) + 1, 2)),
            Err(HeaderError::Corrupt { .. })
        ));
    }

    #[test]
    fn encryption_and_unknown_features_are_unsupported() {
        let mut h = v3(16, 1 << 20, 1);
        h[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(matches!(parse(&h), Err(HeaderError::Unsupported(m)) if m.contains("encryption")));
        let mut h = v3(16, 1 << 20, 1);
        h[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(parse(&h), Err(HeaderError::Unsupported(m)) if m.contains("bit 40")));
    }

    #[test]
    fn snapshot_entries_past_the_table_are_corrupt() {
        let mut e = vec![0u8; 48];
        e[12..14].copy_from_slice(&1u16.to_be_bytes());
        e[14..16].copy_from_slice(&2u16.to_be_bytes());
        e[40] = b'1';
        e[41..43].copy_from_slice(b"s1");
        let s = parse_snapshots(&e, 1, 0).unwrap();
        assert_eq!((s[0].id.as_str(), s[0].name.as_str()), ("1", "s1"));
        assert!(parse_snapshots(&e, 2, 0).is_err());
        e[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_snapshots(&e, 1, 0).is_err());
    }
}
