/*
 * store_sqlite: the SQLite backend of store.h (store_open()).
 *
 * Schema (version 1):
 *   schema_version(version, applied_at)  one row per migration applied
 *   kv(key, value, revision)             the keys, WITHOUT ROWID, key order
 *   meta('revision', n)                  the store-wide revision counter
 *
 * Every write runs in BEGIN IMMEDIATE ... COMMIT, so conditions are checked
 * and the counter advanced under SQLite's write lock, also against other
 * processes using the same file.
 */
#include "store-int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sqlite3.h>

enum stmt_id {
	ST_BEGIN_READ,
	ST_BEGIN_WRITE,
	ST_COMMIT,
	ST_ROLLBACK,
	ST_GET,
	ST_GET_REV,
	ST_PUT,
	ST_DELETE,
	ST_LIST,
	ST_COUNTER_GET,
	ST_COUNTER_SET,
	ST_COUNT
};

static const char *const stmt_sql[ST_COUNT] = {
	[ST_BEGIN_READ] = "BEGIN DEFERRED",
	[ST_BEGIN_WRITE] = "BEGIN IMMEDIATE",
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_GET] = "SELECT value, revision FROM kv WHERE key = ?1",
	[ST_GET_REV] = "SELECT revision FROM kv WHERE key = ?1",
	[ST_PUT] = ("INSERT INTO kv (key, value, revision) VALUES (?1, ?2, ?3) "
	            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
	            "revision = excluded.revision"),
	[ST_DELETE] = "DELETE FROM kv WHERE key = ?1",
	[ST_LIST] = ("SELECT key, value, revision FROM kv "
	             "WHERE key >= ?1 AND key < ?2 ORDER BY key"),
	[ST_COUNTER_GET] = "SELECT value FROM meta WHERE name = 'revision'",
	[ST_COUNTER_SET] = "UPDATE meta SET value = ?1 WHERE name = 'revision'",
};

/* migrations[i] takes the schema from version i to i + 1. */
static const char *const migrations[] = {
	("CREATE TABLE kv ("
	"  key TEXT NOT NULL PRIMARY KEY,"
	"  value BLOB NOT NULL,"
	"  revision INTEGER NOT NULL"
	") WITHOUT ROWID;"
	"CREATE TABLE meta ("
	"  name TEXT NOT NULL PRIMARY KEY,"
	"  value INTEGER NOT NULL"
	") WITHOUT ROWID;"
	"INSERT INTO meta (name, value) VALUES ('revision', 0);"),
};

#define SCHEMA_VERSION ((int)(sizeof(migrations) / sizeof(migrations[0])))

struct sq {
	struct store base;             /* first: a struct store * is a struct sq * */
	sqlite3 *db;
	sqlite3_stmt *st[ST_COUNT];
	char *errmsg;                  /* base.errmsg */
};

static const struct store_backend sqlite_backend;
static void close_now(struct sq *s);

int store_schema_version(void)
{
	return SCHEMA_VERSION;
}

/* Records SQLite's message for rc and maps rc to a negative errno. */
static int sql_fail(struct sq *s, int rc)
{
	snprintf(s->errmsg, STORE_ERRMSG_MAX, "%s", sqlite3_errmsg(s->db));
	switch (rc & 0xff) {
	case SQLITE_BUSY:
	case SQLITE_LOCKED:
		return -EBUSY;
	case SQLITE_NOMEM:
		return -ENOMEM;
	case SQLITE_FULL:
		return -ENOSPC;
	case SQLITE_READONLY:
		return -EROFS;
	case SQLITE_TOOBIG:
		return -E2BIG;
	default:
		return -EIO;
	}
}

/* Steps a statement that returns no rows, then resets it. */
static int run(struct sq *s, enum stmt_id id)
{
	sqlite3_stmt *st = s->st[id];
	int rc = sqlite3_step(st);
	int ret = rc == SQLITE_DONE ? 0 : sql_fail(s, rc);

	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	return ret;
}

