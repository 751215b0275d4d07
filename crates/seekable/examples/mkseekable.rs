//! Write a file in the zstd seekable format (for trying the reader out):
//!
//!     cargo run --release -p seekable-compressed --example mkseekable -- IN OUT [FRAME_KIB] [LEVEL]
//!
//! The whole input is read into memory; this is a tool for tests and docs.

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: mkseekable IN OUT [FRAME_KIB] [LEVEL]");
        std::process::exit(2);
    }
    let frame_kib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let level: i32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let input = std::fs::read(&args[1])?;
    let out = seekable_compressed::zstd::seekable_compress(&input, frame_kib << 10, level)?;
    std::fs::write(&args[2], out)
}
