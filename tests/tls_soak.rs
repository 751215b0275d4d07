//! Soak under TLS, with pre-shared keys and with X.509 certificates,
//! driven by libnbd (Python `nbd`): concurrent verified writers on a
//! `file` export, `kill -9`, restart, verify every acknowledged write; then
//! 10,000 short TLS connections, after which the server's descriptors
//! return to their idle count and its RSS to its idle level (no
//! per-connection leak of TLS state).  Bounded by counts, not time.

mod common;

use std::path::Path;

use common::*;

const SIZE: usize = 16 << 20;
const CONNECTIONS: usize = 10_000;

/// The client side, run as `python3 -c SCRIPT MODE SOCKET CRED PHASE ARG`.
/// PHASE `write`: 4 threads write, zero and re-read their own 64 KiB
/// blocks (every read checked against a model), flush, and save the model
/// to ARG.  `verify`: the whole disk must equal the model in ARG.
/// `churn`: ARG connections that each negotiate, read a sector and leave.
const SCRIPT: &str = r#"
import nbd, sys, random, threading
mode, sock, cred, phase, arg = sys.argv[1:6]
SIZE = 16 << 20
BLOCK = 65536
THREADS = 4

def connect():
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    if mode == 'psk':
        h.set_tls_psk_file(cred)
        h.set_tls_username('alice')
    else:
        h.set_tls_certificates(cred)
    h.connect_unix(sock)
    assert h.get_tls_negotiated()
    return h

if phase == 'write':
    model = bytearray(SIZE)
    def worker(id):
        rng = random.Random(id)
        h = connect()
        owned = [b for b in range(SIZE // BLOCK) if b % THREADS == id]
        for i in range(300):
            b = rng.choice(owned)
            off = b * BLOCK + rng.randrange(0, BLOCK - 4096, 512)
            n = rng.randrange(512, 4097, 512)
            op = rng.randrange(4)
            if op == 0:
                h.zero(n, off, nbd.CMD_FLAG_FUA)
                model[off:off + n] = bytes(n)
            elif op == 3:
                assert h.pread(n, off) == bytes(model[off:off + n]), (id, i, off)
            else:
                data = rng.randbytes(n)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if op == 1 else 0)
                model[off:off + n] = data
            if i % 50 == 49:
                h.flush()
        h.flush()
        h.shutdown()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in ts: t.start()
    for t in ts: t.join()
    open(arg, 'wb').write(model)
elif phase == 'verify':
    model = open(arg, 'rb').read()
    h = connect()
    for off in range(0, SIZE, 1 << 20):
        assert h.pread(1 << 20, off) == model[off:off + (1 << 20)], off
    h.shutdown()
elif phase == 'churn':
    for i in range(int(arg)):
        h = connect()
        h.pread(512, 0)
        h.shutdown()
print("OK")
"#;

fn client(mode: &str, s: &Server, cred: &Path, phase: &str, arg: &str) {
    python(
        SCRIPT,
        &[
            mode,
            &s.socket.display().to_string(),
            &cred.display().to_string(),
            phase,
            arg,
        ],
    );
}

/// The server's credentials (`--tls-…` argument) and the client's.
fn credentials(mode: &str, dir: &Path) -> Option<(String, std::path::PathBuf)> {
    if mode == "psk" {
        let keys = dir.join("keys.psk");
        let key: String = pseudo_random(32, 9)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(&keys, format!("alice:{key}\n")).unwrap();
        return Some((format!("--tls-psk={}", keys.display()), keys));
    }
    if !have("openssl") {
        return None;
    }
    let server = dir.join("server");
    let client = dir.join("client");
    std::fs::create_dir(&server).unwrap();
    std::fs::create_dir(&client).unwrap();
    self_signed(
        &server,
        EC_P256,
        "server-key.pem",
        "server-cert.pem",
        "/CN=localhost",
        &["subjectAltName=DNS:localhost"],
    );
    // Self-signed: the certificate is its own CA.
    std::fs::copy(server.join("server-cert.pem"), client.join("ca-cert.pem")).unwrap();
    Some((format!("--tls-certificates={}", server.display()), client))
}

fn soak(mode: &str) {
    if !have("nbdsh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((tls_arg, cred)) = credentials(mode, dir.path()) else {
        return;
    };
    let img = dir.path().join("disk.img");
    sparse_file(&img, SIZE as u64);
    let file_arg = format!("file={}", img.display());
    let model = dir.path().join("model.bin");
    let args = ["--tls=require", &tls_arg, "file", &file_arg];

    // Concurrent verified writers, then kill -9: no shutdown code runs.
    let mut s = Server::start(&args);
    client(mode, &s, &cred, "write", &model.display().to_string());
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let expected = std::fs::read(&model).unwrap();
    assert!(
        std::fs::read(&img).unwrap() == expected,
        "{mode}: the file differs from the acknowledged writes"
    );
    drop(s);

    // Restart on the same file: TLS clients read back every write.
    let s = Server::start(&args);
    client(mode, &s, &cred, "verify", &model.display().to_string());

    // Short connections: the idle level is taken after a first batch (the
    // runtime's threads and TLS library state exist by then).
    let pid = s.child.id();
    client(mode, &s, &cred, "churn", "200");
    let fds0 = settle_fds(pid, 0);
    let rss0 = rss_kib(pid);
    client(mode, &s, &cred, "churn", &CONNECTIONS.to_string());
    let fds = settle_fds(pid, fds0);
    let rss = rss_kib(pid);
    eprintln!(
        "TLS soak ({mode}): {CONNECTIONS} connections; fds {fds0} -> {fds}; RSS {rss0} -> {rss} KiB"
    );
    assert_eq!(fds, fds0, "{mode}: descriptors left open");
    assert!(
        rss < rss0 + 8 * 1024,
        "{mode}: RSS grew from {rss0} KiB to {rss} KiB over {CONNECTIONS} connections"
    );
}

#[cfg(feature = "tls-psk")]
#[test]
fn soak_over_tls_with_psk() {
    soak("psk");
}

#[test]
fn soak_over_tls_with_x509() {
    soak("x509");
}
