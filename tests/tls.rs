//! TLS (X.509) with real clients — nbdinfo, nbdcopy (libnbd/GnuTLS) and
//! qemu-img — and with our own client for what they never send.
//! Certificates are made fresh for each test with openssl.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

/// A CA, a server certificate, client certificates, and one client
/// certificate from another CA, in the directory layouts nbdkit (server)
/// and libnbd/qemu (client) expect.
struct Pki {
    _dir: tempfile::TempDir,
    /// ca-cert.pem, server-cert.pem, server-key.pem
    server: PathBuf,
    /// ca-cert.pem, client-cert.pem, client-key.pem (signed by the CA)
    client: PathBuf,
    /// ca-cert.pem only: verifies the server, presents no certificate.
    anonymous: PathBuf,
    /// ca-cert.pem of the right CA, but a client certificate from another.
    stranger: PathBuf,
    /// ca-cert.pem of another CA: the server's certificate does not verify.
    wrong_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// Make key `name-key.pem` and certificate `name-cert.pem` signed by
/// `ca` (a prefix of `ca-key.pem`/`ca-cert.pem` files), with `ext`.
fn issue(dir: &Path, ca: &str, name: &str, cn: &str, serial: &str, ext: &str) {
    let extfile = format!("{name}.ext");
    std::fs::write(dir.join(&extfile), ext).expect("ext file");
    let (key, csr, cert) = (
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}-cert.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            // A whole subject (`/C=US/O=BigCo/CN=...`), or just a CN.
            &if cn.starts_with('/') {
                cn.to_string()
            } else {
                format!("/CN={cn}")
            },
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &extfile,
        ],
    );
}

fn make_ca(dir: &Path, name: &str, cn: &str) {
    self_signed(
        dir,
        EC_P256,
        &format!("{name}-key.pem"),
        &format!("{name}-cert.pem"),
        &format!("/CN={cn}"),
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// The extensions of a server certificate (for localhost) and of a client
/// certificate.
const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

/// The directory `w/sub` holding copies of `files` (from, to) from `w`:
/// the layout one side of a connection expects.
fn layout(w: &Path, sub: &str, files: &[(&str, &str)]) -> PathBuf {
    let p = w.join(sub);
    std::fs::create_dir(&p).expect("mkdir");
    for (from, to) in files {
        std::fs::copy(w.join(from), p.join(to)).expect("copy");
    }
    p
}

fn pki() -> Option<Pki> {
    if !have("openssl") {
        return None;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let w = d.path();
    make_ca(w, "ca", "nbdkit-rs test CA");
    make_ca(w, "other", "some other CA");
    issue(w, "ca", "server", "localhost", "10", SERVER_EXT);
    issue(w, "ca", "client", "alice", "11", CLIENT_EXT);
    issue(w, "other", "stranger", "mallory", "12", CLIENT_EXT);

    let layout = |sub: &str, files: &[(&str, &str)]| layout(w, sub, files);
    let server = layout(
        "server",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("server-cert.pem", "server-cert.pem"),
            ("server-key.pem", "server-key.pem"),
        ],
    );
    let client = layout(
        "client",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("client-cert.pem", "client-cert.pem"),
            ("client-key.pem", "client-key.pem"),
        ],
    );
    let anonymous = layout("anonymous", &[("ca-cert.pem", "ca-cert.pem")]);
    let stranger = layout(
        "stranger",
        &[
            ("ca-cert.pem", "ca-cert.pem"),
            ("stranger-cert.pem", "client-cert.pem"),
            ("stranger-key.pem", "client-key.pem"),
        ],
    );
    let wrong_ca = layout("wrong-ca", &[("other-cert.pem", "ca-cert.pem")]);
    Some(Pki {
        _dir: d,
        server,
        client,
        anonymous,
        stranger,
        wrong_ca,
    })
}

fn start(pki: &Pki, extra: &[&str], plugin: &[&str]) -> Server {
    let certs = format!("--tls-certificates={}", pki.server.display());
    let mut args: Vec<&str> = vec![&certs];
    args.extend_from_slice(extra);
    args.extend_from_slice(plugin);
    Server::start(&args)
}

fn nbdinfo(uri: &str) -> std::process::Output {
    Command::new("nbdinfo")
        .arg(uri)
        .output()
        .expect("run nbdinfo")
}

/// A rustls client that trusts the test CA (and presents no certificate).
fn rustls_client(pki: &Pki) -> Arc<rustls::ClientConfig> {
    client_with(pki, rustls::DEFAULT_VERSIONS, None)
}

/// [`rustls_client`] speaking only `versions`, and with `cipher` only
/// the suites whose name contains it (`"CHACHA20"`).
fn client_with(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    cipher: Option<&str>,
) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(pki.server.join("ca-cert.pem")).expect("ca");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.expect("cert")).expect("add CA");
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(c) = cipher {
        provider
            .cipher_suites
            .retain(|s| format!("{:?}", s.suite()).contains(c));
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// STARTTLS, then a TLS handshake with `config`: the version negotiated,
/// or why the handshake failed.
fn handshake(
    s: &Server,
    config: Arc<rustls::ClientConfig>,
) -> Result<rustls::ProtocolVersion, String> {
    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::StartTls), REP_ACK);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(config, name).expect("TLS client");
    let mut sock = c.s.try_clone().expect("clone socket");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(conn.protocol_version().expect("version"))
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let s = start(&pki, &["--tls=require"], &["memory", "size=4M"]);
    let uri = s.tls_uri(&pki.client);
    let out = nbdinfo(&uri);
    assert!(out.status.success(), "nbdinfo: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4194304"), "{text}");

    // Write through TLS, read back through TLS, compare.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("in.bin");
    let back = dir.path().join("out.bin");
    make_file(&src, 4 << 20, 7);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert!(std::fs::read(&src).expect("in") == std::fs::read(&back).expect("out"));
}

#[test]
fn plaintext_is_refused_under_require_and_allowed_under_on() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") {
        return;
    }
    let s = start(&pki, &["--tls=require"], &["memory", "size=1M"]);
    let out = nbdinfo(&s.uri_for(""));
    assert!(!out.status.success(), "plaintext accepted under require");

    let s = start(&pki, &["--tls=on"], &["memory", "size=1M"]);
    let out = nbdinfo(&s.uri_for(""));
    assert!(out.status.success(), "plaintext under --tls=on: {out:?}");
    let out = nbdinfo(&s.tls_uri(&pki.client));
    assert!(out.status.success(), "TLS under --tls=on: {out:?}");
}

