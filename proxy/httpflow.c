/* httpflow: per-request policy, rewriting and logging on http listeners. */
#include "httpflow.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "meshlet/http.h"
#include "meshlet/log.h"
#include "bytequeue.h"
#include "conn.h"
#include "h2flow.h"
#include "h2session.h"
#include "h2to1.h"
#include "httpreq.h"
#include "snapshot.h"
#include "upool.h"
#include "worker-t.h"

/* Room for "x-request-id: <128 chars>\r\n" added by a proxy on the way. */
#define MESH_FIELD_ALLOWANCE 160

/* A request between its head and its answer. */
struct req_entry {
	unsigned flags;             /* HTTP_REQ_*: what its response looks like */
	int local_status;           /* 0: forwarded; else the proxy answers with it */
	const char *local_reason;   /* short text for 400-class answers */
	bool close_after;           /* close the connection after the answer */
	bool decided;
	bool complete;              /* the whole request was read */
	enum policy_action decision;
	const char *rule;           /* owned by the connection's snapshot */
	const char *traffic_name;   /* the rate limit or fault that answers it (snapshot's) */
	bool traffic_fault;
	bool overloaded;            /* refused by limits.max_pending_requests (503) */
	unsigned retry_after;
	uint64_t hold_until;        /* conn_clock_ms(): a fault's delay holds its head (or its
	                               abort) until then; 0: not held */
	int status;                 /* final status sent to the client */
	char *method, *path;        /* copies, for the log */
	char request_id[HTTPREQ_ID_LEN + 1];
	bool replace_request_id;    /* ours goes upstream instead of the caller's copies */
	uint64_t bytes_in, bytes_out;
	struct timespec started;    /* CLOCK_MONOTONIC: head complete */
	struct timespec started_wall;
};

struct h1up;

struct httpflow {
	struct http_parser_state req, resp;
	struct h1up *up;            /* detached (outbound): the request riding the pool */
	bool client_close;          /* detached: the client's request said no keep-alive */
	struct req_entry q[HTTPFLOW_INFLIGHT];
	size_t q_first, q_len;
	bool req_dropping;          /* body of a refused request: read, not forwarded */
	bool req_between;           /* no request begun since the last one ended */
	bool in_head;               /* a request head is arriving (its clock runs) */
	bool req_stopped;           /* no more requests: the connection will close */
	uint64_t requests;          /* request heads completed on this connection */
	uint64_t head_started;      /* conn_clock_ms: this head's first byte, or the connection's start */
	bool resp_expected;         /* http_response_expect() done for the front request */
	bool resp_in_message;       /* a response head was relayed, its end not yet */
	bool resp_sent_any;         /* bytes of the front request's response went out */
	uint64_t waiting_since;     /* conn_clock_ms: front request forwarded, response head awaited */
	bool tunnel;
	bool logged;
	bool draining;              /* the proxy drains: last response says close */
	bool upstream_closing;      /* the app's last response said connection: close */
	bool sniffed;               /* the client's first bytes said HTTP/1.x, not the HTTP/2 preface */
	char *held;                 /* a delayed request's head, forwarded at its hold_until */
	size_t held_len;
};

static struct httpflow *flow(const struct conn *c)
{
	return c->proto_ctx;
}

static int req_dir(const struct conn *c)
{
	return c->inbound ? RELAY_DOWN : RELAY_UP;
}

static int resp_dir(const struct conn *c)
{
	return c->inbound ? RELAY_UP : RELAY_DOWN;
}

static int httpflow_new(struct conn *c)
{
	struct httpflow *hf = calloc(1, sizeof(*hf));

	if (!hf)
		return -ENOMEM;
	struct http_limits lim;

	/*
	 * The inbound's peer is a proxy that may have added x-request-id to a
	 * request at the limits: the parser allows that much more, and
	 * within_limits() applies the limits to the rest.
	 */
	http_limits_default(&lim);
	if (c->inbound) {
		lim.max_headers += 1;
		lim.max_header_bytes += MESH_FIELD_ALLOWANCE;
	}
	http_request_init(&hf->req, &lim);
	/* The policy decides on the head: a trailer must not add what it evaluates. */
	if (c->inbound)
		http_request_guard_trailers(&hf->req, c->snap->policy_headers,
		                            c->snap->n_policy_headers);
	http_response_init(&hf->resp, NULL);
	hf->req_between = true;
	hf->head_started = conn_clock_ms();
	c->proto_ctx = hf;
	return 0;
}

static struct req_entry *front(struct httpflow *hf)
{
	return hf->q_len ? &hf->q[hf->q_first] : NULL;
}

/* The newest request (the one whose body may still be arriving). */
static struct req_entry *last(struct httpflow *hf)
{
	return &hf->q[(hf->q_first + hf->q_len - 1) % HTTPFLOW_INFLIGHT];
}

static void entry_clear(struct req_entry *e)
{
	free(e->method);
	free(e->path);
	memset(e, 0, sizeof(*e));
}

static void pool_abort(struct httpflow *hf);

static void httpflow_free(struct conn *c)
{
	struct httpflow *hf = flow(c);

	if (!hf)
		return;
	pool_abort(hf);
	for (size_t i = 0; i < HTTPFLOW_INFLIGHT; i++)
		entry_clear(&hf->q[i]);
	http_cleanup(&hf->req);
	http_cleanup(&hf->resp);
	free(hf->held);
	free(hf);
	c->proto_ctx = NULL;
}

/* Idle between requests: close now. Otherwise the response in flight
 * carries "connection: close" and the connection ends after it. */
static bool httpflow_drain(struct conn *c)
{
	struct httpflow *hf = flow(c);

	if (hf->tunnel)
		return false;
	hf->draining = true;
	if (hf->q_len == 0 && hf->req_between)
		return true;    /* idle keep-alive: nothing to finish */
	/* A request in flight: its response carries "connection: close", then we close. */
	return false;
}

/* Quiet: release the parsers' head buffers. */
static void httpflow_shrink(struct conn *c)
{
	http_shrink(&flow(c)->req);
	http_shrink(&flow(c)->resp);
}

