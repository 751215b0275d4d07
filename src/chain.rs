//! Finding plugins and filters by name, handing each its parameters, and
//! stacking the filters over the plugin.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use nbdkit_backend::{concat_params, Backend, Config, FilterSpec, Param, PluginSpec, ThreadModel};
use nbdkit_cplugin::CPlugin;

/// The plugin named on the command line: one of ours, or one of nbdkit's
/// C plugins (a loaded `nbdkit-NAME-plugin.so`).
#[derive(Clone)]
pub enum Plugin {
    Builtin(&'static PluginSpec),
    C(Arc<CPlugin>),
}

impl Plugin {
    pub fn name(&self) -> &str {
        match self {
            Plugin::Builtin(p) => p.name,
            Plugin::C(c) => c.name(),
        }
    }

    fn magic_config_key(&self) -> Option<&str> {
        match self {
            Plugin::Builtin(p) => p.magic_config_key,
            Plugin::C(c) => c.magic_config_key(),
        }
    }

    pub fn help_text(&self) -> String {
        match self {
            Plugin::Builtin(p) => p.help_text(),
            Plugin::C(c) => c.help_text(),
        }
    }
}

/// nbdkit plugins that are not native here, and why: each needs a
/// proprietary or absent service or library.  nbdkit's `.so` for one of
/// them, when installed, is hosted like any C plugin.
fn not_native(name: &str) -> Option<&'static str> {
    Some(match name {
        "vddk" => "it needs VMware's proprietary VDDK library",
        "blkio" => "it needs libblkio and a virtio-blk/vhost device",
        "cdi" => {
            "it pulls container images through the Kubernetes Containerized Data Importer tooling"
        }
        "torrent" => "it needs libtorrent-rasterbar and a BitTorrent swarm",
        "nfs" => "it needs libnfs and an NFS server",
        "guestfs" => "it needs libguestfs and its appliance",
        "vram" => "it needs OpenCL and a GPU",
        _ => return None,
    })
}

/// The plugins and filters this binary knows.
pub struct Registry {
    pub plugins: Vec<&'static PluginSpec>,
    pub filters: Vec<&'static FilterSpec>,
}

impl Registry {
    pub fn builtin() -> Self {
        let mut plugins = nbdkit_plugins::all();
        plugins.extend([
            &XZ_PLUGIN,
            &GZIP_PLUGIN,
            &ZSTD_PLUGIN,
            &BZIP2_PLUGIN,
            &crate::cc::SPEC,
        ]);
        Registry {
            plugins,
            filters: nbdkit_filters::all(),
        }
    }

    /// Resolve the plugin named on the command line: a file name (with a
    /// `/` or a `.`) is an nbdkit C plugin; otherwise a built-in plugin
    /// (also as `nbdkit-NAME-plugin`), else `nbdkit-NAME-plugin.so` in
    /// nbdkit's plugin directory.
    pub fn plugin(&self, name: &str) -> Result<Plugin> {
        if nbdkit_cplugin::is_path(name) {
            return Ok(Plugin::C(CPlugin::open(Path::new(name))?));
        }
        // nbdkit accepts "nbdkit-file-plugin" style names too.
        let short = name
            .strip_prefix("nbdkit-")
            .and_then(|n| n.strip_suffix("-plugin"))
            .unwrap_or(name);
        if let Some(p) = self.plugins.iter().copied().find(|p| p.name == short) {
            return Ok(Plugin::Builtin(p));
        }
        if let Some(path) = nbdkit_cplugin::find(short) {
            return Ok(Plugin::C(CPlugin::open(&path)?));
        }
        if let Some(why) = not_native(short) {
            bail!(
                "the {short} plugin is not built into nbdkit-rs ({why}); install nbdkit's nbdkit-{short}-plugin.so and nbdkit-rs will host it"
            );
        }
        let names: Vec<&str> = self.plugins.iter().map(|p| p.name).collect();
        let dirs: Vec<String> = nbdkit_cplugin::plugin_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        // "cannot open plugin 'NAME'" is nbdkit's wording, which scripts
        // probing for a plugin may look for.
        bail!(
            "cannot open plugin '{name}': it is not built in{} and there is no nbdkit-{short}-plugin.so in {}; built-in plugins: {}",
            suggest(name, &names),
            dirs.join(", "),
            names.join(", ")
        )
    }

