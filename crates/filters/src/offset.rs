//! `offset`: serve the range `[offset, offset+range)` of the next backend
//! (to the end when `range` is not given).  Every request, block status
//! included, is shifted by `offset` and cannot reach outside the range.

use std::sync::Arc;

use nbdkit_backend::{layer_fn, Backend, ConfigError, Error, FilterSpec, Handle, Param, Result};

use crate::window::Window;

struct OffsetBackend {
    next: Arc<dyn Backend>,
    offset: u64,
    range: Option<u64>,
}

impl Backend for OffsetBackend {
    fn name(&self) -> &str {
        "offset"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        // The plugin's size is only known per connection (it may differ
        // between exports), so the range is checked here.
        let size = next.size()?;
        let len = match self.range {
            Some(r) if self.offset.checked_add(r).is_some_and(|e| e <= size) => r,
            Some(r) => {
                return Err(Error::invalid(format!(
                    "offset filter: offset {} + range {r} is beyond the end of the plugin ({size} bytes)",
                    self.offset
                )))
            }
            None if self.offset <= size => size - self.offset,
            None => {
                return Err(Error::invalid(format!(
                    "offset filter: offset {} is beyond the end of the plugin ({size} bytes)",
                    self.offset
                )))
            }
        };
        Ok(Box::new(Window {
            next,
            start: self.offset,
            len,
        }))
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "offset",
    summary: "serve a byte range of the plugin (skip a header, select a region)",
    description: "Shifts every request by offset= and limits the export to range= bytes\n\
(default: to the end of the plugin).\n\n\
Example:\n  nbdkit-rs --filter=offset file disk.img offset=1M range=512M",
    params: &[
        Param {
            name: "offset",
            help: "bytes to skip at the start of the plugin (default 0)",
        },
        Param {
            name: "range",
            help: "size of the export (default: the rest of the plugin)",
        },
    ],
    configure: |cfg| {
        let offset = cfg
            .take_size("offset")
            .map_err(|e| ConfigError::new(format!("offset filter: {e}")))?
            .unwrap_or(0);
        let range = cfg
            .take_size("range")
            .map_err(|e| ConfigError::new(format!("offset filter: {e}")))?;
        if let Some(r) = range {
            if offset.checked_add(r).is_none_or(|e| e > i64::MAX as u64) {
                return Err(ConfigError::new(format!(
                    "offset filter: offset {offset} + range {r} is too large"
                )));
            }
        }
        Ok(layer_fn(move |next| {
            Ok(Arc::new(OffsetBackend {
                next,
                offset,
                range,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::{Config, Extents, ZeroFlags};

    fn open(params: &[(&str, &str)], size: &str) -> Result<Box<dyn Handle>> {
        let mut cfg = Config::from_pairs(params);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), size.into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        layer.layer(plugin).unwrap().open(false, "")
    }

    #[test]
    fn shifts_and_clips_everything() {
        let h = open(&[("offset", "64K"), ("range", "128K")], "1M").unwrap();
        assert_eq!(h.size().unwrap(), 128 << 10);
        h.pwrite(&[1; 4096], 4096, false).unwrap();
        let below = h.next().unwrap();
        let mut buf = [0u8; 4096];
        below.pread(&mut buf, (64 << 10) + 4096).unwrap();
        assert_eq!(buf, [1; 4096]);
        h.zero(4096, 1024, ZeroFlags::default()).unwrap();
        below.pread(&mut buf, (64 << 10) + 4096).unwrap();
        assert_eq!(buf[..1024], [0; 1024]);
        assert_eq!(buf[1024..], [1; 3072]);
        assert!(h.pread(&mut buf, (128 << 10) - 100).is_err());
        let mut ex = Extents::new(0, 128 << 10);
        h.extents(0, 128 << 10, false, &mut ex).unwrap();
        assert_eq!(ex.list()[0].offset, 0);
        assert_eq!(ex.next_offset(), 128 << 10);
    }

    #[test]
    fn range_past_the_end_is_refused_at_open() {
        let e = open(&[("offset", "1M"), ("range", "1")], "1M")
            .err()
            .unwrap();
        assert!(e.to_string().contains("beyond the end"), "{e}");
        assert!(open(&[("offset", "2M")], "1M").is_err());
        assert_eq!(open(&[("offset", "1M")], "1M").unwrap().size().unwrap(), 0);
    }
}
