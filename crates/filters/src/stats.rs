//! `stats`: count each kind of request, its bytes and the time spent in
//! the layers below, and write a summary to a file when the server exits.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nbdkit_backend::{
    layer_fn, Backend, ConfigError, Extents, FilterSpec, Handle, Param, Result, ZeroFlags,
};

const OPS: [&str; 7] = ["read", "write", "trim", "zero", "extents", "cache", "flush"];
const READ: usize = 0;
const WRITE: usize = 1;
const TRIM: usize = 2;
const ZERO: usize = 3;
const EXTENTS: usize = 4;
const CACHE: usize = 5;
const FLUSH: usize = 6;

#[derive(Default)]
struct Counter {
    ops: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

struct Stats {
    path: String,
    append: bool,
    started: Instant,
    connections: AtomicU64,
    ops: [Counter; 7],
}

impl Stats {
    fn summary(&self) -> String {
        let mut s = format!(
            "elapsed time: {:.6} s\nconnections: {}\n",
            self.started.elapsed().as_secs_f64(),
            self.connections.load(Ordering::Relaxed)
        );
        for (name, c) in OPS.iter().zip(&self.ops) {
            let n = c.ops.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            s.push_str(&format!(
                "{name}: {n} ops, {} errors, {} bytes, {:.6} s\n",
                c.errors.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
                c.nanos.load(Ordering::Relaxed) as f64 / 1e9
            ));
        }
        s
    }
}

struct StatsBackend {
    next: Arc<dyn Backend>,
    stats: Arc<Stats>,
}

impl Backend for StatsBackend {
    fn name(&self) -> &str {
        "stats"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(StatsHandle {
            next,
            stats: self.stats.clone(),
        }))
    }
    fn shutdown(&self) {
        self.next.shutdown();
        let s = &self.stats;
        let mut oo = OpenOptions::new();
        oo.create(true);
        if s.append {
            oo.append(true);
        } else {
            oo.write(true).truncate(true);
        }
        // The server is exiting: all we can do with a failure is say so.
        if let Err(e) = oo
            .open(&s.path)
            .and_then(|mut f| f.write_all(s.summary().as_bytes()))
        {
            tracing::error!("stats filter: writing {}: {e}", s.path);
        }
    }
}

struct StatsHandle {
    next: Box<dyn Handle>,
    stats: Arc<Stats>,
}

impl StatsHandle {
    fn count<T>(&self, op: usize, bytes: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let r = f();
        let c = &self.stats.ops[op];
        c.ops.fetch_add(1, Ordering::Relaxed);
        c.nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match &r {
            Ok(_) => c.bytes.fetch_add(bytes, Ordering::Relaxed),
            Err(_) => c.errors.fetch_add(1, Ordering::Relaxed),
        };
        r
    }
}

impl Handle for StatsHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = buf.len() as u64;
        self.count(READ, n, || self.next.pread(buf, offset))
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.count(WRITE, buf.len() as u64, || {
            self.next.pwrite(buf, offset, fua)
        })
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        self.count(TRIM, count, || self.next.trim(offset, count, fua))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        self.count(ZERO, count, || self.next.zero(offset, count, flags))
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        self.count(EXTENTS, count, || {
            self.next.extents(offset, count, req_one, extents)
        })
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        self.count(CACHE, count, || self.next.cache(offset, count))
    }
    fn flush(&self) -> Result<()> {
        self.count(FLUSH, 0, || self.next.flush())
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "stats",
    summary: "count requests, bytes and time per operation; write a summary on exit",
    description: "Example:\n  nbdkit-rs --filter=stats file disk.img statsfile=stats.txt",
    params: &[
        Param {
            name: "statsfile",
            help: "where to write the summary when the server exits (required)",
        },
        Param {
            name: "statsappend",
            help: "true to append to the file instead of replacing it",
        },
    ],
    configure: |cfg| {
        let path = cfg.require("statsfile", "stats filter")?;
        let append = cfg
            .take_bool("statsappend")
            .map_err(|e| ConfigError::new(format!("stats filter: {e}")))?
            .unwrap_or(false);
        // Fail now, not at exit, if the file cannot be written.
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| ConfigError::new(format!("stats filter: statsfile={path}: {e}")))?;
        let stats = Arc::new(Stats {
            path,
            append,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            ops: Default::default(),
        });
        Ok(layer_fn(move |next| {
            Ok(Arc::new(StatsBackend { next, stats }))
        }))
    },
};
