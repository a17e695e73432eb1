/* Unit tests for lib/kek.c: the KEK file and AES-256-GCM sealing. */
#include <errno.h>
#include <fcntl.h>
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

#include "meshlet/kek.h"

static char dir[64];

static void path_of(char *out, size_t len, const char *name)
{
	snprintf(out, len, "%s/%s", dir, name);
}

static void test_create_and_load(void **state)
{
	unsigned char a[KEK_LEN], b[KEK_LEN], zero[KEK_LEN] = {0};
	char p[128], q[128];
	struct meshlet_err err = {0};
	struct stat st;

	(void)state;
	path_of(p, sizeof(p), "kek1");
	path_of(q, sizeof(q), "kek2");
	assert_int_equal(kek_create(p, &err), 0);
	assert_int_equal(stat(p, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_int_equal(st.st_size, KEK_LEN);
	assert_int_equal(kek_load(p, a, &err), 0);
	assert_memory_not_equal(a, zero, KEK_LEN);
	/* never overwritten */
	assert_int_equal(kek_create(p, &err), -EEXIST);
	assert_non_null(strstr(err.message, "never overwritten"));
	assert_int_equal(kek_load(p, b, &err), 0);
	assert_memory_equal(a, b, KEK_LEN);
	/* two KEKs differ */
	assert_int_equal(kek_create(q, &err), 0);
	assert_int_equal(kek_load(q, b, &err), 0);
	assert_memory_not_equal(a, b, KEK_LEN);
}

static void write_file(const char *p, const void *data, size_t n, mode_t mode)
{
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, mode);

	assert_true(fd >= 0);
	assert_int_equal(write(fd, data, n), (ssize_t)n);
	assert_int_equal(fchmod(fd, mode), 0);
	close(fd);
}

static void test_load_refuses(void **state)
{
	unsigned char k[KEK_LEN];
	char buf[KEK_LEN + 1] = {0}, p[128], l[128];
	struct meshlet_err err = {0};

	(void)state;
	path_of(p, sizeof(p), "bad");
	write_file(p, buf, KEK_LEN, 0644);
	assert_int_equal(kek_load(p, k, &err), -EACCES);
	assert_non_null(strstr(err.message, "chmod 600"));
	write_file(p, buf, KEK_LEN - 1, 0600);
	assert_true(kek_load(p, k, &err) < 0);
	assert_non_null(strstr(err.message, "exactly 32 bytes"));
	write_file(p, buf, KEK_LEN + 1, 0600);
	assert_true(kek_load(p, k, &err) < 0);
	assert_non_null(strstr(err.message, "exactly 32 bytes"));
	write_file(p, buf, 0, 0600);
	assert_true(kek_load(p, k, &err) < 0);
	path_of(l, sizeof(l), "link");
	write_file(p, buf, KEK_LEN, 0600);
	assert_int_equal(symlink(p, l), 0);
	assert_true(kek_load(l, k, &err) < 0);
	assert_non_null(strstr(err.message, "symlink"));
	path_of(p, sizeof(p), "missing");
	assert_int_equal(kek_load(p, k, &err), -ENOENT);
	assert_int_equal(kek_load(dir, k, &err) < 0, 1);
}

static void test_seal_open(void **state)
{
	unsigned char k[KEK_LEN], other[KEK_LEN];
	static const char secret[] = "-----BEGIN PRIVATE KEY-----\nabc\n";
	char *s1, *s2, *plain = NULL;
	size_t n = 0;

	(void)state;
	memset(k, 7, sizeof(k));
	memset(other, 8, sizeof(other));
	s1 = kek_seal(k, "ca-key 0", secret, strlen(secret));
	s2 = kek_seal(k, "ca-key 0", secret, strlen(secret));
	assert_non_null(s1);
	assert_string_not_equal(s1, s2);                  /* a fresh nonce each time */
	assert_null(strstr(s1, "PRIVATE"));
	assert_int_equal(kek_open(k, "ca-key 0", s1, &plain, &n), 0);
	assert_int_equal(n, strlen(secret));
	assert_string_equal(plain, secret);
	free(plain);
	/* another KEK, another aad: refused, nothing returned */
	assert_int_equal(kek_open(other, "ca-key 0", s1, &plain, &n), -EBADMSG);
	assert_null(plain);
	assert_int_equal(kek_open(k, "ca-key 1", s1, &plain, &n), -EBADMSG);
	/* tampered: one hex digit of the ciphertext flipped */
	s2[40] = s2[40] == '0' ? '1' : '0';
	assert_int_equal(kek_open(k, "ca-key 0", s2, &plain, &n), -EBADMSG);
	/* not sealed values */
	assert_int_equal(kek_open(k, "ca-key 0", "plain text", &plain, &n), -EINVAL);
	assert_int_equal(kek_open(k, "ca-key 0", "aes-256-gcm:abc", &plain, &n), -EINVAL);
	assert_int_equal(kek_open(k, "ca-key 0", "aes-256-gcm:zz", &plain, &n), -EINVAL);
	assert_int_equal(kek_open(k, "ca-key 0", NULL, &plain, &n), -EINVAL);
	free(s1);
	free(s2);
	/* an empty secret seals too */
	s1 = kek_seal(k, "x", "", 0);
	assert_int_equal(kek_open(k, "x", s1, &plain, &n), 0);
	assert_int_equal(n, 0);
	free(plain);
	free(s1);
}

static int rm_all(void **state)
{
	char cmd[128];

	(void)state;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_create_and_load),
		cmocka_unit_test(test_load_refuses),
		cmocka_unit_test(test_seal_open),
	};

	umask(022);
	snprintf(dir, sizeof(dir), "/tmp/kek_test.XXXXXX");
	if (!mkdtemp(dir))
		return 1;
	return cmocka_run_group_tests(tests, NULL, rm_all);
}
