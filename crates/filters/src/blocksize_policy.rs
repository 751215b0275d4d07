//! `blocksize-policy`: set the block size constraints advertised to
//! clients (minimum, preferred, maximum) for plugins that give none or
//! the wrong ones, and choose what happens to requests that break them:
//! `allow` passes them down (the plugin, or a `blocksize` filter below,
//! copes), `error` refuses them with EINVAL before the plugin sees them,
//! and `strict-error` also refuses the one exception `error` makes: a
//! short request that ends exactly at the end of an export whose size is
//! not a multiple of the minimum (nbdkit >= 1.44).
//! `blocksize-write-disconnect` drops the connection on a write larger
//! than a size, as qemu-nbd does for writes over 32M, for testing clients
//! against that behaviour.
//!
//! The server normally refuses unaligned requests itself when a minimum
//! block size is advertised; this filter turns that off
//! (`Handle::enforce_block_size`) and applies its own policy instead.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, read_and_discard, write_zeroes, Backend, BlockSize, CacheMode, ConfigError, Error,
    ErrorKind, Extents, FilterSpec, Handle, Param, Result, ZeroFlags, ZeroMode,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Allow,
    Error,
    /// As `Error`, and the unaligned tail of the export is out of reach.
    StrictError,
}

/// The parameters; `None` means "whatever the next backend says".
#[derive(Debug, Clone, Copy)]
struct Settings {
    minimum: Option<u32>,
    preferred: Option<u32>,
    maximum: Option<u32>,
    disconnect: Option<u32>,
    policy: Policy,
}

impl Settings {
    /// Combine the configured values with the next backend's constraints.
    fn combine(&self, next: Option<BlockSize>) -> std::result::Result<Option<BlockSize>, String> {
        let s = self;
        if s.minimum.is_none() && s.preferred.is_none() && s.maximum.is_none() {
            return Ok(next);
        }
        let b = match next {
            Some(n) => {
                let minimum = s.minimum.unwrap_or(n.minimum);
                // Values taken from the plugin follow a changed minimum:
                // its maximum is rounded down to a multiple of it, its
                // preferred size raised to it.
                let maximum = s
                    .maximum
                    .unwrap_or_else(|| (n.maximum / minimum * minimum).max(minimum));
                BlockSize {
                    minimum,
                    preferred: s
                        .preferred
                        .unwrap_or_else(|| n.preferred.max(minimum).min(maximum)),
                    maximum,
                }
            }
            None => {
                let minimum = s.minimum.unwrap_or(1);
                let maximum = s.maximum.unwrap_or_else(|| {
                    // No limit (4G - 1), or just under the disconnect size,
                    // as a whole number of minimum blocks.
                    let cap = s.disconnect.unwrap_or(u32::MAX);
                    cap / minimum * minimum
                });
                BlockSize {
                    minimum,
                    preferred: s
                        .preferred
                        .unwrap_or_else(|| 4096.min(maximum).max(minimum)),
                    maximum,
                }
            }
        };
        if b.preferred < 512
            || b.minimum > b.preferred
            || b.preferred > b.maximum
            || !b.maximum.is_multiple_of(b.minimum)
        {
            return Err(format!(
                "the block sizes (minimum {}, preferred {}, maximum {}) combined from the \
                 parameters and the plugin's own are invalid: they need minimum <= preferred \
                 <= maximum, preferred at least 512, and maximum a multiple of minimum",
                b.minimum, b.preferred, b.maximum
            ));
        }
        Ok(Some(b))
    }
}

struct PolicyBackend {
    next: Arc<dyn Backend>,
    s: Settings,
}

impl Backend for PolicyBackend {
    fn name(&self) -> &str {
        "blocksize-policy"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let bs = self
            .s
            .combine(next.block_size()?)
            .map_err(|e| Error::invalid(format!("blocksize-policy filter: {e}")))?;
        let size = next.size()?;
        let zero = next.can_zero()?;
        let cache = next.can_cache()?;
        Ok(Box::new(PolicyHandle {
            next,
            bs,
            size,
            s: self.s,
            zero,
            cache,
        }))
    }
}

