/* lib/peerstats.c: per-caller counters and the summary they make, bounded
 * whatever the number of callers; the summary read back by api_stats_parse. */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdbool.h>
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
	struct peerstats_shard *w = peerstats_shard(p, 0);
	struct api_stats_summary s, back;
	struct meshlet_err e = { { 0 }, { 0 } };
	const struct api_stats_caller *c;
	char *text;

	(void)state;
	assert_non_null(p);
	assert_non_null(w);
	for (int i = 0; i < 100; i++) {
		peerstats_decision(w, "spiffe://mesh.local/svc/web", true, "reads", "GET", "/x");
		peerstats_answer(w, "spiffe://mesh.local/svc/web", i < 2 ? 503 : 200,
		                 i < 98 ? 0.003 : 2.0);
	}
	peerstats_decision(w, "spiffe://mesh.local/svc/web", false, "no-admin", "POST",
	                   "/admin/\x01x");
	/* Repeats of one denial do not push another kind out. */
	for (int i = 0; i < 10; i++)
		peerstats_decision(w, "spiffe://mesh.local/svc/web", false, "no-admin", "GET", "/admin");
	peerstats_decision(w, "spiffe://mesh.local/svc/web", false, "no-admin", "POST",
	                   "/admin/\x01x");
	for (int i = 0; i < 10; i++)
		peerstats_decision(w, "spiffe://mesh.local/svc/web", false, "no-admin", "GET", "/admin");
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
	struct peerstats_shard *w = peerstats_shard(p, 0);
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
		peerstats_decision(w, id, i % 2, rule, "DELETE", path);
		peerstats_answer(w, id, 500, 0.001 * (i % 100));
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
	struct peerstats_shard *w = peerstats_shard(p, 0);
	struct api_stats_summary *sum = malloc(sizeof(*sum));
	const char *web = "spiffe://mesh.local/svc/web";
	int n = 0;

	(void)state;
	assert_non_null(p);
	assert_non_null(w);
	assert_non_null(sum);
	peerstats_set_nudge(p, count_nudge, &n);
	peerstats_decision(w, web, true, "r", "GET", "/");
	assert_int_equal(n, 1);                  /* first traffic after a quiet start */
	peerstats_decision(w, web, true, "r", "GET", "/");
	assert_int_equal(n, 1);
	peerstats_decision(w, web, false, "deny-x", "GET", "/a");
	assert_int_equal(n, 2);                  /* a new denial */
	peerstats_decision(w, web, false, "deny-x", "GET", "/a");
	assert_int_equal(n, 2);                  /* the same again: no news */
	peerstats_decision(w, web, false, "deny-x", "GET", "/b");
	assert_int_equal(n, 3);
	assert_true(peerstats_take(p, sum) > 0);
	peerstats_decision(w, web, true, "r", "GET", "/");
	assert_int_equal(n, 3);                  /* traffic goes on: no news */
	peerstats_decision(w, web, false, "deny-x", "GET", "/a");
	assert_int_equal(n, 4);                  /* new in this interval */
	assert_true(peerstats_take(p, sum) > 0);
	assert_int_equal(peerstats_take(p, sum), 0);   /* a quiet interval */
	peerstats_decision(w, web, true, "r", "GET", "/");
	assert_int_equal(n, 5);                  /* first traffic after it */
	peerstats_set_nudge(p, NULL, NULL);
	peerstats_decision(w, web, false, "deny-y", "GET", "/c");
	assert_int_equal(n, 5);
	free(sum);
	peerstats_free(p);
}

/* ---- shards: one per worker, merged exactly by the take ---------------- */

#define MERGE_THREADS 4
#define MERGE_ROUNDS 30000
#define MERGE_CALLERS 4     /* three shared by all threads, one per thread */
#define MERGE_NAMES (MERGE_THREADS + 4)   /* and "errs": 5xx answers without decisions */

struct merge_worker {
	struct peerstats_shard *shard;
	int index;
};

struct merge_taker {
	struct peerstats *p;
	atomic_bool stop;
	int64_t requests[MERGE_NAMES], denied[MERGE_NAMES], errors[MERGE_NAMES];
	int64_t rule_n;
	int takes, bad;
};

