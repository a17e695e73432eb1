/*
 * endpick: which endpoint of an outbound listener a new upstream
 * connection (or a pooled one) goes to, and what connects there taught:
 * round-robin over the endpoints not yet tried for this call and not
 * ejected, passive outlier ejection on connect failures (lib/traffic.c's
 * bookkeeping: consecutive_failures, eject time doubling while the
 * endpoint keeps failing, max_ejected_percent cap), and the retry budget.
 *
 * One struct endpick per worker thread (no locks), state per outbound
 * listener, kept by endpoint address so that a new snapshot with the same
 * endpoints keeps it. Pure logic: time comes in as monotonic microseconds,
 * nothing here opens a socket.
 */
#ifndef MESHLET_PROXY_ENDPICK_H
#define MESHLET_PROXY_ENDPICK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "meshlet/config.h"
#include "meshlet/traffic.h"

/* Endpoints a call may mark as tried; with more, the ones past this are
 * never excluded (the number of tries still bounds the call). */
#define ENDPICK_TRACKED 256

/* The endpoints one call tried already. Zero-initialise. */
struct endpick_tried {
	uint64_t bits[ENDPICK_TRACKED / 64];
	unsigned n;                     /* tries so far */
	bool again;                     /* restarted: not a call's first choice */
};

/* Every endpoint was tried and the call may go on (a retry with one
 * endpoint left): forgets which, keeping the rotation where it is. */
void endpick_tried_restart(struct endpick_tried *t);

struct endpick;

/* A worker's state for n_listeners outbound listeners; NULL when out of memory. */
struct endpick *endpick_new(size_t n_listeners);
void endpick_free(struct endpick *p);

/*
 * The next endpoint of listener (its current endpoints eps, n of them)
 * for a call that tried `tried`: round-robin from the listener's position,
 * skipping tried and ejected endpoints; when only ejected ones are left
 * untried, the next of those (a call is never refused for ejections
 * alone). Marks it tried and returns its index, or -1 when every
 * endpoint was tried (or n is 0, or no memory for the state).
 */
int endpick_choose(struct endpick *p, size_t listener, const struct config_addr *eps, size_t n,
                   struct endpick_tried *tried, int64_t now_us);

/*
 * The outcome of a connect to the endpoint at addr of listener: a failure
 * (refused, timed out) counts towards cfg's ejection, a success ends the
 * streak. By address, not index: a connection that chose from an older
 * snapshot's list reports rightly (an address no longer listed is
 * ignored). Returns true when this ejected the endpoint. cfg with
 * consecutive_failures 0: no ejection.
 */
bool endpick_report(struct endpick *p, size_t listener, const struct config_addr *addr,
                    bool failed, const struct traffic_outlier *cfg, int64_t now_us);

/* Endpoints ejected now across the worker's listeners (an ejection whose
 * time passed counts until the next choice for that listener ends it). */
size_t endpick_ejected(const struct endpick *p);

/* The retry budget of listener: a first attempt, and whether one retry
 * more stays within percent of them over the last 10 s (then counted). */
void endpick_first_attempt(struct endpick *p, size_t listener, int64_t now_us);
bool endpick_may_retry(struct endpick *p, size_t listener, unsigned percent, int64_t now_us);

/* ---- retries after a request was sent (the pool, upool.c) ---- */

/* How an attempt of a request failed, for retries.on. */
enum endpick_failure {
	ENDPICK_RESET,                  /* the stream or its connection closed before the head */
	ENDPICK_TIMEOUT,                /* no response head within request_seconds */
	ENDPICK_STATUS,                 /* a response head with a status (5xx) */
};

/* What a request is: may it be sent again? */
struct endpick_request {
	unsigned retries;               /* retries made so far */
	bool idempotent;                /* endpick_idempotent(method) */
	bool resendable;                /* its head and its whole body (so far) are kept */
};

/* GET, HEAD, OPTIONS, PUT, DELETE and TRACE (RFC 9110 9.2.2). */
bool endpick_idempotent(const char *method, size_t len);

/*
 * Whether the attempt that failed with why (status: the head's, for
 * ENDPICK_STATUS) may be retried under cfg: cfg's retries.on names it,
 * attempts are left, the request is idempotent (it reached the upstream,
 * which may have acted on it) and can be sent again. The budget is
 * endpick_may_retry's, asked after this.
 */
bool endpick_retryable(const struct traffic_retries *cfg, const struct endpick_request *r,
                       enum endpick_failure why, int status);

#endif
