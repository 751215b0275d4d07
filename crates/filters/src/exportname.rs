//! `exportname`: change the export list a client sees, which export the
//! default name `""` means, whether unlisted names may be opened, and
//! the descriptions sent with export names.

use std::process::Command;
use std::sync::Arc;

use nbdkit_backend::{
    layer_fn, Backend, Config, ConfigError, Error, ErrorKind, ExportEntry, FilterSpec, Handle,
    Layer, Param, Result,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListMode {
    Keep,
    Error,
    Empty,
    DefaultOnly,
    Explicit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DescMode {
    Keep,
    None,
    Fixed(String),
    Script(String),
}

#[derive(Debug, Clone)]
struct Settings {
    default_export: Option<String>,
    list: ListMode,
    strict: bool,
    exports: Vec<String>,
    desc: DescMode,
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let default_export = c.take("default-export").filter(|s| !s.is_empty());
    let list = match c.take("exportname-list").as_deref() {
        None | Some("keep") => ListMode::Keep,
        Some("error") => ListMode::Error,
        Some("empty") => ListMode::Empty,
        Some("defaultonly") => ListMode::DefaultOnly,
        Some("explicit") => ListMode::Explicit,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "exportname-list={v}: expected keep, error, empty, defaultonly or explicit"
            )))
        }
    };
    let strict = c.take_bool("exportname-strict")?.unwrap_or(false);
    let exports = c.take_all("exportname");
    let desc = match c.take("exportdesc") {
        None => DescMode::Keep,
        Some(v) => match v.as_str() {
            "keep" => DescMode::Keep,
            "none" => DescMode::None,
            _ => {
                if let Some(s) = v.strip_prefix("fixed:") {
                    DescMode::Fixed(s.to_string())
                } else if let Some(s) = v.strip_prefix("script:") {
                    DescMode::Script(s.to_string())
                } else {
                    return Err(ConfigError::new(format!(
                        "exportdesc={v}: expected keep, none, fixed:STRING or script:SCRIPT"
                    )));
                }
            }
        },
    };
    let s = Arc::new(Settings {
        default_export,
        list,
        strict,
        exports,
        desc,
    });
    Ok(layer_fn(move |next| Ok(Arc::new(ExportName { next, s }))))
}

struct ExportName {
    next: Arc<dyn Backend>,
    s: Arc<Settings>,
}

impl Settings {
    /// The description to send for `name`, given the plugin's `keep`.
    fn describe(&self, name: &str, keep: Option<String>) -> Result<Option<String>> {
        match &self.desc {
            DescMode::Keep => Ok(keep),
            DescMode::None => Ok(None),
            DescMode::Fixed(s) => Ok(Some(s.clone())),
            DescMode::Script(script) => {
                let out = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(script)
                    .env("name", name)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| Error::from_io("exportname: exportdesc script", e))?;
                if !out.status.success() {
                    return Err(Error::io(format!(
                        "exportname: exportdesc script failed ({})",
                        out.status
                    )));
                }
                let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
                while s.ends_with('\n') {
                    s.pop();
                }
                Ok(Some(s))
            }
        }
    }
}

impl Backend for ExportName {
    fn name(&self) -> &str {
        "exportname"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        let source = match self.s.list {
            ListMode::Keep => self.next.list_exports(readonly)?,
            ListMode::Error => {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "exportname: export list restricted by policy (exportname-list=error)",
                ))
            }
            ListMode::Empty => return Ok(Vec::new()),
            ListMode::DefaultOnly => {
                // The name as the plugin resolves it (or default-export=).
                let name = match &self.s.default_export {
                    Some(d) => d.clone(),
                    None => self.next.default_export(readonly)?,
                };
                return Ok(vec![ExportEntry {
                    name,
                    description: None,
                }]);
            }
            ListMode::Explicit => self
                .s
                .exports
                .iter()
                .map(|n| ExportEntry {
                    name: n.clone(),
                    description: None,
                })
                .collect(),
        };
        source
            .into_iter()
            .map(|e| {
                let description = self.s.describe(&e.name, e.description)?;
                Ok(ExportEntry {
                    name: e.name,
                    description,
                })
            })
            .collect()
    }
    fn default_export(&self, readonly: bool) -> Result<String> {
        if self.s.strict {
            // "" may be used only when it is listed.
            if self.s.exports.iter().any(|n| n.is_empty()) {
                return Ok(self.s.default_export.clone().unwrap_or_default());
            }
            return Err(Error::invalid(
                "exportname: the default export \"\" is not allowed (exportname-strict)",
            ));
        }
        // Without default-export= the filter's own answer is "" (as
        // nbdkit's): the client sees "", and the layer below resolves ""
        // by its own default_export when it is opened.
        let _ = readonly;
        Ok(self.s.default_export.clone().unwrap_or_default())
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        if self.s.strict && !self.s.exports.iter().any(|n| n == export) {
            return Err(Error::invalid(format!(
                "exportname: export '{export}' not found (exportname-strict)"
            )));
        }
        let name = match (&self.s.default_export, export.is_empty()) {
            (Some(d), true) => d.clone(),
            _ => export.to_string(),
        };
        let next = self.next.open(readonly, &name)?;
        Ok(Box::new(ExportNameHandle {
            next,
            name,
            s: self.s.clone(),
        }))
    }
}

struct ExportNameHandle {
    next: Box<dyn Handle>,
    name: String,
    s: Arc<Settings>,
}

impl Handle for ExportNameHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn export_description(&self) -> Result<Option<String>> {
        let keep = match self.s.desc {
            DescMode::Keep => self.next.export_description()?,
            _ => None,
        };
        self.s.describe(&self.name, keep)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "exportname",
    summary: "change the export list, the default export and export descriptions",
    description:
        "Examples:\n  nbdkit-rs --filter=exportname file dir=/srv/disks default-export=file2\n  \
nbdkit-rs --filter=exportname file dir=/srv/disks exportname-list=explicit \\\n    \
exportname-strict=true exportname=file1 exportname=file3",
    params: &[
        Param {
            name: "default-export",
            help: "NAME: open this export when the client asks for \"\"",
        },
        Param {
            name: "exportname-list",
            help: "keep|error|empty|defaultonly|explicit: what NBD_OPT_LIST shows (default keep)",
        },
        Param {
            name: "exportname-strict",
            help: "BOOL: refuse export names not given with exportname= (default false)",
        },
        Param {
            name: "exportname",
            help: "NAME: an export to list (explicit) or allow (strict); repeatable",
        },
        Param {
            name: "exportdesc",
            help: "keep|none|fixed:STRING|script:SCRIPT: export descriptions (default keep)",
        },
    ],
    configure,
};
