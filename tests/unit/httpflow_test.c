/*
 * Unit tests for proxy/httpflow.c, driven through its conn_proto_ops table
 * as the relay drives it: bytes put into a direction's input, produce()
 * run until it needs more, what it hands to the sink collected. The
 * connection is a real struct conn on a real snapshot (config, policy and
 * SVID through lib/), without sockets.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "meshlet/http.h"
#include "conn.h"
#include "httpflow.h"
#include "proxy_fixture.h"
#include "worker-t.h"

#define FRONTEND "spiffe://mesh.local/svc/frontend"
#define SLOW_MS 30000

static const char config_json[] = "{\"service\": \"orders\", \"trust_domain\": \"mesh.local\","
	" \"tls\": {\"cert\": \"svid.pem\", \"key\": \"svid.key\", \"bundle\": \"bundle.pem\"},"
	" \"policy_file\": \"policy.json\", \"log\": {\"access_log\": false},"
	" \"timeouts\": {\"request_head_seconds\": 30, \"response_head_seconds\": 30},"
	" \"inbound\": [{\"listen\": \"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\","
	" \"protocol\": \"http\"}],"
	" \"outbound\": [{\"listen\": \"127.0.0.1:15001\", \"service\": \"payments\","
	" \"protocol\": \"http\", \"endpoints\": [\"10.0.1.1:15006\"]}]}";

static const char policy_json[] = "{\"service\": \"orders\", \"default\": \"deny\", \"rules\": ["
	"{\"name\": \"frontend-reads\", \"action\": \"allow\", \"from\": [\"" FRONTEND "\"],"
	" \"methods\": [\"GET\", \"HEAD\"], \"paths\": [\"/orders\", \"/orders/*\"]},"
	"{\"name\": \"tenant-api\", \"action\": \"allow\", \"paths\": [\"/api/*\"],"
	" \"headers\": {\"X-Tenant\": \"acme\"}},"
	"{\"name\": \"no-delete\", \"action\": \"deny\", \"methods\": [\"DELETE\"]}]}";

struct harness {
	struct metrics *m;
	struct snapshot *s;
	struct worker_shared sh;
	struct worker w;
	struct conn *c;             /* NULL once the flow closed it */
};

static struct snapshot *current(void *arg)
{
	struct harness *h = arg;

	return snapshot_ref(h->s);
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
}

/* A connection past its handshake (inbound: from FRONTEND), relaying. */
static void open_conn(struct harness *h, bool inbound)
{
	struct conn *c = calloc(1, sizeof(*c));

	assert_non_null(c);
	c->w = &h->w;
	c->snap = snapshot_ref(h->s);
	c->id = 1;
	c->inbound = inbound;
	c->dir = inbound ? DIR_INBOUND : DIR_OUTBOUND;
	c->tls_fd = c->plain_fd = -1;
	c->peer = inbound ? strdup(FRONTEND) : NULL;
	c->state = CONN_RELAYING;
	clock_gettime(CLOCK_MONOTONIC, &c->started);
	clock_gettime(CLOCK_REALTIME, &c->started_wall);
	c->proto = &httpflow_ops;
	assert_int_equal(c->proto->init(c), 0);
	/* conn_kick() activates it; nothing dispatches the base here */
	event_assign(&c->tls_ev, h->w.base, -1, 0, on_kick, c);
	h->w.conns = c;
	h->w.n_conns = 1;
	atomic_fetch_add(&h->sh.open_conns, 1);
	atomic_fetch_add(&h->m->connections_active[c->dir], 1);
	c->proto->start(c);
	h->c = c;
}

static int setup(void **state)
{
	struct harness *h = calloc(1, sizeof(*h));

	assert_non_null(h);
	h->m = metrics_new();
	h->s = fixture_snapshot(config_json, policy_json, NULL, 0, h->m);
	h->sh.metrics = h->m;
	h->sh.snapshot = current;
	h->sh.arg = h;
	h->w.shared = &h->sh;
	h->w.base = event_base_new();
	assert_non_null(h->w.base);
	open_conn(h, true);
	*state = h;
	return 0;
}

