//! An idle connection costs no worker threads: workers start when
//! requests arrive (up to `-t` per connection) and retire when the
//! connection goes quiet, leaving the socket to wait in the reactor.
//! Counts, not times: threads are read from /proc/PID/task, and every
//! wait below is for a count to be reached (with a hang guard only).
//! `benches/idle.sh` measures 1, 100 and 10,000 idle connections.

mod common;

use std::time::{Duration, Instant};

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

/// Threads of `pid` whose name starts with `prefix` (all with "").
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Connection worker threads (named `nbd-conn-ID`).
fn workers(pid: u32) -> usize {
    threads_named(pid, "nbd-conn-")
}

/// Poll until `done(value)` holds, and return the last value.  The
/// guard only stops a broken server from hanging the test.
fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut read: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let v = read();
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "hang guard: {what} never happened (last: {v:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_block(c: &mut RawClient, i: u64) {
    let data = vec![(i % 251) as u8 + 1; 512];
    c.request(CMD_WRITE, 0, i, i * 4096, 512, &data);
    let r = c.reply(0);
    assert_eq!((r.cookie, r.error), (i, 0));
}

fn check_block(c: &mut RawClient, i: u64) {
    c.request(CMD_READ, 0, i, i * 4096, 512, &[]);
    let r = c.reply(512);
    assert_eq!((r.cookie, r.error), (i, 0));
    assert_eq!(r.data, vec![(i % 251) as u8 + 1; 512], "connection {i}");
}

/// 1 and then 200 connections, each having written a block and gone
/// quiet: no worker thread is left, the process has about as many threads
/// as with one connection, and every connection still works afterwards.
#[test]
fn idle_connections_hold_no_threads() {
    let s = Server::start(&["memory", "size=4M"]);
    let pid = s.child.id();
    let mut clients = Vec::new();
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    write_block(&mut c, 0);
    clients.push(c);
    wait_for(
        "one connection's workers retiring",
        || workers(pid),
        |&n| n == 0,
    );
    let threads_1 = threads_named(pid, "");
    let rss_1 = rss_kib(pid);

    for i in 1..200 {
        let mut c = RawClient::start(&s.socket);
        c.go(false, false, false);
        write_block(&mut c, i);
        clients.push(c);
    }
    wait_for(
        "200 connections' workers retiring",
        || workers(pid),
        |&n| n == 0,
    );
    let threads_200 = threads_named(pid, "");
    let rss_200 = rss_kib(pid);
    eprintln!(
        "idle connections: 1: {threads_1} threads, {rss_1} KiB; 200: {threads_200} threads, {rss_200} KiB"
    );
    // What is left besides the main thread is tokio's blocking pool (the
    // handshake's backend calls), which keeps a few threads for a while.
    assert!(
        threads_200 <= threads_1 + 4,
        "200 idle connections: {threads_200} threads, 1: {threads_1}"
    );
    // A few KiB per connection (task, buffers, the export); 16 threads of
    // its own each would be several times this.
    assert!(
        rss_200 < rss_1 + 200 * 64,
        "200 idle connections: {rss_200} KiB, 1: {rss_1} KiB"
    );

    // Every connection wakes up: its data is there, read on a new worker.
    for (i, c) in clients.iter_mut().enumerate() {
        check_block(c, i as u64);
    }
    // And a connection that leaves while idle is closed and forgotten.
    let fds = fd_count(pid);
    drop(clients.split_off(100));
    let left = settle_fds(pid, fds - 100);
    assert!(
        left <= fds - 100,
        "{left} descriptors, {fds} with 200 connections"
    );
}

/// Workers are started as requests arrive, up to `-t` for one connection:
/// 16 pipelined reads that each sleep in the delay filter run at once on
/// 16 threads, and only 4 with `-t 4`; once answered, the workers retire.
#[test]
fn workers_start_on_demand_up_to_the_thread_limit() {
    for (threads, want) in [(None, 16), (Some("4"), 4)] {
        let mut args = vec!["--filter=delay", "memory", "size=1M", "delay-read=3"];
        if let Some(t) = threads {
            args.splice(0..0, ["-t", t]);
        }
        let s = Server::start(&args);
        let pid = s.child.id();
        let mut c = RawClient::start(&s.socket);
        c.go(false, false, false);
        assert_eq!(workers(pid), 0, "a worker before any request");
        for i in 0..16u64 {
            c.request(CMD_READ, 0, i, i * 512, 512, &[]);
        }
        // While the first reads sleep, workers are started for the others
        // (the wait ends as soon as `want` are running).
        let n = wait_for("workers starting", || workers(pid), |&n| n >= want);
        assert_eq!(n, want, "-t {threads:?}");
        let mut cookies: Vec<u64> = (0..16).map(|_| c.reply(512).cookie).collect();
        cookies.sort();
        assert_eq!(cookies, (0..16).collect::<Vec<_>>());
        assert!(workers(pid) <= want);
        wait_for("workers retiring", || workers(pid), |&n| n == 0);
        // The quiet connection is still served.
        c.request(CMD_READ, 0, 99, 0, 512, &[]);
        let r = c.reply(512);
        assert_eq!((r.cookie, r.error), (99, 0));
    }
}

/// SIGTERM reaches a server whose connections are idle (no worker to
/// wake), and one whose only connection is in the middle of a request.
#[test]
fn sigterm_with_idle_and_busy_connections() {
    let s = Server::start(&["memory", "size=1M"]);
    let pid = s.child.id();
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    write_block(&mut c, 1);
    wait_for("workers retiring", || workers(pid), |&n| n == 0);
    assert!(s.stop().success());

    let s = Server::start(&["--filter=delay", "memory", "size=1M", "delay-read=2"]);
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    c.request(CMD_READ, 0, 5, 0, 512, &[]);
    let pid = s.child.id();
    wait_for("a worker", || workers(pid), |&n| n == 1);
    // SAFETY: kill of our own child process by pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    // The request in flight is answered before the server goes (the
    // delay filter cuts its sleep short: ESHUTDOWN).
    let r = c.reply(512);
    assert_eq!((r.cookie, r.error), (5, 108));
    assert!(c.is_closed());
    let mut s = s;
    assert!(s.wait_exit(Duration::from_secs(120)).success());
}

/// Context switches so far of the process's threads other than the
/// connection workers (the async runtime's: the reactor and its tasks).
fn runtime_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            if name.starts_with("nbd-conn-") {
                return None;
            }
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            Some(
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>(),
            )
        })
        .sum()
}

/// While workers serve a busy connection, the reactor does not watch its
/// socket: a request must not also wake the runtime's threads (it did,
/// one epoll wake-up per request, which cost a quarter of qd1 throughput
/// on two cores).  2000 back-to-back requests may wake them a few times
/// (timers, the first request), not once each.
#[test]
fn a_busy_connection_does_not_wake_the_reactor_per_request() {
    let s = Server::start(&["memory", "size=4M"]);
    let pid = s.child.id();
    let mut c = RawClient::start(&s.socket);
    c.go(false, false, false);
    write_block(&mut c, 1);
    let before = runtime_switches(pid);
    for i in 0..2000u64 {
        c.request(CMD_READ, 0, i, 4096, 512, &[]);
        assert_eq!(c.reply(512).error, 0);
    }
    let woken = runtime_switches(pid) - before;
    assert!(
        woken < 400,
        "the runtime's threads were woken {woken} times for 2000 requests"
    );
}
