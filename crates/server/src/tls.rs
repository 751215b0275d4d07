//! TLS with X.509 certificates (rustls, ring provider), entered with
//! NBD_OPT_STARTTLS during the handshake.
//!
//! Certificates are loaded once at start-up from a directory laid out as
//! nbdkit's: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.  Every
//! problem with them is reported then, as one line naming the file, so a
//! misconfigured server never starts and then fails each client.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::{Stream, Transport};

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

/// A mode plus, unless it is `Off`, the loaded certificates.
#[derive(Clone, Default)]
pub struct Tls {
    pub mode: TlsMode,
    acceptor: Option<TlsAcceptor>,
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
    /// `ca-cert.pem`.
    pub fn load(mode: TlsMode, dir: &Path, verify_peer: bool) -> Result<Tls, TlsError> {
        let config = server_config(dir, verify_peer)?;
        Ok(Tls {
            mode,
            acceptor: (mode != TlsMode::Off).then(|| TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// The acceptor, if STARTTLS is allowed.
    pub(crate) fn acceptor(&self) -> Option<&TlsAcceptor> {
        match self.mode {
            TlsMode::Off => None,
            _ => self.acceptor.as_ref(),
        }
    }
}

/// A certificate problem found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, what: impl fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM certificate found in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| invalid(path, format!("not a PEM private key file: {e}")))?
        .ok_or_else(|| invalid(path, "no PEM private key found in the file"))
}

fn server_config(dir: &Path, verify_peer: bool) -> Result<ServerConfig, TlsError> {
    // The process-wide default provider is left alone: an embedding
    // program may have chosen another.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let chain = certs(&cert_path)?;
    let key = key(&key_path)?;
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
    builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&key_path, format!("does not match server-cert.pem: {e}")))
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
