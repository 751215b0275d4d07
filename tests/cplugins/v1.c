/* A test plugin for nbdkit-rs's C plugin host, written against nbdkit's
 * API version 1: a 1 MiB RAM disk with the v1 data calls (no flags), and
 * errno_is_preserved.  Each call logs a debug line the test looks for.
 */
#define NBDKIT_API_VERSION 1
#include <nbdkit-plugin.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS

static unsigned char disk[1024 * 1024];

static void *
v1_open (int readonly)
{
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
v1_get_size (void *h)
{
  return sizeof disk;
}

static int
v1_pread (void *h, void *buf, uint32_t count, uint64_t offset)
{
  /* The last sector is unreadable, with errno telling why. */
  if (offset + count > sizeof disk - 512) {
    nbdkit_error ("v1test: sector at %lu is unreadable", (unsigned long) offset);
    errno = EIO;
    return -1;
  }
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
v1_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset)
{
  memcpy (disk + offset, buf, count);
  nbdkit_debug ("v1test: pwrite count=%u offset=%lu", count, (unsigned long) offset);
  return 0;
}

static int
v1_flush (void *h)
{
  nbdkit_debug ("v1test: flush");
  return 0;
}

static int
v1_trim (void *h, uint32_t count, uint64_t offset)
{
  memset (disk + offset, 0, count);
  nbdkit_debug ("v1test: trim count=%u offset=%lu", count, (unsigned long) offset);
  return 0;
}

static int
v1_zero (void *h, uint32_t count, uint64_t offset, int may_trim)
{
  memset (disk + offset, 0, count);
  nbdkit_debug ("v1test: zero count=%u offset=%lu may_trim=%d", count,
                (unsigned long) offset, may_trim);
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "v1test",
  .version = "1.0",
  .open = v1_open,
  .get_size = v1_get_size,
  .pread = v1_pread,
  .pwrite = v1_pwrite,
  .flush = v1_flush,
  .trim = v1_trim,
  .zero = v1_zero,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
