/*
 * httpreq: what every HTTP request gets whatever protocol carried it
 * (httpflow.c: HTTP/1.1, h2flow.c: HTTP/2): the policy decision on the
 * parsed head, the request ID, the x-forwarded-client-cert value, the
 * proxy's own JSON error bodies, and the per-request access log line and
 * counters. One place, so HTTP/1.1 and HTTP/2 decide and log alike.
 */
#ifndef MESHLET_PROXY_HTTPREQ_H
#define MESHLET_PROXY_HTTPREQ_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "meshlet/http.h"
#include "conn-t.h"

#define HTTPREQ_ID_LEN 128        /* longest caller x-request-id we keep */

/* What the inbound policy made of a request. */
struct httpreq_verdict {
	int local_status;             /* 0: forward it; else the proxy answers (400, 403) */
	const char *local_reason;     /* short static text for a 400 */
	bool decided;                 /* the policy ran */
	enum policy_action decision;
	const char *rule;             /* owned by the connection's snapshot */
	/* An allowed request the service's traffic document answers instead. */
	const char *traffic_name;     /* the rate limit or fault (the snapshot's), or NULL */
	bool traffic_fault;           /* a fault's abort (else a rate limit's 429) */
	unsigned retry_after;         /* 429: seconds for Retry-After */
	/* A fault's delay: the request (forwarded, or its fault's abort) waits
	 * this long first; 0: none. Never set with a rate limit's 429. */
	uint32_t delay_ms;
};

/*
 * Inbound: decides h (path normalised, policy fields checked) with the
 * connection's policy, counts the decision (metrics and the summary for
 * control), then applies the service's rate limits and faults to an
 * allowed request. Returns true to forward.
 */
bool httpreq_decide(struct conn *c, const struct http_head *h, struct httpreq_verdict *v);

/*
 * The request ID to use: the caller's when it sent exactly one usable
 * copy (caller: that copy, NULL otherwise), else a new one, with *replace
 * set so ours replaces every copy on the way to the app.
 */
void httpreq_request_id(struct worker *w, const char *caller, char out[HTTPREQ_ID_LEN + 1],
                        bool *replace);

/* Inbound: "By=<us>;URI=<verified peer>", the only x-forwarded-client-cert the app sees. */
void httpreq_xfcc(const struct conn *c, char *out, size_t len);

/*
 * The JSON body of the proxy's own answer: the 403 names v's rule, a rate
 * limit or fault names itself, others give the error text (reason, or the
 * status's phrase). v may be NULL. Returns its length.
 */
int httpreq_error_body(int status, const struct httpreq_verdict *v, const char *reason,
                       char *out, size_t len);

/* One answered request, for the access log and the counters. */
struct httpreq_record {
	const char *method, *path, *request_id, *rule;
	bool decided;
	enum policy_action decision;
	int status;
	int grpc_status;              /* -1: not gRPC */
	const char *version;          /* "1.1" or "2" */
	uint64_t bytes_in, bytes_out;
	struct timespec started;      /* CLOCK_MONOTONIC */
	struct timespec started_wall;
};

/* Stamps r's clocks with now. */
void httpreq_started(struct httpreq_record *r);

/* Counts r (meshlet_http_requests_total, _grpc_, the duration) and writes its
 * access log line. */
void httpreq_log(struct conn *c, const struct httpreq_record *r);

#endif
