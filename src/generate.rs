//! `nbdkit-rs --generate=man|bash|zsh|fish DIR [NAME]`: the manual pages
//! and shell completions, rendered by the binary from its own clap
//! definition and plugin/filter registries.  scripts/install.sh and the
//! Debian package call it on the binary they install, so the pages say
//! exactly what that binary's `--help` says: there is no second copy of
//! the text to drift.
//!
//! Pages: `nbdkit-rs.1`, and one `nbdkit-rs-NAME-plugin.1` or
//! `nbdkit-rs-NAME-filter.1` per registered plugin and filter (nbdkit's
//! naming, with our prefix so both can be installed side by side), built
//! from the `PluginSpec`/`FilterSpec` text that `PLUGIN --help` prints.
//! Completions: clap_complete's scripts for a copy of the command line
//! whose plugin argument and `--filter` values are the registry's names.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::builder::PossibleValuesParser;
use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::aot::Shell;
use nbdkit_backend::registry::ANY_KEY;
use nbdkit_backend::Param;
use roff::{bold, italic, roman, Roff};

use crate::chain::Registry;
use crate::cli::Cli;

/// What the hidden `--generate` option writes into `dir`.  `name` is
/// the command the completions are for (`nbdkit` when nbdkit-rs is
/// installed under nbdkit's name too); pages are always nbdkit-rs's.
pub fn run(what: &str, dir: &Path, name: Option<&str>, registry: &Registry) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |file: &str, text: &[u8]| {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    if what == "man" {
        write("nbdkit-rs.1", main_page(registry).as_bytes())?;
        for p in &registry.plugins {
            let page = spec_page(
                p.name,
                "plugin",
                p.summary,
                p.description,
                p.params,
                p.magic_config_key,
            );
            write(&format!("nbdkit-rs-{}-plugin.1", p.name), page.as_bytes())?;
        }
        for f in &registry.filters {
            let page = spec_page(f.name, "filter", f.summary, f.description, f.params, None);
            write(&format!("nbdkit-rs-{}-filter.1", f.name), page.as_bytes())?;
        }
        return Ok(());
    }
    let shell: Shell = match what.parse() {
        Ok(s @ (Shell::Bash | Shell::Zsh | Shell::Fish)) => s,
        _ => bail!("--generate={what}: expected man, bash, zsh or fish"),
    };
    let name = name.unwrap_or("nbdkit-rs");
    let mut text = Vec::new();
    clap_complete::aot::generate(shell, &mut completion_command(registry), name, &mut text);
    if shell == Shell::Bash {
        // The function clap_complete registered (its name is mangled).
        let script = String::from_utf8_lossy(&text);
        let func = script
            .split("complete -F ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string);
        let Some(func) = func else {
            bail!("clap_complete's bash script registers no function");
        };
        text.extend_from_slice(bash_equals_wrapper(name, &func).as_bytes());
    }
    if shell == Shell::Fish {
        // clap_complete's fish script completes option values only; a
        // plugin name is offered until one is on the line.
        let plugins: Vec<&str> = registry.plugins.iter().map(|p| p.name).collect();
        let plugins = plugins.join(" ");
        text.extend_from_slice(
            format!(
                "complete -c {name} -f -n 'not __fish_seen_subcommand_from {plugins}' -a '{plugins}' -d plugin\n"
            )
            .as_bytes(),
        );
    }
    // The file names each shell looks for under its completion directory.
    let file = match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    };
    write(&file, &text)
}

/// bash splits `--filter=xz` at the `=` (it is in COMP_WORDBREAKS), and
/// clap_complete's function then sees `=` as the previous word: this
/// wrapper hands it the option before the `=` instead, so `--filter=`
/// completes filter names as `--filter ` does.
fn bash_equals_wrapper(name: &str, func: &str) -> String {
    let wrapper = format!("_{}_equals", name.replace('-', "_"));
    format!(
        r#"
# nbdkit-rs: complete the value after `--option=` like after `--option `.
{wrapper}() {{
    if [[ ${{COMP_CWORD}} -ge 2 && ${{COMP_WORDS[COMP_CWORD]}} == "=" ]]; then
        {func} "$1" "" "${{COMP_WORDS[COMP_CWORD-1]}}"
    elif [[ ${{COMP_CWORD}} -ge 3 && ${{COMP_WORDS[COMP_CWORD-1]}} == "=" ]]; then
        {func} "$1" "$2" "${{COMP_WORDS[COMP_CWORD-2]}}"
    else
        {func} "$@"
    fi
}}
complete -F {wrapper} -o bashdefault -o default {name}
"#
    )
}

