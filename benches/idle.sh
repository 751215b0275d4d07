#!/usr/bin/env bash
# Idle connections: threads and resident memory of a server holding 1, 100
# and 10,000 clients that have negotiated (NBD_OPT_GO), made one request
# each, and gone quiet.  Loopback only (a Unix socket), bounded counts.
#   benches/idle.sh [COUNTS...]        (default: 1 100 10000)
# A count the descriptor limit cannot hold (2 per connection in the
# server) is skipped ("-"); the script raises the soft limit to the hard.
# NBDKIT_RS_BEFORE=PATH adds another build (e.g. the previous commit's) as
# a column; nbdkit is measured up to 100 connections only (it keeps 16
# threads per connection: 10,000 would exhaust the machine's process IDs).
source "$(dirname "$0")/common.sh"
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 100 10000)
build_release
# Each connection is a descriptor in the client and two in the server.
max=0
for n in "${counts[@]}"; do [ "$n" -gt "$max" ] && max=$n; done
want=$((3 * max + 256))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$want" ]; then
    ulimit -Hn "$want" 2>/dev/null || true
fi
ulimit -Sn "$(ulimit -Hn)"
# The server holds two descriptors a connection: skip what cannot fit
# (raising the hard limit needs CAP_SYS_RESOURCE).
fits() { [ "$(ulimit -Sn)" = unlimited ] || [ $((2 * $1 + 64)) -le "$(ulimit -Sn)" ]; }

sock=$out/idle.sock
# idle_client SOCKET PID N SETTLE: N raw clients (greeting, fixed
# newstyle, GO, one 4 KiB read); then (SETTLE=workers) wait until PID has
# no worker thread left (named nbd-conn-*), and for 2 s more, and print
# "THREADS RSS_KIB".
idle_client() {
    python3 - "$@" <<'EOF'
import os, socket, struct, sys, time
path, pid, n, settle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rd(s, k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c:
            raise SystemExit("server closed a connection")
        b += c
    return b
conns = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(path)
    g = rd(s, 18)
    assert g[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))
    # NBD_OPT_GO: empty name, no information requests.
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        magic, opt, rep, ln = struct.unpack(">QIII", rd(s, 20))
        rd(s, ln)
        if rep == 1:
            break
        assert rep == 3, rep
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i * 4096) % (1 << 20), 4096))
    r = rd(s, 16 + 4096)
    assert struct.unpack(">I", r[4:8])[0] == 0
    conns.append(s)
def threads(prefix):
    k = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                k += f.read().startswith(prefix)
        except OSError:
            pass
    return k
while settle == "workers" and threads("nbd-conn-"):
    time.sleep(0.1)
time.sleep(2)
st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status"))
print(st["Threads"].strip(), st["VmRSS"].split()[0])
EOF
}

declare -A thr rss
servers=(nbdkit-rs nbdkit)
[ -n "${NBDKIT_RS_BEFORE:-}" ] && servers=(nbdkit-rs before nbdkit)
for s in "${servers[@]}"; do
    for n in "${counts[@]}"; do
        if { [ "$s" != nbdkit-rs ] && [ "$n" -gt 100 ]; } || ! fits "$n"; then
            thr[$s,$n]="-"; rss[$s,$n]="-"; continue
        fi
        case $s in
            nbdkit-rs) start_server $s "$sock" "$NBDKIT_RS" -f -U "$sock" --max-connections=0 memory 1M ;;
            before)    start_server $s "$sock" "$NBDKIT_RS_BEFORE" -f -U "$sock" memory 1M ;;
            nbdkit)    start_server $s "$sock" nbdkit -f -U "$sock" memory 1M ;;
        esac
        settle=time; [ "$s" = nbdkit-rs ] && settle=workers
        read -r t r < <(idle_client "$sock" "$SERVER_PID" "$n" $settle)
        thr[$s,$n]=$t
        rss[$s,$n]=$((r / 1024))
        stop_server
    done
done

echo "Idle connections (negotiated, one 4 KiB read each, then quiet), Unix socket, memory plugin; $(nproc) cores."
echo
printf "| connections |"
for s in "${servers[@]}"; do printf " %s threads | %s RSS (MiB) |" "$s" "$s"; done
echo
printf "|---|"
for s in "${servers[@]}"; do printf -- "---|---|"; done
echo
for n in "${counts[@]}"; do
    printf "| %s |" "$n"
    for s in "${servers[@]}"; do printf " %s | %s |" "${thr[$s,$n]}" "${rss[$s,$n]}"; done
    echo
done
