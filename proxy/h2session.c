/* h2session: nghttp2 sessions with limits, header checks and abuse counters. */
#include "h2session.h"

#include <string.h>
#include <strings.h>

/* Budgets of frames that cost us work and give the peer nothing. A gRPC
 * client sends PINGs (keepalive, BDP probes) and a few SETTINGS; a flood
 * sends them by the thousand. */
#define CONTROL_BURST 2000.0
#define CONTROL_RATE 500.0          /* per second */
#define RESET_BURST 200.0
#define RESET_RATE 20.0
#define MAX_CONTINUATIONS 8
/* Streams a client may open beyond the limit, racing our first SETTINGS. */
#define STREAM_SLACK 0

int h2_is_preface(const char *data, size_t len)
{
	size_t n = len < H2_PREFACE_LEN ? len : H2_PREFACE_LEN;

	if (memcmp(data, H2_PREFACE, n) != 0)
		return 0;
	return len >= H2_PREFACE_LEN ? 1 : -1;
}

static int set_options(nghttp2_option *o, bool server, const struct config_http2 *lim)
{
	nghttp2_option_set_no_auto_window_update(o, 1);
	nghttp2_option_set_max_outbound_ack(o, 1000);
	nghttp2_option_set_max_settings(o, 16);
	nghttp2_option_set_max_continuations(o, MAX_CONTINUATIONS);
	nghttp2_option_set_max_deflate_dynamic_table_size(o, 4096);
	if (server)
		nghttp2_option_set_stream_reset_rate_limit(o, (uint64_t)RESET_BURST * 2,
		                                           (uint64_t)RESET_RATE * 2);
	else
		nghttp2_option_set_peer_max_concurrent_streams(o, lim->max_concurrent_streams);
	return 0;
}

int h2_session_new(nghttp2_session **out, bool server, const struct config_http2 *lim,
                   const nghttp2_session_callbacks *cb, void *user)
{
	nghttp2_settings_entry iv[] = {
		{ NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, lim->max_concurrent_streams },
		{ NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, lim->initial_window_bytes },
		{ NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, lim->max_header_list_bytes },
		{ NGHTTP2_SETTINGS_ENABLE_PUSH, 0 },
	};
	nghttp2_option *o;
	int rc;

	*out = NULL;
	if ((rc = nghttp2_option_new(&o)) != 0)
		return rc;
	set_options(o, server, lim);
	rc = server ? nghttp2_session_server_new2(out, cb, user, o)
	            : nghttp2_session_client_new2(out, cb, user, o);
	nghttp2_option_del(o);
	if (rc != 0)
		return rc;
	/* A server must not send ENABLE_PUSH. */
	rc = nghttp2_submit_settings(*out, NGHTTP2_FLAG_NONE, iv, server ? 3 : 4);
	if (rc == 0)
		/* The connection window: room for a few streams at full speed;
		 * what a peer can make us hold stays bounded by it. */
		rc = nghttp2_session_set_local_window_size(*out, NGHTTP2_FLAG_NONE, 0,
		                                           (int32_t)(lim->initial_window_bytes * 4));
	if (rc != 0) {
		nghttp2_session_del(*out);
		*out = NULL;
	}
	return rc;
}

/* ---- header checks ------------------------------------------------------ */

static bool is_tchar_lower(unsigned char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || strchr("!#$%&'*+-.^_`|~", ch);
}

static bool valid_name(const char *s, size_t n)
{
	size_t i = s[0] == ':' ? 1 : 0;

	if (n <= i)
		return false;
	for (; i < n; i++)
		if (!s[i] || !is_tchar_lower((unsigned char)s[i]))
			return false;
	return true;
}

static bool valid_value(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
			return false;
	return true;
}

static bool is(const struct h2_field *f, const char *name)
{
	return f->name_len == strlen(name) && memcmp(f->name, name, f->name_len) == 0;
}

static bool value_is(const struct h2_field *f, const char *v)
{
	return f->value_len == strlen(v) && memcmp(f->value, v, f->value_len) == 0;
}

static bool connection_specific(const struct h2_field *f)
{
	return is(f, "connection") || is(f, "keep-alive") || is(f, "proxy-connection") ||
	       is(f, "transfer-encoding") || is(f, "upgrade") ||
	       (is(f, "te") && !value_is(f, "trailers"));
}

