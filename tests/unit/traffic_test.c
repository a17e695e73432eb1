/* Unit tests for lib/traffic.c: the document (fields, defaults, every
 * refusal with its JSON path), selection like policy rules, and the pure
 * pieces on simulated time with a seeded generator: token-bucket
 * precision, fault percentages against a 99.9 % binomial interval, the
 * retry budget, backoff, and ejection under its cap. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/traffic.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define SEC 1000000LL

static const char FRONTEND[] = "spiffe://mesh.local/svc/frontend";
static const char OPS[] = "spiffe://mesh.local/svc/ops";

static const char EXAMPLE[] =
	"{\"service\": \"orders\","
	" \"timeouts\": {\"connect_seconds\": 2, \"request_seconds\": 15},"
	" \"retries\": {\"attempts\": 2, \"on\": [\"connect-failure\", \"reset\", \"503\"],"
	"              \"budget_percent\": 20, \"backoff_ms\": 25},"
	" \"outlier\": {\"consecutive_failures\": 5, \"eject_seconds\": 30,"
	"              \"max_ejected_percent\": 50},"
	" \"limits\": {\"max_connections\": 1024, \"max_pending_requests\": 1024},"
	" \"rate_limits\": [{\"name\": \"frontend-rps\", \"from\": [\"spiffe://mesh.local/svc/frontend\"],"
	"                   \"requests_per_second\": 100, \"burst\": 200}],"
	" \"faults\": [{\"name\": \"slow-orders\", \"from\": [\"*\"], \"paths\": [\"/orders/*\"],"
	"              \"percent\": 10, \"delay_ms\": 500},"
	"             {\"name\": \"orders-503\", \"percent\": 5, \"abort_status\": 503}]}";

static struct traffic *parse_text(const char *text, struct meshlet_err *err)
{
	json_t *doc = json_parse_strict(text, strlen(text), MESHLET_JSON_MAX_DEPTH, err);
	struct traffic *t;

	if (!doc)
		fail_msg("bad test JSON: %s", err->message);
	t = traffic_parse(doc, err);
	json_decref(doc);
	return t;
}

static struct traffic *parse_ok(const char *text)
{
	struct meshlet_err err = {{0}, {0}};
	char buf[600];
	struct traffic *t = parse_text(text, &err);

	if (!t)
		fail_msg("refused: %s\n%s", err_str(&err, buf, sizeof(buf)), text);
	return t;
}

/* xorshift64*: a seeded, reproducible uniform generator. */
static uint64_t rng_next(void *arg)
{
	uint64_t *s = arg;

	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 2685821657736338717ULL;
}

static struct policy_request http_req(const char *peer, const char *method, const char *path)
{
	struct policy_request r = {0};

	r.peer_id = peer;
	r.port = 8080;
	r.http = true;
	r.method = method;
	r.path = path;
	return r;
}

/* ---- the document ------------------------------------------------------- */

static void test_example(void **state)
{
	struct traffic *t = parse_ok(EXAMPLE);

	(void)state;
	assert_string_equal(t->service, "orders");
	assert_int_equal(t->connect_ms, 2000);
	assert_int_equal(t->request_ms, 15000);
	assert_int_equal(t->retries.attempts, 2);
	assert_int_equal(t->retries.on, TRAFFIC_ON_CONNECT_FAILURE | TRAFFIC_ON_RESET);
	assert_true(traffic_retry_on_status(&t->retries, 503));
	assert_false(traffic_retry_on_status(&t->retries, 502));
	assert_false(traffic_retry_on_status(&t->retries, 200));
	assert_int_equal(t->retries.budget_percent, 20);
	assert_int_equal(t->retries.backoff_ms, 25);
	assert_int_equal(t->outlier.consecutive_failures, 5);
	assert_int_equal(t->outlier.eject_ms, 30000);
	assert_int_equal(t->outlier.max_ejected_percent, 50);
	assert_int_equal(t->max_connections, 1024);
	assert_int_equal(t->max_pending_requests, 1024);
	assert_int_equal(t->n_rate_limits, 1);
	assert_string_equal(t->rate_limits[0].sel.name, "frontend-rps");
	assert_true(t->rate_limits[0].rps == 100.0);
	assert_int_equal(t->rate_limits[0].burst, 200);
	assert_true(t->rate_limits[0].per_caller);
	assert_int_equal(t->n_faults, 2);
	assert_true(t->faults[0].has_delay);
	assert_int_equal(t->faults[0].delay_ms, 500);
	assert_int_equal(t->faults[0].abort_status, 0);
	assert_false(t->faults[1].has_delay);
	assert_int_equal(t->faults[1].abort_status, 503);
	assert_true(t->faults[1].percent == 5.0);
	traffic_free(t);
}

