/* upool: pooled mutual-TLS HTTP/2 connections between sidecars (see upool.h). */
#include "upool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "meshlet/log.h"
#include "meshlet/metrics.h"
#include "meshlet/tls.h"
#include "conn.h"
#include "h2session.h"
#include "snapshot.h"
#include "worker-t.h"

#define READ_BUF 16384
#define OUT_GATHER 65536
#define MAX_FIELDS 256
#define RUN_ROUNDS 16

enum uc_state { UC_CONNECTING, UC_HANDSHAKE, UC_READY };

/* A response header block, copied: "name\0value\0" pairs. */
struct uhdrs {
	char *buf;
	size_t len, cap;
	uint32_t off[MAX_FIELDS][2];   /* name, value offsets */
	uint32_t nlen[MAX_FIELDS][2];
	size_t n;
};

struct uconn {
	struct uconn *prev, *next;
	struct upool *p;
	struct snapshot *snap;         /* the TLS context and peer it was made with */
	struct config_addr addr;
	uint64_t id;
	int fd;
	SSL *ssl;
	struct tls_verify verify;
	struct event *ev;
	enum uc_state state;
	bool draining;                 /* GOAWAY either way: no new streams */
	bool counted;                  /* in meshlet_upstream_connections_active */
	bool carried;                  /* some stream went over it */
	struct upool_req *streams;     /* requests it carries */
	unsigned n_streams;
	uint64_t deadline;             /* connect or handshake */
	int connect_err;               /* the connect failed at once (reported from the event) */
	uint64_t idle_since;
	nghttp2_session *sess;
	char *out;
	size_t out_off, out_len;
};

struct upool_req {
	struct upool_req *prev, *next;  /* the queue, or its connection's streams */
	struct upool *p;
	struct uconn *uc;
	int32_t id;
	const struct upool_owner_ops *ops;   /* NULL: cancelled */
	void *ctx;
	struct config_addr addr;
	uint16_t tries, n_endpoints;
	uint16_t endpoint;
	struct endpick_tried tried;      /* endpoints this request was sent towards */
	char *nvbuf;
	nghttp2_nv *nv;
	size_t n_nv;
	bool has_body, body_taken, head_done, in_trailers, resp_end;
	size_t unconsumed;               /* DATA handed to the owner, window not yet reopened */
	struct uhdrs hdrs;
	uint64_t queued_at;
	/*
	 * Sending it again (docs/traffic.md, retries): the body as taken from
	 * the owner, kept while the listener's document retries and it stays
	 * within UPOOL_RETRY_BODY_MAX; replay_off is how much of it this
	 * attempt sent. The attempt's response-head clock starts once the
	 * whole request was handed to the session.
	 */
	struct traffic_retries retry;    /* the document's, at submit (attempts 0: none) */
	uint32_t request_ms;             /* request_seconds: each attempt's wait for the head */
	uint8_t *kept;
	size_t kept_len, kept_cap, replay_off;
	bool keeping;                    /* kept holds the whole body taken so far */
	bool body_end;                   /* the owner gave its whole body */
	bool idempotent;
	bool backing_off;                /* waiting (timer) before a retry, in p->waiting */
	unsigned retries;
	struct event *timer;             /* the head timeout, or a retry's backoff */
};

struct upool {
	struct worker *w;
	size_t listener;
	struct uconn *conns;
	unsigned n_conns, n_ready;
	struct upool_req *queue, *queue_tail;
	unsigned n_queued;
	struct upool_req *waiting;       /* backing off before a retry */
	struct event *kick, *timer;
	uint64_t next_id;
	bool stopping;                   /* upool_free: nothing is retried */
};

static void uc_arm(struct uconn *uc);
static void uc_kick(struct uconn *uc);
static void uc_run(struct uconn *uc);
static void uc_close(struct uconn *uc, const char *why);
static void fail_queued(struct upool *p, const struct config_addr *addr);
static void schedule(struct upool *p);
static void dispatch(struct upool *p);
static void attempt_failed(struct upool *p, struct snapshot *snap, struct upool_req *r,
                           enum endpick_failure why, int status, uint32_t code,
                           const char *text);

static struct metrics *metrics_of(const struct upool *p)
{
	return p->w->shared->metrics;
}

/* ---- requests ----------------------------------------------------------- */

static void list_add(struct upool_req **head, struct upool_req *r)
{
	r->prev = NULL;
	r->next = *head;
	if (*head)
		(*head)->prev = r;
	*head = r;
}

static void list_del(struct upool_req **head, struct upool_req *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		*head = r->next;
	if (r->next)
		r->next->prev = r->prev;
	r->prev = r->next = NULL;
}

static void queue_push(struct upool *p, struct upool_req *r, bool front)
{
	r->prev = r->next = NULL;
	if (!p->queue) {
		p->queue = p->queue_tail = r;
	} else if (front) {
		r->next = p->queue;
		p->queue->prev = r;
		p->queue = r;
	} else {
		r->prev = p->queue_tail;
		p->queue_tail->next = r;
		p->queue_tail = r;
	}
	p->n_queued++;
	atomic_fetch_add_explicit(&p->w->shared->upstream_pending[p->listener], 1,
	                          memory_order_relaxed);
}

static void queue_del(struct upool *p, struct upool_req *r)
{
	if (p->queue_tail == r)
		p->queue_tail = r->prev;
	list_del(&p->queue, r);
	p->n_queued--;
	atomic_fetch_sub_explicit(&p->w->shared->upstream_pending[p->listener], 1,
	                          memory_order_relaxed);
}

static void req_free(struct upool_req *r)
{
	if (r->timer)
		event_free(r->timer);
	free(r->kept);
	free(r->nvbuf);
	free(r->nv);
	free(r->hdrs.buf);
	free(r);
}

/* Ends r toward its owner (if any) and frees it. It is in no list. */
static void req_end(struct upool_req *r, int status, uint32_t code, const char *why)
{
	const struct upool_owner_ops *ops = r->ops;

	r->ops = NULL;
	if (ops)
		ops->end(r->ctx, status, code, why);
	req_free(r);
}

