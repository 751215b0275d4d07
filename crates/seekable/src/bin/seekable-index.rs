//! `seekable-index`: build or inspect the access index of a compressed
//! image without serving it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};
use seekable_compressed::gzip::{is_gzip_magic, GzipOptions, GzipReader};
use seekable_compressed::{Options, Source};

#[derive(Parser)]
#[command(
    name = "seekable-index",
    about = "Build or inspect access indexes of compressed images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build and save the gzip index of FILE.
    Build {
        file: PathBuf,
        /// Index file (default: the per-user cache directory).
        #[arg(long)]
        index: Option<PathBuf>,
        /// Output bytes between checkpoints.
        #[arg(long, default_value_t = 1 << 20)]
        span: u64,
        /// Threads inflating BGZF members and `pigz -i` pieces in parallel
        /// (0: one thread, serially).
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Say what format FILE is and, for gzip, whether a valid saved index exists.
    Info {
        file: PathBuf,
        #[arg(long)]
        index: Option<PathBuf>,
        #[arg(long, default_value_t = 1 << 20)]
        span: u64,
    },
}

fn format_of(file: &std::fs::File) -> std::io::Result<&'static str> {
    let mut magic = [0u8; 6];
    let n = file.metadata()?.len().min(6) as usize;
    std::os::unix::fs::FileExt::read_exact_at(file, &mut magic[..n], 0)?;
    Ok(if is_gzip_magic(&magic[..n]) {
        "gzip"
    } else if magic[..n] == [0xfd, b'7', b'z', b'X', b'Z', 0] {
        "xz"
    } else if n >= 4 && magic[..4] == [0x28, 0xb5, 0x2f, 0xfd] {
        "zstd"
    } else {
        "unknown"
    })
}

/// Until the index walk ends: a progress bar (compressed bytes done,
/// rate, time left) when stderr is a terminal, otherwise a plain line
/// every few seconds and one at the end, for logs.
fn show_progress(r: &GzipReader, t0: Instant) {
    let p = r.walk_progress();
    if p.done {
        return;
    }
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(p.compressed_total);
        bar.set_style(
            ProgressStyle::with_template(
                "indexing {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta} left",
            )
            .expect("the template is valid"),
        );
        loop {
            let p = r.walk_progress();
            bar.set_position(p.compressed_done);
            if p.done {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
        return;
    }
    const LINE_EVERY: Duration = Duration::from_secs(2);
    let mut last = Instant::now();
    loop {
        let p = r.walk_progress();
        if p.done || last.elapsed() >= LINE_EVERY {
            last = Instant::now();
            let secs = t0.elapsed().as_secs_f64();
            let rate = p.compressed_done as f64 / secs.max(1e-3);
            let left = if p.done || rate <= 0.0 {
                String::new()
            } else {
                let s = (p.compressed_total - p.compressed_done) as f64 / rate;
                format!(", {} left", HumanDuration(Duration::from_secs_f64(s)))
            };
            eprintln!(
                "indexed {} of {} compressed ({}%), {}/s{left}",
                HumanBytes(p.compressed_done),
                HumanBytes(p.compressed_total),
                p.compressed_done * 100 / p.compressed_total.max(1),
                HumanBytes(rate as u64),
            );
        }
        if p.done {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Build {
            file,
            index,
            span,
            threads,
        } => {
            let f = std::fs::File::open(&file)?;
            let name = file.display().to_string();
            let src: Arc<dyn Source> = Arc::new(f);
            let opts = Options {
                name,
                threads,
                ..Options::default()
            };
            let gz = GzipOptions {
                span,
                index_path: index,
                ..GzipOptions::default()
            };
            let t0 = Instant::now();
            let r = GzipReader::open_with(src, &opts, &gz)?;
            show_progress(&r, t0);
            let size = r.wait_size()?;
            let saved = r.wait_saved();
            let secs = t0.elapsed().as_secs_f64();
            if r.index_was_loaded() {
                println!(
                    "valid index already at {}",
                    r.index_path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            } else {
                match saved {
                    Some(Ok(p)) => println!("saved index to {}", p.display()),
                    Some(Err(e)) => return Err(format!("index not saved: {e}").into()),
                    None => return Err("no index location (set --index or HOME)".into()),
                }
            }
            println!("span: {}", r.span());
            println!("checkpoints: {}", r.checkpoint_count());
            println!("decompressed size: {size}");
            println!("time: {secs:.3} s");
        }
        Cmd::Info { file, index, span } => {
            let f = std::fs::File::open(&file)?;
            let format = format_of(&f)?;
            println!("format: {format}");
            if format == "gzip" {
                let name = file.display().to_string();
                let src: Arc<dyn Source> = Arc::new(f);
                // threads 0 and a loaded index: nothing runs in the
                // background unless there is no valid index.
                let opts = Options {
                    name,
                    threads: 0,
                    ..Options::default()
                };
                let gz = GzipOptions {
                    span,
                    index_path: index,
                    ..GzipOptions::default()
                };
                let r = GzipReader::open_with(src, &opts, &gz)?;
                let path = r
                    .index_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(none)".into());
                if r.index_was_loaded() {
                    println!("index: valid, {path}");
                    println!("span: {}", r.span());
                    println!("checkpoints: {}", r.checkpoint_count());
                    println!("decompressed size: {}", r.known_size().unwrap_or(0));
                } else {
                    println!("index: none valid (would be {path})");
                }
            }
        }
    }
    Ok(())
}
