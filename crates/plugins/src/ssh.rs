//! `ssh`: a file on a remote host, read and written over SFTP.
//!
//! Each client connection opens its own SSH session (as nbdkit does), so
//! connections do not share state and multi-conn is off.  SSH itself is
//! libssh2's (the `ssh2` crate): the host key is checked against
//! known_hosts files unless `verify-remote-host=false`, and the user is
//! authenticated with the ssh agent, then identity files, then a password.
//! Flush uses OpenSSH's fsync@openssh.com extension.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nbdkit_backend::{
    parse_size, Backend, Config, ConfigError, Error, ErrorKind, Handle, LockExt, Param, PluginSpec,
    Result,
};
use ssh2::{CheckResult, KnownHostFileKind, OpenFlags, OpenType, Session};

struct Settings {
    host: String,
    port: u16,
    path: String,
    user: String,
    password: Option<String>,
    identities: Vec<PathBuf>,
    known_hosts: Option<PathBuf>,
    verify: bool,
    compression: bool,
    timeout: Option<Duration>,
    create: Option<(u64, i32)>,
}

struct Ssh {
    s: Settings,
    /// create=true replaces the file once, on the first connection.
    created: OnceLock<std::result::Result<(), Error>>,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

impl Ssh {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::io(format!(
            "ssh: {}@{}:{}: {what}: {e}",
            self.s.user, self.s.host, self.s.port
        ))
    }

    fn connect(&self) -> Result<Session> {
        let s = &self.s;
        let addrs: Vec<_> = (s.host.as_str(), s.port)
            .to_socket_addrs()
            .map_err(|e| self.err("resolving the host", e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            let r = match s.timeout {
                Some(t) => TcpStream::connect_timeout(&a, t),
                None => TcpStream::connect(a),
            };
            match r {
                Ok(t) => {
                    tcp = Some(t);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            self.err(
                "connecting",
                last.map_or("no address".to_string(), |e| e.to_string()),
            )
        })?;
        let mut sess = Session::new().map_err(|e| self.err("starting a session", e))?;
        if let Some(t) = s.timeout {
            sess.set_timeout(t.as_millis().min(u32::MAX as u128) as u32);
        }
        sess.set_compress(s.compression);
        sess.set_tcp_stream(tcp);
        sess.handshake().map_err(|e| self.err("SSH handshake", e))?;
        if s.verify {
            self.verify_host(&sess)?;
        }
        self.authenticate(&sess)?;
        Ok(sess)
    }

    /// The host key must be in a known_hosts file, and match.
    fn verify_host(&self, sess: &Session) -> Result<()> {
        let s = &self.s;
        let (key, _) = sess
            .host_key()
            .ok_or_else(|| self.err("verifying the host", "the server sent no host key"))?;
        let files: Vec<PathBuf> = match &s.known_hosts {
            Some(f) => vec![f.clone()],
            None => home()
                .map(|h| h.join(".ssh/known_hosts"))
                .into_iter()
                .chain([PathBuf::from("/etc/ssh/ssh_known_hosts")])
                .collect(),
        };
        for f in &files {
            if !f.exists() {
                continue;
            }
            let mut kh = sess
                .known_hosts()
                .map_err(|e| self.err("reading known hosts", e))?;
            kh.read_file(f, KnownHostFileKind::OpenSSH)
                .map_err(|e| self.err(&format!("reading {}", f.display()), e))?;
            match kh.check_port(&s.host, s.port, key) {
                CheckResult::Match => return Ok(()),
                CheckResult::Mismatch => {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "ssh: {}:{}: the host key does not match the one in {} (a man-in-the-middle attack, or the key changed)",
                            s.host,
                            s.port,
                            f.display()
                        ),
                    ))
                }
                CheckResult::NotFound | CheckResult::Failure => {}
            }
        }
        let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "ssh: {}:{}: the host key is not in {} (connect once with ssh, give known-hosts=FILE, or verify-remote-host=false)",
                s.host,
                s.port,
                shown.join(" or ")
            ),
        ))
    }

    fn authenticate(&self, sess: &Session) -> Result<()> {
        let s = &self.s;
        // The agent first, when there is one, as ssh does.
        if std::env::var_os("SSH_AUTH_SOCK").is_some() {
            let _ = sess.userauth_agent(&s.user);
        }
        if !sess.authenticated() {
            let defaults = home()
                .map(|h| {
                    ["id_ed25519", "id_ecdsa", "id_rsa"]
                        .iter()
                        .map(|n| h.join(".ssh").join(n))
                        .filter(|p| p.exists())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            for id in s.identities.iter().chain(defaults.iter()) {
                if sess
                    .userauth_pubkey_file(&s.user, None, id, s.password.as_deref())
                    .is_ok()
                {
                    break;
                }
            }
        }
        if !sess.authenticated() {
            if let Some(pw) = &s.password {
                let _ = sess.userauth_password(&s.user, pw);
            }
        }
        if sess.authenticated() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "ssh: {}@{}:{}: authentication failed (tried the agent, identity files{})",
                    s.user,
                    s.host,
                    s.port,
                    if s.password.is_some() {
                        " and the password"
                    } else {
                        ""
                    }
                ),
            ))
        }
    }
}

