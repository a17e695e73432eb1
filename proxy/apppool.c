/* apppool: HTTP/1.1 connections to a local app, shared by HTTP/2 streams (see apppool.h). */
#include "apppool.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include "meshlet/log.h"

#define READ_BUF 16384
#define BODY_PIECE 16384
#define PIECE_CAP (BODY_PIECE + 32)   /* a piece with its chunk header and CRLFs */

struct appconn {
	struct appconn *prev, *next;
	struct apppool *p;
	int fd;
	struct event *ev;
	bool connected;
	bool paused;               /* the owner takes no more response: not reading */
	bool idle;                 /* connected, no request: counted in n_idle */
	struct apppool_req *req;   /* the request it carries, or NULL: idle */
	struct http_parser_state parser;
	char in[READ_BUF];
	size_t in_off, in_len;
};

struct apppool_req {
	struct apppool_req *prev, *next;    /* the queue, while waiting */
	struct apppool *p;
	struct appconn *ac;                 /* the connection carrying it, or NULL */
	const struct apppool_owner_ops *ops;
	void *ctx;
	char *out;                          /* the head, then one framed body piece at a time */
	size_t out_off, out_len;
	enum h2to1_framing framing;
	unsigned req_flags;
	bool body_done;                     /* the owner gave all of its body */
	bool starved;                       /* the owner had no body bytes: wait for resume */
	bool write_broken;                  /* the app stopped taking the request: no reuse */
	bool head_sent;                     /* the whole request head reached the socket */
	bool answered;                      /* the response head arrived */
	bool keep_alive;
	uint64_t queued_at;
};

struct apppool {
	struct event_base *base;
	struct config_addr app;
	struct apppool_limits lim;
	struct appconn *conns;
	unsigned n_conns, n_idle;
	struct apppool_req *queue, *queue_tail;
	unsigned n_queued;
	struct event *timer;                /* queue deadlines */
	uint64_t opened;
};

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void conn_event(evutil_socket_t fd, short what, void *arg);
static void dispatch(struct apppool *p);

/* ---- connections -------------------------------------------------------- */

/* Registers ac for what it waits on now; idle ones with the idle timeout. */
static void arm(struct appconn *ac)
{
	struct apppool_req *r = ac->req;
	short what = 0;
	struct timeval tv = { 0, 0 }, *tvp = NULL;
	uint32_t ms = 0;

	if (!ac->connected) {
		what = EV_WRITE;
		ms = ac->p->lim.connect_ms;
	} else {
		if (!ac->paused)
			what |= EV_READ;
		if (r && (r->out_off < r->out_len || (!r->body_done && !r->starved)))
			what |= EV_WRITE;
		if (!r)
			ms = ac->p->lim.idle_ms;
	}
	if (ms) {
		tv.tv_sec = ms / 1000;
		tv.tv_usec = (ms % 1000) * 1000;
		tvp = &tv;
	}
	event_del(ac->ev);
	event_assign(ac->ev, ac->p->base, ac->fd, what, conn_event, ac);
	event_add(ac->ev, tvp);
}

static void set_idle(struct appconn *ac, bool idle)
{
	if (ac->idle != idle)
		ac->p->n_idle = idle ? ac->p->n_idle + 1 : ac->p->n_idle - 1;
	ac->idle = idle;
}

static void conn_free(struct appconn *ac)
{
	struct apppool *p = ac->p;

	if (ac->prev)
		ac->prev->next = ac->next;
	else
		p->conns = ac->next;
	if (ac->next)
		ac->next->prev = ac->prev;
	p->n_conns--;
	set_idle(ac, false);
	event_free(ac->ev);
	close(ac->fd);
	http_cleanup(&ac->parser);
	free(ac);
}

static void req_free(struct apppool_req *r)
{
	free(r->out);
	free(r);
}

/* r's owner is told how it ended; r is freed and its connection left without it. */
static void req_end(struct apppool_req *r, int status, const char *why)
{
	if (r->ac)
		r->ac->req = NULL;
	r->ops->end(r->ctx, status, why);
	req_free(r);
}

/* ac failed or must go: its request (if any) ends with status, then ac closes. */
static void conn_fail(struct appconn *ac, int status, const char *why)
{
	struct apppool *p = ac->p;

	if (ac->req) {
		log_info("app %s: %s", p->app.text, why);
		req_end(ac->req, status, why);
	}
	conn_free(ac);
	dispatch(p);
}

static struct appconn *conn_open(struct apppool *p)
{
	struct appconn *ac = calloc(1, sizeof(*ac));
	int one = 1;

