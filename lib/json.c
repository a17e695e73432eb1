/*
 * json: strict JSON reading on top of jansson, and the path-naming errors
 * every validator in lib/ reports.
 */
#include "meshlet/json.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Records path and message in err (may be NULL); always -EINVAL. */
int err_set(struct meshlet_err *err, const char *path, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return -EINVAL;
	snprintf(err->path, sizeof(err->path), "%s", path ? path : "");
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return -EINVAL;
}

/* "path: message" (or "message") into buf, truncated to len; returns buf. */
const char *err_str(const struct meshlet_err *err, char *buf, size_t len)
{
	if (len == 0)
		return buf;
	if (err->path[0])
		snprintf(buf, len, "%s: %s", err->path, err->message);
	else
		snprintf(buf, len, "%s", err->message);
	return buf;
}

/* Keys come from the document: control characters are replaced so that an
 * error message can always be printed on one line. */
static void path_sanitize(char *s)
{
	for (; *s; s++) {
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = '?';
	}
}

/* "base.key", or "key" when base is empty; truncated to len. */
void json_path_key(char *out, size_t len, const char *base, const char *key)
{
	if (len == 0)
		return;
	if (base && base[0])
		snprintf(out, len, "%s.%s", base, key);
	else
		snprintf(out, len, "%s", key);
	path_sanitize(out);
}

/* "base[i]"; truncated to len. */
void json_path_index(char *out, size_t len, const char *base, size_t i)
{
	snprintf(out, len, "%s[%zu]", base ? base : "", i);
}

/* Nesting depth: scalars 0, [] and {} 1. Recursive; jansson's parser caps
 * the depth of parsed documents at 2048. */
int json_depth(const json_t *v)
{
	int max = 0, d;

	if (json_is_array(v)) {
		size_t i;
		const json_t *e;

		json_array_foreach(v, i, e) {
			d = json_depth(e);
			if (d > max)
				max = d;
		}
		return max + 1;
	}
	if (json_is_object(v)) {
		const char *k;
		json_t *e;

		/* json_object_foreach wants a non-const object; it only reads. */
		json_object_foreach((json_t *)v, k, e) {
			d = json_depth(e);
			if (d > max)
				max = d;
		}
		return max + 1;
	}
	return 0;
}

/* jansson's texts are fine except where they name its own flags or leave
 * the rule unsaid; these two are the ones operators will meet. */
static const char *error_prefix(const json_error_t *je)
{
	return json_error_code(je) == json_error_invalid_utf8 ? "invalid UTF-8: " : "";
}

static const char *error_text(const json_error_t *je)
{
	if (json_error_code(je) == json_error_null_character)
		return "\\u0000 (NUL) is not allowed in strings";
	return je->text;
}

/* Parses with a source label ("" for buffers, the file name for files) that
 * prefixes the message. */
static json_t *parse_labelled(const char *text, size_t len, int max_depth, const char *label,
                              struct meshlet_err *err)
{
	json_error_t je;
	json_t *v;
	const char *sep = label[0] ? ": " : "";

	/* No JSON_ALLOW_NUL: "\u0000" in a string is refused; jansson also
	 * refuses invalid UTF-8 and, without JSON_DISABLE_EOF_CHECK, trailing
	 * data. JSON_DECODE_ANY: the caller checks the type and says which. */
	v = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
	if (!v) {
		err_set(err, "", "%s%sline %d column %d: %s%s", label, sep, je.line, je.column,
		        error_prefix(&je), error_text(&je));
		return NULL;
	}
	if (json_depth(v) > max_depth) {
		json_decref(v);
		err_set(err, "", "%s%snesting deeper than %d", label, sep, max_depth);
		return NULL;
	}
	return v;
}

/* A new reference to the parsed value, or NULL with err set (line and
 * column of jansson's complaint, or the depth limit). */
