//! `protect`: make byte ranges read-only (a boot sector, a partition
//! table).  A write there fails with EPERM unless it would leave the
//! protected bytes as they are; trims there always fail (they may change
//! the data), and zeroes fail unless the bytes are already zero.

use std::sync::Arc;

use nbdkit_backend::{
    is_zero, layer_fn, Backend, ConfigError, Error, ErrorKind, FilterSpec, Handle, Param, Result,
    ZeroFlags,
};

/// Inclusive byte ranges, sorted and merged.
type Ranges = Vec<(u64, u64)>;

/// An offset as nbdkit reads one: decimal, octal (`0NN`) or hex
/// (`0xNN`); a size with a suffix (`4k`) is accepted too.
fn parse_offset(v: &str) -> std::result::Result<u64, String> {
    let t = v.trim();
    let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if t.len() > 1 && t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit()) {
        u64::from_str_radix(&t[1..], 8).ok()
    } else {
        None
    };
    match parsed {
        Some(n) => Ok(n),
        None => nbdkit_backend::parse_size(t).map_err(|e| {
            format!("'{t}': {e} (expected an offset: decimal, 0NN octal or 0xNN hex)")
        }),
    }
}

/// Parse `START-END`, `START-`, `-END` or `-` (inclusive; an omitted end
/// is the start or end of the disk), or `~` before any of them for
/// everything outside that range.  Returns the ranges to protect.
fn parse_range(v: &str) -> std::result::Result<Ranges, String> {
    let (complement, body) = match v.strip_prefix('~') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (lo, hi) = body
        .split_once('-')
        .ok_or_else(|| "expected START-END, START-, -END or -, optionally after ~".to_string())?;
    let lo = if lo.trim().is_empty() {
        0
    } else {
        parse_offset(lo)?
    };
    let hi = if hi.trim().is_empty() {
        u64::MAX
    } else {
        parse_offset(hi)?
    };
    if lo > hi {
        return Err(format!("start {lo} is after end {hi}"));
    }
    if !complement {
        return Ok(vec![(lo, hi)]);
    }
    let mut out = Vec::new();
    if lo > 0 {
        out.push((0, lo - 1));
    }
    if hi < u64::MAX {
        out.push((hi + 1, u64::MAX));
    }
    Ok(out)
}

fn merge(mut r: Ranges) -> Ranges {
    r.sort();
    let mut out: Ranges = Vec::new();
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

struct Protect {
    next: Arc<dyn Backend>,
    ranges: Arc<Ranges>,
}

impl Backend for Protect {
    fn name(&self) -> &str {
        "protect"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ProtectHandle {
            next: self.next.open(readonly, export)?,
            ranges: self.ranges.clone(),
        }))
    }
}

struct ProtectHandle {
    next: Box<dyn Handle>,
    ranges: Arc<Ranges>,
}

fn denied(lo: u64, hi: u64) -> Error {
    Error::new(
        ErrorKind::PermissionDenied,
        format!("protect filter: bytes {lo}-{hi} are protected"),
    )
}

impl ProtectHandle {
    /// The protected parts of `[offset, offset+count)`, as half-open
    /// ranges.
    fn overlaps(&self, offset: u64, count: u64) -> Vec<(u64, u64)> {
        let end = offset + count;
        self.ranges
            .iter()
            .filter_map(|&(lo, hi)| {
                let (from, to) = (lo.max(offset), hi.saturating_add(1).min(end));
                (from < to).then_some((from, to))
            })
            .collect()
    }

    /// Check that `want(part, offset)` holds for each protected part's
    /// current bytes; refuse with EPERM otherwise.
    fn check(&self, offset: u64, count: u64, same: impl Fn(&[u8], u64) -> bool) -> Result<()> {
        for (from, to) in self.overlaps(offset, count) {
            let mut cur = vec![0u8; (to - from) as usize];
            self.next.pread(&mut cur, from)?;
            if !same(&cur, from) {
                return Err(denied(from, to - 1));
            }
        }
        Ok(())
    }
}

