/* The C half of the ext2 filter: an io_manager through which libext2fs
 * reads and writes the filesystem image via the filter's next layer, and a
 * narrow open/read/write/flush/close API over one file of the filesystem.
 *
 * Why C: libext2fs's io_manager and io_channel are C structures whose
 * layout comes from <ext2fs/ext2_io.h>; building them here, against the
 * installed headers, keeps Rust from mirroring those layouts by hand.
 * Everything else (locking, errors, the backend interface) is in mod.rs.
 *
 * Not thread-safe: a filesystem is only used under its Rust owner's lock. */

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <et/com_err.h>
#include <ext2fs/ext2fs.h>

/* Callbacks into Rust: each returns 0 or an errno value. */
struct ext2shim_io {
  void *ctx;
  int (*pread) (void *ctx, void *buf, size_t len, uint64_t offset);
  int (*pwrite) (void *ctx, const void *buf, size_t len, uint64_t offset);
  int (*flush) (void *ctx);
};

struct ext2shim {
  ext2_filsys fs;
  ext2_file_t file;
  int writable;
};

static struct struct_io_manager shim_manager;

/* libext2fs passes the io_manager only the "device name" given to
 * ext2fs_open2, so the callbacks' address travels inside it. */
#define NAME_PREFIX "nbdkit-rs-ext2:"

static errcode_t
chan_open (const char *name, int flags, io_channel *out)
{
  void *p = NULL;
  io_channel ch;
  errcode_t err;
  (void) flags;

  if (strncmp (name, NAME_PREFIX, strlen (NAME_PREFIX)) != 0 ||
      sscanf (name + strlen (NAME_PREFIX), "%p", &p) != 1 || p == NULL)
    return EXT2_ET_BAD_DEVICE_NAME;
  err = ext2fs_get_memzero (sizeof *ch, &ch);
  if (err)
    return err;
  err = ext2fs_get_mem (strlen (name) + 1, &ch->name);
  if (err) {
    ext2fs_free_mem (&ch);
    return err;
  }
  strcpy (ch->name, name);
  ch->magic = EXT2_ET_MAGIC_IO_CHANNEL;
  ch->manager = &shim_manager;
  ch->block_size = 1024;
  ch->refcount = 1;
  ch->private_data = p;
  *out = ch;
  return 0;
}

static errcode_t
chan_close (io_channel ch)
{
  if (--ch->refcount > 0)
    return 0;
  ext2fs_free_mem (&ch->name);
  ext2fs_free_mem (&ch);
  return 0;
}

static errcode_t
chan_set_blksize (io_channel ch, int blksize)
{
  ch->block_size = blksize;
  return 0;
}

/* A negative count is a byte count; a positive one counts blocks. */
static size_t
span (io_channel ch, int count)
{
  return count < 0 ? (size_t) -(long) count
                   : (size_t) count * (size_t) ch->block_size;
}

static errcode_t
chan_read64 (io_channel ch, unsigned long long block, int count, void *data)
{
  const struct ext2shim_io *io = ch->private_data;
  return io->pread (io->ctx, data, span (ch, count),
                    block * (uint64_t) ch->block_size);
}

static errcode_t
chan_read (io_channel ch, unsigned long block, int count, void *data)
{
  return chan_read64 (ch, block, count, data);
}

static errcode_t
chan_write64 (io_channel ch, unsigned long long block, int count,
              const void *data)
{
  const struct ext2shim_io *io = ch->private_data;
  return io->pwrite (io->ctx, data, span (ch, count),
                     block * (uint64_t) ch->block_size);
}

static errcode_t
chan_write (io_channel ch, unsigned long block, int count, const void *data)
{
  return chan_write64 (ch, block, count, data);
}

static errcode_t
chan_write_byte (io_channel ch, unsigned long offset, int count,
                 const void *data)
{
  const struct ext2shim_io *io = ch->private_data;
  if (count < 0)
    return EINVAL;
  return io->pwrite (io->ctx, data, (size_t) count, offset);
}

static errcode_t
chan_flush (io_channel ch)
{
  const struct ext2shim_io *io = ch->private_data;
  return io->flush (io->ctx);
}

/* discard, zeroout, readahead, options and statistics are optional in an
 * io_manager: libext2fs checks for NULL and falls back or reports them
 * unimplemented. */
static struct struct_io_manager shim_manager = {
  .magic = EXT2_ET_MAGIC_IO_MANAGER,
  .name = "nbdkit-rs next layer",
  .open = chan_open,
  .close = chan_close,
  .set_blksize = chan_set_blksize,
  .read_blk = chan_read,
  .write_blk = chan_write,
  .flush = chan_flush,
  .write_byte = chan_write_byte,
  .read_blk64 = chan_read64,
  .write_blk64 = chan_write64,
};

static pthread_once_t error_table_once = PTHREAD_ONCE_INIT;

static void
load_error_table (void)
{
  initialize_ext2_error_table ();
}

const char *
ext2shim_strerror (long code)
{
  pthread_once (&error_table_once, load_error_table);
  return error_message (code);
}

/* The errno a libext2fs error code stands for, as near as there is one. */
int
ext2shim_errno (long code)
{
  if (code > 0 && code < 4096)
    return (int) code;          /* libext2fs passes errno values through */
  switch (code) {
  case EXT2_ET_FILE_NOT_FOUND:
    return ENOENT;
  case EXT2_ET_RO_FILSYS:
  case EXT2_ET_FILE_RO:
    return EROFS;
  case EXT2_ET_BLOCK_ALLOC_FAIL:
  case EXT2_ET_INODE_ALLOC_FAIL:
  case EXT2_ET_DIR_NO_SPACE:
  case EXT2_ET_TOOSMALL:
    return ENOSPC;
  case EXT2_ET_NO_MEMORY:
    return ENOMEM;
  case EXT2_ET_FILE_TOO_BIG:
    return EFBIG;
  default:
    return EIO;
  }
}