#[test]
fn verify_peer_needs_a_certificate_from_the_ca() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") {
        return;
    }
    let s = start(
        &pki,
        &["--tls=require", "--tls-verify-peer"],
        &["memory", "size=1M"],
    );
    for (who, dir) in [("anonymous", &pki.anonymous), ("stranger", &pki.stranger)] {
        let out = nbdinfo(&s.tls_uri(dir));
        assert!(!out.status.success(), "{who} client accepted");
    }
    let out = nbdinfo(&s.tls_uri(&pki.client));
    assert!(
        out.status.success(),
        "client with a CA-signed cert: {out:?}"
    );

    // Without --tls-verify-peer, a client without a certificate is fine.
    let s = start(&pki, &["--tls=require"], &["memory", "size=1M"]);
    let out = nbdinfo(&s.tls_uri(&pki.anonymous));
    assert!(out.status.success(), "anonymous client: {out:?}");
}

/// For the DN rules: the server's CA also trusts a second CA, "CN=BigCo",
/// which issued `bigco`'s certificate, with the subject of
/// nbdkit_peer_tls_dn(3)'s example; `alice` is from the first CA.
struct DnPki {
    _dir: tempfile::TempDir,
    server: PathBuf,
    bigco: PathBuf,
    alice: PathBuf,
}

fn dn_pki() -> Option<DnPki> {
    if !have("openssl") {
        return None;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let w = d.path();
    make_ca(w, "ca", "nbdkit-rs test CA");
    make_ca(w, "bigca", "BigCo");
    issue(w, "ca", "server", "localhost", "20", SERVER_EXT);
    issue(w, "ca", "alice", "alice", "21", CLIENT_EXT);
    issue(
        w,
        "bigca",
        "bigco",
        "/C=US/ST=New York/L=New York/O=BigCo/CN=client.example.com",
        "22",
        CLIENT_EXT,
    );
    let dir = |sub: &str, files: &[(&str, &str)]| layout(w, sub, files);
    let server = dir(
        "server",
        &[
            ("server-cert.pem", "server-cert.pem"),
            ("server-key.pem", "server-key.pem"),
        ],
    );
    // Both CAs verify clients.
    let mut cas = std::fs::read(w.join("ca-cert.pem")).expect("ca");
    cas.extend(std::fs::read(w.join("bigca-cert.pem")).expect("bigca"));
    std::fs::write(server.join("ca-cert.pem"), cas).expect("cas");
    let client = |name: &str| {
        dir(
            name,
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                (&format!("{name}-cert.pem"), "client-cert.pem"),
                (&format!("{name}-key.pem"), "client-key.pem"),
            ],
        )
    };
    Some(DnPki {
        server,
        bigco: client("bigco"),
        alice: client("alice"),
        _dir: d,
    })
}

/// nbdkit >= 1.40: the ip filter's `dn:`/`issuer-dn:` rules, matched
/// against the verified client certificate's names in RFC 4514 form, and
/// checked when the client opens or lists exports.
#[test]
fn ip_filter_admits_clients_by_certificate_dn() {
    let Some(pki) = dn_pki() else { return };
    if !have("nbdinfo") {
        return;
    }
    let certs = format!("--tls-certificates={}", pki.server.display());
    let serve = |tls: &[&str], rules: &[&str]| {
        let mut args = vec![certs.as_str()];
        args.extend_from_slice(tls);
        args.extend_from_slice(&["--filter=ip", "memory", "size=1M"]);
        args.extend_from_slice(rules);
        Server::start(&args)
    };
    let verify = ["--tls=require", "--tls-verify-peer"];
    let admitted = |s: &Server, who: &Path| nbdinfo(&s.tls_uri(who)).status.success();
    let bigco_dn = "CN=client.example.com,O=BigCo,L=New York,ST=New York,C=US";

    // The exact DN (one parameter, commas and all), and a wildcard.
    let exact = format!("allow=dn:{bigco_dn}");
    for allow in [exact.as_str(), "allow=dn:*,O=BigCo,*"] {
        let s = serve(&verify, &[allow, "deny=all"]);
        assert!(
            admitted(&s, &pki.bigco),
            "{allow}: bigco refused: {}",
            s.log()
        );
        assert!(!admitted(&s, &pki.alice), "{allow}: alice admitted");
        // Listing exports is refused too.
        let list = Command::new("nbdinfo")
            .args(["--list", &s.tls_uri(&pki.alice)])
            .output()
            .expect("nbdinfo --list");
        assert!(!list.status.success(), "{allow}: alice listed exports");
        let log = s.log();
        assert!(
            log.contains("denied by the allow/deny rules") && log.contains("CN=alice"),
            "{log}"
        );
    }
    // By issuer: allowed, and (everyone else admitted) denied.
    let s = serve(&verify, &["allow=issuer-dn:CN=BigCo", "deny=all"]);
    assert!(admitted(&s, &pki.bigco));
    assert!(!admitted(&s, &pki.alice));
    let s = serve(&verify, &["deny=issuer-dn:CN=BigCo"]);
    assert!(!admitted(&s, &pki.bigco));
    assert!(admitted(&s, &pki.alice));
    // A DN rule next to ordinary ones: the rules are one list.
    let s = serve(
        &verify,
        &["allow=dn:CN=nobody", "allow=anyunix", "deny=all"],
    );
    assert!(admitted(&s, &pki.alice));

    // Without --tls-verify-peer no certificate is asked for: no DN, and
    // even dn:* does not match.  Nor does a plaintext client's.
    let s = serve(&["--tls=on"], &["allow=dn:*", "deny=all"]);
    assert!(!admitted(&s, &pki.bigco));
    assert!(!nbdinfo(&s.uri_for("")).status.success());
    let log = s.log();
    assert!(
        log.contains("without a verified client certificate"),
        "{log}"
    );
}

#[test]
fn qemu_img_info_over_tls() {
    let Some(pki) = pki() else { return };
    if !have("qemu-img") {
        return;
    }
    let s = start(&pki, &["--tls=require"], &["memory", "size=2M"]);
    let out = stdout_of(Command::new("qemu-img").args([
        "info",
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            pki.client.display()
        ),
        "--image-opts",
        &format!(
            "driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost",
            s.socket.display()
        ),
    ]));
    assert!(out.contains("2 MiB") || out.contains("2097152"), "{out}");
}