static bool all_digits(const char *s, size_t n)
{
	if (n == 0 || n > 19)
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

/* Fields every block shares: names, values, order, connection-specific ones. */
static enum h2_refusal check_common(const struct h2_field *f, size_t n, const char **why)
{
	bool regular_seen = false;
	const struct h2_field *cl = NULL;

	for (size_t i = 0; i < n; i++) {
		if (!valid_name(f[i].name, f[i].name_len))
			return *why = "invalid header name (upper-case or not a token)", H2_MALFORMED;
		if (!valid_value(f[i].value, f[i].value_len))
			return *why = "CR, LF or NUL in a header value", H2_MALFORMED;
		if (f[i].name[0] == ':') {
			if (regular_seen)
				return *why = "pseudo-header after a regular header", H2_MALFORMED;
			for (size_t j = 0; j < i; j++)
				if (f[j].name_len == f[i].name_len &&
				    !memcmp(f[j].name, f[i].name, f[i].name_len))
					return *why = "duplicate pseudo-header", H2_MALFORMED;
			continue;
		}
		regular_seen = true;
		if (connection_specific(&f[i]))
			return *why = "connection-specific header field", H2_MALFORMED;
		if (is(&f[i], "content-length")) {
			if (!all_digits(f[i].value, f[i].value_len) ||
			    (cl && (cl->value_len != f[i].value_len ||
			            memcmp(cl->value, f[i].value, f[i].value_len))))
				return *why = "invalid content-length", H2_MALFORMED;
			cl = &f[i];
		}
	}
	return H2_OK;
}

static const struct h2_field *find(const struct h2_field *f, size_t n, const char *name,
                                   size_t *count)
{
	const struct h2_field *first = NULL;

	*count = 0;
	for (size_t i = 0; i < n; i++) {
		if (is(&f[i], name)) {
			if (!first)
				first = &f[i];
			(*count)++;
		}
	}
	return first;
}

static enum h2_refusal check_pseudo_request(const struct h2_field *f, size_t n, const char **why)
{
	size_t cm, cp, cs, ca, ch;
	const struct h2_field *m = find(f, n, ":method", &cm), *p = find(f, n, ":path", &cp);
	const struct h2_field *a = find(f, n, ":authority", &ca), *h = find(f, n, "host", &ch);

	find(f, n, ":scheme", &cs);
	for (size_t i = 0; i < n && f[i].name[0] == ':'; i++)
		if (!is(&f[i], ":method") && !is(&f[i], ":path") && !is(&f[i], ":scheme") &&
		    !is(&f[i], ":authority"))
			return *why = "unknown pseudo-header", H2_MALFORMED;
	if (cm != 1)
		return *why = "missing :method", H2_MALFORMED;
	if (value_is(m, "CONNECT"))
		return *why = "CONNECT is not supported over HTTP/2", H2_BAD_REQUEST;
	if (cp != 1 || cs != 1 || p->value_len == 0)
		return *why = "missing :path or :scheme", H2_MALFORMED;
	if (p->value[0] != '/' && !(value_is(p, "*") && value_is(m, "OPTIONS")))
		return *why = ":path must start with '/' (or be \"*\" for OPTIONS)", H2_MALFORMED;
	if (ch > 1)
		return *why = "more than one host field", H2_BAD_REQUEST;
	if (a && h && (a->value_len != h->value_len || strncasecmp(a->value, h->value, a->value_len)))
		return *why = ":authority and host disagree", H2_BAD_REQUEST;
	return H2_OK;
}

enum h2_refusal h2_check_request(const struct h2_field *f, size_t n, const char **why)
{
	enum h2_refusal r = check_common(f, n, why);

	return r != H2_OK ? r : check_pseudo_request(f, n, why);
}

enum h2_refusal h2_check_response(const struct h2_field *f, size_t n, bool trailers,
                                  const char **why)
{
	enum h2_refusal r = check_common(f, n, why);
	size_t cs;
	const struct h2_field *s;

	if (r != H2_OK)
		return r;
	for (size_t i = 0; i < n && f[i].name[0] == ':'; i++)
		if (trailers || !is(&f[i], ":status"))
			return *why = "unexpected pseudo-header in a response", H2_MALFORMED;
	if (trailers)
		return H2_OK;
	s = find(f, n, ":status", &cs);
	if (cs != 1 || s->value_len != 3 || !all_digits(s->value, 3) || s->value[0] == '0')
		return *why = "missing or invalid :status", H2_MALFORMED;
	return H2_OK;
}

/* ---- abuse counters ----------------------------------------------------- */

static void bucket_init(struct h2_bucket *b, double burst, uint64_t now)
{
	b->tokens = burst;
	b->at_ms = now;
}

/* Takes a token; false when none is left. */
static bool bucket_take(struct h2_bucket *b, double burst, double rate, uint64_t now)
{
	if (now > b->at_ms) {
		b->tokens += (double)(now - b->at_ms) * rate / 1000.0;
		if (b->tokens > burst)
			b->tokens = burst;
		b->at_ms = now;
	}
	if (b->tokens < 1.0)
		return false;
	b->tokens -= 1.0;
	return true;
}

void h2_guard_init(struct h2_guard *g, const struct config_http2 *lim, uint64_t now_ms)
{
	memset(g, 0, sizeof(*g));
	bucket_init(&g->control, CONTROL_BURST, now_ms);
	bucket_init(&g->resets, RESET_BURST, now_ms);
	g->max_streams = lim->max_concurrent_streams;
	g->max_header_bytes = lim->max_header_list_bytes;
}

static bool control_frame(const nghttp2_frame_hd *hd)
{
	switch (hd->type) {
	case NGHTTP2_SETTINGS:
	case NGHTTP2_PING:
		return !(hd->flags & NGHTTP2_FLAG_ACK);
	case NGHTTP2_PRIORITY:
		return true;
	case NGHTTP2_DATA:
		return hd->length == 0 && !(hd->flags & NGHTTP2_FLAG_END_STREAM);
	case NGHTTP2_HEADERS:
	case NGHTTP2_RST_STREAM:
	case NGHTTP2_WINDOW_UPDATE:
	case NGHTTP2_CONTINUATION:
	case NGHTTP2_GOAWAY:
		return false;
	default:
		return true;    /* unknown and extension frames are ignored: work for nothing */
	}
}

int h2_guard_frame(struct h2_guard *g, const nghttp2_frame_hd *hd, size_t open_streams,
                   bool new_stream, uint64_t now_ms)
{
	if (hd->type == NGHTTP2_HEADERS) {
		g->continuations = 0;
		g->header_bytes = 0;
		if (new_stream && open_streams >= g->max_streams + STREAM_SLACK)
			return H2_ABUSE_TOO_MANY_STREAMS;
	}
	if (hd->type == NGHTTP2_CONTINUATION && ++g->continuations > MAX_CONTINUATIONS)
		return H2_ABUSE_CONTINUATION_FLOOD;
	if (hd->type == NGHTTP2_RST_STREAM && !bucket_take(&g->resets, RESET_BURST, RESET_RATE, now_ms))
		return H2_ABUSE_RAPID_RESET;
	if (control_frame(hd) && !bucket_take(&g->control, CONTROL_BURST, CONTROL_RATE, now_ms))
		return H2_ABUSE_CONTROL_FLOOD;
	return -1;
}

int h2_guard_header(struct h2_guard *g, size_t namelen, size_t valuelen)
{
	/* RFC 9113 6.5.2: each field counts its octets plus 32. */
	g->header_bytes += namelen + valuelen + 32;
	return g->header_bytes > g->max_header_bytes ? H2_ABUSE_HEADER_LIST : -1;
}

/* ---- gRPC --------------------------------------------------------------- */

int64_t h2_grpc_timeout_ms(const char *v, size_t len)
{
	int64_t n = 0;

	if (len < 2 || len > 9)
		return -1;
	for (size_t i = 0; i + 1 < len; i++) {
		if (v[i] < '0' || v[i] > '9')
			return -1;
		n = n * 10 + (v[i] - '0');
	}
	switch (v[len - 1]) {
	case 'H': return n * 3600000;
	case 'M': return n * 60000;
	case 'S': return n * 1000;
	case 'm': return n;
	case 'u': return (n + 999) / 1000;
	case 'n': return (n + 999999) / 1000000;
	default: return -1;
	}
}

bool h2_is_grpc(const char *ct, size_t len)
{
	static const char g[] = "application/grpc";
	size_t n = sizeof(g) - 1;

	return len >= n && strncasecmp(ct, g, n) == 0 &&
	       (len == n || ct[n] == '+' || ct[n] == ';');
}
