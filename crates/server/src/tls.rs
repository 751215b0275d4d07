//! TLS, entered with NBD_OPT_STARTTLS during the handshake: X.509
//! certificates with rustls (ring provider), or pre-shared keys with the
//! system OpenSSL (feature `tls-psk`; rustls has no external PSKs).  Both
//! end up as one [`Acceptor`] that turns the plain stream into an encrypted
//! [`Stream`], so the handshake code does not know which it is.
//!
//! Credentials are loaded at start-up: certificates from a directory
//! laid out as nbdkit's (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`), keys from a psktool file (`username:hexkey` lines).
//! Every problem with them is reported then, as one line naming the file,
//! so a misconfigured server never starts and then fails each client.
//!
//! They are rotated without a restart: before each TLS handshake the files
//! are looked at (one `stat` each), and when one has changed they are read
//! again for this and later connections (nbdkit re-reads its PSK file on
//! every handshake; a stat is the cheaper test for the same effect).
//! Connections already encrypted keep the keys they started with.  A
//! rotation that leaves the files unusable (a key without its new
//! certificate, half a file) is logged and the previous credentials stay
//! in use, so a careless copy cannot lock every client out.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nbdkit_backend::LockExt;
use nbdkit_tls::dn::{cert_names, CertNames};
use nbdkit_tls::{certs, invalid, private_key, CredentialError};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::stream::{Stream, Transport};
use crate::tls_priority::{Cipher, Group, Priority, Version};

/// `--tls`: whether clients may, or must, use STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is answered with ERR_UNSUP, as if TLS did not exist.
    #[default]
    Off,
    /// Clients choose.
    On,
    /// Every option before STARTTLS is refused with ERR_TLS_REQD.
    Require,
}

impl TlsMode {
    /// The value of `$tls` in `--run` (nbdkit's numbering).
    pub fn as_number(self) -> u8 {
        match self {
            TlsMode::Off => 0,
            TlsMode::On => 1,
            TlsMode::Require => 2,
        }
    }
}

/// A mode plus, unless it is `Off`, the loaded credentials.
#[derive(Clone, Default)]
pub struct Tls {
    pub mode: TlsMode,
    acceptor: Option<Acceptor>,
}

/// What runs the server side of a TLS handshake, and where its
/// credentials come from (to load them again when they change).
#[derive(Clone)]
pub(crate) struct Acceptor(Arc<Rotating>);

/// The credentials in use and the state of their files when read.
struct Rotating {
    source: Source,
    current: Mutex<(Vec<Stamp>, Engine)>,
}

#[derive(Clone)]
enum Source {
    X509 {
        dir: PathBuf,
        verify_peer: bool,
        priority: Priority,
    },
    #[cfg(feature = "tls-psk")]
    Psk(PathBuf, Priority),
}

#[derive(Clone)]
enum Engine {
    /// X.509 certificates (rustls).
    X509(TlsAcceptor),
    /// Pre-shared keys (OpenSSL).
    #[cfg(feature = "tls-psk")]
    Psk(psk::PskAcceptor),
}

/// What tells that a file was changed or replaced.  `None`: it is missing.
#[derive(PartialEq, Eq)]
struct Stamp(Option<(u64, u64, u64, i64, i64, i64, i64)>);

impl Stamp {
    fn of(path: &Path) -> Stamp {
        Stamp(std::fs::metadata(path).ok().map(|m| {
            (
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            )
        }))
    }
}

impl Source {
    fn files(&self) -> Vec<PathBuf> {
        match self {
            Source::X509 {
                dir, verify_peer, ..
            } => {
                let mut f = vec![dir.join("server-cert.pem"), dir.join("server-key.pem")];
                if *verify_peer {
                    f.push(dir.join("ca-cert.pem"));
                }
                f
            }
            #[cfg(feature = "tls-psk")]
            Source::Psk(file, _) => vec![file.clone()],
        }
    }

    fn stamps(&self) -> Vec<Stamp> {
        self.files().iter().map(|f| Stamp::of(f)).collect()
    }

    fn load(&self) -> Result<Engine, TlsError> {
        match self {
            Source::X509 {
                dir,
                verify_peer,
                priority,
            } => Ok(Engine::X509(TlsAcceptor::from(Arc::new(server_config(
                dir,
                *verify_peer,
                priority,
            )?)))),
            #[cfg(feature = "tls-psk")]
            Source::Psk(file, priority) => Ok(Engine::Psk(psk::PskAcceptor::load(file, priority)?)),
        }
    }
}

