//! `swab`: serve the next backend with the bytes of every 16-, 32- or
//! 64-bit word reversed.  It exists for disks written by machines that
//! wired their controller the other way round (the Atari Falcon's IDE
//! swaps byte pairs), and to turn big-endian data little-endian (e.g. the
//! `pattern` plugin's offsets).
//!
//! Words are the unit: the export's size is rounded down to a whole word,
//! the minimum block size advertised is the word size (combined with the
//! next backend's constraints), and a request that is not word-aligned is
//! refused with EINVAL rather than read-modify-written.  A client that
//! needs byte access stacks `--filter=blocksize` (`minblock=` the word
//! size) above this filter, which does the read-modify-write.  Reads are
//! swapped on the way up and writes on the way down; zero and trim pass
//! through (a zeroed word is zero in either order), and so do block status
//! and cache.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, BlockSize, ConfigError, Error, Extents, FilterSpec, Handle, Param, Result,
    ZeroFlags,
};

struct SwabBackend {
    next: Arc<dyn Backend>,
    /// Word size in bytes: 2, 4 or 8 (8-bit words need no filter).
    word: u64,
}

impl Backend for SwabBackend {
    fn name(&self) -> &str {
        "swab"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let size = next.size()? / self.word * self.word;
        Ok(Box::new(SwabHandle {
            next,
            word: self.word,
            size,
        }))
    }
}

struct SwabHandle {
    next: Box<dyn Handle>,
    word: u64,
    size: u64,
}

/// Reverse the bytes of each `word`-byte word of `buf` (whose length is a
/// multiple of `word`).
fn swap_words(buf: &mut [u8], word: usize) {
    match word {
        2 => buf.chunks_exact_mut(2).for_each(|w| {
            w.copy_from_slice(&u16::from_ne_bytes([w[0], w[1]]).swap_bytes().to_ne_bytes())
        }),
        4 => buf.chunks_exact_mut(4).for_each(|w| {
            let v = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
            w.copy_from_slice(&v.swap_bytes().to_ne_bytes())
        }),
        _ => buf.chunks_exact_mut(word).for_each(|w| w.reverse()),
    }
}

impl SwabHandle {
    /// Requests must cover whole words: a partial word's bytes live
    /// elsewhere in the next backend.
    fn check(&self, what: &str, offset: u64, count: u64) -> Result<()> {
        if offset.is_multiple_of(self.word) && count.is_multiple_of(self.word) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "swab filter: {what} at offset {offset} for {count} bytes is not aligned to the {}-bit word size",
                self.word * 8
            )))
        }
    }
}

impl Handle for SwabHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let w = self.word as u32;
        Ok(Some(match self.next.block_size()? {
            Some(b) => {
                let minimum = b.minimum.max(w);
                BlockSize {
                    minimum,
                    preferred: b.preferred.max(minimum),
                    // Both are powers of two, so the larger minimum still
                    // divides a maximum that was a multiple of the smaller
                    // one, unless the maximum is below it.
                    maximum: (b.maximum / minimum * minimum).max(minimum),
                }
            }
            None => BlockSize {
                minimum: w,
                preferred: 4096,
                maximum: u32::MAX / w * w,
            },
        }))
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        self.next.pread(buf, offset)?;
        swap_words(buf, self.word as usize);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check("write", offset, buf.len() as u64)?;
        let mut swapped = buf.to_vec();
        swap_words(&mut swapped, self.word as usize);
        self.next.pwrite(&swapped, offset, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.check("trim", offset, count)?;
        self.next.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.check("zero", offset, count)?;
        self.next.zero(offset, count, flags)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        // Allocation does not depend on byte order, but clients must only
        // see whole words: extents are merged or cut to word boundaries,
        // as nbdkit does.  The next backend may describe bytes past our
        // rounded-down size, which `extents` clips.
        let w = self.word;
        for e in crate::window::aligned_extents(&*self.next, offset, count, req_one, w)? {
            extents.add(e.offset, e.length, e.flags)?;
        }
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "swab",
    summary: "swap the bytes of every 16-, 32- or 64-bit word",
    description: "Reverses the byte order of each word: reads are swapped on the way to the\n\
client and writes on the way to the plugin.  The size is rounded down to a\n\
whole word; the minimum block size is the word size and unaligned requests\n\
fail with EINVAL (stack --filter=blocksize minblock=WORDSIZE above this filter\n\
for byte access).  swab-bits=8 turns the filter off.\n\n\
Example:\n  nbdkit-rs --filter=swab file falcon-disk.img swab-bits=16",
    params: &[Param {
        name: "swab-bits",
        help: "word size in bits: 8 (no swapping), 16 (default), 32 or 64",
    }],
    configure: |cfg| {
        let bits = match cfg.take("swab-bits") {
            None => 16,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(b @ (8 | 16 | 32 | 64)) => b,
                _ => {
                    return Err(ConfigError::new(format!(
                        "swab filter: swab-bits={v}: must be 8, 16, 32 or 64"
                    )))
                }
            },
        };
        // swab-bits=8 swaps nothing: the filter is not put in the chain at all.
        if bits == 8 {
            return Ok(layer_fn(Ok));
        }
        let word = bits / 8;
        Ok(layer_fn(move |next| {
            Ok(Arc::new(SwabBackend { next, word }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::{Config, ErrorKind};

    fn open(bits: Option<&str>, size: &str) -> Box<dyn Handle> {
        let mut params = vec![];
        if let Some(b) = bits {
            params.push(("swab-bits".to_string(), b.to_string()));
        }
        let layer = (SPEC.configure)(&mut Config::new(params)).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), size.into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        layer.layer(plugin).unwrap().open(false, "").unwrap()
    }

    #[test]
    fn swaps_each_width_both_ways() {
        for (bits, w) in [("16", 2usize), ("32", 4), ("64", 8)] {
            let h = open(Some(bits), "4096");
            let data: Vec<u8> = (0..64u8).collect();
            h.pwrite(&data, 64, false).unwrap();
            let mut below = vec![0u8; 64];
            h.next().unwrap().pread(&mut below, 64).unwrap();
            for (i, chunk) in below.chunks(w).enumerate() {
                let want: Vec<u8> = data[i * w..(i + 1) * w].iter().rev().copied().collect();
                assert_eq!(chunk, &want[..], "bits {bits}");
            }
            let mut back = vec![0u8; 64];
            h.pread(&mut back, 64).unwrap();
            assert_eq!(back, data);
            assert_eq!(h.block_size().unwrap().unwrap().minimum, w as u32);
        }
    }

    #[test]
    fn unaligned_requests_are_refused_and_size_rounds_down() {
        let h = open(Some("64"), "1001");
        assert_eq!(h.size().unwrap(), 1000);
        let mut b = [0u8; 8];
        assert_eq!(
            h.pread(&mut b, 4).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            h.pwrite(&b[..4], 8, false).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            h.zero(1, 8, ZeroFlags::default()).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        h.zero(8, 16, ZeroFlags::default()).unwrap();
    }

    #[test]
    fn eight_bits_is_no_filter_and_bad_widths_are_refused() {
        let h = open(Some("8"), "3");
        assert_eq!(h.size().unwrap(), 3);
        assert!(h.block_size().unwrap().is_none());
        let e = (SPEC.configure)(&mut Config::new(vec![("swab-bits".into(), "12".into())]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("swab-bits=12"), "{e}");
        assert_eq!(open(None, "4096").block_size().unwrap().unwrap().minimum, 2);
    }
}
