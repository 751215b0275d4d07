//! `nbdkit-rs`: a pluggable NBD server.  All the work is in the library
//! half of this package (src/lib.rs) so other programs can reuse it.

fn main() -> std::process::ExitCode {
    nbdkit_rs::main()
}
