//! The object_store plugins, `azure` and `gcs`, against local servers
//! with real clients (nbdcopy + cmp, qemu-img compare, nbdinfo --json, and
//! our raw client for error messages):
//!
//! * azure: Azurite (npm, installed by scripts/test.sh), which checks
//!   shared-key and SAS signatures, so authentication is tested for real.
//!   The blobs are uploaded by a small independent Python client.
//! * gcs: the GCS-shaped loopback server of tests/common/http.rs.  The
//!   PyPI emulator (gcp-storage-emulator) does not answer HEAD on the XML
//!   API and sends no ETag/Last-Modified, both of which object_store's GCS
//!   client needs.  Service-account authentication is checked by verifying
//!   the RS256 JWTs the plugin sends with openssl and the key's public half.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::HttpServer;
use common::*;

/// Random data, a zero gap, more data, and a tail that is not a multiple
/// of 512.
fn image() -> Vec<u8> {
    let mut data = pseudo_random(2 << 20, 21);
    data.extend(vec![0u8; 3 << 20]);
    data.extend(pseudo_random((1 << 20) + 333, 22));
    data
}

fn xz(data: &[u8], dir: &Path) -> Vec<u8> {
    let src = dir.join("in.raw");
    std::fs::write(&src, data).unwrap();
    let out = Command::new("xz")
        .args(["-T2", "--block-size=1MiB", "-c"])
        .stdin(std::fs::File::open(&src).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "xz");
    out.stdout
}

fn copy_out(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("copy.img");
    run_ok(Command::new("nbdcopy").arg(uri).arg(&out));
    std::fs::read(&out).unwrap()
}

/// Start nbdkit-rs expecting it to fail at start-up (within a bound);
/// returns its stderr.
fn start_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let err = start_refused(args, env);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

/// Read with our own client, expecting an error; returns (errno, message).
fn read_error(s: &Server, offset: u64, len: u64) -> (u32, String) {
    let mut c = client::RawClient::start(&s.socket);
    c.go(true, false, false);
    c.request(nbdkit_proto::CMD_READ, 0, 1, offset, len, &[]);
    let r = c.reply(0);
    (r.error, r.error_message)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    // Hang guard for a server that never comes up.
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A self-signed certificate for localhost that is its own CA, laid out
/// for --tls-certificates (server) and libnbd's tls-certificates (client).
fn tls_dir(dir: &Path) -> PathBuf {
    let d = dir.join("tls");
    std::fs::create_dir(&d).unwrap();
    self_signed(
        &d,
        RSA_2048,
        "server-key.pem",
        "server-cert.pem",
        "/CN=localhost",
        &["subjectAltName=DNS:localhost,IP:127.0.0.1"],
    );
    std::fs::copy(d.join("server-cert.pem"), d.join("ca-cert.pem")).unwrap();
    d
}

// ---------------------------------------------------------------- Azure

/// Azurite's well-known development account and key.
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct Azurite {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Azurite {
    /// The account's blob service URL (IP style: the account in the path).
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZ_ACCOUNT}", self.port)
    }
}

fn azurite_bin() -> Option<PathBuf> {
    let dir = tool_dir("NBDKIT_RS_AZURITE", "azurite");
    let bin = dir.join("node_modules/.bin/azurite-blob");
    let found = bin.exists() && have("node");
    available(found, &format!("azurite (in {dir:?})")).then_some(bin)
}

fn start_azurite(bin: &Path) -> Azurite {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .arg("--location")
        .arg(dir.path())
        // No network beyond loopback; any API version our client speaks.
        .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("azurite.log")).unwrap())
        .spawn()
        .expect("start azurite");
    let az = Azurite {
        child,
        port,
        _dir: dir,
    };
    wait_for_port(port, "azurite");
    az
}

