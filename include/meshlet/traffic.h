/*
 * traffic: the traffic document of docs/traffic.md (how calls to one
 * service are handled: timeouts, retries, outlier ejection, limits, rate
 * limits, faults), parsed whole into an immutable struct traffic, and the
 * pure pieces the data path applies it with: token buckets, the fault
 * roll, the retry budget, backoff with jitter and outlier-ejection
 * bookkeeping. Nothing here reads a clock or a random source: time
 * (monotonic microseconds) and random numbers are passed in, so every
 * piece is deterministic under test.
 *
 * Rate limits and faults select requests with the fields and the matcher
 * of policy rules (policy_rule_parse_select / policy_rule_matches).
 */
#ifndef MESHLET_TRAFFIC_H
#define MESHLET_TRAFFIC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "meshlet/json.h"
#include "meshlet/policy.h"

/* Defaults when the document (or the field) is absent. */
#define TRAFFIC_CONNECT_MS_DEFAULT 5000
#define TRAFFIC_REQUEST_MS_DEFAULT 30000
#define TRAFFIC_BUDGET_PERCENT_DEFAULT 20
#define TRAFFIC_BACKOFF_MS_DEFAULT 25
#define TRAFFIC_OUTLIER_FAILURES_DEFAULT 5
#define TRAFFIC_OUTLIER_EJECT_MS_DEFAULT 30000
#define TRAFFIC_OUTLIER_MAX_PERCENT_DEFAULT 50
/* Limits of the document. */
#define TRAFFIC_MAX_RULES 1024                 /* rate_limits, faults each */
#define TRAFFIC_ATTEMPTS_MAX 10
#define TRAFFIC_BACKOFF_MS_MAX 10000
#define TRAFFIC_RPS_MAX 1000000.0
#define TRAFFIC_BURST_MAX 1000000
#define TRAFFIC_LIMIT_MAX 1000000               /* max_connections, max_pending_requests */
#define TRAFFIC_DELAY_MS_MAX 3600000
/* The retry budget's window, and the cap of a doubled ejection. */
#define TRAFFIC_BUDGET_WINDOW_S 10
#define TRAFFIC_EJECT_MAX_MS 300000
/* Callers one per-caller rate limit keeps a bucket for; further callers
 * share one bucket (so memory stays bounded whoever calls). */
#define TRAFFIC_CALLERS_MAX 1024

/* What a retry is for (retries.on). */
enum traffic_retry_on {
	TRAFFIC_ON_CONNECT_FAILURE = 1u << 0,   /* "connect-failure" */
	TRAFFIC_ON_RESET = 1u << 1,             /* "reset": closed before the answer */
	TRAFFIC_ON_TIMEOUT = 1u << 2,           /* "timeout": the request timeout */
	TRAFFIC_ON_5XX = 1u << 3,               /* "5xx": any 500..599 */
};

struct traffic_retries {
	unsigned attempts;              /* extra attempts; 0: no retries */
	unsigned on;                    /* enum traffic_retry_on bits */
	bool on_status[100];            /* "500".."599" named one by one */
	unsigned budget_percent;
	uint32_t backoff_ms;
};

struct traffic_outlier {
	unsigned consecutive_failures;  /* 0: no ejection */
	uint32_t eject_ms;
	unsigned max_ejected_percent;
};

/* A rate limit: a token bucket of burst tokens refilled at rps per second,
 * one per caller identity (per_caller) or one for the rule. */
struct traffic_rate_limit {
	struct policy_rule sel;         /* name and selectors; action allow */
	double rps;
	uint32_t burst;
	bool per_caller;
};

/* A fault: in percent of the requests it selects, wait delay_ms (when
 * has_delay), then answer abort_status (when non-zero) instead of
 * forwarding. */
struct traffic_fault {
	struct policy_rule sel;
	double percent;
	bool has_delay;
	uint32_t delay_ms;
	int abort_status;
};

struct traffic {
	char *service;
	uint32_t connect_ms;
	uint32_t request_ms;
	struct traffic_retries retries;
	struct traffic_outlier outlier;
	uint32_t max_connections;       /* 0: unlimited */
	uint32_t max_pending_requests;  /* 0: unlimited */
	struct traffic_rate_limit *rate_limits;
	size_t n_rate_limits;
	struct traffic_fault *faults;
	size_t n_faults;
};

/*
 * Validates and compiles a traffic document. Unknown fields, wrong types,
 * out-of-range numbers (negative times, percent over 100), duplicate
 * names and bad SPIFFE IDs are refused with the JSON path. Returns a new
 * struct traffic (free with traffic_free) or NULL with err set.
 */
struct traffic *traffic_parse(const json_t *doc, struct meshlet_err *err);

/* json_load_strict (at most POLICY_MAX_FILE bytes) + traffic_parse. */
struct traffic *traffic_load(const char *file, struct meshlet_err *err);

/*
 * A set of documents (static mode's traffic_file): one document, or an
 * array of documents for distinct services (errors prefixed "[i]").
 * Returns 0 with *out (n of them; free with traffic_set_free), or -EINVAL
 * with err set.
 */
int traffic_parse_set(const json_t *doc, struct traffic ***out, size_t *n,
                      struct meshlet_err *err);
int traffic_load_set(const char *file, struct traffic ***out, size_t *n, struct meshlet_err *err);
void traffic_set_free(struct traffic **set, size_t n);

/* The settings of an absent document for service (a copy of svc is
 * kept). NULL when out of memory. */
struct traffic *traffic_default(const char *service);

void traffic_free(struct traffic *t);

