//! `error`: inject errors, to test how clients cope.  Each kind of
//! request fails with a chosen error at a chosen rate, optionally only
//! while a trigger file exists (so a test can switch errors on and off).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, Config, ConfigError, Error, ErrorKind, Extents, FilterSpec, Handle, Param,
    Result, ZeroFlags,
};

/// Request kinds with their own `error-OP*` keys.
const OPS: [&str; 7] = [
    "pread", "pwrite", "trim", "zero", "extents", "cache", "flush",
];

#[derive(Debug, Clone)]
struct Rule {
    kind: ErrorKind,
    errno: &'static str,
    /// Probability in 0.0 ..= 1.0.
    rate: f64,
    file: Option<PathBuf>,
}

fn parse_errno(v: &str) -> std::result::Result<(ErrorKind, &'static str), String> {
    Ok(match v.trim().to_ascii_uppercase().as_str() {
        "EPERM" => (ErrorKind::PermissionDenied, "EPERM"),
        "EIO" => (ErrorKind::Io, "EIO"),
        "ENOMEM" => (ErrorKind::OutOfMemory, "ENOMEM"),
        "EINVAL" => (ErrorKind::InvalidInput, "EINVAL"),
        "ENOSPC" => (ErrorKind::NoSpace, "ENOSPC"),
        "ESHUTDOWN" => (ErrorKind::Shutdown, "ESHUTDOWN"),
        "EOVERFLOW" => (ErrorKind::Overflow, "EOVERFLOW"),
        "ENOTSUP" | "EOPNOTSUPP" => (ErrorKind::NotSupported, "ENOTSUP"),
        _ => {
            return Err(
                "expected EPERM, EIO, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN, EOVERFLOW or ENOTSUP"
                    .into(),
            )
        }
    })
}

/// `10%`, `0.1` or `1` (always).
pub(crate) fn parse_rate(v: &str) -> std::result::Result<f64, String> {
    let t = v.trim();
    let bad = || "expected a probability such as 10%, 0.1, 1e-8 or 1:10".to_string();
    let r = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map_err(|_| bad())? / 100.0
    } else if let Some((a, b)) = t.split_once(':').or_else(|| t.split_once('/')) {
        // "1:10" and "1/10": one in ten.
        let a: f64 = a.trim().parse().map_err(|_| bad())?;
        let b: f64 = b.trim().parse().map_err(|_| bad())?;
        if b == 0.0 {
            return Err(bad());
        }
        a / b
    } else {
        t.parse::<f64>().map_err(|_| bad())?
    };
    if !(0.0..=1.0).contains(&r) {
        return Err("the rate must be between 0 and 1 (0% and 100%)".into());
    }
    Ok(r)
}

/// The rules for each op: global `error*` keys, overridden per op.
fn rules(cfg: &mut Config) -> std::result::Result<Vec<Rule>, ConfigError> {
    let bad = |k: &str, v: &str, e: String| ConfigError::new(format!("error filter: {k}={v}: {e}"));
    let mut base = Rule {
        kind: ErrorKind::Io,
        errno: "EIO",
        rate: 0.0,
        file: None,
    };
    if let Some(v) = cfg.take("error") {
        (base.kind, base.errno) = parse_errno(&v).map_err(|e| bad("error", &v, e))?;
    }
    if let Some(v) = cfg.take("error-rate") {
        base.rate = parse_rate(&v).map_err(|e| bad("error-rate", &v, e))?;
    }
    // Trigger files are made absolute now, as nbdkit does: the server
    // changes directory when it goes to the background.
    let trigger = |f: String| std::path::absolute(&f).unwrap_or_else(|_| PathBuf::from(f));
    base.file = cfg.take("error-file").map(trigger);
    let mut out = Vec::new();
    for op in OPS {
        let mut r = base.clone();
        let key = format!("error-{op}");
        if let Some(v) = cfg.take(&key) {
            (r.kind, r.errno) = parse_errno(&v).map_err(|e| bad(&key, &v, e))?;
        }
        let key = format!("error-{op}-rate");
        if let Some(v) = cfg.take(&key) {
            r.rate = parse_rate(&v).map_err(|e| bad(&key, &v, e))?;
        }
        if let Some(f) = cfg.take(&format!("error-{op}-file")) {
            r.file = Some(trigger(f));
        }
        out.push(r);
    }
    Ok(out)
}

struct ErrorBackend {
    next: Arc<dyn Backend>,
    rules: Arc<Vec<Rule>>,
    rng: Arc<AtomicU64>,
}

impl Backend for ErrorBackend {
    fn name(&self) -> &str {
        "error"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ErrorHandle {
            next: self.next.open(readonly, export)?,
            rules: self.rules.clone(),
            rng: self.rng.clone(),
        }))
    }
}

struct ErrorHandle {
    next: Box<dyn Handle>,
    rules: Arc<Vec<Rule>>,
    rng: Arc<AtomicU64>,
}

