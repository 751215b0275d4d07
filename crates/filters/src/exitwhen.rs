//! `exitwhen`: exit gracefully when something outside happens: a file is
//! created or deleted, a pipe is closed, a process exits, or a script says
//! so.  After the event the server refuses new clients, lets the connected
//! ones finish, and exits when the last one leaves.
//!
//! Events are checked when a client connects or disconnects, and every
//! `exit-when-poll` seconds while no client is connected (a server that is
//! busy has no reason to poll: it will check when the next client comes or
//! goes).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbdkit_backend::LockExt;
use nbdkit_backend::{
    layer_fn, request_shutdown, Backend, Client, ConfigError, Error, ErrorKind, FilterSpec, Handle,
    Param, Result,
};
use tracing::{debug, error};

/// The script's exit status meaning "the event happened".
const SCRIPT_TRIGGERED: i32 = 88;

#[derive(Debug, Clone)]
enum Event {
    FileCreated(PathBuf),
    FileDeleted(PathBuf),
    PipeClosed(i32),
    ProcessExits(i32),
    Script(String),
}

impl Event {
    fn happened(&self) -> bool {
        match self {
            Event::FileCreated(p) => p.exists(),
            Event::FileDeleted(p) => !p.exists(),
            Event::PipeClosed(fd) => pipe_closed(*fd),
            Event::ProcessExits(pid) => process_gone(*pid),
            Event::Script(s) => match Command::new("/bin/sh").arg("-c").arg(s).status() {
                Ok(st) => match st.code() {
                    Some(0) => false,
                    Some(SCRIPT_TRIGGERED) => true,
                    other => {
                        error!("exitwhen: exit-when-script {s:?} failed ({other:?}); not an event");
                        false
                    }
                },
                Err(e) => {
                    error!("exitwhen: cannot run exit-when-script {s:?}: {e}");
                    false
                }
            },
        }
    }
}

/// True when the write end of the pipe read from `fd` is closed (or `fd`
/// is no longer valid).  Never reads from it.
fn pipe_closed(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// True when `pid` no longer runs (a zombie counts as exited).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => {
            // No /proc: ask the kernel directly.
            // SAFETY: signal 0 only checks for existence.
            let r = unsafe { libc::kill(pid, 0) };
            r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        }
    }
}

#[derive(Default)]
struct State {
    connected: u64,
    triggered: bool,
}

struct ExitWhen {
    next: Arc<dyn Backend>,
    events: Vec<Event>,
    poll: Duration,
    state: Arc<Mutex<State>>,
}

/// Check every event unless one already happened; true if one has.
fn check(events: &[Event], st: &mut State) -> bool {
    if !st.triggered {
        if let Some(e) = events.iter().find(|e| e.happened()) {
            debug!("exitwhen: event happened: {e:?}");
            st.triggered = true;
        }
    }
    st.triggered
}

impl Backend for ExitWhen {
    fn name(&self) -> &str {
        "exitwhen"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn after_fork(&self) -> Result<()> {
        let events = self.events.clone();
        let state = self.state.clone();
        let poll = self.poll;
        {
            let mut st = state.lock_unpoisoned();
            if check(&events, &mut st) {
                request_shutdown();
            }
        }
        std::thread::Builder::new()
            .name("exitwhen".into())
            .spawn(move || loop {
                std::thread::sleep(poll);
                let mut st = state.lock_unpoisoned();
                if st.connected == 0 {
                    if check(&events, &mut st) {
                        request_shutdown();
                        return;
                    }
                    debug!("exitwhen: polled, no event");
                }
            })
            .map_err(|e| Error::io(format!("exitwhen: cannot start the polling thread: {e}")))?;
        self.next.after_fork()
    }
    fn preconnect(&self, client: &Client) -> Result<()> {
        let mut st = self.state.lock_unpoisoned();
        if check(&self.events, &mut st) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "exitwhen: the server is exiting; no new connections",
            ));
        }
        self.next.preconnect(client)?;
        st.connected += 1;
        Ok(())
    }
    fn disconnected(&self, client: &Client) {
        self.next.disconnected(client);
        let mut st = self.state.lock_unpoisoned();
        st.connected = st.connected.saturating_sub(1);
        if check(&self.events, &mut st) && st.connected == 0 {
            debug!("exitwhen: the last client left after the event; exiting");
            request_shutdown();
        }
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        self.next.open(readonly, export)
    }
}

