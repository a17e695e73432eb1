/*
 * Unit tests for control/tally.c: the counts by key the long-poll limits
 * (control/watch.c) are checked against on every poll.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "tally.h"

static void test_counts_up_and_down(void **state)
{
	struct tally t = {0};

	(void)state;
	assert_int_equal(tally_get(&t, "orders"), 0);
	assert_int_equal(tally_inc(&t, "orders"), 0);
	assert_int_equal(tally_inc(&t, "orders"), 0);
	assert_int_equal(tally_inc(&t, "billing"), 0);
	assert_int_equal(tally_get(&t, "orders"), 2);
	assert_int_equal(tally_get(&t, "billing"), 1);
	assert_int_equal(tally_get(&t, "order"), 0);       /* a prefix is another key */
	assert_int_equal(tally_keys(&t), 2);
	assert_int_equal(tally_dec(&t, "orders"), 0);
	assert_int_equal(tally_get(&t, "orders"), 1);
	assert_int_equal(tally_dec(&t, "orders"), 0);
	assert_int_equal(tally_get(&t, "orders"), 0);
	assert_int_equal(tally_keys(&t), 1);               /* a key at zero is gone */
	tally_free(&t);
	assert_int_equal(tally_get(&t, "billing"), 0);
	assert_int_equal(tally_keys(&t), 0);
}

/* Taking from a key that was never counted (or an empty tally) changes
 * nothing and says so; the count never wraps below zero. */
static void test_dec_of_absent_key_is_refused(void **state)
{
	struct tally t;

	(void)state;
	tally_init(&t);
	assert_int_equal(tally_dec(&t, "ghost"), -ENOENT);
	assert_int_equal(tally_inc(&t, "real"), 0);
	assert_int_equal(tally_dec(&t, "ghost"), -ENOENT);
	assert_int_equal(tally_dec(&t, "real"), 0);
	assert_int_equal(tally_dec(&t, "real"), -ENOENT);
	assert_int_equal(tally_get(&t, "real"), 0);
	assert_int_equal(tally_keys(&t), 0);
	tally_free(&t);
}

/* Many keys (the table grows several times), then all removed again in
 * another order: every count is exact throughout. */
static void test_many_keys_survive_growth(void **state)
{
	enum { N = 20000 };
	struct tally t = {0};
	char key[48];

	(void)state;
	for (int i = 0; i < N; i++) {
		snprintf(key, sizeof(key), "%040x", i * 7919);
		for (int k = 0; k <= i % 3; k++)
			assert_int_equal(tally_inc(&t, key), 0);
	}
	assert_int_equal(tally_keys(&t), N);
	for (int i = N - 1; i >= 0; i--) {
		snprintf(key, sizeof(key), "%040x", i * 7919);
		assert_int_equal(tally_get(&t, key), (size_t)(i % 3 + 1));
		assert_int_equal(tally_dec(&t, key), 0);
	}
	for (int i = 0; i < N; i += 2) {
		snprintf(key, sizeof(key), "%040x", i * 7919);
		assert_int_equal(tally_get(&t, key), (size_t)(i % 3));
	}
	tally_free(&t);
}

/* Hostile keys: empty, very long, bytes above 0x7f; each its own count. */
static void test_odd_keys(void **state)
{
	struct tally t = {0};
	char big[5000];

	(void)state;
	memset(big, 'a', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	assert_int_equal(tally_inc(&t, ""), 0);
	assert_int_equal(tally_inc(&t, big), 0);
	assert_int_equal(tally_inc(&t, "\xff\xfe"), 0);
	assert_int_equal(tally_get(&t, ""), 1);
	assert_int_equal(tally_get(&t, big), 1);
	big[100] = '\0';
	assert_int_equal(tally_get(&t, big), 0);
	assert_int_equal(tally_get(&t, "\xff\xfe"), 1);
	assert_int_equal(tally_keys(&t), 3);
	tally_free(&t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_counts_up_and_down),
		cmocka_unit_test(test_dec_of_absent_key_is_refused),
		cmocka_unit_test(test_many_keys_survive_growth),
		cmocka_unit_test(test_odd_keys),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
