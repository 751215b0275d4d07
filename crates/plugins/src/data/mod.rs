//! `data`: a small disk written on the command line.
//!
//! Why: tests of NBD clients need exact little disks — a boot signature at
//! 0x1fe, a partition entry, a repeating pattern — without a file to ship.
//! nbdkit's data plugin describes them inline (`data='0 1 2 @0x1fe 0x55
//! 0xaa'`, `raw=`, `base64=`); this serves the same command lines.  The
//! disk is writable (writes are kept in memory until exit, shared by all
//! clients) and sparse: areas the expression never wrote report as holes.

pub mod expr;
mod optimize;

use std::sync::Arc;

use base64::Engine;
use nbdkit_backend::registry::ANY_KEY;
use nbdkit_backend::{Backend, Config, ConfigError, Handle, Param, PluginSpec, Result};

use crate::memory::{self, SparseMemory};

/// Most bytes of data an expression may expand to: the disk lives in RAM.
pub const DATA_LIMIT: u64 = 1 << 30;

struct Data {
    mem: Arc<SparseMemory>,
}

impl Backend for Data {
    fn name(&self) -> &str {
        "data"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(memory::handle(self.mem.clone()))
    }
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let data = cfg.take("data");
    let raw = cfg.take("raw");
    let b64 = cfg.take("base64");
    let size = cfg.take_size("size")?;
    let allocator = match cfg.take("allocator") {
        Some(a) => memory::Allocator::parse("data", &a)?,
        None => memory::Allocator::Sparse,
    };
    // Other keys are variables for `$NAME` in data=.
    let vars: Vec<(String, String)> = cfg.take_rest();
    let given = [data.is_some(), raw.is_some(), b64.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if given != 1 {
        return Err(ConfigError::new(
            "data: exactly one of data=, raw= or base64= is required",
        ));
    }
    let image = if let Some(text) = &data {
        let lookup = |name: &str| {
            vars.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(name).ok())
        };
        let ctx = expr::Context {
            var: &lookup,
            allow_io: true,
            limit: DATA_LIMIT,
        };
        if let Some((k, _)) = vars.iter().find(|(k, _)| !uses_var(text, &vars, k)) {
            return Err(ConfigError::new(format!(
                "data: parameter '{k}' was given but data= does not use ${k}"
            )));
        }
        expr::evaluate(text, &ctx).map_err(|e| ConfigError::new(format!("data: {e}")))?
    } else {
        if let Some((k, _)) = vars.first() {
            return Err(ConfigError::new(format!(
                "data: unknown parameter '{k}' (variables are only for data=)"
            )));
        }
        let bytes = match (&raw, &b64) {
            (Some(r), _) => r.as_bytes().to_vec(),
            (_, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| ConfigError::new(format!("data: base64=: {e}")))?,
            _ => unreachable!("exactly one source was checked above"),
        };
        expr::Image::from_bytes(&bytes)
    };
    let size = size.unwrap_or(image.size);
    let mem = SparseMemory::with_allocator("data", size, allocator)?;
    for (o, d) in image.runs() {
        if o >= size {
            break;
        }
        let n = d.len().min((size - o) as usize);
        mem.write(&d[..n], o)
            .map_err(|e| ConfigError::new(format!("data: {}", e.message())))?;
    }
    Ok(Arc::new(Data { mem: Arc::new(mem) }))
}

/// True if `$key` appears in the data text or in another variable's value.
fn uses_var(text: &str, vars: &[(String, String)], key: &str) -> bool {
    let refers = |t: &str| {
        t.match_indices('$').any(|(i, _)| {
            let rest = &t[i + 1..];
            rest.starts_with(key)
                && !rest[key.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    refers(text) || vars.iter().any(|(k, v)| k != key && refers(v))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "data",
    summary: "a small disk written on the command line (data=, raw=, base64=)",
    description: "The data= language: bytes (0 1 0x55 0377), words (le16: be32: le64: ...), \
                  base64:TEXT, strings (\"Hello\"), @OFFSET (@1M: decimal with a size suffix) \
                  @+N @-N @^ALIGN, <FILE, <(SCRIPT), ( ... ), \
                  EXPR*N, EXPR[N:M], EXPR -> \\NAME, \\NAME, $VAR (another parameter or an \
                  environment variable), # comments.  Writable unless -r; writes are kept in \
                  memory until exit.\n\n\
                  Example:\n  nbdkit-rs data '0 1 2 3 @0x1fe 0x55 0xaa' size=1M",
    magic_config_key: Some("data"),
    params: &[
        Param {
            name: "data",
            help: "the disk in the data language (the magic key)",
        },
        Param {
            name: "raw",
            help: "the disk's bytes, literally",
        },
        Param {
            name: "base64",
            help: "the disk's bytes, base64-encoded",
        },
        Param {
            name: "size",
            help: "truncate or extend (with zeroes) to this size",
        },
        Param {
            name: "allocator",
            help: "sparse (the only one)",
        },
        Param {
            name: ANY_KEY,
            help: "a variable for $KEY in data=",
        },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(params: &[(&str, &str)]) -> std::result::Result<Vec<u8>, String> {
        let mut cfg = Config::from_pairs(params);
        let b = create(&mut cfg).map_err(|e| e.to_string())?;
        let h = b.open(false, "").unwrap();
        let mut buf = vec![0u8; h.size().unwrap() as usize];
        h.pread(&mut buf, 0).unwrap();
        Ok(buf)
    }

    #[test]
    fn sources_and_size() {
        assert_eq!(disk(&[("base64", "MTIz")]).unwrap(), b"123");
        assert_eq!(disk(&[("raw", "Hi"), ("size", "4")]).unwrap(), b"Hi\0\0");
        assert_eq!(disk(&[("data", "1 2 3 4"), ("size", "2")]).unwrap(), [1, 2]);
        assert_eq!(
            disk(&[("data", "$p*2"), ("p", "0x55 0xAA")]).unwrap(),
            [0x55, 0xaa, 0x55, 0xaa]
        );
        assert!(disk(&[("data", "1"), ("raw", "x")]).is_err());
        assert!(disk(&[]).is_err());
        let e = disk(&[("data", "1"), ("sise", "1M")]).unwrap_err();
        assert!(e.contains("'sise'"), "{e}");
        assert_eq!(
            disk(&[("data", "1"), ("allocator", "zstd")]).unwrap(),
            b"\x01"
        );
        assert!(disk(&[("data", "1"), ("allocator", "foo")]).is_err());
        assert!(disk(&[("base64", "!!")]).is_err());
    }
}
