/*
 * store: meshlet-control's state as a small revisioned key-value store, in
 * the shape of etcd's, with two backends: SQLite (store_open(), one file)
 * and etcd (store_open_etcd(), several control replicas on one cluster).
 *
 * Keys are printable ASCII strings ("policies/orders", "tokens/<sha256hex>",
 * "certs/<serial>", "endpoints/orders/<proxy-id>"); values are bytes (JSON
 * text in practice). A store-wide revision counter grows by one with every
 * successful write (a store_apply() batch counts once); each key carries the
 * revision of its last write, like etcd's mod_revision. Deleting a key also
 * advances the counter. On etcd the counter is the cluster's revision: it
 * grows with every write of anyone using the cluster, so it may jump by
 * more than one between two writes of this store; it never repeats and
 * never goes back.
 *
 * Durability: every successful write has been committed (SQLite WAL with
 * synchronous=FULL, so fsync'd; etcd: committed by a quorum) when the
 * function returns.
 *
 * Every call may also fail with -EAGAIN: the store is unreachable now (etcd:
 * no endpoint answered within the timeout); a write that failed so may or
 * may not have been applied, like any write whose answer was lost.
 *
 * A struct store is not thread-safe: use it from one thread (control's event
 * loop). Several processes may open the same file; writes are serialised by
 * SQLite's locks (busy timeout STORE_BUSY_TIMEOUT_MS).
 */
#ifndef MESHLET_STORE_H
#define MESHLET_STORE_H

#include <stddef.h>
#include <stdint.h>
#include "meshlet/json.h"

/* Longest key, in bytes. Keys are bytes 0x21..0x7e (no spaces, no controls). */
#define STORE_KEY_MAX 512
/* Largest value: etcd's default request limit (--max-request-bytes, 1.5 MiB). */
#define STORE_VALUE_MAX (1536 * 1024)
/* Most operations in one store_apply() batch (etcd's default --max-txn-ops). */
#define STORE_BATCH_MAX 128
/* How long a write waits for another process's write lock. */
#define STORE_BUSY_TIMEOUT_MS 5000

/* store_delete()/store_op.expected: no condition on the key's revision. */
#define STORE_REV_ANY (-1)

struct store;

/* One key as returned by store_list(); see store_entries_free(). */
struct store_entry {
	char *key;        /* NUL-terminated */
	char *value;      /* len bytes, followed by a NUL not counted in len */
	size_t len;
	int64_t revision; /* revision of the key's last write */
};

enum store_op_kind { STORE_OP_PUT, STORE_OP_DELETE };

/* One write of a store_apply() batch. Pointers are borrowed for the call. */
struct store_op {
	enum store_op_kind kind;
	const char *key;
	const void *value;  /* STORE_OP_PUT only */
	size_t len;         /* STORE_OP_PUT only */
	/*
	 * STORE_REV_ANY: unconditional (a delete still needs the key to exist);
	 * 0: the key must not exist (puts only);
	 * > 0: the key's revision must be exactly this.
	 */
	int64_t expected;
};

/*
 * Opens (creating if needed) the SQLite database at path: a new file is
 * created 0600; an existing one that group or others may access is refused.
 * Sets journal_mode=WAL, synchronous=FULL, foreign_keys=ON, a busy timeout;
 * runs PRAGMA quick_check and refuses a damaged file (it is never
 * re-initialised); applies pending schema migrations in one transaction and
 * refuses a schema newer than this binary knows.
 * Returns 0 and *out (free with store_close()), or a negative errno with a
 * message in err: -EACCES (permissions), -EIO (damaged or unreadable),
 * -EPROTONOSUPPORT (schema too new), -EINVAL (not a regular file, or an
 * SQLite file that is not a meshlet store), -ELOOP (path is a symlink),
 * -ENOENT (no such directory), -ENOMEM.
 */
int store_open(struct store **out, const char *path, struct meshlet_err *err);

/* The etcd backend's settings; strings borrowed for the call. */
struct store_etcd_opts {
	const char *endpoints;   /* "http://h:p[,https://h:p...]" */
	const char *prefix;      /* every key is stored under it; NULL: "/meshlet/" */
	const char *cacert;      /* https: PEM roots the server must chain to */
	const char *cert;        /* https: client certificate (PEM), optional */
	const char *key;         /* its private key */
	int timeout_ms;          /* per call; 0: STORE_ETCD_TIMEOUT_MS */
};
#define STORE_ETCD_TIMEOUT_MS 5000

/*
 * Connects to the etcd cluster (any endpoint that answers) and checks it
 * speaks the v3 API. Returns 0 and *out (free with store_close()), or
 * -EINVAL (bad endpoints or prefix) / -EAGAIN (no endpoint answered) with a
 * message in err.
 */
int store_open_etcd(struct store **out, const struct store_etcd_opts *o, struct meshlet_err *err);

/* "sqlite" or "etcd". */
const char *store_backend_name(const struct store *s);

/* Finalises statements and closes the database. NULL is a no-op. */
void store_close(struct store *s);

/*
 * Reads key. Returns 0 and, for each non-NULL output, *value (malloc'd,
 * owned and freed by the caller, NUL-terminated after len bytes), *len and
 * *revision; -ENOENT if the key does not exist; -EINVAL for a bad key;
 * -EIO on a database error (store_strerror() says more).
 */
int store_get(struct store *s, const char *key, char **value, size_t *len, int64_t *revision);

