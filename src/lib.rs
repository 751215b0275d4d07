//! The `nbdkit-rs` command: parse an nbdkit-compatible command line, build
//! the filter chain over the plugin, bind the sockets, fork to the
//! background if asked, and serve.
//!
//! [`main_with`] is public so that a program can add its own plugins to the
//! built-in ones and get the whole command line for free (see
//! `examples/`).

mod cc;
mod chain;
mod cli;
mod daemon;
mod generate;
mod info;
mod layer;
mod logging;

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use nbdkit_backend::{FilterSpec, PluginSpec};
use nbdkit_server::listen::{Family, TempSocket};
use nbdkit_server::tls::{Tls, TlsMode};
use nbdkit_server::{ListenerSet, Server, ServerOptions};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

pub use chain::Registry;
use cli::Cli;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The nbdkit release whose command line, plugin interface and protocol
/// behaviour nbdkit-rs implements (defined in `nbdkit-backend`, so that
/// plugins can report it too: info's `mode=version`).
pub use nbdkit_backend::NBDKIT_VERSION;
const DEFAULT_PORT: u16 = 10809;

/// Run the server with the built-in plugins and filters.
pub fn main() -> ExitCode {
    main_with(&[], &[])
}

/// Run the server with extra plugins and filters besides the built-in ones.
pub fn main_with(plugins: &[&'static PluginSpec], filters: &[&'static FilterSpec]) -> ExitCode {
    let mut registry = Registry::builtin();
    registry.plugins.extend_from_slice(plugins);
    registry.filters.extend_from_slice(filters);
    match run(std::env::args().collect(), &registry) {
        Ok(code) => code,
        Err(e) => {
            logging::fatal(&e);
            ExitCode::FAILURE
        }
    }
}

/// Where clients reach the server, for `--run` and `--print-uri`.
struct Endpoint {
    unix: Option<std::path::PathBuf>,
    port: Option<u16>,
    host: String,
    /// TLS is on: the URI scheme is `nbds` (as nbdkit's), so that clients
    /// given `$uri` use it.
    tls: bool,
}

impl Endpoint {
    /// In nbdkit's form: the port always, and no `/` for the default
    /// export (`nbd+unix://?socket=...`, `nbd://localhost:10809`).
    fn uri(&self, export: &str) -> String {
        let scheme = if self.tls { "nbds" } else { "nbd" };
        let path = if export.is_empty() {
            String::new()
        } else {
            format!("/{export}")
        };
        match &self.unix {
            Some(p) => format!("{scheme}+unix://{path}?socket={}", p.display()),
            None => {
                let port = self.port.unwrap_or(DEFAULT_PORT);
                format!("{scheme}://{}:{port}{path}", self.host)
            }
        }
    }
}