/* Ends the current transaction without writing (errors are ignored: SQLite
 * rolls back by itself when a statement failed hard). */
static void rollback(struct sq *s)
{
	if (!sqlite3_get_autocommit(s->db))
		run(s, ST_ROLLBACK);
}

/* ---- opening ---- */

/* Creates path 0600 if missing; refuses a non-regular file or one that
 * group/others may access. */
static int check_file(const char *path, struct meshlet_err *err)
{
	struct stat st;
	int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
	int ret = 0;

	if (fd < 0 || fstat(fd, &st) < 0) {
		ret = -errno;
		err_set(err, "", "%s: %s", path, strerror(-ret));
	} else if (!S_ISREG(st.st_mode)) {
		ret = err_set(err, "", "%s: not a regular file", path);
	} else if (st.st_mode & 077) {
		ret = -EACCES;
		err_set(err, "", "%s: mode %04o lets group or others access the database; "
		        "run chmod 600 on it", path, (unsigned)(st.st_mode & 07777));
	}
	if (fd >= 0)
		close(fd);
	return ret;
}

/* Runs PRAGMA quick_check; anything but a single "ok" row is damage. */
static int check_integrity(struct sq *s, const char *path, struct meshlet_err *err)
{
	sqlite3_stmt *st = NULL;
	const unsigned char *row;
	int rc = sqlite3_prepare_v2(s->db, "PRAGMA quick_check", -1, &st, NULL);
	int ret = 0;

	if (rc == SQLITE_OK)
		rc = sqlite3_step(st);
	if (rc != SQLITE_ROW) {
		ret = -EIO;
		err_set(err, "", "%s: database is damaged or unreadable (%s); refusing to "
		        "use it: restore it from a backup", path, sqlite3_errmsg(s->db));
		goto out;
	}
	row = sqlite3_column_text(st, 0);
	if (!row || strcmp((const char *)row, "ok") != 0) {
		ret = -EIO;
		err_set(err, "", "%s: database is damaged (quick_check: %s); refusing to "
		        "use it: restore it from a backup", path, row ? (const char *)row : "?");
	}
out:
	sqlite3_finalize(st);
	return ret;
}

/* Runs a statement whose first row's first column is an integer. */
static int query_int(struct sq *s, const char *sql, int64_t *out)
{
	sqlite3_stmt *st = NULL;
	int rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
	int ret = 0;

	if (rc == SQLITE_OK)
		rc = sqlite3_step(st);
	if (rc == SQLITE_ROW)
		*out = sqlite3_column_int64(st, 0);
	else
		ret = sql_fail(s, rc);
	sqlite3_finalize(st);
	return ret;
}

static int exec_sql(struct sq *s, const char *sql)
{
	int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);

	return rc == SQLITE_OK ? 0 : sql_fail(s, rc);
}

/* Connection settings; journal_mode must come back as "wal". */
static int configure(struct sq *s, const char *path, struct meshlet_err *err)
{
	sqlite3_stmt *st = NULL;
	const unsigned char *mode;
	int rc, ret = 0;

	sqlite3_extended_result_codes(s->db, 1);
	sqlite3_busy_timeout(s->db, STORE_BUSY_TIMEOUT_MS);
	sqlite3_db_config(s->db, SQLITE_DBCONFIG_DEFENSIVE, 1, NULL);
	sqlite3_db_config(s->db, SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0, NULL);
	rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode = WAL", -1, &st, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_step(st);
	mode = rc == SQLITE_ROW ? sqlite3_column_text(st, 0) : NULL;
	if (!mode || strcmp((const char *)mode, "wal") != 0)
		ret = -EIO;
	sqlite3_finalize(st);
	if (!ret)
		ret = exec_sql(s, "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;");
	if (ret)
		err_set(err, "", "%s: cannot configure database (WAL, synchronous=FULL): %s",
		        path, sqlite3_errmsg(s->db));
	return ret;
}

/* The schema version recorded in the file: 0 for a new, empty file. A file
 * with tables but no schema_version is some other database: -EINVAL. */