#[test]
fn options_before_starttls_need_tls_under_require() {
    let Some(pki) = pki() else { return };
    let s = start(&pki, &["--tls=require"], &["memory", "size=1M"]);
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::List);
    assert_eq!(c.read_until_final().0, REP_ERR_TLS_REQD);
    for go in [false, true] {
        c.option(&OptionRequest::Info {
            go,
            name: String::new(),
            requests: vec![],
        });
        assert_eq!(c.read_until_final().0, REP_ERR_TLS_REQD);
    }
    assert_eq!(
        c.simple_option(OptionRequest::StructuredReply),
        REP_ERR_TLS_REQD
    );
    // After STARTTLS the same options work, and a second STARTTLS is invalid.
    assert_eq!(c.starttls(rustls_client(&pki)), REP_ACK);
    assert_eq!(c.simple_option(OptionRequest::StartTls), REP_ERR_INVALID);
    c.option(&OptionRequest::List);
    assert_eq!(c.read_until_final().0, REP_ACK);
    let (size, _) = c.go(true, false, true);
    assert_eq!(size, 1 << 20);
    c.request(CMD_READ, 0, 1, 0, 4096, &[]);
    let r = c.reply(4096);
    assert_eq!(r.error, 0);

    // EXPORT_NAME before STARTTLS cannot be refused: the server hangs up.
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::ExportName(String::new()));
    assert!(c.is_closed());

    // ABORT is allowed before TLS.
    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::Abort), REP_ACK);
}

#[test]
fn starttls_resets_what_was_negotiated_in_plaintext() {
    let Some(pki) = pki() else { return };
    let s = start(&pki, &["--tls=on"], &["memory", "size=1M"]);
    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::StructuredReply), REP_ACK);
    assert_eq!(c.starttls(rustls_client(&pki)), REP_ACK);
    // Structured replies are gone, so meta contexts are refused until
    // they are negotiated again.
    c.option(&OptionRequest::MetaContext {
        set: true,
        export: String::new(),
        queries: vec!["base:allocation".into()],
    });
    assert_eq!(c.read_until_final().0, REP_ERR_INVALID);
    assert_eq!(c.simple_option(OptionRequest::StructuredReply), REP_ACK);
}

/// `nbdkit-rs -f -U - ARGS memory size=1M` must fail; its stderr.
fn refused_with_memory(args: &[&str]) -> String {
    fails_stderr(&[&["-f", "-U", "-"], args, &["memory", "size=1M"]].concat())
}

#[test]
fn certificate_problems_are_reported_at_start_up() {
    let Some(pki) = pki() else { return };
    let empty = tempfile::tempdir().expect("tempdir");
    let e = refused_with_memory(&[
        "--tls=require",
        &format!("--tls-certificates={}", empty.path().display()),
    ]);
    assert!(
        e.contains("server-cert.pem") && e.lines().count() == 1,
        "{e}"
    );

    let bad = tempfile::tempdir().expect("tempdir");
    for f in ["ca-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.server.join(f), bad.path().join(f)).expect("copy");
    }
    std::fs::write(bad.path().join("server-cert.pem"), "not a certificate\n").expect("write");
    let e = refused_with_memory(&[
        "--tls=on",
        &format!("--tls-certificates={}", bad.path().display()),
    ]);
    assert!(
        e.contains("server-cert.pem") && e.contains("no PEM certificate"),
        "{e}"
    );

    // A key that is not the certificate's.
    std::fs::copy(
        pki.server.join("server-cert.pem"),
        bad.path().join("server-cert.pem"),
    )
    .expect("copy");
    std::fs::copy(
        pki.client.join("client-key.pem"),
        bad.path().join("server-key.pem"),
    )
    .expect("copy");
    let e = refused_with_memory(&[
        "--tls=on",
        &format!("--tls-certificates={}", bad.path().display()),
    ]);
    assert!(e.contains("server-key.pem"), "{e}");

    let e = refused_with_memory(&["--tls=maybe"]);
    assert!(e.contains("--tls=maybe"), "{e}");
    let e = refused_with_memory(&["--tls-psk=/dev/null"]);
    assert!(e.contains("--tls-psk"), "{e}");
}

#[test]
fn run_exports_tls_and_an_nbds_uri() {
    let Some(pki) = pki() else { return };
    let certs = format!("--tls-certificates={}", pki.server.display());
    for (mode, n, scheme) in [
        // As nbdkit: $tls is not set when TLS is off.
        ("off", "", "nbd+unix"),
        ("on", "1", "nbds+unix"),
        ("require", "2", "nbds+unix"),
    ] {
        let certs_arg = if mode == "off" { "-f" } else { certs.as_str() };
        let out = stdout_of(Command::new(binary()).args([
            &format!("--tls={mode}"),
            certs_arg,
            "--run",
            "echo \"$tls $uri\"",
            "memory",
            "size=1M",
        ]));
        assert!(
            out.starts_with(&format!("{n} {scheme}://")),
            "--tls={mode}: {out}"
        );
    }
    let cfg = stdout_of(Command::new(binary()).arg("--dump-config"));
    assert!(cfg.lines().any(|l| l == "tls=yes"), "{cfg}");
}

#[test]
fn timeout_covers_a_stalled_tls_handshake() {
    let Some(pki) = pki() else { return };
    let s = start(
        &pki,
        &["--tls=require", "--timeout=1"],
        &["memory", "size=1M"],
    );
    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::StartTls), REP_ACK);
    // No ClientHello follows: the server must give up on its own (before
    // the client's 30 s read timeout).
    assert!(c.closed_by_server());
}

#[cfg(feature = "tls-psk")]
/// A psktool key file for `alice` (and the directory qemu wants it in).
struct Psk {
    dir: tempfile::TempDir,
    /// dir/keys.psk: `alice:KEY`
    file: PathBuf,
}

