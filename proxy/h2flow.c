/* h2flow: HTTP/2 streams between a client-facing and an upstream-facing nghttp2 session. */
#include "h2flow.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "meshlet/http.h"
#include "meshlet/log.h"
#include "apppool.h"
#include "bytequeue.h"
#include "conn.h"
#include "h2session.h"
#include "h2to1.h"
#include "httpreq.h"
#include "snapshot.h"
#include "upool.h"
#include "worker-t.h"

#define OUT_GATHER 65536      /* frames gathered into one write, at most */
#define MAX_FIELDS 256        /* fields of one header block we keep */
/* The upstream is gone: streams still arriving are answered 502 / gRPC 14
 * for this long (a client may have sent its request before it could know),
 * then GOAWAY and close. */
#define GONE_GRACE_MS 1000

enum {
	GRPC_CANCELLED = 1, GRPC_INVALID_ARGUMENT = 3, GRPC_DEADLINE = 4, GRPC_DENIED = 7,
	GRPC_RESOURCE_EXHAUSTED = 8, GRPC_UNKNOWN = 2, GRPC_UNAVAILABLE = 14,
};

/* A header block, copied: names and values in one buffer, by offset. */
struct hfield {
	uint32_t name_off, name_len, value_off, value_len;
};

struct h2hdrs {
	char *buf;
	size_t len, cap;
	struct hfield *f;
	size_t n, cap_n;
};

struct h2half {
	struct h2hdrs head, trailers;
	struct bytequeue body;     /* received, not yet taken by the other side */
	bool in_trailers;          /* the header block arriving is trailers */
	bool head_done;
	bool end;                  /* END_STREAM received */
};

struct h2stream {
	struct h2stream *prev, *next;
	struct h2flow *f;          /* the client connection it belongs to */
	int32_t down_id, up_id;    /* on the client's session, the upstream's (0: none) */
	struct apppool_req *app;   /* carried by the app pool (HTTP/1.1 app), until it ends */
	struct upool_req *pooled;  /* outbound: carried by the pool between sidecars, until it ends */
	struct h2half req, resp;
	bool down_closed, up_closed;
	bool resp_started;         /* the response HEADERS went to the client's session */
	bool local;                /* answered by the proxy: request bytes are dropped */
	bool grpc;
	bool overloaded;           /* refused by limits.max_pending_requests (503) */
	int grpc_status;           /* -1: none seen */
	uint64_t resp_due;         /* conn_clock_ms(): the response head is due (0: not awaited) */
	uint64_t deadline;         /* grpc-timeout, 0: none */
	uint64_t hold_until;       /* inbound, conn_clock_ms(): a fault's delay holds the stream
	                              (its forwarding or its abort) until then; 0: not held */
	char *held_query;          /* the held stream's query, for forwarding it */
	char *local_body;
	size_t local_len, local_off;
	char *method, *path;
	char rid[HTTPREQ_ID_LEN + 1];
	bool replace_rid;
	struct httpreq_record rec;
	struct httpreq_verdict verdict;   /* inbound: what the policy and traffic said */
};

struct h2flow {
	struct conn *c;
	nghttp2_session *down;     /* faces the client: we are its server */
	nghttp2_session *up;       /* faces the upstream: we are its client; NULL once gone
	                              (and always with app1) */
	bool app1;                 /* inbound to an HTTP/1.1 app: streams go through the
	                              worker's app pool, not the connection's upstream */
	bool app_auto;             /* inbound, app_protocol auto: a stream an HTTP/1.1 app
	                              sent (H2TO1_PROTO_FIELD) goes as app1; the upstream
	                              session is made for the first other one */
	struct h2stream *streams;
	size_t n_streams;          /* in the list (until both sessions are done with them) */
	size_t open_down;          /* open on the client's session */
	struct h2_guard guard;
	bool dead;                 /* GOAWAY for an error: nothing more is taken */
	bool goaway;               /* GOAWAY sent or queued */
	uint64_t gone_at;          /* conn_clock_ms() the upstream went, 0: it is there */
	bool logged;
};

static struct h2flow *flow(const struct conn *c)
{
	return c->proto_ctx;
}

static int req_dir(const struct conn *c)
{
	return c->inbound ? RELAY_DOWN : RELAY_UP;
}

/* ---- header blocks ------------------------------------------------------ */

static int hdrs_add(struct h2hdrs *h, const uint8_t *name, size_t nl, const uint8_t *val,
                    size_t vl)
{
	size_t need = h->len + nl + vl + 2;

	if (h->n == MAX_FIELDS)
		return -ENOSPC;
	if (need > h->cap) {
		size_t cap = h->cap ? h->cap * 2 : 512;
		char *b;

		while (cap < need)
			cap *= 2;
		if (!(b = realloc(h->buf, cap)))
			return -ENOMEM;
		h->buf = b;
		h->cap = cap;
	}
	if (h->n == h->cap_n) {
		size_t cap_n = h->cap_n ? h->cap_n * 2 : 16;
		struct hfield *f = realloc(h->f, cap_n * sizeof(*f));

		if (!f)
			return -ENOMEM;
		h->f = f;
		h->cap_n = cap_n;
	}
	h->f[h->n] = (struct hfield){ (uint32_t)h->len, (uint32_t)nl, (uint32_t)(h->len + nl + 1),
	                              (uint32_t)vl };
	memcpy(h->buf + h->len, name, nl);
	h->buf[h->len + nl] = '\0';
	memcpy(h->buf + h->len + nl + 1, val, vl);
	h->buf[need - 1] = '\0';
	h->len = need;
	h->n++;
	return 0;
}

static void hdrs_free(struct h2hdrs *h)
{
	free(h->buf);
	free(h->f);
	memset(h, 0, sizeof(*h));
}

static struct h2_field field(const struct h2hdrs *h, size_t i)
{
	return (struct h2_field){ h->buf + h->f[i].name_off, h->buf + h->f[i].value_off,
	                          h->f[i].name_len, h->f[i].value_len };
}

/* The fields of h as h2_field, into out (h->n entries). */
static void hdrs_fields(const struct h2hdrs *h, struct h2_field *out)
{
	for (size_t i = 0; i < h->n; i++)
		out[i] = field(h, i);
}

/* The value of the first field called name (NUL-terminated), or NULL; *count copies. */
static const char *hdrs_get(const struct h2hdrs *h, const char *name, size_t *count)
{
	const char *v = NULL;
	size_t n = 0, len = strlen(name);

	for (size_t i = 0; i < h->n; i++) {
		if (h->f[i].name_len == len && !memcmp(h->buf + h->f[i].name_off, name, len)) {
			if (!v)
				v = h->buf + h->f[i].value_off;
			n++;
		}
	}
	if (count)
		*count = n;
	return v;
}

static nghttp2_nv nv(const char *name, const char *value, size_t vlen)
{
	return (nghttp2_nv){ (uint8_t *)name, (uint8_t *)value, strlen(name), vlen,
	                     NGHTTP2_NV_FLAG_NONE };
}

static nghttp2_nv nv_of(const struct h2hdrs *h, size_t i)
{
	return (nghttp2_nv){ (uint8_t *)h->buf + h->f[i].name_off,
	                     (uint8_t *)h->buf + h->f[i].value_off, h->f[i].name_len,
	                     h->f[i].value_len, NGHTTP2_NV_FLAG_NONE };
}

/* ---- bodies ------------------------------------------------------------- */

/* Frees what was never passed on; the session it came from gets its
 * connection window back (the stream's is gone with it). */
static void half_free(struct h2half *h, nghttp2_session *from)
{
	if (from && h->body.len)
		nghttp2_session_consume_connection(from, h->body.len);
	bq_clear(&h->body);
	hdrs_free(&h->head);
	hdrs_free(&h->trailers);
}

/* ---- streams ------------------------------------------------------------ */

static struct h2stream *stream_new(struct h2flow *f, int32_t id)
{
	struct h2stream *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->f = f;
	s->down_id = id;
	s->grpc_status = -1;
	s->rec.grpc_status = -1;
	s->rec.version = "2";
	httpreq_started(&s->rec);
	s->next = f->streams;
	if (f->streams)
		f->streams->prev = s;
	f->streams = s;
	f->n_streams++;
	f->open_down++;
	return s;
}

