#!/usr/bin/env bash
# Install nbdkit-rs under a prefix: the binary (and seekable-index), the
# manual pages, bash/zsh/fish completions, the systemd units and the docs.
#
#   scripts/install.sh                       # build (release), install under /usr/local
#   scripts/install.sh --prefix /usr         # ... under /usr
#   scripts/install.sh --as-nbdkit           # also an `nbdkit` command that is nbdkit-rs
#   scripts/install.sh --destdir /tmp/stage  # stage for a package (files under /tmp/stage/PREFIX)
#   scripts/install.sh --binary PATH         # install this built binary instead of building
#
# Not `cargo install`: that installs binaries only, and the pages,
# completions and units are the point here.  The pages and completions
# are written by the installed binary itself (`nbdkit-rs --generate=...`),
# from the same clap definition and plugin/filter text as its --help.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
destdir=
as_nbdkit=
binary=
usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit "$1"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        --destdir) destdir="$2"; shift 2 ;;
        --destdir=*) destdir="${1#*=}"; shift ;;
        --binary) binary="$2"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --as-nbdkit) as_nbdkit=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage 1 >&2 ;;
    esac
done
case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path (units and completions name it)" >&2; exit 1 ;;
esac

if [ -z "$binary" ]; then
    cargo build --release --bin nbdkit-rs
    cargo build --release -p seekable-compressed --bin seekable-index
    binary=target/release/nbdkit-rs
fi
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }
# seekable-index (builds gzip indexes ahead of time) is built beside the
# server by the release build above and by `cargo test --workspace`.
seekable_index="$(dirname "$binary")/seekable-index"

root="$destdir$prefix"
bindir="$root/bin"
mandir="$root/share/man/man1"
unitdir="$root/lib/systemd/system"
docdir="$root/share/doc/nbdkit-rs"

install -d "$bindir" "$mandir" "$unitdir" "$docdir"
install -m 755 "$binary" "$bindir/nbdkit-rs"
if [ -x "$seekable_index" ]; then
    install -m 755 "$seekable_index" "$bindir/seekable-index"
else
    echo "install.sh: $seekable_index not built; seekable-index not installed" >&2
fi
names=(nbdkit-rs)
if [ -n "$as_nbdkit" ]; then
    # A relative link: the staged tree stays correct once moved to /.
    ln -sfn nbdkit-rs "$bindir/nbdkit"
    names+=(nbdkit)
fi

installed="$bindir/nbdkit-rs"
"$installed" --generate=man "$mandir"
chmod 644 "$mandir"/nbdkit-rs*.1
for n in "${names[@]}"; do
    "$installed" --generate=bash "$root/share/bash-completion/completions" "$n"
    "$installed" --generate=zsh "$root/share/zsh/site-functions" "$n"
    "$installed" --generate=fish "$root/share/fish/vendor_completions.d" "$n"
done

# The units run the binary where this prefix puts it.
for u in contrib/systemd/nbdkit-rs@.socket contrib/systemd/nbdkit-rs@.service; do
    sed "s|/usr/bin/nbdkit-rs|$prefix/bin/nbdkit-rs|g" "$u" > "$unitdir/$(basename "$u")"
    chmod 644 "$unitdir/$(basename "$u")"
done

install -m 644 README.md "$docdir/"
install -m 644 docs/*.md "$docdir/"

echo "installed nbdkit-rs $("$installed" --version | head -1) under $root"
