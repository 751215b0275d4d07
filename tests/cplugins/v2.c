/* A test plugin for nbdkit-rs's C plugin host, written against nbdkit's
 * API version 2: a RAM disk (size=) with native FUA, extents, an export
 * list, block size constraints, a debug flag, and errors reported with
 * nbdkit_error + nbdkit_set_error.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

NBDKIT_DLL_PUBLIC int v2test_debug_verbose;

static int64_t size = 1024 * 1024;
static unsigned char *disk;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const char *label;

static int
v2_config (const char *key, const char *value)
{
  if (strcmp (key, "size") == 0) {
    size = nbdkit_parse_size (value);
    if (size == -1)
      return -1;
  }
  else if (strcmp (key, "label") == 0)
    label = value;              /* kept as given: it must stay valid */
  else {
    nbdkit_error ("v2test: unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
v2_config_complete (void)
{
  disk = calloc (1, size);
  if (disk == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  return 0;
}

static int
v2_list_exports (int readonly, int is_tls, struct nbdkit_exports *exports)
{
  if (nbdkit_add_export (exports, "a", "the first export") == -1 ||
      nbdkit_add_export (exports, "b", NULL) == -1)
    return -1;
  return 0;
}

static const char *
v2_default_export (int readonly, int is_tls)
{
  return "a";
}

static void *
v2_open (int readonly)
{
  const char *name = nbdkit_export_name ();
  if (v2test_debug_verbose)
    nbdkit_debug ("v2test: open export '%s' readonly=%d", name, readonly);
  nbdkit_debug ("v2test: peer uid=%" PRIi64 " pid=%" PRIi64 " tls=%d",
                nbdkit_peer_uid (), nbdkit_peer_pid (), nbdkit_is_tls ());
  if (strcmp (name, "shutdown") == 0) {
    /* Asks the whole server to exit gracefully. */
    nbdkit_shutdown ();
    nbdkit_error ("v2test: shutting down as asked");
    nbdkit_set_error (ESHUTDOWN);
    return NULL;
  }
  if (strcmp (name, "a") != 0 && strcmp (name, "b") != 0 &&
      strcmp (name, "disconnect") != 0 && strcmp (name, "disconnect-now") != 0) {
    nbdkit_error ("v2test: no export named '%s'", name);
    nbdkit_set_error (ENOENT);
    return NULL;
  }
  /* The handle is the interned export name. */
  return (void *) nbdkit_strdup_intern (name);
}

static const char *
v2_export_description (void *h)
{
  return nbdkit_printf_intern ("export %s%s%s", (const char *) h,
                               label ? " " : "", label ? label : "");
}

static int64_t
v2_get_size (void *h)
{
  return size;
}

static int
v2_block_size (void *h, uint32_t *minimum, uint32_t *preferred,
               uint32_t *maximum)
{
  *minimum = 1;
  *preferred = 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int
v2_can_write (void *h)
{
  return 1;
}

static int
v2_can_fua (void *h)
{
  return NBDKIT_FUA_NATIVE;
}

static int
v2_can_multi_conn (void *h)
{
  return 1;
}

/* nbdkit 1.34; Debian's 1.32 headers do not declare it. */
extern void nbdkit_disconnect (int force);

static int
v2_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  /* The "disconnect" exports drop the client on a read at 512. */
  if (strncmp (h, "disconnect", 10) == 0 && offset == 512)
    nbdkit_disconnect (strcmp (h, "disconnect-now") == 0);
  pthread_mutex_lock (&lock);
  memcpy (buf, disk + offset, count);
  pthread_mutex_unlock (&lock);
  return 0;
}

static int
v2_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
           uint32_t flags)
{
  /* The second half of the disk refuses writes. */
  if (offset + count > size / 2) {
    nbdkit_error ("v2test: the second half is full (write at %" PRIu64 ")",
                  offset);
    nbdkit_set_error (ENOSPC);
    return -1;
  }
  pthread_mutex_lock (&lock);
  memcpy (disk + offset, buf, count);
  pthread_mutex_unlock (&lock);
  nbdkit_debug ("v2test: pwrite offset=%" PRIu64 " fua=%d", offset,
                !!(flags & NBDKIT_FLAG_FUA));
  return 0;
}

static int
v2_flush (void *h, uint32_t flags)
{
  nbdkit_debug ("v2test: flush");
  return 0;
}

static int
v2_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  /* Trims are refused with EPERM. */
  nbdkit_error ("v2test: trim is not allowed here");
  nbdkit_set_error (EPERM);
  return -1;
}

static int
v2_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  pthread_mutex_lock (&lock);
  memset (disk + offset, 0, count);
  pthread_mutex_unlock (&lock);
  nbdkit_debug ("v2test: zero offset=%" PRIu64 " may_trim=%d fast=%d", offset,
                !!(flags & NBDKIT_FLAG_MAY_TRIM),
                !!(flags & NBDKIT_FLAG_FAST_ZERO));
  return 0;
}

/* The first 64 KiB are data, the rest a hole. */
static int
v2_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
            struct nbdkit_extents *extents)
{
  if (offset < 65536) {
    if (nbdkit_add_extent (extents, 0, 65536, 0) == -1)
      return -1;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      return 0;
  }
  return nbdkit_add_extent (extents, 65536, size - 65536,
                            NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
}

static struct nbdkit_plugin plugin = {
  .name = "v2test",
  .longname = "nbdkit-rs API v2 test plugin",
  .version = "2.0",
  .description = "A RAM disk that reports errors",
  .config = v2_config,
  .config_complete = v2_config_complete,
  .config_help = "size=<SIZE>  disk size\nlabel=<TEXT> text for the export description",
  .magic_config_key = "size",
  .list_exports = v2_list_exports,
  .default_export = v2_default_export,
  .open = v2_open,
  .export_description = v2_export_description,
  .get_size = v2_get_size,
  .block_size = v2_block_size,
  .can_write = v2_can_write,
  .can_fua = v2_can_fua,
  .can_multi_conn = v2_can_multi_conn,
  .pread = v2_pread,
  .pwrite = v2_pwrite,
  .flush = v2_flush,
  .trim = v2_trim,
  .zero = v2_zero,
  .extents = v2_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
