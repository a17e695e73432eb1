/* Unit tests for lib/log.c: JSON escaping, level filtering, time format. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "meshlet/log.h"

struct esc_case {
	const char *in;
	const char *out;
};

static const struct esc_case esc_cases[] = {
	{ "", "" },
	{ "plain text", "plain text" },
	{ "say \"hi\"", "say \\\"hi\\\"" },
	{ "back\\slash", "back\\\\slash" },
	{ "a\nb\tc\rd", "a\\nb\\tc\\rd" },
	{ "\x01\x1f\x7f", "\\u0001\\u001f\\u007f" },
	{ "\b\f", "\\u0008\\u000c" },
	{ "/path", "/path" },
	{ "caf\xc3\xa9", "caf\xc3\xa9" },                         /* U+00E9 */
	{ "\xe2\x82\xac", "\xe2\x82\xac" },                       /* U+20AC */
	{ "\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80" },               /* U+1F600 */
	{ "\xef\xbf\xbf", "\xef\xbf\xbf" },                       /* U+FFFF */
	{ "\xf4\x8f\xbf\xbf", "\xf4\x8f\xbf\xbf" },               /* U+10FFFF */
	{ "a\xff" "b", "a\\ufffdb" },
	{ "\x80", "\\ufffd" },                                    /* lone continuation */
	{ "\xc3", "\\ufffd" },                                    /* truncated at end */
	{ "\xc3(", "\\ufffd(" },                                  /* bad continuation */
	{ "\xe2\x82", "\\ufffd" },                                /* one FFFD per maximal prefix */
	{ "\xe2\x82z", "\\ufffdz" },
	{ "\xc0\xaf", "\\ufffd\\ufffd" },                         /* overlong '/' */
	{ "\xe0\x80\xaf", "\\ufffd\\ufffd\\ufffd" },              /* overlong '/' */
	{ "\xed\xa0\x80", "\\ufffd\\ufffd\\ufffd" },              /* surrogate U+D800 */
	{ "\xf4\x90\x80\x80", "\\ufffd\\ufffd\\ufffd\\ufffd" },   /* > U+10FFFF */
	{ "\xf8\x88\x80\x80\x80", "\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd" },
};

static void test_escape_table(void **state)
{
	char out[256];

	(void)state;
	for (size_t i = 0; i < sizeof(esc_cases) / sizeof(esc_cases[0]); i++) {
		size_t n = log_json_escape(out, sizeof(out), esc_cases[i].in);
		if (strcmp(out, esc_cases[i].out) != 0)
			fail_msg("case %zu: got '%s', want '%s'", i, out, esc_cases[i].out);
		assert_int_equal(n, strlen(esc_cases[i].out));
	}
}

/* Truncation stops before a piece that does not fit whole. */
static void test_escape_truncation(void **state)
{
	char out[16];

	(void)state;
	/* len 4: 3 bytes of room; "ab" then "\n" (2 bytes) does not fit. */
	assert_int_equal(log_json_escape(out, 4, "ab\ncd"), 2);
	assert_string_equal(out, "ab");
	assert_int_equal(log_json_escape(out, 5, "ab\ncd"), 4);
	assert_string_equal(out, "ab\\n");
	/* \u0001 is 6 bytes. */
	assert_int_equal(log_json_escape(out, 7, "a\x01"), 1);
	assert_string_equal(out, "a");
	assert_int_equal(log_json_escape(out, 8, "a\x01"), 7);
	assert_string_equal(out, "a\\u0001");
	/* \ufffd is not split either. */
	assert_int_equal(log_json_escape(out, 6, "\xff"), 0);
	assert_string_equal(out, "");
	/* A valid multibyte character is not split. */
	assert_int_equal(log_json_escape(out, 4, "a\xe2\x82\xac"), 1);
	assert_string_equal(out, "a");
	assert_int_equal(log_json_escape(out, 5, "a\xe2\x82\xac"), 4);
	assert_string_equal(out, "a\xe2\x82\xac");
	/* Plain truncation. */
	assert_int_equal(log_json_escape(out, sizeof(out), "0123456789abcdefghij"), 15);
	assert_string_equal(out, "0123456789abcde");
	/* len 1: only the NUL; len 0: nothing written at all. */
	out[0] = 'x';
	assert_int_equal(log_json_escape(out, 1, "abc"), 0);
	assert_string_equal(out, "");
	out[0] = 'x';
	assert_int_equal(log_json_escape(out, 0, "abc"), 0);
	assert_int_equal(out[0], 'x');
	assert_int_equal(log_json_escape(out, sizeof(out), NULL), 0);
	assert_string_equal(out, "");
}

static void test_level_parse(void **state)
{
	enum log_level l = LOG_OFF;

	(void)state;
	assert_int_equal(log_level_parse("debug", &l), 0);
	assert_int_equal(l, LOG_DEBUG);
	assert_int_equal(log_level_parse("info", &l), 0);
	assert_int_equal(l, LOG_INFO);
	assert_int_equal(log_level_parse("warn", &l), 0);
	assert_int_equal(l, LOG_WARN);
	assert_int_equal(log_level_parse("error", &l), 0);
	assert_int_equal(l, LOG_ERROR);
	assert_int_equal(log_level_parse("INFO", &l), -EINVAL);
	assert_int_equal(log_level_parse("", &l), -EINVAL);
	assert_int_equal(log_level_parse("verbose", &l), -EINVAL);
	assert_int_equal(log_level_parse(NULL, &l), -EINVAL);
	assert_int_equal(l, LOG_ERROR);
}

