//! The command line, compatible with nbdkit's:
//! `nbdkit-rs [OPTIONS] [--filter=F]... PLUGIN [key=value]...`
//! Options may come before or after the plugin and its parameters.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

#[derive(Parser, Debug, Default)]
#[command(
    name = "nbdkit-rs",
    disable_help_flag = true,
    disable_version_flag = true,
    override_usage = "nbdkit-rs [OPTIONS] [--filter=FILTER]... PLUGIN [key=value]..."
)]
pub struct Cli {
    /// Stay in the foreground (do not fork to the background).
    #[arg(short = 'f', long = "foreground", alias = "no-fork")]
    pub foreground: bool,
    /// Debug messages on stderr.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Serve read-only: every write-like request is refused.
    #[arg(short = 'r', long = "readonly", alias = "read-only")]
    pub readonly: bool,
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// Listen only on this address.
    #[arg(short = 'i', long = "ipaddr", alias = "ip-addr")]
    pub ipaddr: Option<String>,
    /// IPv4 only.
    #[arg(short = '4', long = "ipv4-only")]
    pub ipv4: bool,
    /// IPv6 only.
    #[arg(short = '6', long = "ipv6-only")]
    pub ipv6: bool,
    /// Listen on a Unix socket at PATH ("-" = a private temporary socket).
    #[arg(
        short = 'U',
        long = "unix",
        value_name = "PATH",
        allow_hyphen_values = true
    )]
    pub unix: Option<String>,
    /// Write the server's process ID to this file once it is ready.
    #[arg(
        short = 'P',
        long = "pidfile",
        alias = "pid-file",
        value_name = "PIDFILE"
    )]
    pub pidfile: Option<PathBuf>,
    /// The name of the default export.
    #[arg(
        short = 'e',
        long = "exportname",
        alias = "export-name",
        alias = "export",
        value_name = "NAME"
    )]
    pub export_name: Option<String>,
    /// Requests served in parallel per connection (default 16).
    #[arg(short = 't', long = "threads", value_name = "THREADS")]
    pub threads: Option<usize>,
    /// Serve one client on stdin/stdout.
    #[arg(short = 's', long = "single", alias = "stdin")]
    pub single: bool,
    /// Run CMD with $uri set, then exit with its status (captive mode).
    #[arg(long = "run", value_name = "CMD", allow_hyphen_values = true)]
    pub run: Option<String>,
    /// Exit when the parent process exits.
    #[arg(long = "exit-with-parent")]
    pub exit_with_parent: bool,
    /// Add a filter (the first one is nearest the client).
    #[arg(long = "filter", value_name = "FILTER")]
    pub filters: Vec<String>,
    /// Where messages go: stderr, syslog, null, default or a file path.
    #[arg(long = "log", value_name = "DEST")]
    pub log: Option<String>,
    /// Set a plugin or filter debug flag: NAME.FLAG=N.
    #[arg(short = 'D', long = "debug", value_name = "NAME.FLAG=N")]
    pub debug_flags: Vec<String>,
    /// Print what the plugin is and can do, then exit.
    #[arg(long = "dump-plugin")]
    pub dump_plugin: bool,
    /// Print the server's build configuration, then exit.
    #[arg(long = "dump-config")]
    pub dump_config: bool,
    /// Help (for the server, or for the named plugin and filters).
    #[arg(short = 'h', long = "help")]
    pub help: bool,
    /// Print the version and exit.
    #[arg(short = 'V', long = "version")]
    pub version: bool,
    /// Handshake flags offered to clients (bit 0 fixed newstyle, bit 1 no zeroes).
    #[arg(long = "mask-handshake", value_name = "MASK")]
    pub mask_handshake: Option<String>,
    /// Do not offer structured replies (nor extended headers).
    #[arg(long = "no-sr")]
    pub no_sr: bool,
    /// Do not offer metadata contexts (block status: base:allocation and
    /// qemu:allocation-depth).
    #[arg(long = "no-mc", alias = "no-meta-contexts")]
    pub no_mc: bool,
    /// Print the NBD URI of the server on stdout.
    #[arg(long = "print-uri")]
    pub print_uri: bool,
    /// Newstyle protocol (the only one; accepted for compatibility).
    #[arg(short = 'n', long = "newstyle", alias = "new-style")]
    pub newstyle: bool,
    /// Oldstyle protocol (not supported: obsolete since 2013).
    #[arg(short = 'o', long = "oldstyle", alias = "old-style")]
    pub oldstyle: bool,
    /// TLS: off, on (clients choose) or require (STARTTLS before anything else).
    #[arg(long = "tls", value_name = "off|on|require")]
    pub tls: Option<String>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem.
    #[arg(long = "tls-certificates", value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by ca-cert.pem.
    #[arg(long = "tls-verify-peer")]
    pub tls_verify_peer: bool,
    /// TLS with pre-shared keys from PSKFILE (psktool's username:hexkey lines).
    #[arg(long = "tls-psk", value_name = "PSKFILE")]
    pub tls_psk: Option<PathBuf>,
    /// Run as USER (name or uid) once the sockets are open.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,
    /// Run as GROUP (name or gid) once the sockets are open.
    #[arg(short = 'g', long = "group", value_name = "GROUP")]
    pub group: Option<String>,
    /// Disconnect clients that have not finished negotiating after TIMEOUT
    /// (nbdkit's delay syntax: 30, 1.5, 30s, 500ms, 250us, 1000ns).
    #[arg(long = "timeout", value_name = "TIMEOUT")]
    pub timeout: Option<String>,
    /// TCP keepalive (SO_KEEPALIVE) on every accepted TCP connection.
    #[arg(long = "keepalive")]
    pub keepalive: bool,
    /// The name messages start with instead of "nbdkit" (and the syslog
    /// identifier), to tell several servers' logs apart.
    #[arg(long = "name", value_name = "NAME")]
    pub name: Option<String>,
    /// A GnuTLS priority string, mapped onto rustls (X.509) or OpenSSL
    /// (PSK); what they cannot do is refused.
    #[arg(long = "tls-priority", value_name = "PRIORITY")]
    pub tls_priority: Option<String>,
    /// Connections open at once; later clients are disconnected at once
    /// (0: no limit; default: what RLIMIT_NOFILE allows).
    #[arg(long = "max-connections", value_name = "N")]
    pub max_connections: Option<usize>,
    /// nbdkit's SELinux socket label (not supported: refused by name).
    #[arg(long = "selinux-label", value_name = "LABEL", hide = true)]
    pub selinux_label: Option<String>,
    /// nbdkit's --swap (not supported: refused by name).
    #[arg(long = "swap", hide = true)]
    pub swap: bool,
    /// nbdkit's AF_VSOCK listener (not supported: refused by name).
    #[arg(long = "vsock", hide = true)]
    pub vsock: bool,
    /// List the short options, one a line (as nbdkit, for tools).
    #[arg(long = "short-options", hide = true)]
    pub short_options: bool,
    /// List the long options, one a line (as nbdkit, for tools).
    #[arg(long = "long-options", hide = true)]
    pub long_options: bool,
    /// Write the manual pages (man) or a shell's completions (bash, zsh,
    /// fish) into the directory given as the first argument, then exit
    /// (scripts/install.sh and the Debian package use it).
    #[arg(long = "generate", value_name = "man|bash|zsh|fish", hide = true)]
    pub generate: Option<String>,
    /// The plugin name, then its key=value parameters.
    #[arg(value_name = "PLUGIN [key=value]...")]
    pub args: Vec<String>,
}

