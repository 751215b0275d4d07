//! The options that print something and exit (`--version`,
//! `--dump-config`, `--short-options`, `--long-options`, `--help`,
//! `--dump-plugin`) and the option combinations refused before any plugin
//! is loaded, in nbdkit's order: tools probe the server with these, so
//! their output and exit codes follow nbdkit's.

use std::process::ExitCode;

use anyhow::{bail, Result};
use nbdkit_backend::{FilterSpec, ThreadModel};

use crate::chain::{self, Plugin, Registry};
use crate::cli::Cli;
use crate::{NBDKIT_VERSION, VERSION};

/// The first line of `--version`: nbdkit's release first (tools match
/// `^nbdkit 1\.`), then this implementation's own name and version, in
/// parentheses as nbdkit prints its "version extra".
pub fn version_line() -> String {
    format!("nbdkit {NBDKIT_VERSION} (nbdkit-rs {VERSION})")
}

/// Before the plugin is looked up: options that need no plugin, and the
/// combinations nbdkit refuses outright.  `Some(code)` means exit now.
pub fn early(cli: &Cli, registry: &Registry) -> Result<Option<ExitCode>> {
    if let Some(what) = &cli.generate {
        let Some(dir) = cli.args.first() else {
            bail!("--generate={what} needs a directory: nbdkit-rs --generate={what} DIR [COMMAND-NAME]");
        };
        let name = cli.args.get(1).map(String::as_str);
        crate::generate::run(what, std::path::Path::new(dir), name, registry)?;
        return Ok(Some(ExitCode::SUCCESS));
    }
    if cli.dump_config {
        say(&registry.dump_config());
        return Ok(Some(ExitCode::SUCCESS));
    }
    if cli.short_options {
        say(&crate::cli::short_options());
        return Ok(Some(ExitCode::SUCCESS));
    }
    if cli.long_options {
        say(&crate::cli::long_options());
        return Ok(Some(ExitCode::SUCCESS));
    }
    for (given, what) in [
        (
            cli.selinux_label.is_some(),
            "--selinux-label: SELinux socket labels are not supported by nbdkit-rs",
        ),
        (
            cli.swap,
            "--swap: serving a swap device (locking the server in memory) is not supported by nbdkit-rs",
        ),
        (
            cli.vsock,
            "--vsock: AF_VSOCK sockets are not supported by nbdkit-rs; use -U or TCP",
        ),
    ] {
        if given {
            bail!("{what}");
        }
    }
    if cli.args.is_empty() {
        if cli.help {
            say(&registry.general_help());
            return Ok(Some(ExitCode::SUCCESS));
        }
        if cli.version {
            say(&format!("{}\n", version_line()));
            return Ok(Some(ExitCode::SUCCESS));
        }
        if cli.dump_plugin {
            bail!("--dump-plugin needs a plugin: nbdkit-rs PLUGIN --dump-plugin (--dump-config describes the server)");
        }
    }
    // As nbdkit: -s speaks NBD on stdout, which --dump-plugin would
    // corrupt, and which cannot also be a socket or a --run command.
    if cli.single && cli.dump_plugin {
        bail!("-s and --dump-plugin cannot be used together (-s serves NBD on stdin/stdout)");
    }
    Ok(None)
}

/// Once the plugin and filters are found (an unknown one has already
/// failed, so `--filter=F PLUGIN --version` probes for F): `--help`,
/// `--version` and `--dump-plugin`.  `Some(code)` means exit now.
pub fn with_plugin(
    cli: &Cli,
    plugin: &Plugin,
    filters: &[&'static FilterSpec],
) -> Result<Option<ExitCode>> {
    if cli.help {
        if let Plugin::C(c) = plugin {
            c.load(&[])?;
        }
        say(&plugin.help_text());
        for f in filters {
            say(&format!("\n{}", f.help_text()));
        }
        return Ok(Some(ExitCode::SUCCESS));
    }
    if cli.version {
        if let Plugin::C(c) = plugin {
            c.load(&[])?;
        }
        // nbdkit's order: the server, then each layer from the client
        // side down to the plugin.
        let mut out = format!("{}\n", version_line());
        for f in filters {
            out.push_str(&format!("{} {NBDKIT_VERSION}\n", f.name));
        }
        match plugin {
            Plugin::Builtin(p) => out.push_str(&format!("{} {NBDKIT_VERSION}\n", p.name)),
            Plugin::C(c) => match c.version() {
                Some(v) => out.push_str(&format!("{} {v}\n", c.name())),
                None => out.push_str(&format!("{}\n", c.name())),
            },
        }
        say(&out);
        return Ok(Some(ExitCode::SUCCESS));
    }
    if cli.dump_plugin {
        match plugin {
            Plugin::C(c) => {
                c.load(&[])?;
                chain::dump_plugin(plugin, ThreadModel::Parallel, None);
            }
            Plugin::Builtin(_) => {
                // The configured chain knows the thread model (filters and
                // the plugin's parameters may restrict it) and may add the
                // plugin's own lines, as nbdkit's .dump_plugin.  Without
                // parameters a plugin that needs some cannot be built: its
                // thread model is then the one it declares.
                let params = &cli.args[1..];
                match chain::build(plugin, filters, params) {
                    Ok(backend) => {
                        let extra = backend.dump_plugin();
                        chain::dump_plugin(plugin, backend.thread_model(), extra.as_deref());
                        backend.shutdown();
                    }
                    Err(e) if !params.is_empty() => return Err(e),
                    Err(_) => chain::dump_plugin(plugin, ThreadModel::Parallel, None),
                }
            }
        }
        return Ok(Some(ExitCode::SUCCESS));
    }
    Ok(None)
}

/// Write to stdout, ignoring a closed pipe (`nbdkit-rs --help | head`):
/// `print!` would panic there.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}
