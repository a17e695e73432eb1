/*
 * metrics: the counters, gauges and histogram of docs/design.md, updated with
 * relaxed atomics from any worker thread and rendered as Prometheus text.
 */
#ifndef MESHLET_METRICS_H
#define MESHLET_METRICS_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <pthread.h>
#include "meshlet/peerstats.h"
#include "meshlet/tls.h"

enum metrics_direction { DIR_INBOUND = 0, DIR_OUTBOUND = 1, DIR_COUNT };

/* Upper bounds (seconds) of meshlet_request_duration_seconds. */
#define METRICS_DURATION_BUCKETS 12

/* One (decision, rule) pair of meshlet_policy_decisions_total. */
struct metrics_decision {
	struct metrics_decision *next;
	atomic_uint_fast64_t count;
	int allow;
	char rule[];
};

/* Counter families with one label, their series made on first use. */
enum metrics_family {
	MF_RATE_LIMITED,       /* meshlet_rate_limited_total{limit} */
	MF_FAULTS,             /* meshlet_faults_injected_total{fault} */
	MF_COUNT
};

/* One series of a labeled family. */
struct metrics_labeled {
	struct metrics_labeled *next;
	atomic_uint_fast64_t count;
	enum metrics_family family;
	char label[];
};

/* Why an HTTP/2 connection was ended for abuse: meshlet_http2_abuse_total{kind}. */
enum metrics_h2_abuse {
	H2_ABUSE_RAPID_RESET,
	H2_ABUSE_CONTROL_FLOOD,       /* SETTINGS, PING, PRIORITY, empty frames; or
	                                 their acks piling up (nghttp2's ERR_FLOODED) */
	H2_ABUSE_CONTINUATION_FLOOD,
	H2_ABUSE_HEADER_LIST,         /* a decoded header list over the limit (HPACK bomb) */
	H2_ABUSE_TOO_MANY_STREAMS,
	H2_ABUSE_PROTOCOL,            /* any other connection error */
	H2_ABUSE_COUNT
};

const char *metrics_h2_abuse_str(enum metrics_h2_abuse k);

#define METRICS_GRPC_CODES 17         /* grpc-status 0..16 */

struct metrics {
	atomic_uint_fast64_t connections_total[DIR_COUNT];
	atomic_int_fast64_t connections_active[DIR_COUNT];
	atomic_int_fast64_t upstream_connections_active;   /* pooled mTLS HTTP/2 (upool.c) */
	atomic_uint_fast64_t bytes_total[DIR_COUNT];
	atomic_uint_fast64_t handshake_failures[TLS_FAIL_COUNT];     /* by enum tls_failure */
	atomic_uint_fast64_t tls_resumed[DIR_COUNT];  /* handshakes that resumed a session */
	atomic_uint_fast64_t http_requests[600];                      /* by status code */
	atomic_uint_fast64_t grpc_requests[METRICS_GRPC_CODES];      /* by grpc-status */
	atomic_uint_fast64_t http2_abuse[H2_ABUSE_COUNT];
	atomic_uint_fast64_t duration_buckets[METRICS_DURATION_BUCKETS + 1]; /* last: +Inf */
	atomic_uint_fast64_t duration_count;
	atomic_uint_fast64_t duration_sum_us;
	atomic_int_fast64_t cert_expiry;      /* unix seconds */
	atomic_int_fast64_t config_version;
	atomic_int_fast64_t control_connected;
	/* Callers' traffic rules on the connect step (docs/traffic.md). */
	atomic_uint_fast64_t retries;             /* meshlet_retries_total */
	atomic_uint_fast64_t outlier_ejections;   /* meshlet_outlier_ejections_total */
	atomic_int_fast64_t endpoints_ejected;    /* meshlet_endpoints_ejected (gauge) */
	atomic_uint_fast64_t overloaded;          /* meshlet_overloaded_total */
	pthread_mutex_t lock;                 /* guards the decisions list only */
	struct metrics_decision *decisions;
	struct metrics_labeled *labeled;      /* guarded by lock too */
	struct peerstats *peers;              /* per caller, for control's summaries */
};

struct metrics *metrics_new(void);
void metrics_free(struct metrics *m);

/*
 * Returns the counter of (allow, rule), creating it on first use. The pointer
 * stays valid until metrics_free: resolve once (e.g. per policy load) and
 * bump with metrics_inc() on the hot path. NULL only on allocation failure.
 */
struct metrics_decision *metrics_decision(struct metrics *m, int allow, const char *rule);

/* As metrics_decision, for the series label of family. */
struct metrics_labeled *metrics_labeled(struct metrics *m, enum metrics_family family,
                                        const char *label);
static inline void metrics_inc(atomic_uint_fast64_t *c) { atomic_fetch_add_explicit(c, 1, memory_order_relaxed); }
static inline void metrics_add(atomic_uint_fast64_t *c, uint64_t n) { atomic_fetch_add_explicit(c, n, memory_order_relaxed); }

void metrics_observe_duration(struct metrics *m, double seconds);
void metrics_count_http(struct metrics *m, int status);
/* Counts one gRPC call by grpc-status; codes outside 0..16 are ignored. */
void metrics_count_grpc(struct metrics *m, int grpc_status);

/* Writes the Prometheus text exposition (version 0.0.4) of m to out.
 * Returns 0 or -EIO. */
int metrics_render(struct metrics *m, FILE *out);

#endif
