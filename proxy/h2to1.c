/* h2to1: HTTP/2 heads as HTTP/1.1 and back (see h2to1.h). */
#include "h2to1.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Appends to out while it fits, counts always: one pass gives the size and the head. */
struct writer {
	char *out;
	size_t cap, len;
};

static void put(struct writer *w, const char *s, size_t n)
{
	if (w->out && w->len + n <= w->cap)
		memcpy(w->out + w->len, s, n);
	w->len += n;
}

static void puts_(struct writer *w, const char *s)
{
	put(w, s, strlen(s));
}

static bool is_tchar(unsigned char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
	       (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static bool token_ok(const char *s, size_t n, bool lower)
{
	if (!n)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (!is_tchar(ch) || (lower && ch >= 'A' && ch <= 'Z'))
			return false;
	}
	return true;
}

/* A field value HTTP/1.1 can carry: visible bytes, SP and HTAB; no CR, LF, NUL, DEL. */
static bool value_ok(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
			return false;
	}
	return true;
}

static bool is_ows(char ch)
{
	return ch == ' ' || ch == '\t';
}

/* No whitespace at either end (empty is fine). */
static bool value_trimmed(const char *s, size_t n)
{
	return !n || (!is_ows(s[0]) && !is_ows(s[n - 1]));
}

static bool named(const struct h2_field *f, const char *name)
{
	return f->name_len == strlen(name) && !memcmp(f->name, name, f->name_len);
}

/* Connection-specific in HTTP/1.1, or re-made here: never copied as they came. */
static bool request_dropped(const struct h2_field *f, const struct h2to1_request *r)
{
	static const char *const drop[] = {
		"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
		"http2-settings", "expect", "host", "content-length", "cookie",
	};

	if (f->name_len && f->name[0] == ':')
		return true;
	for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
		if (named(f, drop[i]))
			return true;
	return (r->xfcc && named(f, "x-forwarded-client-cert")) ||
	       (r->request_id && named(f, "x-request-id"));
}

/* The content-length the stream announced: 1 found (*cl), 0 none, -1 bad or disagreeing. */
static int request_length(const struct h2to1_request *r, uint64_t *cl)
{
	const char *first = NULL;
	size_t first_len = 0;

	for (size_t i = 0; i < r->n_fields; i++) {
		const struct h2_field *f = &r->fields[i];

		if (!named(f, "content-length"))
			continue;
		if (first && (f->value_len != first_len || memcmp(f->value, first, first_len)))
			return -1;
		first = f->value;
		first_len = f->value_len;
	}
	if (!first)
		return 0;
	if (!first_len || first_len > 19)
		return -1;
	*cl = 0;
	for (size_t i = 0; i < first_len; i++) {
		if (first[i] < '0' || first[i] > '9')
			return -1;
		*cl = *cl * 10 + (uint64_t)(first[i] - '0');
	}
	return 1;
}

/* Methods whose requests carry a body by convention: an empty one is said with length 0. */
static bool body_method(const char *m)
{
	return !strcmp(m, "POST") || !strcmp(m, "PUT") || !strcmp(m, "PATCH");
}

static int check_request(const struct h2to1_request *r)
{
	if (!r->method || !token_ok(r->method, strlen(r->method), false) || !r->target ||
	    !r->target[0])
		return -EINVAL;
	for (const char *p = r->target; *p; p++)
		if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
			return -EINVAL;
	/* Our own checks, not nghttp2's: what the HTTP/1.1 app reads must be
	 * what the policy saw. The authority obeys the Host rules, and no
	 * field value has the leading or trailing whitespace an HTTP/1.1
	 * parser would trim (" evil" would pass a rule about "evil"). */
	if (r->authority && (!r->authority[0] ||
	                     !http_host_chars_ok(r->authority, strlen(r->authority))))
		return -EINVAL;
	if ((r->xfcc && !value_ok(r->xfcc, strlen(r->xfcc))) ||
	    (r->request_id && !value_ok(r->request_id, strlen(r->request_id))))
		return -EINVAL;
	for (size_t i = 0; i < r->n_fields; i++) {
		const struct h2_field *f = &r->fields[i];

		if (f->name_len && f->name[0] == ':')
			continue;
		if (!token_ok(f->name, f->name_len, true) || !value_ok(f->value, f->value_len) ||
		    !value_trimmed(f->value, f->value_len))
			return -EINVAL;
	}
	return 0;
}

static void write_cookies(struct writer *w, const struct h2to1_request *r)
{
	bool any = false;

	for (size_t i = 0; i < r->n_fields; i++) {
		if (!named(&r->fields[i], "cookie"))
			continue;
		puts_(w, any ? "; " : "cookie: ");
		put(w, r->fields[i].value, r->fields[i].value_len);
		any = true;
	}
	if (any)
		puts_(w, "\r\n");
}

