//! Where messages go: stderr (default in the foreground), syslog (default
//! in the background), or nowhere.
//!
//! Logging must never stop the server: stderr may be a full device, a pipe
//! whose reader has gone, or a dead journal.  A failed write is dropped
//! (the message is lost, the request still gets its reply), and
//! tracing-subscriber's own report of a failed write is turned off, since
//! it goes to stderr with `eprintln!`, which panics when that fails too.

use std::io::Write;
use std::sync::OnceLock;

use anyhow::{bail, Result};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::Cli;

/// The name messages on stderr start with: `nbdkit`, or `nbdkit[NAME]`
/// with `--name` (nbdkit 1.46's form; scripts and nbdkit's tests match
/// `^nbdkit`).
static PROGRAM: OnceLock<String> = OnceLock::new();

/// Set once the logger is installed: a fatal error then goes through it
/// (to syslog with `--log=syslog`, as nbdkit sends it), not to stderr.
static LOGGER: OnceLock<()> = OnceLock::new();

/// Report the error that ends the server: through the logger once it runs,
/// else on stderr as `nbdkit: error: …`.
pub fn fatal(e: &anyhow::Error) {
    if LOGGER.get().is_some() {
        tracing::error!("{e:#}");
    } else {
        stderr_line(format_args!("{}: error: {e:#}", program()));
    }
}

/// `nbdkit`, or `nbdkit[NAME]` with `--name`.
pub fn program() -> &'static str {
    PROGRAM.get().map_or("nbdkit", String::as_str)
}

/// The plugin's name, for the `PLUGIN[N]: ` that marks a connection's
/// messages (nbdkit names a connection's threads after the plugin).
static PLUGIN: OnceLock<String> = OnceLock::new();

/// Record the plugin's name for the messages of each connection.
pub fn set_plugin_name(name: &str) {
    let _ = PLUGIN.set(name.to_string());
}

/// `--name`: a word printed at the start of every message, so one that
/// would garble the line (a newline, a control character) or be lost
/// (nothing at all) is refused.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(char::is_control) {
        bail!("--name={name:?}: expected a non-empty name without control characters");
    }
    Ok(())
}

pub fn init(cli: &Cli) -> Result<()> {
    if let Some(name) = &cli.name {
        check_name(name)?;
    }
    let program = PROGRAM.get_or_init(|| match &cli.name {
        Some(n) => format!("nbdkit[{n}]"),
        None => "nbdkit".into(),
    });
    let foreground = cli.foreground || cli.single || cli.run.is_some() || cli.verbose;
    // `default` (nbdkit 1.36) is what no --log means.
    let dest = match cli.log.as_deref() {
        Some(d) if d != "default" => d,
        _ if foreground => "stderr",
        _ => "syslog",
    };
    // rustls-platform-verifier (under the gcs and azure plugins) logs each
    // certificate it rejects as an ERROR, once per retry, before the
    // plugin reports the failure itself: keep it for -v.
    let level = if cli.verbose {
        "debug"
    } else {
        "warn,rustls_platform_verifier=off"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NBDKIT_RS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .log_internal_errors(false)
        .event_format(NbdkitFormat {
            program: program.as_str(),
            syslog: dest == "syslog",
        });
    match dest {
        "stderr" => builder.with_writer(|| LossyStderr).init(),
        "null" => builder.with_writer(std::io::sink).init(),
        "syslog" => {
            // The identifier is --name's when given, else nbdkit's.
            // openlog keeps the pointer, so the string lives as long as
            // the process.
            let ident: &'static std::ffi::CStr = match &cli.name {
                Some(n) => Box::leak(std::ffi::CString::new(n.as_str())?.into_boxed_c_str()),
                None => c"nbdkit",
            };
            // SAFETY: `ident` is a NUL-terminated string that is never freed.
            unsafe { libc::openlog(ident.as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            builder.with_writer(Syslog).init()
        }
        // A path (anything with a '/', as nbdkit 1.40 takes it): append to
        // that file, opened now, before any fork, chdir or privilege drop.
        path if path.contains('/') => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("--log={path}: {e}"))?;
            builder.with_writer(std::sync::Mutex::new(file)).init()
        }
        other => {
            bail!("--log={other}: expected stderr, syslog, null, default or a file path (with a /)")
        }
    }
    // A background server logs to syslog by default, but what stops it
    // from starting is still said on stderr (as nbdkit does before it
    // forks); a destination the user chose gets it.
    let implicit_syslog = dest == "syslog" && matches!(cli.log.as_deref(), None | Some("default"));
    if !implicit_syslog {
        let _ = LOGGER.set(());
    }
    Ok(())
}

/// Print a message on stderr, or drop it if stderr cannot take it (unlike
/// `eprintln!`, which panics then).
pub fn stderr_line(msg: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// stderr for log events: a write that fails is reported as done, so that
/// the event is dropped instead of failing the logging call.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Messages as nbdkit prints them, `nbdkit: LEVEL: MESSAGE`
/// (`nbdkit: debug: memory: open ...`), and for a connection's messages
/// `nbdkit: PLUGIN[N]: LEVEL: MESSAGE` with N the connection's number
/// (`nbdkit: memory[2]: debug: memory: pread ...`): scripts and nbdkit's
/// tests match on that, and the number tells interleaved clients apart.
/// `--name` makes the leading `nbdkit` `nbdkit[NAME]`.  To syslog, whose
/// records carry the program (openlog's identifier) and the priority, the
/// message goes without those two: `memory[2]: MESSAGE`.
struct NbdkitFormat {
    program: &'static str,
    syslog: bool,
}

/// The `conn` field of the server's own connection events (emitted from
/// async tasks, where no [`nbdkit_backend::Client`] is current).
#[derive(Default)]
struct ConnField(Option<u64>);

impl tracing::field::Visit for ConnField {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "conn" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S, N> FormatEvent<S, N> for NbdkitFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            _ => "debug",
        };
        if !self.syslog {
            write!(writer, "{}: ", self.program)?;
        }
        if let Some(plugin) = PLUGIN.get() {
            let conn = nbdkit_backend::Client::current_id().or_else(|| {
                let mut f = ConnField::default();
                event.record(&mut f);
                f.0
            });
            if let Some(n) = conn {
                write!(writer, "{plugin}[{n}]: ")?;
            }
        }
        if !self.syslog {
            write!(writer, "{level}: ")?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// A writer that sends each formatted event to syslog(3).
#[derive(Clone, Copy)]
struct Syslog;

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;
    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine(Vec::new(), libc::LOG_ERR)
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let priority = match *meta.level() {
            Level::ERROR => libc::LOG_ERR,
            Level::WARN => libc::LOG_WARNING,
            Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        SyslogLine(Vec::new(), priority)
    }
}

/// One record: the formatted text and its syslog priority.
struct SyslogLine(Vec<u8>, libc::c_int);

impl Write for SyslogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let text: Vec<u8> = self
            .0
            .iter()
            .copied()
            .filter(|&b| b != 0 && b != b'\n')
            .collect();
        if let Ok(c) = std::ffi::CString::new(text) {
            // SAFETY: "%s" with a valid C string.
            unsafe { libc::syslog(self.1, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}
