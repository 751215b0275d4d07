//! `nbd`: a proxy to another NBD server.
//!
//! Why: to put filters in front of a server that cannot have them (qemu-nbd,
//! another nbdkit, a remote export), to change transport (Unix socket to
//! TCP), or to re-export under another name — nbdkit's nbd plugin does
//! this.  Each client connection opens its own connection to the upstream
//! server and passes through everything it offers: writes, flush, trim,
//! zero (with fast zero), FUA, cache, block status, multi-conn and block
//! sizes.  Requests travel in parallel and replies come back in any order.

pub mod client;

use std::sync::Arc;

use nbdkit_backend::{
    Backend, BlockSize, CacheMode, Config, ConfigError, Error, ErrorKind, Extents, FuaMode, Handle,
    Param, PluginSpec, Result, ZeroFlags, ZeroMode,
};
use nbdkit_proto::consts::*;

use client::{Connection, NbdError, Stream};

#[derive(Debug, Clone)]
enum Target {
    Tcp(String, u16),
    Unix(String),
}

struct Nbd {
    target: Target,
    export: String,
}

fn to_error(what: &str, e: NbdError) -> Error {
    let kind = ErrorKind::from_errno(e.errno as i32);
    if e.message.is_empty() {
        Error::new(kind, format!("nbd: {what} failed upstream"))
    } else {
        Error::new(kind, format!("nbd: {what}: {}", e.message))
    }
}

impl Backend for Nbd {
    fn name(&self) -> &str {
        "nbd"
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        let stream = match &self.target {
            Target::Tcp(h, p) => std::net::TcpStream::connect((h.as_str(), *p))
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                })
                .map_err(|e| Error::from_io(format_args!("nbd: connecting to {h}:{p}"), e))?,
            Target::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|e| Error::from_io(format_args!("nbd: connecting to {path}"), e))?,
        };
        let conn = Connection::open(stream, &self.export).map_err(|e| to_error("handshake", e))?;
        Ok(Box::new(NbdHandle { conn }))
    }
}

struct NbdHandle {
    conn: Connection,
}

impl Drop for NbdHandle {
    fn drop(&mut self) {
        self.conn.close();
    }
}

/// Largest length sent in one trim, zero, cache or block status request
/// (their lengths are 32-bit on the wire).
const MAX_RANGE: u64 = 1 << 30;

impl NbdHandle {
    fn has(&self, flag: u16) -> bool {
        self.conn.info.flags & flag != 0
    }

    fn simple(&self, what: &str, cmd: u16, flags: u16, offset: u64, count: u64) -> Result<()> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(MAX_RANGE);
            self.conn
                .request(cmd, flags, offset + done, n as u32, None)
                .map_err(|e| to_error(what, e))?;
            done += n;
        }
        Ok(())
    }
}

