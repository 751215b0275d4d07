//! `ddrescue`: serve a disk image recovered with GNU ddrescue, failing
//! reads (EIO) of every part its mapfile does not mark as rescued (`+`),
//! so that tools see which files and structures the bad areas hit instead
//! of reading them as zeroes.  Read-only.

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, CacheMode, Config, ConfigError, Error, FilterSpec, Handle, Layer, Param,
    Result,
};

/// Parse a number as C's `%i`: `0x` hex, leading-`0` octal, or decimal.
fn parse_num(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// The rescued ranges `[start, end)` of a mapfile, sorted and merged.
fn parse_mapfile(text: &str, file: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    let mut ranges = Vec::new();
    let mut status_seen = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if !line.is_empty() && !status_seen {
            // The first line is ddrescue's current position and status.
            status_seen = true;
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let at = |m: &str| format!("ddrescue-mapfile={file}: line {}: {m}", i + 1);
        let (Some(pos), Some(size)) = (parse_num(f[0]), parse_num(f[1])) else {
            return Err(at("expected 'position size status'"));
        };
        let end = pos
            .checked_add(size)
            .ok_or_else(|| at("block extends past 2^64"))?;
        if f[2] == "+" && size > 0 {
            ranges.push((pos, end));
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Ok(merged)
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let file = c.require("ddrescue-mapfile", "ddrescue filter")?;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| ConfigError::new(format!("ddrescue-mapfile={file}: {e}")))?;
    let ranges = parse_mapfile(&text, &file).map_err(ConfigError::new)?;
    let ranges = Arc::new(ranges);
    Ok(layer_fn(move |next| {
        Ok(Arc::new(Ddrescue { next, ranges }))
    }))
}

struct Ddrescue {
    next: Arc<dyn Backend>,
    ranges: Arc<Vec<(u64, u64)>>,
}

impl Backend for Ddrescue {
    fn name(&self) -> &str {
        "ddrescue"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(DdrescueHandle {
            next: self.next.open(true, export)?,
            ranges: self.ranges.clone(),
        }))
    }
}

struct DdrescueHandle {
    next: Box<dyn Handle>,
    ranges: Arc<Vec<(u64, u64)>>,
}

impl Handle for DdrescueHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    nbdkit_backend::capabilities! {
        can_write: false, can_cache: CacheMode::None,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let i = self.ranges.partition_point(|r| r.1 <= offset);
        match self.ranges.get(i) {
            Some(&(s, e)) if s <= offset && end <= e => self.next.pread(buf, offset),
            _ => Err(Error::io(format!(
                "ddrescue: read of {} bytes at {offset} touches a block the mapfile does not mark rescued",
                buf.len()
            ))),
        }
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "ddrescue",
    summary: "fail reads of the blocks a GNU ddrescue mapfile does not mark rescued",
    description: "Read-only.  Reads touching any block whose status is not '+' fail with EIO.\n\n\
Example:\n  nbdkit-rs --filter=ddrescue file disk.img ddrescue-mapfile=disk.map",
    params: &[Param {
        name: "ddrescue-mapfile",
        help: "FILENAME: the GNU ddrescue mapfile (required)",
    }],
    configure,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapfile() {
        let m = "# c\n0x0 + 1\n0x0  0x200  +\n0x200 0x200 -\n0x400\t0x200\t+\n0x600 0x100 +\n";
        assert_eq!(
            parse_mapfile(m, "f").unwrap(),
            vec![(0, 0x200), (0x400, 0x700)]
        );
        assert!(parse_mapfile("s\n0xZ 1 +\n", "f").is_err());
        assert_eq!(parse_num("010"), Some(8));
    }
}
