/*
 * Unit tests for proxy/h2session.c: the preface, the header checks nghttp2
 * leaves to us, gRPC's timeout and content-type, the abuse counters, and a
 * real nghttp2 server session set up with the config's limits.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <string.h>
#include <cmocka.h>

#include "h2session.h"

#define F(n, v) { n, v, sizeof(n) - 1, sizeof(v) - 1 }
#define REQ_BASE F(":method", "GET"), F(":scheme", "http"), F(":authority", "orders"), \
	F(":path", "/x")

static const struct config_http2 LIM = { 100, 16384, 65535 };

static enum h2_refusal check(const struct h2_field *f, size_t n)
{
	const char *why = NULL;
	enum h2_refusal r = h2_check_request(f, n, &why);

	assert_true((r == H2_OK) == (why == NULL));
	return r;
}

#define CHECK(want, ...) do { \
	const struct h2_field f_[] = { __VA_ARGS__ }; \
	assert_int_equal(check(f_, sizeof(f_) / sizeof(f_[0])), want); \
} while (0)

static void test_preface(void **state)
{
	(void)state;
	assert_int_equal(h2_is_preface(H2_PREFACE, H2_PREFACE_LEN), 1);
	assert_int_equal(h2_is_preface(H2_PREFACE "\x00\x00", H2_PREFACE_LEN + 2), 1);
	assert_int_equal(h2_is_preface("PRI * HTTP/2", 12), -1);
	assert_int_equal(h2_is_preface("", 0), -1);
	assert_int_equal(h2_is_preface("P", 1), -1);
	assert_int_equal(h2_is_preface("PUT / HTTP/1.1\r\n", 16), 0);
	assert_int_equal(h2_is_preface("PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n", 24), 0);
}

static void test_request_ok(void **state)
{
	(void)state;
	CHECK(H2_OK, REQ_BASE);
	CHECK(H2_OK, REQ_BASE, F("te", "trailers"), F("content-length", "0"), F("x-a", "b c"));
	CHECK(H2_OK, REQ_BASE, F("host", "ORDERS"));   /* host agrees, case aside */
	CHECK(H2_OK, F(":method", "OPTIONS"), F(":scheme", "http"), F(":path", "*"));
	CHECK(H2_OK, REQ_BASE, F("content-length", "5"), F("content-length", "5"));
}

static void test_request_malformed(void **state)
{
	(void)state;
	CHECK(H2_MALFORMED, REQ_BASE, F("connection", "close"));
	CHECK(H2_MALFORMED, REQ_BASE, F("keep-alive", "1"));
	CHECK(H2_MALFORMED, REQ_BASE, F("proxy-connection", "1"));
	CHECK(H2_MALFORMED, REQ_BASE, F("transfer-encoding", "chunked"));
	CHECK(H2_MALFORMED, REQ_BASE, F("upgrade", "h2c"));
	CHECK(H2_MALFORMED, REQ_BASE, F("te", "gzip"));
	CHECK(H2_MALFORMED, REQ_BASE, F("X-A", "1"));
	CHECK(H2_MALFORMED, REQ_BASE, F("x a", "1"));
	CHECK(H2_MALFORMED, REQ_BASE, F("", "1"));
	CHECK(H2_MALFORMED, REQ_BASE, F("x-a", "1\r\n"));
	CHECK(H2_MALFORMED, REQ_BASE, F("x-a", "1\n2"));
	CHECK(H2_MALFORMED, REQ_BASE, F("x-a", "1\0" "2"));
	CHECK(H2_MALFORMED, REQ_BASE, F("x-\0a", "1"));
	CHECK(H2_MALFORMED, REQ_BASE, F(":path", "/y"));
	CHECK(H2_MALFORMED, F(":method", "GET"), REQ_BASE);
	CHECK(H2_MALFORMED, F(":method", "GET"), F(":scheme", "http"), F("x-a", "1"),
	      F(":path", "/x"));
	CHECK(H2_MALFORMED, REQ_BASE, F(":protocol", "websocket"));
	CHECK(H2_MALFORMED, F(":method", "GET"), F(":scheme", "http"), F(":path", "x"));
	CHECK(H2_MALFORMED, F(":method", "GET"), F(":scheme", "http"), F(":path", "*"));
	CHECK(H2_MALFORMED, F(":method", "GET"), F(":scheme", "http"), F(":path", ""));
	CHECK(H2_MALFORMED, F(":method", "GET"), F(":scheme", "http"));
	CHECK(H2_MALFORMED, F(":method", "GET"), F(":path", "/x"));
	CHECK(H2_MALFORMED, F(":scheme", "http"), F(":path", "/x"));
	CHECK(H2_MALFORMED, REQ_BASE, F("content-length", "5"), F("content-length", "6"));
	CHECK(H2_MALFORMED, REQ_BASE, F("content-length", "-1"));
	CHECK(H2_MALFORMED, REQ_BASE, F("content-length", "5, 5"));
}

