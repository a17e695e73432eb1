/*
 * conn-t: the types of a proxied connection, shared by conn.c (the state
 * machine and the byte relay) and the protocol modules that sit between a
 * direction's reads and writes through struct conn_proto_ops (httpflow.c:
 * HTTP/1.1). Functions live in conn.h. Nothing here includes a proxy
 * header but endpick.h (pure types): the worker and the snapshot are only
 * named.
 */
#ifndef MESHLET_PROXY_CONN_T_H
#define MESHLET_PROXY_CONN_T_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/event_struct.h>
#include <openssl/ssl.h>

#include "meshlet/config.h"
#include "meshlet/metrics.h"
#include "meshlet/policy.h"
#include "meshlet/tls.h"
#include "endpick.h"

struct conn;
struct snapshot;
struct worker;

enum conn_state {
	CONN_HANDSHAKE,
	CONN_AUTHORIZING,
	CONN_CONNECTING,
	CONN_RELAYING,
	CONN_LINGERING,     /* answered and closing: discarding what the client still sends */
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
	CR_REVOKED,
	CR_OUTSIDE_MESH,
	CR_FAULT,           /* a traffic document's fault aborted it (tcp) */
};

/*
 * The application protocol of a connection, chosen once when the
 * connection is set up (conn_new): the relay calls these and never asks
 * which protocol it runs. tcp relays bytes as they are (conn.c);
 * HTTP/1.1 parses, decides and rewrites each request (httpflow.c). A new
 * protocol is a new table. Every entry is set in every table, but
 * produce: NULL relays what was read as it is (tcp).
 */
struct conn_proto_ops {
	const char *name;
	/* Each request is decided on its own: no decision for the connection. */
	bool per_request_policy;
	/* A reset from the upstream is an end of its stream, not of the
	 * connection: the client is still owed answers. */
	bool answers_after_reset;
	/* Gives c its protocol state. Returns 0 or -ENOMEM. */
	int (*init)(struct conn *c);
	/* Frees that state (c is closing). */
	void (*release)(struct conn *c);
	/* Relaying begins: both sockets are up and the peer verified. */
	void (*start)(struct conn *c);
	/*
	 * Produces the next output of direction d, whose pending output is
	 * empty, from its input (or the proxy's own answers). Returns 1 when
	 * something moved, 0 when it needs input (or must wait), -1 when the
	 * connection was closed. NULL: the input, unchanged and uncopied.
	 */
	int (*produce)(struct conn *c, int d);
	/* The source of direction d reached EOF. Returns 0, or -1 when closed. */
	int (*eof)(struct conn *c, int d);
	/* A side's deadline while relaying (conn_clock_ms() time), 0: none
	 * beyond the idle timer. */
	uint64_t (*due)(const struct conn *c, bool tls_side);
	/* A side's timer fired at or past due: true when handled (c may be
	 * closed), false to apply the idle rule. */
	bool (*on_timeout)(struct conn *c, uint64_t now);
	/* The upstream could not be reached or verified before any byte was
	 * relayed: answer the client with status as the protocol can, close. */
	void (*fail_early)(struct conn *c, int status, enum conn_reason reason);
	/* The proxy drains: true when c may close now, else it ends on its own. */
	bool (*drain)(struct conn *c);
	/* The connection went quiet: release what can be rebuilt. */
	void (*shrink)(struct conn *c);
	/* Nothing waits for an answer: a closing connection may go. */
	bool (*done)(const struct conn *c);
	/* The protocol logged the connection's traffic itself (per request):
	 * the connection's own access log line is then redundant. */
	bool (*logged)(const struct conn *c);
};

/*
 * One TLS record of plaintext: each read fills at most one record, so a
 * read is followed by exactly one SSL_write (one record, one send).
 */
#define RELAY_BUF_SIZE 16384

struct relay_buf {
	struct relay_buf *next;
	uint32_t off, len;          /* [off, len) read but not yet processed */
	char data[RELAY_BUF_SIZE];
};