static const char *merge_name(int k)
{
	static const char *names[] = { "shared-a", "shared-b", "shared-c", "own-0", "own-1",
	                               "own-2", "own-3", "errs" };

	return names[k];
}

/* Caller k of thread t in round i: a shared one or the thread's own. */
static int merge_caller_of(int t, int i)
{
	return i % MERGE_CALLERS == MERGE_CALLERS - 1 ? 3 + t : i % 3;
}

static void *merge_count(void *arg)
{
	struct merge_worker *mw = arg;
	char id[96];

	for (int i = 0; i < MERGE_ROUNDS; i++) {
		int k = merge_caller_of(mw->index, i);

		snprintf(id, sizeof(id), "spiffe://mesh.local/svc/%s", merge_name(k));
		peerstats_decision(mw->shard, id, i % 7 != 0, "r", "GET", "/");
		peerstats_answer(mw->shard, id, 200, 0.001);
		/* 5xx apart: a summary counts at least as many requests as 5xx
		 * answers, so a 5xx whose decision fell into the previous summary
		 * would count one request more. Answers without decisions (a bad
		 * head) count one request per 5xx, whatever the timing. */
		if (i % 11 == 0)
			peerstats_answer(mw->shard, "spiffe://mesh.local/svc/errs", 503, 0.001);
	}
	return NULL;
}

static void merge_add(struct merge_taker *t, const struct api_stats_summary *s)
{
	for (size_t i = 0; i < s->n_callers; i++) {
		int k = 0;

		while (k < MERGE_NAMES && strcmp(merge_name(k), s->callers[i].from) != 0)
			k++;
		if (k == MERGE_NAMES || s->callers[i].denied > s->callers[i].requests) {
			t->bad++;
			continue;
		}
		t->requests[k] += s->callers[i].requests;
		t->denied[k] += s->callers[i].denied;
		t->errors[k] += s->callers[i].errors_5xx;
	}
	for (size_t i = 0; i < s->n_denied; i++)
		t->rule_n += s->denied[i].n;
}

/* The control client's side: takes while the workers count. */
static void *merge_take(void *arg)
{
	struct merge_taker *t = arg;
	struct api_stats_summary *s = malloc(sizeof(*s));
	struct api_stats_summary *back = malloc(sizeof(*back));
	struct meshlet_err e = { { 0 }, { 0 } };
	bool last = false;

	while (s && back && !last) {
		char *text = NULL;

		last = atomic_load(&t->stop);    /* one more take after the workers ended */
		peerstats_take(t->p, s);
		merge_add(t, s);
		/* Every summary must be one control accepts (no denied > requests). */
		if (s->n_callers && (!(text = api_stats_format(s)) ||
		                     api_stats_parse(text, back, &e) != 0))
			t->bad++;
		free(text);
		t->takes++;
		sched_yield();
	}
	free(s);
	free(back);
	return NULL;
}

/* Four workers count into their own shards while another thread takes
 * summaries: the sum of the summaries is exactly what was counted, per
 * caller, shared callers merged across the shards. */
