/* The variadic part of the nbdkit plugin API.  Stable Rust cannot define
 * C-variadic functions, so these format the message here and hand the
 * finished string to Rust (cplugin_shim_error / cplugin_shim_debug in
 * ffi.rs).  errno is preserved across every function, as plugins rely on
 * it: `nbdkit_error ("pread: %m"); return -1;` must leave errno for the
 * server to read.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>

extern void cplugin_shim_error (const char *msg);
extern void cplugin_shim_debug (const char *msg);
extern const char *nbdkit_strdup_intern (const char *str);
extern void nbdkit_set_error (int err);

/* Format with vasprintf (glibc's %m reads errno, which is still the
 * caller's here).  NULL if out of memory. */
static char *
format (const char *fs, va_list args)
{
  char *msg = NULL;
  if (fs == NULL)
    return NULL;
  if (vasprintf (&msg, fs, args) < 0)
    return NULL;
  return msg;
}

void
nbdkit_verror (const char *fs, va_list args)
{
  int saved = errno;
  char *msg = format (fs, args);
  cplugin_shim_error (msg ? msg : (fs ? fs : "(null error message)"));
  free (msg);
  errno = saved;
}

void
nbdkit_error (const char *fs, ...)
{
  va_list args;
  va_start (args, fs);
  nbdkit_verror (fs, args);
  va_end (args);
}

void
nbdkit_vdebug (const char *fs, va_list args)
{
  int saved = errno;
  char *msg = format (fs, args);
  if (msg)
    cplugin_shim_debug (msg);
  free (msg);
  errno = saved;
}

void
nbdkit_debug (const char *fs, ...)
{
  va_list args;
  va_start (args, fs);
  nbdkit_vdebug (fs, args);
  va_end (args);
}

const char *
nbdkit_vprintf_intern (const char *fs, va_list args)
{
  int saved = errno;
  const char *r;
  char *msg = format (fs, args);
  if (msg == NULL) {
    errno = saved;
    nbdkit_error ("nbdkit_vprintf_intern: cannot format the string");
    nbdkit_set_error (ENOMEM);
    errno = ENOMEM;
    return NULL;
  }
  r = nbdkit_strdup_intern (msg);
  free (msg);
  if (r != NULL)
    errno = saved;
  return r;
}

const char *
nbdkit_printf_intern (const char *fs, ...)
{
  va_list args;
  const char *r;
  va_start (args, fs);
  r = nbdkit_vprintf_intern (fs, args);
  va_end (args);
  return r;
}
