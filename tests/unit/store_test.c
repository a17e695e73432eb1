/*
 * Unit tests for lib/store*.c: the same tests on both backends, SQLite (a
 * real file in a fresh temporary directory) and etcd (a real etcd started
 * once for the group, a fresh key prefix per test); then the SQLite file's
 * own cases.
 */
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
#include <sqlite3.h>

#include "meshlet/store.h"
#include "etcd_fixture.h"

struct fixture {
	char dir[64];
	char path[PATH_MAX];
	struct store *s;
	/* etcd: the prefix of this test; revisions count from base (the
	 * cluster's revision when the test started; 0 on SQLite). */
	char prefix[64];
	int64_t base;
};

static struct etcd_fixture etcd;   /* the etcd group's member */
static int etcd_tests;              /* tests run on it, for fresh prefixes */

/* Revision n of this test: base + n (etcd's revision is cluster-wide). */
#define REV(n) (f->base + (n))

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	return remove(path);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	struct meshlet_err err = {0};

	assert_non_null(f);
	snprintf(f->dir, sizeof(f->dir), "/tmp/store_test.XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/state.db", f->dir);
	assert_int_equal(store_open(&f->s, f->path, &err), 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	store_close(f->s);
	nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	free(f);
	return 0;
}

static int open_etcd(struct fixture *f)
{
	struct store_etcd_opts o = { .endpoints = etcd.url, .prefix = f->prefix };
	struct meshlet_err err = {0};
	int r = store_open_etcd(&f->s, &o, &err);

	if (r)
		fprintf(stderr, "store_open_etcd: %s\n", err.message);
	return r;
}

static int setup_etcd(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	snprintf(f->prefix, sizeof(f->prefix), "/test%d/", ++etcd_tests);
	assert_int_equal(open_etcd(f), 0);
	assert_int_equal(store_revision(f->s, &f->base), 0);
	*state = f;
	return 0;
}

static int teardown_etcd(void **state)
{
	struct fixture *f = *state;

	store_close(f->s);
	free(f);
	return 0;
}

static int group_setup_etcd(void **state)
{
	(void)state;
	return etcd_fixture_start(&etcd);
}

static int group_teardown_etcd(void **state)
{
	(void)state;
	etcd_fixture_stop(&etcd);
	return 0;
}

static void reopen(struct fixture *f)
{
	struct meshlet_err err = {0};

	store_close(f->s);
	f->s = NULL;
	if (f->prefix[0])
		assert_int_equal(open_etcd(f), 0);
	else
		assert_int_equal(store_open(&f->s, f->path, &err), 0);
}

/* Asserts key holds the string want at revision rev. */
static void assert_value(struct store *s, const char *key, const char *want, int64_t rev)
{
	char *v = NULL;
	size_t len = 0;
	int64_t r = 0;

	assert_int_equal(store_get(s, key, &v, &len, &r), 0);
	assert_int_equal(len, strlen(want));
	assert_string_equal(v, want);
	assert_int_equal(r, rev);
	free(v);
}

static int put_str(struct store *s, const char *key, const char *v, int64_t *rev)
{
	return store_put(s, key, v, strlen(v), rev);
}

static void test_revisions_grow(void **state)
{
	struct fixture *f = *state;
	struct store *s = f->s;
	int64_t rev = -1, r1, r2, r3;

	assert_int_equal(store_revision(s, &rev), 0);
	assert_int_equal(rev, REV(0));
	assert_int_equal(put_str(s, "policies/orders", "{\"v\":1}", &r1), 0);
	assert_int_equal(put_str(s, "policies/payments", "{}", &r2), 0);
	assert_int_equal(put_str(s, "policies/orders", "{\"v\":2}", &r3), 0);
	assert_int_equal(r1, REV(1));
	assert_int_equal(r2, REV(2));
	assert_int_equal(r3, REV(3));
	assert_value(s, "policies/orders", "{\"v\":2}", REV(3));
	assert_value(s, "policies/payments", "{}", REV(2));
	assert_int_equal(store_revision(s, &rev), 0);
	assert_int_equal(rev, REV(3));
}

