//! A small HTTP/1.1 server on 127.0.0.1 for the remote-source tests: it
//! serves byte ranges of in-memory files with keep-alive, records every
//! request (with its headers) and the highest number of requests in
//! progress at once, and can be told to misbehave: ignore Range, answer
//! 503 to the next N requests, stall, send short bodies, redirect.
//! (Python's http.server has no Range support, hence this.)
//! [`HttpServer::start_tls`] serves HTTPS (rustls) with a given certificate.
//! Paths are looked up %-decoded (GCS's client escapes '/' and '.' in
//! object names), and answers carry the ETag (a hash of the file's bytes,
//! so replacing a file changes it) and Last-Modified headers object store
//! clients insist on, so the server also stands in for a
//! Google Cloud Storage endpoint (its XML API: `/BUCKET/OBJECT`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server behaves; change it at any time through
/// [`HttpServer::set`].
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Answer every GET with 200 and the whole file, ignoring Range.
    pub no_range: bool,
    /// Answer the next N requests with 503 (counts down).
    pub fail_next: usize,
    /// Read ranged GETs but never answer them (until the server is dropped).
    pub stall: bool,
    /// Answer ranged GETs with a 206 whose body is half the range, framed
    /// consistently (Content-Length says half).
    pub short_body: bool,
    /// Cut the connection in the middle of the body of the next N ranged
    /// GETs (the headers promise the whole range; counts down).
    pub cut_next: usize,
    /// Sleep this long before answering each GET, so overlapping requests
    /// can be counted.
    pub delay: Duration,
    /// Path → Location for a 302 redirect.
    pub redirects: HashMap<String, String>,
    /// Leave the total out of Content-Range (`bytes A-B/*`).
    pub hide_total: bool,
    /// Answer 401 to requests whose Authorization header is not this.
    pub auth: Option<String>,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// A served file: its bytes and its ETag (with the quotes).
type File = (Arc<Vec<u8>>, String);

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, File>>,
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Request>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    stop: AtomicBool,
}

pub struct HttpServer {
    pub port: u16,
    state: Arc<State>,
    scheme: &'static str,
}

impl HttpServer {
    pub fn start() -> HttpServer {
        Self::start_with(None)
    }

    /// HTTPS with the certificate chain and key in these PEM files.
    pub fn start_tls(cert_pem: &std::path::Path, key_pem: &std::path::Path) -> HttpServer {
        let certs: Vec<_> = rustls_pemfile::certs(&mut &std::fs::read(cert_pem).unwrap()[..])
            .map(|c| c.expect("cert"))
            .collect();
        let key = rustls_pemfile::private_key(&mut &std::fs::read(key_pem).unwrap()[..])
            .expect("key")
            .expect("a key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server cert");
        Self::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind http");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => serve(conn, &st),
                    Some(cfg) => {
                        let Ok(sc) = rustls::ServerConnection::new(cfg) else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(sc, conn), &st)
                    }
                });
            }
        });
        HttpServer {
            port,
            state,
            scheme,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// Serve `data` at `path`, replacing what was there (and its ETag).
    pub fn add_file(&self, path: &str, data: Vec<u8>) {
        // FNV-1a: any change of the bytes changes the tag.
        let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let etag = format!("\"{hash:016x}\"");
        self.state
            .files
            .lock()
            .unwrap()
            .insert(path.to_string(), (Arc::new(data), etag));
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap())
    }

    /// Read the current behaviour.
    pub fn set_get<T>(&self, f: impl FnOnce(&Behaviour) -> T) -> T {
        f(&self.state.behaviour.lock().unwrap())
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The most GETs that were being answered at the same moment.
    pub fn max_concurrency(&self) -> usize {
        self.state.max_active.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Decrements the in-progress count when a request is done.
struct Active<'a>(&'a State);
impl<'a> Active<'a> {
    fn new(st: &'a State) -> Self {
        let n = st.active.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_active.fetch_max(n, Ordering::SeqCst);
        Active(st)
    }
}
impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve<S: Read + Write>(conn: S, st: &State) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || st.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, path) = (method.to_string(), path.to_string());
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let req = Request {
            method,
            path,
            headers,
        };
        st.requests.lock().unwrap().push(req.clone());
        if !respond(r.get_mut(), st, &req) || r.get_mut().flush().is_err() {
            return;
        }
    }
}

/// The validators of a file with this ETag (the date never changes).
fn validators(etag: &str) -> String {
    format!("ETag: {etag}\r\nLast-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\n")
}

/// `%XX` escapes decoded (malformed ones kept as they are).
fn percent_decode(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = path.get(i + 1..i + 3).filter(|_| b[i] == b'%');
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Write one response; false to close the connection.
fn respond(out: &mut impl Write, st: &State, req: &Request) -> bool {
    let _active = Active::new(st);
    let b = {
        let mut b = st.behaviour.lock().unwrap();
        let snapshot = b.clone();
        if b.fail_next > 0 {
            b.fail_next -= 1;
        } else if b.cut_next > 0 && req.header("range").is_some() {
            b.cut_next -= 1;
        }
        snapshot
    };
    if !b.delay.is_zero() {
        std::thread::sleep(b.delay);
    }
    if b.fail_next > 0 {
        let body = b"try again later";
        let _ = write!(
            out,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        return out.write_all(body).is_ok();
    }
    if let Some(loc) = b.redirects.get(&req.path) {
        let _ = write!(
            out,
            "HTTP/1.1 302 Found\r\nLocation: {loc}\r\nContent-Length: 0\r\n\r\n"
        );
        return true;
    }
    if let Some(want) = &b.auth {
        if req.header("authorization") != Some(want.as_str()) {
            let body = br#"{"error": {"code": 401, "message": "Invalid Credentials"}}"#;
            let _ = write!(
                out,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            return out.write_all(body).is_ok();
        }
    }
    let Some((data, etag)) = st
        .files
        .lock()
        .unwrap()
        .get(&percent_decode(&req.path))
        .cloned()
    else {
        let _ = write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        return true;
    };
    let head = req.method == "HEAD";
    let range = req
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, z)| Some((a.parse::<u64>().ok()?, z.parse::<u64>().ok()?)));
    let len = data.len() as u64;
    let validators = validators(&etag);
    match range {
        Some((a, z)) if !b.no_range && !head => {
            if b.stall {
                while !st.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return false;
            }
            if a >= len || z < a {
                let _ = write!(
                    out,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
                );
                return true;
            }
            let z = z.min(len - 1);
            let mut body = &data[a as usize..=z as usize];
            if b.cut_next > 0 {
                let _ = write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\n{validators}Content-Range: bytes {a}-{z}/{len}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = out.write_all(&body[..body.len() / 2]);
                let _ = out.flush();
                return false;
            }
            if b.short_body {
                body = &body[..body.len() / 2];
            }
            let total = if b.hide_total {
                "*".to_string()
            } else {
                len.to_string()
            };
            let _ = write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nAccept-Ranges: bytes\r\n{validators}Content-Range: bytes {a}-{z}/{total}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            out.write_all(body).is_ok()
        }
        _ => {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\n{validators}Content-Length: {len}\r\n\r\n"
            );
            if head {
                return true;
            }
            out.write_all(&data).is_ok()
        }
    }
}