/* An absent document and an empty one mean the same defaults. */
static void test_defaults(void **state)
{
	struct traffic *t = parse_ok("{\"service\": \"orders\"}");
	struct traffic *d = traffic_default("orders");
	struct traffic *r = parse_ok("{\"service\": \"orders\", \"retries\": {},"
	                             " \"outlier\": {}, \"rate_limits\": [{\"name\": \"r\","
	                             " \"requests_per_second\": 2.5}]}");
	const struct traffic *both[] = {t, d};

	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(both); i++) {
		assert_string_equal(both[i]->service, "orders");
		assert_int_equal(both[i]->connect_ms, 5000);
		assert_int_equal(both[i]->request_ms, 30000);
		assert_int_equal(both[i]->retries.attempts, 0);
		assert_int_equal(both[i]->outlier.consecutive_failures, 0);
		assert_int_equal(both[i]->max_connections, 0);
		assert_int_equal(both[i]->max_pending_requests, 0);
		assert_int_equal(both[i]->n_rate_limits, 0);
		assert_int_equal(both[i]->n_faults, 0);
	}
	/* A section given turns its feature on with its defaults. */
	assert_int_equal(r->retries.attempts, 1);
	assert_int_equal(r->retries.budget_percent, 20);
	assert_true(traffic_retry_on_status(&r->retries, 503));
	assert_int_equal(r->outlier.consecutive_failures, 5);
	assert_int_equal(r->outlier.eject_ms, 30000);
	assert_int_equal(r->outlier.max_ejected_percent, 50);
	assert_int_equal(r->rate_limits[0].burst, 3);  /* one second's worth, rounded up */
	traffic_free(t);
	traffic_free(d);
	traffic_free(r);
}

struct bad_case {
	const char *json;
	const char *want;               /* err_str(): "path: message" starts so */
};

#define D(body) "{\"service\": \"orders\", " body "}"
#define RL(body) D("\"rate_limits\": [{\"name\": \"a\", \"requests_per_second\": 1}, " body "]")
#define FT(body) D("\"faults\": [{\"name\": \"a\", \"percent\": 1, \"delay_ms\": 1}, " body "]")

