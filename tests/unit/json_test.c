/* Unit tests for lib/json.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "meshlet/json.h"

/* Parses text (NUL-terminated) and returns it; fails the test on error. */
static json_t *parse_ok(const char *text)
{
	struct meshlet_err err = {0};
	json_t *v = json_parse_strict(text, strlen(text), MESHLET_JSON_MAX_DEPTH, &err);

	if (!v)
		fail_msg("parse failed: %s", err.message);
	return v;
}

/* Expects text to be refused with a message containing want. */
static void parse_bad(const char *text, size_t len, const char *want)
{
	struct meshlet_err err = {0};
	json_t *v = json_parse_strict(text, len, MESHLET_JSON_MAX_DEPTH, &err);

	if (v) {
		json_decref(v);
		fail_msg("accepted: %s", text);
	}
	if (!strstr(err.message, want))
		fail_msg("message \"%s\" lacks \"%s\"", err.message, want);
	assert_string_equal(err.path, "");
}

static void assert_err(const struct meshlet_err *err, const char *want)
{
	char buf[600];

	assert_string_equal(err_str(err, buf, sizeof(buf)), want);
}

static void test_parse_valid(void **state)
{
	json_t *v = parse_ok("{\"a\": [1, 2.5, \"x\", true, null], \"b\": {}}");

	assert_true(json_is_object(v));
	assert_int_equal(json_depth(v), 2);
	json_decref(v);
	/* Scalars at top level are accepted: the caller checks the type. */
	v = parse_ok("42");
	assert_true(json_is_integer(v));
	json_decref(v);
}

static void test_parse_refusals(void **state)
{
	parse_bad("{\"a\": 1} x", 10, "end of file expected");
	parse_bad("{\"a\": 1, \"a\": 2}", 16, "duplicate");
	parse_bad("{\"a\": \"\xff\"}", 10, "UTF-8");
	parse_bad("{\"a\": \"x\\u0000y\"}", 17, "\\u0000");
	parse_bad("{\"a\": \"x\0y\"}", 11, "line 1 column");
	parse_bad("{\"a\": }", 7, "line 1 column 7");
	parse_bad("", 0, "line");
	parse_bad("{\n  \"a\": tru\n}", 14, "line 2 column");
}

static void test_parse_null_input(void **state)
{
	struct meshlet_err err = {0};

	assert_null(json_parse_strict(NULL, 0, 32, &err));
	assert_string_equal(err.message, "no input");
}

/* n nested arrays: "[[[...]]]". */
static char *nested(int n)
{
	char *s = malloc((size_t)n * 2 + 1);

	assert_non_null(s);
	memset(s, '[', (size_t)n);
	memset(s + n, ']', (size_t)n);
	s[2 * n] = '\0';
	return s;
}

static void test_depth(void **state)
{
	struct meshlet_err err = {0};
	char *s = nested(32);
	json_t *v = json_parse_strict(s, strlen(s), 32, &err);

	assert_non_null(v);
	assert_int_equal(json_depth(v), 32);
	json_decref(v);
	free(s);

	s = nested(33);
	assert_null(json_parse_strict(s, strlen(s), 32, &err));
	assert_err(&err, "nesting deeper than 32");
	free(s);

	v = parse_ok("{\"a\": {\"b\": [1]}}");
	assert_int_equal(json_depth(v), 3);
	assert_int_equal(json_depth(json_object_get(v, "a")), 2);
	json_decref(v);
	v = json_integer(1);
	assert_int_equal(json_depth(v), 0);
	json_decref(v);
}

static void test_path_builders(void **state)
{
	char p[MESHLET_PATH_MAX], q[MESHLET_PATH_MAX];

	json_path_key(p, sizeof(p), "", "rules");
	assert_string_equal(p, "rules");
	json_path_index(q, sizeof(q), p, 1);
	assert_string_equal(q, "rules[1]");
	json_path_key(p, sizeof(p), q, "ports");
	json_path_index(q, sizeof(q), p, 0);
	assert_string_equal(q, "rules[1].ports[0]");
	json_path_key(p, sizeof(p), NULL, "a\nb");
	assert_string_equal(p, "a?b");
	/* Truncates rather than overflows. */
	json_path_key(p, 5, "abc", "def");
	assert_string_equal(p, "abc.");
}

