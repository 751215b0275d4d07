//! Fixed newstyle negotiation: greeting, client flags, and the option loop
//! up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME.

use std::sync::Arc;

use nbdkit_backend::Client;
use nbdkit_proto::option::{self as opt, OPTION_HEADER_LEN};
use nbdkit_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::export::Export;
use crate::meta_context::{self, Selected};
use crate::server::Server;
use crate::stream::{Broken, ConnectionError, Stream};
use crate::tls::TlsMode;

/// Largest option payload read into memory.  Export names and queries are
/// at most 4 KiB each, so this leaves room for many meta-context queries.
pub const MAX_OPTION_PAYLOAD: u32 = 64 * 1024;
/// Larger payloads than this are not even skipped: the connection closes.
const MAX_SKIPPED_PAYLOAD: u32 = 16 << 20;
/// Options a client may send before the server gives up on it.
pub const MAX_OPTIONS: usize = 1024;
/// Meta-context queries accepted in one option.
const MAX_QUERIES: usize = 128;

/// The outcome of a successful negotiation.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub style: ReplyStyle,
    /// The contexts the last SET_META_CONTEXT selected.
    pub contexts: Selected,
}

struct State {
    structured: bool,
    extended: bool,
    contexts: Selected,
    fixed: bool,
    no_zeroes: bool,
    encrypted: bool,
}

impl State {
    fn style(&self) -> ReplyStyle {
        if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }

    fn negotiated(&self, export: Export) -> Negotiated {
        Negotiated {
            export: Arc::new(export),
            style: self.style(),
            contexts: self.contexts,
        }
    }
}

/// What reading the next option gave.
enum Next {
    /// The client closed the connection between options.
    Eof,
    /// Refused before parsing (too large, TLS required, malformed) and
    /// answered already.
    Answered,
    Option(u32, OptionRequest),
}

/// One connection's negotiation: who it is for, and what is agreed so far.
struct Negotiation<'a> {
    server: &'a Arc<Server>,
    client: &'a Arc<Client>,
    st: State,
}