static const struct bad_case bad_cases[] = {
	{"[]", "must be an object"},
	{"{}", "service: required"},
	{"{\"service\": \"Orders\"}", "service: not a valid service name"},
	{D("\"retires\": {}"), "retires: unknown field"},
	{D("\"timeouts\": []"), "timeouts: must be an object"},
	{D("\"timeouts\": {\"connect_seconds\": -1}"), "timeouts.connect_seconds: must be 0.001..3600"},
	{D("\"timeouts\": {\"request_seconds\": 0}"), "timeouts.request_seconds: must be 0.001..86400"},
	{D("\"timeouts\": {\"request_seconds\": \"15\"}"), "timeouts.request_seconds: must be a number"},
	{D("\"timeouts\": {\"idle_seconds\": 1}"), "timeouts.idle_seconds: unknown field"},
	{D("\"retries\": {\"attempts\": -1}"), "retries.attempts: must be"},
	{D("\"retries\": {\"attempts\": 11}"), "retries.attempts: must be"},
	{D("\"retries\": {\"attempts\": 1.5}"), "retries.attempts: must be an integer"},
	{D("\"retries\": {\"budget_percent\": 101}"), "retries.budget_percent: must be"},
	{D("\"retries\": {\"backoff_ms\": -25}"), "retries.backoff_ms: must be"},
	{D("\"retries\": {\"on\": []}"), "retries.on: must not be empty"},
	{D("\"retries\": {\"on\": [\"503\", \"gateway\"]}"), "retries.on[1]: must be \"connect-failure\""},
	{D("\"retries\": {\"on\": [\"reset\", \"reset\"]}"), "retries.on[1]: \"reset\" given twice"},
	{D("\"retries\": {\"on\": [\"404\"]}"), "retries.on[0]: must be"},
	{D("\"retries\": {\"on\": [503]}"), "retries.on[0]: must be a string"},
	{D("\"outlier\": {\"consecutive_failures\": 0}"), "outlier.consecutive_failures: must be"},
	{D("\"outlier\": {\"eject_seconds\": -30}"), "outlier.eject_seconds: must be 1..3600"},
	{D("\"outlier\": {\"max_ejected_percent\": 150}"), "outlier.max_ejected_percent: must be"},
	{D("\"limits\": {\"max_connections\": 0}"), "limits.max_connections: must be"},
	{D("\"limits\": {\"max_requests\": 5}"), "limits.max_requests: unknown field"},
	{D("\"rate_limits\": {}"), "rate_limits: must be an array"},
	{RL("{\"requests_per_second\": 1}"), "rate_limits[1].name: required"},
	{RL("{\"name\": \"a\", \"requests_per_second\": 1}"), "rate_limits[1].name: duplicate rule name \"a\""},
	{RL("{\"name\": \"b c\", \"requests_per_second\": 1}"), "rate_limits[1].name: must be 1.."},
	{RL("{\"name\": \"b\"}"), "rate_limits[1].requests_per_second: required"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 0}"), "rate_limits[1].requests_per_second: must be"},
	{RL("{\"name\": \"b\", \"requests_per_second\": -5}"), "rate_limits[1].requests_per_second: must be"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"burst\": 0}"), "rate_limits[1].burst: must be"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"burst\": 2.5}"), "rate_limits[1].burst: must be a whole"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"per\": \"ip\"}"), "rate_limits[1].per: must be"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"ports\": [80]}"), "rate_limits[1].ports: unknown field"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"from\": [\"spiffe://mesh.local/svc/orders/\"]}"),
	 "rate_limits[1].from[0]: not a SPIFFE ID"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"from\": [\"frontend\"]}"),
	 "rate_limits[1].from[0]: not a SPIFFE ID"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"paths\": [\"/a/../b\"]}"),
	 "rate_limits[1].paths[0]: must not contain"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"methods\": [\"G T\"]}"),
	 "rate_limits[1].methods[0]: not a valid HTTP method"},
	{RL("{\"name\": \"b\", \"requests_per_second\": 5, \"headers\": {\"x-a\": 1}}"),
	 "rate_limits[1].headers.x-a: must be a string"},
	{FT("{\"name\": \"b\", \"percent\": 101, \"delay_ms\": 5}"), "faults[1].percent: must be 0..100"},
	{FT("{\"name\": \"b\", \"percent\": -1, \"delay_ms\": 5}"), "faults[1].percent: must be 0..100"},
	{FT("{\"name\": \"b\", \"delay_ms\": 5}"), "faults[1].percent: required"},
	{FT("{\"name\": \"b\", \"percent\": 5}"), "faults[1]: a fault needs delay_ms, abort_status or both"},
	{FT("{\"name\": \"b\", \"percent\": 5, \"delay_ms\": -500}"), "faults[1].delay_ms: must be"},
	{FT("{\"name\": \"b\", \"percent\": 5, \"abort_status\": 200}"), "faults[1].abort_status: must be"},
	{FT("{\"name\": \"b\", \"percent\": 5, \"abort_status\": 600}"), "faults[1].abort_status: must be"},
	{FT("{\"name\": \"a\", \"percent\": 5, \"abort_status\": 503}"), "faults[1].name: duplicate rule name \"a\""},
	{FT("{\"name\": \"b\", \"percent\": 5, \"abort_status\": 503, \"status\": 1}"), "faults[1].status: unknown field"},
	{FT("{\"name\": \"b\", \"percent\": 5, \"abort_status\": 503, \"from\": []}"), "faults[1].from: must not be empty"},
};

static void test_bad_documents(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(bad_cases); i++) {
		struct meshlet_err err = {{0}, {0}};
		char buf[600];
		struct traffic *t = parse_text(bad_cases[i].json, &err);

		if (t)
			fail_msg("accepted: %s", bad_cases[i].json);
		err_str(&err, buf, sizeof(buf));
		if (strncmp(buf, bad_cases[i].want, strlen(bad_cases[i].want)) != 0)
			fail_msg("case %zu: got \"%s\", want \"%s...\"", i, buf, bad_cases[i].want);
	}
}

/* Same names in two lists are fine: each list is its own namespace. */
static void test_names_per_list(void **state)
{
	struct traffic *t = parse_ok(D("\"rate_limits\": [{\"name\": \"x\", \"requests_per_second\": 1}],"
	                               " \"faults\": [{\"name\": \"x\", \"percent\": 1, \"delay_ms\": 0}]"));

	(void)state;
	assert_int_equal(t->n_rate_limits, 1);
	assert_int_equal(t->n_faults, 1);
	traffic_free(t);
}

/* traffic_file's shape: one document, or an array of documents for
 * distinct services; an element's error carries its index. */