/// Create `container` and upload `blobs` with shared-key signed requests
/// (an independent client: Python's standard library), returning a
/// read-only service SAS for each blob.
fn az_upload(az: &Azurite, container: &str, blobs: &[(&str, &[u8])]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![az.endpoint(), container.to_string()];
    for (i, (name, data)) in blobs.iter().enumerate() {
        let p = dir.path().join(format!("blob{i}"));
        std::fs::write(&p, data).unwrap();
        args.push(name.to_string());
        args.push(p.display().to_string());
    }
    let script = r#"
import base64, datetime, hashlib, hmac, sys, urllib.parse, urllib.request
ACCOUNT = "devstoreaccount1"
KEY = base64.b64decode(sys.argv[1])
VERSION = "2021-08-06"
ep = sys.argv[2]
def sign(sts):
    return base64.b64encode(hmac.new(KEY, sts.encode(), hashlib.sha256).digest()).decode()
def request(method, path, query, body=b"", headers=None):
    headers = dict(headers or {})
    headers["Content-Type"] = "application/octet-stream"
    headers["x-ms-date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
    headers["x-ms-version"] = VERSION
    url_path = urllib.parse.urlsplit(ep).path + path
    canon_headers = "".join(f"{k}:{v}\n" for k, v in sorted((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-ms-")))
    canon_res = f"/{ACCOUNT}{url_path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    length = str(len(body)) if body else ""
    sts = "\n".join([method, "", "", length, "", headers["Content-Type"], "", "", "", "", "", ""]) + "\n" + canon_headers + canon_res
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{sign(sts)}"
    url = ep + urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(query) if query else "")
    urllib.request.urlopen(urllib.request.Request(url, data=body, method=method, headers=headers)).close()
def sas(container, blob):
    expiry = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    res = f"/blob/{ACCOUNT}/{container}/{blob}"
    sts = "\n".join(["r", "", expiry, res, "", "", "", VERSION, "b", "", "", "", "", "", "", ""])
    return urllib.parse.urlencode({"sv": VERSION, "sr": "b", "sp": "r", "se": expiry, "sig": sign(sts)})
container = sys.argv[3]
request("PUT", f"/{container}", {"restype": "container"})
rest = sys.argv[4:]
for name, path in zip(rest[::2], rest[1::2]):
    request("PUT", f"/{container}/{name}", {}, open(path, "rb").read(), {"x-ms-blob-type": "BlockBlob"})
    print(sas(container, name))
"#;
    let out = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg(script)
            .arg(AZ_KEY)
            .args(&args),
    );
    out.lines().map(str::to_string).collect()
}

#[test]
fn azure_blobs_are_served_from_azurite_with_shared_key_and_sas() {
    let Some(bin) = azurite_bin() else { return };
    if !have("nbdcopy") || !have("nbdinfo") || !have("qemu-img") || !have("xz") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let compressed = xz(&data, dir.path());
    let az = start_azurite(&bin);
    let sas = az_upload(
        &az,
        "images",
        &[
            ("disks/disk.img", &data),
            ("disks/disk.img.xz", &compressed),
        ],
    );
    let endpoint = format!("endpoint-url={}", az.endpoint());
    let key = format!("access-key={AZ_KEY}");

    // Shared key, the az:// form: byte-exact with nbdcopy and qemu-img.
    let s = Server::start(&[
        "azure",
        "az://images/disks/disk.img",
        "account=devstoreaccount1",
        &endpoint,
        &key,
    ]);
    assert!(
        copy_out(&s.uri, dir.path()) == data,
        "nbdcopy output differs"
    );
    let img = dir.path().join("orig.img");
    std::fs::write(&img, &data).unwrap();
    assert_same_raw(&img, &s.uri);
    let json = stdout_of(Command::new("nbdinfo").arg("--json").arg(&s.uri));
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(json.contains("\"can_multi_conn\": true"), "{json}");
    assert!(
        json.contains(&format!("\"export-size\": {}", data.len())),
        "{json}"
    );
    assert!(s.stop().success());

    // The compressed blob through the xz filter, the key from a file, the
    // IP-style URL (account and endpoint from it).
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, format!("{AZ_KEY}\n")).unwrap();
    let url = format!("{}/images/disks/disk.img.xz", az.endpoint());
    let s = Server::start(&[
        "--filter=xz",
        "azure",
        &url,
        &format!("access-key=+{}", keyfile.display()),
    ]);
    assert!(copy_out(&s.uri, dir.path()) == data, "xz blob differs");
    drop(s);

    // A SAS in the URL, and one given as sas-token=.
    let url = format!("{}/images/disks/disk.img?{}", az.endpoint(), sas[0]);
    let s = Server::start(&["azure", &url]);
    assert!(copy_out(&s.uri, dir.path()) == data, "SAS URL");
    drop(s);
    let s = Server::start(&[
        "azure",
        "container=images",
        "blob=disks/disk.img.xz",
        "account=devstoreaccount1",
        &endpoint,
        &format!("sas-token={}", sas[1]),
        "--filter=xz",
    ]);
    assert!(copy_out(&s.uri, dir.path()) == data, "sas-token=");
    drop(s);

    // The environment alone, as object_store's from_env reads it.
    let s = Server::start_with(
        &["azure", "az://images/disks/disk.img"],
        &[
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            (
                "AZURITE_BLOB_STORAGE_URL",
                &format!("http://127.0.0.1:{}", az.port),
            ),
        ],
    );
    assert!(copy_out(&s.uri, dir.path()) == data, "emulator variables");
    drop(s);
    let s = Server::start_with(
        &["azure", "az://images/disks/disk.img", &endpoint],
        &[
            ("AZURE_STORAGE_ACCOUNT_NAME", AZ_ACCOUNT),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY),
        ],
    );
    assert!(copy_out(&s.uri, dir.path()) == data, "account variables");
    drop(s);
    // ... and the command line's credential wins over the environment's.
    let wrong = "d3JvbmcgYnV0IHZhbGlkIGJhc2U2NA==";
    let s = Server::start_with(
        &["azure", "az://images/disks/disk.img", &endpoint, &key],
        &[
            ("AZURE_STORAGE_ACCOUNT_NAME", AZ_ACCOUNT),
            ("AZURE_STORAGE_ACCOUNT_KEY", wrong),
        ],
    );
    assert!(copy_out(&s.uri, dir.path()) == data, "access-key= over env");
    drop(s);
}

