#!/usr/bin/env bash
# Compressed-image benchmark: the same disk image in several compressed
# forms, served by nbdkit-rs and (where it can) nbdkit 1.32, side by side in
# one run; zstd also against qemu-nbd serving a zstd-compressed qcow2.
#   benches/compressed.sh [DISK_MIB] [FIO_SECONDS]
# Images are cached in bench-out/ (building the 2 GiB set takes minutes).
source "$(dirname "$0")/common.sh"
disk_mib=${1:-2048}
secs=${2:-8}
for t in nbdkit qemu-nbd qemu-img nbdcopy fio xz gzip pigz bgzip zstd sfdisk mkfs.ext4; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
build_release

raw=$out/disk-$disk_mib.img
if [ ! -f "$raw" ]; then
    # A realistic disk: GPT, one ext4 partition holding real files (this
    # machine's /usr, up to ~60% of the space) and free space.
    src=$out/src-$disk_mib
    rm -rf "$src"; mkdir -p "$src"
    budget=$((disk_mib * 6 / 10))
    # Whole directories of real files, largest first, while they fit.
    while read -r mib dir; do
        used=$(du -sm "$src" | cut -f1)
        [ $((used + mib)) -le "$budget" ] || continue
        cp -a --parents "$dir" "$src/" 2>/dev/null || true
    done < <(du -sm /usr/lib/* /usr/share/* /usr/bin /usr/sbin /usr/include /usr/libexec 2>/dev/null | sort -rn)
    fs=$out/fs.img
    truncate -s $(( (disk_mib - 2) ))M "$fs"
    mkfs.ext4 -q -F -d "$src" "$fs"
    truncate -s ${disk_mib}M "$raw.tmp"
    printf 'label: gpt\nstart=2048, size=%d, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' $(( (disk_mib - 2) * 2048 )) | sfdisk -q "$raw.tmp"
    dd if="$fs" of="$raw.tmp" bs=1M seek=1 conv=notrunc,sparse status=none
    mv "$raw.tmp" "$raw"
    rm -rf "$fs" "$src"
fi

# xz's default preset (-6) compresses at a few MB/s here, which makes a
# 2 GiB image set take most of an hour; -3 decodes at the same speed.
xz_preset=${XZ_PRESET:--3}
# With ONLY=REGEX, images whose file name does not match are not made
# (ONLY=gz: the gzip rows and images only).
wanted() { [ -z "${ONLY:-}" ] || [[ "$1" =~ $ONLY ]]; }
make_image() {  # NAME COMMAND (reads $raw on stdin, writes stdout)
    wanted "$1" || return 0
    local f=$out/$1
    [ -f "$f" ] || { echo "compressing $1 ..." >&2; eval "$2" <"$raw" >"$f.tmp" && mv "$f.tmp" "$f"; }
}
make_image disk.xz1m "xz $xz_preset -T0 --block-size=1MiB -c"
make_image disk.xz16m "xz $xz_preset -T0 --block-size=16MiB -c"
make_image disk.xzsingle "xz $xz_preset -T1 -c"
make_image disk.gz "gzip -6 -c"
make_image disk.pigz.gz "pigz -i -c"
make_image disk.bgzf.gz "bgzip -@ $(nproc) -c"
if wanted disk.zst1m && [ ! -f "$out/disk.zst1m" ]; then
    (cd "$top" && cargo build --release -q -p seekable-compressed --example mkseekable)
    "$top/target/release/examples/mkseekable" "$raw" "$out/disk.zst1m" 1024
fi
if wanted disk.zst64k && [ ! -f "$out/disk.zst64k" ]; then
    (cd "$top" && cargo build --release -q -p seekable-compressed --example mkseekable)
    "$top/target/release/examples/mkseekable" "$raw" "$out/disk.zst64k" 64
fi
make_image disk.zstsingle "zstd -q -T0 --single-thread -c"
! wanted disk.zstd.qcow2 || [ -f "$out/disk.zstd.qcow2" ] || qemu-img convert -c -O qcow2 -o compression_type=zstd "$raw" "$out/disk.zstd.qcow2"
! wanted disk.zlib.qcow2 || [ -f "$out/disk.zlib.qcow2" ] || qemu-img convert -c -O qcow2 "$raw" "$out/disk.zlib.qcow2"
! wanted disk.plain.qcow2 || [ -f "$out/disk.plain.qcow2" ] || qemu-img convert -O qcow2 "$raw" "$out/disk.plain.qcow2"
# A qcow2 inside xz (1 MiB blocks): a cloud image as shipped, which
# qemu-nbd cannot serve without unpacking it first.
if wanted disk.plain.qcow2.xz1m && [ ! -f "$out/disk.plain.qcow2.xz1m" ]; then
    [ -f "$out/disk.plain.qcow2" ] || qemu-img convert -O qcow2 "$raw" "$out/disk.plain.qcow2"
    xz $xz_preset -T0 --block-size=1MiB -c "$out/disk.plain.qcow2" >"$out/disk.plain.qcow2.xz1m"
fi

sock=$out/c.sock
uri="nbd+unix:///?socket=$sock"
size=$(stat -c %s "$raw")
probe=$((size * 3 / 4 / 4096 * 4096))

# Scratch space a server uses: allocated size of files it holds open under
# its private TMPDIR (nbdkit's gzip filter unlinks its temp file).
scratch_mib() {
    local pid=$1 dir=$2 total=0 f
    for f in /proc/$pid/fd/*; do
        local t; t=$(readlink "$f" 2>/dev/null) || continue
        case $t in "$dir"/*) total=$((total + $(stat -L -c '%b*%B' "$f" 2>/dev/null | bc))) ;; esac
    done
    total=$((total + $(du -sb "$dir" | cut -f1)))
    echo $((total >> 20))
}

measure() {  # LABEL SERVER-NAME CMD...
    local label=$1 name=$2; shift 2
    # ONLY=REGEX limits the run to matching "label server" rows.
    if [ -n "${ONLY:-}" ] && ! [[ "$label $name" =~ $ONLY ]]; then return; fi
    local tmp=$out/tmp-$name; rm -rf "$tmp"; mkdir -p "$tmp"
    rm -f "$sock"
    read -r first pid < <(TMPDIR=$tmp XDG_CACHE_HOME=$tmp/cache /usr/bin/python3 "$top/benches/first_read.py" "$sock" "$probe" 4096 -- "$@") || true
    SERVER_PID=$pid
    if [ "$first" = nan ]; then
        echo "| $label | $name | refused or failed | | | | | | | |"
        stop_server; return
    fi
    local t seq1 seqd r1 r16 r64 again rss scr
    t=$(seconds nbdcopy -C 1 "$uri" null:); seq1=$(awk -v s=$size -v t=$t 'BEGIN {printf "%.0f", s / 1e6 / t}')
    t=$(seconds nbdcopy "$uri" null:); seqd=$(awk -v s=$size -v t=$t 'BEGIN {printf "%.0f", s / 1e6 / t}')
    scr=$(scratch_mib "$pid" "$tmp")
    stop_server
    # Random reads on a fresh server (cold cache), then the same offsets again.
    rm -f "$sock"; TMPDIR=$tmp XDG_CACHE_HOME=$tmp/cache "$@" >/dev/null 2>&1 & SERVER_PID=$!
    for _ in $(seq 1 6000); do nbdinfo --size "$uri" >/dev/null 2>&1 && break; sleep 0.01; done
    r1=$(fio_randread "$uri" 4k 1 "$secs")
    r16=$(fio_randread "$uri" 4k 16 "$secs")
    r64=$(fio_randread "$uri" 64k 16 "$secs")
    # Second pass: random reads within a 128 MiB region that a first pass
    # has already touched (each pass is a new fio connection, as with any
    # client reconnecting).
    FIO_SIZE=128M fio_randread "$uri" 4k 16 "$secs" >/dev/null
    again=$(FIO_SIZE=128M fio_randread "$uri" 4k 16 "$secs")
    rss=$(( $(peak_rss_kib $SERVER_PID) / 1024 ))
    # The random-read server's scratch use too (the scratch cache tier
    # fills during random reads, not sequential ones).
    local scr2; scr2=$(scratch_mib "$SERVER_PID" "$tmp")
    stop_server
    echo "| $label | $name | $first | $seq1 | $seqd | ${r1// /\/} | ${r16// /\/} | ${again%% *} | ${r64%% *} | $rss | $scr / $scr2 |"
}

echo "Disk: ${disk_mib} MiB GPT + ext4 with real files; fio ${secs}s per random-read row; $(nproc) cores."
echo "Random rows: reads/s/p50 us/p99 us over the whole disk; 'again': reads/s in a 128 MiB region on its second pass (a new connection each pass)."
echo
echo "| image | server | first read (s) | seq -C 1 (MB/s) | seq default (MB/s) | 4K qd1 | 4K qd16 | 4K qd16 2nd pass, 128M | 64K qd16 (reads/s) | peak RSS (MiB) | scratch (MiB, seq / random server) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
rs() { echo "$NBDKIT_RS" -f -r -U "$sock" "$@"; }
for img in xz1m xz16m xzsingle; do
    measure "xz ($img)" nbdkit-rs $(rs --filter=xz file "$out/disk.$img")
    measure "xz ($img)" nbdkit nbdkit -f -r -U "$sock" --filter=xz file "$out/disk.$img"
done
for img in gz pigz.gz bgzf.gz; do
    measure "gzip ($img)" nbdkit-rs $(rs --filter=gzip file "$out/disk.$img")
    measure "gzip ($img)" nbdkit nbdkit -f -r -U "$sock" --filter=gzip file "$out/disk.$img"
done
# A saved gzip index: first start builds it, the measured start loads it.
mkdir -p "$out/gzi"
if wanted disk.gz; then
    "$NBDKIT_RS" -r -U - --filter=gzip file "$out/disk.gz" gzip-index="$out/gzi/disk.gzi" --run 'nbdinfo --size "$uri"' >/dev/null
fi
measure "gzip (gz, saved index)" nbdkit-rs $(rs --filter=gzip file "$out/disk.gz" gzip-index="$out/gzi/disk.gzi")
for img in zst1m zstsingle; do
    measure "zstd ($img)" nbdkit-rs $(rs --filter=zstd file "$out/disk.$img")
done
# Cold misses only: the scratch cache tier off, so every miss beyond the
# RAM cache decodes (what the first touch of each frame costs).
measure "zstd (zst1m, no scratch cache)" nbdkit-rs $(rs --filter=zstd file "$out/disk.zst1m" zstd-scratch-cache-size=0)
# qcow2's granularity: 64 KiB frames, cold misses only.
measure "zstd (zst64k, no scratch cache)" nbdkit-rs $(rs --filter=zstd file "$out/disk.zst64k" zstd-scratch-cache-size=0)
# qcow2 (plain, zlib and zstd clusters): the qcow2dec filter against
# qemu-nbd on the same files (qemu-nbd with its writeback cache; nbdkit
# 1.32 has no qcow2 reader).
for q in plain zlib zstd; do
    measure "qcow2 ($q)" nbdkit-rs $(rs --filter=qcow2dec file "$out/disk.$q.qcow2")
    measure "qcow2 ($q)" qemu-nbd qemu-nbd -r -f qcow2 -t -k "$sock" --cache=writeback -e 16 "$out/disk.$q.qcow2"
done
measure "qcow2 in xz (1M blocks)" nbdkit-rs $(rs --filter=qcow2dec --filter=xz file "$out/disk.plain.qcow2.xz1m")
measure "raw (reference)" nbdkit-rs $(rs file "$raw")