static void test_sets(void **state)
{
	static const struct bad_case bad_sets[] = {
		{"[{\"service\": \"a\"}, {\"service\": \"b\", \"limits\": {\"max_connections\": 0}}]",
		 "[1].limits.max_connections: must be"},
		{"[{\"service\": \"a\"}, {\"service\": \"a\"}]", "[1].service: a second document"},
		{"[{\"service\": \"a\"}, 5]", "[1]: must be an object"},
		{"5", "must be an object"},
	};
	struct meshlet_err err = {{0}, {0}};
	struct traffic **set;
	size_t n;
	json_t *doc = json_loads("[{\"service\": \"a\"}, {\"service\": \"b\"}]", 0, NULL);

	(void)state;
	assert_int_equal(traffic_parse_set(doc, &set, &n, &err), 0);
	assert_int_equal(n, 2);
	assert_string_equal(set[1]->service, "b");
	traffic_set_free(set, n);
	json_decref(doc);
	doc = json_loads("{\"service\": \"a\"}", 0, NULL);
	assert_int_equal(traffic_parse_set(doc, &set, &n, &err), 0);
	assert_int_equal(n, 1);
	traffic_set_free(set, n);
	json_decref(doc);
	for (size_t i = 0; i < ARRAY_LEN(bad_sets); i++) {
		char buf[600];

		doc = json_loads(bad_sets[i].json, JSON_DECODE_ANY, NULL);
		assert_non_null(doc);
		assert_int_equal(traffic_parse_set(doc, &set, &n, &err), -EINVAL);
		assert_null(set);
		err_str(&err, buf, sizeof(buf));
		if (strncmp(buf, bad_sets[i].want, strlen(bad_sets[i].want)) != 0)
			fail_msg("set %zu: got \"%s\", want \"%s...\"", i, buf, bad_sets[i].want);
		json_decref(doc);
	}
}

/* ---- selection ---------------------------------------------------------- */

static const char *tenant_header(const void *ctx, const char *lname)
{
	(void)ctx;
	return strcmp(lname, "x-tenant") == 0 ? "acme" : NULL;
}

static void test_selection(void **state)
{
	struct traffic *t = parse_ok(D(
		"\"faults\": [{\"name\": \"f\", \"from\": [\"spiffe://mesh.local/svc/frontend\"],"
		"  \"paths\": [\"/orders/*\"], \"methods\": [\"GET\"], \"headers\": {\"X-Tenant\": \"acme\"},"
		"  \"percent\": 100, \"abort_status\": 503},"
		" {\"name\": \"any\", \"percent\": 100, \"abort_status\": 500}]"));
	struct policy_request r = http_req(FRONTEND, "GET", "/orders/1");
	struct policy_request tcp = {0};

	(void)state;
	r.header = tenant_header;
	assert_true(traffic_fault_selects(&t->faults[0], &r));
	r.peer_id = OPS;
	assert_false(traffic_fault_selects(&t->faults[0], &r));
	r.peer_id = FRONTEND;
	r.method = "POST";
	assert_false(traffic_fault_selects(&t->faults[0], &r));
	r.method = "GET";
	r.path = "/ordersx";
	assert_false(traffic_fault_selects(&t->faults[0], &r));
	r.path = "/orders/1";
	r.header = NULL;
	assert_false(traffic_fault_selects(&t->faults[0], &r));
	/* A tcp connection: a rule naming HTTP fields never selects it, one
	 * without does. */
	tcp.peer_id = FRONTEND;
	tcp.port = 8080;
	assert_false(traffic_fault_selects(&t->faults[0], &tcp));
	assert_true(traffic_fault_selects(&t->faults[1], &tcp));
	/* Nobody authenticated is no one, even to a rule without from. */
	tcp.peer_id = NULL;
	assert_true(traffic_fault_selects(&t->faults[1], &tcp));
	traffic_free(t);
}

/* ---- token buckets ------------------------------------------------------ */

/*
 * 100 requests/s, burst 100, offered 500 requests/s by one caller for 11
 * simulated seconds. The first second also spends the burst (100 + 100);
 * every later second admits 95..105 (here exactly the rate), and another
 * caller offering 10 requests/s is never refused.
 */
static void test_bucket_precision(void **state)
{
	struct traffic *t = parse_ok(D("\"rate_limits\": [{\"name\": \"fe\", \"requests_per_second\": 100,"
	                               " \"burst\": 100, \"from\": [\"spiffe://mesh.local/svc/frontend\","
	                               " \"spiffe://mesh.local/svc/ops\"]}]"));
	struct traffic_limiter *l = traffic_limiter_new(t);
	struct policy_request fe = http_req(FRONTEND, "GET", "/"), ops = http_req(OPS, "GET", "/");
	unsigned admitted[11] = {0}, ops_refused = 0;
	int64_t wait = 0;

	(void)state;
	assert_non_null(l);
	for (int64_t now = 0; now < 11 * SEC; now += 2000) {          /* 500/s */
		const struct traffic_rate_limit *rl = traffic_limiter_admit(l, &fe, now, &wait);

		if (!rl)
			admitted[now / SEC]++;
		else
			assert_string_equal(rl->sel.name, "fe");
		if (now % (100 * 1000) == 0 && traffic_limiter_admit(l, &ops, now, &wait))
			ops_refused++;
	}
	assert_in_range(admitted[0], 199, 201);
	for (int s = 1; s < 11; s++) {
		if (admitted[s] < 95 || admitted[s] > 105)
			fail_msg("second %d admitted %u", s, admitted[s]);
	}
	assert_int_equal(ops_refused, 0);
	traffic_limiter_free(l);
	traffic_free(t);
}