/* Once a request was logged, the connection's own line is redundant. */
static bool httpflow_logged(const struct conn *c)
{
	return flow(c)->logged;
}

/* ---- the per-request log line ------------------------------------------ */

static void log_request(struct conn *c, struct req_entry *e)
{
	struct httpreq_record r = {
		.method = e->method, .path = e->path, .request_id = e->request_id, .rule = e->rule,
		.decided = e->decided, .decision = e->decision, .status = e->status,
		.grpc_status = -1, .version = "1.1", .bytes_in = e->bytes_in,
		.bytes_out = e->bytes_out, .started = e->started, .started_wall = e->started_wall,
	};

	flow(c)->logged = true;
	httpreq_log(c, &r);
}

/* ---- the proxy's own answers ------------------------------------------- */

/* A complete response with a short JSON body, in a new heap block. */
static char *local_response(const struct req_entry *e, int status, const char *reason,
                            bool close_after, size_t *len)
{
	struct httpreq_verdict v = {
		.rule = e ? e->rule : NULL,
		.traffic_name = e ? e->traffic_name : NULL,
		.traffic_fault = e && e->traffic_fault,
	};
	char body[512], extra[64] = "", *out;
	int blen = httpreq_error_body(status, &v, reason, body, sizeof(body)), n;

	if (v.traffic_name && !v.traffic_fault)
		snprintf(extra, sizeof(extra), "retry-after: %u\r\n", e->retry_after);
	if (e && e->overloaded) {
		snprintf(extra, sizeof(extra), "x-meshlet-overloaded: 1\r\n");
		blen = snprintf(body, sizeof(body),
		                "{\"error\":\"overloaded\",\"limit\":\"max_pending_requests\"}\n");
	}
	out = malloc(1024);
	if (!out)
		return NULL;
	n = snprintf(out, 1024,
	             "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
	             "%s%s%s%s%s\r\n%s",
	             status, http_status_reason(status), blen, extra,
	             e && e->request_id[0] ? "x-request-id: " : "",
	             e && e->request_id[0] ? e->request_id : "", e && e->request_id[0] ? "\r\n" : "",
	             close_after ? "connection: close\r\n" : "",
	             e && (e->flags & HTTP_REQ_HEAD) ? "" : body);    /* HEAD: length only */
	*len = (size_t)n;
	return out;
}

static void pop_front(struct httpflow *hf)
{
	entry_clear(&hf->q[hf->q_first]);
	hf->q_first = (hf->q_first + 1) % HTTPFLOW_INFLIGHT;
	hf->q_len--;
	hf->resp_expected = false;
	hf->resp_sent_any = false;
	hf->waiting_since = conn_clock_ms();
}

/* Stop taking requests: what is queued is answered, then the connection closes. */
static void stop_requests(struct conn *c)
{
	flow(c)->req_stopped = true;
	c->d[req_dir(c)].paused = true;
}

/* The front request is the proxy's to answer: queue the answer for the client. */
static int answer_front(struct conn *c)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[resp_dir(c)];
	struct req_entry *e = front(hf);
	size_t len;

	r->owned = local_response(e, e->local_status, e->local_reason, e->close_after, &len);
	if (!r->owned)
		return conn_close(c, CR_INTERNAL), -1;
	r->out = r->owned;
	r->out_len = len;
	e->status = e->local_status;
	e->bytes_out = len;
	if (e->close_after) {
		stop_requests(c);
		c->closing = true;
	}
	log_request(c, e);
	pop_front(hf);
	return 1;
}

/* ---- the request side -------------------------------------------------- */

/* Input of a direction not yet fed to its parser. */
static const char *pending(const struct relay_dir *r)
{
	return r->in ? r->in->data + r->in->off : "";
}

static size_t pending_len(const struct relay_dir *r)
{
	return r->in ? r->in->len - r->in->off : 0;
}

static struct req_entry *push_entry(struct conn *c, const struct http_head *h)
{
	struct httpflow *hf = flow(c);
	struct req_entry *e = &hf->q[(hf->q_first + hf->q_len) % HTTPFLOW_INFLIGHT];
	const char *rid = NULL;

	hf->q_len++;
	e->flags = h->req_flags;
	e->method = strdup(h->method ? h->method : "");
	e->path = strdup(h->path ? h->path : "");
	clock_gettime(CLOCK_MONOTONIC, &e->started);
	clock_gettime(CLOCK_REALTIME, &e->started_wall);
	/*
	 * Keep the caller's request ID when it sent one usable copy; otherwise
	 * ours replaces every copy, so the app and every log see the same ID.
	 */
	if (http_head_count(h, "x-request-id", &rid) != 1)
		rid = NULL;
	httpreq_request_id(c->w, rid, e->request_id, &e->replace_request_id);
	if (hf->q_len == 1)
		hf->waiting_since = conn_clock_ms();
	return e;
}

/* Inbound: the policy decides the request. Returns true to forward it. */
static bool decide(struct conn *c, struct req_entry *e, const struct http_head *h)
{
	struct httpreq_verdict v = { 0 };
	bool ok = httpreq_decide(c, h, &v);

	e->local_status = v.local_status;
	e->local_reason = v.local_reason;
	e->decided = v.decided;
	e->decision = v.decision;
	e->rule = v.rule;
	e->traffic_name = v.traffic_name;
	e->traffic_fault = v.traffic_fault;
	e->retry_after = v.retry_after;
	e->hold_until = v.delay_ms ? conn_clock_ms() + v.delay_ms : 0;
	return ok;
}

/*
 * h as it is forwarded (rw: the rewrites, or NULL) in a buffer of its own:
 * *out (malloc'd) and *len. Returns 0, or -1 with *out NULL. A head that
 * fits HEAD_STACK is serialised once, there, and copied: measuring first
 * and writing after made two passes over every field of every head.
 */
#define HEAD_STACK 4096

