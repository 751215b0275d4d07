# A 1 MiB RAM disk as an nbdkit Python plugin (tests/language_plugins.rs).
import nbdkit

API_VERSION = 2
disk = bytearray(1024 * 1024)


def list_exports(readonly, is_tls):
    return [("first", "the first export"), "second"]


def default_export(readonly, is_tls):
    return "first"


def open(readonly):
    return {}


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def can_extents(h):
    return True


def extents(h, count, offset, flags):
    # The first half is data, the second a hole.
    half = len(disk) // 2
    return [(0, half, 0),
            (half, half, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)]