struct PolicyHandle {
    next: Box<dyn Handle>,
    bs: Option<BlockSize>,
    size: u64,
    s: Settings,
    /// The next handle's zero and cache modes.  Where the server would
    /// emulate them with writes or reads through the top of the chain
    /// (chunks of up to 1 MiB, which the policy would then judge as client
    /// requests), this filter does the emulation itself, below its check.
    zero: ZeroMode,
    cache: CacheMode,
}

impl PolicyHandle {
    /// Apply the error policy to a request.  `data` requests (read and
    /// write) are also held to the maximum.  Under `error` the last,
    /// partial block of an export whose size is not a multiple of the
    /// minimum may be accessed in full, as the server allows; under
    /// `strict-error` every length must be a multiple of the minimum, so
    /// that tail cannot be reached at all.
    fn check(&self, what: &str, data: bool, offset: u64, count: u64) -> Result<()> {
        let Some(b) = self.bs.filter(|_| self.s.policy != Policy::Allow) else {
            return Ok(());
        };
        // A short request that ends exactly at an unaligned end of the
        // export: the one `error` lets through.
        let short_tail =
            self.s.policy == Policy::Error && offset.saturating_add(count) == self.size;
        let min = b.minimum as u64;
        let why = if data && count > b.maximum as u64 {
            format!("larger than the maximum block size {}", b.maximum)
        } else if !offset.is_multiple_of(min) {
            format!("offset not aligned to the minimum block size {min}")
        } else if !count.is_multiple_of(min) && !short_tail {
            format!("length not a multiple of the minimum block size {min}")
        } else {
            return Ok(());
        };
        Err(Error::invalid(format!(
            "blocksize-policy filter: {what} of {count} bytes at offset {offset} refused: {why}"
        )))
    }
}

impl Handle for PolicyHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.bs)
    }
    fn enforce_block_size(&self) -> Result<bool> {
        // The policy is ours to apply, in `check`.
        Ok(false)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("read", true, offset, buf.len() as u64)?;
        self.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if let Some(d) = self.s.disconnect {
            if buf.len() as u64 > d as u64 {
                return Err(Error::disconnect(format!(
                    "blocksize-policy filter: write of {} bytes is larger than \
                     blocksize-write-disconnect={d}",
                    buf.len()
                )));
            }
        }
        self.check("write", true, offset, buf.len() as u64)?;
        self.next.pwrite(buf, offset, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.check("trim", false, offset, count)?;
        self.next.trim(offset, count, fua)
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(match self.zero {
            ZeroMode::Emulate => ZeroMode::Native,
            m => m,
        })
    }
    fn can_fast_zero(&self) -> Result<bool> {
        // An emulated zero fails fast, so fast zero is always possible.
        Ok(self.zero == ZeroMode::Emulate || self.next.can_fast_zero()?)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.check("zero", false, offset, count)?;
        if self.zero == ZeroMode::Native {
            match self.next.zero(offset, count, flags) {
                Err(e) if e.kind() == ErrorKind::NotSupported && !flags.fast => {}
                r => return r,
            }
        }
        write_zeroes(&*self.next, offset, count, flags)
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(match self.cache {
            CacheMode::Emulate => CacheMode::Native,
            m => m,
        })
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.check("cache", false, offset, count)?;
        match self.cache {
            CacheMode::Native => self.next.cache(offset, count),
            _ => read_and_discard(&*self.next, offset, count),
        }
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        // Block status is a query: like the server, it is answered at any
        // alignment (the next backend's extents are clipped to the range).
        self.next.extents(offset, count, req_one, extents)
    }
}