static void test_get_missing_and_bad_keys(void **state)
{
	struct store *s = ((struct fixture *)*state)->s;
	char longkey[STORE_KEY_MAX + 2];
	char *v = (char *)"untouched";

	assert_int_equal(store_get(s, "nope", &v, NULL, NULL), -ENOENT);
	assert_string_equal(v, "untouched");
	assert_int_equal(put_str(s, "", "x", NULL), -EINVAL);
	assert_int_equal(put_str(s, "has space", "x", NULL), -EINVAL);
	assert_int_equal(put_str(s, "tab\tkey", "x", NULL), -EINVAL);
	assert_int_equal(put_str(s, "caf\xc3\xa9", "x", NULL), -EINVAL);
	assert_int_equal(put_str(s, NULL, "x", NULL), -EINVAL);
	memset(longkey, 'k', sizeof(longkey));
	longkey[STORE_KEY_MAX] = '\0';
	assert_int_equal(put_str(s, longkey, "x", NULL), 0);
	longkey[STORE_KEY_MAX] = 'k';
	longkey[STORE_KEY_MAX + 1] = '\0';
	assert_int_equal(put_str(s, longkey, "x", NULL), -EINVAL);
	assert_int_equal(store_get(s, "", &v, NULL, NULL), -EINVAL);
}

static void test_values_are_bytes(void **state)
{
	struct store *s = ((struct fixture *)*state)->s;
	static const char bin[] = { 'a', '\0', 'b', '\xff' };
	char *big = calloc(1, STORE_VALUE_MAX + 1);
	char *v = NULL;
	size_t len = 1;

	assert_non_null(big);
	assert_int_equal(store_put(s, "bin", bin, sizeof(bin), NULL), 0);
	assert_int_equal(store_get(s, "bin", &v, &len, NULL), 0);
	assert_int_equal(len, sizeof(bin));
	assert_memory_equal(v, bin, sizeof(bin));
	assert_int_equal(v[len], '\0');
	free(v);
	assert_int_equal(store_put(s, "empty", NULL, 0, NULL), 0);
	assert_int_equal(store_get(s, "empty", &v, &len, NULL), 0);
	assert_int_equal(len, 0);
	assert_string_equal(v, "");
	free(v);
	assert_int_equal(store_put(s, "big", big, STORE_VALUE_MAX, NULL), 0);
	assert_int_equal(store_put(s, "big", big, STORE_VALUE_MAX + 1, NULL), -E2BIG);
	assert_int_equal(store_get(s, "big", NULL, &len, NULL), 0);
	assert_int_equal(len, STORE_VALUE_MAX);
	free(big);
}

static void test_cas(void **state)
{
	struct store *s = ((struct fixture *)*state)->s;
	int64_t r1, r2, r = 0;

	/* create-only */
	assert_int_equal(store_cas(s, "tokens/ab", 0, "u=2", 3, &r1), 0);
	assert_int_equal(store_cas(s, "tokens/ab", 0, "u=9", 3, &r), -ECANCELED);
	assert_value(s, "tokens/ab", "u=2", r1);
	/* success at the current revision */
	assert_int_equal(store_cas(s, "tokens/ab", r1, "u=1", 3, &r2), 0);
	assert_true(r2 > r1);
	assert_value(s, "tokens/ab", "u=1", r2);
	/* conflict at a stale revision: nothing written, counter unchanged */
	assert_int_equal(store_cas(s, "tokens/ab", r1, "u=0", 3, &r), -ECANCELED);
	assert_value(s, "tokens/ab", "u=1", r2);
	assert_int_equal(store_revision(s, &r), 0);
	assert_int_equal(r, r2);
	/* a revision on a missing key, a negative expectation */
	assert_int_equal(store_cas(s, "tokens/none", r2, "x", 1, NULL), -ECANCELED);
	assert_int_equal(store_get(s, "tokens/none", NULL, NULL, NULL), -ENOENT);
	assert_int_equal(store_cas(s, "tokens/ab", -1, "x", 1, NULL), -EINVAL);
}

