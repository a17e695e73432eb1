/* proxy/endpick.c: endpoint choice, ejection on connect failures, the retry budget. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <cmocka.h>

#include "endpick.h"

#define SEC 1000000LL

static void addrs(struct config_addr *a, size_t n, unsigned first_port)
{
	memset(a, 0, n * sizeof(*a));
	for (size_t i = 0; i < n; i++) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&a[i].ss;

		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)(first_port + i));
		sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		a[i].len = sizeof(*sin);
		snprintf(a[i].text, sizeof(a[i].text), "127.0.0.1:%u", first_port + (unsigned)i);
	}
}

static int pick(struct endpick *p, const struct config_addr *a, size_t n, int64_t now)
{
	struct endpick_tried t = {0};

	return endpick_choose(p, 0, a, n, &t, now);
}

/* Round robin; a call never gets an endpoint twice, and runs out. */
static void test_round_robin_and_tried(void **state)
{
	struct endpick *p = endpick_new(1);
	struct config_addr a[3];
	struct endpick_tried t = {0};
	int seen[3] = {0};

	(void)state;
	addrs(a, 3, 9000);
	for (int i = 0; i < 6; i++)
		seen[pick(p, a, 3, 0)]++;
	assert_int_equal(seen[0], 2);
	assert_int_equal(seen[1], 2);
	assert_int_equal(seen[2], 2);
	for (int i = 0; i < 3; i++) {
		int e = endpick_choose(p, 0, a, 3, &t, 0);

		assert_in_range(e, 0, 2);
		seen[e] += 10;
	}
	assert_int_equal(seen[0] + seen[1] + seen[2], 36);    /* each once */
	assert_int_equal(endpick_choose(p, 0, a, 3, &t, 0), -1);
	/* Hostile: no endpoints, a listener out of range. */
	assert_int_equal(pick(p, a, 0, 0), -1);
	assert_int_equal(endpick_choose(p, 7, a, 3, &(struct endpick_tried){0}, 0), -1);
	assert_false(endpick_report(p, 7, &a[0], true, &(struct traffic_outlier){1, 1000, 100}, 0));
	endpick_free(p);
}

/* Two failures eject for 1 s; it gets no picks, then comes back; failing
 * again it is out for 2 s; a success ends the doubling. */
static void test_eject_and_return(void **state)
{
	struct traffic_outlier cfg = { .consecutive_failures = 2, .eject_ms = 1000,
	                               .max_ejected_percent = 50 };
	struct endpick *p = endpick_new(1);
	struct config_addr a[3];

	(void)state;
	addrs(a, 3, 9100);
	assert_false(endpick_report(p, 0, &a[1], true, &cfg, 0));    /* before any choice: no state */
	pick(p, a, 3, 0);
	assert_false(endpick_report(p, 0, &a[1], true, &cfg, 0));
	assert_true(endpick_report(p, 0, &a[1], true, &cfg, 0));
	assert_int_equal(endpick_ejected(p), 1);
	for (int i = 0; i < 10; i++)
		assert_int_not_equal(pick(p, a, 3, SEC / 2), 1);
	/* Back after eject_ms: the next choices include it, the gauge drops. */
	int back = 0;

	for (int i = 0; i < 3; i++)
		back += pick(p, a, 3, SEC) == 1;
	assert_int_equal(back, 1);
	assert_int_equal(endpick_ejected(p), 0);
	assert_false(endpick_report(p, 0, &a[1], true, &cfg, SEC));
	assert_true(endpick_report(p, 0, &a[1], true, &cfg, SEC));
	for (int i = 0; i < 6; i++)
		assert_int_not_equal(pick(p, a, 3, SEC + SEC * 19 / 10), 1);    /* doubled: 2 s */
	pick(p, a, 3, 3 * SEC);
	assert_int_equal(endpick_ejected(p), 0);
	assert_false(endpick_report(p, 0, &a[1], false, &cfg, 3 * SEC));    /* success: streak over */
	assert_false(endpick_report(p, 0, &a[1], true, &cfg, 3 * SEC));
	assert_true(endpick_report(p, 0, &a[1], true, &cfg, 3 * SEC));
	pick(p, a, 3, 4 * SEC);    /* 1 s again, not 4 */
	assert_int_equal(endpick_ejected(p), 0);
	endpick_free(p);
}