/// `--tls`, `--tls-certificates`, `--tls-verify-peer` and `--tls-psk`.
///
/// Unlike nbdkit, TLS is never turned on just because certificates exist
/// in the default directory, and `--tls=on` with unusable certificates is
/// an error rather than a warning: TLS is used only when asked for, and
/// then it works or the server does not start.  `--tls-certificates`,
/// `--tls-psk` or `--tls-verify-peer` alone mean `--tls=on`, as in nbdkit.
/// TLS as the command line asks, and a warning to log once the logger runs
/// (TLS turned off for want of certificates).
fn tls_from_cli(cli: &Cli) -> Result<(Tls, Option<String>)> {
    use nbdkit_server::tls_priority::{self, Engine, Priority};
    if cli.tls_psk.is_some() && cli.tls_certificates.is_some() {
        bail!("--tls-psk and --tls-certificates cannot be used together: choose pre-shared keys or X.509 certificates");
    }
    if cli.tls_psk.is_some() && cli.tls_verify_peer {
        bail!("--tls-verify-peer checks client certificates, which --tls-psk does not use (the pre-shared key already authenticates the client)");
    }
    // As nbdkit: require, required or force; otherwise a boolean
    // (on/off, yes/no, true/false, 1/0...), in any case.
    let mode = match cli.tls.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None if cli.tls_certificates.is_some() || cli.tls_psk.is_some() || cli.tls_verify_peer => {
            TlsMode::On
        }
        None => TlsMode::Off,
        Some("require" | "required" | "force") => TlsMode::Require,
        Some(v) => match nbdkit_backend::parse_bool(v) {
            Ok(true) => TlsMode::On,
            Ok(false) => TlsMode::Off,
            Err(_) => bail!(
                "--tls={}: expected off, on or require",
                cli.tls.as_deref().unwrap_or_default()
            ),
        },
    };
    if mode == TlsMode::Off {
        if cli.tls_priority.is_some() {
            bail!("--tls-priority needs TLS: add --tls=on or --tls=require");
        }
        if cli.tls_verify_peer {
            bail!("--tls-verify-peer needs TLS: remove --tls=off");
        }
        if cli.tls_psk.is_some() {
            bail!("--tls-psk needs TLS: remove --tls=off");
        }
        return Ok((Tls::off(), None));
    }
    // Read for the library that will apply it: rustls for certificates,
    // OpenSSL for pre-shared keys.
    let engine = if cli.tls_psk.is_some() {
        Engine::Psk
    } else {
        Engine::Rustls
    };
    let priority = match &cli.tls_priority {
        Some(p) => {
            tls_priority::parse(p, engine).map_err(|e| anyhow!("--tls-priority={p}: {e}"))?
        }
        None => Priority::all(engine),
    };
    if let Some(file) = &cli.tls_psk {
        return Tls::load_psk(mode, file, &priority)
            .map(|t| (t, None))
            .map_err(|e| anyhow!("--tls-psk: {e}"));
    }
    let dir = certificates_dir(cli);
    // As nbdkit: `--tls=on` where the server's certificate and key are
    // missing serves without TLS, with a warning (`--tls=require` stops).
    // Files that are there but unusable are still an error.
    let have = |f: &str| dir.join(f).is_file();
    if mode == TlsMode::On && !(have("server-cert.pem") && have("server-key.pem")) {
        let warning = format!(
            "--tls=on but there is no server-cert.pem and server-key.pem in {}: TLS is \
             disabled, and clients that ask for it are refused (give the directory with \
             --tls-certificates=DIR)",
            dir.display()
        );
        return Ok((Tls::off(), Some(warning)));
    }
    Tls::load(mode, &dir, cli.tls_verify_peer, &priority)
        .map(|t| (t, None))
        .map_err(|e| anyhow!("TLS certificates in {}: {e}", dir.display()))
}

/// The X.509 directory `--tls` uses: `--tls-certificates`, else nbdkit's
/// default.
fn certificates_dir(cli: &Cli) -> std::path::PathBuf {
    cli.tls_certificates
        .clone()
        .unwrap_or_else(nbdkit_server::tls::default_certificates_dir)
}