impl Backend for Ssh {
    fn name(&self) -> &str {
        "ssh"
    }
    fn open(&self, readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        let sess = self.connect()?;
        let sftp = sess.sftp().map_err(|e| self.err("starting SFTP", e))?;
        let path = Path::new(&self.s.path);
        if let Some((size, mode)) = self.s.create {
            self.created
                .get_or_init(|| {
                    let mut f = sftp
                        .open_mode(
                            path,
                            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                            mode,
                            OpenType::File,
                        )
                        .map_err(|e| self.err(&format!("creating {}", self.s.path), e))?;
                    // The mode too: an existing file keeps its own on
                    // O_TRUNC, and create-mode is what the user asked for.
                    let stat = ssh2::FileStat {
                        size: Some(size),
                        uid: None,
                        gid: None,
                        perm: Some(mode as u32),
                        atime: None,
                        mtime: None,
                    };
                    f.setstat(stat)
                        .map_err(|e| self.err(&format!("setting the size of {}", self.s.path), e))
                })
                .clone()?;
        }
        let flags = if readonly {
            OpenFlags::READ
        } else {
            OpenFlags::READ | OpenFlags::WRITE
        };
        let (file, writable) = match sftp.open_mode(path, flags, 0, OpenType::File) {
            Ok(f) => (f, !readonly),
            // A file the user may only read is served read-only.
            Err(e) if !readonly && e.code() == ssh2::ErrorCode::SFTP(3) => (
                sftp.open_mode(path, OpenFlags::READ, 0, OpenType::File)
                    .map_err(|e| self.err(&format!("opening {}", self.s.path), e))?,
                false,
            ),
            Err(e) => return Err(self.err(&format!("opening {}", self.s.path), e)),
        };
        let mut file = file;
        let size = file
            .stat()
            .map_err(|e| self.err(&format!("stat {}", self.s.path), e))?
            .size
            .ok_or_else(|| self.err(&self.s.path, "the server gives no size"))?;
        Ok(Box::new(SshHandle {
            inner: Mutex::new(Remote {
                file,
                _sftp: sftp,
                _sess: sess,
            }),
            size,
            writable,
            name: format!("{}:{}", self.s.host, self.s.path),
        }))
    }
}

struct Remote {
    // Dropped in this order: the file, then SFTP, then the session.
    file: ssh2::File,
    _sftp: ssh2::Sftp,
    _sess: Session,
}

struct SshHandle {
    inner: Mutex<Remote>,
    size: u64,
    writable: bool,
    name: String,
}

impl SshHandle {
    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::from_io(format_args!("ssh: {what} {}", self.name), e)
    }
}

impl Handle for SshHandle {
    fn source_name(&self) -> Option<String> {
        Some(self.name.clone())
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(self.writable)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut r = self.inner.lock_unpoisoned();
        r.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| r.file.read_exact(buf))
            .map_err(|e| self.io("reading", e))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only("ssh: the file is open read-only"));
        }
        let mut r = self.inner.lock_unpoisoned();
        r.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| r.file.write_all(buf))
            .map_err(|e| self.io("writing", e))
    }
    fn flush(&self) -> Result<()> {
        let mut r = self.inner.lock_unpoisoned();
        r.file
            .fsync()
            .map_err(|e| Error::io(format!("ssh: fsync {}: {e}", self.name)))
    }
}