static void stream_free(struct h2flow *f, struct h2stream *s)
{
	if (s->app)
		apppool_cancel(s->app);
	if (s->pooled)
		upool_cancel(s->pooled);
	if (s->prev)
		s->prev->next = s->next;
	else
		f->streams = s->next;
	if (s->next)
		s->next->prev = s->prev;
	f->n_streams--;
	half_free(&s->req, f->down);
	half_free(&s->resp, f->up);
	free(s->local_body);
	free(s->held_query);
	free(s->method);
	free(s->path);
	free(s);
}

/* Both sessions are done with s: it goes. */
static void stream_maybe_free(struct h2flow *f, struct h2stream *s)
{
	if (s->down_closed && !s->app && !s->pooled && (s->up_closed || !s->up_id))
		stream_free(f, s);
}

static void stream_log(struct h2flow *f, struct h2stream *s, int status_if_none)
{
	if (s->rec.status == 0 && status_if_none)
		s->rec.status = status_if_none;
	if (s->grpc)
		s->rec.grpc_status = s->grpc_status >= 0 ? s->grpc_status : GRPC_CANCELLED;
	s->rec.method = s->method;
	s->rec.path = s->path;
	s->rec.request_id = s->rid[0] ? s->rid : NULL;
	f->logged = true;
	httpreq_log(f->c, &s->rec);
}

/* ---- the proxy's own answers ------------------------------------------- */

static ssize_t local_read(nghttp2_session *sess, int32_t id, uint8_t *buf, size_t len,
                          uint32_t *flags, nghttp2_data_source *src, void *user)
{
	struct h2stream *s = src->ptr;
	size_t n = s->local_len - s->local_off < len ? s->local_len - s->local_off : len;

	memcpy(buf, s->local_body + s->local_off, n);
	s->local_off += n;
	if (s->local_off == s->local_len)
		*flags |= NGHTTP2_DATA_FLAG_EOF;
	return (ssize_t)n;
}

/*
 * Answers s on the client's session: gRPC gets a trailers-only response
 * with grpc_status and message; anything else status with the same JSON
 * body as HTTP/1.1. The request's remaining body is dropped.
 */
static void answer_local(struct h2flow *f, struct h2stream *s, int status, int grpc_status,
                         const char *message)
{
	char code[4], gs[4], body[512], len_text[24], retry[16], *msg_copy = NULL;
	nghttp2_data_provider prd = { .source.ptr = s, .read_callback = local_read };
	nghttp2_nv hdr[8];
	size_t n = 0;

	if (s->resp_started || s->down_closed)
		return;
	s->local = true;
	s->resp_started = true;
	s->resp_due = 0;
	/* What arrived of the request and what is still on its way are dropped. */
	nghttp2_session_consume(f->down, s->down_id, s->req.body.len);
	half_free(&s->req, NULL);
	snprintf(code, sizeof(code), "%d", s->grpc ? 200 : status);
	hdr[n++] = nv(":status", code, strlen(code));
	if (s->grpc) {
		snprintf(gs, sizeof(gs), "%d", grpc_status);
		msg_copy = strdup(message ? message : "");
		hdr[n++] = nv("content-type", "application/grpc", 16);
		hdr[n++] = nv("grpc-status", gs, strlen(gs));
		if (msg_copy)
			hdr[n++] = nv("grpc-message", msg_copy, strlen(msg_copy));
		s->grpc_status = grpc_status;
		s->rec.status = 200;
	} else {
		int len = s->overloaded ?
		          snprintf(body, sizeof(body), "{\"error\":\"overloaded\",\"limit\":"
		                   "\"max_pending_requests\"}\n") :
		          httpreq_error_body(status, &s->verdict, message, body, sizeof(body));

		s->local_body = malloc((size_t)len);
		if (s->local_body) {
			memcpy(s->local_body, body, (size_t)len);
			s->local_len = (size_t)len;
		}
		hdr[n++] = nv("content-type", "application/json", 16);
		s->rec.status = status;
	}
	if (s->rid[0])
		hdr[n++] = nv("x-request-id", s->rid, strlen(s->rid));
	if (s->overloaded)
		hdr[n++] = nv("x-meshlet-overloaded", "1", 1);
	if (s->verdict.traffic_name && !s->verdict.traffic_fault) {
		snprintf(retry, sizeof(retry), "%u", s->verdict.retry_after);
		hdr[n++] = nv("retry-after", retry, strlen(retry));
	}
	/* HEAD: the length of the body, not the body. */
	if (s->local_body && s->method && !strcmp(s->method, "HEAD")) {
		snprintf(len_text, sizeof(len_text), "%zu", s->local_len);
		hdr[n++] = nv("content-length", len_text, strlen(len_text));
		free(s->local_body);
		s->local_body = NULL;
		s->local_len = 0;
	}
	if (nghttp2_submit_response(f->down, s->down_id, hdr, n,
	                            s->grpc || !s->local_body ? NULL : &prd) != 0)
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, NGHTTP2_INTERNAL_ERROR);
	s->rec.bytes_out += s->local_len;
	free(msg_copy);    /* nghttp2 copied the header block */
}

/* The upstream cannot answer s: 502 (gRPC: UNAVAILABLE), or 504 when it timed out. */
static void answer_unavailable(struct h2flow *f, struct h2stream *s, int status,
                               const char *why)
{
	if (s->resp_started) {
		/* Part of the response went out: only a reset tells the client. */
		if (!s->down_closed)
			nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id,
			                          NGHTTP2_INTERNAL_ERROR);
		return;
	}
	answer_local(f, s, status, GRPC_UNAVAILABLE, why);
}

/* ---- abuse and session errors ------------------------------------------ */

/* The client abused the connection: GOAWAY with code, counted, nothing more taken. */
static void abuse(struct h2flow *f, int kind, uint32_t code)
{
	struct conn *c = f->c;

	if (f->dead)
		return;
	f->dead = true;
	f->goaway = true;
	metrics_inc(&c->w->shared->metrics->http2_abuse[kind]);
	log_warn("conn %llu: HTTP/2 %s from %s: GOAWAY %s", (unsigned long long)c->id,
	         metrics_h2_abuse_str((enum metrics_h2_abuse)kind),
	         c->peer ? c->peer : "app", nghttp2_http2_strerror(code));
	nghttp2_session_terminate_session(f->down, code);
	c->closing = true;
}

/* The upstream's session is gone or broken: every stream it held is answered. */
static void upstream_gone(struct h2flow *f, const char *why)
{
	struct h2stream *s, *next;

	if (!f->up)
		return;
	log_info("conn %llu: HTTP/2 upstream %s: %s", (unsigned long long)f->c->id,
	         conn_destination_text(f->c), why);
	for (s = f->streams; s; s = next) {
		next = s->next;
		if (s->up_id && !s->up_closed) {
			s->up_closed = true;
			half_free(&s->resp, NULL);
			answer_unavailable(f, s, 502, "upstream unavailable");
		}
	}
	nghttp2_session_del(f->up);
	f->up = NULL;
	f->gone_at = conn_clock_ms();
	/* No new streams, please (GOAWAY with the last ID possible); the final
	 * GOAWAY and the close come after GONE_GRACE_MS (h2flow_on_timeout). */
	if (!f->goaway)
		nghttp2_submit_shutdown_notice(f->down);
	conn_kick(f->c);
	for (s = f->streams; s; s = next) {
		next = s->next;
		stream_maybe_free(f, s);
	}
}

static int abuse_of_error(int rc)
{
	switch (rc) {
	case NGHTTP2_ERR_FLOODED:
		return H2_ABUSE_CONTROL_FLOOD;    /* SETTINGS/PING acks queued past nghttp2's bound */
	case NGHTTP2_ERR_TOO_MANY_CONTINUATIONS:
		return H2_ABUSE_CONTINUATION_FLOOD;
	default:
		return H2_ABUSE_PROTOCOL;
	}
}

/* ---- the request side --------------------------------------------------- */

