#!/usr/bin/env bash
# Run the whole test suite, installing what it needs first (when missing):
# the real NBD clients from Debian, the compression tools used to make test
# images, and the Rust lint components.
#   scripts/test.sh            # everything (fmt, clippy, all tests)
#   FUZZ_SECONDS=30 scripts/test.sh   # also fuzz every target for 30 s
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils libnbd-bin python3-libnbd nbdfuse nbdkit fio fuse3 fdisk e2fsprogs
          util-linux mount xz-utils gzip pigz tabix zstd bzip2 liblzma-dev pkg-config
          openssl libssl-dev gnutls-bin strace)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# Tests fail (rather than skip) when a client they need is missing.
export NBDKIT_RS_REQUIRE_TOOLS=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The build without OpenSSL (no --tls-psk) must keep compiling.
cargo check --no-default-features
cargo test --workspace

if [ -n "${FUZZ_SECONDS:-}" ]; then
    scripts/fuzz.sh "$FUZZ_SECONDS"
fi