fn create(cfg: &mut Config) -> std::result::Result<Arc<dyn Backend>, ConfigError> {
    let cerr = |m: String| ConfigError::new(format!("ssh: {m}"));
    let host = cfg.require("host", "ssh")?;
    let path = cfg.require("path", "ssh")?;
    let port = match cfg.take("port") {
        None => 22,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| cerr(format!("port={p}: expected a port number")))?,
    };
    let user = match cfg.take("user") {
        Some(u) => u,
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .map_err(|_| cerr("user= is needed (USER is not set)".into()))?,
    };
    let password = cfg.take_secret("password", "ssh")?;
    let identities = cfg
        .take_all("identity")
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let known_hosts = cfg.take("known-hosts").map(PathBuf::from);
    let verify = cfg.take_bool("verify-remote-host")?.unwrap_or(true);
    let compression = cfg.take_bool("compression")?.unwrap_or(false);
    let timeout = match cfg.take("timeout") {
        None => None,
        Some(t) => Some(
            t.parse::<u64>()
                .ok()
                .filter(|&t| t > 0)
                .map(Duration::from_secs)
                .ok_or_else(|| cerr(format!("timeout={t}: expected a number of seconds")))?,
        ),
    };
    match cfg.take("config") {
        None => {}
        // Not reading any configuration is what this plugin always does.
        Some(c) if c.is_empty() => {}
        Some(c) => {
            return Err(cerr(format!(
                "config={c}: ssh_config files are not read by this plugin (libssh2 has no parser): give host=, port=, user= and identity= instead"
            )))
        }
    }
    let create = if cfg.take_bool("create")?.unwrap_or(false) {
        let size = cfg
            .take("create-size")
            .ok_or_else(|| cerr("create=true needs create-size=".into()))?;
        let size = parse_size(&size).map_err(|e| cerr(format!("create-size={size}: {e}")))?;
        let mode = match cfg.take("create-mode") {
            None => 0o600,
            Some(m) => i32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| (0..=0o7777).contains(m))
                .ok_or_else(|| {
                    cerr(format!(
                        "create-mode={m}: expected an octal mode such as 0644"
                    ))
                })?,
        };
        Some((size, mode))
    } else {
        for k in ["create-size", "create-mode"] {
            if cfg.take(k).is_some() {
                return Err(cerr(format!("{k}= needs create=true")));
            }
        }
        None
    };
    Ok(Arc::new(Ssh {
        s: Settings {
            host,
            port,
            path,
            user,
            password,
            identities,
            known_hosts,
            verify,
            compression,
            timeout,
            create,
        },
        created: OnceLock::new(),
    }))
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "ssh",
    summary: "a remote file over SSH (SFTP), read-write",
    description: "Each client connection has its own SSH session.  The host key must be in\n\
known-hosts= (default ~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts) unless\n\
verify-remote-host=false; authentication tries the ssh agent, identity= files\n\
(then ~/.ssh/id_ed25519, id_ecdsa, id_rsa) and password=.\n\n\
Examples:\n  nbdkit-rs ssh host=server.example.com disks/disk.img user=me\n  \
nbdkit-rs ssh host=10.0.0.5 /var/tmp/new.img create=true create-size=10G",
    magic_config_key: Some("path"),
    params: &[
        Param { name: "host", help: "the remote host (required)" },
        Param { name: "path", help: "the remote file, relative to the home directory unless absolute (required; the magic key)" },
        Param { name: "port", help: "the SSH port (default 22)" },
        Param { name: "user", help: "the remote user (default: the local user)" },
        Param { name: "password", help: "PASSWORD, -, -FD or +FILE: a password (also the identity files' passphrase)" },
        Param { name: "identity", help: "a private key file, tried before the defaults (repeatable)" },
        Param { name: "known-hosts", help: "the known_hosts file to check the host key against" },
        Param { name: "verify-remote-host", help: "false: do not check the host key (dangerous)" },
        Param { name: "compression", help: "true: compress the SSH stream" },
        Param { name: "timeout", help: "connection and request timeout in seconds" },
        Param { name: "config", help: "empty only: ssh_config files are not read" },
        Param { name: "create", help: "true: create (or replace) the file on the first connection" },
        Param { name: "create-size", help: "the size of the created file (with create=true)" },
        Param { name: "create-mode", help: "the created file's permissions, octal (default 0600)" },
    ],
    create,
};
