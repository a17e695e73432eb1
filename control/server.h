/*
 * server: meshlet-control's HTTPS front: evhttp over bufferevent_openssl,
 * TLS 1.3 with optional client certificates (verified as SVIDs against the
 * bundle during the handshake), explicit limits, the route table walk,
 * authentication, and one JSON access-log line per request.
 *
 * Limits (libevent's evhttp has none by default):
 *   headers 16 KiB; every request head is judged by a gate in front of
 *   evhttp (server.c) before any of its body is read: a body needs
 *   Content-Length (411), a route that takes one and a caller it accepts
 *   (401/403/404/405/400), and at most API_BODY_MAX bytes (16 KiB with an
 *   unverified join token) (413); refused bodies are read and discarded,
 *   never held, and the answer is JSON on a connection that stays usable; read and
 *   write timeouts SERVER_IO_TIMEOUT (which also closes a kept-alive
 *   connection idle between requests), lifted while a long poll waits (it
 *   is bounded by its own wait); a connection that completes no
 *   request within SERVER_REQUEST_DEADLINE of accepting it (or of its last
 *   answer) is shut down, so trickling bytes cannot hold it; at most
 *   struct server_limits.max_conns connections (when full, the oldest idle
 *   one is closed; accepting pauses only when none is idle); long polls
 *   capped per certificate, per service and in all, below the connection
 *   limit (watch.c, 429 with Retry-After); methods other
 *   than GET HEAD POST PUT DELETE OPTIONS PATCH refused by evhttp.
 *
 * A request is an api_call, handed to the route's handler after the route
 * matched (404/405), its credentials were checked (401/403) and its body
 * read and parsed (413/400). The handler answers synchronously (returns
 * 0 with status/out or err set) or keeps the call (SERVER_ASYNC) and later
 * calls server_reply() or server_abort().
 */
#ifndef MESHLET_CONTROL_SERVER_H
#define MESHLET_CONTROL_SERVER_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <event2/http.h>
#include <jansson.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/identity.h"
#include "state.h"

#define SERVER_MAX_HEADERS (16 * 1024)
#define SERVER_IO_TIMEOUT 10
#define SERVER_REQUEST_DEADLINE 30
#define SERVER_MAX_CONNS 4096
/* The most --max-connections accepts: a replica holding the long polls of
 * 10,000+ proxies (docs/benchmarks.md, "Control plane at scale") needs more
 * than the default, each connection a file descriptor. */
#define SERVER_MAX_CONNS_LIMIT 65536
/* Long polls (GET .../config?wait=S) waiting at once: per client
 * certificate (each proxy instance has its own SVID and needs one or two),
 * per service (sized for services with hundreds of instances), and in all
 * (by default what is left of the connections after SERVER_CONN_RESERVE).
 * Over a limit: 429 with Retry-After: SERVER_RETRY_AFTER. */
#define SERVER_POLLS_PER_CERT 4
#define SERVER_POLLS_PER_SERVICE 1024
#define SERVER_RETRY_AFTER 5
/* Connections never used by long polls, for admin calls and handshakes:
 * an eighth of the connection limit, at least SERVER_MIN_RESERVE. */
#define SERVER_MIN_RESERVE 8
/* Control's own server certificate: lifetime, renewed at half of it. */
#define SERVER_CERT_TTL (24 * 3600)
#define SERVER_ASYNC 1
/* spiffe://<trust domain>/svc/<service> and a NUL fit. */
#define SERVER_CALLER_MAX (TRUST_DOMAIN_MAX + SERVICE_NAME_MAX + 16)

struct control_server;
struct ctlmetrics;
struct stats;
struct watch;

/* The server's connection and long-poll limits (meshlet-control flags). */
struct server_limits {
	size_t max_conns;          /* --max-connections (SERVER_MAX_CONNS) */
	size_t polls_per_cert;     /* --max-polls-per-cert (SERVER_POLLS_PER_CERT) */
	size_t polls_per_service;  /* --max-polls-per-service (SERVER_POLLS_PER_SERVICE) */
	size_t polls_total;        /* --max-polls; 0: max_conns - the reserve */
};
struct ctl_conn;

