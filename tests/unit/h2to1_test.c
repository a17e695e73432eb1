/*
 * Unit tests for proxy/h2to1.c: an HTTP/2 request head written as
 * HTTP/1.1 (framing chosen once, hop-by-hop fields gone, cookies joined,
 * hostile values refused so CR/LF never reach the app), read back by
 * lib/http.c's own request parser; an app's HTTP/1.1 response head (parsed
 * by lib/http.c) turned into an HTTP/2 header list.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "h2to1.h"

#define F(n, v) { n, v, sizeof(n) - 1, sizeof(v) - 1 }
#define PSEUDO F(":method", "POST"), F(":scheme", "http"), F(":authority", "orders"), \
	F(":path", "/x")

static int head(const struct h2to1_request *r, char *out, size_t cap, enum h2to1_framing *fr)
{
	size_t len = 0, need = 0;
	int rc = h2to1_request_head(r, NULL, 0, &need, fr);

	if (rc == -EINVAL)
		return rc;
	assert_int_equal(rc, -ENOSPC);
	rc = h2to1_request_head(r, out, cap - 1, &len, fr);
	assert_int_equal(rc, 0);
	assert_int_equal(len, need);
	out[len] = '\0';
	return 0;
}

/* The head, parsed by the proxy's own HTTP/1.1 request parser: it must be one clean request. */
static void parse_back(const char *text, struct http_parser_state *p, const struct http_head **h)
{
	size_t used = 0;
	struct http_event ev;

	http_request_init(p, NULL);
	ev = http_feed(p, text, strlen(text), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(used, strlen(text));
	*h = ev.head;
}

static void test_request_basic(void **state)
{
	const struct h2_field f[] = { PSEUDO, F("x-a", "b c"), F("content-length", "5"),
	                              F("content-length", "5"), F("te", "trailers"),
	                              F("host", "orders"), F("x-forwarded-client-cert", "forged"),
	                              F("x-request-id", "theirs") };
	struct h2to1_request r = { "POST", "/x?q=1", "orders", f, sizeof(f) / sizeof(f[0]),
	                           "By=spiffe://a", "ours", false };
	struct http_parser_state p;
	const struct http_head *h;
	enum h2to1_framing fr;
	char out[1024];
	const char *v;

	(void)state;
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	assert_int_equal(fr, H2TO1_LENGTH);
	assert_non_null(strstr(out, "POST /x?q=1 HTTP/1.1\r\nhost: orders\r\n"));
	parse_back(out, &p, &h);
	assert_int_equal(h->framing, HTTP_BODY_LENGTH);
	assert_int_equal(h->content_length, 5);
	assert_int_equal(http_head_count(h, "content-length", NULL), 1);   /* one copy, not two */
	assert_int_equal(http_head_count(h, "te", NULL), 0);
	assert_int_equal(http_head_count(h, "host", &v), 1);
	assert_string_equal(v, "orders");
	assert_int_equal(http_head_count(h, "x-forwarded-client-cert", &v), 1);
	assert_string_equal(v, "By=spiffe://a");
	assert_int_equal(http_head_count(h, "x-request-id", &v), 1);
	assert_string_equal(v, "ours");
	assert_int_equal(http_head_count(h, "x-a", &v), 1);
	assert_string_equal(v, "b c");
	http_cleanup(&p);
}

static void test_request_framing(void **state)
{
	const struct h2_field f[] = { PSEUDO, F("cookie", "a=1"), F("cookie", "b=2") };
	struct h2to1_request r = { "POST", "/x", "orders", f, sizeof(f) / sizeof(f[0]), NULL, NULL,
	                           false };
	struct http_parser_state p;
	const struct http_head *h;
	enum h2to1_framing fr;
	char out[1024];
	const char *v;

	(void)state;
	/* A body of unknown length: chunked. */
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	assert_int_equal(fr, H2TO1_CHUNKED);
	parse_back(out, &p, &h);
	assert_int_equal(h->framing, HTTP_BODY_CHUNKED);
	assert_int_equal(http_head_count(h, "cookie", &v), 1);
	assert_string_equal(v, "a=1; b=2");
	http_cleanup(&p);
	/* No body: POST says length 0, GET says nothing. */
	r.no_body = true;
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	assert_int_equal(fr, H2TO1_NO_BODY);
	assert_non_null(strstr(out, "content-length: 0\r\n"));
	r.method = "GET";
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	assert_null(strstr(out, "content-length"));
	assert_null(strstr(out, "transfer-encoding"));
	parse_back(out, &p, &h);
	assert_int_equal(h->framing, HTTP_BODY_NONE);
	http_cleanup(&p);
}

static void test_request_hostile(void **state)
{
	const struct h2_field crlf[] = { PSEUDO, F("x-a", "b\r\nx-admin: 1") };
	const struct h2_field lf[] = { PSEUDO, F("x-a", "b\nGET /admin HTTP/1.1") };
	const struct h2_field nul[] = { PSEUDO, { "x-a", "b\0c", 3, 3 } };
	const struct h2_field upper[] = { PSEUDO, F("X-A", "b") };
	const struct h2_field space[] = { PSEUDO, F("x a", "b") };
	const struct h2_field colon[] = { PSEUDO, F("x:a", "b") };
	const struct h2_field cl_bad[] = { PSEUDO, F("content-length", "5"), F("content-length", "6") };
	const struct h2_field cl_sign[] = { PSEUDO, F("content-length", "+5") };
	const struct h2_field lead_ws[] = { PSEUDO, F("x-tenant", " evil") };
	const struct h2_field trail_ws[] = { PSEUDO, F("x-tenant", "evil\t") };
	const struct h2_field inner_ws[] = { PSEUDO, F("x-a", "b c") };
	const struct h2_field ok[] = { PSEUDO };
	struct h2to1_request r = { "POST", "/x", "orders", NULL, 5, NULL, NULL, false };
	enum h2to1_framing fr;
	char out[512];

	(void)state;
	r.fields = crlf;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = lf;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = nul;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = upper;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = space;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = colon;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = cl_sign;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = lead_ws;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = trail_ws;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.fields = inner_ws;
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	r.n_fields = 6;
	r.fields = cl_bad;
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	/* The values we add ourselves and the start line are checked too. */
	r.fields = ok;
	r.n_fields = 4;
	r.authority = "orders\r\nx-admin: 1";
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	static const char *const bad_authorities[] = {
		"orders x", "orders/admin", "user@orders", "orders\t", "", "orders\"",
	};
	for (size_t i = 0; i < sizeof(bad_authorities) / sizeof(bad_authorities[0]); i++) {
		r.authority = bad_authorities[i];
		assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	}
	r.authority = "[::1]:8080";
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	r.authority = "orders";
	r.target = "/x HTTP/1.1\r\nx: y";
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.target = "/x";
	r.method = "GET /admin";
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.method = "POST";
	r.request_id = "a\rb";
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.request_id = NULL;
	r.xfcc = "a\nb";
	assert_int_equal(head(&r, out, sizeof(out), &fr), -EINVAL);
	r.xfcc = NULL;
	assert_int_equal(head(&r, out, sizeof(out), &fr), 0);
	assert_non_null(strstr(out, "POST /x HTTP/1.1\r\nhost: orders\r\ntransfer-encoding: chunked\r\n\r\n"));
}

/* A response head parsed by lib/http.c's response parser. */
static const struct http_head *response(struct http_parser_state *p, const char *text,
                                        unsigned req_flags)
{
	size_t used = 0;
	struct http_event ev;

	http_response_init(p, NULL);
	http_response_expect(p, req_flags);
	ev = http_feed(p, text, strlen(text), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	return ev.head;
}

static const char *nv_get(const nghttp2_nv *nv, size_t n, const char *name, size_t *count)
{
	static char value[256];
	const char *found = NULL;

	*count = 0;
	for (size_t i = 0; i < n; i++) {
		if (nv[i].namelen == strlen(name) && !memcmp(nv[i].name, name, nv[i].namelen)) {
			if (!found) {
				snprintf(value, sizeof(value), "%.*s", (int)nv[i].valuelen, nv[i].value);
				found = value;
			}
			(*count)++;
		}
	}
	return found;
}

static void test_response(void **state)
{
	struct http_parser_state p;
	const struct http_head *h;
	nghttp2_nv nv[32];
	char buf[512];
	size_t n = 0, count;

	(void)state;
	h = response(&p, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Hop\r\n"
	             "X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n"
	             "Trailer: X-T\r\nX-Keep: yes\r\n\r\n", 0);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, sizeof(buf)), 0);
	assert_string_equal(nv_get(nv, n, ":status", &count), "200");
	assert_string_equal(nv_get(nv, n, "content-type", &count), "text/plain");
	assert_string_equal(nv_get(nv, n, "x-keep", &count), "yes");
	assert_null(nv_get(nv, n, "connection", &count));
	assert_null(nv_get(nv, n, "x-hop", &count));
	assert_null(nv_get(nv, n, "keep-alive", &count));
	assert_null(nv_get(nv, n, "transfer-encoding", &count));
	assert_null(nv_get(nv, n, "trailer", &count));
	assert_int_equal(n, 3);
	http_cleanup(&p);
	/* 204 cannot have a length; HEAD's answer keeps it. */
	h = response(&p, "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", 0);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, sizeof(buf)), 0);
	assert_null(nv_get(nv, n, "content-length", &count));
	http_cleanup(&p);
	h = response(&p, "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", HTTP_REQ_HEAD);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, sizeof(buf)), 0);
	assert_string_equal(nv_get(nv, n, "content-length", &count), "1234");
	http_cleanup(&p);
	/* A transfer coding HTTP/2 cannot carry: refused while there is a body. */
	h = response(&p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, sizeof(buf)), -EINVAL);
	http_cleanup(&p);
	h = response(&p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 0);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, sizeof(buf)), -EINVAL);
	http_cleanup(&p);
	h = response(&p, "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", HTTP_REQ_HEAD);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, sizeof(buf)), 0);
	assert_null(nv_get(nv, n, "transfer-encoding", &count));
	http_cleanup(&p);
	h = response(&p, "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", HTTP_REQ_HEAD);
	/* Too small: -ENOSPC, never a write past the end. */
	assert_int_equal(h2to1_response_nv(h, nv, 1, &n, buf, sizeof(buf)), -ENOSPC);
	assert_int_equal(h2to1_response_nv(h, nv, 32, &n, buf, 8), -ENOSPC);
	http_cleanup(&p);
}

