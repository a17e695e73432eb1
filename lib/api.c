/* api: meshlet-control's requests and answers, validated; see api.h. */
#include "meshlet/api.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "meshlet/ca.h"
#include "meshlet/identity.h"

__attribute__((format(printf, 5, 0)))
static int fail_v(struct api_error *ae, int status, const char *code, const char *path,
                  const char *fmt, va_list ap)
{
	if (!ae)
		return -status;
	ae->status = status;
	ae->code = code;
	snprintf(ae->e.path, sizeof(ae->e.path), "%s", path ? path : "");
	vsnprintf(ae->e.message, sizeof(ae->e.message), fmt, ap);
	return -status;
}

int api_fail(struct api_error *ae, int status, const char *path, const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = fail_v(ae, status, NULL, path, fmt, ap);
	va_end(ap);
	return r;
}

int api_fail_code(struct api_error *ae, int status, const char *code, const char *path,
                  const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = fail_v(ae, status, code, path, fmt, ap);
	va_end(ap);
	return r;
}

const char *api_status_code(int status)
{
	switch (status) {
	case 400: return "bad_request";
	case 401: return "unauthorized";
	case 403: return "forbidden";
	case 404: return "not_found";
	case 405: return "method_not_allowed";
	case 409: return "conflict";
	case 411: return "length_required";
	case 412: return "precondition_failed";
	case 413: return "payload_too_large";
	case 414: return "uri_too_long";
	case 429: return "too_many_requests";
	case 431: return "headers_too_large";
	case 499: return "client_closed_request";
	case 501: return "not_implemented";
	case 503: return "unavailable";
	case 505: return "http_version_not_supported";
	default: return "internal";
	}
}

json_t *api_error_body(const struct api_error *ae)
{
	return json_pack("{s:{s:s, s:s, s:s}}", "error",
	                 "code", ae->code ? ae->code : api_status_code(ae->status),
	                 "message", ae->e.message,
	                 "path", ae->e.path);
}

bool api_route_match(const char *pattern, const char *path, char (*caps)[64], size_t ncaps)
{
	size_t ncap = 0;

	while (*pattern) {
		if (*pattern == '{') {
			const char *end = strchr(pattern, '}');
			size_t n = strcspn(path, "/");

			if (!end || n == 0 || n >= 64 || ncap >= ncaps)
				return false;
			memcpy(caps[ncap], path, n);
			caps[ncap][n] = '\0';
			ncap++;
			path += n;
			pattern = end + 1;
			continue;
		}
		if (*pattern++ != *path++)
			return false;
	}
	return *path == '\0';
}

/* ---- durations ---- */

int api_parse_duration(const char *s, int64_t min, int64_t max, int64_t *out,
                       struct meshlet_err *err)
{
	const char *p = s;
	int64_t total = 0;

	if (!s || !*s)
		return err_set(err, "", "empty duration");
	while (*p) {
		int64_t v = 0, unit;

		if (!isdigit((unsigned char)*p))
			goto bad;
		while (isdigit((unsigned char)*p)) {
			if (v > (INT64_MAX - 9) / 10)
				goto range;
			v = v * 10 + (*p++ - '0');
		}
		switch (*p) {
		case '\0':
			if (p != s + strspn(s, "0123456789"))
				goto bad;    /* "1h30": a bare number only on its own */
			unit = 1;
			break;
		case 's': unit = 1; p++; break;
		case 'm': unit = 60; p++; break;
		case 'h': unit = 3600; p++; break;
		case 'd': unit = 86400; p++; break;
		default: goto bad;
		}
		if (v > (INT64_MAX - total) / unit)
			goto range;
		total += v * unit;
	}
	if (total < min || total > max)
		goto range;
	*out = total;
	return 0;
bad:
	return err_set(err, "", "'%s' is not a duration (seconds, or e.g. 90s, 15m, 1h, 1h30m, 2d)",
	               s);
range:
	return err_set(err, "", "duration '%s' must be %lld..%lld seconds", s, (long long)min,
	               (long long)max);
}

/* ---- join tokens ---- */

static const char b64url[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* base64url without padding of in[0..n) into out (4 * ceil(n / 3) + 1). */
static size_t b64url_encode(const unsigned char *in, size_t n, char *out)
{
	size_t o = 0, i;

	for (i = 0; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
		out[o++] = b64url[v >> 18 & 63];
		out[o++] = b64url[v >> 12 & 63];
		out[o++] = b64url[v >> 6 & 63];
		out[o++] = b64url[v & 63];
	}
	if (n - i == 1) {
		uint32_t v = (uint32_t)in[i] << 16;
		out[o++] = b64url[v >> 18 & 63];
		out[o++] = b64url[v >> 12 & 63];
	} else if (n - i == 2) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
		out[o++] = b64url[v >> 18 & 63];
		out[o++] = b64url[v >> 12 & 63];
		out[o++] = b64url[v >> 6 & 63];
	}
	out[o] = '\0';
	return o;
}

static bool is_lower_hex(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	}
	return true;
}

int api_token_format(char *out, size_t len, const char *service, const char *pin,
                     const unsigned char *secret)
{
	char sec[API_TOKEN_SECRET_LEN + 4];
	int n;

	if (!identity_valid_service(service) || strlen(pin) != 64 || !is_lower_hex(pin, 64))
		return -EINVAL;
	b64url_encode(secret, API_TOKEN_SECRET_BYTES, sec);
	n = snprintf(out, len, "%s.%s.%s.%s", API_TOKEN_TAG, service, pin, sec);
	return n > 0 && (size_t)n < len ? 0 : -EINVAL;
}