static int read_version(struct sq *s, int64_t *version)
{
	int64_t has_table, n_tables;
	int ret;

	ret = query_int(s, "SELECT count(*) FROM sqlite_schema WHERE type = 'table' "
	                   "AND name = 'schema_version'", &has_table);
	if (!ret && !has_table) {
		ret = query_int(s, "SELECT count(*) FROM sqlite_schema", &n_tables);
		*version = 0;
		return ret ? ret : n_tables ? -EINVAL : 0;
	}
	if (!ret)
		ret = query_int(s, "SELECT coalesce(max(version), 0) FROM schema_version", version);
	return ret;
}

/* Applies migrations from version to SCHEMA_VERSION, recording each. */
static int apply_migrations(struct sq *s, int64_t version)
{
	char sql[128];
	int ret = exec_sql(s, "CREATE TABLE IF NOT EXISTS schema_version ("
	                      "  version INTEGER NOT NULL PRIMARY KEY,"
	                      "  applied_at INTEGER NOT NULL)");

	for (; !ret && version < SCHEMA_VERSION; version++) {
		ret = exec_sql(s, migrations[version]);
		snprintf(sql, sizeof(sql), "INSERT INTO schema_version VALUES (%lld, %lld)",
		         (long long)version + 1, (long long)time(NULL));
		if (!ret)
			ret = exec_sql(s, sql);
	}
	return ret;
}

/* Brings the schema up to date in one transaction, or refuses. */
static int migrate(struct sq *s, const char *path, struct meshlet_err *err)
{
	int64_t version = 0;
	int ret = exec_sql(s, "BEGIN IMMEDIATE");

	if (ret)
		return err_set(err, "", "%s: %s", path, s->errmsg), ret;
	ret = read_version(s, &version);
	if (ret == -EINVAL) {
		err_set(err, "", "%s: not a meshlet store (it has tables but no schema_version)",
		        path);
		goto fail;
	}
	if (!ret && version > SCHEMA_VERSION) {
		ret = -EPROTONOSUPPORT;
		err_set(err, "", "%s: database schema version %lld is newer than this "
		        "meshlet-control understands (%d); run a newer version", path,
		        (long long)version, SCHEMA_VERSION);
		goto fail;
	}
	if (!ret)
		ret = apply_migrations(s, version);
	if (!ret)
		ret = exec_sql(s, "COMMIT");
	if (ret) {
		err_set(err, "", "%s: schema migration from version %lld failed: %s", path,
		        (long long)version, s->errmsg);
		goto fail;
	}
	return 0;
fail:
	exec_sql(s, "ROLLBACK");
	return ret;
}

static int prepare_all(struct sq *s, struct meshlet_err *err)
{
	int i, rc;

	for (i = 0; i < ST_COUNT; i++) {
		rc = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		                        &s->st[i], NULL);
		if (rc != SQLITE_OK)
			return err_set(err, "", "preparing \"%s\": %s", stmt_sql[i],
			               sqlite3_errmsg(s->db)), sql_fail(s, rc);
	}
	return 0;
}

int store_open(struct store **out, const char *path, struct meshlet_err *err)
{
	struct sq *s = NULL;
	int rc, ret;

	*out = NULL;
	ret = check_file(path, err);
	if (ret)
		return ret;
	s = calloc(1, sizeof(*s));
	if (!s)
		return err_set(err, "", "out of memory"), -ENOMEM;
	s->base.be = &sqlite_backend;
	s->errmsg = s->base.errmsg;
	rc = sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOFOLLOW, NULL);
	if (rc != SQLITE_OK) {
		ret = -EIO;
		err_set(err, "", "%s: cannot open database: %s", path,
		        s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
		goto fail;
	}
	ret = check_integrity(s, path, err);
	if (!ret)
		ret = configure(s, path, err);
	if (!ret)
		ret = migrate(s, path, err);
	if (!ret)
		ret = prepare_all(s, err);
	if (ret)
		goto fail;
	*out = &s->base;
	return 0;
fail:
	close_now(s);
	return ret;
}

