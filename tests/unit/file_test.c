/* Unit tests for lib/file.c: real files in a fresh temporary directory. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "meshlet/file.h"

struct fixture {
	char dir[64];
	char path[PATH_MAX];
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	return remove(path);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	snprintf(f->dir, sizeof(f->dir), "/tmp/file_test.XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/data", f->dir);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	free(f);
	return 0;
}

static mode_t mode_of(const char *path)
{
	struct stat st;

	assert_int_equal(lstat(path, &st), 0);
	return st.st_mode & 07777;
}

static void test_write_new_then_read(void **state)
{
	struct fixture *f = *state;
	char *data;
	size_t len;

	assert_int_equal(file_write_new(f->path, 0600, "hello\n", 6), 0);
	assert_int_equal(mode_of(f->path), 0600);
	assert_int_equal(file_read(f->path, 6, 0, &data, &len), 0);
	assert_int_equal(len, 6);
	assert_string_equal(data, "hello\n");   /* NUL-terminated */
	free(data);
	/* Never overwrites. */
	assert_int_equal(file_write_new(f->path, 0600, "x", 1), -EEXIST);
	assert_int_equal(file_read(f->path, 100, 0, &data, NULL), 0);
	assert_string_equal(data, "hello\n");
	free(data);
}

static void test_read_limits(void **state)
{
	struct fixture *f = *state;
	char *data = (char *)1;

	assert_int_equal(file_write_new(f->path, 0644, "0123456789", 10), 0);
	assert_int_equal(file_read(f->path, 9, 0, &data, NULL), -EFBIG);
	assert_null(data);
	assert_int_equal(file_read(f->dir, 100, 0, &data, NULL), -EINVAL);
	assert_int_equal(file_read("/nonexistent/x", 100, 0, &data, NULL), -ENOENT);
	/* An empty file is a valid, empty string. */
	assert_int_equal(file_replace(f->path, 0644, "", 0), 0);
	assert_int_equal(file_read(f->path, 0, 0, &data, NULL), 0);
	assert_string_equal(data, "");
	free(data);
}

static void test_read_grows_past_first_buffer(void **state)
{
	struct fixture *f = *state;
	size_t n = 100000, len;
	char *big = malloc(n), *data;

	assert_non_null(big);
	for (size_t i = 0; i < n; i++)
		big[i] = (char)('a' + i % 26);
	assert_int_equal(file_write_new(f->path, 0600, big, n), 0);
	assert_int_equal(file_read(f->path, n, 0, &data, &len), 0);
	assert_int_equal(len, n);
	assert_memory_equal(data, big, n);
	free(data);
	assert_int_equal(file_read(f->path, n - 1, 0, &data, &len), -EFBIG);
	free(big);
}

static void test_secret_and_nofollow(void **state)
{
	struct fixture *f = *state;
	char link[PATH_MAX + 8];
	char *data;

	assert_int_equal(file_write_new(f->path, 0640, "key", 3), 0);
	assert_int_equal(file_read(f->path, 100, FILE_SECRET, &data, NULL), -EACCES);
	assert_int_equal(chmod(f->path, 0600), 0);
	assert_int_equal(file_read(f->path, 100, FILE_SECRET, &data, NULL), 0);
	free(data);
	snprintf(link, sizeof(link), "%s/link", f->dir);
	assert_int_equal(symlink(f->path, link), 0);
	assert_int_equal(file_read(link, 100, FILE_NOFOLLOW, &data, NULL), -ELOOP);
	assert_int_equal(file_read(link, 100, 0, &data, NULL), 0);
	free(data);
	/* A new file is never created through a link either. */
	assert_int_equal(unlink(f->path), 0);
	assert_int_equal(file_write_new(link, 0600, "x", 1), -EEXIST);
	assert_int_equal(access(f->path, F_OK), -1);
}

static void test_replace_is_atomic_and_exact_mode(void **state)
{
	struct fixture *f = *state;
	char tmp[PATH_MAX + 8];
	char *data;
	mode_t old = umask(077);

	snprintf(tmp, sizeof(tmp), "%s.tmp", f->path);
	assert_int_equal(file_replace(f->path, 0644, "one", 3), 0);
	assert_int_equal(mode_of(f->path), 0644);   /* the umask did not narrow it */
	/* A stale temporary file from a crash does not stop the next write. */
	assert_int_equal(file_write_new(tmp, 0600, "stale", 5), 0);
	assert_int_equal(file_replace(f->path, 0600, "two", 3), 0);
	assert_int_equal(access(tmp, F_OK), -1);
	assert_int_equal(file_read(f->path, 10, 0, &data, NULL), 0);
	assert_string_equal(data, "two");
	free(data);
	umask(old);
}

static void test_replace_failure_keeps_old(void **state)
{
	struct fixture *f = *state;
	char tmp[PATH_MAX + 8], *data;

	assert_int_equal(file_replace(f->path, 0600, "keep", 4), 0);
	/* A link planted at the temporary name is removed, never written through. */
	snprintf(tmp, sizeof(tmp), "%s.tmp", f->path);
	assert_int_equal(symlink("/etc/passwd", tmp), 0);
	assert_int_equal(file_replace(f->path, 0600, "new", 3), 0);
	assert_int_equal(file_read(f->path, 10, 0, &data, NULL), 0);
	assert_string_equal(data, "new");
	free(data);
	/* A directory that does not exist: an error, nothing written. */
	assert_int_equal(file_replace("/nonexistent/dir/file", 0600, "x", 1), -ENOENT);
}

static void test_read_fd_pipe(void **state)
{
	int p[2];
	char *data;
	size_t len;

	assert_int_equal(pipe(p), 0);
	assert_int_equal(write(p[1], "abc", 3), 3);
	close(p[1]);
	assert_int_equal(file_read_fd(p[0], 3, &data, &len), 0);
	assert_int_equal(len, 3);
	assert_string_equal(data, "abc");
	free(data);
	close(p[0]);
	assert_int_equal(pipe(p), 0);
	assert_int_equal(write(p[1], "abcd", 4), 4);
	close(p[1]);
	assert_int_equal(file_read_fd(p[0], 3, &data, &len), -EFBIG);
	close(p[0]);
}

static void test_sync_parent(void **state)
{
	struct fixture *f = *state;

	assert_int_equal(file_sync_parent(f->path), 0);
	assert_int_equal(file_sync_parent("/etc"), 0);
	assert_int_equal(file_sync_parent("bare-name"), 0);
	assert_int_equal(file_sync_dir("/nonexistent"), -ENOENT);
	assert_int_equal(file_sync_parent("/nonexistent/x"), -ENOENT);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_write_new_then_read, setup, teardown),
		cmocka_unit_test_setup_teardown(test_read_limits, setup, teardown),
		cmocka_unit_test_setup_teardown(test_read_grows_past_first_buffer, setup, teardown),
		cmocka_unit_test_setup_teardown(test_secret_and_nofollow, setup, teardown),
		cmocka_unit_test_setup_teardown(test_replace_is_atomic_and_exact_mode, setup, teardown),
		cmocka_unit_test_setup_teardown(test_replace_failure_keeps_old, setup, teardown),
		cmocka_unit_test(test_read_fd_pipe),
		cmocka_unit_test_setup_teardown(test_sync_parent, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