#[test]
fn azure_refuses_wrong_credentials_and_missing_blobs_at_start_up() {
    let Some(bin) = azurite_bin() else { return };
    let az = start_azurite(&bin);
    let sas = az_upload(
        &az,
        "images",
        &[("a.img", &[1u8; 4096]), ("b.img", &[2u8; 4096])],
    );
    let endpoint = format!("endpoint-url={}", az.endpoint());
    let base = ["azure", "account=devstoreaccount1", &endpoint];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|a| a.to_string()).collect()
    };
    let start_fails = |args: &[String], env: &[(&str, &str)]| {
        start_fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), env)
    };
    // A well-formed key that is not the account's: Azurite checks the
    // signature.
    let err = start_fails(
        &with(&[
            "az://images/a.img",
            "access-key=d3JvbmcgYnV0IHZhbGlkIGJhc2U2NA==",
        ]),
        &[],
    );
    assert!(
        err.contains("az://images/a.img") && err.contains("403") && err.contains("access denied"),
        "{err}"
    );
    // The SAS of another blob.
    let err = start_fails(
        &with(&["az://images/a.img", &format!("sas-token={}", sas[1])]),
        &[],
    );
    assert!(err.contains("403"), "{err}");
    // A missing blob, and a missing container.
    let key = format!("access-key={AZ_KEY}");
    for url in ["az://images/nope.img", "az://nocontainer/a.img"] {
        let err = start_fails(&with(&[url, &key]), &[]);
        assert!(
            err.contains(url) && err.contains("no such object") && err.contains("404"),
            "{err}"
        );
    }
    // Malformed and conflicting parameters never reach the server.
    for (args, want) in [
        (with(&["az://images", &key]), "expected az://CONTAINER/BLOB"),
        (
            with(&["az://images/a.img", &key, "sas-token=sv=1"]),
            "access-key, sas-token each name the credentials",
        ),
        (
            with(&["az://images/a.img", "access-key=not base64!"]),
            "Invalid Access Key",
        ),
        (
            with(&["az://images/a.img", "access-key=-99"]),
            "access-key=-99",
        ),
    ] {
        let err = start_fails(&args, &[]);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn azure_over_tls_runs_requests_from_the_async_path() {
    // TLS connections call the backend under tokio's spawn_blocking, where
    // a plugin's own block_on would panic.
    let Some(bin) = azurite_bin() else { return };
    if !have("nbdcopy") || !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 << 20, 23);
    let az = start_azurite(&bin);
    az_upload(&az, "images", &[("disk.img", &data)]);
    let certs = tls_dir(dir.path());
    let url = format!("{}/images/disk.img", az.endpoint());
    let s = Server::start(&[
        "--tls=require",
        &format!("--tls-certificates={}", certs.display()),
        "azure",
        &url,
        &format!("access-key={AZ_KEY}"),
    ]);
    let uri = s.tls_uri(&certs);
    assert!(copy_out(&uri, dir.path()) == data, "over TLS");
}

