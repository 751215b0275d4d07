#!/usr/bin/python3
"""Time from starting a server to the first random read completing.

    first_read.py SOCKET OFFSET LENGTH -- SERVER-COMMAND...

Starts the server, connects as soon as its socket accepts (polling every
millisecond), reads LENGTH bytes at OFFSET, and prints the elapsed seconds
and the server's pid; the caller stops the server."""
import os, subprocess, sys, time
import nbd

sock, offset, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cmd = sys.argv[sys.argv.index("--") + 1:]
t0 = time.monotonic()
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.devnull, "w"))
deadline = t0 + 600
while True:
    h = nbd.NBD()
    try:
        h.connect_unix(sock)
        break
    except nbd.Error as e:
        # Anything but "not listening yet" means the server refused us
        # (a refused handshake can also say ENOENT, so look at the socket).
        not_yet = not os.path.exists(sock) or e.errno == "ECONNREFUSED"
        if not not_yet or proc.poll() is not None:
            print("nan", proc.pid)
            sys.exit(0)
        if time.monotonic() > deadline:
            print("nan", proc.pid)
            sys.exit(0)
        time.sleep(0.001)
try:
    h.pread(length, offset)
    print("%.3f" % (time.monotonic() - t0), proc.pid, flush=True)
    h.shutdown()
except nbd.Error as e:
    print("nan", proc.pid, flush=True)
# Stay until the server is stopped: nbdkit exits when its parent does.
proc.wait()
