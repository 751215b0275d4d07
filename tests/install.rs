//! Installing nbdkit-rs: scripts/install.sh into a temporary prefix (the
//! binary, the `nbdkit` alias, manual pages, completions, systemd units)
//! and scripts/deb.sh's Debian package, checked with the tools that will
//! read them: `man`, `bash`, `dpkg-deb`, and the installed binary itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// scripts/install.sh --as-nbdkit of the binary under test into `prefix`.
fn install(prefix: &Path) {
    run(Command::new(Path::new(ROOT).join("scripts/install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .arg("--binary")
        .arg(binary())
        .arg("--as-nbdkit"));
}

/// The registered plugins and filters, as the binary lists them.
fn registered(bin: &Path) -> (Vec<String>, Vec<String>) {
    let config = stdout(Command::new(bin).arg("--dump-config"));
    let list = |key: &str| -> Vec<String> {
        let line = config
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in --dump-config"));
        line.split(',').map(str::to_string).collect()
    };
    (list("plugins="), list("filters="))
}

/// `man -l` output of a page as plain ASCII on one long line per
/// paragraph (no wrapping, so no hyphenation), and its warnings.
fn man(page: &Path, width: &str) -> (String, String) {
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANWIDTH", width)
        .env("LC_ALL", "C.UTF-8")
        .env("MAN_KEEP_FORMATTING", "")
        .env_remove("MANPAGER")
        .env_remove("PAGER")
        .output()
        .expect("man");
    assert!(out.status.success(), "man -l {}", page.display());
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn install_sh_installs_a_working_binary_and_an_nbdkit_alias() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let bin = prefix.join("bin/nbdkit-rs");
    let alias = prefix.join("bin/nbdkit");
    assert_eq!(
        std::fs::read_link(&alias).unwrap(),
        PathBuf::from("nbdkit-rs"),
        "nbdkit is a relative link to nbdkit-rs"
    );
    let version = stdout(Command::new(&bin).arg("--version"));
    assert!(
        version.starts_with("nbdkit 1.32.5 (nbdkit-rs "),
        "{version}"
    );
    // The name it is run as changes nothing.
    for args in [
        &["--version"][..],
        &["--help"],
        &["--long-options"],
        &["memory", "--dump-plugin"],
    ] {
        assert_eq!(
            stdout(Command::new(&alias).args(args)),
            stdout(Command::new(&bin).args(args)),
            "nbdkit {args:?}"
        );
    }
    // --dump-config names where it is installed (through the link).
    let config = stdout(Command::new(&alias).arg("--dump-config"));
    assert!(
        config.contains(&format!("bindir={}\n", prefix.join("bin").display())),
        "{config}"
    );
    assert!(
        config.contains(&format!("mandir={}\n", prefix.join("share/man").display())),
        "{config}"
    );
    if have("nbdinfo") {
        let size = stdout(Command::new(&alias).args([
            "-U",
            "-",
            "memory",
            "1M",
            "--run",
            "nbdinfo --size \"$uri\"",
        ]));
        assert_eq!(size.trim(), "1048576");
    }
    // The units start the binary of this prefix.
    let service =
        std::fs::read_to_string(prefix.join("lib/systemd/system/nbdkit-rs@.service")).unwrap();
    assert!(
        service.contains(&format!("ExecStart={} ", bin.display())),
        "{service}"
    );
    assert!(prefix
        .join("lib/systemd/system/nbdkit-rs@.socket")
        .is_file());
    assert!(prefix.join("share/doc/nbdkit-rs/systemd.md").is_file());
}

#[test]
fn every_plugin_and_filter_has_a_man_page_that_renders_without_warnings() {
    if !have("man") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let bin = prefix.join("bin/nbdkit-rs");
    let mandir = prefix.join("share/man/man1");
    let (plugins, filters) = registered(&bin);
    assert!(plugins.len() > 10 && filters.len() > 10);

    let (main, warnings) = man(&mandir.join("nbdkit-rs.1"), "80");
    assert_eq!(warnings, "", "nbdkit-rs.1");
    for want in [
        "--filter",
        "--readonly",
        "SEE ALSO",
        "nbdkit-rs-xz-filter(1)",
    ] {
        assert!(main.contains(want), "nbdkit-rs(1) lacks {want}:\n{main}");
    }

    let pages = plugins
        .iter()
        .map(|p| (p, format!("nbdkit-rs-{p}-plugin.1"), vec![p.as_str()]))
        .chain(filters.iter().map(|f| {
            (
                f,
                format!("nbdkit-rs-{f}-filter.1"),
                vec!["--filter", f.as_str(), "null"],
            )
        }));
    for (name, file, help_args) in pages {
        let page = mandir.join(&file);
        assert!(page.is_file(), "{file} is missing");
        let (_, warnings) = man(&page, "80");
        assert_eq!(warnings, "", "{file} renders with warnings");
        // The page says what --help says: its summary, and every
        // parameter's help, word for word.
        let (text, _) = man(&page, "1000");
        let text = squash(&text);
        let mut help_args = help_args;
        help_args.push("--help");
        let help = stdout(Command::new(&bin).args(&help_args));
        // With --filter, --help shows the plugin first, then the filter.
        let own = help
            .split("\n\n")
            .skip_while(|s| !s.starts_with(&format!("{name} ")))
            .collect::<Vec<_>>()
            .join("\n\n");
        let summary = own.lines().next().unwrap().split_once(": ").unwrap().1;
        assert!(
            text.contains(&squash(summary)),
            "{file} lacks the --help summary {summary:?}:\n{text}"
        );
        if let Some(params) = own.split("\nParameters:\n").nth(1) {
            for line in params.lines().take_while(|l| l.starts_with("  ")) {
                let (key, what) = line.trim().split_once(' ').unwrap();
                assert!(text.contains(key), "{file} lacks parameter {key}");
                assert!(
                    text.contains(&squash(what)),
                    "{file} lacks the help of {key}: {what:?}"
                );
            }
        }
    }
}

#[test]
fn completions_are_installed_and_complete_plugins_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let share = prefix.join("share");
    for name in ["nbdkit-rs", "nbdkit"] {
        for f in [
            format!("bash-completion/completions/{name}"),
            format!("zsh/site-functions/_{name}"),
            format!("fish/vendor_completions.d/{name}.fish"),
        ] {
            assert!(share.join(&f).is_file(), "{f} is missing");
        }
    }
    let bash = share.join("bash-completion/completions/nbdkit-rs");
    run(Command::new("bash").arg("-n").arg(&bash));
    if have("zsh") {
        run(Command::new("zsh")
            .arg("-n")
            .arg(share.join("zsh/site-functions/_nbdkit-rs")));
    }
    if have("fish") {
        run(Command::new("fish")
            .arg("--no-execute")
            .arg(share.join("fish/vendor_completions.d/nbdkit-rs.fish")));
    }
    // Ask bash itself, as it calls the completion function: COMP_WORDS
    // split at `=` as bash splits them, and the word being completed.
    let complete = |script: &Path, words: &[&str], cur: &str| -> Vec<String> {
        let words: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let prog = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             f=$(complete -p \"${{COMP_WORDS[0]}}\" | sed 's/.*-F \\([^ ]*\\).*/\\1/'); \
             \"$f\" \"${{COMP_WORDS[0]}}\" '{cur}' \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.join(" ")
        );
        stdout(Command::new("bash").arg("-c").arg(prog))
            .lines()
            .map(|l| l.trim().to_string())
            .collect()
    };
    let has = |v: &[String], w: &str| v.iter().any(|x| x == w);
    for name in ["nbdkit-rs", "nbdkit"] {
        let script = share.join(format!("bash-completion/completions/{name}"));
        // A plugin name after the options.
        let c = complete(&script, &[name, "-f", "-r", "me"], "me");
        assert!(has(&c, "memory"), "{c:?}");
        // Filter names (and no plugin names) after --filter, --filter=
        // and --filter=PREFIX.
        let c = complete(&script, &[name, "--filter", ""], "");
        assert!(has(&c, "xz") && !has(&c, "memory"), "{c:?}");
        let c = complete(&script, &[name, "--filter", "="], "");
        assert!(has(&c, "xz") && !has(&c, "memory"), "{c:?}");
        let c = complete(&script, &[name, "-r", "--filter", "=", "m"], "m");
        assert!(has(&c, "multi-conn") && !has(&c, "memory"), "{c:?}");
        // Option values.
        let c = complete(&script, &[name, "--log", "s"], "s");
        assert_eq!(c, ["stderr", "syslog"]);
    }
}

#[test]
fn deb_package_holds_everything_and_its_binary_runs() {
    if !have("dpkg-deb") || !have("dpkg-shlibdeps") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let deb = stdout(
        Command::new(Path::new(ROOT).join("scripts/deb.sh"))
            .arg("--out")
            .arg(&out)
            .arg("--binary")
            .arg(binary())
            // The test binary is a debug build: xz would spend minutes on it.
            .args(["--compression", "none"]),
    );
    let deb = PathBuf::from(deb.trim());
    assert!(deb.is_file(), "{}", deb.display());
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for want in [
        "./usr/bin/nbdkit-rs",
        "./usr/share/man/man1/nbdkit-rs.1.gz",
        "./usr/share/man/man1/nbdkit-rs-xz-filter.1.gz",
        "./usr/share/man/man1/nbdkit-rs-file-plugin.1.gz",
        "./usr/share/bash-completion/completions/nbdkit-rs",
        "./usr/share/zsh/site-functions/_nbdkit-rs",
        "./usr/share/fish/vendor_completions.d/nbdkit-rs.fish",
        "./usr/lib/systemd/system/nbdkit-rs@.service",
        "./usr/lib/systemd/system/nbdkit-rs@.socket",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(want)),
            "{want} not in the package:\n{listing}"
        );
    }
    // Files owned by root, whoever built it.
    assert!(listing.contains("root/root"), "{listing}");
    let depends = stdout(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Depends"),
    );
    assert!(depends.contains("libc6"), "Depends: {depends}");

    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let version = stdout(Command::new(root.join("usr/bin/nbdkit-rs")).arg("--version"));
    assert!(
        version.starts_with("nbdkit 1.32.5 (nbdkit-rs "),
        "{version}"
    );
    let service =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/nbdkit-rs@.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/nbdkit-rs "));
    if have("man") {
        let (text, warnings) = man(
            &root.join("usr/share/man/man1/nbdkit-rs-gzip-filter.1.gz"),
            "80",
        );
        assert_eq!(warnings, "");
        assert!(text.contains("gzip"), "{text}");
    }
}