static void test_level_filter(void **state)
{
	(void)state;
	log_init(LOG_WARN, "log_test");
	assert_false(log_enabled(LOG_DEBUG));
	assert_false(log_enabled(LOG_INFO));
	assert_true(log_enabled(LOG_WARN));
	assert_true(log_enabled(LOG_ERROR));
	assert_false(log_enabled(LOG_OFF));
	log_set_level(LOG_DEBUG);
	assert_true(log_enabled(LOG_DEBUG));
	log_set_level(LOG_OFF);
	assert_false(log_enabled(LOG_ERROR));
	log_set_level((enum log_level)42); /* ignored */
	assert_false(log_enabled(LOG_ERROR));
	log_set_level(LOG_INFO);
}

/* Runs fn with fd redirected to a temporary file; returns what it wrote
 * (malloc'd, NUL-terminated). */
static char *capture(int fd, void (*fn)(void))
{
	FILE *tmp = tmpfile();
	int saved = dup(fd);
	char *buf;
	long n;

	assert_non_null(tmp);
	assert_true(saved >= 0);
	fflush(stdout);
	fflush(stderr);
	assert_true(dup2(fileno(tmp), fd) >= 0);
	fn();
	assert_true(dup2(saved, fd) >= 0);
	close(saved);
	n = lseek(fileno(tmp), 0, SEEK_END);
	assert_true(n >= 0);
	buf = calloc(1, (size_t)n + 1);
	assert_non_null(buf);
	assert_int_equal(pread(fileno(tmp), buf, (size_t)n, 0), n);
	fclose(tmp);
	return buf;
}

static void write_some_levels(void)
{
	log_debug("hidden %d", 1);
	log_info("shown %d", 2);
	log_write(LOG_DEBUG, "hidden too");
	log_error("bad\nline");
}

static void test_write_filtered(void **state)
{
	char *out;

	(void)state;
	log_init(LOG_INFO, "meshlet-test");
	out = capture(STDERR_FILENO, write_some_levels);
	assert_null(strstr(out, "hidden"));
	/* "2026-11-27T10:00:00.123Z info meshlet-test: shown 2\n" */
	char *line = strstr(out, " info meshlet-test: shown 2\n");
	assert_non_null(line);
	assert_int_equal(line - out, 24);
	assert_int_equal(out[23], 'Z');
	assert_int_equal(out[10], 'T');
	/* A newline inside a message cannot start a forged line. */
	assert_non_null(strstr(out, " error meshlet-test: bad?line\n"));
	size_t lines = 0;
	for (char *p = out; *p; p++)
		lines += *p == '\n';
	assert_int_equal(lines, 2);
	free(out);
}

static void write_long(void)
{
	char big[10000];

	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	log_warn("%s", big);
}

static void test_write_truncates(void **state)
{
	char *out;
	size_t n;

	(void)state;
	log_init(LOG_INFO, "meshlet-test");
	out = capture(STDERR_FILENO, write_long);
	n = strlen(out);
	assert_true(n <= 4096);
	assert_true(n > 4000);
	assert_string_equal(out + n - 5, "x...\n");
	assert_ptr_equal(strchr(out, '\n'), out + n - 1);
	free(out);
}

static void write_access(void)
{
	static const char line[] = "{\"status\":200}";
	log_access(line, sizeof(line) - 1);
	log_access("{}garbage", 2);
}

static void test_access(void **state)
{
	char *out;

	(void)state;
	out = capture(STDOUT_FILENO, write_access);
	assert_string_equal(out, "{\"status\":200}\n{}\n");
	free(out);
}

static void test_format_time(void **state)
{
	char out[32];

	(void)state;
	/* 2026-11-27T10:00:00Z */
	log_format_time(out, sizeof(out), 1795773600LL, 123456789L);
	assert_string_equal(out, "2026-11-27T10:00:00.123Z");
	log_format_time(out, sizeof(out), 0, 0);
	assert_string_equal(out, "1970-01-01T00:00:00.000Z");
	log_format_time(out, sizeof(out), 951782400LL, 999999999L); /* leap day 2000 */
	assert_string_equal(out, "2000-02-29T00:00:00.999Z");
	log_format_time(out, sizeof(out), 1795773600LL, -5); /* bad nsec */
	assert_string_equal(out, "2026-11-27T10:00:00.000Z");
	log_format_time(out, 11, 1795773600LL, 0);
	assert_string_equal(out, "2026-11-27");
}

static void test_limit(void **state)
{
	struct log_limit l = LOG_LIMIT_INIT(1000);
	uint64_t held = 99;

	(void)state;
	/* The first line goes out, whatever the clock says. */
	assert_true(log_limit_pass(&l, 0, &held));
	assert_int_equal(held, 0);
	/* A storm within the second: held back and counted. */
	for (int i = 1; i < 1000; i++)
		assert_false(log_limit_pass(&l, (uint64_t)i, &held));
	/* One second on: one line, saying how many were held back. */
	assert_true(log_limit_pass(&l, 1000, &held));
	assert_int_equal(held, 999);
	assert_false(log_limit_pass(&l, 1999, &held));
	/* Quiet for a while: the next one goes out at once, the count restarted. */
	assert_true(log_limit_pass(&l, 60000, &held));
	assert_int_equal(held, 1);
	assert_true(log_limit_pass(&l, 61000, &held));
	assert_int_equal(held, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_escape_table),
		cmocka_unit_test(test_escape_truncation),
		cmocka_unit_test(test_level_parse),
		cmocka_unit_test(test_level_filter),
		cmocka_unit_test(test_write_filtered),
		cmocka_unit_test(test_write_truncates),
		cmocka_unit_test(test_access),
		cmocka_unit_test(test_format_time),
		cmocka_unit_test(test_limit),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
