/* h2to1: HTTP/2 heads as HTTP/1.1 and back (see h2to1.h). */
#include "h2to1.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
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

static bool ieq(const char *a, size_t alen, const char *b);
static bool loose_eq(const char *a, size_t alen, const char *b);

static int atoi_3(const uint8_t *s)
{
	return (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
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
		"http2-settings", "expect", "host", "content-length", "cookie", H2TO1_PROTO_FIELD,
	};

	if (f->name_len && f->name[0] == ':')
		return true;
	for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
		if (named(f, drop[i]))
			return true;
	return (r->xfcc && loose_eq(f->name, f->name_len, "x-forwarded-client-cert")) ||
	       loose_eq(f->name, f->name_len, H2TO1_PROTO_FIELD) ||
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

/* Case-insensitive, '_' read as '-': the spellings CGI-style apps merge. */
static bool loose_eq(const char *a, size_t alen, const char *b)
{
	if (alen != strlen(b))
		return false;
	for (size_t i = 0; i < alen; i++) {
		char x = a[i] == '_' ? '-' : (char)tolower((unsigned char)a[i]);

		if (x != b[i])
			return false;
	}
	return true;
}

/* Case-insensitive, '_' and '-' alike (as lib/http_head.c reads Connection options). */
static bool names_loose_eq(const char *a, const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char x = a[i] == '_' ? '-' : (char)tolower((unsigned char)a[i]);
		char y = b[i] == '_' ? '-' : (char)tolower((unsigned char)b[i]);

		if (x != y)
			return false;
	}
	return true;
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
			if (n == len && names_loose_eq(v, name, len))
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

/* ---- HTTP/1.1 requests as HTTP/2 (outbound, between sidecars) ------------ */

static bool h1_request_dropped(const struct http_head *h, const struct http_field *f,
                               const char *request_id)
{
	static const char *const drop[] = {
		"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
		"http2-settings", "expect", "host", "x-forwarded-client-cert", H2TO1_PROTO_FIELD,
	};

	/* '_' spellings too: an app may read x_forwarded_client_cert as the real one. */
	for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
		if (loose_eq(f->name, f->name_len, drop[i]))
			return true;
	if (ieq(f->name, f->name_len, "content-length") && h->framing != HTTP_BODY_LENGTH)
		return true;
	if (request_id && ieq(f->name, f->name_len, "x-request-id"))
		return true;
	return connection_names(h, f->name, f->name_len);
}

/* Appends one entry; name copied lower-cased into buf when lower. */
static int nv_put(nghttp2_nv *nv, size_t cap_nv, size_t *k, char *buf, size_t buf_cap,
                  size_t *used, const char *name, size_t nl, const char *value, size_t vl,
                  bool copy_value)
{
	size_t need = nl + (copy_value ? vl : 0);
	char *nb = buf + *used;

	if (*k == cap_nv || *used + need > buf_cap)
		return -ENOSPC;
	for (size_t j = 0; j < nl; j++)
		nb[j] = name[j] >= 'A' && name[j] <= 'Z' ? (char)(name[j] - 'A' + 'a') : name[j];
	if (copy_value)
		memcpy(nb + nl, value, vl);
	nv[(*k)++] = (nghttp2_nv){ (uint8_t *)nb, (uint8_t *)(copy_value ? nb + nl : value), nl, vl,
	                           NGHTTP2_NV_FLAG_NONE };
	*used += need;
	return 0;
}

int h1to2_request_nv(const struct http_head *h, const char *request_id, nghttp2_nv *nv,
                     size_t cap_nv, size_t *n, char *buf, size_t buf_cap)
{
	const char *authority = h->authority ? h->authority : h->host;
	size_t used = 0, k = 0, plen = strlen(h->path), qlen = h->query ? strlen(h->query) : 0;
	char *path;
	int rc;

	if ((h->req_flags & (HTTP_REQ_CONNECT | HTTP_REQ_UPGRADE)) || !h->method ||
	    !token_ok(h->method, strlen(h->method), false) || !plen)
		return -EINVAL;
	/* :path goes into buf (nv points there); the query as it came. */
	if (plen + qlen + 2 > buf_cap)
		return -ENOSPC;
	path = buf + buf_cap - (plen + qlen + 2);
	buf_cap -= plen + qlen + 2;
	snprintf(path, plen + qlen + 2, h->query ? "%s?%s" : "%s", h->path, h->query);
	if (!value_ok(path, strlen(path)) || strchr(path, ' ') || (authority &&
	    (!value_ok(authority, strlen(authority)) || !*authority)) ||
	    (request_id && !value_ok(request_id, strlen(request_id))))
		return -EINVAL;
	if ((rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, ":method", 7, h->method,
	                 strlen(h->method), false)) < 0 ||
	    (rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, ":scheme", 7, "http", 4, false)) < 0 ||
	    (authority && (rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, ":authority", 10,
	                               authority, strlen(authority), false)) < 0) ||
	    (rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, ":path", 5, path, strlen(path),
	                 false)) < 0)
		return rc;
	for (size_t i = 0; i < h->n_fields; i++) {
		const struct http_field *f = &h->fields[i];

		if (h1_request_dropped(h, f, request_id))
			continue;
		if (!token_ok(f->name, f->name_len, false) || !value_ok(f->value, f->value_len))
			return -EINVAL;
		if ((rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, f->name, f->name_len, f->value,
		                 f->value_len, false)) < 0)
			return rc;
	}
	if ((request_id && (rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, "x-request-id", 12,
	                                request_id, strlen(request_id), false)) < 0) ||
	    (rc = nv_put(nv, cap_nv, &k, buf, buf_cap, &used, H2TO1_PROTO_FIELD,
	                 strlen(H2TO1_PROTO_FIELD), "http1", 5, false)) < 0)
		return rc;
	*n = k;
	return 0;
}