/*
 * Writes key = value (len bytes) unconditionally. Returns 0 and the new
 * revision in *revision (may be NULL); -EINVAL for a bad key, -E2BIG for a
 * value over STORE_VALUE_MAX, -EBUSY/-EIO on a database error.
 */
int store_put(struct store *s, const char *key, const void *value, size_t len,
              int64_t *revision);

/*
 * Compare-and-set: writes key = value only if the key's revision is
 * expected (0: only if the key does not exist). Returns 0 and the new
 * revision in *revision (may be NULL); -ECANCELED when the condition fails
 * (nothing written); otherwise as store_put().
 */
int store_cas(struct store *s, const char *key, int64_t expected, const void *value,
              size_t len, int64_t *revision);

/*
 * Deletes key: unconditionally when expected is STORE_REV_ANY, otherwise only
 * if its revision is expected (> 0). Returns 0 and the store's new revision
 * in *revision (may be NULL); -ENOENT if the key does not exist; -ECANCELED
 * if its revision differs; -EINVAL for a bad key or expected == 0.
 */
int store_delete(struct store *s, const char *key, int64_t expected, int64_t *revision);

/*
 * Applies n (1..STORE_BATCH_MAX) writes atomically: every condition is
 * checked first, then all writes are made and committed together; they all
 * get the same new revision, returned in *revision (may be NULL). A key may
 * appear only once per batch. Returns 0; -ECANCELED if any condition fails,
 * -ENOENT if a delete names a missing key (nothing is written in either
 * case); -EINVAL/-E2BIG for a malformed batch; -EBUSY/-EIO on database errors.
 * Read-modify-write across keys: store_get() each key, then store_apply()
 * with the revisions read as conditions, and retry on -ECANCELED.
 */
int store_apply(struct store *s, const struct store_op *ops, size_t n, int64_t *revision);

/*
 * Lists the keys that start with prefix ("" lists everything), in byte
 * order of the keys. Returns 0 with *entries (an array of *n; free with
 * store_entries_free(); NULL when *n is 0) and, when revision is not NULL,
 * the store revision of the same snapshot; -EINVAL for a prefix that is not
 * a valid key prefix; -ENOMEM; -EIO.
 */
int store_list(struct store *s, const char *prefix, struct store_entry **entries, size_t *n,
               int64_t *revision);

/* Frees what store_list() returned. */
void store_entries_free(struct store_entry *entries, size_t n);

/* The store-wide revision (0 before the first write) in *revision. Returns 0 or -EIO. */
int store_revision(struct store *s, int64_t *revision);

/* A description of the last database error on s ("" if none). Borrowed, valid
 * until the next call on s. */
const char *store_strerror(const struct store *s);

/*
 * Changes made by anyone else on a shared store: starts following the
 * store (etcd: a thread holding a watch on the prefix, reconnecting with
 * failover, resuming at the last revision it saw) and returns in *fd a
 * descriptor that becomes readable after something under the store
 * changed, or after the watch was lost and restored (something may have
 * changed meanwhile); store_follow_drain() then empties it before the
 * caller reads the store again. Returns 0, -ENOTSUP (SQLite: this process
 * makes the writes it needs to know about) or -ENOMEM/-EAGAIN. The thread
 * never touches s's connection; it stops in store_close().
 */
int store_follow(struct store *s, int *fd);
void store_follow_drain(struct store *s);

/*
 * Before store_follow(): the follower also keeps the revision of every key
 * starting with one of prefixes (at most STORE_TRACK_MAX), fed by what it
 * watches and by this handle's own writes, so that store_follow_rev()
 * answers without a round trip. 0, -EINVAL (too many, or already
 * following), -ENOMEM or -ENOTSUP (SQLite).
 */
#define STORE_TRACK_MAX 4
int store_follow_track(struct store *s, const char *const *prefixes, size_t n);

/* The revision of a tracked key (0: it does not exist) as the follower
 * knows it: 0, or -EAGAIN when it cannot tell (not following, key not
 * tracked, the watch not yet primed or being resumed): read the store. */
int store_follow_rev(struct store *s, const char *key, int64_t *rev);

/*
 * Work that must run on one replica at a time (housekeeping): returns 1
 * when this store handle holds the lock named name (a store key) now, 0
 * when another holder has it, or a negative errno. On etcd the lock is
 * name, put with a lease of ttl_s seconds that this call keeps alive; call
 * it again well within ttl_s to keep holding; a holder that stops calling
 * (or dies) loses the lock when the lease expires, and store_close()
 * revokes the lease so another takes over at once. SQLite: always 1.
 */
int store_lock_hold(struct store *s, const char *name, int ttl_s);

/* The calls an observer is told about: reads, listings, and writes (every
 * write, store_put/cas/delete included, is one store_apply). */
enum store_call { STORE_CALL_GET, STORE_CALL_LIST, STORE_CALL_APPLY, STORE_CALL_COUNT };

typedef void (*store_observer_fn)(void *arg, enum store_call call, double seconds);

/* From now on fn(arg, call, seconds) runs after each store_get, store_list
 * and store_apply (failed ones too), with the time the call took. NULL fn:
 * no observer. For metrics; fn must not call the store. */
void store_set_observer(struct store *s, store_observer_fn fn, void *arg);

/* The schema version this binary creates and understands. */
int store_schema_version(void);

#endif
