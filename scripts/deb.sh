#!/usr/bin/env bash
# Build a Debian package of nbdkit-rs: the files scripts/install.sh puts
# under /usr (binary, seekable-index, manual pages, completions, systemd
# units, docs), packed with dpkg-deb.
#
#   scripts/deb.sh                     # release build, .deb in target/debian/
#   scripts/deb.sh --out DIR           # write the .deb into DIR
#   scripts/deb.sh --binary PATH       # package this built binary instead of building
#   scripts/deb.sh --compression none  # dpkg-deb -Z: xz (default), gzip, zstd or none
#
# Why not cargo-deb: the package must hold exactly what install.sh installs
# (generated pages and completions included), and staging with install.sh
# then `dpkg-deb --build` needs no extra tool; dpkg-shlibdeps (dpkg-dev)
# works out the library dependencies from the binary, as in any Debian build.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/debian
binary=
compression=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        --binary) binary="$2"; shift 2 ;;
        --binary=*) binary="${1#*=}"; shift ;;
        --compression) compression="$2"; shift 2 ;;
        --compression=*) compression="${1#*=}"; shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "deb.sh: unknown argument: $1" >&2; exit 1 ;;
    esac
done

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
if [ -n "$binary" ]; then
    scripts/install.sh --prefix /usr --destdir "$root" --binary "$binary" >/dev/null
else
    scripts/install.sh --prefix /usr --destdir "$root" >/dev/null
fi
# Debian policy: manual pages gzip-compressed, without a time stamp, and
# binaries without debug information (the .dynsym that nbdkit's C plugins
# resolve nbdkit_* against is kept: strip never removes it).
gzip -9n "$root"/usr/share/man/man1/*.1
for b in "$root"/usr/bin/nbdkit-rs "$root"/usr/bin/seekable-index; do
    [ -f "$b" ] && strip --strip-debug "$b"
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"

# dpkg-shlibdeps reads debian/control from the current directory.
mkdir -p "$stage/src/debian"
printf 'Source: nbdkit-rs\n\nPackage: nbdkit-rs\nArchitecture: any\n' > "$stage/src/debian/control"
bins=("$root/usr/bin/nbdkit-rs")
[ -x "$root/usr/bin/seekable-index" ] && bins+=("$root/usr/bin/seekable-index")
depends="$(cd "$stage/src" && dpkg-shlibdeps -O "${bins[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"

size_kib="$(du -sk "$root" | cut -f1)"
mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<EOF
Package: nbdkit-rs
Version: $version
Architecture: $arch
Maintainer: nbdkit-rs developers <nbdkit-rs@example.invalid>
Installed-Size: $size_kib
Depends: $depends
Section: net
Priority: optional
Description: pluggable NBD server, command-line compatible with nbdkit
 A plugin is a data source (a file, memory, a URL, an object store);
 filters stack on top of it and change requests. Compressed disk images
 (xz, gzip, zstd, bzip2) are served uncompressed with random access.
 Includes manual pages, shell completions and systemd socket-activation
 units (nbdkit-rs@.socket, nbdkit-rs@.service).
EOF
(cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/nbdkit-rs_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >/dev/null
echo "$deb"
