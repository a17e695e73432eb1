/*
 * peerstats: what a proxy's inbound side counted per caller since the
 * last summary sent to control (api.h: struct api_stats_summary): decisions
 * and denials by caller and rule, 5xx answers, HTTP latency, the last few
 * denials. Bounded whatever the traffic: PEERSTATS_CALLERS callers and
 * PEERSTATS_DENIED (caller, rule) pairs are counted apart, the rest in
 * API_STATS_OTHER; peerstats_take() folds them further into a summary's
 * caps and starts a new interval.
 *
 * Per worker: each worker thread counts into its own shard
 * (peerstats_shard) without a lock; peerstats_take(), on the control
 * client's thread, merges the shards. A shard's counters only grow (its
 * single writer adds with plain atomic stores) and the taker keeps what
 * it took last, so each count lands in exactly one summary whatever the
 * timing. Locks remain only off the per-request path: claiming a slot for
 * a new caller, denials (recent ones, per rule) and the take.
 */
#ifndef MESHLET_PEERSTATS_H
#define MESHLET_PEERSTATS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "meshlet/api.h"

#define PEERSTATS_CALLERS 64
#define PEERSTATS_DENIED 32
/* Latency buckets (upper bounds in ms; one more: above the last). */
#define PEERSTATS_BUCKETS 14
/* Shards: one per worker (config's "workers" is at most 256). */
#define PEERSTATS_SHARDS_MAX 256

struct peerstats;
struct peerstats_shard;

/* A new, empty set, or NULL (no memory). */
struct peerstats *peerstats_new(void);
void peerstats_free(struct peerstats *p);

/*
 * Shard i (< PEERSTATS_SHARDS_MAX), created on the first call; NULL when
 * i is out of range or memory ran out. One thread at a time may count
 * into a shard (a worker into its own); any thread may take.
 */
struct peerstats_shard *peerstats_shard(struct peerstats *p, size_t i);

/*
 * One policy decision for the caller peer_id (a SPIFFE ID; NULL or one
 * that is not spiffe://<td>/svc/<name> counts as API_STATS_OTHER) by rule.
 * method and path (NULL for a TCP connection) go into the recent denials.
 */
void peerstats_decision(struct peerstats_shard *s, const char *peer_id, bool allow, const char *rule,
                        const char *method, const char *path);

/*
 * fn(ctx) is called, from the counting thread and under peerstats' lock
 * (so it must be quick and must not call back into p), when a decision is
 * news: the first one after an interval that counted nothing, or a denial
 * not yet among this interval's recent ones. (A decision counted while a
 * take is running may miss its nudge: it still goes with the next summary.) The proxy uses it to send its
 * summary at once instead of at the end of the long poll. NULL removes
 * it; once that returns, fn is not running and will not be called.
 */
typedef void (*peerstats_nudge_fn)(void *ctx);
void peerstats_set_nudge(struct peerstats *p, peerstats_nudge_fn fn, void *ctx);

/* One HTTP answer to peer_id: its status (5xx counted) and duration. */
void peerstats_answer(struct peerstats_shard *s, const char *peer_id, int status, double seconds);

/*
 * Fills *out with what was counted since the last take (or the start),
 * within the summary's caps (the callers with the most requests first,
 * the rest folded into API_STATS_OTHER), and starts a new interval.
 * Returns the number of decisions in it (0: nothing happened).
 */
int64_t peerstats_take(struct peerstats *p, struct api_stats_summary *out);

/* The caller's service of a SPIFFE ID into out (SERVICE_NAME_MAX + 1
 * bytes), API_STATS_OTHER when it names none. */
void peerstats_caller(const char *peer_id, char *out);

#endif