// ------------------------------------------------------------------ GCS

/// A service-account key file for a fresh RSA key (object_store signs its
/// own JWTs with it), and the public key to check them with.
fn service_account(dir: &Path) -> (PathBuf, PathBuf) {
    run_ok(Command::new("openssl").current_dir(dir).args([
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "sa-key.pem",
    ]));
    run_ok(Command::new("openssl").current_dir(dir).args([
        "pkey",
        "-in",
        "sa-key.pem",
        "-pubout",
        "-out",
        "sa-pub.pem",
    ]));
    let key = std::fs::read_to_string(dir.join("sa-key.pem")).unwrap();
    let json = format!(
        "{{\"type\": \"service_account\", \"project_id\": \"test\", \"private_key_id\": \"kid-1\", \"private_key\": {:?}, \"client_email\": \"nbdkit@test.iam.gserviceaccount.com\"}}",
        key
    );
    let path = dir.join("sa.json");
    std::fs::write(&path, json).unwrap();
    (path, dir.join("sa-pub.pem"))
}

/// Check that `auth` is "Bearer JWT" with an RS256 signature by `pubkey`
/// for key id kid-1 and our service account.
fn verify_jwt(auth: &str, pubkey: &Path) {
    let script = r#"
import base64, json, subprocess, sys, tempfile, os
auth, pub = sys.argv[1], sys.argv[2]
assert auth.startswith("Bearer "), auth
h, p, s = auth[len("Bearer "):].split(".")
dec = lambda x: base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
header, claims = json.loads(dec(h)), json.loads(dec(p))
assert header["alg"] == "RS256" and header["kid"] == "kid-1", header
assert claims["iss"] == "nbdkit@test.iam.gserviceaccount.com", claims
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "data"), "wb").write(f"{h}.{p}".encode())
    open(os.path.join(d, "sig"), "wb").write(dec(s))
    subprocess.run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature",
                    os.path.join(d, "sig"), os.path.join(d, "data")], check=True, capture_output=True)
print("OK")
"#;
    let out = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg(script)
            .arg(auth)
            .arg(pubkey),
    );
    assert_eq!(out.trim(), "OK");
}