#[cfg(feature = "tls-psk")]
fn psk() -> Option<Psk> {
    if !have("psktool") {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys.psk");
    run_ok(
        Command::new("psktool")
            .args(["-u", "alice", "-p"])
            .arg(&file),
    );
    Some(Psk { dir, file })
}

#[cfg(feature = "tls-psk")]
/// A key file in another directory: `user:key`.
fn key_file(user: &str, key: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::write(d.path().join("keys.psk"), format!("{user}:{key}\n")).expect("key file");
    d
}

#[cfg(feature = "tls-psk")]
fn psk_uri(s: &Server, user: &str, file: &Path) -> String {
    // libnbd takes the TLS username from the URI's user part.
    format!(
        "nbds+unix://{user}@/?socket={}&tls-psk-file={}",
        s.socket.display(),
        file.display()
    )
}

#[cfg(feature = "tls-psk")]
fn start_psk(psk: &Psk, mode: &str) -> Server {
    Server::start(&[
        mode,
        &format!("--tls-psk={}", psk.file.display()),
        "memory",
        "size=4M",
    ])
}

#[cfg(feature = "tls-psk")]
#[test]
fn psk_with_libnbd_and_qemu() {
    let Some(psk) = psk() else { return };
    if !have("nbdinfo") || !have("qemu-img") || !have_python_nbd() {
        return;
    }
    let s = start_psk(&psk, "--tls=require");
    let out = nbdinfo(&psk_uri(&s, "alice", &psk.file));
    assert!(out.status.success(), "nbdinfo with PSK: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("with TLS") && text.contains("4194304"),
        "{text}"
    );

    // nbdsh (libnbd's Python API): write with FUA, read back.
    let script = format!(
        "h.set_tls(nbd.TLS_REQUIRE)\n\
         h.set_tls_psk_file({file:?})\n\
         h.set_tls_username('alice')\n\
         h.connect_unix({sock:?})\n\
         assert h.get_tls_negotiated()\n\
         h.pwrite(b'psk!' * 1024, 8192, nbd.CMD_FLAG_FUA)\n\
         assert h.pread(4096, 8192) == b'psk!' * 1024\n\
         print('ok')\n",
        file = psk.file.display().to_string(),
        sock = s.socket.display().to_string(),
    );
    let out = stdout_of(Command::new(PYTHON).args(["-m", "nbd", "-c", &script]));
    assert_eq!(out.trim(), "ok");

    // qemu reads keys.psk from the directory of its tls-creds-psk object,
    // and sees what nbdsh wrote.
    let dir = psk.dir.path().display().to_string();
    let out = stdout_of(Command::new("qemu-io").args([
        "--object",
        &format!("tls-creds-psk,id=tls0,endpoint=client,dir={dir},username=alice"),
        "--image-opts",
        &format!("driver=nbd,path={},tls-creds=tls0", s.socket.display()),
        "-c",
        "read -P 0x70 8192 1",
        "-c",
        "read -P 0x00 0 4096",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 2, "{out}");
}

#[cfg(feature = "tls-psk")]
#[test]
fn psk_refuses_wrong_keys_unknown_users_and_plaintext() {
    let Some(psk) = psk() else { return };
    if !have("nbdinfo") {
        return;
    }
    let s = start_psk(&psk, "--tls=require");
    let good = std::fs::read_to_string(&psk.file).expect("keys");
    let key = good.trim().split_once(':').expect("user:key").1.to_string();
    // Same user, another key.
    let wrong = key_file("alice", &"00".repeat(32));
    let out = nbdinfo(&psk_uri(&s, "alice", &wrong.path().join("keys.psk")));
    assert!(!out.status.success(), "wrong key accepted");
    // The right key under a name the server does not know.
    let stranger = key_file("mallory", &key);
    let out = nbdinfo(&psk_uri(&s, "mallory", &stranger.path().join("keys.psk")));
    assert!(!out.status.success(), "unknown user accepted");
    // Plaintext under --tls=require.
    let out = nbdinfo(&s.uri_for(""));
    assert!(!out.status.success(), "plaintext accepted under require");
    let mut c = RawClient::start(&s.socket);
    c.option(&OptionRequest::Info {
        go: true,
        name: String::new(),
        requests: vec![],
    });
    assert_eq!(c.read_until_final().0, REP_ERR_TLS_REQD);
    // The server said why, and still serves the right key.
    let log = s.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(
        log.contains("unknown username") && log.contains("mallory"),
        "{log}"
    );
    let out = nbdinfo(&psk_uri(&s, "alice", &psk.file));
    assert!(out.status.success(), "{out:?}");

    // Under --tls=on plaintext is allowed, PSK still works.
    let s = start_psk(&psk, "--tls=on");
    assert!(nbdinfo(&s.uri_for("")).status.success());
    assert!(nbdinfo(&psk_uri(&s, "alice", &psk.file)).status.success());
}

#[cfg(feature = "tls-psk")]
#[test]
fn psk_configuration_errors_are_reported_at_start_up() {
    let d = key_file("alice", "0011");
    let good = format!("--tls-psk={}", d.path().join("keys.psk").display());
    let e = refused_with_memory(&[&good, "--tls-certificates=/nonexistent"]);
    assert!(e.contains("cannot be used together"), "{e}");
    let e = refused_with_memory(&[&good, "--tls-verify-peer"]);
    assert!(e.contains("--tls-verify-peer"), "{e}");
    let e = refused_with_memory(&[&good, "--tls=off"]);
    assert!(e.contains("--tls-psk needs TLS"), "{e}");
    let e = refused_with_memory(&["--tls-psk=/nonexistent/keys.psk"]);
    assert!(e.contains("/nonexistent/keys.psk"), "{e}");
    let bad = key_file("alice", "not-hex");
    let e = refused_with_memory(&[&format!(
        "--tls-psk={}",
        bad.path().join("keys.psk").display()
    )]);
    assert!(e.contains("line 1") && e.contains("hex"), "{e}");
    let cfg = stdout_of(Command::new(binary()).arg("--dump-config"));
    assert!(cfg.lines().any(|l| l == "tls_psk=yes"), "{cfg}");
}

/// STARTTLS with an OpenSSL PSK client limited to one TLS version, then GO
/// (simple replies).  The handshake error, if it fails.
#[cfg(feature = "tls-psk")]
fn openssl_psk_connect(
    s: &Server,
    version: openssl::ssl::SslVersion,
    user: &'static str,
    key: Vec<u8>,
) -> Result<openssl::ssl::SslStream<std::os::unix::net::UnixStream>, String> {
    use nbdkit_proto::option::OptionReplyHeader;
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use std::io::{Read, Write};

    let mut c = RawClient::start(&s.socket);
    assert_eq!(c.simple_option(OptionRequest::StartTls), REP_ACK);
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("connector");
    b.set_min_proto_version(Some(version)).unwrap();
    b.set_max_proto_version(Some(version)).unwrap();
    b.set_cipher_list("PSK").unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(move |_, _hint, identity, psk| {
        identity[..user.len()].copy_from_slice(user.as_bytes());
        identity[user.len()] = 0;
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let cfg = b
        .build()
        .configure()
        .unwrap()
        .use_server_name_indication(false)
        .verify_hostname(false);
    let mut t = cfg
        .connect("localhost", c.s.try_clone().unwrap())
        .map_err(|e| e.to_string())?;
    let go = OptionRequest::Info {
        go: true,
        name: String::new(),
        requests: vec![],
    };
    t.write_all(&go.encode()).unwrap();
    loop {
        let mut h = [0u8; OptionReplyHeader::LEN];
        t.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut d = vec![0u8; h.length as usize];
        t.read_exact(&mut d).unwrap();
        if h.reply == REP_ACK {
            return Ok(t);
        }
        assert_eq!(h.reply, REP_INFO, "GO");
    }
}

#[cfg(feature = "tls-psk")]
fn simple_request(command: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    RequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    }
    .encode(false)
}

/// [`openssl_psk_connect`], then a write and a read; the TLS version.
#[cfg(feature = "tls-psk")]
fn openssl_psk_session(
    s: &Server,
    version: openssl::ssl::SslVersion,
    user: &'static str,
    key: Vec<u8>,
) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut t = openssl_psk_connect(s, version, user, key)?;
    let negotiated = t.ssl().version_str().to_string();
    t.write_all(&[simple_request(CMD_WRITE, 1, 4096, 5), b"12345".to_vec()].concat())
        .unwrap();
    let mut r = [0u8; 16];
    t.read_exact(&mut r).unwrap();
    assert_eq!(&r[4..8], &[0; 4], "write over {negotiated}");
    t.write_all(&simple_request(CMD_READ, 2, 4096, 5)).unwrap();
    let mut r = [0u8; 21];
    t.read_exact(&mut r).unwrap();
    assert_eq!(&r[16..], b"12345", "read over {negotiated}");
    Ok(negotiated)
}

/// The TLS (async) transmission path holds a client that pipelines reads
/// and never reads the replies to -t requests in memory, as the threaded
/// path does (tests/hostile.rs), and loses nothing.
#[cfg(feature = "tls-psk")]
#[test]
fn psk_stalled_reader_holds_bounded_memory() {
    use std::io::{Read, Write};
    let key: Vec<u8> = (1..=32).collect();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let d = key_file("alice", &hex);
    let s = Server::start(&[
        "--tls=require",
        &format!("--tls-psk={}", d.path().join("keys.psk").display()),
        "pattern",
        "size=1G",
    ]);
    let pid = s.child.id();
    let mut t = openssl_psk_connect(&s, openssl::ssl::SslVersion::TLS1_3, "alice", key).unwrap();
    let base = rss_kib(pid);
    const N: u64 = 300;
    let all: Vec<u8> = (0..N)
        .flat_map(|i| simple_request(CMD_READ, i, i << 20, 1 << 20))
        .collect();
    t.write_all(&all).unwrap();
    let mut peak = 0;
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        peak = peak.max(rss_kib(pid));
    }
    eprintln!("TLS stalled reader: base {base} KiB, peak {peak} KiB");
    assert!(
        peak < base + 48 * 1024,
        "server grew from {base} KiB to {peak} KiB with {N} unread 1 MiB replies over TLS"
    );
    let mut seen = vec![false; N as usize];
    let mut data = vec![0u8; 1 << 20];
    for _ in 0..N {
        let mut h = [0u8; 16];
        t.read_exact(&mut h).unwrap();
        assert_eq!(&h[4..8], &[0; 4]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
        t.read_exact(&mut data).unwrap();
        let last = u64::from_be_bytes(data[data.len() - 8..].try_into().unwrap());
        assert_eq!(last, (cookie << 20) + (1 << 20) - 8, "pattern data");
    }
}

#[cfg(feature = "tls-psk")]
#[test]
fn psk_over_tls_1_2_and_1_3() {
    use openssl::ssl::SslVersion;
    let key: Vec<u8> = (1..=32).collect();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let d = key_file("alice", &hex);
    let s = Server::start(&[
        "--tls=require",
        &format!("--tls-psk={}", d.path().join("keys.psk").display()),
        "memory",
        "size=1M",
    ]);
    for (v, name) in [
        (SslVersion::TLS1_2, "TLSv1.2"),
        (SslVersion::TLS1_3, "TLSv1.3"),
    ] {
        assert_eq!(
            openssl_psk_session(&s, v, "alice", key.clone()).as_deref(),
            Ok(name)
        );
        let mut wrong = key.clone();
        wrong[0] ^= 1;
        assert!(
            openssl_psk_session(&s, v, "alice", wrong).is_err(),
            "{name}: wrong key accepted"
        );
        assert!(
            openssl_psk_session(&s, v, "bob", key.clone()).is_err(),
            "{name}: unknown user accepted"
        );
    }
}

// ------------------------------------------- the nbd plugin as a TLS client

/// The nbd plugin in front of `upstream`'s Unix socket, with `tls`
/// parameters; serves plaintext on its own socket.
fn tls_proxy(upstream: &Path, tls: &[&str]) -> Server {
    let sock = format!("socket={}", upstream.display());
    let mut args = vec!["nbd", sock.as_str()];
    args.extend_from_slice(tls);
    Server::start(&args)
}

/// The front's open failed: the client sees an error, the front's log says
/// why with `why`.
fn assert_open_fails(front: &Server, why: &str) {
    let out = nbdinfo(&front.uri);
    assert!(!out.status.success(), "opened: {out:?}");
    let log = front.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot open export"))
        .unwrap_or_else(|| panic!("no open error logged: {log}"));
    assert!(line.contains(why), "{line}");
}

#[test]
fn nbd_plugin_proxies_our_tls_server_with_every_capability() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") || !have("nbdcopy") || !have("qemu-io") {
        return;
    }
    // The upstream wants TLS and a client certificate from the CA.
    let up = start(
        &pki,
        &["--tls=require", "--tls-verify-peer"],
        &["memory", "size=16M"],
    );
    let certs = format!("tls-certificates={}", pki.client.display());
    let px = tls_proxy(&up.socket, &["tls=require", &certs]);
    // Capabilities come through TLS unchanged.
    assert_same_offer(&up.tls_uri(&pki.client), &px.uri);
    // nbdcopy in and out through the proxy, compared.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("in.bin");
    let back = dir.path().join("out.bin");
    make_file(&src, 16 << 20, 11);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&px.uri));
    run_ok(Command::new("nbdcopy").arg(&px.uri).arg(&back));
    assert!(std::fs::read(&src).expect("in") == std::fs::read(&back).expect("out"));
    // Writes, FUA, zeroes, trim, flush; read back through the proxy.
    qemu_io_ok(&px.uri, &[PROXY_IO, &["read -P 0x4d 8224k 32k"]].concat());
    // Block status through TLS: what the upstream says, the proxy says.
    assert_eq!(
        map_of(&px.uri),
        map_of(&up.tls_uri(&pki.client)),
        "block status"
    );
    // Big writes and many requests in flight over the one TLS session,
    // their replies out of order.
    if have_python_nbd() {
        nbd_script(
            r#"
big = bytes(range(256)) * (8 << 12)
h.pwrite(big, 4 << 20, nbd.CMD_FLAG_FUA)
bufs = []
for i in range(64):
    b = nbd.Buffer(131072)
    h.aio_pread(b, (4 << 20) + (i % 64) * 131072)
    bufs.append((i, b))
for i in range(16):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 65536), (14 << 20) + i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b in bufs:
    assert b.to_bytearray() == big[i * 131072:(i + 1) * 131072], i
for i in range(16):
    assert h.pread(65536, (14 << 20) + i * 65536) == bytes([i]) * 65536
"#,
            &[&px.uri],
        );
    }
    // Without a client certificate the upstream refuses the proxy (under
    // TLS 1.3 the server's alert comes after the client's last handshake
    // message: it is seen on the first read, or the first write meets the
    // closed socket).
    let anon = format!("tls-certificates={}", pki.anonymous.display());
    let px = tls_proxy(&up.socket, &["tls=require", &anon]);
    assert_open_fails(&px, "the TLS session failed");
}

