//! `ip`: admit or refuse clients by where they connect from: IP address or
//! network for TCP, process/user/group ID for Unix sockets, and (since
//! nbdkit 1.40) the Distinguished Name of a TLS client certificate or of
//! its issuer.  For servers that must stay reachable on a network without
//! a firewall in front.
//!
//! The rules follow nbdkit's: a client matching any `allow=` rule is
//! admitted; otherwise one matching any `deny=` rule is refused; otherwise
//! it is admitted.  Refused clients are closed before the handshake —
//! unless a rule names a DN: the certificate is only known once TLS is
//! negotiated, so then every rule is checked when the client opens an
//! export or lists them, and a refused client gets an error reply there.

use std::ffi::CString;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use nbdkit_backend::{
    layer_fn, Backend, Client, ConfigError, Error, ErrorKind, ExportEntry, FilterSpec, Handle,
    Param, Peer, Result,
};

/// One entry of an allow or deny list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    AnyIpv4,
    AnyIpv6,
    AnyUnix,
    /// nbdkit-rs does not listen on AF_VSOCK, so these never match; they
    /// are accepted so that nbdkit command lines keep working.
    AnyVsock,
    VsockCid(u32),
    VsockPort(u32),
    Net(IpNet),
    Pid(i32),
    Uid(u32),
    Gid(u32),
    /// `dn:WILDCARD`: the client certificate's subject DN.
    Dn(String),
    /// `issuer-dn:WILDCARD`: the DN of the CA that issued it.
    IssuerDn(String),
}

/// What the rules look at: the socket's peer, and the client
/// certificate's names when TLS verified one.
struct Who<'a> {
    peer: &'a Peer,
    dn: Option<&'a str>,
    issuer_dn: Option<&'a str>,
}

impl<'a> Who<'a> {
    fn of(client: &'a Client) -> Who<'a> {
        Who {
            peer: client.peer(),
            dn: client.tls_dn(),
            issuer_dn: client.tls_issuer_dn(),
        }
    }
}

/// Shell wildcard matching as fnmatch(3) with no flags (`*` and `?` match
/// any character, commas and `/` included; `[...]` sets), the matching
/// nbdkit's `dn:` rules document; the C library's own, so that a pattern
/// means the same to both servers.
fn wildcard_matches(pattern: &str, text: &str) -> bool {
    let (Ok(p), Ok(t)) = (CString::new(pattern), CString::new(text)) else {
        // Neither a command-line argument nor a rendered DN holds a NUL.
        return false;
    };
    // SAFETY: both are NUL-terminated strings alive for the call, which
    // only reads them.
    unsafe { libc::fnmatch(p.as_ptr(), t.as_ptr(), 0) == 0 }
}

impl Rule {
    fn parse(s: &str) -> std::result::Result<Rule, String> {
        let number = |v: &str, what: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{s:?}: {what} must be a non-negative number"))
        };
        Ok(match s {
            "all" | "any" => Rule::Any,
            "allipv4" | "anyipv4" => Rule::AnyIpv4,
            "allipv6" | "anyipv6" => Rule::AnyIpv6,
            "allunix" | "anyunix" => Rule::AnyUnix,
            "allvsock" | "anyvsock" => Rule::AnyVsock,
            _ => {
                if let Some(v) = s.strip_prefix("pid:") {
                    let pid = number(v, "a process ID")?;
                    Rule::Pid(i32::try_from(pid).map_err(|_| format!("{s:?}: no such PID"))?)
                } else if let Some(v) = s.strip_prefix("uid:") {
                    Rule::Uid(number(v, "a user ID")?)
                } else if let Some(v) = s.strip_prefix("gid:") {
                    Rule::Gid(number(v, "a group ID")?)
                } else if let Some(v) = s.strip_prefix("vsock-cid:") {
                    Rule::VsockCid(number(v, "a vsock CID")?)
                } else if let Some(v) = s.strip_prefix("vsock-port:") {
                    Rule::VsockPort(number(v, "a vsock port")?)
                } else if let Some(v) = s.strip_prefix("dn:") {
                    Rule::Dn(v.to_string())
                } else if let Some(v) = s.strip_prefix("issuer-dn:") {
                    Rule::IssuerDn(v.to_string())
                } else if s.starts_with("security:") {
                    return Err(format!(
                        "{s:?}: SELinux labels are not supported by this ip filter"
                    ));
                } else if s.contains('/') {
                    // `trunc` so 192.168.2.1/24 means the network, as
                    // people write it.
                    Rule::Net(
                        s.parse::<IpNet>()
                            .map_err(|_| format!("{s:?} is not an address/prefix-length"))?
                            .trunc(),
                    )
                } else {
                    let ip: IpAddr = s.parse().map_err(|_| {
                        format!(
                            "{s:?} is not an IP address, network, pid:/uid:/gid: rule \
                             or one of all, anyipv4, anyipv6, anyunix"
                        )
                    })?;
                    Rule::Net(IpNet::from(ip))
                }
            }
        })
    }