    pub fn filter(&self, name: &str) -> Result<&'static FilterSpec> {
        let short = name
            .strip_prefix("nbdkit-")
            .and_then(|n| n.strip_suffix("-filter"))
            .unwrap_or(name);
        self.filters
            .iter()
            .copied()
            .find(|f| f.name == short)
            .ok_or_else(|| {
                let names: Vec<&str> = self.filters.iter().map(|f| f.name).collect();
                // nbdkit's wording, as for plugins.
                anyhow!(
                    "cannot open filter '{name}': there is no such filter{}; filters: {}",
                    suggest(name, &names),
                    names.join(", ")
                )
            })
    }

    pub fn general_help(&self) -> String {
        let mut s = String::from(
            "nbdkit-rs: a pluggable NBD (Network Block Device) server\n\n\
             Usage: nbdkit-rs [OPTIONS] [--filter=FILTER]... PLUGIN [key=value]...\n\n\
             Examples:\n  nbdkit-rs -f -U /tmp/s.sock memory size=1G\n  nbdkit-rs -r file disk.img\n  nbdkit-rs -U - memory 1G --run 'nbdinfo \"$uri\"'\n\n",
        );
        s.push_str(crate::cli::OPTIONS_HELP);
        s.push_str("\nPlugins (nbdkit-rs PLUGIN --help for their parameters):\n");
        for p in &self.plugins {
            s.push_str(&format!("  {:<12} {}\n", p.name, p.summary));
        }
        s.push_str("  (and nbdkit's C plugins: a path to nbdkit-NAME-plugin.so, or NAME\n   when nbdkit-NAME-plugin.so is in nbdkit's plugin directory)\n");
        s.push_str("\nFilters (nbdkit-rs --filter=FILTER PLUGIN --help):\n");
        for f in &self.filters {
            s.push_str(&format!("  {:<12} {}\n", f.name, f.summary));
        }
        s
    }

    /// `--dump-config`: nbdkit's keys, with nbdkit's version numbers
    /// (tools such as libguestfs compare `version_major`/`version_minor`),
    /// nbdkit-rs's own name and version in `version_extra` as nbdkit puts
    /// a distribution's suffix there, and nbdkit-rs's additions
    /// (`filters`, `plugins`, `rust`, `tls_psk`).  `filterdir` is left out:
    /// nbdkit's C filters are not loaded (the filters are built in).
    pub fn dump_config(&self) -> String {
        let exe = std::env::current_exe().ok();
        let bindir = exe.as_deref().and_then(Path::parent);
        let prefix = bindir.and_then(Path::parent);
        let under = |sub: &str| {
            prefix
                .map(|p| p.join(sub).display().to_string())
                .unwrap_or_default()
        };
        let (major, minor) = {
            let mut it = crate::NBDKIT_VERSION.split('.');
            (
                it.next().unwrap_or("1").to_string(),
                it.next().unwrap_or("0").to_string(),
            )
        };
        let plugindir = nbdkit_cplugin::plugin_dir()
            .map(|d| format!("plugindir={}\n", d.display()))
            .unwrap_or_default();
        let mut s = String::new();
        if let Some(exe) = &exe {
            s.push_str(&format!("binary={}\n", exe.display()));
        }
        if let Some(b) = bindir {
            s.push_str(&format!("bindir={}\n", b.display()));
        }
        s.push_str(&format!(
            "exit_with_parent=yes
filters={}
host_cpu={}
host_os={}
libdir={}
mandir={}
name=nbdkit
{plugindir}plugins={}
root_tls_certificates_dir=/etc/pki/nbdkit
rust=yes
sbindir={}
selinux=no
sysconfdir=/etc
tls=yes
tls_psk={}
version={}
version_extra=nbdkit-rs {}
version_major={major}
version_minor={minor}
zstd=yes
",
            self.filters
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(","),
            std::env::consts::ARCH,
            std::env::consts::OS,
            under("lib"),
            under("share/man"),
            self.plugins
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>()
                .join(","),
            bindir.map(|b| b.display().to_string()).unwrap_or_default(),
            if nbdkit_server::tls::Tls::PSK_SUPPORTED {
                "yes"
            } else {
                "no"
            },
            crate::NBDKIT_VERSION,
            crate::VERSION,
        ));
        s
    }
}

