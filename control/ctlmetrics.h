/*
 * ctlmetrics: meshlet-control's own metrics, rendered as Prometheus text
 * (exposition format 0.0.4), and the plain HTTP listener that serves them
 * (GET /metrics on --metrics-listen).
 *
 * Control runs one event loop, so these are plain counters: no atomics.
 * Counters live here; gauges (long polls waiting, CA phase, ...) are read
 * from the server and the state when a scrape comes, and handed in.
 *
 * Label sets are bounded by construction: API requests are counted by the
 * route's pattern ("/v1/policies/{svc}", never the raw path; "unmatched"
 * for paths no route has), its method, and the HTTP status.
 */
#ifndef MESHLET_CONTROL_CTLMETRICS_H
#define MESHLET_CONTROL_CTLMETRICS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "meshlet/store.h"
#include "state.h"

struct route;

/* Bounds (seconds) of meshlet_control_store_duration_seconds. */
#define CTLMETRICS_STORE_BUCKETS 12

enum ctlmetrics_issue { ISSUE_JOIN, ISSUE_RENEWAL, ISSUE_COUNT };

/* What a scrape reads from the server and the state at that moment. */
struct ctlmetrics_gauges {
	size_t long_polls;             /* config long polls waiting */
	size_t connections;            /* TLS connections open */
	uint64_t accepted;             /* connections accepted since start */
	size_t proxies_polling;        /* distinct proxies holding a long poll */
	size_t revoked;                /* serials on the revocation list */
	size_t roots;                  /* roots in the trust bundle */
	enum ca_phase ca_phase;
	int64_t server_cert_expiry;    /* control's own certificate, Unix seconds */
};

struct ctlmetrics;
struct event_base;
struct meshlet_err;

/* Fills *g when a scrape comes. */
typedef void (*ctlmetrics_gauges_fn)(void *arg, struct ctlmetrics_gauges *g);

/* A zeroed set for the route table routes (ended by a NULL method; kept,
 * not copied), or NULL (out of memory). */
struct ctlmetrics *ctlmetrics_new(const struct route *routes);
void ctlmetrics_free(struct ctlmetrics *m);

/* One answered API request: r is the route it matched (NULL: none), method
 * the request's ("GET", ...: a static string), status its HTTP status. */
void ctlmetrics_request(struct ctlmetrics *m, const struct route *r, const char *method,
                        int status);

/* One certificate issued to a proxy. */
void ctlmetrics_issued(struct ctlmetrics *m, enum ctlmetrics_issue kind);

/* A store call took seconds: a store_observer_fn (arg: the ctlmetrics). */
void ctlmetrics_store_observe(void *arg, enum store_call call, double seconds);

/*
 * Serves GET /metrics as plain HTTP on addr ("host:port", "[v6]:port"; port
 * 0 picks one) on base, with gauges from fn(arg): no TLS and no
 * credentials, so addr should be loopback or a network only Prometheus
 * reaches. Logs the address bound. Once per m. Returns 0, or -EINVAL with
 * err set (the flag: "metrics-listen").
 */
int ctlmetrics_listen(struct ctlmetrics *m, struct event_base *base, const char *addr,
                      ctlmetrics_gauges_fn fn, void *arg, struct meshlet_err *err);

/* Writes the text exposition of m and g to out. Returns 0 or -EIO. */
int ctlmetrics_render(const struct ctlmetrics *m, const struct ctlmetrics_gauges *g, FILE *out);

#endif
