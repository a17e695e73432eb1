/*
 * peerstats: what a proxy's inbound side counted per caller since the
 * last summary sent to control (api.h: struct api_stats_summary): decisions
 * and denials by caller and rule, 5xx answers, HTTP latency, the last few
 * denials. Bounded whatever the traffic: PEERSTATS_CALLERS callers and
 * PEERSTATS_DENIED (caller, rule) pairs are counted apart, the rest in
 * API_STATS_OTHER; peerstats_take() folds them further into a summary's
 * caps and starts a new interval.
 *
 * Thread-safe: worker threads count, the control client's thread takes.
 * One short critical section per decision and per HTTP request.
 */
#ifndef MESHLET_PEERSTATS_H
#define MESHLET_PEERSTATS_H

#include <stdbool.h>
#include <stdint.h>
#include "meshlet/api.h"

#define PEERSTATS_CALLERS 64
#define PEERSTATS_DENIED 32
/* Latency buckets (upper bounds in ms; one more: above the last). */
#define PEERSTATS_BUCKETS 14

struct peerstats;

/* A new, empty set, or NULL (no memory). */
struct peerstats *peerstats_new(void);
void peerstats_free(struct peerstats *p);

/*
 * One policy decision for the caller peer_id (a SPIFFE ID; NULL or one
 * that is not spiffe://<td>/svc/<name> counts as API_STATS_OTHER) by rule.
 * method and path (NULL for a TCP connection) go into the recent denials.
 */
void peerstats_decision(struct peerstats *p, const char *peer_id, bool allow, const char *rule,
                        const char *method, const char *path);

/*
 * fn(ctx) is called, from the counting thread and under peerstats' lock
 * (so it must be quick and must not call back into p), when a decision is
 * news: the first one after an interval that counted nothing, or a denial
 * not yet among this interval's recent ones. The proxy uses it to send its
 * summary at once instead of at the end of the long poll. NULL removes
 * it; once that returns, fn is not running and will not be called.
 */
typedef void (*peerstats_nudge_fn)(void *ctx);
void peerstats_set_nudge(struct peerstats *p, peerstats_nudge_fn fn, void *ctx);

/* One HTTP answer to peer_id: its status (5xx counted) and duration. */
void peerstats_answer(struct peerstats *p, const char *peer_id, int status, double seconds);

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
