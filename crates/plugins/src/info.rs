//! `info`: a disk whose content is information about the connection.
//!
//! Why: testing clients and measuring latency needs a server that tells
//! the client what it saw: the export name it sent (`mode=exportname`, or
//! base64-decoded with `mode=base64exportname`, handy for passing a small
//! bootable disk in a URI), its address as the server sees it
//! (`mode=address`), or the server's clock, uptime or time since the
//! connection opened (`mode=time|uptime|conntime`, 8-byte big-endian
//! seconds then 4-byte microseconds), or the server's version
//! (`mode=version`).  Same modes and formats as nbdkit's info plugin.
//! Read-only.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use nbdkit_backend::{
    Backend, Client, ConfigError, Error, Handle, Param, Peer, PluginSpec, Result,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    ExportName,
    Base64ExportName,
    Address,
    Time,
    Uptime,
    ConnTime,
    Version,
}

struct Info {
    mode: Mode,
    started: Instant,
}

impl Backend for Info {
    fn name(&self) -> &str {
        "info"
    }
    fn open(&self, _readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let content = match self.mode {
            Mode::ExportName => Content::Fixed(export.as_bytes().to_vec()),
            Mode::Base64ExportName => Content::Fixed(
                base64::engine::general_purpose::STANDARD
                    .decode(export.trim())
                    .map_err(|e| {
                        Error::invalid(format!("info: the export name is not base64: {e}"))
                    })?,
            ),
            Mode::Address => {
                let client = Client::current()
                    .ok_or_else(|| Error::io("info: no client connection is known here"))?;
                Content::Fixed(match client.peer() {
                    Peer::Tcp(a) => a.to_string().into_bytes(),
                    // As nbdkit: no host paths leak out.
                    Peer::Unix { .. } => b"unix".to_vec(),
                    Peer::Stdio => {
                        return Err(Error::not_supported(
                            "info: mode=address: this client (-s) has no address",
                        ))
                    }
                })
            }
            Mode::Time => Content::Clock(Clock::Wall),
            Mode::Uptime => Content::Clock(Clock::Since(self.started)),
            Mode::ConnTime => Content::Clock(Clock::Since(Instant::now())),
            // The nbdkit version this server stands in for, as
            // `--version` and `--dump-config`'s version= report it, so a
            // client sees one version whichever way it asks.
            Mode::Version => Content::Fixed(nbdkit_backend::NBDKIT_VERSION.as_bytes().to_vec()),
        };
        Ok(Box::new(InfoHandle { content }))
    }
}

enum Clock {
    Wall,
    Since(Instant),
}

enum Content {
    Fixed(Vec<u8>),
    Clock(Clock),
}

struct InfoHandle {
    content: Content,
}

/// Seconds (8 bytes) and microseconds (4 bytes), big-endian.
fn time_bytes(d: Duration) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&d.as_secs().to_be_bytes());
    b[8..].copy_from_slice(&d.subsec_micros().to_be_bytes());
    b
}

impl Handle for InfoHandle {
    fn size(&self) -> Result<u64> {
        Ok(match &self.content {
            Content::Fixed(d) => d.len() as u64,
            Content::Clock(_) => 12,
        })
    }
    fn can_multi_conn(&self) -> Result<bool> {
        // Every connection reads its own, unchanging view.
        Ok(matches!(self.content, Content::Fixed(_)))
    }
    // As nbdkit's: the bytes are in memory already, so caching is a no-op.
    nbdkit_backend::capabilities! { can_cache: nbdkit_backend::CacheMode::Native }
    fn cache(&self, _offset: u64, _count: u64) -> Result<()> {
        Ok(())
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let clock;
        let data: &[u8] = match &self.content {
            Content::Fixed(d) => d,
            Content::Clock(c) => {
                let d = match c {
                    Clock::Wall => SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default(),
                    Clock::Since(t) => t.elapsed(),
                };
                clock = time_bytes(d);
                &clock
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = data
            .get(start..start.saturating_add(buf.len()))
            .ok_or_else(|| Error::overflow("info: read beyond the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "info",
    summary: "a read-only disk holding the export name, client address or a clock",
    description: "mode=exportname (default): the export name the client sent.  \
                  base64exportname: that name base64-decoded.  address: the client's \
                  address and port (\"unix\" for Unix sockets).  time, uptime, conntime: \
                  12 bytes, seconds (8, big-endian) and microseconds (4) of the wall clock, \
                  the server's uptime or the connection's age.  version: the nbdkit \
                  version this server implements, as text (e.g. 1.32.5).\n\n\
                  Example:\n  nbdkit-rs info mode=address\n  \
                  nbdsh -u nbd://localhost -c 'print(h.pread(h.get_size(), 0))'",
    magic_config_key: Some("mode"),
    params: &[Param {
        name: "mode",
        help: "exportname, base64exportname, address, time, uptime, conntime or version (the magic key)",
    }],
    create: |cfg| {
        let mode = match cfg.take("mode").as_deref() {
            None | Some("exportname") => Mode::ExportName,
            Some("base64exportname") => Mode::Base64ExportName,
            Some("address") => Mode::Address,
            Some("time") => Mode::Time,
            Some("uptime") => Mode::Uptime,
            Some("conntime") => Mode::ConnTime,
            Some("version") => Mode::Version,
            Some(m) => {
                return Err(ConfigError::new(format!(
                    "info: mode={m}: expected exportname, base64exportname, address, time, uptime, conntime or version"
                )))
            }
        };
        Ok(Arc::new(Info {
            mode,
            started: Instant::now(),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_and_clocks() {
        let info = |mode| Info {
            mode,
            started: Instant::now(),
        };
        let h = info(Mode::ExportName).open(true, "hello").unwrap();
        let mut b = [0u8; 5];
        h.pread(&mut b, 0).unwrap();
        assert_eq!(&b, b"hello");
        assert!(h.pread(&mut b, 1).is_err());
        let h = info(Mode::Base64ExportName).open(true, "MTIz").unwrap();
        assert_eq!(h.size().unwrap(), 3);
        assert!(info(Mode::Base64ExportName).open(true, "!").is_err());
        let h = info(Mode::Time).open(true, "").unwrap();
        let mut t = [0u8; 12];
        h.pread(&mut t, 0).unwrap();
        let secs = u64::from_be_bytes(t[..8].try_into().unwrap());
        assert!(secs > 1_600_000_000);
        assert!(u32::from_be_bytes(t[8..].try_into().unwrap()) < 1_000_000);
        assert!(!h.can_write().unwrap());
        let h = info(Mode::Version).open(true, "").unwrap();
        let mut v = vec![0u8; h.size().unwrap() as usize];
        h.pread(&mut v, 0).unwrap();
        assert_eq!(v, nbdkit_backend::NBDKIT_VERSION.as_bytes());
    }
}
