/* Unit tests for lib/api.c: request validation of meshlet-control's API. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "meshlet/api.h"

static json_t *parse(const char *text)
{
	json_error_t je;
	json_t *v = json_loads(text, 0, &je);

	assert_non_null(v);
	return v;
}

static void test_route_match(void **state)
{
	char caps[2][64];

	assert_true(api_route_match("/v1/policies", "/v1/policies", caps, 2));
	assert_false(api_route_match("/v1/policies", "/v1/policies/", caps, 2));
	assert_false(api_route_match("/v1/policies", "/v1/policie", caps, 2));
	assert_true(api_route_match("/v1/policies/{svc}", "/v1/policies/orders", caps, 2));
	assert_string_equal(caps[0], "orders");
	assert_false(api_route_match("/v1/policies/{svc}", "/v1/policies/", caps, 2));
	assert_false(api_route_match("/v1/policies/{svc}", "/v1/policies/a/b", caps, 2));
	assert_true(api_route_match("/v1/services/{svc}/config", "/v1/services/web/config", caps, 2));
	assert_string_equal(caps[0], "web");
	assert_false(api_route_match("/v1/services/{svc}/config", "/v1/services/web/configx", caps, 2));
	assert_false(api_route_match("/v1/services/{svc}/config", "/v1/services//config", caps, 2));
	/* A segment too long to capture does not match. */
	char longpath[200];
	snprintf(longpath, sizeof(longpath), "/v1/policies/%0100d", 0);
	assert_false(api_route_match("/v1/policies/{svc}", longpath, caps, 2));
}

