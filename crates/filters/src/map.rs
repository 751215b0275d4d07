//! `map`: remap byte ranges of the plugin, e.g. swap two sectors or move
//! a partition.  `map=START-END:DEST` sends bytes START..=END to DEST..
//! in the plugin, for every kind of request; bytes no `map` covers go to
//! the same offset (an implicit one-to-one map).  Where given ranges
//! overlap, the one given first wins.  `map-size` sets the export's size
//! (default: the plugin's); a request that maps past the plugin's end
//! fails with EIO.
//!
//! The mappings are flattened once, at start-up, into sorted disjoint
//! intervals, so a request is split with a binary search and a walk.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, parse_size, Backend, ConfigError, Error, Extents, FilterSpec, Handle, Param, Result,
    StatusKind, ZeroFlags,
};

/// `[start, end)` of the export goes to `dest..` of the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval {
    start: u64,
    end: u64,
    dest: u64,
}

/// Sorted, disjoint intervals; gaps map to themselves.
#[derive(Debug, Default, Clone)]
struct Map(Vec<Interval>);

impl Map {
    /// Add a mapping of lower precedence than every one already added:
    /// only the parts no earlier mapping covers are taken.
    fn add_under(&mut self, start: u64, end: u64, dest: u64) {
        let mut pieces = vec![(start, end)];
        for iv in &self.0 {
            let mut rest = Vec::new();
            for (s, e) in pieces {
                if iv.end <= s || e <= iv.start {
                    rest.push((s, e));
                    continue;
                }
                if s < iv.start {
                    rest.push((s, iv.start));
                }
                if iv.end < e {
                    rest.push((iv.end, e));
                }
            }
            pieces = rest;
        }
        for (s, e) in pieces {
            self.0.push(Interval {
                start: s,
                end: e,
                dest: dest + (s - start),
            });
        }
        self.0.sort_by_key(|iv| iv.start);
    }

    /// Split `[offset, offset+count)` into runs `(export offset, plugin
    /// offset, length)`, in order.
    fn split(&self, offset: u64, count: u64) -> Vec<(u64, u64, u64)> {
        let end = offset + count;
        let mut out = Vec::new();
        let mut pos = offset;
        // The first interval that ends after `pos`.
        let mut i = self.0.partition_point(|iv| iv.end <= pos);
        while pos < end {
            match self.0.get(i) {
                Some(iv) if iv.start <= pos => {
                    let to = iv.end.min(end);
                    out.push((pos, iv.dest + (pos - iv.start), to - pos));
                    pos = to;
                    i += 1;
                }
                next => {
                    // A gap: one-to-one up to the next interval.
                    let to = next.map_or(end, |iv| iv.start.min(end));
                    out.push((pos, pos, to - pos));
                    pos = to;
                }
            }
        }
        out
    }
}

/// `START-END:DEST`, sizes in any form `parse_size` takes.
fn parse_mapping(v: &str) -> std::result::Result<(u64, u64, u64), String> {
    let form = "expected START-END:DEST, e.g. 0-511:512";
    let (range, dest) = v.rsplit_once(':').ok_or(form)?;
    let (start, end) = range.split_once('-').ok_or(form)?;
    let start = parse_size(start.trim())?;
    let end = parse_size(end.trim())?;
    let dest = parse_size(dest.trim())?;
    if end < start {
        return Err(format!("the range ends ({end}) before it starts ({start})"));
    }
    if end == u64::MAX || dest.checked_add(end - start).is_none_or(|d| d == u64::MAX) {
        return Err("the range is too large".into());
    }
    // END is inclusive.
    Ok((start, end + 1, dest))
}

struct MapBackend {
    next: Arc<dyn Backend>,
    map: Arc<Map>,
    size: Option<u64>,
}

impl Backend for MapBackend {
    fn name(&self) -> &str {
        "map"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let plugin_size = next.size()?;
        Ok(Box::new(MapHandle {
            next,
            map: self.map.clone(),
            size: self.size.unwrap_or(plugin_size),
            plugin_size,
        }))
    }
}

struct MapHandle {
    next: Box<dyn Handle>,
    map: Arc<Map>,
    size: u64,
    plugin_size: u64,
}

impl MapHandle {
    /// The runs of a request, each checked to lie inside the plugin.
    fn runs(&self, offset: u64, count: u64) -> Result<Vec<(u64, u64, u64)>> {
        let runs = self.map.split(offset, count);
        for &(from, to, len) in &runs {
            if to.checked_add(len).is_none_or(|e| e > self.plugin_size) {
                return Err(Error::io(format!(
                    "map filter: bytes {from}..{} map to {to}..{}, past the end of the plugin ({} bytes)",
                    from + len,
                    to.saturating_add(len),
                    self.plugin_size
                )));
            }
        }
        Ok(runs)
    }
}