static void test_request_bad(void **state)
{
	(void)state;
	CHECK(H2_BAD_REQUEST, REQ_BASE, F("host", "elsewhere"));
	CHECK(H2_BAD_REQUEST, REQ_BASE, F("host", "orders"), F("host", "orders"));
	CHECK(H2_BAD_REQUEST, F(":method", "CONNECT"), F(":authority", "orders:443"));
}

static void test_response(void **state)
{
	const struct h2_field ok[] = { F(":status", "200"), F("content-type", "x") };
	const struct h2_field no_status[] = { F("content-type", "x") };
	const struct h2_field bad_status[] = { F(":status", "20") };
	const struct h2_field zero_status[] = { F(":status", "099") };
	const struct h2_field conn[] = { F(":status", "200"), F("connection", "close") };
	const struct h2_field trailers[] = { F("grpc-status", "0") };
	const struct h2_field pseudo_trailer[] = { F(":status", "200") };
	const char *why;

	(void)state;
	assert_int_equal(h2_check_response(ok, 2, false, &why), H2_OK);
	assert_int_equal(h2_check_response(no_status, 1, false, &why), H2_MALFORMED);
	assert_int_equal(h2_check_response(bad_status, 1, false, &why), H2_MALFORMED);
	assert_int_equal(h2_check_response(zero_status, 1, false, &why), H2_MALFORMED);
	assert_int_equal(h2_check_response(conn, 2, false, &why), H2_MALFORMED);
	assert_int_equal(h2_check_response(trailers, 1, true, &why), H2_OK);
	assert_int_equal(h2_check_response(pseudo_trailer, 1, true, &why), H2_MALFORMED);
}

static void test_grpc(void **state)
{
	(void)state;
	assert_int_equal(h2_grpc_timeout_ms("100m", 4), 100);
	assert_int_equal(h2_grpc_timeout_ms("2S", 2), 2000);
	assert_int_equal(h2_grpc_timeout_ms("1M", 2), 60000);
	assert_int_equal(h2_grpc_timeout_ms("1H", 2), 3600000);
	assert_int_equal(h2_grpc_timeout_ms("1500u", 5), 2);
	assert_int_equal(h2_grpc_timeout_ms("1n", 2), 1);
	assert_int_equal(h2_grpc_timeout_ms("99999999S", 9), 99999999000LL);
	assert_int_equal(h2_grpc_timeout_ms("123456789S", 10), -1);    /* 9 digits */
	assert_int_equal(h2_grpc_timeout_ms("S", 1), -1);
	assert_int_equal(h2_grpc_timeout_ms("10x", 3), -1);
	assert_int_equal(h2_grpc_timeout_ms("-1S", 3), -1);
	assert_true(h2_is_grpc("application/grpc", 16));
	assert_true(h2_is_grpc("application/grpc+proto", 22));
	assert_true(h2_is_grpc("Application/GRPC;x=y", 20));
	assert_false(h2_is_grpc("application/grpcx", 17));
	assert_false(h2_is_grpc("application/json", 16));
}

static nghttp2_frame_hd hd(uint8_t type, uint8_t flags, size_t len)
{
	return (nghttp2_frame_hd){ .length = len, .stream_id = 1, .type = type, .flags = flags };
}

static void test_guard_control_flood(void **state)
{
	struct h2_guard g;
	nghttp2_frame_hd ping = hd(NGHTTP2_PING, 0, 8), ack = hd(NGHTTP2_PING, NGHTTP2_FLAG_ACK, 8);
	int kind = -1, i;

	(void)state;
	h2_guard_init(&g, &LIM, 1000);
	for (i = 0; i < 100000 && kind < 0; i++)
		kind = h2_guard_frame(&g, &ack, 0, false, 1000);
	assert_int_equal(kind, -1);    /* acks answer us: not counted */
	for (i = 0; i < 100000 && kind < 0; i++)
		kind = h2_guard_frame(&g, &ping, 0, false, 1000);
	assert_int_equal(kind, H2_ABUSE_CONTROL_FLOOD);
	assert_in_range(i, 1000, 5000);
	/* A second later the bucket has refilled somewhat: a keepalive passes. */
	assert_int_equal(h2_guard_frame(&g, &ping, 0, false, 2000), -1);
}

