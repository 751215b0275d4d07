//! `ip`: admit or refuse clients by where they connect from: IP address or
//! network for TCP, process/user/group ID for Unix sockets.  For servers
//! that must stay reachable on a network without a firewall in front.
//!
//! The rules follow nbdkit's: a client matching any `allow=` rule is
//! admitted; otherwise one matching any `deny=` rule is refused; otherwise
//! it is admitted.  Refused clients are closed before the handshake.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use nbdkit_backend::{
    Backend, Client, ConfigError, Error, ErrorKind, FilterSpec, Handle, Layer, Param, Peer, Result,
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
                } else if s.starts_with("security:") || s.starts_with("dn:") {
                    return Err(format!(
                        "{s:?}: SELinux labels and TLS certificate names are not supported \
                         by this ip filter"
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

    fn matches(&self, peer: &Peer) -> bool {
        match (self, peer) {
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
        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            rules.push(
                Rule::parse(item)
                    .map_err(|e| ConfigError::new(format!("ip filter: {key}=: {e}")))?,
            );
        }
    }
    Ok(rules)
}

struct IpLayer {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Layer for IpLayer {
    fn layer(
        self: Box<Self>,
        next: Arc<dyn Backend>,
    ) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
        Ok(Arc::new(Ip {
            next,
            allow: self.allow,
            deny: self.deny,
        }))
    }
}

struct Ip {
    next: Arc<dyn Backend>,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Ip {
    fn admits(&self, peer: &Peer) -> bool {
        self.allow.iter().any(|r| r.matches(peer)) || !self.deny.iter().any(|r| r.matches(peer))
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
        let peer = client.peer();
        if !self.admits(peer) {
            let who = match peer {
                Peer::Unix { pid, uid, gid } => format!(
                    "unix socket peer (pid {}, uid {}, gid {})",
                    opt(pid),
                    opt(uid),
                    opt(gid)
                ),
                other => other.to_string(),
            };
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("ip filter: client {who} denied by the allow/deny rules"),
            ));
        }
        self.next.preconnect(client)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        self.next.open(readonly, export)
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "unknown".into(), |v| v.to_string())
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "ip",
    summary: "admit or refuse clients by IP address, network, or Unix peer pid/uid/gid",
    description: "A client matching any allow= rule is admitted; else one matching any\n\
deny= rule is closed before the handshake; else it is admitted.  Rules are\n\
comma-separated: all/any, anyipv4, anyipv6, anyunix, an address\n\
(127.0.0.1, ::1), a network (10.0.0.0/8, fd00::/8), pid:PID, uid:UID, gid:GID.\n\n\
Examples:\n  nbdkit-rs --filter=ip file disk.img allow=127.0.0.1,::1 deny=all\n  \
nbdkit-rs -U /run/nbd.sock --filter=ip memory 1G allow=uid:1000 deny=all",
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
        Ok(Box::new(IpLayer { allow, deny }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(allow: &str, deny: &str) -> Ip {
        let rules = |s: &str| parse_list("x", vec![s.to_string()]).unwrap();
        Ip {
            next: Arc::new(NoBackend),
            allow: rules(allow),
            deny: rules(deny),
        }
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
        assert!(f.admits(&tcp("127.0.0.1:5000")));
        assert!(f.admits(&tcp("[::1]:5000")));
        assert!(!f.admits(&tcp("10.1.2.3:5000")));
        assert!(!f.admits(&unix(1, 0, 0)));
        assert!(!f.admits(&Peer::Stdio));

        let f = ip("", "8.0.0.0/8");
        assert!(!f.admits(&tcp("8.8.8.8:53")));
        assert!(f.admits(&tcp("9.8.8.8:53")));
        assert!(f.admits(&unix(1, 0, 0)));

        // Nothing given: the filter admits everyone.
        let f = ip("", "");
        assert!(f.admits(&tcp("8.8.8.8:53")));
    }

    #[test]
    fn networks_and_families() {
        let f = ip("192.168.2.77/24,fd00::/8", "all");
        assert!(f.admits(&tcp("192.168.2.1:1")));
        assert!(!f.admits(&tcp("192.168.3.1:1")));
        assert!(f.admits(&tcp("[fd12::1]:1")));
        assert!(!f.admits(&tcp("[fe80::1]:1")));

        let f = ip("anyipv6", "all");
        assert!(f.admits(&tcp("[2001:db8::1]:1")));
        assert!(!f.admits(&tcp("1.2.3.4:1")));
        let f = ip("", "anyipv4");
        assert!(!f.admits(&tcp("1.2.3.4:1")));
        assert!(f.admits(&tcp("[2001:db8::1]:1")));
    }

    #[test]
    fn unix_credentials() {
        let f = ip("uid:1000", "all");
        assert!(f.admits(&unix(5, 1000, 1000)));
        assert!(!f.admits(&unix(5, 1001, 1000)));
        assert!(!f.admits(&tcp("127.0.0.1:1")));
        let f = ip("gid:44,pid:77", "anyunix");
        assert!(f.admits(&unix(5, 1, 44)));
        assert!(f.admits(&unix(77, 1, 1)));
        assert!(!f.admits(&unix(5, 1, 1)));
        // Credentials the kernel did not give never match.
        assert!(!f.admits(&Peer::Unix {
            pid: None,
            uid: None,
            gid: None
        }));
        // vsock rules parse and never match here.
        let f = ip("vsock-cid:3,anyvsock", "all");
        assert!(!f.admits(&unix(5, 1, 1)));
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
