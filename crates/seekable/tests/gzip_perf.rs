//! Performance sanity check, not a test: run explicitly with
//! `cargo test --release -p seekable-compressed --test gzip_perf -- --ignored --nocapture`
//! (GZPERF_MIB sets the image size, default 512; files are kept in /tmp/gzperf).

#[path = "gzip_util.rs"]
mod util;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use seekable_compressed::gzip::{GzipOptions, GzipReader};
use seekable_compressed::{Options, RandomAccess, Source};

fn sh(cmd: &str) -> f64 {
    let t = Instant::now();
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "{cmd}");
    t.elapsed().as_secs_f64()
}

fn open(path: &Path, threads: usize, gz: &GzipOptions) -> GzipReader {
    let src: Arc<dyn Source> = Arc::new(std::fs::File::open(path).unwrap());
    let opts = Options {
        name: path.display().to_string(),
        cache_bytes: 64 << 20,
        threads,
        scratch_dir: None,
        ..Options::default()
    };
    GzipReader::open_with(src, &opts, gz).unwrap()
}

#[test]
#[ignore]
fn perf_report() {
    let mib: usize = std::env::var("GZPERF_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let dir = Path::new("/tmp/gzperf");
    std::fs::create_dir_all(dir).unwrap();
    // GZPERF_RAW names an existing file to use instead of generated data.
    let tag = std::env::var("GZPERF_RAW")
        .map(|_| "user".to_string())
        .unwrap_or(format!("img{mib}"));
    let raw = std::env::var_os("GZPERF_RAW")
        .map(std::path::PathBuf::from)
        .unwrap_or(dir.join(format!("{tag}.raw")));
    let gz = dir.join(format!("{tag}.gz"));
    let bgz = dir.join(format!("{tag}.bgz"));
    if !raw.exists() {
        std::fs::write(&raw, util::mixed(2024, mib << 20)).unwrap();
    }
    if !gz.exists() {
        let t = sh(&format!("gzip -6 -c {} > {}", raw.display(), gz.display()));
        println!("gzip -6 compress: {t:.2} s");
    }
    if !bgz.exists() {
        sh(&format!(
            "bgzip -@ 2 -c {} > {}",
            raw.display(),
            bgz.display()
        ));
    }
    let size = std::fs::metadata(&raw).unwrap().len();
    println!(
        "image {} MiB, gzip {} MiB, bgzf {} MiB",
        size >> 20,
        std::fs::metadata(&gz).unwrap().len() >> 20,
        std::fs::metadata(&bgz).unwrap().len() >> 20
    );
    let t = sh(&format!("gzip -dc {} > /dev/null", gz.display()));
    println!(
        "gzip -dc > /dev/null: {t:.2} s ({:.0} MiB/s)",
        size as f64 / t / 1048576.0
    );

    let idx = dir.join("img.gzi");
    let _ = std::fs::remove_file(&idx);
    let gzo = GzipOptions {
        index_path: Some(idx.clone()),
        ..Default::default()
    };
    let t0 = Instant::now();
    let r = open(&gz, 2, &gzo);
    println!(
        "open (no index): {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(r.wait_size().unwrap(), size);
    let t = t0.elapsed().as_secs_f64();
    r.wait_saved().unwrap().unwrap();
    println!(
        "index build: {t:.2} s ({:.0} MiB/s), {} checkpoints, index file {} KiB",
        size as f64 / t / 1048576.0,
        r.checkpoint_count(),
        std::fs::metadata(&idx).unwrap().len() >> 10
    );
    drop(r);

    let t0 = Instant::now();
    let r = open(&gz, 2, &gzo);
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    assert!(r.index_was_loaded());
    println!(
        "open (saved index): {open_ms:.1} ms, size known: {:?}",
        r.known_size()
    );

    let orig = std::fs::read(&raw).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    for off in (0..size).step_by(buf.len()) {
        let n = buf.len().min((size - off) as usize);
        r.read_at(&mut buf[..n], off).unwrap();
        assert!(buf[..n] == orig[off as usize..off as usize + n]);
    }
    let t = t0.elapsed().as_secs_f64();
    println!(
        "sequential read_at (1 MiB, 2 threads): {:.0} MiB/s",
        size as f64 / t / 1048576.0
    );

    let mut x = 12345u64;
    let mut small = [0u8; 4096];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < 5.0 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 16) % (size - 4096);
        r.read_at(&mut small, off).unwrap();
        n += 1;
    }
    println!(
        "random 4 KiB reads (64 MiB cache): {:.0} reads/s",
        n as f64 / t0.elapsed().as_secs_f64()
    );
    drop(r);

    for threads in [0usize, 2] {
        let gzo = GzipOptions {
            persist: false,
            ..Default::default()
        };
        let t0 = Instant::now();
        let r = open(&bgz, threads, &gzo);
        assert_eq!(r.wait_size().unwrap(), size);
        let t = t0.elapsed().as_secs_f64();
        println!(
            "bgzf index build, threads={threads}: {t:.2} s ({:.0} MiB/s)",
            size as f64 / t / 1048576.0
        );
    }
}