/* A refusal says how long until a token: at 2 rps, an empty bucket waits
 * up to 0.5 s; Retry-After is whole seconds, at least 1. */
static void test_bucket_retry_after(void **state)
{
	struct traffic_bucket b = {0};
	int64_t wait;

	(void)state;
	assert_int_equal(traffic_bucket_take(&b, 2, 1, 0), 0);
	wait = traffic_bucket_take(&b, 2, 1, 0);
	assert_in_range(wait, 500000, 500001);
	assert_int_equal(traffic_retry_after_s(wait), 1);
	assert_int_equal(traffic_bucket_take(&b, 2, 1, wait), 0);
	assert_int_equal(traffic_retry_after_s(2500000), 3);
	assert_int_equal(traffic_retry_after_s(1), 1);
}

/* per "rule": one bucket whoever calls; per "caller": one each. */
static void test_limiter_per_rule(void **state)
{
	struct traffic *t = parse_ok(D("\"rate_limits\": ["
		"{\"name\": \"shared\", \"requests_per_second\": 1, \"burst\": 2, \"per\": \"rule\","
		" \"paths\": [\"/shared/*\"]},"
		"{\"name\": \"each\", \"requests_per_second\": 1, \"burst\": 2, \"paths\": [\"/each/*\"]}]"));
	struct traffic_limiter *l = traffic_limiter_new(t);
	struct policy_request a = http_req(FRONTEND, "GET", "/shared/x");
	struct policy_request b = http_req(OPS, "GET", "/shared/x");
	int64_t wait;

	(void)state;
	assert_null(traffic_limiter_admit(l, &a, 0, &wait));
	assert_null(traffic_limiter_admit(l, &b, 0, &wait));
	assert_ptr_equal(traffic_limiter_admit(l, &a, 0, &wait), &t->rate_limits[0]);
	assert_ptr_equal(traffic_limiter_admit(l, &b, 0, &wait), &t->rate_limits[0]);
	a.path = b.path = "/each/x";
	assert_null(traffic_limiter_admit(l, &a, 0, &wait));
	assert_null(traffic_limiter_admit(l, &a, 0, &wait));
	assert_ptr_equal(traffic_limiter_admit(l, &a, 0, &wait), &t->rate_limits[1]);
	assert_null(traffic_limiter_admit(l, &b, 0, &wait));
	/* A request no limit selects is never refused. */
	a.path = "/other";
	for (int i = 0; i < 10; i++)
		assert_null(traffic_limiter_admit(l, &a, 0, &wait));
	traffic_limiter_free(l);
	traffic_free(t);
}

/* More callers than TRAFFIC_CALLERS_MAX: memory stays bounded (the rest
 * share one bucket), and callers whose bucket refilled are forgotten to
 * make room. */
static void test_limiter_many_callers(void **state)
{
	struct traffic *t = parse_ok(D("\"rate_limits\": [{\"name\": \"b\", \"requests_per_second\": 10,"
	                               " \"burst\": 1}]"));
	struct traffic_limiter *l = traffic_limiter_new(t);
	char id[96];
	int64_t wait;
	unsigned refused = 0;

	(void)state;
	for (unsigned i = 0; i < TRAFFIC_CALLERS_MAX + 10; i++) {
		struct policy_request r = http_req(id, "GET", "/");

		snprintf(id, sizeof(id), "spiffe://mesh.local/svc/c%u", i);
		if (traffic_limiter_admit(l, &r, 0, &wait))
			refused++;
	}
	/* The ten over the cap share one bucket of burst 1: nine refused. */
	assert_int_equal(refused, 9);
	/* A second later every bucket is full again: new callers get their own. */
	for (unsigned i = 0; i < 10; i++) {
		struct policy_request r = http_req(id, "GET", "/");

		snprintf(id, sizeof(id), "spiffe://mesh.local/svc/new%u", i);
		assert_null(traffic_limiter_admit(l, &r, SEC, &wait));
	}
	traffic_limiter_free(l);
	traffic_free(t);
}

/*
 * A new version of the document keeps the buckets of every limit whose
 * name, rate, burst and kind did not change (also while the old limiter
 * is still in use: both draw from the same tokens); a changed limit, a
 * new one, or one changed from per caller to per rule starts full.
 */