/* nv copied into one block: the request may wait for a connection. */
static int copy_nv(struct upool_req *r, const nghttp2_nv *nv, size_t n)
{
	size_t bytes = 0, at = 0;

	for (size_t i = 0; i < n; i++)
		bytes += nv[i].namelen + nv[i].valuelen;
	if (!(r->nv = calloc(n ? n : 1, sizeof(*r->nv))) || !(r->nvbuf = malloc(bytes ? bytes : 1)))
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		r->nv[i] = nv[i];
		r->nv[i].flags = NGHTTP2_NV_FLAG_NONE;
		memcpy(r->nvbuf + at, nv[i].name, nv[i].namelen);
		r->nv[i].name = (uint8_t *)r->nvbuf + at;
		at += nv[i].namelen;
		memcpy(r->nvbuf + at, nv[i].value, nv[i].valuelen);
		r->nv[i].value = (uint8_t *)r->nvbuf + at;
		at += nv[i].valuelen;
	}
	r->n_nv = n;
	return 0;
}

/*
 * The endpoint a request goes to: the listener's choice for single
 * connections too (conn_pick.c: round robin over endpoints this request
 * has not been sent towards, skipping ejected ones).
 */
static int pick_endpoint(struct upool *p, const struct snapshot *snap, struct upool_req *r)
{
	const struct snapshot_outbound *o = &snap->outbound[p->listener];
	int i;

	if (o->n_endpoints == 0)
		return -ENOENT;
	if (r->tried.n == 0 && !r->tried.again)
		conn_pick_first_attempt(p->w, p->listener);
	r->n_endpoints = (uint16_t)o->n_endpoints;
	i = conn_pick_choose(p->w, snap, p->listener, &r->tried);
	if (i < 0)
		return -ENOENT;
	r->endpoint = (uint16_t)i;
	r->addr = o->endpoints[i];
	return 0;
}

static bool same_addr(const struct config_addr *a, const struct config_addr *b)
{
	return a->len == b->len && memcmp(&a->ss, &b->ss, a->len) == 0;
}

/* ---- response headers --------------------------------------------------- */

static int hdrs_add(struct uhdrs *h, const uint8_t *name, size_t nl, const uint8_t *val,
                    size_t vl, size_t limit)
{
	size_t need = h->len + nl + vl + 2;

	if (h->n == MAX_FIELDS || need > limit + 2 * MAX_FIELDS)
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
	h->off[h->n][0] = (uint32_t)h->len;
	h->nlen[h->n][0] = (uint32_t)nl;
	memcpy(h->buf + h->len, name, nl);
	h->buf[h->len + nl] = '\0';
	h->off[h->n][1] = (uint32_t)(h->len + nl + 1);
	h->nlen[h->n][1] = (uint32_t)vl;
	memcpy(h->buf + h->len + nl + 1, val, vl);
	h->buf[need - 1] = '\0';
	h->len = need;
	h->n++;
	return 0;
}

/* The block as nv and h2_field arrays (h->n entries each). */
static void hdrs_views(const struct uhdrs *h, nghttp2_nv *nv, struct h2_field *f)
{
	for (size_t i = 0; i < h->n; i++) {
		char *n = h->buf + h->off[i][0], *v = h->buf + h->off[i][1];

		nv[i] = (nghttp2_nv){ (uint8_t *)n, (uint8_t *)v, h->nlen[i][0], h->nlen[i][1],
		                      NGHTTP2_NV_FLAG_NONE };
		f[i] = (struct h2_field){ n, v, h->nlen[i][0], h->nlen[i][1] };
	}
}

static const char *hdrs_status(const struct uhdrs *h)
{
	for (size_t i = 0; i < h->n; i++)
		if (!strcmp(h->buf + h->off[i][0], ":status"))
			return h->buf + h->off[i][1];
	return NULL;
}

/* ---- retries (docs/traffic.md) ------------------------------------------ */

/* Its head and every body byte an attempt took are here to send again. */
static bool resendable(const struct upool_req *r)
{
	return r->nv && (!r->body_taken || r->keeping);
}

/* r leaves its stream (closed, or reset by us): nothing of it reaches r any more. */
static void stream_detach(struct uconn *uc, struct upool_req *r)
{
	nghttp2_session_set_stream_user_data(uc->sess, r->id, NULL);
	list_del(&uc->streams, r);
	uc->n_streams--;
	uc->idle_since = conn_clock_ms();
	/* What the owner still holds has left the connection's window. */
	if (r->unconsumed)
		nghttp2_session_consume_connection(uc->sess, r->unconsumed);
	r->unconsumed = 0;
	r->uc = NULL;
	evtimer_del(r->timer);
}

/*
 * Whether the attempt that failed (why, status) is retried: the
 * document's retries.on, attempts, an idempotent method, a request that
 * can be sent again (endpick_retryable), and the listener's budget (the
 * retry is counted then).
 */
static bool may_retry(struct upool *p, struct upool_req *r, enum endpick_failure why, int status)
{
	struct endpick_request er = { r->retries, r->idempotent, resendable(r) };

	if (p->stopping || !r->ops || !endpick_retryable(&r->retry, &er, why, status) ||
	    !conn_pick_may_retry(p->w, p->listener, r->retry.budget_percent))
		return false;
	metrics_inc(&metrics_of(p)->retries);
	return true;
}

static uint64_t random_u64(void)
{
	uint64_t v = 0;

	if (RAND_bytes((unsigned char *)&v, sizeof(v)) != 1)
		v = 0;
	return v;
}

/*
 * Sends r (in no list, its stream left) again: to an endpoint it has not
 * been sent towards where there is one (else the ones it tried, afresh),
 * after the backoff (retries.backoff_ms doubled per retry, at most 8x,
 * with jitter: traffic_backoff_ms).
 */
