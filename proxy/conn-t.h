/*
 * conn-t: the types of a proxied connection, shared by conn.c (the state
 * machine and the byte relay) and httpflow.c (the HTTP/1.1 layer that sits
 * between a direction's reads and writes). Functions live in conn.h.
 */
#ifndef MESHLET_PROXY_CONN_T_H
#define MESHLET_PROXY_CONN_T_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/event_struct.h>
#include <openssl/ssl.h>

#include "meshlet/tls.h"
#include "conn.h"

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
	uint64_t bytes;             /* written to the sink */
};

struct httpflow;

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
	bool http;                  /* listener protocol is http */
	bool closing;               /* close once every out is written */
	uint16_t listener;
	uint16_t endpoint;          /* outbound: endpoint being tried or used */
	uint16_t tries;             /* outbound: endpoints tried so far */
	uint8_t ready;              /* CONN_PLAIN_R ... : readiness seen, lost on EAGAIN */
	bool tls_drained;           /* the last socket read under SSL came back short */
	bool ssl_starved;           /* SSL_read wants socket bytes: its buffer cannot help */
	bool decided;
	enum policy_action decision;
	int tls_fd, plain_fd;
	short tls_reg, plain_reg;   /* events registered now */
	uint64_t tls_armed, plain_armed; /* conn_clock_ms() their timers end at; 0: none */
	short ssl_read_wants, ssl_write_wants;
	SSL *ssl;
	struct event tls_ev, plain_ev;
	struct relay_dir d[2];
	struct httpflow *hf;        /* HTTP state; NULL on tcp listeners */
	struct conn_tdest *tdest;   /* transparent: where the app was going; else NULL */
	struct tls_verify verify;
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