#[test]
fn gcs_objects_are_served_with_service_account_jwts_and_bearer_tokens() {
    if !have("nbdcopy") || !have("nbdinfo") || !have("openssl") || !have("xz") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let http = HttpServer::start();
    http.add_file("/images/disks/disk.img", data.clone());
    http.add_file("/images/disks/disk.img.xz", xz(&data, dir.path()));
    let endpoint = format!("endpoint-url={}", http.url(""));

    // A service-account key file: every request carries a JWT signed with it.
    let (sa, pubkey) = service_account(dir.path());
    let creds = format!("credentials={}", sa.display());
    let s = Server::start(&["gcs", "gs://images/disks/disk.img", &creds, &endpoint]);
    assert!(
        copy_out(&s.uri, dir.path()) == data,
        "nbdcopy output differs"
    );
    let json = stdout_of(Command::new("nbdinfo").arg("--json").arg(&s.uri));
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(
        json.contains(&format!("\"export-size\": {}", data.len())),
        "{json}"
    );
    drop(s);
    let reqs = http.requests();
    assert_eq!(reqs[0].method, "HEAD", "{reqs:?}");
    // GCS's XML API path, the object name escaped.
    assert_eq!(reqs[0].path, "/images/disks%2Fdisk%2Eimg");
    assert!(reqs[1..]
        .iter()
        .all(|r| r.method == "GET" && r.header("range").is_some()));
    let mut tokens: Vec<&str> = reqs
        .iter()
        .map(|r| r.header("authorization").expect("authorization"))
        .collect();
    tokens.dedup();
    for t in tokens {
        verify_jwt(t, &pubkey);
    }

    // The key itself on a descriptor (service-account-key=-FD is the
    // nbdkit password form), the compressed object through the xz filter.
    let key_text = std::fs::read(&sa).unwrap();
    let s = {
        use std::os::fd::AsRawFd;
        let key_file = std::fs::File::open(&sa).unwrap();
        assert!(!key_text.is_empty());
        // Inherited by the server: clear close-on-exec.
        let fd = key_file.as_raw_fd();
        // SAFETY: clearing FD_CLOEXEC on a descriptor this test owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let s = Server::start(&[
            "--filter=xz",
            "gcs",
            "bucket=images",
            "object=disks/disk.img.xz",
            &format!("service-account-key=-{fd}"),
            &endpoint,
        ]);
        drop(key_file);
        s
    };
    assert!(copy_out(&s.uri, dir.path()) == data, "xz object differs");
    drop(s);

    // A bearer token the server insists on, from a file.
    http.set(|b| b.auth = Some("Bearer good-token".into()));
    let tok = dir.path().join("token");
    std::fs::write(&tok, "good-token\n").unwrap();
    let s = Server::start(&[
        "gcs",
        "gs://images/disks/disk.img",
        &format!("bearer-token=+{}", tok.display()),
        &endpoint,
    ]);
    assert!(copy_out(&s.uri, dir.path()) == data, "bearer token");
    drop(s);
    // A wrong one stops the server at start-up.
    let err = start_fails(
        &[
            "gcs",
            "gs://images/disks/disk.img",
            "bearer-token=bad",
            &endpoint,
        ],
        &[],
    );
    assert!(
        err.contains("gs://images/disks/disk.img") && err.contains("401"),
        "{err}"
    );
    http.set(|b| b.auth = None);

    // Emulator settings in the key file (object_store's disable_oauth and
    // gcs_base_url), and the file named by GOOGLE_SERVICE_ACCOUNT.
    let emu = dir.path().join("emulator.json");
    std::fs::write(
        &emu,
        format!(
            "{{\"gcs_base_url\": \"{}\", \"disable_oauth\": true, \"client_email\": \"\", \"private_key\": \"\", \"private_key_id\": \"\"}}",
            http.url("")
        ),
    )
    .unwrap();
    let s = Server::start_with(
        &["gcs", "gs://images/disks/disk.img"],
        &[("GOOGLE_SERVICE_ACCOUNT", emu.to_str().unwrap())],
    );
    assert!(
        copy_out(&s.uri, dir.path()) == data,
        "GOOGLE_SERVICE_ACCOUNT"
    );
    drop(s);
}

