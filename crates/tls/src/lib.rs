//! TLS credential files, shared by the server (`nbdkit-server`'s `tls`
//! module) and the `nbd` plugin's client (`nbdkit-plugins`' `nbd::tls`).
//!
//! Why a crate of its own: the plugins must not depend on the server, yet a
//! keys file given to `--tls-psk` and to the nbd plugin's `tls-psk=` is one
//! format and must be read one way, with the same errors; likewise PEM
//! certificates and keys.  Nothing here does TLS, so the crate pulls in
//! neither rustls nor OpenSSL — only PEM parsing, and (`dn`) reading the
//! names in a client certificate.
//!
//! Every error names the file (and for key files the line), because these
//! are read at start-up and the message is all the user gets.

pub mod dn;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A credential file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
}

/// Read a whole credential file.
pub fn read(path: &Path) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(path).map_err(|source| CredentialError::Read {
        path: path.to_owned(),
        source,
    })
}

/// An error about the contents of `path`.
pub fn invalid(path: &Path, what: impl fmt::Display) -> CredentialError {
    CredentialError::Invalid {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM certificate found in the file"));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CredentialError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| invalid(path, format!("not a PEM private key file: {e}")))?
        .ok_or_else(|| invalid(path, "no PEM private key found in the file"))
}

/// The largest pre-shared key OpenSSL accepts (PSK_MAX_PSK_LEN).
pub const MAX_PSK_KEY: usize = 512;

/// The TLS 1.3 suites both ends of a PSK session offer (OpenSSL names):
/// a PSK given by a callback is tied to SHA-256.
pub const PSK_TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// The TLS 1.2 PSK ciphers both ends offer (OpenSSL names), forward-secret
/// (ECDHE) ones first.
pub const PSK_TLS12_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";

/// Pre-shared keys by username.
pub type PskKeys = HashMap<Vec<u8>, Vec<u8>>;

/// Parse psktool's format: one `username:hexkey` per line; blank lines are
/// skipped; the first line for a username wins.  Errors name the line.
pub fn parse_psk_keys(path: &Path, text: &str) -> Result<PskKeys, CredentialError> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let at = |what: &str| invalid(path, format!("line {}: {what}", i + 1));
        let (user, hexkey) = line
            .split_once(':')
            .ok_or_else(|| at("expected username:hexkey"))?;
        if user.is_empty() {
            return Err(at("empty username"));
        }
        // The error never quotes the file: a keys file given by mistake (or
        // a link to a secret file) must not leak its bytes into a log.
        let key = hex::decode(hexkey.trim())
            .map_err(|_| at("the key must be an even number of hex digits"))?;
        if key.is_empty() || key.len() > MAX_PSK_KEY {
            return Err(at(&format!("key must be 1 to {MAX_PSK_KEY} bytes")));
        }
        keys.entry(user.as_bytes().to_vec()).or_insert(key);
    }
    if keys.is_empty() {
        return Err(invalid(path, "no username:hexkey line in the file"));
    }
    Ok(keys)
}

/// Read and parse a psktool keys file.
pub fn load_psk_keys(path: &Path) -> Result<PskKeys, CredentialError> {
    let bytes = read(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid(path, "not a text file"))?;
    parse_psk_keys(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_format() {
        let p = Path::new("keys.psk");
        let k = parse_psk_keys(p, "alice:00ff\n\nbob:0102\r\nalice:11\n").unwrap();
        assert_eq!(k[&b"alice"[..]], vec![0, 0xff]);
        assert_eq!(k[&b"bob"[..]], vec![1, 2]);
        for (bad, what) in [
            ("alice", "line 1"),
            ("ok:00\n:00", "line 2: empty username"),
            ("alice:zz", "must be an even number of hex digits"),
            ("alice:", "1 to 512"),
            ("", "no username"),
            ("root:$6$secret.hash:19000:0:99999:7:::", "line 1"),
        ] {
            let e = parse_psk_keys(p, bad).unwrap_err().to_string();
            assert!(!e.contains('$'), "the error quotes the file: {e}");
            assert!(e.contains(what), "{bad:?}: {e}");
            assert!(!e.contains("zz"), "the error quotes the file: {e}");
            assert!(e.starts_with("keys.psk: "), "{e}");
        }
    }

    #[test]
    fn pem_errors_name_the_file() {
        let d = std::env::temp_dir().join(format!("nbdkit-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("x.pem");
        std::fs::write(&f, "not pem\n").unwrap();
        let e = certs(&f).unwrap_err().to_string();
        assert!(
            e.contains("x.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = private_key(&f).unwrap_err().to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        let e = certs(&d.join("missing.pem")).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