static int teardown(void **state)
{
	struct harness *h = *state;

	if (h->c)
		conn_close(h->c, CR_DONE);
	assert_int_equal(h->w.n_conns, 0);
	assert_int_equal(atomic_load(&h->m->connections_active[DIR_INBOUND]), 0);
	conn_free_buffers(&h->w);
	event_base_free(h->w.base);
	snapshot_unref(h->s);
	metrics_free(h->m);
	free(h);
	return 0;
}

static int req_dir(const struct harness *h)
{
	return h->c->inbound ? RELAY_DOWN : RELAY_UP;
}

static int resp_dir(const struct harness *h)
{
	return h->c->inbound ? RELAY_UP : RELAY_DOWN;
}

/* The source of direction d delivers text (one read). */
static void put(struct harness *h, int d, const char *text)
{
	struct relay_dir *r = &h->c->d[d];
	size_t len = strlen(text);

	assert_true(len <= RELAY_BUF_SIZE);
	assert_true(!r->in || r->in->off == r->in->len);    /* the last read was used up */
	if (!r->in)
		r->in = calloc(1, sizeof(*r->in));
	assert_non_null(r->in);
	memcpy(r->in->data, text, len);
	r->in->off = 0;
	r->in->len = (uint32_t)len;
}

/*
 * Runs direction d as the relay's pump does, with a sink that takes
 * everything, until the flow needs input or waits. Returns what reached
 * the sink (caller frees); sets h->c to NULL when the flow closed c.
 */
static char *run(struct harness *h, int d)
{
	char *out = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&out, &len);

	assert_non_null(f);
	for (int i = 0; i < 10000; i++) {
		struct relay_dir *r = &h->c->d[d];
		int rc;

		if (r->out_len) {
			fwrite(r->out, 1, r->out_len, f);
			r->bytes += r->out_len;
			free(r->owned);
			r->owned = NULL;
			r->out = NULL;
			r->out_len = 0;
			continue;
		}
		rc = h->c->proto->produce(h->c, d);
		if (rc < 0) {
			h->c = NULL;
			break;
		}
		if (rc == 0)
			break;
	}
	fclose(f);
	return out;
}

static size_t count(const char *hay, const char *needle)
{
	size_t n = 0;

	for (const char *p = hay; (p = strstr(p, needle)) != NULL; p += strlen(needle))
		n++;
	return n;
}

/* The x-request-id value the flow sent (copied into id), or fails. */
static void request_id(const char *head, char *id, size_t len)
{
	const char *p = strstr(head, "x-request-id: ");
	size_t n;

	assert_non_null(p);
	p += strlen("x-request-id: ");
	n = strcspn(p, "\r");
	assert_true(n < len);
	memcpy(id, p, n);
	id[n] = '\0';
}

static uint64_t http_count(const struct harness *h, int status)
{
	return atomic_load(&h->m->http_requests[status]);
}

static uint64_t rule_count(const struct harness *h, int allow, const char *rule)
{
	return atomic_load(&metrics_decision(h->m, allow, rule)->count);
}

#define GET(path) "GET " path " HTTP/1.1\r\nhost: orders\r\n\r\n"
#define OK_2 "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

static void test_allowed_request_rewritten(void **state)
{
	struct harness *h = *state;
	char *up, *down, id[200];

	put(h, req_dir(h), GET("/orders/1"));
	up = run(h, req_dir(h));
	assert_non_null(strstr(up, "GET /orders/1 HTTP/1.1\r\n"));
	/* the app learns who called, from the verified certificate */
	assert_int_equal(count(up, "x-forwarded-client-cert: By=" FIXTURE_SELF ";URI=" FRONTEND
	                       "\r\n"), 1);
	request_id(up, id, sizeof(id));
	assert_int_equal(strlen(id), 32);
	assert_int_equal(strspn(id, "0123456789abcdef"), 32);
	assert_false(h->c->proto->done(h->c));
	assert_int_equal(rule_count(h, 1, "frontend-reads"), 1);

	put(h, resp_dir(h), OK_2);
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 200 OK\r\n"));
	assert_int_equal(strlen(strstr(down, "\r\n\r\n")), 6);    /* the body, whole */
	assert_true(h->c->proto->done(h->c));
	assert_true(h->c->proto->logged(h->c));
	assert_false(h->c->closing);
	assert_int_equal(http_count(h, 200), 1);
	free(up);
	free(down);
}