pub const OPTIONS_HELP: &str = "\
Options:
  -f, --foreground         stay in the foreground
  -v, --verbose            debug messages on stderr
  -r, --readonly           serve read-only
  -p, --port PORT          TCP port (default 10809)
  -i, --ipaddr ADDR        listen only on ADDR
  -4, --ipv4-only          IPv4 only
  -6, --ipv6-only          IPv6 only
  -U, --unix PATH          Unix socket at PATH ('-' = private temporary socket)
  -P, --pidfile FILE       write the process ID to FILE once ready
  -e, --exportname NAME    name of the default export
  -t, --threads N          requests in parallel per connection (default 16)
  -s, --single             serve one client on stdin/stdout
      --run CMD            run CMD with $uri set; exit with its status
      --exit-with-parent   exit when the parent process exits
      --filter FILTER      add a filter (repeatable; first is nearest the client)
      --log DEST           stderr, syslog, null, default, or /path/to/file (appended)
  -D, --debug NAME.FLAG=N  set a plugin/filter debug flag
      --mask-handshake M   handshake flags to offer (default 3)
      --no-sr              do not offer structured replies
      --no-mc, --no-meta-contexts
                           do not offer metadata contexts
      --tls MODE           off (default), on (clients choose) or require
      --tls-certificates DIR
                           has ca-cert.pem, server-cert.pem, server-key.pem
                           (default $HOME/.pki/nbdkit; /etc/pki/nbdkit as root)
      --tls-verify-peer    require a client certificate signed by ca-cert.pem
      --tls-psk PSKFILE    TLS with pre-shared keys (psktool's username:hexkey file)
      --tls-priority PRIORITY
                           GnuTLS priority string (NORMAL, SECURE256,
                           NORMAL:-VERS-ALL:+VERS-TLS1.3, %SERVER_PRECEDENCE...);
                           what rustls/OpenSSL cannot do is refused
  -u, --user USER          run as USER once the sockets are open
  -g, --group GROUP        run as GROUP once the sockets are open
      --timeout TIMEOUT    disconnect clients still negotiating after TIMEOUT
                           (30, 1.5, 30s, 500ms, 250us, 1000ns)
      --keepalive          TCP keepalive on accepted TCP connections
      --name NAME          start log messages with NAME instead of nbdkit
      --max-connections N  connections open at once (0 = no limit; default:
                           (ulimit -n - 64) / 3, e.g. 320 at 1024)
      --print-uri          print the server's NBD URI on stdout
      --dump-config        print build configuration
      --dump-plugin        print plugin information
  -h, --help               help (add a plugin name for its parameters)
  -V, --version            print the version
";

/// Options nbdkit-rs has that nbdkit 1.32.5 does not (`--print-uri`,
/// `--no-mc`, `--timeout`, `--keepalive`, `--name` and `--tls-priority`
/// came in later nbdkit releases): left out of
/// `--short-options`/`--long-options`, which list nbdkit's interface as
/// the release `--version` names (nbdkit's tests check each listed
/// option against its manual).  `--help` lists them.
/// `--generate` is nbdkit-rs's own (for installing), and hidden.
const NOT_IN_NBDKIT_1_32: &[&str] = &[
    "no-meta-contexts",
    "generate",
    "keepalive",
    "max-connections",
    "name",
    "no-mc",
    "print-uri",
    "timeout",
    "tls-priority",
];
const SHORT_NOT_IN_NBDKIT_1_32: &[char] = &['h'];

/// `--short-options`: every short option, `-X` one a line, as nbdkit
/// prints them (tools and shell completion read this).
pub fn short_options() -> String {
    use clap::CommandFactory;
    let mut shorts: Vec<char> = Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_short())
        .filter(|c| !SHORT_NOT_IN_NBDKIT_1_32.contains(c))
        .collect();
    shorts.sort_unstable();
    shorts.iter().map(|c| format!("-{c}\n")).collect()
}