int api_token_parse(const char *token, struct api_join_token *out, struct meshlet_err *err)
{
	const char *p = token, *dot;
	size_t n;

	if (!token || strlen(token) >= API_TOKEN_MAX)
		return err_set(err, "token", "not a meshlet join token");
	if (strncmp(p, API_TOKEN_TAG ".", sizeof(API_TOKEN_TAG)) != 0)
		return err_set(err, "token", "not a meshlet join token (expected %s.<service>.<pin>.<secret>)",
		               API_TOKEN_TAG);
	p += sizeof(API_TOKEN_TAG);
	dot = strchr(p, '.');
	n = dot ? (size_t)(dot - p) : 0;
	if (!dot || n >= sizeof(out->service))
		return err_set(err, "token", "malformed join token: bad service part");
	memcpy(out->service, p, n);
	out->service[n] = '\0';
	if (!identity_valid_service(out->service))
		return err_set(err, "token", "malformed join token: bad service part");
	p = dot + 1;
	dot = strchr(p, '.');
	if (!dot || dot - p != 64 || !is_lower_hex(p, 64))
		return err_set(err, "token", "malformed join token: bad pin part");
	memcpy(out->pin, p, 64);
	out->pin[64] = '\0';
	p = dot + 1;
	if (strlen(p) != API_TOKEN_SECRET_LEN || strspn(p, b64url) != API_TOKEN_SECRET_LEN)
		return err_set(err, "token", "malformed join token: bad secret part");
	return 0;
}

void api_sha256_hex(const char *s, size_t len, char *out)
{
	unsigned char md[32];
	unsigned int mdlen = 0;

	EVP_Digest(s, len, md, &mdlen, EVP_sha256(), NULL);
	for (unsigned int i = 0; i < 32; i++)
		snprintf(out + 2 * i, 3, "%02x", md[i]);
	out[64] = '\0';
}

/* ---- headers and queries ---- */

/* A non-negative decimal integer of n bytes without sign or leading zeros. */
static int parse_uint(const char *s, size_t n, int64_t max, int64_t *out)
{
	int64_t v = 0;

	if (n == 0 || n > 19 || (n > 1 && s[0] == '0'))
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		if (!isdigit((unsigned char)s[i]))
			return -EINVAL;
		if (v > (max - (s[i] - '0')) / 10)
			return -ERANGE;
		v = v * 10 + (s[i] - '0');
	}
	*out = v;
	return 0;
}

int api_parse_if_match(const char *value, int64_t *version, struct meshlet_err *err)
{
	size_t n;

	if (!value)
		return err_set(err, "If-Match", "missing");
	while (*value == ' ' || *value == '\t')
		value++;
	n = strlen(value);
	while (n > 0 && (value[n - 1] == ' ' || value[n - 1] == '\t'))
		n--;
	if (n == 1 && value[0] == '*') {
		*version = 0;
		return 0;
	}
	if (n >= 2 && value[0] == '"' && value[n - 1] == '"') {
		value++;
		n -= 2;
	}
	if (parse_uint(value, n, INT64_MAX, version) < 0 || *version == 0)
		return err_set(err, "If-Match", "must be a policy version (a positive integer, as in ETag)");
	return 0;
}

/* upstreams=LIST of n bytes at v into q. */
static int parse_upstreams(const char *v, size_t n, struct api_config_query *q,
                           struct meshlet_err *err)
{
	if (n == 1 && v[0] == '*') {
		q->upstreams_all = true;
		return 0;
	}
	while (n > 0) {
		const char *comma = memchr(v, ',', n);
		size_t len = comma ? (size_t)(comma - v) : n;

		if (q->n_upstreams >= API_UPSTREAMS_MAX)
			return err_set(err, "upstreams", "at most %d services (or *)", API_UPSTREAMS_MAX);
		if (len == 0 || len >= sizeof(q->upstreams[0]))
			return err_set(err, "upstreams", "must be * or service names separated by commas");
		memcpy(q->upstreams[q->n_upstreams], v, len);
		q->upstreams[q->n_upstreams][len] = '\0';
		if (!identity_valid_service(q->upstreams[q->n_upstreams]))
			return err_set(err, "upstreams", "'%.64s' is not a service name",
			               q->upstreams[q->n_upstreams]);
		q->n_upstreams++;
		if (!comma)
			break;
		v += len + 1;
		n -= len + 1;
		if (n == 0)
			return err_set(err, "upstreams", "must be * or service names separated by commas");
	}
	if (q->n_upstreams == 0)
		return err_set(err, "upstreams", "must be * or service names separated by commas");
	return 0;
}

static const struct {
	unsigned flag;
	const char *name;
} degraded_names[] = {
	{ API_DEGRADED_RENEWAL, "renewal" },
	{ API_DEGRADED_EXPIRY, "expiry" },
};
#define N_DEGRADED (sizeof(degraded_names) / sizeof(degraded_names[0]))

void api_degraded_format(unsigned flags, char *out, size_t len)
{
	size_t used = 0;

	out[0] = '\0';
	for (size_t i = 0; i < N_DEGRADED && used < len; i++) {
		if (flags & degraded_names[i].flag)
			used += (size_t)snprintf(out + used, len - used, "%s%s", used ? "," : "",
			                         degraded_names[i].name);
	}
}

json_t *api_degraded_json(unsigned flags)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < N_DEGRADED; i++) {
		if ((flags & degraded_names[i].flag) &&
		    json_array_append_new(a, json_string(degraded_names[i].name)) < 0) {
			json_decref(a);
			return NULL;
		}
	}
	return a;
}

