//! `--tls-priority`: a GnuTLS priority string (nbdkit hands it to GnuTLS)
//! read into the few things rustls (X.509) and OpenSSL (pre-shared keys)
//! can be told: protocol versions, AEAD ciphers, key exchange groups,
//! whether the server's cipher order wins, and session tickets.
//!
//! A priority string is a base keyword (`NORMAL`, `SECURE256`, `NONE`,
//! `@SYSTEM`...) followed by `:`-separated changes: `+ITEM` adds, `-ITEM`
//! or `!ITEM` removes, `%FLAG` sets a flag (case does not matter).  The
//! rule here is that the server never negotiates something the string
//! excludes, and never silently ignores something it asks for:
//!
//! * removing what neither library ever does (`-VERS-TLS1.0`, `-3DES-CBC`,
//!   `-RSA`) is accepted, since it is already true;
//! * adding it (`+VERS-TLS1.1`, `+ARCFOUR-128`) is refused, naming it;
//! * removing what the library always does and cannot turn off (`-AEAD`,
//!   `-ECDHE-RSA` under rustls) is refused;
//! * an element GnuTLS has that is not in these tables is refused as
//!   unknown, rather than guessed at.
//!
//! Pure parsing: [`crate::tls`] applies the result.

use std::collections::BTreeSet;

/// A TLS protocol version both libraries can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    Tls12,
    Tls13,
}

/// A bulk cipher.  The CBC ones exist only in the pre-shared key suites
/// (OpenSSL, TLS 1.2); rustls has AEAD ciphers only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
    Aes128Cbc,
    Aes256Cbc,
}

/// An (EC)DHE group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    X25519,
    Secp256r1,
    Secp384r1,
}

/// Which library will apply the priority: what each can do differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// X.509 certificates (rustls).
    Rustls,
    /// Pre-shared keys (OpenSSL).
    Psk,
}

/// What a priority string allows.  The default (no `--tls-priority`)
/// allows everything the engine implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    pub versions: BTreeSet<Version>,
    pub ciphers: BTreeSet<Cipher>,
    pub groups: BTreeSet<Group>,
    /// `%SERVER_PRECEDENCE`: the server's cipher order wins over the
    /// client's.
    pub server_precedence: bool,
    /// `%NO_TICKETS`: no session tickets (so no resumption).
    pub no_tickets: bool,
}

const VERSIONS: [Version; 2] = [Version::Tls12, Version::Tls13];
const AEAD: [Cipher; 3] = [
    Cipher::Aes128Gcm,
    Cipher::Aes256Gcm,
    Cipher::Chacha20Poly1305,
];
const GROUPS: [Group; 3] = [Group::X25519, Group::Secp256r1, Group::Secp384r1];

impl Engine {
    fn ciphers(self) -> BTreeSet<Cipher> {
        let mut c: BTreeSet<Cipher> = AEAD.into();
        if self == Engine::Psk {
            c.extend([Cipher::Aes128Cbc, Cipher::Aes256Cbc]);
        }
        c
    }

    fn name(self) -> &'static str {
        match self {
            Engine::Rustls => "rustls (X.509 certificates)",
            Engine::Psk => "OpenSSL (pre-shared keys)",
        }
    }
}

impl Priority {
    /// Everything `engine` implements.
    pub fn all(engine: Engine) -> Priority {
        Priority {
            versions: VERSIONS.into(),
            ciphers: engine.ciphers(),
            groups: GROUPS.into(),
            server_precedence: false,
            no_tickets: false,
        }
    }

    fn none() -> Priority {
        Priority {
            versions: BTreeSet::new(),
            ciphers: BTreeSet::new(),
            groups: BTreeSet::new(),
            server_precedence: false,
            no_tickets: false,
        }
    }
}