static void retry(struct upool *p, struct upool_req *r, const char *why)
{
	struct snapshot *cur = p->w->shared->snapshot(p->w->shared->arg);
	struct config_addr was = r->addr;
	struct timeval tv;
	uint32_t ms;
	int rc = -ENOENT;

	r->retries++;
	r->id = 0;
	r->replay_off = 0;
	r->head_done = r->in_trailers = r->resp_end = false;
	r->hdrs.n = r->hdrs.len = 0;
	if (cur && (rc = pick_endpoint(p, cur, r)) < 0) {
		endpick_tried_restart(&r->tried);
		rc = pick_endpoint(p, cur, r);
	}
	snapshot_unref(cur);
	if (rc < 0) {
		req_end(r, 502, 0, "no endpoint");
		return;
	}
	ms = traffic_backoff_ms(r->retry.backoff_ms, r->retries, random_u64());
	log_info("upstream request to %s failed (%s): retry %u to %s in %u ms", was.text, why,
	         r->retries, r->addr.text, ms);
	if (ms == 0) {
		r->queued_at = conn_clock_ms();
		queue_push(p, r, true);
		schedule(p);
		return;
	}
	r->backing_off = true;
	list_add(&p->waiting, r);
	tv.tv_sec = (time_t)(ms / 1000);
	tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
	evtimer_add(r->timer, &tv);
}

/*
 * An attempt of r (in no list, its stream left) failed before a response
 * head was passed on (a reset, a lost connection, the head timeout): a
 * failure for outlier ejection, then a retry when one is allowed, else
 * r ends with status.
 */
static void attempt_failed(struct upool *p, struct snapshot *snap, struct upool_req *r,
                           enum endpick_failure why, int status, uint32_t code, const char *text)
{
	if (r->ops && !p->stopping)
		conn_pick_outcome(p->w, snap, p->listener, &r->addr, true);
	if (may_retry(p, r, why, status)) {
		retry(p, r, text);
		return;
	}
	req_end(r, status, code, text);
}

/* r's timer: its backoff is over (to the queue), or its head is late (504 or a retry). */
static void req_timer(evutil_socket_t fd, short what, void *arg)
{
	struct upool_req *r = arg;
	struct upool *p = r->p;
	struct uconn *uc = r->uc;

	if (r->backing_off) {
		r->backing_off = false;
		list_del(&p->waiting, r);
		r->queued_at = conn_clock_ms();
		queue_push(p, r, true);
		schedule(p);
		return;
	}
	if (!uc || r->head_done)
		return;
	log_warn("upstream conn %llu: no response head from %s within %u ms",
	         (unsigned long long)uc->id, uc->addr.text, r->request_ms);
	nghttp2_submit_rst_stream(uc->sess, NGHTTP2_FLAG_NONE, r->id, NGHTTP2_CANCEL);
	stream_detach(uc, r);
	uc_kick(uc);
	attempt_failed(p, uc->snap, r, ENDPICK_TIMEOUT, 504, 0, "upstream timed out");
	schedule(p);
}

/* ---- nghttp2 callbacks --------------------------------------------------- */

static struct upool_req *req_of(nghttp2_session *s, int32_t id)
{
	return nghttp2_session_get_stream_user_data(s, id);
}

/* Keeps n more bytes of the body for a retry; past the bound, none. */
static void keep_body(struct upool_req *r, const uint8_t *buf, size_t n)
{
	if (!r->keeping)
		return;
	if (r->kept_len + n > UPOOL_RETRY_BODY_MAX) {
		r->keeping = false;    /* too large to hold: it will not be sent again */
		free(r->kept);
		r->kept = NULL;
		r->kept_len = r->kept_cap = r->replay_off = 0;
		return;
	}
	if (r->kept_len + n > r->kept_cap) {
		size_t cap = r->kept_cap ? r->kept_cap : 4096;
		uint8_t *k;

		while (cap < r->kept_len + n)
			cap *= 2;
		if (!(k = realloc(r->kept, cap))) {
			r->keeping = false;
			return;
		}
		r->kept = k;
		r->kept_cap = cap;
	}
	memcpy(r->kept + r->kept_len, buf, n);
	r->kept_len += n;
	r->replay_off = r->kept_len;
}

/* The next body bytes of this attempt: what an earlier one sent, then the owner's. */
static size_t body_next(struct upool_req *r, uint8_t *buf, size_t len, bool *end)
{
	size_t n;

	if (r->keeping && r->replay_off < r->kept_len) {
		n = r->kept_len - r->replay_off < len ? r->kept_len - r->replay_off : len;
		memcpy(buf, r->kept + r->replay_off, n);
		r->replay_off += n;
		*end = r->body_end && r->replay_off == r->kept_len;
		return n;
	}
	if (r->body_end) {
		*end = true;
		return 0;
	}
	n = r->ops->body(r->ctx, buf, len, end);
	r->body_end = *end;
	keep_body(r, buf, n);
	return n;
}

static void req_timer(evutil_socket_t fd, short what, void *arg);

/* The whole request is with the upstream: its response head is due in request_ms. */
static void head_clock_start(struct upool_req *r)
{
	struct timeval tv = { (time_t)(r->request_ms / 1000),
	                      (suseconds_t)(r->request_ms % 1000) * 1000 };

	evtimer_add(r->timer, &tv);
}