json_t *json_parse_strict(const char *text, size_t len, int max_depth, struct meshlet_err *err)
{
	if (!text) {
		err_set(err, "", "no input");
		return NULL;
	}
	return parse_labelled(text, len, max_depth, "", err);
}

/* Reads all of fd, refusing more than max_bytes. Returns 0 and a malloc'ed
 * buffer in *out, or a negative errno (-EFBIG when too large). */
static int read_bounded(int fd, size_t max_bytes, char **out, size_t *out_len)
{
	/* One byte beyond max_bytes is enough to tell "too large". */
	size_t limit = max_bytes < SIZE_MAX ? max_bytes + 1 : SIZE_MAX;
	size_t cap = limit < 4096 ? limit : 4096, len = 0;
	char *buf = malloc(cap), *nb;
	ssize_t n;

	if (!buf)
		return -ENOMEM;
	for (;;) {
		if (len == cap) {
			if (cap >= limit)
				goto too_big;
			cap = cap > limit / 2 ? limit : cap * 2;
			nb = realloc(buf, cap);
			if (!nb)
				goto nomem;
			buf = nb;
		}
		n = read(fd, buf + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			goto io;
		if (n == 0)
			break;
		len += (size_t)n;
		if (len > max_bytes)
			goto too_big;
	}
	*out = buf;
	*out_len = len;
	return 0;
io:
	n = -errno;
	free(buf);
	return (int)n;
too_big:
	free(buf);
	return -EFBIG;
nomem:
	free(buf);
	return -ENOMEM;
}

/* As json_parse_strict on the contents of file; errors name the file (and
 * the errno string for I/O errors). */
json_t *json_load_strict(const char *file, size_t max_bytes, int max_depth,
                         struct meshlet_err *err)
{
	char *buf = NULL;
	size_t len = 0;
	json_t *v;
	int fd, rc;

	fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		err_set(err, "", "%s: cannot open: %s", file, strerror(errno));
		return NULL;
	}
	rc = read_bounded(fd, max_bytes, &buf, &len);
	close(fd);
	if (rc == -EFBIG) {
		err_set(err, "", "%s: larger than %zu bytes", file, max_bytes);
		return NULL;
	}
	if (rc < 0) {
		err_set(err, "", "%s: cannot read: %s", file, strerror(-rc));
		return NULL;
	}
	v = parse_labelled(buf, len, max_depth, file, err);
	free(buf);
	return v;
}

/* 0, or -EINVAL for a non-object or the first key not in allowed. */
int json_check_object(const json_t *obj, const char *path, const char *const *allowed,
                      struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const char *key;
	json_t *v;
	size_t i;

	if (!json_is_object(obj))
		return err_set(err, path, "must be an object");
	json_object_foreach((json_t *)obj, key, v) {
		for (i = 0; allowed[i]; i++) {
			if (strcmp(key, allowed[i]) == 0)
				break;
		}
		if (!allowed[i]) {
			json_path_key(p, sizeof(p), path, key);
			return err_set(err, p, "unknown field");
		}
	}
	return 0;
}

/* Looks key up; *v is NULL when absent. Errors only for a missing required
 * field. JSON null counts as present (and so as a wrong type). */
static int get_field(const json_t *obj, const char *path, const char *key, bool required,
                     const json_t **v, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];

	*v = json_object_get(obj, key);
	if (!*v && required) {
		json_path_key(p, sizeof(p), path, key);
		return err_set(err, p, "required");
	}
	return 0;
}

/* A string without NUL, borrowed from v; else -EINVAL naming path. */
int json_as_str(const json_t *v, const char *path, const char **out, struct meshlet_err *err)
{
	if (!json_is_string(v))
		return err_set(err, path, "must be a string");
	/* Belt and braces: the parser refuses NUL, but a document built in
	 * code may not have gone through it. */
	if (strlen(json_string_value(v)) != json_string_length(v))
		return err_set(err, path, "must not contain NUL");
	*out = json_string_value(v);
	return 0;
}

