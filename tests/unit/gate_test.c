/*
 * Unit tests for control/gate.c, the filter that judges request heads
 * before evhttp reads bodies: bytes in as TLS would deliver them, what
 * evhttp would read checked byte for byte, with a judge that records
 * what it was asked.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>

#include "gate.h"

struct fixture {
	struct event_base *base;
	struct bufferevent *pair[2];   /* [0] stands for TLS: the gate writes "100 Continue" */
	struct gate g;
	struct evbuffer *src, *dst;
	int judged;                    /* calls of the judge */
	int verdict;                   /* what the judge answers */
	char authz[64];                /* the Authorization it was given */
};

static int judge(void *arg, const struct http_head *h, const char *authz, struct api_error *ae)
{
	struct fixture *f = arg;

	f->judged++;
	snprintf(f->authz, sizeof(f->authz), "%s", authz ? authz : "(none)");
	if (f->verdict)
		return gate_fail(ae, f->verdict, "refused %s %s", h->method, h->path);
	return 0;
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	struct http_limits lim = { .max_line = 8192, .max_header_bytes = 16 * 1024 };

	assert_non_null(f);
	f->base = event_base_new();
	assert_non_null(f->base);
	assert_int_equal(bufferevent_pair_new(f->base, 0, f->pair), 0);
	f->src = evbuffer_new();
	f->dst = evbuffer_new();
	assert_non_null(f->src);
	assert_non_null(f->dst);
	gate_init(&f->g, &lim, f->pair[0], judge, f);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	gate_cleanup(&f->g);
	evbuffer_free(f->src);
	evbuffer_free(f->dst);
	bufferevent_free(f->pair[0]);
	bufferevent_free(f->pair[1]);
	event_base_free(f->base);
	free(f);
	return 0;
}

/* Feeds text through the gate; returns what evhttp may now read (a
 * malloc'd string) and empties dst. */
static char *feed(struct fixture *f, const char *text)
{
	size_t n;
	char *out;

	evbuffer_add(f->src, text, strlen(text));
	gate_in(f->src, f->dst, -1, BEV_NORMAL, &f->g);
	n = evbuffer_get_length(f->dst);
	out = malloc(n + 1);
	assert_non_null(out);
	evbuffer_remove(f->dst, out, n);
	out[n] = '\0';
	return out;
}

static void assert_fed(struct fixture *f, const char *in, const char *want)
{
	char *out = feed(f, in);

	assert_string_equal(out, want);
	free(out);
}

/* A request evhttp would build from a head the gate passed on. */
static bool refused(struct fixture *f, const char *head_field, struct api_error *ae)
{
	struct evhttp_request *req = evhttp_request_new(NULL, NULL);
	bool r;

	assert_non_null(req);
	if (head_field)
		evhttp_add_header(evhttp_request_get_input_headers(req), head_field, "1");
	r = gate_refused(&f->g, req, ae);
	evhttp_request_free(req);
	return r;
}

static void test_bodiless_head_passes_unjudged(void **state)
{
	struct fixture *f = *state;
	struct api_error ae = {0};

	/* Connection: close is dropped (evhttp must not close after answering). */
	assert_fed(f, "GET /v1/health HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
	           "GET /v1/health HTTP/1.1\r\nHost: c\r\n\r\n");
	assert_int_equal(f->judged, 0);
	assert_false(refused(f, NULL, &ae));
	/* HTTP/1.0 gets keep-alive for the same reason. */
	assert_fed(f, "GET /v1/health HTTP/1.0\r\n\r\n",
	           "GET /v1/health HTTP/1.0\r\nconnection: keep-alive\r\n\r\n");
}

static void test_body_passes_after_judge(void **state)
{
	struct fixture *f = *state;
	char *out = feed(f, "POST /v1/tokens HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer x\r\n"
	                    "Content-Length: 4\r\n\r\n{}\r\n");

	assert_int_equal(f->judged, 1);
	assert_string_equal(f->authz, "Bearer x");
	assert_non_null(strstr(out, "POST /v1/tokens HTTP/1.1\r\n"));
	assert_non_null(strstr(out, "\r\n\r\n{}\r\n"));
	free(out);
	/* The next request on the connection is framed again. */
	assert_fed(f, "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n", "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n");
}

static void test_refused_body_is_discarded(void **state)
{
	struct fixture *f = *state;
	struct api_error ae = {0};
	char *out;

	f->verdict = 403;
	out = feed(f, "POST /v1/policies/x HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nab");
	assert_string_equal(out, "POST /v1/policies/x HTTP/1.1\r\nHost: control\r\n"
	                         "Content-Length: 0\r\nX-Meshlet-Gate: 1\r\n\r\n");
	free(out);
	/* The rest of the body is read and dropped; the next request passes. */
	f->verdict = 0;
	assert_fed(f, "cdeGET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n",
	           "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n");
	/* The marked head is answered with the stored refusal, once. */
	assert_true(refused(f, "X-Meshlet-Gate", &ae));
	assert_int_equal(ae.status, 403);
	assert_string_equal(ae.e.message, "refused POST /v1/policies/x");
	assert_true(refused(f, "X-Meshlet-Gate", &ae));
	assert_int_equal(ae.status, 500);
}