static void test_chunk_header(void **state)
{
	char out[20];

	(void)state;
	assert_int_equal(h2to1_chunk_header(16384, out), 6);
	assert_memory_equal(out, "4000\r\n", 6);
	assert_int_equal(h2to1_chunk_header(1, out), 3);
	assert_memory_equal(out, "1\r\n", 3);
}


/* ---- HTTP/1.1 requests as HTTP/2 streams, and their answers back ---------- */

/* A request head parsed by lib/http.c, as h1to2_request_nv() gets it. */
static const struct http_head *request(struct http_parser_state *p, const char *text)
{
	size_t used = 0;
	struct http_event ev;

	http_request_init(p, NULL);
	ev = http_feed(p, text, strlen(text), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	return ev.head;
}

static void test_h1to2_request(void **state)
{
	struct http_parser_state p;
	const struct http_head *h;
	nghttp2_nv nv[64];
	char buf[1024];
	size_t n = 0, count;

	(void)state;
	h = request(&p, "POST /a/./b/../c?q=1&r HTTP/1.1\r\nHost: orders:8080\r\n"
	            "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\n"
	            "TE: trailers\r\nExpect: 100-continue\r\nX-Forwarded-Client-Cert: forged\r\n"
	            "X-Meshlet-App-Protocol: h2c\r\nX-Request-Id: theirs\r\nContent-Length: 3\r\n"
	            "X-Mixed-Case: Kept As Is\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n");
	assert_int_equal(h1to2_request_nv(h, "ours", nv, 64, &n, buf, sizeof(buf)), 0);
	assert_string_equal(nv_get(nv, n, ":method", &count), "POST");
	assert_string_equal(nv_get(nv, n, ":scheme", &count), "http");
	assert_string_equal(nv_get(nv, n, ":authority", &count), "orders:8080");
	/* The normalised path the policy saw, the query as sent. */
	assert_string_equal(nv_get(nv, n, ":path", &count), "/a/c?q=1&r");
	assert_string_equal(nv_get(nv, n, "content-length", &count), "3");
	assert_string_equal(nv_get(nv, n, "x-mixed-case", &count), "Kept As Is");
	assert_string_equal(nv_get(nv, n, "x-request-id", &count), "ours");
	assert_int_equal(count, 1);
	assert_string_equal(nv_get(nv, n, "x-meshlet-app-protocol", &count), "http1");
	assert_int_equal(count, 1);    /* ours, the app's copy gone */
	nv_get(nv, n, "cookie", &count);
	assert_int_equal(count, 2);
	for (const char *gone = "connection\0x-hop\0keep-alive\0te\0expect\0host\0"
	                        "x-forwarded-client-cert\0";
	     *gone; gone += strlen(gone) + 1)
		assert_null(nv_get(nv, n, gone, &count));
	/* Pseudo-headers first, names lower-case. */
	assert_memory_equal(nv[0].name, ":method", 7);
	for (size_t i = 0; i < n; i++)
		for (size_t j = 0; j < nv[i].namelen; j++)
			assert_false(nv[i].name[j] >= 'A' && nv[i].name[j] <= 'Z');
	/* Too small: -ENOSPC, never a write past the end. */
	assert_int_equal(h1to2_request_nv(h, NULL, nv, 3, &n, buf, sizeof(buf)), -ENOSPC);
	assert_int_equal(h1to2_request_nv(h, NULL, nv, 64, &n, buf, 16), -ENOSPC);
	http_cleanup(&p);
	/* Chunked: no length, the body ends with END_STREAM; the caller's
	 * x-request-id kept when none replaces it. */
	h = request(&p, "PUT /x HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n"
	            "X-Request-Id: theirs\r\n\r\n");
	assert_int_equal(h1to2_request_nv(h, NULL, nv, 64, &n, buf, sizeof(buf)), 0);
	assert_null(nv_get(nv, n, "transfer-encoding", &count));
	assert_null(nv_get(nv, n, "content-length", &count));
	assert_string_equal(nv_get(nv, n, "x-request-id", &count), "theirs");
	http_cleanup(&p);
}

static void test_h1to2_refused(void **state)
{
	static const char *const tunnels[] = {
		"CONNECT orders:443 HTTP/1.1\r\nHost: orders:443\r\n\r\n",
		"GET /ws HTTP/1.1\r\nHost: o\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
	};
	struct http_parser_state p;
	const struct http_head *h;
	nghttp2_nv nv[64];
	char buf[1024];
	size_t n = 0;

	(void)state;
	/* Tunnels are never streams: they keep a connection of their own. */
	for (size_t i = 0; i < sizeof(tunnels) / sizeof(tunnels[0]); i++) {
		h = request(&p, tunnels[i]);
		assert_int_equal(h1to2_request_nv(h, NULL, nv, 64, &n, buf, sizeof(buf)), -EINVAL);
		http_cleanup(&p);
	}
	/* A request id of ours with a control byte never goes out. */
	h = request(&p, "GET / HTTP/1.1\r\nHost: o\r\n\r\n");
	assert_int_equal(h1to2_request_nv(h, "a\r\nb", nv, 64, &n, buf, sizeof(buf)), -EINVAL);
	http_cleanup(&p);
}

#define NV(n, v) { (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, 0 }

/* h2to1_response_head() into out, then read back by lib/http.c's response parser. */
static const struct http_head *resp_back(struct http_parser_state *p, const nghttp2_nv *nv,
                                         size_t n, unsigned flags, bool end, bool close,
                                         char *out, size_t cap, enum h2to1_framing *fr)
{
	size_t need = 0, len = 0;

	assert_int_equal(h2to1_response_head(nv, n, flags, end, close, NULL, 0, &need, fr), -ENOSPC);
	assert_int_equal(h2to1_response_head(nv, n, flags, end, close, out, cap - 1, &len, fr), 0);
	assert_int_equal(len, need);
	out[len] = '\0';
	return response(p, out, flags);
}

static void test_h2to1_response_head(void **state)
{
	const nghttp2_nv with_len[] = { NV(":status", "200"), NV("content-length", "5"),
	                                NV("content-length", "5"), NV("x-a", "b"),
	                                NV("connection", "x-a"), NV("transfer-encoding", "chunked") };
	const nghttp2_nv no_len[] = { NV(":status", "404"), NV("content-type", "text/plain") };
	const nghttp2_nv no_content[] = { NV(":status", "204"), NV("content-length", "0") };
	struct http_parser_state p;
	const struct http_head *h;
	enum h2to1_framing fr;
	char out[512];

	(void)state;
	h = resp_back(&p, with_len, 6, 0, false, false, out, sizeof(out), &fr);
	assert_int_equal(fr, H2TO1_LENGTH);
	assert_int_equal(h->framing, HTTP_BODY_LENGTH);
	assert_int_equal(h->content_length, 5);
	assert_true(h->keep_alive);
	assert_non_null(strstr(out, "x-a: b\r\n"));
	assert_null(strstr(out, "connection"));
	assert_null(strstr(out, "transfer-encoding"));
	http_cleanup(&p);
	/* No length and a body to come: chunked, said once. */
	h = resp_back(&p, no_len, 2, 0, false, true, out, sizeof(out), &fr);
	assert_int_equal(fr, H2TO1_CHUNKED);
	assert_int_equal(h->framing, HTTP_BODY_CHUNKED);
	assert_false(h->keep_alive);    /* close asked */
	http_cleanup(&p);
	/* END_STREAM with the head: an empty body, said as content-length: 0. */
	h = resp_back(&p, no_len, 2, 0, true, false, out, sizeof(out), &fr);
	assert_int_equal(fr, H2TO1_NO_BODY);
	assert_int_equal(h->framing, HTTP_BODY_LENGTH);
	assert_int_equal(h->content_length, 0);
	http_cleanup(&p);
	/* HEAD: the length of the body it would have, no body. 204: no length. */
	h = resp_back(&p, with_len, 6, HTTP_REQ_HEAD, false, false, out, sizeof(out), &fr);
	assert_int_equal(fr, H2TO1_NO_BODY);
	assert_non_null(strstr(out, "content-length: 5\r\n"));
	http_cleanup(&p);
	h = resp_back(&p, no_content, 2, 0, true, false, out, sizeof(out), &fr);
	assert_int_equal(fr, H2TO1_NO_BODY);
	assert_null(strstr(out, "content-length"));
	assert_int_equal(h->status, 204);
	http_cleanup(&p);
}

static void test_h2to1_response_hostile(void **state)
{
	const nghttp2_nv crlf[] = { NV(":status", "200"), NV("x-a", "b\r\nx-smuggled: 1") };
	const nghttp2_nv nul[] = { NV(":status", "200"), { (uint8_t *)"x-a", (uint8_t *)"b\0c", 3, 3, 0 } };
	const nghttp2_nv two_lengths[] = { NV(":status", "200"), NV("content-length", "5"),
	                                   NV("content-length", "6") };
	const nghttp2_nv bad_length[] = { NV(":status", "200"), NV("content-length", "+5") };
	const nghttp2_nv short_status[] = { NV(":status", "20") };
	const nghttp2_nv interim[] = { NV(":status", "100") };
	const nghttp2_nv upper[] = { NV(":status", "200"), NV("X-A", "b") };
	const nghttp2_nv space[] = { NV(":status", "200"), NV("x a", "b") };
	const struct { const nghttp2_nv *nv; size_t n; } bad[] = {
		{ crlf, 2 }, { nul, 2 }, { two_lengths, 3 }, { bad_length, 2 }, { short_status, 1 },
		{ interim, 1 }, { upper, 2 }, { space, 2 },
	};
	enum h2to1_framing fr;
	char out[512];
	size_t len;

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(h2to1_response_head(bad[i].nv, bad[i].n, 0, false, false, NULL, 0, &len,
		                                     &fr), -EINVAL);
		assert_int_equal(h2to1_response_head(bad[i].nv, bad[i].n, 0, false, false, out,
		                                     sizeof(out), &len, &fr), -EINVAL);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_request_basic),
		cmocka_unit_test(test_request_framing),
		cmocka_unit_test(test_request_hostile),
		cmocka_unit_test(test_response),
		cmocka_unit_test(test_chunk_header),
		cmocka_unit_test(test_h1to2_request),
		cmocka_unit_test(test_h1to2_refused),
		cmocka_unit_test(test_h2to1_response_head),
		cmocka_unit_test(test_h2to1_response_hostile),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