/*
 * A data provider's read: takes what half h buffered, reopens the window
 * of the session it came from (from, from_id) by that much, and at the end
 * of h sends its trailers or END_STREAM. more: the source may still add
 * bytes (else an empty buffer is the end).
 */
static ssize_t pass_body(nghttp2_session *to, int32_t id, struct h2half *h, nghttp2_session *from,
                         int32_t from_id, bool more, uint64_t *count, uint8_t *buf, size_t len,
                         uint32_t *flags)
{
	size_t n = bq_take(&h->body, buf, len);

	if (n) {
		if (from)
			nghttp2_session_consume(from, from_id, n);
		*count += n;
	}
	if (h->body.len || more)
		return n ? (ssize_t)n : NGHTTP2_ERR_DEFERRED;
	*flags |= NGHTTP2_DATA_FLAG_EOF;
	if (h->trailers.n) {
		nghttp2_nv t[MAX_FIELDS];

		for (size_t i = 0; i < h->trailers.n; i++)
			t[i] = nv_of(&h->trailers, i);
		if (nghttp2_submit_trailer(to, id, t, h->trailers.n) == 0)
			*flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
	}
	return (ssize_t)n;
}

static ssize_t req_body_read(nghttp2_session *up, int32_t id, uint8_t *buf, size_t len,
                             uint32_t *flags, nghttp2_data_source *src, void *user)
{
	struct h2stream *s = src->ptr;

	return pass_body(up, id, &s->req, s->f->down, s->down_id, !s->req.end, &s->rec.bytes_in, buf,
	                 len, flags);
}

/* Splits :path, refuses fragments and raw bytes HTTP/1.1 refuses in a target,
 * normalises the path part. Returns NULL, or why it is refused (400). */
static const char *normalise_target(struct h2stream *s, const char *target, char **query)
{
	size_t len = strlen(target), plen, out_len;
	const char *q = strchr(target, '?'), *why = "invalid path";

	*query = NULL;
	if (!target)
		return "missing :path";
	if (strchr(target, '#'))
		return "fragment in request target";
	for (const char *p = target; *p; p++)
		if ((unsigned char)*p <= ' ' || (unsigned char)*p >= 0x7f)
			return "invalid character in request target";
	if (strcmp(target, "*") == 0)
		return (s->path = strdup("*")) ? NULL : "out of memory";
	plen = q ? (size_t)(q - target) : len;
	if (!(s->path = malloc(plen + 2)))
		return "out of memory";
	if (http_path_normalize(target, plen, s->path, plen + 2, &out_len, &why) < 0) {
		free(s->path);
		s->path = strdup(target);    /* logged as it came */
		return why;
	}
	*query = q ? (char *)q + 1 : NULL;
	return NULL;
}

/* The request head as httpreq_decide() reads it. */
static void head_of(const struct h2stream *s, const char *query, const char *authority,
                    struct http_field *fields, struct http_head *h)
{
	size_t n = 0;

	for (size_t i = 0; i < s->req.head.n; i++) {
		struct h2_field x = field(&s->req.head, i);

		if (x.name[0] == ':')
			continue;
		fields[n++] = (struct http_field){ x.name, x.value, (uint32_t)x.name_len,
		                                   (uint32_t)x.value_len };
	}
	*h = (struct http_head){
		.is_request = true, .version_minor = 1, .method = s->method,
		.form = strcmp(s->path, "*") ? HTTP_TARGET_ORIGIN : HTTP_TARGET_ASTERISK,
		.path = s->path, .query = query, .host = authority, .fields = fields, .n_fields = n,
	};
}

static int pool_submit(struct h2flow *f, struct h2stream *s, const nghttp2_nv *nv, size_t n);

/* name (lower case from the peer) is spelt as lname with '_' for '-'. */
static bool loose_name(const char *name, const char *lname)
{
	for (; *name && *lname; name++, lname++)
		if (*name != *lname && !(*name == '_' && *lname == '-'))
			return false;
	return !*name && !*lname;
}

/* Submits s to the upstream's session with the rewritten head. Returns 0 or -1. */
static int forward_request(struct h2flow *f, struct h2stream *s, const char *query)
{
	struct conn *c = f->c;
	nghttp2_nv out[MAX_FIELDS + 4];
	char xfcc[2 * SPIFFE_ID_MAX + 16], *path = NULL;
	nghttp2_data_provider prd = { .source.ptr = s, .read_callback = req_body_read };
	size_t n = 0;
	int32_t id;

	if (query) {
		size_t len = strlen(s->path) + strlen(query) + 2;

		if (!(path = malloc(len)))
			return -1;
		snprintf(path, len, "%s?%s", s->path, query);
	}
	for (size_t i = 0; i < s->req.head.n; i++) {
		struct h2_field x = field(&s->req.head, i);

		if (!strcmp(x.name, ":path"))
			out[n++] = nv(":path", path ? path : s->path, strlen(path ? path : s->path));
		else if (loose_name(x.name, "x-forwarded-client-cert") ||
		         loose_name(x.name, H2TO1_PROTO_FIELD) ||
		         (s->replace_rid && !strcmp(x.name, "x-request-id")))
			continue;    /* ours replaces the caller's; the sidecars' own never passes */
		else
			out[n++] = nv_of(&s->req.head, i);
	}
	if (c->inbound) {
		httpreq_xfcc(c, xfcc, sizeof(xfcc));
		out[n++] = nv("x-forwarded-client-cert", xfcc, strlen(xfcc));
	}
	if (s->replace_rid && s->rid[0])
		out[n++] = nv("x-request-id", s->rid, strlen(s->rid));
	if (c->detached) {
		id = pool_submit(f, s, out, n);
		free(path);
		return id;
	}
	id = nghttp2_submit_request(f->up, NULL, out, n, s->req.end && !s->req.body.len ? NULL : &prd,
	                            s);
	free(path);
	if (id < 0)
		return -1;
	s->up_id = id;
	s->resp_due = conn_clock_ms() + conn_pick_request_ms(c);
	return 0;
}

/* What the log, the answers and the timers need from the request head. */
static void note_request(struct conn *c, struct h2stream *s)
{
	const char *m = hdrs_get(&s->req.head, ":method", NULL);
	const char *ct = hdrs_get(&s->req.head, "content-type", NULL);
	const char *to = hdrs_get(&s->req.head, "grpc-timeout", NULL);
	size_t nrid;
	const char *rid = hdrs_get(&s->req.head, "x-request-id", &nrid);
	int64_t ms;

	s->method = strdup(m ? m : "");
	s->grpc = ct && h2_is_grpc(ct, strlen(ct));
	/* The head counts as received bytes, as an HTTP/1.1 request's does. */
	for (size_t i = 0; i < s->req.head.n; i++)
		s->rec.bytes_in += s->req.head.f[i].name_len + s->req.head.f[i].value_len + 4;
	httpreq_request_id(c->w, nrid == 1 ? rid : NULL, s->rid, &s->replace_rid);
	if (s->grpc && to && (ms = h2_grpc_timeout_ms(to, strlen(to))) >= 0)
		s->deadline = conn_clock_ms() + (uint64_t)ms;
}

/* Checks the head; a refused one is answered here. Returns true when refused. */
static bool refuse_bad(struct h2flow *f, struct h2stream *s, char **query)
{
	struct conn *c = f->c;
	struct h2_field fs[MAX_FIELDS];
	const char *why = NULL;
	enum h2_refusal r;

	hdrs_fields(&s->req.head, fs);
	r = h2_check_request(fs, s->req.head.n, &why);
	if (r == H2_MALFORMED) {
		log_info("conn %llu: malformed HTTP/2 request from %s: %s", (unsigned long long)c->id,
		         c->peer ? c->peer : "app", why);
		s->local = true;
		s->rec.status = 400;
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, NGHTTP2_PROTOCOL_ERROR);
		return true;
	}
	if (r == H2_OK && !(why = normalise_target(s, hdrs_get(&s->req.head, ":path", NULL), query)))
		return false;
	log_info("conn %llu: bad HTTP/2 request from %s: %s", (unsigned long long)c->id,
	         c->peer ? c->peer : "app", why);
	answer_local(f, s, 400, GRPC_INVALID_ARGUMENT, why);
	return true;
}