static void write_framing(struct writer *w, const struct h2to1_request *r, int has_cl,
                          uint64_t cl, enum h2to1_framing *framing)
{
	char num[32];

	if (has_cl) {
		snprintf(num, sizeof(num), "%llu", (unsigned long long)cl);
		puts_(w, "content-length: ");
		puts_(w, num);
		puts_(w, "\r\n");
		*framing = cl ? H2TO1_LENGTH : H2TO1_NO_BODY;
	} else if (!r->no_body) {
		puts_(w, "transfer-encoding: chunked\r\n");
		*framing = H2TO1_CHUNKED;
	} else {
		if (body_method(r->method))
			puts_(w, "content-length: 0\r\n");
		*framing = H2TO1_NO_BODY;
	}
}

int h2to1_request_head(const struct h2to1_request *r, char *out, size_t cap, size_t *len,
                       enum h2to1_framing *framing)
{
	struct writer w = { out, cap, 0 };
	uint64_t cl = 0;
	int has_cl, rc = check_request(r);

	if (rc < 0)
		return rc;
	if ((has_cl = request_length(r, &cl)) < 0 || (has_cl && r->no_body && cl))
		return -EINVAL;
	puts_(&w, r->method);
	puts_(&w, " ");
	puts_(&w, r->target);
	puts_(&w, " HTTP/1.1\r\n");
	if (r->authority) {
		puts_(&w, "host: ");
		puts_(&w, r->authority);
		puts_(&w, "\r\n");
	}
	for (size_t i = 0; i < r->n_fields; i++) {
		const struct h2_field *f = &r->fields[i];

		if (request_dropped(f, r))
			continue;
		put(&w, f->name, f->name_len);
		puts_(&w, ": ");
		put(&w, f->value, f->value_len);
		puts_(&w, "\r\n");
	}
	write_cookies(&w, r);
	if (r->xfcc) {
		puts_(&w, "x-forwarded-client-cert: ");
		puts_(&w, r->xfcc);
		puts_(&w, "\r\n");
	}
	if (r->request_id) {
		puts_(&w, "x-request-id: ");
		puts_(&w, r->request_id);
		puts_(&w, "\r\n");
	}
	write_framing(&w, r, has_cl, cl, framing);
	puts_(&w, "\r\n");
	*len = w.len;
	return out && w.len <= cap ? 0 : -ENOSPC;
}

/* ---- the response ------------------------------------------------------- */

static bool ieq(const char *a, size_t alen, const char *b)
{
	return alen == strlen(b) && !strncasecmp(a, b, alen);
}

/* Whether the Connection field(s) of h name the field called name (len bytes). */
static bool connection_names(const struct http_head *h, const char *name, size_t len)
{
	for (size_t i = 0; i < h->n_fields; i++) {
		const char *v = h->fields[i].value, *end = v + h->fields[i].value_len;

		if (!ieq(h->fields[i].name, h->fields[i].name_len, "connection"))
			continue;
		while (v < end) {
			const char *comma = memchr(v, ',', (size_t)(end - v)), *e = comma ? comma : end;

			while (v < e && (*v == ' ' || *v == '\t'))
				v++;
			size_t n = (size_t)(e - v);

			while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
				n--;
			if (n == len && !strncasecmp(v, name, len))
				return true;
			v = comma ? comma + 1 : end;
		}
	}
	return false;
}

static bool response_dropped(const struct http_head *h, const struct http_field *f)
{
	static const char *const drop[] = {
		"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
		"trailer",
	};

	for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
		if (ieq(f->name, f->name_len, drop[i]))
			return true;
	if (ieq(f->name, f->name_len, "content-length") && h->status == 204)
		return true;
	return connection_names(h, f->name, f->name_len);
}

int h2to1_response_nv(const struct http_head *h, nghttp2_nv *nv, size_t cap_nv, size_t *n,
                      char *buf, size_t buf_cap)
{
	size_t used = 0, k = 0;
	int len;

	if (cap_nv < 1 || buf_cap < 4 || h->status < 200 || h->status > 999)
		return h->status < 200 || h->status > 999 ? -EINVAL : -ENOSPC;
	/* HTTP/2 has no transfer codings: a gzip-coded body passed on with
	 * Transfer-Encoding dropped would reach the caller as if it were plain. */
	if (h->te_coded && h->framing != HTTP_BODY_NONE)
		return -EINVAL;
	len = snprintf(buf, 4, "%d", h->status);
	nv[k++] = (nghttp2_nv){ (uint8_t *)":status", (uint8_t *)buf, 7, (size_t)len,
	                        NGHTTP2_NV_FLAG_NONE };
	used = 4;
	for (size_t i = 0; i < h->n_fields; i++) {
		const struct http_field *f = &h->fields[i];

		if (response_dropped(h, f))
			continue;
		if (!value_ok(f->value, f->value_len) || !token_ok(f->name, f->name_len, false))
			return -EINVAL;
		if (k == cap_nv || used + f->name_len > buf_cap)
			return -ENOSPC;
		for (size_t j = 0; j < f->name_len; j++) {
			char ch = f->name[j];

			buf[used + j] = ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch;
		}
		nv[k++] = (nghttp2_nv){ (uint8_t *)buf + used, (uint8_t *)f->value, f->name_len,
		                        f->value_len, NGHTTP2_NV_FLAG_NONE };
		used += f->name_len;
	}
	*n = k;
	return 0;
}

size_t h2to1_chunk_header(size_t n, char *out)
{
	return (size_t)snprintf(out, 20, "%zx\r\n", n);
}