/* "renewal,expiry" (v, n bytes, not terminated) into q->degraded. */
static int parse_degraded(const char *v, size_t n, struct api_config_query *q,
                          struct meshlet_err *err)
{
	while (true) {
		const char *comma = memchr(v, ',', n);
		size_t len = comma ? (size_t)(comma - v) : n, i;

		for (i = 0; i < N_DEGRADED; i++) {
			if (strlen(degraded_names[i].name) == len &&
			    memcmp(degraded_names[i].name, v, len) == 0)
				break;
		}
		if (i == N_DEGRADED)
			return err_set(err, "degraded", "'%.*s' is not one of renewal, expiry "
			               "(separated by commas)", (int)(len > 64 ? 64 : len), v);
		q->degraded |= degraded_names[i].flag;
		if (!comma)
			return 0;
		v += len + 1;
		n -= len + 1;
	}
}

int api_parse_config_query(const char *query, struct api_config_query *out,
                           struct meshlet_err *err)
{
	bool seen_after = false, seen_wait = false, seen_upstreams = false, seen_degraded = false;
	const char *p = query;

	memset(out, 0, sizeof(*out));
	out->wait = API_WAIT_DEFAULT;
	while (p && *p) {
		size_t n = strcspn(p, "&");
		const char *eq = memchr(p, '=', n);
		int64_t v;

		if (!eq)
			return err_set(err, "query", "'%.*s': expected name=value", (int)(n > 64 ? 64 : n), p);
		if (eq - p == 5 && memcmp(p, "after", 5) == 0 && !seen_after) {
			if (parse_uint(eq + 1, n - 6, INT64_MAX, &v) < 0)
				return err_set(err, "after", "must be a non-negative integer");
			out->after = v;
			seen_after = true;
		} else if (eq - p == 4 && memcmp(p, "wait", 4) == 0 && !seen_wait) {
			if (parse_uint(eq + 1, n - 5, INT64_MAX, &v) < 0 || v > API_WAIT_MAX)
				return err_set(err, "wait", "must be 0..%d seconds", API_WAIT_MAX);
			out->wait = (int)v;
			seen_wait = true;
		} else if (eq - p == 9 && memcmp(p, "upstreams", 9) == 0 && !seen_upstreams) {
			if (parse_upstreams(eq + 1, n - 10, out, err) < 0)
				return -EINVAL;
			seen_upstreams = true;
		} else if (eq - p == 8 && memcmp(p, "degraded", 8) == 0 && !seen_degraded) {
			if (parse_degraded(eq + 1, n - 9, out, err) < 0)
				return -EINVAL;
			seen_degraded = true;
		} else {
			return err_set(err, "query", "unknown or repeated parameter '%.*s'",
			               (int)((eq - p) > 64 ? 64 : (eq - p)), p);
		}
		p += n;
		if (*p == '&')
			p++;
	}
	return 0;
}

bool api_config_query_wants(const struct api_config_query *q, const char *svc)
{
	if (q->upstreams_all)
		return true;
	for (size_t i = 0; i < q->n_upstreams; i++) {
		if (strcmp(q->upstreams[i], svc) == 0)
			return true;
	}
	return false;
}

/* ---- bodies ---- */

static int check_fields(const json_t *body, const char *const *allowed, struct meshlet_err *err)
{
	if (!json_is_object(body))
		return err_set(err, "", "the request body must be a JSON object");
	return json_check_object(body, "", allowed, err);
}

static int get_service(const json_t *body, const char *key, bool required, const char **out,
                       struct meshlet_err *err)
{
	const char *s = NULL;
	int r = json_get_str(body, "", key, required, &s, err);

	if (r < 0)
		return r;
	if (s && !identity_valid_service(s))
		return err_set(err, key, "'%.64s' is not a service name ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)",
		               s);
	*out = s;
	return 0;
}

int api_parse_token_req(const json_t *body, struct api_token_req *out, struct meshlet_err *err)
{
	static const char *const allowed[] = {"service", "ttl_seconds", "uses", NULL};
	long long ttl = API_TOKEN_TTL_DEFAULT, uses = 1;

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    get_service(body, "service", true, &out->service, err) < 0 ||
	    json_get_int(body, "", "ttl_seconds", false, 1, API_TOKEN_TTL_MAX, &ttl, err) < 0 ||
	    json_get_int(body, "", "uses", false, 1, API_TOKEN_USES_MAX, &uses, err) < 0)
		return -EINVAL;
	out->ttl = ttl;
	out->uses = uses;
	return 0;
}

int api_parse_svid_req(const json_t *body, struct api_svid_req *out, struct meshlet_err *err)
{
	static const char *const allowed[] = {"csr", "service", NULL};
	const json_t *csr;

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    json_get_str(body, "", "csr", true, &out->csr, err) < 0 ||
	    get_service(body, "service", false, &out->service, err) < 0)
		return -EINVAL;
	csr = json_object_get(body, "csr");
	out->csr_len = json_string_length(csr);
	if (out->csr_len == 0 || out->csr_len > CA_CSR_MAX)
		return err_set(err, "csr", "must be a PEM certificate request of at most %d bytes",
		               CA_CSR_MAX);
	return 0;
}