static ssize_t body_read(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len,
                         uint32_t *flags, nghttp2_data_source *src, void *user)
{
	struct upool_req *r = src->ptr;
	bool end = false;
	size_t n;

	if (!r->ops) {
		*flags |= NGHTTP2_DATA_FLAG_EOF;    /* cancelled: its RST_STREAM follows */
		return 0;
	}
	n = body_next(r, buf, len, &end);
	if (n)
		r->body_taken = true;
	if (!end)
		return n ? (ssize_t)n : NGHTTP2_ERR_DEFERRED;
	*flags |= NGHTTP2_DATA_FLAG_EOF;
	head_clock_start(r);
	if (r->ops->trailers) {
		nghttp2_nv t[MAX_FIELDS];
		size_t nt = r->ops->trailers(r->ctx, t, MAX_FIELDS);

		if (nt && nghttp2_submit_trailer(s, id, t, nt) == 0)
			*flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
	}
	return (ssize_t)n;
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *fr, void *user)
{
	struct upool_req *r = req_of(s, fr->hd.stream_id);

	if (r) {
		/* A block after the final head is trailers; one after an interim
		 * (1xx) head is the next head. Each starts afresh. */
		r->in_trailers = r->head_done;
		r->hdrs.n = r->hdrs.len = 0;
	}
	return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *fr, const uint8_t *name, size_t nl,
                     const uint8_t *value, size_t vl, uint8_t flags, void *user)
{
	struct uconn *uc = user;
	struct upool_req *r = req_of(s, fr->hd.stream_id);

	if (!r)
		return 0;
	/* Bounded like the client's blocks: over, the stream is reset (502). */
	if (hdrs_add(&r->hdrs, name, nl, value, vl, uc->snap->cfg->http2.max_header_list_bytes) < 0)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	return 0;
}

static void on_head(struct uconn *uc, struct upool_req *r, bool end)
{
	nghttp2_nv nv[MAX_FIELDS];
	struct h2_field f[MAX_FIELDS];
	const char *st = hdrs_status(&r->hdrs), *why = NULL;
	int status = st ? atoi(st) : 0;

	if (status >= 100 && status < 200)
		return;    /* interim: the final head follows */
	evtimer_del(r->timer);    /* the head came in time */
	if (r->ops) {
		/* Passive ejection counts 5xx answers as failures, others as successes. */
		conn_pick_outcome(uc->p->w, uc->snap, uc->p->listener, &uc->addr, status >= 500);
		if (status >= 500 && may_retry(uc->p, r, ENDPICK_STATUS, status)) {
			/* Not passed on: the stream ends here, the request goes again. */
			if (!end || !r->body_end)
				nghttp2_submit_rst_stream(uc->sess, NGHTTP2_FLAG_NONE, r->id,
				                          NGHTTP2_CANCEL);
			stream_detach(uc, r);
			uc_kick(uc);
			retry(uc->p, r, st);
			return;
		}
	}
	r->head_done = true;
	hdrs_views(&r->hdrs, nv, f);
	if (h2_check_response(f, r->hdrs.n, false, &why) != H2_OK) {
		log_warn("upstream conn %llu: bad HTTP/2 response from %s: %s",
		         (unsigned long long)uc->id, uc->addr.text, why);
		nghttp2_submit_rst_stream(uc->sess, NGHTTP2_FLAG_NONE, r->id, NGHTTP2_PROTOCOL_ERROR);
		return;
	}
	if (r->ops && !r->ops->head(r->ctx, nv, r->hdrs.n, end))
		nghttp2_submit_rst_stream(uc->sess, NGHTTP2_FLAG_NONE, r->id, NGHTTP2_INTERNAL_ERROR);
	r->hdrs.n = r->hdrs.len = 0;
	free(r->nvbuf);    /* answered: it will not be sent again */
	free(r->nv);
	free(r->kept);
	r->nvbuf = NULL;
	r->nv = NULL;
	r->kept = NULL;
	r->keeping = false;
}

static void on_trailers(struct uconn *uc, struct upool_req *r)
{
	nghttp2_nv nv[MAX_FIELDS];
	struct h2_field f[MAX_FIELDS];
	const char *why = NULL;

	hdrs_views(&r->hdrs, nv, f);
	if (h2_check_response(f, r->hdrs.n, true, &why) != H2_OK) {
		log_warn("upstream conn %llu: bad HTTP/2 trailers from %s: %s",
		         (unsigned long long)uc->id, uc->addr.text, why);
		nghttp2_submit_rst_stream(uc->sess, NGHTTP2_FLAG_NONE, r->id, NGHTTP2_PROTOCOL_ERROR);
		return;
	}
	if (r->ops && r->ops->resp_trailers)
		r->ops->resp_trailers(r->ctx, nv, r->hdrs.n);
	r->hdrs.n = r->hdrs.len = 0;
}

static int on_frame(nghttp2_session *s, const nghttp2_frame *fr, void *user)
{
	struct uconn *uc = user;
	struct upool_req *r;
	bool end = (fr->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;

	if (fr->hd.type == NGHTTP2_GOAWAY) {
		uc->draining = true;    /* the peer takes no new streams */
		return 0;
	}
	if (fr->hd.type == NGHTTP2_SETTINGS)
		schedule(uc->p);        /* its stream limit may have changed */
	if (fr->hd.type != NGHTTP2_HEADERS && fr->hd.type != NGHTTP2_DATA)
		return 0;
	if (!(r = req_of(s, fr->hd.stream_id)))
		return 0;
	r->resp_end = r->resp_end || end;
	if (fr->hd.type == NGHTTP2_HEADERS && !r->in_trailers)
		on_head(uc, r, end);
	else if (fr->hd.type == NGHTTP2_HEADERS)
		on_trailers(uc, r);
	return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len,
                   void *user)
{
	struct upool_req *r = req_of(s, id);

	if (!r || !r->ops) {
		nghttp2_session_consume(s, id, len);    /* nobody takes them */
		return 0;
	}
	r->unconsumed += len;
	r->ops->data(r->ctx, data, len);
	return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *user)
{
	struct uconn *uc = user;
	struct upool_req *r = req_of(s, id);

	if (!r)
		return 0;
	stream_detach(uc, r);
	if (code == NGHTTP2_REFUSED_STREAM && !r->head_done && r->ops && resendable(r)) {
		/* Never processed by the peer (RFC 9113 8.7): safe on another
		 * connection, whatever the method; not a retry. */
		r->id = 0;
		r->replay_off = 0;
		queue_push(uc->p, r, true);
		schedule(uc->p);
		return 0;
	}
	if (r->resp_end && r->head_done && code == NGHTTP2_NO_ERROR)
		req_end(r, 0, 0, NULL);
	else if (r->head_done)
		req_end(r, 502, code, "upstream reset the stream");
	else
		attempt_failed(uc->p, uc->snap, r, ENDPICK_RESET, 502, code,
		               "upstream closed the stream");
	schedule(uc->p);
	return 0;
}

static nghttp2_session_callbacks *callbacks(void)
{
	nghttp2_session_callbacks *cb;

	if (nghttp2_session_callbacks_new(&cb) != 0)
		return NULL;
	nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
	nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame);
	nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
	nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
	return cb;
}