static void test_delete(void **state)
{
	struct store *s = ((struct fixture *)*state)->s;
	int64_t r1, r2, r3 = 0;

	assert_int_equal(store_delete(s, "certs/00", STORE_REV_ANY, NULL), -ENOENT);
	assert_int_equal(put_str(s, "certs/aa", "{}", &r1), 0);
	assert_int_equal(put_str(s, "certs/bb", "{}", &r2), 0);
	assert_int_equal(store_delete(s, "certs/aa", 0, NULL), -EINVAL);
	assert_int_equal(store_delete(s, "certs/aa", r1 + 100, NULL), -ECANCELED);
	assert_value(s, "certs/aa", "{}", r1);
	assert_int_equal(store_delete(s, "certs/aa", r1, &r3), 0);
	assert_int_equal(r3, r2 + 1); /* deletes advance the counter */
	assert_int_equal(store_get(s, "certs/aa", NULL, NULL, NULL), -ENOENT);
	assert_int_equal(store_delete(s, "certs/bb", STORE_REV_ANY, &r3), 0);
	assert_int_equal(r3, r2 + 2);
	assert_int_equal(store_delete(s, "certs/bb", STORE_REV_ANY, NULL), -ENOENT);
	/* a deleted key can be created again with create-only CAS */
	assert_int_equal(store_cas(s, "certs/aa", 0, "{}", 2, NULL), 0);
}

/* Lists prefix and compares the keys, in order, with want (NULL-terminated). */
static void assert_list(struct store *s, const char *prefix, const char *const *want)
{
	struct store_entry *e = NULL;
	size_t n = 99, i;

	assert_int_equal(store_list(s, prefix, &e, &n, NULL), 0);
	for (i = 0; want[i]; i++) {
		assert_true(i < n);
		assert_string_equal(e[i].key, want[i]);
	}
	assert_int_equal(n, i);
	if (n == 0)
		assert_null(e);
	store_entries_free(e, n);
}

static void test_list_prefix(void **state)
{
	static const char *const keys[] = { "b/1", "a", "a/2", "ab", "a/1", "b", "a~~", "A", NULL };
	static const char *const all[] = { "A", "a", "a/1", "a/2", "ab", "a~~", "b", "b/1", NULL };
	static const char *const a[] = { "a", "a/1", "a/2", "ab", "a~~", NULL };
	static const char *const a_slash[] = { "a/1", "a/2", NULL };
	static const char *const b[] = { "b", "b/1", NULL };
	static const char *const tilde[] = { "a~~", NULL };
	static const char *const none[] = { NULL };
	struct fixture *f = *state;
	struct store *s = f->s;
	struct store_entry *e = NULL;
	int64_t rev = 0;
	size_t i, n = 0;

	for (i = 0; keys[i]; i++)
		assert_int_equal(put_str(s, keys[i], keys[i], NULL), 0);
	assert_list(s, "", all);
	assert_list(s, "a", a);
	assert_list(s, "a/", a_slash);
	assert_list(s, "b", b);
	assert_list(s, "a~", tilde);
	assert_list(s, "c", none);
	assert_list(s, "a/3", none);
	assert_int_equal(store_list(s, "a/", &e, &n, &rev), 0);
	assert_int_equal(rev, REV(8));
	assert_int_equal(e[0].revision, REV(5));
	assert_int_equal(e[0].len, 3);
	assert_string_equal(e[0].value, "a/1");
	store_entries_free(e, n);
	assert_int_equal(store_list(s, "bad prefix", &e, &n, NULL), -EINVAL);
	assert_null(e);
	assert_int_equal(n, 0);
}

