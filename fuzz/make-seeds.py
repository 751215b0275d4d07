#!/usr/bin/env python3
"""Write the seed corpus for the fuzz targets: well-formed NBD messages and
whole client sessions, so the fuzzer starts from valid protocol."""
import os, struct

IHAVEOPT = b"IHAVEOPT"
here = os.path.dirname(os.path.abspath(__file__))

def opt(o, payload=b""):
    return IHAVEOPT + struct.pack(">II", o, len(payload)) + payload

def go(name=b"", infos=(3,)):
    return opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))

def meta(set_, queries):
    p = struct.pack(">I", 0) + struct.pack(">I", len(queries))
    for q in queries:
        p += struct.pack(">I", len(q)) + q
    return opt(10 if set_ else 9, p)

def req(cmd, flags, cookie, off, length, ext=False):
    if ext:
        return struct.pack(">IHHQQQ", 0x21e41c71, flags, cmd, cookie, off, length)
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off, length)

def write(d, name, data):
    with open(os.path.join(here, "corpus", d, name), "wb") as f:
        f.write(data)

options = {
    "go": go(), "info": opt(6, go()[16:]), "list": opt(3), "sr": opt(8), "ext": opt(11),
    "meta_list": meta(False, [b"base:"]), "meta_set": meta(True, [b"base:allocation"]),
    "export_name": opt(1, b"disk"), "abort": opt(2), "starttls": opt(5),
}
for k, v in options.items():
    write("option_parse", k, v)

for i, r in enumerate([req(0, 0, 1, 0, 512), req(1, 1, 2, 4096, 4) + b"abcd", req(7, 8, 3, 0, 1 << 20),
                       req(6, 0x12, 4, 0, 65536, True), req(3, 0, 5, 0, 0), req(2, 0, 6, 0, 0)]):
    write("request_header", f"req{i}", r)

flags = struct.pack(">I", 3)
write("server_session", "simple", flags + opt(1, b"") + req(0, 0, 1, 0, 512) + req(1, 0, 2, 0, 4) + b"wxyz" + req(2, 0, 3, 0, 0))
write("server_session", "structured", flags + opt(8) + meta(True, [b"base:allocation"]) + go()
      + req(1, 1, 1, 512, 8) + b"12345678" + req(0, 4, 2, 0, 4096) + req(7, 0, 3, 0, 1 << 20)
      + req(6, 0x10, 4, 0, 65536) + req(4, 0, 5, 0, 4096) + req(5, 0, 6, 0, 4096) + req(3, 0, 7, 0, 0) + req(2, 0, 8, 0, 0))
write("server_session", "extended", flags + opt(11) + meta(True, [b"base:allocation"]) + go()
      + req(1, 0, 1, 0, 4, True) + b"abcd" + req(0, 0, 2, 0, 4, True) + req(7, 8, 3, 0, 1 << 20, True) + req(2, 0, 4, 0, 0, True))
write("server_session", "options", flags + opt(3) + meta(False, []) + opt(99, b"xx") + opt(5) + opt(6, go()[16:]) + opt(2))