/// nbdkit once had `xz` and `gzip` *plugins* taking `file=`; they became
/// filters.  These keep the old command lines working: the file plugin
/// under the filter of the same name.
fn file_under(
    cfg: &mut Config,
    filter: &FilterSpec,
) -> std::result::Result<Arc<dyn Backend>, nbdkit_backend::ConfigError> {
    let layer = (filter.configure)(cfg)?;
    let file = (nbdkit_plugins::file::SPEC.create)(cfg)?;
    layer.layer(file)
}

macro_rules! file_plus_filter {
    ($name:ident, $filter:path, $plugin:literal, $params:expr) => {
        static $name: PluginSpec = PluginSpec {
            name: $plugin,
            summary: concat!(
                "the file plugin under the ",
                $plugin,
                " filter (nbdkit's old ",
                $plugin,
                " plugin)"
            ),
            description: concat!(
                "Same as --filter=",
                $plugin,
                " file.\n\nExample:\n  nbdkit-rs ",
                $plugin,
                " file=disk.img.",
                $plugin
            ),
            magic_config_key: Some("file"),
            params: $params,
            create: |cfg| file_under(cfg, &$filter),
        };
    };
}

/// `file=`, to go before the filter's own parameters.
const FILE_PARAM: [Param; 1] = [Param {
    name: "file",
    help: "the compressed file (the magic key)",
}];

use nbdkit_filters::compressed as cz;
const XZ_PLUGIN_PARAMS: [Param; cz::XZ_PARAMS.len() + 1] =
    concat_params(&FILE_PARAM, &cz::XZ_PARAMS);
const GZIP_PLUGIN_PARAMS: [Param; cz::GZIP_PARAMS.len() + 1] =
    concat_params(&FILE_PARAM, &cz::GZIP_PARAMS);
const ZSTD_PLUGIN_PARAMS: [Param; cz::ZSTD_PARAMS.len() + 1] =
    concat_params(&FILE_PARAM, &cz::ZSTD_PARAMS);
const BZIP2_PLUGIN_PARAMS: [Param; cz::BZIP2_PARAMS.len() + 1] =
    concat_params(&FILE_PARAM, &cz::BZIP2_PARAMS);
file_plus_filter!(XZ_PLUGIN, cz::XZ, "xz", &XZ_PLUGIN_PARAMS);
file_plus_filter!(GZIP_PLUGIN, cz::GZIP, "gzip", &GZIP_PLUGIN_PARAMS);
file_plus_filter!(ZSTD_PLUGIN, cz::ZSTD, "zstd", &ZSTD_PLUGIN_PARAMS);
file_plus_filter!(BZIP2_PLUGIN, cz::BZIP2, "bzip2", &BZIP2_PLUGIN_PARAMS);

/// ", did you mean 'x'?" for a near miss, else nothing.
fn suggest(name: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(name, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(" (did you mean '{c}'?)"))
        .unwrap_or_default()
}

/// `--dump-plugin` (printed on stdout): nbdkit's `key=value` lines, with
/// `thread_model` the model of the configured chain, then the plugin's
/// own lines (`extra`).
pub fn dump_plugin(p: &Plugin, thread_model: ThreadModel, extra: Option<&str>) {
    match p {
        Plugin::Builtin(p) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(dump_builtin(p, thread_model).as_bytes());
            if let Some(extra) = extra {
                let _ = out.write_all(extra.as_bytes());
            }
            let _ = out.flush();
        }
        Plugin::C(c) => c.print_dump(),
    }
}

