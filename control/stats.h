/*
 * stats: the proxies' counter summaries (api.h: struct api_stats_summary),
 * kept in memory for the last minutes and answered by GET /v1/stats.
 *
 * One entry per edge caller -> callee, each a ring of STATS_BUCKETS buckets
 * of STATS_BUCKET_S seconds (a summary lands in the bucket of its arrival);
 * rates are over the last STATS_WINDOW_S. An edge with nothing in its ring
 * is dropped. At most STATS_EDGES_MAX edges: beyond them, traffic is
 * counted in one edge API_STATS_OTHER -> API_STATS_OTHER and the answer
 * says "truncated", so memory and answer size stay bounded whatever the
 * number of callers. Not persisted: a restarted control starts empty.
 *
 * Control runs one event loop: no locking.
 */
#ifndef MESHLET_CONTROL_STATS_H
#define MESHLET_CONTROL_STATS_H

#include <stdint.h>
#include <jansson.h>

#include "meshlet/api.h"

#define STATS_BUCKET_S 10
#define STATS_BUCKETS 30                /* five minutes kept */
#define STATS_WINDOW_S 60
#define STATS_EDGES_MAX 512
#define STATS_RULES_PER_EDGE 8
#define STATS_RECENT_MAX 50

struct stats;

/* An empty set, or NULL (no memory). */
struct stats *stats_new(void);
void stats_free(struct stats *s);

/* Records the summary service's proxy sent at now (unix seconds). */
void stats_record(struct stats *s, const char *service, const struct api_stats_summary *sum,
                  int64_t now);

/* A summary was refused (why: for the answer's "summaries.last_refusal"). */
void stats_refused(struct stats *s, const char *service, const char *why);

/* GET /v1/stats's answer at now: a new reference, or NULL (no memory). */
json_t *stats_json(struct stats *s, int64_t now);

#endif
