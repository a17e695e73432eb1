/* Unit tests for lib/metrics.c: Prometheus rendering, decision counters,
 * histogram buckets, label escaping. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <cmocka.h>

#include "meshlet/metrics.h"

/* Renders m into a malloc'd string. */
static char *render(struct metrics *m)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	assert_non_null(f);
	assert_int_equal(metrics_render(m, f), 0);
	assert_int_equal(fclose(f), 0);
	return buf;
}

/* Asserts that text holds line as a whole line. */
static void assert_line(const char *text, const char *line)
{
	size_t n = strlen(line);

	for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
		if ((p == text || p[-1] == '\n') && p[n] == '\n')
			return;
	}
	fail_msg("line not found: %s\n--- in ---\n%s", line, text);
}

static void test_render_empty(void **state)
{
	static const char *const families[][2] = {
		{ "meshlet_connections_total", "counter" },
		{ "meshlet_connections_active", "gauge" },
		{ "meshlet_tls_handshake_failures_total", "counter" },
		{ "meshlet_tls_resumptions_total", "counter" },
		{ "meshlet_policy_decisions_total", "counter" },
		{ "meshlet_rate_limited_total", "counter" },
		{ "meshlet_faults_injected_total", "counter" },
		{ "meshlet_http_requests_total", "counter" },
		{ "meshlet_request_duration_seconds", "histogram" },
		{ "meshlet_bytes_total", "counter" },
		{ "meshlet_cert_expiry_timestamp_seconds", "gauge" },
		{ "meshlet_config_version", "gauge" },
		{ "meshlet_control_connected", "gauge" },
	};
	struct metrics *m = metrics_new();
	char *out, line[128];

	(void)state;
	assert_non_null(m);
	out = render(m);
	for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
		snprintf(line, sizeof(line), "# TYPE %s %s", families[i][0], families[i][1]);
		assert_line(out, line);
		snprintf(line, sizeof(line), "# HELP %s ", families[i][0]);
		assert_non_null(strstr(out, line));
	}
	assert_line(out, "meshlet_connections_total{direction=\"inbound\"} 0");
	assert_line(out, "meshlet_connections_total{direction=\"outbound\"} 0");
	assert_line(out, "meshlet_tls_handshake_failures_total{reason=\"timeout\"} 0");
	assert_line(out, "meshlet_tls_handshake_failures_total{reason=\"no_uri_san\"} 0");
	assert_line(out, "meshlet_tls_resumptions_total{direction=\"inbound\"} 0");
	assert_line(out, "meshlet_tls_resumptions_total{direction=\"outbound\"} 0");
	assert_null(strstr(out, "reason=\"ok\""));
	assert_null(strstr(out, "meshlet_http_requests_total{"));
	assert_null(strstr(out, "meshlet_policy_decisions_total{"));
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"+Inf\"} 0");
	assert_line(out, "meshlet_request_duration_seconds_sum 0.000000");
	assert_line(out, "meshlet_request_duration_seconds_count 0");
	assert_line(out, "meshlet_control_connected 0");
	assert_int_equal(out[strlen(out) - 1], '\n');
	free(out);
	metrics_free(m);
}

static void test_render_after_updates(void **state)
{
	struct metrics *m = metrics_new();
	char *out;

	(void)state;
	metrics_inc(&m->connections_total[DIR_INBOUND]);
	metrics_inc(&m->connections_total[DIR_INBOUND]);
	metrics_inc(&m->connections_total[DIR_OUTBOUND]);
	atomic_fetch_add(&m->connections_active[DIR_INBOUND], 2);
	atomic_fetch_sub(&m->connections_active[DIR_INBOUND], 1);
	metrics_add(&m->bytes_total[DIR_OUTBOUND], 12345);
	metrics_inc(&m->handshake_failures[TLS_FAIL_WRONG_TRUST_DOMAIN]);
	metrics_inc(&m->handshake_failures[TLS_FAIL_UNTRUSTED]);
	metrics_inc(&m->handshake_failures[TLS_FAIL_UNTRUSTED]);
	metrics_count_http(m, 200);
	metrics_count_http(m, 200);
	metrics_count_http(m, 403);
	metrics_count_http(m, 99);   /* ignored */
	metrics_count_http(m, 600);  /* ignored */
	metrics_count_http(m, -1);   /* ignored */
	metrics_inc(&metrics_decision(m, 1, "frontend-reads")->count);
	metrics_inc(&metrics_decision(m, 0, "no-admin")->count);
	atomic_store(&m->cert_expiry, 1795773600);
	atomic_store(&m->config_version, 7);
	atomic_store(&m->control_connected, 1);

	out = render(m);
	assert_line(out, "meshlet_connections_total{direction=\"inbound\"} 2");
	assert_line(out, "meshlet_connections_total{direction=\"outbound\"} 1");
	assert_line(out, "meshlet_connections_active{direction=\"inbound\"} 1");
	assert_line(out, "meshlet_connections_active{direction=\"outbound\"} 0");
	assert_line(out, "meshlet_bytes_total{direction=\"outbound\"} 12345");
	assert_line(out, "meshlet_bytes_total{direction=\"inbound\"} 0");
	assert_line(out, "meshlet_tls_handshake_failures_total{reason=\"wrong_trust_domain\"} 1");
	assert_line(out, "meshlet_tls_handshake_failures_total{reason=\"untrusted\"} 2");
	assert_line(out, "meshlet_http_requests_total{code=\"200\"} 2");
	assert_line(out, "meshlet_http_requests_total{code=\"403\"} 1");
	assert_null(strstr(out, "code=\"99\""));
	assert_null(strstr(out, "code=\"404\""));
	assert_line(out, "meshlet_policy_decisions_total{decision=\"allow\",rule=\"frontend-reads\"} 1");
	assert_line(out, "meshlet_policy_decisions_total{decision=\"deny\",rule=\"no-admin\"} 1");
	assert_line(out, "meshlet_cert_expiry_timestamp_seconds 1795773600");
	assert_line(out, "meshlet_config_version 7");
	assert_line(out, "meshlet_control_connected 1");
	free(out);
	metrics_free(m);
}