/// `--long-options`: every long option and alias, `--NAME` one a line,
/// without these two listing options themselves (as nbdkit).
pub fn long_options() -> String {
    use clap::CommandFactory;
    let mut longs: Vec<String> = Cli::command()
        .get_arguments()
        .flat_map(|a| {
            let mut v: Vec<&str> = a.get_long().into_iter().collect();
            v.extend(a.get_all_aliases().unwrap_or_default());
            v.into_iter().map(str::to_string).collect::<Vec<_>>()
        })
        .filter(|l| l != "short-options" && l != "long-options")
        .filter(|l| !NOT_IN_NBDKIT_1_32.contains(&l.as_str()))
        .collect();
    longs.sort();
    longs.iter().map(|l| format!("--{l}\n")).collect()
}

/// The name the server was started as (`nbdkit` when installed as nbdkit),
/// for messages that tell the user what to type.
pub fn command_name(argv: &[String]) -> &str {
    argv.first()
        .and_then(|a| std::path::Path::new(a).file_name()?.to_str())
        .unwrap_or("nbdkit-rs")
}

/// A command line that does not parse, reported as nbdkit reports it
/// (getopt's line naming the option as typed, then the synopsis on stdout),
/// so that scripts and users see the same thing with either server.
/// Values that do not parse (`-t x`) are errors like any other.
pub fn usage_error(argv: &[String], e: &clap::Error) -> std::process::ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let prog = argv.first().map_or("nbdkit-rs", String::as_str);
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => s.as_str(),
        _ => "",
    };
    // clap names the option without what followed it (`--foo` for
    // `--foo=3`); getopt names the word as typed.
    let typed = |name: &str| {
        argv.iter()
            .skip(1)
            .find(|a| *a == name || a.starts_with(&format!("{name}=")))
            .map_or(name.to_string(), String::clone)
    };
    let option = context(ContextKind::InvalidArg);
    let line = match e.kind() {
        ErrorKind::UnknownArgument if option.starts_with("--") => {
            format!("{prog}: unrecognized option '{}'", typed(option))
        }
        ErrorKind::UnknownArgument if option.starts_with('-') => {
            format!("{prog}: invalid option -- '{}'", &option[1..])
        }
        // clap's "a value is required": say it with the option's name as
        // typed (`-p` or `--port`; clap names both `--port <PORT>`).
        ErrorKind::InvalidValue if context(ContextKind::InvalidValue).is_empty() => {
            let long = option.split(' ').next().unwrap_or(option);
            let short = Cli::command()
                .get_arguments()
                .find(|a| a.get_long().is_some_and(|l| long == format!("--{l}")))
                .and_then(|a| a.get_short());
            match short {
                Some(c) if argv.iter().skip(1).any(|a| *a == format!("-{c}")) => {
                    format!("{prog}: option requires an argument -- '{c}'")
                }
                _ => format!("{prog}: option '{long}' requires an argument"),
            }
        }
        _ => {
            // clap's first line, after its own "error: ".
            let full = e.to_string();
            let message = full.lines().next().unwrap_or_default();
            let message = message.trim_start_matches("error: ");
            eprintln!("{}: error: {message}", crate::logging::program());
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("{line}");
    println!(
        "{}\nPlease read the nbdkit(1) manual page, or '{} --help', for full usage.",
        Cli::command().render_usage(),
        command_name(argv)
    );
    std::process::ExitCode::FAILURE
}