static int serialize_head(const struct http_head *h, const struct http_rewrite *rw, char **out,
                          size_t *len)
{
	char tmp[HEAD_STACK];
	int rc = http_head_serialize(h, rw, tmp, sizeof(tmp), len);

	*out = NULL;
	if ((rc < 0 && rc != -ENOSPC) || !(*out = malloc(*len)))
		return -1;
	if (rc == 0) {
		memcpy(*out, tmp, *len);
		return 0;
	}
	if (http_head_serialize(h, rw, *out, *len, len) == 0)
		return 0;
	free(*out);
	*out = NULL;
	return -1;
}

/* Serialises the head to forward, with our x-forwarded-client-cert and x-request-id. */
static int forward_head(struct conn *c, struct req_entry *e, const struct http_head *h)
{
	struct relay_dir *r = &c->d[req_dir(c)];
	char xfcc[2 * SPIFFE_ID_MAX + 16];
	/* The sidecars' own protocol field never reaches an app or a peer as sent. */
	struct http_rewrite_field set[3] = {
		{ "x-forwarded-client-cert", NULL },
		{ H2TO1_PROTO_FIELD, NULL },
		{ "x-request-id", e->request_id },
	};
	struct http_rewrite rw = { set, e->replace_request_id ? 3 : 2, NULL, 0 };
	size_t need = 0;

	/* Inbound sets it from the verified peer; outbound only strips the app's copy. */
	if (c->inbound) {
		httpreq_xfcc(c, xfcc, sizeof(xfcc));
		set[0].value = xfcc;
	}
	if (serialize_head(h, &rw, &r->owned, &need) < 0)
		return -1;
	r->out = r->owned;
	r->out_len = need;
	e->bytes_in += need;
	return 0;
}

/*
 * Inbound: the header limits (100 fields, 64 KiB) apply to what the client
 * sent, not counting one x-request-id line a proxy on the way added.
 */
static bool within_limits(const struct http_head *h)
{
	size_t fields = h->n_fields, bytes = 2;

	for (size_t i = 0; i < h->n_fields; i++)
		bytes += h->fields[i].name_len + h->fields[i].value_len + 4;
	if (http_head_count(h, "x-request-id", NULL) == 1) {
		for (size_t i = 0; i < h->n_fields; i++) {
			if (h->fields[i].name_len == 12 && !strncasecmp(h->fields[i].name, "x-request-id", 12)) {
				fields--;
				bytes -= h->fields[i].name_len + h->fields[i].value_len + 4;
				break;
			}
		}
	}
	return fields <= HTTP_DEFAULT_MAX_HEADERS && bytes <= HTTP_DEFAULT_MAX_HEADER_BYTES;
}

/*
 * A fault's delay: the serialised head waits in hf->held, and nothing more
 * of the request is read, until its hold_until (the client side's timer,
 * httpflow_due). No thread waits: the connection just has nothing to write.
 */
static void hold_head(struct conn *c)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[req_dir(c)];

	hf->held = r->owned;
	hf->held_len = r->out_len;
	r->owned = NULL;
	r->out = NULL;
	r->out_len = 0;
}

/* Returns true when no head is held (any more): the request side may go on. */
static bool release_held(struct conn *c)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[req_dir(c)];
	struct req_entry *e = hf->q_len ? last(hf) : NULL;

	if (!hf->held)
		return true;
	if (e && !e->local_status && e->hold_until && conn_clock_ms() < e->hold_until)
		return false;
	if (!e || e->local_status) {    /* answered meanwhile (the upstream went): never sent */
		free(hf->held);
	} else {
		e->hold_until = 0;
		r->owned = hf->held;
		r->out = hf->held;
		r->out_len = hf->held_len;
		if (hf->q_len == 1)
			hf->waiting_since = conn_clock_ms();
	}
	hf->held = NULL;
	return true;
}

static int pool_request(struct conn *c, struct req_entry *e, const struct http_head *h);
static bool pool_fits(const struct conn *c, const struct http_head *h);

static int on_request_head(struct conn *c, const struct http_head *h)
{
	struct httpflow *hf = flow(c);
	struct req_entry *e = push_entry(c, h);
	bool has_body = h->framing != HTTP_BODY_NONE;
	bool tunnel_ask = (h->req_flags & (HTTP_REQ_UPGRADE | HTTP_REQ_CONNECT)) != 0;

	hf->req_between = false;
	if (!e->method || !e->path)
		return conn_close(c, CR_INTERNAL), -1;
	if (c->inbound && !within_limits(h)) {
		e->local_status = 431;
		e->local_reason = "too many header fields or header block too large";
		e->close_after = true;
		hf->req_dropping = true;
		stop_requests(c);
		return 1;
	}
	if (c->inbound && !decide(c, e, h)) {
		/* A body we would have to read just to skip it, or a tunnel: answer and close. */
		e->close_after = has_body || tunnel_ask || !h->keep_alive ||
		                 (e->local_status != 403 && !e->traffic_name);
		hf->req_dropping = true;
		if (e->close_after)
			stop_requests(c);
		return 1;
	}
	if (c->detached && !tunnel_ask && pool_fits(c, h))
		return pool_request(c, e, h);
	/* A tunnel, or a head larger than an HTTP/2 stream between sidecars
	 * may carry: a connection of its own, as HTTP/1.1. */
	if (c->detached)
		conn_connect_upstream(c);
	if (forward_head(c, e, h) < 0) {
		e->local_status = 500;
		e->close_after = true;
		hf->req_dropping = true;
		stop_requests(c);
	} else if (e->hold_until) {
		hold_head(c);
	}
	return 1;
}