static void test_limiter_inherit(void **state)
{
	struct traffic *t1 = parse_ok(D("\"rate_limits\": ["
		"{\"name\": \"same\", \"requests_per_second\": 1, \"burst\": 2, \"paths\": [\"/a/*\"]},"
		"{\"name\": \"rate\", \"requests_per_second\": 1, \"burst\": 2, \"paths\": [\"/b/*\"]},"
		"{\"name\": \"kind\", \"requests_per_second\": 1, \"burst\": 2, \"paths\": [\"/c/*\"]}]"));
	/* "same" now also selects /d/ paths (selectors may change), "rate" has a
	 * new rate, "kind" is per rule, "new" is new. */
	struct traffic *t2 = parse_ok(D("\"rate_limits\": ["
		"{\"name\": \"new\", \"requests_per_second\": 1, \"burst\": 2, \"paths\": [\"/n/*\"]},"
		"{\"name\": \"same\", \"requests_per_second\": 1, \"burst\": 2, \"paths\": [\"/a/*\", \"/d/*\"]},"
		"{\"name\": \"rate\", \"requests_per_second\": 2, \"burst\": 2, \"paths\": [\"/b/*\"]},"
		"{\"name\": \"kind\", \"requests_per_second\": 1, \"burst\": 2, \"per\": \"rule\","
		" \"paths\": [\"/c/*\"]}]"));
	struct traffic_limiter *l1 = traffic_limiter_new(t1), *l2 = traffic_limiter_new(t2);
	const char *paths[] = { "/a/x", "/b/x", "/c/x" };
	struct policy_request r = http_req(FRONTEND, "GET", "/");
	int64_t wait;

	(void)state;
	assert_non_null(l1);
	assert_non_null(l2);
	for (size_t i = 0; i < 3; i++) {    /* empty every bucket of l1 */
		r.path = paths[i];
		assert_null(traffic_limiter_admit(l1, &r, 0, &wait));
		assert_null(traffic_limiter_admit(l1, &r, 0, &wait));
		assert_non_null(traffic_limiter_admit(l1, &r, 0, &wait));
	}
	assert_int_equal(traffic_limiter_inherit(l2, NULL), 0);
	assert_int_equal(traffic_limiter_inherit(l2, l1), 1);
	r.path = "/a/x";
	assert_ptr_equal(traffic_limiter_admit(l2, &r, 0, &wait), &t2->rate_limits[1]);
	r.path = "/d/x";    /* the same bucket, the same caller */
	assert_ptr_equal(traffic_limiter_admit(l2, &r, 0, &wait), &t2->rate_limits[1]);
	r.path = "/b/x";
	assert_null(traffic_limiter_admit(l2, &r, 0, &wait));
	r.path = "/c/x";
	assert_null(traffic_limiter_admit(l2, &r, 0, &wait));
	/* A token l2 takes is gone for l1 too, and l1 may go first. */
	r.path = "/a/x";
	assert_null(traffic_limiter_admit(l2, &r, SEC, &wait));
	assert_non_null(traffic_limiter_admit(l1, &r, SEC, &wait));
	traffic_limiter_free(l1);
	traffic_free(t1);
	assert_null(traffic_limiter_admit(l2, &r, 2 * SEC, &wait));
	assert_non_null(traffic_limiter_admit(l2, &r, 2 * SEC, &wait));
	traffic_limiter_free(l2);
	traffic_free(t2);
}

/* ---- faults ------------------------------------------------------------- */

/* (k - np)^2 <= z^2 n p (1-p), z = 3.2905 (two-sided 99.9 %), without libm. */
static bool in_binomial_999(unsigned k, unsigned n, double p)
{
	double d = (double)k - n * p;

	return d * d <= 3.2905 * 3.2905 * n * p * (1 - p);
}

static void test_fault_percentages(void **state)
{
	static const double percents[] = {1, 5, 10, 30, 50, 90};
	char text[256];

	(void)state;
	for (size_t i = 0; i < ARRAY_LEN(percents); i++) {
		snprintf(text, sizeof(text), D("\"faults\": [{\"name\": \"f\", \"percent\": %g,"
		                               " \"abort_status\": 503}]"), percents[i]);
		struct traffic *t = parse_ok(text);
		struct policy_request r = http_req(FRONTEND, "GET", "/");

		for (uint64_t seed = 1; seed <= 5; seed++) {
			uint64_t s = seed * 0x9e3779b97f4a7c15ULL;
			unsigned hits = 0;

			for (unsigned n = 0; n < 2000; n++) {
				struct traffic_fault_decision d;

				traffic_fault_decide(t, &r, rng_next, &s, &d);
				if (d.abort) {
					assert_int_equal(d.abort_status, 503);
					hits++;
				}
			}
			if (!in_binomial_999(hits, 2000, percents[i] / 100))
				fail_msg("%g %%, seed %llu: %u of 2000", percents[i],
				         (unsigned long long)seed, hits);
		}
		traffic_free(t);
	}
}

/* 0 % never fires, 100 % always; a delay and an abort combine; the
 * longest delay wins. */
