/* gate: heads judged before bodies; see gate.h. */
#include "gate.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>

/* Marks a head the gate wrote in place of a refused one. */
#define GATE_MARK "X-Meshlet-Gate"

void gate_init(struct gate *g, const struct http_limits *lim, struct bufferevent *tls,
               gate_judge_fn judge, void *arg)
{
	memset(g, 0, sizeof(*g));
	http_request_init(&g->parser, lim);
	g->tls = tls;
	g->judge = judge;
	g->arg = arg;
}

void gate_cleanup(struct gate *g)
{
	http_cleanup(&g->parser);
	free(g->err);
	g->err = NULL;
}

int gate_fail(struct api_error *ae, int status, const char *fmt, ...)
{
	va_list ap;

	ae->status = status;
	ae->code = NULL;
	ae->e.path[0] = '\0';
	va_start(ap, fmt);
	vsnprintf(ae->e.message, sizeof(ae->e.message), fmt, ap);
	va_end(ap);
	return status;
}

static bool method_ok(const char *m)
{
	static const char *const ok[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
	                                 "PATCH"};

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
		if (strcmp(m, ok[i]) == 0)
			return true;
	return false;
}

/* Judges a head: 0 (evhttp may read it and its body) or an HTTP status with
 * the answer in *ae. Requests without a body pass (the server checks them
 * in full); one with a body goes to the judge. */
static int judge(struct gate *g, const struct http_head *h, struct api_error *ae)
{
	const char *authz = NULL;

	if (http_head_count(h, GATE_MARK, NULL) > 0)
		return gate_fail(ae, 400, "the %s field is reserved", GATE_MARK);
	if (!method_ok(h->method))
		return gate_fail(ae, 405, "method %s is not supported", h->method);
	if (h->upgrade || h->form != HTTP_TARGET_ORIGIN)
		return gate_fail(ae, 400, "upgrades and non-origin request targets are not supported");
	if (h->framing == HTTP_BODY_CHUNKED)
		return gate_fail(ae, 411, "send the body with Content-Length (chunked bodies are "
		                 "not accepted)");
	if (h->framing == HTTP_BODY_NONE || h->content_length == 0)
		return 0;
	if (http_head_count(h, "authorization", &authz) > 1)
		return gate_fail(ae, 400, "more than one Authorization field");
	return g->judge(g->arg, h, authz, ae);
}

/* Hands evhttp a bodiless head in place of a refused one; gate_refused()
 * answers it with ae. One refusal waits at a time: a second one before the
 * first was answered (pipelining refused requests) gives up the connection,
 * as does dead (framing lost): all further input is discarded, and the
 * connection ends by the timeouts or when the client closes it. */
static void refuse(struct gate *g, struct evbuffer *dst, const struct http_head *h,
                   const struct api_error *ae, bool dead)
{
	const char *m = h && method_ok(h->method) ? h->method : "GET";
	const char *path = h && h->path && h->path[0] == '/' ? h->path : "/";

	if (g->err) {
		g->dead = true;
		return;
	}
	g->err = malloc(sizeof(*g->err));
	if (!g->err) {
		/* No room for the answer: the connection goes, as when framing is lost. */
		g->dead = true;
		return;
	}
	*g->err = *ae;
	evbuffer_add_printf(dst, "%s %s HTTP/1.1\r\nHost: control\r\nContent-Length: 0\r\n"
	                    "%s: 1\r\n\r\n", m, path, GATE_MARK);
	if (dead)
		g->dead = true;
}

