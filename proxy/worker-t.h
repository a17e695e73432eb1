/*
 * worker-t: the types of a worker thread as its connections see it: its
 * event base, its listeners, its open connections and the little the
 * workers of one process share. Functions live in worker.h; nothing here
 * knows struct meshlet_proxy.
 */
#ifndef MESHLET_PROXY_WORKER_T_H
#define MESHLET_PROXY_WORKER_T_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <openssl/types.h>

#include "meshlet/config.h"
#include "acceptguard.h"

struct apppool;
struct upool;
struct conn;
struct endpick;
struct metrics;
struct peerstats_shard;
struct relay_buf;
struct snapshot;
struct worker;

/* Commands from the main or control thread to a worker: bits, so none is lost. */
enum worker_cmd {
	WORKER_DRAIN = 1 << 0,          /* stop accepting, finish open connections */
	WORKER_STOP = 1 << 1,           /* close everything now */
	WORKER_RECHECK = 1 << 2,        /* close connections whose peer is now revoked,
	                                 * drain inbound HTTP/2 ones on a new policy */
};

enum listener_kind { LISTENER_INBOUND, LISTENER_OUTBOUND, LISTENER_TRANSPARENT };

/* A listening socket of one worker: which config entry it serves. */
struct listener {
	struct worker *w;
	struct evconnlistener *ev;
	struct accept_guard guard;      /* pauses accepting after EMFILE */
	enum listener_kind kind;
	size_t index;                   /* into cfg->inbound or cfg->outbound */
};

/*
 * What every worker of a process shares, owned by the proxy and set up
 * before the first worker runs.
 */
struct worker_shared {
	struct metrics *metrics;
	atomic_uint_fast64_t next_conn_id;
	atomic_uint open_conns;         /* across workers, for max_connections */
	/* Per outbound listener: connections to its service, for the traffic
	 * document's limits.max_connections (conn_pick.c). */
	atomic_uint upstream_open[CONFIG_MAX_LISTENERS];
	/* Per outbound listener: requests waiting in the workers' pools for a
	 * stream, for limits.max_pending_requests (upool.c). */
	atomic_uint upstream_pending[CONFIG_MAX_LISTENERS];
	/* The current snapshot with a new reference (snapshot_unref when done);
	 * NULL in control mode until the first state arrived. Any thread. */
	struct snapshot *(*snapshot)(void *arg);
	void *arg;
};

struct worker {
	struct worker_shared *shared;
	int id;
	pthread_t thread;
	struct event_base *base;
	struct listener *listeners;
	size_t n_listeners;
	struct event *cmd_ev;           /* activated by other threads */
	atomic_uint cmd;                /* enum worker_cmd bits pending */
	struct conn *conns;             /* open connections, for drain and stop */
	size_t n_conns;
	struct event *quiet_ev;         /* runs conn_release_quiet; armed while any
	                                 * connection holds buffers */
	size_t n_holding;               /* connections with holds_buffers set */
	BIO_METHOD *bio_method;         /* TLS sockets' (conn_bio_method_new) */
	struct relay_buf *free_bufs;    /* recycled relay buffers */
	size_t n_free_bufs;
	unsigned char rand_pool[512];   /* random bytes for request IDs (httpflow) */
	size_t rand_left;               /* unused bytes at the end of rand_pool */
	struct endpick *pick;           /* endpoint choice and ejection per outbound listener */
	struct apppool **apppools;      /* per inbound listener: HTTP/1.1 connections to its
	                                 * app for HTTP/2 callers (apppool.c), made on first use */
	size_t n_apppools;
	struct upool **upools;          /* per outbound listener: pooled mTLS HTTP/2 connections
	                                 * to its service's sidecars (upool.c), made on first use */
	size_t n_upools;
	struct snapshot *sessions_from; /* newest snapshot an outbound handshake used */
	struct peerstats_shard *peers;  /* this worker's per-caller counters (no lock) */
	bool draining;
};

#endif