/* A denied request is answered by the proxy in its place in the pipeline:
 * before the answer to the request after it, which the app still gets. */
static void test_pipelined_deny_keeps_order(void **state)
{
	struct harness *h = *state;
	char *up, *early, *down;

	put(h, req_dir(h), "DELETE /orders/1 HTTP/1.1\r\nhost: orders\r\n\r\n" GET("/orders/2"));
	up = run(h, req_dir(h));
	assert_null(strstr(up, "DELETE"));
	assert_int_equal(count(up, "GET /orders/2 "), 1);
	early = run(h, resp_dir(h));
	assert_non_null(strstr(early, "HTTP/1.1 403 Forbidden\r\n"));
	assert_non_null(strstr(early, "\"rule\":\"no-delete\""));
	assert_null(strstr(early, "connection: close"));    /* no body to skip: keep-alive */
	assert_false(h->c->proto->done(h->c));

	put(h, resp_dir(h), OK_2);
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 200 OK\r\n"));
	assert_true(h->c->proto->done(h->c));
	assert_false(h->c->closing);
	assert_int_equal(http_count(h, 403), 1);
	assert_int_equal(rule_count(h, 0, "no-delete"), 1);
	free(up);
	free(early);
	free(down);
}

static void test_request_id(void **state)
{
	struct harness *h = *state;
	char *up, id[200];

	/* one usable copy: kept, so the caller's logs and ours agree */
	put(h, req_dir(h), "GET /orders HTTP/1.1\r\nhost: orders\r\nx-request-id: abc-123\r\n\r\n");
	up = run(h, req_dir(h));
	assert_int_equal(count(up, "x-request-id:"), 1);
	assert_int_equal(count(up, "x-request-id: abc-123\r\n"), 1);
	free(up);
	put(h, resp_dir(h), OK_2);
	free(run(h, resp_dir(h)));

	/* two copies: neither wins, ours replaces both */
	put(h, req_dir(h), "GET /orders HTTP/1.1\r\nhost: orders\r\nx-request-id: a\r\n"
	    "x-request-id: b\r\n\r\n");
	up = run(h, req_dir(h));
	assert_int_equal(count(up, "x-request-id:"), 1);
	request_id(up, id, sizeof(id));
	assert_int_equal(strlen(id), 32);
	free(up);
	put(h, resp_dir(h), OK_2);
	free(run(h, resp_dir(h)));

	/* one copy that would break the JSON log line: replaced */
	put(h, req_dir(h), "GET /orders HTTP/1.1\r\nhost: orders\r\nx-request-id: a\"b\r\n\r\n");
	up = run(h, req_dir(h));
	assert_int_equal(count(up, "x-request-id:"), 1);
	assert_null(strstr(up, "a\"b"));
	free(up);
}

/* Content-Length beside Transfer-Encoding: the request is never forwarded,
 * the client gets 400 and the connection closes after it. */
static void test_smuggling_refused(void **state)
{
	struct harness *h = *state;
	char *up, *down;

	put(h, req_dir(h), "POST /orders HTTP/1.1\r\nhost: orders\r\ncontent-length: 5\r\n"
	    "transfer-encoding: chunked\r\n\r\n0\r\n\r\n" GET("/orders/1"));
	up = run(h, req_dir(h));
	assert_string_equal(up, "");
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 400 "));
	assert_non_null(strstr(down, "connection: close\r\n"));
	assert_true(h->c->closing);
	assert_true(h->c->d[req_dir(h)].paused);    /* the GET behind it is never read */
	assert_int_equal(http_count(h, 400), 1);
	free(up);
	free(down);
}

/* A header the policy evaluates must come once: the app must not read a
 * copy the policy did not. */