/* A request the parser refused: answer after what is queued, then close. */
static int on_request_error(struct conn *c, int status, const char *reason)
{
	struct httpflow *hf = flow(c);
	struct req_entry *e;

	log_info("conn %llu: bad request from %s: %d %s", (unsigned long long)c->id,
	         c->peer ? c->peer : "app", status, reason);
	if (hf->q_len && !hf->req_between && !last(hf)->complete && !last(hf)->local_status) {
		/*
		 * The body of a request already forwarded broke: the app holds half a
		 * request and cannot answer it. That request gets our error instead,
		 * and if nothing before it waits for the app, the app is done with.
		 */
		e = last(hf);
		e->local_status = status;
		e->local_reason = reason;
		e->close_after = true;
		stop_requests(c);
		if (e == front(hf) && !hf->resp_sent_any)
			c->d[resp_dir(c)].paused = true;
		return 1;
	}
	if (hf->q_len == HTTPFLOW_INFLIGHT)
		return conn_close(c, CR_RESET), -1;
	e = &hf->q[(hf->q_first + hf->q_len) % HTTPFLOW_INFLIGHT];
	hf->q_len++;
	clock_gettime(CLOCK_MONOTONIC, &e->started);
	clock_gettime(CLOCK_REALTIME, &e->started_wall);
	e->local_status = status;
	e->local_reason = reason;
	e->close_after = true;
	stop_requests(c);
	return 1;
}

/*
 * The request-head clock runs while a head is arriving, and before the
 * first request of a connection: a client must say what it wants within
 * request_head_ms (slowloris) of connecting, and each later head must be
 * whole within request_head_ms of its first byte. Between keep-alive
 * requests the idle timer rules instead.
 */
static bool head_clock_running(const struct conn *c)
{
	const struct httpflow *hf = flow(c);

	return !hf->req_stopped && !hf->tunnel && (hf->in_head || hf->requests == 0);
}

/* When the request head must be complete (conn_clock_ms() time), 0: no clock runs. */
static uint64_t head_due(const struct conn *c)
{
	return head_clock_running(c) ? flow(c)->head_started + c->snap->cfg->timeouts.request_head_ms
	                             : 0;
}

static bool head_too_slow(const struct conn *c, uint64_t now)
{
	uint64_t due = head_due(c);

	return due && now >= due;
}

/*
 * Before the first request: the HTTP/2 preface switches the connection to
 * h2flow (h2c prior knowledge from an app, h2 between sidecars). Returns
 * SNIFF_HTTP1 to go on as HTTP/1.1, or what produce returns: 0 to wait
 * for more bytes, or (after a switch, hf gone) h2flow's first produce.
 */
#define SNIFF_HTTP1 2

static int sniff(struct conn *c)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[req_dir(c)];
	int p = h2_is_preface(pending(r), pending_len(r));

	if (p < 0 && !r->src_eof) {
		r->need_more = pending_len(r) > 0;
		return 0;
	}
	if (p <= 0) {
		hf->sniffed = true;
		if (c->d[resp_dir(c)].src_eof && pending_len(r))
			return on_request_error(c, 502, "upstream closed the connection");
		if (c->inbound && c->snap->cfg->inbound[c->listener].app_protocol == APP_PROTO_H2C &&
		    pending_len(r))
			return on_request_error(c, 502, "app_protocol h2c cannot carry an HTTP/1.1 "
			                                "caller yet (needs the inbound pool)");
		return SNIFF_HTTP1;
	}
	if (conn_switch_proto(c, &h2flow_ops) < 0)
		return -1;
	return c->proto->produce(c, req_dir(c));
}

static bool pool_holds_requests(const struct httpflow *hf);
static bool pool_body_full(const struct httpflow *hf);
static void pool_body(struct conn *c, const char *data, size_t len);
static void pool_body_end(struct conn *c);

static int produce_request(struct conn *c)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[req_dir(c)];
	struct http_event ev;
	size_t used = 0;
	int rc;

	if (!hf->sniffed && (rc = sniff(c)) != SNIFF_HTTP1)
		return rc;
	if (hf->held && !release_held(c))
		return 0;
	if (r->out_len)
		return 1;    /* the head just released */
	if (hf->req_stopped || r->paused || hf->q_len == HTTPFLOW_INFLIGHT)
		return 0;
	if (c->detached && pool_holds_requests(hf))
		return 0;
	if (c->detached && pool_body_full(hf))
		return 0;    /* the stream takes it first (up_body kicks) */
	/* Fed even with no bytes left: a message may end exactly at the buffer's end. */
	ev = http_feed(&hf->req, pending(r), pending_len(r), &used);
	if (used)
		r->in->off += (uint32_t)used;
	switch (ev.type) {
	case HTTP_EV_NEED_MORE:
		if (used && hf->req_between) {
			hf->req_between = false;    /* a head has begun: its clock runs */
			hf->in_head = true;
			if (hf->requests > 0)       /* the first one's runs since connecting */
				hf->head_started = conn_clock_ms();
		}
		if (head_too_slow(c, conn_clock_ms()))
			return on_request_error(c, 408, "request head not complete in time");
		return used ? 1 : 0;
	case HTTP_EV_HEAD_COMPLETE:
		hf->requests++;
		hf->in_head = false;
		hf->req_between = false;
		return on_request_head(c, ev.head);
	case HTTP_EV_BODY:
		if (hf->req_dropping)
			return 1;
		if (c->detached) {
			if (!ev.framing)    /* chunk sizes and trailers stay here */
				pool_body(c, ev.data, ev.len);
			return 1;
		}
		r->out = ev.data;
		r->out_len = ev.len;
		if (hf->q_len)    /* an early response may have answered it already */
			last(hf)->bytes_in += ev.len;
		return 1;
	case HTTP_EV_MESSAGE_COMPLETE:
		if (c->detached && !hf->req_dropping)
			pool_body_end(c);
		hf->req_dropping = false;
		hf->req_between = true;
		if (hf->q_len && !last(hf)->complete) {
			last(hf)->complete = true;
			/* The response clock starts once the app has the whole request. */
			if (hf->q_len == 1)
				hf->waiting_since = conn_clock_ms();
		}
		return 1;
	case HTTP_EV_PAUSED:
		r->paused = true;    /* an upgrade: its response decides what comes next */
		return 1;
	case HTTP_EV_ERROR:
	default:
		return on_request_error(c, ev.status, ev.reason);
	}
}

/* ---- the response side ------------------------------------------------- */