static void test_apply_batch(void **state)
{
	struct store *s = ((struct fixture *)*state)->s;
	int64_t tok_rev, rev = 0, before = 0;
	struct store_op ops[3] = {
		{ STORE_OP_PUT, "tokens/t1", "uses=0", 6, 0 },
		{ STORE_OP_PUT, "certs/4a", "{\"service\":\"orders\"}", 20, 0 },
		{ STORE_OP_DELETE, "endpoints/orders/p1", NULL, 0, STORE_REV_ANY },
	};

	assert_int_equal(put_str(s, "tokens/t1", "uses=1", &tok_rev), 0);
	assert_int_equal(put_str(s, "endpoints/orders/p1", "10.0.0.2:15006", NULL), 0);
	ops[0].expected = tok_rev;
	/* a stale condition anywhere: nothing is written */
	ops[1].expected = 7;
	assert_int_equal(store_apply(s, ops, 3, &rev), -ECANCELED);
	assert_int_equal(store_get(s, "certs/4a", NULL, NULL, NULL), -ENOENT);
	assert_value(s, "tokens/t1", "uses=1", tok_rev);
	ops[1].expected = 0;
	assert_int_equal(store_revision(s, &before), 0);
	assert_int_equal(store_apply(s, ops, 3, &rev), 0);
	assert_int_equal(rev, before + 1); /* one revision for the whole batch */
	assert_value(s, "tokens/t1", "uses=0", rev);
	assert_value(s, "certs/4a", "{\"service\":\"orders\"}", rev);
	assert_int_equal(store_get(s, "endpoints/orders/p1", NULL, NULL, NULL), -ENOENT);
	/* a delete of a missing key aborts the batch */
	ops[0].expected = rev;
	ops[1].expected = STORE_REV_ANY;
	assert_int_equal(store_apply(s, ops, 3, NULL), -ENOENT);
	assert_value(s, "tokens/t1", "uses=0", rev);
	/* malformed batches */
	ops[2] = ops[0];
	assert_int_equal(store_apply(s, ops, 3, NULL), -EINVAL); /* duplicate key */
	assert_int_equal(store_apply(s, ops, 0, NULL), -EINVAL);
	assert_int_equal(store_apply(s, ops, STORE_BATCH_MAX + 1, NULL), -EINVAL);
}

struct observed {
	int calls[STORE_CALL_COUNT];
	double slowest;
};

static void observer(void *arg, enum store_call call, double seconds)
{
	struct observed *o = arg;

	assert_true(call >= 0 && call < STORE_CALL_COUNT);
	assert_true(seconds >= 0 && seconds < 60);
	o->calls[call]++;
	if (seconds > o->slowest)
		o->slowest = seconds;
}

/* Every public entry point is timed once, failed calls included; the
 * writes that are batches of one (put, cas, delete) count as one apply. */
static void test_observer_times_each_call(void **state)
{
	struct store *s = ((struct fixture *)*state)->s;
	struct observed o = {0};
	struct store_entry *e = NULL;
	size_t n = 0;

	store_set_observer(s, observer, &o);
	assert_int_equal(put_str(s, "a/1", "x", NULL), 0);
	assert_int_equal(store_cas(s, "a/1", 99, "y", 1, NULL), -ECANCELED);
	assert_int_equal(store_delete(s, "a/1", STORE_REV_ANY, NULL), 0);
	assert_int_equal(store_get(s, "a/1", NULL, NULL, NULL), -ENOENT);
	assert_int_equal(store_get(s, "bad key", NULL, NULL, NULL), -EINVAL);
	assert_int_equal(store_list(s, "a/", &e, &n, NULL), 0);
	store_entries_free(e, n);
	assert_int_equal(o.calls[STORE_CALL_APPLY], 3);
	assert_int_equal(o.calls[STORE_CALL_GET], 2);
	assert_int_equal(o.calls[STORE_CALL_LIST], 1);
	assert_true(o.slowest > 0);
	/* NULL: nobody is told any more */
	store_set_observer(s, NULL, NULL);
	assert_int_equal(put_str(s, "a/2", "x", NULL), 0);
	assert_int_equal(o.calls[STORE_CALL_APPLY], 3);
}

/* One holder at a time; closing hands the lock over at once. */
static void test_lock_one_holder(void **state)
{
	struct fixture *f = *state, g = {0};

	assert_int_equal(store_lock_hold(f->s, "locks/gc", 30), 1);
	assert_int_equal(store_lock_hold(f->s, "locks/gc", 30), 1);   /* kept */
	assert_int_equal(store_lock_hold(f->s, "bad key", 30), -EINVAL);
	if (!f->prefix[0])
		return;                   /* SQLite: one process, always the holder */
	memcpy(g.prefix, f->prefix, sizeof(g.prefix));
	assert_int_equal(open_etcd(&g), 0);
	assert_int_equal(store_lock_hold(g.s, "locks/gc", 30), 0);
	assert_int_equal(store_lock_hold(g.s, "locks/other", 30), 1);
	store_close(f->s);           /* revokes its lease */
	f->s = NULL;
	assert_int_equal(store_lock_hold(g.s, "locks/gc", 30), 1);
	f->s = g.s;
}