/* An HTTP token (RFC 9110): method and header names. */
static bool is_token(const char *s, size_t max)
{
	size_t n = strlen(s);

	if (n == 0 || n > max)
		return false;
	return strspn(s, "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	                 "abcdefghijklmnopqrstuvwxyz") == n;
}

int api_parse_check_req(const json_t *body, struct api_check_req *out, struct meshlet_err *err)
{
	static const char *const allowed[] = {"from", "service", "port", "method", "path",
	                                      "headers", NULL};
	struct spiffe_id id;
	const char *why = NULL;
	long long port = 0;
	const json_t *h = NULL, *v;
	const char *k;
	char path[MESHLET_PATH_MAX];

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    json_get_str(body, "", "from", true, &out->from, err) < 0 ||
	    get_service(body, "service", true, &out->service, err) < 0 ||
	    json_get_int(body, "", "port", true, 1, 65535, &port, err) < 0 ||
	    json_get_str(body, "", "method", false, &out->method, err) < 0 ||
	    json_get_str(body, "", "path", false, &out->path, err) < 0 ||
	    json_get_object(body, "", "headers", false, &h, err) < 0)
		return -EINVAL;
	if (identity_parse(out->from, strlen(out->from), &id, &why) < 0)
		return err_set(err, "from", "not a SPIFFE ID: %s", why ? why : "malformed");
	out->port = (uint16_t)port;
	if (out->method && !is_token(out->method, 32))
		return err_set(err, "method", "not an HTTP method");
	if (out->path && (out->path[0] != '/' || strlen(out->path) > 8192))
		return err_set(err, "path", "must start with '/' (at most 8192 bytes)");
	if (h) {
		if (json_object_size(h) > API_CHECK_HEADERS_MAX)
			return err_set(err, "headers", "at most %d headers", API_CHECK_HEADERS_MAX);
		json_object_foreach((json_t *)h, k, v) {
			json_path_key(path, sizeof(path), "headers", k);
			if (!is_token(k, 256))
				return err_set(err, path, "not an HTTP header name");
			if (!json_is_string(v))
				return err_set(err, path, "must be a string");
		}
	}
	out->headers = h;
	out->http = out->method || out->path || h;
	return 0;
}

int api_addr_parse(const char *s, bool allow_port0, struct api_addr *out)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon;
	int64_t port;
	size_t n;

	memset(out, 0, sizeof(*out));
	if (!s)
		return -EINVAL;
	if (s[0] == '[') {
		const char *end = strchr(s, ']');
		if (!end || end[1] != ':')
			return -EINVAL;
		n = (size_t)(end - s - 1);
		if (n == 0 || n >= sizeof(host))
			return -EINVAL;
		memcpy(host, s + 1, n);
		host[n] = '\0';
		if (inet_pton(AF_INET6, host, out->ip) != 1)
			return -EINVAL;
		out->family = AF_INET6;
		colon = end + 1;
		/* ::ffff:a.b.c.d is the IPv4 host a.b.c.d (a dual-stack socket's view). */
		if (memcmp(out->ip, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0) {
			memmove(out->ip, out->ip + 12, 4);
			memset(out->ip + 4, 0, 12);
			out->family = AF_INET;
		}
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -EINVAL;
		n = (size_t)(colon - s);
		if (n == 0 || n >= sizeof(host))
			return -EINVAL;
		memcpy(host, s, n);
		host[n] = '\0';
		if (inet_pton(AF_INET, host, out->ip) != 1)
			return -EINVAL;
		out->family = AF_INET;
	}
	if (parse_uint(colon + 1, strlen(colon + 1), 65535, &port) < 0 || (port == 0 && !allow_port0))
		return -EINVAL;
	out->port = (uint16_t)port;
	return 0;
}

void api_addr_format(const struct api_addr *a, char *out, size_t len)
{
	char host[INET6_ADDRSTRLEN];

	if (!inet_ntop(a->family, a->ip, host, sizeof(host)))
		snprintf(host, sizeof(host), "?");
	snprintf(out, len, a->family == AF_INET6 ? "[%s]:%u" : "%s:%u", host, (unsigned)a->port);
}

bool api_addr_same_ip(const struct api_addr *a, const struct api_addr *b)
{
	return a->family == b->family &&
	       memcmp(a->ip, b->ip, a->family == AF_INET ? 4 : 16) == 0;
}

bool api_valid_address(const char *s)
{
	struct api_addr a;

	return api_addr_parse(s, false, &a) == 0;
}

/* The address at key in body, required, canonicalised into canon. */
static int get_address(const json_t *body, const char *key, const char **out, char *canon,
                       struct meshlet_err *err)
{
	struct api_addr a;
	const char *s = NULL;

	if (json_get_str(body, "", key, true, &s, err) < 0)
		return -EINVAL;
	if (api_addr_parse(s, false, &a) < 0)
		return err_set(err, key, "must be ip:port (IPv4, or [IPv6]:port), port 1..65535");
	api_addr_format(&a, canon, API_ADDRESS_MAX);
	*out = canon;
	return 0;
}

int api_parse_endpoint_req(const json_t *body, struct api_endpoint_req *out,
                           struct meshlet_err *err)
{
	static const char *const allowed[] = {"address", "ports", NULL};
	const json_t *ports = NULL, *v;
	char path[MESHLET_PATH_MAX];
	size_t i;

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    get_address(body, "address", &out->address, out->canon, err) < 0 ||
	    json_get_array(body, "", "ports", false, &ports, err) < 0)
		return -EINVAL;
	if (ports && json_array_size(ports) > API_ENDPOINT_PORTS_MAX)
		return err_set(err, "ports", "at most %d ports", API_ENDPOINT_PORTS_MAX);
	json_array_foreach(ports, i, v) {
		long long p;

		json_path_index(path, sizeof(path), "ports", i);
		if (json_as_int(v, path, 1, 65535, &p, err) < 0)
			return -EINVAL;
		out->ports[out->n_ports++] = (uint16_t)p;
	}
	return 0;
}

