#!/bin/sh
# Regenerate the seed corpus with the xz and zstd command-line tools.
set -eu
cd "$(dirname "$0")/corpus"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c 200000 /dev/zero > "$tmp/zero"
seq 1 30000 > "$tmp/text"
cat "$tmp/text" "$tmp/zero" > "$tmp/mix"

xz -c -1 "$tmp/text" > xz_index/single-block.xz
xz -c -1 --block-size=64KiB --check=sha256 "$tmp/mix" > xz_index/multi-block-sha256.xz
xz -c -0 --check=none "$tmp/zero" > xz_index/check-none.xz
xz -c -0 --check=crc32 /dev/null > xz_index/empty.xz
# Two streams with stream padding between and after them.
{ xz -c -0 "$tmp/text"; head -c 8 /dev/zero; xz -c -0 --check=crc32 "$tmp/zero"; head -c 4 /dev/zero; } \
    > xz_index/multi-stream-padded.xz

# Seekable zstd: frames compressed by the CLI, then the seek table.
seekable() { # out checksum-flag files...
    out=$1; flag=$2; shift 2
    : > "$out"; args=""; n=0
    for f in "$@"; do
        zstd -q -c -3 "$f" > "$tmp/frame.$n"
        cat "$tmp/frame.$n" >> "$out"
        args="$args $tmp/frame.$n $(stat -c %s "$f")"
        n=$((n + 1))
    done
    python3 - "$out" "$flag" $args <<'PY'
import struct, sys
out, flag = sys.argv[1], int(sys.argv[2])
rest = sys.argv[3:]
body = b""
n = 0
for frame_file, dsize in zip(rest[0::2], rest[1::2]):
    frame = open(frame_file, "rb").read()
    body += struct.pack("<II", len(frame), int(dsize))
    if flag:
        # The CLI writes a content checksum: the low 32 bits of XXH64,
        # which is also what the seek table stores.
        body += frame[-4:]
    n += 1
footer = struct.pack("<IBI", n, 0x80 if flag else 0, 0x8F92EAB1)
with open(out, "ab") as f:
    f.write(struct.pack("<II", 0x184D2A5E, len(body) + len(footer)) + body + footer)
PY
}
split -b 50000 "$tmp/mix" "$tmp/part."
seekable zstd_seek_table/seekable.zst 0 "$tmp"/part.*
seekable zstd_seek_table/seekable-checksums.zst 1 "$tmp/text" "$tmp/zero"
zstd -q -c "$tmp/text" > zstd_seek_table/plain-frame.zst

# The whole-image targets' seeds.
"$(dirname "$0")/make-image-corpus.sh"