static int forward_response_head(struct conn *c, const struct http_head *h)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[resp_dir(c)];
	struct req_entry *e = front(hf);
	struct http_rewrite_field close_it = { "connection", "close" };
	struct http_rewrite rw = { &close_it, 1, NULL, 0 };
	/* Draining: this is the connection's last response, and the client is told so. */
	const struct http_rewrite *rwp = hf->draining && h->status >= 200 && !h->tunnel ? &rw : NULL;
	size_t need = 0;

	if (serialize_head(h, rwp, &r->owned, &need) < 0)
		return conn_close(c, CR_INTERNAL), -1;
	r->out = r->owned;
	r->out_len = need;
	e->bytes_out += need;
	hf->resp_in_message = true;
	hf->resp_sent_any = true;
	if (h->status >= 200 || h->tunnel)
		e->status = h->status;
	if (h->tunnel) {
		hf->tunnel = true;
		http_resume(&hf->req, true);
		c->d[req_dir(c)].paused = false;
		log_request(c, e);    /* a tunnel has no end to log at: log its start */
		/* Its "no keep-alive" only means no more HTTP: nothing below applies. */
		return 1;
	} else if (h->status >= 200 && (e->flags & (HTTP_REQ_UPGRADE | HTTP_REQ_CONNECT))) {
		http_resume(&hf->req, false);
		if (!hf->req_stopped)
			c->d[req_dir(c)].paused = false;
	}
	if (h->status >= 200 && !h->keep_alive)
		hf->upstream_closing = true;
	if (h->status >= 200 && (!h->keep_alive || rwp)) {
		/* The app ends the connection after this response: take no more requests. */
		stop_requests(c);
	}
	return 1;
}

/* The upstream's response was malformed: 502 if nothing of it went out yet. */
static int on_response_error(struct conn *c, const char *reason)
{
	struct httpflow *hf = flow(c);
	struct req_entry *e = front(hf);

	log_warn("conn %llu: bad response from %s: %s", (unsigned long long)c->id,
	         conn_destination_text(c), reason);
	if (!e || hf->resp_sent_any)
		return conn_close(c, CR_RESET), -1;
	e->local_status = 502;
	e->local_reason = reason;
	e->close_after = true;
	return answer_front(c);
}

static int pool_produce(struct conn *c);

static int produce_response(struct conn *c)
{
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[resp_dir(c)];
	struct req_entry *e = front(hf);
	struct http_event ev;
	size_t used = 0;

	if (e && e->local_status && !hf->resp_in_message) {
		if (e->traffic_fault && e->hold_until > conn_clock_ms())
			return 0;    /* a delayed abort: answered at hold_until */
		return answer_front(c);
	}
	if (c->detached)
		return hf->sniffed ? pool_produce(c) : 0;
	/* An h2c app may speak first (its SETTINGS): kept until the client's
	 * preface says which protocol this is. */
	if (!hf->sniffed)
		return 0;
	if (!hf->resp_expected && !hf->tunnel) {
		if (pending_len(r) == 0)
			return 0;
		if (!e)
			return on_response_error(c, "response without a request");
		http_response_expect(&hf->resp, e->flags);
		hf->resp_expected = true;
	}
	ev = http_feed(&hf->resp, pending(r), pending_len(r), &used);
	if (used)
		r->in->off += (uint32_t)used;
	switch (ev.type) {
	case HTTP_EV_NEED_MORE:
		return used ? 1 : 0;
	case HTTP_EV_HEAD_COMPLETE:
		return forward_response_head(c, ev.head);
	case HTTP_EV_BODY:
		r->out = ev.data;
		r->out_len = ev.len;
		if (e)
			e->bytes_out += ev.len;
		return 1;
	case HTTP_EV_MESSAGE_COMPLETE:
		hf->resp_in_message = false;
		if (hf->tunnel)
			return 1;    /* the head of a 2xx to CONNECT: logged when it went out */
		if (e && e->status >= 200) {
			log_request(c, e);
			pop_front(hf);
		}
		/* Draining: the connection ends with its last answered request. */
		if (hf->draining && hf->q_len == 0)
			stop_requests(c);
		if (hf->req_stopped && hf->q_len == 0)
			c->closing = true;
		return 1;
	case HTTP_EV_ERROR:
	default:
		return on_response_error(c, ev.reason);
	}
}

static int httpflow_produce(struct conn *c, int d)
{
	return d == req_dir(c) ? produce_request(c) : produce_response(c);
}

/* ---- requests over the pool between sidecars (outbound, detached) -------- */

/*
 * An outbound http connection has no upstream of its own (conn.c
 * detached_start): each request, parsed and checked as above, becomes an
 * HTTP/2 stream on the worker's pool (upool.c), one at a time, and its
 * response comes back as HTTP/1.1 (h2to1.c: one framing, chosen once).
 * Pipelined requests wait in the socket until the one before is answered.
 * The request body is held at most POOL_BODY_MAX ahead of the stream's
 * window; the response at most the stream's window (reopened as the bytes
 * are written to the client).
 */
#define POOL_BODY_MAX 65536
#define POOL_PIECE 16384
#define POOL_NV_MAX (HTTP_DEFAULT_MAX_HEADERS + 8)

struct h1up {
	struct conn *c;
	struct upool_req *req;         /* NULL once the pool ended it */
	struct bytequeue body, resp;   /* the request body read ahead, the response content */
	bool body_end;                 /* the whole request body was parsed */
	bool continue_due;             /* "100 Continue" owed to the client */
	char *head;                    /* the response head, not yet written */
	size_t head_len;
	enum h2to1_framing framing;
	bool head_made, ended, resp_end, last_chunk_sent;
	int failed;                    /* ended before a head: 502/503/504 */
	const char *why;
};

/* The pooled request is over for us: cancelled if still running, freed. */
static void pool_abort(struct httpflow *hf)
{
	struct h1up *up = hf->up;

	if (!up)
		return;
	if (up->req)
		upool_cancel(up->req);
	bq_clear(&up->body);
	bq_clear(&up->resp);
	free(up->head);
	free(up);
	hf->up = NULL;
}

static bool pool_holds_requests(const struct httpflow *hf)
{
	/* One at a time: the next head is parsed once this one is answered. */
	return hf->q_len && front((struct httpflow *)hf)->complete;
}