/* A rate limit (gRPC: RESOURCE_EXHAUSTED) or an injected fault (gRPC: the
 * code HTTP's status maps to, as gRPC's own HTTP mapping does). */
static void answer_traffic(struct h2flow *f, struct h2stream *s, const struct httpreq_verdict *v)
{
	char msg[POLICY_RULE_NAME_MAX + 32];
	int code = GRPC_RESOURCE_EXHAUSTED;

	if (v->traffic_fault) {
		code = v->local_status == 503 || v->local_status == 502 || v->local_status == 504 ||
		       v->local_status == 429 ? GRPC_UNAVAILABLE : GRPC_UNKNOWN;
		snprintf(msg, sizeof(msg), "fault injected: %s", v->traffic_name);
	} else {
		snprintf(msg, sizeof(msg), "rate limited by %s", v->traffic_name);
	}
	answer_local(f, s, v->local_status, code, msg);
}

/* Inbound: the policy and the app's protocol. Returns true to forward; a
 * refused stream is answered here. */
static bool admit(struct h2flow *f, struct h2stream *s, const char *query)
{
	struct conn *c = f->c;
	struct http_field hf[MAX_FIELDS];
	struct http_head h;
	struct httpreq_verdict v = { 0 };
	const char *authority = hdrs_get(&s->req.head, ":authority", NULL);
	char msg[POLICY_RULE_NAME_MAX + 32];

	if (!c->inbound)
		return true;
	head_of(s, query, authority ? authority : hdrs_get(&s->req.head, "host", NULL), hf, &h);
	bool allowed = httpreq_decide(c, &h, &v);

	s->verdict = v;
	s->rec.decided = v.decided;
	s->rec.decision = v.decision;
	s->rec.rule = v.rule;
	if (v.delay_ms) {
		/* A fault's delay: forwarded (or aborted) by h2flow_on_timeout. */
		s->hold_until = conn_clock_ms() + v.delay_ms;
		if (query && !(s->held_query = strdup(query))) {
			s->hold_until = 0;
			answer_unavailable(f, s, 502, "out of memory");
		}
		return false;
	}
	if (allowed)
		return true;
	if (v.traffic_name) {
		answer_traffic(f, s, &v);
		return false;
	}
	snprintf(msg, sizeof(msg), "denied by rule %s", v.rule ? v.rule : "default");
	answer_local(f, s, v.local_status, v.local_status == 403 ? GRPC_DENIED : GRPC_INVALID_ARGUMENT,
	             v.local_status == 403 ? msg : v.local_reason);
	return false;
}

/* ---- an HTTP/1.1 app, through the worker's pool (apppool.c) ------------- */

/* The body bytes taken are passed on: the client's window reopens by as much. */
static size_t app_body(void *ctx, char *buf, size_t cap, bool *end)
{
	struct h2stream *s = ctx;
	struct h2flow *f = s->f;
	size_t n = bq_take(&s->req.body, (uint8_t *)buf, cap);

	if (n) {
		nghttp2_session_consume(f->down, s->down_id, n);
		s->rec.bytes_in += n;
		conn_kick(f->c);
	}
	*end = s->req.end && !s->req.body.len;
	return n;
}

static size_t app_window(const struct h2stream *s)
{
	return s->f->c->snap->cfg->http2.initial_window_bytes;
}

static ssize_t app_resp_read(nghttp2_session *down, int32_t id, uint8_t *buf, size_t len,
                             uint32_t *flags, nghttp2_data_source *src, void *user)
{
	struct h2stream *s = src->ptr;
	ssize_t n = pass_body(down, id, &s->resp, NULL, 0, !s->resp.end, &s->rec.bytes_out, buf,
	                      len, flags);

	if (s->app && s->resp.body.len < app_window(s))
		apppool_resume(s->app);
	return n;
}

static bool app_head(void *ctx, const struct http_head *h)
{
	struct h2stream *s = ctx;
	struct h2flow *f = s->f;
	nghttp2_data_provider prd = { .source.ptr = s, .read_callback = app_resp_read };
	size_t names = 4, n = 0;
	nghttp2_nv *nv = calloc(h->n_fields + 1, sizeof(*nv));
	char *buf;
	int rc = -ENOMEM;

	for (size_t i = 0; i < h->n_fields; i++)
		names += h->fields[i].name_len;
	if (s->resp_started) {
		free(nv);
		return true;    /* answered already (deadline): the app's is dropped */
	}
	if (nv && (buf = malloc(names))) {
		rc = h2to1_response_nv(h, nv, h->n_fields + 1, &n, buf, names);
		if (rc == 0) {
			s->rec.status = h->status;
			s->resp_started = true;
			s->resp_due = 0;
			if (nghttp2_submit_response(f->down, s->down_id, nv, n,
			                            h->framing == HTTP_BODY_NONE ? NULL : &prd) != 0)
				nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id,
				                          NGHTTP2_INTERNAL_ERROR);
		}
		free(buf);
	}
	free(nv);
	conn_kick(f->c);
	return rc == 0;
}

static bool app_data(void *ctx, const char *data, size_t len)
{
	struct h2stream *s = ctx;

	if (s->local)
		return true;    /* answered by us: dropped */
	if (bq_add(&s->resp.body, (const uint8_t *)data, len) < 0) {
		nghttp2_submit_rst_stream(s->f->down, NGHTTP2_FLAG_NONE, s->down_id,
		                          NGHTTP2_INTERNAL_ERROR);
		s->local = true;
		return true;
	}
	nghttp2_session_resume_data(s->f->down, s->down_id);
	conn_kick(s->f->c);
	return s->resp.body.len < app_window(s);
}

static void app_end(void *ctx, int status, const char *why)
{
	struct h2stream *s = ctx;
	struct h2flow *f = s->f;

	s->app = NULL;
	if (status == 0 && !s->req.end) {
		/* Answered before the request was all sent: the rest of it is
		 * dropped as it comes (the client's window must not stall). */
		nghttp2_session_consume(f->down, s->down_id, s->req.body.len);
		half_free(&s->req, NULL);
		s->local = true;
	}
	if (status == 0) {
		s->resp.end = true;
		if (s->resp_started && !s->down_closed)
			nghttp2_session_resume_data(f->down, s->down_id);
	} else if (!s->local) {
		answer_unavailable(f, s, status, why);
	}
	conn_kick(f->c);
	stream_maybe_free(f, s);
}

static const struct apppool_owner_ops app_ops = {
	.body = app_body, .head = app_head, .data = app_data, .end = app_end,
};

/* The worker's pool for this connection's listener, made on first use. */
static struct apppool *app_pool(struct conn *c)
{
	struct worker *w = c->w;
	const struct config *cfg = c->snap->cfg;
	const struct config_addr *app = &cfg->inbound[c->listener].forward;
	struct apppool **slot = c->listener < w->n_apppools ? &w->apppools[c->listener] : NULL;
	struct apppool_limits lim = { APPPOOL_MAX_CONNS, APPPOOL_MAX_QUEUE,
	                              cfg->timeouts.response_head_ms, cfg->timeouts.idle_ms,
	                              cfg->timeouts.connect_ms };
	struct apppool_stats st;

	if (!slot)
		return NULL;
	if (*slot && !apppool_is_for(*slot, app)) {
		/* The app moved (new config): the old pool goes once nothing uses it. */
		apppool_stats(*slot, &st);
		if (st.open == st.idle && !st.queued) {
			apppool_free(*slot);
			*slot = NULL;
		}
	}
	if (!*slot)
		*slot = apppool_new(w->base, app, &lim);
	return *slot;
}

