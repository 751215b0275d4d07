//! docs/plugins.md cannot drift from the binary: every plugin and filter
//! the binary registers (as `--dump-config` lists them) has a section
//! there, and every parameter its `--help` lists is named in that section
//! (the man pages are generated from the same `--help` text, see
//! tests/install.rs).

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;

/// docs/plugins.md's `### a, b (alias c)` sections: each name → its text.
fn sections() -> BTreeMap<String, String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/plugins.md")).unwrap();
    let mut out = BTreeMap::new();
    for part in text.split("\n### ").skip(1) {
        let (title, body) = part.split_once('\n').unwrap_or((part, ""));
        let body = body.split("\n## ").next().unwrap_or("");
        for name in title
            .split(|c: char| c == ',' || c == '(' || c == ')' || c.is_whitespace())
            .filter(|w| !w.is_empty() && *w != "alias")
        {
            out.entry(name.to_string())
                .or_insert_with(String::new)
                .push_str(body);
        }
    }
    out
}

fn registered(kind: &str) -> Vec<String> {
    let dump = stdout_of(Command::new(binary()).arg("--dump-config"));
    dump.lines()
        .find_map(|l| l.strip_prefix(&format!("{kind}=")))
        .unwrap_or_else(|| panic!("--dump-config has no {kind}="))
        .split(',')
        .map(String::from)
        .collect()
}

/// The parameter names in `--help` output: lines `  name=…` or `  name  …`
/// under the parameter list.
fn params(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split(['=', ' ']).next())
        .filter(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && w.contains(|c: char| c.is_ascii_lowercase() || c.is_ascii_uppercase())
        })
        .map(String::from)
        .collect()
}

#[test]
fn every_plugin_and_filter_has_a_section_naming_its_parameters() {
    let docs = sections();
    // The compressed filters' shared parameters are documented once, as
    // FMT-cache-size and so on, in compressed-images.md.
    let compressed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/compressed-images.md"
    ))
    .unwrap();
    let null_params = params(&stdout_of(Command::new(binary()).args(["null", "--help"])));
    let mut missing = Vec::new();
    for (kind, args) in [("plugins", vec![]), ("filters", vec!["null"])] {
        for name in registered(kind) {
            let Some(body) = docs.get(&name) else {
                missing.push(format!("{kind}: {name} has no ### section"));
                continue;
            };
            let help = if kind == "plugins" {
                stdout_of(Command::new(binary()).arg(&name).arg("--help"))
            } else {
                stdout_of(
                    Command::new(binary())
                        .arg(format!("--filter={name}"))
                        .args(&args)
                        .arg("--help"),
                )
            };
            for p in params(&help) {
                let generic = p
                    .split_once('-')
                    .map(|(_, rest)| format!("FMT-{rest}"))
                    .unwrap_or_default();
                // error-pread-rate is documented as error-OP-rate, and
                // unix_socket_path as its spelling with dashes.
                let by_op = [
                    "pread", "pwrite", "trim", "zero", "extents", "cache", "flush",
                ]
                .iter()
                .any(|op| p.contains(op) && body.contains(&p.replacen(op, "OP", 1)));
                let documented = body.contains(&p)
                    || by_op
                    || body.contains(&p.replace('_', "-"))
                    || compressed.contains(&p)
                    || (!generic.is_empty() && compressed.contains(&generic));
                // `KEY` stands for any parameter; a filter's --help also
                // shows the null plugin's.
                let placeholder = p == "KEY" || (kind == "filters" && null_params.contains(&p));
                if p.len() > 2 && !documented && !placeholder {
                    missing.push(format!(
                        "{kind}: {name}: parameter {p} is not in its section"
                    ));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/plugins.md is behind the binary:\n{}",
        missing.join("\n")
    );
}