static void test_decision_stable(void **state)
{
	struct metrics *m = metrics_new();
	struct metrics_decision *a, *b, *c, *d;
	char *out;

	(void)state;
	a = metrics_decision(m, 1, "r1");
	b = metrics_decision(m, 0, "r1");
	c = metrics_decision(m, 1, "r2");
	assert_true(a && b && c);
	assert_ptr_not_equal(a, b);
	assert_ptr_not_equal(a, c);
	/* Same pair, same counter, however allow is spelled. */
	assert_ptr_equal(metrics_decision(m, 1, "r1"), a);
	assert_ptr_equal(metrics_decision(m, 7, "r1"), a);
	assert_ptr_equal(metrics_decision(m, 0, "r1"), b);
	/* Creating more does not move earlier counters. */
	for (int i = 0; i < 100; i++) {
		char rule[16];
		snprintf(rule, sizeof(rule), "x%d", i);
		assert_non_null(metrics_decision(m, i & 1, rule));
	}
	assert_ptr_equal(metrics_decision(m, 1, "r2"), c);
	d = metrics_decision(m, 0, NULL);
	assert_ptr_equal(metrics_decision(m, 0, ""), d);
	metrics_add(&a->count, 5);
	metrics_inc(&b->count);

	out = render(m);
	assert_line(out, "meshlet_policy_decisions_total{decision=\"allow\",rule=\"r1\"} 5");
	assert_line(out, "meshlet_policy_decisions_total{decision=\"deny\",rule=\"r1\"} 1");
	assert_line(out, "meshlet_policy_decisions_total{decision=\"allow\",rule=\"r2\"} 0");
	assert_line(out, "meshlet_policy_decisions_total{decision=\"deny\",rule=\"\"} 0");
	/* Each pair is listed once. */
	const char *p = strstr(out, "rule=\"r1\"} 5");
	assert_non_null(p);
	assert_null(strstr(p + 1, "decision=\"allow\",rule=\"r1\""));
	free(out);
	metrics_free(m);
	assert_null(metrics_decision(NULL, 1, "r"));
}

struct race {
	struct metrics *m;
	struct metrics_decision *got[64];
};

static void *race_worker(void *arg)
{
	struct race *r = arg;

	for (int i = 0; i < 64; i++) {
		char rule[16];
		snprintf(rule, sizeof(rule), "rule-%d", i);
		r->got[i] = metrics_decision(r->m, 1, rule);
		metrics_inc(&r->got[i]->count);
	}
	return NULL;
}

/* Concurrent finds-or-creates agree on one counter per pair. */
static void test_decision_threads(void **state)
{
	struct race r[4];
	pthread_t t[4];
	struct metrics *m = metrics_new();

	(void)state;
	for (int i = 0; i < 4; i++) {
		r[i].m = m;
		assert_int_equal(pthread_create(&t[i], NULL, race_worker, &r[i]), 0);
	}
	for (int i = 0; i < 4; i++)
		assert_int_equal(pthread_join(t[i], NULL), 0);
	for (int j = 0; j < 64; j++) {
		for (int i = 1; i < 4; i++)
			assert_ptr_equal(r[i].got[j], r[0].got[j]);
		assert_int_equal(atomic_load(&r[0].got[j]->count), 4);
	}
	metrics_free(m);
}

