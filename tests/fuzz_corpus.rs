//! The fuzz corpora in fuzz/corpus, replayed as regression tests without
//! libFuzzer: every kept input (crash reproducers included) of the
//! `server_session` target against the real server binary over a real
//! socket, and of `option_parse`, `request_header` and `partition_table`
//! through the code they fuzz, with the same assertions.  (The seekable
//! crate's corpora are replayed by crates/seekable/tests/corpus.rs.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use common::client::RawClient;
use common::*;
use nbdkit_proto::option::OPTION_HEADER_LEN;
use nbdkit_proto::{OptionHeader, OptionRequest};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn server_session_corpus_against_the_server() {
    // As the fuzz target: a 1 MiB memory disk.
    let s = Server::start(&["memory", "size=1M"]);
    let inputs = corpus("server_session");
    assert!(inputs.len() > 50, "corpus missing: {} inputs", inputs.len());
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let mut c = UnixStream::connect(&s.socket).expect("connect");
        c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        // Inputs are small (a few KiB): they fit in the socket buffer, so
        // writing all before reading cannot deadlock.
        let _ = c.write_all(&data);
        let _ = c.shutdown(std::net::Shutdown::Write);
        // The server must end the session once the input ends (a hang
        // would be the 30 s read timeout, an error).
        let mut sink = Vec::new();
        let r = c.read_to_end(&mut sink);
        assert!(
            r.is_ok() || matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{}: {r:?}",
            path.display()
        );
    }
    // Still serving (and the harness fails the test if it panicked).
    let mut c = RawClient::start(&s.socket);
    let (size, _) = c.go(true, false, false);
    assert_eq!(size, 1 << 20);
}

#[test]
fn option_parse_corpus_round_trips() {
    let inputs = corpus("option_parse");
    assert!(inputs.len() > 20, "corpus missing: {} inputs", inputs.len());
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let Ok(h) = OptionHeader::parse(&data) else {
            continue;
        };
        let payload = &data[OPTION_HEADER_LEN..];
        let payload = &payload[..payload.len().min(h.length as usize)];
        if let Ok(req) = OptionRequest::parse(h.option, payload) {
            if !matches!(req, OptionRequest::Unknown(_)) {
                let again = req.encode();
                assert_eq!(&again[OPTION_HEADER_LEN..], payload, "{}", path.display());
            }
        }
    }
}

#[test]
fn request_header_corpus_round_trips() {
    use nbdkit_proto::RequestHeader;
    let inputs = corpus("request_header");
    assert!(!inputs.is_empty(), "corpus missing");
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        for extended in [false, true] {
            if let Ok(h) = RequestHeader::parse(&data, extended) {
                let _ = h.payload_len(extended);
                let len = RequestHeader::wire_len(extended);
                let mut again = h.encode(extended);
                again.truncate(len);
                assert_eq!(&again[..], &data[..len], "{}", path.display());
            }
        }
    }
}

#[test]
fn partition_table_corpus_stays_inside_the_disk() {
    use nbdkit_filters::partition::{find_partition, find_partition_sized, ImageBytes, SectorSize};
    let inputs = corpus("partition_table");
    assert!(inputs.len() > 10, "corpus missing");
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let disk = ImageBytes {
            data: &data,
            size: 1 << 40,
        };
        for n in 1..=8 {
            let probed = find_partition(&disk, n);
            let given = find_partition_sized(&disk, n, SectorSize::Given(4096));
            for p in [probed, given].into_iter().flatten() {
                assert!(
                    p.offset
                        .checked_add(p.length)
                        .is_some_and(|e| e <= disk.size),
                    "{} partition {n}: {p:?}",
                    path.display()
                );
            }
        }
    }
}