impl Acceptor {
    fn load(source: Source) -> Result<Acceptor, TlsError> {
        // Stamps first: a change made while loading is seen next time.
        let stamps = source.stamps();
        let engine = source.load()?;
        Ok(Acceptor(Arc::new(Rotating {
            source,
            current: Mutex::new((stamps, engine)),
        })))
    }

    /// The credentials to use now: read again if a file changed since.
    fn engine(&self) -> Engine {
        let r = &self.0;
        let mut cur = r.current.lock_unpoisoned();
        let stamps = r.source.stamps();
        if stamps != cur.0 {
            match r.source.load() {
                Ok(engine) => {
                    tracing::info!("TLS credentials changed: reloaded for new connections");
                    *cur = (stamps, engine);
                }
                Err(e) => {
                    // Remember the stamps so a broken file is reported
                    // once, not on every connection.
                    tracing::warn!("TLS credentials changed but cannot be used ({e}); keeping the previous ones");
                    cur.0 = stamps;
                }
            }
        }
        cur.1.clone()
    }

    /// Run the TLS handshake over `plain` and return the encrypted stream,
    /// with the names in the client's certificate when it presented one
    /// (only asked for, and verified, under `--tls-verify-peer`).
    pub(crate) async fn accept(
        &self,
        plain: Box<dyn Stream>,
    ) -> std::io::Result<(Box<dyn Stream>, Option<CertNames>)> {
        match self.engine() {
            Engine::X509(a) => {
                let s = a.accept(plain).await?;
                let names = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| match cert_names(cert) {
                        Ok(n) => Some(n),
                        Err(e) => {
                            // As nbdkit: no DN is not an error, the
                            // connection goes on without one.
                            tracing::warn!("client certificate: {e}; its DN is not known");
                            None
                        }
                    });
                Ok((Box::new(s), names))
            }
            #[cfg(feature = "tls-psk")]
            Engine::Psk(a) => Ok((a.accept(plain).await?, None)),
        }
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

impl Tls {
    /// TLS disabled.
    pub fn off() -> Tls {
        Tls::default()
    }

    /// Load the certificates in `dir` for `mode` (which must not be `Off`).
    /// With `verify_peer`, clients must present a certificate signed by
    /// `ca-cert.pem`.  `priority` (`--tls-priority`, read for
    /// [`crate::tls_priority::Engine::Rustls`]) limits what is negotiated.
    pub fn load(
        mode: TlsMode,
        dir: &Path,
        verify_peer: bool,
        priority: &Priority,
    ) -> Result<Tls, TlsError> {
        let acceptor = Acceptor::load(Source::X509 {
            dir: absolute(dir),
            verify_peer,
            priority: priority.clone(),
        })?;
        Ok(Tls {
            mode,
            acceptor: (mode != TlsMode::Off).then_some(acceptor),
        })
    }

    /// Load the pre-shared keys in `file` (psktool's `username:hexkey`
    /// lines) for `mode` (which must not be `Off`), limited by `priority`
    /// (read for [`crate::tls_priority::Engine::Psk`]).
    #[cfg(feature = "tls-psk")]
    pub fn load_psk(mode: TlsMode, file: &Path, priority: &Priority) -> Result<Tls, TlsError> {
        let acceptor = Acceptor::load(Source::Psk(absolute(file), priority.clone()))?;
        Ok(Tls {
            mode,
            acceptor: (mode != TlsMode::Off).then_some(acceptor),
        })
    }

    /// Without the `tls-psk` feature there are no pre-shared keys.
    #[cfg(not(feature = "tls-psk"))]
    pub fn load_psk(_mode: TlsMode, _file: &Path, _priority: &Priority) -> Result<Tls, TlsError> {
        Err(TlsError::Config(
            "this nbdkit-rs was built without PSK support (cargo feature tls-psk); \
             use X.509 certificates with --tls-certificates"
                .into(),
        ))
    }

    /// Whether this build supports `--tls-psk`.
    pub const PSK_SUPPORTED: bool = cfg!(feature = "tls-psk");

