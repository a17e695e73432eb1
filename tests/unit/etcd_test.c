/*
 * Unit tests for lib/etcd.c: base64 and etcd's JSON fields, endpoint
 * lists, and calls against a real etcd (etcd_fixture): failover past a
 * dead endpoint, the deadline against one that accepts and never answers,
 * and a watch stream.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <cmocka.h>

#include "meshlet/etcd.h"
#include "etcd_fixture.h"

static struct etcd_fixture fx;

static void test_b64_round_trip(void **state)
{
	static const char *const plain[] = { "", "f", "fo", "foo", "foob", "fooba", "foobar" };
	static const char *const coded[] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=",
	                                     "Zm9vYmFy" };
	char *out;
	size_t n;

	(void)state;
	for (size_t i = 0; i < sizeof(plain) / sizeof(plain[0]); i++) {
		char *e = etcd_b64(plain[i], strlen(plain[i]));

		assert_string_equal(e, coded[i]);
		assert_int_equal(etcd_unb64(e, &out, &n), 0);
		assert_int_equal(n, strlen(plain[i]));
		assert_memory_equal(out, plain[i], n);
		free(out);
		free(e);
	}
	/* bytes, not text */
	out = etcd_b64("\0\xff\x80", 3);
	assert_string_equal(out, "AP+A");
	free(out);
}

static void test_b64_hostile(void **state)
{
	static const char *const bad[] = { "Zg=", "Zg", "Z===", "Zm9v!A==", "Zg==Zg==", "=AAA",
	                                   "Zm=v", "Zm9 " };
	char *out = (char *)"untouched";
	size_t n = 7;

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		assert_int_equal(etcd_unb64(bad[i], &out, &n), -EINVAL);
		assert_null(out);
		assert_int_equal(n, 0);
	}
}

static void test_int_fields(void **state)
{
	json_t *o = json_pack("{s:s, s:I, s:s, s:s, s:n}", "a", "42", "b", (json_int_t)7, "c", "x1",
	                      "d", "", "e");

	(void)state;
	assert_int_equal(etcd_int(o, "a"), 42);
	assert_int_equal(etcd_int(o, "b"), 7);
	assert_int_equal(etcd_int(o, "absent"), 0);   /* proto3 leaves zero out */
	assert_int_equal(etcd_int(o, "c"), -1);
	assert_int_equal(etcd_int(o, "d"), -1);
	assert_int_equal(etcd_int(o, "e"), -1);
	json_decref(o);
}

static void test_prefix_end(void **state)
{
	char *e = etcd_prefix_end_b64("/meshlet/", 9), *d;
	size_t n;

	(void)state;
	assert_int_equal(etcd_unb64(e, &d, &n), 0);
	assert_int_equal(n, 9);
	assert_memory_equal(d, "/meshlet0", 9);
	free(d);
	free(e);
	e = etcd_prefix_end_b64("a\xff", 2);
	assert_string_equal(e, "Yg==");   /* "b": the 0xff dropped, "a" + 1 */
	free(e);
	e = etcd_prefix_end_b64("", 0);
	assert_string_equal(e, "AA==");   /* "\0": every key */
	free(e);
}

static void test_bad_endpoints(void **state)
{
	static const char *const bad[] = { "", "127.0.0.1:2379", "ftp://a:1", "http://",
	                                   "http://a:0", "http://a:65536", "http://a:x",
	                                   "http://u@a:1", "http://a:1/path", "http://[::1",
	                                   "http://a:1,,http://b:2" };
	struct meshlet_err err = {0};
	struct etcd *c = NULL;

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct etcd_opts o = { .endpoints = bad[i], .timeout_ms = 100 };

		assert_int_equal(etcd_new(&c, &o, &err), -EINVAL);
		assert_null(c);
		assert_true(err.message[0]);
	}
	{
		struct etcd_opts o = { .endpoints = "https://a:1", .cacert = "/nonexistent.pem" };
		assert_int_equal(etcd_new(&c, &o, &err), -EINVAL);
		assert_non_null(strstr(err.message, "--etcd-cacert"));
	}
}

/* A port nothing listens on. */
static int dead_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	port = ntohs(a.sin_port);
	close(fd);
	return port;
}

static json_t *range_all(void)
{
	return json_pack("{s:s, s:s, s:b}", "key", "AA==", "range_end", "AA==", "count_only", 1);
}

static void test_failover_past_dead_endpoint(void **state)
{
	char eps[160];
	struct etcd_opts o = { .endpoints = eps, .timeout_ms = 3000 };
	struct meshlet_err err = {0};
	struct etcd *c = NULL;
	json_t *resp = NULL, *req = range_all();

	(void)state;
	snprintf(eps, sizeof(eps), "http://127.0.0.1:%d,%s", dead_port(), fx.url);
	assert_int_equal(etcd_new(&c, &o, &err), 0);
	assert_int_equal(etcd_call(c, "/v3/kv/range", req, &resp, true), 0);
	assert_true(etcd_int(json_object_get(resp, "header"), "revision") >= 1);
	assert_string_equal(etcd_endpoint(c), fx.url);   /* remembered for the next call */
	json_decref(resp);
	/* a path etcd does not know: its refusal, not a retry */
	assert_int_equal(etcd_call(c, "/v3/nope", req, &resp, true) < 0, 1);
	json_decref(req);
	etcd_free(c);
}