static void test_err_str(void **state)
{
	struct meshlet_err err;
	char buf[64];

	assert_int_equal(err_set(&err, "tls.crt", "unknown %s", "field"), -EINVAL);
	assert_string_equal(err_str(&err, buf, sizeof(buf)), "tls.crt: unknown field");
	err_set(&err, "", "no mode");
	assert_string_equal(err_str(&err, buf, sizeof(buf)), "no mode");
	err_set(&err, NULL, "x");
	assert_string_equal(err.path, "");
	assert_int_equal(err_set(NULL, "a", "b"), -EINVAL);
	err_set(&err, "a", "bcdefgh");
	assert_string_equal(err_str(&err, buf, 5), "a: b");
}

static void test_check_object(void **state)
{
	static const char *const allowed[] = {"cert", "key", NULL};
	struct meshlet_err err = {0};
	json_t *v = parse_ok("{\"cert\": 1, \"crt\": 2}");
	json_t *arr = parse_ok("[]");

	assert_int_equal(json_check_object(v, "tls", allowed, &err), -EINVAL);
	assert_err(&err, "tls.crt: unknown field");
	assert_int_equal(json_check_object(arr, "inbound[0]", allowed, &err), -EINVAL);
	assert_err(&err, "inbound[0]: must be an object");
	assert_int_equal(json_check_object(arr, "", allowed, &err), -EINVAL);
	assert_err(&err, "must be an object");
	json_object_del(v, "crt");
	assert_int_equal(json_check_object(v, "tls", allowed, &err), 0);
	json_decref(v);
	json_decref(arr);
}

static void test_get_str(void **state)
{
	struct meshlet_err err = {0};
	json_t *v = parse_ok("{\"s\": \"x\", \"n\": 1, \"z\": null}");
	const char *s = "untouched";

	assert_int_equal(json_get_str(v, "inbound[0]", "listen", false, &s, &err), 0);
	assert_string_equal(s, "untouched");
	assert_int_equal(json_get_str(v, "inbound[0]", "listen", true, &s, &err), -EINVAL);
	assert_err(&err, "inbound[0].listen: required");
	assert_int_equal(json_get_str(v, "", "n", false, &s, &err), -EINVAL);
	assert_err(&err, "n: must be a string");
	assert_int_equal(json_get_str(v, "", "z", false, &s, &err), -EINVAL);
	assert_err(&err, "z: must be a string");
	assert_int_equal(json_get_str(v, "", "s", true, &s, &err), 0);
	assert_string_equal(s, "x");
	json_decref(v);
}

static void test_get_int(void **state)
{
	struct meshlet_err err = {0};
	json_t *v = parse_ok("{\"i\": 8080, \"r\": 1.0, \"b\": true, \"big\": 70000, "
	                     "\"neg\": -1, \"s\": \"80\"}");
	long long out = 7;

	assert_int_equal(json_get_int(v, "x", "i", true, 1, 65535, &out, &err), 0);
	assert_int_equal(out, 8080);
	assert_int_equal(json_get_int(v, "x", "r", true, 1, 65535, &out, &err), -EINVAL);
	assert_err(&err, "x.r: must be an integer");
	assert_int_equal(json_get_int(v, "x", "b", true, 0, 1, &out, &err), -EINVAL);
	assert_err(&err, "x.b: must be an integer");
	assert_int_equal(json_get_int(v, "x", "s", true, 0, 100, &out, &err), -EINVAL);
	assert_err(&err, "x.s: must be an integer");
	assert_int_equal(json_get_int(v, "x", "big", true, 1, 65535, &out, &err), -EINVAL);
	assert_err(&err, "x.big: must be 1..65535");
	assert_int_equal(json_get_int(v, "", "neg", true, 0, 10, &out, &err), -EINVAL);
	assert_err(&err, "neg: must be 0..10");
	assert_int_equal(json_get_int(v, "", "missing", true, 0, 10, &out, &err), -EINVAL);
	assert_err(&err, "missing: required");
	assert_int_equal(json_get_int(v, "", "missing", false, 0, 10, &out, &err), 0);
	assert_int_equal(out, 8080);
	json_decref(v);
}