/* ---- HTTP/2 responses as HTTP/1.1 (outbound, back to the app) ------------- */

static bool nv_is(const nghttp2_nv *v, const char *name)
{
	return v->namelen == strlen(name) && !memcmp(v->name, name, v->namelen);
}

static bool digits(const uint8_t *s, size_t n)
{
	if (!n || n > 19)
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

/* :status (3 digits, 200..599 for a final head) into *status; the content-length
 * copies: 1 all equal (*cl the first), 0 none, -1 bad. */
static int response_meta(const nghttp2_nv *nv, size_t n, int *status, const nghttp2_nv **cl)
{
	int found = 0;

	*status = 0;
	*cl = NULL;
	for (size_t i = 0; i < n; i++) {
		if (nv_is(&nv[i], ":status")) {
			if (*status || nv[i].valuelen != 3 || !digits(nv[i].value, 3))
				return -1;
			*status = atoi_3(nv[i].value);
		} else if (nv_is(&nv[i], "content-length")) {
			if (!digits(nv[i].value, nv[i].valuelen) ||
			    (*cl && ((*cl)->valuelen != nv[i].valuelen ||
			             memcmp((*cl)->value, nv[i].value, nv[i].valuelen))))
				return -1;
			*cl = &nv[i];
			found = 1;
		}
	}
	return *status >= 200 && *status <= 599 ? found : -1;
}

static bool h1_response_dropped(const nghttp2_nv *v, int status)
{
	static const char *const drop[] = {
		"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
		"trailer",
	};

	if (v->namelen && v->name[0] == ':')
		return true;
	for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
		if (nv_is(v, drop[i]))
			return true;
	return nv_is(v, "content-length");    /* written once, by the framing */
}

int h2to1_response_head(const nghttp2_nv *nv, size_t n, unsigned req_flags, bool end, bool close,
                        char *out, size_t cap, size_t *len, enum h2to1_framing *framing)
{
	struct writer w = { out, out ? cap : 0, 0 };
	const nghttp2_nv *cl;
	int status, has_cl = response_meta(nv, n, &status, &cl);
	char line[64];

	if (has_cl < 0)
		return -EINVAL;
	if ((req_flags & HTTP_REQ_HEAD) || status == 204 || status == 304)
		*framing = H2TO1_NO_BODY;
	else if (has_cl)
		*framing = H2TO1_LENGTH;
	else
		*framing = end ? H2TO1_NO_BODY : H2TO1_CHUNKED;
	snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\n", status, http_status_reason(status));
	puts_(&w, line);
	for (size_t i = 0; i < n; i++) {
		if (h1_response_dropped(&nv[i], status))
			continue;
		if (!token_ok((const char *)nv[i].name, nv[i].namelen, true) ||
		    !value_ok((const char *)nv[i].value, nv[i].valuelen))
			return -EINVAL;
		put(&w, (const char *)nv[i].name, nv[i].namelen);
		put(&w, ": ", 2);
		put(&w, (const char *)nv[i].value, nv[i].valuelen);
		put(&w, "\r\n", 2);
	}
	if (has_cl && status != 204) {
		puts_(&w, "content-length: ");
		put(&w, (const char *)cl->value, cl->valuelen);
		put(&w, "\r\n", 2);
	}
	if (*framing == H2TO1_CHUNKED)
		puts_(&w, "transfer-encoding: chunked\r\n");
	else if (!has_cl && *framing == H2TO1_NO_BODY && status != 204 && status != 304 &&
	         !(req_flags & HTTP_REQ_HEAD))
		puts_(&w, "content-length: 0\r\n");
	if (close)
		puts_(&w, "connection: close\r\n");
	put(&w, "\r\n", 2);
	*len = w.len;
	return out && w.len <= cap ? 0 : -ENOSPC;
}
