//! `delay`: make requests (and connecting and disconnecting) slower, to
//! simulate a slow disk or network and test timeouts.

use std::sync::Arc;
use std::time::Duration;

use nbdkit_backend::{
    layer_fn, Backend, Config, ConfigError, Error, Extents, FilterSpec, Handle, Param, Result,
    ZeroFlags,
};

/// Request kinds, with their nbdkit key names.
const OPS: [&str; 9] = [
    "read", "write", "zero", "trim", "extents", "cache", "flush", "open", "close",
];

/// The delay syntax (nbdkit_parse_delay's), shared with the server's
/// `--timeout`.
pub(crate) use nbdkit_backend::parse_delay;

fn delays(cfg: &mut Config) -> std::result::Result<[Duration; 9], ConfigError> {
    let mut d = [Duration::ZERO; 9];
    // rdelay/wdelay are the old names of delay-read/delay-write.
    for (i, op) in OPS.iter().enumerate() {
        let mut keys = vec![format!("delay-{op}")];
        match *op {
            "read" => keys.insert(0, "rdelay".into()),
            "write" => keys.insert(0, "wdelay".into()),
            _ => {}
        }
        for key in keys {
            if let Some(v) = cfg.take(&key) {
                d[i] = parse_delay(&v)
                    .map_err(|e| ConfigError::new(format!("delay filter: {key}={v}: {e}")))?;
            }
        }
    }
    Ok(d)
}

struct DelayBackend {
    next: Arc<dyn Backend>,
    d: [Duration; 9],
    /// delay-fast-zero=false: fast zero requests fail at once with ENOTSUP
    /// instead of waiting (so a client falls back without the delay).
    fast_zero_fails: bool,
}

/// Wait `d`, unless the server is exiting or the client hung up (as
/// nbdkit's delay filter, through `nbdkit_nanosleep`): then the request
/// fails at once instead of keeping the server or the connection busy.
fn pause(d: Duration) -> Result<()> {
    if d.is_zero() || nbdkit_backend::nanosleep(d) {
        Ok(())
    } else {
        Err(Error::new(
            nbdkit_backend::ErrorKind::Shutdown,
            "delay filter: interrupted (the server is exiting or the client left)",
        ))
    }
}

impl Backend for DelayBackend {
    fn name(&self) -> &str {
        "delay"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        pause(self.d[7])?;
        Ok(Box::new(DelayHandle {
            next: self.next.open(readonly, export)?,
            d: self.d,
            fast_zero_fails: self.fast_zero_fails,
        }))
    }
}

struct DelayHandle {
    next: Box<dyn Handle>,
    d: [Duration; 9],
    fast_zero_fails: bool,
}

impl Drop for DelayHandle {
    fn drop(&mut self) {
        // The client has normally hung up by now: only a server exit cuts
        // this one short.
        if !self.d[8].is_zero() {
            nbdkit_backend::client::sleep_unless_shutdown(self.d[8]);
        }
    }
}

impl Handle for DelayHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        pause(self.d[0])?;
        self.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        pause(self.d[1])?;
        self.next.pwrite(buf, offset, fua)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        // Failing fast zeroes at once is itself fast-zero support.
        Ok(self.fast_zero_fails || self.next.can_fast_zero()?)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        if flags.fast && self.fast_zero_fails {
            return Err(Error::not_supported(
                "delay filter: fast zero refused at once (delay-fast-zero=false)",
            ));
        }
        pause(self.d[2])?;
        self.next.zero(offset, count, flags)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        pause(self.d[3])?;
        self.next.trim(offset, count, fua)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        pause(self.d[4])?;
        self.next.extents(offset, count, req_one, extents)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        pause(self.d[5])?;
        self.next.cache(offset, count)
    }
    fn flush(&self) -> Result<()> {
        pause(self.d[6])?;
        self.next.flush()
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "delay",
    summary: "delay requests, connecting and disconnecting (simulate a slow disk)",
    description: "Delays are seconds, or with an s or ms suffix.\n\n\
Example:\n  nbdkit-rs --filter=delay memory 1G delay-read=100ms delay-write=0.5",
    params: &[
        Param {
            name: "rdelay",
            help: "old name of delay-read",
        },
        Param {
            name: "wdelay",
            help: "old name of delay-write",
        },
        Param {
            name: "delay-read",
            help: "before each read (old name: rdelay)",
        },
        Param {
            name: "delay-write",
            help: "before each write (old name: wdelay)",
        },
        Param {
            name: "delay-zero",
            help: "before each write-zeroes",
        },
        Param {
            name: "delay-trim",
            help: "before each trim",
        },
        Param {
            name: "delay-extents",
            help: "before each block status",
        },
        Param {
            name: "delay-cache",
            help: "before each cache",
        },
        Param {
            name: "delay-flush",
            help: "before each flush",
        },
        Param {
            name: "delay-fast-zero",
            help: "false: fail fast zero requests at once with ENOTSUP instead of delaying them (default true)",
        },
        Param {
            name: "delay-open",
            help: "when a client connects",
        },
        Param {
            name: "delay-close",
            help: "when a client disconnects",
        },
    ],
    configure: |cfg| {
        let d = delays(cfg)?;
        let fast_zero_fails = !cfg
            .take_bool("delay-fast-zero")
            .map_err(|e| ConfigError::new(format!("delay filter: {e}")))?
            .unwrap_or(true);
        Ok(layer_fn(move |next| {
            Ok(Arc::new(DelayBackend {
                next,
                d,
                fast_zero_fails,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(parse_delay("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_delay("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_delay("-1").is_err());
        assert!(parse_delay("soon").is_err());
        let mut cfg = Config::new(vec![
            ("rdelay".into(), "1ms".into()),
            ("delay-close".into(), "2ms".into()),
        ]);
        let d = delays(&mut cfg).unwrap();
        assert_eq!(d[0], Duration::from_millis(1));
        assert_eq!(d[8], Duration::from_millis(2));
        assert!(cfg.untaken().is_empty());
    }

    #[test]
    fn fast_zero_fails_at_once_when_asked() {
        let mut cfg = Config::new(vec![
            ("delay-zero".into(), "1h".into()),
            ("delay-fast-zero".into(), "false".into()),
        ]);
        let e = (SPEC.configure)(&mut cfg).err();
        // "1h" is not a delay this filter takes: seconds or ms only.
        assert!(e.is_some());
        let mut cfg = Config::new(vec![
            ("delay-zero".into(), "3600".into()),
            ("delay-fast-zero".into(), "false".into()),
        ]);
        let layer = (SPEC.configure)(&mut cfg).unwrap();
        let mut pcfg = Config::new(vec![("size".into(), "1M".into())]);
        let plugin = (nbdkit_plugins::memory::SPEC.create)(&mut pcfg).unwrap();
        let h = layer.layer(plugin).unwrap().open(false, "").unwrap();
        assert!(h.can_fast_zero().unwrap());
        // Would take an hour if it waited.
        let e = h
            .zero(
                0,
                4096,
                ZeroFlags {
                    fast: true,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.kind(), nbdkit_backend::ErrorKind::NotSupported);
    }
}
