//! How plugins and filters describe themselves to the command line: name,
//! help text, parameters, and a constructor.

use std::sync::Arc;

use crate::{Backend, Config, ConfigError};

/// A `Param` with this name means the plugin accepts any key (the `sh`
/// plugin hands unknown keys to its script); `--help` shows it as
/// `KEY=VALUE`.
pub const ANY_KEY: &str = "*";

/// One `key=value` parameter, for `--help` and for rejecting unknown keys.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub help: &'static str,
}

/// `a` followed by `b`: one parameter list made of a run that several
/// plugins or filters share and their own (`M` = both lengths, checked
/// at compile time).
pub const fn concat_params<const M: usize>(a: &[Param], b: &[Param]) -> [Param; M] {
    assert!(a.len() + b.len() == M, "concat_params: M is not the sum");
    let mut out = [Param { name: "", help: "" }; M];
    let mut i = 0;
    while i < M {
        out[i] = if i < a.len() { a[i] } else { b[i - a.len()] };
        i += 1;
    }
    out
}

/// A plugin the command line can name.
pub struct PluginSpec {
    pub name: &'static str,
    /// One line for listings.
    pub summary: &'static str,
    /// Longer help: what it serves, and an example command.
    pub description: &'static str,
    /// The key a bare value means (`file disk.img` = `file file=disk.img`).
    pub magic_config_key: Option<&'static str>,
    pub params: &'static [Param],
    /// Build the plugin from its parameters (taking them from `config`).
    /// No threads may be started here (the server may fork afterwards).
    pub create: fn(&mut Config) -> Result<Arc<dyn Backend>, ConfigError>,
}

/// A filter the command line can name with `--filter=NAME`.
pub struct FilterSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    pub params: &'static [Param],
    /// Read the filter's parameters; the returned layer wraps the next
    /// backend once that exists.
    pub configure: fn(&mut Config) -> Result<Box<dyn Layer>, ConfigError>,
}

/// A configured filter waiting for the backend it will wrap (as tower's
/// `Layer` wraps a `Service`).
pub trait Layer: Send {
    fn layer(self: Box<Self>, next: Arc<dyn Backend>) -> Result<Arc<dyn Backend>, ConfigError>;
}

/// A layer that is a function of the backend it wraps, as tower's
/// `layer_fn`: `layer_fn(|next| Ok(Arc::new(MyFilter { next })))`.
pub fn layer_fn<F>(f: F) -> Box<dyn Layer>
where
    F: FnOnce(Arc<dyn Backend>) -> Result<Arc<dyn Backend>, ConfigError> + Send + 'static,
{
    struct LayerFn<F>(F);
    impl<F> Layer for LayerFn<F>
    where
        F: FnOnce(Arc<dyn Backend>) -> Result<Arc<dyn Backend>, ConfigError> + Send,
    {
        fn layer(self: Box<Self>, next: Arc<dyn Backend>) -> Result<Arc<dyn Backend>, ConfigError> {
            (self.0)(next)
        }
    }
    Box::new(LayerFn(f))
}

impl PluginSpec {
    /// `--help` text for this plugin.
    pub fn help_text(&self) -> String {
        help_text(
            self.name,
            "plugin",
            self.summary,
            self.description,
            self.params,
        )
    }
}

impl FilterSpec {
    pub fn help_text(&self) -> String {
        help_text(
            self.name,
            "filter",
            self.summary,
            self.description,
            self.params,
        )
    }
}

fn help_text(name: &str, what: &str, summary: &str, description: &str, params: &[Param]) -> String {
    let mut s = format!("{name} {what}: {summary}\n\n{}\n", description.trim_end());
    if !params.is_empty() {
        s.push_str("\nParameters:\n");
        for p in params {
            let key = if p.name == ANY_KEY {
                "KEY=VALUE".to_string()
            } else {
                format!("{}=", p.name)
            };
            s.push_str(&format!("  {key:<18} {}\n", p.help));
        }
    }
    s
}