static void test_as_int_str(void **state)
{
	struct meshlet_err err = {0};
	json_t *v = parse_ok("[0, \"a\", 3]");
	long long i;
	const char *s;

	assert_int_equal(json_as_int(json_array_get(v, 0), "rules[1].ports[0]", 1, 65535, &i,
	                             &err), -EINVAL);
	assert_err(&err, "rules[1].ports[0]: must be 1..65535");
	assert_int_equal(json_as_int(json_array_get(v, 2), "p", 1, 65535, &i, &err), 0);
	assert_int_equal(i, 3);
	assert_int_equal(json_as_str(json_array_get(v, 1), "p", &s, &err), 0);
	assert_string_equal(s, "a");
	assert_int_equal(json_as_str(json_array_get(v, 0), "m[0]", &s, &err), -EINVAL);
	assert_err(&err, "m[0]: must be a string");
	json_decref(v);

	/* A document built in code can hold NUL; it is refused all the same. */
	v = json_stringn("a\0b", 3);
	assert_int_equal(json_as_str(v, "p", &s, &err), -EINVAL);
	assert_err(&err, "p: must not contain NUL");
	json_decref(v);
}

static void test_get_bool(void **state)
{
	struct meshlet_err err = {0};
	json_t *v = parse_ok("{\"t\": true, \"f\": false, \"n\": 1}");
	bool b = false;

	assert_int_equal(json_get_bool(v, "log", "t", false, &b, &err), 0);
	assert_true(b);
	assert_int_equal(json_get_bool(v, "log", "f", false, &b, &err), 0);
	assert_false(b);
	assert_int_equal(json_get_bool(v, "log", "n", false, &b, &err), -EINVAL);
	assert_err(&err, "log.n: must be true or false");
	assert_int_equal(json_get_bool(v, "log", "x", true, &b, &err), -EINVAL);
	assert_err(&err, "log.x: required");
	json_decref(v);
}

static void test_get_seconds(void **state)
{
	struct meshlet_err err = {0};
	json_t *v = parse_ok("{\"i\": 10, \"r\": 0.25, \"lo\": 0.05, \"hi\": 3601, "
	                     "\"s\": \"10\", \"b\": true}");
	uint32_t ms = 42;

	assert_int_equal(json_get_seconds(v, "t", "missing", 0.1, 3600, &ms, &err), 0);
	assert_int_equal(ms, 42);
	assert_int_equal(json_get_seconds(v, "t", "i", 0.1, 3600, &ms, &err), 0);
	assert_int_equal(ms, 10000);
	assert_int_equal(json_get_seconds(v, "t", "r", 0.1, 3600, &ms, &err), 0);
	assert_int_equal(ms, 250);
	assert_int_equal(json_get_seconds(v, "t", "lo", 0.1, 3600, &ms, &err), -EINVAL);
	assert_err(&err, "t.lo: must be 0.1..3600 seconds");
	assert_int_equal(json_get_seconds(v, "t", "hi", 0.1, 3600, &ms, &err), -EINVAL);
	assert_err(&err, "t.hi: must be 0.1..3600 seconds");
	assert_int_equal(json_get_seconds(v, "t", "s", 0.1, 3600, &ms, &err), -EINVAL);
	assert_err(&err, "t.s: must be a number of seconds");
	assert_int_equal(json_get_seconds(v, "t", "b", 0.1, 3600, &ms, &err), -EINVAL);
	assert_err(&err, "t.b: must be a number of seconds");
	json_decref(v);
}