    /// Whether the rule can only be judged after the TLS handshake.
    fn needs_certificate(&self) -> bool {
        matches!(self, Rule::Dn(_) | Rule::IssuerDn(_))
    }

    fn matches(&self, who: &Who) -> bool {
        match self {
            // No verified client certificate (plaintext, PSK, or no
            // --tls-verify-peer): there is no DN, and a DN rule does not
            // match, not even `dn:*`.
            Rule::Dn(p) => return who.dn.is_some_and(|dn| wildcard_matches(p, dn)),
            Rule::IssuerDn(p) => return who.issuer_dn.is_some_and(|dn| wildcard_matches(p, dn)),
            _ => {}
        }
        match (self, who.peer) {
            (Rule::Any, _) => true,
            (Rule::AnyIpv4, Peer::Tcp(a)) => a.is_ipv4(),
            (Rule::AnyIpv6, Peer::Tcp(a)) => a.is_ipv6(),
            (Rule::AnyUnix, Peer::Unix { .. }) => true,
            (Rule::Net(n), Peer::Tcp(a)) => n.contains(&a.ip()),
            (Rule::Pid(p), Peer::Unix { pid: Some(q), .. }) => p == q,
            (Rule::Uid(u), Peer::Unix { uid: Some(v), .. }) => u == v,
            (Rule::Gid(g), Peer::Unix { gid: Some(h), .. }) => g == h,
            _ => false,
        }
    }
}

fn parse_list(key: &str, values: Vec<String>) -> std::result::Result<Vec<Rule>, ConfigError> {
    let mut rules = Vec::new();
    for v in values {
        // A DN is full of commas: a parameter that starts with a DN rule
        // is that one rule, as nbdkit does (give each DN its own allow=).
        let items: Vec<&str> = if v.starts_with("dn:") || v.starts_with("issuer-dn:") {
            vec![v.as_str()]
        } else {
            v.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .collect()
        };
        for item in items {
            rules.push(
                Rule::parse(item)
                    .map_err(|e| ConfigError::new(format!("ip filter: {key}=: {e}")))?,
            );
        }
    }
    Ok(rules)
}

struct Ip {
    next: Arc<dyn Backend>,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    /// Some rule names a DN: check in open/list_exports, after TLS.
    late: bool,
}

impl Ip {
    fn admits(&self, who: &Who) -> bool {
        self.allow.iter().any(|r| r.matches(who)) || !self.deny.iter().any(|r| r.matches(who))
    }

    /// Refuse `client` unless the rules admit it.
    fn check(&self, client: &Client) -> Result<()> {
        let who = Who::of(client);
        if self.admits(&who) {
            return Ok(());
        }
        let mut desc = match who.peer {
            Peer::Unix { pid, uid, gid } => format!(
                "unix socket peer (pid {}, uid {}, gid {})",
                opt(pid),
                opt(uid),
                opt(gid)
            ),
            other => other.to_string(),
        };
        if self.late {
            match who.dn {
                Some(dn) => desc += &format!(" with certificate DN {dn:?}"),
                None => desc += " without a verified client certificate",
            }
        }
        Err(Error::new(
            ErrorKind::PermissionDenied,
            format!("ip filter: client {desc} denied by the allow/deny rules"),
        ))
    }

    /// The late check, for the connection being served on this thread.
    fn check_current(&self) -> Result<()> {
        if !self.late {
            return Ok(());
        }
        match Client::current() {
            Some(c) => self.check(&c),
            // The server names the client on every call it makes for one;
            // with no client there is no certificate to admit.
            None => Err(Error::new(
                ErrorKind::PermissionDenied,
                "ip filter: no client connection to check the DN rules against",
            )),
        }
    }
}