#[test]
fn gcs_refuses_missing_objects_and_bad_input_at_start_up() {
    let http = HttpServer::start();
    http.add_file("/images/a.img", vec![1u8; 4096]);
    let endpoint = format!("endpoint-url={}", http.url(""));
    let err = start_fails(
        &[
            "gcs",
            "gs://images/nope.img",
            "skip-signature=true",
            &endpoint,
        ],
        &[],
    );
    assert!(
        err.contains("gs://images/nope.img") && err.contains("no such object"),
        "{err}"
    );
    for (args, want) in [
        (vec!["gcs", "gs://images"], "expected gs://BUCKET/OBJECT"),
        (
            vec!["gcs", "gs://images/a.img", "bucket=images", "object=a.img"],
            "not both",
        ),
        (
            vec![
                "gcs",
                "gs://images/a.img",
                "bearer-token=x",
                "skip-signature=true",
            ],
            "each name the credentials",
        ),
        (
            vec!["gcs", "gs://images/a.img", "credentials=/nonexistent.json"],
            "credentials=/nonexistent.json",
        ),
        (
            vec!["gcs", "gs://images/a.img", "endpoint-url=localhost:1"],
            "endpoint-url=localhost:1",
        ),
        (
            vec!["gcs", "gs://images/a.img", "retries=lots"],
            "retries=lots",
        ),
    ] {
        let err = start_fails(&args, &[]);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_stalled_or_failing_store_gives_eio_with_a_log_line_not_a_hang() {
    let http = HttpServer::start();
    let data = pseudo_random(1 << 20, 24);
    http.add_file("/images/disk.img", data.clone());
    let endpoint = format!("endpoint-url={}", http.url(""));
    let s = Server::start(&[
        "gcs",
        "gs://images/disk.img",
        "skip-signature=true",
        &endpoint,
        "timeout=1",
        "retries=1",
    ]);
    // Ranged GETs that are never answered: each attempt times out.
    http.set(|b| b.stall = true);
    let start = Instant::now();
    let (errno, msg) = read_error(&s, 4096, 4096);
    assert_eq!(errno, nbdkit_proto::EIO);
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(
        msg.contains("gs://images/disk.img") && msg.contains("offset 4096"),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("timed out"), "{msg}");
    let log = s.log();
    assert!(
        log.contains("offset 4096") && log.contains("gs://images/disk.img"),
        "{log}"
    );
    http.set(|b| b.stall = false);

    // Transient 503s are retried ...
    http.set(|b| b.fail_next = 1);
    assert!(
        client::read_chunk(&s.socket, 8192, 65536) == data[8192..8192 + 65536],
        "wrong data after a retry"
    );
    // ... a bounded number of times.
    http.set(|b| b.fail_next = 100);
    let (errno, msg) = read_error(&s, 0, 512);
    assert_eq!(errno, nbdkit_proto::EIO);
    assert!(msg.contains("503"), "{msg}");
    http.set(|b| b.fail_next = 0);

    // A body shorter than the range asked for.
    http.set(|b| b.short_body = true);
    let (errno, msg) = read_error(&s, 65536, 65536);
    assert_eq!(errno, nbdkit_proto::EIO);
    assert!(msg.contains("offset 65536"), "{msg}");
    drop(s);

    // A server that accepts and never answers: the start-up HEAD gives up.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/devstoreaccount1/images/disk.img",
        silent.local_addr().unwrap().port()
    );
    let start = Instant::now();
    let err = start_fails(
        &[
            "azure",
            &url,
            &format!("access-key={AZ_KEY}"),
            "timeout=1",
            "retries=0",
        ],
        &[],
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(
        err.contains(&url) && err.to_lowercase().contains("timed out"),
        "{err}"
    );
}

#[test]
fn gcs_over_https_and_under_a_tls_nbd_connection() {
    if !have("openssl") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The store over HTTPS, trusted through cainfo=.
    self_signed(
        dir.path(),
        RSA_2048,
        "key.pem",
        "cert.pem",
        "/CN=127.0.0.1",
        &[
            "subjectAltName=IP:127.0.0.1",
            // webpki (rustls) refuses a CA certificate as the server's own.
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    let cert = dir.path().join("cert.pem");
    let https = HttpServer::start_tls(&cert, &dir.path().join("key.pem"));
    let data = pseudo_random(700_000, 25);
    https.add_file("/images/disk.img", data.clone());
    let endpoint = format!("endpoint-url={}", https.url(""));
    assert!(endpoint.contains("https://"));
    let cainfo = format!("cainfo={}", cert.display());
    let args = [
        "gcs",
        "gs://images/disk.img",
        "skip-signature=true",
        &endpoint,
        &cainfo,
    ];
    let s = Server::start(&args);
    assert!(copy_out(&s.uri, dir.path()) == data, "over HTTPS");
    drop(s);
    // Without the CA: refused at start-up.
    let err = start_fails(&args[..4], &[]);
    assert!(err.contains("gs://images/disk.img"), "{err}");

    // The NBD side over TLS: requests come from tokio's blocking pool.
    let certs = tls_dir(dir.path());
    let mut tls_args = vec![
        "--tls=require".to_string(),
        format!("--tls-certificates={}", certs.display()),
    ];
    tls_args.extend(args.iter().map(|a| a.to_string()));
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let s = Server::start(&tls_args);
    assert!(copy_out(&s.tls_uri(&certs), dir.path()) == data, "over TLS");
}