/* Hands evhttp a head that passed, serialised into dst (see gate.h). */
static int pass(struct gate *g, struct evbuffer *dst, const struct http_head *h)
{
	static const struct http_rewrite_field drop[] = {{"connection", NULL}, {"expect", NULL}};
	static const struct http_rewrite_field keep[] = {{"connection", "keep-alive"}};
	struct http_rewrite rw = { drop, 2, keep, h->version_minor == 0 ? 1 : 0 };
	size_t cap = g->parser.lim.max_header_bytes + g->parser.lim.max_line + 256, len = 0;
	const char *expect = NULL;
	struct evbuffer_iovec v;

	if (evbuffer_reserve_space(dst, (ev_ssize_t)cap, &v, 1) < 1 ||
	    http_head_serialize(h, &rw, v.iov_base, cap, &len) < 0)
		return -1;
	v.iov_len = len;
	if (evbuffer_commit_space(dst, &v, 1) < 0)
		return -1;
	if (h->framing == HTTP_BODY_LENGTH && h->content_length > 0 && h->version_minor == 1 &&
	    http_head_count(h, "expect", &expect) == 1 && strcasecmp(expect, "100-continue") == 0)
		bufferevent_write(g->tls, "HTTP/1.1 100 Continue\r\n\r\n", 25);
	return 0;
}

/* One event of the parser: moves (or drops) the used bytes of src. */
static void step(struct gate *g, struct http_event ev, size_t used, struct evbuffer *src,
                 struct evbuffer *dst)
{
	struct api_error ae = {0};

	if (!g->in_body || g->drop)
		evbuffer_drain(src, used);     /* head bytes: the parser keeps them */
	else
		evbuffer_remove_buffer(src, dst, used);
	switch (ev.type) {
	case HTTP_EV_HEAD_COMPLETE:
		g->in_body = true;
		g->drop = judge(g, ev.head, &ae) != 0;
		if (!g->drop && pass(g, dst, ev.head) < 0) {
			gate_fail(&ae, 500, "cannot pass the request on");
			g->drop = true;
		}
		if (g->drop)
			refuse(g, dst, ev.head, &ae, false);
		break;
	case HTTP_EV_MESSAGE_COMPLETE:
		g->in_body = g->drop = false;
		http_shrink(&g->parser);
		break;
	case HTTP_EV_PAUSED:
		http_resume(&g->parser, false);
		break;
	case HTTP_EV_ERROR:
		if (g->in_body) {
			g->dead = true;
			break;
		}
		gate_fail(&ae, ev.status, "%s", ev.reason ? ev.reason : "bad request");
		refuse(g, dst, NULL, &ae, true);
		break;
	default:
		break;
	}
}

enum bufferevent_filter_result gate_in(struct evbuffer *src, struct evbuffer *dst,
                                       ev_ssize_t limit, enum bufferevent_flush_mode mode,
                                       void *arg)
{
	struct gate *g = arg;
	struct evbuffer_iovec v;
	bool progress = false;

	(void)limit;
	(void)mode;
	/* Fed on with nothing left too: a bodiless request's MESSAGE_COMPLETE
	 * then comes at once, and its head buffer is freed (http_shrink) while
	 * the request waits, instead of when the next request arrives. */
	for (;;) {
		size_t used = 0, len = evbuffer_get_length(src);
		struct http_event ev;

		if (g->dead) {
			evbuffer_drain(src, len);
			return progress ? BEV_OK : BEV_NEED_MORE;
		}
		if (len > 0 && evbuffer_peek(src, -1, NULL, &v, 1) < 1)
			break;
		ev = http_feed(&g->parser, len ? v.iov_base : "", len ? v.iov_len : 0, &used);
		step(g, ev, used, src, dst);
		progress = progress || used > 0 || ev.type != HTTP_EV_NEED_MORE;
		if (ev.type == HTTP_EV_NEED_MORE && used == 0)
			break;
	}
	return progress ? BEV_OK : BEV_NEED_MORE;
}

bool gate_refused(struct gate *g, struct evhttp_request *req, struct api_error *ae)
{
	if (!evhttp_find_header(evhttp_request_get_input_headers(req), GATE_MARK))
		return false;
	if (g->err)
		*ae = *g->err;
	else
		memset(ae, 0, sizeof(*ae));
	if (!ae->status)
		api_fail(ae, 500, "", "the request gate lost its answer");
	free(g->err);
	g->err = NULL;
	return true;
}