#[test]
fn nbd_plugin_tls_refusals_and_fallback() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") {
        return;
    }
    let up = start(&pki, &["--tls=require"], &["memory", "size=1M"]);
    // A CA that did not sign the server's certificate.
    let wrong = format!("tls-certificates={}", pki.wrong_ca.display());
    let px = tls_proxy(&up.socket, &["tls=require", &wrong]);
    assert_open_fails(&px, "UnknownIssuer");
    // ... which tls-verify=false accepts.
    let px = tls_proxy(&up.socket, &["tls=require", &wrong, "tls-verify=false"]);
    assert!(nbdinfo(&px.uri).status.success(), "{}", px.log());
    // Without tls= the upstream's require refuses the plaintext proxy.
    let px = tls_proxy(&up.socket, &[]);
    assert_open_fails(&px, "requires TLS");

    let plain = Server::start(&["memory", "size=2M"]);
    let certs = format!("tls-certificates={}", pki.client.display());
    // tls=on: the plaintext server refuses STARTTLS, the proxy carries on.
    let px = tls_proxy(&plain.socket, &["tls=on", &certs]);
    let out = stdout_of(Command::new("nbdinfo").args(["--size", &px.uri]));
    assert_eq!(out.trim(), "2097152");
    // tls=require: it does not.
    let px = tls_proxy(&plain.socket, &["tls=require", &certs]);
    assert_open_fails(&px, "tls=require");
    // An nbds+unix:// URI means require, with its own tls-certificates=.
    let px = Server::start(&[
        "nbd",
        &format!(
            "uri=nbds+unix:///?socket={}&tls-certificates={}",
            plain.socket.display(),
            pki.client.display()
        ),
    ]);
    assert_open_fails(&px, "tls=require");
    let px = Server::start(&["nbd", &up.tls_uri(&pki.client)]);
    let out = stdout_of(Command::new("nbdinfo").args(["--size", &px.uri]));
    assert_eq!(out.trim(), "1048576");
}