    /// The acceptor, if STARTTLS is allowed.
    pub(crate) fn acceptor(&self) -> Option<&Acceptor> {
        match self.mode {
            TlsMode::Off => None,
            _ => self.acceptor.as_ref(),
        }
    }
}

/// `path` made absolute, so that it is still found when the files are read
/// again after the daemon has moved to `/`.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A certificate problem found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file that cannot be read or parsed (the message names it).
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The cipher of a rustls suite.  rustls names every suite after its
/// cipher (`TLS13_AES_128_GCM_SHA256`,
/// `TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256`); a suite that matches
/// none of these is one `--tls-priority` has no name for, and is dropped.
fn rustls_cipher(suite: rustls::SupportedCipherSuite) -> Option<Cipher> {
    let name = format!("{:?}", suite.suite());
    [
        ("AES_128_GCM", Cipher::Aes128Gcm),
        ("AES_256_GCM", Cipher::Aes256Gcm),
        ("CHACHA20_POLY1305", Cipher::Chacha20Poly1305),
    ]
    .into_iter()
    .find_map(|(n, c)| name.contains(n).then_some(c))
}

/// The group of a rustls key exchange (`X25519`, `secp256r1`, ...).
fn rustls_group(g: &dyn rustls::crypto::SupportedKxGroup) -> Option<Group> {
    match format!("{:?}", g.name()).as_str() {
        "X25519" => Some(Group::X25519),
        "secp256r1" => Some(Group::Secp256r1),
        "secp384r1" => Some(Group::Secp384r1),
        _ => None,
    }
}

/// ring's provider cut down to what `priority` allows.
fn provider_for(priority: &Priority) -> Result<rustls::crypto::CryptoProvider, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| rustls_cipher(*s).is_some_and(|c| priority.ciphers.contains(&c)));
    provider
        .kx_groups
        .retain(|g| rustls_group(*g).is_some_and(|g| priority.groups.contains(&g)));
    if provider.kx_groups.is_empty() {
        return Err(TlsError::Config(
            "--tls-priority leaves no key exchange group rustls implements".into(),
        ));
    }
    Ok(provider)
}

