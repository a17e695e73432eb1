/*
 * Unit tests for control/ctlmetrics.c: what the text says after known
 * counts, the bounds of its label sets, and the cumulative store histogram.
 * (The listener and the live counts: tests/integration/test_control_metrics.py.)
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "ctlmetrics.h"
#include "server.h"

static int h_none(struct api_call *call)
{
	(void)call;
	return 0;
}

static const struct route routes[] = {
	{ "GET", "/v1/health", AUTH_NONE, false, h_none },
	{ "PUT", "/v1/policies/{svc}", AUTH_ADMIN, true, h_none },
	{ NULL, NULL, AUTH_NONE, false, NULL },
};

/* The rendering of m with g, as a NUL-terminated string to free. */
static char *render(struct ctlmetrics *m, const struct ctlmetrics_gauges *g)
{
	char *text = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	assert_non_null(f);
	assert_int_equal(ctlmetrics_render(m, g, f), 0);
	fclose(f);
	return text;
}

static void assert_line(const char *text, const char *line)
{
	char want[512];

	snprintf(want, sizeof(want), "\n%s\n", line);
	if (!strstr(text, want))
		fail_msg("missing line %s in:\n%s", line, text);
}

static void test_requests_by_route_method_and_code(void **state)
{
	struct ctlmetrics *m = ctlmetrics_new(routes);
	struct ctlmetrics_gauges g = { .long_polls = 3, .ca_phase = CA_PHASE_PREPARED };
	char *text;

	(void)state;
	assert_non_null(m);
	ctlmetrics_request(m, &routes[1], "PUT", 200);
	ctlmetrics_request(m, &routes[1], "PUT", 200);
	ctlmetrics_request(m, &routes[1], "PUT", 412);
	ctlmetrics_request(m, &routes[0], "HEAD", 200);
	ctlmetrics_request(m, NULL, "GET", 404);
	ctlmetrics_request(m, NULL, NULL, 405);
	ctlmetrics_issued(m, ISSUE_JOIN);
	ctlmetrics_issued(m, ISSUE_RENEWAL);
	ctlmetrics_issued(m, ISSUE_RENEWAL);
	ctlmetrics_issued(m, (enum ctlmetrics_issue)7);   /* ignored */
	text = render(m, &g);
	assert_line(text, "meshlet_control_api_requests_total{route=\"/v1/policies/{svc}\","
	            "method=\"PUT\",code=\"200\"} 2");
	assert_line(text, "meshlet_control_api_requests_total{route=\"/v1/policies/{svc}\","
	            "method=\"PUT\",code=\"412\"} 1");
	assert_line(text, "meshlet_control_api_requests_total{route=\"/v1/health\","
	            "method=\"HEAD\",code=\"200\"} 1");
	assert_line(text, "meshlet_control_api_requests_total{route=\"unmatched\","
	            "method=\"GET\",code=\"404\"} 1");
	assert_line(text, "meshlet_control_api_requests_total{route=\"unmatched\","
	            "method=\"OTHER\",code=\"405\"} 1");
	assert_line(text, "meshlet_control_certificates_issued_total{kind=\"join\"} 1");
	assert_line(text, "meshlet_control_certificates_issued_total{kind=\"renewal\"} 2");
	assert_line(text, "meshlet_control_long_polls_waiting 3");
	assert_line(text, "meshlet_control_ca_phase{phase=\"stable\"} 0");
	assert_line(text, "meshlet_control_ca_phase{phase=\"prepared\"} 1");
	assert_line(text, "meshlet_control_ca_phase{phase=\"switched\"} 0");
	assert_line(text, "# TYPE meshlet_control_store_duration_seconds histogram");
	free(text);
	ctlmetrics_free(m);
}

/* However many distinct statuses come, the series stop at the cap and the
 * rest is counted as dropped. */
static void test_series_are_capped(void **state)
{
	struct ctlmetrics *m = ctlmetrics_new(routes);
	struct ctlmetrics_gauges g = {0};
	char *text;
	size_t lines = 0;

	(void)state;
	for (int i = 0; i < 3; i++)
		for (int code = 100; code < 600; code++)
			ctlmetrics_request(m, &routes[i % 2], i == 2 ? "POST" : "GET", code);
	text = render(m, &g);
	for (const char *p = text; (p = strstr(p, "\nmeshlet_control_api_requests_total{")); p++)
		lines++;
	assert_int_equal(lines, 1024);
	assert_line(text, "meshlet_control_api_requests_dropped_total 476");
	free(text);
	ctlmetrics_free(m);
}

static void test_store_histogram_is_cumulative(void **state)
{
	struct ctlmetrics *m = ctlmetrics_new(routes);
	struct ctlmetrics_gauges g = {0};
	char *text;

	(void)state;
	ctlmetrics_store_observe(m, STORE_CALL_GET, 0.00005);   /* le 0.0001 */
	ctlmetrics_store_observe(m, STORE_CALL_GET, 0.0003);    /* le 0.0005 */
	ctlmetrics_store_observe(m, STORE_CALL_GET, 5);         /* +Inf */
	ctlmetrics_store_observe(m, STORE_CALL_GET, -1);        /* counts as 0 */
	ctlmetrics_store_observe(m, STORE_CALL_APPLY, 0.002);
	ctlmetrics_store_observe(m, STORE_CALL_COUNT, 0.002);   /* ignored */
	text = render(m, &g);
	assert_line(text, "meshlet_control_store_duration_seconds_bucket{op=\"get\",le=\"0.0001\"} 2");
	assert_line(text, "meshlet_control_store_duration_seconds_bucket{op=\"get\",le=\"0.00025\"} 2");
	assert_line(text, "meshlet_control_store_duration_seconds_bucket{op=\"get\",le=\"0.0005\"} 3");
	assert_line(text, "meshlet_control_store_duration_seconds_bucket{op=\"get\",le=\"1\"} 3");
	assert_line(text, "meshlet_control_store_duration_seconds_bucket{op=\"get\",le=\"+Inf\"} 4");
	assert_line(text, "meshlet_control_store_duration_seconds_count{op=\"get\"} 4");
	assert_line(text, "meshlet_control_store_duration_seconds_sum{op=\"get\"} 5.000350000");
	assert_line(text, "meshlet_control_store_duration_seconds_count{op=\"apply\"} 1");
	assert_line(text, "meshlet_control_store_duration_seconds_count{op=\"list\"} 0");
	free(text);
	ctlmetrics_free(m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_requests_by_route_method_and_code),
		cmocka_unit_test(test_series_are_capped),
		cmocka_unit_test(test_store_histogram_is_cumulative),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
