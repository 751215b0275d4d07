#!/usr/bin/env bash
# Core server benchmark: the same raw image served by nbdkit-rs (file
# plugin), nbdkit (file plugin) and qemu-nbd, side by side in one run.
#   benches/core.sh [SIZE_MIB] [FIO_SECONDS]
# Prints a Markdown table with ratios against nbdkit.
source "$(dirname "$0")/common.sh"
size_mib=${1:-1024}
secs=${2:-10}
for t in nbdkit qemu-nbd nbdcopy fio nbdinfo; do
    command -v $t >/dev/null || { echo "missing $t (apt-get install nbdkit qemu-utils libnbd-bin fio)" >&2; exit 1; }
done
build_release
img=$out/core.img
if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" != $((size_mib << 20)) ]; then
    # Incompressible data, so no server can take a shortcut.
    head -c $((size_mib << 20)) /dev/urandom >"$img"
fi
# Read the image once so all three servers start with it in the page cache.
cat "$img" >/dev/null

sock=$out/core.sock
uri="nbd+unix:///?socket=$sock"
declare -A seq1 seqd qd1 qd16 rss
# The better of two fio runs (by IOPS), as runs vary by about 10% here.
best_of_2() {
    local a b
    a=$("$@"); b=$("$@")
    if [ "${a%% *}" -ge "${b%% *}" ]; then echo "$a"; else echo "$b"; fi
}
servers=(nbdkit-rs nbdkit qemu-nbd)
for s in "${servers[@]}"; do
    case $s in
        nbdkit-rs) start_server $s "$sock" "$NBDKIT_RS" -f -r -U "$sock" file "$img" ;;
        nbdkit)    start_server $s "$sock" nbdkit -f -r -U "$sock" file "$img" ;;
        qemu-nbd)  start_server $s "$sock" qemu-nbd -r -f raw -t -k "$sock" --cache=writeback --aio=threads -e 16 "$img" ;;
    esac
    seq1[$s]=$(best_mbps "$size_mib" nbdcopy -C 1 "$uri" null:)
    seqd[$s]=$(best_mbps "$size_mib" nbdcopy "$uri" null:)
    qd1[$s]=$(best_of_2 fio_randread "$uri" 4k 1 "$secs")
    qd16[$s]=$(best_of_2 fio_randread "$uri" 4k 16 "$secs")
    rss[$s]=$(( $(peak_rss_kib $SERVER_PID) / 1024 ))
    stop_server
done

echo "Image: ${size_mib} MiB random data, page cache warm; sequential rows: best of 3; random rows: best of 2 fio runs of ${secs}s; $(nproc) cores."
echo
echo "| measurement | nbdkit-rs | nbdkit | qemu-nbd | nbdkit-rs / nbdkit |"
echo "|---|---|---|---|---|"
row() { echo "| $1 | $2 | $3 | $4 | $(ratio "$5" "$6") |"; }
row "sequential read, nbdcopy -C 1 (MB/s)" "${seq1[nbdkit-rs]}" "${seq1[nbdkit]}" "${seq1[qemu-nbd]}" "${seq1[nbdkit-rs]}" "${seq1[nbdkit]}"
row "sequential read, nbdcopy default (MB/s)" "${seqd[nbdkit-rs]}" "${seqd[nbdkit]}" "${seqd[qemu-nbd]}" "${seqd[nbdkit-rs]}" "${seqd[nbdkit]}"
for d in qd1 qd16; do
    declare -n m=$d
    read -r a ap50 ap99 <<<"${m[nbdkit-rs]}"
    read -r b bp50 bp99 <<<"${m[nbdkit]}"
    read -r c cp50 cp99 <<<"${m[qemu-nbd]}"
    row "random 4K read $d (IOPS)" "$a" "$b" "$c" "$a" "$b"
    row "random 4K read $d p50 latency (us)" "$ap50" "$bp50" "$cp50" "$bp50" "$ap50"
    row "random 4K read $d p99 latency (us)" "$ap99" "$bp99" "$cp99" "$bp99" "$ap99"
done
row "peak RSS (MiB)" "${rss[nbdkit-rs]}" "${rss[nbdkit]}" "${rss[qemu-nbd]}" "${rss[nbdkit]}" "${rss[nbdkit-rs]}"
echo
echo "Ratios are oriented so that > 1 means nbdkit-rs is better (for latency and memory: nbdkit / nbdkit-rs)."