/// Run the handshake.  `Ok(None)` means the client ended it politely
/// (NBD_OPT_ABORT or EOF between options).
///
/// After a successful NBD_OPT_STARTTLS, `stream` is replaced by the TLS
/// stream over it, and the caller serves the transmission phase on that.
pub async fn negotiate(
    server: &Arc<Server>,
    stream: &mut Box<dyn Stream>,
    client: &Arc<Client>,
) -> Result<Option<Negotiated>, ConnectionError> {
    let st = greet(server, &mut **stream).await?;
    let mut n = Negotiation { server, client, st };
    // The option count is not reset by STARTTLS, so the limit holds for
    // the whole connection.
    for _ in 0..MAX_OPTIONS {
        // Borrowed anew each time round: STARTTLS replaces the stream.
        let (option, request) = match n.read_option(&mut **stream).await? {
            Next::Eof => return Ok(None),
            Next::Answered => continue,
            Next::Option(o, r) => (o, r),
        };
        let s: &mut dyn Stream = &mut **stream;
        match request {
            OptionRequest::ExportName(name) => return n.export_name(s, &name).await.map(Some),
            OptionRequest::Abort => {
                // The client may already have closed; a failed ACK is fine.
                let _ = reply(s, option, REP_ACK, b"").await;
                return Ok(None);
            }
            OptionRequest::List => n.list(s).await?,
            OptionRequest::StartTls => n.start_tls(stream).await?,
            OptionRequest::StructuredReply => n.structured_reply(s).await?,
            OptionRequest::ExtendedHeaders => n.extended_headers(s).await?,
            OptionRequest::MetaContext { set, queries, .. } => {
                n.meta_context(s, set, &queries).await?
            }
            OptionRequest::Info { go, name, requests } => {
                if let Some(done) = n.info(s, go, &name, &requests).await? {
                    return Ok(Some(done));
                }
            }
            OptionRequest::Unknown(o) => {
                reply(s, o, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
    Err(ConnectionError::Protocol(format!(
        "client sent more than {MAX_OPTIONS} options"
    )))
}

/// Send the greeting and read the client's flags.
async fn greet(server: &Server, s: &mut dyn Stream) -> Result<State, ConnectionError> {
    let hs_flags = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) & server.opts.handshake_mask;
    s.write_all(&opt::greeting(hs_flags)).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 || client_flags & !(hs_flags as u32) != 0 {
        return Err(ConnectionError::Protocol(format!(
            "client sent unknown or unoffered flags 0x{client_flags:x}"
        )));
    }
    Ok(State {
        structured: false,
        extended: false,
        contexts: Selected::default(),
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        encrypted: false,
    })
}

impl Negotiation<'_> {
    /// Read one option: its header, its payload (bounded), and refuse
    /// what cannot go further (too large, before a required STARTTLS,
    /// malformed).
    async fn read_option(&self, s: &mut dyn Stream) -> Result<Next, ConnectionError> {
        let st = &self.st;
        let mut hb = [0u8; OPTION_HEADER_LEN];
        match s.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Next::Eof),
            Err(e) => return Err(e.into()),
        }
        let h = OptionHeader::parse(&hb)
            .map_err(|e| ConnectionError::Protocol(format!("option header: {e}")))?;
        debug!(
            conn = self.client.id(),
            option = option_name(h.option),
            len = h.length,
            "option"
        );
        if h.length > MAX_OPTION_PAYLOAD {
            if h.length > MAX_SKIPPED_PAYLOAD || !st.fixed {
                return Err(ConnectionError::Protocol(format!(
                    "option {} payload of {} bytes is too large",
                    option_name(h.option),
                    h.length
                )));
            }
            skip(s, h.length as u64).await?;
            reply(s, h.option, REP_ERR_TOO_BIG, b"option payload too large").await?;
            return Ok(Next::Answered);
        }
        let mut payload = vec![0u8; h.length as usize];
        s.read_exact(&mut payload).await?;

        if !st.fixed && h.option != OPT_EXPORT_NAME {
            // Plain newstyle has no way to answer other options.
            return Err(ConnectionError::Protocol(format!(
                "option {} from a client without fixed newstyle",
                option_name(h.option)
            )));
        }
        if self.server.opts.tls.mode == TlsMode::Require
            && !st.encrypted
            && !matches!(h.option, OPT_STARTTLS | OPT_ABORT)
        {
            if h.option == OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: all we can do is hang up.
                return Err(ConnectionError::Protocol(
                    "NBD_OPT_EXPORT_NAME before STARTTLS, but --tls=require".into(),
                ));
            }
            reply(
                s,
                h.option,
                REP_ERR_TLS_REQD,
                b"TLS is required on this server",
            )
            .await?;
            return Ok(Next::Answered);
        }
        match OptionRequest::parse(h.option, &payload) {
            Ok(r) => Ok(Next::Option(h.option, r)),
            Err(e) if h.option == OPT_EXPORT_NAME => {
                Err(ConnectionError::Protocol(format!("bad export name: {e}")))
            }
            Err(e) => {
                let code = match e {
                    ProtoError::StringTooLong(_) => REP_ERR_TOO_BIG,
                    _ => REP_ERR_INVALID,
                };
                reply(s, h.option, code, e.to_string().as_bytes()).await?;
                Ok(Next::Answered)
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME: open the export or hang up (it has no error
    /// reply).
    async fn export_name(
        &self,
        s: &mut dyn Stream,
        name: &str,
    ) -> Result<Negotiated, ConnectionError> {
        let export = open_export(self.server, self.client, name)
            .await
            .map_err(|e| {
                ConnectionError::Protocol(format!("export '{name}' cannot be opened: {e}"))
            })?;
        let flags = export.transmission_flags(self.st.structured);
        s.write_all(&opt::export_name_reply(
            export.caps.size,
            flags,
            self.st.no_zeroes,
        ))
        .await?;
        Ok(self.st.negotiated(export))
    }

    /// NBD_OPT_LIST.
    async fn list(&self, s: &mut dyn Stream) -> Result<(), ConnectionError> {
        let (server, client) = (self.server, self.client);
        let exports = server
            .blocking_backend(client, |b, ro| b.list_exports(ro))
            .await;
        // As nbdkit, a name or description over 4096 bytes (the
        // protocol's limit) fails the whole listing.
        let exports = exports.and_then(|list| {
            match list.iter().find(|e| {
                e.name.len() > MAX_STRING
                    || e.description.as_ref().is_some_and(|d| d.len() > MAX_STRING)
            }) {
                Some(_) => Err(nbdkit_backend::Error::invalid(
                    "an export name or description is longer than 4096 bytes",
                )),
                None => Ok(list),
            }
        });
        let list = match exports {
            Ok(list) => list,
            Err(e) => {
                reply(s, OPT_LIST, REP_ERR_PLATFORM, e.to_string().as_bytes()).await?;
                return Ok(());
            }
        };
        let default = server.default_export(client).await;
        for e in list {
            // "" is listed under the name it stands for; when the
            // backend has no default export, not at all (as nbdkit).
            let name = match (e.name.is_empty(), &default) {
                (false, _) => e.name,
                (true, Some(d)) => d.clone(),
                (true, None) => continue,
            };
            let desc = e.description.unwrap_or_default();
            reply(s, OPT_LIST, REP_SERVER, &opt::rep_server(&name, &desc)).await?;
        }
        reply(s, OPT_LIST, REP_ACK, b"").await?;
        Ok(())
    }

    /// NBD_OPT_STARTTLS: replace the stream with TLS over it.
    async fn start_tls(&mut self, stream: &mut Box<dyn Stream>) -> Result<(), ConnectionError> {
        let s: &mut dyn Stream = &mut **stream;
        let Some(acceptor) = self.server.opts.tls.acceptor() else {
            reply(
                s,
                OPT_STARTTLS,
                REP_ERR_UNSUP,
                b"TLS is not configured on this server",
            )
            .await?;
            return Ok(());
        };
        if self.st.encrypted {
            reply(
                s,
                OPT_STARTTLS,
                REP_ERR_INVALID,
                b"TLS is already negotiated",
            )
            .await?;
            return Ok(());
        }
        reply(s, OPT_STARTTLS, REP_ACK, b"").await?;
        // The spec has no way back from a failed TLS handshake: the
        // connection ends with it (the error says why).
        let plain = std::mem::replace(stream, Box::new(Broken(None)));
        let (tls, names) = acceptor
            .accept(plain)
            .await
            .map_err(|e| ConnectionError::Protocol(format!("TLS handshake failed: {e}")))?;
        *stream = tls;
        self.client.set_tls();
        if let Some(n) = names {
            debug!(conn = self.client.id(), dn = %n.subject, issuer = %n.issuer, "client certificate");
            self.client.set_tls_names(n.subject, n.issuer);
        }
        debug!(conn = self.client.id(), "TLS established");
        // Per the spec, what was negotiated in plaintext does not carry
        // over into the encrypted session.
        let st = &mut self.st;
        st.encrypted = true;
        st.structured = false;
        st.extended = false;
        st.contexts = Selected::default();
        Ok(())
    }

    /// NBD_OPT_STRUCTURED_REPLY.
    async fn structured_reply(&mut self, s: &mut dyn Stream) -> Result<(), ConnectionError> {
        let o = OPT_STRUCTURED_REPLY;
        if self.server.opts.no_structured_replies {
            reply(s, o, REP_ERR_UNSUP, b"structured replies are disabled").await?;
        } else if self.st.structured && !self.st.extended {
            let why = b"structured replies already negotiated";
            reply(s, o, REP_ERR_INVALID, why).await?;
        } else {
            self.st.structured = true;
            reply(s, o, REP_ACK, b"").await?;
        }
        Ok(())
    }

    /// NBD_OPT_EXTENDED_HEADERS (which imply structured replies).
    async fn extended_headers(&mut self, s: &mut dyn Stream) -> Result<(), ConnectionError> {
        let o = OPT_EXTENDED_HEADERS;
        if self.server.opts.no_structured_replies {
            reply(s, o, REP_ERR_UNSUP, b"extended headers are disabled").await?;
        } else if self.st.extended {
            reply(
                s,
                o,
                REP_ERR_INVALID,
                b"extended headers already negotiated",
            )
            .await?;
        } else {
            self.st.extended = true;
            self.st.structured = true;
            reply(s, o, REP_ACK, b"").await?;
        }
        Ok(())
    }

    /// NBD_OPT_LIST_META_CONTEXT (`set == false`) or SET_META_CONTEXT
    /// (see [`meta_context`] for the contexts and the queries that name
    /// them).  The export name is not looked at: every export has the same
    /// contexts.
    async fn meta_context(
        &mut self,
        s: &mut dyn Stream,
        set: bool,
        queries: &[String],
    ) -> Result<(), ConnectionError> {
        let o = if set {
            OPT_SET_META_CONTEXT
        } else {
            OPT_LIST_META_CONTEXT
        };
        if self.server.opts.no_meta_contexts {
            reply(s, o, REP_ERR_UNSUP, b"metadata contexts are disabled").await?;
            return Ok(());
        }
        if !self.st.structured {
            let why = b"structured replies must be negotiated first";
            reply(s, o, REP_ERR_INVALID, why).await?;
            return Ok(());
        }
        if queries.len() > MAX_QUERIES {
            reply(s, o, REP_ERR_TOO_BIG, b"too many queries").await?;
            return Ok(());
        }
        let contexts = meta_context::answer(queries, set);
        for c in &contexts {
            // LIST replies carry id 0, as the spec asks.
            let id = if set { c.id() } else { 0 };
            let context = opt::rep_meta_context(id, c.name());
            reply(s, o, REP_META_CONTEXT, &context).await?;
        }
        if set {
            self.st.contexts = Selected::of(&contexts);
        }
        reply(s, o, REP_ACK, b"").await?;
        Ok(())
    }

    /// NBD_OPT_INFO, or NBD_OPT_GO (which ends the negotiation when the
    /// export opens).
    async fn info(
        &self,
        s: &mut dyn Stream,
        go: bool,
        name: &str,
        requests: &[u16],
    ) -> Result<Option<Negotiated>, ConnectionError> {
        let o = if go { OPT_GO } else { OPT_INFO };
        let export = match open_export(self.server, self.client, name).await {
            Ok(e) => e,
            Err(e) => {
                // The client gets the reason too, but libnbd-based
                // clients often do not show it: log it here.
                warn!(conn = self.client.id(), export = %name, "cannot open export: {e}");
                reply(s, o, REP_ERR_UNKNOWN, e.to_string().as_bytes()).await?;
                return Ok(None);
            }
        };
        let flags = export.transmission_flags(self.st.structured);
        let size = export.caps.size;
        reply(s, o, REP_INFO, &opt::info_export(size, flags)).await?;
        if requests.contains(&INFO_NAME) {
            let shown = if name.is_empty() { &export.name } else { name };
            reply(s, o, REP_INFO, &opt::info_string(INFO_NAME, shown)).await?;
        }
        if requests.contains(&INFO_DESCRIPTION) {
            if let Some(d) = &export.description {
                reply(s, o, REP_INFO, &opt::info_string(INFO_DESCRIPTION, d)).await?;
            }
        }
        let (min, pref, max) = export.advertised_block_size();
        reply(s, o, REP_INFO, &opt::info_block_size(min, pref, max)).await?;
        reply(s, o, REP_ACK, b"").await?;
        Ok(go.then(|| self.st.negotiated(export)))
    }
}

async fn open_export(
    server: &Arc<Server>,
    client: &Arc<Client>,
    name: &str,
) -> nbdkit_backend::Result<Export> {
    let default = server.default_export(client).await;
    let name = name.to_string();
    let readonly = server.opts.readonly;
    let model = server.thread_model();
    client.set_export_name(&name);
    server
        .blocking_backend(client, move |b, _| {
            let h = b.open(readonly, &name)?;
            let shown = if name.is_empty() {
                default.unwrap_or_default()
            } else {
                name
            };
            Export::new(h, shown, readonly).map(|e| e.under_thread_model(model))
        })
        .await
}

async fn reply(s: &mut dyn Stream, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&opt::option_reply(option, kind, data)).await?;
    s.flush().await
}

async fn skip(s: &mut dyn Stream, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        s.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}