static void test_fault_decide(void **state)
{
	struct traffic *t = parse_ok(D("\"faults\": ["
		"{\"name\": \"never\", \"percent\": 0, \"abort_status\": 500},"
		"{\"name\": \"slow\", \"percent\": 100, \"delay_ms\": 100},"
		"{\"name\": \"slower\", \"percent\": 100, \"delay_ms\": 300, \"paths\": [\"/x\"]},"
		"{\"name\": \"boom\", \"percent\": 100, \"abort_status\": 503},"
		"{\"name\": \"boom2\", \"percent\": 100, \"abort_status\": 502}]"));
	struct policy_request r = http_req(FRONTEND, "GET", "/");
	struct traffic_fault_decision d;
	uint64_t s = 42;

	(void)state;
	traffic_fault_decide(t, &r, rng_next, &s, &d);
	assert_string_equal(d.delay->sel.name, "slow");
	assert_int_equal(d.delay_ms, 100);
	assert_string_equal(d.abort->sel.name, "boom");
	assert_int_equal(d.abort_status, 503);
	r.path = "/x";
	traffic_fault_decide(t, &r, rng_next, &s, &d);
	assert_string_equal(d.delay->sel.name, "slower");
	assert_int_equal(d.delay_ms, 300);
	assert_false(traffic_roll(0, 0));
	assert_false(traffic_roll(0, UINT64_MAX));
	assert_true(traffic_roll(100, UINT64_MAX));
	assert_true(traffic_roll(50, 0));
	traffic_free(t);
}

/* ---- retries ------------------------------------------------------------ */

/* Every request fails and wants a retry: over any 10 s window, retries
 * stay within 20 % of requests, and the budget is used, not idle. */
static void test_retry_budget(void **state)
{
	struct traffic_budget b = {0};
	unsigned req_at[40] = {0}, retry_at[40] = {0};

	(void)state;
	assert_false(traffic_budget_try_retry(&b, 20, 0));     /* nothing sent yet */
	for (int64_t now = 0; now < 40 * SEC; now += 10000) {  /* 100 requests/s */
		traffic_budget_request(&b, now);
		req_at[now / SEC]++;
		if (traffic_budget_try_retry(&b, 20, now))
			retry_at[now / SEC]++;
	}
	for (int end = 9; end < 40; end++) {
		unsigned rq = 0, rt = 0;

		for (int s = end - 9; s <= end; s++) {
			rq += req_at[s];
			rt += retry_at[s];
		}
		if (rt * 100 > rq * 20)
			fail_msg("window ending at %d s: %u retries for %u requests", end, rt, rq);
		if (end >= 19)
			assert_true(rt * 100 >= rq * 19);      /* the budget is spent */
	}
	/* 0 %: never. */
	memset(&b, 0, sizeof(b));
	for (int i = 0; i < 100; i++)
		traffic_budget_request(&b, 0);
	assert_false(traffic_budget_try_retry(&b, 0, 0));
	/* Old requests leave the window: after 10 quiet seconds, no budget. */
	assert_true(traffic_budget_try_retry(&b, 100, 5 * SEC));
	assert_false(traffic_budget_try_retry(&b, 100, 10 * SEC));
}

static void test_backoff(void **state)
{
	uint64_t s = 7;

	(void)state;
	assert_int_equal(traffic_backoff_ms(0, 1, 123), 0);
	for (int i = 0; i < 1000; i++) {
		uint64_t r = rng_next(&s);

		assert_in_range(traffic_backoff_ms(25, 1, r), 13, 25);
		assert_in_range(traffic_backoff_ms(25, 2, r), 25, 50);
		assert_in_range(traffic_backoff_ms(25, 3, r), 50, 100);
		assert_in_range(traffic_backoff_ms(25, 4, r), 100, 200);
		assert_in_range(traffic_backoff_ms(25, 9, r), 100, 200);   /* capped at 8x */
	}
	/* Jitter reaches both ends. */
	assert_int_equal(traffic_backoff_ms(100, 1, 0), 50);
	assert_int_equal(traffic_backoff_ms(100, 1, 50), 100);
}

/* ---- outlier ejection --------------------------------------------------- */

