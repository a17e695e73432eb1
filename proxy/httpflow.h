/*
 * httpflow: HTTP/1.1 on an http listener. It sits between the reads and the
 * writes of the relay (conn.c): the request direction is parsed, every
 * request decided by the policy (inbound) and forwarded with a rewritten
 * head (normalised path, x-forwarded-client-cert, x-request-id); the
 * response direction is parsed to match each response to its request, in
 * order, with the proxy's own answers (403, 400, 502, 504, ...) slotted in
 * where pipelining puts them. Bodies stream through unchanged.
 */
#ifndef MESHLET_PROXY_HTTPFLOW_H
#define MESHLET_PROXY_HTTPFLOW_H

#include <stdbool.h>
#include <stdint.h>

struct conn;

/* Gives c its HTTP state (c->hf). Returns 0 or -ENOMEM. */
int httpflow_new(struct conn *c);
void httpflow_free(struct conn *c);

/*
 * Produces the next output of direction d, whose pending output is empty:
 * from its input, or (response direction) from the proxy's own answers.
 * Returns 1 when something moved, 0 when it needs input (or must wait),
 * -1 when the connection was closed.
 */
int httpflow_produce(struct conn *c, int d);

/* The source of direction d reached EOF. Returns 0, or -1 when closed. */
int httpflow_eof(struct conn *c, int d);

/*
 * The deadline of a side while relaying, in conn_clock_ms() time: the
 * request head's on the client's side, the response head's on the
 * upstream's; 0 when none runs (the idle timer rules).
 */
uint64_t httpflow_due(const struct conn *c, bool tls_side);

/*
 * Relaying begins. On an inbound connection the first request's head clock
 * starts now, after the mTLS handshake and the connect to the app, not at
 * accept: the calling sidecar started its own clock when its client
 * connected, before it connected here, so it is the one that answers a
 * slow client 408, rather than this side closing the mesh connection
 * under it a moment earlier.
 */
void httpflow_start(struct conn *c);

/* A side's timer fired while relaying, now (conn_clock_ms()) at or past its
 * deadline. Returns true when HTTP handled it (the connection may be
 * closed), false to apply the idle rule. */
bool httpflow_on_timeout(struct conn *c, uint64_t now);

/*
 * The upstream could not be reached or verified before any byte was
 * relayed: answers the client with status (502, 504) as best it can and
 * closes the connection with reason.
 */
void httpflow_fail_early(struct conn *c, int status, int reason);

/*
 * The proxy drains: returns true when the connection is idle between
 * requests and can be closed now; otherwise the response in flight will
 * carry "connection: close" and the connection ends after it.
 */
bool httpflow_drain(struct conn *c);

/* The connection went quiet: release the parsers' head buffers. */
void httpflow_shrink(struct conn *c);

/* True when no request waits for an answer (the connection may close). */
bool httpflow_done(const struct conn *c);

/* True once a request was logged: the connection's own log line is then
 * redundant. */
bool httpflow_logged(const struct conn *c);

#endif