fn number(key: &str, v: &str) -> std::result::Result<i32, ConfigError> {
    v.parse::<i32>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| ConfigError::new(format!("exitwhen filter: {key}={v}: not a valid number")))
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "exitwhen",
    summary: "exit gracefully when a file appears or goes, a pipe closes, a process exits",
    description: "After the event the server refuses new clients and exits once the\n\
connected ones have left (at once if none is connected).  Events may be\n\
given several times; any one of them triggers.  exit-when-script's script\n\
runs with /bin/sh and signals the event with exit status 88 (0: not yet;\n\
anything else is logged as an error).\n\n\
Example:\n  nbdkit-rs --filter=exitwhen memory 1G exit-when-file-created=/tmp/stop",
    params: &[
        Param {
            name: "exit-when-file-created",
            help: "exit when this file exists",
        },
        Param {
            name: "exit-when-file-deleted",
            help: "exit when this file no longer exists",
        },
        Param {
            name: "exit-when-pipe-closed",
            help: "exit when the pipe read from this inherited file descriptor is closed",
        },
        Param {
            name: "exit-when-process-exits",
            help: "exit when this process ID has exited",
        },
        Param {
            name: "exit-when-script",
            help: "exit when this shell command exits with status 88",
        },
        Param {
            name: "exit-when-poll",
            help: "seconds between checks while no client is connected (default 60)",
        },
    ],
    configure: |cfg| {
        let mut events = Vec::new();
        // Relative to where the server was started: it changes to / when
        // it forks to the background.
        let absolute = |p: String| std::path::absolute(&p).unwrap_or_else(|_| PathBuf::from(p));
        for p in cfg.take_all("exit-when-file-created") {
            events.push(Event::FileCreated(absolute(p)));
        }
        for p in cfg.take_all("exit-when-file-deleted") {
            events.push(Event::FileDeleted(absolute(p)));
        }
        for v in cfg.take_all("exit-when-pipe-closed") {
            let fd = number("exit-when-pipe-closed", &v)?;
            // SAFETY: F_GETFD only queries the descriptor.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(ConfigError::new(format!(
                    "exitwhen filter: exit-when-pipe-closed={fd}: no such open file descriptor"
                )));
            }
            events.push(Event::PipeClosed(fd));
        }
        for v in cfg.take_all("exit-when-process-exits") {
            events.push(Event::ProcessExits(number("exit-when-process-exits", &v)?));
        }
        for s in cfg.take_all("exit-when-script") {
            events.push(Event::Script(s));
        }
        let poll = match cfg.take("exit-when-poll") {
            None => Duration::from_secs(60),
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() && s <= 86400.0 * 365.0 => {
                    Duration::from_secs_f64(s)
                }
                _ => {
                    return Err(ConfigError::new(format!(
                        "exitwhen filter: exit-when-poll={v}: must be a positive number of seconds"
                    )))
                }
            },
        };
        Ok(layer_fn(move |next| {
            Ok(Arc::new(ExitWhen {
                next,
                events,
                poll,
                state: Arc::default(),
            }))
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_events() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stop");
        let created = Event::FileCreated(p.clone());
        let deleted = Event::FileDeleted(p.clone());
        assert!(!created.happened());
        assert!(deleted.happened());
        std::fs::write(&p, b"").unwrap();
        assert!(created.happened());
        assert!(!deleted.happened());
    }

    #[test]
    fn pipe_and_process_events() {
        let mut fds = [0i32; 2];
        // SAFETY: a valid two-element array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(!pipe_closed(fds[0]));
        // SAFETY: closing the write end we own.
        unsafe { libc::close(fds[1]) };
        assert!(pipe_closed(fds[0]));
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };

        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(!process_gone(pid));
        child.kill().unwrap();
        // Before and after reaping: a zombie has exited too.
        let _ = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        child.wait().unwrap();
        assert!(process_gone(pid));
    }

    #[test]
    fn script_exit_codes() {
        assert!(Event::Script("exit 88".into()).happened());
        assert!(!Event::Script("exit 0".into()).happened());
        assert!(!Event::Script("exit 1".into()).happened());
    }

    #[test]
    fn bad_parameters_are_refused() {
        let bad = [
            ("exit-when-poll", "0"),
            ("exit-when-poll", "soon"),
            ("exit-when-process-exits", "-4"),
            ("exit-when-pipe-closed", "999999"),
        ];
        for (k, v) in bad {
            let mut cfg = nbdkit_backend::Config::new(vec![(k.into(), v.into())]);
            let e = (SPEC.configure)(&mut cfg).err().expect(k);
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
