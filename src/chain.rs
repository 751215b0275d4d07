//! Finding plugins and filters by name, handing each its parameters, and
//! stacking the filters over the plugin.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use nbdkit_backend::{Backend, Config, FilterSpec, Param, PluginSpec};

/// The plugins and filters this binary knows.
pub struct Registry {
    pub plugins: Vec<&'static PluginSpec>,
    pub filters: Vec<&'static FilterSpec>,
}

impl Registry {
    pub fn builtin() -> Self {
        let mut plugins = nbdkit_plugins::all();
        plugins.extend([&XZ_PLUGIN, &GZIP_PLUGIN, &ZSTD_PLUGIN, &BZIP2_PLUGIN]);
        Registry {
            plugins,
            filters: nbdkit_filters::all(),
        }
    }

    pub fn plugin(&self, name: &str) -> Result<&'static PluginSpec> {
        if name.contains('/') || name.ends_with(".so") {
            bail!("{name}: loading plugins from shared libraries is not supported yet; built-in plugins: {}", self.plugin_names());
        }
        // nbdkit accepts "nbdkit-file-plugin" style names too.
        let short = name
            .strip_prefix("nbdkit-")
            .and_then(|n| n.strip_suffix("-plugin"))
            .unwrap_or(name);
        self.plugins
            .iter()
            .copied()
            .find(|p| p.name == short)
            .ok_or_else(|| {
                let names: Vec<&str> = self.plugins.iter().map(|p| p.name).collect();
                anyhow!(
                    "unknown plugin '{name}'{}; available plugins: {}",
                    suggest(name, &names),
                    names.join(", ")
                )
            })
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
                anyhow!(
                    "unknown filter '{name}'{}; available filters: {}",
                    suggest(name, &names),
                    names.join(", ")
                )
            })
    }

    fn plugin_names(&self) -> String {
        self.plugins
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
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
        s.push_str("\nFilters (nbdkit-rs --filter=FILTER PLUGIN --help):\n");
        for f in &self.filters {
            s.push_str(&format!("  {:<12} {}\n", f.name, f.summary));
        }
        s
    }

    pub fn dump_config(&self) -> String {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let (major, minor) = {
            let mut it = crate::VERSION.split('.');
            (
                it.next().unwrap_or("0").to_string(),
                it.next().unwrap_or("0").to_string(),
            )
        };
        format!(
            "binary={exe}\nexit_with_parent=yes\nfilters={}\nhost_cpu={}\nhost_os={}\nplugins={}\nroot_tls_certificates_dir=/etc/pki/nbdkit\nrust=yes\ntls=yes\nversion={}\nversion_major={major}\nversion_minor={minor}\n",
            self.filters.iter().map(|f| f.name).collect::<Vec<_>>().join(","),
            std::env::consts::ARCH,
            std::env::consts::OS,
            self.plugins.iter().map(|p| p.name).collect::<Vec<_>>().join(","),
            crate::VERSION,
        )
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

/// `file=` followed by the filter's own parameters (`M` = `N` + 1).
const fn with_file<const N: usize, const M: usize>(rest: [Param; N]) -> [Param; M] {
    let mut out = [Param {
        name: "file",
        help: "the compressed file (the magic key)",
    }; M];
    let mut i = 0;
    while i < N {
        out[i + 1] = rest[i];
        i += 1;
    }
    out
}

use nbdkit_filters::compressed as cz;
const XZ_PLUGIN_PARAMS: [Param; 6] = with_file(cz::XZ_PARAMS);
const GZIP_PLUGIN_PARAMS: [Param; 8] = with_file(cz::GZIP_PARAMS);
const ZSTD_PLUGIN_PARAMS: [Param; 4] = with_file(cz::ZSTD_PARAMS);
const BZIP2_PLUGIN_PARAMS: [Param; 4] = with_file(cz::BZIP2_PARAMS);
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

pub fn dump_plugin(p: &PluginSpec) -> String {
    let mut s = format!(
        "path=(built in)\nname={}\nversion={}\napi_version=2\nmax_thread_model=parallel\n",
        p.name,
        crate::VERSION
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
    s
}

/// Split `key=value` parameters; a bare value goes to the magic key.
fn parse_params(plugin: &PluginSpec, args: &[String]) -> Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) => {
                Ok((k.to_string(), v.to_string()))
            }
            _ => match plugin.magic_config_key {
                Some(k) => Ok((k.to_string(), a.clone())),
                None => bail!("{}: parameter '{a}' must be written key=value (this plugin has no default key)", plugin.name),
            },
        })
        .collect()
}

/// Configure each filter (first = outermost) and the plugin, reject
/// parameters nobody knows, and stack the filters over the plugin.
pub fn build(
    plugin: &'static PluginSpec,
    filters: &[&'static FilterSpec],
    args: &[String],
) -> Result<Arc<dyn Backend>> {
    let params = parse_params(plugin, args)?;
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
    let mut layers = Vec::new();
    for f in filters {
        layers.push((f.name, (f.configure)(&mut cfg).map_err(|e| anyhow!("{e}"))?));
    }
    let mut backend = (plugin.create)(&mut cfg).map_err(|e| anyhow!("{e}"))?;
    if let Some(k) = cfg.untaken().first() {
        bail!(
            "parameter '{k}' was given but not used by plugin '{}' or its filters",
            plugin.name
        );
    }
    for (name, layer) in layers.into_iter().rev() {
        backend = layer
            .layer(backend)
            .map_err(|e| anyhow!("{name} filter: {e}"))?;
    }
    Ok(backend)
}

/// Record `-D NAME.FLAG=N` flags.  The name must be the plugin's or a
/// filter's.
pub fn set_debug_flags(
    flags: &[String],
    plugin: &PluginSpec,
    filters: &[&FilterSpec],
) -> Result<()> {
    let mut map = HashMap::new();
    for f in flags {
        let parsed = f.split_once('=').and_then(|(nf, v)| {
            let (n, fl) = nf.split_once('.')?;
            let v = crate::parse_int(v).ok()? as i64;
            Some((n.to_string(), fl.to_string(), v))
        });
        let Some((name, flag, value)) = parsed else {
            bail!("-D {f}: expected NAME.FLAG=N, e.g. -D file.zero=1");
        };
        if name != plugin.name && name != "nbdkit" && !filters.iter().any(|x| x.name == name) {
            tracing::warn!("-D {f}: '{name}' is not the plugin or one of the filters; ignored");
        }
        map.insert((name, flag), value);
    }
    nbdkit_backend::set_debug_flags(map);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_key_and_unknown_keys() {
        let r = Registry::builtin();
        let p = r.plugin("memory").unwrap();
        assert!(build(p, &[], &["1M".into()]).is_ok());
        let e = build(p, &[], &["sise=1M".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("did you mean 'size'"), "{e}");
        let e = r.plugin("fiel").err().unwrap().to_string();
        assert!(e.contains("did you mean 'file'"), "{e}");
        assert!(r.plugin("nbdkit-memory-plugin").is_ok());
    }
}
