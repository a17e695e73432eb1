/* http_head: lookups in a parsed head, and its serialisation with the
 * proxy's rewrites (see include/meshlet/http.h). */
#include "meshlet/http.h"

#include <errno.h>
#include <string.h>

#include "http-int.h"

/* ---- lookups ---------------------------------------------------------------- */

size_t http_head_count(const struct http_head *h, const char *name, const char **first)
{
	size_t i, n = 0;

	if (first)
		*first = NULL;
	for (i = 0; i < h->n_fields; i++) {
		if (!name_eq_loose(h->fields[i].name, h->fields[i].name_len, name))
			continue;
		if (n++ == 0 && first)
			*first = h->fields[i].value;
	}
	return n;
}

const char *http_head_find_duplicate(const struct http_head *h, const char *const *names,
                                     size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (http_head_count(h, names[i], NULL) > 1)
			return names[i];
	return NULL;
}

const char *http_head_policy_header(const void *ctx, const char *lname)
{
	const struct http_head *h = ctx;
	const char *v = NULL;
	size_t i, n = 0;

	/* Exact names: a '_' spelling is not what the app reads as lname (and
	 * http_head_check_policy_fields() refuses it). */
	for (i = 0; i < h->n_fields; i++)
		if (name_eq(h->fields[i].name, h->fields[i].name_len, lname) && n++ == 0)
			v = h->fields[i].value;
	return n == 1 ? v : NULL;
}

static bool is_connection(const struct http_field *f)
{
	return name_eq(f->name, f->name_len, "connection");
}

/*
 * True when a Connection field of h lists an option other than close,
 * keep-alive and upgrade: one that names name ('_' == '-'), or any such
 * option when name is NULL. Those options name hop-by-hop fields.
 */
static bool connection_option(const struct http_head *h, const char *name)
{
	size_t i;

	for (i = 0; i < h->n_fields; i++) {
		const struct http_field *c = &h->fields[i];
		const char *s = c->value, *end = c->value + c->value_len, *t;
		size_t tl;

		if (!is_connection(c))
			continue;
		while (list_next(&s, end, &t, &tl))
			if (tl && !standard_option(t, tl) && (!name || name_eq_loose(t, tl, name)))
				return true;
	}
	return false;
}

/* True when a field of h spelt with '_' reads as name once '_' is '-'. */
static bool underscore_spelling(const struct http_head *h, const char *name)
{
	size_t i;

	for (i = 0; i < h->n_fields; i++) {
		const struct http_field *f = &h->fields[i];

		if (memchr(f->name, '_', f->name_len) && name_eq_loose(f->name, f->name_len, name))
			return true;
	}
	return false;
}

const char *http_head_check_policy_fields(const struct http_head *h, const char *const *names,
                                          size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		if (underscore_spelling(h, names[i]))
			return "'_' spelling of a header that the policy evaluates";
		if (http_head_count(h, names[i], NULL) > 1)
			return "repeated header that the policy evaluates";
		if (connection_option(h, names[i]))
			return "Connection option names a header that the policy evaluates";
	}
	return NULL;
}

static const char *const method_override_names[] = {
	"x-http-method-override", "x-http-method", "x-method-override",
};

/* A trimmed field value as an upper-case token in out; false if it is not one or too long. */
static bool override_token(const char *v, char *out, size_t cap)
{
	size_t n = 0;

	while (*v == ' ' || *v == '\t')
		v++;
	for (; *v && *v != ' ' && *v != '\t'; v++) {
		if (!is_tchar((unsigned char)*v) || n + 1 >= cap)
			return false;
		out[n++] = (char)(*v >= 'a' && *v <= 'z' ? *v - 'a' + 'A' : *v);
	}
	while (*v == ' ' || *v == '\t')
		v++;
	out[n] = '\0';
	return n > 0 && *v == '\0';
}

const char *http_method_override(http_field_lookup get, const void *ctx, char *out, size_t cap)
{
	size_t n = sizeof(method_override_names) / sizeof(method_override_names[0]), i;
	char one[32];
	const char *v;

	out[0] = '\0';
	for (i = 0; i < n; i++) {
		if (!(v = get(ctx, method_override_names[i])))
			continue;
		if (!override_token(v, one, cap < sizeof(one) ? cap : sizeof(one)))
			return "method-override header is not a method";
		if (out[0] && strcmp(out, one) != 0)
			return "method-override headers disagree";
		strcpy(out, one);
	}
	return NULL;
}

static const char *head_field(const void *h, const char *lname)
{
	const char *v = NULL;

	return http_head_count(h, lname, &v) ? v : NULL;
}

const char *http_head_method_override(const struct http_head *h, char *out, size_t cap)
{
	size_t n = sizeof(method_override_names) / sizeof(method_override_names[0]);

	out[0] = '\0';
	if (http_head_check_policy_fields(h, method_override_names, n))
		return "method-override header repeated, spelt with '_' or named by Connection";
	return http_method_override(head_field, h, out, cap);
}

/* ---- serialisation ---------------------------------------------------------- */

/* Appends to out while it fits; counts the length either way. */
struct writer {
	char *out;
	size_t cap, len;
};

static void put(struct writer *w, const char *s, size_t n)
{
	if (w->len + n <= w->cap)
		memcpy(w->out + w->len, s, n);
	w->len += n;
}

static void put_str(struct writer *w, const char *s)
{
	put(w, s, strlen(s));
}

static void put_field(struct writer *w, const char *name, const char *value)
{
	put_str(w, name);
	put(w, ": ", 2);
	put_str(w, value);
	put(w, "\r\n", 2);
}