static void test_histogram(void **state)
{
	static const double obs[] = {
		0.0001, 0.0005,            /* le 0.0005 (inclusive bound) */
		0.0007,                    /* le 0.001 */
		0.003,                     /* le 0.005 */
		0.2, 0.25,                 /* le 0.25 */
		1.0,                       /* le 1 */
		2.6, 100.0,                /* +Inf only */
		-1.0,                      /* counted as 0 */
	};
	struct metrics *m = metrics_new();
	char *out;

	(void)state;
	for (size_t i = 0; i < sizeof(obs) / sizeof(obs[0]); i++)
		metrics_observe_duration(m, obs[i]);
	out = render(m);
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.0005\"} 3");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.001\"} 4");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.0025\"} 4");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.005\"} 5");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.01\"} 5");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.025\"} 5");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.05\"} 5");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.1\"} 5");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.25\"} 7");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"0.5\"} 7");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"1\"} 8");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"2.5\"} 8");
	assert_line(out, "meshlet_request_duration_seconds_bucket{le=\"+Inf\"} 10");
	assert_line(out, "meshlet_request_duration_seconds_count 10");
	/* 0.0001+0.0005+0.0007+0.003+0.2+0.25+1+2.6+100 = 104.0543 */
	assert_line(out, "meshlet_request_duration_seconds_sum 104.054300");
	/* Buckets come in increasing order, +Inf last, then _sum and _count. */
	const char *b1 = strstr(out, "le=\"0.0005\"");
	const char *b2 = strstr(out, "le=\"2.5\"");
	const char *b3 = strstr(out, "le=\"+Inf\"");
	const char *sum = strstr(out, "_sum ");
	assert_true(b1 && b2 && b3 && sum);
	assert_true(b1 < b2 && b2 < b3 && b3 < sum);
	free(out);
	metrics_free(m);
}

static void test_label_escaping(void **state)
{
	struct metrics *m = metrics_new();
	char *out;

	(void)state;
	metrics_inc(&metrics_decision(m, 0, "a\"b\\c\nd")->count);
	out = render(m);
	assert_line(out, "meshlet_policy_decisions_total{decision=\"deny\",rule=\"a\\\"b\\\\c\\nd\"} 1");
	free(out);
	metrics_free(m);
}

/* The one-label families (rate limits, faults): a series per label, made
 * once and stable, kept apart by family, escaped like the others. */
static void test_labeled(void **state)
{
	struct metrics *m = metrics_new();
	struct metrics_labeled *a, *b, *f;
	char *out;

	(void)state;
	a = metrics_labeled(m, MF_RATE_LIMITED, "fe-rps");
	b = metrics_labeled(m, MF_RATE_LIMITED, "fe-rps");
	f = metrics_labeled(m, MF_FAULTS, "fe-rps");
	assert_non_null(a);
	assert_ptr_equal(a, b);
	assert_ptr_not_equal(a, f);
	assert_null(metrics_labeled(m, MF_COUNT, "x"));
	metrics_inc(&a->count);
	metrics_inc(&a->count);
	metrics_inc(&f->count);
	metrics_inc(&metrics_labeled(m, MF_FAULTS, "q\"x")->count);
	out = render(m);
	assert_line(out, "meshlet_rate_limited_total{limit=\"fe-rps\"} 2");
	assert_line(out, "meshlet_faults_injected_total{fault=\"fe-rps\"} 1");
	assert_line(out, "meshlet_faults_injected_total{fault=\"q\\\"x\"} 1");
	free(out);
	metrics_free(m);
}

/* The reason labels are fixed by docs/design.md: every one listed, from the first
 * scrape, and "none" is not a failure. */
static void test_tls_failure_labels(void **state)
{
	static const char *const labels[] = {
		"no_certificate", "no_uri_san", "multiple_uri_sans", "bad_spiffe_id",
		"wrong_trust_domain", "not_a_service", "leaf_is_ca", "bad_key_usage",
		"bad_ext_key_usage", "wrong_identity", "revoked", "no_basic_constraints",
		"handshake", "untrusted", "expired", "no_peer_certificate", "timeout",
	};
	struct metrics *m = metrics_new();
	char line[160], *out;

	(void)state;
	metrics_inc(&m->handshake_failures[TLS_FAIL_TIMEOUT]);
	out = render(m);
	for (size_t i = 0; i < sizeof(labels) / sizeof(labels[0]); i++) {
		snprintf(line, sizeof(line), "meshlet_tls_handshake_failures_total{reason=\"%s\"} %d",
		         labels[i], strcmp(labels[i], "timeout") == 0);
		assert_line(out, line);
	}
	assert_null(strstr(out, "reason=\"none\""));
	assert_null(strstr(out, "reason=\"unknown\""));
	free(out);
	metrics_free(m);
}

static void test_render_error(void **state)
{
	struct metrics *m = metrics_new();
	FILE *f = fopen("/dev/full", "w");

	(void)state;
	assert_non_null(f);
	assert_int_equal(metrics_render(m, f), -EIO);
	fclose(f);
	assert_int_equal(metrics_render(NULL, stdout), -EIO);
	metrics_free(m);
	metrics_free(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_render_empty),
		cmocka_unit_test(test_render_after_updates),
		cmocka_unit_test(test_decision_stable),
		cmocka_unit_test(test_decision_threads),
		cmocka_unit_test(test_histogram),
		cmocka_unit_test(test_label_escaping),
		cmocka_unit_test(test_labeled),
		cmocka_unit_test(test_tls_failure_labels),
		cmocka_unit_test(test_render_error),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