/* ---- connections -------------------------------------------------------- */

static unsigned stream_limit(const struct uconn *uc)
{
	uint32_t peer = nghttp2_session_get_remote_settings(uc->sess,
	                                                    NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
	uint32_t ours = uc->snap->cfg->outbound[uc->p->listener].pool.max_streams;

	return peer < ours ? peer : ours;
}

static bool has_room(const struct uconn *uc)
{
	return uc->state == UC_READY && !uc->draining && uc->n_streams < stream_limit(uc);
}

static void uc_kick(struct uconn *uc)
{
	event_active(uc->ev, EV_WRITE, 0);
}

/* Every stream uc carries ends with why; uc is freed. */
static void uc_close(struct uconn *uc, const char *why)
{
	struct upool *p = uc->p;

	log_info("upstream conn %llu to %s closed: %s", (unsigned long long)uc->id, uc->addr.text,
	         why);
	while (uc->streams) {
		struct upool_req *r = uc->streams;

		list_del(&uc->streams, r);
		if (r->id)
			nghttp2_session_set_stream_user_data(uc->sess, r->id, NULL);
		r->uc = NULL;
		evtimer_del(r->timer);
		if (r->head_done)
			req_end(r, 502, 0, "upstream unavailable");
		else
			attempt_failed(p, uc->snap, r, ENDPICK_RESET, 502, 0, "upstream unavailable");
	}
	if (uc->prev)
		uc->prev->next = uc->next;
	else
		p->conns = uc->next;
	if (uc->next)
		uc->next->prev = uc->prev;
	p->n_conns--;
	if (uc->counted) {
		p->n_ready--;
		atomic_fetch_sub_explicit(&metrics_of(p)->upstream_connections_active, 1,
		                          memory_order_relaxed);
	}
	event_free(uc->ev);
	if (uc->ssl) {
		if (SSL_is_init_finished(uc->ssl))
			SSL_shutdown(uc->ssl);
		SSL_free(uc->ssl);
		ERR_clear_error();
	}
	if (uc->fd >= 0)
		close(uc->fd);
	nghttp2_session_del(uc->sess);
	free(uc->out);
	snapshot_unref(uc->snap);
	/* Gone before carrying anything (refused, broken, closed at once): the
	 * requests waiting for its endpoint must not just open the next one. */
	if (!uc->carried) {
		struct config_addr addr = uc->addr;

		free(uc);
		fail_queued(p, &addr);
	} else {
		free(uc);
	}
	schedule(p);
}

/* No new streams; closed once those it carries ended (uc_run). */
static void uc_drain(struct uconn *uc, const char *why)
{
	if (uc->draining || uc->state != UC_READY)
		return;
	log_info("upstream conn %llu to %s drains: %s", (unsigned long long)uc->id, uc->addr.text,
	         why);
	uc->draining = true;
	nghttp2_submit_goaway(uc->sess, NGHTTP2_FLAG_NONE,
	                      nghttp2_session_get_last_proc_stream_id(uc->sess), NGHTTP2_NO_ERROR,
	                      NULL, 0);
	uc_kick(uc);
}

/* A connection to addr failed before carrying anything: unless another one
 * to addr is there, the requests waiting for addr try the next endpoint,
 * or end with 502. */
static void fail_queued(struct upool *p, const struct config_addr *addr)
{
	struct upool_req *r, *next;
	bool others = false;

	for (struct uconn *o = p->conns; o; o = o->next)
		others = others || same_addr(&o->addr, addr);
	for (r = p->queue; r && !others; r = next) {
		next = r->next;
		if (!same_addr(&r->addr, addr))
			continue;
		queue_del(p, r);
		if (++r->tries < r->n_endpoints && r->ops) {
			/* Another endpoint (pick_endpoint skips those tried). */
			queue_push(p, r, true);
			r->addr.len = 0;    /* re-picked in dispatch */
			continue;
		}
		req_end(r, 502, 0, "upstream unavailable");
	}
}

/* A connect's outcome, for outlier ejection (as single connections report theirs). */
static void uc_connect_outcome(struct uconn *uc, bool failed)
{
	conn_pick_outcome(uc->p->w, uc->snap, uc->p->listener, &uc->addr, failed);
}

/* The connect or the handshake failed. */
static void uc_failed(struct uconn *uc, const char *why)
{
	log_warn("upstream conn %llu to %s failed: %s", (unsigned long long)uc->id, uc->addr.text,
	         why);
	uc_close(uc, why);
}

static int set_nodelay(int fd)
{
	int one = 1;

	return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static struct uconn *uc_open(struct upool *p, struct snapshot *snap, const struct config_addr *a)
{
	struct uconn *uc = calloc(1, sizeof(*uc));

	if (!uc)
		return NULL;
	uc->p = p;
	uc->addr = *a;
	uc->id = ++p->next_id;
	uc->fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	uc->ev = event_new(p->w->base, -1, 0, NULL, NULL);
	if (uc->fd < 0 || !uc->ev) {
		if (uc->fd >= 0)
			close(uc->fd);
		if (uc->ev)
			event_free(uc->ev);
		free(uc);
		return NULL;
	}
	uc->snap = snapshot_ref(snap);
	set_nodelay(uc->fd);
	uc->state = UC_CONNECTING;
	uc->deadline = conn_clock_ms() + conn_pick_listener_connect_ms(snap, p->listener);
	uc->next = p->conns;
	if (p->conns)
		p->conns->prev = uc;
	p->conns = uc;
	p->n_conns++;
	if (connect(uc->fd, (const struct sockaddr *)&a->ss, a->len) < 0 && errno != EINPROGRESS)
		uc->connect_err = errno;
	uc_arm(uc);
	/* A failure is handled from the event: the caller walks the queue it changes. */
	if (uc->connect_err)
		uc_kick(uc);
	return uc;
}

/* Returns 0, or -1 when uc failed (and is gone). */
static int uc_start_tls(struct uconn *uc)
{
	const struct snapshot_outbound *o = &uc->snap->outbound[uc->p->listener];

	uc->verify.expect_id = o->expect_id;
	if (!(uc->ssl = SSL_new(uc->snap->client_ctx)) || SSL_set_fd(uc->ssl, uc->fd) != 1 ||
	    SSL_set_alpn_protos(uc->ssl, (const unsigned char *)"\x02h2", 3) != 0) {
		uc_failed(uc, "out of memory");
		return -1;
	}
	tls_attach_verify(uc->ssl, &uc->verify);
	SSL_set_connect_state(uc->ssl);
	uc->state = UC_HANDSHAKE;
	uc->deadline = conn_clock_ms() + uc->snap->cfg->timeouts.handshake_ms;
	return 0;
}

static int uc_session(struct uconn *uc)
{
	const struct config *cfg = uc->snap->cfg;
	nghttp2_session_callbacks *cb = callbacks();
	uint64_t win = (uint64_t)cfg->http2.initial_window_bytes *
	               cfg->outbound[uc->p->listener].pool.max_streams;
	int rc;

	if (!cb)
		return -ENOMEM;
	rc = h2_session_new(&uc->sess, false, &cfg->http2, cb, uc);
	nghttp2_session_callbacks_del(cb);
	/* The connection's window: room for every stream's own window, so that
	 * a stream whose client reads slowly never stalls the others. */
	if (rc == 0)
		rc = nghttp2_session_set_local_window_size(uc->sess, NGHTTP2_FLAG_NONE, 0,
		                                           (int32_t)(win < INT32_MAX ? win : INT32_MAX));
	return rc == 0 ? 0 : -ENOMEM;
}

/* Returns 1 when uc is ready, 0 while the handshake runs, -1 when it failed (uc gone). */
static int uc_handshake(struct uconn *uc)
{
	const unsigned char *alpn = NULL;
	unsigned alpn_len = 0;
	int rc = SSL_do_handshake(uc->ssl), e;
	enum tls_failure why;
	char id[SPIFFE_ID_MAX + 1];

	if (rc != 1) {
		e = SSL_get_error(uc->ssl, rc);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
			return 0;
		why = tls_failure_reason(uc->ssl, &uc->verify);
		metrics_inc(&metrics_of(uc->p)->handshake_failures[why]);
		uc_failed(uc, tls_failure_str(why));
		return -1;
	}
	SSL_get0_alpn_selected(uc->ssl, &alpn, &alpn_len);
	if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) {
		uc_failed(uc, "the peer did not choose HTTP/2 (ALPN)");
		return -1;
	}
	if (tls_peer_id(uc->ssl, id, sizeof(id)) < 0) {
		metrics_inc(&metrics_of(uc->p)->handshake_failures[TLS_FAIL_NO_URI_SAN]);
		uc_failed(uc, "no SPIFFE ID");
		return -1;
	}
	if (uc_session(uc) < 0) {
		uc_failed(uc, "out of memory");
		return -1;
	}
	uc->state = UC_READY;
	uc->counted = true;
	uc->idle_since = conn_clock_ms();
	uc->p->n_ready++;
	atomic_fetch_add_explicit(&metrics_of(uc->p)->upstream_connections_active, 1,
	                          memory_order_relaxed);
	log_debug("upstream conn %llu to %s (%s) ready", (unsigned long long)uc->id, uc->addr.text,
	          id);
	schedule(uc->p);
	return 1;
}

/* Writes what is gathered, gathers more. Returns 1 progress, 0 blocked, -1 failed. */
static int uc_write(struct uconn *uc)
{
	if (uc->out_off == uc->out_len) {
		const uint8_t *data;
		ssize_t n;

		uc->out_off = uc->out_len = 0;
		while (uc->out_len < OUT_GATHER && (n = nghttp2_session_mem_send(uc->sess, &data)) > 0) {
			char *b = uc->out;

			if (!uc->out && !(b = uc->out = malloc(OUT_GATHER + 16384)))
				return -1;
			if (uc->out_len + (size_t)n > OUT_GATHER + 16384)
				break;    /* cannot happen: frames are at most 16 KiB + 9 */
			memcpy(b + uc->out_len, data, (size_t)n);
			uc->out_len += (size_t)n;
		}
		if (uc->out_len == 0)
			return 0;
	}
	int n = SSL_write(uc->ssl, uc->out + uc->out_off, (int)(uc->out_len - uc->out_off));

	if (n > 0) {
		uc->out_off += (size_t)n;
		return 1;
	}
	switch (SSL_get_error(uc->ssl, n)) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		return 0;
	default:
		ERR_clear_error();
		return -1;
	}
}