impl Handle for NbdHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.conn.info.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self
            .conn
            .info
            .block_size
            .map(|(minimum, preferred, maximum)| BlockSize {
                minimum,
                preferred,
                maximum,
            }))
    }
    fn can_write(&self) -> Result<bool> {
        Ok(!self.has(FLAG_READ_ONLY))
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.has(FLAG_SEND_FLUSH))
    }
    fn is_rotational(&self) -> Result<bool> {
        Ok(self.has(FLAG_ROTATIONAL))
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(self.has(FLAG_SEND_TRIM))
    }
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.has(FLAG_SEND_WRITE_ZEROES) {
            ZeroMode::Native
        } else if self.can_write()? {
            ZeroMode::Emulate
        } else {
            ZeroMode::None
        })
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(self.has(FLAG_SEND_FAST_ZERO))
    }
    fn can_fua(&self) -> Result<FuaMode> {
        Ok(if self.has(FLAG_SEND_FUA) {
            FuaMode::Native
        } else {
            FuaMode::None
        })
    }
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(self.has(FLAG_CAN_MULTI_CONN))
    }
    fn can_cache(&self) -> Result<CacheMode> {
        Ok(if self.has(FLAG_SEND_CACHE) {
            CacheMode::Native
        } else {
            CacheMode::None
        })
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(self.conn.info.meta_context.is_some())
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self
            .conn
            .request(CMD_READ, 0, offset, buf.len() as u32, None)
            .map_err(|e| to_error("read", e))?;
        buf.copy_from_slice(&r.data);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.conn
            .request(CMD_WRITE, flags, offset, buf.len() as u32, Some(buf))
            .map_err(|e| to_error("write", e))?;
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.conn
            .request(CMD_FLUSH, 0, 0, 0, None)
            .map_err(|e| to_error("flush", e))?;
        Ok(())
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.simple("trim", CMD_TRIM, flags, offset, count)
    }
    fn zero(&self, offset: u64, count: u64, f: ZeroFlags) -> Result<()> {
        let mut flags = 0;
        if f.fua {
            flags |= CMD_FLAG_FUA;
        }
        if !f.may_trim {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if f.fast {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        self.simple("zero", CMD_WRITE_ZEROES, flags, offset, count)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.simple("cache", CMD_CACHE, 0, offset, count)
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let n = count.min(MAX_RANGE);
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let r = self
            .conn
            .request(CMD_BLOCK_STATUS, flags, offset, n as u32, None)
            .map_err(|e| to_error("block status", e))?;
        if r.extents.is_empty() {
            return Err(Error::io("nbd: the server's block status reply was empty"));
        }
        let mut pos = offset;
        for (len, fl) in r.extents {
            extents.add(pos, len as u64, fl & (STATE_HOLE | STATE_ZERO))?;
            pos += len as u64;
        }
        Ok(())
    }
}

/// Parse `nbd://host[:port][/export]` or `nbd+unix:///export?socket=PATH`.
fn parse_uri(uri: &str) -> std::result::Result<(Target, Option<String>), String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let export = path.map(percent_decode).transpose()?;
    match scheme {
        "nbd" => {
            if authority.is_empty() {
                return Err("nbd:// needs a host".into());
            }
            let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                let (h, p) = h.split_once(']').ok_or("bad IPv6 address")?;
                (h.to_string(), p.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            let port = port
                .map(|p| p.parse::<u16>().map_err(|_| format!("bad port '{p}'")))
                .transpose()?
                .unwrap_or(10809);
            Ok((Target::Tcp(host, port), export))
        }
        "nbd+unix" => {
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or("nbd+unix:// needs ?socket=PATH")?;
            Ok((Target::Unix(percent_decode(socket)?), export))
        }
        s => Err(format!(
            "scheme '{s}' is not supported (nbd:// and nbd+unix://; TLS schemes are not supported yet)"
        )),
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3).ok_or("bad %-escape")?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| "bad %-escape")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URI is not UTF-8".into())
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("nbd: {m}"));
    let hostname = cfg.take("hostname");
    let port = cfg.take("port");
    let socket = cfg.take("socket");
    let uri = cfg.take("uri");
    let export = cfg.take("export");
    if let Some(t) = cfg.take("tls") {
        if !matches!(t.as_str(), "off" | "false" | "no" | "0") {
            return Err(cerr(format!(
                "tls={t}: TLS to the upstream server is not supported yet"
            )));
        }
    }
    let given = [hostname.is_some(), socket.is_some(), uri.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if given != 1 {
        return Err(cerr(
            "exactly one of hostname=, socket= or uri= is required".into(),
        ));
    }
    if port.is_some() && hostname.is_none() {
        return Err(cerr("port= goes with hostname=".into()));
    }
    let (target, uri_export) = if let Some(u) = &uri {
        parse_uri(u).map_err(|e| cerr(format!("uri={u}: {e}")))?
    } else if let Some(s) = socket {
        (Target::Unix(s), None)
    } else {
        let port = match port {
            None => 10809,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| cerr(format!("port={p}: expected a port number")))?,
        };
        (Target::Tcp(hostname.unwrap_or_default(), port), None)
    };
    if export.is_some() && uri_export.is_some() {
        return Err(cerr("export= and an export in uri= conflict".into()));
    }
    let export = export.or(uri_export).unwrap_or_default();
    if export.len() > MAX_STRING {
        return Err(cerr("export= is too long".into()));
    }
    Ok(Arc::new(Nbd { target, export }))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "nbd",
    summary: "a proxy to another NBD server, passing through its capabilities",
    description: "Each client connection opens its own connection to the server named by \
                  hostname=/port=, socket= or uri=, and forwards every request.\n\n\
                  Example:\n  nbdkit-rs --filter=log nbd socket=/tmp/qemu.sock logfile=nbd.log",
    magic_config_key: Some("uri"),
    params: &[
        Param {
            name: "hostname",
            help: "the server's host name or address (TCP)",
        },
        Param {
            name: "port",
            help: "its TCP port (default 10809)",
        },
        Param {
            name: "socket",
            help: "the server's Unix socket",
        },
        Param {
            name: "uri",
            help: "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (the magic key)",
        },
        Param {
            name: "export",
            help: "the export name to open (default \"\")",
        },
        Param {
            name: "tls",
            help: "off only: TLS to the server is not supported yet",
        },
    ],
    create,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let (t, e) = parse_uri("nbd://example.com:1234/disk%20a").unwrap();
        assert!(matches!(t, Target::Tcp(ref h, 1234) if h == "example.com"));
        assert_eq!(e.as_deref(), Some("disk a"));
        let (t, e) = parse_uri("nbd://[::1]/").unwrap();
        assert!(matches!(t, Target::Tcp(ref h, 10809) if h == "::1"));
        assert_eq!(e.as_deref(), Some(""));
        let (t, e) = parse_uri("nbd+unix:///x?socket=/tmp/s.sock").unwrap();
        assert!(matches!(t, Target::Unix(ref p) if p == "/tmp/s.sock"));
        assert_eq!(e.as_deref(), Some("x"));
        assert!(parse_uri("nbds://h/").is_err());
        assert!(parse_uri("nbd+unix:///x").is_err());
        assert!(parse_uri("nbd://h:99999/").is_err());
        assert!(parse_uri("nbd://h/%zz").is_err());
    }
}
