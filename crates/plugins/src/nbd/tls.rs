//! TLS to the upstream server, for the `nbd` plugin: X.509 with rustls
//! (client side), pre-shared keys with OpenSSL (feature `tls-psk`), as
//! the server does for its own clients (crates/server/src/tls.rs) and for
//! the same reason — rustls has no external pre-shared keys.
//!
//! Both libraries are driven the same way, as an [`Engine`]: TLS records
//! go in, plaintext comes out, and the other way round, without either
//! library touching the socket.  That is what lets one connection be used
//! from many threads at once ([`super::client`]): the reply reader blocks
//! on the socket with no lock held, and only the short encrypt/decrypt
//! steps take the engine's lock.  A TLS library that owns the socket would
//! make a blocked read hold up every writer.
//!
//! Credentials are loaded once, when the plugin is configured, so a
//! missing CA or key file stops the server at start-up instead of failing
//! every client later.  The file formats are those of libnbd and nbdkit
//! (crates/tls reads them, for the server too).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};

use super::socket::Stream;

/// `tls=`: whether to use STARTTLS with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    /// Try STARTTLS; if the server refuses it, carry on in plaintext.
    On,
    /// Fail unless the connection is encrypted.
    Require,
}

impl TlsMode {
    /// As nbdkit: `require` (or `required`, `force`), else a boolean
    /// (`on`/`off`, `true`/`false`, …).
    pub fn parse(s: &str) -> Option<TlsMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "require" | "required" | "force" => Some(TlsMode::Require),
            b => match nbdkit_backend::parse_bool(b) {
                Ok(true) => Some(TlsMode::On),
                Ok(false) => Some(TlsMode::Off),
                Err(_) => None,
            },
        }
    }
}

/// What the command line (and the URI) said about TLS credentials.
#[derive(Debug, Default, Clone)]
pub struct TlsSettings {
    /// `tls-certificates=DIR`: ca-cert.pem, and client-cert.pem +
    /// client-key.pem when present.
    pub certificates: Option<PathBuf>,
    /// `tls-verify=`: verify the server's certificate (default true).
    pub verify: Option<bool>,
    /// `tls-hostname=`, else `hostname=`: the name the certificate must be for.
    pub hostname: Option<String>,
    /// `tls-psk=FILE`: pre-shared keys instead of certificates.
    pub psk: Option<PathBuf>,
    /// `tls-username=`: the PSK identity (default: the local user name).
    pub username: Option<String>,
}

/// Loaded credentials: how to run the client side of a TLS handshake.
pub struct TlsClient {
    kind: Kind,
}

enum Kind {
    X509 {
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    },
    #[cfg(feature = "tls-psk")]
    Psk(psk::PskConnector),
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::X509 { .. } => "TlsClient(X.509)",
            #[cfg(feature = "tls-psk")]
            Kind::Psk(_) => "TlsClient(PSK)",
        })
    }
}

/// libnbd's default certificate directory: `/etc/pki/libnbd` for root,
/// else `$HOME/.pki/libnbd` or `$HOME/.config/pki/libnbd`, whichever
/// exists; `None` when none does (then the system's CAs verify the server).
fn default_certificates_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let candidates = if unsafe { libc::geteuid() } == 0 {
        vec![PathBuf::from("/etc/pki/libnbd")]
    } else {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")]
    };
    candidates.into_iter().find(|d| d.is_dir())
}

/// The system's trusted CAs (the bundle OpenSSL would use).
fn system_roots() -> Result<RootCertStore, String> {
    let probe = openssl_probe::probe();
    let file = probe
        .cert_file
        .ok_or("no tls-certificates= directory and no system CA bundle found")?;
    let mut roots = RootCertStore::empty();
    // A bundle may hold certificates webpki cannot parse; skip those.
    let (added, _) =
        roots.add_parsable_certificates(nbdkit_tls::certs(&file).map_err(|e| e.to_string())?);
    if added == 0 {
        return Err(format!("{}: no usable CA certificate", file.display()));
    }
    Ok(roots)
}