static void test_reopen_keeps_everything(void **state)
{
	struct fixture *f = *state;
	int64_t rev = 0, r;

	assert_int_equal(put_str(f->s, "ca/roots", "[\"pem\"]", NULL), 0);
	assert_int_equal(put_str(f->s, "policies/orders", "{}", NULL), 0);
	assert_int_equal(put_str(f->s, "gone", "x", NULL), 0);
	assert_int_equal(store_delete(f->s, "gone", STORE_REV_ANY, &rev), 0);
	reopen(f);
	assert_value(f->s, "ca/roots", "[\"pem\"]", REV(1));
	assert_value(f->s, "policies/orders", "{}", REV(2));
	assert_int_equal(store_get(f->s, "gone", NULL, NULL, NULL), -ENOENT);
	assert_int_equal(store_revision(f->s, &r), 0);
	assert_int_equal(r, rev);
	assert_int_equal(put_str(f->s, "policies/orders", "{\"x\":1}", &r), 0);
	assert_int_equal(r, rev + 1);
	reopen(f);
	assert_value(f->s, "policies/orders", "{\"x\":1}", rev + 1);
}

/* Two handles on one file behave like two processes: CAS decides. */
static void test_two_handles(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct store *other = NULL;
	int64_t r0, r1, r2 = 0;

	assert_int_equal(store_open(&other, f->path, &err), 0);
	assert_int_equal(put_str(f->s, "policies/orders", "v1", &r0), 0);
	assert_int_equal(store_cas(other, "policies/orders", r0, "v2", 2, &r1), 0);
	assert_int_equal(store_cas(f->s, "policies/orders", r0, "v3", 2, &r2), -ECANCELED);
	assert_value(f->s, "policies/orders", "v2", r1);
	assert_int_equal(put_str(f->s, "x", "y", &r2), 0);
	assert_int_equal(r2, r1 + 1);
	store_close(other);
}

static void test_file_mode_0600(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	char wal[PATH_MAX + 8];
	struct stat st;

	assert_int_equal(put_str(f->s, "k", "v", NULL), 0);
	assert_int_equal(stat(f->path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);
	snprintf(wal, sizeof(wal), "%s-wal", f->path);
	assert_int_equal(stat(wal, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);
	/* a file others may read is refused, with a message saying what to do */
	store_close(f->s);
	f->s = NULL;
	assert_int_equal(chmod(f->path, 0644), 0);
	assert_int_equal(store_open(&f->s, f->path, &err), -EACCES);
	assert_null(f->s);
	assert_non_null(strstr(err.message, "chmod 600"));
	assert_int_equal(chmod(f->path, 0600), 0);
	reopen(f);
}

static void test_symlink_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	char link[PATH_MAX + 8];
	struct store *s = NULL;

	snprintf(link, sizeof(link), "%s/link.db", f->dir);
	assert_int_equal(symlink(f->path, link), 0);
	assert_true(store_open(&s, link, &err) < 0);
	assert_null(s);
	assert_true(err.message[0] != '\0');
}

/* Overwrites len bytes at off in path with garbage. */
static void scribble(const char *path, off_t off, size_t len)
{
	char junk[512];
	int fd = open(path, O_WRONLY);

	assert_true(len <= sizeof(junk));
	memset(junk, 0xa5, len);
	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, junk, len, off), (ssize_t)len);
	close(fd);
}

static void test_damaged_header_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct stat before, after;

	assert_int_equal(put_str(f->s, "policies/orders", "{}", NULL), 0);
	store_close(f->s);
	f->s = NULL;
	scribble(f->path, 0, 100);
	assert_int_equal(stat(f->path, &before), 0);
	assert_int_equal(store_open(&f->s, f->path, &err), -EIO);
	assert_null(f->s);
	assert_non_null(strstr(err.message, "damaged"));
	/* not re-initialised: the file is untouched */
	assert_int_equal(stat(f->path, &after), 0);
	assert_int_equal(after.st_size, before.st_size);
	assert_int_equal(store_open(&f->s, f->path, &err), -EIO);
}