/* The stream as an HTTP/1.1 request to the app, through the pool. */
static void app_forward(struct h2flow *f, struct h2stream *s, const char *query)
{
	struct conn *c = f->c;
	struct h2_field fs[MAX_FIELDS];
	char xfcc[2 * SPIFFE_ID_MAX + 16], *target = NULL, *head = NULL;
	const char *authority = hdrs_get(&s->req.head, ":authority", NULL);
	struct h2to1_request r;
	enum h2to1_framing framing;
	struct apppool *pool = app_pool(c);
	size_t len = 0, tlen = strlen(s->path) + (query ? strlen(query) + 2 : 1);

	hdrs_fields(&s->req.head, fs);
	httpreq_xfcc(c, xfcc, sizeof(xfcc));
	if (!pool || !(target = malloc(tlen))) {
		answer_unavailable(f, s, 502, "out of memory");
		return;
	}
	snprintf(target, tlen, query ? "%s?%s" : "%s", s->path, query);
	r = (struct h2to1_request){ s->method, target,
	                            authority ? authority : hdrs_get(&s->req.head, "host", NULL),
	                            fs, s->req.head.n, xfcc,
	                            s->replace_rid && s->rid[0] ? s->rid : NULL, s->req.end };
	if (h2to1_request_head(&r, NULL, 0, &len, &framing) == -EINVAL) {
		free(target);
		answer_local(f, s, 400, GRPC_INVALID_ARGUMENT, "request cannot be carried as HTTP/1.1");
		return;
	}
	if ((head = malloc(len)) && h2to1_request_head(&r, head, len, &len, &framing) == 0)
		s->app = apppool_submit(pool, head, len, framing,
		                        strcmp(s->method, "HEAD") ? 0 : HTTP_REQ_HEAD, &app_ops, s);
	free(head);
	free(target);
	if (!s->app) {
		answer_local(f, s, 503, GRPC_UNAVAILABLE, "app busy");
		return;
	}
	s->resp_due = conn_clock_ms() + c->snap->cfg->timeouts.response_head_ms;
}

/* The caller's sidecar says its app spoke HTTP/1.1 (it strips any copy the app sent). */
static bool from_http1_app(const struct h2stream *s)
{
	size_t n;
	const char *v = hdrs_get(&s->req.head, H2TO1_PROTO_FIELD, &n);

	return n == 1 && !strcmp(v, "http1");
}

static int up_session(struct h2flow *f);

/* ---- the pool of connections between sidecars (outbound, upool.c) ------- */

static void note_grpc_status(struct h2stream *s, const struct h2hdrs *h);

static size_t pool_body(void *ctx, uint8_t *buf, size_t cap, bool *end)
{
	return app_body(ctx, (char *)buf, cap, end);
}

static size_t pool_trailers(void *ctx, nghttp2_nv *nv, size_t cap)
{
	struct h2stream *s = ctx;
	size_t n = s->req.trailers.n < cap ? s->req.trailers.n : 0;

	for (size_t i = 0; i < n; i++)
		nv[i] = nv_of(&s->req.trailers, i);
	return n;
}

static ssize_t pool_resp_read(nghttp2_session *down, int32_t id, uint8_t *buf, size_t len,
                              uint32_t *flags, nghttp2_data_source *src, void *user)
{
	struct h2stream *s = src->ptr;
	uint64_t before = s->rec.bytes_out;
	ssize_t n = pass_body(down, id, &s->resp, NULL, 0, !s->resp.end, &s->rec.bytes_out, buf,
	                      len, flags);

	/* The bytes left toward the client: the pooled stream's window reopens. */
	if (s->pooled && s->rec.bytes_out > before)
		upool_consume(s->pooled, (size_t)(s->rec.bytes_out - before));
	return n;
}

static bool pool_head(void *ctx, const nghttp2_nv *nv, size_t n, bool end)
{
	struct h2stream *s = ctx;
	struct h2flow *f = s->f;
	nghttp2_data_provider prd = { .source.ptr = s, .read_callback = pool_resp_read };

	if (s->resp_started)
		return true;    /* answered already (deadline): the upstream's is dropped */
	for (size_t i = 0; i < n; i++) {
		if (nv[i].namelen == 7 && !memcmp(nv[i].name, ":status", 7))
			s->rec.status = atoi((const char *)nv[i].value);
		else if (nv[i].namelen == 11 && !memcmp(nv[i].name, "grpc-status", 11))
			s->grpc_status = atoi((const char *)nv[i].value);
	}
	s->resp_started = true;
	s->resp_due = 0;
	if (nghttp2_submit_response(f->down, s->down_id, nv, n, end ? NULL : &prd) != 0)
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, NGHTTP2_INTERNAL_ERROR);
	conn_kick(f->c);
	return true;
}

static void pool_data(void *ctx, const uint8_t *data, size_t len)
{
	struct h2stream *s = ctx;

	if (s->local || bq_add(&s->resp.body, data, len) < 0) {
		upool_consume(s->pooled, len);    /* answered by us, or no memory: dropped */
		return;
	}
	nghttp2_session_resume_data(s->f->down, s->down_id);
	conn_kick(s->f->c);
}

static void pool_resp_trailers(void *ctx, const nghttp2_nv *nv, size_t n)
{
	struct h2stream *s = ctx;

	for (size_t i = 0; i < n; i++)
		if (hdrs_add(&s->resp.trailers, nv[i].name, nv[i].namelen, nv[i].value,
		             nv[i].valuelen) < 0)
			break;
	note_grpc_status(s, &s->resp.trailers);
}

static void pool_end(void *ctx, int status, uint32_t code, const char *why)
{
	struct h2stream *s = ctx;
	struct h2flow *f = s->f;

	s->pooled = NULL;
	s->up_closed = true;
	if (status == 0) {
		s->resp.end = true;
		if (s->resp_started && !s->down_closed)
			nghttp2_session_resume_data(f->down, s->down_id);
	} else if (!s->local && s->resp_started && !s->down_closed) {
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id,
		                          code ? code : NGHTTP2_INTERNAL_ERROR);
	} else if (!s->local && status == 504) {
		/* request_seconds passed: gRPC's DEADLINE_EXCEEDED, as for grpc-timeout. */
		answer_local(f, s, 504, GRPC_DEADLINE, why);
	} else if (!s->local) {
		answer_unavailable(f, s, status, why);
	}
	conn_kick(f->c);
	stream_maybe_free(f, s);
}

static const struct upool_owner_ops pool_ops = {
	.body = pool_body, .trailers = pool_trailers, .head = pool_head, .data = pool_data,
	.resp_trailers = pool_resp_trailers, .end = pool_end,
};

/* s as a stream on the worker's pool between sidecars. Returns 0, or -1 (503). */
static int pool_submit(struct h2flow *f, struct h2stream *s, const nghttp2_nv *nv, size_t n)
{
	struct conn *c = f->c;
	struct worker *w = c->w;

	if (c->listener >= w->n_upools)
		return -1;
	if (!w->upools[c->listener])
		w->upools[c->listener] = upool_new(w, c->listener);
	if (!w->upools[c->listener])
		return -1;
	s->pooled = upool_submit(w->upools[c->listener], c->snap, nv, n,
	                         !(s->req.end && !s->req.body.len), &pool_ops, s);
	if (!s->pooled) {
		s->overloaded = errno == EBUSY;
		return -1;
	}
	/* The pool times each attempt's response head (request_seconds); a
	 * grpc-timeout (s->deadline) still ends the call here when earlier. */
	s->resp_due = 0;
	return 0;
}

/* An admitted stream: to the app (through the app pool) when it is to be
 * HTTP/1.1, to the pool between sidecars (outbound), or to the upstream. */
static void forward_stream(struct h2flow *f, struct h2stream *s, const char *query)
{
	if (f->app1 || (f->app_auto && from_http1_app(s))) {
		app_forward(f, s, query);
		return;
	}
	if (f->c->detached) {
		if (forward_request(f, s, query) < 0)
			answer_local(f, s, 503, GRPC_UNAVAILABLE, "too many requests waiting for the upstream");
		return;
	}
	if (f->app_auto && !f->up && !f->gone_at && up_session(f) < 0)
		f->gone_at = conn_clock_ms();
	/* No upstream, or one that sent GOAWAY: unavailable. */
	if (!f->up || forward_request(f, s, query) < 0)
		answer_unavailable(f, s, 502, "upstream unavailable");
}

/* The request head is whole: check, decide, forward or answer. */
static void on_request_head(struct h2flow *f, struct h2stream *s)
{
	char *query = NULL;

	note_request(f->c, s);
	if (refuse_bad(f, s, &query) || !admit(f, s, query))
		return;
	forward_stream(f, s, query);
}