fn roots_from(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in nbdkit_tls::certs(path).map_err(|e| e.to_string())? {
        roots
            .add(c)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The local user name, the default PSK identity (as libnbd).
fn local_username() -> Option<String> {
    // SAFETY: getpwuid_r writes only into the buffers given.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut out = std::ptr::null_mut();
        let r = libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        );
        if r != 0 || out.is_null() || pw.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pw.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

impl TlsClient {
    /// Load the credentials `s` names.  Errors are one line for the user.
    pub fn load(s: &TlsSettings) -> Result<TlsClient, String> {
        if let Some(file) = &s.psk {
            if s.certificates.is_some() {
                return Err("tls-psk= and tls-certificates= cannot be combined".into());
            }
            let user = match &s.username {
                Some(u) => u.clone(),
                None => local_username()
                    .ok_or("tls-psk=: no tls-username= given and the local user name is unknown")?,
            };
            return Self::load_psk(file, &user);
        }
        Self::load_x509(s)
    }

    #[cfg(feature = "tls-psk")]
    fn load_psk(file: &Path, user: &str) -> Result<TlsClient, String> {
        Ok(TlsClient {
            kind: Kind::Psk(psk::PskConnector::load(file, user)?),
        })
    }

    #[cfg(not(feature = "tls-psk"))]
    fn load_psk(_file: &Path, _user: &str) -> Result<TlsClient, String> {
        Err("tls-psk=: this nbdkit-rs was built without PSK support \
             (cargo feature tls-psk); use X.509 certificates with tls-certificates="
            .into())
    }

    fn load_x509(s: &TlsSettings) -> Result<TlsClient, String> {
        let verify = s.verify.unwrap_or(true);
        let dir = s.certificates.clone().or_else(default_certificates_dir);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;

        let verifier: Arc<dyn ServerCertVerifier> = if verify {
            let roots = match &dir {
                Some(d) => roots_from(&d.join("ca-cert.pem"))?,
                None => system_roots()?,
            };
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("CA certificates: {e}"))?;
            if s.hostname.is_some() {
                webpki
            } else {
                // A Unix socket has no host name to check: the certificate
                // must still chain to the CA (libnbd does the same).
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(NoVerify(provider.clone()))
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);

        // A client certificate, for servers that verify their clients
        // (nbdkit --tls-verify-peer, qemu-nbd's default).
        let mut config = match &dir {
            Some(d) if d.join("client-cert.pem").exists() => {
                let chain =
                    nbdkit_tls::certs(&d.join("client-cert.pem")).map_err(|e| e.to_string())?;
                let key_path = d.join("client-key.pem");
                let key = nbdkit_tls::private_key(&key_path).map_err(|e| e.to_string())?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "{}: does not match client-cert.pem: {e}",
                        key_path.display()
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        let name = match &s.hostname {
            Some(h) => ServerName::try_from(h.clone())
                .map_err(|_| format!("'{h}' is not a valid TLS host name"))?,
            None => {
                // Nothing to name in SNI either.
                config.enable_sni = false;
                ServerName::try_from("localhost").map_err(|e| e.to_string())?
            }
        };
        Ok(TlsClient {
            kind: Kind::X509 {
                config: Arc::new(config),
                name,
            },
        })
    }

    /// Run the TLS handshake over `sock` (just after the server's ACK to
    /// STARTTLS) and return the encrypted stream.
    pub fn handshake(&self, sock: Stream) -> io::Result<TlsStream> {
        let engine: Box<dyn Engine> = match &self.kind {
            Kind::X509 { config, name } => {
                let mut c = ClientConnection::new(config.clone(), name.clone())
                    .map_err(io::Error::other)?;
                // Plaintext is encrypted and taken out at once (see
                // Writer in client.rs), so rustls need not bound it.
                c.set_buffer_limit(None);
                Box::new(RustlsEngine(c))
            }
            #[cfg(feature = "tls-psk")]
            Kind::Psk(p) => Box::new(p.engine()?),
        };
        let mut t = TlsStream {
            engine,
            sock,
            plain: Vec::new(),
            pos: 0,
        };
        t.handshake()?;
        Ok(t)
    }
}

/// Verifies the chain to the CA but not the name (no name to check).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        // webpki checks the chain first: a name error means the chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(NotValidForName))
            | Err(rustls::Error::InvalidCertificate(NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `tls-verify=false`: any certificate is accepted (the handshake's
/// signatures are still checked, so the session is encrypted to whoever
/// holds the certificate's key — only who that is goes unchecked).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS session that does no I/O of its own.
pub(crate) trait Engine: Send {
    /// Take TLS records read from the socket; append what they decrypt to
    /// `plain`.  Returns false once the server has closed the session.
    fn feed(&mut self, records: &[u8], plain: &mut Vec<u8>) -> io::Result<bool>;
    /// Encrypt `data` (taken out with [`Engine::take_output`]).
    fn write_plain(&mut self, data: &[u8]) -> io::Result<()>;
    /// Append the TLS records waiting to be sent to `out`.
    fn take_output(&mut self, out: &mut Vec<u8>) -> io::Result<()>;
    fn handshaking(&self) -> bool;
    /// Move the handshake on where the library needs a call for it.
    fn drive_handshake(&mut self) -> io::Result<()>;
    /// Queue close_notify.
    fn close(&mut self);
}

struct RustlsEngine(ClientConnection);

impl Engine for RustlsEngine {
    fn feed(&mut self, mut records: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        // read_tls takes at most one buffer's worth at a time, and refuses
        // more while decrypted data waits: process and drain after each.
        while !records.is_empty() {
            if self.0.read_tls(&mut records)? == 0 {
                break;
            }
            let state = self
                .0
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let start = plain.len();
                plain.resize(start + n, 0);
                self.0.reader().read_exact(&mut plain[start..])?;
            }
            if state.peer_has_closed() {
                return Ok(false);
            }
        }
        Ok(true)
    }
    fn write_plain(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.writer().write_all(data)
    }
    fn take_output(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        while self.0.wants_write() {
            self.0.write_tls(out)?;
        }
        Ok(())
    }
    fn handshaking(&self) -> bool {
        self.0.is_handshaking()
    }
    fn drive_handshake(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn close(&mut self) {
        self.0.send_close_notify();
    }
}

/// A blocking TLS stream over a socket, for the NBD handshake (one thread)
/// and then split for the connection's reader and writers.
pub struct TlsStream {
    engine: Box<dyn Engine>,
    sock: Stream,
    /// Decrypted bytes not yet read, from `pos`.
    plain: Vec<u8>,
    pos: usize,
}

impl TlsStream {
    fn flush_output(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        self.engine.take_output(&mut out)?;
        if !out.is_empty() {
            self.sock.write_all(&out)?;
        }
        Ok(())
    }

    fn handshake(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let step = self.engine.drive_handshake();
            // Send whatever the engine has, an alert included when it failed.
            let sent = self.flush_output();
            step?;
            sent?;
            if !self.engine.handshaking() {
                return Ok(());
            }
            let n = self.sock.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                ));
            }
            let fed = self.engine.feed(&buf[..n], &mut self.plain);
            if fed.is_err() {
                let _ = self.flush_output();
            }
            fed?;
        }
    }

    /// The parts for a connection used from many threads: the engine, the
    /// socket, and plaintext already decrypted but not yet read.
    pub(crate) fn into_parts(self) -> (Box<dyn Engine>, Stream, Vec<u8>) {
        let TlsStream {
            engine,
            sock,
            mut plain,
            pos,
        } = self;
        plain.drain(..pos);
        (engine, sock, plain)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tmp = vec![0u8; 16 << 10];
        while self.pos == self.plain.len() {
            self.plain.clear();
            self.pos = 0;
            self.flush_output()?;
            let n = self.sock.read(&mut tmp)?;
            if n == 0 {
                return Ok(0);
            }
            if !self.engine.feed(&tmp[..n], &mut self.plain)? && self.plain.is_empty() {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.engine.write_plain(buf)?;
        self.flush_output()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_output()
    }
}

#[cfg(feature = "tls-psk")]
mod psk {
    //! TLS-PSK with OpenSSL over memory buffers: TLS 1.3 with an external
    //! PSK (SHA-256 suites, which GnuTLS servers such as qemu-nbd and
    //! nbdkit pick too), or TLS 1.2 PSK suites.

    use std::io::{self, Read, Write};
    use std::path::Path;

    use openssl::ssl::{
        ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
    };

    use super::Engine;

    pub(super) struct PskConnector {
        ctx: SslContext,
    }

    impl PskConnector {
        pub(super) fn load(file: &Path, user: &str) -> Result<PskConnector, String> {
            let keys = nbdkit_tls::load_psk_keys(file).map_err(|e| e.to_string())?;
            let key = keys.get(user.as_bytes()).cloned().ok_or_else(|| {
                format!(
                    "{}: no key for the user '{user}' (set tls-username=)",
                    file.display()
                )
            })?;
            let identity = user.as_bytes().to_vec();
            let cfg = |e: openssl::error::ErrorStack| format!("OpenSSL: {e}");
            let mut b = SslContext::builder(SslMethod::tls_client()).map_err(cfg)?;
            b.set_min_proto_version(Some(SslVersion::TLS1_2))
                .map_err(cfg)?;
            b.set_ciphersuites(nbdkit_tls::PSK_TLS13_SUITES)
                .map_err(cfg)?;
            b.set_cipher_list(nbdkit_tls::PSK_TLS12_CIPHERS)
                .map_err(cfg)?;
            b.set_options(SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION);
            // The key authenticates the server: there is no certificate.
            b.set_verify(SslVerifyMode::NONE);
            b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
                // The identity goes out NUL-terminated; 0 means "no key"
                // and fails the handshake.
                if identity.len() >= id_out.len() || key.len() > key_out.len() {
                    return Ok(0);
                }
                id_out[..identity.len()].copy_from_slice(&identity);
                id_out[identity.len()] = 0;
                key_out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
            Ok(PskConnector { ctx: b.build() })
        }

        pub(super) fn engine(&self) -> io::Result<OpensslEngine> {
            let mut ssl = Ssl::new(&self.ctx).map_err(io::Error::other)?;
            ssl.set_connect_state();
            let s = SslStream::new(ssl, MemBio::default()).map_err(io::Error::other)?;
            Ok(OpensslEngine {
                s,
                handshaking: true,
                closed: false,
            })
        }
    }

    /// OpenSSL's view of the socket: records fed in, records to send.
    #[derive(Default)]
    pub(super) struct MemBio {
        input: Vec<u8>,
        pos: usize,
        output: Vec<u8>,
    }

    impl Read for MemBio {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.input.len() {
                self.input.clear();
                self.pos = 0;
                // "Not yet": OpenSSL reports WANT_READ, and the caller
                // feeds more when the socket has some.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for MemBio {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    pub(super) struct OpensslEngine {
        s: SslStream<MemBio>,
        handshaking: bool,
        closed: bool,
    }

    fn ssl_err(e: openssl::ssl::Error) -> io::Error {
        // The text includes OpenSSL's reason (a wrong key is "decrypt error"
        // or "bad record mac" from the server's alert).
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    }

    impl Engine for OpensslEngine {
        fn feed(&mut self, records: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
            self.s.get_mut().input.extend_from_slice(records);
            if self.handshaking {
                self.drive_handshake()?;
                if self.handshaking {
                    return Ok(true);
                }
            }
            let mut buf = [0u8; 16 << 10];
            loop {
                match self.s.ssl_read(&mut buf) {
                    Ok(0) => {
                        self.closed = true;
                        return Ok(false);
                    }
                    Ok(n) => plain.extend_from_slice(&buf[..n]),
                    Err(e) if e.code() == ErrorCode::WANT_READ => return Ok(true),
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                        self.closed = true;
                        return Ok(false);
                    }
                    Err(e) => return Err(ssl_err(e)),
                }
            }
        }
        fn write_plain(&mut self, mut data: &[u8]) -> io::Result<()> {
            while !data.is_empty() {
                let n = self.s.ssl_write(data).map_err(ssl_err)?;
                data = &data[n..];
            }
            Ok(())
        }
        fn take_output(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
            out.append(&mut self.s.get_mut().output);
            Ok(())
        }
        fn handshaking(&self) -> bool {
            self.handshaking
        }
        fn drive_handshake(&mut self) -> io::Result<()> {
            if !self.handshaking {
                return Ok(());
            }
            match self.s.connect() {
                Ok(()) => {
                    self.handshaking = false;
                    Ok(())
                }
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                    Ok(())
                }
                Err(e) => Err(ssl_err(e)),
            }
        }
        fn close(&mut self) {
            if !self.closed && !self.handshaking {
                let _ = self.s.shutdown();
            }
        }
    }
}
