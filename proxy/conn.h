/*
 * conn: one proxied connection, from accept to close, as an explicit state
 * machine. Inbound: TLS handshake -> authorize -> connect to the app ->
 * relay. Outbound: connect upstream -> TLS handshake (upstream must be the
 * listener's service) -> relay. Relaying moves bytes through two bounded
 * buffers driven straight by SSL_read/SSL_write, with backpressure: a full
 * buffer stops reading on the other side.
 */
#ifndef MESHLET_PROXY_CONN_H
#define MESHLET_PROXY_CONN_H

#include <openssl/ssl.h>
#include "proxy.h"

enum conn_state {
	CONN_HANDSHAKE,
	CONN_AUTHORIZING,
	CONN_CONNECTING,
	CONN_RELAYING,
	CONN_CLOSED,
};

/* Why a connection ended: the access log's "status". */
enum conn_reason {
	CR_DONE = 0,
	CR_DENIED,
	CR_HANDSHAKE_FAILED,
	CR_HANDSHAKE_TIMEOUT,
	CR_UPSTREAM_REFUSED,
	CR_UPSTREAM_TIMEOUT,
	CR_IDLE_TIMEOUT,
	CR_RESET,
	CR_TLS_ERROR,
	CR_DRAIN_TIMEOUT,
	CR_OVERLOAD,
	CR_INTERNAL,
	CR_EXPIRED_SESSION,
};

const char *conn_reason_str(enum conn_reason r);

/* Takes over fd, accepted on listener l of worker w. */
void conn_accept(struct listener *l, int fd, const struct sockaddr *from, int fromlen);

/* Closes every connection of w with reason (drain timeout, stop). */
void conn_close_all(struct worker *w, enum conn_reason reason);

/* Client-side new-session callback: keeps the session for the upstream. */
int conn_on_new_session(SSL *ssl, SSL_SESSION *sess);

/* Frees w's recycled relay buffers. */
void conn_free_buffers(struct worker *w);

#endif