#[test]
fn nbd_plugin_checks_the_host_name_over_tcp() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") {
        return;
    }
    let certs = format!("--tls-certificates={}", pki.server.display());
    let up = Server::start_tcp(&["--tls=require", &certs, "memory", "size=1M"]);
    let port = up
        .uri
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .unwrap_or_else(|| panic!("port in {}", up.uri));
    let client = format!("tls-certificates={}", pki.client.display());
    let port_arg = format!("port={port}");
    let elsewhere = "tls-hostname=elsewhere.example";
    for (host, extra, ok) in [
        // The certificate is for localhost and 127.0.0.1.
        ("127.0.0.1", &[][..], true),
        ("localhost", &[], true),
        ("localhost", &[elsewhere], false),
        ("localhost", &[elsewhere, "tls-verify=false"], true),
    ] {
        let h = format!("hostname={host}");
        let mut args = vec!["nbd", h.as_str(), &port_arg, "tls=require", &client];
        args.extend_from_slice(extra);
        let px = Server::start(&args);
        if ok {
            let out = stdout_of(Command::new("nbdinfo").args(["--size", &px.uri]));
            assert_eq!(out.trim(), "1048576", "{args:?}");
        } else {
            assert_open_fails(&px, "not valid for name");
        }
    }
}

#[test]
fn nbd_plugin_over_tls_to_qemu_nbd() {
    let Some(pki) = pki() else { return };
    if !have("qemu-nbd") || !have("nbdcopy") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    make_file(&img, 4 << 20, 5);
    let sock = dir.path().join("qemu.sock");
    /// Stops qemu-nbd even when an assertion fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // qemu's x509 server endpoint verifies clients by default: the proxy
    // must present client-cert.pem.
    let mut qemu = Killed(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(&sock)
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server",
                pki.server.display()
            ))
            .args(["--tls-creds", "tls0"])
            .arg(&img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = qemu.0.try_wait() {
            panic!("qemu-nbd exited: {st}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let certs = format!("tls-certificates={}", pki.client.display());
    let px = tls_proxy(&sock, &["tls=require", &certs]);
    assert!(read_all(&px.uri) == std::fs::read(&img).expect("img"));
    qemu_io_ok(
        &px.uri,
        &[
            "write -P 0x21 512k 128k",
            "write -f -z 1M 64k",
            "flush",
            "read -P 0x21 512k 128k",
        ],
    );
    let now = std::fs::read(&img).expect("img");
    assert!(now[512 << 10..640 << 10].iter().all(|&b| b == 0x21));
    assert!(now[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 0));
    // Plaintext to qemu-nbd with TLS: refused.
    let px = tls_proxy(&sock, &[]);
    assert!(!nbdinfo(&px.uri).status.success());
}

#[cfg(feature = "tls-psk")]
#[test]
fn nbd_plugin_with_a_psk_upstream() {
    let Some(psk) = psk() else { return };
    if !have("nbdcopy") || !have("nbdinfo") {
        return;
    }
    let up = start_psk(&psk, "--tls=require");
    let file = format!("tls-psk={}", psk.file.display());
    let px = tls_proxy(&up.socket, &["tls=require", &file, "tls-username=alice"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("in.bin");
    make_file(&src, 4 << 20, 3);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&px.uri));
    assert!(read_all(&px.uri) == std::fs::read(&src).expect("in"));
    // And what went through the proxy is what the upstream has.
    assert!(read_all(&psk_uri(&up, "alice", &psk.file)) == std::fs::read(&src).expect("in"));
    // The URI form: the user name in the authority, the file in the query.
    let px = Server::start(&["nbd", &psk_uri(&up, "alice", &psk.file)]);
    let out = stdout_of(Command::new("nbdinfo").args(["--size", &px.uri]));
    assert_eq!(out.trim(), "4194304");
    // A key the server does not have for alice.
    let wrong = key_file("alice", &"00".repeat(32));
    let wrong = format!("tls-psk={}", wrong.path().join("keys.psk").display());
    let px = tls_proxy(&up.socket, &["tls=require", &wrong, "tls-username=alice"]);
    assert_open_fails(&px, "TLS handshake with the server failed");
    // A user the keys file has no key for: a start-up error.
    let out = Command::new(binary())
        .args(["-U", "-", "nbd", "socket=/nonexistent", &file])
        .args(["tls-username=bob", "--run", "true"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("no key for the user 'bob'"), "{e}");
}

#[cfg(not(feature = "tls-psk"))]
#[test]
fn nbd_plugin_psk_needs_the_feature() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("keys.psk");
    std::fs::write(&f, "alice:0011\n").expect("keys");
    let out = Command::new(binary())
        .args(["-U", "-", "nbd", "socket=/nonexistent"])
        .arg(format!("tls-psk={}", f.display()))
        .args(["--run", "true"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("without PSK support"), "{e}");
}

/// Replace `to` with `contents` in one step, as a careful admin (or
/// certbot) does: write a temporary file beside it, then rename.
fn replace_file(to: &Path, contents: &[u8]) {
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, to).expect("rename");
}

#[test]
fn certificates_are_rotated_without_a_restart() {
    let Some(pki) = pki() else { return };
    if !have("nbdinfo") {
        return;
    }
    // The server's own copy of its directory, so the test can rotate it.
    let live = tempfile::tempdir().expect("tempdir");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.server.join(f), live.path().join(f)).expect("copy");
    }
    let certs = format!("--tls-certificates={}", live.path().display());
    // Over TCP, so that libnbd verifies the server's certificate (chain
    // and name) against the CA of the client's directory.
    let s = Server::start_tcp(&[&certs, "--tls=require", "memory", "size=1M"]);
    let port = s
        .uri
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .unwrap_or_else(|| panic!("port in {}", s.uri));
    let verified = |dir: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            dir.display()
        )
    };
    assert!(nbdinfo(&verified(&pki.anonymous)).status.success());
    assert!(!nbdinfo(&verified(&pki.wrong_ca)).status.success());

    // A new server certificate from the other CA: clients that trust only
    // that CA now verify the server, clients of the old CA no longer do.
    let work = pki._dir.path();
    issue(
        work,
        "other",
        "server2",
        "localhost",
        "20",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    );
    let key = std::fs::read(work.join("server2-key.pem")).expect("key");
    let cert = std::fs::read(work.join("server2-cert.pem")).expect("cert");
    replace_file(&live.path().join("server-key.pem"), &key);
    replace_file(&live.path().join("server-cert.pem"), &cert);
    let out = nbdinfo(&verified(&pki.wrong_ca));
    assert!(out.status.success(), "new certificate not used: {out:?}");
    assert!(!nbdinfo(&verified(&pki.anonymous)).status.success());

    // A broken rotation (the certificate cut off half way, as by a copy
    // still in progress) is logged, and the last good credentials stay in
    // use.
    replace_file(
        &live.path().join("server-cert.pem"),
        &cert[..cert.len() / 2],
    );
    let out = nbdinfo(&verified(&pki.wrong_ca));
    assert!(
        out.status.success(),
        "last good credentials dropped: {out:?}"
    );
    assert!(s.log().contains("keeping the previous ones"), "{}", s.log());
}