/* Calls share one kept-alive connection; a restarted etcd is reconnected
 * to without an error. */
static void test_calls_share_a_connection(void **state)
{
	struct etcd_opts o = { .endpoints = fx.url, .timeout_ms = 3000 };
	struct meshlet_err err = {0};
	struct etcd *c = NULL;
	json_t *resp = NULL, *req = range_all();

	(void)state;
	assert_int_equal(etcd_new(&c, &o, &err), 0);
	for (int i = 0; i < 50; i++) {
		assert_int_equal(etcd_call(c, "/v3/kv/range", req, &resp, i % 2 == 0), 0);
		json_decref(resp);
	}
	assert_int_equal(etcd_connects(c), 1);
	etcd_fixture_restart(&fx);
	assert_int_equal(etcd_call(c, "/v3/kv/range", req, &resp, false), 0);
	json_decref(resp);
	assert_int_equal(etcd_connects(c), 2);
	json_decref(req);
	etcd_free(c);
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* An endpoint that accepts connections and never answers: the call gives
 * up at its deadline with -EAGAIN. */
static void test_deadline_against_silent_endpoint(void **state)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char eps[64];
	struct etcd_opts o = { .endpoints = eps, .timeout_ms = 400 };
	struct meshlet_err err = {0};
	struct etcd *c = NULL;
	json_t *resp = NULL, *req = range_all();
	int64_t t0;

	(void)state;
	assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(fd, 8), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	snprintf(eps, sizeof(eps), "http://127.0.0.1:%d", ntohs(a.sin_port));
	assert_int_equal(etcd_new(&c, &o, &err), 0);
	t0 = now_ms();
	assert_int_equal(etcd_call(c, "/v3/kv/range", req, &resp, true), -EAGAIN);
	assert_true(now_ms() - t0 >= 350 && now_ms() - t0 < 2000);
	assert_non_null(strstr(etcd_strerror(c), "timed out"));
	json_decref(req);
	etcd_free(c);
	close(fd);
}

struct seen {
	int created, events;
};

static int on_watch(void *arg, json_t *msg)
{
	struct seen *s = arg;
	json_t *res = json_object_get(msg, "result");

	if (json_is_true(json_object_get(res, "created")))
		s->created++;
	s->events += (int)json_array_size(json_object_get(res, "events"));
	return s->events > 0 ? 1 : 0;
}

/* A watch stream sees a put made after it opened. */
static void test_watch_stream(void **state)
{
	struct etcd_opts o = { .endpoints = fx.url, .timeout_ms = 3000 };
	struct meshlet_err err = {0};
	struct etcd *c = NULL, *w = NULL;
	struct seen seen = {0};
	json_t *resp = NULL, *put, *watch;
	char *k = etcd_b64("/w/key", 6), *v = etcd_b64("v", 1);
	int64_t rev;

	(void)state;
	assert_int_equal(etcd_new(&c, &o, &err), 0);
	assert_int_equal(etcd_new(&w, &o, &err), 0);
	put = json_pack("{s:s, s:s}", "key", k, "value", v);
	assert_int_equal(etcd_call(c, "/v3/kv/put", put, &resp, false), 0);
	rev = etcd_int(json_object_get(resp, "header"), "revision");
	json_decref(resp);
	/* from the revision of that put: the stream has one event to give */
	watch = json_pack("{s:{s:s, s:s}}", "create_request", "key", k, "start_revision", "0");
	json_object_set_new(json_object_get(watch, "create_request"), "start_revision",
	                    json_integer(rev));
	assert_int_equal(etcd_stream(w, "/v3/watch", watch, -1, on_watch, &seen), 1);
	assert_int_equal(seen.created, 1);
	assert_int_equal(seen.events, 1);
	json_decref(put);
	json_decref(watch);
	free(k);
	free(v);
	etcd_free(c);
	etcd_free(w);
}

static int group_setup(void **state)
{
	(void)state;
	return etcd_fixture_start(&fx);
}

static int group_teardown(void **state)
{
	(void)state;
	etcd_fixture_stop(&fx);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_b64_round_trip),
		cmocka_unit_test(test_b64_hostile),
		cmocka_unit_test(test_int_fields),
		cmocka_unit_test(test_prefix_end),
		cmocka_unit_test(test_bad_endpoints),
		cmocka_unit_test(test_failover_past_dead_endpoint),
		cmocka_unit_test(test_deadline_against_silent_endpoint),
		cmocka_unit_test(test_watch_stream),
		cmocka_unit_test(test_calls_share_a_connection),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
