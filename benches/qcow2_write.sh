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
# NBDKIT_RS_BASE=PATH adds another nbdkit-rs build (e.g. main's) as a
# "base" column, measured in the same run, with a ratio against it.  The
# sequential copy is the best of ROUNDS (3) runs per server, the servers
# taking turns, so a burst of load elsewhere hits them alike; with it, the
# server's CPU time for the fill (user + system, least of the rounds).
# FILL_DIR=DIR puts the filled image there (/dev/shm: no disk writeback in
# the timing, which then measures the servers rather than the disk).
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
servers="nbdkit-rs qemu-nbd"
[ -z "${NBDKIT_RS_BASE:-}" ] || servers="nbdkit-rs base qemu-nbd"
rounds=${ROUNDS:-3}
start() {  # SERVER IMAGE
    case $1 in
        nbdkit-rs) start_server "$1" "$sock" "$NBDKIT_RS" -f -U "$sock" --filter=qcow2dec file "$2" ;;
        base)      start_server "$1" "$sock" "$NBDKIT_RS_BASE" -f -U "$sock" --filter=qcow2dec file "$2" ;;
        qemu-nbd)  start_server "$1" "$sock" qemu-nbd -f qcow2 -t -k "$sock" --cache=writeback --aio=threads -e 16 "$2" ;;
    esac
}
check() {
    if qemu-img check -q "$1" >/dev/null 2>&1; then echo clean; else echo "check failed ($?)"; fi
}
declare -A qd1 qd16 again seq cpu state fills
fill_dir=${FILL_DIR:-$out}
tck=$(getconf CLK_TCK)
for s in $servers; do
    img=$out/qw-$s.qcow2
    cp "$src" "$img"
    start $s "$img"
    qd1[$s]=$(fio_randwrite "$uri" 4k 1 "$secs" 1)
    qd16[$s]=$(fio_randwrite "$uri" 4k 16 "$secs" 2)
    # The same seed again: the same offsets, now in clusters written above.
    again[$s]=$(fio_randwrite "$uri" 4k 16 "$secs" 2)
    stop_server
    state[$s]=$(check "$img")
    rm -f "$img"
    seq[$s]=0
    cpu[$s]=999999
done
for _ in $(seq 1 "$rounds"); do
    for s in $servers; do
        empty=$fill_dir/qw-$s-empty.qcow2
        rm -f "$empty"; qemu-img create -q -f qcow2 "$empty" "${disk_mib}M"
        start $s "$empty"
        r=$(awk -v m="$disk_mib" -v t="$(seconds nbdcopy "$raw" "$uri")" 'BEGIN {printf "%.0f", m * 1.048576 / t}')
        c=$(awk -v k="$tck" '{printf "%.2f", ($14 + $15) / k}' "/proc/$SERVER_PID/stat")
        stop_server
        cpu[$s]=$(awk -v a="$c" -v b="${cpu[$s]}" 'BEGIN {print (a < b ? a : b)}')
        [ "$r" -gt "${seq[$s]}" ] && seq[$s]=$r
        c=$(check "$empty")
        [ "$c" = clean ] || fills[$s]="${fills[$s]:-} fill: $c"
        rm -f "$empty"
    done
done
for s in $servers; do state[$s]="${state[$s]},${fills[$s]:- $rounds fills clean}"; done
echo "Disk: ${disk_mib} MiB GPT + ext4 with real files as qcow2 (64 KiB clusters); fio ${secs}s per row; sequential copy best of $rounds into $fill_dir; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo
if [ -n "${NBDKIT_RS_BASE:-}" ]; then
    echo "| measurement | nbdkit-rs | base | qemu-nbd | nbdkit-rs / qemu-nbd | nbdkit-rs / base |"
    echo "|---|---|---|---|---|---|"
else
    echo "| measurement | nbdkit-rs | qemu-nbd | nbdkit-rs / qemu-nbd |"
    echo "|---|---|---|---|"
fi
# cell ARRAY SERVER FIELD: one server's value (FIELD of a fio triple, or
# the whole value).
cell() { local -n c=$1; echo "${c[$2]}" | cut -d' ' -f"$3"; }
row() {  # NAME ARRAY FIELD (1: IOPS or MB/s, 2: p50, 3: p99; latency ratios inverted)
    local name=$1 arr=$2 f=$3
    local r q b line
    r=$(cell "$arr" nbdkit-rs "$f"); q=$(cell "$arr" qemu-nbd "$f")
    inv() { if [ "$f" = 1 ]; then ratio "$1" "$2"; else ratio "$2" "$1"; fi; }
    if [ -n "${NBDKIT_RS_BASE:-}" ]; then
        b=$(cell "$arr" base "$f")
        echo "| $name | $r | $b | $q | $(inv "$r" "$q") | $(inv "$r" "$b") |"
    else
        echo "| $name | $r | $q | $(inv "$r" "$q") |"
    fi
}
row "random 4K write qd1, fresh copy (IOPS)" qd1 1
row "random 4K write qd1 p99 (us)" qd1 3
row "random 4K write qd16, fresh copy (IOPS)" qd16 1
row "random 4K write qd16 p99 (us)" qd16 3
row "random 4K write qd16, written clusters (IOPS)" again 1
row "sequential copy into an empty qcow2, nbdcopy (MB/s)" seq 1
# One value (cut passes a line without spaces whole); lower is better, as
# a latency, so field 2.
row "server CPU seconds for that copy (least)" cpu 2
if [ -n "${NBDKIT_RS_BASE:-}" ]; then
    echo "| qemu-img check afterwards | ${state[nbdkit-rs]} | ${state[base]} | ${state[qemu-nbd]} | | |"
else
    echo "| qemu-img check afterwards | ${state[nbdkit-rs]} | ${state[qemu-nbd]} | |"
fi
