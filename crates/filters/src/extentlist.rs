//! `extentlist`: answer block status from a static list of extents read
//! from a file (`offset length [type]` per line), for plugins that cannot
//! say themselves which parts of the disk are allocated.  Ranges the list
//! does not cover are holes that read as zeroes.  The list is not updated
//! by writes, so this is meant for read-only use (`-r`).

use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, parse_size, Backend, Config, ConfigError, Extents, FilterSpec, Handle, Layer, Param,
    Result, EXTENT_HOLE, EXTENT_ZERO,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ext {
    offset: u64,
    length: u64,
    flags: u32,
}

/// Parse the file's text: sorted, non-overlapping extents.
fn parse_list(text: &str, file: &str) -> std::result::Result<Vec<Ext>, String> {
    let mut list = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |msg: String| format!("extentlist={file}: line {}: {msg}", i + 1);
        let mut f = line.split_whitespace();
        let (Some(o), Some(l)) = (f.next(), f.next()) else {
            return Err(at("expected 'offset length [type]'".into()));
        };
        let offset = parse_size(o).map_err(|e| at(format!("offset '{o}': {e}")))?;
        let length = parse_size(l).map_err(|e| at(format!("length '{l}': {e}")))?;
        let flags = match f.next() {
            None => 0,
            Some(t) => parse_type(t).map_err(|e| at(format!("type '{t}': {e}")))?,
        };
        if f.next().is_some() {
            return Err(at("too many fields".into()));
        }
        if offset.checked_add(length).is_none() {
            return Err(at("extent overflows".into()));
        }
        if length > 0 {
            list.push(Ext {
                offset,
                length,
                flags,
            });
        }
    }
    list.sort_by_key(|e| e.offset);
    for w in list.windows(2) {
        if w[0].offset + w[0].length > w[1].offset {
            return Err(format!(
                "extentlist={file}: extents overlap at offset {}",
                w[1].offset
            ));
        }
    }
    Ok(list)
}

fn parse_type(t: &str) -> std::result::Result<u32, String> {
    if let Ok(n) = t.parse::<u32>() {
        return Ok(n);
    }
    let mut flags = 0;
    for w in t.split(',') {
        flags |= match w {
            "hole" => EXTENT_HOLE,
            "zero" => EXTENT_ZERO,
            "" => 0,
            _ => return Err("expected an integer or a list of 'hole' and 'zero'".into()),
        };
    }
    Ok(flags)
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let file = c.require("extentlist", "extentlist filter")?;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| ConfigError::new(format!("extentlist={file}: {e}")))?;
    let list = parse_list(&text, &file).map_err(ConfigError::new)?;
    let list = Arc::new(list);
    Ok(layer_fn(move |next| {
        Ok(Arc::new(ExtentList { next, list }))
    }))
}

struct ExtentList {
    next: Arc<dyn Backend>,
    list: Arc<Vec<Ext>>,
}

impl Backend for ExtentList {
    fn name(&self) -> &str {
        "extentlist"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ExtentListHandle {
            next: self.next.open(readonly, export)?,
            list: self.list.clone(),
        }))
    }
}

struct ExtentListHandle {
    next: Box<dyn Handle>,
    list: Arc<Vec<Ext>>,
}

/// Fill `out` for `[offset, end)` from `list`; gaps are holes.
fn lookup(list: &[Ext], offset: u64, end: u64, out: &mut Extents) -> Result<()> {
    // The first extent that ends after `offset`.
    let mut i = list.partition_point(|e| e.offset + e.length <= offset);
    let mut pos = offset;
    while pos < end {
        match list.get(i) {
            Some(e) if e.offset <= pos => {
                let stop = (e.offset + e.length).min(end);
                out.add(pos, stop - pos, e.flags)?;
                pos = stop;
                i += 1;
            }
            Some(e) => {
                let stop = e.offset.min(end);
                out.add(pos, stop - pos, EXTENT_HOLE | EXTENT_ZERO)?;
                pos = stop;
            }
            None => {
                out.add(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO)?;
                pos = end;
            }
        }
    }
    Ok(())
}

impl Handle for ExtentListHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        let end = offset.saturating_add(count);
        if nbdkit_backend::debug_flag("extentlist", "lookup").unwrap_or(0) != 0 {
            tracing::debug!("extentlist: lookup [{offset}, {end})");
        }
        lookup(&self.list, offset, end, extents)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "extentlist",
    summary: "answer block status from a static list of extents in a file",
    description: "The file has one extent per line: 'offset length [type]', where type is\n\
an integer or a comma-separated list of 'hole' and 'zero' (missing: data).\n\
Uncovered ranges are holes reading as zeroes.  Writes do not update the\n\
list, so use it read-only.\n\n\
Example:\n  nbdkit-rs -r --filter=extentlist ssh host=h path=/disk.img extentlist=disk.extents",
    params: &[Param {
        name: "extentlist",
        help: "FILENAME: the extent list (required)",
    }],
    configure,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_lookup() {
        let l = parse_list("0 1M\n# c\n\n2M 1M hole,zero\n4M 1M 1\n", "f").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].flags, 3);
        let mut e = Extents::new(0, 6 << 20);
        lookup(&l, 0, 6 << 20, &mut e).unwrap();
        let got: Vec<_> = e.list().iter().map(|x| (x.offset >> 20, x.flags)).collect();
        assert_eq!(got, vec![(0, 0), (1, 3), (4, 1), (5, 3)]);
        let mut e = Extents::new(3 << 20, 5 << 20);
        lookup(&l, 3 << 20, 5 << 20, &mut e).unwrap();
        assert_eq!(e.list().len(), 2);
        assert!(parse_list("0 2M\n1M 1M\n", "f").is_err());
        assert!(parse_list("0 1M bogus\n", "f").is_err());
        assert!(parse_list("0\n", "f").is_err());
    }
}
