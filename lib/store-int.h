/*
 * store-int: what the store backends share with the dispatch in store.c
 * (nothing else includes it). store.c checks every argument (keys,
 * prefixes, batches) and times the calls; a backend only does the work.
 *
 *   store.c         the public API of store.h: checks, observer, dispatch
 *   store_sqlite.c  the SQLite backend (store_open)
 *   store_etcd.c    the etcd backend (store_open_etcd)
 */
#ifndef MESHLET_STORE_INT_H
#define MESHLET_STORE_INT_H

#include "meshlet/store.h"

#define STORE_ERRMSG_MAX 256

struct store_backend {
	const char *name;
	int (*get)(struct store *s, const char *key, char **value, size_t *len, int64_t *revision);
	int (*list)(struct store *s, const char *prefix, struct store_entry **entries, size_t *n,
	            int64_t *revision);
	int (*apply)(struct store *s, const struct store_op *ops, size_t n, int64_t *revision);
	int (*revision)(struct store *s, int64_t *revision);
	int (*follow)(struct store *s, int *fd);          /* NULL: -ENOTSUP */
	void (*follow_drain)(struct store *s);
	int (*follow_track)(struct store *s, const char *const *prefixes, size_t n); /* NULL: -ENOTSUP */
	int (*follow_rev)(struct store *s, const char *key, int64_t *rev);          /* NULL: -EAGAIN */
	int (*lock_hold)(struct store *s, const char *name, int ttl_s);   /* NULL: always 1 */
	void (*close)(struct store *s);
};

/* The head of every backend's own struct (its first member). */
struct store {
	const struct store_backend *be;
	char errmsg[STORE_ERRMSG_MAX];  /* the last error, "" if none */
	store_observer_fn observer;     /* told how long each call took, or NULL */
	void *observer_arg;
};

/* The first key after every key that starts with prefix, into hi (room for
 * STORE_KEY_MAX + 2): prefix with its last byte incremented, "\x7f" for "". */
void store_prefix_end(const char *prefix, char *hi);

#endif