static void close_now(struct sq *s)
{
	int i;

	for (i = 0; i < ST_COUNT; i++)
		sqlite3_finalize(s->st[i]);
	sqlite3_close(s->db);
	free(s);
}

/* ---- reading ---- */

/* Copies len bytes into a new NUL-terminated buffer. */
static char *dup_bytes(const void *p, size_t len)
{
	char *v = malloc(len + 1);

	if (!v)
		return NULL;
	if (len)
		memcpy(v, p, len);
	v[len] = '\0';
	return v;
}

static int get_now(struct sq *s, const char *key, char **value, size_t *len,
                   int64_t *revision)
{
	sqlite3_stmt *st = s->st[ST_GET];
	const void *blob;
	size_t n;
	int rc, ret = 0;

	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_DONE) {
		ret = -ENOENT;
		goto out;
	}
	if (rc != SQLITE_ROW) {
		ret = sql_fail(s, rc);
		goto out;
	}
	blob = sqlite3_column_blob(st, 0); /* before _bytes(), as SQLite advises */
	n = (size_t)sqlite3_column_bytes(st, 0);
	if (value && !(*value = dup_bytes(blob, n))) {
		ret = -ENOMEM;
		goto out;
	}
	if (len)
		*len = n;
	if (revision)
		*revision = sqlite3_column_int64(st, 1);
out:
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	return ret;
}

/* The counter, inside an open transaction or alone. */
static int read_counter(struct sq *s, int64_t *revision)
{
	sqlite3_stmt *st = s->st[ST_COUNTER_GET];
	int rc = sqlite3_step(st);
	int ret = 0;

	if (rc == SQLITE_ROW) {
		*revision = sqlite3_column_int64(st, 0);
	} else if (rc == SQLITE_DONE) {
		snprintf(s->errmsg, STORE_ERRMSG_MAX, "revision counter missing");
		ret = -EIO;
	} else {
		ret = sql_fail(s, rc);
	}
	sqlite3_reset(st);
	return ret;
}

static int revision_now(struct sq *s, int64_t *revision)
{
	return read_counter(s, revision);
}

/* Appends the current row of ST_LIST to *entries (capacity *cap). */
static int append_row(sqlite3_stmt *st, struct store_entry **entries, size_t *n, size_t *cap)
{
	const unsigned char *key = sqlite3_column_text(st, 0);
	size_t klen = (size_t)sqlite3_column_bytes(st, 0);
	const void *value = sqlite3_column_blob(st, 1);
	size_t len = (size_t)sqlite3_column_bytes(st, 1);
	struct store_entry *e;

	if (*n == *cap) {
		size_t ncap = *cap ? *cap * 2 : 16;
		struct store_entry *grown = realloc(*entries, ncap * sizeof(*grown));

		if (!grown)
			return -ENOMEM;
		*entries = grown;
		*cap = ncap;
	}
	e = &(*entries)[*n];
	e->key = dup_bytes(key, klen);
	e->value = dup_bytes(value, len);
	e->len = len;
	e->revision = sqlite3_column_int64(st, 2);
	(*n)++;
	return e->key && e->value ? 0 : -ENOMEM;
}

/* Runs ST_LIST for the keys in [lo, hi). */
static int list_range(struct sq *s, const char *lo, const char *hi,
                      struct store_entry **entries, size_t *n)
{
	sqlite3_stmt *st = s->st[ST_LIST];
	size_t cap = 0;
	int rc = SQLITE_DONE, ret = 0;

	sqlite3_bind_text(st, 1, lo, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, hi, -1, SQLITE_STATIC);
	while (!ret && (rc = sqlite3_step(st)) == SQLITE_ROW)
		ret = append_row(st, entries, n, &cap);
	if (!ret && rc != SQLITE_DONE)
		ret = sql_fail(s, rc);
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	return ret;
}

