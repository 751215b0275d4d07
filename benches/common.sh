# Shared helpers for the benchmark scripts (sourced, not run).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${BENCH_OUT:-$top/bench-out}
mkdir -p "$out"
# NBDKIT_RS=PATH measures another build (e.g. an older commit's) instead.
if [ -n "${NBDKIT_RS:-}" ]; then
    build_release() { :; }
else
    NBDKIT_RS=$top/target/release/nbdkit-rs
    build_release() {
        (cd "$top" && cargo build --release --bin nbdkit-rs >&2)
    }
fi

# start_server NAME SOCKET CMD...: start a server in the background and wait
# until its socket accepts connections.  Sets SERVER_PID.
start_server() {
    local name=$1 sock=$2; shift 2
    rm -f "$sock"
    "$@" >"$out/$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if [ -S "$sock" ] && nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "$name failed to start:" >&2; cat "$out/$name.log" >&2; return 1
        fi
        sleep 0.05
    done
    echo "$name did not start in time" >&2
    return 1
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
}

# Peak resident memory (KiB) of a process and its children so far.
peak_rss_kib() {
    local pid=$1 total=0 p
    for p in $pid $(pgrep -P "$pid" || true); do
        total=$((total + $(awk '/VmHWM/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)))
    done
    echo $total
}

# seconds CMD...: wall time of a command, in seconds with 3 decimals.
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}'
}

# best_mbps MIB CMD...: the best throughput of three runs, in MB/s (short
# runs are noisy; the best is the least disturbed).
best_mbps() {
    local mib=$1 best=0 t r; shift
    for _ in 1 2 3; do
        t=$(seconds "$@")
        r=$(awk -v m="$mib" -v t="$t" 'BEGIN {printf "%.0f", m * 1.048576 / t}')
        [ "$r" -gt "$best" ] && best=$r
    done
    echo $best
}

# fio_randread URI BS DEPTH SECONDS: prints "iops p50_us p99_us".
fio_randread() {
    local uri=$1 bs=$2 depth=$3 secs=$4
    fio --name=r --ioengine=nbd --uri="$uri" --rw=randread --bs="$bs" --iodepth="$depth" \
        ${FIO_SIZE:+--size=$FIO_SIZE} --runtime="$secs" --time_based --randrepeat=1 --norandommap \
        --output-format=json 2>/dev/null |
        /usr/bin/python3 -c '
import json, sys
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]["read"]
p = j["clat_ns"]["percentile"]
print("%d %.0f %.0f" % (j["iops"], p["50.000000"] / 1000, p["99.000000"] / 1000))'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