int api_parse_assign_req(const json_t *body, struct api_assign_req *out, struct meshlet_err *err)
{
	static const char *const allowed[] = {"service", "address", NULL};

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    get_service(body, "service", true, &out->service, err) < 0 ||
	    get_address(body, "address", &out->address, out->canon, err) < 0)
		return -EINVAL;
	return 0;
}

int api_parse_rotate_req(const json_t *body, struct api_rotate_req *out, struct meshlet_err *err)
{
	static const char *const allowed[] = {"service", "all", NULL};

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    get_service(body, "service", false, &out->service, err) < 0 ||
	    json_get_bool(body, "", "all", false, &out->all, err) < 0)
		return -EINVAL;
	if (out->service && out->all)
		return err_set(err, "", "give either \"service\" or \"all\": true, not both");
	if (!out->service && !out->all)
		return err_set(err, "service", "required (or \"all\": true)");
	return 0;
}

int api_parse_revoke_req(const json_t *body, struct api_revoke_req *out, struct meshlet_err *err)
{
	static const char *const allowed[] = {"serial", NULL};
	const char *s = NULL;

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    json_get_str(body, "", "serial", true, &s, err) < 0)
		return -EINVAL;
	if (ca_serial_normalize(s, out->serial) < 0)
		return err_set(err, "serial", "must be a certificate serial in hex (at most 40 digits)");
	return 0;
}

int api_parse_ca_rotate_req(const json_t *body, struct api_ca_rotate_req *out,
                            struct meshlet_err *err)
{
	static const char *const allowed[] = {"force", NULL};

	memset(out, 0, sizeof(*out));
	if (check_fields(body, allowed, err) < 0 ||
	    json_get_bool(body, "", "force", false, &out->force, err) < 0)
		return -EINVAL;
	return 0;
}

/* ---- answers ---- */

static const char *str_or_null(const json_t *obj, const char *key)
{
	return json_string_value(json_object_get(obj, key));
}

void api_parse_error_resp(const json_t *doc, struct api_error_resp *out)
{
	const json_t *e = json_is_object(doc) ? json_object_get(doc, "error") : NULL;

	memset(out, 0, sizeof(*out));
	if (!json_is_object(e))
		return;
	out->code = str_or_null(e, "code");
	out->message = str_or_null(e, "message");
	out->path = str_or_null(e, "path");
}

bool api_valid_serial_list(const json_t *arr)
{
	char hex[CA_SERIAL_HEX_MAX];
	const json_t *v;
	size_t i;

	if (!json_is_array(arr))
		return false;
	json_array_foreach(arr, i, v)
		if (!json_is_string(v) || ca_serial_normalize(json_string_value(v), hex) < 0)
			return false;
	return true;
}

/* True when arr is a non-empty array of non-empty strings. */
static bool pem_list_ok(const json_t *arr)
{
	const json_t *v;
	size_t i;

	if (!json_is_array(arr) || json_array_size(arr) == 0)
		return false;
	json_array_foreach(arr, i, v)
		if (!json_is_string(v) || json_string_length(v) == 0)
			return false;
	return true;
}

char *api_pem_join(const json_t *arr)
{
	size_t total = 1, used = 0, i;
	const json_t *v;
	char *out;

	if (!pem_list_ok(arr))
		return NULL;
	json_array_foreach(arr, i, v)
		total += json_string_length(v) + 1;
	out = malloc(total);
	if (!out)
		return NULL;
	json_array_foreach(arr, i, v) {
		size_t n = json_string_length(v);

		memcpy(out + used, json_string_value(v), n);
		used += n;
		if (out[used - 1] != '\n')
			out[used++] = '\n';
	}
	out[used] = '\0';
	return out;
}

/* An answer must be an object; its fields are checked against nothing
 * else (control may add fields, and an older proxy must not break). */
static int answer_object(const json_t *doc, struct meshlet_err *err)
{
	if (!json_is_object(doc))
		return err_set(err, "", "the answer is not a JSON object");
	return 0;
}

/* A version-like integer field (>= 0), required. */
static int get_count(const json_t *doc, const char *key, int64_t *out, struct meshlet_err *err)
{
	long long v = 0;

	if (json_get_int(doc, "", key, true, 0, INT64_MAX, &v, err) < 0)
		return -EINVAL;
	*out = v;
	return 0;
}

int api_parse_svid_resp(const json_t *doc, struct api_svid_resp *out, struct meshlet_err *err)
{
	memset(out, 0, sizeof(*out));
	if (answer_object(doc, err) < 0 ||
	    json_get_str(doc, "", "cert_chain", true, &out->cert_chain, err) < 0 ||
	    json_get_str(doc, "", "trust_domain", true, &out->trust_domain, err) < 0 ||
	    get_count(doc, "bundle_version", &out->bundle_version, err) < 0)
		return -EINVAL;
	out->bundle = json_object_get(doc, "bundle");
	if (!pem_list_ok(out->bundle))
		return err_set(err, "bundle", "must be a non-empty array of PEM certificates");
	return 0;
}

int api_parse_bundle_resp(const json_t *doc, struct api_bundle_resp *out,
                          struct meshlet_err *err)
{
	memset(out, 0, sizeof(*out));
	if (answer_object(doc, err) < 0 ||
	    json_get_str(doc, "", "trust_domain", true, &out->trust_domain, err) < 0 ||
	    get_count(doc, "version", &out->version, err) < 0)
		return -EINVAL;
	out->roots = json_object_get(doc, "roots");
	out->revoked = json_object_get(doc, "revoked");
	if (!pem_list_ok(out->roots))
		return err_set(err, "roots", "must be a non-empty array of PEM certificates");
	if (!api_valid_serial_list(out->revoked))
		return err_set(err, "revoked", "must be an array of certificate serials in hex");
	return 0;
}