static void test_policy_header_twice(void **state)
{
	struct harness *h = *state;
	char *up, *down;

	put(h, req_dir(h), "GET /api/x HTTP/1.1\r\nhost: orders\r\nx-tenant: acme\r\n\r\n");
	up = run(h, req_dir(h));
	assert_non_null(strstr(up, "GET /api/x HTTP/1.1\r\n"));
	free(up);
	put(h, resp_dir(h), OK_2);
	free(run(h, resp_dir(h)));
	assert_int_equal(rule_count(h, 1, "tenant-api"), 1);

	put(h, req_dir(h), "GET /api/x HTTP/1.1\r\nhost: orders\r\nx-tenant: acme\r\n"
	    "X-Tenant: evil\r\n\r\n");
	up = run(h, req_dir(h));
	assert_string_equal(up, "");
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 400 "));
	assert_int_equal(rule_count(h, 1, "tenant-api"), 1);    /* never evaluated */
	free(up);
	free(down);
}

static void test_too_many_fields(void **state)
{
	struct harness *h = *state;
	char req[4096], *up, *down;
	int n = snprintf(req, sizeof(req), "GET /orders HTTP/1.1\r\nhost: orders\r\n");

	for (int i = 0; i < HTTP_DEFAULT_MAX_HEADERS; i++)
		n += snprintf(req + n, sizeof(req) - (size_t)n, "x-f%d: v\r\n", i);
	snprintf(req + n, sizeof(req) - (size_t)n, "\r\n");
	put(h, req_dir(h), req);
	up = run(h, req_dir(h));
	assert_string_equal(up, "");
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 431 "));
	assert_true(h->c->closing);
	free(up);
	free(down);
}

/*
 * An upstream that answers what nobody asked is not trusted further, once
 * the client's first bytes said HTTP/1.1. Before them it is held: an h2c
 * app may send its SETTINGS first, and only the client's preface says.
 */