fn dump_builtin(p: &PluginSpec, thread_model: ThreadModel) -> String {
    let mut s = format!(
        "path=(built in)\nname={}\nversion={}\napi_version=2\nmax_thread_model=parallel\nthread_model={}\n",
        p.name,
        crate::NBDKIT_VERSION,
        thread_model.as_str()
    );
    if let Some(k) = p.magic_config_key {
        s.push_str(&format!("magic_config_key={k}\n"));
    }
    for param in p
        .params
        .iter()
        .filter(|p| p.name != nbdkit_backend::registry::ANY_KEY)
    {
        s.push_str(&format!("config_key={}\n", param.name));
    }
    s.push_str(nbdkit_plugins::dump_lines(p.name));
    if p.name == "cc" {
        s.push_str(&crate::cc::dump_lines());
    }
    s
}

/// Split `key=value` parameters; a bare value goes to the magic key.  A
/// plugin without one (nbdkit's language plugins: python, perl, …) takes
/// a bare *first* parameter as `script=`, as nbdkit does, so
/// `nbdkit-rs python plugin.py` works.
fn parse_params(plugin: &Plugin, args: &[String]) -> Result<Vec<(String, String)>> {
    args.iter()
        .enumerate()
        .map(|(i, a)| match a.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) => {
                Ok((k.to_string(), v.to_string()))
            }
            _ => match plugin.magic_config_key() {
                Some(k) => Ok((k.to_string(), a.clone())),
                None if i == 0 && matches!(plugin, Plugin::C(_)) => {
                    Ok(("script".to_string(), a.clone()))
                }
                None if matches!(plugin, Plugin::Builtin(p) if p.params.is_empty()) => {
                    bail!("{}: this plugin does not need command line configuration", plugin.name())
                }
                None => bail!("{}: parameter '{a}' must be written key=value (this plugin has no default key)", plugin.name()),
            },
        })
        .collect()
}