int api_parse_config_resp(const json_t *doc, struct api_config_resp *out,
                          struct meshlet_err *err)
{
	memset(out, 0, sizeof(*out));
	if (answer_object(doc, err) < 0 ||
	    get_count(doc, "version", &out->version, err) < 0 ||
	    get_count(doc, "policy_version", &out->policy_version, err) < 0 ||
	    get_count(doc, "bundle_version", &out->bundle_version, err) < 0 ||
	    get_count(doc, "cert_generation", &out->cert_generation, err) < 0)
		return -EINVAL;
	out->policy = json_object_get(doc, "policy");
	out->endpoints = json_object_get(doc, "endpoints");
	if (!json_is_object(out->policy) && !json_is_null(out->policy))
		return err_set(err, "policy", "must be a policy document or null");
	if (!json_is_object(out->endpoints))
		return err_set(err, "endpoints", "must be an object of service: [endpoint]");
	/* Absent from a control older than traffic documents: none. */
	out->traffic = json_object_get(doc, "traffic");
	if (out->traffic && !json_is_object(out->traffic))
		return err_set(err, "traffic", "must be an object of service: {version, traffic}");
	return 0;
}

json_t *api_traffic_entry(const json_t *doc, int64_t version)
{
	return json_pack("{s:I, s:O}", "version", (json_int_t)version, "traffic", doc);
}

int api_parse_traffic_resp(const json_t *doc, struct api_traffic_resp *out,
                           struct meshlet_err *err)
{
	memset(out, 0, sizeof(*out));
	if (answer_object(doc, err) < 0 || get_count(doc, "version", &out->version, err) < 0)
		return -EINVAL;
	out->traffic = json_object_get(doc, "traffic");
	if (!json_is_object(out->traffic))
		return err_set(err, "traffic", "must be a traffic document");
	return 0;
}

/* The rate limits of t that select req, as /v1/check reports them. */
static json_t *check_rate_limits(const struct traffic *t, const struct policy_request *req)
{
	json_t *list = json_array();

	for (size_t i = 0; i < t->n_rate_limits; i++) {
		const struct traffic_rate_limit *rl = &t->rate_limits[i];

		if (traffic_rate_limit_selects(rl, req))
			json_array_append_new(list, json_pack("{s:s, s:f, s:i, s:s}", "name",
			                                      rl->sel.name, "requests_per_second",
			                                      rl->rps, "burst", (int)rl->burst, "per",
			                                      rl->per_caller ? "caller" : "rule"));
	}
	return list;
}

static json_t *check_faults(const struct traffic *t, const struct policy_request *req)
{
	json_t *list = json_array();

	for (size_t i = 0; i < t->n_faults; i++) {
		const struct traffic_fault *f = &t->faults[i];
		json_t *o;

		if (!traffic_fault_selects(f, req))
			continue;
		o = json_pack("{s:s, s:f}", "name", f->sel.name, "percent", f->percent);
		if (f->has_delay)
			json_object_set_new(o, "delay_ms", json_integer(f->delay_ms));
		if (f->abort_status)
			json_object_set_new(o, "abort_status", json_integer(f->abort_status));
		json_array_append_new(list, o);
	}
	return list;
}

int api_check_add_traffic(json_t *out, const struct traffic *t, int64_t version,
                          const struct policy_request *req)
{
	json_t *rl = t ? check_rate_limits(t, req) : json_array();
	json_t *f = t ? check_faults(t, req) : json_array();

	if (!rl || !f || json_object_set_new(out, "rate_limits", rl) < 0 ||
	    json_object_set_new(out, "faults", f) < 0 ||
	    json_object_set_new(out, "traffic_version", json_integer(version)) < 0)
		return -ENOMEM;
	return 0;
}

int api_parse_endpoint(const json_t *v, struct api_endpoint *out, struct meshlet_err *err)
{
	const json_t *list = NULL, *p;
	size_t i;

	memset(out, 0, sizeof(*out));
	out->address = json_string_value(v);
	if (json_is_object(v)) {
		out->address = str_or_null(v, "address");
		list = json_object_get(v, "ports");
		if (list && !json_is_array(list))
			return err_set(err, "ports", "must be an array");
	}
	if (!out->address)
		return err_set(err, "address", "not an address");
	json_array_foreach(list, i, p) {
		json_int_t port = json_integer_value(p);

		if (!json_is_integer(p) || port < 1 || port > 65535)
			return err_set(err, "ports", "an application port is not 1..65535");
		if (out->n_ports < API_ENDPOINT_PORTS_MAX)
			out->ports[out->n_ports++] = (uint16_t)port;
	}
	return 0;
}

int api_parse_token_resp(const json_t *doc, struct api_token_resp *out, struct meshlet_err *err)
{
	struct api_join_token jt;

	memset(out, 0, sizeof(*out));
	if (answer_object(doc, err) < 0 ||
	    json_get_str(doc, "", "token", true, &out->token, err) < 0 ||
	    json_get_str(doc, "", "service", true, &out->service, err) < 0 ||
	    json_get_str(doc, "", "expires_at", true, &out->expires_at, err) < 0 ||
	    api_token_parse(out->token, &jt, err) < 0)
		return -EINVAL;
	if (strcmp(jt.service, out->service) != 0)
		return err_set(err, "token", "names service %s, the answer %.64s", jt.service,
		               out->service);
	return 0;
}