impl Handle for ProtectHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check(offset, buf.len() as u64, |cur, from| {
            let at = (from - offset) as usize;
            cur == &buf[at..at + cur.len()]
        })?;
        self.next.pwrite(buf, offset, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        if let Some(&(from, to)) = self.overlaps(offset, count).first() {
            return Err(denied(from, to - 1));
        }
        self.next.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.check(offset, count, |cur, _| is_zero(cur))?;
        self.next.zero(offset, count, flags)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "protect",
    summary: "make byte ranges read-only: changing writes, trims and zeroes fail with EPERM",
    description: "Example:\n  nbdkit-rs --filter=protect file disk.img protect=0-1023",
    params: &[Param {
        name: "protect",
        help: "START-END (inclusive), START-, -END or -; ~RANGE protects everything outside RANGE; repeat for several ranges",
    }],
    configure: |cfg| {
        // No protect= at all protects nothing (as nbdkit).
        let vals = cfg.take_all("protect");
        let mut ranges = Vec::new();
        for v in vals {
            ranges.extend(
                parse_range(&v)
                    .map_err(|e| ConfigError::new(format!("protect filter: protect={v}: {e}")))?,
            );
        }
        let ranges = Arc::new(merge(ranges));
        Ok(layer_fn(move |next| {
            Ok(Arc::new(Protect {
                next,
                ranges,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use nbdkit_backend::Config;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0-1023"), Ok(vec![(0, 1023)]));
        assert_eq!(parse_range("1M-"), Ok(vec![(1 << 20, u64::MAX)]));
        assert_eq!(parse_range("-4k"), Ok(vec![(0, 4096)]));
        assert_eq!(parse_range("-"), Ok(vec![(0, u64::MAX)]));
        assert_eq!(parse_range("0x200-01777"), Ok(vec![(512, 1023)]));
        assert_eq!(
            parse_range("~512-1023"),
            Ok(vec![(0, 511), (1024, u64::MAX)])
        );
        assert_eq!(parse_range("~-"), Ok(vec![]));
        assert_eq!(parse_range("~0-"), Ok(vec![]));
        assert!(parse_range("10-5").is_err());
        assert!(parse_range("10").is_err());
        assert!(parse_range("0xzz-").unwrap_err().contains("0xzz"));
        assert_eq!(
            merge(vec![(10, 20), (0, 5), (6, 8), (30, 40)]),
            vec![(0, 8), (10, 20), (30, 40)]
        );
    }

    #[test]
    fn only_unchanging_writes_pass() {
        let mut cfg = Config::new(vec![("protect".into(), "100-199".into())]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "4096".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        let h = layer.layer(plugin).unwrap().open(false, "").unwrap();
        h.pwrite(&[1; 100], 0, false).unwrap();
        h.pwrite(&[1; 100], 200, false).unwrap();
        assert_eq!(
            h.pwrite(&[1; 2], 199, false).unwrap_err().kind(),
            ErrorKind::PermissionDenied
        );
        // Zeroes over bytes that are already zero change nothing.
        h.pwrite(&[0; 300], 0, false).unwrap();
        h.zero(50, 200, ZeroFlags::default()).unwrap();
        assert!(h.trim(0, 101, false).is_err());
        h.trim(200, 100, false).unwrap();
    }
}

#[cfg(test)]
mod complement_tests {
    use super::*;
    use nbdkit_backend::Config;

    fn open(params: &[&str]) -> Box<dyn Handle> {
        let mut cfg = Config::new(
            params
                .iter()
                .map(|v| ("protect".to_string(), v.to_string()))
                .collect(),
        );
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "4096".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        layer.layer(plugin).unwrap().open(false, "").unwrap()
    }

    #[test]
    fn no_range_protects_nothing() {
        open(&[]).pwrite(&[1; 4096], 0, false).unwrap();
    }

    #[test]
    fn a_complemented_range_protects_the_rest() {
        let h = open(&["~512-1023"]);
        h.pwrite(&[1; 512], 512, false).unwrap();
        assert!(h.pwrite(&[1; 1], 511, false).is_err());
        assert!(h.pwrite(&[1; 1], 1024, false).is_err());
        // ~- complements everything: nothing is protected.
        open(&["~-", "~-"]).pwrite(&[1; 4096], 0, false).unwrap();
    }
}
