/* A RAM disk plugin for the cc plugin's tests (tests/native_plugins.rs):
 * size=BYTES sets its size; built with -DFILL=N it starts filled with N. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS
#include <nbdkit-plugin.h>

#ifndef FILL
#define FILL 0
#endif

static int64_t size = 1048576;
static unsigned char *disk;

static int
ramdisk_config (const char *key, const char *value)
{
  if (strcmp (key, "size") == 0) {
    size = nbdkit_parse_size (value);
    return size < 0 ? -1 : 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
ramdisk_get_ready (void)
{
  disk = malloc (size);
  if (disk == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  memset (disk, FILL, size);
  return 0;
}

static void *
ramdisk_open (int readonly)
{
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
ramdisk_get_size (void *handle)
{
  return size;
}

static int
ramdisk_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
               uint32_t flags)
{
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
ramdisk_pwrite (void *handle, const void *buf, uint32_t count,
                uint64_t offset, uint32_t flags)
{
  memcpy (disk + offset, buf, count);
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "ramdisk",
  .version = "1.0",
  .config = ramdisk_config,
  .get_ready = ramdisk_get_ready,
  .open = ramdisk_open,
  .get_size = ramdisk_get_size,
  .pread = ramdisk_pread,
  .pwrite = ramdisk_pwrite,
};

NBDKIT_REGISTER_PLUGIN (plugin)
