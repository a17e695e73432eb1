/*
 * apppool: a worker's pool of HTTP/1.1 connections to one local app (an
 * inbound listener's forward address), carrying requests whose callers
 * spoke HTTP/2 (h2flow.c). One request per connection at a time,
 * connections kept alive and reused, at most max_conns open; requests
 * beyond that wait in a bounded queue and get 503 after queue_ms; idle
 * connections close after idle_ms.
 *
 * The pool knows nothing of HTTP/2: a request is an HTTP/1.1 head written
 * by h2to1.c and a body pulled from its owner as the app's socket drains;
 * the response comes back through lib/http.c's parser (chunk framing split
 * off) to the owner, which says when it cannot take more (the pool stops
 * reading that connection until apppool_resume()). Nothing is buffered in
 * the pool beyond one read and one written piece per connection. The
 * outbound pool of h2 connections between sidecars has the same shape:
 * owner callbacks, submit/resume/cancel.
 */
#ifndef MESHLET_PROXY_APPPOOL_H
#define MESHLET_PROXY_APPPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>

#include "meshlet/config.h"
#include "meshlet/http.h"
#include "h2to1.h"

struct apppool;
struct apppool_req;

struct apppool_limits {
	unsigned max_conns;       /* open connections to the app, at most */
	unsigned max_queue;       /* requests waiting for one, at most (then 503 at once) */
	uint32_t queue_ms;        /* a request waits this long, then 503 */
	uint32_t idle_ms;         /* an idle connection closes after this long */
	uint32_t connect_ms;      /* a connect not done by then: 502 */
};

#define APPPOOL_MAX_CONNS 16
#define APPPOOL_MAX_QUEUE 1024
#define APPPOOL_IDLE_MS 60000

/*
 * What the pool asks of a request's owner. Called from the pool's own
 * events, never from inside apppool_submit/resume/cancel.
 */
struct apppool_owner_ops {
	/* Up to cap bytes of the request body into buf; *end set once the
	 * body is whole. 0 without *end: nothing now (apppool_resume later). */
	size_t (*body)(void *ctx, char *buf, size_t cap, bool *end);
	/* The app's final response head (status >= 200). false: it cannot be
	 * passed on; the connection closes and end() gets 502. */
	bool (*head)(void *ctx, const struct http_head *h);
	/* Response content (chunk framing removed). All len bytes are taken;
	 * false: take no more until apppool_resume(). */
	bool (*data)(void *ctx, const char *data, size_t len);
	/* The request is over: status 0, the response ended; else 502, 503 or
	 * 504 with why (static text). The request is freed after this. */
	void (*end)(void *ctx, int status, const char *why);
};

struct apppool *apppool_new(struct event_base *base, const struct config_addr *app,
                            const struct apppool_limits *lim);

/* Closes every connection; requests still held are ended with 502 first. */
void apppool_free(struct apppool *p);

/* Whether p talks to app. */
bool apppool_is_for(const struct apppool *p, const struct config_addr *app);

/*
 * Queues a request: head (head_len bytes, copied) framed as framing;
 * req_flags HTTP_REQ_HEAD for HEAD. Returns it, or NULL when the queue is
 * full (answer 503) or memory ran out.
 */
struct apppool_req *apppool_submit(struct apppool *p, const char *head, size_t head_len,
                                   enum h2to1_framing framing, unsigned req_flags,
                                   const struct apppool_owner_ops *ops, void *ctx);

/* The owner has more body, or room for more response: carry on (later, from the loop). */
void apppool_resume(struct apppool_req *r);

/* The owner is gone: r is freed (its connection closed if it was mid-request); no callback. */
void apppool_cancel(struct apppool_req *r);

/* Counts for logs and tests. */
struct apppool_stats {
	unsigned open, idle, queued;
	uint64_t opened;          /* connections opened since the pool was made */
};

void apppool_stats(const struct apppool *p, struct apppool_stats *out);

#endif
