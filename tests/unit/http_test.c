/* Unit tests for lib/http.c: path normalisation, request/response framing,
 * hardening refusals, serialisation and duplicate-field lookups. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "meshlet/http.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- path normalisation ------------------------------------------------- */

struct norm_case {
	const char *in;
	size_t len;
	const char *out;     /* NULL: refused */
};

#define N(in, out) { in, sizeof(in) - 1, out }

static const struct norm_case norm_cases[] = {
	/* plain and trivial */
	N("/", "/"),
	N("", "/"),
	N("/a/b/c", "/a/b/c"),
	N("/ADMIN", "/ADMIN"),
	N("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
	N("/a-b_c.d~e", "/a-b_c.d~e"),
	/* merged slashes */
	N("//admin", "/admin"),
	N("///admin//x", "/admin/x"),
	N("/a//", "/a/"),
	N("//", "/"),
	/* dot segments */
	N("/./admin", "/admin"),
	N("/.//admin", "/admin"),
	N("/a/../admin", "/admin"),
	N("/a/b/../../admin", "/admin"),
	N("/a/./b/./c", "/a/b/c"),
	N("/admin/", "/admin/"),
	N("/admin/.", "/admin/"),
	N("/admin/..", "/"),
	N("/a/b/..", "/a/"),
	N("/a/./", "/a/"),
	N("/./", "/"),
	N("/...", "/..."),
	N("/a/.../b", "/a/.../b"),
	N("/.a/..b", "/.a/..b"),
	/* above the root: refused */
	N("/..", NULL),
	N("/../admin", NULL),
	N("/a/../../admin", NULL),
	N("/%2e%2e/admin", NULL),
	/* encoded dots */
	N("/a/%2e%2e/admin", "/admin"),
	N("/a/%2E%2E/admin", "/admin"),
	N("/a/.%2e/admin", "/admin"),
	N("/a/%2e./admin", "/admin"),
	N("/%2e/admin", "/admin"),
	N("/%2E", "/"),
	N("/admin%2e", "/admin."),
	/* unreserved decoded, mixed case */
	N("/%41dmin", "/Admin"),
	N("/%61dmin", "/admin"),
	N("/%61%64%6D%69%6e", "/admin"),
	N("/a%7Eb", "/a~b"),
	N("/%7e%5F%2D", "/~_-"),
	/* other escapes kept, hex upper-cased */
	N("/a%20b", "/a%20b"),
	N("/admin%3bx", "/admin%3Bx"),
	N("/admin%3Bx", "/admin%3Bx"),
	N("/%3f", "/%3F"),
	N("/%23", "/%23"),
	N("/a%2bb", "/a%2Bb"),
	/* path parameters: refused */
	N("/..;/admin", NULL),
	N("/a/..;/admin", NULL),
	N("/admin;jsessionid=1", NULL),
	/* encoded slash / backslash / NUL */
	N("/admin%2f", NULL),
	N("/admin%2F", NULL),
	N("/admin%2fx", NULL),
	N("/a/b/%2e%2e%2f..", NULL),
	N("/admin%5c", NULL),
	N("/admin%5Cx", NULL),
	N("/admin\\x", NULL),
	N("/admin%00", NULL),
	N("/admin\0x", NULL),
	/* control characters, raw and encoded */
	N("/a%0ab", NULL),
	N("/a%0D%0Ab", NULL),
	N("/a%7f", NULL),
	N("/a\x7f", NULL),
	N("/a\tb", NULL),
	N("/a b", NULL),
	N("/a\rb", NULL),
	/* invalid escapes */
	N("/%", NULL),
	N("/%4", NULL),
	N("/%zz", NULL),
	N("/%4g", NULL),
	N("/a%/b", NULL),
	/* double encoding: any encoded '%' is refused, whatever follows it */
	N("/%252e%252e/admin", NULL),
	N("/%252F", NULL),
	N("/%25%32%65", NULL),
	N("/%25", NULL),
	N("/100%25", NULL),
	N("/%25zz", NULL),
	N("/%2525", NULL),
	N("/a%25/b", NULL),
	/* IIS-style %u escapes, raw and double-encoded */
	N("/%u002e%u002e/admin", NULL),
	N("/%U002E", NULL),
	N("/a%u2215b", NULL),
	N("/public/%25u002e%25u002e/%61%64%6d%69%6e", NULL),
	N("/%25u002e", NULL),
	N("/%25U002F", NULL),
	N("/%25u", NULL),
	/* overlong UTF-8 forms of '.', backslash, 'a' and NUL */
	N("/%c0%ae", NULL),
	N("/%C0%AE%C0%AE/admin", NULL),
	N("/%e0%80%ae", NULL),
	N("/%f0%80%80%ae", NULL),
	N("/%f8%80%80%80%ae", NULL),
	N("/%fc%80%80%80%80%ae", NULL),
	N("/%c1%9c", NULL),
	N("/%c1%a1dmin", NULL),
	N("/%c0%80", NULL),
	N("/%252fadmin", NULL),
	/* UTF-8 */
	N("/caf%c3%a9", "/caf%C3%A9"),
	N("/caf%C3%A9", "/caf%C3%A9"),
	N("/%f0%9f%98%80", "/%F0%9F%98%80"),
	N("/caf\xc3\xa9", NULL),
	N("/%c0%af", NULL),
	N("/%c0%ae%c0%ae/admin", NULL),
	N("/%e0%80%af", NULL),
	N("/%ed%a0%80", NULL),
	N("/%f4%90%80%80", NULL),
	N("/%c3", NULL),
	N("/%c3/%a9", NULL),
	N("/%c3a", NULL),
	N("/%80", NULL),
	/* not a path */
	N("admin", NULL),
	N("%2fadmin", NULL),
	N("*", NULL),
	/* characters outside pchar */
	N("/a|b", NULL),
	N("/a^b", NULL),
	N("/a`b", NULL),
	N("/a{b}", NULL),
	N("/a[0]", NULL),
	N("/a<b>", NULL),
	N("/a\"b", NULL),
	N("/a#b", NULL),
	N("/a?b", NULL),
};

static void test_normalize_table(void **state)
{
	size_t i;

	(void)state;
	assert_true(ARRAY_LEN(norm_cases) >= 60);
	for (i = 0; i < ARRAY_LEN(norm_cases); i++) {
		const struct norm_case *c = &norm_cases[i];
		char out[256];
		size_t len = 0;
		const char *why = NULL;
		int r = http_path_normalize(c->in, c->len, out, sizeof(out), &len, &why);

		if (c->out) {
			if (r != 0)
				print_error("case %zu '%s': refused (%s)\n", i, c->in, why);
			assert_int_equal(r, 0);
			if (strcmp(out, c->out) != 0)
				print_error("case %zu '%s': got '%s'\n", i, c->in, out);
			assert_string_equal(out, c->out);
			assert_int_equal(len, strlen(c->out));
		} else {
			if (r != -EINVAL)
				print_error("case %zu '%s': accepted as '%s'\n", i, c->in, out);
			assert_int_equal(r, -EINVAL);
			assert_non_null(why);
		}
	}
}

/* A normalised path normalises to itself. */
static void test_normalize_idempotent(void **state)
{
	size_t i;

	(void)state;
	for (i = 0; i < ARRAY_LEN(norm_cases); i++) {
		char once[256], twice[256];
		size_t l1, l2;
		const char *why;

		if (!norm_cases[i].out)
			continue;
		assert_int_equal(http_path_normalize(norm_cases[i].in, norm_cases[i].len, once,
		                                     sizeof(once), &l1, &why), 0);
		assert_int_equal(http_path_normalize(once, l1, twice, sizeof(twice), &l2, &why), 0);
		assert_string_equal(once, twice);
	}
}

static void test_normalize_space(void **state)
{
	char out[8];
	size_t len;
	const char *why;

	(void)state;
	assert_int_equal(http_path_normalize("/abcdef", 7, out, 8, &len, &why), -ENOSPC);
	assert_int_equal(http_path_normalize("/abcde", 6, out, 8, &len, &why), 0);
	assert_string_equal(out, "/abcde");
	assert_int_equal(http_path_normalize("", 0, out, 2, &len, &why), 0);
	assert_string_equal(out, "/");
}

/* ---- a driver that records events --------------------------------------- */

struct run {
	char log[16384];
	size_t log_len;
	char body[8192];          /* body bytes of the current message */
	size_t body_len;
	int status;               /* of an ERROR, else 0 */
	const char *reason;
	bool paused;
};

static void logf_(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void logf_(struct run *r, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(r->log + r->log_len, sizeof(r->log) - r->log_len, fmt, ap);
	va_end(ap);
	assert_true(n >= 0 && (size_t)n < sizeof(r->log) - r->log_len);
	r->log_len += (size_t)n;
}

static void log_head(struct run *r, const struct http_head *h)
{
	if (h->is_request)
		logf_(r, "HEAD %s %s%s%s fields=%zu ka=%d\n", h->method, h->path,
		      h->query ? "?" : "", h->query ? h->query : "", h->n_fields, h->keep_alive);
	else
		logf_(r, "RESP %d %s fields=%zu framing=%d ka=%d\n", h->status, h->reason,
		      h->n_fields, (int)h->framing, h->keep_alive);
}

/* Handles one event; returns false when the driver must stop feeding. */
static bool on_event(struct run *r, const struct http_event *ev)
{
	switch (ev->type) {
	case HTTP_EV_HEAD_COMPLETE:
		log_head(r, ev->head);
		return true;
	case HTTP_EV_BODY:
		assert_true(r->body_len + ev->len <= sizeof(r->body));
		memcpy(r->body + r->body_len, ev->data, ev->len);
		r->body_len += ev->len;
		return true;
	case HTTP_EV_MESSAGE_COMPLETE:
		logf_(r, "BODY %zu:%.*s\nEND\n", r->body_len, (int)r->body_len, r->body);
		r->body_len = 0;
		return true;
	case HTTP_EV_PAUSED:
		r->paused = true;
		logf_(r, "PAUSED\n");
		return false;
	case HTTP_EV_ERROR:
		r->status = ev->status;
		r->reason = ev->reason;
		logf_(r, "ERROR %d\n", ev->status);
		return false;
	case HTTP_EV_NEED_MORE:
		break;
	}
	return false;
}

/* Feeds data in reads of step bytes. Returns bytes used. */
static size_t drive(struct http_parser_state *p, const char *data, size_t len, size_t step,
                    struct run *r)
{
	size_t off = 0;

	while (off < len || len == 0) {
		size_t n = len - off < step ? len - off : step;
		const char *chunk = data + off;
		size_t left = n;

		for (;;) {
			size_t used;
			struct http_event ev = http_feed(p, chunk, left, &used);

			assert_true(used <= left);
			chunk += used;
			left -= used;
			off += used;
			if (ev.type == HTTP_EV_NEED_MORE) {
				assert_int_equal(left, 0);
				break;
			}
			if (!on_event(r, &ev))
				return off;
		}
		if (len == 0)
			break;
	}
	return off;
}

static void run_request(const char *data, size_t len, size_t step,
                        const struct http_limits *lim, struct run *r)
{
	struct http_parser_state p;

	memset(r, 0, sizeof(*r));
	http_request_init(&p, lim);
	drive(&p, data, len, step, r);
	http_cleanup(&p);
}

/* The same events whether fed byte by byte, in 7-byte reads or at once. */
static void run_request_all_ways(const char *data, size_t len, struct run *r)
{
	static const size_t steps[] = { 1, 2, 7, 64 };
	struct run *other = malloc(sizeof(*other));
	size_t i;

	assert_non_null(other);
	run_request(data, len, len ? len : 1, NULL, r);
	for (i = 0; i < ARRAY_LEN(steps); i++) {
		run_request(data, len, steps[i], NULL, other);
		if (strcmp(other->log, r->log) != 0)
			print_error("step %zu:\n%s\nvs whole:\n%s\n", steps[i], other->log, r->log);
		assert_string_equal(other->log, r->log);
	}
	free(other);
}

#define S(lit) lit, sizeof(lit) - 1

/* ---- refusals ------------------------------------------------------------ */

struct refusal {
	const char *raw;
	size_t len;
	int status;
};

#define R(lit, st) { lit, sizeof(lit) - 1, st }
#define H1 "Host: a\r\n"

static const struct refusal refusals[] = {
	/* framing: CL + TE, repeated/invalid CL */
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 5, 5\r\n\r\nhello", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: -1\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: +5\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 0x5\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 5 5\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length:\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length: 1234567890123456789\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content_Length: 5\r\n\r\nhello", 400),
	/* framing: Transfer-Encoding */
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: gzip\r\n\r\n", 501),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: identity\r\n\r\n", 501),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: xchunked\r\n\r\n", 501),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked,\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: \"chunked\"\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\x0b\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer_Encoding: chunked\r\n\r\n", 400),
	R("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
	/* obs-fold, whitespace before colon, names, bare CR/LF, NUL */
	R("GET / HTTP/1.1\r\n" H1 "X-A: a\r\n b\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "X-A: a\r\n\tb\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Content-Length\t: 5\r\n\r\nhello", 400),
	R("GET / HTTP/1.1\r\n" H1 "X(y): z\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "X y: z\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 ": z\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "\x7f" "X: y\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "NoColon\r\n\r\n", 400),
	R("GET / HTTP/1.1\nHost: a\n\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "X: a\0b\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "X: a\x01" "b\r\n\r\n", 400),
	/* request line */
	R("get / HTTP/1.1\r\n" H1 "\r\n", 501),
	R("GeT / HTTP/1.1\r\n" H1 "\r\n", 501),
	R("FOO / HTTP/1.1\r\n" H1 "\r\n", 501),
	R("G(T / HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET  / HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /  HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET / HTTP/1.1 \r\n" H1 "\r\n", 400),
	R(" GET / HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET\t/ HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /\r\n\r\n", 400),
	R("GET / http/1.1\r\n" H1 "\r\n", 400),
	R("GET / HTTP/1.1x\r\n" H1 "\r\n", 400),
	R("GET / HTTP/11\r\n" H1 "\r\n", 400),
	R("GET / HTTP/2.0\r\n" H1 "\r\n", 505),
	R("GET / HTTP/1.2\r\n" H1 "\r\n", 505),
	R("GET / HTTP/0.9\r\n" H1 "\r\n", 505),
	R("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
	/* targets */
	R("GET /a#b HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /a?x#b HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET * HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET a:80 HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET admin HTTP/1.1\r\n" H1 "\r\n", 400),
	R("CONNECT / HTTP/1.1\r\n" H1 "\r\n", 400),
	R("CONNECT a HTTP/1.1\r\n" H1 "\r\n", 400),
	R("CONNECT a:80 HTTP/1.1\r\n" H1 "Content-Length: 3\r\n\r\nabc", 400),
	R("GET http://u@a/ HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET ftp://a/ HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET http:///x HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET http://b/admin HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /a\x01 HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /admin%2f HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /a/../../admin HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /%00 HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /a\\..\\admin HTTP/1.1\r\n" H1 "\r\n", 400),
	R("GET /caf\xc3\xa9 HTTP/1.1\r\n" H1 "\r\n", 400),
	/* Host */
	R("GET / HTTP/1.1\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost_: a\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n", 400),
	/* upgrades */
	R("GET / HTTP/1.1\r\n" H1 "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
	  "HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "Connection: Upgrade\r\nUpgrade: websocket, H2C\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "HTTP2-Settings: AAMA\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "Upgrade: websocket\r\nUpgrade: websocket\r\n\r\n", 400),
	/* Connection options naming framing fields */
	R("GET / HTTP/1.1\r\n" H1 "Connection: close, Content-Length\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "Connection: transfer-encoding\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "Connection: host\r\n\r\n", 400),
	R("GET / HTTP/1.1\r\n" H1 "Connection: a b\r\n\r\n", 400),
	/* empty lines before the request line: a few are skipped, not many */
	R("\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n" H1 "\r\n", 400),
	R("\nGET / HTTP/1.1\r\n" H1 "\r\n", 400),
	/* chunked bodies */
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX0\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\nz\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n-5\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5 x\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5 \r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5;a\nb\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n"
	  "10000000000000000\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n"
	  "0\r\nContent-Length: 5\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n"
	  "0\r\nX-F_orwarded: a\r\nx_forwarded_client_cert: a\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n"
	  "0\r\nX-T: a\r\n b\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n"
	  "0\r\nX-T : a\r\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n"
	  "0\r\nX-T: a\n\r\n", 400),
	R("POST / HTTP/1.1\r\n" H1 "Transfer-Encoding: chunked\r\n\r\n0\r\n\rX", 400),
};

static void test_refusals(void **state)
{
	struct run *r = malloc(sizeof(*r));
	size_t i;

	(void)state;
	assert_non_null(r);
	for (i = 0; i < ARRAY_LEN(refusals); i++) {
		run_request_all_ways(refusals[i].raw, refusals[i].len, r);
		if (r->status != refusals[i].status)
			print_error("refusal %zu: got %d (%s), want %d\n%s\n", i, r->status,
			            r->reason ? r->reason : "-", refusals[i].status, r->log);
		assert_int_equal(r->status, refusals[i].status);
		assert_non_null(r->reason);
	}
	free(r);
}

/* The error is sticky and consumes nothing more. */
static void test_error_sticky(void **state)
{
	struct http_parser_state p;
	struct http_event ev;
	size_t used;

	(void)state;
	http_request_init(&p, NULL);
	ev = http_feed(&p, S("GET / HTTP/1.1\nHost: a\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_ERROR);
	assert_int_equal(ev.status, 400);
	assert_string_equal(ev.reason, "bare LF");
	ev = http_feed(&p, S("GET / HTTP/1.1\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_ERROR);
	assert_int_equal(used, 0);
	http_cleanup(&p);
}

/* ---- limits --------------------------------------------------------------- */

static char *build(size_t *len, const char *start, const char *fill_line, size_t n_fill,
                   size_t line_pad)
{
	size_t cap = strlen(start) + n_fill * (strlen(fill_line) + 16) + line_pad + 64;
	char *b = malloc(cap);
	size_t i, o = 0;

	assert_non_null(b);
	o += (size_t)snprintf(b + o, cap - o, "%s", start);
	for (i = 0; i < line_pad; i++)
		b[o++] = 'a';
	o += (size_t)snprintf(b + o, cap - o, " HTTP/1.1\r\nHost: a\r\n");
	for (i = 0; i < n_fill; i++)
		o += (size_t)snprintf(b + o, cap - o, "X-%zu: %s\r\n", i, fill_line);
	o += (size_t)snprintf(b + o, cap - o, "\r\n");
	*len = o;
	return b;
}

static void expect_status(const char *raw, size_t len, const struct http_limits *lim,
                          int status)
{
	struct run *r = malloc(sizeof(*r));

	static const size_t steps[] = { 1, 1000, SIZE_MAX };
	size_t i;

	assert_non_null(r);
	for (i = 0; i < ARRAY_LEN(steps); i++) {
		run_request(raw, len, steps[i], lim, r);
		if (r->status != status)
			print_error("step %zu: got %d (%s), want %d\n", steps[i], r->status,
			            r->reason ? r->reason : "-", status);
		assert_int_equal(r->status, status);
	}
	free(r);
}

static void test_limit_defaults(void **state)
{
	struct http_limits lim = { 0, 0, 0, 0 }, def;
	struct http_parser_state p;

	(void)state;
	http_limits_default(&def);
	assert_int_equal(def.max_line, 8192);
	assert_int_equal(def.max_header_bytes, 65536);
	assert_int_equal(def.max_headers, 100);
	assert_int_equal(def.max_body, 0);
	http_request_init(&p, &lim);
	assert_memory_equal(&p.lim, &def, sizeof(def));
	http_cleanup(&p);
}

static void test_limits(void **state)
{
	struct http_limits small = { 64, 256, 4, 10 };
	size_t len;
	char *b;

	(void)state;
	/* request line of exactly 8192 bytes passes, 8193 is 414 */
	b = build(&len, "GET /", "v", 0, 8192 - 5 - 9);
	expect_status(b, len, NULL, 0);
	free(b);
	b = build(&len, "GET /", "v", 0, 8192 - 5 - 9 + 1);
	expect_status(b, len, NULL, 414);
	free(b);
	/* 99 fields + Host = 100 pass; 101 is 431 */
	b = build(&len, "GET /", "v", 99, 0);
	expect_status(b, len, NULL, 0);
	free(b);
	b = build(&len, "GET /", "v", 100, 0);
	expect_status(b, len, NULL, 431);
	free(b);
	/* header block over 64 KiB */
	{
		char big[1100];

		memset(big, 'x', sizeof(big) - 1);
		big[sizeof(big) - 1] = '\0';
		b = build(&len, "GET /", big, 59, 0);
		expect_status(b, len, NULL, 0);
		free(b);
		b = build(&len, "GET /", big, 61, 0);
		expect_status(b, len, NULL, 431);
		free(b);
	}
	/* configured limits */
	b = build(&len, "GET /", "v", 0, 60);
	expect_status(b, len, &small, 414);
	free(b);
	b = build(&len, "GET /", "v", 4, 0);
	expect_status(b, len, &small, 431);
	free(b);
	expect_status(S("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"), &small, 413);
	expect_status(S("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"),
	              &small, 0);
	expect_status(S("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
	                "a\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n"), &small, 413);
}

/* ---- accepted requests, pipelining ---------------------------------------- */

static const char pipeline[] =
	"\r\n"
	"GET /a/../b?x=/../y HTTP/1.1\r\nHost: svc\r\nUser-Agent: t\r\n\r\n"
	"POST //up%6coad HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
	"POST /chunks HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
	"5;name=value;q=\"a b\"\r\nhello\r\n"
	"6 ; ext\r\n world\r\n"
	"0\r\nX-Checksum: abc\r\nX-Other: d e\r\n\r\n"
	"GET http://SVC/%7Euser/./x HTTP/1.1\r\nHost: svc\r\n\r\n"
	"OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n"
	"GET /last HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
	"DELETE /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

static const char pipeline_log[] =
	"HEAD GET /b?x=/../y fields=2 ka=1\nBODY 0:\nEND\n"
	"HEAD POST /upload fields=2 ka=1\nBODY 5:hello\nEND\n"
	"HEAD POST /chunks fields=2 ka=1\n"
	"BODY 82:5;name=value;q=\"a b\"\r\nhello\r\n6 ; ext\r\n world\r\n"
	"0\r\nX-Checksum: abc\r\nX-Other: d e\r\n\r\n\nEND\n"
	"HEAD GET /~user/x fields=1 ka=1\nBODY 0:\nEND\n"
	"HEAD OPTIONS * fields=1 ka=1\nBODY 0:\nEND\n"
	"HEAD GET /last fields=1 ka=1\nBODY 0:\nEND\n"
	"HEAD DELETE /x fields=3 ka=0\nBODY 0:\nEND\n";

static void test_pipeline(void **state)
{
	struct run *r = malloc(sizeof(*r));

	(void)state;
	assert_non_null(r);
	run_request_all_ways(pipeline, sizeof(pipeline) - 1, r);
	if (strcmp(r->log, pipeline_log) != 0)
		print_error("%s", r->log);
	assert_string_equal(r->log, pipeline_log);
	assert_int_equal(r->status, 0);
	free(r);
}

/* Fields and framing details of one parsed request. */
static void test_request_fields(void **state)
{
	static const char req[] =
		"POST http://Svc:8080/a/%2e%2e/b/?q=1&r=%2F HTTP/1.1\r\n"
		"Host: svc:8080\r\nX-Empty:\r\nX-Pad:   v  \r\nTransfer-Encoding:  chunked \r\n"
		"X-Obs: caf\xc3\xa9\r\n\r\n";
	struct http_parser_state p;
	struct http_event ev;
	const struct http_head *h;
	size_t used;

	(void)state;
	http_request_init(&p, NULL);
	ev = http_feed(&p, req, sizeof(req) - 1, &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(used, sizeof(req) - 1);
	h = ev.head;
	assert_true(h->is_request);
	assert_string_equal(h->method, "POST");
	assert_int_equal(h->form, HTTP_TARGET_ABSOLUTE);
	assert_string_equal(h->path, "/b/");
	assert_string_equal(h->query, "q=1&r=%2F");
	assert_string_equal(h->authority, "Svc:8080");
	assert_string_equal(h->host, "svc:8080");
	assert_int_equal(h->version_minor, 1);
	assert_int_equal(h->framing, HTTP_BODY_CHUNKED);
	assert_int_equal(h->n_fields, 5);
	assert_string_equal(h->fields[1].name, "X-Empty");
	assert_string_equal(h->fields[1].value, "");
	assert_string_equal(h->fields[2].value, "v");
	assert_string_equal(h->fields[3].value, "chunked");
	assert_string_equal(h->fields[4].value, "caf\xc3\xa9");
	assert_int_equal(h->req_flags, 0);
	assert_true(h->keep_alive);
	/* body split across feeds */
	ev = http_feed(&p, S("3\r\nab"), &used);
	assert_int_equal(ev.type, HTTP_EV_BODY);
	assert_int_equal(ev.len, 5);
	ev = http_feed(&p, S("c\r\n0\r\n\r\nGET"), &used);
	assert_int_equal(ev.type, HTTP_EV_BODY);
	assert_int_equal(ev.len, 8);
	assert_int_equal(used, 8);
	ev = http_feed(&p, S("GET"), &used);
	assert_int_equal(ev.type, HTTP_EV_MESSAGE_COMPLETE);
	assert_int_equal(used, 0);
	assert_string_equal(ev.head->path, "/b/");
	ev = http_feed(&p, S("GET"), &used);
	assert_int_equal(ev.type, HTTP_EV_NEED_MORE);
	assert_int_equal(used, 3);
	assert_int_equal(http_finish(&p).type, HTTP_EV_ERROR);
	http_cleanup(&p);
}

static void test_request_forms(void **state)
{
	struct http_parser_state p;
	struct http_event ev;
	size_t used;

	(void)state;
	http_request_init(&p, NULL);
	ev = http_feed(&p, S("CONNECT db.svc:5432 HTTP/1.1\r\nHost: db.svc:5432\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(ev.head->form, HTTP_TARGET_AUTHORITY);
	assert_string_equal(ev.head->authority, "db.svc:5432");
	assert_string_equal(ev.head->path, "");
	assert_int_equal(ev.head->req_flags, HTTP_REQ_CONNECT);
	http_cleanup(&p);

	http_request_init(&p, NULL);
	ev = http_feed(&p, S("HEAD /x HTTP/1.0\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(ev.head->req_flags, HTTP_REQ_HEAD);
	assert_null(ev.head->host);
	assert_false(ev.head->keep_alive);
	assert_int_equal(ev.head->version_minor, 0);
	http_cleanup(&p);

	http_request_init(&p, NULL);
	ev = http_feed(&p, S("GET https://a HTTP/1.1\r\nHost: A\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_string_equal(ev.head->path, "/");
	assert_null(ev.head->query);
	http_cleanup(&p);

	http_request_init(&p, NULL);
	ev = http_feed(&p, S("GET /a? HTTP/1.1\r\nHost: a\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_string_equal(ev.head->query, "");
	http_cleanup(&p);
}

/* Upgrade and CONNECT pause the request side until the response decides. */
static void test_upgrade_pause(void **state)
{
	static const char req[] =
		"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
		"Sec-WebSocket-Key: x\r\n\r\n"
		"GET /next HTTP/1.1\r\nHost: a\r\n\r\n";
	struct http_parser_state p;
	struct http_event ev;
	size_t used, off = 0;

	(void)state;
	http_request_init(&p, NULL);
	ev = http_feed(&p, req, sizeof(req) - 1, &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(ev.head->req_flags, HTTP_REQ_UPGRADE);
	assert_string_equal(ev.head->upgrade, "websocket");
	off += used;
	assert_int_equal(http_feed(&p, req + off, sizeof(req) - 1 - off, &used).type,
	                 HTTP_EV_MESSAGE_COMPLETE);
	assert_int_equal(http_feed(&p, req + off, sizeof(req) - 1 - off, &used).type,
	                 HTTP_EV_PAUSED);
	assert_int_equal(used, 0);
	/* not switched: the next request is parsed */
	http_resume(&p, false);
	ev = http_feed(&p, req + off, sizeof(req) - 1 - off, &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_string_equal(ev.head->path, "/next");
	http_cleanup(&p);

	/* switched: raw bytes */
	http_request_init(&p, NULL);
	ev = http_feed(&p, req, sizeof(req) - 1, &used);
	off = used;
	http_feed(&p, req + off, 0, &used);
	assert_int_equal(http_feed(&p, req + off, 4, &used).type, HTTP_EV_PAUSED);
	http_resume(&p, true);
	ev = http_feed(&p, req + off, 4, &used);
	assert_int_equal(ev.type, HTTP_EV_BODY);
	assert_int_equal(ev.len, 4);
	assert_int_equal(http_finish(&p).type, HTTP_EV_NEED_MORE);
	http_cleanup(&p);
}

/* Memory: the head buffer can be released on an idle connection. */
static void test_shrink(void **state)
{
	struct http_parser_state p;
	size_t used;

	(void)state;
	http_request_init(&p, NULL);
	assert_null(p.buf);
	assert_int_equal(http_feed(&p, S("GET / HTTP/1.1\r\n"), &used).type, HTTP_EV_NEED_MORE);
	http_shrink(&p);                    /* mid-head: kept */
	assert_non_null(p.buf);
	assert_int_equal(http_feed(&p, S("Host: a\r\n\r\n"), &used).type,
	                 HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(http_feed(&p, NULL, 0, &used).type, HTTP_EV_MESSAGE_COMPLETE);
	http_shrink(&p);
	assert_null(p.buf);
	assert_int_equal(http_feed(&p, S("GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"), &used).type,
	                 HTTP_EV_HEAD_COMPLETE);
	assert_string_equal(p.head.path, "/2");
	http_cleanup(&p);
}

/* ---- responses ------------------------------------------------------------- */

struct resp_step {
	unsigned req_flags;
	const char *raw;
};

/* Feeds responses, announcing each request; returns the log. */
static void run_responses(const struct resp_step *steps, size_t n, size_t step, bool eof,
                          struct run *r)
{
	struct http_parser_state p;
	size_t i;

	memset(r, 0, sizeof(*r));
	http_response_init(&p, NULL);
	for (i = 0; i < n && !r->status; i++) {
		struct http_event ev;

		http_response_expect(&p, steps[i].req_flags);
		drive(&p, steps[i].raw, strlen(steps[i].raw), step, r);
		if (eof && i + 1 == n && !r->status) {
			ev = http_finish(&p);
			if (ev.type != HTTP_EV_NEED_MORE)
				on_event(r, &ev);
		}
	}
	http_cleanup(&p);
}

static void test_responses(void **state)
{
	static const struct resp_step steps[] = {
		{ HTTP_REQ_HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" },
		{ 0, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok" },
		{ 0, "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n" },
		{ 0, "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n" },
		{ 0, "HTTP/1.1 200\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n" },
		{ HTTP_REQ_HEAD, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" },
		{ 0, "HTTP/1.0 200 OK\r\n\r\nuntil close" },
	};
	static const char want[] =
		"RESP 200 OK fields=1 framing=0 ka=1\nBODY 0:\nEND\n"
		"RESP 100 Continue fields=0 framing=0 ka=1\nBODY 0:\nEND\n"
		"RESP 201 Created fields=1 framing=1 ka=1\nBODY 2:ok\nEND\n"
		"RESP 204 No Content fields=1 framing=0 ka=1\nBODY 0:\nEND\n"
		"RESP 304 Not Modified fields=1 framing=0 ka=1\nBODY 0:\nEND\n"
		"RESP 200  fields=1 framing=2 ka=1\nBODY 12:2\r\nab\r\n0\r\n\r\n\nEND\n"
		"RESP 200 OK fields=1 framing=0 ka=1\nBODY 0:\nEND\n"
		"RESP 200 OK fields=0 framing=3 ka=0\nBODY 11:until close\nEND\n";
	struct run *r = malloc(sizeof(*r)), *r1 = malloc(sizeof(*r1));

	(void)state;
	assert_non_null(r);
	assert_non_null(r1);
	run_responses(steps, ARRAY_LEN(steps), 4096, true, r);
	run_responses(steps, ARRAY_LEN(steps), 1, true, r1);
	if (strcmp(r->log, want) != 0)
		print_error("%s", r->log);
	assert_string_equal(r->log, want);
	assert_string_equal(r1->log, want);
	free(r);
	free(r1);
}

static void test_response_tunnel(void **state)
{
	static const char resp[] =
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
		"\x81\x05hello";
	struct http_parser_state p;
	struct http_event ev;
	size_t used, off;

	(void)state;
	http_response_init(&p, NULL);
	http_response_expect(&p, HTTP_REQ_UPGRADE);
	ev = http_feed(&p, resp, sizeof(resp) - 1, &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(ev.head->status, 101);
	assert_true(ev.head->tunnel);
	assert_int_equal(ev.head->framing, HTTP_BODY_TUNNEL);
	off = used;
	assert_int_equal(http_feed(&p, resp + off, sizeof(resp) - 1 - off, &used).type,
	                 HTTP_EV_MESSAGE_COMPLETE);
	ev = http_feed(&p, resp + off, sizeof(resp) - 1 - off, &used);
	assert_int_equal(ev.type, HTTP_EV_BODY);
	assert_int_equal(ev.len, 7);
	http_cleanup(&p);

	/* 101 to a request that did not ask */
	http_response_init(&p, NULL);
	http_response_expect(&p, 0);
	ev = http_feed(&p, resp, sizeof(resp) - 1, &used);
	assert_int_equal(ev.type, HTTP_EV_ERROR);
	assert_int_equal(ev.status, 502);
	http_cleanup(&p);

	/* 2xx to CONNECT */
	http_response_init(&p, NULL);
	http_response_expect(&p, HTTP_REQ_CONNECT);
	ev = http_feed(&p, S("HTTP/1.1 200 Connection established\r\n\r\n\x16\x03"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_true(ev.head->tunnel);
	http_cleanup(&p);

	/* 407 to CONNECT: an ordinary response */
	http_response_init(&p, NULL);
	http_response_expect(&p, HTTP_REQ_CONNECT);
	ev = http_feed(&p, S("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_false(ev.head->tunnel);
	assert_int_equal(http_feed(&p, NULL, 0, &used).type, HTTP_EV_MESSAGE_COMPLETE);
	http_cleanup(&p);
}

static void test_response_errors(void **state)
{
	static const char *const bad[] = {
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
		"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
		"HTTP/2 200 OK\r\n\r\n",
		"HTTP/1.1 99 OK\r\n\r\n",
		"HTTP/1.1 600 OK\r\n\r\n",
		"HTTP/1.1 2000 OK\r\n\r\n",
		"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
		"ICY 200 OK\r\n\r\n",
		"\r\nHTTP/1.1 200 OK\r\n\r\n",
	};
	struct http_parser_state p;
	struct http_event ev;
	size_t i, used;

	(void)state;
	for (i = 0; i < ARRAY_LEN(bad); i++) {
		http_response_init(&p, NULL);
		http_response_expect(&p, 0);
		ev = http_feed(&p, bad[i], strlen(bad[i]), &used);
		if (ev.type != HTTP_EV_ERROR)
			print_error("response %zu accepted\n", i);
		assert_int_equal(ev.type, HTTP_EV_ERROR);
		assert_int_equal(ev.status, 502);
		http_cleanup(&p);
	}
	/* unsolicited, and truncated */
	http_response_init(&p, NULL);
	ev = http_feed(&p, S("HTTP/1.1 200 OK\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_ERROR);
	assert_string_equal(ev.reason, "unsolicited response");
	http_cleanup(&p);
	http_response_init(&p, NULL);
	http_response_expect(&p, 0);
	ev = http_feed(&p, S("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"), &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	ev = http_feed(&p, S("abc"), &used);
	assert_int_equal(ev.type, HTTP_EV_BODY);
	ev = http_finish(&p);
	assert_int_equal(ev.type, HTTP_EV_ERROR);
	assert_int_equal(ev.status, 502);
	http_cleanup(&p);
	/* a second response without a second request */
	http_response_init(&p, NULL);
	http_response_expect(&p, 0);
	ev = http_feed(&p, S("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
	               &used);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(http_feed(&p, NULL, 0, &used).type, HTTP_EV_MESSAGE_COMPLETE);
	assert_int_equal(http_feed(&p, S("HTTP"), &used).type, HTTP_EV_ERROR);
	http_cleanup(&p);
}

/* ---- serialisation ----------------------------------------------------------- */

static const struct http_head *parse_one(struct http_parser_state *p, const char *raw,
                                         size_t len)
{
	size_t used;
	struct http_event ev;

	http_request_init(p, NULL);
	ev = http_feed(p, raw, len, &used);
	if (ev.type != HTTP_EV_HEAD_COMPLETE)
		print_error("not a head: %d %s\n", ev.status, ev.reason ? ev.reason : "");
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	return ev.head;
}

static void test_serialize_round_trip(void **state)
{
	static const char req[] =
		"GET http://svc/a/./b/%2e%2e/%63?x=/../y&z HTTP/1.1\r\n"
		"Host: svc\r\n"
		"X-Forwarded-Client-Cert: By=evil\r\n"
		"Accept:  */* \r\n"
		"x_forwarded_client_cert: URI=spiffe://evil\r\n"
		"X-Tenant: acme\r\n"
		"x-forwarded-client-cert: again\r\n"
		"Content-Length: 0\r\n\r\n";
	static const struct http_rewrite_field set[] = {
		{ "x-forwarded-client-cert",
		  "By=spiffe://mesh.local/svc/orders;URI=spiffe://mesh.local/svc/frontend" },
	};
	static const struct http_rewrite_field add[] = { { "x-request-id", "r-1" } };
	static const char want[] =
		"GET /a/c?x=/../y&z HTTP/1.1\r\n"
		"Host: svc\r\n"
		"Accept: */*\r\n"
		"X-Tenant: acme\r\n"
		"Content-Length: 0\r\n"
		"x-forwarded-client-cert: By=spiffe://mesh.local/svc/orders;"
		"URI=spiffe://mesh.local/svc/frontend\r\n"
		"x-request-id: r-1\r\n\r\n";
	struct http_rewrite rw = { set, 1, add, 1 };
	struct http_parser_state p, q;
	const struct http_head *h, *h2;
	char out[1024];
	size_t len, need;
	const char *v;

	(void)state;
	h = parse_one(&p, req, sizeof(req) - 1);
	assert_int_equal(http_head_count(h, "x-forwarded-client-cert", NULL), 3);
	assert_int_equal(http_head_serialize(h, &rw, NULL, 0, &need), -ENOSPC);
	assert_int_equal(http_head_serialize(h, &rw, out, need - 1, &len), -ENOSPC);
	assert_int_equal(http_head_serialize(h, &rw, out, need, &len), 0);
	assert_int_equal(len, need);
	assert_int_equal(len, sizeof(want) - 1);
	assert_memory_equal(out, want, len);

	h2 = parse_one(&q, out, len);
	assert_string_equal(h2->path, "/a/c");
	assert_string_equal(h2->query, "x=/../y&z");
	assert_int_equal(h2->form, HTTP_TARGET_ORIGIN);
	assert_int_equal(http_head_count(h2, "x-forwarded-client-cert", &v), 1);
	assert_string_equal(v, set[0].value);
	assert_int_equal(http_head_count(h2, "x-request-id", &v), 1);
	assert_string_equal(v, "r-1");
	assert_int_equal(h2->n_fields, 6);
	assert_string_equal(h2->fields[0].name, "Host");
	assert_string_equal(h2->fields[1].name, "Accept");
	assert_string_equal(h2->fields[2].name, "X-Tenant");
	assert_string_equal(h2->fields[3].name, "Content-Length");
	http_cleanup(&q);
	http_cleanup(&p);
}

static void test_serialize_hop_by_hop(void **state)
{
	static const char req[] =
		"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret, x_request_id\r\n"
		"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
		"x-request-id: client-id\r\nTransfer-Encoding: chunked\r\n\r\n";
	static const struct http_rewrite_field add[] = { { "x-request-id", "gen" } };
	static const char want[] =
		"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
		"Transfer-Encoding: chunked\r\nx-request-id: gen\r\n\r\n";
	struct http_rewrite rw = { NULL, 0, add, 1 };
	struct http_parser_state p;
	const struct http_head *h;
	char out[512];
	size_t len;

	(void)state;
	h = parse_one(&p, req, sizeof(req) - 1);
	assert_false(h->keep_alive);
	assert_int_equal(http_head_serialize(h, &rw, out, sizeof(out), &len), 0);
	assert_int_equal(len, sizeof(want) - 1);
	assert_memory_equal(out, want, len);
	http_cleanup(&p);

	/* an existing x-request-id is kept; Upgrade survives Connection */
	h = parse_one(&p, S("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
	                    "Upgrade: websocket\r\nX-Request-Id: mine\r\n\r\n"));
	assert_int_equal(http_head_serialize(h, &rw, out, sizeof(out), &len), 0);
	out[len] = '\0';
	assert_string_equal(out, "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
	                         "Upgrade: websocket\r\nX-Request-Id: mine\r\n\r\n");
	http_cleanup(&p);
}

static void test_serialize_other(void **state)
{
	static const struct http_rewrite_field bad_value[] = { { "x-a", "a\r\nX-Injected: 1" } };
	static const struct http_rewrite_field bad_name[] = { { "x a", "v" } };
	static const struct http_rewrite_field drop[] = { { "x-forwarded-client-cert", NULL } };
	struct http_rewrite rw1 = { bad_value, 1, NULL, 0 }, rw2 = { NULL, 0, bad_name, 1 };
	struct http_rewrite rw3 = { drop, 1, NULL, 0 };
	struct http_parser_state p;
	const struct http_head *h;
	struct http_event ev;
	char out[512];
	size_t len;

	(void)state;
	h = parse_one(&p, S("OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: x\r\n\r\n"));
	assert_int_equal(http_head_serialize(h, &rw1, out, sizeof(out), &len), -EINVAL);
	assert_int_equal(http_head_serialize(h, &rw2, out, sizeof(out), &len), -EINVAL);
	assert_int_equal(http_head_serialize(h, &rw3, out, sizeof(out), &len), 0);
	out[len] = '\0';
	assert_string_equal(out, "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
	http_cleanup(&p);

	h = parse_one(&p, S("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"));
	assert_int_equal(http_head_serialize(h, NULL, out, sizeof(out), &len), 0);
	out[len] = '\0';
	assert_string_equal(out, "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n");
	http_cleanup(&p);

	/* a response head */
	http_response_init(&p, NULL);
	http_response_expect(&p, 0);
	ev = http_feed(&p, S("HTTP/1.0 404 Not  Found\r\nContent-Length:3\r\n\r\n"), &len);
	assert_int_equal(ev.type, HTTP_EV_HEAD_COMPLETE);
	assert_int_equal(http_head_serialize(ev.head, NULL, out, sizeof(out), &len), 0);
	out[len] = '\0';
	assert_string_equal(out, "HTTP/1.0 404 Not  Found\r\nContent-Length: 3\r\n\r\n");
	http_cleanup(&p);
}

/* ---- duplicate lookups ----------------------------------------------------- */

static void test_duplicates(void **state)
{
	static const char *const names[] = { "x-user", "x-tenant" };
	struct http_parser_state p;
	const struct http_head *h;
	const char *v;

	(void)state;
	h = parse_one(&p, S("GET / HTTP/1.1\r\nHost: a\r\nX-Tenant: acme\r\nX-User: u\r\n"
	                    "x_tenant: evil\r\n\r\n"));
	assert_int_equal(http_head_count(h, "x-tenant", &v), 2);
	assert_string_equal(v, "acme");
	assert_int_equal(http_head_count(h, "X-USER", &v), 1);
	assert_string_equal(v, "u");
	assert_int_equal(http_head_count(h, "x-none", &v), 0);
	assert_null(v);
	assert_string_equal(http_head_find_duplicate(h, names, 2), "x-tenant");
	assert_null(http_head_find_duplicate(h, names, 1));
	/* Policy lookups take exact names; the '_' copy is refused elsewhere. */
	assert_string_equal(http_head_policy_header(h, "x-tenant"), "acme");
	assert_string_equal(http_head_policy_header(h, "x_tenant"), "evil");
	assert_string_equal(http_head_policy_header(h, "x-user"), "u");
	assert_null(http_head_policy_header(h, "x-none"));
	http_cleanup(&p);
}

/* ---- the head as forwarded: fields the policy evaluates -------------------- */

struct pf_case {
	const char *raw;
	size_t len;
	bool refused;
};

#define PF(lit, refused) { lit, sizeof(lit) - 1, refused }
#define GET1 "GET / HTTP/1.1\r\nHost: a\r\n"

static const struct pf_case pf_cases[] = {
	PF(GET1 "X-Tenant: acme\r\n\r\n", false),
	PF(GET1 "x-tenant: acme\r\nx-other: 1\r\nConnection: x-other\r\n\r\n", false),
	PF(GET1 "x-tenant: acme\r\nx_other: 1\r\n\r\n", false),
	PF(GET1 "x-tenant: acme\r\nConnection: close, keep-alive\r\n\r\n", false),
	PF(GET1 "x-tenantx: 1\r\nConnection: x-tenantx\r\n\r\n", false),
	PF(GET1 "\r\n", false),
	/* a Connection option naming it: removed before forwarding */
	PF(GET1 "x-tenant: acme\r\nConnection: x-tenant\r\n\r\n", true),
	PF(GET1 "x-tenant: acme\r\nConnection: close,X-Tenant\r\n\r\n", true),
	PF(GET1 "x-tenant: acme\r\nConnection: x_tenant\r\n\r\n", true),
	PF(GET1 "Connection: keep-alive\r\nx-tenant: a\r\nconnection: x-tenant\r\n\r\n", true),
	PF(GET1 "Connection: x-role\r\n\r\n", true),
	/* '_' spellings: frameworks disagree on whether they are the same field */
	PF(GET1 "x_tenant: acme\r\n\r\n", true),
	PF(GET1 "X_TENANT: acme\r\n\r\n", true),
	PF(GET1 "x-tenant: acme\r\nx_role: admin\r\n\r\n", true),
	/* repeated */
	PF(GET1 "x-tenant: acme\r\nx-tenant: acme\r\n\r\n", true),
	PF(GET1 "x-tenant: acme\r\nX-TENANT: evil\r\n\r\n", true),
};

static void test_policy_fields(void **state)
{
	static const char *const names[] = { "x-tenant", "x-role" };
	size_t i;

	(void)state;
	for (i = 0; i < ARRAY_LEN(pf_cases); i++) {
		struct http_parser_state p;
		const struct http_head *h = parse_one(&p, pf_cases[i].raw, pf_cases[i].len);
		const char *why = http_head_check_policy_fields(h, names, 2);

		if ((why != NULL) != pf_cases[i].refused)
			print_error("case %zu: %s\n", i, why ? why : "accepted");
		assert_int_equal(why != NULL, pf_cases[i].refused);
		assert_null(http_head_check_policy_fields(h, names, 0));
		http_cleanup(&p);
	}
}

static const struct {
	const char *raw;
	const char *method;       /* the override read, "" for none; NULL: refused */
} mo_cases[] = {
	{ GET1 "\r\n", "" },
	{ GET1 "X-HTTP-Method-Override: DELETE\r\n\r\n", "DELETE" },
	{ GET1 "x-http-method-override:  delete \r\n\r\n", "DELETE" },
	{ GET1 "X-HTTP-Method: put\r\n\r\n", "PUT" },
	{ GET1 "X-Method-Override: PATCH\r\nX-HTTP-Method-Override: patch\r\n\r\n", "PATCH" },
	{ GET1 "X-Method-Override: PATCH\r\nX-HTTP-Method-Override: DELETE\r\n\r\n", NULL },
	{ GET1 "X-HTTP-Method-Override: GET\r\nX-HTTP-Method-Override: DELETE\r\n\r\n", NULL },
	{ GET1 "X_HTTP_Method_Override: DELETE\r\n\r\n", NULL },
	{ GET1 "X-HTTP-Method: DELETE\r\nConnection: x-http-method\r\n\r\n", NULL },
	{ GET1 "X-HTTP-Method-Override: DEL ETE\r\n\r\n", NULL },
	{ GET1 "X-HTTP-Method-Override: \r\n\r\n", NULL },
	{ GET1 "X-HTTP-Method-Override: DELETE,GET\r\n\r\n", NULL },
	{ GET1 "X-HTTP-Method-Override: AVERYLONGMETHODNAMETHATDOESNOTFITINTHEBUFFER\r\n\r\n", NULL },
};

static void test_method_override(void **state)
{
	size_t i;

	(void)state;
	for (i = 0; i < ARRAY_LEN(mo_cases); i++) {
		struct http_parser_state p;
		const struct http_head *h = parse_one(&p, mo_cases[i].raw, strlen(mo_cases[i].raw));
		char got[32];
		const char *why = http_head_method_override(h, got, sizeof(got));

		if ((why == NULL) != (mo_cases[i].method != NULL))
			print_error("case %zu: %s\n", i, why ? why : got);
		assert_int_equal(why == NULL, mo_cases[i].method != NULL);
		if (!why)
			assert_string_equal(got, mo_cases[i].method);
		http_cleanup(&p);
	}
}

/* Feeds a whole request; returns the error status, or 0 at MESSAGE_COMPLETE. */
static int feed_request(struct http_parser_state *p, const char *raw, size_t len)
{
	for (;;) {
		size_t used;
		struct http_event ev = http_feed(p, raw, len, &used);

		raw += used;
		len -= used;
		if (ev.type == HTTP_EV_ERROR)
			return ev.status;
		if (ev.type == HTTP_EV_MESSAGE_COMPLETE)
			return 0;
		if (ev.type == HTTP_EV_NEED_MORE)
			return -1;
	}
}

static void test_guarded_trailers(void **state)
{
	static const char *const names[] = { "x-tenant" };
	static const char long_name[] = "x-a-very-long-header-name-that-is-longer-than-the-"
	                                "trailer-name-buffer";
	static const char *const long_names[] = { long_name };
	static const struct {
		const char *trailer;
		int status;
	} cases[] = {
		{ "", 0 },
		{ "x-checksum: 1\r\n", 0 },
		{ "x-tenant: evil\r\n", 400 },
		{ "X-TENANT: evil\r\n", 400 },
		{ "x_tenant: evil\r\n", 400 },
		{ "x-checksum: 1\r\nx-tenant: evil\r\n", 400 },
		{ "x-tenants: 1\r\n", 0 },
	};
	char raw[512];
	size_t i;

	(void)state;
	for (i = 0; i < ARRAY_LEN(cases); i++) {
		struct http_parser_state p, q;
		int n = snprintf(raw, sizeof(raw), "POST / HTTP/1.1\r\nHost: a\r\n"
		                 "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n%s\r\n",
		                 cases[i].trailer);

		http_request_init(&p, NULL);
		http_request_guard_trailers(&p, names, 1);
		assert_int_equal(feed_request(&p, raw, (size_t)n), cases[i].status);
		http_cleanup(&p);
		/* Unguarded, every one of them passes. */
		http_request_init(&q, NULL);
		assert_int_equal(feed_request(&q, raw, (size_t)n), 0);
		http_cleanup(&q);
	}
	/* A guarded name longer than what the parser keeps of a trailer name. */
	for (i = 0; i < 2; i++) {
		struct http_parser_state p;
		int n = snprintf(raw, sizeof(raw), "POST / HTTP/1.1\r\nHost: a\r\n"
		                 "Transfer-Encoding: chunked\r\n\r\n0\r\n%s: 1\r\n\r\n",
		                 i ? long_name : "x-short");

		http_request_init(&p, NULL);
		http_request_guard_trailers(&p, long_names, 1);
		assert_int_equal(feed_request(&p, raw, (size_t)n), i ? 400 : 0);
		http_cleanup(&p);
	}
}

static void test_status_reason(void **state)
{
	(void)state;
	assert_string_equal(http_status_reason(400), "Bad Request");
	assert_string_equal(http_status_reason(431), "Request Header Fields Too Large");
	assert_string_equal(http_status_reason(299), "Unknown");
}

/* Feeds resp in steps of step bytes with split chunks; the content alone into out. */
static size_t split_content(const char *resp, size_t step, char *out, size_t cap,
                            size_t *framing_bytes)
{
	struct http_parser_state p;
	size_t len = strlen(resp), off = 0, got = 0, end;
	bool complete = false;

	http_response_init(&p, NULL);
	http_response_expect(&p, 0);
	http_split_chunks(&p, true);
	*framing_bytes = 0;
	while (!complete) {
		size_t used = 0;
		struct http_event ev;

		end = off + step < len ? off + step : len;
		ev = http_feed(&p, resp + off, end - off, &used);
		off += used;
		assert_int_not_equal(ev.type, HTTP_EV_ERROR);
		if (ev.type == HTTP_EV_BODY && ev.framing) {
			*framing_bytes += ev.len;
		} else if (ev.type == HTTP_EV_BODY) {
			assert_true(got + ev.len <= cap);
			memcpy(out + got, ev.data, ev.len);
			got += ev.len;
		}
		complete = ev.type == HTTP_EV_MESSAGE_COMPLETE;
		assert_true(complete || ev.type != HTTP_EV_NEED_MORE || off < len);
	}
	assert_int_equal(off, len);
	http_cleanup(&p);
	return got;
}

static void test_split_chunks(void **state)
{
	const char *resp = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
	                   "5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-T: 1\r\n\r\n";
	size_t head = strlen("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
	char out[64];
	size_t framing;

	(void)state;
	for (size_t step = 1; step <= strlen(resp); step++) {
		size_t got = split_content(resp, step, out, sizeof(out), &framing);

		assert_int_equal(got, 12);
		assert_memory_equal(out, "hello world!", 12);
		assert_int_equal(framing + got + head, strlen(resp));
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_normalize_table),
		cmocka_unit_test(test_split_chunks),
		cmocka_unit_test(test_normalize_idempotent),
		cmocka_unit_test(test_normalize_space),
		cmocka_unit_test(test_refusals),
		cmocka_unit_test(test_error_sticky),
		cmocka_unit_test(test_limit_defaults),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_pipeline),
		cmocka_unit_test(test_request_fields),
		cmocka_unit_test(test_request_forms),
		cmocka_unit_test(test_upgrade_pause),
		cmocka_unit_test(test_shrink),
		cmocka_unit_test(test_responses),
		cmocka_unit_test(test_response_tunnel),
		cmocka_unit_test(test_response_errors),
		cmocka_unit_test(test_serialize_round_trip),
		cmocka_unit_test(test_serialize_hop_by_hop),
		cmocka_unit_test(test_serialize_other),
		cmocka_unit_test(test_duplicates),
		cmocka_unit_test(test_policy_fields),
		cmocka_unit_test(test_method_override),
		cmocka_unit_test(test_guarded_trailers),
		cmocka_unit_test(test_status_reason),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