int api_parse_ca_resp(const json_t *doc, struct api_ca_resp *out, struct meshlet_err *err)
{
	const json_t *gate = NULL;

	memset(out, 0, sizeof(*out));
	if (answer_object(doc, err) < 0 ||
	    json_get_str(doc, "", "phase", true, &out->phase, err) < 0 ||
	    json_get_object(doc, "", "gate", false, &gate, err) < 0)
		return -EINVAL;
	if (!gate)
		return 0;
	out->has_gate = true;
	if (json_get_bool(gate, "gate", "open", false, &out->gate_open, err) < 0 ||
	    json_get_str(gate, "gate", "next_phase", false, &out->next_phase, err) < 0 ||
	    json_get_str(gate, "gate", "waiting_for", false, &out->waiting_for, err) < 0)
		return -EINVAL;
	return 0;
}

/* ---------------------------------------------------------------- counter summaries */

void api_stats_clean(char *out, size_t len, const char *s)
{
	size_t i = 0;

	if (len == 0)
		return;
	for (; s && *s && i + 1 < len; s++)
		out[i++] = (*s >= 0x20 && *s < 0x7f) ? *s : '?';
	out[i] = '\0';
}

static int stats_add_callers(json_t *arr, const struct api_stats_summary *s)
{
	for (size_t i = 0; i < s->n_callers; i++) {
		const struct api_stats_caller *c = &s->callers[i];
		json_t *o = json_pack("{s:s, s:I, s:I, s:I}", "from", c->from, "requests",
		                      (json_int_t)c->requests, "denied", (json_int_t)c->denied,
		                      "errors_5xx", (json_int_t)c->errors_5xx);

		if (o && c->has_latency) {
			json_object_set_new(o, "p50_ms", json_real(c->p50_ms));
			json_object_set_new(o, "p99_ms", json_real(c->p99_ms));
		}
		if (!o || json_array_append_new(arr, o) < 0)
			return -ENOMEM;
	}
	return 0;
}

static int stats_add_denied(json_t *arr, const struct api_stats_summary *s)
{
	for (size_t i = 0; i < s->n_denied; i++) {
		const struct api_stats_denied *d = &s->denied[i];

		if (json_array_append_new(arr, json_pack("{s:s, s:s, s:I}", "from", d->from, "rule",
		                                         d->rule, "n", (json_int_t)d->n)) < 0)
			return -ENOMEM;
	}
	return 0;
}

static int stats_add_recent(json_t *arr, const struct api_stats_summary *s)
{
	for (size_t i = 0; i < s->n_recent; i++) {
		const struct api_stats_recent *r = &s->recent[i];

		if (json_array_append_new(arr, json_pack("{s:I, s:s, s:s, s:s, s:s}", "at",
		                                         (json_int_t)r->at, "from", r->from, "rule",
		                                         r->rule, "method", r->method, "path",
		                                         r->path)) < 0)
			return -ENOMEM;
	}
	return 0;
}

char *api_stats_format(const struct api_stats_summary *s)
{
	json_auto_t *doc = json_pack("{s:I, s:[], s:[], s:[]}", "interval_s",
	                             (json_int_t)s->interval_s, "callers", "denied", "recent");
	char *text;

	if (!doc || stats_add_callers(json_object_get(doc, "callers"), s) < 0 ||
	    stats_add_denied(json_object_get(doc, "denied"), s) < 0 ||
	    stats_add_recent(json_object_get(doc, "recent"), s) < 0)
		return NULL;
	text = json_dumps(doc, JSON_COMPACT | JSON_ENSURE_ASCII);
	if (text && strlen(text) > API_STATS_MAX) {
		free(text);
		return NULL;   /* cannot happen within the caps; never send more */
	}
	return text;
}