/// The command line as the shells should see it: the real options (from
/// the clap definition), `--filter` limited to the registered filters,
/// and a first positional argument that is a plugin name.  The parser the
/// server uses keeps free-form names (C plugins are paths or names found
/// at run time, and an unknown name gets a "did you mean" message), so
/// this copy exists only for completion.
fn completion_command(registry: &Registry) -> Command {
    let cli = Cli::command();
    let mut cmd = Command::new("nbdkit-rs")
        .about("a pluggable NBD (Network Block Device) server")
        .disable_help_flag(true)
        .disable_version_flag(true);
    for arg in cli.get_arguments() {
        if arg.is_positional() || arg.is_hide_set() {
            continue;
        }
        let mut arg = arg.clone();
        match arg.get_id().as_str() {
            "filters" => {
                let names: Vec<&str> = registry.filters.iter().map(|f| f.name).collect();
                arg = arg.value_parser(PossibleValuesParser::new(names));
            }
            "log" => arg = arg.value_parser(["stderr", "syslog", "null"]),
            "tls" => arg = arg.value_parser(["off", "on", "require"]),
            _ => {}
        }
        cmd = cmd.arg(arg);
    }
    let plugins: Vec<&str> = registry.plugins.iter().map(|p| p.name).collect();
    cmd.arg(
        Arg::new("plugin")
            .value_name("PLUGIN")
            .index(1)
            .value_parser(PossibleValuesParser::new(plugins)),
    )
    .arg(
        Arg::new("params")
            .value_name("key=value")
            .index(2)
            .action(ArgAction::Append)
            .num_args(0..),
    )
}

/// `nbdkit-rs(1)`: clap_mangen's rendering of the options, then the
/// plugins and filters with their one-line summaries.
fn main_page(registry: &Registry) -> String {
    let cmd = Cli::command()
        .about("a pluggable NBD (Network Block Device) server")
        .long_about(
            "nbdkit-rs serves a block device over NBD. A plugin is the data source (a file, \
             memory, a URL, ...); filters stack on top of it and change requests (decompress, \
             log, ...). The first --filter is nearest the client. The command line is \
             nbdkit's: options, filters, a plugin name, then the plugin's and filters' \
             key=value parameters; a bare value goes to the plugin's magic key.",
        )
        .version(crate::VERSION);
    let man = clap_mangen::Man::new(cmd)
        .title("NBDKIT-RS")
        .source(format!("nbdkit-rs {}", crate::VERSION))
        .manual("nbdkit-rs");
    let mut out = Vec::new();
    man.render(&mut out)
        .expect("rendering into a Vec cannot fail");
    let mut r = Roff::new();
    // Page names are long and hyphenated already: breaking them again
    // at hyphenation points makes them unsearchable.
    r.control("nh", []);
    r.control("SH", ["PLUGINS"]);
    r.text([roman(
        "nbdkit-rs PLUGIN --help lists a plugin's parameters. Besides these, a path to one \
         of nbdkit's C plugins (nbdkit-NAME-plugin.so), or NAME when that file is in \
         nbdkit's plugin directory, loads it.",
    )]);
    for p in &registry.plugins {
        r.control("TP", []);
        r.text([bold(p.name)]);
        r.text([roman(p.summary)]);
    }
    r.control("SH", ["FILTERS"]);
    r.text([roman(
        "nbdkit-rs --filter=FILTER PLUGIN --help lists a filter's parameters.",
    )]);
    for f in &registry.filters {
        r.control("TP", []);
        r.text([bold(f.name)]);
        r.text([roman(f.summary)]);
    }
    r.control("SH", ["SEE ALSO"]);
    r.control("ad", ["l"]);
    let mut refs: Vec<String> = registry
        .plugins
        .iter()
        .map(|p| format!("nbdkit-rs-{}-plugin", p.name))
        .chain(
            registry
                .filters
                .iter()
                .map(|f| format!("nbdkit-rs-{}-filter", f.name)),
        )
        .collect();
    refs.push("nbdkit".into());
    see_also(&mut r, &refs);
    let mut page = String::from_utf8(out).expect("clap_mangen writes UTF-8");
    // render() repeats the apostrophe string definition clap_mangen's
    // page starts with: harmless, and apostrophes print as apostrophes.
    page.push_str(&r.render());
    page
}

