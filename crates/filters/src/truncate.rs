//! `truncate`: change the size of the plugin.  Shrinking hides the end;
//! growing adds bytes that read as zeroes, where writing zeroes succeeds
//! (it changes nothing) and writing anything else fails with ENOSPC,
//! because there is nowhere to keep it.  `round-up=N`/`round-down=N`
//! round the plugin's size to a multiple of N.

use std::sync::Arc;

use crate::window::shifted_status;
use nbdkit_backend::{
    is_zero, layer_fn, Backend, ConfigError, Error, ErrorKind, Extents, FilterSpec, Handle, Param,
    Result, StatusKind, ZeroFlags, EXTENT_HOLE, EXTENT_ZERO,
};

/// The size the filter serves, from the plugin's: `truncate=` replaces it,
/// then `round-up=` and `round-down=` round it, in that order (nbdkit
/// treats them as separate steps, so all three may be given).  With none
/// of them the size is the plugin's.
#[derive(Debug, Clone, Copy, Default)]
struct NewSize {
    absolute: Option<u64>,
    up: Option<u64>,
    down: Option<u64>,
}

impl NewSize {
    fn apply(self, size: u64) -> Result<u64> {
        let mut size = self.absolute.unwrap_or(size);
        if let Some(n) = self.up {
            size = size
                .checked_next_multiple_of(n)
                .filter(|&s| s <= i64::MAX as u64)
                .ok_or_else(|| Error::overflow("truncate filter: rounded size is too large"))?;
        }
        if let Some(n) = self.down {
            size &= !(n - 1);
        }
        Ok(size)
    }
}

struct TruncateBackend {
    next: Arc<dyn Backend>,
    new: NewSize,
}

impl Backend for TruncateBackend {
    fn name(&self) -> &str {
        "truncate"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let real = next.size()?;
        let size = self.new.apply(real)?;
        Ok(Box::new(TruncateHandle { next, real, size }))
    }
}

struct TruncateHandle {
    next: Box<dyn Handle>,
    /// The plugin's size.
    real: u64,
    /// The size we show.
    size: u64,
}

impl TruncateHandle {
    /// The part of `[offset, offset+count)` that the plugin has.
    fn inside(&self, offset: u64, count: u64) -> u64 {
        if offset >= self.real {
            0
        } else {
            count.min(self.real - offset)
        }
    }
}

impl Handle for TruncateHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.inside(offset, buf.len() as u64) as usize;
        let (inner, outer) = buf.split_at_mut(n);
        if n > 0 {
            self.next.pread(inner, offset)?;
        }
        outer.fill(0);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let n = self.inside(offset, buf.len() as u64) as usize;
        // Checked before writing anything, so a refused request changes
        // nothing.
        if !is_zero(&buf[n..]) {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "truncate filter: only zeroes can be written beyond the plugin's end ({} bytes)",
                    self.real
                ),
            ));
        }
        if n > 0 {
            self.next.pwrite(&buf[..n], offset, fua)?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        match self.inside(offset, count) {
            0 => Ok(()),
            n => self.next.trim(offset, n, fua),
        }
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        match self.inside(offset, count) {
            0 => Ok(()),
            n => self.next.zero(offset, n, flags),
        }
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        match self.inside(offset, count) {
            0 => Ok(()),
            n => self.next.cache(offset, n),
        }
    }
    status_by_kind!();
}

impl TruncateHandle {
    /// Either block status answer: the plugin's for its part, and for the
    /// zeroes added past its end a hole (allocation) or depth 1: they are
    /// this export's own bytes, as a raw image's holes are to qemu-nbd -A,
    /// not something a backing image could show through.
    fn status(
        &self,
        kind: StatusKind,
        offset: u64,
        count: u64,
        req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let n = self.inside(offset, count);
        if n > 0 {
            // The plugin may answer for less than asked; then the client
            // asks again for the rest.
            if !shifted_status(kind, &*self.next, 0, offset, n, req_one, extents)? {
                return Ok(());
            }
        }
        if n < count {
            let added = match kind {
                StatusKind::Allocation => EXTENT_HOLE | EXTENT_ZERO,
                StatusKind::Depth => 1,
            };
            extents.add(offset + n, count - n, added)?;
        }
        Ok(())
    }
}