/* A fault's delay is over: the stream goes on as admit() said. */
static void release_held(struct h2flow *f, struct h2stream *s)
{
	s->hold_until = 0;
	if (s->resp_started || s->down_closed)
		return;    /* answered meanwhile (a deadline, the upstream went) */
	if (s->verdict.local_status)
		answer_traffic(f, s, &s->verdict);
	else
		forward_stream(f, s, s->held_query);
}

/* ---- the response side -------------------------------------------------- */

static ssize_t resp_body_read(nghttp2_session *down, int32_t id, uint8_t *buf, size_t len,
                              uint32_t *flags, nghttp2_data_source *src, void *user)
{
	struct h2stream *s = src->ptr;

	return pass_body(down, id, &s->resp, s->f->up, s->up_id, !s->resp.end && !s->up_closed,
	                 &s->rec.bytes_out, buf, len, flags);
}

static void note_grpc_status(struct h2stream *s, const struct h2hdrs *h)
{
	const char *g = hdrs_get(h, "grpc-status", NULL);

	if (g)
		s->grpc_status = atoi(g);
}

static void on_response_head(struct h2flow *f, struct h2stream *s, bool end)
{
	struct h2_field fs[MAX_FIELDS];
	nghttp2_nv out[MAX_FIELDS];
	nghttp2_data_provider prd = { .source.ptr = s, .read_callback = resp_body_read };
	const char *why = NULL, *st = hdrs_get(&s->resp.head, ":status", NULL);
	int status = st ? atoi(st) : 0;

	if (status >= 100 && status < 200) {
		hdrs_free(&s->resp.head);    /* interim: the final head follows */
		return;
	}
	s->resp.head_done = true;
	hdrs_fields(&s->resp.head, fs);
	if (h2_check_response(fs, s->resp.head.n, false, &why) != H2_OK) {
		log_warn("conn %llu: bad HTTP/2 response from %s: %s", (unsigned long long)f->c->id,
		         conn_destination_text(f->c), why);
		nghttp2_submit_rst_stream(f->up, NGHTTP2_FLAG_NONE, s->up_id, NGHTTP2_PROTOCOL_ERROR);
		answer_unavailable(f, s, 502, why);
		return;
	}
	if (s->resp_started)
		return;    /* answered already (deadline): the upstream's is dropped */
	for (size_t i = 0; i < s->resp.head.n; i++)
		out[i] = nv_of(&s->resp.head, i);
	s->rec.status = status;
	note_grpc_status(s, &s->resp.head);
	s->resp_started = true;
	s->resp_due = 0;
	if (nghttp2_submit_response(f->down, s->down_id, out, s->resp.head.n, end ? NULL : &prd) != 0)
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, NGHTTP2_INTERNAL_ERROR);
}

static void on_response_trailers(struct h2flow *f, struct h2stream *s)
{
	struct h2_field fs[MAX_FIELDS];
	const char *why = NULL;

	hdrs_fields(&s->resp.trailers, fs);
	if (h2_check_response(fs, s->resp.trailers.n, true, &why) != H2_OK) {
		log_warn("conn %llu: bad HTTP/2 trailers from %s: %s", (unsigned long long)f->c->id,
		         conn_destination_text(f->c), why);
		hdrs_free(&s->resp.trailers);
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, NGHTTP2_INTERNAL_ERROR);
		return;
	}
	note_grpc_status(s, &s->resp.trailers);
}

/* ---- nghttp2 callbacks -------------------------------------------------- */

static struct h2stream *stream_of(nghttp2_session *sess, int32_t id)
{
	return nghttp2_session_get_stream_user_data(sess, id);
}

/*
 * Two sets of callbacks. The client's session belongs to its connection
 * (user data: the flow). The upstream's finds everything through the
 * stream (s->f), never through the session's user data: a stream does not
 * care whose session carries it, which is what a pooled session needs.
 */

