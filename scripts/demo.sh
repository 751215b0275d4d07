#!/usr/bin/env bash
# The main job in one command: build nbdkit-rs, make a demo disk image (a
# GPT disk with an ext4 partition full of files), compress it with xz, and
# serve it uncompressed — read-only, with random access — on
# nbd://localhost (TCP port 10809), in the foreground.  Ctrl-C stops it.
#   scripts/demo.sh [IMAGE.xz]      # serve your own xz image instead
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for t in sfdisk:fdisk mkfs.ext4:e2fsprogs xz:xz-utils nbdinfo:libnbd-bin pkg-config:pkg-config cc:gcc; do
    command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
done
# Libraries the build links: liblzma (xz), OpenSSL (--tls-psk), libcurl (curl/s3),
# libext2fs (the ext2 filter).
for p in liblzma-dev libssl-dev libcurl4-openssl-dev libext2fs-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --bin nbdkit-rs

image=${1:-}
if [ -z "$image" ]; then
    work=${DEMO_DIR:-${TMPDIR:-/tmp}/nbdkit-rs-demo}
    image=$work/demo.img.xz
    if [ ! -f "$image" ]; then
        echo "Making a demo image in $work ..."
        mkdir -p "$work/src/docs"
        cp README.md docs/*.md "$work/src/docs/"
        echo "Hello from a compressed disk image served by nbdkit-rs." >"$work/src/hello.txt"
        head -c $((8 << 20)) /dev/urandom >"$work/src/random.bin"
        truncate -s 64M "$work/fs.img"
        mkfs.ext4 -q -F -L demo -d "$work/src" "$work/fs.img"
        truncate -s $((64 + 2))M "$work/demo.img"
        printf 'label: gpt\nstart=2048, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' |
            sfdisk -q "$work/demo.img"
        dd if="$work/fs.img" of="$work/demo.img" bs=1M seek=1 conv=notrunc,sparse status=none
        # 1 MiB blocks: every read decodes at most 1 MiB.
        xz -T0 --block-size=1MiB -k -f "$work/demo.img"
        rm -f "$work/fs.img" "$work/demo.img"
    fi
fi

cat <<EOT
Serving $image uncompressed on nbd://localhost (Ctrl-C to stop). Try:
  nbdinfo nbd://localhost
  nbdinfo --map nbd://localhost
  nbdcopy nbd://localhost demo.img            # the original, never unpacked on the server
  qemu-img convert -O qcow2 nbd://localhost demo.qcow2
EOT
exec target/release/nbdkit-rs -f -r --filter=xz file "$image"