static void test_head_checks_before_judge(void **state)
{
	struct fixture *f = *state;
	static const struct { const char *req; int status; } cases[] = {
		{"PROPFIND / HTTP/1.1\r\nHost: c\r\n\r\n", 405},
		{"POST /v1/tokens HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		 411},
		{"POST /v1/tokens HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\n"
		 "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n{}", 400},
		{"GET / HTTP/1.1\r\nHost: c\r\nX-Meshlet-Gate: 1\r\n\r\n", 400},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct api_error ae = {0};
		char *out = feed(f, cases[i].req);


		assert_non_null(strstr(out, "X-Meshlet-Gate: 1"));
		free(out);
		assert_true(refused(f, "X-Meshlet-Gate", &ae));
		assert_int_equal(ae.status, cases[i].status);
	}
	assert_int_equal(f->judged, 0);
}

/* A second refusal before the first was answered gives up the connection:
 * nothing more reaches evhttp. */
static void test_pipelined_refusals_kill(void **state)
{
	struct fixture *f = *state;
	char *out;

	f->verdict = 403;
	out = feed(f, "POST /a HTTP/1.1\r\nHost: c\r\nContent-Length: 1\r\n\r\nx"
	              "POST /b HTTP/1.1\r\nHost: c\r\nContent-Length: 1\r\n\r\nx");
	assert_non_null(strstr(out, "POST /a "));
	assert_null(strstr(out, "POST /b "));
	free(out);
	assert_true(f->g.dead);
	f->verdict = 0;
	assert_fed(f, "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n", "");
}

/* in is refused with status, and the connection given up: the next
 * request reaches nothing. */
static void assert_fatal(struct fixture *f, const char *in, int status)
{
	struct api_error ae = {0};
	char *out = feed(f, in);

	assert_non_null(strstr(out, "GET / HTTP/1.1\r\n"));
	assert_non_null(strstr(out, "X-Meshlet-Gate: 1"));
	free(out);
	assert_true(refused(f, "X-Meshlet-Gate", &ae));
	assert_int_equal(ae.status, status);
	assert_fed(f, "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n", "");
}

static void test_garbage_is_refused_and_kills(void **state)
{
	assert_fatal(*state, "\x01\x02 not http\r\n\r\n", 400);
}

/* lib/http.c refuses other request targets than origin form as framing
 * errors. */
static void test_absolute_form_kills(void **state)
{
	assert_fatal(*state, "GET http://elsewhere/ HTTP/1.1\r\nHost: c\r\n\r\n", 400);
}

static void test_expect_continue_answered_here(void **state)
{
	struct fixture *f = *state;
	struct evbuffer *tls_out = bufferevent_get_input(f->pair[1]);
	char *out, got[64] = "";

	bufferevent_enable(f->pair[1], EV_READ);
	out = feed(f, "PUT /v1/policies/x HTTP/1.1\r\nHost: c\r\nExpect: 100-continue\r\n"
	              "Content-Length: 2\r\n\r\n");
	assert_null(strstr(out, "xpect"));        /* evhttp does not see it */
	free(out);
	event_base_loop(f->base, EVLOOP_NONBLOCK);
	evbuffer_remove(tls_out, got, sizeof(got) - 1);
	assert_string_equal(got, "HTTP/1.1 100 Continue\r\n\r\n");
}

/* A waiting request holds no head buffer: a bodiless request is complete
 * as soon as its head is, and the gate frees what the parser collected
 * then (one gate lives per connection; thousands wait in long polls). */
static void test_head_buffer_freed_once_request_is_complete(void **state)
{
	struct fixture *f = *state;

	assert_fed(f, "GET /v1/services/a/config?wait=30 HTTP/1.1\r\nHost: c\r\n\r\n",
	           "GET /v1/services/a/config?wait=30 HTTP/1.1\r\nHost: c\r\n\r\n");
	assert_null(f->g.parser.buf);
	assert_null(f->g.parser.fields);
	/* A head still arriving keeps its bytes; the next request on the
	 * connection is framed as usual once it is whole. */
	assert_fed(f, "GET /v1/ca HTTP/1.1\r\nHo", "");
	assert_non_null(f->g.parser.buf);
	assert_fed(f, "st: c\r\n\r\n", "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n");
	assert_null(f->g.parser.buf);
}

/* A body still arriving is not the end of its request: nothing is cut
 * short, and the buffer goes when the body is complete. */
static void test_body_in_flight_is_not_completed_early(void **state)
{
	struct fixture *f = *state;
	char *out = feed(f, "POST /v1/tokens HTTP/1.1\r\nHost: c\r\nContent-Length: 7\r\n\r\n{\"a\"");

	assert_non_null(strstr(out, "\r\n\r\n{\"a\""));
	free(out);
	assert_fed(f, ":1", ":1");      /* body bytes pass as they come */
	assert_non_null(f->g.parser.buf);
	assert_fed(f, "}", "}");
	assert_null(f->g.parser.buf);
	assert_fed(f, "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n", "GET /v1/ca HTTP/1.1\r\nHost: c\r\n\r\n");
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_bodiless_head_passes_unjudged),
		T(test_body_passes_after_judge),
		T(test_refused_body_is_discarded),
		T(test_head_checks_before_judge),
		T(test_pipelined_refusals_kill),
		T(test_garbage_is_refused_and_kills),
		T(test_absolute_form_kills),
		T(test_expect_continue_answered_here),
		T(test_head_buffer_freed_once_request_is_complete),
		T(test_body_in_flight_is_not_completed_early),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
