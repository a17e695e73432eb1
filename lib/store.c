/*
 * store: the public API of store.h over its backends (store-int.h): every
 * argument is checked here, once, so a backend sees only valid keys and
 * well-formed batches; every call is timed for the observer.
 */
#include "store-int.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Keys and key prefixes: printable ASCII without space, at most STORE_KEY_MAX. */
static bool key_valid(const char *key, bool prefix)
{
	size_t i;

	if (!key)
		return false;
	for (i = 0; key[i]; i++)
		if ((unsigned char)key[i] < 0x21 || (unsigned char)key[i] > 0x7e || i >= STORE_KEY_MAX)
			return false;
	return prefix || i > 0;
}

void store_prefix_end(const char *prefix, char *hi)
{
	/* Keys are bytes <= 0x7e: the prefix with its last byte incremented is
	 * the first string after every key that starts with it, and "\x7f" is
	 * after every key at all. */
	size_t plen = strlen(prefix);

	memcpy(hi, plen ? prefix : "\x7f", plen ? plen + 1 : 2);
	if (plen)
		hi[plen - 1]++;
}

/* Checks a batch's shape before the backend sees it. */
static int check_batch(const struct store_op *ops, size_t n)
{
	size_t i, j;

	if (!ops || n == 0 || n > STORE_BATCH_MAX)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		const struct store_op *op = &ops[i];

		if (!key_valid(op->key, false) || op->expected < STORE_REV_ANY)
			return -EINVAL;
		if (op->kind == STORE_OP_PUT && op->len > STORE_VALUE_MAX)
			return -E2BIG;
		if (op->kind == STORE_OP_PUT && op->len && !op->value)
			return -EINVAL;
		if (op->kind == STORE_OP_DELETE && op->expected == 0)
			return -EINVAL;
		if (op->kind != STORE_OP_PUT && op->kind != STORE_OP_DELETE)
			return -EINVAL;
		for (j = 0; j < i; j++)
			if (strcmp(ops[j].key, op->key) == 0)
				return -EINVAL;
	}
	return 0;
}

void store_close(struct store *s)
{
	if (s)
		s->be->close(s);
}

const char *store_strerror(const struct store *s)
{
	return s->errmsg;
}

const char *store_backend_name(const struct store *s)
{
	return s->be->name;
}

int store_revision(struct store *s, int64_t *revision)
{
	return s->be->revision(s, revision);
}

int store_follow(struct store *s, int *fd)
{
	*fd = -1;
	return s->be->follow ? s->be->follow(s, fd) : -ENOTSUP;
}

int store_follow_track(struct store *s, const char *const *prefixes, size_t n)
{
	return s->be->follow_track ? s->be->follow_track(s, prefixes, n) : -ENOTSUP;
}

int store_follow_rev(struct store *s, const char *key, int64_t *rev)
{
	return s->be->follow_rev ? s->be->follow_rev(s, key, rev) : -EAGAIN;
}

void store_follow_drain(struct store *s)
{
	if (s->be->follow_drain)
		s->be->follow_drain(s);
}

int store_lock_hold(struct store *s, const char *name, int ttl_s)
{
	if (!key_valid(name, false) || ttl_s < 2)
		return -EINVAL;
	return s->be->lock_hold ? s->be->lock_hold(s, name, ttl_s) : 1;
}

void store_entries_free(struct store_entry *entries, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		free(entries[i].key);
		free(entries[i].value);
	}
	free(entries);
}

int store_put(struct store *s, const char *key, const void *value, size_t len,
              int64_t *revision)
{
	struct store_op op = { STORE_OP_PUT, key, value, len, STORE_REV_ANY };

	return store_apply(s, &op, 1, revision);
}

int store_cas(struct store *s, const char *key, int64_t expected, const void *value,
              size_t len, int64_t *revision)
{
	struct store_op op = { STORE_OP_PUT, key, value, len, expected };

	if (expected < 0)
		return -EINVAL;
	return store_apply(s, &op, 1, revision);
}

int store_delete(struct store *s, const char *key, int64_t expected, int64_t *revision)
{
	struct store_op op = { STORE_OP_DELETE, key, NULL, 0, expected };

	return store_apply(s, &op, 1, revision);
}

/* ---- timed entry points ---- */

void store_set_observer(struct store *s, store_observer_fn fn, void *arg)
{
	s->observer = fn;
	s->observer_arg = arg;
}

static void started(const struct store *s, struct timespec *t0)
{
	if (s->observer)
		clock_gettime(CLOCK_MONOTONIC, t0);
}

static void observe(const struct store *s, enum store_call call, const struct timespec *t0)
{
	struct timespec now;

	if (!s->observer)
		return;
	clock_gettime(CLOCK_MONOTONIC, &now);
	s->observer(s->observer_arg, call, (double)(now.tv_sec - t0->tv_sec) +
	            (double)(now.tv_nsec - t0->tv_nsec) / 1e9);
}

int store_get(struct store *s, const char *key, char **value, size_t *len, int64_t *revision)
{
	struct timespec t0;
	int ret;

	started(s, &t0);
	ret = key_valid(key, false) ? s->be->get(s, key, value, len, revision) : -EINVAL;
	observe(s, STORE_CALL_GET, &t0);
	return ret;
}

int store_list(struct store *s, const char *prefix, struct store_entry **entries, size_t *n,
               int64_t *revision)
{
	struct timespec t0;
	int ret;

	*entries = NULL;
	*n = 0;
	started(s, &t0);
	ret = key_valid(prefix, true) ? s->be->list(s, prefix, entries, n, revision) : -EINVAL;
	observe(s, STORE_CALL_LIST, &t0);
	return ret;
}

int store_apply(struct store *s, const struct store_op *ops, size_t n, int64_t *revision)
{
	struct timespec t0;
	int ret;

	started(s, &t0);
	ret = check_batch(ops, n);
	if (!ret)
		ret = s->be->apply(s, ops, n, revision);
	observe(s, STORE_CALL_APPLY, &t0);
	return ret;
}
