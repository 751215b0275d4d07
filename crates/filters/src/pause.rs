//! `pause`: hold NBD requests while something outside (a snapshot of the
//! storage, say) needs the plugin idle, and let them go afterwards.
//!
//! The control socket (`pause-control=SOCKET`, a Unix socket) takes one
//! byte commands and answers each with one byte:
//!
//! * `p` — pause.  Requests that arrive from now on wait.  `P` is sent
//!   once every request already running has finished, so after `P` the
//!   plugin is idle (as far as requests go).
//! * `r` — resume.  Waiting requests go ahead; `R` is sent.
//! * anything else — ignored; `X` is sent.
//!
//! Nothing is lost: a paused request is only delayed, and a request is
//! acknowledged only after it ran.  If the server is asked to exit while
//! paused, the waiting requests fail with ESHUTDOWN (unacknowledged)
//! instead of holding the exit up.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nbdkit_backend::{
    layer_fn, Backend, CondvarExt, ConfigError, Error, ErrorKind, Extents, FilterSpec, Handle,
    LockExt, Param, Result, ZeroFlags,
};

#[derive(Default)]
struct State {
    paused: bool,
    /// Requests past the gate and not yet finished.
    running: usize,
}

#[derive(Default)]
struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

/// A request past the gate; finishing it (drop) may complete a pause.
struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock_unpoisoned();
        st.running -= 1;
        if st.running == 0 {
            self.0.changed.notify_all();
        }
    }
}

impl Gate {
    /// Wait while paused, then count the request as running.
    fn enter(&self) -> Result<Pass<'_>> {
        let mut st = self.state.lock_unpoisoned();
        while st.paused {
            if nbdkit_backend::client::shutdown_requested() {
                return Err(Error::new(
                    ErrorKind::Shutdown,
                    "pause filter: the server is exiting while requests are paused",
                ));
            }
            // Woken by resume; the timeout is only to notice an exit.
            st = self
                .changed
                .wait_timeout_unpoisoned(st, Duration::from_millis(200));
        }
        st.running += 1;
        Ok(Pass(self))
    }

    /// Close the gate and wait until the requests inside have finished.
    fn pause(&self) {
        let mut st = self.state.lock_unpoisoned();
        st.paused = true;
        while st.running > 0 {
            st = self.changed.wait_unpoisoned(st);
        }
    }

    fn resume(&self) {
        self.state.lock_unpoisoned().paused = false;
        self.changed.notify_all();
    }
}

/// Serve one controlling client until it hangs up.
fn control(gate: &Gate, mut conn: UnixStream) {
    let mut byte = [0u8; 1];
    while let Ok(1) = conn.read(&mut byte) {
        let reply = match byte[0] {
            b'p' => {
                gate.pause();
                b'P'
            }
            b'r' => {
                gate.resume();
                b'R'
            }
            _ => b'X',
        };
        if conn.write_all(&[reply]).is_err() {
            break;
        }
    }
}

struct PauseBackend {
    next: Arc<dyn Backend>,
    gate: Arc<Gate>,
    path: PathBuf,
    /// Taken by the control thread when it starts.
    listener: Mutex<Option<UnixListener>>,
}

impl Backend for PauseBackend {
    fn name(&self) -> &str {
        "pause"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn after_fork(&self) -> Result<()> {
        self.next.after_fork()?;
        if let Some(listener) = self.listener.lock_unpoisoned().take() {
            let gate = self.gate.clone();
            std::thread::Builder::new()
                .name("pause-control".into())
                .spawn(move || {
                    for conn in listener.incoming().flatten() {
                        let gate = gate.clone();
                        // One thread per controller, so that one which
                        // stays connected does not lock others out.
                        let _ = std::thread::Builder::new()
                            .name("pause-client".into())
                            .spawn(move || control(&gate, conn));
                    }
                })
                .map_err(|e| Error::from_io("pause filter: starting the control thread", e))?;
        }
        Ok(())
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(PauseHandle {
            next: self.next.open(readonly, export)?,
            gate: self.gate.clone(),
        }))
    }
    fn shutdown(&self) {
        self.next.shutdown();
        let _ = std::fs::remove_file(&self.path);
    }
}

struct PauseHandle {
    next: Box<dyn Handle>,
    gate: Arc<Gate>,
}

impl Handle for PauseHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.pwrite(buf, offset, fua)
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.zero(offset, count, flags)
    }
    fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.trim(offset, count, fua)
    }
    fn flush(&self) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.flush()
    }
    fn extents(&self, offset: u64, count: u64, req_one: bool, extents: &mut Extents) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.extents(offset, count, req_one, extents)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        let _pass = self.gate.enter()?;
        self.next.cache(offset, count)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "pause",
    summary: "pause and resume request processing through a control socket",
    description: "Send p to the control socket to pause (answered with P once running \
requests have finished; later ones wait), r to resume (answered with R); anything \
else is answered with X.\n\n\
Example (hold requests around a snapshot):\n  \
nbdkit-rs --filter=pause file disk.img pause-control=/tmp/pause.sock\n  \
printf p | nc -U /tmp/pause.sock    # prints P when idle\n  \
printf r | nc -U /tmp/pause.sock",
    params: &[Param {
        name: "pause-control",
        help: "(required) Unix socket the filter listens on for commands",
    }],
    configure: |cfg| {
        let v = cfg.require("pause-control", "pause filter")?;
        if v.is_empty() {
            return Err(ConfigError::new(
                "pause filter: pause-control= needs a socket path",
            ));
        }
        let path = std::path::absolute(&v).unwrap_or_else(|_| PathBuf::from(&v));
        // A socket left behind by an earlier run is replaced; anything
        // else at that path is not ours to remove.
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(&path);
            }
        }
        // Bound now, before the server forks, so that a bad path is
        // reported at start-up and the socket exists once the server is
        // ready.
        let listener = UnixListener::bind(&path)
            .map_err(|e| ConfigError::new(format!("pause filter: pause-control={v}: {e}")))?;
        Ok(layer_fn(move |next| {
            Ok(Arc::new(PauseBackend {
                next,
                gate: Arc::new(Gate::default()),
                path,
                listener: Mutex::new(Some(listener)),
            }))
        }))
    },
};
