//! The handshake: option headers, option payloads, and the server's
//! replies to them.

use crate::consts::*;
use crate::{at_least, be16, be32, be64, magic64, ProtoError};

/// Length of an option header on the wire.
pub const OPTION_HEADER_LEN: usize = 16;

/// `IHAVEOPT`, option number, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        at_least(b, OPTION_HEADER_LEN)?;
        magic64(b, IHAVEOPT)?;
        Ok(OptionHeader {
            option: be32(b, 8),
            length: be32(b, 12),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A parsed option with its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO`.
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `SET_META_CONTEXT`.
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    ExtendedHeaders,
    /// Anything this server does not know; answered with `ERR_UNSUP`.
    Unknown(u32),
}

impl OptionRequest {
    /// Parse an option's payload.  Errors mean the payload is malformed and
    /// should be answered with `NBD_REP_ERR_INVALID`.
    pub fn parse(option: u32, payload: &[u8]) -> Result<Self, ProtoError> {
        let no_payload = |r: OptionRequest| {
            if payload.is_empty() {
                Ok(r)
            } else {
                Err(ProtoError::Malformed("option takes no payload"))
            }
        };
        match option {
            OPT_EXPORT_NAME => Ok(OptionRequest::ExportName(string(payload)?)),
            OPT_ABORT => no_payload(OptionRequest::Abort),
            OPT_LIST => no_payload(OptionRequest::List),
            OPT_STARTTLS => no_payload(OptionRequest::StartTls),
            OPT_STRUCTURED_REPLY => no_payload(OptionRequest::StructuredReply),
            OPT_EXTENDED_HEADERS => no_payload(OptionRequest::ExtendedHeaders),
            OPT_INFO | OPT_GO => {
                let mut r = Reader::new(payload);
                let name = r.string_u32()?;
                let n = r.u16()? as usize;
                let mut requests = Vec::with_capacity(n.min(payload.len() / 2));
                for _ in 0..n {
                    requests.push(r.u16()?);
                }
                r.finish()?;
                Ok(OptionRequest::Info {
                    go: option == OPT_GO,
                    name,
                    requests,
                })
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let mut r = Reader::new(payload);
                let export = r.string_u32()?;
                let n = r.u32()? as usize;
                // Each query needs at least its 4-byte length.
                if n > payload.len() / 4 {
                    return Err(ProtoError::Malformed("query count exceeds payload"));
                }
                let mut queries = Vec::with_capacity(n);
                for _ in 0..n {
                    queries.push(r.string_u32()?);
                }
                r.finish()?;
                Ok(OptionRequest::MetaContext {
                    set: option == OPT_SET_META_CONTEXT,
                    export,
                    queries,
                })
            }
            other => Ok(OptionRequest::Unknown(other)),
        }
    }

    /// Encode as a client would send it (used by tests and the fuzzer seeds).
    pub fn encode(&self) -> Vec<u8> {
        let (option, payload) = match self {
            OptionRequest::ExportName(n) => (OPT_EXPORT_NAME, n.as_bytes().to_vec()),
            OptionRequest::Abort => (OPT_ABORT, vec![]),
            OptionRequest::List => (OPT_LIST, vec![]),
            OptionRequest::StartTls => (OPT_STARTTLS, vec![]),
            OptionRequest::StructuredReply => (OPT_STRUCTURED_REPLY, vec![]),
            OptionRequest::ExtendedHeaders => (OPT_EXTENDED_HEADERS, vec![]),
            OptionRequest::Info { go, name, requests } => {
                let mut p = Vec::new();
                p.extend_from_slice(&(name.len() as u32).to_be_bytes());
                p.extend_from_slice(name.as_bytes());
                p.extend_from_slice(&(requests.len() as u16).to_be_bytes());
                for r in requests {
                    p.extend_from_slice(&r.to_be_bytes());
                }
                (if *go { OPT_GO } else { OPT_INFO }, p)
            }
            OptionRequest::MetaContext {
                set,
                export,
                queries,
            } => {
                let mut p = Vec::new();
                p.extend_from_slice(&(export.len() as u32).to_be_bytes());
                p.extend_from_slice(export.as_bytes());
                p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                for q in queries {
                    p.extend_from_slice(&(q.len() as u32).to_be_bytes());
                    p.extend_from_slice(q.as_bytes());
                }
                let o = if *set {
                    OPT_SET_META_CONTEXT
                } else {
                    OPT_LIST_META_CONTEXT
                };
                (o, p)
            }
            OptionRequest::Unknown(o) => (*o, vec![]),
        };
        let mut out = OptionHeader {
            option,
            length: payload.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&payload);
        out
    }
}

/// Validate a protocol string: UTF-8, no NUL, at most 4096 bytes.
fn string(b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > MAX_STRING {
        return Err(ProtoError::StringTooLong(b.len()));
    }
    if b.contains(&0) {
        return Err(ProtoError::BadString);
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString)
}

/// A cursor over an option payload that never reads out of bounds.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(ProtoError::Malformed("payload ends early"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(be16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(be32(self.take(4)?, 0))
    }
    fn string_u32(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        string(self.take(n)?)
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes in payload"))
        }
    }
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting(handshake_flags: u16) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// An option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Parsed option reply header (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        at_least(b, Self::LEN)?;
        magic64(b, OPTION_REPLY_MAGIC)?;
        Ok(OptionReplyHeader {
            option: be32(b, 8),
            reply: be32(b, 12),
            length: be32(b, 16),
        })
    }
}

/// `NBD_REP_SERVER` payload for `NBD_OPT_LIST`.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    d
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    d
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    d
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags, and (unless the client set
/// NO_ZEROES) 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(134);
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.extend_from_slice(&[0u8; 124]);
    }
    d
}

// --- What a client reads: the server's side of the handshake, parsed. ---

/// The server's greeting, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// Newstyle: the server's handshake flags (`FLAG_FIXED_NEWSTYLE`, ...).
    Newstyle(u16),
    /// The old handshake (`NBDMAGIC` then `0x00420281861253`), which sends
    /// the export at once instead of options.
    Oldstyle,
}

impl Greeting {
    pub const LEN: usize = 18;
    /// Parse the first 18 bytes a server sends.
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        at_least(b, Self::LEN)?;
        magic64(b, NBDMAGIC)?;
        if be64(b, 8) != IHAVEOPT {
            return Ok(Greeting::Oldstyle);
        }
        Ok(Greeting::Newstyle(be16(b, 16)))
    }
}

/// An `NBD_REP_INFO` payload (the reply to `NBD_OPT_INFO`/`GO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply<'a> {
    Export {
        size: u64,
        flags: u16,
    },
    /// `NBD_INFO_NAME`: raw bytes (the server's, not checked here).
    Name(&'a [u8]),
    Description(&'a [u8]),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An information type this codec does not know, which a client may
    /// ignore.
    Unknown(u16),
}

impl<'a> InfoReply<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, ProtoError> {
        let short = |need| ProtoError::Short {
            need,
            have: b.len(),
        };
        if b.len() < 2 {
            return Err(short(2));
        }
        Ok(match be16(b, 0) {
            INFO_EXPORT if b.len() < 12 => return Err(short(12)),
            INFO_EXPORT => InfoReply::Export {
                size: be64(b, 2),
                flags: be16(b, 10),
            },
            INFO_NAME => InfoReply::Name(&b[2..]),
            INFO_DESCRIPTION => InfoReply::Description(&b[2..]),
            INFO_BLOCK_SIZE if b.len() < 14 => return Err(short(14)),
            INFO_BLOCK_SIZE => InfoReply::BlockSize {
                minimum: be32(b, 2),
                preferred: be32(b, 6),
                maximum: be32(b, 10),
            },
            other => InfoReply::Unknown(other),
        })
    }
}

/// An `NBD_REP_SERVER` payload ([`rep_server`]): the export's name and
/// description, as raw bytes.
pub fn parse_rep_server(b: &[u8]) -> Result<(&[u8], &[u8]), ProtoError> {
    let mut r = Reader::new(b);
    let n = r.u32()? as usize;
    let name = r.take(n)?;
    Ok((name, &b[4 + n..]))
}

/// An `NBD_REP_META_CONTEXT` payload ([`rep_meta_context`]): the
/// context's id and name.
pub fn parse_rep_meta_context(b: &[u8]) -> Result<(u32, &[u8]), ProtoError> {
    let mut r = Reader::new(b);
    let id = r.u32()?;
    Ok((id, &b[4..]))
}

/// The reply to `NBD_OPT_EXPORT_NAME` ([`export_name_reply`]): size and
/// transmission flags.  `b` holds 10 bytes, or 134 unless NO_ZEROES was
/// agreed.
pub fn parse_export_name_reply(b: &[u8]) -> Result<(u64, u16), ProtoError> {
    at_least(b, 10)?;
    Ok((be64(b, 0), be16(b, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn client_parsers_read_what_the_server_encodes(size: u64, flags: u16, min: u32, pref: u32, max: u32,
                                                        name in ".{0,64}", desc in ".{0,64}", id: u32, nz: bool) {
            let b = info_export(size, flags);
            prop_assert_eq!(InfoReply::parse(&b).unwrap(), InfoReply::Export { size, flags });
            let b = info_block_size(min, pref, max);
            prop_assert_eq!(InfoReply::parse(&b).unwrap(),
                            InfoReply::BlockSize { minimum: min, preferred: pref, maximum: max });
            let b = info_string(INFO_NAME, &name);
            prop_assert_eq!(InfoReply::parse(&b).unwrap(), InfoReply::Name(name.as_bytes()));
            let b = info_string(INFO_DESCRIPTION, &desc);
            prop_assert_eq!(InfoReply::parse(&b).unwrap(), InfoReply::Description(desc.as_bytes()));
            let b = rep_server(&name, &desc);
            prop_assert_eq!(parse_rep_server(&b).unwrap(), (name.as_bytes(), desc.as_bytes()));
            let b = rep_meta_context(id, &name);
            prop_assert_eq!(parse_rep_meta_context(&b).unwrap(), (id, name.as_bytes()));
            let r = export_name_reply(size, flags, nz);
            prop_assert_eq!(r.len(), if nz { 10 } else { 134 });
            prop_assert_eq!(parse_export_name_reply(&r).unwrap(), (size, flags));
            prop_assert_eq!(Greeting::parse(&greeting(flags)).unwrap(), Greeting::Newstyle(flags));
        }

        #[test]
        fn client_parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Greeting::parse(&b);
            let _ = InfoReply::parse(&b);
            let _ = parse_rep_server(&b);
            let _ = parse_rep_meta_context(&b);
            let _ = parse_export_name_reply(&b);
        }
    }

    #[test]
    fn short_or_foreign_server_messages_are_refused() {
        assert!(InfoReply::parse(&info_export(1, 2)[..11]).is_err());
        assert!(InfoReply::parse(&info_block_size(1, 2, 3)[..13]).is_err());
        assert_eq!(InfoReply::parse(&[0, 9, 1]).unwrap(), InfoReply::Unknown(9));
        // A name length past the payload.
        assert!(parse_rep_server(&[0, 0, 0, 5, b'a']).is_err());
        let mut old = greeting(0);
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert_eq!(Greeting::parse(&old).unwrap(), Greeting::Oldstyle);
        assert!(Greeting::parse(&[0; 18]).is_err());
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/._ -]{0,40}"
    }

    fn arb_option() -> impl Strategy<Value = OptionRequest> {
        prop_oneof![
            arb_string().prop_map(OptionRequest::ExportName),
            Just(OptionRequest::Abort),
            Just(OptionRequest::List),
            Just(OptionRequest::StructuredReply),
            Just(OptionRequest::ExtendedHeaders),
            (
                any::<bool>(),
                arb_string(),
                proptest::collection::vec(0u16..8, 0..6)
            )
                .prop_map(|(go, name, requests)| OptionRequest::Info {
                    go,
                    name,
                    requests
                }),
            (
                any::<bool>(),
                arb_string(),
                proptest::collection::vec(arb_string(), 0..6)
            )
                .prop_map(|(set, export, queries)| OptionRequest::MetaContext {
                    set,
                    export,
                    queries
                }),
        ]
    }

    proptest! {
        #[test]
        fn option_roundtrip(opt in arb_option()) {
            let bytes = opt.encode();
            let h = OptionHeader::parse(&bytes).unwrap();
            prop_assert_eq!(h.length as usize, bytes.len() - OPTION_HEADER_LEN);
            let back = OptionRequest::parse(h.option, &bytes[OPTION_HEADER_LEN..]).unwrap();
            prop_assert_eq!(back, opt);
        }

        #[test]
        fn option_parse_never_panics(option in 0u32..16, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = OptionRequest::parse(option, &payload);
        }

        #[test]
        fn truncated_info_is_rejected(name in arb_string(), cut in 1usize..8) {
            let full = OptionRequest::Info { go: true, name, requests: vec![1, 3] }.encode();
            let payload = &full[OPTION_HEADER_LEN..full.len() - cut.min(full.len() - OPTION_HEADER_LEN)];
            prop_assert!(OptionRequest::parse(OPT_GO, payload).is_err());
        }
    }

    #[test]
    fn rejects_nul_in_names_and_huge_query_counts() {
        assert_eq!(
            OptionRequest::parse(OPT_EXPORT_NAME, b"a\0b"),
            Err(ProtoError::BadString)
        );
        assert_eq!(
            OptionRequest::parse(OPT_EXPORT_NAME, &[b'a'; 4097]),
            Err(ProtoError::StringTooLong(4097))
        );
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(OptionRequest::parse(OPT_LIST_META_CONTEXT, &p).is_err());
        assert!(OptionRequest::parse(OPT_LIST, b"x").is_err());
    }

    #[test]
    fn greeting_layout() {
        let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(g[17], 3);
    }
}