/* The two directions of a connection. */
enum relay_dir_id {
	RELAY_UP = 0,               /* plain socket -> TLS socket */
	RELAY_DOWN = 1,             /* TLS socket -> plain socket */
};

/*
 * One direction: bytes read from its source wait in `in`; what goes to the
 * sink is `out` (a span of `in`, or of `owned`: a rewritten head or a
 * response of the proxy's own). Reading stops while either holds bytes:
 * that is the backpressure, and the bound on memory.
 */
struct relay_dir {
	struct relay_buf *in;
	const char *out;
	size_t out_len;
	char *owned;
	bool src_eof;               /* read EOF on the source */
	bool dst_shut;              /* that EOF was passed on to the sink */
	bool paused;                /* HTTP: wait before reading (upgrade pending) */
	bool need_more;             /* what is pending cannot be used alone (a protocol
	                               preface cut short): read more after it */
	uint64_t bytes;             /* written to the sink */
};

/* Transparent connections: the original destination and whom we expect there.
 * expect_id is "" for a passthrough (outside the mesh: plain TCP, no TLS). */
struct conn_tdest {
	struct config_addr addr;
	char expect_id[SPIFFE_ID_MAX + 1];
};

struct conn {
	struct conn *prev, *next;
	struct worker *w;
	struct snapshot *snap;
	uint64_t id;
	enum conn_state state;
	enum metrics_direction dir;
	bool inbound;
	bool transparent;           /* outbound by SO_ORIGINAL_DST; see tdest */
	bool closing;               /* close once every out is written */
	bool detached;              /* outbound http: no upstream socket; requests ride the
	                               worker's pool (upool.c) until a tunnel needs one */
	bool connect_pending;       /* detached: connect an upstream when the relay round ends */
	uint16_t listener;
	uint16_t endpoint;          /* outbound: endpoint being tried or used */
	uint16_t tries;             /* inbound, transparent: connects tried so far */
	struct endpick_tried tried; /* outbound: the endpoints this connection tried */
	bool upstream_counted;      /* counted in upstream_open (limits.max_connections) */
	uint8_t ready;              /* CONN_PLAIN_R ... : readiness seen, lost on EAGAIN */
	bool tls_drained;           /* the last socket read under SSL came back short */
	bool ssl_starved;           /* SSL_read wants socket bytes: its buffer cannot help */
	bool holds_buffers;         /* moved bytes since its buffers were last released */
	bool decided;
	enum policy_action decision;
	int tls_fd, plain_fd;
	short tls_reg, plain_reg;   /* events registered now */
	uint64_t tls_armed, plain_armed; /* conn_clock_ms() their timers end at; 0: none */
	short ssl_read_wants, ssl_write_wants;
	SSL *ssl;
	struct event tls_ev, plain_ev;
	struct event tls_tev, plain_tev;    /* their timers (one-shot) */
	struct relay_dir d[2];
	const struct conn_proto_ops *proto;
	void *proto_ctx;            /* the protocol's state (httpflow: struct httpflow) */
	struct conn_tdest *tdest;   /* transparent: where the app was going; else NULL */
	struct tls_verify verify;
	enum tls_failure tls_failure; /* why the handshake failed: access log's tls_error */
	const char *rule;           /* deciding rule, owned by snap */
	char *peer;                 /* verified SPIFFE ID */
	struct timespec started;    /* CLOCK_MONOTONIC */
	struct timespec started_wall;
	uint64_t last_active;       /* conn_clock_ms() of the last byte moved */
	uint64_t deadline;          /* conn_clock_ms() end of the handshake, connect or linger phase */
	struct sockaddr_storage from;
};

enum {
	CONN_PLAIN_R = 1 << 0,
	CONN_PLAIN_W = 1 << 1,
	CONN_TLS_R = 1 << 2,
	CONN_TLS_W = 1 << 3,
};

#endif