/* Reads and feeds the session once. Returns 1 progress, 0 blocked, -1 closed or failed. */
static int uc_read(struct uconn *uc, const char **why)
{
	char buf[READ_BUF];
	int n = SSL_read(uc->ssl, buf, sizeof(buf));

	if (n > 0) {
		ssize_t rc = nghttp2_session_mem_recv(uc->sess, (const uint8_t *)buf, (size_t)n);

		if (rc < 0) {
			*why = nghttp2_strerror((int)rc);
			return -1;
		}
		return 1;
	}
	switch (SSL_get_error(uc->ssl, n)) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		return 0;
	case SSL_ERROR_ZERO_RETURN:
		*why = "the peer closed the connection";
		return -1;
	default:
		ERR_clear_error();
		*why = "the connection broke";
		return -1;
	}
}

static void uc_run(struct uconn *uc)
{
	const char *why = "write failed";
	int w = 0, r = 0;

	for (int i = 0; i < RUN_ROUNDS; i++) {
		if ((w = uc_write(uc)) < 0)
			break;
		r = uc_read(uc, &why);    /* may end streams and call owners */
		if (r < 0 || (!w && !r))
			break;
	}
	if (w < 0 || r < 0) {
		uc_close(uc, why);
		return;
	}
	if (uc->out_off == uc->out_len &&
	    ((!nghttp2_session_want_read(uc->sess) && !nghttp2_session_want_write(uc->sess)) ||
	     (uc->draining && uc->n_streams == 0))) {
		uc_close(uc, uc->draining ? "drained" : "session ended");
		return;
	}
	if (w || r)
		uc_kick(uc);    /* more to do: after the others had their turn */
	else
		uc_arm(uc);
}