static int list_now(struct sq *s, const char *prefix, struct store_entry **entries, size_t *n,
                    int64_t *revision)
{
	char hi[STORE_KEY_MAX + 2];
	int ret;

	*entries = NULL;
	*n = 0;
	store_prefix_end(prefix, hi);
	ret = run(s, ST_BEGIN_READ);
	if (ret)
		return ret;
	ret = revision ? read_counter(s, revision) : 0;
	if (!ret)
		ret = list_range(s, prefix, hi, entries, n);
	if (!ret)
		ret = run(s, ST_COMMIT);
	if (ret) {
		rollback(s);
		store_entries_free(*entries, *n);
		*entries = NULL;
		*n = 0;
	}
	return ret;
}


/* ---- writing ---- */

/* The key's current revision, 0 if it does not exist. */
static int key_revision(struct sq *s, const char *key, int64_t *revision)
{
	sqlite3_stmt *st = s->st[ST_GET_REV];
	int rc, ret = 0;

	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW)
		*revision = sqlite3_column_int64(st, 0);
	else if (rc == SQLITE_DONE)
		*revision = 0;
	else
		ret = sql_fail(s, rc);
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	return ret;
}

/* Checks one op's condition against the database (inside the write txn). */
static int check_condition(struct sq *s, const struct store_op *op)
{
	int64_t cur = 0;
	int ret = key_revision(s, op->key, &cur);

	if (ret)
		return ret;
	if (op->kind == STORE_OP_DELETE && cur == 0)
		return -ENOENT;
	if (op->expected != STORE_REV_ANY && op->expected != cur)
		return -ECANCELED;
	return 0;
}

static int write_op(struct sq *s, const struct store_op *op, int64_t revision)
{
	sqlite3_stmt *st;

	if (op->kind == STORE_OP_DELETE) {
		st = s->st[ST_DELETE];
		sqlite3_bind_text(st, 1, op->key, -1, SQLITE_STATIC);
		return run(s, ST_DELETE);
	}
	st = s->st[ST_PUT];
	sqlite3_bind_text(st, 1, op->key, -1, SQLITE_STATIC);
	sqlite3_bind_blob(st, 2, op->len ? op->value : "", (int)op->len, SQLITE_STATIC);
	sqlite3_bind_int64(st, 3, revision);
	return run(s, ST_PUT);
}

static int apply_now(struct sq *s, const struct store_op *ops, size_t n, int64_t *revision)
{
	int64_t rev = 0;
	size_t i;
	int ret = run(s, ST_BEGIN_WRITE);
	if (ret)
		return ret;
	for (i = 0; i < n && !ret; i++)
		ret = check_condition(s, &ops[i]);
	if (!ret)
		ret = read_counter(s, &rev);
	for (i = 0; i < n && !ret; i++)
		ret = write_op(s, &ops[i], rev + 1);
	if (!ret) {
		sqlite3_bind_int64(s->st[ST_COUNTER_SET], 1, rev + 1);
		ret = run(s, ST_COUNTER_SET);
	}
	if (!ret)
		ret = run(s, ST_COMMIT);
	if (ret)
		goto fail;
	if (revision)
		*revision = rev + 1;
	return 0;
fail:
	rollback(s);
	return ret;
}


/* ---- the backend table (store.c validates arguments first) ---- */

static int be_get(struct store *s, const char *key, char **value, size_t *len,
                  int64_t *revision)
{
	return get_now((struct sq *)s, key, value, len, revision);
}

static int be_list(struct store *s, const char *prefix, struct store_entry **entries, size_t *n,
                   int64_t *revision)
{
	return list_now((struct sq *)s, prefix, entries, n, revision);
}

static int be_apply(struct store *s, const struct store_op *ops, size_t n, int64_t *revision)
{
	return apply_now((struct sq *)s, ops, n, revision);
}

static int be_revision(struct store *s, int64_t *revision)
{
	return revision_now((struct sq *)s, revision);
}

static void be_close(struct store *s)
{
	close_now((struct sq *)s);
}

static const struct store_backend sqlite_backend = {
	.name = "sqlite",
	.get = be_get,
	.list = be_list,
	.apply = be_apply,
	.revision = be_revision,
	.close = be_close,
};
