/* Unit tests for proxy/bytequeue.c: order, partial takes across pieces,
 * the count, and clearing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "bytequeue.h"

static void test_fifo_across_pieces(void **state)
{
	struct bytequeue q = {0};
	char out[16];

	(void)state;
	assert_int_equal(bq_take(&q, out, sizeof(out)), 0);
	assert_int_equal(bq_add(&q, "hello ", 6), 0);
	assert_int_equal(bq_add(&q, "pooled ", 7), 0);
	assert_int_equal(bq_add(&q, "world", 5), 0);
	assert_int_equal(q.len, 18);
	/* A take that ends inside the second piece, then one that spans the rest. */
	assert_int_equal(bq_take(&q, out, 9), 9);
	assert_memory_equal(out, "hello poo", 9);
	assert_int_equal(q.len, 9);
	assert_int_equal(bq_take(&q, out, sizeof(out)), 9);
	assert_memory_equal(out, "led world", 9);
	assert_int_equal(q.len, 0);
	assert_null(q.first);
	assert_null(q.last);
	/* Usable again once empty. */
	assert_int_equal(bq_add(&q, "x", 1), 0);
	assert_int_equal(bq_take(&q, out, 1), 1);
	assert_int_equal(out[0], 'x');
}

static void test_zero_cap_and_clear(void **state)
{
	struct bytequeue q = {0};
	char big[40000], out[8];

	(void)state;
	memset(big, 'b', sizeof(big));
	assert_int_equal(bq_add(&q, big, sizeof(big)), 0);
	assert_int_equal(bq_take(&q, out, 0), 0);
	assert_int_equal(q.len, sizeof(big));
	bq_clear(&q);
	assert_int_equal(q.len, 0);
	assert_null(q.first);
	assert_int_equal(bq_take(&q, out, sizeof(out)), 0);
	bq_clear(&q);    /* clearing an empty queue is harmless */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_fifo_across_pieces),
		cmocka_unit_test(test_zero_cap_and_clear),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