/// A size parameter that must fit the protocol's 32-bit fields.
fn take_u32(
    cfg: &mut nbdkit_backend::Config,
    key: &str,
) -> std::result::Result<Option<u32>, ConfigError> {
    let v = cfg
        .take_size(key)
        .map_err(|e| ConfigError::new(format!("blocksize-policy filter: {e}")))?;
    v.map(|n| {
        u32::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
            ConfigError::new(format!(
                "blocksize-policy filter: {key}={n}: must be from 1 to 4294967295"
            ))
        })
    })
    .transpose()
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "blocksize-policy",
    summary: "set the advertised block sizes and what happens to requests that break them",
    description: "Advertises blocksize-minimum/preferred/maximum (each defaults to what the\n\
plugin says, or 1 / 4K / no limit).  With blocksize-error-policy=allow (the\n\
default) requests that break them are passed to the plugin; with error they\n\
fail with EINVAL (block status is answered at any alignment), except a short\n\
request ending at the end of an export whose size is not a multiple of the\n\
minimum; strict-error refuses that too.  A write larger\n\
than blocksize-write-disconnect closes the connection without a reply.\n\
Stacked above --filter=blocksize (allow policy), badly behaved clients get\n\
read-modify-write while the plugin sees only aligned requests.\n\n\
Example:\n  nbdkit-rs --filter=blocksize-policy memory 1G blocksize-minimum=4K \\\n      \
blocksize-preferred=64K blocksize-error-policy=error",
    params: &[
        Param {
            name: "blocksize-minimum",
            help: "advertised minimum block size: a power of two from 1 to 64K",
        },
        Param {
            name: "blocksize-preferred",
            help: "advertised preferred block size: a power of two from 512 to 32M",
        },
        Param {
            name: "blocksize-maximum",
            help: "advertised maximum block size, a multiple of the minimum (up to 4G - 1)",
        },
        Param {
            name: "blocksize-error-policy",
            help: "allow (default): pass requests that break the sizes down; error: fail them with EINVAL; \
                   strict-error: also refuse short requests at an unaligned end of the export",
        },
        Param {
            name: "blocksize-write-disconnect",
            help: "drop the connection on a write larger than this (the server itself refuses writes over 32M)",
        },
    ],
    configure: |cfg| {
        let err = |m: String| ConfigError::new(format!("blocksize-policy filter: {m}"));
        let policy = match cfg.take("blocksize-error-policy").as_deref() {
            None | Some("allow") => Policy::Allow,
            Some("error") => Policy::Error,
            Some("strict-error") => Policy::StrictError,
            Some(v) => {
                return Err(err(format!(
                    "blocksize-error-policy={v}: expected allow, error or strict-error"
                )))
            }
        };
        let minimum = take_u32(cfg, "blocksize-minimum")?;
        let preferred = take_u32(cfg, "blocksize-preferred")?;
        let maximum = take_u32(cfg, "blocksize-maximum")?;
        let disconnect = take_u32(cfg, "blocksize-write-disconnect")?;
        if let Some(m) = minimum {
            if !m.is_power_of_two() || m > 65536 {
                return Err(err(format!(
                    "blocksize-minimum={m}: must be a power of two from 1 to 64K"
                )));
            }
        }
        if let Some(p) = preferred {
            if !p.is_power_of_two() || !(512..=32 << 20).contains(&p) {
                return Err(err(format!(
                    "blocksize-preferred={p}: must be a power of two from 512 to 32M"
                )));
            }
        }
        if let (Some(m), Some(p)) = (minimum, preferred) {
            if m > p {
                return Err(err(format!(
                    "blocksize-minimum={m} is larger than blocksize-preferred={p}"
                )));
            }
        }
        if let (Some(p), Some(x)) = (preferred, maximum) {
            if p > x {
                return Err(err(format!(
                    "blocksize-preferred={p} is larger than blocksize-maximum={x}"
                )));
            }
        }
        if let (Some(m), Some(x)) = (minimum, maximum) {
            if !x.is_multiple_of(m) {
                return Err(err(format!(
                    "blocksize-maximum={x} is not a multiple of blocksize-minimum={m}"
                )));
            }
        }
        if let (Some(m), Some(d)) = (minimum, disconnect) {
            if d <= m {
                return Err(err(format!(
                    "blocksize-write-disconnect={d} must be larger than blocksize-minimum={m}"
                )));
            }
        }
        let s = Settings {
            minimum,
            preferred,
            maximum,
            disconnect,
            policy,
        };
        Ok(layer_fn(move |next| Ok(Arc::new(PolicyBackend { next, s }))))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::{Config, ErrorKind};

    fn configure(
        p: &[(&str, &str)],
    ) -> std::result::Result<Box<dyn nbdkit_backend::Layer>, ConfigError> {
        let mut cfg = Config::from_pairs(p);
        (SPEC.configure)(&mut cfg)
    }

    fn open(p: &[(&str, &str)]) -> Result<Box<dyn Handle>> {
        open_sized(p, "1M")
    }

    fn open_sized(p: &[(&str, &str)], size: &str) -> Result<Box<dyn Handle>> {
        let layer = configure(p).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), size.into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        layer.layer(plugin).unwrap().open(false, "")
    }

    #[test]
    fn bad_parameters_name_the_key() {
        let e = |p: &[(&str, &str)]| configure(p).err().unwrap().to_string();
        assert!(e(&[("blocksize-minimum", "3")]).contains("blocksize-minimum=3"));
        assert!(e(&[("blocksize-minimum", "128K")]).contains("blocksize-minimum"));
        assert!(e(&[("blocksize-preferred", "256")]).contains("blocksize-preferred=256"));
        assert!(e(&[("blocksize-maximum", "8G")]).contains("blocksize-maximum"));
        assert!(
            e(&[("blocksize-minimum", "4K"), ("blocksize-preferred", "1K")])
                .contains("larger than blocksize-preferred")
        );
        assert!(
            e(&[("blocksize-minimum", "4K"), ("blocksize-maximum", "6K")])
                .contains("not a multiple")
        );
        assert!(e(&[("blocksize-error-policy", "maybe")]).contains("blocksize-error-policy=maybe"));
        assert!(e(&[
            ("blocksize-minimum", "4K"),
            ("blocksize-write-disconnect", "4K")
        ])
        .contains("blocksize-write-disconnect"));
    }

    #[test]
    fn sizes_default_and_combine() {
        let h = open(&[]).unwrap();
        assert_eq!(h.block_size().unwrap(), None);
        let h = open(&[("blocksize-minimum", "4K")]).unwrap();
        assert_eq!(
            h.block_size().unwrap(),
            Some(BlockSize {
                minimum: 4096,
                preferred: 4096,
                maximum: u32::MAX / 4096 * 4096
            })
        );
        let h = open(&[
            ("blocksize-minimum", "512"),
            ("blocksize-write-disconnect", "1000"),
        ])
        .unwrap();
        assert_eq!(h.block_size().unwrap().unwrap().maximum, 512);
        // A plugin's values follow a larger minimum.
        let s = Settings {
            minimum: Some(65536),
            preferred: None,
            maximum: None,
            disconnect: None,
            policy: Policy::Allow,
        };
        let plugin = BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: u32::MAX,
        };
        assert_eq!(
            s.combine(Some(plugin)).unwrap(),
            Some(BlockSize {
                minimum: 65536,
                preferred: 65536,
                maximum: u32::MAX / 65536 * 65536
            })
        );
        // Preferred 64K above a maximum of 8K cannot be advertised.
        let e = open(&[
            ("blocksize-preferred", "64K"),
            ("blocksize-write-disconnect", "8K"),
        ]);
        assert!(e.is_err());
    }

    #[test]
    fn error_policy_refuses_and_allow_passes() {
        let p = [("blocksize-minimum", "512"), ("blocksize-maximum", "64K")];
        let h = open(&[p[0], p[1], ("blocksize-error-policy", "error")]).unwrap();
        let mut b = vec![0u8; 1024];
        assert_eq!(
            h.pread(&mut b[..1], 0).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            h.pread(&mut b[..512], 1).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let mut big = vec![0u8; 128 << 10];
        assert_eq!(
            h.pread(&mut big, 0).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        // Zero has no maximum.
        h.zero(0, 128 << 10, ZeroFlags::default()).unwrap();
        h.pread(&mut b, 512).unwrap();
        assert!(!h.enforce_block_size().unwrap());
        let h = open(&p).unwrap();
        h.pread(&mut b[..3], 1).unwrap();
        h.pread(&mut big, 0).unwrap();
    }

    #[test]
    fn strict_error_refuses_the_unaligned_tail_that_error_allows() {
        // 1M + 100: the last 100 bytes are a partial 512-byte block.
        let size = (1u64 << 20) + 100;
        let tail = 1u64 << 20;
        let min = ("blocksize-minimum", "512");
        let error = open_sized(
            &[min, ("blocksize-error-policy", "error")],
            &size.to_string(),
        )
        .unwrap();
        let strict = open_sized(
            &[min, ("blocksize-error-policy", "strict-error")],
            &size.to_string(),
        )
        .unwrap();
        let mut b = vec![0u8; 100];
        error.pread(&mut b, tail).unwrap();
        error.zero(tail, 100, ZeroFlags::default()).unwrap();
        for e in [
            strict.pread(&mut b, tail).unwrap_err(),
            strict.pwrite(&b, tail, false).unwrap_err(),
            strict.zero(tail, 100, ZeroFlags::default()).unwrap_err(),
            strict.trim(tail, 100, false).unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
        // Both still refuse a short request that does not reach the end,
        // and an unaligned offset, and allow whole blocks before the tail.
        for h in [&error, &strict] {
            assert!(h.pread(&mut b[..50], tail).is_err());
            assert!(h.pread(&mut b[..99], tail + 1).is_err());
            let mut blk = vec![0u8; 512];
            h.pread(&mut blk, tail - 512).unwrap();
        }
    }

    /// A RAM disk that can only read and write: the server would emulate
    /// zero and cache.
    struct Plain(std::sync::Mutex<Vec<u8>>);
    impl Handle for Plain {
        fn size(&self) -> Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
        nbdkit_backend::capabilities! {
            can_write: true, can_cache: CacheMode::Emulate,
        }
        fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, _: bool) -> Result<()> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }
    struct PlainDisk;
    impl Backend for PlainDisk {
        fn name(&self) -> &str {
            "plain"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Ok(Box::new(Plain(std::sync::Mutex::new(vec![9u8; 4 << 20]))))
        }
    }

    #[test]
    fn emulated_zero_and_cache_are_not_judged_as_client_requests() {
        let layer = configure(&[
            ("blocksize-maximum", "64K"),
            ("blocksize-error-policy", "error"),
        ])
        .unwrap();
        let h = layer
            .layer(Arc::new(PlainDisk))
            .unwrap()
            .open(false, "")
            .unwrap();
        assert_eq!(h.can_zero().unwrap(), ZeroMode::Native);
        assert_eq!(h.can_cache().unwrap(), CacheMode::Native);
        h.zero(4096, 3 << 20, ZeroFlags::default()).unwrap();
        h.cache(0, 3 << 20).unwrap();
        let mut b = vec![0u8; 8192];
        h.pread(&mut b, 0).unwrap();
        assert_eq!(&b[..4096], &[9u8; 4096][..]);
        assert_eq!(&b[4096..], &[0u8; 4096][..]);
        let fast = ZeroFlags {
            fast: true,
            ..Default::default()
        };
        assert!(h.can_fast_zero().unwrap());
        assert_eq!(
            h.zero(0, 4096, fast).unwrap_err().kind(),
            ErrorKind::NotSupported
        );
    }

    #[test]
    fn oversized_writes_disconnect() {
        let h = open(&[("blocksize-write-disconnect", "4K")]).unwrap();
        h.pwrite(&[1; 4096], 0, false).unwrap();
        let e = h.pwrite(&[1; 4097], 0, false).unwrap_err();
        assert!(e.disconnects());
        assert_eq!(e.kind(), ErrorKind::Shutdown);
    }
}