/// One element of a priority string, as far as these engines go.
enum Item {
    Versions(&'static [Version]),
    Ciphers(&'static [Cipher]),
    Groups(&'static [Group]),
    /// Something the engine always does and cannot stop doing (the AEAD
    /// MAC, ECDHE key exchange, X.509 certificates...).
    Always,
    /// Something GnuTLS knows that the engine never does.
    Never,
}

/// Key exchanges, MACs, signatures, compression and certificate types:
/// what each engine always uses whatever the string says.
fn always(engine: Engine, name: &str) -> bool {
    const BOTH: &[&str] = &[
        "AEAD",
        "MAC-ALL",
        "KX-ALL",
        "SIGN-ALL",
        "COMP-NULL",
        "COMP-ALL",
        "CTYPE-ALL",
    ];
    const RUSTLS: &[&str] = &[
        "SHA256",
        "SHA384",
        "ECDHE-RSA",
        "ECDHE-ECDSA",
        "CTYPE-X509",
        "CTYPE-SRV-X509",
        "CTYPE-CLI-X509",
        "CTYPE-SRV-ALL",
        "CTYPE-CLI-ALL",
    ];
    // SHA-256 and SHA-384 are the MACs of the CBC pre-shared key suites.
    const PSK: &[&str] = &["SHA256", "SHA384", "PSK", "ECDHE-PSK"];
    BOTH.contains(&name)
        || match engine {
            Engine::Rustls => RUSTLS.contains(&name),
            Engine::Psk => PSK.contains(&name),
        }
}

/// GnuTLS elements neither engine ever uses.
const NEVER: &[&str] = &[
    // Versions.
    "VERS-SSL3.0",
    "VERS-TLS1.0",
    "VERS-TLS1.1",
    "VERS-DTLS0.9",
    "VERS-DTLS1.0",
    "VERS-DTLS1.2",
    "VERS-DTLS-ALL",
    // Ciphers.
    "3DES-CBC",
    "ARCFOUR-128",
    "ARCFOUR-40",
    "RC2-40",
    "DES-CBC",
    "NULL",
    "CAMELLIA-128-CBC",
    "CAMELLIA-192-CBC",
    "CAMELLIA-256-CBC",
    "CAMELLIA-128-GCM",
    "CAMELLIA-256-GCM",
    "AES-128-CCM",
    "AES-256-CCM",
    "AES-128-CCM-8",
    "AES-256-CCM-8",
    "AES-192-CBC",
    "GOST28147-TC26Z-CNT",
    "MAGMA-CTR-ACPKM",
    "KUZNYECHIK-CTR-ACPKM",
    // MACs.
    "SHA1",
    "MD5",
    "UMAC-96",
    "UMAC-128",
    "GOST28147-TC26Z-IMIT",
    // Key exchanges.
    "RSA",
    "DHE-RSA",
    "DHE-DSS",
    "ANON-DH",
    "ANON-ECDH",
    "SRP",
    "SRP-RSA",
    "SRP-DSS",
    "DHE-PSK",
    "RSA-PSK",
    "VKO-GOST-12",
    // Groups.
    "GROUP-X448",
    "GROUP-SECP192R1",
    "GROUP-SECP224R1",
    "GROUP-SECP521R1",
    "GROUP-FFDHE2048",
    "GROUP-FFDHE3072",
    "GROUP-FFDHE4096",
    "GROUP-FFDHE6144",
    "GROUP-FFDHE8192",
    "GROUP-DH-ALL",
    "GROUP-GC256B",
    "GROUP-GC512A",
    // Compression and certificate types.
    "COMP-DEFLATE",
    "COMP-ZLIB",
    "COMP-BROTLI",
    "COMP-ZSTD",
    "CTYPE-OPENPGP",
    "CTYPE-RAWPK",
    "CTYPE-SRV-RAWPK",
    "CTYPE-CLI-RAWPK",
];

fn item(engine: Engine, name: &str) -> Option<Item> {
    use Cipher::*;
    // Older GnuTLS spells groups CURVE-...
    let group = name.strip_prefix("CURVE-").map(|g| format!("GROUP-{g}"));
    let name_or_group = group.as_deref().unwrap_or(name);
    Some(match name_or_group {
        "VERS-TLS1.2" => Item::Versions(&[Version::Tls12]),
        "VERS-TLS1.3" => Item::Versions(&[Version::Tls13]),
        "VERS-ALL" | "VERS-TLS-ALL" => Item::Versions(&VERSIONS),
        "AES-128-GCM" => Item::Ciphers(&[Aes128Gcm]),
        "AES-256-GCM" => Item::Ciphers(&[Aes256Gcm]),
        "CHACHA20-POLY1305" => Item::Ciphers(&[Chacha20Poly1305]),
        "AES-128-CBC" if engine == Engine::Psk => Item::Ciphers(&[Aes128Cbc]),
        "AES-256-CBC" if engine == Engine::Psk => Item::Ciphers(&[Aes256Cbc]),
        "AES-128-CBC" | "AES-256-CBC" => Item::Never,
        "CIPHER-ALL" if engine == Engine::Psk => {
            Item::Ciphers(&[Aes128Gcm, Aes256Gcm, Chacha20Poly1305, Aes128Cbc, Aes256Cbc])
        }
        "CIPHER-ALL" => Item::Ciphers(&AEAD),
        "GROUP-X25519" => Item::Groups(&[Group::X25519]),
        "GROUP-SECP256R1" => Item::Groups(&[Group::Secp256r1]),
        "GROUP-SECP384R1" => Item::Groups(&[Group::Secp384r1]),
        "GROUP-ALL" | "GROUP-EC-ALL" => Item::Groups(&GROUPS),
        n if always(engine, n) => Item::Always,
        // The other engine's key exchanges: never used by this one.
        "ECDHE-RSA" | "ECDHE-ECDSA" | "PSK" | "ECDHE-PSK" => Item::Never,
        n if n.starts_with("CTYPE-") && engine == Engine::Psk => Item::Never,
        n if NEVER.contains(&n) => Item::Never,
        _ => return None,
    })
}

/// The base keyword a string starts with.
fn base(engine: Engine, keyword: &str) -> Result<Priority, String> {
    let mut p = Priority::all(engine);
    match keyword {
        // GnuTLS's usual levels: everything these engines have qualifies
        // (every suite here is an AEAD or SHA-2 suite with 128-bit or
        // stronger keys, and rustls's are all forward secret).
        "NORMAL" | "PERFORMANCE" | "SECURE128" | "LEGACY" => {}
        "PFS" if engine == Engine::Rustls => {}
        "PFS" => {
            return Err(
                "PFS: pre-shared key suites without (EC)DHE are not forward secret and \
                 cannot be told apart here; use NORMAL"
                    .into(),
            )
        }
        // 192-bit security or more: 256-bit ciphers and P-384.
        "SECURE192" | "SECURE256" => {
            p.ciphers.retain(|c| {
                matches!(
                    c,
                    Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 | Cipher::Aes256Cbc
                )
            });
            p.groups = [Group::Secp384r1].into();
        }
        "NONE" => p = Priority::none(),
        // The system-wide policy (GnuTLS's config file) is not read:
        // these engines' full sets stand in for it.
        k if k == "SYSTEM" || k.starts_with('@') => {}
        "SUITEB128" | "SUITEB192" => {
            return Err(format!(
                "{keyword}: the NSA Suite B profiles are not supported by {}",
                engine.name()
            ))
        }
        _ => return Err(format!("{keyword}: unknown priority keyword (expected NORMAL, PFS, SECURE128, SECURE192, SECURE256, PERFORMANCE, LEGACY, NONE or @SYSTEM)")),
    }
    Ok(p)
}

/// Read a GnuTLS priority string for `engine`.
pub fn parse(s: &str, engine: Engine) -> Result<Priority, String> {
    let upper = s.trim().to_ascii_uppercase();
    let mut parts = upper.split(':');
    let first = parts.next().unwrap_or_default();
    if first.is_empty() {
        return Err("empty priority string (try NORMAL)".into());
    }
    let mut p = base(engine, first)?;
    for part in parts {
        if let Some(flag) = part.strip_prefix('%') {
            match flag {
                "SERVER_PRECEDENCE" => p.server_precedence = true,
                "NO_TICKETS" | "NO_TICKETS_TLS12" => p.no_tickets = true,
                // Neither engine renegotiates at all.
                "SAFE_RENEGOTIATION" | "PARTIAL_RENEGOTIATION" => {}
                _ => {
                    return Err(format!(
                        "%{flag}: not supported by {} (supported: %SERVER_PRECEDENCE, \
                         %NO_TICKETS, %SAFE_RENEGOTIATION)",
                        engine.name()
                    ))
                }
            }
            continue;
        }
        let (add, name) = match part.as_bytes().first() {
            Some(b'+') => (true, &part[1..]),
            Some(b'-' | b'!') => (false, &part[1..]),
            _ => {
                return Err(format!(
                    "'{part}': expected +ITEM, -ITEM or %FLAG after the keyword"
                ))
            }
        };
        let Some(it) = item(engine, name) else {
            return Err(format!("'{name}': unknown priority element"));
        };
        match (it, add) {
            (Item::Versions(v), true) => p.versions.extend(v),
            (Item::Versions(v), false) => p.versions.retain(|x| !v.contains(x)),
            (Item::Ciphers(c), true) => p.ciphers.extend(c),
            (Item::Ciphers(c), false) => p.ciphers.retain(|x| !c.contains(x)),
            (Item::Groups(g), true) => p.groups.extend(g),
            (Item::Groups(g), false) => p.groups.retain(|x| !g.contains(x)),
            (Item::Always, true) | (Item::Never, false) => {}
            (Item::Always, false) => {
                return Err(format!(
                    "-{name}: {} always uses it; it cannot be turned off",
                    engine.name()
                ))
            }
            (Item::Never, true) => {
                return Err(format!("+{name}: not supported by {}", engine.name()))
            }
        }
    }
    if p.versions.is_empty() {
        return Err(format!(
            "'{s}' leaves no TLS version (add +VERS-TLS1.3 or +VERS-TLS1.2)"
        ));
    }
    if p.ciphers.is_empty() {
        return Err(format!(
            "'{s}' leaves no cipher (add +AES-256-GCM, for example)"
        ));
    }
    if p.groups.is_empty() {
        return Err(format!(
            "'{s}' leaves no key exchange group (add +GROUP-X25519, for example)"
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_and_changes() {
        let all = Priority::all(Engine::Rustls);
        assert_eq!(parse("NORMAL", Engine::Rustls), Ok(all.clone()));
        assert_eq!(parse("@SYSTEM", Engine::Rustls), Ok(all.clone()));
        assert_eq!(parse("normal", Engine::Rustls), Ok(all.clone()));
        let p = parse("NORMAL:-VERS-ALL:+VERS-TLS1.3", Engine::Rustls).unwrap();
        assert_eq!(p.versions, [Version::Tls13].into());
        let p = parse("NORMAL:!VERS-TLS1.3", Engine::Rustls).unwrap();
        assert_eq!(p.versions, [Version::Tls12].into());
        let p = parse("SECURE256", Engine::Rustls).unwrap();
        assert_eq!(
            p.ciphers,
            [Cipher::Aes256Gcm, Cipher::Chacha20Poly1305].into()
        );
        assert_eq!(p.groups, [Group::Secp384r1].into());
        let p = parse(
            "NONE:+VERS-TLS1.3:+AES-128-GCM:+GROUP-X25519:+AEAD:+SIGN-ALL:%SERVER_PRECEDENCE:%NO_TICKETS",
            Engine::Rustls,
        )
        .unwrap();
        assert_eq!(p.ciphers, [Cipher::Aes128Gcm].into());
        assert_eq!(p.groups, [Group::X25519].into());
        assert!(p.server_precedence && p.no_tickets);
        // Removing what is never done is already true.
        assert!(parse(
            "NORMAL:-VERS-TLS1.0:-3DES-CBC:-RSA:-AES-128-CBC",
            Engine::Rustls
        )
        .is_ok());
        let p = parse("NORMAL:-AES-128-CBC", Engine::Psk).unwrap();
        assert!(!p.ciphers.contains(&Cipher::Aes128Cbc));
    }

    #[test]
    fn what_cannot_be_done_is_refused() {
        for (s, engine, says) in [
            ("", Engine::Rustls, "empty"),
            ("NORMAL:+VERS-TLS1.1", Engine::Rustls, "+VERS-TLS1.1"),
            ("NORMAL:+AES-128-CBC", Engine::Rustls, "+AES-128-CBC"),
            ("NORMAL:-AEAD", Engine::Rustls, "cannot be turned off"),
            ("NORMAL:-ECDHE-RSA", Engine::Rustls, "cannot be turned off"),
            ("NORMAL:-PSK", Engine::Psk, "cannot be turned off"),
            ("NORMAL:+FOO", Engine::Rustls, "unknown"),
            ("BOGUS", Engine::Rustls, "unknown priority keyword"),
            ("SUITEB128", Engine::Rustls, "Suite B"),
            ("PFS", Engine::Psk, "forward secret"),
            ("NORMAL:%COMPAT", Engine::Rustls, "%COMPAT"),
            ("NORMAL:VERS-TLS1.2", Engine::Rustls, "expected +ITEM"),
            ("NORMAL:-VERS-ALL", Engine::Rustls, "no TLS version"),
            ("NORMAL:-CIPHER-ALL", Engine::Rustls, "no cipher"),
            ("NORMAL:-GROUP-ALL", Engine::Rustls, "no key exchange group"),
        ] {
            let e = parse(s, engine).expect_err(s);
            assert!(e.contains(says), "{s}: {e}");
        }
    }
}