static void test_duration(void **state)
{
	struct meshlet_err e = {0};
	int64_t v = 0;

	assert_int_equal(api_parse_duration("90", 1, 1000000, &v, &e), 0);
	assert_int_equal(v, 90);
	assert_int_equal(api_parse_duration("90s", 1, 1000000, &v, &e), 0);
	assert_int_equal(v, 90);
	assert_int_equal(api_parse_duration("15m", 1, 1000000, &v, &e), 0);
	assert_int_equal(v, 900);
	assert_int_equal(api_parse_duration("1h", 1, 1000000, &v, &e), 0);
	assert_int_equal(v, 3600);
	assert_int_equal(api_parse_duration("1h30m", 1, 1000000, &v, &e), 0);
	assert_int_equal(v, 5400);
	assert_int_equal(api_parse_duration("2d", 1, 1000000, &v, &e), 0);
	assert_int_equal(v, 172800);
	assert_int_equal(api_parse_duration("", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("h", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("1h30", 1, 1000000, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("-5", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("10x", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("1 h", 1, 100000, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("0", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("101", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("99999999999999999999999d", 1, 100, &v, &e), -EINVAL);
	assert_int_equal(api_parse_duration("9223372036854775807d", 1, 100, &v, &e), -EINVAL);
}

static const char pin[] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

static void test_token_roundtrip(void **state)
{
	unsigned char secret[API_TOKEN_SECRET_BYTES];
	char tok[API_TOKEN_MAX], h1[API_SHA256_HEX_LEN], h2[API_SHA256_HEX_LEN];
	struct api_join_token jt;
	struct meshlet_err e = {0};

	for (size_t i = 0; i < sizeof(secret); i++)
		secret[i] = (unsigned char)(i * 37 + 255);
	assert_int_equal(api_token_format(tok, sizeof(tok), "orders", pin, secret), 0);
	assert_int_equal(strncmp(tok, "mlt1.orders.", 12), 0);
	assert_int_equal(strlen(tok), 4 + 1 + 6 + 1 + 64 + 1 + API_TOKEN_SECRET_LEN);
	assert_int_equal(api_token_parse(tok, &jt, &e), 0);
	assert_string_equal(jt.service, "orders");
	assert_string_equal(jt.pin, pin);
	api_sha256_hex(tok, strlen(tok), h1);
	api_sha256_hex(tok, strlen(tok), h2);
	assert_string_equal(h1, h2);
	assert_int_equal(strlen(h1), 64);
	/* The hash covers the whole token. */
	tok[strlen(tok) - 1] ^= 1;
	api_sha256_hex(tok, strlen(tok), h2);
	assert_string_not_equal(h1, h2);
	/* Bad inputs to format. */
	assert_int_equal(api_token_format(tok, sizeof(tok), "Orders", pin, secret), -EINVAL);
	assert_int_equal(api_token_format(tok, sizeof(tok), "orders", "abc", secret), -EINVAL);
	assert_int_equal(api_token_format(tok, 20, "orders", pin, secret), -EINVAL);
}

static void test_token_parse_refusals(void **state)
{
	struct api_join_token jt;
	struct meshlet_err e = {0};
	char buf[300];
	const char *sec = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";   /* 43 */

	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), 0);
	assert_int_equal(api_token_parse("", &jt, &e), -EINVAL);
	assert_string_equal(e.path, "token");
	assert_int_equal(api_token_parse("Bearer x", &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt2.orders.%s.%s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.Orders.%s.%s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1..%s.%s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%.63s.%s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%s", "0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef", sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%sA", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%.42s=", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%s", pin);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	/* The proxy once took any secret of 16 or more characters: no more. */
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%.16s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	assert_non_null(strstr(e.message, "secret"));
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%.42s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%s.x", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), "mlt1.orders.%s.%.42s+", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	snprintf(buf, sizeof(buf), " mlt1.orders.%s.%s", pin, sec);
	assert_int_equal(api_token_parse(buf, &jt, &e), -EINVAL);
	assert_int_equal(api_token_parse(NULL, &jt, &e), -EINVAL);
}

static void test_if_match(void **state)
{
	struct meshlet_err e = {0};
	int64_t v = -1;

	assert_int_equal(api_parse_if_match("5", &v, &e), 0);
	assert_int_equal(v, 5);
	assert_int_equal(api_parse_if_match("\"12\"", &v, &e), 0);
	assert_int_equal(v, 12);
	assert_int_equal(api_parse_if_match(" 7 ", &v, &e), 0);
	assert_int_equal(v, 7);
	assert_int_equal(api_parse_if_match("*", &v, &e), 0);
	assert_int_equal(v, 0);
	assert_int_equal(api_parse_if_match("0", &v, &e), -EINVAL);
	assert_string_equal(e.path, "If-Match");
	assert_int_equal(api_parse_if_match("W/\"5\"", &v, &e), -EINVAL);
	assert_int_equal(api_parse_if_match("abc", &v, &e), -EINVAL);
	assert_int_equal(api_parse_if_match("-1", &v, &e), -EINVAL);
	assert_int_equal(api_parse_if_match("\"", &v, &e), -EINVAL);
	assert_int_equal(api_parse_if_match("99999999999999999999", &v, &e), -EINVAL);
	assert_int_equal(api_parse_if_match("", &v, &e), -EINVAL);
}

static void test_config_query(void **state)
{
	struct api_config_query q;
	struct meshlet_err e = {0};

	assert_int_equal(api_parse_config_query(NULL, &q, &e), 0);
	assert_int_equal(q.after, 0);
	assert_int_equal(q.wait, API_WAIT_DEFAULT);
	assert_int_equal(api_parse_config_query("after=42&wait=5", &q, &e), 0);
	assert_int_equal(q.after, 42);
	assert_int_equal(q.wait, 5);
	assert_int_equal(api_parse_config_query("wait=0", &q, &e), 0);
	assert_int_equal(q.wait, 0);
	assert_int_equal(api_parse_config_query("wait=301", &q, &e), -EINVAL);
	assert_string_equal(e.path, "wait");
	assert_int_equal(api_parse_config_query("after=-1", &q, &e), -EINVAL);
	assert_string_equal(e.path, "after");
	assert_int_equal(api_parse_config_query("after=1&after=2", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("foo=1", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("after", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("after=", &q, &e), -EINVAL);
}

/* degraded=: what a proxy says about itself; only the known names. */
static void test_config_query_degraded(void **state)
{
	struct api_config_query q;
	struct meshlet_err e = {0};
	char text[48];
	json_t *a;

	(void)state;
	assert_int_equal(api_parse_config_query("after=1", &q, &e), 0);
	assert_int_equal(q.degraded, 0);
	assert_int_equal(api_parse_config_query("after=1&degraded=renewal", &q, &e), 0);
	assert_int_equal(q.degraded, API_DEGRADED_RENEWAL);
	assert_int_equal(api_parse_config_query("degraded=expiry,renewal&wait=5", &q, &e), 0);
	assert_int_equal(q.degraded, API_DEGRADED_RENEWAL | API_DEGRADED_EXPIRY);
	assert_int_equal(api_parse_config_query("degraded=fine", &q, &e), -EINVAL);
	assert_string_equal(e.path, "degraded");
	assert_non_null(strstr(e.message, "'fine'"));
	assert_int_equal(api_parse_config_query("degraded=", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("degraded=renewal,", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("degraded=,renewal", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("degraded=renewalx", &q, &e), -EINVAL);
	assert_int_equal(api_parse_config_query("degraded=renewal&degraded=expiry", &q, &e),
	                 -EINVAL);
	api_degraded_format(0, text, sizeof(text));
	assert_string_equal(text, "");
	api_degraded_format(API_DEGRADED_RENEWAL | API_DEGRADED_EXPIRY, text, sizeof(text));
	assert_string_equal(text, "renewal,expiry");
	assert_int_equal(api_parse_config_query("degraded=renewal,expiry", &q, &e), 0);
	a = api_degraded_json(q.degraded);
	assert_int_equal(json_array_size(a), 2);
	assert_string_equal(json_string_value(json_array_get(a, 1)), "expiry");
	json_decref(a);
}

static void test_config_query_upstreams(void **state)
{
	struct api_config_query q;
	struct meshlet_err e = {0};
	char many[65 * 8 + 32];
	size_t n = 0;

	assert_int_equal(api_parse_config_query("after=1", &q, &e), 0);
	assert_false(q.upstreams_all);
	assert_int_equal(q.n_upstreams, 0);
	assert_false(api_config_query_wants(&q, "orders"));

	assert_int_equal(api_parse_config_query("after=1&upstreams=*&wait=0", &q, &e), 0);
	assert_true(q.upstreams_all);
	assert_true(api_config_query_wants(&q, "anything"));

	assert_int_equal(api_parse_config_query("upstreams=orders,pay-ments", &q, &e), 0);
	assert_int_equal(q.n_upstreams, 2);
	assert_true(api_config_query_wants(&q, "orders"));
	assert_true(api_config_query_wants(&q, "pay-ments"));
	assert_false(api_config_query_wants(&q, "order"));
	assert_false(api_config_query_wants(&q, "reports"));

	static const char *const bad[] = {
		"upstreams=", "upstreams=Orders", "upstreams=orders,", "upstreams=,orders",
		"upstreams=orders,,x", "upstreams=orders,*", "upstreams=*,orders",
		"upstreams=a&upstreams=b", "upstreams=orders%2Cx",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memset(&e, 0, sizeof(e));
		assert_int_equal(api_parse_config_query(bad[i], &q, &e), -EINVAL);
		assert_true(strcmp(e.path, "upstreams") == 0 || strcmp(e.path, "query") == 0);
	}
	/* 64 names fit, 65 do not */
	n = (size_t)snprintf(many, sizeof(many), "upstreams=s0");
	for (int i = 1; i < 64; i++)
		n += (size_t)snprintf(many + n, sizeof(many) - n, ",s%d", i);
	assert_int_equal(api_parse_config_query(many, &q, &e), 0);
	assert_int_equal(q.n_upstreams, 64);
	snprintf(many + n, sizeof(many) - n, ",s64");
	assert_int_equal(api_parse_config_query(many, &q, &e), -EINVAL);
	assert_string_equal(e.path, "upstreams");
}

static void test_token_req(void **state)
{
	struct api_token_req r;
	struct meshlet_err e = {0};
	json_t *b;

	b = parse("{\"service\": \"orders\"}");
	assert_int_equal(api_parse_token_req(b, &r, &e), 0);
	assert_string_equal(r.service, "orders");
	assert_int_equal(r.ttl, API_TOKEN_TTL_DEFAULT);
	assert_int_equal(r.uses, 1);
	json_decref(b);

	b = parse("{\"service\": \"orders\", \"ttl_seconds\": 60, \"uses\": 3}");
	assert_int_equal(api_parse_token_req(b, &r, &e), 0);
	assert_int_equal(r.ttl, 60);
	assert_int_equal(r.uses, 3);
	json_decref(b);

	b = parse("{\"service\": \"orders\", \"extra\": 1}");
	assert_int_equal(api_parse_token_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "extra");
	json_decref(b);

	b = parse("{\"service\": \"Bad_Name\"}");
	assert_int_equal(api_parse_token_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "service");
	json_decref(b);

	b = parse("{\"service\": \"orders\", \"uses\": 0}");
	assert_int_equal(api_parse_token_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "uses");
	json_decref(b);

	b = parse("{\"service\": \"orders\", \"ttl_seconds\": \"1h\"}");
	assert_int_equal(api_parse_token_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "ttl_seconds");
	json_decref(b);

	b = parse("{}");
	assert_int_equal(api_parse_token_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "service");
	json_decref(b);

	b = parse("[1]");
	assert_int_equal(api_parse_token_req(b, &r, &e), -EINVAL);
	json_decref(b);
}

static void test_svid_req(void **state)
{
	struct api_svid_req r;
	struct meshlet_err e = {0};
	json_t *b;

	b = parse("{\"csr\": \"-----BEGIN CERTIFICATE REQUEST-----\"}");
	assert_int_equal(api_parse_svid_req(b, &r, &e), 0);
	assert_null(r.service);
	assert_true(r.csr_len > 0);
	json_decref(b);

	b = parse("{\"csr\": \"x\", \"service\": \"web\"}");
	assert_int_equal(api_parse_svid_req(b, &r, &e), 0);
	assert_string_equal(r.service, "web");
	json_decref(b);

	b = parse("{\"csr\": \"\"}");
	assert_int_equal(api_parse_svid_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "csr");
	json_decref(b);

	b = parse("{\"csr\": 5}");
	assert_int_equal(api_parse_svid_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "csr");
	json_decref(b);

	b = parse("{\"csr\": \"x\", \"spiffe_id\": \"spiffe://a/svc/b\"}");
	assert_int_equal(api_parse_svid_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "spiffe_id");
	json_decref(b);
}

static void test_check_req(void **state)
{
	struct api_check_req r;
	struct meshlet_err e = {0};
	json_t *b;

	b = parse("{\"from\": \"spiffe://mesh.local/svc/web\", \"service\": \"orders\", \"port\": 8080}");
	assert_int_equal(api_parse_check_req(b, &r, &e), 0);
	assert_false(r.http);
	assert_int_equal(r.port, 8080);
	json_decref(b);

	b = parse("{\"from\": \"spiffe://mesh.local/svc/web\", \"service\": \"orders\", \"port\": 80,"
	          " \"method\": \"GET\", \"path\": \"/a\", \"headers\": {\"x-tenant\": \"acme\"}}");
	assert_int_equal(api_parse_check_req(b, &r, &e), 0);
	assert_true(r.http);
	assert_string_equal(r.method, "GET");
	json_decref(b);

	b = parse("{\"from\": \"web\", \"service\": \"orders\", \"port\": 80}");
	assert_int_equal(api_parse_check_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "from");
	json_decref(b);

	b = parse("{\"from\": \"spiffe://mesh.local/svc/web\", \"service\": \"orders\", \"port\": 0}");
	assert_int_equal(api_parse_check_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "port");
	json_decref(b);

	b = parse("{\"from\": \"spiffe://mesh.local/svc/web\", \"service\": \"orders\", \"port\": 1,"
	          " \"path\": \"relative\"}");
	assert_int_equal(api_parse_check_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "path");
	json_decref(b);

	b = parse("{\"from\": \"spiffe://mesh.local/svc/web\", \"service\": \"orders\", \"port\": 1,"
	          " \"headers\": {\"x\": 1}}");
	assert_int_equal(api_parse_check_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "headers.x");
	json_decref(b);

	b = parse("{\"from\": \"spiffe://mesh.local/svc/web\", \"service\": \"orders\", \"port\": 1,"
	          " \"method\": \"G E T\"}");
	assert_int_equal(api_parse_check_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "method");
	json_decref(b);
}

static void test_address(void **state)
{
	assert_true(api_valid_address("10.0.0.2:15006"));
	assert_true(api_valid_address("[::1]:80"));
	assert_true(api_valid_address("[fe80::1]:65535"));
	assert_false(api_valid_address("10.0.0.2"));
	assert_false(api_valid_address("10.0.0.2:0"));
	assert_false(api_valid_address("10.0.0.2:65536"));
	assert_false(api_valid_address("10.0.0.256:80"));
	assert_false(api_valid_address("host:80"));
	assert_false(api_valid_address("::1:80"));
	assert_false(api_valid_address("[::1]80"));
	assert_false(api_valid_address(":80"));
	assert_false(api_valid_address("1.2.3.4:08"));
	assert_false(api_valid_address(NULL));
}

static void test_addr_parse_and_format(void **state)
{
	struct api_addr a, b;
	char text[API_ADDRESS_MAX];

	assert_int_equal(api_addr_parse("10.0.0.2:15006", false, &a), 0);
	assert_int_equal(a.port, 15006);
	api_addr_format(&a, text, sizeof(text));
	assert_string_equal(text, "10.0.0.2:15006");
	/* one IPv6 address, several spellings: one canonical form */
	assert_int_equal(api_addr_parse("[fd00:0::0:7]:80", false, &a), 0);
	api_addr_format(&a, text, sizeof(text));
	assert_string_equal(text, "[fd00::7]:80");
	assert_int_equal(api_addr_parse("[FD00::7]:81", false, &b), 0);
	assert_true(api_addr_same_ip(&a, &b));
	/* a dual-stack socket's view of an IPv4 peer is that IPv4 address */
	assert_int_equal(api_addr_parse("[::ffff:10.0.0.2]:4000", false, &b), 0);
	api_addr_format(&b, text, sizeof(text));
	assert_string_equal(text, "10.0.0.2:4000");
	assert_int_equal(api_addr_parse("10.0.0.2:1", false, &a), 0);
	assert_true(api_addr_same_ip(&a, &b));
	assert_int_equal(api_addr_parse("10.0.0.3:1", false, &a), 0);
	assert_false(api_addr_same_ip(&a, &b));
	assert_int_equal(api_addr_parse("[::1]:1", false, &a), 0);
	assert_int_equal(api_addr_parse("127.0.0.1:1", false, &b), 0);
	assert_false(api_addr_same_ip(&a, &b));
	/* port 0 only where asked for */
	assert_int_equal(api_addr_parse("10.0.0.2:0", false, &a), -EINVAL);
	assert_int_equal(api_addr_parse("10.0.0.2:0", true, &a), 0);
	assert_int_equal(api_addr_parse("010.0.0.2:1", false, &a), -EINVAL);
	assert_int_equal(api_addr_parse("10.0.0.2", false, &a), -EINVAL);
	assert_int_equal(api_addr_parse(NULL, false, &a), -EINVAL);
}

static void test_assign_req(void **state)
{
	struct api_assign_req r;
	struct meshlet_err e = {0};
	json_t *b;

	b = parse("{\"service\": \"orders\", \"address\": \"[fd00:0::7]:15006\"}");
	assert_int_equal(api_parse_assign_req(b, &r, &e), 0);
	assert_string_equal(r.service, "orders");
	assert_string_equal(r.address, "[fd00::7]:15006");
	json_decref(b);

	b = parse("{\"service\": \"Orders\", \"address\": \"10.0.0.1:1\"}");
	assert_int_equal(api_parse_assign_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "service");
	json_decref(b);

	b = parse("{\"service\": \"orders\", \"address\": \"10.0.0.1\"}");
	assert_int_equal(api_parse_assign_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "address");
	json_decref(b);

	b = parse("{\"service\": \"orders\"}");
	assert_int_equal(api_parse_assign_req(b, &r, &e), -EINVAL);
	json_decref(b);

	b = parse("{\"service\": \"orders\", \"address\": \"10.0.0.1:1\", \"x\": 1}");
	assert_int_equal(api_parse_assign_req(b, &r, &e), -EINVAL);
	json_decref(b);
}

static void test_endpoint_req(void **state)
{
	struct api_endpoint_req r;
	struct meshlet_err e = {0};
	json_t *b;

	b = parse("{\"address\": \"10.0.0.2:15006\", \"ports\": [8080, 9090]}");
	assert_int_equal(api_parse_endpoint_req(b, &r, &e), 0);
	assert_int_equal(r.n_ports, 2);
	assert_int_equal(r.ports[1], 9090);
	json_decref(b);

	/* the address is canonicalised (it is the registry's key) */
	b = parse("{\"address\": \"[fd00:0:0::2]:15006\"}");
	assert_int_equal(api_parse_endpoint_req(b, &r, &e), 0);
	assert_string_equal(r.address, "[fd00::2]:15006");
	json_decref(b);

	b = parse("{\"address\": \"10.0.0.2:15006\", \"ports\": [8080, 0]}");
	assert_int_equal(api_parse_endpoint_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "ports[1]");
	json_decref(b);

	b = parse("{\"address\": \"nowhere\"}");
	assert_int_equal(api_parse_endpoint_req(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "address");
	json_decref(b);
}

static void test_rotate_revoke_ca(void **state)
{
	struct api_rotate_req r;
	struct api_revoke_req v;
	struct api_ca_rotate_req c;
	struct meshlet_err e = {0};
	json_t *b;

	b = parse("{\"service\": \"orders\"}");
	assert_int_equal(api_parse_rotate_req(b, &r, &e), 0);
	assert_string_equal(r.service, "orders");
	json_decref(b);
	b = parse("{\"all\": true}");
	assert_int_equal(api_parse_rotate_req(b, &r, &e), 0);
	assert_true(r.all);
	json_decref(b);
	b = parse("{}");
	assert_int_equal(api_parse_rotate_req(b, &r, &e), -EINVAL);
	json_decref(b);
	b = parse("{\"all\": true, \"service\": \"x\"}");
	assert_int_equal(api_parse_rotate_req(b, &r, &e), -EINVAL);
	json_decref(b);
	b = parse("{\"all\": false}");
	assert_int_equal(api_parse_rotate_req(b, &r, &e), -EINVAL);
	json_decref(b);

	b = parse("{\"serial\": \"00:AB:cd\"}");
	assert_int_equal(api_parse_revoke_req(b, &v, &e), 0);
	assert_string_equal(v.serial, "abcd");
	json_decref(b);
	b = parse("{\"serial\": \"xyz\"}");
	assert_int_equal(api_parse_revoke_req(b, &v, &e), -EINVAL);
	assert_string_equal(e.path, "serial");
	json_decref(b);

	b = parse("{}");
	assert_int_equal(api_parse_ca_rotate_req(b, &c, &e), 0);
	assert_false(c.force);
	json_decref(b);
	b = parse("{\"force\": true}");
	assert_int_equal(api_parse_ca_rotate_req(b, &c, &e), 0);
	assert_true(c.force);
	json_decref(b);
	b = parse("{\"force\": 1}");
	assert_int_equal(api_parse_ca_rotate_req(b, &c, &e), -EINVAL);
	assert_string_equal(e.path, "force");
	json_decref(b);
}

static void test_error_body(void **state)
{
	struct api_error ae = {0};
	json_t *b;

	assert_int_equal(api_fail(&ae, 412, "If-Match", "version %d", 3), -412);
	b = api_error_body(&ae);
	assert_non_null(b);
	assert_string_equal(json_string_value(json_object_get(json_object_get(b, "error"), "code")),
	                    "precondition_failed");
	assert_string_equal(json_string_value(json_object_get(json_object_get(b, "error"), "path")),
	                    "If-Match");
	assert_string_equal(json_string_value(json_object_get(json_object_get(b, "error"),
	                                                      "message")), "version 3");
	json_decref(b);
	/* A specific code replaces the status's, and a later api_fail() drops it. */
	assert_int_equal(api_fail_code(&ae, 403, "renewal_limit", "", "cap %d", 3), -403);
	b = api_error_body(&ae);
	assert_string_equal(json_string_value(json_object_get(json_object_get(b, "error"), "code")),
	                    "renewal_limit");
	assert_string_equal(json_string_value(json_object_get(json_object_get(b, "error"),
	                                                      "message")), "cap 3");
	json_decref(b);
	api_fail(&ae, 409, "", "plain");
	b = api_error_body(&ae);
	assert_string_equal(json_string_value(json_object_get(json_object_get(b, "error"), "code")),
	                    "conflict");
	json_decref(b);
	assert_string_equal(api_status_code(400), "bad_request");
	assert_string_equal(api_status_code(401), "unauthorized");
	assert_string_equal(api_status_code(403), "forbidden");
	assert_string_equal(api_status_code(404), "not_found");
	assert_string_equal(api_status_code(409), "conflict");
	assert_string_equal(api_status_code(413), "payload_too_large");
	assert_string_equal(api_status_code(429), "too_many_requests");
	assert_string_equal(api_status_code(500), "internal");
}

/* ---- answers ---- */

static void test_error_resp(void **state)
{
	struct api_error ae = {0};
	struct api_error_resp r;
	json_t *b;

	/* What control sends is what a client reads back. */
	api_fail(&ae, 400, "rules[1].ports[0]", "must be 1..65535");
	b = api_error_body(&ae);
	api_parse_error_resp(b, &r);
	assert_string_equal(r.code, "bad_request");
	assert_string_equal(r.message, "must be 1..65535");
	assert_string_equal(r.path, "rules[1].ports[0]");
	json_decref(b);
	/* Anything else comes back empty, never a crash. */
	api_parse_error_resp(NULL, &r);
	assert_null(r.code);
	assert_null(r.message);
	b = parse("[1]");
	api_parse_error_resp(b, &r);
	assert_null(r.message);
	json_decref(b);
	b = parse("{\"error\": \"plain\"}");
	api_parse_error_resp(b, &r);
	assert_null(r.message);
	json_decref(b);
	b = parse("{\"error\": {\"code\": 5, \"message\": \"m\", \"path\": null}}");
	api_parse_error_resp(b, &r);
	assert_null(r.code);
	assert_string_equal(r.message, "m");
	assert_null(r.path);
	json_decref(b);
}

static void test_pem_join_and_serials(void **state)
{
	json_t *a = parse("[\"A\\n\", \"B\"]");
	char *s = api_pem_join(a);

	assert_string_equal(s, "A\nB\n");
	free(s);
	json_decref(a);
	a = parse("[]");
	assert_null(api_pem_join(a));
	json_decref(a);
	a = parse("[\"A\", 1]");
	assert_null(api_pem_join(a));
	json_decref(a);
	a = parse("[\"A\", \"\"]");
	assert_null(api_pem_join(a));
	json_decref(a);
	assert_null(api_pem_join(NULL));

	a = parse("[\"0a\", \"FF:01\", \"0\"]");
	assert_true(api_valid_serial_list(a));
	json_decref(a);
	a = parse("[]");
	assert_true(api_valid_serial_list(a));
	json_decref(a);
	a = parse("[\"xyz\"]");
	assert_false(api_valid_serial_list(a));
	json_decref(a);
	a = parse("[\"112233445566778899aabbccddeeff00112233445\"]");   /* 41 digits */
	assert_false(api_valid_serial_list(a));
	json_decref(a);
	a = parse("{\"0a\": 1}");
	assert_false(api_valid_serial_list(a));
	json_decref(a);
}

static void test_svid_resp(void **state)
{
	struct meshlet_err e = {0};
	struct api_svid_resp r;
	json_t *b = parse("{\"cert_chain\": \"PEM\", \"serial\": \"1a\", \"expires_at\": \"x\","
	                  " \"trust_domain\": \"mesh.local\", \"bundle\": [\"R\"],"
	                  " \"bundle_version\": 3, \"later\": true}");

	assert_int_equal(api_parse_svid_resp(b, &r, &e), 0);
	assert_string_equal(r.cert_chain, "PEM");
	assert_string_equal(r.trust_domain, "mesh.local");
	assert_int_equal(r.bundle_version, 3);
	assert_int_equal(json_array_size(r.bundle), 1);
	json_decref(b);
	b = parse("{\"cert_chain\": \"PEM\", \"trust_domain\": \"t\", \"bundle\": [],"
	          " \"bundle_version\": 3}");
	assert_int_equal(api_parse_svid_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "bundle");
	json_decref(b);
	b = parse("{\"cert_chain\": 7, \"trust_domain\": \"t\", \"bundle\": [\"R\"],"
	          " \"bundle_version\": 3}");
	assert_int_equal(api_parse_svid_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "cert_chain");
	json_decref(b);
	b = parse("{\"cert_chain\": \"P\", \"trust_domain\": \"t\", \"bundle\": [\"R\"],"
	          " \"bundle_version\": -1}");
	assert_int_equal(api_parse_svid_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "bundle_version");
	json_decref(b);
	b = parse("{\"cert_chain\": \"P\", \"bundle\": [\"R\"], \"bundle_version\": 1}");
	assert_int_equal(api_parse_svid_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "trust_domain");
	json_decref(b);
	b = parse("[]");
	assert_int_equal(api_parse_svid_resp(b, &r, &e), -EINVAL);
	json_decref(b);
	assert_int_equal(api_parse_svid_resp(NULL, &r, &e), -EINVAL);
}

static void test_bundle_resp(void **state)
{
	struct meshlet_err e = {0};
	struct api_bundle_resp r;
	json_t *b = parse("{\"trust_domain\": \"mesh.local\", \"roots\": [\"R1\", \"R2\"],"
	                  " \"revoked\": [\"0a\"], \"version\": 9}");

	assert_int_equal(api_parse_bundle_resp(b, &r, &e), 0);
	assert_int_equal(r.version, 9);
	assert_int_equal(json_array_size(r.roots), 2);
	assert_int_equal(json_array_size(r.revoked), 1);
	json_decref(b);
	b = parse("{\"trust_domain\": \"t\", \"roots\": [\"R\"], \"revoked\": [\"zz\"],"
	          " \"version\": 9}");
	assert_int_equal(api_parse_bundle_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "revoked");
	json_decref(b);
	b = parse("{\"trust_domain\": \"t\", \"roots\": \"R\", \"revoked\": [], \"version\": 9}");
	assert_int_equal(api_parse_bundle_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "roots");
	json_decref(b);
	b = parse("{\"trust_domain\": \"t\", \"roots\": [\"R\"], \"revoked\": [], \"version\": 1.5}");
	assert_int_equal(api_parse_bundle_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "version");
	json_decref(b);
}

static void test_config_resp(void **state)
{
	struct meshlet_err e = {0};
	struct api_config_resp r;
	json_t *b = parse("{\"version\": 4, \"policy\": {\"service\": \"o\"}, \"policy_version\": 2,"
	                  " \"bundle_version\": 1, \"cert_generation\": 0,"
	                  " \"endpoints\": {\"pay\": []}}");

	assert_int_equal(api_parse_config_resp(b, &r, &e), 0);
	assert_int_equal(r.version, 4);
	assert_int_equal(r.policy_version, 2);
	assert_int_equal(r.bundle_version, 1);
	assert_int_equal(r.cert_generation, 0);
	assert_true(json_is_object(r.policy));
	assert_true(json_is_object(r.endpoints));
	json_decref(b);
	/* No policy yet: null is an answer too. */
	b = parse("{\"version\": 0, \"policy\": null, \"policy_version\": 0,"
	          " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": {}}");
	assert_int_equal(api_parse_config_resp(b, &r, &e), 0);
	assert_true(json_is_null(r.policy));
	json_decref(b);
	b = parse("{\"version\": 0, \"policy_version\": 0,"
	          " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": {}}");
	assert_int_equal(api_parse_config_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "policy");
	json_decref(b);
	b = parse("{\"version\": 0, \"policy\": [], \"policy_version\": 0,"
	          " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": {}}");
	assert_int_equal(api_parse_config_resp(b, &r, &e), -EINVAL);
	json_decref(b);
	b = parse("{\"version\": 0, \"policy\": null, \"policy_version\": 0,"
	          " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": []}");
	assert_int_equal(api_parse_config_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "endpoints");
	json_decref(b);
	b = parse("{\"version\": \"4\", \"policy\": null, \"policy_version\": 0,"
	          " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": {}}");
	assert_int_equal(api_parse_config_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "version");
	json_decref(b);
}

/* The config answer's traffic documents: absent (older control) is none,
 * anything but an object is refused; an entry is GET /v1/traffic/{svc}'s
 * shape, both ends made by this module. */
static void test_config_resp_traffic(void **state)
{
	struct meshlet_err e = {0};
	struct api_config_resp r;
	struct api_traffic_resp tr;
	json_t *doc = parse("{\"service\": \"pay\"}");
	json_t *entry = api_traffic_entry(doc, 7);
	json_t *b = parse("{\"version\": 0, \"policy\": null, \"policy_version\": 0,"
	                  " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": {}}");

	(void)state;
	assert_int_equal(api_parse_config_resp(b, &r, &e), 0);
	assert_null(r.traffic);
	json_object_set_new(b, "traffic", json_pack("{s:O}", "pay", entry));
	assert_int_equal(api_parse_config_resp(b, &r, &e), 0);
	assert_int_equal(api_parse_traffic_resp(json_object_get(r.traffic, "pay"), &tr, &e), 0);
	assert_int_equal(tr.version, 7);
	assert_true(json_equal(tr.traffic, doc));
	json_object_set_new(b, "traffic", json_array());
	assert_int_equal(api_parse_config_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "traffic");
	json_decref(b);
	b = parse("{\"version\": 1, \"traffic\": []}");
	assert_int_equal(api_parse_traffic_resp(b, &tr, &e), -EINVAL);
	assert_string_equal(e.path, "traffic");
	json_decref(b);
	b = parse("{\"traffic\": {}}");
	assert_int_equal(api_parse_traffic_resp(b, &tr, &e), -EINVAL);
	assert_string_equal(e.path, "version");
	json_decref(b);
	json_decref(entry);
	json_decref(doc);
}

/* /v1/check's traffic part: what selects the request, and nothing when
 * there is no document. */
static void test_check_add_traffic(void **state)
{
	struct meshlet_err e = {0};
	json_t *doc = parse("{\"service\": \"orders\", \"rate_limits\": ["
		"{\"name\": \"fe\", \"requests_per_second\": 5, \"from\": [\"spiffe://mesh.local/svc/fe\"]},"
		"{\"name\": \"all\", \"requests_per_second\": 1.5, \"per\": \"rule\"}],"
		" \"faults\": [{\"name\": \"slow\", \"percent\": 1, \"delay_ms\": 9, \"paths\": [\"/a\"]},"
		"{\"name\": \"boom\", \"percent\": 2.5, \"abort_status\": 503}]}");
	struct traffic *t = traffic_parse(doc, &e);
	struct policy_request req = {.peer_id = "spiffe://mesh.local/svc/ops", .port = 80,
	                             .http = true, .method = "GET", .path = "/b"};
	json_t *out = json_object(), *want;

	(void)state;
	assert_non_null(t);
	assert_int_equal(api_check_add_traffic(out, t, 3, &req), 0);
	want = parse("{\"traffic_version\": 3, \"rate_limits\": [{\"name\": \"all\","
	             " \"requests_per_second\": 1.5, \"burst\": 2, \"per\": \"rule\"}],"
	             " \"faults\": [{\"name\": \"boom\", \"percent\": 2.5, \"abort_status\": 503}]}");
	assert_true(json_equal(out, want));
	json_decref(want);
	json_decref(out);
	out = json_object();
	assert_int_equal(api_check_add_traffic(out, NULL, 0, &req), 0);
	want = parse("{\"traffic_version\": 0, \"rate_limits\": [], \"faults\": []}");
	assert_true(json_equal(out, want));
	json_decref(want);
	json_decref(out);
	traffic_free(t);
	json_decref(doc);
}

static void test_endpoint_resp(void **state)
{
	struct meshlet_err e = {0};
	struct api_endpoint ep;
	json_t *b = parse("{\"address\": \"10.0.0.1:15006\", \"ports\": [8080, 9090]}");

	assert_int_equal(api_parse_endpoint(b, &ep, &e), 0);
	assert_string_equal(ep.address, "10.0.0.1:15006");
	assert_int_equal(ep.n_ports, 2);
	assert_int_equal(ep.ports[1], 9090);
	json_decref(b);
	b = json_string("10.0.0.1:15006");   /* a cache of an older version */
	assert_int_equal(api_parse_endpoint(b, &ep, &e), 0);
	assert_int_equal(ep.n_ports, 0);
	json_decref(b);
	b = parse("{\"address\": \"a:1\", \"ports\": [0]}");
	assert_int_equal(api_parse_endpoint(b, &ep, &e), -EINVAL);
	json_decref(b);
	b = parse("{\"address\": \"a:1\", \"ports\": [65536]}");
	assert_int_equal(api_parse_endpoint(b, &ep, &e), -EINVAL);
	json_decref(b);
	b = parse("{\"address\": \"a:1\", \"ports\": 80}");
	assert_int_equal(api_parse_endpoint(b, &ep, &e), -EINVAL);
	json_decref(b);
	b = parse("{\"ports\": [80]}");
	assert_int_equal(api_parse_endpoint(b, &ep, &e), -EINVAL);
	json_decref(b);
	b = json_integer(42);
	assert_int_equal(api_parse_endpoint(b, &ep, &e), -EINVAL);
	json_decref(b);
}

static void test_token_resp(void **state)
{
	unsigned char secret[API_TOKEN_SECRET_BYTES] = {1, 2, 3};
	struct meshlet_err e = {0};
	struct api_token_resp r;
	char tok[API_TOKEN_MAX];
	json_t *b;

	assert_int_equal(api_token_format(tok, sizeof(tok), "orders", pin, secret), 0);
	b = json_pack("{s:s, s:s, s:s}", "token", tok, "service", "orders",
	              "expires_at", "2026-12-03T12:00:00Z");
	assert_int_equal(api_parse_token_resp(b, &r, &e), 0);
	assert_string_equal(r.token, tok);
	json_decref(b);
	b = json_pack("{s:s, s:s, s:s}", "token", tok, "service", "payments",
	              "expires_at", "2026-12-03T12:00:00Z");
	assert_int_equal(api_parse_token_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "token");
	json_decref(b);
	b = json_pack("{s:s, s:s, s:s}", "token", "mlt1.orders.x.y", "service", "orders",
	              "expires_at", "t");
	assert_int_equal(api_parse_token_resp(b, &r, &e), -EINVAL);
	json_decref(b);
	b = json_pack("{s:s, s:s}", "token", tok, "service", "orders");
	assert_int_equal(api_parse_token_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "expires_at");
	json_decref(b);
}

static void test_ca_resp(void **state)
{
	struct meshlet_err e = {0};
	struct api_ca_resp r;
	json_t *b = parse("{\"roots\": [], \"signing\": 0, \"phase\": \"prepared\", \"gate\":"
	                  " {\"next_phase\": \"switched\", \"open\": false,"
	                  " \"waiting_for\": \"1 proxy\"}}");

	assert_int_equal(api_parse_ca_resp(b, &r, &e), 0);
	assert_string_equal(r.phase, "prepared");
	assert_true(r.has_gate);
	assert_false(r.gate_open);
	assert_string_equal(r.next_phase, "switched");
	assert_string_equal(r.waiting_for, "1 proxy");
	json_decref(b);
	b = parse("{\"phase\": \"stable\"}");  /* an older control: no gate */
	assert_int_equal(api_parse_ca_resp(b, &r, &e), 0);
	assert_false(r.has_gate);
	json_decref(b);
	b = parse("{\"phase\": 1}");
	assert_int_equal(api_parse_ca_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "phase");
	json_decref(b);
	b = parse("{\"phase\": \"stable\", \"gate\": {\"open\": \"yes\"}}");
	assert_int_equal(api_parse_ca_resp(b, &r, &e), -EINVAL);
	assert_string_equal(e.path, "gate.open");
	json_decref(b);
	b = parse("{\"phase\": \"stable\", \"gate\": []}");
	assert_int_equal(api_parse_ca_resp(b, &r, &e), -EINVAL);
	json_decref(b);
}

/* The proxies' counter summaries: a good one parses; each refusal names its field. */
static void test_stats_summary(void **state)
{
	static const struct { const char *text, *path; } bad[] = {
		{ "{\"interval_s\":5,\"callers\":[],\"denied\":[],\"recent\":[],\"x\":1}", "x" },
		{ "{\"interval_s\":0,\"callers\":[],\"denied\":[],\"recent\":[]}", "interval_s" },
		{ "{\"interval_s\":5,\"callers\":[{\"from\":\"web\",\"requests\":-1,"
		  "\"denied\":0,\"errors_5xx\":0}],\"denied\":[],\"recent\":[]}", "callers[0].requests" },
		{ "{\"interval_s\":5,\"callers\":[{\"from\":\"web\",\"requests\":1,"
		  "\"denied\":2,\"errors_5xx\":0}],\"denied\":[],\"recent\":[]}", "callers[0]" },
		{ "{\"interval_s\":5,\"callers\":[],\"denied\":[{\"from\":\"web\","
		  "\"rule\":\"a b\",\"n\":1}],\"recent\":[]}", "denied[0].rule" },
		{ "{\"interval_s\":5,\"callers\":[],\"denied\":[],\"recent\":[{\"at\":1,"
		  "\"from\":\"web\",\"rule\":\"r\",\"method\":\"GET\",\"path\":\"/\\n\"}]}",
		  "recent[0].path" },
		{ "{\"interval_s\":5,\"denied\":[],\"recent\":[]}", "callers" },
	};
	struct api_stats_summary s;
	struct meshlet_err e = { { 0 }, { 0 } };
	const char *good = "{\"interval_s\":5,\"callers\":[{\"from\":\"(other)\",\"requests\":3,"
	                   "\"denied\":1,\"errors_5xx\":1,\"p50_ms\":1,\"p99_ms\":2.5}],"
	                   "\"denied\":[{\"from\":\"web\",\"rule\":\"(other)\",\"n\":1}],\"recent\":[]}";

	(void)state;
	assert_int_equal(api_stats_parse(good, &s, &e), 0);
	assert_int_equal(s.n_callers, 1);
	assert_true(s.callers[0].has_latency && s.callers[0].p99_ms == 2.5);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memset(&e, 0, sizeof(e));
		assert_int_equal(api_stats_parse(bad[i].text, &s, &e), -EINVAL);
		assert_string_equal(e.path, bad[i].path);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_route_match),
		cmocka_unit_test(test_duration),
		cmocka_unit_test(test_token_roundtrip),
		cmocka_unit_test(test_token_parse_refusals),
		cmocka_unit_test(test_if_match),
		cmocka_unit_test(test_config_query),
		cmocka_unit_test(test_config_query_upstreams),
		cmocka_unit_test(test_config_query_degraded),
		cmocka_unit_test(test_addr_parse_and_format),
		cmocka_unit_test(test_assign_req),
		cmocka_unit_test(test_token_req),
		cmocka_unit_test(test_svid_req),
		cmocka_unit_test(test_check_req),
		cmocka_unit_test(test_address),
		cmocka_unit_test(test_endpoint_req),
		cmocka_unit_test(test_rotate_revoke_ca),
		cmocka_unit_test(test_error_body),
		cmocka_unit_test(test_error_resp),
		cmocka_unit_test(test_pem_join_and_serials),
		cmocka_unit_test(test_svid_resp),
		cmocka_unit_test(test_bundle_resp),
		cmocka_unit_test(test_config_resp),
		cmocka_unit_test(test_config_resp_traffic),
		cmocka_unit_test(test_check_add_traffic),
		cmocka_unit_test(test_endpoint_resp),
		cmocka_unit_test(test_token_resp),
		cmocka_unit_test(test_ca_resp),
		cmocka_unit_test(test_stats_summary),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
