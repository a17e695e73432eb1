/* lib/peerstats.c: per-caller counters and the summary they make, bounded
 * whatever the number of callers; the summary read back by api_stats_parse. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "meshlet/api.h"
#include "meshlet/peerstats.h"

static const struct api_stats_caller *caller(const struct api_stats_summary *s, const char *from)
{
	for (size_t i = 0; i < s->n_callers; i++)
		if (strcmp(s->callers[i].from, from) == 0)
			return &s->callers[i];
	return NULL;
}

static void test_caller_names(void **state)
{
	char out[SERVICE_NAME_MAX + 1];

	(void)state;
	peerstats_caller("spiffe://mesh.local/svc/web", out);
	assert_string_equal(out, "web");
	peerstats_caller("spiffe://mesh.local/ns/x/sa/y", out);
	assert_string_equal(out, API_STATS_OTHER);
	peerstats_caller("spiffe://mesh.local/svc/Bad_Name", out);
	assert_string_equal(out, API_STATS_OTHER);
	peerstats_caller(NULL, out);
	assert_string_equal(out, API_STATS_OTHER);
	peerstats_caller("/svc/web", out);
	assert_string_equal(out, API_STATS_OTHER);
}

static void test_counts_and_latency(void **state)
{
	struct peerstats *p = peerstats_new();
	struct api_stats_summary s, back;
	struct meshlet_err e = { { 0 }, { 0 } };
	const struct api_stats_caller *c;
	char *text;

	(void)state;
	assert_non_null(p);
	for (int i = 0; i < 100; i++) {
		peerstats_decision(p, "spiffe://mesh.local/svc/web", true, "reads", "GET", "/x");
		peerstats_answer(p, "spiffe://mesh.local/svc/web", i < 2 ? 503 : 200,
		                 i < 98 ? 0.003 : 2.0);
	}
	peerstats_decision(p, "spiffe://mesh.local/svc/web", false, "no-admin", "POST",
	                   "/admin/\x01x");
	/* Repeats of one denial do not push another kind out. */
	for (int i = 0; i < 10; i++)
		peerstats_decision(p, "spiffe://mesh.local/svc/web", false, "no-admin", "GET", "/admin");
	peerstats_decision(p, "spiffe://mesh.local/svc/web", false, "no-admin", "POST",
	                   "/admin/\x01x");
	for (int i = 0; i < 10; i++)
		peerstats_decision(p, "spiffe://mesh.local/svc/web", false, "no-admin", "GET", "/admin");
	assert_int_equal(peerstats_take(p, &s), 122);
	c = caller(&s, "web");
	assert_non_null(c);
	assert_int_equal(c->requests, 122);
	assert_int_equal(c->denied, 22);
	assert_int_equal(c->errors_5xx, 2);
	assert_true(c->has_latency);
	assert_true(c->p50_ms > 2.5 && c->p50_ms <= 5);
	assert_true(c->p99_ms > 1000 && c->p99_ms <= 2500);
	assert_int_equal(s.n_denied, 1);
	assert_string_equal(s.denied[0].rule, "no-admin");
	assert_int_equal(s.denied[0].n, 22);
	assert_int_equal(s.n_recent, 2);
	assert_string_equal(s.recent[0].method, "POST");
	assert_string_equal(s.recent[0].path, "/admin/?x");   /* control bytes never go out */
	assert_string_equal(s.recent[1].path, "/admin");
	text = api_stats_format(&s);
	assert_non_null(text);
	assert_int_equal(api_stats_parse(text, &back, &e), 0);
	assert_int_equal(back.callers[0].requests, 122);
	assert_string_equal(back.recent[0].path, "/admin/?x");
	free(text);
	/* A new interval starts empty. */
	assert_int_equal(peerstats_take(p, &s), 0);
	assert_int_equal(s.n_callers, 0);
	peerstats_free(p);
}

/* 10,000 distinct callers and rules: the summary keeps its caps, the rest
 * lands in "(other)", nothing is lost from the totals, and it parses. */
