/*
 * upool: a worker's pool of long-lived mutual-TLS HTTP/2 connections to
 * the endpoints of one outbound http listener's service, carrying the
 * requests of every app connection of that listener as streams
 * (docs/http.md, "Pooled connections between sidecars").
 *
 * A request is a header list (copied) and a body pulled from its owner;
 * it goes to a connection to its endpoint with room (fewer open streams
 * than the least of pool.max_streams and the peer's
 * SETTINGS_MAX_CONCURRENT_STREAMS); a new connection is opened only while
 * the endpoint has fewer than pool.max_connections (one handshake in
 * flight per endpoint at a time); otherwise it waits in a bounded queue
 * and ends with 503 after the connect timeout (timeouts.connect_seconds). The peer is verified
 * as on a single connection: the SPIFFE ID of the listener's service,
 * with the worker's current SVID and bundle (the snapshot's client
 * context). Connections made under an older context (rotated SVID, new
 * bundle) drain: GOAWAY, no new streams, closed when their streams end.
 * Idle connections close after pool.idle_seconds.
 *
 * The callers' request-level traffic rules (docs/traffic.md) live here:
 * each attempt waits request_seconds for its response head once the whole
 * request was handed to the session (then 504); an attempt that failed
 * before a head was passed on (a reset, a lost connection, the timeout,
 * a 5xx head retries.on names) goes again after a backoff to another
 * endpoint, within retries.attempts and the listener's retry budget, for
 * idempotent methods whose body is kept (UPOOL_RETRY_BODY_MAX); 5xx heads,
 * resets and timeouts count for outlier ejection; more than
 * limits.max_pending_requests waiting are refused.
 *
 * Flow control: response DATA is handed to the owner, who reopens the
 * stream's window with upool_consume() as the bytes leave toward its
 * client; request DATA is pulled only as the session can send it. Nothing
 * is buffered here beyond one gathered write and one read per connection,
 * and a retryable request's body (at most UPOOL_RETRY_BODY_MAX).
 * Owners are called from the pool's own events, never from inside
 * upool_submit/resume/consume/cancel. The inbound side's pool of HTTP/1.1
 * connections to the local app (apppool.h) has the same shape.
 */
#ifndef MESHLET_PROXY_UPOOL_H
#define MESHLET_PROXY_UPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

struct snapshot;
struct upool;
struct upool_req;
struct worker;

#define UPOOL_MAX_QUEUE 1024
/* A request body up to this is kept for a retry (Envoy's per-request
 * buffer limit); a larger one is not sent again. */
#define UPOOL_RETRY_BODY_MAX 65536

struct upool_owner_ops {
	/* Up to cap bytes of the request body into buf; *end once it is whole.
	 * 0 without *end: nothing now (upool_resume() later). */
	size_t (*body)(void *ctx, uint8_t *buf, size_t cap, bool *end);
	/* Request trailers to send after the body (into nv, cap entries): their
	 * count, 0 for none. May be NULL. */
	size_t (*trailers)(void *ctx, nghttp2_nv *nv, size_t cap);
	/* The final response head (checked: h2_check_response); end: no body
	 * follows. false: it cannot be passed on (the stream is reset). */
	bool (*head)(void *ctx, const nghttp2_nv *nv, size_t n, bool end);
	/* Response content; the owner calls upool_consume() as it leaves. */
	void (*data)(void *ctx, const uint8_t *data, size_t len);
	/* Response trailers (checked). May be NULL. */
	void (*resp_trailers)(void *ctx, const nghttp2_nv *nv, size_t n);
	/*
	 * The request is over: status 0 when the response ended cleanly; else
	 * 502 (upstream unavailable or reset: code the HTTP/2 error code, if
	 * any), 503 (no connection free in time, or the queue full) or 504,
	 * with why (static text). The request is freed after this.
	 */
	void (*end)(void *ctx, int status, uint32_t code, const char *why);
};

/* The pool of outbound listener `listener` of worker w. */
struct upool *upool_new(struct worker *w, size_t listener);

/* Closes every connection; requests still held end with 502 first. */
void upool_free(struct upool *p);

/*
 * Queues a request (nv copied) under snap (the owner's: its endpoints and
 * its service's traffic document). has_body: the body() callback gives
 * DATA. Returns it, or NULL with errno EBUSY when the document's
 * limits.max_pending_requests are waiting already (answer 503 with
 * x-meshlet-overloaded: 1; counted), EAGAIN when the queue is full,
 * ENOMEM (answer 503).
 */
struct upool_req *upool_submit(struct upool *p, struct snapshot *snap, const nghttp2_nv *nv,
                               size_t n, bool has_body, const struct upool_owner_ops *ops,
                               void *ctx);

/* The owner has more request body. */
void upool_resume(struct upool_req *r);

/* n bytes of response content left toward the owner's client: the
 * stream's window reopens by as much. */
void upool_consume(struct upool_req *r, size_t n);

/* The owner is gone: no more callbacks; a stream in flight is reset. */
void upool_cancel(struct upool_req *r);

/* Closes the connections whose peer certificate s's bundle revokes. */
void upool_close_revoked(struct upool *p, struct snapshot *s);

#endif
