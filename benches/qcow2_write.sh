#!/usr/bin/env bash
# qcow2 writing: the qcow2dec filter (file plugin below) against qemu-nbd on
# copies of the same qcow2 images, side by side in one run.
#   benches/qcow2_write.sh [DISK_MIB] [FIO_SECONDS]
# Rows: random 4K writes at qd1 and qd16 into a fresh copy of a qcow2 of
# real files (first touch of a cluster allocates), the same again into
# clusters already written (in place), and a whole-disk sequential copy in
# (nbdcopy from a raw file into an empty qcow2).  qemu-nbd runs with its
# default cache mode (writeback) and --aio=threads; nbdkit-rs with its
# defaults.  Each image is checked with `qemu-img check` after its server
# exits.  Prints a Markdown table with ratios against qemu-nbd.
source "$(dirname "$0")/common.sh"
disk_mib=${1:-512}
secs=${2:-8}
for t in qemu-nbd qemu-img nbdcopy fio; do
    command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }
done
build_release
raw=$out/disk-$disk_mib.img
[ -f "$raw" ] || { echo "make $raw first: ONLY=qcow2 benches/compressed.sh $disk_mib" >&2; exit 1; }
src=$out/disk.plain.qcow2
[ -f "$src" ] || qemu-img convert -O qcow2 "$raw" "$src"
sock=$out/qw.sock
uri="nbd+unix:///?socket=$sock"

# fio_randwrite URI BS DEPTH SECONDS SEED: prints "iops p50_us p99_us";
# the same seed writes the same offsets in the same order.
fio_randwrite() {
    local uri=$1 bs=$2 depth=$3 secs=$4 seed=$5
    fio --name=w --ioengine=nbd --uri="$uri" --rw=randwrite --bs="$bs" --iodepth="$depth" \
        --runtime="$secs" --time_based --randseed="$seed" --norandommap \
        --output-format=json 2>/dev/null |
        /usr/bin/python3 -c '
import json, sys
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print("%d %.0f %.0f" % (j["iops"], p["50.000000"] / 1000, p["99.000000"] / 1000))'
}
start() {  # SERVER IMAGE
    case $1 in
        nbdkit-rs) start_server "$1" "$sock" "$NBDKIT_RS" -f -U "$sock" --filter=qcow2dec file "$2" ;;
        qemu-nbd)  start_server "$1" "$sock" qemu-nbd -f qcow2 -t -k "$sock" --cache=writeback --aio=threads -e 16 "$2" ;;
    esac
}
check() {
    if qemu-img check -q "$1" >/dev/null 2>&1; then echo clean; else echo "check failed ($?)"; fi
}
declare -A qd1 qd16 again seq state
for s in nbdkit-rs qemu-nbd; do
    img=$out/qw-$s.qcow2
    cp "$src" "$img"
    start $s "$img"
    qd1[$s]=$(fio_randwrite "$uri" 4k 1 "$secs" 1)
    qd16[$s]=$(fio_randwrite "$uri" 4k 16 "$secs" 2)
    # The same seed again: the same offsets, now in clusters written above.
    again[$s]=$(fio_randwrite "$uri" 4k 16 "$secs" 2)
    stop_server
    state[$s]=$(check "$img")
    empty=$out/qw-$s-empty.qcow2
    rm -f "$empty"; qemu-img create -q -f qcow2 "$empty" "${disk_mib}M"
    start $s "$empty"
    seq[$s]=$(awk -v m="$disk_mib" -v t="$(seconds nbdcopy "$raw" "$uri")" 'BEGIN {printf "%.0f", m * 1.048576 / t}')
    stop_server
    state[$s]="${state[$s]}, $(check "$empty")"
    rm -f "$img" "$empty"
done
echo "Disk: ${disk_mib} MiB GPT + ext4 with real files as qcow2 (64 KiB clusters); fio ${secs}s per row; $(nproc) cores."
echo
echo "| measurement | nbdkit-rs | qemu-nbd | nbdkit-rs / qemu-nbd |"
echo "|---|---|---|---|"
row() {  # NAME ARRAY FIELD (1: IOPS, 2: p50, 3: p99; latency ratios inverted)
    local name=$1 f=$3
    local -n a=$2
    local r=$(echo "${a[nbdkit-rs]}" | cut -d' ' -f$f) q=$(echo "${a[qemu-nbd]}" | cut -d' ' -f$f)
    if [ "$f" = 1 ]; then echo "| $name | $r | $q | $(ratio "$r" "$q") |"; else echo "| $name | $r | $q | $(ratio "$q" "$r") |"; fi
}
row "random 4K write qd1, fresh copy (IOPS)" qd1 1
row "random 4K write qd1 p99 (us)" qd1 3
row "random 4K write qd16, fresh copy (IOPS)" qd16 1
row "random 4K write qd16 p99 (us)" qd16 3
row "random 4K write qd16, written clusters (IOPS)" again 1
echo "| sequential copy into an empty qcow2, nbdcopy (MB/s) | ${seq[nbdkit-rs]} | ${seq[qemu-nbd]} | $(ratio "${seq[nbdkit-rs]}" "${seq[qemu-nbd]}") |"
echo "| qemu-img check afterwards | ${state[nbdkit-rs]} | ${state[qemu-nbd]} | |"
