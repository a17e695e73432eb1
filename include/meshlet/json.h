/*
 * json: strict reading of JSON documents (config, policy, API bodies) on top
 * of jansson, with errors that name the JSON path of the offending value:
 *   rules[1].ports[0]: must be 1..65535
 */
#ifndef MESHLET_JSON_H
#define MESHLET_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#define MESHLET_JSON_MAX_DEPTH 32
#define MESHLET_PATH_MAX 256

/* A validation or load error: where (JSON path, may be "") and why. */
struct meshlet_err {
	char path[MESHLET_PATH_MAX];
	char message[256];
};

/* Records path and a printf-style message in err (err may be NULL).
 * Always returns -EINVAL so callers can `return err_set(...)`. */
int err_set(struct meshlet_err *err, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* "path: message", or "message" when path is empty, into buf. Returns buf. */
const char *err_str(const struct meshlet_err *err, char *buf, size_t len);

/* Path builders: "base.key" (or "key" when base is ""), and "base[i]". */
void json_path_key(char *out, size_t len, const char *base, const char *key);
void json_path_index(char *out, size_t len, const char *base, size_t i);

/*
 * Parses text of len bytes. Refuses invalid UTF-8, duplicate keys, NUL bytes
 * in strings, trailing garbage, and nesting deeper than max_depth.
 * Returns a new reference (caller json_decref()s) or NULL with err set.
 */
json_t *json_parse_strict(const char *text, size_t len, int max_depth, struct meshlet_err *err);

/* Reads and parses a file of at most max_bytes; as json_parse_strict. */
json_t *json_load_strict(const char *file, size_t max_bytes, int max_depth,
                         struct meshlet_err *err);

/* Nesting depth of v: scalars are 0, [] and {} are 1. */
int json_depth(const json_t *v);

/*
 * Checks that obj (at path) is an object whose keys are all in allowed
 * (a NULL-terminated list). Returns 0, or -EINVAL naming the first unknown
 * key ("tls.crt: unknown field") or "path: must be an object".
 */
int json_check_object(const json_t *obj, const char *path, const char *const *allowed,
                      struct meshlet_err *err);

/*
 * Field getters: look up key in obj (which is at path). A missing field
 * leaves *out untouched and returns 0, or -EINVAL ("path.key: required")
 * when required. A field of the wrong type or out of range returns -EINVAL
 * with the path and the expectation. Strings point into obj (borrowed).
 */
int json_get_str(const json_t *obj, const char *path, const char *key, bool required,
                 const char **out, struct meshlet_err *err);
int json_get_int(const json_t *obj, const char *path, const char *key, bool required,
                 long long min, long long max, long long *out, struct meshlet_err *err);
int json_get_bool(const json_t *obj, const char *path, const char *key, bool required,
                  bool *out, struct meshlet_err *err);
/* Seconds as a JSON number (integer or real), min <= v <= max; stored in ms. */
int json_get_seconds(const json_t *obj, const char *path, const char *key, double min,
                     double max, uint32_t *out_ms, struct meshlet_err *err);
/* An array (possibly empty); *out borrowed. */
int json_get_array(const json_t *obj, const char *path, const char *key, bool required,
                   const json_t **out, struct meshlet_err *err);
int json_get_object(const json_t *obj, const char *path, const char *key, bool required,
                    const json_t **out, struct meshlet_err *err);

/*
 * The same checks for a value already in hand (an array element at path):
 * json_as_str borrows the string from v; json_as_int refuses reals and
 * booleans. Return 0, or -EINVAL with err naming path.
 */
int json_as_str(const json_t *v, const char *path, const char **out, struct meshlet_err *err);
int json_as_int(const json_t *v, const char *path, long long min, long long max,
                long long *out, struct meshlet_err *err);

#endif
