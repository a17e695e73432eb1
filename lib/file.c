/* Whole-file reads and durable writes (see include/meshlet/file.h). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "meshlet/file.h"

/* Reads exactly want bytes unless EOF comes first; returns the count or -errno. */
static ssize_t read_upto(int fd, char *buf, size_t want)
{
	size_t got = 0;

	while (got < want) {
		ssize_t n = read(fd, buf + got, want - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

/*
 * Reads until EOF into a buffer that grows, refusing more than max bytes.
 * One byte past max is read to tell "exactly max" from "too big".
 */
int file_read_fd(int fd, size_t max, char **data, size_t *len)
{
	size_t cap = max < 8192 ? max : 8192, used = 0;
	char *buf = malloc(cap + 2), *nb;
	ssize_t n;

	*data = NULL;
	if (!buf)
		return -ENOMEM;
	for (;;) {
		n = read_upto(fd, buf + used, cap + 1 - used);
		if (n < 0) {
			free(buf);
			return (int)n;
		}
		used += (size_t)n;
		if (used > max) {
			free(buf);
			return -EFBIG;
		}
		if (used <= cap)
			break;  /* EOF before the buffer filled */
		cap = cap * 2 > max ? max : cap * 2;
		nb = realloc(buf, cap + 2);
		if (!nb) {
			free(buf);
			return -ENOMEM;
		}
		buf = nb;
	}
	buf[used] = '\0';
	*data = buf;
	if (len)
		*len = used;
	return 0;
}

/* Checks what fstat says against the flags and the size limit. */
static int check_stat(int fd, size_t max, unsigned flags)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	if ((flags & FILE_SECRET) && (st.st_mode & 077))
		return -EACCES;
	if ((unsigned long long)st.st_size > max)
		return -EFBIG;
	return 0;
}

int file_read(const char *path, size_t max, unsigned flags, char **data, size_t *len)
{
	int fd, r;

	*data = NULL;
	if ((flags & FILE_STDIN) && strcmp(path, "-") == 0)
		return file_read_fd(STDIN_FILENO, max, data, len);
	fd = open(path, O_RDONLY | O_CLOEXEC | ((flags & FILE_NOFOLLOW) ? O_NOFOLLOW : 0));
	if (fd < 0)
		return -errno;
	r = check_stat(fd, max, flags);
	/* The size is checked again while reading: the file may grow meanwhile. */
	if (r == 0)
		r = file_read_fd(fd, max, data, len);
	close(fd);
	return r;
}

/* Writes all of data, retrying short writes and EINTR. */
static int write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Writes, fsyncs and closes fd; a close() error counts (NFS reports late). */
static int write_sync_close(int fd, const void *data, size_t len)
{
	int r = write_all(fd, data, len);

	if (r == 0 && fsync(fd) < 0)
		r = -errno;
	if (close(fd) < 0 && r == 0)
		r = -errno;
	return r;
}

int file_sync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int r = 0;

	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	return r;
}

int file_sync_parent(const char *path)
{
	char dir[PATH_MAX];
	const char *slash = strrchr(path, '/');

	if (!slash)
		return file_sync_dir(".");
	if (slash == path)
		return file_sync_dir("/");
	if ((size_t)(slash - path) >= sizeof(dir))
		return -ENAMETOOLONG;
	memcpy(dir, path, (size_t)(slash - path));
	dir[slash - path] = '\0';
	return file_sync_dir(dir);
}

int file_write_new(const char *path, mode_t mode, const void *data, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	int r;

	if (fd < 0)
		return -errno;
	r = write_sync_close(fd, data, len);
	if (r == 0)
		r = file_sync_parent(path);
	if (r)
		unlink(path);
	return r;
}

/* Opens path's temporary sibling, removing a stale one left by a crash. */
static int open_temp(const char *tmp, mode_t mode)
{
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);

	if (fd < 0 && errno == EEXIST) {
		if (unlink(tmp) < 0)
			return -errno;
		fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	}
	if (fd < 0)
		return -errno;
	/* The umask may have narrowed mode; the file must have exactly mode. */
	if (fchmod(fd, mode) < 0) {
		int e = -errno;

		close(fd);
		unlink(tmp);
		return e;
	}
	return fd;
}

int file_replace(const char *path, mode_t mode, const void *data, size_t len)
{
	char tmp[PATH_MAX];
	int fd, r;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	fd = open_temp(tmp, mode);
	if (fd < 0)
		return fd;
	r = write_sync_close(fd, data, len);
	if (r == 0 && rename(tmp, path) < 0)
		r = -errno;
	if (r) {
		unlink(tmp);
		return r;
	}
	return file_sync_parent(path);
}
