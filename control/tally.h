/*
 * tally: counts by string key (long polls per service, per certificate).
 *
 * A hash table of key -> count in which a key exists only while its count
 * is above zero, so its size follows what is counted, not what ever was.
 * Lookups, increments and decrements take constant time on average: the
 * long-poll limits are checked on every poll, and a walk over all waiters
 * per poll made control's idle CPU grow with the square of the proxies
 * (docs/benchmarks.md, "Control plane at scale").
 */
#ifndef MESHLET_CONTROL_TALLY_H
#define MESHLET_CONTROL_TALLY_H

#include <stddef.h>

struct tally_entry;

struct tally {
	struct tally_entry **buckets;
	size_t n_buckets;              /* 0 until the first increment; a power of two */
	size_t n_keys;                 /* keys with a count above zero */
};

/* An empty tally: {0} is one too. */
void tally_init(struct tally *t);

/* The count of key (0 when absent). */
size_t tally_get(const struct tally *t, const char *key);

/* Adds one to key's count: 0, or -ENOMEM (nothing changed). */
int tally_inc(struct tally *t, const char *key);

/* Takes one from key's count; the key goes at zero. A key that is absent
 * is left alone (returns -ENOENT; 0 otherwise). */
int tally_dec(struct tally *t, const char *key);

/* The number of keys with a count above zero. */
size_t tally_keys(const struct tally *t);

/* The hash of key the tally uses (FNV-1a), for other tables keyed by
 * service names and certificate serials: both are chosen by control or
 * the admin, so no seed against crafted collisions is needed. */
size_t tally_hash(const char *key);

/* Frees everything; t is empty afterwards. */
void tally_free(struct tally *t);

#endif