/* An integer (not a real, not a boolean) in min..max; else -EINVAL. */
int json_as_int(const json_t *v, const char *path, long long min, long long max,
                long long *out, struct meshlet_err *err)
{
	json_int_t i;

	/* json_is_integer is false for reals and booleans: 1.0 and true are
	 * refused rather than silently converted. */
	if (!json_is_integer(v))
		return err_set(err, path, "must be an integer");
	i = json_integer_value(v);
	if (i < min || i > max)
		return err_set(err, path, "must be %lld..%lld", min, max);
	*out = (long long)i;
	return 0;
}

/* Getters: absent = 0 and *out untouched (or "required"); present = checked
 * as by json_as_* / the type named; errors name path.key. */
int json_get_str(const json_t *obj, const char *path, const char *key, bool required,
                 const char **out, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *v;

	if (get_field(obj, path, key, required, &v, err) < 0)
		return -EINVAL;
	if (!v)
		return 0;
	json_path_key(p, sizeof(p), path, key);
	return json_as_str(v, p, out, err);
}

int json_get_int(const json_t *obj, const char *path, const char *key, bool required,
                 long long min, long long max, long long *out, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *v;

	if (get_field(obj, path, key, required, &v, err) < 0)
		return -EINVAL;
	if (!v)
		return 0;
	json_path_key(p, sizeof(p), path, key);
	return json_as_int(v, p, min, max, out, err);
}

int json_get_bool(const json_t *obj, const char *path, const char *key, bool required,
                  bool *out, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *v;

	if (get_field(obj, path, key, required, &v, err) < 0)
		return -EINVAL;
	if (!v)
		return 0;
	if (!json_is_boolean(v)) {
		json_path_key(p, sizeof(p), path, key);
		return err_set(err, p, "must be true or false");
	}
	*out = json_is_true(v);
	return 0;
}

/* Integer or real seconds in min..max (never negative), rounded to ms. */
int json_get_seconds(const json_t *obj, const char *path, const char *key, double min,
                     double max, uint32_t *out_ms, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *v;
	double s, ms;

	if (get_field(obj, path, key, false, &v, err) < 0)
		return -EINVAL;
	if (!v)
		return 0;
	json_path_key(p, sizeof(p), path, key);
	if (!json_is_number(v))
		return err_set(err, p, "must be a number of seconds");
	s = json_number_value(v);
	/* Written so that NaN fails too. */
	if (!(s >= min && s <= max))
		return err_set(err, p, "must be %g..%g seconds", min, max);
	if (s < 0)
		return err_set(err, p, "must not be negative");
	/* Rounded to the nearest ms by hand: lib/ does not link libm. */
	ms = s * 1000.0 + 0.5;
	if (ms >= (double)UINT32_MAX)
		return err_set(err, p, "too large");
	*out_ms = (uint32_t)ms;
	return 0;
}

/* A field that must be of JSON type t ("an array", "an object"); *out borrowed. */
static int get_typed(const json_t *obj, const char *path, const char *key, bool required,
                     json_type t, const char *what, const json_t **out,
                     struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *v;

	if (get_field(obj, path, key, required, &v, err) < 0)
		return -EINVAL;
	if (!v)
		return 0;
	if (json_typeof(v) != t) {
		json_path_key(p, sizeof(p), path, key);
		return err_set(err, p, "must be %s", what);
	}
	*out = v;
	return 0;
}

int json_get_array(const json_t *obj, const char *path, const char *key, bool required,
                   const json_t **out, struct meshlet_err *err)
{
	return get_typed(obj, path, key, required, JSON_ARRAY, "an array", out, err);
}

int json_get_object(const json_t *obj, const char *path, const char *key, bool required,
                    const json_t **out, struct meshlet_err *err)
{
	return get_typed(obj, path, key, required, JSON_OBJECT, "an object", out, err);
}