/* A caller name: a service, or API_STATS_OTHER. */
static int stats_name(const json_t *o, const char *path, const char *key, bool rule, char *out,
                      size_t len, struct meshlet_err *err)
{
	const char *s = NULL;
	char p[96];

	if (json_get_str(o, path, key, true, &s, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, key);
	if (strcmp(s, API_STATS_OTHER) != 0 &&
	    !(rule ? policy_rule_name_valid(s) : identity_valid_service(s)))
		return err_set(err, p, "'%.64s' is not a %s name or \"%s\"", s,
		               rule ? "rule" : "service", API_STATS_OTHER);
	snprintf(out, len, "%s", s);
	return 0;
}

static int stats_count(const json_t *o, const char *path, const char *key, int64_t *out,
                       struct meshlet_err *err)
{
	long long v = 0;

	if (json_get_int(o, path, key, true, 0, API_STATS_COUNT_MAX, &v, err) < 0)
		return -EINVAL;
	*out = v;
	return 0;
}

static int stats_ms(const json_t *o, const char *path, const char *key, double *out,
                    struct meshlet_err *err)
{
	const json_t *v = json_object_get(o, key);
	char p[96];

	json_path_key(p, sizeof(p), path, key);
	if (!json_is_number(v))
		return err_set(err, p, "must be a number of milliseconds");
	*out = json_number_value(v);
	if (!(*out >= 0 && *out <= API_STATS_MS_MAX))
		return err_set(err, p, "must be 0..%.0f", API_STATS_MS_MAX);
	return 0;
}

/* The entries of arr at key (at most max), each checked by one(). */
static int stats_list(const json_t *doc, const char *key, size_t max, size_t *n,
                      int (*one)(const json_t *o, const char *path, size_t i, void *out,
                                 struct meshlet_err *err),
                      void *out, struct meshlet_err *err)
{
	const json_t *arr = NULL, *v;
	char p[64];
	size_t i;

	if (json_get_array(doc, "", key, true, &arr, err) < 0)
		return -EINVAL;
	if (json_array_size(arr) > max)
		return err_set(err, key, "at most %zu entries", max);
	json_array_foreach(arr, i, v) {
		json_path_index(p, sizeof(p), key, i);
		if (one(v, p, i, out, err) < 0)
			return -EINVAL;
	}
	*n = json_array_size(arr);
	return 0;
}

static int stats_one_caller(const json_t *o, const char *p, size_t i, void *out,
                            struct meshlet_err *err)
{
	static const char *const keys[] = {"from", "requests", "denied", "errors_5xx", "p50_ms",
	                                   "p99_ms", NULL};
	struct api_stats_caller *c = &((struct api_stats_summary *)out)->callers[i];
	bool p50 = json_object_get(o, "p50_ms") != NULL, p99 = json_object_get(o, "p99_ms") != NULL;

	if (json_check_object(o, p, keys, err) < 0 ||
	    stats_name(o, p, "from", false, c->from, sizeof(c->from), err) < 0 ||
	    stats_count(o, p, "requests", &c->requests, err) < 0 ||
	    stats_count(o, p, "denied", &c->denied, err) < 0 ||
	    stats_count(o, p, "errors_5xx", &c->errors_5xx, err) < 0)
		return -EINVAL;
	if (c->denied > c->requests || c->errors_5xx > c->requests)
		return err_set(err, p, "denied and errors_5xx cannot exceed requests");
	if (p50 != p99)
		return err_set(err, p, "p50_ms and p99_ms come together");
	c->has_latency = p50;
	if (p50 && (stats_ms(o, p, "p50_ms", &c->p50_ms, err) < 0 ||
	            stats_ms(o, p, "p99_ms", &c->p99_ms, err) < 0))
		return -EINVAL;
	return 0;
}

static int stats_one_denied(const json_t *o, const char *p, size_t i, void *out,
                            struct meshlet_err *err)
{
	static const char *const keys[] = {"from", "rule", "n", NULL};
	struct api_stats_denied *d = &((struct api_stats_summary *)out)->denied[i];

	if (json_check_object(o, p, keys, err) < 0 ||
	    stats_name(o, p, "from", false, d->from, sizeof(d->from), err) < 0 ||
	    stats_name(o, p, "rule", true, d->rule, sizeof(d->rule), err) < 0 ||
	    stats_count(o, p, "n", &d->n, err) < 0)
		return -EINVAL;
	return 0;
}

/* A method or path of a recent denial: printable ASCII of at most max bytes. */
static int stats_text(const json_t *o, const char *path, const char *key, char *out, size_t max,
                      struct meshlet_err *err)
{
	const char *s = NULL;
	char p[96];

	if (json_get_str(o, path, key, true, &s, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, key);
	if (strlen(s) > max)
		return err_set(err, p, "at most %zu characters", max);
	for (const char *c = s; *c; c++) {
		if (*c < 0x20 || *c >= 0x7f)
			return err_set(err, p, "must be printable ASCII");
	}
	snprintf(out, max + 1, "%s", s);
	return 0;
}

static int stats_one_recent(const json_t *o, const char *p, size_t i, void *out,
                            struct meshlet_err *err)
{
	static const char *const keys[] = {"at", "from", "rule", "method", "path", NULL};
	struct api_stats_recent *r = &((struct api_stats_summary *)out)->recent[i];
	long long at = 0;

	if (json_check_object(o, p, keys, err) < 0 ||
	    json_get_int(o, p, "at", true, 0, (long long)1 << 40, &at, err) < 0 ||
	    stats_name(o, p, "from", false, r->from, sizeof(r->from), err) < 0 ||
	    stats_name(o, p, "rule", true, r->rule, sizeof(r->rule), err) < 0 ||
	    stats_text(o, p, "method", r->method, API_STATS_METHOD_MAX, err) < 0 ||
	    stats_text(o, p, "path", r->path, API_STATS_PATH_MAX, err) < 0)
		return -EINVAL;
	r->at = at;
	return 0;
}

int api_stats_parse(const char *text, struct api_stats_summary *out, struct meshlet_err *err)
{
	static const char *const keys[] = {"interval_s", "callers", "denied", "recent", NULL};
	json_auto_t *doc = NULL;
	long long interval = 0;
	size_t len = text ? strlen(text) : 0;

	memset(out, 0, sizeof(*out));
	if (len > API_STATS_MAX)
		return err_set(err, "", "the summary is %zu bytes, over the limit of %d", len,
		               API_STATS_MAX);
	doc = json_parse_strict(text ? text : "", len, 3, err);
	if (!doc)
		return -EINVAL;
	if (!json_is_object(doc))
		return err_set(err, "", "the summary must be a JSON object");
	if (json_check_object(doc, "", keys, err) < 0 ||
	    json_get_int(doc, "", "interval_s", true, 1, API_STATS_INTERVAL_MAX, &interval, err) < 0 ||
	    stats_list(doc, "callers", API_STATS_CALLERS_MAX, &out->n_callers, stats_one_caller, out,
	               err) < 0 ||
	    stats_list(doc, "denied", API_STATS_DENIED_MAX, &out->n_denied, stats_one_denied, out,
	               err) < 0 ||
	    stats_list(doc, "recent", API_STATS_RECENT_MAX, &out->n_recent, stats_one_recent, out,
	               err) < 0)
		return -EINVAL;
	out->interval_s = interval;
	return 0;
}
