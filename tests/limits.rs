//! Access limits: `--timeout` for clients that never finish negotiating,
//! `--max-connections` for how many may be connected at once.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::client::RawClient;
use common::*;
use nbdkit_proto::*;

#[test]
fn timeout_closes_clients_that_do_not_negotiate() {
    let s = Server::start(&["--timeout=1", "memory", "size=1M"]);
    // A finishes negotiating before B even connects...
    let mut a = RawClient::start(&s.socket);
    a.go(true, false, false);
    // ...B reads the greeting and says nothing: the server hangs up.
    let (mut b, _) = RawClient::connect(&s.socket);
    assert!(b.closed_by_server(), "not closed by the server");
    // A has now been idle for longer than the timeout and is still served:
    // the limit is on negotiation only.
    a.request(CMD_READ, 0, 1, 0, 512, &[]);
    assert_eq!(a.reply(512).error, 0);
    // Logged before the server closed B's socket.
    let log = s.log();
    assert!(log.contains("--timeout"), "{log}");
}

#[test]
fn max_connections_closes_extra_clients() {
    let s = Server::start(&["--max-connections=1", "memory", "size=1M"]);
    let mut a = RawClient::start(&s.socket);
    // A second client is closed without a greeting.
    let mut b = UnixStream::connect(&s.socket).expect("connect");
    b.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = [0u8; 18];
    assert_eq!(b.read(&mut buf).expect("read"), 0, "got a greeting");
    // Once A has gone (the server frees the slot before closing), the
    // next client gets in.
    assert_eq!(a.simple_option(OptionRequest::Abort), REP_ACK);
    assert!(a.is_closed());
    let mut c = RawClient::start(&s.socket);
    let (size, _) = c.go(true, false, false);
    assert_eq!(size, 1 << 20);
}
