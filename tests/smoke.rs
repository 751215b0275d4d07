//! The first thing a user does: serve a memory disk and use it with qemu-io.
mod common;
use common::*;
use std::process::Command;

#[test]
fn qemu_io_writes_and_reads_back_through_memory_plugin() {
    if !have("qemu-io") {
        return;
    }
    let s = Server::start(&["memory", "size=64M"]);
    let out = stdout_of(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 4096 65536",
                "-c",
                "read -P 0xab 4096 65536",
                "-c",
                "read -P 0 0 4096",
            ])
            .arg(&s.uri),
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 4096"),
        "{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(s.stop().success());
}