#[cfg(feature = "tls-psk")]
#[test]
fn psk_keys_are_rotated_without_a_restart() {
    let Some(psk) = psk() else { return };
    if !have("nbdinfo") {
        return;
    }
    let s = start_psk(&psk, "--tls=require");
    let before = tempfile::tempdir().expect("tempdir");
    let old = before.path().join("keys.psk");
    std::fs::copy(&psk.file, &old).expect("copy");
    assert!(nbdinfo(&psk_uri(&s, "alice", &old)).status.success());

    // New keys: alice's changes, bob is added.
    let alice = "ab".repeat(32);
    let bob = "cd".repeat(32);
    replace_file(&psk.file, format!("alice:{alice}\nbob:{bob}\n").as_bytes());
    let new_alice = key_file("alice", &alice);
    let new_bob = key_file("bob", &bob);
    let out = nbdinfo(&psk_uri(&s, "alice", &new_alice.path().join("keys.psk")));
    assert!(out.status.success(), "rotated key refused: {out:?}");
    let out = nbdinfo(&psk_uri(&s, "bob", &new_bob.path().join("keys.psk")));
    assert!(out.status.success(), "added user refused: {out:?}");
    let out = nbdinfo(&psk_uri(&s, "alice", &old));
    assert!(!out.status.success(), "the old key still works");

    // A file that does not parse keeps the last good keys, and the log
    // says so without quoting the file.
    replace_file(&psk.file, b"this is not a keys file: $6$hash\n");
    let out = nbdinfo(&psk_uri(&s, "bob", &new_bob.path().join("keys.psk")));
    assert!(out.status.success(), "last good keys dropped: {out:?}");
    let log = s.log();
    assert!(log.contains("keeping the previous ones"), "{log}");
    assert!(!log.contains("$6$hash"), "{log}");
}

