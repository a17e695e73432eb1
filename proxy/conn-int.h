/*
 * conn-int: what the files of the connection module share and nobody
 * else sees. conn.c holds the state machine, the relay and the one way
 * out; conn_tls.c the mutual-TLS handshake and the peer checks around it;
 * conn_tdest.c where a transparent connection was going.
 */
#ifndef MESHLET_PROXY_CONN_INT_H
#define MESHLET_PROXY_CONN_INT_H

#include <sys/socket.h>

#include "conn.h"
#include "snapshot.h"
#include "worker-t.h"

static inline const struct config *conn_cfg(const struct conn *c)
{
	return c->snap->cfg;
}

/* conn.c: the state machine's steps. */
void conn_set_state(struct conn *c, enum conn_state s);
void conn_set_deadline(struct conn *c, uint32_t ms);     /* ms from now */
bool conn_past_deadline(const struct conn *c);
/* The TLS side's event waits for what (EV_READ/EV_WRITE, 0: nothing) until
 * due (conn_clock_ms() time, 0: no timer). */
void conn_watch_tls(struct conn *c, short what, uint64_t due);
void conn_authorize(struct conn *c);        /* inbound, after the handshake */
void conn_connect_next(struct conn *c);     /* to the destination (next endpoint) */
void conn_relay_start(struct conn *c);      /* both sides up: move bytes */
void conn_addr_text(const struct sockaddr_storage *ss, char *out, size_t len);

/* conn_tls.c: the handshake, server side (inbound) or client side
 * (outbound, on the connected upstream socket). */
void conn_tls_accept(struct conn *c);
void conn_tls_connect(struct conn *c);
void conn_tls_step(struct conn *c);         /* the handshake's socket is ready */
void conn_tls_timeout(struct conn *c);      /* its deadline passed */

/* conn_pick.c: the callers' traffic rules on the connect step of an
 * outbound listener (transparent and inbound connections: one connect to
 * their one destination, the proxy's connect timeout). */
bool conn_pick_admit(struct conn *c);          /* limits.max_connections; false: refused, closed */
void conn_pick_release(struct conn *c);        /* c closes: its place is free */
bool conn_pick_next(struct conn *c);           /* c->endpoint: the next to try; false: none */
uint32_t conn_pick_connect_ms(const struct conn *c);
void conn_pick_report(struct conn *c, bool failed);   /* a connect's outcome (ejection) */

/* conn_tdest.c: a transparent connection on accepted socket fd: finds
 * where the app was going, then connects there or refuses. */
void conn_transparent_start(struct conn *c, int fd);

#endif
