/*
 * Whole-file reads and durable writes: the one place meshlet touches files
 * it must not lose or trust blindly (keys, certificates, tokens, policy
 * files, the admin token).
 *
 * Every function returns 0 or -errno and checks every step: a write is not
 * done until the data and the directory entry are on disk (fsync of the
 * file, close, rename, fsync of the directory). Nothing here logs; callers
 * say which file and why.
 */
#ifndef MESHLET_FILE_H
#define MESHLET_FILE_H

#include <stddef.h>
#include <sys/types.h>

enum file_read_flags {
	FILE_NOFOLLOW = 1 << 0, /* refuse a symlink as the last component (-ELOOP) */
	FILE_SECRET = 1 << 1,   /* refuse a file group or others may access (-EACCES) */
	FILE_STDIN = 1 << 2,    /* "-" means standard input (any size up to max) */
};

/*
 * Reads a whole regular file of at most max bytes into a malloc'd buffer
 * that is NUL-terminated (so text can be used as a string); *len (if not
 * NULL) gets the byte count. Errors: -EFBIG over max, -EINVAL not a regular
 * file, -EIO on a short read, or the errno of open/read. The caller frees
 * *data (and cleanses it first when it is secret).
 */
int file_read(const char *path, size_t max, unsigned flags, char **data, size_t *len);

/* The same, from an open descriptor (a pipe or stdin too), until EOF. */
int file_read_fd(int fd, size_t max, char **data, size_t *len);

/*
 * Creates path, which must not exist (-EEXIST), with mode, writes data,
 * fsyncs it and its directory. Never follows a symlink. On failure the
 * file is removed.
 */
int file_write_new(const char *path, mode_t mode, const void *data, size_t len);

/*
 * Replaces path with data atomically: a temporary file beside it (mode,
 * never through a link; a stale one from a crash is removed), write,
 * fsync, close, rename over path, fsync of the directory. Readers see the
 * old file or the new one, never a mix. On failure path is unchanged and
 * the temporary file is removed.
 */
int file_replace(const char *path, mode_t mode, const void *data, size_t len);

/* fsyncs a directory, so names created or renamed in it are durable. */
int file_sync_dir(const char *dir);

/* fsyncs the directory that holds path ("." for a bare name). */
int file_sync_parent(const char *path);

#endif