static bool pool_body_full(const struct httpflow *hf)
{
	return hf->up && hf->up->body.len >= POOL_BODY_MAX;
}

static size_t up_body(void *ctx, uint8_t *buf, size_t cap, bool *end)
{
	struct h1up *up = ctx;
	size_t n = bq_take(&up->body, buf, cap);

	*end = up->body_end && !up->body.len;
	if (n)
		conn_kick(up->c);    /* room for more of the body */
	return n;
}

static bool up_head(void *ctx, const nghttp2_nv *nv, size_t n, bool end)
{
	struct h1up *up = ctx;
	struct httpflow *hf = flow(up->c);
	struct req_entry *e = front(hf);
	bool close = hf->client_close || hf->draining;
	size_t len = 0;

	if (!e || up->head_made)
		return false;
	if (h2to1_response_head(nv, n, e->flags, end, close, NULL, 0, &len, &up->framing) != -ENOSPC ||
	    !(up->head = malloc(len)) ||
	    h2to1_response_head(nv, n, e->flags, end, close, up->head, len, &len, &up->framing) < 0) {
		log_warn("conn %llu: response from %s cannot be carried as HTTP/1.1",
		         (unsigned long long)up->c->id, conn_destination_text(up->c));
		free(up->head);
		up->head = NULL;
		return false;
	}
	for (size_t i = 0; i < n; i++)
		if (nv[i].namelen == 7 && !memcmp(nv[i].name, ":status", 7))
			e->status = atoi((const char *)nv[i].value);
	up->head_len = len;
	up->head_made = true;
	up->continue_due = false;    /* the final answer came first: no interim one */
	conn_kick(up->c);
	return true;
}

static void up_data(void *ctx, const uint8_t *data, size_t len)
{
	struct h1up *up = ctx;

	if (up->framing == H2TO1_NO_BODY ||
	    bq_add(&up->resp, data, len) < 0) {
		upool_consume(up->req, len);    /* nothing to carry it: dropped */
		return;
	}
	conn_kick(up->c);
}

static void up_end(void *ctx, int status, uint32_t code, const char *why)
{
	struct h1up *up = ctx;

	up->req = NULL;
	up->ended = true;
	up->resp_end = status == 0;
	if (status) {
		up->failed = status;
		up->why = why;
		log_info("conn %llu: pooled request to %s ended: %s (%u)", (unsigned long long)up->c->id,
		         conn_destination_text(up->c), why, code);
	}
	conn_kick(up->c);
}

static const struct upool_owner_ops up_ops = {
	.body = up_body, .head = up_head, .data = up_data, .end = up_end,
};

static struct upool *pool_of(struct conn *c)
{
	struct worker *w = c->w;

	if (c->listener >= w->n_upools)
		return NULL;
	if (!w->upools[c->listener])
		w->upools[c->listener] = upool_new(w, c->listener);
	return w->upools[c->listener];
}

/*
 * Whether h's header list, as the next sidecar's HTTP/2 session counts it
 * (name + value + 32 per field, RFC 9113 6.5.2), stays within
 * http2.max_header_list_bytes with the fields the sidecars add: a larger
 * one would end the whole pooled connection (GOAWAY), not just its stream.
 */
static bool pool_fits(const struct conn *c, const struct http_head *h)
{
	size_t bytes = 4 * 32 + 512 + strlen(h->method) + strlen(h->path) +
	               (h->query ? strlen(h->query) + 1 : 0) +
	               (h->authority ? strlen(h->authority) : h->host ? strlen(h->host) : 0);

	for (size_t i = 0; i < h->n_fields; i++)
		bytes += h->fields[i].name_len + h->fields[i].value_len + 32;
	return bytes <= c->snap->cfg->http2.max_header_list_bytes && h->n_fields + 8 <= POOL_NV_MAX;
}

static bool wants_continue(const struct http_head *h)
{
	const char *v = NULL;

	return http_head_count(h, "expect", &v) == 1 && v && !strcasecmp(v, "100-continue");
}

/* The request as a stream on the pool; refused ones are answered by us. */
static int pool_request(struct conn *c, struct req_entry *e, const struct http_head *h)
{
	struct httpflow *hf = flow(c);
	nghttp2_nv nv[POOL_NV_MAX];
	size_t n = 0, cap = 256 + strlen(h->path) + (h->query ? strlen(h->query) : 0);
	struct upool *pool = pool_of(c);
	char *buf;
	int rc;

	for (size_t i = 0; i < h->n_fields; i++)
		cap += h->fields[i].name_len;
	hf->client_close = !h->keep_alive;
	if (!pool || !(hf->up = calloc(1, sizeof(*hf->up))) || !(buf = malloc(cap))) {
		e->local_status = 500;
		e->local_reason = "out of memory";
	} else {
		hf->up->c = c;
		rc = h1to2_request_nv(h, e->replace_request_id ? e->request_id : NULL, nv, POOL_NV_MAX,
		                      &n, buf, cap);
		for (size_t i = 0; rc == 0 && i < n; i++)
			e->bytes_in += nv[i].namelen + nv[i].valuelen + 4;    /* the head, as HTTP/1.1 counts it */
		if (rc == 0) {
			hf->up->req = upool_submit(pool, c->snap, nv, n, h->framing != HTTP_BODY_NONE,
			                           &up_ops, hf->up);
			e->overloaded = !hf->up->req && errno == EBUSY;
		}
		free(buf);
		if (rc < 0) {
			e->local_status = 400;
			e->local_reason = "request cannot be carried between sidecars";
		} else if (!hf->up->req) {
			e->local_status = 503;
			e->local_reason = "too many requests waiting for the upstream";
		}
	}
	if (!e->local_status) {
		hf->up->continue_due = wants_continue(h);
		return 1;
	}
	pool_abort(hf);
	/* A body we would have to read just to skip it: answer and close. */
	e->close_after = h->framing != HTTP_BODY_NONE || !h->keep_alive;
	hf->req_dropping = true;
	if (e->close_after)
		stop_requests(c);
	return 1;
}