/* Who is calling, as established by server.c before the handler runs. */
enum caller_kind { CALLER_ANONYMOUS, CALLER_ADMIN, CALLER_TOKEN, CALLER_SVID };

/* What a route requires. */
enum route_auth {
	AUTH_NONE,         /* anyone */
	AUTH_ADMIN,        /* the admin token */
	AUTH_ANY_SVID,     /* any valid proxy SVID (or the admin token) */
	AUTH_SVC_SVID,     /* an SVID of the service in the path */
	AUTH_SVC_OR_ADMIN, /* an SVID of the service in the path, or the admin token */
	AUTH_ISSUE,        /* a join token (checked by the handler) or any SVID */
};

struct api_call {
	struct control_server *srv;
	struct control_state *st;
	struct watch *watch;
	struct evhttp_request *req;
	struct evhttp_connection *evcon;
	struct timespec start;
	const struct route *route;     /* the route matched, NULL until (or unless) one is */
	const char *method;            /* "GET", ... (static) */
	char path[256];                /* request path, for the log */
	const char *query;             /* raw query string or NULL (owned by req) */
	char svc[64];                  /* the {svc} of the path, "" if none */
	json_t *body;                  /* parsed body for routes that take one */

	enum caller_kind caller;
	const char *bearer;            /* Bearer credential (owned by req), or NULL */
	char caller_id[SERVER_CALLER_MAX];   /* for the log: "admin", "token:<svc>", the ID */
	char peer_svc[SERVICE_NAME_MAX + 1]; /* CALLER_SVID: its service */
	char peer_serial[CA_SERIAL_HEX_MAX]; /* CALLER_SVID: its certificate's serial */
	int64_t peer_not_after;
	char remote[64];               /* "ip:port" of the client */

	int status;                    /* answer: 2xx with out, or an error in err */
	json_t *out;
	char etag[32];
	struct api_error err;
};

struct route {
	const char *method;
	const char *pattern;           /* "{svc}" captures one segment into call->svc */
	enum route_auth auth;
	bool body;                     /* takes a JSON object body */
	int (*handler)(struct api_call *call);
};

/* Fills *l with the defaults. */
void server_limits_default(struct server_limits *l);

/* The connections kept from long polls out of max_conns. */
size_t server_limits_reserve(size_t max_conns);

/*
 * Checks *l and fills in polls_total when 0. Refuses (-EINVAL, err names
 * the flag) zero limits, more connections than SERVER_MAX_CONNS_LIMIT, and long
 * polls that would eat into the reserve.
 */
int server_limits_check(struct server_limits *l, struct meshlet_err *err);

/*
 * Sets everything up: TLS context from the state's signing root, evhttp
 * bound to o->listen, limits (lim, checked; the connection limit may be
 * lowered to what the open-files limit allows, and the total of long polls
 * with it), signals (SIGTERM/SIGINT stop the loop), timers (certificate
 * renewal, housekeeping). Returns 0 and *out or a negative errno with err
 * set.
 */
int server_new(struct control_server **out, struct control_state *st,
               const struct control_opts *o, const struct server_limits *lim,
               struct meshlet_err *err);

/* Runs the event loop until a stop signal. Returns 0. */
int server_run(struct control_server *srv);

/* Closes every connection, frees everything but the state. */
void server_free(struct control_server *srv);

/* Sends the answer of call (status + out, or err), logs it, frees call. */
void server_reply(struct api_call *call);

/* The client of a kept call went away: logs it (status 499), frees call. */
void server_abort(struct api_call *call);

/* The bundle or the signing root changed: new connections get a new
 * context (new server certificate, new client roots). */
void server_tls_changed(struct control_server *srv);

/* The long-poll waiters (watch.h). */
struct watch *server_watch(struct control_server *srv);

/* Control's own metrics (ctlmetrics.h). */
struct ctlmetrics *server_metrics(struct control_server *srv);

/* The proxies' counter summaries (stats.h). */
struct stats *server_stats(struct control_server *srv);

/* "host:port", "[v6]:port" into host and port (an empty host is 0.0.0.0).
 * Returns 0 or -EINVAL. */
int server_split_listen(const char *s, char *host, size_t hlen, uint16_t *port);

/* The state the server serves (for timers that outlive a call). */
struct control_state *server_state(struct control_server *srv);

#endif
