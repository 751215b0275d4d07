//! Rough performance check (not a test): decode throughput and random-read
//! rates of a compressed image.
//!
//!     cargo run --release -p seekable-compressed --example seekbench -- FILE [THREADS]
//!
//! Prints: open time, sequential read throughput, random 4 KiB reads/s
//! cold (fresh reader) and warm (after the sequential pass), time to the
//! first byte at offset 0, and peak RSS.

use std::sync::Arc;
use std::time::Instant;

use seekable_compressed::{open, Options, RandomAccess, Source};

fn peak_rss_mib() -> f64 {
    // SAFETY: rusage is a plain C struct, for which all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn reader(path: &str, threads: usize) -> Arc<dyn RandomAccess> {
    let file = std::fs::File::open(path).expect("open");
    let source: Arc<dyn Source> = Arc::new(file);
    let opts = Options {
        name: path.to_string(),
        threads,
        ..Options::default()
    };
    open(source, &opts).expect("open image")
}

fn random_reads(r: &dyn RandomAccess, n: usize, seed: u64) -> f64 {
    let mut x = seed | 1;
    let mut buf = vec![0u8; 4096];
    let blocks = r.size() / 4096;
    let t = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.read_at(&mut buf, (x % blocks) * 4096).expect("read");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: seekbench FILE [THREADS]");
    let threads: usize = args
        .get(2)
        .map(|s| s.parse().expect("threads"))
        .unwrap_or(2);

    let t = Instant::now();
    let r = reader(path, threads);
    let open_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut b = [0u8; 1];
    r.read_at(&mut b, 0).expect("read");
    println!(
        "{path}: {} MiB, open {:.3}s, first byte at 0 after {:.3}s",
        r.size() >> 20,
        open_s,
        t.elapsed().as_secs_f64()
    );

    if args.get(3).map(|s| s == "ttfb-only").unwrap_or(false) {
        println!("peak RSS {:.1} MiB", peak_rss_mib());
        return;
    }

    // Cold random reads on a fresh reader.
    let cold = reader(path, threads);
    let n = 200;
    println!(
        "random 4 KiB cold: {:.0} reads/s ({n} reads)",
        random_reads(&*cold, n, 7)
    );
    drop(cold);

    // Sequential pass, 1 MiB reads.
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < r.size() {
        let n = buf.len().min((r.size() - off) as usize);
        r.read_at(&mut buf[..n], off).expect("read");
        off += n as u64;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "sequential: {:.2}s, {:.0} MiB/s decompressed",
        s,
        r.size() as f64 / s / 1048576.0
    );
    println!(
        "random 4 KiB warm: {:.0} reads/s",
        random_reads(&*r, 20000, 7)
    );
    let ext = r.extents(0, r.size());
    let zero: u64 = ext.iter().filter(|e| e.zero).map(|e| e.length).sum();
    println!("extents: {} runs, {} MiB known zero", ext.len(), zero >> 20);
    println!("peak RSS {:.1} MiB", peak_rss_mib());
}
