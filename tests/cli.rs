//! The command line: information options, error messages, --run, -s,
//! TCP, forking to the background, signals and socket activation.
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn nbdkit() -> Command {
    Command::new(binary())
}

/// A command line that must fail before serving.  `--run 'exit 0'` is
/// appended so that a server which wrongly starts exits at once (with 0,
/// failing the test) instead of serving forever.  Returns the one error
/// line.
fn fails(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["--run", "exit 0"]);
    let (code, stdout, stderr) = run_binary(&all);
    assert!(
        code.is_some_and(|c| c != 0),
        "{args:?} should fail: {code:?} {stderr}"
    );
    assert_eq!(stdout, "", "{args:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line for {args:?}: {stderr}");
    assert!(lines[0].starts_with("nbdkit: error: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn help_version_and_dumps() {
    let (code, out, _) = run_binary(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Usage: nbdkit-rs"), "{out}");
    for name in [
        "file", "memory", "null", "pattern", "full", "ones", "s3", "gcs", "azure", "log",
    ] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(name)),
            "--help lists {name}: {out}"
        );
    }

    let (code, out, _) = run_binary(&["memory", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("memory"), "{out}");
    assert!(out.contains("size="), "{out}");
    let (code, out, _) = run_binary(&["file", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("file=") && out.contains("dir="), "{out}");
    // The object store plugins: URL forms, credentials, emulator settings.
    let (code, out, _) = run_binary(&["gcs", "--help"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("gs://BUCKET/OBJECT")
            && out.contains("credentials=")
            && out.contains("endpoint-url="),
        "{out}"
    );
    let (code, out, _) = run_binary(&["azure", "--dump-plugin"]);
    assert_eq!(code, Some(0));
    assert!(out.lines().any(|l| l == "magic_config_key=url"), "{out}");
    for key in [
        "container",
        "blob",
        "account",
        "access-key",
        "sas-token",
        "endpoint-url",
    ] {
        assert!(
            out.lines().any(|l| l == format!("config_key={key}")),
            "{key}: {out}"
        );
    }
    let (code, out, _) = run_binary(&["--filter=log", "null", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("logfile="), "filter parameters too: {out}");

    let (code, out, _) = run_binary(&["file", "--dump-plugin"]);
    assert_eq!(code, Some(0));
    assert!(out.lines().any(|l| l == "name=file"), "{out}");
    assert!(out.lines().any(|l| l == "magic_config_key=file"), "{out}");
    assert!(out.lines().any(|l| l == "config_key=dir"), "{out}");

    let (code, out, _) = run_binary(&["--dump-config"]);
    assert_eq!(code, Some(0));
    let plugins = out
        .lines()
        .find_map(|l| l.strip_prefix("plugins="))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(plugins.split(',').any(|p| p == "memory"), "{out}");
    // nbdkit's release whose interface is implemented, then our own.
    let version = env!("CARGO_PKG_VERSION");
    for line in [
        "version=1.32.5".to_string(),
        "version_major=1".into(),
        "version_minor=32".into(),
        format!("version_extra=nbdkit-rs {version}"),
    ] {
        assert!(out.lines().any(|l| l == line), "{line}: {out}");
    }
    assert!(out.lines().any(|l| l.starts_with("bindir=")), "{out}");

    let (code, out, _) = run_binary(&["--version"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), format!("nbdkit 1.32.5 (nbdkit-rs {version})"));
}

#[test]
fn clear_errors() {
    let e = fails(&["-U", "-", "fiel", "x.img"]);
    assert!(
        e.contains("'fiel'") && e.contains("did you mean 'file'"),
        "{e}"
    );

    // nbdkit's wording: "cannot open plugin 'NAME'" / "cannot open filter".
    assert!(e.contains("cannot open plugin 'fiel'"), "{e}");
    let e = fails(&["-U", "-", "--filter=nosuchfilter", "memory", "1M"]);
    assert!(e.contains("cannot open filter 'nosuchfilter'"), "{e}");
    let e = fails(&["-U", "-", "--filter=partiton", "memory", "1M"]);
    assert!(e.contains("did you mean 'partition'"), "{e}");

    let e = fails(&["-U", "-", "memory", "1M", "sise=2M"]);
    assert!(
        e.contains("'sise'") && e.contains("did you mean 'size'"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let e = fails(&["-U", "-", "file", missing.to_str().unwrap()]);
    assert!(e.contains(missing.to_str().unwrap()), "names the file: {e}");
    assert!(e.contains("No such file"), "{e}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let e = fails(&["-i", "127.0.0.1", "-p", &port, "memory", "1M"]);
    assert!(e.contains(&port) && e.contains("in use"), "{e}");
    drop(taken);
}

#[test]
fn magic_key_names_the_file() {
    if !have("nbdinfo") {
        return;
    }
    let (_dir, disk, _) = temp_file("disk.img", 123 * 1024, 9);
    let size = |s: &Server| stdout_of(Command::new("nbdinfo").arg("--size").arg(&s.uri));
    let magic = Server::start(&["-r", "file", disk.to_str().unwrap()]);
    assert_eq!(size(&magic).trim(), (123 * 1024).to_string());
    let keyed = Server::start(&["-r", "file", &format!("file={}", disk.display())]);
    assert_eq!(size(&keyed).trim(), (123 * 1024).to_string());
    let null = Server::start(&["null", "5M"]);
    assert_eq!(size(&null).trim(), (5 << 20).to_string());
}

#[test]
fn run_exit_status_and_variables() {
    let (code, out, err) = run_binary(&["-U", "-", "memory", "1M", "--run", "exit 3"]);
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(out, "");

    let (code, out, err) = run_binary(&[
        "-U",
        "-",
        "-e",
        "disk0",
        "memory",
        "1M",
        "--run",
        r#"test -S "$unixsocket" && echo "$uri|$exportname|$unixsocket""#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let f: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(f.len(), 3, "{out}");
    assert_eq!(f[1], "disk0");
    assert_eq!(f[0], format!("nbd+unix:///disk0?socket={}", f[2]));
    // The private socket is gone after the run.
    assert!(!Path::new(f[2]).exists(), "{} still exists", f[2]);

    if have("nbdinfo") {
        let (code, out, err) = run_binary(&[
            "-U",
            "-",
            "memory",
            "7M",
            "--run",
            r#"nbdinfo --size "$uri""#,
        ]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out.trim(), (7 << 20).to_string());
    }
    if have("nbdcopy") {
        // Captive mode: the copy's status is ours.
        let (code, _, err) = run_binary(&[
            "-U",
            "-",
            "memory",
            "1G",
            "--run",
            r#"nbdcopy "$uri" null:"#,
        ]);
        assert_eq!(code, Some(0), "{err}");
        let (code, _, _) = run_binary(&[
            "-U",
            "-",
            "full",
            "1M",
            "--run",
            r#"nbdcopy /dev/zero "$uri" 2>/dev/null || exit 42"#,
        ]);
        assert!(code.is_some_and(|c| c != 0), "a failing copy fails");
    }
}

#[test]
fn single_mode_over_stdin() {
    if !have_python_nbd() {
        return;
    }
    // libnbd's connect_command runs the server with a socket on stdin and
    // stdout, which is what -s serves.
    let out = stdout_of(
        Command::new(PYTHON)
            .arg("-c")
            .arg(
                "import nbd, sys\n\
                 h = nbd.NBD()\n\
                 h.connect_command([sys.argv[1], '-s', 'memory', '1M'])\n\
                 h.pwrite(b'single', 4096)\n\
                 print(h.get_size(), h.pread(6, 4096).decode())\n\
                 h.shutdown()",
            )
            .arg(binary()),
    );
    assert_eq!(out.trim(), "1048576 single");

    if have("nbdinfo") {
        // nbdinfo's [ CMD ] syntax uses socket activation; the server then
        // serves the socket it is handed...
        let bin = binary();
        let out = stdout_of(
            Command::new("nbdinfo")
                .args(["--size", "--", "["])
                .arg(&bin)
                .args(["memory", "1M", "]"]),
        );
        assert_eq!(out.trim(), "1048576");
        // ...and refuses -s there, as nbdkit does, instead of speaking NBD
        // on its stdout.
        let bad = Command::new("nbdinfo")
            .args(["--size", "--", "["])
            .arg(&bin)
            .args(["-s", "memory", "1M", "]"])
            .output()
            .unwrap();
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stderr)
                .contains("cannot use socket activation with the -s flag"),
            "{bad:?}"
        );
        assert!(!String::from_utf8_lossy(&bad.stdout).contains("NBDMAGIC"));
    }
}

#[test]
fn tcp_with_port_zero_and_sigterm() {
    if !have("nbdinfo") {
        return;
    }
    let mut child = nbdkit()
        .args([
            "-f",
            "--print-uri",
            "-i",
            "127.0.0.1",
            "-p",
            "0",
            "memory",
            "2M",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line.trim();
    let port: u16 = uri
        .strip_prefix("nbd://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected uri {uri:?}"));
    assert_ne!(port, 0);
    let out = stdout_of(Command::new("nbdinfo").arg("--size").arg(uri));
    assert_eq!(out.trim(), (2 << 20).to_string());
    // SAFETY: kill of our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn sigterm_with_a_client_connected_exits_zero() {
    if !have_python_nbd() {
        return;
    }
    let s = Server::start(&["memory", "1M"]);
    // A client that connects, says so, then waits on its stdin.
    let mut client = Command::new(PYTHON)
        .arg("-c")
        .arg(
            "import nbd, sys\n\
             h = nbd.NBD()\n\
             h.connect_uri(sys.argv[1])\n\
             h.pwrite(b'x', 0)\n\
             print('connected', flush=True)\n\
             sys.stdin.read()",
        )
        .arg(&s.uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    let socket = s.socket.clone();
    let status = s.stop();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!socket.exists(), "the socket is removed on exit");
    drop(client.stdin.take());
    let _ = client.kill();
    let _ = client.wait();
}

/// The process is gone (or a zombie nobody has reaped yet: the daemon is
/// not our child).
fn gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn background_with_pidfile() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bg.sock");
    let pidfile = dir.path().join("nbdkit.pid");
    // Relative paths mean the starting directory, though the daemon
    // moves to /.
    let status = nbdkit()
        .current_dir(dir.path())
        .args(["-U", "bg.sock", "-P", "nbdkit.pid"])
        .args(["memory", "3M"])
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    // The parent has exited: the pid file and the socket are ready.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file exists when the parent exits")
        .trim()
        .parse()
        .unwrap();
    assert!(!gone(pid), "pid {pid} is alive");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = stdout_of(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(out.trim(), (3 << 20).to_string());

    // SAFETY: kill of the server process the test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut tries = 0;
    while !gone(pid) {
        tries += 1;
        assert!(tries < 1000, "pid {pid} did not exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // As nbdkit, the pid file stays: scripts read it after the server
    // exited (nbdkit's tests wait for the pid in it to be gone).
    assert!(pidfile.exists(), "the pid file stays after exit");
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn socket_activation() {
    if !have("nbdinfo") {
        return;
    }
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = nbdkit();
    cmd.args(["-f", "memory", "4M"]);
    // LISTEN_PID is only known in the child.  No cmd.env() calls: with
    // them std would exec with its own copy of the environment and ignore
    // what setenv does here.
    // SAFETY: the closure runs in the forked child before exec and only
    // touches the child's own descriptors and environment.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(fd, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            let pid = format!("{}\0", libc::getpid());
            libc::setenv(c"LISTEN_PID".as_ptr(), pid.as_ptr().cast(), 1);
            libc::setenv(c"LISTEN_FDS".as_ptr(), c"1".as_ptr(), 1);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    // The socket was listening before the server started: no waiting.
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = stdout_of(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(out.trim(), (4 << 20).to_string());
    // SAFETY: kill of our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn background_start_failure_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bg.sock");
    let pidfile = dir.path().join("no-such-dir/nbdkit.pid");
    let out = nbdkit()
        .arg("-U")
        .arg(&sock)
        .arg("-P")
        .arg(&pidfile)
        .args(["memory", "1M"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed while starting"), "{err}");
    assert!(!sock.exists(), "the failed server cleaned up its socket");
}

/// The `Uid:`/`Gid:`/`Groups:` fields of /proc/PID/status.
fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .map(|n| n.parse().expect("id"))
        .collect()
}

#[test]
fn user_and_group_drop_privileges_after_binding() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: -u/-g need root");
        return;
    }
    let e = fails(&["-u", "no-such-user-nbdkit-rs", "memory", "size=1M"]);
    assert!(e.contains("no such user"), "{e}");
    let e = fails(&["-g", "no-such-group-nbdkit-rs", "memory", "size=1M"]);
    assert!(e.contains("no such group"), "{e}");

    // The pid file is written as root (in a directory nobody cannot
    // write), the socket is bound as root, then the server is nobody.
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    let p = pidfile.display().to_string();
    let s = Server::start(&["-u", "nobody", "-P", &p, "memory", "size=1M"]);
    // It serves (and a served request means the privileges were dropped:
    // that happens before the first accept).
    let mut c = common::client::RawClient::start(&s.socket);
    c.go(false, false, false);
    c.request(nbdkit_proto::CMD_WRITE, 0, 1, 512, 4, b"safe");
    assert_eq!(c.reply(0).error, 0);
    c.request(nbdkit_proto::CMD_READ, 0, 2, 512, 4, &[]);
    assert_eq!(c.reply(4).data, b"safe");
    let pid = s.child.id();
    let nobody = proc_ids(pid, "Uid:");
    assert_eq!(nobody.len(), 4);
    assert!(
        nobody.iter().all(|&u| u != 0 && u == nobody[0]),
        "real, effective, saved and fs uid all changed: {nobody:?}"
    );
    let gids = proc_ids(pid, "Gid:");
    assert!(gids.iter().all(|&g| g != 0), "root's group kept: {gids:?}");
    let groups = proc_ids(pid, "Groups:");
    assert_eq!(groups, vec![gids[0]], "supplementary groups dropped");
    let written: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(written, pid);
    // Every thread, not only the main one, changed (glibc setxid).
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let status =
            std::fs::read_to_string(t.expect("task").path().join("status")).unwrap_or_default();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        assert!(
            !uid_line.contains("\t0"),
            "a thread is still root: {uid_line}"
        );
    }
}

/// `--version` names nbdkit's release first (tools match `^nbdkit 1\.`),
/// then each filter and the plugin; probing an unknown plugin or filter
/// this way fails, as with nbdkit, so scripts can test for one.
#[test]
fn version_lists_the_layers_and_probes_plugins_and_filters() {
    let version = env!("CARGO_PKG_VERSION");
    let (code, out, err) = run_binary(&["--filter", "offset", "--filter=cow", "file", "--version"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("nbdkit 1.32.5 (nbdkit-rs {version})").as_str(),
            "offset 1.32.5",
            "cow 1.32.5",
            "file 1.32.5"
        ],
        "{out}"
    );
    let (code, out, _) = run_binary(&["--filter=readahead", "null", "--version"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("readahead 1."), "{out}");

    let (code, out, err) = run_binary(&["--filter=notsuchfilter", "null", "--version"]);
    assert_ne!(code, Some(0), "an unknown filter is not there: {out}");
    assert!(err.contains("notsuchfilter"), "{err}");
    let (code, _, err) = run_binary(&["nosuchplugin", "--version"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("nosuchplugin"), "{err}");
}

/// `--short-options` and `--long-options` list every option, one a line,
/// and each listed long option is one the parser takes.
#[test]
fn short_and_long_options_are_listed() {
    let (code, out, _) = run_binary(&["--short-options"]);
    assert_eq!(code, Some(0));
    for o in ["-v", "-V", "-f", "-r", "-s", "-U", "-D", "-e"] {
        assert!(out.lines().any(|l| l == o), "{o}: {out}");
    }
    assert!(out.lines().all(|l| l.len() == 2 && l.starts_with('-')));
    let (code, out, _) = run_binary(&["--long-options"]);
    assert_eq!(code, Some(0));
    for o in [
        "--help",
        "--version",
        "--readonly",
        "--read-only",
        "--exportname",
        "--export-name",
        "--pid-file",
        "--ip-addr",
        "--dump-plugin",
        "--filter",
    ] {
        assert!(out.lines().any(|l| l == o), "{o}: {out}");
    }
    assert!(!out.contains("--short-options") && !out.contains("--long-options"));
    // nbdkit's options that nbdkit-rs does not implement are refused by
    // name, not as unknown options.
    for (args, name) in [
        (&["--vsock", "null"][..], "--vsock"),
        (&["--swap", "null"][..], "--swap"),
        (&["--selinux-label=x", "null"][..], "--selinux-label"),
    ] {
        let e = fails(args);
        assert!(e.contains(name) && e.contains("not supported"), "{e}");
    }
}

/// With -s, stdin and stdout carry NBD: --dump-plugin and a script read
/// from stdin (`sh -`) are refused before anything runs.
#[test]
fn single_mode_refuses_dump_plugin_and_a_script_on_stdin() {
    let (code, out, err) = run_binary(&["--dump-plugin", "-s", "null"]);
    assert_ne!(code, Some(0));
    assert_eq!(out, "", "nothing on stdout");
    assert!(err.contains("-s") && err.contains("--dump-plugin"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let script = dir.path().join("script");
    std::fs::write(&script, format!("touch {}\n", ran.display())).unwrap();
    let out = nbdkit()
        .args(["-s", "sh", "-"])
        .stdin(std::fs::File::open(&script).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("inline script is incompatible with -s"),
        "{err}"
    );
    assert!(!ran.exists(), "the script did not run");
}

/// `--dump-plugin` has nbdkit's `thread_model` line: the model of the
/// configured chain, filters included.
#[test]
fn dump_plugin_reports_the_thread_model() {
    let (code, out, _) = run_binary(&["null", "--dump-plugin"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().any(|l| l == "max_thread_model=parallel"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "thread_model=parallel"), "{out}");
    let (code, out, err) = run_binary(&[
        "--dump-plugin",
        "--filter=noparallel",
        "null",
        "serialize=connections",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l == "thread_model=serialize_connections"),
        "{out}"
    );
}

/// With -v each layer logs its calls as nbdkit does (`nbdkit: ...debug:
/// LAYER: CALL`); `-D nbdkit.backend.controlpath=0` and
/// `-D nbdkit.backend.datapath=0` silence one kind each.
#[test]
fn backend_debug_messages_and_their_flags() {
    if !have("nbdcopy") {
        return;
    }
    let has = |log: &str, what: &str| {
        log.lines()
            .any(|l| l.starts_with("nbdkit:") && l.contains(&format!("debug: {what}")))
    };
    for (flags, control, data) in [
        (&[][..], true, true),
        (&["-D", "nbdkit.backend.controlpath=0"][..], false, true),
        (&["-D", "nbdkit.backend.datapath=0"][..], true, false),
    ] {
        let mut args = vec!["-v"];
        args.extend_from_slice(flags);
        args.extend(["--filter=noextents", "memory", "1M"]);
        let s = Server::start(&args);
        run_ok(Command::new("nbdcopy").arg(&s.uri).arg("null:"));
        let log = s.log();
        for layer in ["noextents", "memory"] {
            assert_eq!(
                has(&log, &format!("{layer}: open")),
                control,
                "{flags:?}: {log}"
            );
            assert_eq!(
                has(&log, &format!("{layer}: pread")),
                data,
                "{flags:?}: {log}"
            );
        }
    }
}

/// exitwhen's file names are relative to where the server was started,
/// even once it has forked to the background (and changed to /).
#[test]
fn exitwhen_relative_file_in_the_background() {
    if !have_python_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = nbdkit()
        .current_dir(dir.path())
        .args([
            "-P",
            "pid",
            "-U",
            "sock",
            "--filter=exitwhen",
            "memory",
            "1M",
            "exit-when-file-created=event",
        ])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", dir.path().join("sock").display());
    python(
        r#"
import nbd, sys
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
open(sys.argv[2], "w").close()
a.pread(512, 0)
a.shutdown()
b.pread(512, 0)
c = nbd.NBD()
try:
    c.connect_uri(sys.argv[1])
    raise SystemExit("a client got in after the event")
except nbd.Error:
    pass
b.shutdown()
print("OK")
"#,
        &[&uri, dir.path().join("event").to_str().unwrap()],
    );
    // The last client left after the event: the server exits.
    let start = std::time::Instant::now();
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The delay filter does not make the server deaf: a client that hangs
/// up while its read sleeps frees its connection (here the only one the
/// thread model allows), and SIGTERM stops a server whose request sleeps.
#[test]
fn delay_does_not_block_other_clients_or_shutdown() {
    if !have_python_nbd() {
        return;
    }
    let mut s = Server::start(&[
        "-v",
        "--filter=noparallel",
        "--filter=delay",
        "null",
        "1M",
        "serialize=connections",
        "rdelay=3600",
    ]);
    // A client whose read sleeps in the filter, then dies.
    let mut dying = Command::new(PYTHON)
        .arg("-c")
        .arg(
            r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.aio_pread(nbd.Buffer(512), 0)
h.poll(0)
sys.stdin.read()
"#,
        )
        .arg(&s.uri)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    while !s.log().contains("delay: pread") {
        assert!(s.running());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    dying.kill().unwrap();
    dying.wait().unwrap();
    // The next one is served.
    nbd_script(
        r#"
assert h.get_size() == 1024 * 1024
h.shutdown()
"#,
        &[&s.uri],
    );
    // A read sleeping for an hour does not hold up SIGTERM.
    let before = s.log().matches("delay: pread").count();
    let mut c = Command::new(PYTHON)
        .arg("-c")
        .arg(
            r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
print("connected", flush=True)
try:
    h.pread(512, 0)
except nbd.Error:
    pass
"#,
        )
        .arg(&s.uri)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    // Wait until the read is in the filter.
    while s.log().matches("delay: pread").count() == before {
        assert!(s.running());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let st = s.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{st:?}");
    let _ = c.wait();
}

/// In --run, `$nbd` is a synonym for `$uri`, as in nbdkit since 1.24
/// (nbdkit's tests run `nbdinfo $nbd`).
#[test]
fn run_sets_nbd_to_the_uri() {
    let (code, _, err) = run_binary(&[
        "-U",
        "-",
        "null",
        "--run",
        r#"test -n "$uri" && test "$nbd" = "$uri""#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    // nbdkit's form of the URI: no "/" for the default export.
    let (code, out, err) = run_binary(&["-U", "-", "null", "--run", "echo $uri"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("nbd+unix://?socket=/"), "{out}");
    let (code, out, err) = run_binary(&["-U", "-", "-e", "x", "null", "--run", "echo $uri"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("nbd+unix:///x?socket=/"), "{out}");
}

/// nbdkit 1.36–1.40's log destinations: `--log=/path` appends nbdkit's
/// lines to that file (opened before the server forks or changes
/// directory), `--log=default` is the default, and
/// `--no-meta-contexts` is `--no-mc`'s long name.
#[test]
fn log_to_a_file_default_log_and_no_meta_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    std::fs::write(&log, "earlier line\n").unwrap();
    let out = Command::new(binary())
        .args(["-U", "-", "-v"])
        .arg(format!("--log={}", log.display()))
        .args(["null", "--run", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("earlier line\n"), "appended: {text}");
    assert!(text.contains("nbdkit: debug: "), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("nbdkit: debug: "));

    let out = Command::new(binary())
        .args([
            "-U",
            "-",
            "--log=default",
            "--no-meta-contexts",
            "null",
            "--run",
        ])
        .arg("nbdinfo \"$uri\"")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("base:allocation"));
    assert!(
        fails_stderr(&["-U", "-", "--log=bogus", "null", "--run", "true"]).contains("--log=bogus")
    );
}

/// `nbdkit-rs --help | head -1`: a reader that goes away is not a panic.
#[test]
fn help_into_a_closed_pipe_does_not_panic() {
    for args in [
        &["--help"][..],
        &["file", "--help"][..],
        &["--dump-config"][..],
    ] {
        let mut child = Command::new(binary())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// nbdkit plugins that are out of scope natively say why (and how to get
/// them) instead of "unknown plugin".
#[test]
fn out_of_scope_plugins_say_why() {
    for (name, why) in [
        ("vddk", "VDDK"),
        ("nfs", "libnfs"),
        ("guestfs", "libguestfs"),
    ] {
        if std::path::Path::new(&format!(
            "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-{name}-plugin.so"
        ))
        .exists()
        {
            continue;
        }
        let err = fails(&[name]);
        assert!(err.contains(why) && err.contains(".so"), "{name}: {err}");
    }
}

/// With -v a connection's lines carry nbdkit's prefix, `nbdkit:
/// PLUGIN[N]: debug: ...` with N the connection's number, and `--name`
/// (nbdkit 1.46) makes the leading `nbdkit` `nbdkit[NAME]`, as nbdkit
/// 1.48.1 prints it.
#[test]
fn debug_lines_name_the_connection_and_name_tags_nbdkit() {
    if !have("nbdinfo") {
        return;
    }
    let s = Server::start(&["-v", "--filter=noextents", "memory", "1M"]);
    run_ok(Command::new("nbdinfo").arg(&s.uri));
    run_ok(Command::new("nbdinfo").arg(&s.uri));
    let log = s.log();
    for n in [1, 2] {
        for layer in ["noextents", "memory"] {
            let want = format!("nbdkit: memory[{n}]: debug: {layer}: open");
            assert!(log.lines().any(|l| l.starts_with(&want)), "{want}: {log}");
        }
    }
    // Lines outside any connection keep the plain form.
    assert!(
        log.lines().any(|l| l.starts_with("nbdkit: debug: ")),
        "{log}"
    );

    let s = Server::start(&["-v", "--name=frontend", "memory", "1M"]);
    run_ok(Command::new("nbdinfo").arg(&s.uri));
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.starts_with("nbdkit[frontend]: memory[1]: debug: memory: open")),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.starts_with("nbdkit:")), "{log}");
    // So is an error that stops the server from starting.
    let (code, _, err) = run_binary(&["--name=frontend", "null", "size=lots", "--run", "exit 0"]);
    assert_ne!(code, Some(0));
    assert!(
        err.starts_with("nbdkit[frontend]: error: size=lots"),
        "{err}"
    );

    // A name that would garble every line is refused.
    let e = fails(&["-U", "-", "--name=", "null"]);
    assert!(e.contains("--name"), "{e}");
}

/// `--log=syslog` as nbdkit 1.48.1 writes it (checked against that
/// binary): the identifier is `--name`'s or `nbdkit`, with the pid; the
/// record holds the message without the `nbdkit: error:` that stderr
/// shows, at the message's priority (LOG_DAEMON|LOG_ERR = 27); and an
/// error that stops the server goes there too, not to stderr.  Needs to
/// stand in for syslogd at /dev/log, so only where none runs and we may.
#[test]
fn syslog_records_as_nbdkit_writes_them() {
    use std::os::unix::net::UnixDatagram;
    let path = Path::new("/dev/log");
    if path.exists() {
        eprintln!("skipped: a syslog daemon owns /dev/log");
        return;
    }
    let Ok(sock) = UnixDatagram::bind(path) else {
        eprintln!("skipped: cannot create /dev/log");
        return;
    };
    struct Unlink<'a>(&'a Path);
    impl Drop for Unlink<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _unlink = Unlink(path);
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let (code, _, err) = run_binary(&[
        "--log=syslog",
        "--name=s8test",
        "null",
        "size=lots",
        "--run",
        "exit 0",
    ]);
    assert_ne!(code, Some(0));
    assert_eq!(err, "", "the error went to syslog, not stderr");
    // Other tests' background servers may log here too: keep ours.
    let mut buf = [0u8; 4096];
    let record = loop {
        let n = sock.recv(&mut buf).expect("a syslog record");
        let r = String::from_utf8_lossy(&buf[..n]).into_owned();
        if r.contains(" s8test[") {
            break r;
        }
    };
    assert!(record.starts_with("<27>"), "{record}");
    let msg = record.split_once("]: ").unwrap().1;
    assert!(msg.starts_with("size=lots: "), "{record}");
}

/// `-D` as nbdkit checks it: NAME, FLAG and N all present, or the server
/// does not start; a flag for neither the plugin nor a filter is a
/// warning ("was not used") and the server runs.
#[test]
fn debug_flags_are_checked_as_nbdkit_does() {
    for bad in ["=", ".", ".=", ".extra=1", "memory.=1", "memory.extra="] {
        let e = fails_stderr(&["-U", "-", "-D", bad, "memory", "1M", "--run", "true"]);
        assert!(e.contains("must have the format"), "-D {bad}: {e}");
    }
    let out = Command::new(binary())
        .args([
            "-U",
            "-",
            "-D",
            "example1.foo=1",
            "memory",
            "1M",
            "--run",
            "true",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("warning") && e.contains("was not used"), "{e}");
}

/// A command line that does not parse gets the line getopt gives nbdkit
/// (the option as typed, after the program as started), the synopsis on
/// stdout and exit status 1; compared with Debian's nbdkit where it is
/// installed.
#[test]
fn usage_errors_read_as_nbdkit_prints_them() {
    let ours = binary();
    let ours = ours.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--foo=3"], "PROG: unrecognized option '--foo=3'"),
        (
            &["memory", "1M", "--bogus"],
            "PROG: unrecognized option '--bogus'",
        ),
        (&["-z"], "PROG: invalid option -- 'z'"),
        (&["-r", "-p"], "PROG: option requires an argument -- 'p'"),
        (&["--port"], "PROG: option '--port' requires an argument"),
        (
            &["--filter"],
            "PROG: option '--filter' requires an argument",
        ),
        (&[], "nbdkit: no plugins given on the command line."),
    ];
    let nbdkit = Path::new("/usr/bin/nbdkit");
    for (args, want) in cases {
        let (code, stdout, stderr) = run_binary(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert_eq!(first, want.replace("PROG", ours), "{args:?}");
        assert_eq!(stdout.is_empty(), args.is_empty(), "{args:?}: {stdout}");
        if nbdkit.exists() {
            let theirs = Command::new(nbdkit).args(*args).output().unwrap();
            let theirs = String::from_utf8_lossy(&theirs.stderr);
            let line = theirs.lines().next().unwrap_or_default();
            assert_eq!(line, want.replace("PROG", "/usr/bin/nbdkit"), "{args:?}");
        }
    }
    // A value that does not parse is an error like any other.
    let (code, _, stderr) = run_binary(&["-t", "x", "memory", "1M"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with("nbdkit: error: invalid value 'x'"),
        "{stderr}"
    );
}
