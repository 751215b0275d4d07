//! A small NBD client of our own, for what real clients never send:
//! malformed options, bad requests, protocol edge cases.  Built on the same
//! codec the server uses (nbdkit-proto), but driven byte by byte.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nbdkit_proto::option::{OptionReplyHeader, OPTION_HEADER_LEN};
use nbdkit_proto::*;

pub struct RawClient {
    pub s: UnixStream,
    pub extended: bool,
    pub structured: bool,
    /// After [`RawClient::starttls`], all traffic goes through this.
    pub tls: Option<Box<rustls::StreamOwned<rustls::ClientConnection, UnixStream>>>,
}

/// One reply, gathered from a simple reply or all chunks up to DONE.
#[derive(Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    /// First error seen (0 = success).
    pub error: u32,
    pub error_message: String,
    /// (chunk type, payload) for structured replies.
    pub chunks: Vec<(u16, Vec<u8>)>,
    /// Data of a simple READ reply.
    pub data: Vec<u8>,
}

impl RawClient {
    /// Connect and read the greeting; returns the handshake flags.
    pub fn connect(path: &Path) -> (RawClient, u16) {
        let mut s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        (
            RawClient {
                s,
                extended: false,
                structured: false,
                tls: None,
            },
            flags,
        )
    }

    /// Connect and send fixed-newstyle + no-zeroes client flags.
    pub fn start(path: &Path) -> RawClient {
        let (mut c, _) = Self::connect(path);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        match &mut self.tls {
            Some(t) => t.write_all(b).and_then(|_| t.flush()),
            None => self.s.write_all(b),
        }
        .expect("send");
    }

