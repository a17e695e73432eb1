/* tally: counts by string key; see tally.h. */
#include "tally.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TALLY_MIN_BUCKETS 64

struct tally_entry {
	struct tally_entry *next;
	size_t count;
	char key[];
};

void tally_init(struct tally *t)
{
	memset(t, 0, sizeof(*t));
}

size_t tally_hash(const char *key)
{
	uint64_t h = 1469598103934665603ULL;

	for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
		h ^= *p;
		h *= 1099511628211ULL;
	}
	return (size_t)h;
}

static struct tally_entry **tally_slot(const struct tally *t, const char *key)
{
	struct tally_entry **e = &t->buckets[tally_hash(key) & (t->n_buckets - 1)];

	while (*e && strcmp((*e)->key, key) != 0)
		e = &(*e)->next;
	return e;
}

size_t tally_get(const struct tally *t, const char *key)
{
	struct tally_entry **e;

	if (!t->n_buckets)
		return 0;
	e = tally_slot(t, key);
	return *e ? (*e)->count : 0;
}

/* Doubles the buckets (or makes the first ones); -ENOMEM leaves t as it was. */
static int tally_grow(struct tally *t)
{
	size_t n = t->n_buckets ? t->n_buckets * 2 : TALLY_MIN_BUCKETS;
	struct tally_entry **b = calloc(n, sizeof(*b));

	if (!b)
		return -ENOMEM;
	for (size_t i = 0; i < t->n_buckets; i++) {
		struct tally_entry *e = t->buckets[i], *next;

		for (; e; e = next) {
			size_t k = tally_hash(e->key) & (n - 1);

			next = e->next;
			e->next = b[k];
			b[k] = e;
		}
	}
	free(t->buckets);
	t->buckets = b;
	t->n_buckets = n;
	return 0;
}

int tally_inc(struct tally *t, const char *key)
{
	struct tally_entry **slot, *e;
	size_t len = strlen(key);

	if ((!t->n_buckets || t->n_keys >= t->n_buckets) && tally_grow(t) < 0 && !t->n_buckets)
		return -ENOMEM;
	slot = tally_slot(t, key);
	if (*slot) {
		(*slot)->count++;
		return 0;
	}
	e = malloc(sizeof(*e) + len + 1);
	if (!e)
		return -ENOMEM;
	memcpy(e->key, key, len + 1);
	e->count = 1;
	e->next = NULL;
	*slot = e;
	t->n_keys++;
	return 0;
}

int tally_dec(struct tally *t, const char *key)
{
	struct tally_entry **slot, *e;

	if (!t->n_buckets)
		return -ENOENT;
	slot = tally_slot(t, key);
	e = *slot;
	if (!e)
		return -ENOENT;
	if (--e->count == 0) {
		*slot = e->next;
		free(e);
		t->n_keys--;
	}
	return 0;
}

size_t tally_keys(const struct tally *t)
{
	return t->n_keys;
}

void tally_free(struct tally *t)
{
	for (size_t i = 0; i < t->n_buckets; i++) {
		struct tally_entry *e = t->buckets[i], *next;

		for (; e; e = next) {
			next = e->next;
			free(e);
		}
	}
	free(t->buckets);
	tally_init(t);
}
