//! The curl plugin against a loopback HTTP server started by each test
//! (tests/common/http.rs), checked with real clients: nbdcopy + cmp,
//! qemu-img compare, nbdinfo --json, and our raw client for the error
//! messages.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::http::HttpServer;
use common::*;

/// Random data, a zero gap, more data, and a tail that is not a multiple
/// of 512 (as tests/compressed.rs makes).
fn image() -> Vec<u8> {
    let mut data = pseudo_random(3 << 20, 7);
    data.extend(vec![0u8; 5 << 20]);
    data.extend(pseudo_random((2 << 20) + 333, 8));
    data
}

fn compress(data: &[u8], dir: &Path, cmd: &str, args: &[&str]) -> Vec<u8> {
    let src = dir.join(format!("in.{cmd}"));
    std::fs::write(&src, data).unwrap();
    let out = Command::new(cmd)
        .args(args)
        .stdin(std::fs::File::open(&src).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd} {args:?}");
    out.stdout
}

/// Copy the whole export with nbdcopy and return the bytes.
fn copy_out(s: &Server, extra: &[&str]) -> Vec<u8> {
    let out = s.dir.path().join("copy.img");
    run_ok(Command::new("nbdcopy").args(extra).arg(&s.uri).arg(&out));
    std::fs::read(&out).unwrap()
}

/// Read with our own client, expecting an error; returns (errno, message).
fn read_error(s: &Server, offset: u64, len: u64) -> (u32, String) {
    let mut c = client::RawClient::start(&s.socket);
    c.go(true, false, false);
    c.request(nbdkit_proto::CMD_READ, 0, 1, offset, len, &[]);
    let r = c.reply(0);
    (r.error, r.error_message)
}

#[test]
fn raw_image_over_http_is_served_byte_exact_and_read_only() {
    if !have("nbdcopy") || !have("qemu-img") || !have("nbdinfo") {
        return;
    }
    let http = HttpServer::start();
    let data = image();
    http.add_file("/disk.img", data.clone());
    let url = http.url("/disk.img");
    let s = Server::start(&["curl", &url]);
    assert!(copy_out(&s, &[]) == data, "nbdcopy output differs");
    let img = s.dir.path().join("orig.img");
    std::fs::write(&img, &data).unwrap();
    assert_same_raw(&img, &s.uri);
    let json = stdout_of(Command::new("nbdinfo").arg("--json").arg(&s.uri));
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(
        json.contains(&format!("\"export-size\": {}", data.len())),
        "{json}"
    );
    // Every data request was a ranged GET.
    let reqs = http.requests();
    assert!(reqs.len() > 2);
    for r in &reqs {
        assert_eq!(r.method, "GET");
        assert!(r.header("range").is_some(), "{r:?}");
    }
    assert!(s.stop().success());
}

#[test]
fn compressed_images_over_http_are_served_uncompressed() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let http = HttpServer::start();
    let cases: [(&str, &str, &[&str]); 2] = [
        ("xz", "xz", &["-T2", "--block-size=1MiB", "-c"]),
        ("gzip", "gzip", &["-c"]),
    ];
    for (filter, tool, args) in cases {
        if !have(tool) {
            continue;
        }
        let path = format!("/disk.img.{filter}");
        http.add_file(&path, compress(&data, dir.path(), tool, args));
        let url = format!("url={}", http.url(&path));
        let f = format!("--filter={filter}");
        let s = Server::start(&[&f, "curl", &url]);
        assert!(
            copy_out(&s, &[]) == data,
            "{filter}: nbdcopy output differs"
        );
        assert!(s.stop().success());
    }
}