/// glibc raises its mmap threshold each time a large block is freed, after
/// which decoded blocks and read buffers (1–16 MiB, allocated and freed on
/// many threads) come from per-thread heaps that never shrink: the
/// compressed-image filters then hold two or three times their cache bound.
/// A fixed threshold keeps large buffers in mmap, returned on free.
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn run(argv: Vec<String>, registry: &Registry) -> Result<ExitCode> {
    tune_malloc();
    let mut cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => return Ok(cli::usage_error(&argv, &e)),
    };

    // The daemon changes directory to /: a relative pid file means the
    // directory the user started in.
    if let Some(p) = cli.pidfile.take() {
        cli.pidfile = Some(std::path::absolute(&p).unwrap_or(p));
    }
    if let Some(code) = info::early(&cli, registry)? {
        return Ok(code);
    }
    let Some(plugin_name) = cli.args.first() else {
        // nbdkit's words, without its "error:" (it is a usage slip).
        eprintln!(
            "{}: no plugins given on the command line.\n\
             Use '{} --help' or read the nbdkit(1) manual page for documentation.",
            logging::program(),
            cli::command_name(&argv)
        );
        return Ok(ExitCode::FAILURE);
    };
    let mut plugin = registry.plugin(plugin_name)?;
    // The cc plugin becomes the plugin it compiles.
    if let Some((compiled, rest)) = cc::compile_if_cc(&plugin, &cli.args[1..], cli.single)? {
        plugin = compiled;
        cli.args.truncate(1);
        cli.args.extend(rest);
    }
    let filters = cli
        .filters
        .iter()
        .map(|f| registry.filter(f))
        .collect::<Result<Vec<_>>>()?;
    if let Some(code) = info::with_plugin(&cli, &plugin, &filters)? {
        return Ok(code);
    }
    if cli.oldstyle {
        bail!(
            "the oldstyle protocol is not supported (it was dropped from the NBD spec); remove -o"
        );
    }
    let (tls, tls_warning) = tls_from_cli(&cli)?;
    // Names are looked up now, so an unknown user stops the server before
    // it listens.
    let ids = daemon::Ids::resolve(cli.user.as_deref(), cli.group.as_deref())?;
    // nbdkit's delay syntax (nbdkit_parse_delay), as the delay filters.
    let handshake_timeout = match cli.timeout.as_deref() {
        None => None,
        Some(t) => match nbdkit_backend::parse_delay(t) {
            Ok(d) if !d.is_zero() && d.as_secs() < 1_000_000_000 => Some(d),
            Ok(_) => bail!("--timeout={t}: expected a time greater than 0 (and under 30 years)"),
            Err(e) => bail!("--timeout={t}: {e}"),
        },
    };
    check_transports(&cli)?;
    let handshake_mask = match &cli.mask_handshake {
        None => 0xffff,
        Some(m) => parse_int(m).with_context(|| format!("--mask-handshake={m}"))? as u16,
    };
    logging::set_plugin_name(plugin.name());
    logging::init(&cli)?;
    if let Some(w) = tls_warning {
        tracing::warn!("{w}");
    }
    // After the logger, so that its warnings (a flag that is not used) are
    // seen.
    let plugin_debug_flags = chain::set_debug_flags(&cli.debug_flags, &plugin, &filters)?;

    // With -s, stdin and stdout carry NBD: no plugin (native or C) may
    // read a secret from them.
    nbdkit_backend::set_stdio_safe(!cli.single);
    if let chain::Plugin::C(c) = &plugin {
        nbdkit_cplugin::set_server_readonly(cli.readonly);
        c.load(&plugin_debug_flags)?;
    }

    // Configure filters and the plugin, then stack them.
    let backend = chain::build(&plugin, &filters, &cli.args[1..])?;

    // Bind before forking, so errors reach the user.
    let tls_on = tls.mode != TlsMode::Off;
    let (listeners, net) = bind(&cli, tls_on)?;
    if cli.print_uri {
        if let Some(ep) = &net.endpoint {
            println!("{}", ep.uri(&net.export));
        }
    }

    let foreground = cli.foreground
        || cli.single
        || cli.run.is_some()
        || cli.exit_with_parent
        || net.endpoint.is_none();
    let mut ready = if foreground {
        daemon::Ready::none()
    } else {
        daemon::daemonize(cli.verbose)?
    };
    if cli.exit_with_parent {
        daemon::exit_with_parent()?;
    }

    backend
        .after_fork()
        .map_err(|e| anyhow!("{}: {e}", backend.name()))?;

    let opts = ServerOptions {
        readonly: cli.readonly,
        // 0 means the default, as in nbdkit.
        threads: cli.threads.filter(|&t| t > 0).unwrap_or(16),
        export_name: cli.export_name.clone(),
        no_structured_replies: cli.no_sr,
        no_meta_contexts: cli.no_mc,
        handshake_mask,
        tls: tls.clone(),
        handshake_timeout,
        keepalive: cli.keepalive,
        // 0 means no limit; by default, what the descriptor limit allows.
        max_connections: match cli.max_connections {
            Some(0) => None,
            Some(n) => Some(n),
            None => nbdkit_server::default_connection_limit(),
        },
    };
    let server = Server::new(backend.clone(), opts);

    // Without TLS one thread is enough for the async part (accepting,
    // handshakes, signals): requests run on each connection's own worker
    // threads, and backend calls during the handshake on the blocking pool.
    // TLS connections are served on the async path, where encryption needs
    // every core.
    let mut rt = if tls_on {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = rt
        .enable_all()
        .thread_name("nbdkit-rs")
        .build()
        .context("starting the async runtime")?;
    let code = rt.block_on(serve(
        &cli, server, listeners, &net, ids, &mut ready, tls.mode,
    ));
    debug!("shutting down");
    backend.shutdown();
    if let Some(t) = net.temp_socket {
        t.remove();
    } else if let Some(Endpoint { unix: Some(p), .. }) = &net.endpoint {
        let _ = std::fs::remove_file(p);
    }
    // The pid file stays, as nbdkit leaves it: scripts read it after the
    // server has exited (to wait for that pid to be gone).
    // Do not wait for blocking threads stuck in a slow backend call.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Refuse transport options that contradict each other.
fn check_transports(cli: &Cli) -> Result<()> {
    if cli.ipv4 && cli.ipv6 {
        bail!("-4 and -6 cannot be used together");
    }
    if cli.single && (cli.run.is_some() || cli.unix.is_some() || cli.port.is_some()) {
        bail!("-s serves stdin/stdout and cannot be combined with --run, -U or -p");
    }
    if cli.unix.is_some() && (cli.port.is_some() || cli.ipaddr.is_some()) {
        bail!("-U cannot be combined with -p or -i");
    }
    Ok(())
}

/// Where the server listens, beside the listeners themselves.
struct Network {
    /// None with -s and with socket activation.
    endpoint: Option<Endpoint>,
    /// `-U -` or `--run` without -p: a private directory, removed at exit.
    temp_socket: Option<TempSocket>,
    /// The export name `--run` and `--print-uri` put in the URI.
    export: String,
}

/// Take the activated sockets, or bind the Unix or TCP ones the command
/// line asks for (none with -s).
fn bind(cli: &Cli, tls_on: bool) -> Result<(Option<ListenerSet>, Network)> {
    let mut net = Network {
        endpoint: None,
        temp_socket: None,
        export: cli.export_name.clone().unwrap_or_default(),
    };
    let activated = ListenerSet::from_activation()?;
    if activated.is_some() {
        // As nbdkit: an activated server must not silently ignore the
        // socket it was handed (with -s it would speak NBD on stdout).
        for (given, flag) in [
            (cli.single, "-s"),
            (cli.unix.is_some(), "-U"),
            (cli.port.is_some(), "-p"),
        ] {
            if given {
                bail!("cannot use socket activation with the {flag} flag");
            }
        }
    }
    if cli.single {
        return Ok((None, net));
    }
    if let Some(l) = activated {
        return Ok((Some(l), net));
    }
    let mut temp = || -> Result<std::path::PathBuf> {
        let t = TempSocket::new().context("creating a temporary socket directory")?;
        let p = t.path.clone();
        net.temp_socket = Some(t);
        Ok(p)
    };
    let unix = match cli.unix.as_deref() {
        Some("-") => Some(temp()?),
        Some(p) => Some(std::path::absolute(p).unwrap_or_else(|_| p.into())),
        // Captive mode defaults to a private socket, like nbdkit.
        None if cli.run.is_some() && cli.port.is_none() => Some(temp()?),
        None => None,
    };
    let (set, ep) = match unix {
        Some(path) => (
            ListenerSet::bind_unix(&path).context("cannot listen on the Unix socket")?,
            Endpoint {
                unix: Some(path),
                port: None,
                host: String::new(),
                tls: tls_on,
            },
        ),
        None => bind_tcp(cli, tls_on)?,
    };
    net.endpoint = Some(ep);
    Ok((Some(set), net))
}

/// -p, -i, -4 and -6.
fn bind_tcp(cli: &Cli, tls_on: bool) -> Result<(ListenerSet, Endpoint)> {
    let family = if cli.ipv4 {
        Family::V4
    } else if cli.ipv6 {
        Family::V6
    } else {
        Family::Any
    };
    let port = cli.port.unwrap_or(DEFAULT_PORT);
    let set = ListenerSet::bind_tcp(cli.ipaddr.as_deref(), port, family).with_context(|| {
        format!("cannot listen on TCP port {port} (is another server using it? choose one with -p)")
    })?;
    let host = match cli.ipaddr.as_deref() {
        Some(a) if a.contains(':') => format!("[{a}]"),
        Some(a) => a.to_string(),
        None => "localhost".into(),
    };
    let port = set.tcp_port();
    Ok((
        set,
        Endpoint {
            unix: None,
            port,
            host,
            tls: tls_on,
        },
    ))
}

/// Serve until shut down (a signal, the backend's request, or the end of
/// `--run`'s command, whose exit status becomes ours).
async fn serve(
    cli: &Cli,
    server: std::sync::Arc<Server>,
    listeners: Option<ListenerSet>,
    net: &Network,
    ids: Option<daemon::Ids>,
    ready: &mut daemon::Ready,
    tls_mode: TlsMode,
) -> Result<ExitCode> {
    let shutdown = CancellationToken::new();
    daemon::on_signals(shutdown.clone())?;
    // nbdkit_shutdown for backends (exitlast, exitwhen, C plugins):
    // the same graceful exit as SIGTERM.
    nbdkit_backend::client::set_shutdown_hook({
        let shutdown = shutdown.clone();
        move || shutdown.cancel()
    });
    if let Some(pidfile) = &cli.pidfile {
        daemon::write_pidfile(pidfile)?;
    }
    // After binding the sockets and writing the pid file (which may
    // need root), before any client is served.
    if let Some(ids) = &ids {
        daemon::change_user(ids, net.temp_socket.as_ref().map(|t| t.dir.as_path()))?;
    }
    ready.signal();
    if cli.single {
        let stream = nbdkit_server::listen::stdio_stream()?;
        server.serve_one(stream, shutdown).await;
        return Ok(ExitCode::SUCCESS);
    }
    let listeners = listeners.expect("listeners exist unless -s");
    let serving = tokio::spawn(server.clone().serve(listeners, shutdown.clone()));
    let code = match &cli.run {
        Some(cmd) => {
            let ep = net.endpoint.as_ref().expect("--run has an endpoint");
            let status =
                daemon::run_captive(cmd, &captive_vars(cli, ep, &net.export, tls_mode)).await;
            shutdown.cancel();
            status?
        }
        None => ExitCode::SUCCESS,
    };
    match serving.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!("server: {e}"),
        Err(e) => error!("server task: {e}"),
    }
    Ok(code)
}