static void test_damaged_page_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	char key[32];
	int i;

	for (i = 0; i < 50; i++) {
		snprintf(key, sizeof(key), "k/%03d", i);
		assert_int_equal(put_str(f->s, key, "some value of some length", NULL), 0);
	}
	store_close(f->s);
	f->s = NULL;
	scribble(f->path, 4096, 200); /* page 2: a b-tree page header */
	assert_int_equal(store_open(&f->s, f->path, &err), -EIO);
	assert_non_null(strstr(err.message, "damaged"));
}

static void test_newer_schema_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	sqlite3 *db = NULL;

	store_close(f->s);
	f->s = NULL;
	assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "INSERT INTO schema_version VALUES (99, 0)", NULL,
	                              NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	assert_int_equal(store_open(&f->s, f->path, &err), -EPROTONOSUPPORT);
	assert_null(f->s);
	assert_non_null(strstr(err.message, "newer"));
}

static void test_schema_recorded(void **state)
{
	struct fixture *f = *state;
	sqlite3_stmt *st = NULL;
	sqlite3 *db = NULL;

	assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, "SELECT max(version) FROM schema_version", -1,
	                                    &st, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(st), SQLITE_ROW);
	assert_int_equal(sqlite3_column_int(st, 0), store_schema_version());
	sqlite3_finalize(st);
	assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(st), SQLITE_ROW);
	assert_string_equal((const char *)sqlite3_column_text(st, 0), "wal");
	sqlite3_finalize(st);
	sqlite3_close(db);
}

static void test_foreign_database_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	char path[PATH_MAX + 16];
	struct store *s = NULL;
	sqlite3 *db = NULL;

	snprintf(path, sizeof(path), "%s/other.db", f->dir);
	assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "CREATE TABLE t (x)", NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	assert_int_equal(chmod(path, 0600), 0);
	assert_int_equal(store_open(&s, path, &err), -EINVAL);
	assert_null(s);
	assert_non_null(strstr(err.message, "not a meshlet store"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_revisions_grow, setup, teardown),
		cmocka_unit_test_setup_teardown(test_get_missing_and_bad_keys, setup, teardown),
		cmocka_unit_test_setup_teardown(test_values_are_bytes, setup, teardown),
		cmocka_unit_test_setup_teardown(test_cas, setup, teardown),
		cmocka_unit_test_setup_teardown(test_delete, setup, teardown),
		cmocka_unit_test_setup_teardown(test_list_prefix, setup, teardown),
		cmocka_unit_test_setup_teardown(test_apply_batch, setup, teardown),
		cmocka_unit_test_setup_teardown(test_observer_times_each_call, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reopen_keeps_everything, setup, teardown),
		cmocka_unit_test_setup_teardown(test_lock_one_holder, setup, teardown),
		cmocka_unit_test_setup_teardown(test_two_handles, setup, teardown),
		cmocka_unit_test_setup_teardown(test_file_mode_0600, setup, teardown),
		cmocka_unit_test_setup_teardown(test_symlink_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_damaged_header_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_damaged_page_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_newer_schema_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_schema_recorded, setup, teardown),
		cmocka_unit_test_setup_teardown(test_foreign_database_refused, setup, teardown),
	};

	const struct CMUnitTest on_etcd[] = {
		cmocka_unit_test_setup_teardown(test_revisions_grow, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_get_missing_and_bad_keys, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_values_are_bytes, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_cas, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_delete, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_list_prefix, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_apply_batch, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_observer_times_each_call, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_reopen_keeps_everything, setup_etcd, teardown_etcd),
		cmocka_unit_test_setup_teardown(test_lock_one_holder, setup_etcd, teardown_etcd),
	};
	int failed;

	umask(022);
	failed = cmocka_run_group_tests_name("sqlite", tests, NULL, NULL);
	return failed + cmocka_run_group_tests_name("etcd", on_etcd, group_setup_etcd,
	                                             group_teardown_etcd);
}
