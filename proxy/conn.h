/*
 * conn: one proxied connection, from accept to close, as an explicit state
 * machine. Inbound: TLS handshake -> authorize -> connect to the app ->
 * relay. Outbound: connect upstream -> TLS handshake (upstream must be the
 * listener's service) -> relay. Relaying moves bytes through two bounded
 * buffers driven straight by SSL_read/SSL_write, with backpressure: a full
 * buffer stops reading on the other side. What the relayed bytes mean is
 * the connection's protocol's (c->proto, conn-t.h): tcpflow.c, httpflow.c.
 */
#ifndef MESHLET_PROXY_CONN_H
#define MESHLET_PROXY_CONN_H

#include <openssl/ssl.h>
#include "conn-t.h"

/*
 * conn_pick.c's endpoint choice and outcomes, for whatever connects to an
 * outbound listener's endpoints: single connections (conn.c) and the pool
 * between sidecars (upool.c). conn_pick_first_attempt: a call starts (the
 * retry budget's base). conn_pick_choose: the next endpoint index for a
 * call that tried `tried` (round robin, skipping tried and ejected ones),
 * -1 when none is left. conn_pick_listener_connect_ms: the connect timeout
 * of the listener's service (its traffic document, else timeouts);
 * conn_pick_listener_request_ms its response-head timeout
 * (request_seconds, else timeouts.response_head_seconds). And an
 * outcome, for outlier ejection: a connect's, or a request's (a 5xx head,
 * a reset or a timeout failed; another head succeeded).
 */
const struct traffic *conn_pick_listener_traffic(const struct snapshot *s, size_t listener);
void conn_pick_first_attempt(struct worker *w, size_t listener);
/* One retry more within the listener's budget (then counted in it)? */
bool conn_pick_may_retry(struct worker *w, size_t listener, unsigned percent);
int conn_pick_choose(struct worker *w, const struct snapshot *s, size_t listener,
                     struct endpick_tried *tried);
uint32_t conn_pick_listener_connect_ms(const struct snapshot *s, size_t listener);
uint32_t conn_pick_listener_request_ms(const struct snapshot *s, size_t listener);
/* c's response-head timeout: outbound, its listener's; else timeouts'. */
uint32_t conn_pick_request_ms(const struct conn *c);
void conn_pick_outcome(struct worker *w, const struct snapshot *s, size_t listener,
                       const struct config_addr *addr, bool failed);

struct listener;

const char *conn_reason_str(enum conn_reason r);

/*
 * Milliseconds on CLOCK_MONOTONIC: the one clock every connection deadline
 * (handshake, connect, idle, HTTP head and response head, linger) is set
 * with and checked against.
 */
uint64_t conn_clock_ms(void);

/*
 * The one way out: logs the connection once (with c->tls_failure when the
 * handshake failed) and frees everything it holds. c is gone afterwards.
 */
void conn_close(struct conn *c, enum conn_reason reason);

/* Bytes relayed from the connection's client (the side that connected to
 * us) to the upstream, and back. */
uint64_t conn_bytes_from_client(const struct conn *c);
uint64_t conn_bytes_to_client(const struct conn *c);

/* "ip:port" of the client, into out; the upstream's address text. */
void conn_source_text(const struct conn *c, char *out, size_t len);
const char *conn_destination_text(const struct conn *c);

/* Runs the relay again soon (after a timer changed what is pending). */
void conn_kick(struct conn *c);

/*
 * The connection's protocol turns out to be ops (HTTP/2 detected by its
 * preface on an http listener): the old protocol's state is released and
 * ops's made. Returns 0, or -1 when c was closed.
 */
int conn_switch_proto(struct conn *c, const struct conn_proto_ops *ops);

/*
 * A detached connection (outbound http, requests pooled) needs an upstream
 * connection of its own after all (an Upgrade or CONNECT tunnel): connected
 * and verified as any outbound connection once the current relay round
 * ends; what the protocol queued for it waits until then.
 */
void conn_connect_upstream(struct conn *c);

/* One best-effort write to the client outside the relay (early errors). */
void conn_write_client_now(struct conn *c, const char *buf, size_t len);

/* Takes over fd, accepted on listener l of worker w. */
void conn_accept(struct listener *l, int fd, const struct sockaddr *from, int fromlen);

/* Closes every connection of w with reason (drain timeout, stop). */
void conn_close_all(struct worker *w, enum conn_reason reason);

/* Draining: closes idle HTTP keep-alive connections now and makes busy ones
 * close after their response. TCP connections finish on their own. */
void conn_drain(struct worker *w);

/* Closes w's connections whose peer certificate s's bundle revokes. */
void conn_close_revoked(struct worker *w, struct snapshot *s);

/* Client-side new-session callback: keeps the session for the upstream. */
int conn_on_new_session(SSL *ssl, SSL_SESSION *sess);

/* Frees w's recycled relay buffers. */
void conn_free_buffers(struct worker *w);

/* The BIO method of a worker's TLS sockets (conn_tls.c). NULL: no memory. */
BIO_METHOD *conn_bio_method_new(void);

/* w->quiet_ev's callback: connections quiet for a while hand back their
 * TLS record buffers and protocol buffers. */
void conn_release_quiet(evutil_socket_t fd, short what, void *arg);

#endif
