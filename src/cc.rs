//! The `cc` plugin: a plugin written in C (or C++, or anything a compiler
//! turns into a shared object against nbdkit-plugin.h), compiled at
//! start-up and then served through the C plugin host like any of
//! nbdkit's `.so` plugins.
//!
//! `nbdkit-rs cc plugin.c [CC=…] [CFLAGS=…] [EXTRA_CFLAGS=…] [key=value…]`:
//! the first bare parameter (or `script=`) is the source, or `-` for
//! standard input; CC, CFLAGS and EXTRA_CFLAGS choose the compiler and
//! its flags; every other parameter goes to the compiled plugin.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nbdkit_backend::{ConfigError, Param, PluginSpec};
use nbdkit_cplugin::CPlugin;

use crate::chain::Plugin;

pub const DEFAULT_CC: &str = "cc";
pub const DEFAULT_CFLAGS: &str = "-g -O2 -fPIC -shared";

/// Without a source file there is nothing to serve; the registry entry is
/// for `--help`, `--dump-plugin` and the message saying what is missing.
pub static SPEC: PluginSpec = PluginSpec {
    name: "cc",
    summary: "a plugin in C source, compiled at start-up",
    description: "The source (a file, or - for standard input) must be the first parameter; it\n\
is compiled with $CC $CFLAGS $EXTRA_CFLAGS into a shared object and served as\n\
nbdkit's C plugins are (it must #define NBDKIT_API_VERSION 2 and include\n\
<nbdkit-plugin.h>, from Debian's nbdkit-plugin-dev).  Other parameters go to it.\n\n\
Examples:\n  nbdkit-rs cc plugin.c size=1G\n  nbdkit-rs cc - EXTRA_CFLAGS=-DDEBUG < plugin.c\n  \
nbdkit-rs cc CC=g++ plugin.cpp",
    magic_config_key: None,
    params: &[
        Param {
            name: "script",
            help: "the source file, or - for standard input (the first parameter)",
        },
        Param {
            name: "CC",
            help: "the compiler (default cc)",
        },
        Param {
            name: "CFLAGS",
            help: "the compiler flags, replacing the default -g -O2 -fPIC -shared",
        },
        Param {
            name: "EXTRA_CFLAGS",
            help: "flags added to CFLAGS",
        },
    ],
    create: |_| {
        Err(ConfigError::new(
            "cc: the C source file (or - for standard input) must be the first parameter",
        ))
    },
};

/// Lines `--dump-plugin` adds for the cc plugin itself.
pub fn dump_lines() -> String {
    format!("CC={DEFAULT_CC}\nCFLAGS={DEFAULT_CFLAGS}\n")
}

/// When `plugin` is cc and `params` name a source, compile it and return
/// the compiled plugin with the parameters left for it.
pub fn compile_if_cc(
    plugin: &Plugin,
    params: &[String],
    single: bool,
) -> Result<Option<(Plugin, Vec<String>)>> {
    if !matches!(plugin, Plugin::Builtin(p) if std::ptr::eq(*p, &SPEC)) {
        return Ok(None);
    }
    let mut cc = DEFAULT_CC.to_string();
    let mut cflags = DEFAULT_CFLAGS.to_string();
    let mut extra = String::new();
    let mut source = None;
    let mut rest = Vec::new();
    for (i, p) in params.iter().enumerate() {
        match p.split_once('=') {
            Some(("CC", v)) => cc = v.to_string(),
            Some(("CFLAGS", v)) => cflags = v.to_string(),
            Some(("EXTRA_CFLAGS", v)) => extra = v.to_string(),
            Some(("script", v)) if source.is_none() => source = Some(v.to_string()),
            None if source.is_none() && (i == 0 || rest.is_empty()) => source = Some(p.clone()),
            _ => rest.push(p.clone()),
        }
    }
    let Some(source) = source else {
        return Ok(None);
    };
    let dir = tempfile::Builder::new()
        .prefix("nbdkit-rs-cc")
        .tempdir()
        .context("cc: making a temporary directory")?;
    let src_path = if source == "-" {
        if single {
            bail!("cc: the source cannot be read from standard input (-) with -s, which serves a client there");
        }
        let mut code = Vec::new();
        std::io::stdin()
            .read_to_end(&mut code)
            .context("cc: reading the source from standard input")?;
        let p = dir.path().join("stdin.c");
        std::fs::write(&p, code).context("cc: saving the source")?;
        p
    } else {
        let p = Path::new(&source);
        if !p.is_file() {
            bail!("cc: {source}: no such source file");
        }
        std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
    };
    let so = dir.path().join("plugin.so");
    // The flags are shell words, as when nbdkit runs the compiler.
    let command = format!("{cc} {cflags} {extra} \"$src\" -o \"$out\"",);
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .env("src", &src_path)
        .env("out", &so)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cc: running /bin/sh")?;
    if !out.status.success() || !so.is_file() {
        bail!(
            "cc: compiling {source} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    // dlopen keeps the object mapped: the directory can go now.
    let plugin: Arc<CPlugin> = CPlugin::open(&so)?;
    drop(dir);
    Ok(Some((Plugin::C(plugin), rest)))
}