static void
say (char *why, size_t len, const char *what, const char *path, long code)
{
  if (path)
    snprintf (why, len, "%s: %s: %s", path, what, ext2shim_strerror (code));
  else
    snprintf (why, len, "%s: %s", what, ext2shim_strerror (code));
}

/* Open the filesystem reached through `io`, then `path` in it.  On
 * failure returns the error code and writes a sentence into `why`. */
long
ext2shim_open (const struct ext2shim_io *io, int writable, const char *path,
               struct ext2shim **out, char *why, size_t whylen)
{
  char name[64];
  ext2_filsys fs = NULL;
  ext2_ino_t ino;
  struct ext2_inode inode;
  ext2_file_t file;
  struct ext2shim *shim;
  errcode_t err;

  pthread_once (&error_table_once, load_error_table);
  snprintf (name, sizeof name, NAME_PREFIX "%p", (void *) io);
  err = ext2fs_open2 (name, NULL,
                      EXT2_FLAG_64BITS | (writable ? EXT2_FLAG_RW : 0),
                      0, 0, &shim_manager, &fs);
  if (err) {
    say (why, whylen, "cannot open the filesystem", NULL, err);
    return err;
  }
  /* libext2fs does not replay journals, and writing under a journal
   * that still holds transactions would let a later replay overwrite
   * the new data. */
  if (writable && ext2fs_has_feature_journal_needs_recovery (fs->super)) {
    snprintf (why, whylen,
              "the filesystem's journal needs recovery: run e2fsck on the "
              "image first, or serve it read-only (-r)");
    ext2fs_free (fs);
    return EXT2_ET_RO_FILSYS;
  }
  if (writable) {
    err = ext2fs_read_bitmaps (fs);
    if (err) {
      say (why, whylen, "reading the allocation bitmaps", NULL, err);
      ext2fs_free (fs);
      return err;
    }
  }
  err = ext2fs_namei_follow (fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path, &ino);
  if (!err)
    err = ext2fs_read_inode (fs, ino, &inode);
  if (err) {
    say (why, whylen, "cannot find it in the filesystem", path, err);
    ext2fs_free (fs);
    return err;
  }
  if (!LINUX_S_ISREG (inode.i_mode)) {
    snprintf (why, whylen, "%s: not a regular file", path);
    ext2fs_free (fs);
    return EXT2_ET_FILE_NOT_FOUND;
  }
  err = ext2fs_file_open (fs, ino, writable ? EXT2_FILE_WRITE : 0, &file);
  if (err) {
    say (why, whylen, "cannot open", path, err);
    ext2fs_free (fs);
    return err;
  }
  err = ext2fs_get_memzero (sizeof *shim, &shim);
  if (err) {
    ext2fs_file_close (file);
    ext2fs_free (fs);
    say (why, whylen, "out of memory", NULL, err);
    return err;
  }
  shim->fs = fs;
  shim->file = file;
  shim->writable = writable;
  *out = shim;
  return 0;
}

long
ext2shim_size (struct ext2shim *shim, uint64_t *size)
{
  __u64 s;
  errcode_t err = ext2fs_file_get_lsize (shim->file, &s);
  if (!err)
    *size = s;
  return err;
}

long
ext2shim_pread (struct ext2shim *shim, void *buf, size_t count,
                uint64_t offset)
{
  char *p = buf;
  errcode_t err = ext2fs_file_llseek (shim->file, offset, EXT2_SEEK_SET, NULL);
  while (!err && count > 0) {
    unsigned int want = count > (1u << 30) ? (1u << 30) : (unsigned) count;
    unsigned int got = 0;
    err = ext2fs_file_read (shim->file, p, want, &got);
    if (!err && got == 0)
      err = EXT2_ET_SHORT_READ;
    p += got;
    count -= got;
  }
  return err;
}

long
ext2shim_pwrite (struct ext2shim *shim, const void *buf, size_t count,
                 uint64_t offset)
{
  const char *p = buf;
  errcode_t err = ext2fs_file_llseek (shim->file, offset, EXT2_SEEK_SET, NULL);
  while (!err && count > 0) {
    unsigned int want = count > (1u << 30) ? (1u << 30) : (unsigned) count;
    unsigned int done = 0;
    err = ext2fs_file_write (shim->file, p, want, &done);
    if (!err && done == 0)
      err = EXT2_ET_SHORT_WRITE;
    p += done;
    count -= done;
  }
  return err;
}

/* The file's buffered block, then the inode, bitmaps, group descriptors
 * and superblock, then (through chan_flush) the layer below. */
long
ext2shim_flush (struct ext2shim *shim)
{
  errcode_t err = ext2fs_file_flush (shim->file);
  if (!err && shim->writable)
    err = ext2fs_flush (shim->fs);
  return err;
}

long
ext2shim_close (struct ext2shim *shim)
{
  errcode_t err = ext2fs_file_close (shim->file);
  errcode_t err2 = ext2fs_close2 (shim->fs, 0);
  if (err2)
    ext2fs_free (shim->fs);     /* ext2fs_close2 frees only on success */
  ext2fs_free_mem (&shim);
  return err ? err : err2;
}