static void test_response_without_request(void **state)
{
	struct harness *h = *state;
	char *out;

	put(h, resp_dir(h), "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
	out = run(h, resp_dir(h));
	assert_string_equal(out, "");
	free(out);
	assert_non_null(h->c);
	put(h, req_dir(h), "GE");
	free(run(h, req_dir(h)));
	free(run(h, resp_dir(h)));
	assert_null(h->c);
	assert_int_equal(h->w.n_conns, 0);
}

static void test_upstream_gone(void **state)
{
	struct harness *h = *state;
	char *down;

	put(h, req_dir(h), GET("/orders/1") GET("/orders/2"));
	free(run(h, req_dir(h)));
	put(h, resp_dir(h), OK_2);
	free(run(h, resp_dir(h)));
	/* the app closes with the second request unanswered */
	h->c->d[resp_dir(h)].src_eof = true;
	assert_int_equal(h->c->proto->eof(h->c, resp_dir(h)), 0);
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 502 "));
	assert_non_null(strstr(down, "upstream closed the connection"));
	assert_non_null(strstr(down, "connection: close\r\n"));
	assert_true(h->c->proto->done(h->c));
	assert_true(h->c->closing);
	assert_int_equal(http_count(h, 200), 1);
	assert_int_equal(http_count(h, 502), 1);
	free(down);
}

/* Past HTTPFLOW_INFLIGHT unanswered requests the request side stops
 * reading; an answer makes room again. */
static void test_inflight_bound(void **state)
{
	struct harness *h = *state;
	char req[RELAY_BUF_SIZE] = "", *up;
	struct relay_dir *r = &h->c->d[req_dir(h)];

	for (int i = 0; i <= HTTPFLOW_INFLIGHT; i++)
		strcat(req, GET("/orders/n"));
	put(h, req_dir(h), req);
	up = run(h, req_dir(h));
	assert_int_equal(count(up, "GET /orders/n "), HTTPFLOW_INFLIGHT);
	assert_true(r->in->off < r->in->len);    /* the last one waits, unread */
	free(up);
	up = run(h, req_dir(h));
	assert_string_equal(up, "");
	free(up);

	put(h, resp_dir(h), OK_2);
	free(run(h, resp_dir(h)));
	up = run(h, req_dir(h));
	assert_int_equal(count(up, "GET /orders/n "), 1);
	free(up);
}

static void test_drain(void **state)
{
	struct harness *h = *state;
	char *down;

	/* idle between requests: may close at once */
	assert_true(h->c->proto->drain(h->c));

	/* a request in flight: its answer says close, then the connection ends */
	put(h, req_dir(h), GET("/orders/1"));
	free(run(h, req_dir(h)));
	assert_false(h->c->proto->drain(h->c));
	put(h, resp_dir(h), OK_2);
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 200 OK\r\n"));
	assert_non_null(strstr(down, "connection: close\r\n"));
	assert_true(h->c->closing);
	free(down);
}

/* Inbound, the client is on the TLS side, the app on the plain one. */
static void test_deadlines(void **state)
{
	struct harness *h = *state;
	uint64_t now = conn_clock_ms(), head, resp;
	char *down;

	head = h->c->proto->due(h->c, true);
	assert_true(head >= now + SLOW_MS - 1000 && head <= now + SLOW_MS);
	assert_int_equal(h->c->proto->due(h->c, false), 0);
	assert_false(h->c->proto->on_timeout(h->c, head - 1));

	put(h, req_dir(h), GET("/orders/1"));
	free(run(h, req_dir(h)));
	/* between requests no head clock runs; the response's does */
	assert_int_equal(h->c->proto->due(h->c, true), 0);
	resp = h->c->proto->due(h->c, false);
	assert_true(resp >= now + SLOW_MS - 1000);
	assert_false(h->c->proto->on_timeout(h->c, resp - 1));
	assert_true(h->c->proto->on_timeout(h->c, resp));
	down = run(h, resp_dir(h));
	assert_non_null(strstr(down, "HTTP/1.1 504 "));
	assert_non_null(strstr(down, "upstream timed out"));
	assert_true(h->c->closing);
	free(down);
}

/* A connected client that never sends a head: closed as idle, no answer. */
static void test_silent_client(void **state)
{
	struct harness *h = *state;
	uint64_t head = h->c->proto->due(h->c, true);

	assert_true(h->c->proto->on_timeout(h->c, head));
	h->c = NULL;    /* closed by the flow */
	assert_int_equal(h->w.n_conns, 0);
}

/* Outbound, the app's own x-forwarded-client-cert never reaches the mesh,
 * and no request is decided here (the inbound side does). */
static void test_outbound_strips_client_cert(void **state)
{
	struct harness *h = *state;
	char *up;

	conn_close(h->c, CR_DONE);
	open_conn(h, false);
	put(h, req_dir(h), "DELETE /x HTTP/1.1\r\nhost: payments\r\n"
	    "x-forwarded-client-cert: By=spiffe://mesh.local/svc/evil\r\n\r\n");
	up = run(h, req_dir(h));
	assert_non_null(strstr(up, "DELETE /x HTTP/1.1\r\n"));
	assert_null(strstr(up, "x-forwarded-client-cert"));
	assert_null(strstr(up, "evil"));
	assert_int_equal(rule_count(h, 0, "no-delete"), 0);
	free(up);
	conn_close(h->c, CR_DONE);
	h->c = NULL;
	assert_int_equal(atomic_load(&h->m->connections_active[DIR_OUTBOUND]), 0);
}

static int group_teardown(void **state)
{
	(void)state;
	fixture_cleanup();
	return 0;
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_allowed_request_rewritten),
		T(test_pipelined_deny_keeps_order),
		T(test_request_id),
		T(test_smuggling_refused),
		T(test_policy_header_twice),
		T(test_too_many_fields),
		T(test_response_without_request),
		T(test_upstream_gone),
		T(test_inflight_bound),
		T(test_drain),
		T(test_deadlines),
		T(test_silent_client),
		T(test_outbound_strips_client_cert),
	};

	return cmocka_run_group_tests(tests, NULL, group_teardown);
}