/* Never more than the cap ejected; when only ejected endpoints are left
 * untried, the call still gets one. */
static void test_cap_and_fallback(void **state)
{
	struct traffic_outlier cfg = { .consecutive_failures = 1, .eject_ms = 10000,
	                               .max_ejected_percent = 50 };
	struct endpick *p = endpick_new(1);
	struct config_addr a[4];
	struct endpick_tried t = {0};
	size_t ejected = 0;

	(void)state;
	addrs(a, 4, 9200);
	pick(p, a, 4, 0);
	for (size_t i = 0; i < 4; i++)
		ejected += endpick_report(p, 0, &a[i], true, &cfg, 0);
	assert_int_equal(ejected, 2);
	assert_int_equal(endpick_ejected(p), 2);
	/* Endpoints 0 and 1 are out: a call tries 2, 3, then falls back to them. */
	int first = endpick_choose(p, 0, a, 4, &t, 1), second = endpick_choose(p, 0, a, 4, &t, 1);

	assert_true(first >= 2 && second >= 2 && first != second);
	assert_in_range(endpick_choose(p, 0, a, 4, &t, 1), 0, 1);
	assert_in_range(endpick_choose(p, 0, a, 4, &t, 1), 0, 1);
	assert_int_equal(endpick_choose(p, 0, a, 4, &t, 1), -1);
	endpick_free(p);
}

/* A new endpoint list keeps the state of the addresses it still has. */
static void test_follows_endpoint_changes(void **state)
{
	struct traffic_outlier cfg = { .consecutive_failures = 1, .eject_ms = 10000,
	                               .max_ejected_percent = 100 };
	struct endpick *p = endpick_new(1);
	struct config_addr a[3], b[2];

	(void)state;
	addrs(a, 3, 9300);
	pick(p, a, 3, 0);
	assert_true(endpick_report(p, 0, &a[2], true, &cfg, 0));    /* 9302 out */
	addrs(b, 2, 9302);                                       /* 9302, 9303 */
	for (int i = 0; i < 4; i++)
		assert_int_equal(pick(p, b, 2, 1), 1);
	assert_int_equal(endpick_ejected(p), 1);
	addrs(b, 2, 9303);                                       /* 9303, 9304: 9302 gone */
	pick(p, b, 2, 1);
	assert_int_equal(endpick_ejected(p), 0);
	/* A report for an address no longer listed (an older snapshot's) is ignored. */
	assert_false(endpick_report(p, 0, &a[2], true, &cfg, 1));
	assert_int_equal(endpick_ejected(p), 0);
	assert_true(endpick_report(p, 0, &b[1], true, &cfg, 1));
	endpick_free(p);
}

/* Retries stay within the budget's share of first attempts. */
static void test_retry_budget(void **state)
{
	struct endpick *p = endpick_new(1);
	unsigned allowed = 0;

	(void)state;
	for (int i = 0; i < 100; i++)
		endpick_first_attempt(p, 0, i * 10000);
	for (int i = 0; i < 100; i++)
		allowed += endpick_may_retry(p, 0, 20, SEC);
	assert_int_equal(allowed, 20);
	assert_false(endpick_may_retry(p, 3, 20, SEC));
	endpick_free(p);
}

/* Which methods may go again once they reached the upstream; hostile spellings are not. */
static void test_idempotent(void **state)
{
	static const char *const yes[] = { "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE" };
	static const char *const no[] = { "POST", "PATCH", "CONNECT", "get", "GETX", "", "GE" };

	(void)state;
	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++)
		assert_true(endpick_idempotent(yes[i], strlen(yes[i])));
	for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++)
		assert_false(endpick_idempotent(no[i], strlen(no[i])));
	/* The length rules, not a NUL: "GET" followed by more is not GET. */
	assert_false(endpick_idempotent("GETS", 4));
	assert_true(endpick_idempotent("GETS", 3));
}