/// A saved gzip index belongs to one version of a remote object: an
/// object rewritten in the middle, with the same size and the same first
/// and last 64 KiB, has a new ETag, and its old index is not used (the
/// size and head/tail checks alone would take it).
#[test]
fn a_changed_remote_object_does_not_reuse_its_gzip_index() {
    if !have("nbdcopy") || !have("gzip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Three members; random data is stored, so the two versions of the
    // middle member compress to the same length.
    let gz = |data: &[u8]| compress(data, dir.path(), "gzip", &["-c", "-n", "-1"]);
    let a = pseudo_random(1 << 20, 1);
    let (b_old, b_new) = (pseudo_random(1 << 20, 2), pseudo_random(1 << 20, 3));
    let mut c = pseudo_random(256 << 10, 4);
    c.extend(vec![0u8; 1 << 20]);
    let (gz_a, gz_c) = (gz(&a), gz(&c));
    let (gz_b_old, gz_b_new) = (gz(&b_old), gz(&b_new));
    assert_eq!(gz_b_old.len(), gz_b_new.len());
    assert!(gz_a.len() > 64 << 10 && gz_c.len() > 64 << 10);
    let join =
        |parts: &[&Vec<u8>]| -> Vec<u8> { parts.iter().flat_map(|p| p.iter().copied()).collect() };
    let (old, new) = (join(&[&a, &b_old, &c]), join(&[&a, &b_new, &c]));

    let http = HttpServer::start();
    http.add_file("/disk.img.gz", join(&[&gz_a, &gz_b_old, &gz_c]));
    let url = format!("url={}", http.url("/disk.img.gz"));
    let index = dir.path().join("disk.gzi");
    let idx_arg = format!("gzip-index={}", index.display());
    let serve = |want: &[u8]| {
        let s = Server::start(&[
            "-v",
            "--filter=gzip",
            "curl",
            &url,
            &idx_arg,
            "gzip-span=256K",
        ]);
        assert!(copy_out(&s, &[]) == want, "nbdcopy output differs");
        let log = s.log();
        assert!(s.stop().success());
        log
    };

    let log = serve(&old);
    assert!(log.contains("source version etag:\""), "{log}");
    assert!(log.contains("gzip index built"), "{log}");
    assert!(index.exists(), "the index was saved");

    http.add_file("/disk.img.gz", join(&[&gz_a, &gz_b_new, &gz_c]));
    let log = serve(&new);
    assert!(
        log.contains("is for a different or modified file; rebuilding"),
        "{log}"
    );
    assert!(log.contains("gzip index built"), "{log}");

    // Unchanged since: the rebuilt index is used as it is.
    let log = serve(&new);
    assert!(!log.contains("different or modified"), "{log}");
    assert!(!log.contains("gzip index built"), "{log}");
}

#[test]
fn a_server_without_range_support_is_refused_at_start_up() {
    let http = HttpServer::start();
    http.add_file("/disk.img", vec![1u8; 100_000]);
    http.set(|b| b.no_range = true);
    let err = start_refused(&["curl", &http.url("/disk.img")], &[]);
    assert!(err.contains("does not support range requests"), "{err}");
    assert!(err.contains(&http.url("/disk.img")), "{err}");
    // A missing file is refused too, with its status.
    let err = start_refused(&["curl", &http.url("/missing.img")], &[]);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn a_stalled_server_gives_eio_after_the_timeout_and_is_logged() {
    let http = HttpServer::start();
    http.add_file("/disk.img", pseudo_random(1 << 20, 3));
    let url = http.url("/disk.img");
    let s = Server::start(&["curl", &url, "timeout=1"]);
    http.set(|b| b.stall = true);
    let (errno, msg) = read_error(&s, 4096, 4096);
    assert_eq!(errno, nbdkit_proto::EIO);
    assert!(
        msg.contains(&url) && msg.contains("offset 4096") && msg.contains("timed out"),
        "{msg}"
    );
    let log = s.log();
    assert!(log.contains("timed out") && log.contains(&url), "{log}");
}

#[test]
fn transient_server_errors_are_retried() {
    if !have("nbdcopy") {
        return;
    }
    let http = HttpServer::start();
    let data = pseudo_random((1 << 20) + 7, 4);
    http.add_file("/disk.img", data.clone());
    // The start-up probe and the first reads both meet 503s.
    http.set(|b| b.fail_next = 2);
    let s = Server::start(&["curl", &http.url("/disk.img")]);
    http.set(|b| b.fail_next = 3);
    assert!(copy_out(&s, &[]) == data);
    let log = s.log();
    assert!(log.contains("HTTP status 503; retrying"), "{log}");
    let failed = http
        .requests()
        .len()
        .saturating_sub(http.requests().iter().filter(|r| r.method == "GET").count());
    assert_eq!(failed, 0, "only GETs were sent");
    // Connections cut in the middle of a body are retried too.
    http.set(|b| b.cut_next = 2);
    assert!(
        client::read_chunk(&s.socket, 4096, 65536) == data[4096..4096 + 65536],
        "wrong data after a retry"
    );
    assert_eq!(http.set_get(|b| b.cut_next), 0, "both cuts happened");
    let log = s.log();
    assert!(
        log.contains("offset 4096") && log.contains("retrying"),
        "{log}"
    );
    // A server that keeps failing: EIO once the retries are used up.
    http.set(|b| b.fail_next = 100);
    let (errno, msg) = read_error(&s, 0, 512);
    assert_eq!(errno, nbdkit_proto::EIO);
    assert!(msg.contains("gave up after 4 retries"), "{msg}");
}

#[test]
fn a_short_body_is_eio_naming_the_url_and_offset() {
    let http = HttpServer::start();
    http.add_file("/disk.img", pseudo_random(1 << 20, 5));
    let url = http.url("/disk.img");
    let s = Server::start(&["curl", &url]);
    http.set(|b| b.short_body = true);
    let (errno, msg) = read_error(&s, 65536, 65536);
    assert_eq!(errno, nbdkit_proto::EIO);
    assert!(
        msg.contains(&url) && msg.contains("offset 65536") && msg.contains("short body"),
        "{msg}"
    );
}

#[test]
fn headers_cookie_and_credentials_reach_the_server() {
    if !have("nbdcopy") {
        return;
    }
    let http = HttpServer::start();
    http.add_file("/disk.img", pseudo_random(1 << 20, 6));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let pw_arg = format!("password=+{}", pw.display());
    let s = Server::start(&[
        "curl",
        &http.url("/disk.img"),
        "header=X-Test: yes",
        "header=X-Other: 2",
        "cookie=session=abc; theme=dark",
        "user=alice",
        &pw_arg,
        "user-agent=nbdkit-rs-test",
    ]);
    copy_out(&s, &[]);
    let reqs = http.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(r.header("x-test"), Some("yes"), "{r:?}");
        assert_eq!(r.header("x-other"), Some("2"), "{r:?}");
        assert_eq!(r.header("cookie"), Some("session=abc; theme=dark"), "{r:?}");
        // base64("alice:s3cret"): the newline of the file is not part of it.
        assert_eq!(
            r.header("authorization"),
            Some("Basic YWxpY2U6czNjcmV0"),
            "{r:?}"
        );
        assert_eq!(r.header("user-agent"), Some("nbdkit-rs-test"), "{r:?}");
    }
}

#[test]
fn reads_go_out_in_parallel_up_to_the_pool_size() {
    if !have("nbdcopy") {
        return;
    }
    let data = pseudo_random(4 << 20, 9);
    for (connections, expect_parallel) in [("connections=4", true), ("connections=1", false)] {
        let http = HttpServer::start();
        http.add_file("/disk.img", data.clone());
        http.set(|b| b.delay = Duration::from_millis(20));
        let s = Server::start(&["curl", &http.url("/disk.img"), connections]);
        let out = copy_out(&s, &["--requests=8", "--request-size=262144"]);
        assert!(out == data);
        let max = http.max_concurrency();
        if expect_parallel {
            assert!(max >= 2, "{connections}: at most {max} requests at once");
            assert!(max <= 4, "{connections}: {max} requests at once");
        } else {
            assert_eq!(max, 1, "{connections}");
        }
    }
}

#[test]
fn redirects_are_followed_unless_told_not_to() {
    if !have("nbdcopy") {
        return;
    }
    let http = HttpServer::start();
    let data = pseudo_random(300_000, 10);
    http.add_file("/disk.img", data.clone());
    http.set(|b| {
        b.redirects.insert("/old.img".into(), "/disk.img".into());
    });
    let s = Server::start(&["curl", &http.url("/old.img")]);
    assert!(copy_out(&s, &[]) == data);
    drop(s);
    let err = start_refused(
        &["curl", &http.url("/old.img"), "followlocation=false"],
        &[],
    );
    assert!(err.contains("302"), "{err}");
}

#[test]
fn size_comes_from_head_when_content_range_has_no_total() {
    if !have("nbdinfo") {
        return;
    }
    let http = HttpServer::start();
    http.add_file("/disk.img", pseudo_random(123_457, 11));
    http.set(|b| b.hide_total = true);
    let s = Server::start(&["curl", &http.url("/disk.img")]);
    let json = stdout_of(Command::new("nbdinfo").arg("--json").arg(&s.uri));
    assert!(json.contains("\"export-size\": 123457"), "{json}");
    assert!(http.requests().iter().any(|r| r.method == "HEAD"));
}

#[test]
fn bad_parameters_are_refused_naming_the_key() {
    let http = HttpServer::start();
    http.add_file("/disk.img", vec![0u8; 4096]);
    let url = http.url("/disk.img");
    for (kv, key) in [
        ("connections=0", "connections=0"),
        ("timeout=soon", "timeout=soon"),
        ("protocols=nosuchproto", "protocols=nosuchproto"),
        ("password=+/nonexistent/pw", "password=+/nonexistent/pw"),
    ] {
        let err = start_refused(&["curl", &url, kv], &[]);
        assert!(err.contains(key), "{kv}: {err}");
    }
    // protocols= also stops a URL of another scheme.
    let err = start_refused(&["curl", &url, "protocols=https"], &[]);
    assert!(err.to_lowercase().contains("protocol"), "{err}");
}

#[test]
fn https_verifies_the_server_with_cainfo_or_not_at_all_with_sslverify_false() {
    if !have("openssl") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A self-signed certificate for 127.0.0.1, its own CA.
    self_signed(
        dir.path(),
        RSA_2048,
        "key.pem",
        "cert.pem",
        "/CN=127.0.0.1",
        &["subjectAltName=IP:127.0.0.1"],
    );
    let cert = dir.path().join("cert.pem");
    let https = HttpServer::start_tls(&cert, &dir.path().join("key.pem"));
    let data = pseudo_random(700_000, 12);
    https.add_file("/disk.img", data.clone());
    let url = https.url("/disk.img");
    assert!(url.starts_with("https://"));
    // Trusting the certificate: served.
    let cainfo = format!("cainfo={}", cert.display());
    let s = Server::start(&["curl", &url, &cainfo]);
    assert!(copy_out(&s, &[]) == data);
    drop(s);
    // The system's CAs do not know it: refused at start-up.
    let err = start_refused(&["curl", &url], &[]);
    assert!(err.contains("certificate"), "{err}");
    // sslverify=false: served without checking.
    let s = Server::start(&["curl", &url, "sslverify=false"]);
    assert!(copy_out(&s, &[]) == data);
}

#[test]
fn password_dash_reads_standard_input() {
    let http = HttpServer::start();
    http.add_file("/disk.img", pseudo_random(65536, 13));
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .arg("-U")
        .arg(dir.path().join("s.sock"))
        .args(["curl", &http.url("/disk.img"), "user=bob", "password=-"])
        .args(["--run", "nbdcopy \"$uri\" null:"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from-stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // base64("bob:from-stdin")
    assert!(http
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("Basic Ym9iOmZyb20tc3RkaW4=")));
    // Empty standard input is an error naming the key, not an empty password.
    let err = start_refused(&["curl", &http.url("/disk.img"), "password=-"], &[]);
    assert!(err.contains("password=-"), "{err}");
}

/// With `-s`, standard input is the NBD client's connection: a secret given
/// as `-` must be refused with a clear message, never read from it — for
/// the native curl, s3, gcs and azure plugins and for a C plugin alike.
#[test]
fn secret_from_stdin_is_refused_when_serving_on_stdin() {
    let mut cases: Vec<Vec<&str>> = vec![
        vec![
            "curl",
            "http://127.0.0.1:1/disk.img",
            "user=bob",
            "password=-",
        ],
        vec!["curl", "http://127.0.0.1:1/disk.img", "proxy-password=-"],
        vec![
            "s3",
            "bucket=b",
            "key=k",
            "endpoint=http://127.0.0.1:1",
            "access-key=a",
            "secret-key=-",
        ],
        vec!["gcs", "bucket=b", "object=k", "bearer-token=-"],
        vec![
            "azure",
            "account=a",
            "container=c",
            "blob=b",
            "access-key=-",
        ],
    ];
    let c_curl = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-curl-plugin.so";
    if Path::new(c_curl).exists() {
        cases.push(vec![
            c_curl,
            "url=http://127.0.0.1:1/disk.img",
            "password=-",
        ]);
    }
    for args in cases {
        let key = args.last().unwrap().trim_end_matches("=-");
        let mut child = Command::new(binary())
            .arg("-s")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // What a client would send: had the plugin read it, it would take
        // this line as the secret.
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(b"not-a-secret\n");
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(
            err.contains(&format!(
                "{key}=-: standard input is the NBD connection (-s)"
            )),
            "{args:?}: {err}"
        );
    }
}

/// moto's S3 server (from PyPI, in the virtualenv scripts/test.sh makes),
/// enforcing signatures after the set-up requests.
struct Moto {
    child: std::process::Child,
    endpoint: String,
    access: String,
    secret: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_venv() -> Option<std::path::PathBuf> {
    let venv = tool_dir("NBDKIT_RS_MOTO", "moto");
    let found = venv.join("bin/moto_server").exists();
    available(found, &format!("moto_server (in {venv:?})")).then_some(venv)
}

/// Start moto, create a user with an access key, a bucket, and upload
/// `objects` (key, bytes) with signed requests.
fn start_moto(venv: &Path, dir: &Path, objects: &[(&str, &[u8])]) -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // The first requests (IAM user, policy, key) go unsigned; all
        // later ones must carry a valid signature.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("moto.log")).unwrap())
        .spawn()
        .expect("start moto_server");
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut moto = Moto {
        child,
        endpoint,
        access: String::new(),
        secret: String::new(),
    };
    // Hang guard for a server that never comes up (moto takes a few s).
    let mut tries = 0;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        tries += 1;
        assert!(tries < 1200, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut args = vec![];
    for (k, data) in objects {
        let p = dir.join(k.replace('/', "_"));
        std::fs::write(&p, data).unwrap();
        args.push(k.to_string());
        args.push(p.display().to_string());
    }
    let script = r#"
import boto3, json, sys
ep = sys.argv[1]
kw = dict(endpoint_url=ep, region_name="us-east-1",
          aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="tester")
iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="tester")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])
s3.create_bucket(Bucket="images")
rest = sys.argv[2:]
for key, path in zip(rest[::2], rest[1::2]):
    s3.upload_file(path, "images", key)
print(k["AccessKeyId"], k["SecretAccessKey"])
"#;
    let out = stdout_of(
        Command::new(venv.join("bin/python"))
            .arg("-c")
            .arg(script)
            .arg(&moto.endpoint)
            .args(&args),
    );
    let mut it = out.split_whitespace();
    moto.access = it.next().expect("access key").to_string();
    moto.secret = it.next().expect("secret").to_string();
    moto
}