static int client_begin_frame(nghttp2_session *sess, const nghttp2_frame_hd *hd, void *user)
{
	struct h2flow *f = user;
	bool new_stream;
	int kind;

	if (f->dead)
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	new_stream = hd->type == NGHTTP2_HEADERS && !stream_of(sess, hd->stream_id);
	kind = h2_guard_frame(&f->guard, hd, f->open_down, new_stream, conn_clock_ms());
	if (kind < 0)
		return 0;
	abuse(f, kind, kind == H2_ABUSE_TOO_MANY_STREAMS ? NGHTTP2_PROTOCOL_ERROR
	                                                 : NGHTTP2_ENHANCE_YOUR_CALM);
	return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int client_begin_headers(nghttp2_session *sess, const nghttp2_frame *fr, void *user)
{
	struct h2flow *f = user;
	struct h2stream *s = stream_of(sess, fr->hd.stream_id);

	if (fr->headers.cat == NGHTTP2_HCAT_REQUEST) {
		if (!(s = stream_new(f, fr->hd.stream_id)))
			return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
		nghttp2_session_set_stream_user_data(sess, fr->hd.stream_id, s);
	} else if (s) {
		s->req.in_trailers = true;
	}
	return 0;
}

static int client_header(nghttp2_session *sess, const nghttp2_frame *fr, const uint8_t *name,
                         size_t nl, const uint8_t *value, size_t vl, uint8_t flags, void *user)
{
	struct h2flow *f = user;
	struct h2stream *s = stream_of(sess, fr->hd.stream_id);
	int kind;

	if (!s)
		return 0;
	if ((kind = h2_guard_header(&f->guard, nl, vl)) >= 0) {
		abuse(f, kind, NGHTTP2_ENHANCE_YOUR_CALM);
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	}
	if (hdrs_add(s->req.in_trailers ? &s->req.trailers : &s->req.head, name, nl, value, vl) < 0)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;    /* resets the stream */
	return 0;
}

static int client_frame(nghttp2_session *sess, const nghttp2_frame *fr, void *user)
{
	struct h2flow *f = user;
	struct h2stream *s = fr->hd.stream_id ? stream_of(sess, fr->hd.stream_id) : NULL;

	if (!s || (fr->hd.type != NGHTTP2_HEADERS && fr->hd.type != NGHTTP2_DATA))
		return 0;
	s->req.end = s->req.end || (fr->hd.flags & NGHTTP2_FLAG_END_STREAM);
	if (fr->hd.type == NGHTTP2_HEADERS && !s->req.in_trailers) {
		s->req.head_done = true;
		on_request_head(f, s);
	}
	if (s->up_id && f->up && !s->local)
		nghttp2_session_resume_data(f->up, s->up_id);
	if (s->app)
		apppool_resume(s->app);
	if (s->pooled)
		upool_resume(s->pooled);
	return 0;
}

static int client_data(nghttp2_session *sess, uint8_t flags, int32_t id, const uint8_t *data,
                       size_t len, void *user)
{
	struct h2flow *f = user;
	struct h2stream *s = stream_of(sess, id);

	if (!s || s->local) {
		/* Nobody takes these bytes: the window reopens at once. */
		nghttp2_session_consume(sess, id, len);
		return 0;
	}
	if (bq_add(&s->req.body, data, len) < 0)
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	if (s->up_id && f->up)
		nghttp2_session_resume_data(f->up, s->up_id);
	if (s->app)
		apppool_resume(s->app);
	if (s->pooled)
		upool_resume(s->pooled);
	return 0;
}

static int client_stream_close(nghttp2_session *sess, int32_t id, uint32_t code, void *user)
{
	struct h2flow *f = user;
	struct h2stream *s = stream_of(sess, id);

	if (!s)
		return 0;
	s->down_closed = true;
	f->open_down--;
	if (s->up_id && !s->up_closed && f->up)
		nghttp2_submit_rst_stream(f->up, NGHTTP2_FLAG_NONE, s->up_id, NGHTTP2_CANCEL);
	if (s->app) {
		apppool_cancel(s->app);
		s->app = NULL;
	}
	if (s->pooled) {
		upool_cancel(s->pooled);
		s->pooled = NULL;
	}
	stream_log(f, s, 499);
	stream_maybe_free(f, s);
	return 0;
}

static int up_begin_headers(nghttp2_session *sess, const nghttp2_frame *fr, void *user)
{
	struct h2stream *s = stream_of(sess, fr->hd.stream_id);

	if (s)
		s->resp.in_trailers = s->resp.head_done;
	return 0;
}

static int up_header(nghttp2_session *sess, const nghttp2_frame *fr, const uint8_t *name,
                     size_t nl, const uint8_t *value, size_t vl, uint8_t flags, void *user)
{
	struct h2stream *s = stream_of(sess, fr->hd.stream_id);
	struct h2half *h = s ? &s->resp : NULL;

	if (!s)
		return 0;
	/* The upstream's blocks are bounded too (the client's by the guard):
	 * over the limit, its stream is reset and the client gets a 502. */
	if (h->head.len + h->trailers.len + nl + vl > s->f->c->snap->cfg->http2.max_header_list_bytes ||
	    hdrs_add(h->in_trailers ? &h->trailers : &h->head, name, nl, value, vl) < 0)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	return 0;
}

static int up_frame(nghttp2_session *sess, const nghttp2_frame *fr, void *user)
{
	struct h2stream *s = fr->hd.stream_id ? stream_of(sess, fr->hd.stream_id) : NULL;
	bool end = (fr->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;

	if (!s || (fr->hd.type != NGHTTP2_HEADERS && fr->hd.type != NGHTTP2_DATA))
		return 0;
	s->resp.end = s->resp.end || end;
	if (fr->hd.type == NGHTTP2_HEADERS && !s->resp.in_trailers)
		on_response_head(s->f, s, end);
	else if (fr->hd.type == NGHTTP2_HEADERS)
		on_response_trailers(s->f, s);
	if (s->resp_started && !s->local)
		nghttp2_session_resume_data(s->f->down, s->down_id);
	return 0;
}

static int up_data(nghttp2_session *sess, uint8_t flags, int32_t id, const uint8_t *data,
                   size_t len, void *user)
{
	struct h2stream *s = stream_of(sess, id);

	if (!s) {
		nghttp2_session_consume(sess, id, len);
		return 0;
	}
	if (bq_add(&s->resp.body, data, len) < 0)
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	if (s->resp_started)
		nghttp2_session_resume_data(s->f->down, s->down_id);
	return 0;
}

static int up_stream_close(nghttp2_session *sess, int32_t id, uint32_t code, void *user)
{
	struct h2stream *s = stream_of(sess, id);
	struct h2flow *f = s ? s->f : NULL;

	if (!s)
		return 0;
	s->up_closed = true;
	if (s->local)
		;    /* answered by us already: the upstream's end changes nothing */
	else if (!s->resp_started)
		answer_unavailable(f, s, 502, code ? "upstream reset the stream" : "upstream closed the stream");
	else if (code != NGHTTP2_NO_ERROR && !s->down_closed)
		nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, code);
	else if (!s->down_closed)
		nghttp2_session_resume_data(f->down, s->down_id);    /* its end may go out now */
	stream_maybe_free(f, s);
	return 0;
}

/* The callbacks of the client's session (client true) or the upstream's. */
static nghttp2_session_callbacks *callbacks(bool client)
{
	nghttp2_session_callbacks *cb;

	if (nghttp2_session_callbacks_new(&cb) != 0)
		return NULL;
	if (client) {
		nghttp2_session_callbacks_set_on_begin_frame_callback(cb, client_begin_frame);
		nghttp2_session_callbacks_set_on_begin_headers_callback(cb, client_begin_headers);
		nghttp2_session_callbacks_set_on_header_callback(cb, client_header);
		nghttp2_session_callbacks_set_on_frame_recv_callback(cb, client_frame);
		nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, client_data);
		nghttp2_session_callbacks_set_on_stream_close_callback(cb, client_stream_close);
	} else {
		nghttp2_session_callbacks_set_on_begin_headers_callback(cb, up_begin_headers);
		nghttp2_session_callbacks_set_on_header_callback(cb, up_header);
		nghttp2_session_callbacks_set_on_frame_recv_callback(cb, up_frame);
		nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, up_data);
		nghttp2_session_callbacks_set_on_stream_close_callback(cb, up_stream_close);
	}
	return cb;
}

/* ---- the table ---------------------------------------------------------- */

static int h2flow_new(struct conn *c)
{
	struct h2flow *f = calloc(1, sizeof(*f));
	const struct config_http2 *lim = &c->snap->cfg->http2;
	nghttp2_session_callbacks *client_cb = callbacks(true), *up_cb = callbacks(false);
	int rc = -ENOMEM;

	if (!f || !client_cb || !up_cb)
		goto out;
	f->c = c;
	f->app1 = c->inbound && c->snap->cfg->inbound[c->listener].app_protocol == APP_PROTO_HTTP1;
	f->app_auto = c->inbound && c->snap->cfg->inbound[c->listener].app_protocol == APP_PROTO_AUTO;
	h2_guard_init(&f->guard, lim, conn_clock_ms());
	/* Outbound streams ride the pool (detached); an inbound auto listener's
	 * app may speak only HTTP/1.1: no preface to it before a stream needs h2. */
	if (h2_session_new(&f->down, true, lim, client_cb, f) != 0 ||
	    (!f->app1 && !f->app_auto && !c->detached &&
	     h2_session_new(&f->up, false, lim, up_cb, f) != 0))
		goto out;
	c->proto_ctx = f;
	f = NULL;
	rc = 0;
out:
	if (client_cb)
		nghttp2_session_callbacks_del(client_cb);
	if (up_cb)
		nghttp2_session_callbacks_del(up_cb);
	if (f) {
		nghttp2_session_del(f->down);
		nghttp2_session_del(f->up);
		free(f);
	}
	return rc;
}

/* The upstream-facing session, made when the first stream needs it (app_auto). */
static int up_session(struct h2flow *f)
{
	nghttp2_session_callbacks *cb = callbacks(false);
	int rc = cb ? h2_session_new(&f->up, false, &f->c->snap->cfg->http2, cb, f) : -1;

	if (cb)
		nghttp2_session_callbacks_del(cb);
	return rc == 0 ? 0 : -1;
}

static void h2flow_free(struct conn *c)
{
	struct h2flow *f = flow(c);

	if (!f)
		return;
	while (f->streams) {
		struct h2stream *s = f->streams;

		if (!s->down_closed && s->method)
			stream_log(f, s, 499);    /* cut short with the connection */
		stream_free(f, s);
	}
	nghttp2_session_del(f->down);
	nghttp2_session_del(f->up);
	free(f);
	c->proto_ctx = NULL;
}

static const char *pending(const struct relay_dir *r)
{
	return r->in ? r->in->data + r->in->off : "";
}

static size_t pending_len(const struct relay_dir *r)
{
	return r->in ? r->in->len - r->in->off : 0;
}

/* Feeds what direction d read to the session facing its source. */
static int feed(struct conn *c, int d)
{
	struct h2flow *f = flow(c);
	struct relay_dir *r = &c->d[d];
	bool from_client = d == req_dir(c);
	nghttp2_session *sess = from_client ? f->down : f->up;
	size_t len = pending_len(r);
	ssize_t n;

	if (!len)
		return 0;
	if (!sess && !from_client && f->app_auto && !f->gone_at)
		return 0;    /* an h2c app speaking first: held for the session made later */
	if (!sess || (from_client && f->dead)) {
		r->in->off = r->in->len;    /* no one to read it: dropped */
		return 1;
	}
	n = nghttp2_session_mem_recv(sess, (const uint8_t *)pending(r), len);
	r->in->off = r->in->len;
	if (n >= 0)
		return 1;
	if (from_client) {
		int kind = abuse_of_error((int)n);

		if (!f->dead)
			abuse(f, kind, kind == H2_ABUSE_PROTOCOL ? NGHTTP2_PROTOCOL_ERROR
			                                         : NGHTTP2_ENHANCE_YOUR_CALM);
		log_info("conn %llu: HTTP/2 from %s: %s", (unsigned long long)c->id,
		         c->peer ? c->peer : "app", nghttp2_strerror((int)n));
	} else {
		upstream_gone(f, nghttp2_strerror((int)n));
	}
	return 1;
}