/// One plugin's or filter's page: the same summary, description and
/// parameter list as its `--help`.
fn spec_page(
    name: &str,
    what: &str,
    summary: &str,
    description: &str,
    params: &[Param],
    magic_key: Option<&str>,
) -> String {
    let page = format!("nbdkit-rs-{name}-{what}");
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            page.to_uppercase().as_str(),
            "1",
            "",
            &format!("nbdkit-rs {}", crate::VERSION),
            "nbdkit-rs",
        ],
    );
    r.control("nh", []);
    r.control("SH", ["NAME"]);
    r.text([roman(format!("{page} - {summary}"))]);
    r.control("SH", ["SYNOPSIS"]);
    match what {
        "plugin" => r.text([
            bold("nbdkit-rs"),
            roman(" ["),
            italic("OPTIONS"),
            roman("] [--filter="),
            italic("FILTER"),
            roman("]... "),
            bold(name),
            roman(" ["),
            italic("key=value"),
            roman("]..."),
        ]),
        _ => r.text([
            bold("nbdkit-rs"),
            roman(" ["),
            italic("OPTIONS"),
            roman("] "),
            bold(format!("--filter={name}")),
            roman(" "),
            italic("PLUGIN"),
            roman(" ["),
            italic("key=value"),
            roman("]..."),
        ]),
    };
    r.control("SH", ["DESCRIPTION"]);
    description_roff(&mut r, description);
    if !params.is_empty() {
        r.control("SH", ["PARAMETERS"]);
        for p in params {
            r.control("TP", []);
            if p.name == ANY_KEY {
                r.text([italic("KEY"), bold("="), italic("VALUE")]);
            } else {
                r.text([bold(format!("{}=", p.name))]);
            }
            r.text([roman(p.help)]);
        }
        if let Some(key) = magic_key {
            r.control("PP", []);
            r.text([roman(format!(
                "A bare value (without key=) means {key}=value."
            ))]);
        }
    }
    r.control("SH", ["SEE ALSO"]);
    see_also(&mut r, &["nbdkit-rs".to_string()]);
    r.render()
}

/// The spec descriptions are plain text: paragraphs split by blank
/// lines, and lines indented by two spaces (examples) kept as they are.
fn description_roff(r: &mut Roff, description: &str) {
    let mut para: Vec<&str> = Vec::new();
    let mut literal: Vec<&str> = Vec::new();
    let flush_para = |r: &mut Roff, para: &mut Vec<&str>| {
        if !para.is_empty() {
            r.control("PP", []);
            r.text([roman(para.join(" "))]);
            para.clear();
        }
    };
    let flush_literal = |r: &mut Roff, literal: &mut Vec<&str>| {
        if !literal.is_empty() {
            r.control("RS", ["2"]);
            r.control("nf", []);
            for l in literal.iter() {
                r.text([roman(*l)]);
            }
            r.control("fi", []);
            r.control("RE", []);
            literal.clear();
        }
    };
    for line in description.trim_end().lines() {
        if line.trim().is_empty() {
            flush_para(r, &mut para);
            flush_literal(r, &mut literal);
        } else if let Some(l) = line.strip_prefix("  ") {
            flush_para(r, &mut para);
            literal.push(l.trim_end());
        } else {
            flush_literal(r, &mut literal);
            para.push(line.trim());
        }
    }
    flush_para(r, &mut para);
    flush_literal(r, &mut literal);
}

fn see_also(r: &mut Roff, pages: &[String]) {
    let mut inlines = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        inlines.push(bold(p.as_str()));
        inlines.push(roman("(1)"));
    }
    r.text(inlines);
}