static bool valid_rewrite_value(const char *v)
{
	for (; *v; v++)
		if (!is_value_char((unsigned char)*v))
			return false;
	return true;
}

static bool valid_rewrite(const struct http_rewrite *rw)
{
	size_t i;

	for (i = 0; rw && i < rw->n_set; i++)
		if (!is_token(rw->set[i].name, strlen(rw->set[i].name)) ||
		    (rw->set[i].value && !valid_rewrite_value(rw->set[i].value)))
			return false;
	for (i = 0; rw && i < rw->n_add; i++)
		if (!is_token(rw->add[i].name, strlen(rw->add[i].name)) || !rw->add[i].value ||
		    !valid_rewrite_value(rw->add[i].value))
			return false;
	return true;
}

static void put_start_line(struct writer *w, const struct http_head *h)
{
	const char *version = h->version_minor ? "HTTP/1.1" : "HTTP/1.0";
	char code[4];

	if (!h->is_request) {
		code[0] = (char)('0' + h->status / 100);
		code[1] = (char)('0' + h->status / 10 % 10);
		code[2] = (char)('0' + h->status % 10);
		code[3] = ' ';
		put_str(w, version);
		put(w, " ", 1);
		put(w, code, 4);
		put_str(w, h->reason);
		put(w, "\r\n", 2);
		return;
	}
	put_str(w, h->method);
	put(w, " ", 1);
	put_str(w, h->form == HTTP_TARGET_AUTHORITY ? h->authority : h->path);
	if (h->query) {
		put(w, "?", 1);
		put_str(w, h->query);
	}
	put(w, " ", 1);
	put_str(w, version);
	put(w, "\r\n", 2);
}

/* What serialisation drops; computed once per call. */
struct drops {
	const struct http_head *h;
	const struct http_rewrite *rw;
	bool hop_options;      /* some Connection option names a field */
};

/* A Connection field, keeping only close, keep-alive and upgrade. */
static void put_connection(struct writer *w, const struct http_field *f)
{
	const char *s = f->value, *end = f->value + f->value_len, *t;
	size_t tl, n = 0;

	while (list_next(&s, end, &t, &tl)) {
		if (!standard_option(t, tl))
			continue;
		put_str(w, n++ ? ", " : "Connection: ");
		put(w, t, tl);
	}
	if (n)
		put(w, "\r\n", 2);
}

static bool dropped_field(const struct drops *d, const struct http_field *f)
{
	size_t i;

	if (name_eq_loose(f->name, f->name_len, "keep-alive") ||
	    name_eq_loose(f->name, f->name_len, "proxy-connection"))
		return true;
	for (i = 0; d->rw && i < d->rw->n_set; i++)
		if (name_eq_loose(f->name, f->name_len, d->rw->set[i].name))
			return true;
	return d->hop_options && connection_option(d->h, f->name);
}

/* True when a field named name is forwarded after the rewrite. */
static bool forwarded(const struct drops *d, const char *name)
{
	size_t i;

	for (i = 0; i < d->h->n_fields; i++) {
		const struct http_field *f = &d->h->fields[i];

		if (name_eq_loose(f->name, f->name_len, name) && !is_connection(f) &&
		    !dropped_field(d, f))
			return true;
	}
	return false;
}

int http_head_serialize(const struct http_head *h, const struct http_rewrite *rw,
                        char *out, size_t cap, size_t *len)
{
	struct writer w = { out, out ? cap : 0, 0 };
	struct drops d = { h, rw, connection_option(h, NULL) };
	size_t i;

	if (!valid_rewrite(rw))
		return -EINVAL;
	put_start_line(&w, h);
	for (i = 0; i < h->n_fields; i++) {
		const struct http_field *f = &h->fields[i];

		if (dropped_field(&d, f))
			continue;
		if (is_connection(f))
			put_connection(&w, f);
		else
			put_field(&w, f->name, f->value);
	}
	for (i = 0; rw && i < rw->n_set; i++)
		if (rw->set[i].value)
			put_field(&w, rw->set[i].name, rw->set[i].value);
	for (i = 0; rw && i < rw->n_add; i++)
		if (!forwarded(&d, rw->add[i].name))
			put_field(&w, rw->add[i].name, rw->add[i].value);
	put(&w, "\r\n", 2);
	*len = w.len;
	return w.len <= w.cap ? 0 : -ENOSPC;
}

const char *http_status_reason(int status)
{
	static const struct {
		int code;
		const char *text;
	} reasons[] = {
		{ 100, "Continue" }, { 101, "Switching Protocols" }, { 200, "OK" },
		{ 201, "Created" }, { 204, "No Content" }, { 301, "Moved Permanently" },
		{ 302, "Found" }, { 304, "Not Modified" }, { 400, "Bad Request" },
		{ 401, "Unauthorized" }, { 403, "Forbidden" }, { 404, "Not Found" },
		{ 405, "Method Not Allowed" }, { 408, "Request Timeout" },
		{ 411, "Length Required" }, { 413, "Content Too Large" },
		{ 414, "URI Too Long" }, { 417, "Expectation Failed" },
		{ 431, "Request Header Fields Too Large" }, { 500, "Internal Server Error" },
		{ 501, "Not Implemented" }, { 502, "Bad Gateway" }, { 503, "Service Unavailable" },
		{ 504, "Gateway Timeout" }, { 505, "HTTP Version Not Supported" },
	};
	size_t i;

	for (i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
		if (reasons[i].code == status)
			return reasons[i].text;
	return "Unknown";
}
