//! The exact decompressed size of a BGZF file without inflating it.
//!
//! Every BGZF member records its own compressed length (the `BC` extra
//! subfield, BSIZE = length - 1) and ends with ISIZE, its decompressed
//! length; BGZF members hold at most 64 KiB, so ISIZE is exact (it is
//! only "mod 2^32" for bigger members).  Hopping from header to trailer to
//! header therefore adds up the size with one small read per member, which
//! lets the server answer the handshake at once while the index (which
//! needs inflating everything) is built in the background.  The index walk
//! still inflates and checks every member (CRC-32 and ISIZE), and the
//! reader fails if its total differs from the size computed here.
//!
//! Other gzip files give `None`: a plain or concatenated gzip member may be
//! any length, its ISIZE is that length mod 2^32, so nothing short of
//! inflating gives the size.

use super::header::{parse_header, HeaderError};
use crate::{Error, Result};

/// Largest decompressed size of a BGZF member (the format's limit).
pub const BGZF_MAX_ISIZE: u32 = 64 << 10;

/// Bytes read at each member start: enough for a BGZF header (18 bytes
/// plus any other extra subfields) in nearly every case.
const HEAD: usize = 512;

/// Deflate cannot expand more than about 1032:1.
const MAX_RATIO: u64 = 1032;

fn corrupt(name: &str, offset: u64, reason: String) -> Error {
    Error::corrupt(name, "gzip", offset, reason)
}

/// The decompressed size of a file whose members are all BGZF, computed
/// from member headers and trailers through `read` (positional reads of
/// the `file_size`-byte file).  `Ok(None)`: some member is not BGZF (or the
/// data after the last member is not zero padding), so the size cannot be
/// known this way; the index walk then reports any damage.  A BGZF member
/// that is truncated or whose trailer is impossible is `Error::Corrupt`
/// naming its offset, so a damaged file never gets a made-up size.
pub fn bgzf_size_with(
    name: &str,
    file_size: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Option<u64>> {
    let mut off = 0u64;
    let mut total = 0u64;
    let mut head = vec![0u8; HEAD];
    while off < file_size {
        let n = (file_size - off).min(HEAD as u64) as usize;
        read(off, &mut head[..n]).map_err(Error::io(name, off))?;
        let h = match parse_header(&head[..n]) {
            Ok(h) => h,
            Err(_) if head[0] == 0 => {
                // Trailing zero padding (accepted like `gzip -d` does), or
                // something the index walk will name.
                return zero_tail(name, file_size, off, read).map(|z| z.then_some(total));
            }
            Err(HeaderError::Short) if n < HEAD => {
                return Err(corrupt(
                    name,
                    off,
                    format!("truncated BGZF member header ({n} bytes left in the file)"),
                ))
            }
            Err(_) => return Ok(None),
        };
        let Some(bsize) = h.bgzf_bsize else {
            return Ok(None);
        };
        let len = u64::from(bsize) + 1;
        if len < h.len as u64 + 8 {
            return Err(corrupt(
                name,
                off,
                format!(
                    "BGZF member of {len} bytes is shorter than its {}-byte header and trailer",
                    h.len
                ),
            ));
        }
        let end = off + len;
        if end > file_size {
            return Err(corrupt(
                name,
                off,
                format!(
                    "BGZF member of {len} bytes runs past the end of the file \
                     ({} bytes left): truncated",
                    file_size - off
                ),
            ));
        }
        let mut isize = [0u8; 4];
        read(end - 4, &mut isize).map_err(Error::io(name, end - 4))?;
        let isize = u32::from_le_bytes(isize);
        let payload = len - h.len as u64 - 8;
        if isize > BGZF_MAX_ISIZE || u64::from(isize) > payload.max(1) * MAX_RATIO {
            return Err(corrupt(
                name,
                end - 4,
                format!(
                    "BGZF member at offset {off} claims {isize} decompressed bytes \
                     from {payload} compressed (corrupt trailer)"
                ),
            ));
        }
        if isize == 0 && payload > 2 {
            // bgzip's only empty member is the end-of-file marker, whose
            // deflate payload is the 2-byte empty block.  Any other member
            // claiming to be empty is not trusted for the size: the index
            // walk (which inflates it) decides.
            return Ok(None);
        }
        total += u64::from(isize);
        off = end;
    }
    Ok(Some(total))
}

/// Whether `[off, file_size)` is all zero bytes.
fn zero_tail(
    name: &str,
    file_size: u64,
    mut off: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<bool> {
    let mut buf = vec![0u8; 64 << 10];
    while off < file_size {
        let n = (file_size - off).min(buf.len() as u64) as usize;
        read(off, &mut buf[..n]).map_err(Error::io(name, off))?;
        if !crate::is_zero(&buf[..n]) {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// [`bgzf_size_with`] over bytes in memory (for tests and fuzzing).
pub fn bgzf_size(name: &str, file: &[u8]) -> Result<Option<u64>> {
    bgzf_size_with(name, file.len() as u64, &mut |off, buf| {
        let start = usize::try_from(off).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| file.get(start..end))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    })
}