static void test_outlier_eject_and_return(void **state)
{
	struct traffic_outlier cfg = {5, 30000, 50};
	struct traffic_outlier_set s;

	(void)state;
	assert_int_equal(traffic_outlier_set_init(&s, 3), 0);
	for (int i = 0; i < 4; i++)
		assert_false(traffic_outlier_report(&s, &cfg, 0, true, 0));
	/* A success in between starts the count again. */
	assert_false(traffic_outlier_report(&s, &cfg, 0, false, 0));
	for (int i = 0; i < 4; i++)
		assert_false(traffic_outlier_report(&s, &cfg, 0, true, 0));
	assert_true(traffic_outlier_report(&s, &cfg, 0, true, SEC));
	assert_false(traffic_outlier_usable(&s, 0, SEC));
	assert_false(traffic_outlier_usable(&s, 0, 31 * SEC - 1));
	assert_true(traffic_outlier_usable(&s, 1, SEC));
	assert_true(traffic_outlier_usable(&s, 0, 31 * SEC));
	/* Still failing when back: ejected again for twice as long. */
	for (int i = 0; i < 4; i++)
		assert_false(traffic_outlier_report(&s, &cfg, 0, true, 32 * SEC));
	assert_true(traffic_outlier_report(&s, &cfg, 0, true, 32 * SEC));
	assert_false(traffic_outlier_usable(&s, 0, 92 * SEC - 1));
	assert_true(traffic_outlier_usable(&s, 0, 92 * SEC));
	/* A success resets the doubling. */
	assert_false(traffic_outlier_report(&s, &cfg, 0, false, 92 * SEC));
	for (int i = 0; i < 5; i++)
		traffic_outlier_report(&s, &cfg, 0, true, 100 * SEC);
	assert_false(traffic_outlier_usable(&s, 0, 130 * SEC - 1));
	assert_true(traffic_outlier_usable(&s, 0, 130 * SEC));
	traffic_outlier_set_free(&s);
}

/* The doubling stops at TRAFFIC_EJECT_MAX_MS. */
static void test_outlier_doubling_cap(void **state)
{
	struct traffic_outlier cfg = {1, 100000, 100};
	struct traffic_outlier_set s;
	int64_t now = 0;

	(void)state;
	assert_int_equal(traffic_outlier_set_init(&s, 1), 0);
	for (int k = 0; k < 8; k++) {
		assert_true(traffic_outlier_report(&s, &cfg, 0, true, now));
		while (!traffic_outlier_usable(&s, 0, now))
			now += SEC;
	}
	/* The last ejections lasted the cap: 300 s. */
	assert_true(traffic_outlier_report(&s, &cfg, 0, true, now));
	assert_false(traffic_outlier_usable(&s, 0, now + 300 * SEC - 1));
	assert_true(traffic_outlier_usable(&s, 0, now + 300 * SEC));
	traffic_outlier_set_free(&s);
}

/* Every endpoint failing at random: never more than the cap out at once,
 * and the count matches the flags. 3 endpoints at 50 %: at most 1. */
static void test_outlier_cap(void **state)
{
	static const struct { size_t n; unsigned pct; size_t cap; } cases[] = {
		{3, 50, 1}, {10, 30, 3}, {10, 0, 0}, {4, 100, 4}, {1, 50, 0},
	};
	uint64_t seed = 99;

	(void)state;
	for (size_t c = 0; c < ARRAY_LEN(cases); c++) {
		struct traffic_outlier cfg = {3, 2000, cases[c].pct};
		struct traffic_outlier_set s;
		size_t max_seen = 0;

		assert_int_equal(traffic_outlier_cap(&cfg, cases[c].n), cases[c].cap);
		assert_int_equal(traffic_outlier_set_init(&s, cases[c].n), 0);
		for (int64_t now = 0; now < 120 * SEC; now += 1000) {
			size_t i = rng_next(&seed) % s.n, flagged = 0;

			if (traffic_outlier_usable(&s, i, now))
				traffic_outlier_report(&s, &cfg, i, rng_next(&seed) % 10 < 9, now);
			for (size_t k = 0; k < s.n; k++)
				flagged += s.eps[k].ejected;
			assert_int_equal(flagged, s.n_ejected);
			assert_true(s.n_ejected <= cases[c].cap);
			if (s.n_ejected > max_seen)
				max_seen = s.n_ejected;
		}
		/* The cap is reached, not just respected. */
		assert_int_equal(max_seen, cases[c].cap);
		traffic_outlier_set_free(&s);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_example),
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_bad_documents),
		cmocka_unit_test(test_names_per_list),
		cmocka_unit_test(test_sets),
		cmocka_unit_test(test_selection),
		cmocka_unit_test(test_bucket_precision),
		cmocka_unit_test(test_bucket_retry_after),
		cmocka_unit_test(test_limiter_per_rule),
		cmocka_unit_test(test_limiter_many_callers),
		cmocka_unit_test(test_fault_percentages),
		cmocka_unit_test(test_fault_decide),
		cmocka_unit_test(test_limiter_inherit),
		cmocka_unit_test(test_retry_budget),
		cmocka_unit_test(test_backoff),
		cmocka_unit_test(test_outlier_eject_and_return),
		cmocka_unit_test(test_outlier_doubling_cap),
		cmocka_unit_test(test_outlier_cap),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