/* Gathers what the session facing d's sink has to send into d's output. */
static int flush(struct conn *c, int d)
{
	struct h2flow *f = flow(c);
	struct relay_dir *r = &c->d[d];
	nghttp2_session *sess = d == req_dir(c) ? f->up : f->down;
	char *buf = NULL;
	size_t len = 0, cap = 0;

	while (sess && len < OUT_GATHER) {
		const uint8_t *data;
		ssize_t n = nghttp2_session_mem_send(sess, &data);

		if (n <= 0) {
			if (n < 0 && sess == f->up)
				upstream_gone(f, nghttp2_strerror((int)n));
			else if (n < 0)
				c->closing = true;
			break;
		}
		if (len + (size_t)n > cap) {
			size_t ncap = cap ? cap * 2 : 16384;
			char *b;

			while (ncap < len + (size_t)n)
				ncap *= 2;
			if (!(b = realloc(buf, ncap))) {
				free(buf);
				return conn_close(c, CR_INTERNAL), -1;
			}
			buf = b;
			cap = ncap;
		}
		memcpy(buf + len, data, (size_t)n);
		len += (size_t)n;
	}
	if (!len) {
		free(buf);
		return 0;
	}
	r->owned = buf;
	r->out = buf;
	r->out_len = len;
	return 1;
}

/* The client's session has nothing left to say or hear: the connection ends. */
static void check_end(struct conn *c)
{
	struct h2flow *f = flow(c);

	if (!nghttp2_session_want_read(f->down) && !nghttp2_session_want_write(f->down))
		c->closing = true;
	/* The upstream ended its session (GOAWAY, streams done): it is gone. */
	if (f->up && !nghttp2_session_want_read(f->up) && !nghttp2_session_want_write(f->up))
		upstream_gone(f, "ended the session");
}

static int h2flow_produce(struct conn *c, int d)
{
	int rc = feed(c, d);

	if (rc == 0)
		rc = flush(c, d);
	if (rc >= 0)
		check_end(c);
	return rc;
}

static int h2flow_eof(struct conn *c, int d)
{
	struct h2flow *f = flow(c);

	if (d == req_dir(c)) {
		/* The client said all it will: what it asked is answered, then we close. */
		c->closing = true;
		return 0;
	}
	upstream_gone(f, "closed the connection");
	/* Its EOF is not passed on: the client's side stays open for our answers. */
	c->d[1 - req_dir(c)].dst_shut = true;
	return 0;
}

/* The first deadline of a stream (response head, grpc-timeout), 0: none. */
static uint64_t h2flow_due(const struct conn *c, bool tls_side)
{
	const struct h2flow *f = flow(c);
	uint64_t due = 0;

	for (const struct h2stream *s = f->streams; s; s = s->next) {
		if (s->resp_due && (!due || s->resp_due < due))
			due = s->resp_due;
		if (s->deadline && !s->down_closed && (!due || s->deadline < due))
			due = s->deadline;
		if (s->hold_until && (!due || s->hold_until < due))
			due = s->hold_until;
	}
	if (f->gone_at && !f->goaway && (!due || f->gone_at + GONE_GRACE_MS < due))
		due = f->gone_at + GONE_GRACE_MS;
	if (due && c->last_active + c->snap->cfg->timeouts.idle_ms < due)
		due = c->last_active + c->snap->cfg->timeouts.idle_ms;
	return due;
}

static void cancel_upstream(struct h2flow *f, struct h2stream *s)
{
	if (s->app) {
		apppool_cancel(s->app);
		s->app = NULL;
	}
	if (s->pooled) {
		upool_cancel(s->pooled);
		s->pooled = NULL;
	}
	if (s->up_id && !s->up_closed && f->up)
		nghttp2_submit_rst_stream(f->up, NGHTTP2_FLAG_NONE, s->up_id, NGHTTP2_CANCEL);
}

static bool h2flow_on_timeout(struct conn *c, uint64_t now)
{
	struct h2flow *f = flow(c);
	bool handled = false;

	for (struct h2stream *s = f->streams; s; s = s->next) {
		if (s->hold_until && now >= s->hold_until) {
			release_held(f, s);
			handled = true;
		}
		if (s->deadline && !s->down_closed && now >= s->deadline) {
			s->deadline = 0;
			cancel_upstream(f, s);
			if (s->resp_started)
				nghttp2_submit_rst_stream(f->down, NGHTTP2_FLAG_NONE, s->down_id, NGHTTP2_CANCEL);
			else
				answer_local(f, s, 504, GRPC_DEADLINE, "deadline exceeded");
			s->grpc_status = GRPC_DEADLINE;
			handled = true;
		} else if (s->resp_due && now >= s->resp_due) {
			log_warn("conn %llu: no HTTP/2 response from %s within %u ms",
			         (unsigned long long)c->id, conn_destination_text(c),
			         conn_pick_request_ms(c));
			cancel_upstream(f, s);
			answer_unavailable(f, s, 504, "upstream timed out");
			handled = true;
		}
	}
	if (f->gone_at && !f->goaway && now >= f->gone_at + GONE_GRACE_MS) {
		nghttp2_submit_goaway(f->down, NGHTTP2_FLAG_NONE,
		                      nghttp2_session_get_last_proc_stream_id(f->down),
		                      NGHTTP2_NO_ERROR, NULL, 0);
		f->goaway = true;
		c->closing = true;
		handled = true;
	}
	if (handled)
		conn_kick(c);
	return handled;
}

/* Switched to from httpflow: an upstream that closed before is gone already. */
static void h2flow_start(struct conn *c)
{
	if (c->d[1 - req_dir(c)].src_eof)
		upstream_gone(flow(c), "closed the connection");
}

static void h2flow_fail_early(struct conn *c, int status, enum conn_reason reason)
{
	(void)status;
	conn_close(c, reason);    /* the switch to HTTP/2 happens only once relaying */
}

/* Draining: GOAWAY; open streams finish, then the connection closes. */
static bool h2flow_drain(struct conn *c)
{
	struct h2flow *f = flow(c);

	if (!f->goaway) {
		nghttp2_submit_goaway(f->down, NGHTTP2_FLAG_NONE,
		                      nghttp2_session_get_last_proc_stream_id(f->down),
		                      NGHTTP2_NO_ERROR, NULL, 0);
		f->goaway = true;
	}
	c->closing = true;
	conn_kick(c);
	return false;    /* the GOAWAY goes out first; done() ends it */
}

static void h2flow_shrink(struct conn *c)
{
	(void)c;
}

static bool h2flow_done(const struct conn *c)
{
	const struct h2flow *f = flow(c);

	return !nghttp2_session_want_write(f->down) && (f->dead || f->n_streams == 0);
}

static bool h2flow_logged(const struct conn *c)
{
	return flow(c)->logged;
}

/*
 * A new snapshot with another policy: inbound HTTP/2 connections drain
 * (GOAWAY; their open streams finish under the policy they started with).
 * The pools of the calling sidecars keep their connections for long, so
 * without this a new policy would never decide their streams; their next
 * streams go over a new connection, decided by the new policy.
 */
void h2flow_drain_stale(struct worker *w, const struct snapshot *s)
{
	for (struct conn *c = w->conns; c; c = c->next)
		if (c->proto == &h2flow_ops && c->inbound && c->state == CONN_RELAYING &&
		    c->snap->policy != s->policy && !flow(c)->goaway)
			h2flow_drain(c);
}

const struct conn_proto_ops h2flow_ops = {
	.name = "h2",
	.per_request_policy = true,
	.answers_after_reset = true,
	.init = h2flow_new,
	.release = h2flow_free,
	.start = h2flow_start,
	.produce = h2flow_produce,
	.eof = h2flow_eof,
	.due = h2flow_due,
	.on_timeout = h2flow_on_timeout,
	.fail_early = h2flow_fail_early,
	.drain = h2flow_drain,
	.shrink = h2flow_shrink,
	.done = h2flow_done,
	.logged = h2flow_logged,
};