impl ErrorHandle {
    /// A uniform number in [0, 1) (xorshift: statistical quality is all
    /// that is needed here).
    fn random(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn maybe_fail(&self, op: usize) -> Result<()> {
        let r = &self.rules[op];
        if r.rate <= 0.0 {
            return Ok(());
        }
        if let Some(f) = &r.file {
            if !f.exists() {
                return Ok(());
            }
        }
        if self.random() < r.rate {
            return Err(Error::new(
                r.kind,
                format!("error filter: injected {} on {}", r.errno, OPS[op]),
            ));
        }
        Ok(())
    }
}

impl Handle for ErrorHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.maybe_fail(0)?;
        self.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.maybe_fail(1)?;
        self.next.pwrite(buf, offset, fua)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.maybe_fail(2)?;
        self.next.trim(offset, count, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.maybe_fail(3)?;
        self.next.zero(offset, count, flags)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.maybe_fail(4)?;
        self.next.extents(offset, count, req_one, extents)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.maybe_fail(5)?;
        self.next.cache(offset, count)
    }
    fn flush(&self) -> Result<()> {
        self.maybe_fail(6)?;
        self.next.flush()
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "error",
    summary: "inject errors into requests, at a rate, optionally while a file exists",
    description: "Global keys set every request kind; error-OP, error-OP-rate and\n\
error-OP-file (OP = pread, pwrite, trim, zero, extents, cache, flush)\n\
override them for one kind.  With no rate, nothing fails.\n\n\
Example:\n  nbdkit-rs --filter=error memory 1G error=ENOSPC error-pwrite-rate=10%",
    params: &[
        Param {
            name: "error",
            help: "the error: EIO (default), EPERM, ENOMEM, EINVAL, ENOSPC, ESHUTDOWN, EOVERFLOW, ENOTSUP",
        },
        Param {
            name: "error-rate",
            help: "probability, 0%..100% or 0..1 (default 0: never)",
        },
        Param {
            name: "error-file",
            help: "inject errors only while this file exists",
        },
        Param {
            name: "error-pread",
            help: "the error for pread requests",
        },
        Param {
            name: "error-pread-rate",
            help: "the rate for pread requests",
        },
        Param {
            name: "error-pread-file",
            help: "trigger file for pread requests",
        },
        Param {
            name: "error-pwrite",
            help: "the error for pwrite requests",
        },
        Param {
            name: "error-pwrite-rate",
            help: "the rate for pwrite requests",
        },
        Param {
            name: "error-pwrite-file",
            help: "trigger file for pwrite requests",
        },
        Param {
            name: "error-trim",
            help: "the error for trim requests",
        },
        Param {
            name: "error-trim-rate",
            help: "the rate for trim requests",
        },
        Param {
            name: "error-trim-file",
            help: "trigger file for trim requests",
        },
        Param {
            name: "error-zero",
            help: "the error for zero requests",
        },
        Param {
            name: "error-zero-rate",
            help: "the rate for zero requests",
        },
        Param {
            name: "error-zero-file",
            help: "trigger file for zero requests",
        },
        Param {
            name: "error-extents",
            help: "the error for extents requests",
        },
        Param {
            name: "error-extents-rate",
            help: "the rate for extents requests",
        },
        Param {
            name: "error-extents-file",
            help: "trigger file for extents requests",
        },
        Param {
            name: "error-cache",
            help: "the error for cache requests",
        },
        Param {
            name: "error-cache-rate",
            help: "the rate for cache requests",
        },
        Param {
            name: "error-cache-file",
            help: "trigger file for cache requests",
        },
        Param {
            name: "error-flush",
            help: "the error for flush requests",
        },
        Param {
            name: "error-flush-rate",
            help: "the rate for flush requests",
        },
        Param {
            name: "error-flush-file",
            help: "trigger file for flush requests",
        },
    ],
    configure: |cfg| {
        let rules = Arc::new(rules(cfg)?);
        Ok(layer_fn(move |next| {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1;
            Ok(Arc::new(ErrorBackend {
                next,
                rules,
                rng: Arc::new(AtomicU64::new(seed)),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(parse_rate("10%"), Ok(0.1));
        assert_eq!(parse_rate("1"), Ok(1.0));
        assert!(parse_rate("150%").is_err());
        assert_eq!(parse_rate("1:4"), Ok(0.25));
        assert_eq!(parse_rate("1/10"), Ok(0.1));
        assert!(parse_rate("1:0").is_err());
        assert!(parse_errno("EWHATEVER").is_err());
        let mut cfg = Config::new(vec![
            ("error".into(), "ENOSPC".into()),
            ("error-rate".into(), "50%".into()),
            ("error-pread-rate".into(), "0".into()),
            ("error-flush".into(), "EPERM".into()),
        ]);
        let r = rules(&mut cfg).unwrap();
        assert!(cfg.untaken().is_empty());
        assert_eq!((r[0].rate, r[0].kind), (0.0, ErrorKind::NoSpace));
        assert_eq!((r[1].rate, r[1].kind), (0.5, ErrorKind::NoSpace));
        assert_eq!((r[6].rate, r[6].kind), (0.5, ErrorKind::PermissionDenied));
    }
}