/// Configure each filter (first = outermost) and the plugin, reject
/// parameters nobody knows, and stack the filters over the plugin.
pub fn build(
    plugin: &Plugin,
    filters: &[&'static FilterSpec],
    args: &[String],
) -> Result<Arc<dyn Backend>> {
    let params = parse_params(plugin, args)?;
    let plugin = match plugin {
        Plugin::Builtin(p) => *p,
        Plugin::C(c) => return build_c(c, filters, params),
    };
    // Unknown keys are caught before anything opens files.
    let known: Vec<&str> = plugin
        .params
        .iter()
        .chain(filters.iter().flat_map(|f| f.params.iter()))
        .map(|p| p.name)
        .collect();
    let any_key = plugin
        .params
        .iter()
        .any(|p| p.name == nbdkit_backend::registry::ANY_KEY);
    for (k, _) in &params {
        if !any_key && !known.contains(&k.as_str()) {
            // nbdkit's words for a plugin that takes nothing.
            if plugin.params.is_empty() && filters.is_empty() {
                bail!(
                    "{}: this plugin does not need command line configuration",
                    plugin.name
                );
            }
            bail!(
                "unknown parameter '{k}'{} for plugin '{}'{}; known parameters: {}",
                suggest(k, &known),
                plugin.name,
                if filters.is_empty() {
                    String::new()
                } else {
                    " and its filters".into()
                },
                known.join(", ")
            );
        }
    }
    let mut cfg = Config::new(params);
    let layers = configure_filters(filters, &mut cfg)?;
    let backend = (plugin.create)(&mut cfg).map_err(|e| anyhow!("{e}"))?;
    if let Some(k) = cfg.untaken().first() {
        bail!(
            "parameter '{k}' was given but not used by plugin '{}' or its filters",
            plugin.name
        );
    }
    stack(layers, backend)
}

/// A C plugin takes every parameter the filters did not, in command-line
/// order, through its `config` callback (which rejects what it does not
/// know, with its own message).
fn build_c(
    plugin: &Arc<CPlugin>,
    filters: &[&'static FilterSpec],
    params: Vec<(String, String)>,
) -> Result<Arc<dyn Backend>> {
    let mut cfg = Config::new(params.clone());
    let layers = configure_filters(filters, &mut cfg)?;
    let untaken = cfg.untaken();
    let rest: Vec<(String, String)> = params
        .into_iter()
        .filter(|(k, _)| untaken.contains(&k.as_str()))
        .collect();
    let backend = plugin.configure(&rest)?;
    stack(layers, backend)
}

type Layers = Vec<(&'static str, Box<dyn nbdkit_backend::Layer>)>;

fn configure_filters(filters: &[&'static FilterSpec], cfg: &mut Config) -> Result<Layers> {
    let mut layers = Vec::new();
    for f in filters {
        layers.push((f.name, (f.configure)(cfg).map_err(|e| anyhow!("{e}"))?));
        // A filter's keys are its own: later filters and the plugin do
        // not see them.
        cfg.consume_taken();
    }
    Ok(layers)
}

/// Wrap the plugin in the filters, the first one outermost.
/// Each layer is wrapped as nbdkit's backend layer (see [`crate::layer`]).
fn stack(layers: Layers, backend: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
    // Each layer is called by the filter above it, the top one by the server.
    let caller = |i: usize| match i.checked_sub(1) {
        Some(above) => format!("{} filter", layers[above].0),
        None => "the server".to_string(),
    };
    let mut backend = crate::layer::wrap(backend, &caller(layers.len()));
    let callers: Vec<String> = (0..layers.len()).map(caller).collect();
    for ((name, layer), caller) in layers.into_iter().zip(callers).rev() {
        backend = crate::layer::wrap(
            layer
                .layer(backend)
                .map_err(|e| anyhow!("{name} filter: {e}"))?,
            &caller,
        );
    }
    Ok(backend)
}

/// Record `-D NAME.FLAG=N` flags.  The name must be the plugin's or a
/// filter's.  Returns the plugin's own flags `(FLAG, N)` (a C plugin gets
/// them as its `NAME_debug_FLAG` variables).
pub fn set_debug_flags(
    flags: &[String],
    plugin: &Plugin,
    filters: &[&FilterSpec],
) -> Result<Vec<(String, i64)>> {
    let mut own = Vec::new();
    let mut map = HashMap::new();
    for f in flags {
        let parsed = f.split_once('=').and_then(|(nf, v)| {
            let (n, fl) = nf.split_once('.')?;
            if n.is_empty() || fl.is_empty() {
                return None;
            }
            let v = crate::parse_int(v).ok()? as i64;
            Some((n.to_string(), fl.to_string(), v))
        });
        let Some((name, flag, value)) = parsed else {
            bail!("-D {f}: the flag must have the format NAME.FLAG=N, e.g. -D file.zero=1");
        };
        if name == plugin.name() {
            own.push((flag.clone(), value));
        } else if name != "nbdkit" && !filters.iter().any(|x| x.name == name) {
            tracing::warn!(
                "-D {f} was not used: '{name}' is neither the plugin nor one of the filters"
            );
        }
        map.insert((name, flag), value);
    }
    nbdkit_backend::set_debug_flags(map);
    Ok(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_key_and_unknown_keys() {
        let r = Registry::builtin();
        let p = r.plugin("memory").unwrap();
        assert!(build(&p, &[], &["1M".into()]).is_ok());
        let e = build(&p, &[], &["sise=1M".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("did you mean 'size'"), "{e}");
        let e = r.plugin("fiel").err().unwrap().to_string();
        assert!(e.contains("did you mean 'file'"), "{e}");
        assert!(r.plugin("nbdkit-memory-plugin").is_ok());
    }
}