/// The shell variables of `--run`: set (`Some`) or removed from the
/// environment (`None`), so that a variable of the same name inherited
/// from our caller cannot pass for ours.
fn captive_vars(
    cli: &Cli,
    ep: &Endpoint,
    export: &str,
    tls: TlsMode,
) -> Vec<(&'static str, Option<String>)> {
    let uri = ep.uri(export);
    let on = tls != TlsMode::Off;
    vec![
        ("uri", Some(uri.clone())),
        // As nbdkit since 1.24: $nbd is a synonym for $uri.
        ("nbd", Some(uri)),
        ("exportname", Some(export.to_string())),
        // As nbdkit: the one not in use is set, to "".
        (
            "port",
            Some(match &ep.unix {
                Some(_) => String::new(),
                None => ep.port.unwrap_or(DEFAULT_PORT).to_string(),
            }),
        ),
        (
            "unixsocket",
            Some(
                ep.unix
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ),
        // As nbdkit: 1 for --tls=on, 2 for require, unset when off.
        ("tls", on.then(|| tls.as_number().to_string())),
        // As nbdkit: the options' values as given (relative or not), and
        // set but empty when not given, whether or not TLS is on.
        (
            "tls_certificates",
            Some(
                cli.tls_certificates
                    .as_deref()
                    .map_or(String::new(), |p| p.display().to_string()),
            ),
        ),
        (
            "tls_psk",
            Some(
                cli.tls_psk
                    .as_deref()
                    .map_or(String::new(), |p| p.display().to_string()),
            ),
        ),
    ]
}

fn parse_int(s: &str) -> Result<u64> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| anyhow!("{e}"))
}