static void test_ten_thousand_callers_stay_bounded(void **state)
{
	struct peerstats *p = peerstats_new();
	struct api_stats_summary s, back;
	struct meshlet_err e = { { 0 }, { 0 } };
	int64_t requests = 0, denied = 0, rule_n = 0;
	char id[128], rule[160], path[300], pad[200];
	char *text;

	(void)state;
	memset(pad, 'x', sizeof(pad) - 1);
	pad[sizeof(pad) - 1] = '\0';
	memset(path, 'a', sizeof(path) - 1);
	path[0] = '/';
	path[sizeof(path) - 1] = '\0';
	for (int i = 0; i < 10000; i++) {
		/* The longest names there can be: the worst case for the size. */
		snprintf(id, sizeof(id), "spiffe://mesh.local/svc/c%05d-%.56s", i, pad);
		snprintf(rule, sizeof(rule), "r%05d-%.121s", i, pad);
		peerstats_decision(p, id, i % 2, rule, "DELETE", path);
		peerstats_answer(p, id, 500, 0.001 * (i % 100));
	}
	peerstats_take(p, &s);
	assert_int_equal(s.n_callers, API_STATS_CALLERS_MAX);
	assert_int_equal(s.n_denied, API_STATS_DENIED_MAX);
	assert_int_equal(s.n_recent, API_STATS_RECENT_MAX);
	assert_string_equal(s.callers[API_STATS_CALLERS_MAX - 1].from, API_STATS_OTHER);
	for (size_t i = 0; i < s.n_callers; i++) {
		requests += s.callers[i].requests;
		denied += s.callers[i].denied;
	}
	for (size_t i = 0; i < s.n_denied; i++)
		rule_n += s.denied[i].n;
	assert_int_equal(requests, 10000);
	assert_int_equal(denied, 5000);
	assert_int_equal(rule_n, 5000);
	text = api_stats_format(&s);
	assert_non_null(text);
	printf("summary of 10,000 callers: %zu bytes (limit %d)\n", strlen(text), API_STATS_MAX);
	assert_true(strlen(text) <= API_STATS_MAX);
	assert_int_equal(api_stats_parse(text, &back, &e), 0);
	free(text);
	peerstats_free(p);
}

static void count_nudge(void *ctx)
{
	(*(int *)ctx)++;
}

/* The hook fires on news only: the first decision after a quiet interval
 * and a denial not yet among the interval's recent ones. */
static void test_nudge_on_news_only(void **state)
{
	struct peerstats *p = peerstats_new();
	struct api_stats_summary *sum = malloc(sizeof(*sum));
	const char *web = "spiffe://mesh.local/svc/web";
	int n = 0;

	(void)state;
	assert_non_null(p);
	assert_non_null(sum);
	peerstats_set_nudge(p, count_nudge, &n);
	peerstats_decision(p, web, true, "r", "GET", "/");
	assert_int_equal(n, 1);                  /* first traffic after a quiet start */
	peerstats_decision(p, web, true, "r", "GET", "/");
	assert_int_equal(n, 1);
	peerstats_decision(p, web, false, "deny-x", "GET", "/a");
	assert_int_equal(n, 2);                  /* a new denial */
	peerstats_decision(p, web, false, "deny-x", "GET", "/a");
	assert_int_equal(n, 2);                  /* the same again: no news */
	peerstats_decision(p, web, false, "deny-x", "GET", "/b");
	assert_int_equal(n, 3);
	assert_true(peerstats_take(p, sum) > 0);
	peerstats_decision(p, web, true, "r", "GET", "/");
	assert_int_equal(n, 3);                  /* traffic goes on: no news */
	peerstats_decision(p, web, false, "deny-x", "GET", "/a");
	assert_int_equal(n, 4);                  /* new in this interval */
	assert_true(peerstats_take(p, sum) > 0);
	assert_int_equal(peerstats_take(p, sum), 0);   /* a quiet interval */
	peerstats_decision(p, web, true, "r", "GET", "/");
	assert_int_equal(n, 5);                  /* first traffic after it */
	peerstats_set_nudge(p, NULL, NULL);
	peerstats_decision(p, web, false, "deny-y", "GET", "/c");
	assert_int_equal(n, 5);
	free(sum);
	peerstats_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_caller_names),
		cmocka_unit_test(test_counts_and_latency),
		cmocka_unit_test(test_ten_thousand_callers_stay_bounded),
		cmocka_unit_test(test_nudge_on_news_only),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
