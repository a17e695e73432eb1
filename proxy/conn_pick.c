/*
 * conn_pick: the callers' traffic rules on the connect step of an outbound
 * listener (docs/traffic.md), for tcp and http listeners alike: the
 * upstream's limits.max_connections, which endpoint to connect to
 * (endpick.c: round-robin, skipping ejected endpoints and those this
 * connection tried), the connect timeout, retries on connect failure to
 * another endpoint within retries.attempts and the retry budget, and the
 * connect outcomes that eject an endpoint.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "meshlet/log.h"
#include "conn-int.h"
#include "endpick.h"

/* The traffic document of the service behind outbound listener `listener`, or NULL. */
const struct traffic *conn_pick_listener_traffic(const struct snapshot *s, size_t listener)
{
	const struct snapshot_traffic *t = snapshot_traffic(s, s->cfg->outbound[listener].service);

	return t ? t->t : NULL;
}

static const struct traffic *upstream_traffic(const struct conn *c)
{
	return conn_pick_listener_traffic(c->snap, c->listener);
}

static int64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Applies to c: outbound through a listener's endpoints (not transparent). */
static bool picked(const struct conn *c)
{
	return !c->inbound && !c->tdest;
}

/* The answer to a call over limits: tcp is closed at once, HTTP gets a 503. */
static void refuse_overloaded(struct conn *c)
{
	static const char body[] = "{\"error\":\"overloaded\",\"limit\":\"max_connections\"}\n";
	char resp[256];
	int n;

	metrics_inc(&c->w->shared->metrics->overloaded);
	log_warn("conn %llu: limits.max_connections of %s reached", (unsigned long long)c->id,
	         conn_cfg(c)->outbound[c->listener].service);
	if (conn_cfg(c)->outbound[c->listener].protocol != PROTO_TCP) {
		n = snprintf(resp, sizeof(resp),
		             "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
		             "x-meshlet-overloaded: 1\r\ncontent-length: %zu\r\nconnection: close\r\n"
		             "\r\n%s", sizeof(body) - 1, body);
		conn_write_client_now(c, resp, (size_t)n);
	}
	conn_close(c, CR_OVERLOAD);
}

bool conn_pick_admit(struct conn *c)
{
	const struct traffic *t = upstream_traffic(c);
	atomic_uint *open = &c->w->shared->upstream_open[c->listener];

	if (!t || !t->max_connections)
		return true;
	if (atomic_fetch_add(open, 1) >= t->max_connections) {
		atomic_fetch_sub(open, 1);
		refuse_overloaded(c);
		return false;
	}
	c->upstream_counted = true;
	return true;
}

void conn_pick_release(struct conn *c)
{
	if (c->upstream_counted)
		atomic_fetch_sub(&c->w->shared->upstream_open[c->listener], 1);
	c->upstream_counted = false;
}

/* The gauge follows the worker's count (each worker adds its own change). */
static void update_gauge(struct worker *w, size_t before)
{
	size_t after = endpick_ejected(w->pick);

	if (after != before)
		atomic_fetch_add(&w->shared->metrics->endpoints_ejected,
		                 (int_fast64_t)after - (int_fast64_t)before);
}

void conn_pick_first_attempt(struct worker *w, size_t listener)
{
	endpick_first_attempt(w->pick, listener, now_us());
}

bool conn_pick_may_retry(struct worker *w, size_t listener, unsigned percent)
{
	return endpick_may_retry(w->pick, listener, percent, now_us());
}

int conn_pick_choose(struct worker *w, const struct snapshot *s, size_t listener,
                     struct endpick_tried *tried)
{
	const struct snapshot_outbound *o = &s->outbound[listener];
	size_t before = endpick_ejected(w->pick);
	int i;

	i = endpick_choose(w->pick, listener, o->endpoints, o->n_endpoints, tried, now_us());
	update_gauge(w, before);
	return i;
}

uint32_t conn_pick_listener_connect_ms(const struct snapshot *s, size_t listener)
{
	const struct traffic *t = conn_pick_listener_traffic(s, listener);

	return t ? t->connect_ms : s->cfg->timeouts.connect_ms;
}

uint32_t conn_pick_listener_request_ms(const struct snapshot *s, size_t listener)
{
	const struct traffic *t = conn_pick_listener_traffic(s, listener);

	return t ? t->request_ms : s->cfg->timeouts.response_head_ms;
}

uint32_t conn_pick_request_ms(const struct conn *c)
{
	return picked(c) ? conn_pick_listener_request_ms(c->snap, c->listener)
	                 : conn_cfg(c)->timeouts.response_head_ms;
}

void conn_pick_outcome(struct worker *w, const struct snapshot *s, size_t listener,
                       const struct config_addr *addr, bool failed)
{
	const struct traffic *t = conn_pick_listener_traffic(s, listener);
	size_t before;

	if (!t)
		return;
	before = endpick_ejected(w->pick);
	if (endpick_report(w->pick, listener, addr, failed, &t->outlier, now_us())) {
		metrics_inc(&w->shared->metrics->outlier_ejections);
		log_warn("endpoint %s of %s ejected after %u failures in a row", addr->text,
		         t->service, t->outlier.consecutive_failures);
	}
	update_gauge(w, before);
}

/*
 * After a failed connect: another try when the document's retries allow
 * one (attempts, "connect-failure", the budget; counted), or, without
 * retries, the proxy's own failover (every endpoint once: nothing of the
 * call reached anyone).
 */
static bool may_try_again(struct conn *c, const struct traffic *t)
{
	const struct traffic_retries *r = t ? &t->retries : NULL;

	if (!r || r->attempts == 0)
		return true;
	if (c->tried.n > r->attempts || !(r->on & TRAFFIC_ON_CONNECT_FAILURE) ||
	    !endpick_may_retry(c->w->pick, c->listener, r->budget_percent, now_us()))
		return false;
	metrics_inc(&c->w->shared->metrics->retries);
	return true;
}

bool conn_pick_next(struct conn *c)
{
	int i;

	if (!picked(c))
		return c->tries++ == 0;
	/* The retry budget's base: a call's first connect (an http listener's
	 * pooled requests count theirs in upool.c, its tunnels here). */
	if (c->tried.n == 0)
		endpick_first_attempt(c->w->pick, c->listener, now_us());
	if (c->tried.n && !may_try_again(c, upstream_traffic(c)))
		return false;
	i = conn_pick_choose(c->w, c->snap, c->listener, &c->tried);
	if (i < 0)
		return false;
	c->endpoint = (uint16_t)i;
	return true;
}

uint32_t conn_pick_connect_ms(const struct conn *c)
{
	return picked(c) ? conn_pick_listener_connect_ms(c->snap, c->listener)
	                 : conn_cfg(c)->timeouts.connect_ms;
}

void conn_pick_report(struct conn *c, bool failed)
{
	if (picked(c))
		conn_pick_outcome(c->w, c->snap, c->listener,
		                  &c->snap->outbound[c->listener].endpoints[c->endpoint], failed);
}