static void test_shards_merge_exactly(void **state)
{
	struct peerstats *p = peerstats_new();
	struct merge_worker mw[MERGE_THREADS];
	struct merge_taker *t = calloc(1, sizeof(*t));
	pthread_t th[MERGE_THREADS], taker;
	int64_t want_req[MERGE_NAMES] = { 0 }, want_den[MERGE_NAMES] = { 0 };
	int64_t want_err[MERGE_NAMES] = { 0 }, want_rule = 0;

	(void)state;
	assert_non_null(p);
	assert_non_null(t);
	t->p = p;
	atomic_init(&t->stop, false);
	for (int i = 0; i < MERGE_THREADS; i++) {
		mw[i].shard = peerstats_shard(p, (size_t)i);
		mw[i].index = i;
		assert_non_null(mw[i].shard);
	}
	assert_ptr_equal(peerstats_shard(p, 2), mw[2].shard);    /* the same shard again */
	assert_int_equal(pthread_create(&taker, NULL, merge_take, t), 0);
	for (int i = 0; i < MERGE_THREADS; i++)
		assert_int_equal(pthread_create(&th[i], NULL, merge_count, &mw[i]), 0);
	for (int i = 0; i < MERGE_THREADS; i++)
		pthread_join(th[i], NULL);
	atomic_store(&t->stop, true);
	pthread_join(taker, NULL);
	for (int th_i = 0; th_i < MERGE_THREADS; th_i++) {
		for (int i = 0; i < MERGE_ROUNDS; i++) {
			int k = merge_caller_of(th_i, i);

			want_req[k]++;
			want_den[k] += i % 7 == 0;
			want_rule += i % 7 == 0;
			want_req[MERGE_NAMES - 1] += i % 11 == 0;
			want_err[MERGE_NAMES - 1] += i % 11 == 0;
		}
	}
	printf("merged %d summaries taken while 4 threads counted\n", t->takes);
	assert_int_equal(t->bad, 0);
	assert_true(t->takes >= 1);
	for (int k = 0; k < MERGE_NAMES; k++) {
		assert_int_equal(t->requests[k], want_req[k]);
		assert_int_equal(t->denied[k], want_den[k]);
		assert_int_equal(t->errors[k], want_err[k]);
	}
	assert_int_equal(t->rule_n, want_rule);
	free(t);
	peerstats_free(p);
}

/* Shard numbers beyond the limit are refused, not written past the table. */
static void test_shard_out_of_range(void **state)
{
	struct peerstats *p = peerstats_new();

	(void)state;
	assert_non_null(p);
	assert_null(peerstats_shard(p, PEERSTATS_SHARDS_MAX));
	assert_null(peerstats_shard(p, (size_t)-1));
	assert_null(peerstats_shard(NULL, 0));
	peerstats_decision(NULL, "spiffe://mesh.local/svc/web", true, "r", "GET", "/");
	peerstats_answer(NULL, "spiffe://mesh.local/svc/web", 200, 0.001);
	peerstats_free(p);
}

/* A worker's slots stay bounded: once PEERSTATS_CALLERS callers hold
 * them, a new caller counts in "(other)" until a take; after it, a slot
 * whose counts were all taken goes to the new caller, by name. */
static void test_slots_change_hands_after_a_take(void **state)
{
	struct peerstats *p = peerstats_new();
	struct peerstats_shard *w = peerstats_shard(p, 0);
	struct api_stats_summary *s = malloc(sizeof(*s));
	const struct api_stats_caller *c;
	char id[96];

	(void)state;
	assert_non_null(w);
	assert_non_null(s);
	for (int i = 0; i < PEERSTATS_CALLERS; i++) {
		snprintf(id, sizeof(id), "spiffe://mesh.local/svc/old-%d", i);
		peerstats_decision(w, id, true, "r", "GET", "/");
	}
	for (int i = 0; i < 5; i++)
		peerstats_decision(w, "spiffe://mesh.local/svc/late", true, "r", "GET", "/");
	assert_int_equal(peerstats_take(p, s), PEERSTATS_CALLERS + 5);
	assert_null(caller(s, "late"));          /* no slot was free: folded */
	c = caller(s, API_STATS_OTHER);
	assert_non_null(c);
	assert_true(c->requests >= 5);
	/* Everything was taken: "late" gets a slot of its own now. */
	for (int i = 0; i < 7; i++)
		peerstats_decision(w, "spiffe://mesh.local/svc/late", false, "no", "GET", "/");
	peerstats_answer(w, "spiffe://mesh.local/svc/late", 500, 0.001);
	assert_int_equal(peerstats_take(p, s), 7);
	c = caller(s, "late");
	assert_non_null(c);
	assert_int_equal(c->requests, 7);
	assert_int_equal(c->denied, 7);
	assert_int_equal(c->errors_5xx, 1);
	assert_null(caller(s, API_STATS_OTHER));
	assert_int_equal(s->n_callers, 1);
	free(s);
	peerstats_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_caller_names),
		cmocka_unit_test(test_counts_and_latency),
		cmocka_unit_test(test_ten_thousand_callers_stay_bounded),
		cmocka_unit_test(test_nudge_on_news_only),
		cmocka_unit_test(test_shards_merge_exactly),
		cmocka_unit_test(test_shard_out_of_range),
		cmocka_unit_test(test_slots_change_hands_after_a_take),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