fn server_config(
    dir: &Path,
    verify_peer: bool,
    priority: &Priority,
) -> Result<ServerConfig, TlsError> {
    // The process-wide default provider is left alone: an embedding
    // program may have chosen another.
    let provider = Arc::new(provider_for(priority)?);
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = priority
        .versions
        .iter()
        .map(|v| match v {
            Version::Tls12 => &rustls::version::TLS12,
            Version::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    // Fails when no suite is left for the versions allowed.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| TlsError::Config(format!("--tls-priority: {e}")))?;
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let chain = certs(&cert_path)?;
    let key = private_key(&key_path)?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for c in certs(&ca_path)? {
            roots
                .add(c)
                .map_err(|e| invalid(&ca_path, format!("unusable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid(&ca_path, e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    // Checks that the key matches the certificate.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&key_path, format!("does not match server-cert.pem: {e}")))?;
    config.ignore_client_order = priority.server_precedence;
    if priority.no_tickets {
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// The default certificate directory, as nbdkit: `/etc/pki/nbdkit` for
/// root, else `$HOME/.pki/nbdkit` (or `$HOME/.config/pki/nbdkit` if only
/// that one exists).
pub fn default_certificates_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/etc/pki/nbdkit");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    let first = home.join(".pki/nbdkit");
    let second = home.join(".config/pki/nbdkit");
    if !first.exists() && second.exists() {
        second
    } else {
        first
    }
}

impl Stream for tokio_rustls::server::TlsStream<Box<dyn Stream>> {
    /// TLS records need the async path: the threaded path reads and writes
    /// raw sockets.
    fn into_blocking(self: Box<Self>) -> Transport {
        Transport::Async(self)
    }
}

#[cfg(feature = "tls-psk")]
mod psk {
    //! TLS-PSK with OpenSSL: TLS 1.3 with an external PSK (SHA-256
    //! suites), or TLS 1.2 (EC)DHE-PSK and PSK suites for older clients.
    //! GnuTLS clients (libnbd, qemu) send the username as the PSK identity.

    use std::path::Path;
    use std::pin::Pin;
    use std::sync::Arc;

    use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslSessionCacheMode, SslVersion};
    use tokio_openssl::SslStream;
    use tracing::{debug, warn};

    use super::TlsError;
    use crate::stream::{Stream, Transport};
    use crate::tls_priority::{Cipher, Group, Priority, Version};

    /// The cipher of an OpenSSL suite name (`TLS_AES_128_GCM_SHA256`,
    /// `ECDHE-PSK-AES256-CBC-SHA384`).
    fn cipher_of(name: &str) -> Option<Cipher> {
        let n = name.replace('_', "-");
        [
            ("AES-128-GCM", Cipher::Aes128Gcm),
            ("AES128-GCM", Cipher::Aes128Gcm),
            ("AES-256-GCM", Cipher::Aes256Gcm),
            ("AES256-GCM", Cipher::Aes256Gcm),
            ("CHACHA20", Cipher::Chacha20Poly1305),
            ("AES128-CBC", Cipher::Aes128Cbc),
            ("AES256-CBC", Cipher::Aes256Cbc),
        ]
        .into_iter()
        .find_map(|(k, c)| n.contains(k).then_some(c))
    }

    /// `list` (OpenSSL's `:`-separated suites) without the suites whose
    /// cipher `priority` excludes.
    fn allowed(list: &str, priority: &Priority) -> String {
        list.split(':')
            .filter(|s| cipher_of(s).is_some_and(|c| priority.ciphers.contains(&c)))
            .collect::<Vec<_>>()
            .join(":")
    }

    #[derive(Clone)]
    pub(crate) struct PskAcceptor {
        ctx: SslContext,
    }

    impl PskAcceptor {
        pub(crate) fn load(path: &Path, priority: &Priority) -> Result<Self, TlsError> {
            // The same file format, parsed by the same code, as the nbd
            // plugin's tls-psk= (crates/tls).
            let keys = Arc::new(nbdkit_tls::load_psk_keys(path)?);
            let cfg = |e: openssl::error::ErrorStack| TlsError::Config(format!("OpenSSL: {e}"));
            let mut b = SslContext::builder(SslMethod::tls_server()).map_err(cfg)?;
            // TLS 1.3 with a PSK from this callback uses a SHA-256 suite.
            let tls13 = allowed(nbdkit_tls::PSK_TLS13_SUITES, priority);
            let tls12 = allowed(nbdkit_tls::PSK_TLS12_CIPHERS, priority);
            let v13 = priority.versions.contains(&Version::Tls13) && !tls13.is_empty();
            let v12 = priority.versions.contains(&Version::Tls12) && !tls12.is_empty();
            if !v12 && !v13 {
                return Err(TlsError::Config(
                    "--tls-priority leaves no pre-shared key suite for the TLS versions it allows \
                     (TLS 1.3 has AES-128-GCM and CHACHA20-POLY1305 with a PSK)"
                        .into(),
                ));
            }
            let lowest = if v12 {
                SslVersion::TLS1_2
            } else {
                SslVersion::TLS1_3
            };
            let highest = if v13 {
                SslVersion::TLS1_3
            } else {
                SslVersion::TLS1_2
            };
            b.set_min_proto_version(Some(lowest)).map_err(cfg)?;
            b.set_max_proto_version(Some(highest)).map_err(cfg)?;
            if v13 {
                b.set_ciphersuites(&tls13).map_err(cfg)?;
            }
            if v12 {
                b.set_cipher_list(&tls12).map_err(cfg)?;
            }
            let groups: Vec<&str> = priority
                .groups
                .iter()
                .map(|g| match g {
                    Group::X25519 => "X25519",
                    Group::Secp256r1 => "P-256",
                    Group::Secp384r1 => "P-384",
                })
                .collect();
            b.set_groups_list(&groups.join(":")).map_err(cfg)?;
            if priority.server_precedence {
                b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
            }
            // One handshake per connection: no session tickets to resume,
            // and no server-side session cache either (with tickets off,
            // OpenSSL keeps every session in that cache instead, up to
            // 20,480 of them: RSS grew ~1.2 KiB per connection, measured
            // by tests/tls_soak.rs).
            b.set_options(SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION);
            b.set_session_cache_mode(SslSessionCacheMode::OFF);
            b.set_psk_server_callback(move |_ssl, identity, out| {
                let user = identity.unwrap_or_default();
                match keys.get(user) {
                    Some(k) if k.len() <= out.len() => {
                        out[..k.len()].copy_from_slice(k);
                        debug!(user = %String::from_utf8_lossy(user), "TLS-PSK: known user");
                        Ok(k.len())
                    }
                    // 0: no key, so the handshake fails (OpenSSL's own
                    // message then only says that no method was left).
                    _ => {
                        match identity {
                            Some(u) => warn!(user = %String::from_utf8_lossy(u), "TLS-PSK: unknown username"),
                            None => warn!("TLS-PSK: the client sent no username"),
                        }
                        Ok(0)
                    }
                }
            });
            Ok(PskAcceptor { ctx: b.build() })
        }

        pub(crate) async fn accept(
            &self,
            plain: Box<dyn Stream>,
        ) -> std::io::Result<Box<dyn Stream>> {
            let ssl = Ssl::new(&self.ctx).map_err(std::io::Error::other)?;
            let mut s = SslStream::new(ssl, plain).map_err(std::io::Error::other)?;
            // The error's text includes OpenSSL's reason ("binder does not
            // verify" for a wrong key).
            Pin::new(&mut s)
                .accept()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(Box::new(s))
        }
    }

    impl Stream for SslStream<Box<dyn Stream>> {
        fn into_blocking(self: Box<Self>) -> Transport {
            Transport::Async(self)
        }
    }
}