static void test_guard_resets_continuations_streams(void **state)
{
	struct h2_guard g;
	nghttp2_frame_hd rst = hd(NGHTTP2_RST_STREAM, 0, 4), cont = hd(NGHTTP2_CONTINUATION, 0, 10);
	nghttp2_frame_hd headers = hd(NGHTTP2_HEADERS, 0, 10);
	int kind = -1, i;

	(void)state;
	h2_guard_init(&g, &LIM, 0);
	for (i = 0; i < 10000 && kind < 0; i++)
		kind = h2_guard_frame(&g, &rst, 0, false, 0);
	assert_int_equal(kind, H2_ABUSE_RAPID_RESET);
	assert_in_range(i, 100, 1000);
	assert_int_equal(h2_guard_frame(&g, &headers, 99, true, 0), -1);
	assert_int_equal(h2_guard_frame(&g, &headers, 100, true, 0), H2_ABUSE_TOO_MANY_STREAMS);
	assert_int_equal(h2_guard_frame(&g, &headers, 100, false, 0), -1);    /* trailers */
	for (i = 0, kind = -1; i < 100 && kind < 0; i++)
		kind = h2_guard_frame(&g, &cont, 0, false, 0);
	assert_int_equal(kind, H2_ABUSE_CONTINUATION_FLOOD);
	assert_int_equal(i, 9);
}

static void test_guard_header_list(void **state)
{
	struct h2_guard g;
	nghttp2_frame_hd headers = hd(NGHTTP2_HEADERS, 0, 10);
	int kind = -1, i;

	(void)state;
	h2_guard_init(&g, &LIM, 0);
	h2_guard_frame(&g, &headers, 0, true, 0);
	for (i = 0; i < 1000 && kind < 0; i++)
		kind = h2_guard_header(&g, 10, 990);
	assert_int_equal(kind, H2_ABUSE_HEADER_LIST);
	assert_int_equal(i, 16);    /* 16 * 1032 > 16384 */
	h2_guard_frame(&g, &headers, 0, true, 0);    /* a new block starts from zero */
	assert_int_equal(h2_guard_header(&g, 10, 990), -1);
}

static ssize_t no_send(nghttp2_session *s, const uint8_t *d, size_t l, int f, void *u)
{
	return (ssize_t)l;
}

/* The value of id in the SETTINGS frame at f, -1 when absent. */
static long settings_value(const uint8_t *f, int id)
{
	size_t len = (size_t)f[0] << 16 | (size_t)f[1] << 8 | f[2];

	for (size_t i = 9; i + 6 <= 9 + len; i += 6)
		if ((f[i] << 8 | f[i + 1]) == id)
			return (long)((uint32_t)f[i + 2] << 24 | (uint32_t)f[i + 3] << 16 |
			              (uint32_t)f[i + 4] << 8 | f[i + 5]);
	return -1;
}

static void test_session_limits(void **state)
{
	nghttp2_session_callbacks *cb;
	nghttp2_session *s;
	const uint8_t *out;
	ssize_t n;

	(void)state;
	assert_int_equal(nghttp2_session_callbacks_new(&cb), 0);
	nghttp2_session_callbacks_set_send_callback(cb, no_send);
	assert_int_equal(h2_session_new(&s, true, &LIM, cb, NULL), 0);
	n = nghttp2_session_mem_send(s, &out);
	assert_true(n > 9);
	assert_int_equal(out[3], NGHTTP2_SETTINGS);    /* our SETTINGS comes first */
	assert_int_equal(settings_value(out, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS), 100);
	assert_int_equal(settings_value(out, NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE), 65535);
	assert_int_equal(settings_value(out, NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE), 16384);
	assert_int_equal(settings_value(out, NGHTTP2_SETTINGS_ENABLE_PUSH), -1);    /* server */
	assert_int_equal(nghttp2_session_get_local_window_size(s), 4 * 65535);
	/* Not the preface: the session refuses it. */
	assert_true(nghttp2_session_mem_recv(s, (const uint8_t *)"GET / HTTP/1.1\r\n\r\n012345", 24) < 0);
	nghttp2_session_del(s);
	nghttp2_session_callbacks_del(cb);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_preface),
		cmocka_unit_test(test_request_ok),
		cmocka_unit_test(test_request_malformed),
		cmocka_unit_test(test_request_bad),
		cmocka_unit_test(test_response),
		cmocka_unit_test(test_grpc),
		cmocka_unit_test(test_guard_control_flood),
		cmocka_unit_test(test_guard_resets_continuations_streams),
		cmocka_unit_test(test_guard_header_list),
		cmocka_unit_test(test_session_limits),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