/* True when rl / f selects req (as a policy allow rule would). */
bool traffic_rate_limit_selects(const struct traffic_rate_limit *rl,
                                const struct policy_request *req);
bool traffic_fault_selects(const struct traffic_fault *f, const struct policy_request *req);

/* True when an answer with status (or none, for the failure bits) may be
 * retried under r: connect failures, resets and timeouts by their bits. */
bool traffic_retry_on_status(const struct traffic_retries *r, int status);

/* ---- token bucket ---- */

struct traffic_bucket {
	double tokens;
	int64_t last_us;
	bool started;                   /* false: full, as a new bucket */
};

/* Takes one token at now_us (monotonic). Returns 0 when it was there,
 * else the microseconds until one will be (nothing taken). */
int64_t traffic_bucket_take(struct traffic_bucket *b, double rps, double burst, int64_t now_us);

/* The buckets of one traffic document's rate limits, per rule and caller.
 * Thread-safe: each rate limit's buckets have a lock of their own. */
struct traffic_limiter;

/* A limiter for t (which must outlive it); NULL when out of memory. */
struct traffic_limiter *traffic_limiter_new(const struct traffic *t);
void traffic_limiter_free(struct traffic_limiter *l);

/*
 * A new version of the document keeps the tokens of the old: every rate
 * limit of l's document that from's (may be NULL) has with the same name,
 * requests_per_second, burst and per shares from's buckets from now on
 * (reference-counted: both limiters draw from the same tokens, whichever
 * is freed first). A changed or new limit starts full. Call before l is
 * used. Returns how many limits were kept.
 */
size_t traffic_limiter_inherit(struct traffic_limiter *l, const struct traffic_limiter *from);

/*
 * Takes a token for req (caller req->peer_id) from every rate limit of
 * the limiter's document that selects it. Returns NULL when all admitted
 * it, else the limit that refused, with *retry_after_us until it would
 * admit (tokens taken from limits before it stay taken).
 */
const struct traffic_rate_limit *traffic_limiter_admit(struct traffic_limiter *l,
                                                       const struct policy_request *req,
                                                       int64_t now_us, int64_t *retry_after_us);

/* Whole seconds for a Retry-After header: at least 1. */
unsigned traffic_retry_after_s(int64_t retry_after_us);

/* ---- faults ---- */

/* A uniform 64-bit random number; arg is the generator's state. */
typedef uint64_t (*traffic_rng_fn)(void *arg);

/* True with probability percent/100 for a uniform r. */
bool traffic_roll(double percent, uint64_t r);

struct traffic_fault_decision {
	const struct traffic_fault *delay;   /* the fault that delays, or NULL */
	const struct traffic_fault *abort;   /* the fault that aborts, or NULL */
	uint32_t delay_ms;
	int abort_status;
};

/* Rolls every fault of t that selects req once (rng draws one number per
 * selecting fault): the longest delay and the first abort that hit. */
void traffic_fault_decide(const struct traffic *t, const struct policy_request *req,
                          traffic_rng_fn rng, void *rng_arg, struct traffic_fault_decision *out);

/* ---- retries ---- */

/* Requests and retries over the last TRAFFIC_BUDGET_WINDOW_S seconds, in
 * one-second slots. Zero-initialise. */
struct traffic_budget {
	int64_t slot_s[TRAFFIC_BUDGET_WINDOW_S];
	uint32_t requests[TRAFFIC_BUDGET_WINDOW_S];
	uint32_t retries[TRAFFIC_BUDGET_WINDOW_S];
};

/* Counts a first attempt at now_us. */
void traffic_budget_request(struct traffic_budget *b, int64_t now_us);

/* True (and the retry counted) when one more retry keeps the retries of
 * the window within percent of its first attempts. */
bool traffic_budget_try_retry(struct traffic_budget *b, unsigned percent, int64_t now_us);

/* The wait before retry number attempt (1, 2, ...): base_ms doubled per
 * attempt (at most 8 times base), with "equal jitter" from r: a uniform
 * value in [half, whole] of it. */
uint32_t traffic_backoff_ms(uint32_t base_ms, unsigned attempt, uint64_t r);

/* ---- outlier ejection ---- */

struct traffic_outlier_ep {
	unsigned failures;              /* consecutive failures */
	unsigned ejections;             /* ejections without a success between */
	int64_t until_us;               /* ejected until then */
	bool ejected;
};

/* The ejection state of n endpoints; free with traffic_outlier_set_free. */
struct traffic_outlier_set {
	struct traffic_outlier_ep *eps;
	size_t n;
	size_t n_ejected;
};

/* Returns 0 or -ENOMEM. */
int traffic_outlier_set_init(struct traffic_outlier_set *s, size_t n);
void traffic_outlier_set_free(struct traffic_outlier_set *s);

/* The most endpoints of n that cfg lets be ejected at once. */
size_t traffic_outlier_cap(const struct traffic_outlier *cfg, size_t n);

/*
 * Records the result of a call to endpoint i (failed: a connect failure or
 * a 5xx). Returns true when this ejected i: after consecutive_failures
 * failures, for eject_ms doubled per ejection since its last success (at
 * most TRAFFIC_EJECT_MAX_MS), unless traffic_outlier_cap() are ejected.
 */
bool traffic_outlier_report(struct traffic_outlier_set *s, const struct traffic_outlier *cfg,
                            size_t i, bool failed, int64_t now_us);

/* True when endpoint i may take traffic at now_us; an ejection whose time
 * has passed ends here (the endpoint gets one more chance). */
bool traffic_outlier_usable(struct traffic_outlier_set *s, size_t i, int64_t now_us);

#endif
