/* control/stats.c: edges from summaries, rates over the window, eviction,
 * and the bound on edges whatever the number of callers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "stats.h"

#define T0 1800000000

static void one_caller(struct api_stats_summary *s, const char *from, int64_t req,
                       int64_t denied)
{
	struct api_stats_caller *c = &s->callers[s->n_callers++];

	memset(c, 0, sizeof(*c));
	snprintf(c->from, sizeof(c->from), "%s", from);
	c->requests = req;
	c->denied = denied;
	c->has_latency = true;
	c->p50_ms = 2;
	c->p99_ms = 9;
}

static const json_t *edge(const json_t *doc, const char *from, const char *to)
{
	size_t i;
	const json_t *e;

	json_array_foreach(json_object_get(doc, "edges"), i, e) {
		if (strcmp(json_string_value(json_object_get(e, "from")), from) == 0 &&
		    strcmp(json_string_value(json_object_get(e, "to")), to) == 0)
			return e;
	}
	return NULL;
}

static int64_t num(const json_t *o, const char *k)
{
	return json_integer_value(json_object_get(o, k));
}

static void test_rates_rules_and_eviction(void **state)
{
	struct stats *st = stats_new();
	struct api_stats_summary s = { .interval_s = 5 };
	json_t *doc;
	const json_t *e;

	(void)state;
	one_caller(&s, "web", 60, 6);
	s.n_denied = 1;
	snprintf(s.denied[0].from, sizeof(s.denied[0].from), "web");
	snprintf(s.denied[0].rule, sizeof(s.denied[0].rule), "no-admin");
	s.denied[0].n = 6;
	s.n_recent = 1;
	s.recent[0] = (struct api_stats_recent){ .at = T0, .from = "web", .rule = "no-admin",
	                                         .method = "GET", .path = "/admin" };
	stats_record(st, "orders", &s, T0);
	stats_record(st, "orders", &s, T0 + 20);
	doc = stats_json(st, T0 + 21);
	e = edge(doc, "web", "orders");
	assert_non_null(e);
	assert_int_equal(num(e, "requests"), 120);
	assert_int_equal(num(e, "denied"), 12);
	assert_true(json_real_value(json_object_get(e, "request_rate")) == 2.0);
	assert_int_equal(num(json_object_get(e, "denied_by_rule"), "no-admin"), 12);
	/* The same denial twice is listed once, with its latest time. */
	assert_int_equal(json_array_size(json_object_get(doc, "recent_denials")), 1);
	assert_true(json_is_false(json_object_get(doc, "truncated")));
	json_decref(doc);
	/* Out of the rate window, still kept. */
	doc = stats_json(st, T0 + 100);
	e = edge(doc, "web", "orders");
	assert_non_null(e);
	assert_int_equal(num(e, "requests"), 0);
	json_decref(doc);
	/* Past what is kept: gone. */
	doc = stats_json(st, T0 + 20 + STATS_BUCKETS * STATS_BUCKET_S + 1);
	assert_int_equal(json_array_size(json_object_get(doc, "edges")), 0);
	json_decref(doc);
	stats_free(st);
}

static void test_edges_are_capped(void **state)
{
	struct stats *st = stats_new();
	struct api_stats_summary s = { .interval_s = 5 };
	char name[64];
	json_t *doc;

	(void)state;
	for (int i = 0; i < 10000; i++) {
		snprintf(name, sizeof(name), "caller-%d", i);
		s.n_callers = 0;
		one_caller(&s, name, 2, 1);
		stats_record(st, "orders", &s, T0 + i / 100);
	}
	doc = stats_json(st, T0 + 100);
	assert_int_equal(json_array_size(json_object_get(doc, "edges")), STATS_EDGES_MAX);
	assert_true(json_is_true(json_object_get(doc, "truncated")));
	assert_int_equal(num(json_object_get(doc, "others"), "callers_folded"),
	                 10000 - STATS_EDGES_MAX);
	json_decref(doc);
	stats_refused(st, "orders", "bad");
	doc = stats_json(st, T0 + 100);
	assert_int_equal(num(json_object_get(doc, "summaries"), "refused"), 1);
	assert_int_equal(num(json_object_get(doc, "summaries"), "accepted"), 10000);
	json_decref(doc);
	stats_free(st);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rates_rules_and_eviction),
		cmocka_unit_test(test_edges_are_capped),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
