//! The Distinguished Names of a client certificate, for access rules and
//! plugins (nbdkit's `nbdkit_peer_tls_dn`/`nbdkit_peer_tls_issuer_dn`, the
//! `ip` filter's `dn:`/`issuer-dn:` rules).
//!
//! nbdkit documents the string form as RFC 4514: the RDNs last-first,
//! separated by commas, attribute types by their short names, special
//! characters escaped — so the certificate made from nbdkit-tls(1)'s
//! `client.info` (C=US, ST, L, O=BigCo, CN=client.example.com) reads
//! `CN=client.example.com,O=BigCo,L=New York,ST=New York,C=US`.
//! RustCrypto's `x509-cert` renders names exactly so (and unknown
//! attribute types as `OID=#hex`), which is why it parses them here rather
//! than a hand-written DER walker.

use x509_cert::der::Decode;
use x509_cert::Certificate;

/// The subject and issuer of one certificate, as RFC 4514 strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    pub subject: String,
    pub issuer: String,
}

/// Read the names from a DER certificate.  An error says what could not
/// be parsed (the certificate has already been verified by then, so this
/// is a certificate the TLS library accepted but that is not strict DER).
pub fn cert_names(der: &[u8]) -> Result<CertNames, String> {
    let cert = Certificate::from_der(der).map_err(|e| format!("cannot parse certificate: {e}"))?;
    let tbs = cert.tbs_certificate();
    Ok(CertNames {
        subject: tbs.subject().to_string(),
        issuer: tbs.issuer().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with certtool from the `client.info` and `ca.info` of
    /// nbdkit_peer_tls_dn(3)'s example (country US, state and locality New
    /// York, organization BigCo, cn client.example.com; CA cn BigCo).
    const BIGCO_CLIENT: &str = include_str!("../testdata/bigco-client-cert.pem");

    fn der(pem: &str) -> Vec<u8> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        certs[0].to_vec()
    }

    #[test]
    fn names_read_as_the_man_page_example() {
        let n = cert_names(&der(BIGCO_CLIENT)).unwrap();
        assert_eq!(
            n.subject,
            "CN=client.example.com,O=BigCo,L=New York,ST=New York,C=US"
        );
        assert_eq!(n.issuer, "CN=BigCo");
    }

    /// Every input the fuzzer kept parses to names without a NUL, or is an
    /// error, as in fuzz/fuzz_targets/cert_dn.rs.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/cert_dn");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut parsed = 0;
        for e in entries.flatten() {
            if let Ok(n) = cert_names(&std::fs::read(e.path()).unwrap()) {
                assert!(!n.subject.contains('\0') && !n.issuer.contains('\0'));
                parsed += 1;
            }
        }
        // The seeds are real certificates.
        assert!(parsed >= 2);
    }

    #[test]
    fn not_a_certificate_is_an_error() {
        assert!(cert_names(b"").is_err());
        assert!(cert_names(&[0x30, 0x03, 1, 2, 3]).is_err());
        let mut d = der(BIGCO_CLIENT);
        d.truncate(d.len() / 2);
        assert!(cert_names(&d).is_err());
    }
}