impl Backend for Ip {
    fn name(&self) -> &str {
        "ip"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        if !self.late {
            self.check(client)?;
        }
        self.next.preconnect(client)
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        self.check_current()?;
        self.next.list_exports(readonly)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        self.check_current()?;
        self.next.open(readonly, export)
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "unknown".into(), |v| v.to_string())
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "ip",
    summary: "admit or refuse clients by IP address, network, Unix peer pid/uid/gid or TLS certificate DN",
    description: "A client matching any allow= rule is admitted; else one matching any\n\
deny= rule is closed before the handshake; else it is admitted.  Rules are\n\
comma-separated: all/any, anyipv4, anyipv6, anyunix, an address\n\
(127.0.0.1, ::1), a network (10.0.0.0/8, fd00::/8), pid:PID, uid:UID, gid:GID,\n\
dn:WILDCARD and issuer-dn:WILDCARD (the verified client certificate's DN or its\n\
issuer's, e.g. CN=client.example.com,O=BigCo,C=US, matched as fnmatch(3);\n\
no certificate never matches).  A parameter starting dn: or issuer-dn: is one\n\
rule, not split at commas.  With DN rules every rule is checked after TLS,\n\
when the client opens or lists exports, instead of before the handshake.\n\n\
Examples:\n  nbdkit-rs --filter=ip file disk.img allow=127.0.0.1,::1 deny=all\n  \
nbdkit-rs -U /run/nbd.sock --filter=ip memory 1G allow=uid:1000 deny=all\n  \
nbdkit-rs --tls=require --tls-verify-peer --filter=ip memory 1G \\\n      \
allow='dn:*,O=BigCo,*' deny=all",
    params: &[
        Param {
            name: "allow",
            help: "rules that admit a client (may be repeated)",
        },
        Param {
            name: "deny",
            help: "rules that refuse a client not allowed (may be repeated)",
        },
    ],
    configure: |cfg| {
        let allow = parse_list("allow", cfg.take_all("allow"))?;
        let deny = parse_list("deny", cfg.take_all("deny"))?;
        Ok(layer_fn(move |next| {
            let late = allow.iter().chain(&deny).any(Rule::needs_certificate);
            Ok(Arc::new(Ip {
                next,
                allow,
                deny,
                late,
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(allow: &str, deny: &str) -> Ip {
        let rules = |s: &str| parse_list("x", vec![s.to_string()]).unwrap();
        let (allow, deny) = (rules(allow), rules(deny));
        let late = allow.iter().chain(&deny).any(Rule::needs_certificate);
        Ip {
            next: Arc::new(NoBackend),
            allow,
            deny,
            late,
        }
    }

    fn peer_admitted(f: &Ip, peer: &Peer) -> bool {
        f.admits(&Who {
            peer,
            dn: None,
            issuer_dn: None,
        })
    }

    /// A TCP client with a verified certificate of subject `dn`.
    fn cert_admitted(f: &Ip, dn: &str, issuer: &str) -> bool {
        f.admits(&Who {
            peer: &tcp("127.0.0.1:1"),
            dn: Some(dn),
            issuer_dn: Some(issuer),
        })
    }

    struct NoBackend;
    impl Backend for NoBackend {
        fn name(&self) -> &str {
            "none"
        }
        fn open(&self, _: bool, _: &str) -> Result<Box<dyn Handle>> {
            Err(Error::io("unused"))
        }
    }

    fn tcp(s: &str) -> Peer {
        Peer::Tcp(s.parse().unwrap())
    }
    fn unix(pid: i32, uid: u32, gid: u32) -> Peer {
        Peer::Unix {
            pid: Some(pid),
            uid: Some(uid),
            gid: Some(gid),
        }
    }

    #[test]
    fn allow_list_first_then_deny_then_admit() {
        let f = ip("127.0.0.1,::1", "all");
        assert!(peer_admitted(&f, &tcp("127.0.0.1:5000")));
        assert!(peer_admitted(&f, &tcp("[::1]:5000")));
        assert!(!peer_admitted(&f, &tcp("10.1.2.3:5000")));
        assert!(!peer_admitted(&f, &unix(1, 0, 0)));
        assert!(!peer_admitted(&f, &Peer::Stdio));

        let f = ip("", "8.0.0.0/8");
        assert!(!peer_admitted(&f, &tcp("8.8.8.8:53")));
        assert!(peer_admitted(&f, &tcp("9.8.8.8:53")));
        assert!(peer_admitted(&f, &unix(1, 0, 0)));

        // Nothing given: the filter admits everyone.
        let f = ip("", "");
        assert!(peer_admitted(&f, &tcp("8.8.8.8:53")));
    }

    #[test]
    fn networks_and_families() {
        let f = ip("192.168.2.77/24,fd00::/8", "all");
        assert!(peer_admitted(&f, &tcp("192.168.2.1:1")));
        assert!(!peer_admitted(&f, &tcp("192.168.3.1:1")));
        assert!(peer_admitted(&f, &tcp("[fd12::1]:1")));
        assert!(!peer_admitted(&f, &tcp("[fe80::1]:1")));

        let f = ip("anyipv6", "all");
        assert!(peer_admitted(&f, &tcp("[2001:db8::1]:1")));
        assert!(!peer_admitted(&f, &tcp("1.2.3.4:1")));
        let f = ip("", "anyipv4");
        assert!(!peer_admitted(&f, &tcp("1.2.3.4:1")));
        assert!(peer_admitted(&f, &tcp("[2001:db8::1]:1")));
    }

    #[test]
    fn unix_credentials() {
        let f = ip("uid:1000", "all");
        assert!(peer_admitted(&f, &unix(5, 1000, 1000)));
        assert!(!peer_admitted(&f, &unix(5, 1001, 1000)));
        assert!(!peer_admitted(&f, &tcp("127.0.0.1:1")));
        let f = ip("gid:44,pid:77", "anyunix");
        assert!(peer_admitted(&f, &unix(5, 1, 44)));
        assert!(peer_admitted(&f, &unix(77, 1, 1)));
        assert!(!peer_admitted(&f, &unix(5, 1, 1)));
        // Credentials the kernel did not give never match.
        assert!(!peer_admitted(
            &f,
            &Peer::Unix {
                pid: None,
                uid: None,
                gid: None
            }
        ));
        // vsock rules parse and never match here.
        let f = ip("vsock-cid:3,anyvsock", "all");
        assert!(!peer_admitted(&f, &unix(5, 1, 1)));
    }

    const BIGCO: &str = "CN=client.example.com,O=BigCo,L=New York,ST=New York,C=US";

    #[test]
    fn dn_rules_match_certificate_names_as_wildcards() {
        let mut f = ip("", "all");
        f.allow = parse_list("allow", vec!["dn:*,O=BigCo,*".into()]).unwrap();
        f.late = true;
        assert!(cert_admitted(&f, BIGCO, "CN=BigCo"));
        assert!(!cert_admitted(&f, "CN=x,O=SmallCo,C=US", "CN=BigCo"));
        // Without a certificate even dn:* does not match.
        f.allow = parse_list("allow", vec!["dn:*".into()]).unwrap();
        assert!(cert_admitted(&f, "CN=anyone", "CN=any CA"));
        assert!(!peer_admitted(&f, &tcp("127.0.0.1:1")));
        // Exact DNs, and the issuer; ? and [] as fnmatch.
        let exact = vec![format!("dn:{BIGCO}"), "issuer-dn:CN=Big?o".into()];
        f.allow = parse_list("allow", exact).unwrap();
        assert_eq!(f.allow.len(), 2, "a DN parameter is not split at commas");
        assert!(cert_admitted(&f, BIGCO, "CN=Other"));
        assert!(cert_admitted(&f, "CN=bob", "CN=BigCo"));
        assert!(!cert_admitted(&f, "CN=bob", "CN=Other"));
        f.allow = parse_list("allow", vec!["dn:CN=[ab]*".into()]).unwrap();
        assert!(cert_admitted(&f, "CN=alice", "CN=x"));
        assert!(!cert_admitted(&f, "CN=carol", "CN=x"));
        // A deny rule by issuer, everything else allowed.
        let f = ip("", "127.0.0.2");
        assert!(!f.late);
        let mut f = f;
        f.deny = parse_list("deny", vec!["issuer-dn:CN=Evil CA".into()]).unwrap();
        assert!(!cert_admitted(&f, "CN=m", "CN=Evil CA"));
        assert!(cert_admitted(&f, "CN=m", "CN=Good CA"));
        // Other parameters still split at commas.
        let r = parse_list("allow", vec!["127.0.0.1, anyunix".into()]).unwrap();
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn late_checking_only_with_dn_rules() {
        let early = ip("127.0.0.1", "all");
        assert!(!early.late);
        let c = Client::new(1, tcp("10.0.0.1:5"));
        assert!(early.preconnect(&c).is_err());
        // The late check needs the current client; only DN rules ask.
        assert!(early.check_current().is_ok());

        let mut late = ip("", "all");
        late.allow = parse_list("allow", vec!["dn:CN=alice".into()]).unwrap();
        late.late = true;
        // Admitted before the handshake, judged at open.
        assert!(late.preconnect(&c).is_ok());
        {
            let _g = c.enter();
            let e = late.check_current().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied);
            assert!(
                e.to_string()
                    .contains("without a verified client certificate"),
                "{e}"
            );
        }
        let alice = Client::new(2, tcp("10.0.0.1:6"));
        alice.set_tls();
        alice.set_tls_names("CN=alice".into(), "CN=CA".into());
        let _g = alice.enter();
        assert!(late.check_current().is_ok());
    }

    #[test]
    fn bad_rules_name_the_key_and_the_rule() {
        for bad in [
            "1.2.3",
            "uid:-1",
            "10.0.0.0/33",
            "pid:x",
            "security:foo",
            "banana",
        ] {
            let e = parse_list("allow", vec![bad.to_string()]).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("allow=") && msg.contains(bad), "{msg}");
        }
    }
}