impl Handle for MapHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (from, to, len) in self.runs(offset, buf.len() as u64)? {
            let at = (from - offset) as usize;
            self.next.pread(&mut buf[at..at + len as usize], to)?;
        }
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        for (from, to, len) in self.runs(offset, buf.len() as u64)? {
            let at = (from - offset) as usize;
            self.next.pwrite(&buf[at..at + len as usize], to, fua)?;
        }
        Ok(())
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        for (_, to, len) in self.runs(offset, count)? {
            self.next.zero(to, len, flags)?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        for (_, to, len) in self.runs(offset, count)? {
            self.next.trim(to, len, fua)?;
        }
        Ok(())
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        for (_, to, len) in self.runs(offset, count)? {
            self.next.cache(to, len)?;
        }
        Ok(())
    }
    status_by_kind!();
}

impl MapHandle {
    /// Either block status answer, run by run: both move with the bytes.
    fn status(
        &self,
        kind: StatusKind,
        offset: u64,
        count: u64,
        req_one: bool,
        out: &mut Extents,
    ) -> Result<()> {
        for (from, to, len) in self.runs(offset, count)? {
            let mut inner = Extents::new(to, to + len);
            kind.query(&*self.next, to, len, req_one, &mut inner)?;
            for e in inner.list() {
                out.add(e.offset - to + from, e.length, e.flags)?;
            }
            // The plugin answered for less (or one was enough): the
            // client asks again for the rest.
            if !inner.is_full() || req_one {
                break;
            }
        }
        Ok(())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "map",
    summary: "remap byte ranges of the plugin",
    description: "map=START-END:DEST (END inclusive) sends those bytes to DEST onwards in \
the plugin, for reads, writes, zeroes, trims, block status and cache. Give map \
any number of times; where ranges overlap the first one given wins, and bytes no \
map covers stay where they are. Requests that map past the plugin's end fail \
with EIO.\n\n\
Example (swap the first two sectors):\n  \
nbdkit-rs --filter=map file disk.img map=0-511:512 map=512-1023:0",
    params: &[
        Param {
            name: "map",
            help: "START-END:DEST, any number of times (sizes may use k, M, G…)",
        },
        Param {
            name: "map-size",
            help: "size of the export (default: the plugin's)",
        },
    ],
    configure: |cfg| {
        let mut map = Map::default();
        for v in cfg.take_all("map") {
            let (start, end, dest) = parse_mapping(&v)
                .map_err(|e| ConfigError::new(format!("map filter: map={v}: {e}")))?;
            map.add_under(start, end, dest);
        }
        let size = cfg
            .take_size("map-size")
            .map_err(|e| ConfigError::new(format!("map filter: {e}")))?;
        let map = Arc::new(map);
        Ok(layer_fn(move |next| {
            Ok(Arc::new(MapBackend { next, map, size }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(specs: &[&str]) -> Map {
        let mut m = Map::default();
        for s in specs {
            let (a, b, d) = parse_mapping(s).unwrap();
            m.add_under(a, b, d);
        }
        m
    }

    #[test]
    fn parses_and_swaps() {
        assert_eq!(parse_mapping("0-511:512"), Ok((0, 512, 512)));
        assert_eq!(parse_mapping("1M-2M:0"), Ok((1 << 20, (2 << 20) + 1, 0)));
        assert!(parse_mapping("5-1:0").is_err());
        assert!(parse_mapping("0-1").is_err());
        assert!(parse_mapping("x-1:0").is_err());
        let m = map(&["0-511:512", "512-1023:0"]);
        assert_eq!(
            m.split(0, 2048),
            vec![(0, 512, 512), (512, 0, 512), (1024, 1024, 1024)]
        );
        assert_eq!(m.split(500, 24), vec![(500, 1012, 12), (512, 0, 12)]);
    }

    #[test]
    fn the_first_mapping_wins() {
        let m = map(&["100-199:1000", "0-299:5000"]);
        assert_eq!(
            m.split(0, 400),
            vec![
                (0, 5000, 100),
                (100, 1000, 100),
                (200, 5200, 100),
                (300, 300, 100)
            ]
        );
    }

    proptest! {
        /// Every byte goes where the first mapping covering it says (or
        /// to itself), and the runs tile the request exactly.
        #[test]
        fn split_agrees_with_a_byte_by_byte_lookup(
            specs in proptest::collection::vec((0u64..300, 0u64..100, 0u64..1000), 0..6),
            offset in 0u64..400,
            count in 1u64..200,
        ) {
            let mut m = Map::default();
            for &(s, l, d) in &specs {
                m.add_under(s, s + l + 1, d);
            }
            let runs = m.split(offset, count);
            let mut pos = offset;
            for &(from, to, len) in &runs {
                prop_assert_eq!(from, pos);
                prop_assert!(len > 0);
                for k in 0..len {
                    let b = from + k;
                    let want = specs
                        .iter()
                        .find(|&&(s, l, _)| s <= b && b <= s + l)
                        .map_or(b, |&(s, _, d)| d + (b - s));
                    prop_assert_eq!(to + k, want);
                }
                pos += len;
            }
            prop_assert_eq!(pos, offset + count);
        }
    }
}
