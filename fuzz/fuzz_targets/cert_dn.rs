//! The names read from a client certificate (`nbdkit_tls::dn`), on
//! arbitrary bytes: the TLS library has verified the certificate by then,
//! but the DER parser must still end in names or an error, never a panic,
//! and a name must be text the `ip` filter's rules can match.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdkit_tls::dn::cert_names;

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = cert_names(data) {
        // Control characters are escaped (RFC 4514 `\00`), so a name is
        // always a C string for fnmatch and nbdkit_peer_tls_dn.
        assert!(!n.subject.contains('\0') && !n.issuer.contains('\0'));
    }
});