    pub fn read_exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        match &mut self.tls {
            Some(t) => t.read_exact(&mut v)?,
            None => self.s.read_exact(&mut v)?,
        }
        Ok(v)
    }

    /// True if the server has closed the connection.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        let r = match &mut self.tls {
            Some(t) => t.read(&mut b),
            None => self.s.read(&mut b),
        };
        matches!(r, Ok(0) | Err(_))
    }

    /// True if the *server* closed the connection (EOF or reset), false
    /// if the client's own read timeout fired first or data arrived.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        let r = match &mut self.tls {
            Some(t) => t.read(&mut b),
            None => self.s.read(&mut b),
        };
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    /// Send NBD_OPT_STARTTLS; on ACK, run the TLS handshake and carry on
    /// over TLS.  Returns the option reply type.
    pub fn starttls(&mut self, config: std::sync::Arc<rustls::ClientConfig>) -> u32 {
        let r = self.simple_option(OptionRequest::StartTls);
        if r == REP_ACK {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let conn = rustls::ClientConnection::new(config, name).expect("TLS client");
            let sock = self.s.try_clone().expect("clone socket");
            let mut t = rustls::StreamOwned::new(conn, sock);
            while t.conn.is_handshaking() {
                t.conn.complete_io(&mut t.sock).expect("TLS handshake");
            }
            self.tls = Some(Box::new(t));
        }
        r
    }

    pub fn option(&mut self, o: &OptionRequest) {
        let bytes = o.encode();
        self.send(&bytes);
    }

    pub fn read_option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let h = self
            .read_exact(OptionReplyHeader::LEN)
            .expect("option reply");
        let h = OptionReplyHeader::parse(&h).expect("option reply header");
        let data = self
            .read_exact(h.length as usize)
            .expect("option reply data");
        (h, data)
    }

    /// Read option replies until a final one (ACK or error).
    pub fn read_until_final(&mut self) -> (u32, Vec<(u32, Vec<u8>)>) {
        let mut all = Vec::new();
        loop {
            let (h, d) = self.read_option_reply();
            let fin = h.reply == REP_ACK || h.reply & (1 << 31) != 0;
            all.push((h.reply, d));
            if fin {
                return (h.reply, all);
            }
        }
    }

    /// Simple ACK-style option; returns the reply type.
    pub fn simple_option(&mut self, o: OptionRequest) -> u32 {
        self.option(&o);
        self.read_until_final().0
    }

    /// Negotiate as libnbd would: structured replies (or extended headers),
    /// base:allocation, then GO.  Returns (size, transmission flags).
    pub fn go(&mut self, structured: bool, extended: bool, meta: bool) -> (u64, u16) {
        if extended {
            assert_eq!(self.simple_option(OptionRequest::ExtendedHeaders), REP_ACK);
            self.extended = true;
            self.structured = true;
        } else if structured {
            assert_eq!(self.simple_option(OptionRequest::StructuredReply), REP_ACK);
            self.structured = true;
        }
        if meta {
            self.option(&OptionRequest::MetaContext {
                set: true,
                export: String::new(),
                queries: vec!["base:allocation".into()],
            });
            let (r, all) = self.read_until_final();
            assert_eq!(r, REP_ACK);
            assert_eq!(all[0].0, REP_META_CONTEXT);
        }
        self.option(&OptionRequest::Info {
            go: true,
            name: String::new(),
            requests: vec![INFO_BLOCK_SIZE],
        });
        let (r, all) = self.read_until_final();
        assert_eq!(r, REP_ACK, "GO failed: {all:?}");
        let info = all
            .iter()
            .find(|(t, d)| *t == REP_INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let d = &info.1;
        let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes([d[10], d[11]]);
        (size, flags)
    }

    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut b = h.encode(self.extended);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Read one whole reply.  `read_len` is the data length expected for a
    /// simple READ reply (0 otherwise).
    pub fn reply(&mut self, read_len: usize) -> Reply {
        let mut r = Reply::default();
        loop {
            let first = self.read_exact(4).expect("reply magic");
            let magic = u32::from_be_bytes(first[..4].try_into().unwrap());
            let need = match magic {
                SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
                STRUCTURED_REPLY_MAGIC => STRUCTURED_HEADER_LEN,
                EXTENDED_REPLY_MAGIC => EXTENDED_HEADER_LEN,
                m => panic!("bad reply magic 0x{m:x}"),
            };
            let mut hb = first;
            hb.extend(self.read_exact(need - 4).expect("reply header"));
            let (h, _) = ReplyHeader::parse(&hb).expect("parse reply");
            match h {
                ReplyHeader::Simple { error, cookie } => {
                    assert!(!self.extended, "simple reply with extended headers");
                    r.cookie = cookie;
                    r.error = error;
                    if error == 0 && read_len > 0 {
                        r.data = self.read_exact(read_len).expect("read data");
                    }
                    return r;
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie,
                    length,
                    ..
                } => {
                    r.cookie = cookie;
                    let payload = self.read_exact(length as usize).expect("chunk payload");
                    if kind & (1 << 15) != 0 && r.error == 0 {
                        r.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        let ml = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                        r.error_message = String::from_utf8_lossy(&payload[6..6 + ml]).into_owned();
                    }
                    r.chunks.push((kind, payload));
                    if flags & REPLY_FLAG_DONE != 0 {
                        return r;
                    }
                }
            }
        }
    }
}

pub const OPT_HDR: usize = OPTION_HEADER_LEN;

/// Read `len` bytes at `offset` over a new connection with structured
/// replies; the read must succeed.  Returns the data chunk's bytes.
pub fn read_chunk(socket: &Path, offset: u64, len: u32) -> Vec<u8> {
    let mut c = RawClient::start(socket);
    c.go(true, false, false);
    c.request(CMD_READ, 0, 7, offset, len.into(), &[]);
    let r = c.reply(len as usize);
    assert_eq!(r.error, 0, "{}", r.error_message);
    let (_, chunk) = r
        .chunks
        .into_iter()
        .find(|(t, _)| *t == REPLY_TYPE_OFFSET_DATA)
        .expect("a data chunk");
    chunk[8..].to_vec()
}