fn power_of_two(key: &str, v: Option<u64>) -> std::result::Result<Option<u64>, ConfigError> {
    match v {
        Some(0) => Err(ConfigError::new(format!(
            "truncate filter: {key}=0: if set, {key} must be greater than 0"
        ))),
        Some(n) if n > u64::from(u32::MAX) => Err(ConfigError::new(format!(
            "truncate filter: {key}={n}: too large (at most 2G)"
        ))),
        Some(n) if !n.is_power_of_two() => Err(ConfigError::new(format!(
            "truncate filter: {key}={n}: must be a power of two (512, 4096, …)"
        ))),
        _ => Ok(v),
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "truncate",
    summary: "change the size of the plugin (truncate, extend with zeroes, round)",
    description: "Shrinks or grows the plugin to truncate= bytes, or rounds its size with\n\
round-up= or round-down=.  Added bytes read as zeroes; only zeroes may be\n\
written there (anything else fails with ENOSPC).\n\n\
Example:\n  nbdkit-rs --filter=truncate file odd-sized.iso round-up=512",
    params: &[
        Param {
            name: "truncate",
            help: "the new size in bytes (1G, 512M, …)",
        },
        Param {
            name: "round-up",
            help: "round the size up to a multiple of N (a power of two)",
        },
        Param {
            name: "round-down",
            help: "round the size down to a multiple of N (a power of two)",
        },
    ],
    configure: |cfg| {
        let err = |e: ConfigError| ConfigError::new(format!("truncate filter: {e}"));
        let size = cfg.take_size("truncate").map_err(err)?;
        let up = power_of_two("round-up", cfg.take_size("round-up").map_err(err)?)?;
        let down = power_of_two("round-down", cfg.take_size("round-down").map_err(err)?)?;
        let new = NewSize {
            absolute: size,
            up,
            down,
        };
        Ok(layer_fn(move |next| {
            Ok(Arc::new(TruncateBackend { next, new }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    fn open(params: &[(&str, &str)], size: &str) -> Box<dyn Handle> {
        let mut cfg = Config::from_pairs(params);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), size.into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        layer.layer(plugin).unwrap().open(false, "").unwrap()
    }

    #[test]
    fn sizes() {
        assert_eq!(open(&[("truncate", "100")], "1M").size().unwrap(), 100);
        assert_eq!(open(&[("round-up", "4096")], "5000").size().unwrap(), 8192);
        assert_eq!(
            open(&[("round-down", "4096")], "5000").size().unwrap(),
            4096
        );
        assert_eq!(open(&[("round-up", "512")], "1024").size().unwrap(), 1024);
    }

    #[test]
    fn growing_reads_zeroes_and_accepts_only_zeroes() {
        let h = open(&[("truncate", "8192")], "5000");
        h.pwrite(&[7; 5000], 0, false).unwrap();
        let mut buf = vec![1u8; 8192];
        h.pread(&mut buf, 0).unwrap();
        assert!(buf[..5000].iter().all(|&b| b == 7));
        assert!(is_zero(&buf[5000..]));
        let e = h.pwrite(&[9; 200], 4900, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let mut one = [0u8; 1];
        h.pread(&mut one, 4900).unwrap();
        assert_eq!(one, [7], "a refused write changed nothing");
        h.pwrite(&[0; 200], 4900, false).unwrap();
        h.zero(4000, 4192, ZeroFlags::default()).unwrap();
        h.trim(6000, 100, false).unwrap();
        let mut ex = Extents::new(0, 8192);
        h.extents(0, 8192, false, &mut ex).unwrap();
        let last = ex.list().last().unwrap();
        assert_eq!(last.offset + last.length, 8192);
        assert_eq!(last.flags, EXTENT_HOLE | EXTENT_ZERO);
    }

    #[test]
    fn bad_parameters() {
        let conf = |p: &[(&str, &str)]| {
            let mut cfg = Config::from_pairs(p);
            (SPEC.configure)(&mut cfg).err().unwrap().to_string()
        };
        assert!(conf(&[("round-up", "1000")]).contains("power of two"));
        assert!(conf(&[("round-down", "0")]).contains("greater than 0"));
        assert!(conf(&[("round-up", "8G")]).contains("too large"));
    }

    #[test]
    fn parameters_combine_in_nbdkits_order() {
        // No parameter: the plugin's size.
        assert_eq!(open(&[], "5000").size().unwrap(), 5000);
        // truncate= first, then round-up=, then round-down=.
        let h = open(
            &[
                ("truncate", "5000"),
                ("round-up", "4096"),
                ("round-down", "1024"),
            ],
            "1M",
        );
        assert_eq!(h.size().unwrap(), 8192);
        let h = open(&[("round-up", "4096"), ("round-down", "8192")], "5000");
        assert_eq!(h.size().unwrap(), 8192);
    }
}
