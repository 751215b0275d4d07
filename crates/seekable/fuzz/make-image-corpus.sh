#!/bin/sh
# Seeds for the whole-image targets (image_xz, image_gzip, image_zstd,
# image_bzip2): small images made by each format's own tools, each after a
# read plan (see fuzz_targets/image_common.rs).
set -eu
cd "$(dirname "$0")/corpus"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
seq 1 20000 > "$tmp/text"
head -c 150000 /dev/zero > "$tmp/zero"
cat "$tmp/text" "$tmp/zero" "$tmp/text" > "$tmp/mix"
mkdir -p image_xz image_gzip image_zstd image_bzip2 image_lzip image_qcow2
# Four reads: start, middle, a long one, the end.
plan() {
    python3 -c 'import struct,sys; sys.stdout.buffer.write(bytes([3]) + b"".join(struct.pack("<IH", o, l) for o, l in [(0, 4096), (100000, 777), (50000, 65535), (0xFFFFFFFF, 100)]))'
}
seed() { # out command...
    out=$1; shift
    { plan; "$@"; } > "$out"
}
seed image_xz/multi-block.xz xz -c -1 --block-size=64KiB "$tmp/mix"
seed image_xz/single-block.xz xz -c -1 "$tmp/mix"
seed image_xz/two-streams.xz sh -c "xz -c -0 '$tmp/text'; xz -c -0 --check=crc32 '$tmp/zero'"
seed image_gzip/plain.gz gzip -c "$tmp/mix"
seed image_gzip/members.gz sh -c "gzip -c '$tmp/text'; gzip -1 -c '$tmp/zero'"
seed image_gzip/pigz-i.gz pigz -i -b 32 -c "$tmp/mix"
seed image_gzip/bgzf.gz bgzip -c "$tmp/mix"
seed image_zstd/one-frame.zst zstd -q -c "$tmp/mix"
seed image_zstd/piped.zst sh -c "cat '$tmp/mix' | zstd -q -c"
seed image_zstd/frames.zst sh -c "zstd -q -c '$tmp/text'; zstd -q -c '$tmp/zero'; cat '$tmp/text' | zstd -q -c"
# --long: a 128 MiB window (the most a decoder accepts by default).
seed image_zstd/long.zst sh -c "cat '$tmp/mix' | zstd -q -c --long=27"
# The seekable format: CLI frames plus a seek table (made by make-corpus.sh).
seed image_zstd/seekable.zst cat zstd_seek_table/seekable-checksums.zst
seed image_bzip2/blocks.bz2 bzip2 -1 -c "$tmp/mix"
seed image_bzip2/streams.bz2 sh -c "bzip2 -c '$tmp/text'; bzip2 -1 -c '$tmp/zero'"
seed image_lzip/one-member.lz lzip -c "$tmp/mix"
seed image_lzip/members.lz plzip -c -B 64KiB "$tmp/mix"
# qcow2 seeds, as qemu-img writes them (a small virtual disk of the mix).
cp "$tmp/mix" "$tmp/mix.raw"
truncate -s 1M "$tmp/mix.raw"
qemu-img convert -q -O qcow2 -o cluster_size=4k "$tmp/mix.raw" "$tmp/plain.qcow2"
seed image_qcow2/plain.qcow2 cat "$tmp/plain.qcow2"
qemu-img convert -q -c -O qcow2 -o cluster_size=4k "$tmp/mix.raw" "$tmp/zlib.qcow2"
seed image_qcow2/zlib.qcow2 cat "$tmp/zlib.qcow2"
qemu-img convert -q -c -O qcow2 -o cluster_size=4k,compression_type=zstd "$tmp/mix.raw" "$tmp/zstd.qcow2"
seed image_qcow2/zstd.qcow2 cat "$tmp/zstd.qcow2"
qemu-img convert -q -O qcow2 -o cluster_size=16k,extended_l2=on,compat=1.1 "$tmp/mix.raw" "$tmp/extl2.qcow2"
seed image_qcow2/extl2.qcow2 cat "$tmp/extl2.qcow2"