/// A qcow2 object on S3 is read through the qcow2dec filter: the whole
/// disk as `qemu-img convert` reads the file itself.
#[test]
fn a_qcow2_object_on_s3_reads_through_qcow2dec() {
    let Some(venv) = moto_venv() else { return };
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, image()).unwrap();
    let q = dir.path().join("disk.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(&raw)
            .arg(&q),
    );
    let want = dir.path().join("want.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&q)
            .arg(&want),
    );
    let moto = start_moto(
        &venv,
        dir.path(),
        &[("disks/disk.qcow2", &std::fs::read(&q).unwrap())],
    );
    let endpoint = format!("endpoint-url={}", moto.endpoint);
    let no_files = dir.path().join("none");
    let no_files = no_files.to_str().unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", moto.access.as_str()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret.as_str()),
        ("AWS_SHARED_CREDENTIALS_FILE", no_files),
        ("AWS_CONFIG_FILE", no_files),
    ];
    let s = Server::start_with(
        &[
            "--filter=qcow2dec",
            "s3",
            "s3://images/disks/disk.qcow2",
            &endpoint,
        ],
        &env,
    );
    assert!(
        copy_out(&s, &[]) == std::fs::read(&want).unwrap(),
        "qcow2 on s3 differs"
    );
}

#[test]
fn s3_objects_are_served_with_signed_requests_from_a_local_s3_server() {
    let Some(venv) = moto_venv() else { return };
    if !have("nbdcopy") || !have("xz") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let xz = compress(&data, dir.path(), "xz", &["-T2", "--block-size=1MiB", "-c"]);
    let moto = start_moto(
        &venv,
        dir.path(),
        &[("disks/disk.img", &data), ("disks/disk.img.xz", &xz)],
    );
    let endpoint = format!("endpoint-url={}", moto.endpoint);
    let no_files = dir.path().join("none");
    let no_files = no_files.to_str().unwrap();
    // Keys from the standard environment variables.
    let env = [
        ("AWS_ACCESS_KEY_ID", moto.access.as_str()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret.as_str()),
        ("AWS_SHARED_CREDENTIALS_FILE", no_files),
        ("AWS_CONFIG_FILE", no_files),
    ];
    let s = Server::start_with(&["s3", "s3://images/disks/disk.img", &endpoint], &env);
    assert!(copy_out(&s, &[]) == data, "raw object differs");
    drop(s);
    let s = Server::start_with(
        &[
            "--filter=xz",
            "s3",
            "url=s3://images/disks/disk.img.xz",
            &endpoint,
        ],
        &env,
    );
    assert!(copy_out(&s, &[]) == data, "xz object differs");
    drop(s);
    // Keys from a shared credentials file's profile.
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n\n[ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            moto.access, moto.secret
        ),
    )
    .unwrap();
    let s = Server::start_with(
        &["s3", "bucket=images", "key=disks/disk.img", &endpoint],
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
            ("AWS_PROFILE", "ci"),
            ("AWS_CONFIG_FILE", no_files),
        ],
    );
    assert!(
        copy_out(&s, &[]) == data,
        "object differs (credentials file)"
    );
    drop(s);
    // A wrong secret is refused by the server's signature check, at start-up.
    let out = Command::new(binary())
        .args(["-f", "-U"])
        .arg(dir.path().join("x.sock"))
        .args(["s3", "s3://images/disks/disk.img", &endpoint])
        .arg(format!("access-key={}", moto.access))
        .arg("secret-key=wrong")
        .env("AWS_SHARED_CREDENTIALS_FILE", no_files)
        .env("AWS_CONFIG_FILE", no_files)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s3://images/disks/disk.img") && err.contains("403"),
        "{err}"
    );
}