static void uc_event(evutil_socket_t fd, short what, void *arg)
{
	struct uconn *uc = arg;
	uint64_t now = conn_clock_ms();
	int err = 0;
	socklen_t len = sizeof(err);

	switch (uc->state) {
	case UC_CONNECTING:
		if (uc->connect_err) {
			uc_connect_outcome(uc, true);
			uc_failed(uc, strerror(uc->connect_err));
			return;
		}
		if (now >= uc->deadline) {
			uc_connect_outcome(uc, true);
			uc_failed(uc, "connect timed out");
			return;
		}
		if (!(what & EV_WRITE))
			break;
		if (getsockopt(uc->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
			err = errno;
		if (err == EINPROGRESS)
			break;
		uc_connect_outcome(uc, err != 0);
		if (err) {
			uc_failed(uc, strerror(err));
			return;
		}
		if (uc_start_tls(uc) < 0)
			return;
		/* fall through */
	case UC_HANDSHAKE:
		if (now >= uc->deadline) {
			metrics_inc(&metrics_of(uc->p)->handshake_failures[TLS_FAIL_TIMEOUT]);
			uc_failed(uc, "TLS handshake timed out");
			return;
		}
		switch (uc_handshake(uc)) {
		case 1:
			dispatch(uc->p);    /* the preface, SETTINGS and the first streams together */
			uc_run(uc);
			return;
		case 0:
			uc_arm(uc);
			return;
		default:
			return;
		}
	case UC_READY:
		if ((what & EV_TIMEOUT) && uc->n_streams == 0 &&
		    now >= uc->idle_since + uc->snap->cfg->outbound[uc->p->listener].pool.idle_ms) {
			uc_drain(uc, "idle");
			uc->draining = true;
		}
		uc_run(uc);
		return;
	}
	uc_arm(uc);
}

/* Registers for what uc waits on, with its next deadline. */
static void uc_arm(struct uconn *uc)
{
	short what = EV_READ;
	uint64_t now = conn_clock_ms(), due;
	struct timeval tv;

	if (uc->state == UC_CONNECTING)
		what = EV_WRITE;
	else if (uc->state == UC_HANDSHAKE)
		what = SSL_want_write(uc->ssl) ? EV_WRITE : EV_READ;
	else if (uc->out_off < uc->out_len)
		what |= EV_WRITE;
	if (uc->state != UC_READY)
		due = uc->deadline;
	else if (uc->n_streams == 0)
		due = uc->idle_since + uc->snap->cfg->outbound[uc->p->listener].pool.idle_ms;
	else
		due = now + uc->snap->cfg->timeouts.idle_ms;
	due = due > now ? due - now : 0;
	tv.tv_sec = (time_t)(due / 1000);
	tv.tv_usec = (suseconds_t)(due % 1000) * 1000;
	event_del(uc->ev);
	event_assign(uc->ev, uc->p->w->base, uc->fd, what, uc_event, uc);
	event_add(uc->ev, &tv);
}

/* ---- dispatch ----------------------------------------------------------- */

static void start_stream(struct uconn *uc, struct upool_req *r)
{
	nghttp2_data_provider prd = { .source.ptr = r, .read_callback = body_read };
	int32_t id = nghttp2_submit_request(uc->sess, NULL, r->nv, r->n_nv,
	                                    r->has_body ? &prd : NULL, r);

	if (id < 0) {
		req_end(r, 502, 0, "upstream session refused the request");
		return;
	}
	r->id = id;
	r->uc = uc;
	list_add(&uc->streams, r);
	uc->n_streams++;
	uc->carried = true;
	if (!r->has_body)
		head_clock_start(r);
	uc_kick(uc);
}

static unsigned conns_to(const struct upool *p, const struct config_addr *a, bool *opening)
{
	unsigned n = 0;

	*opening = false;
	for (const struct uconn *uc = p->conns; uc; uc = uc->next) {
		if (!same_addr(&uc->addr, a) || uc->draining)
			continue;
		n++;
		*opening = *opening || uc->state != UC_READY;
	}
	return n;
}

/* Connections made under another TLS context than cur's drain. */
static void drain_stale(struct upool *p, const struct snapshot *cur)
{
	for (struct uconn *uc = p->conns; uc; uc = uc->next)
		if (uc->snap->client_ctx != cur->client_ctx ||
		    strcmp(uc->snap->outbound[p->listener].expect_id,
		           cur->outbound[p->listener].expect_id) != 0)
			uc_drain(uc, "new certificate or bundle");
}

static void dispatch(struct upool *p)
{
	struct snapshot *cur = p->w->shared->snapshot(p->w->shared->arg);
	struct upool_req *r, *next;

	if (!cur)
		return;
	drain_stale(p, cur);
	for (r = p->queue; r; r = next) {
		struct uconn *uc;
		bool opening;

		next = r->next;
		if (!r->addr.len && pick_endpoint(p, cur, r) < 0) {
			/* Its endpoint failed and every other was tried. */
			queue_del(p, r);
			req_end(r, 502, 0, "upstream unavailable");
			continue;
		}
		for (uc = p->conns; uc; uc = uc->next)
			if (same_addr(&uc->addr, &r->addr) && has_room(uc) &&
			    uc->snap->client_ctx == cur->client_ctx)
				break;
		if (uc) {
			queue_del(p, r);
			start_stream(uc, r);
			continue;
		}
		if (conns_to(p, &r->addr, &opening) < cur->cfg->outbound[p->listener].pool.max_connections &&
		    !opening)
			uc_open(p, cur, &r->addr);    /* r waits for it (or for the failure) */
	}
	snapshot_unref(cur);
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
	struct upool *p = arg;
	uint64_t now = conn_clock_ms(), first = 0;
	struct upool_req *r, *next;
	struct snapshot *s;
	struct timeval tv;
	uint32_t ms;

	dispatch(p);
	s = p->w->shared->snapshot(p->w->shared->arg);
	/* Waiting for a stream is part of reaching the upstream: the connect timeout. */
	ms = s ? s->cfg->timeouts.connect_ms : 5000;
	snapshot_unref(s);
	/* Queued too long: 503 (no stream to the upstream free in time). */
	for (r = p->queue; r; r = next) {
		next = r->next;
		if (now >= r->queued_at + ms) {
			queue_del(p, r);
			req_end(r, 503, 0, "no upstream connection free in time");
		} else if (!first || r->queued_at + ms < first) {
			first = r->queued_at + ms;
		}
	}
	if (first) {
		tv.tv_sec = (time_t)((first - now) / 1000);
		tv.tv_usec = (suseconds_t)((first - now) % 1000) * 1000;
		evtimer_add(p->timer, &tv);
	}
}

static void schedule(struct upool *p)
{
	event_active(p->kick, 0, 0);
}

/* ---- the interface ------------------------------------------------------ */

struct upool *upool_new(struct worker *w, size_t listener)
{
	struct upool *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->w = w;
	p->listener = listener;
	p->kick = event_new(w->base, -1, 0, on_kick, p);
	p->timer = evtimer_new(w->base, on_kick, p);
	if (!p->kick || !p->timer) {
		upool_free(p);
		return NULL;
	}
	return p;
}

void upool_free(struct upool *p)
{
	if (!p)
		return;
	p->stopping = true;
	while (p->conns)
		uc_close(p->conns, "the worker stops");
	while (p->queue) {
		struct upool_req *r = p->queue;

		queue_del(p, r);
		req_end(r, 502, 0, "the worker stops");
	}
	while (p->waiting) {
		struct upool_req *r = p->waiting;

		list_del(&p->waiting, r);
		req_end(r, 502, 0, "the worker stops");
	}
	if (p->kick)
		event_free(p->kick);
	if (p->timer)
		event_free(p->timer);
	free(p);
}

struct upool_req *upool_submit(struct upool *p, struct snapshot *snap, const nghttp2_nv *nv,
                               size_t n, bool has_body, const struct upool_owner_ops *ops,
                               void *ctx)
{
	const struct traffic *t = conn_pick_listener_traffic(snap, p->listener);
	struct upool_req *r;

	if (p->n_queued >= UPOOL_MAX_QUEUE) {
		errno = EAGAIN;
		return NULL;
	}
	if (t && t->max_pending_requests &&
	    atomic_load_explicit(&p->w->shared->upstream_pending[p->listener],
	                         memory_order_relaxed) >= t->max_pending_requests) {
		metrics_inc(&metrics_of(p)->overloaded);
		log_warn("limits.max_pending_requests (%u) of %s reached", t->max_pending_requests,
		         t->service);
		errno = EBUSY;
		return NULL;
	}
	if (!(r = calloc(1, sizeof(*r)))) {
		errno = ENOMEM;
		return NULL;
	}
	r->p = p;
	r->ops = ops;
	r->ctx = ctx;
	r->has_body = has_body;
	r->queued_at = conn_clock_ms();
	r->request_ms = conn_pick_listener_request_ms(snap, p->listener);
	if (t)
		r->retry = t->retries;
	r->keeping = r->retry.attempts > 0;
	for (size_t i = 0; i < n; i++)
		if (nv[i].namelen == 7 && !memcmp(nv[i].name, ":method", 7))
			r->idempotent = endpick_idempotent((const char *)nv[i].value, nv[i].valuelen);
	if (!(r->timer = evtimer_new(p->w->base, req_timer, r)) || copy_nv(r, nv, n) < 0 ||
	    pick_endpoint(p, snap, r) < 0) {
		req_free(r);
		errno = ENOMEM;
		return NULL;
	}
	queue_push(p, r, false);
	schedule(p);
	return r;
}

void upool_resume(struct upool_req *r)
{
	if (r->uc && r->id > 0) {
		nghttp2_session_resume_data(r->uc->sess, r->id);
		uc_kick(r->uc);
	}
}

void upool_consume(struct upool_req *r, size_t n)
{
	if (!r->uc || !n)
		return;
	n = n < r->unconsumed ? n : r->unconsumed;
	r->unconsumed -= n;
	nghttp2_session_consume(r->uc->sess, r->id, n);
	uc_kick(r->uc);
}

void upool_cancel(struct upool_req *r)
{
	if (r->backing_off) {
		list_del(&r->p->waiting, r);
		req_free(r);
		return;
	}
	if (!r->uc) {
		queue_del(r->p, r);
		req_free(r);
		return;
	}
	/* Freed when the session closes the stream (on_stream_close). */
	r->ops = NULL;
	evtimer_del(r->timer);
	nghttp2_submit_rst_stream(r->uc->sess, NGHTTP2_FLAG_NONE, r->id, NGHTTP2_CANCEL);
	uc_kick(r->uc);
}

void upool_close_revoked(struct upool *p, struct snapshot *s)
{
	struct uconn *uc, *next;

	for (uc = p ? p->conns : NULL; uc; uc = next) {
		next = uc->next;
		if (uc->ssl && SSL_is_init_finished(uc->ssl) &&
		    tls_is_revoked(s->server_ctx, SSL_get0_peer_certificate(uc->ssl)))
			uc_close(uc, "the peer's certificate was revoked");
	}
}