static void test_get_array_object(void **state)
{
	struct meshlet_err err = {0};
	json_t *v = parse_ok("{\"a\": [], \"o\": {}, \"s\": \"x\"}");
	const json_t *out = NULL;

	assert_int_equal(json_get_array(v, "", "a", true, &out, &err), 0);
	assert_true(json_is_array(out));
	assert_int_equal(json_get_array(v, "", "o", true, &out, &err), -EINVAL);
	assert_err(&err, "o: must be an array");
	assert_int_equal(json_get_array(v, "", "rules", true, &out, &err), -EINVAL);
	assert_err(&err, "rules: required");
	out = NULL;
	assert_int_equal(json_get_array(v, "", "rules", false, &out, &err), 0);
	assert_null(out);
	assert_int_equal(json_get_object(v, "", "o", true, &out, &err), 0);
	assert_true(json_is_object(out));
	assert_int_equal(json_get_object(v, "", "s", false, &out, &err), -EINVAL);
	assert_err(&err, "s: must be an object");
	assert_int_equal(json_get_object(v, "x", "tls", true, &out, &err), -EINVAL);
	assert_err(&err, "x.tls: required");
	json_decref(v);
}

/* Writes len bytes of data to a new temporary file; returns its name. */
static char *temp_file(const char *data, size_t len)
{
	char *name = strdup("/tmp/meshlet-json-test-XXXXXX");
	int fd;

	assert_non_null(name);
	fd = mkstemp(name);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, data, len), (ssize_t)len);
	close(fd);
	return name;
}

static void test_load(void **state)
{
	struct meshlet_err err = {0};
	char want[600];
	char *name = temp_file("{\"a\": 1}\n", 9);
	json_t *v = json_load_strict(name, 9, 32, &err);

	assert_non_null(v);
	json_decref(v);
	/* One byte over the limit. */
	assert_null(json_load_strict(name, 8, 32, &err));
	snprintf(want, sizeof(want), "%s: larger than 8 bytes", name);
	assert_err(&err, want);
	unlink(name);

	assert_null(json_load_strict(name, 100, 32, &err));
	snprintf(want, sizeof(want), "%s: cannot open: %s", name, strerror(ENOENT));
	assert_err(&err, want);
	free(name);

	assert_null(json_load_strict("/tmp", 100, 32, &err));
	snprintf(want, sizeof(want), "/tmp: cannot read: %s", strerror(EISDIR));
	assert_err(&err, want);

	name = temp_file("{\n\"a\": 1,\n\"a\": 2}", 17);
	assert_null(json_load_strict(name, 1000, 32, &err));
	assert_non_null(strstr(err.message, name));
	assert_non_null(strstr(err.message, "line 3"));
	assert_non_null(strstr(err.message, "duplicate"));
	unlink(name);
	free(name);
}

static void test_load_large(void **state)
{
	struct meshlet_err err = {0};
	size_t n = 300000, i;
	char *buf = malloc(n), *name;
	json_t *v;

	/* A big valid document: the reader must grow its buffer correctly. */
	assert_non_null(buf);
	buf[0] = '[';
	for (i = 1; i + 2 < n; i += 2)
		memcpy(buf + i, "1,", 2);
	buf[i - 1] = ']';
	for (; i < n; i++)
		buf[i] = ' ';
	name = temp_file(buf, n);
	v = json_load_strict(name, n, 32, &err);
	if (!v)
		fail_msg("%s", err.message);
	assert_int_equal(json_array_size(v), (n - 2) / 2);
	json_decref(v);
	assert_null(json_load_strict(name, n - 1, 32, &err));
	unlink(name);
	free(name);
	free(buf);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_valid),
		cmocka_unit_test(test_parse_refusals),
		cmocka_unit_test(test_parse_null_input),
		cmocka_unit_test(test_depth),
		cmocka_unit_test(test_path_builders),
		cmocka_unit_test(test_err_str),
		cmocka_unit_test(test_check_object),
		cmocka_unit_test(test_get_str),
		cmocka_unit_test(test_get_int),
		cmocka_unit_test(test_as_int_str),
		cmocka_unit_test(test_get_bool),
		cmocka_unit_test(test_get_seconds),
		cmocka_unit_test(test_get_array_object),
		cmocka_unit_test(test_load),
		cmocka_unit_test(test_load_large),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