static void pool_body(struct conn *c, const char *data, size_t len)
{
	struct httpflow *hf = flow(c);
	struct h1up *up = hf->up;

	if (hf->q_len)
		last(hf)->bytes_in += len;
	if (!up || up->ended)
		return;    /* answered already: the rest is dropped */
	if (bq_add(&up->body, data, len) < 0) {
		upool_cancel(up->req);
		up_end(up, 502, 0, "out of memory");
		return;
	}
	if (up->req)
		upool_resume(up->req);
}

static void pool_body_end(struct conn *c)
{
	struct h1up *up = flow(c)->up;

	if (!up)
		return;
	up->body_end = true;
	if (up->req)
		upool_resume(up->req);
}

/* Sets d's output to len bytes of buf (owned). */
static int put_out(struct relay_dir *r, char *buf, size_t len)
{
	r->owned = buf;
	r->out = buf;
	r->out_len = len;
	return 1;
}

/* The next piece of the response body, chunk-framed when it must be. */
static int pool_body_out(struct conn *c, struct h1up *up, struct req_entry *e)
{
	char *buf = malloc(POOL_PIECE + 32);
	size_t hlen = 0, n;

	if (!buf)
		return conn_close(c, CR_INTERNAL), -1;
	if (up->framing == H2TO1_CHUNKED)
		hlen = h2to1_chunk_header(up->resp.len < POOL_PIECE ? up->resp.len : POOL_PIECE,
		                          buf);
	n = bq_take(&up->resp, buf + hlen, POOL_PIECE);
	if (up->framing == H2TO1_CHUNKED) {
		memcpy(buf + hlen + n, "\r\n", 2);
		hlen += 2;
	}
	if (up->req)
		upool_consume(up->req, n);
	e->bytes_out += n + hlen;
	return put_out(&c->d[resp_dir(c)], buf, n + hlen);
}

/* The response ended: logged, and the next request may be read. */
static int pool_finish(struct conn *c, struct req_entry *e)
{
	struct httpflow *hf = flow(c);
	bool whole = e->complete;

	log_request(c, e);
	pop_front(hf);
	pool_abort(hf);
	hf->resp_in_message = false;
	/* Answered before the request was all read (413 and the like): the
	 * rest of it cannot be told from a next request. */
	if (!whole) {
		hf->req_dropping = true;
		stop_requests(c);
	}
	if (hf->client_close || hf->draining)
		stop_requests(c);
	if (hf->req_stopped && hf->q_len == 0)
		c->closing = true;
	return 1;
}

static int pool_produce(struct conn *c)
{
	static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
	struct httpflow *hf = flow(c);
	struct relay_dir *r = &c->d[resp_dir(c)];
	struct req_entry *e = front(hf);
	struct h1up *up = hf->up;

	if (!up || !e)
		return 0;
	if (up->continue_due) {
		up->continue_due = false;
		r->out = cont;
		r->out_len = sizeof(cont) - 1;
		return 1;
	}
	if (up->head) {
		put_out(r, up->head, up->head_len);
		e->bytes_out += up->head_len;
		up->head = NULL;
		hf->resp_in_message = true;
		hf->resp_sent_any = true;
		return 1;
	}
	if (up->failed && !hf->resp_sent_any) {
		/* Nothing of a response went out: ours instead (502, 503, 504). */
		e->local_status = up->failed;
		e->local_reason = up->why;
		e->close_after = !e->complete;
		if (!e->complete)
			hf->req_dropping = true;
		pool_abort(hf);
		return answer_front(c);
	}
	if (up->failed) {
		/* Cut short after its head: only closing tells the client. */
		e->status = e->status ? e->status : 502;
		log_request(c, e);
		pop_front(hf);
		return conn_close(c, CR_RESET), -1;
	}
	if (up->resp.len)
		return pool_body_out(c, up, e);
	if (!up->ended || !up->resp_end || !up->head_made)
		return 0;
	if (up->framing == H2TO1_CHUNKED && !up->last_chunk_sent) {
		up->last_chunk_sent = true;
		r->out = "0\r\n\r\n";
		r->out_len = 5;
		e->bytes_out += 5;
		return 1;
	}
	return pool_finish(c, e);
}

/* ---- end of stream, timers, early failures ----------------------------- */

/* The upstream is gone: requests it never answered get a 502 from us. */
static void fail_unanswered(struct conn *c)
{
	struct httpflow *hf = flow(c);

	/*
	 * The app announced the close: what it never saw was never processed.
	 * Closing without an answer lets the client retry them (RFC 9112 9.3.2).
	 */
	while (hf->upstream_closing && hf->q_len && !hf->resp_sent_any)
		pop_front(hf);
	pool_abort(hf);

	for (size_t i = 0; i < hf->q_len; i++) {
		struct req_entry *e = &hf->q[(hf->q_first + i) % HTTPFLOW_INFLIGHT];

		if (!e->local_status && !(i == 0 && hf->resp_sent_any)) {
			e->local_status = 502;
			e->local_reason = "upstream closed the connection";
		}
		e->close_after = true;
	}
	stop_requests(c);
	c->d[resp_dir(c)].paused = true;    /* nothing more from the upstream is relayed */
	c->closing = true;
}

