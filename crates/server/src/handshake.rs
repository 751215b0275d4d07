//! Fixed newstyle negotiation: greeting, client flags, and the option loop
//! up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME.

use std::sync::Arc;

use nbdkit_backend::Client;
use nbdkit_proto::option::{self as opt, OPTION_HEADER_LEN};
use nbdkit_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::export::Export;
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

/// Context id we give `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The outcome of a successful negotiation.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub style: ReplyStyle,
    /// base:allocation was selected with SET_META_CONTEXT.
    pub meta: bool,
}

struct State {
    structured: bool,
    extended: bool,
    meta: bool,
    fixed: bool,
    no_zeroes: bool,
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
    let conn = client.id();
    let s: &mut dyn Stream = &mut **stream;
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
    let mut st = State {
        structured: false,
        extended: false,
        meta: false,
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    };
    let tls_mode = server.opts.tls.mode;
    let mut encrypted = false;

    // The option count is not reset by STARTTLS, so the limit holds for
    // the whole connection.
    for _ in 0..MAX_OPTIONS {
        // Borrowed anew each time round: STARTTLS replaces the stream.
        let s: &mut dyn Stream = &mut **stream;
        let mut hb = [0u8; OPTION_HEADER_LEN];
        match s.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let h = OptionHeader::parse(&hb)
            .map_err(|e| ConnectionError::Protocol(format!("option header: {e}")))?;
        debug!(
            conn,
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
            continue;
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
        if tls_mode == TlsMode::Require
            && !encrypted
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
            continue;
        }
        let request = match OptionRequest::parse(h.option, &payload) {
            Ok(r) => r,
            Err(e) if h.option == OPT_EXPORT_NAME => {
                return Err(ConnectionError::Protocol(format!("bad export name: {e}")))
            }
            Err(e) => {
                let code = match e {
                    ProtoError::StringTooLong(_) => REP_ERR_TOO_BIG,
                    _ => REP_ERR_INVALID,
                };
                reply(s, h.option, code, e.to_string().as_bytes()).await?;
                continue;
            }
        };
        match request {
            OptionRequest::ExportName(name) => {
                let export = open_export(server, client, &name).await.map_err(|e| {
                    ConnectionError::Protocol(format!("export '{name}' cannot be opened: {e}"))
                })?;
                let flags = export.transmission_flags(st.structured);
                s.write_all(&opt::export_name_reply(
                    export.caps.size,
                    flags,
                    st.no_zeroes,
                ))
                .await?;
                return Ok(Some(Negotiated {
                    export: Arc::new(export),
                    style: st.style(),
                    meta: st.meta,
                }));
            }
            OptionRequest::Abort => {
                // The client may already have closed; a failed ACK is fine.
                let _ = reply(s, h.option, REP_ACK, b"").await;
                return Ok(None);
            }
            OptionRequest::List => {
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
                match exports {
                    Ok(list) => {
                        let default = server.default_export(client).await;
                        for e in list {
                            // "" is listed under the name it stands for;
                            // when the backend has no default export, not
                            // at all (as nbdkit).
                            let name = match (e.name.is_empty(), &default) {
                                (false, _) => e.name,
                                (true, Some(d)) => d.clone(),
                                (true, None) => continue,
                            };
                            let desc = e.description.unwrap_or_default();
                            reply(s, h.option, REP_SERVER, &opt::rep_server(&name, &desc)).await?;
                        }
                        reply(s, h.option, REP_ACK, b"").await?;
                    }
                    Err(e) => {
                        reply(s, h.option, REP_ERR_PLATFORM, e.to_string().as_bytes()).await?
                    }
                }
            }
            OptionRequest::StartTls => {
                let Some(acceptor) = server.opts.tls.acceptor() else {
                    reply(
                        s,
                        h.option,
                        REP_ERR_UNSUP,
                        b"TLS is not configured on this server",
                    )
                    .await?;
                    continue;
                };
                if encrypted {
                    reply(s, h.option, REP_ERR_INVALID, b"TLS is already negotiated").await?;
                    continue;
                }
                reply(s, h.option, REP_ACK, b"").await?;
                // The spec has no way back from a failed TLS handshake: the
                // connection ends with it (the error says why).
                let plain = std::mem::replace(stream, Box::new(Broken(None)));
                *stream = acceptor
                    .accept(plain)
                    .await
                    .map_err(|e| ConnectionError::Protocol(format!("TLS handshake failed: {e}")))?;
                encrypted = true;
                client.set_tls();
                debug!(conn, "TLS established");
                // Per the spec, what was negotiated in plaintext does not
                // carry over into the encrypted session.
                st.structured = false;
                st.extended = false;
                st.meta = false;
            }
            OptionRequest::StructuredReply => {
                if server.opts.no_structured_replies {
                    reply(
                        s,
                        h.option,
                        REP_ERR_UNSUP,
                        b"structured replies are disabled",
                    )
                    .await?;
                } else if st.structured && !st.extended {
                    reply(
                        s,
                        h.option,
                        REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    reply(s, h.option, REP_ACK, b"").await?;
                }
            }
            OptionRequest::ExtendedHeaders => {
                if server.opts.no_structured_replies {
                    reply(s, h.option, REP_ERR_UNSUP, b"extended headers are disabled").await?;
                } else if st.extended {
                    reply(
                        s,
                        h.option,
                        REP_ERR_INVALID,
                        b"extended headers already negotiated",
                    )
                    .await?;
                } else {
                    st.extended = true;
                    st.structured = true;
                    reply(s, h.option, REP_ACK, b"").await?;
                }
            }
            OptionRequest::MetaContext { set, queries, .. } => {
                if server.opts.no_meta_contexts {
                    reply(
                        s,
                        h.option,
                        REP_ERR_UNSUP,
                        b"metadata contexts are disabled",
                    )
                    .await?;
                } else if !st.structured {
                    reply(
                        s,
                        h.option,
                        REP_ERR_INVALID,
                        b"structured replies must be negotiated first",
                    )
                    .await?;
                } else if queries.len() > MAX_QUERIES {
                    reply(s, h.option, REP_ERR_TOO_BIG, b"too many queries").await?;
                } else {
                    let matches = if queries.is_empty() {
                        !set // LIST with no query lists everything; SET selects nothing.
                    } else {
                        queries.iter().any(|q| {
                            q == META_CONTEXT_BASE_ALLOCATION
                                || (!set && (q == "base:" || q == "base"))
                        })
                    };
                    if matches {
                        let id = if set { BASE_ALLOCATION_ID } else { 0 };
                        reply(
                            s,
                            h.option,
                            REP_META_CONTEXT,
                            &opt::rep_meta_context(id, META_CONTEXT_BASE_ALLOCATION),
                        )
                        .await?;
                    }
                    if set {
                        st.meta = matches;
                    }
                    reply(s, h.option, REP_ACK, b"").await?;
                }
            }
            OptionRequest::Info { go, name, requests } => {
                let export = match open_export(server, client, &name).await {
                    Ok(e) => e,
                    Err(e) => {
                        // The client gets the reason too, but libnbd-based
                        // clients often do not show it: log it here.
                        warn!(conn, export = %name, "cannot open export: {e}");
                        reply(s, h.option, REP_ERR_UNKNOWN, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let flags = export.transmission_flags(st.structured);
                reply(
                    s,
                    h.option,
                    REP_INFO,
                    &opt::info_export(export.caps.size, flags),
                )
                .await?;
                if requests.contains(&INFO_NAME) {
                    let shown = if name.is_empty() {
                        export.name.clone()
                    } else {
                        name.clone()
                    };
                    reply(s, h.option, REP_INFO, &opt::info_string(INFO_NAME, &shown)).await?;
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    if let Some(d) = &export.description {
                        reply(
                            s,
                            h.option,
                            REP_INFO,
                            &opt::info_string(INFO_DESCRIPTION, d),
                        )
                        .await?;
                    }
                }
                let (min, pref, max) = export.advertised_block_size();
                reply(s, h.option, REP_INFO, &opt::info_block_size(min, pref, max)).await?;
                reply(s, h.option, REP_ACK, b"").await?;
                if go {
                    return Ok(Some(Negotiated {
                        export: Arc::new(export),
                        style: st.style(),
                        meta: st.meta,
                    }));
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