/* retries.on, attempts, idempotence and a body that can be sent again all decide. */
static void test_retryable(void **state)
{
	struct traffic_retries cfg = { .attempts = 2, .on = TRAFFIC_ON_RESET };
	struct endpick_request get = { 0, true, true };
	struct endpick_request post = { 0, false, true };
	struct endpick_request big = { 0, true, false };
	struct endpick_request spent = { 2, true, true };

	(void)state;
	cfg.on_status[3] = true;    /* "503" */
	assert_true(endpick_retryable(&cfg, &get, ENDPICK_RESET, 0));
	assert_true(endpick_retryable(&cfg, &get, ENDPICK_STATUS, 503));
	assert_false(endpick_retryable(&cfg, &get, ENDPICK_STATUS, 502));
	assert_false(endpick_retryable(&cfg, &get, ENDPICK_STATUS, 404));
	assert_false(endpick_retryable(&cfg, &get, ENDPICK_TIMEOUT, 0));
	/* Never a POST once it was sent, nor a body no longer kept, nor past attempts. */
	assert_false(endpick_retryable(&cfg, &post, ENDPICK_RESET, 0));
	assert_false(endpick_retryable(&cfg, &post, ENDPICK_STATUS, 503));
	assert_false(endpick_retryable(&cfg, &big, ENDPICK_STATUS, 503));
	assert_false(endpick_retryable(&cfg, &spent, ENDPICK_RESET, 0));
	spent.retries = 1;
	assert_true(endpick_retryable(&cfg, &spent, ENDPICK_RESET, 0));
	/* "5xx" and "timeout". */
	cfg.on = TRAFFIC_ON_5XX | TRAFFIC_ON_TIMEOUT;
	assert_true(endpick_retryable(&cfg, &get, ENDPICK_STATUS, 500));
	assert_true(endpick_retryable(&cfg, &get, ENDPICK_STATUS, 599));
	assert_false(endpick_retryable(&cfg, &get, ENDPICK_STATUS, 600));
	assert_false(endpick_retryable(&cfg, &get, ENDPICK_RESET, 0));
	assert_true(endpick_retryable(&cfg, &get, ENDPICK_TIMEOUT, 0));
	/* No retries at all. */
	cfg.attempts = 0;
	assert_false(endpick_retryable(&cfg, &get, ENDPICK_TIMEOUT, 0));
	assert_false(endpick_retryable(NULL, &get, ENDPICK_TIMEOUT, 0));
}

/* A retry after every endpoint was tried starts over without moving the rotation. */
static void test_tried_restart(void **state)
{
	struct endpick *p = endpick_new(1);
	struct config_addr a[2];
	struct endpick_tried t = {0};
	int first, again;

	(void)state;
	addrs(a, 2, 9100);
	first = endpick_choose(p, 0, a, 1, &t, 0);
	assert_int_equal(first, 0);
	assert_int_equal(endpick_choose(p, 0, a, 1, &t, 0), -1);    /* one endpoint, tried */
	endpick_tried_restart(&t);
	assert_int_equal(endpick_choose(p, 0, a, 1, &t, 0), 0);     /* the same one, again */
	/* Two endpoints: the restarted call's choice leaves the next call's start alone. */
	memset(&t, 0, sizeof(t));
	first = endpick_choose(p, 0, a, 2, &t, 0);
	endpick_choose(p, 0, a, 2, &t, 0);
	endpick_tried_restart(&t);
	again = endpick_choose(p, 0, a, 2, &t, 0);
	assert_in_range(again, 0, 1);
	assert_int_equal(pick(p, a, 2, 0), 1 - first);    /* round robin went on from first */
	endpick_free(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_round_robin_and_tried),
		cmocka_unit_test(test_eject_and_return),
		cmocka_unit_test(test_cap_and_fallback),
		cmocka_unit_test(test_follows_endpoint_changes),
		cmocka_unit_test(test_retry_budget),
		cmocka_unit_test(test_idempotent),
		cmocka_unit_test(test_retryable),
		cmocka_unit_test(test_tried_restart),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