static int httpflow_eof(struct conn *c, int d)
{
	struct httpflow *hf = flow(c);
	struct http_event ev;

	if (hf->tunnel)
		return 0;
	if (!hf->sniffed && d == resp_dir(c)) {
		/* Which protocol tells the client is not known yet: held (sniff). */
		c->d[d].dst_shut = true;
		return 0;
	}
	if (d == req_dir(c)) {
		/* The caller went away while its request was delayed: nothing was sent. */
		if (hf->held)
			return conn_close(c, CR_RESET), -1;
		ev = http_finish(&hf->req);
		/* A request cut short cannot be answered: its head may be upstream already. */
		if (ev.type == HTTP_EV_ERROR && !hf->req_between)
			return conn_close(c, CR_RESET), -1;
		if (hf->q_len || c->detached)
			c->closing = true;    /* answer what was asked, then close */
		return 0;
	}
	ev = http_finish(&hf->resp);
	if (ev.type == HTTP_EV_MESSAGE_COMPLETE && front(hf)) {
		front(hf)->status = front(hf)->status ? front(hf)->status : 200;
		log_request(c, front(hf));
		pop_front(hf);
		hf->resp_in_message = false;
	} else if (ev.type == HTTP_EV_ERROR && hf->resp_sent_any) {
		return conn_close(c, CR_RESET), -1;
	}
	hf->resp_in_message = false;
	if (hf->q_len)
		fail_unanswered(c);
	/* Reset (conn.c upstream_lost): no more requests; idle, it closes now. */
	if (c->d[req_dir(c)].dst_shut) {
		stop_requests(c);
		if (hf->q_len == 0)
			c->closing = true;
	}
	/* No more requests are read (connection: close): nothing keeps it open now. */
	if (hf->req_stopped && hf->q_len == 0)
		c->closing = true;
	return 0;
}

/* The front request waits for its response head from the upstream. */
static bool awaiting_response(const struct httpflow *hf)
{
	const struct req_entry *e = hf->q_len ? &hf->q[hf->q_first] : NULL;

	return e && e->complete && !e->local_status && !hf->resp_sent_any && !hf->tunnel;
}

/* When the response head must have come (conn_clock_ms() time), 0: none awaited. */
static uint64_t response_due(const struct conn *c)
{
	const struct httpflow *hf = flow(c);

	/* Detached, the pool times each attempt of the request (request_seconds). */
	if (c->detached || !awaiting_response(hf))
		return 0;
	return hf->waiting_since + conn_pick_request_ms(c);
}

/* The first end of a fault's delay among the queued requests, 0: none. */
static uint64_t hold_due(const struct conn *c)
{
	const struct httpflow *hf = flow(c);
	uint64_t due = 0;

	for (size_t i = 0; i < hf->q_len; i++) {
		const struct req_entry *e = &hf->q[(hf->q_first + i) % HTTPFLOW_INFLIGHT];

		if (e->hold_until && (!due || e->hold_until < due))
			due = e->hold_until;
	}
	return due;
}

/* The request head's deadline (and a fault's delay) on the client's side,
 * the response head's on the upstream's. */
static uint64_t httpflow_due(const struct conn *c, bool tls_side)
{
	bool client_side = tls_side == c->inbound;
	uint64_t head, hold;

	if (!client_side)
		return response_due(c);
	head = head_due(c);
	hold = c->inbound ? hold_due(c) : 0;
	return !hold || (head && head < hold) ? head : hold;
}

/*
 * Relaying begins. On an inbound connection the first request's head clock
 * starts now, after the mTLS handshake and the connect to the app, not at
 * accept: the calling sidecar started its own clock when its client
 * connected, before it connected here, so it is the one that answers a
 * slow client 408, rather than this side closing the mesh connection
 * under it a moment earlier.
 */
static void httpflow_start(struct conn *c)
{
	/* Detached, a body goes as DATA: chunk framing is told apart from content. */
	http_split_chunks(&flow(c)->req, c->detached);
	if (c->inbound && flow(c)->requests == 0 && !flow(c)->in_head)
		flow(c)->head_started = conn_clock_ms();
}

static bool httpflow_done(const struct conn *c)
{
	return flow(c)->q_len == 0;
}

static bool httpflow_on_timeout(struct conn *c, uint64_t now)
{
	struct httpflow *hf = flow(c);
	struct req_entry *e = front(hf);
	uint64_t due = response_due(c), hold = c->inbound ? hold_due(c) : 0;

	if (hold && now >= hold) {
		/* Delays over: their heads go upstream, their aborts answer (when
		 * the relay gets there; cleared now, so the timer does not spin). */
		for (size_t i = 0; i < hf->q_len; i++) {
			struct req_entry *h = &hf->q[(hf->q_first + i) % HTTPFLOW_INFLIGHT];

			if (h->hold_until && h->hold_until <= now)
				h->hold_until = 0;
		}
		conn_kick(c);
		return true;
	}
	if (due && now >= due) {
		log_warn("conn %llu: no response from %s within %u ms", (unsigned long long)c->id,
		         conn_destination_text(c), conn_pick_request_ms(c));
		e->local_status = 504;
		e->local_reason = "upstream timed out";
		fail_unanswered(c);
		conn_kick(c);
		return true;
	}
	if (!head_too_slow(c, now))
		return false;
	if (hf->req_between) {
		conn_close(c, CR_IDLE_TIMEOUT);    /* connected, never asked anything */
		return true;
	}
	/* Slowloris: a head that never completes. Nothing of it was forwarded. */
	if (on_request_error(c, 408, "request head not complete in time") > 0)
		conn_kick(c);
	return true;
}

/* Answers the client with status (502, 504) as best it can, logs it as a
 * request, and closes. */
static void httpflow_fail_early(struct conn *c, int status, enum conn_reason reason)
{
	struct req_entry e = { 0 };
	size_t len = 0;
	char *resp;

	clock_gettime(CLOCK_MONOTONIC, &e.started);
	clock_gettime(CLOCK_REALTIME, &e.started_wall);
	resp = local_response(NULL, status, status == 504 ? "upstream timed out" :
	                      "upstream unavailable", true, &len);
	if (resp) {
		conn_write_client_now(c, resp, len);
		free(resp);
	}
	e.status = status;
	e.bytes_out = len;
	log_request(c, &e);
	conn_close(c, reason);
}

const struct conn_proto_ops httpflow_ops = {
	.name = "http/1.1",
	.per_request_policy = true,
	.answers_after_reset = true,
	.init = httpflow_new,
	.release = httpflow_free,
	.start = httpflow_start,
	.produce = httpflow_produce,
	.eof = httpflow_eof,
	.due = httpflow_due,
	.on_timeout = httpflow_on_timeout,
	.fail_early = httpflow_fail_early,
	.drain = httpflow_drain,
	.shrink = httpflow_shrink,
	.done = httpflow_done,
	.logged = httpflow_logged,
};