	if (!ac)
		return NULL;
	ac->p = p;
	ac->fd = socket(p->app.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (ac->fd < 0 || !(ac->ev = event_new(p->base, -1, 0, conn_event, ac)) ||
	    (connect(ac->fd, (const struct sockaddr *)&p->app.ss, p->app.len) < 0 &&
	     errno != EINPROGRESS)) {
		if (ac->fd >= 0)
			close(ac->fd);
		if (ac->ev)
			event_free(ac->ev);
		free(ac);
		return NULL;
	}
	setsockopt(ac->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	http_response_init(&ac->parser, NULL);
	http_split_chunks(&ac->parser, true);
	ac->next = p->conns;
	if (p->conns)
		p->conns->prev = ac;
	p->conns = ac;
	p->n_conns++;
	p->opened++;
	return ac;
}

/* r starts on ac (idle or just opened). */
static void assign(struct appconn *ac, struct apppool_req *r)
{
	set_idle(ac, false);
	ac->req = r;
	r->ac = ac;
	ac->paused = false;
	http_response_expect(&ac->parser, r->req_flags);
	arm(ac);
}

/* ---- the queue ---------------------------------------------------------- */

static void queue_remove(struct apppool *p, struct apppool_req *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		p->queue = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		p->queue_tail = r->prev;
	r->prev = r->next = NULL;
	p->n_queued--;
}

static void arm_timer(struct apppool *p)
{
	struct timeval tv;
	uint64_t due, now = now_ms();

	if (!p->queue) {
		event_del(p->timer);
		return;
	}
	due = p->queue->queued_at + p->lim.queue_ms;
	due = due > now ? due - now : 0;
	tv.tv_sec = (time_t)(due / 1000);
	tv.tv_usec = (suseconds_t)(due % 1000) * 1000;
	event_add(p->timer, &tv);
}

/* Gives waiting requests an idle connection, or a new one under the cap. */
static void dispatch(struct apppool *p)
{
	while (p->queue) {
		struct appconn *ac = NULL;

		for (struct appconn *c = p->conns; c && !ac; c = c->next)
			if (c->idle)
				ac = c;
		if (!ac && (p->n_conns >= p->lim.max_conns || !(ac = conn_open(p))))
			break;
		struct apppool_req *r = p->queue;

		queue_remove(p, r);
		assign(ac, r);
	}
	/* Nothing open and nothing can be opened: the waiting cannot be served. */
	if (p->queue && p->n_conns == 0)
		event_active(p->timer, EV_TIMEOUT, 0);
	else
		arm_timer(p);
}

static void queue_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct apppool *p = arg;
	uint64_t now = now_ms();

	(void)fd;
	(void)what;
	dispatch(p);
	while (p->queue && (p->n_conns == 0 || now >= p->queue->queued_at + p->lim.queue_ms)) {
		struct apppool_req *r = p->queue;

		queue_remove(p, r);
		if (p->n_conns == 0)
			req_end(r, 502, "app unreachable");
		else
			req_end(r, 503, "app busy: no connection to it in time");
	}
	arm_timer(p);
}

/* ---- writing ------------------------------------------------------------ */

/* Pulls the next body piece from the owner, framed. Returns false when none now. */
static bool next_piece(struct apppool_req *r)
{
	char body[BODY_PIECE], hdr[20];
	bool end = false;
	size_t n, h = 0;

	r->head_sent = true;    /* the head was out's first content */
	if (r->body_done)
		return false;
	n = r->ops->body(r->ctx, body, sizeof(body), &end);
	r->starved = !n && !end;
	if (r->starved)
		return false;
	r->out_off = r->out_len = 0;
	if (r->framing == H2TO1_CHUNKED && n) {
		h = h2to1_chunk_header(n, hdr);
		memcpy(r->out, hdr, h);
	}
	memcpy(r->out + h, body, n);
	r->out_len = h + n;
	if (r->framing == H2TO1_CHUNKED && n) {
		memcpy(r->out + r->out_len, "\r\n", 2);
		r->out_len += 2;
	}
	if (end) {
		r->body_done = true;
		if (r->framing == H2TO1_CHUNKED) {
			memcpy(r->out + r->out_len, "0\r\n\r\n", 5);
			r->out_len += 5;
		}
	}
	return true;
}

/* Writes what r has for the app. Returns 0, or -1 when ac failed (and is gone). */
static int conn_write(struct appconn *ac)
{
	struct apppool_req *r = ac->req;

	while (r) {
		if (r->out_off == r->out_len && !next_piece(r))
			return 0;
		if (r->out_off == r->out_len)
			continue;    /* an empty last piece of a length-framed body */
		ssize_t n = send(ac->fd, r->out + r->out_off, r->out_len - r->out_off, MSG_NOSIGNAL);

		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		if (n < 0) {
			/* The app stopped reading (it may have answered already, e.g.
			 * 413 and close): the rest of the body is not sent, and the
			 * read side decides between its answer and a 502. */
			r->write_broken = true;
			r->body_done = true;
			r->out_off = r->out_len = 0;
			return 0;
		}
		r->out_off += (size_t)n;
	}
	return 0;
}

/* ---- reading ------------------------------------------------------------ */

/*
 * True when the app already sent more than the response it owed, or
 * closed: bytes after a framed response (a HEAD answered with a body, a
 * body longer than its length) would otherwise be read as the next
 * request's response, perhaps another caller's.
 */
static bool stray_pending(const struct appconn *ac)
{
	char b;

	if (ac->in_off != ac->in_len)
		return true;
	return recv(ac->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 ||
	       (errno != EAGAIN && errno != EWOULDBLOCK);
}

/* The response ended: the owner is told, ac carries the next request or idles. */
static int response_done(struct appconn *ac)
{
	struct apppool *p = ac->p;
	struct apppool_req *r = ac->req;
	/* Not after a HEAD: an app that answers HEAD with a body (a classic
	 * desync) may send it a moment later, when the connection already
	 * carries the next request, and its bytes would read as that answer. */
	bool reuse = r->keep_alive && r->body_done && !r->write_broken &&
	             !(r->req_flags & HTTP_REQ_HEAD) && r->out_off == r->out_len &&
	             !stray_pending(ac);

	req_end(r, 0, NULL);
	if (!reuse) {
		conn_free(ac);
		dispatch(p);
		return -1;
	}
	set_idle(ac, true);
	dispatch(p);
	if (!ac->req)
		arm(ac);
	return 0;
}

/* Parses what ac read. Returns 0, or -1 when ac is gone. */
static int conn_parse(struct appconn *ac)
{
	/* No app answers a request whose head it has not had: such bytes were
	 * left over from the response before (stray bytes that came late). */
	if (ac->req && !ac->req->head_sent && ac->in_off < ac->in_len) {
		conn_fail(ac, 502, "app sent bytes before the request reached it");
		return -1;
	}
	while (ac->req && !ac->paused) {
		struct apppool_req *r = ac->req;
		size_t used = 0;
		struct http_event ev = http_feed(&ac->parser, ac->in + ac->in_off,
		                                 ac->in_len - ac->in_off, &used);

		ac->in_off += used;
		switch (ev.type) {
		case HTTP_EV_NEED_MORE:
			return 0;
		case HTTP_EV_HEAD_COMPLETE:
			if (ev.head->status < 200)
				break;    /* interim: the final head follows */
			if (ev.head->tunnel) {
				conn_fail(ac, 502, "app switched protocols");
				return -1;
			}
			r->answered = true;
			r->keep_alive = ev.head->keep_alive;
			if (!r->ops->head(r->ctx, ev.head)) {
				conn_fail(ac, 502, "app's response head cannot be passed on");
				return -1;
			}
			break;
		case HTTP_EV_BODY:
			if (!ev.framing && ev.len && !r->ops->data(r->ctx, ev.data, ev.len))
				ac->paused = true;
			break;
		case HTTP_EV_MESSAGE_COMPLETE:
			if (r->answered && response_done(ac) < 0)
				return -1;
			break;
		default:
			conn_fail(ac, 502, ev.reason ? ev.reason : "bad response from the app");
			return -1;
		}
	}
	if (!ac->req && ac->in_off < ac->in_len) {
		conn_fail(ac, 502, "app sent bytes nobody asked for");
		return -1;
	}
	return 0;
}

/* The app closed its side: a close-delimited response ends, anything else fails. */
static void conn_eof(struct appconn *ac)
{
	struct http_event ev;

	if (!ac->req) {
		conn_fail(ac, 502, "closed");
		return;
	}
	ev = http_finish(&ac->parser);
	if (ev.type == HTTP_EV_MESSAGE_COMPLETE && ac->req->answered) {
		ac->req->keep_alive = false;
		response_done(ac);
		return;
	}
	conn_fail(ac, 502, "app closed the connection mid-response");
}

static int conn_read(struct appconn *ac)
{
	/* What was held while the owner was full goes first, then room is made. */
	if (ac->req && !ac->paused && ac->in_off < ac->in_len && conn_parse(ac) < 0)
		return -1;
	if (ac->in_off == ac->in_len) {
		ac->in_off = ac->in_len = 0;
	} else if (ac->in_off) {
		memmove(ac->in, ac->in + ac->in_off, ac->in_len - ac->in_off);
		ac->in_len -= ac->in_off;
		ac->in_off = 0;
	}
	while (ac->in_len < sizeof(ac->in) && !ac->paused) {
		ssize_t n = recv(ac->fd, ac->in + ac->in_len, sizeof(ac->in) - ac->in_len, 0);

		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		if (n <= 0) {
			if (conn_parse(ac) < 0)
				return -1;
			conn_eof(ac);
			return -1;
		}
		ac->in_len += (size_t)n;
		if (conn_parse(ac) < 0)
			return -1;
		if (ac->in_off == ac->in_len)
			ac->in_off = ac->in_len = 0;
		else if (!ac->paused && ac->req)
			return 0;    /* head partial: keep it; the next read appends */
	}
	return 0;
}

static void conn_connected(struct appconn *ac)
{
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(ac->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
		conn_fail(ac, 502, "app refused the connection");
		return;
	}
	ac->connected = true;
	if (!ac->req)
		set_idle(ac, true);
	arm(ac);
}

static void conn_event(evutil_socket_t fd, short what, void *arg)
{
	struct appconn *ac = arg;

	(void)fd;
	if (!ac->connected) {
		if (what & EV_TIMEOUT)
			conn_fail(ac, 502, "app did not accept the connection in time");
		else
			conn_connected(ac);
		return;
	}
	if ((what & EV_TIMEOUT) && !ac->req) {
		conn_fail(ac, 0, "idle");    /* the idle timeout: nobody to tell */
		return;
	}
	if ((what & EV_WRITE) && conn_write(ac) < 0)
		return;
	if (what & EV_READ) {
		if (conn_read(ac) < 0)
			return;
	} else if (ac->req && !ac->paused && ac->in_off < ac->in_len && conn_parse(ac) < 0) {
		return;    /* resumed with a response part held */
	}
	arm(ac);
}

/* ---- the interface ------------------------------------------------------ */

struct apppool *apppool_new(struct event_base *base, const struct config_addr *app,
                            const struct apppool_limits *lim)
{
	struct apppool *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->base = base;
	p->app = *app;
	p->lim = *lim;
	if (!(p->timer = evtimer_new(base, queue_timeout, p))) {
		free(p);
		return NULL;
	}
	return p;
}

void apppool_free(struct apppool *p)
{
	if (!p)
		return;
	while (p->queue) {
		struct apppool_req *r = p->queue;

		queue_remove(p, r);
		req_end(r, 502, "proxy stopping");
	}
	while (p->conns) {
		struct appconn *ac = p->conns;

		if (ac->req)
			req_end(ac->req, 502, "proxy stopping");
		conn_free(ac);
	}
	event_free(p->timer);
	free(p);
}

bool apppool_is_for(const struct apppool *p, const struct config_addr *app)
{
	return p->app.len == app->len && !memcmp(&p->app.ss, &app->ss, app->len);
}

struct apppool_req *apppool_submit(struct apppool *p, const char *head, size_t head_len,
                                   enum h2to1_framing framing, unsigned req_flags,
                                   const struct apppool_owner_ops *ops, void *ctx)
{
	struct apppool_req *r;

	if (p->n_queued >= p->lim.max_queue)
		return NULL;
	if (!(r = calloc(1, sizeof(*r))) ||
	    !(r->out = malloc(head_len > PIECE_CAP ? head_len : PIECE_CAP))) {
		free(r);
		return NULL;
	}
	memcpy(r->out, head, head_len);
	r->out_len = head_len;
	r->p = p;
	r->ops = ops;
	r->ctx = ctx;
	r->framing = framing;
	r->req_flags = req_flags;
	r->body_done = framing == H2TO1_NO_BODY;
	r->queued_at = now_ms();
	r->prev = p->queue_tail;
	if (p->queue_tail)
		p->queue_tail->next = r;
	else
		p->queue = r;
	p->queue_tail = r;
	p->n_queued++;
	/* Assigned from the loop: the owner hears of r only after this returns. */
	event_active(p->timer, EV_READ, 0);
	return r;
}

void apppool_resume(struct apppool_req *r)
{
	if (r->ac && r->ac->connected) {
		r->ac->paused = false;
		r->starved = false;
		event_active(r->ac->ev, EV_WRITE, 0);
	}
}

void apppool_cancel(struct apppool_req *r)
{
	struct apppool *p = r->p;
	struct appconn *ac = r->ac;

	if (!ac) {
		queue_remove(p, r);
		req_free(r);
		arm_timer(p);
		return;
	}
	/* Mid-request on HTTP/1.1: only closing the connection stops it. */
	ac->req = NULL;
	req_free(r);
	conn_free(ac);
	dispatch(p);
}

void apppool_stats(const struct apppool *p, struct apppool_stats *out)
{
	out->open = p->n_conns;
	out->idle = p->n_idle;
	out->queued = p->n_queued;
	out->opened = p->opened;
}