/// `--tls-priority` (nbdkit 1.46): a GnuTLS priority string, applied to
/// rustls.  What it takes away, clients cannot get.
#[test]
fn tls_priority_limits_versions_and_ciphers() {
    let Some(pki) = pki() else { return };
    let only13 = start(
        &pki,
        &[
            "--tls=require",
            "--tls-priority=NORMAL:-VERS-ALL:+VERS-TLS1.3",
        ],
        &["memory", "size=1M"],
    );
    let v13 = client_with(&pki, &[&rustls::version::TLS13], None);
    let v12 = client_with(&pki, &[&rustls::version::TLS12], None);
    assert_eq!(
        handshake(&only13, v13),
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
    assert!(handshake(&only13, v12.clone()).is_err(), "TLS 1.2 accepted");
    // Without the option, the same client gets in.
    let plain = start(&pki, &["--tls=require"], &["memory", "size=1M"]);
    assert_eq!(handshake(&plain, v12), Ok(rustls::ProtocolVersion::TLSv1_2));

    let no_chacha = start(
        &pki,
        &["--tls=require", "--tls-priority=NORMAL:-CHACHA20-POLY1305"],
        &["memory", "size=1M"],
    );
    let chacha = client_with(&pki, rustls::DEFAULT_VERSIONS, Some("CHACHA20"));
    let aes = client_with(&pki, rustls::DEFAULT_VERSIONS, Some("AES_256_GCM"));
    assert!(
        handshake(&no_chacha, chacha.clone()).is_err(),
        "ChaCha20 accepted"
    );
    assert!(handshake(&no_chacha, aes).is_ok());
    assert!(handshake(&plain, chacha).is_ok());

    // GnuTLS (libnbd) negotiates with the restricted server.
    if have("nbdinfo") {
        let out = nbdinfo(&only13.tls_uri(&pki.client));
        assert!(out.status.success(), "nbdinfo: {out:?}");
    }
}

#[test]
fn tls_priority_refuses_what_cannot_be_done() {
    let Some(pki) = pki() else { return };
    let certs = format!("--tls-certificates={}", pki.server.display());
    let run = |args: &[&str]| {
        let tail = ["memory", "size=1M", "--run", "exit 0"];
        let e = fails_stderr(&[&["-f", "-U", "-"], args, &tail].concat());
        assert_eq!(e.lines().count(), 1, "one line: {e}");
        e
    };
    for (priority, says) in [
        (
            "NORMAL:+VERS-TLS1.1",
            "+VERS-TLS1.1: not supported by rustls",
        ),
        ("NORMAL:+ARCFOUR-128", "+ARCFOUR-128"),
        ("NORMAL:-AEAD", "cannot be turned off"),
        ("NORMAL:+NOSUCHTHING", "unknown priority element"),
        ("SUITEB128", "Suite B"),
        ("NORMAL:%COMPAT", "%COMPAT"),
        ("NONE:+VERS-TLS1.3", "no cipher"),
    ] {
        let e = run(&[
            &certs,
            "--tls=require",
            &format!("--tls-priority={priority}"),
        ]);
        assert!(
            e.contains("--tls-priority") && e.contains(says),
            "{priority}: {e}"
        );
    }
    // Without TLS it would do nothing, which is not what was asked.
    let e = run(&["--tls-priority=NORMAL"]);
    assert!(e.contains("needs TLS"), "{e}");
}

/// `--run` tells the command where the server's credentials are:
/// `$tls_certificates` (whose ca-cert.pem verifies the server) and
/// `$tls_psk`, the options' values as given, and empty when not given;
/// `$tls` is unset when TLS is off (as nbdkit 1.48.1 sets them).
#[test]
fn run_tells_where_the_credentials_are() {
    let Some(pki) = pki() else { return };
    let certs = format!("--tls-certificates={}", pki.server.display());
    let out = stdout_of(Command::new(binary()).args([
        "-U",
        "-",
        "--tls=require",
        &certs,
        "memory",
        "size=1M",
        "--run",
        "echo \"$tls|$tls_certificates|${tls_psk-unset}\"",
    ]));
    assert_eq!(out.trim(), format!("2|{}|", pki.server.display()));
    // A client finds the CA there.
    if have("nbdinfo") {
        let out = stdout_of(Command::new(binary()).args([
            "-U",
            "-",
            "--tls=require",
            &certs,
            "memory",
            "size=3M",
            "--run",
            "nbdinfo --size \"$uri&tls-certificates=$tls_certificates\"",
        ]));
        assert_eq!(out.trim(), (3 << 20).to_string());
    }
    // TLS off: no $tls and empty credentials, even if our caller had them
    // set.
    let out = stdout_of(
        Command::new(binary())
            .args(["-U", "-", "memory", "size=1M", "--run"])
            .arg("echo \"${tls-unset}|${tls_certificates-unset}|${tls_psk-unset}|${port-unset}\"")
            .env("tls", "1")
            .env("tls_certificates", "/nowhere"),
    );
    // $port is set but empty on a Unix socket, as nbdkit sets it.
    assert_eq!(out.trim(), "unset|||");
    // --tls=on without the server's certificate: served without TLS, with
    // a warning, the directory still passed on as given.
    let out = Command::new(binary())
        .args(["-U", "-", "--tls=on", "--tls-certificates=no/such/dir", "memory", "size=1M", "--run"])
        .arg("echo \"${tls-unset}|$tls_certificates\"; nbdinfo --size \"$uri\" 2>/dev/null || echo 0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("unset|no/such/dir\n"), "{stdout}");
    if have("nbdinfo") {
        assert!(stdout.ends_with(&format!("{}\n", 1 << 20)), "{stdout}");
    }
    assert!(
        stderr.starts_with("nbdkit: warning: --tls=on but there is no server-cert.pem"),
        "{stderr}"
    );
    // --tls=require stops instead.
    let out = Command::new(binary())
        .args([
            "-U",
            "-",
            "--tls=require",
            "--tls-certificates=no/such/dir",
            "memory",
            "size=1M",
            "--run",
            "exit 0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
}

#[cfg(feature = "tls-psk")]
#[test]
fn tls_priority_with_pre_shared_keys() {
    let Some(psk) = psk() else { return };
    let keys = format!("--tls-psk={}", psk.file.display());
    // TLS 1.2 only, with libnbd (GnuTLS) as the client.
    if have("nbdinfo") {
        let s = Server::start(&[
            "--tls=require",
            &keys,
            "--tls-priority=NORMAL:-VERS-TLS1.3:%SERVER_PRECEDENCE",
            "memory",
            "size=4M",
        ]);
        let out = nbdinfo(&psk_uri(&s, "alice", &psk.file));
        assert!(
            out.status.success(),
            "nbdinfo with PSK over TLS 1.2: {out:?}"
        );
    }
    // $tls_psk is the keys file.
    let out = stdout_of(Command::new(binary()).args([
        "-U",
        "-",
        "--tls=require",
        &keys,
        "memory",
        "size=1M",
        "--run",
        "echo \"$tls_psk|${tls_certificates-unset}\"",
    ]));
    assert_eq!(out.trim(), format!("{}|", psk.file.display()));
    // TLS 1.3 pre-shared key suites are SHA-256 ones: AES-256-GCM alone
    // leaves nothing.
    let out = Command::new(binary())
        .args(["-f", "-U", "-", "--tls=require", &keys])
        .arg("--tls-priority=NORMAL:-VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM")
        .args(["memory", "size=1M", "--run", "exit 0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("no pre-shared key suite"), "{e}");
}
