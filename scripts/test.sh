#!/usr/bin/env bash
# Run the whole test suite, installing what it needs first (when missing):
# the real NBD clients from Debian, the compression tools used to make test
# images, cargo-fuzz, and the Rust lint components.
#   scripts/test.sh                  # everything: fmt, clippy, all tests,
#                                    # then every fuzz target for 20 s
#   FUZZ_SECONDS=0 scripts/test.sh   # the same without fuzzing
#   FUZZ_SECONDS=300 scripts/test.sh # fuzz longer
# The fuzzing (scripts/fuzz.sh) starts from the checked-in corpora, so a
# known crash input that comes back fails the run; its new inputs go to a
# temporary folder (FUZZ_SCRATCH=1), leaving the checkout as it was.  It
# adds the two fuzz crates' builds (with sanitizers) plus 14 targets x
# FUZZ_SECONDS to a run.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils libnbd-bin python3-libnbd nbdfuse nbdkit nbdkit-plugin-dev gcc libc6-dev binutils fio fuse3 fdisk e2fsprogs
          util-linux mount xz-utils gzip pigz tabix zstd bzip2 liblzma-dev pkg-config
          openssl libvirt0 libcurl4-openssl-dev libext2fs-dev python3-venv libssl-dev gnutls-bin strace nodejs systemd
          lzip plzip xorriso dosfstools mtools openssh-server
          nbdkit-plugin-python nbdkit-plugin-perl nbdkit-plugin-lua nbdkit-plugin-tcl
          man-db groff-base dpkg-dev zsh fish)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm comes with some builds of nodejs (NodeSource's) and separately in Debian's.
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# moto (PyPI): a local S3 server for tests/remote.rs, in its own virtualenv.
export NBDKIT_RS_MOTO="${NBDKIT_RS_MOTO:-$HOME/.cache/nbdkit-rs/moto}"
if [ ! -x "$NBDKIT_RS_MOTO/bin/moto_server" ]; then
    echo "Installing moto[server] into $NBDKIT_RS_MOTO"
    /usr/bin/python3 -m venv "$NBDKIT_RS_MOTO"
    "$NBDKIT_RS_MOTO/bin/pip" install -q 'moto[server]>=5,<6'
fi
# Azurite (npm): a local Azure Blob Storage server for tests/objstore.rs.
export NBDKIT_RS_AZURITE="${NBDKIT_RS_AZURITE:-$HOME/.cache/nbdkit-rs/azurite}"
if [ ! -x "$NBDKIT_RS_AZURITE/node_modules/.bin/azurite-blob" ]; then
    echo "Installing azurite into $NBDKIT_RS_AZURITE"
    npm install --silent --no-audit --no-fund --prefix "$NBDKIT_RS_AZURITE" 'azurite@3'
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# Tests fail (rather than skip) when a client they need is missing.
export NBDKIT_RS_REQUIRE_TOOLS=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The build without OpenSSL (no --tls-psk) must keep compiling.
cargo check --no-default-features
cargo test --workspace

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
if [ "$FUZZ_SECONDS" != 0 ]; then
    FUZZ_SCRATCH=${FUZZ_SCRATCH:-1} scripts/fuzz.sh "$FUZZ_SECONDS"
fi
