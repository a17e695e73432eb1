/* server: evhttp over TLS, limits, routing, authentication, access log; see server.h. */
#include "server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "meshlet/http.h"
#include "meshlet/log.h"
#include "ctlmetrics.h"
#include "gate.h"
#include "handlers.h"
#include "stats.h"
#include "watch.h"

/* How often the server certificate's age and the housekeeping are looked at. */
#define SERVER_TICK 60
/* After a stop signal, how long answers already queued get to be written. */
#define SERVER_STOP_GRACE_MS 200
/* File descriptors kept for the store, logs and the listener. */
#define SERVER_SPARE_FDS 64
/* Request line limit of the gate (evhttp's own is the header limit). */
#define SERVER_MAX_LINE 8192
#define STR_(x) #x
#define STR(x) STR_(x)
#define SERVER_RETRY_AFTER_STR STR(SERVER_RETRY_AFTER)

/* One TLS connection, attached to its SSL as ex-data and freed with it. */
struct ctl_conn {
	struct control_server *srv;
	struct ctl_conn *prev, *next;  /* srv->conns, oldest first */
	struct bufferevent *bev;       /* TLS; evhttp holds the gate on top of it */
	struct event *deadline;
	bool busy;                     /* a request is being handled (or waits) */
	bool waiting;                  /* a long poll waits: I/O timeout lifted */
	bool evicted;                  /* shut to make room (conn_make_room) */
	bool checked;                  /* peer identity below filled in */
	bool has_svid;
	/* The SVID's ID and service, kept small: one of these lives per
	 * waiting proxy (a struct spiffe_id is 2.4 KB). */
	char *uri;
	char service[SERVICE_NAME_MAX + 1];
	char serial[CA_SERIAL_HEX_MAX];
	int64_t not_after;
	int refused;                   /* why the handshake refused its certificate */
	struct gate gate;              /* between TLS and evhttp: heads before bodies */
};

struct control_server {
	struct event_base *base;
	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	struct evconnlistener *listener;
	SSL_CTX *ctx;                  /* for new connections */
	int64_t cert_renew_at;         /* when to issue the next server certificate */
	int64_t cert_not_after;        /* the current server certificate's expiry */
	struct control_state *st;
	const struct control_opts *o;
	struct watch *watch;
	struct ctlmetrics *metrics;
	struct stats *stats;           /* the proxies' counter summaries */
	struct event *sigterm, *sigint, *tick;
	size_t n_conns;
	uint64_t n_accepted;           /* connections accepted since start (metrics) */
	struct ctl_conn *conns, *conns_tail;   /* every connection, oldest first */
	struct server_limits lim;
	size_t max_conns;              /* lim.max_conns, or less if few fds */
	bool paused;                   /* accepting paused at max_conns */
	struct event *resume;          /* re-enables accepting after EMFILE */
	bool stopping;
};

static int conn_index = -1;

/* ---- connections ---- */

static void conn_resume_accepting(struct control_server *srv)
{
	if (srv->paused && !srv->stopping && srv->n_conns < srv->max_conns && srv->listener) {
		evconnlistener_enable(srv->listener);
		srv->paused = false;
		log_info("accepting connections again (%zu open)", srv->n_conns);
	}
}

/* Ex-data free callback: the SSL (and so the connection) is going away. */
static void conn_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                      void *argp)
{
	struct ctl_conn *c = ptr;

	if (!c)
		return;
	if (c->refused)
		log_info("TLS handshake refused a client certificate: %s",
		         identity_reason_str((enum identity_reason)c->refused));
	if (c->deadline)
		event_free(c->deadline);
	gate_cleanup(&c->gate);
	free(c->uri);
	if (c->prev)
		c->prev->next = c->next;
	else
		c->srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	else
		c->srv->conns_tail = c->prev;
	c->srv->n_conns--;
	conn_resume_accepting(c->srv);
	free(c);
}

/* No complete request within the deadline: shut the socket so that evhttp
 * sees EOF and closes the connection through its own path. */
static void conn_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct ctl_conn *c = arg;
	evutil_socket_t s = bufferevent_getfd(c->bev);

	if (c->busy || s < 0)
		return;
	log_debug("connection without a complete request for %ds: closing", SERVER_REQUEST_DEADLINE);
	shutdown(s, SHUT_RDWR);
}

static void conn_arm(struct ctl_conn *c)
{
	struct timeval tv = { SERVER_REQUEST_DEADLINE, 0 };

	evtimer_add(c->deadline, &tv);
}

/* Verifies a presented client certificate during the handshake: a chain to
 * a root of the bundle (OpenSSL), then an SVID of our trust domain naming a
 * service, for a client, not revoked. Anything else fails the handshake. */
static int verify_cb(int ok, X509_STORE_CTX *xs)
{
	SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
	struct ctl_conn *c = ssl ? SSL_get_ex_data(ssl, conn_index) : NULL;
	struct spiffe_id id;
	char serial[CA_SERIAL_HEX_MAX];
	enum identity_reason r;
	X509 *leaf;

	if (!c)
		return 0;
	if (!ok) {
		log_info("TLS handshake refused a client certificate: %s",
		         X509_verify_cert_error_string(X509_STORE_CTX_get_error(xs)));
		return 0;
	}
	if (X509_STORE_CTX_get_error_depth(xs) != 0)
		return 1;
	leaf = X509_STORE_CTX_get_current_cert(xs);
	r = identity_check_svid(leaf, state_trust_domain(c->srv->st), ROLE_CLIENT, &id);
	if (r == ID_OK && id.service[0] == '\0')
		r = ID_NOT_A_SERVICE;
	if (r == ID_OK && (ca_serial_hex(leaf, serial) < 0 || state_is_revoked(c->srv->st, serial)))
		r = ID_REVOKED;
	if (r != ID_OK) {
		c->refused = (int)r;
		X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
		return 0;
	}
	return 1;
}

static int gate_judge(void *arg, const struct http_head *h, const char *authz,
                      struct api_error *ae);

/*
 * The connection table is full. Long polls cannot fill it (they are capped
 * below the limit, watch.c), so some connections are idle: handshaking, or
 * between requests. Shut the oldest of them so that a new connection (an
 * admin call, a proxy's handshake) gets in; evhttp sees EOF and frees it.
 * Returns false when every connection is busy with a request.
 */
static bool conn_make_room(struct control_server *srv)
{
	for (struct ctl_conn *c = srv->conns; c; c = c->next) {
		evutil_socket_t fd = bufferevent_getfd(c->bev);

		if (c->busy || c->evicted || fd < 0)
			continue;
		c->evicted = true;
		log_debug("%zu connections open: closing the oldest idle one", srv->n_conns);
		shutdown(fd, SHUT_RDWR);
		return true;
	}
	return false;
}

/* evhttp asks for each accepted connection's bufferevent: TLS, and on top
 * of it the gate (gate_in). It must not get NULL (evhttp would then speak
 * plain HTTP), so allocation failures abort. */
static struct bufferevent *server_bevcb(struct event_base *base, void *arg)
{
	struct control_server *srv = arg;
	struct ctl_conn *c = calloc(1, sizeof(*c));
	SSL *ssl = SSL_new(srv->ctx);
	struct bufferevent *bev, *gate;
	struct http_limits lim = { .max_line = SERVER_MAX_LINE,
	                           .max_header_bytes = SERVER_MAX_HEADERS };

	if (!c || !ssl) {
		log_error("out of memory accepting a connection");
		abort();
	}
	c->srv = srv;
	srv->n_conns++;
	srv->n_accepted++;
	SSL_set_ex_data(ssl, conn_index, c);     /* conn_free() from now on */
	bev = bufferevent_openssl_socket_new(base, -1, ssl, BUFFEREVENT_SSL_ACCEPTING,
	                                     BEV_OPT_CLOSE_ON_FREE);
	c->deadline = evtimer_new(base, conn_deadline, c);
	gate_init(&c->gate, &lim, bev, gate_judge, c);
	gate = bev ? bufferevent_filter_new(bev, gate_in, NULL, BEV_OPT_CLOSE_ON_FREE, NULL,
	                                    &c->gate) : NULL;
	if (!bev || !c->deadline || !gate) {
		log_error("out of memory accepting a connection");
		abort();
	}
	c->bev = bev;
	c->prev = srv->conns_tail;
	if (srv->conns_tail)
		srv->conns_tail->next = c;
	else
		srv->conns = c;
	srv->conns_tail = c;
	bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
	conn_arm(c);
	/* Full: make room from the idle; pause accepting only when nothing is
	 * idle, or when closing cannot keep up (the spare file descriptors). */
	if (srv->n_conns > srv->max_conns &&
	    (!conn_make_room(srv) || srv->n_conns >= srv->max_conns + SERVER_SPARE_FDS / 2) &&
	    !srv->paused && srv->listener) {
		evconnlistener_disable(srv->listener);
		srv->paused = true;
		log_warn("%zu connections open: not accepting more until some close",
		         srv->max_conns);
	}
	return gate;
}

static struct ctl_conn *conn_of(struct evhttp_connection *evcon)
{
	struct bufferevent *gate = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
	struct bufferevent *bev = gate ? bufferevent_get_underlying(gate) : NULL;
	SSL *ssl = bev ? bufferevent_openssl_get_ssl(bev) : NULL;

	return ssl ? SSL_get_ex_data(ssl, conn_index) : NULL;
}

/* The verified client SVID of the connection, looked at once. */
static void conn_identify(struct ctl_conn *c)
{
	SSL *ssl = bufferevent_openssl_get_ssl(c->bev);
	X509 *leaf = ssl ? SSL_get0_peer_certificate(ssl) : NULL;
	struct spiffe_id id;

	if (c->checked)
		return;
	c->checked = true;
	if (!leaf || SSL_get_verify_result(ssl) != X509_V_OK)
		return;
	if (identity_check_svid(leaf, state_trust_domain(c->srv->st), ROLE_CLIENT, &id) != ID_OK ||
	    ca_serial_hex(leaf, c->serial) < 0 || ca_cert_not_after(leaf, &c->not_after) < 0 ||
	    id.service[0] == '\0' || !(c->uri = strdup(id.uri)))
		return;
	snprintf(c->service, sizeof(c->service), "%s", id.service);
	c->has_svid = true;
}

/* accept() failed (EMFILE, ENFILE, ENOBUFS...): the pending connection
 * would make the listener fire again at once, so pause accepting a second. */
static struct control_server *accept_error_srv;

static void on_accept_error(struct evconnlistener *l, void *arg)
{
	/* arg is evhttp's (it owns the listener's callback argument), hence the
	 * one file-scope pointer to the process's only server. */
	struct control_server *srv = accept_error_srv;
	struct timeval tv = { 1, 0 };
	int e = EVUTIL_SOCKET_ERROR();

	if (!srv)
		return;
	log_warn("accept: %s (%zu connections open); pausing accepting for 1s", strerror(e),
	         srv->n_conns);
	evconnlistener_disable(l);
	evtimer_add(srv->resume, &tv);
}

static void on_resume(evutil_socket_t fd, short what, void *arg)
{
	struct control_server *srv = arg;

	if (!srv->stopping && !srv->paused)
		evconnlistener_enable(srv->listener);
}

/* Raises the open-files limit towards what max connections need, and
 * lowers the connection limit to what the files limit allows. */
static size_t conn_limit(size_t max)
{
	struct rlimit rl;
	rlim_t want = max + SERVER_SPARE_FDS;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return max;
	if (rl.rlim_cur < want) {
		rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
		setrlimit(RLIMIT_NOFILE, &rl);
		getrlimit(RLIMIT_NOFILE, &rl);
	}
	if (rl.rlim_cur >= want)
		return max;
	log_warn("open files limited to %llu: serving at most %llu connections",
	         (unsigned long long)rl.rlim_cur,
	         (unsigned long long)(rl.rlim_cur > 2 * SERVER_SPARE_FDS ?
	                              rl.rlim_cur - SERVER_SPARE_FDS : rl.rlim_cur / 2));
	return rl.rlim_cur > 2 * SERVER_SPARE_FDS ? (size_t)(rl.rlim_cur - SERVER_SPARE_FDS)
	                                          : (size_t)(rl.rlim_cur / 2);
}

/* ---- TLS context ---- */

/* The chain after control's certificate (see state_server_chain()). */
static int add_chain(SSL_CTX *ctx, const struct control_state *st)
{
	X509 *chain[2];
	size_t n = state_server_chain(st, chain);

	for (size_t i = 0; i < n; i++) {
		if (SSL_CTX_add1_chain_cert(ctx, chain[i]) != 1)
			return -1;
	}
	return 0;
}

static SSL_CTX *server_ctx_new(struct control_server *srv, struct meshlet_err *err)
{
	const struct ca *ca = state_signing_ca(srv->st);
	const char *sans[CONTROL_MAX_SANS + 3];
	size_t n = 0, n_roots;
	X509 *const *roots = state_roots(srv->st, &n_roots);
	EVP_PKEY *key = NULL;
	X509 *cert = NULL;
	SSL_CTX *ctx = NULL;
	static const char *const defaults[] = {"localhost", "127.0.0.1", "::1"};

	for (size_t i = 0; i < srv->o->n_sans; i++)
		sans[n++] = srv->o->sans[i];
	for (size_t i = 0; i < 3; i++) {
		bool dup = false;
		for (size_t j = 0; j < n; j++)
			dup = dup || strcasecmp(sans[j], defaults[i]) == 0;
		if (!dup)
			sans[n++] = defaults[i];
	}
	if (ca_new_key(&key) < 0) {
		err_set(err, "", "cannot generate the server key");
		goto fail;
	}
	if (ca_issue_server(ca, key, sans, n, SERVER_CERT_TTL, &cert, NULL, err) < 0)
		goto fail;
	ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
	    SSL_CTX_use_certificate(ctx, cert) != 1 || SSL_CTX_use_PrivateKey(ctx, key) != 1 ||
	    SSL_CTX_check_private_key(ctx) != 1 ||
	    add_chain(ctx, srv->st) < 0) {
		err_set(err, "", "cannot build the TLS context: %s",
		        ERR_reason_error_string(ERR_peek_last_error()));
		goto fail;
	}
	for (size_t i = 0; i < n_roots; i++) {
		if (X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), roots[i]) != 1 ||
		    SSL_CTX_add_client_CA(ctx, roots[i]) != 1) {
			err_set(err, "", "cannot add a root to the TLS context");
			goto fail;
		}
	}
	/* Client certificates are optional; a presented one must verify. */
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, verify_cb);
	SSL_CTX_set_verify_depth(ctx, 2);
	/* No resumption: every connection's certificate is checked afresh
	 * against the current bundle and revocation list. */
	SSL_CTX_set_num_tickets(ctx, 0);
	SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	srv->cert_renew_at = (int64_t)time(NULL) + SERVER_CERT_TTL / 2;
	if (ca_cert_not_after(cert, &srv->cert_not_after) < 0)
		srv->cert_not_after = (int64_t)time(NULL) + SERVER_CERT_TTL;
	EVP_PKEY_free(key);
	X509_free(cert);
	ERR_clear_error();
	return ctx;
fail:
	ERR_clear_error();
	SSL_CTX_free(ctx);
	EVP_PKEY_free(key);
	X509_free(cert);
	return NULL;
}

/* For watch_on_tls_changed(). */
static void tls_changed_cb(void *arg)
{
	server_tls_changed(arg);
}

void server_tls_changed(struct control_server *srv)
{
	struct meshlet_err err = {0};
	SSL_CTX *ctx = server_ctx_new(srv, &err);

	if (!ctx) {
		log_error("cannot renew the server TLS context: %s (keeping the current one)",
		          err.message);
		return;
	}
	SSL_CTX_free(srv->ctx);     /* live connections keep their reference */
	srv->ctx = ctx;
	log_info("server certificate renewed (by the signing root); new connections use it");
}

/* ---- answers and the access log ---- */

static double ms_since(const struct timespec *t0)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - t0->tv_sec) * 1e3 + (double)(now.tv_nsec - t0->tv_nsec) / 1e6;
}

static void access_log(struct api_call *call, int status, size_t bytes)
{
	char line[2048], path[600], caller[700], remote[140], ts[32];
	struct timespec now;
	int n;

	clock_gettime(CLOCK_REALTIME, &now);
	log_format_time(ts, sizeof(ts), (long long)now.tv_sec, now.tv_nsec);
	log_json_escape(path, sizeof(path), call->path);
	log_json_escape(caller, sizeof(caller), call->caller_id[0] ? call->caller_id : "anonymous");
	log_json_escape(remote, sizeof(remote), call->remote);
	n = snprintf(line, sizeof(line),
	             "{\"time\":\"%s\",\"type\":\"api\",\"method\":\"%s\",\"path\":\"%s\","
	             "\"caller\":\"%s\",\"remote\":\"%s\",\"status\":%d,\"bytes\":%zu,"
	             "\"duration_ms\":%.3f%s%s%s}",
	             ts, call->method, path, caller, remote, status, bytes, ms_since(&call->start),
	             status >= 400 ? ",\"error\":\"" : "",
	             status >= 400 ? api_status_code(status) : "", status >= 400 ? "\"" : "");
	if (n > 0)
		log_access(line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

static void call_free(struct api_call *call)
{
	json_decref(call->body);
	json_decref(call->out);
	free(call);
}

void server_reply(struct api_call *call)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(call->req);
	struct evbuffer *buf = evbuffer_new();
	json_t *doc = call->out;
	struct bufferevent *gate;
	struct ctl_conn *c;
	int status = call->status ? call->status : 500;
	char *text;
	size_t len = 0;

	if (status >= 400) {
		if (!call->err.status)
			api_fail(&call->err, status, "", "internal error");
		doc = api_error_body(&call->err);
		status = call->err.status;
	} else if (!doc) {
		doc = json_object();
	} else {
		json_incref(doc);
	}
	text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
	json_decref(doc);
	evhttp_add_header(h, "Content-Type", "application/json");
	evhttp_add_header(h, "Cache-Control", "no-store");
	if (call->etag[0])
		evhttp_add_header(h, "ETag", call->etag);
	if (status == 401)
		evhttp_add_header(h, "WWW-Authenticate", "Bearer realm=\"meshlet-control\"");
	if (status == 429)
		evhttp_add_header(h, "Retry-After", SERVER_RETRY_AFTER_STR);
	if (buf && text) {
		len = strlen(text);
		evbuffer_add(buf, text, len);
		evbuffer_add(buf, "\n", 1);
		len++;
	}
	free(text);
	access_log(call, status, len);
	ctlmetrics_request(call->srv ? call->srv->metrics : NULL, call->route, call->method, status);
	c = call->evcon ? conn_of(call->evcon) : NULL;
	if (c) {
		c->busy = false;
		conn_arm(c);
		if (c->waiting) {
			c->waiting = false;
			evhttp_connection_set_timeout(call->evcon, SERVER_IO_TIMEOUT);
		}
	}
	gate = call->evcon ? evhttp_connection_get_bufferevent(call->evcon) : NULL;
	evhttp_send_reply(call->req, status, NULL, buf);
	/* libevent 2.1's filter bufferevent (the gate) does not pass on output
	 * added while writing was disabled once it is enabled again, which is
	 * what evhttp_send_reply() does: push the answer through now. */
	if (gate)
		bufferevent_flush(gate, EV_WRITE, BEV_NORMAL);
	if (buf)
		evbuffer_free(buf);
	call_free(call);
}

void server_abort(struct api_call *call)
{
	access_log(call, 499, 0);
	ctlmetrics_request(call->srv ? call->srv->metrics : NULL, call->route, call->method, 499);
	/* The connection is being freed: nothing to re-arm. A request evhttp detached from its failed connection is ours to free;
	 * one still attached is freed by evhttp with the connection. */
	if (evhttp_request_get_connection(call->req) == NULL)
		evhttp_request_free(call->req);
	call_free(call);
}

static int call_error(struct api_call *call, int status, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int call_error(struct api_call *call, int status, const char *path, const char *fmt, ...)
{
	va_list ap;

	call->err.status = status;
	snprintf(call->err.e.path, sizeof(call->err.e.path), "%s", path);
	va_start(ap, fmt);
	vsnprintf(call->err.e.message, sizeof(call->err.e.message), fmt, ap);
	va_end(ap);
	call->status = status;
	return -status;
}

/* ---- routing and authentication ---- */

static const char *method_name(enum evhttp_cmd_type m)
{
	switch (m) {
	case EVHTTP_REQ_GET: return "GET";
	case EVHTTP_REQ_POST: return "POST";
	case EVHTTP_REQ_HEAD: return "HEAD";
	case EVHTTP_REQ_PUT: return "PUT";
	case EVHTTP_REQ_DELETE: return "DELETE";
	case EVHTTP_REQ_OPTIONS: return "OPTIONS";
	case EVHTTP_REQ_PATCH: return "PATCH";
	default: return "OTHER";
	}
}

/* Finds the route; 404 or 405 (with Allow) in call when none fits. */
static const struct route *route_find(struct api_call *call, const char *path)
{
	const char *m = strcmp(call->method, "HEAD") == 0 ? "GET" : call->method;
	char caps[1][64], allow[64] = "";
	bool path_known = false;

	for (const struct route *r = handlers_routes; r->method; r++) {
		caps[0][0] = '\0';
		if (!api_route_match(r->pattern, path, caps, 1))
			continue;
		path_known = true;
		if (strcmp(r->method, m) == 0) {
			snprintf(call->svc, sizeof(call->svc), "%s", caps[0]);
			call->route = r;
			return r;
		}
		if (strlen(allow) + strlen(r->method) + 3 < sizeof(allow))
			snprintf(allow + strlen(allow), sizeof(allow) - strlen(allow), "%s%s",
			         allow[0] ? ", " : "", r->method);
	}
	if (!path_known) {
		call_error(call, 404, "", "no such API path: %s", path);
		return NULL;
	}
	if (call->req)
		evhttp_add_header(evhttp_request_get_output_headers(call->req), "Allow", allow);
	call_error(call, 405, "", "%s is not allowed on %s (allowed: %s)", call->method, path, allow);
	return NULL;
}

/* Establishes who is calling: the Bearer credential h (the Authorization
 * field, or NULL) and the SVID. */
static int authenticate(struct api_call *call, struct ctl_conn *c, const char *h)
{
	if (h) {
		if (strncasecmp(h, "Bearer ", 7) != 0)
			return call_error(call, 401, "Authorization", "use Authorization: Bearer <token>");
		h += 7;
		while (*h == ' ')
			h++;
		if (!*h)
			return call_error(call, 401, "Authorization", "empty bearer token");
		call->bearer = h;
		if (state_admin_ok(call->st, h)) {
			call->caller = CALLER_ADMIN;
			snprintf(call->caller_id, sizeof(call->caller_id), "admin");
			return 0;
		}
	}
	conn_identify(c);
	if (c->has_svid) {
		/* An SVID's ID fits: its service and trust domain are bounded. */
		snprintf(call->caller_id, sizeof(call->caller_id), "%.*s",
		         (int)sizeof(call->caller_id) - 1, c->uri);
		if (c->not_after <= (int64_t)time(NULL))
			return call_error(call, 401, "", "your SVID expired; reconnect with a valid one "
			                  "or join again with a token");
		if (state_is_revoked(call->st, c->serial))
			return call_error(call, 403, "", "your SVID (serial %s) is revoked", c->serial);
		call->caller = CALLER_SVID;
		snprintf(call->peer_svc, sizeof(call->peer_svc), "%s", c->service);
		snprintf(call->peer_serial, sizeof(call->peer_serial), "%s", c->serial);
		call->peer_not_after = c->not_after;
	}
	return 0;
}

/* Applies the route's rule: 401 without credentials, 403 with the wrong ones. */
static int authorize(struct api_call *call, const struct route *r)
{
	bool svid = call->caller == CALLER_SVID, admin = call->caller == CALLER_ADMIN;
	bool creds = svid || admin || call->bearer;

	switch (r->auth) {
	case AUTH_NONE:
		return 0;
	case AUTH_ADMIN:
		if (admin)
			return 0;
		if (!creds)
			return call_error(call, 401, "", "this needs the admin token "
			                  "(Authorization: Bearer <admin.token>)");
		return call_error(call, 403, "", call->bearer ? "wrong admin token" :
		                  "this needs the admin token; an SVID does not grant it");
	case AUTH_ANY_SVID:
		if (svid || admin)
			return 0;
		break;
	case AUTH_SVC_OR_ADMIN:
		if (admin)
			return 0;
		/* fall through */
	case AUTH_SVC_SVID:
		if (svid && strcmp(call->peer_svc, call->svc) == 0)
			return 0;
		if (svid)
			return call_error(call, 403, "", "an SVID of %s may not act for service %s",
			                  call->peer_svc, call->svc);
		break;
	case AUTH_ISSUE:
		if (svid || (call->bearer && !admin))
			return 0;
		if (admin)
			return call_error(call, 403, "", "the admin token cannot obtain SVIDs; create a "
			                  "join token (POST /v1/tokens) for the service");
		return call_error(call, 401, "", "this needs a join token (Authorization: Bearer "
		                  "<token>) or a client certificate (your SVID)");
	}
	if (!creds)
		return call_error(call, 401, "", "this needs a client certificate: the SVID of a proxy "
		                  "of %s", call->svc[0] ? call->svc : "the mesh");
	return call_error(call, 403, "", "this needs a client certificate: the SVID of a proxy of %s",
	                  call->svc[0] ? call->svc : "the mesh");
}


/* ---- what the gate asks (gate.h) ---- */

/* The largest body a caller may send before its credential is proven: a
 * join token is checked by the handler, and a CSR is well under 16 KiB. */
#define GATE_TOKEN_BODY_MAX (16 * 1024)

/* The gate's judge of a head with a body: it needs a route that takes one,
 * a caller that route accepts, and Content-Length within API_BODY_MAX. */
static int gate_judge(void *arg, const struct http_head *h, const char *authz,
                      struct api_error *ae)
{
	struct ctl_conn *c = arg;
	struct api_call call = {0};
	const struct route *r;
	uint64_t max;

	call.srv = c->srv;
	call.st = c->srv->st;
	call.method = h->method;
	r = route_find(&call, h->path);
	if (r && authenticate(&call, c, authz) == 0 && authorize(&call, r) == 0 && !r->body)
		call_error(&call, 400, "", "%s %s takes no body", h->method, h->path);
	if (call.err.status) {
		*ae = call.err;
		return ae->status;
	}
	max = call.caller == CALLER_ANONYMOUS ? GATE_TOKEN_BODY_MAX : API_BODY_MAX;
	if (h->content_length > max)
		return gate_fail(ae, 413, "the body is %llu bytes; at most %llu are accepted%s",
		                 (unsigned long long)h->content_length, (unsigned long long)max,
		                 call.caller == CALLER_ANONYMOUS ? " before a join token is checked"
		                                                 : "");
	return 0;
}

/* Reads and parses the JSON body: 413 past API_BODY_MAX, 400 if not JSON. */
static int read_body(struct api_call *call)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(call->req);
	size_t len = evbuffer_get_length(in);
	struct meshlet_err e = {0};
	const char *text;

	if (len > API_BODY_MAX)
		return call_error(call, 413, "", "the body is %zu bytes; at most %d are accepted", len,
		                  API_BODY_MAX);
	if (len == 0) {
		call->body = json_object();
		return 0;
	}
	text = (const char *)evbuffer_pullup(in, (ev_ssize_t)len);
	if (!text)
		return call_error(call, 500, "", "out of memory");
	call->body = json_parse_strict(text, len, API_JSON_DEPTH, &e);
	if (!call->body)
		return call_error(call, 400, e.path, "the body is not acceptable JSON: %s", e.message);
	if (!json_is_object(call->body))
		return call_error(call, 400, "", "the body must be a JSON object");
	return 0;
}

static void server_handle(struct evhttp_request *req, void *arg)
{
	struct control_server *srv = arg;
	struct api_call *call = calloc(1, sizeof(*call));
	struct evhttp_connection *evcon = evhttp_request_get_connection(req);
	struct ctl_conn *c = conn_of(evcon);
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const struct route *r;
	const char *path;
	char *addr = NULL;
	ev_uint16_t port = 0;
	int ret;

	if (!call) {
		evhttp_send_error(req, 500, NULL);
		return;
	}
	clock_gettime(CLOCK_MONOTONIC, &call->start);
	call->srv = srv;
	call->st = srv->st;
	call->watch = srv->watch;
	call->req = req;
	call->evcon = evcon;
	call->method = method_name(evhttp_request_get_command(req));
	if (evcon) {
		evhttp_connection_get_peer(evcon, &addr, &port);
		snprintf(call->remote, sizeof(call->remote), strchr(addr ? addr : "", ':') ?
		         "[%s]:%u" : "%s:%u", addr ? addr : "?", (unsigned)port);
	}
	path = uri ? evhttp_uri_get_path(uri) : NULL;
	snprintf(call->path, sizeof(call->path), "%s", path ? path : "?");
	call->query = uri ? evhttp_uri_get_query(uri) : NULL;
	if (!c) {
		call_error(call, 500, "", "connection state lost");
		server_reply(call);
		return;
	}
	c->busy = true;
	evtimer_del(c->deadline);
	if (gate_refused(&c->gate, req, &call->err)) {
		call->status = call->err.status;
		server_reply(call);
		return;
	}
	if (!path || !*path) {
		call_error(call, 400, "", "bad request target");
		server_reply(call);
		return;
	}
	r = route_find(call, path);
	if (!r || authenticate(call, c, evhttp_find_header(evhttp_request_get_input_headers(req),
	                                                   "Authorization")) < 0 ||
	    authorize(call, r) < 0 ||
	    (r->body && read_body(call) < 0)) {
		server_reply(call);
		return;
	}
	if (call->svc[0] && !identity_valid_service(call->svc)) {
		call_error(call, 400, "service", "'%s' is not a service name", call->svc);
		server_reply(call);
		return;
	}
	ret = r->handler(call);
	if (ret == SERVER_ASYNC) {
		/* A long poll is bounded by its own wait (watch.c). On a kept-alive
		 * connection evhttp reads on while it waits, and its read timeout
		 * would end the wait after SERVER_IO_TIMEOUT (logged 499): lift it
		 * past the longest wait until the answer (server_reply). */
		c->waiting = true;
		evhttp_connection_set_timeout(call->evcon, API_WAIT_MAX + SERVER_IO_TIMEOUT);
		return;
	}
	if (ret < 0 && !call->err.status)
		call_error(call, 500, "", "internal error");
	if (ret < 0)
		call->status = call->err.status;
	server_reply(call);
}

/* ---- lifecycle ---- */

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct control_server *srv = arg;

	struct timeval grace = { 0, SERVER_STOP_GRACE_MS * 1000 };

	if (srv->stopping)
		return;
	srv->stopping = true;
	log_info("%s: stopping (answering %zu pending long poll(s))",
	         sig == SIGTERM ? "SIGTERM" : "SIGINT", watch_count(srv->watch));
	if (srv->listener)
		evconnlistener_disable(srv->listener);
	watch_flush(srv->watch);
	/* A moment for those answers to be written, then stop. */
	event_base_loopexit(srv->base, &grace);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
	struct control_server *srv = arg;
	bool changed = false;

	if ((int64_t)time(NULL) >= srv->cert_renew_at)
		server_tls_changed(srv);
	state_maintain(srv->st, &changed);
	if (changed)
		watch_notify(srv->watch, NULL);
}

int server_split_listen(const char *s, char *host, size_t hlen, uint16_t *port)
{
	const char *colon;
	char *end;
	long p;
	size_t n;

	if (s[0] == '[') {
		const char *close = strchr(s, ']');
		if (!close || close[1] != ':')
			return -EINVAL;
		n = (size_t)(close - s - 1);
		if (n >= hlen)
			return -EINVAL;
		memcpy(host, s + 1, n);
		colon = close + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon || (size_t)(colon - s) >= hlen)
			return -EINVAL;
		n = (size_t)(colon - s);
		memcpy(host, s, n);
	}
	host[n] = '\0';
	errno = 0;
	p = strtol(colon + 1, &end, 10);
	if (!colon[1] || *end || errno || p < 0 || p > 65535)
		return -EINVAL;
	if (!host[0])
		snprintf(host, hlen, "0.0.0.0");
	*port = (uint16_t)p;
	return 0;
}

static void log_bound(struct control_server *srv)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;

	if (getsockname(evhttp_bound_socket_get_fd(srv->bound), (struct sockaddr *)&ss, &len) < 0)
		return;
	if (ss.ss_family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&ss;
		inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
		port = ntohs(in->sin_port);
		log_info("listening on https://%s:%u (TLS 1.3)", host, port);
	} else if (ss.ss_family == AF_INET6) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
		inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
		port = ntohs(in6->sin6_port);
		log_info("listening on https://[%s]:%u (TLS 1.3)", host, port);
	}
}

/* What a scrape of control's metrics reads now (ctlmetrics_gauges_fn). */
static void metrics_gauges(void *arg, struct ctlmetrics_gauges *g)
{
	struct control_server *srv = arg;
	struct state_counts c;

	state_counts(srv->st, &c);
	g->long_polls = watch_count(srv->watch);
	g->connections = srv->n_conns;
	g->accepted = srv->n_accepted;
	g->proxies_polling = c.proxies_polling;
	g->revoked = c.revoked;
	g->roots = c.roots;
	g->ca_phase = c.phase;
	g->server_cert_expiry = srv->cert_not_after;
}

void server_limits_default(struct server_limits *l)
{
	l->max_conns = SERVER_MAX_CONNS;
	l->polls_per_cert = SERVER_POLLS_PER_CERT;
	l->polls_per_service = SERVER_POLLS_PER_SERVICE;
	l->polls_total = 0;
}

size_t server_limits_reserve(size_t max_conns)
{
	return max_conns / 8 > SERVER_MIN_RESERVE ? max_conns / 8 : SERVER_MIN_RESERVE;
}

int server_limits_check(struct server_limits *l, struct meshlet_err *err)
{
	size_t reserve = server_limits_reserve(l->max_conns);

	if (l->max_conns < 2 * SERVER_MIN_RESERVE || l->max_conns > SERVER_MAX_CONNS_LIMIT)
		return err_set(err, "max-connections", "must be %d..%d", 2 * SERVER_MIN_RESERVE,
		               SERVER_MAX_CONNS_LIMIT);
	if (l->polls_total == 0)
		l->polls_total = l->max_conns - reserve;
	if (l->polls_total > l->max_conns - reserve)
		return err_set(err, "max-polls", "must leave %zu of the %zu connections for admin "
		               "calls and handshakes: at most %zu", reserve, l->max_conns,
		               l->max_conns - reserve);
	if (l->polls_per_cert == 0 || l->polls_per_service == 0)
		return err_set(err, l->polls_per_cert ? "max-polls-per-service" : "max-polls-per-cert",
		               "must be at least 1");
	return 0;
}

int server_new(struct control_server **out, struct control_state *st,
               const struct control_opts *o, const struct server_limits *lim,
               struct meshlet_err *err)
{
	struct control_server *srv = calloc(1, sizeof(*srv));
	struct timeval io = { SERVER_IO_TIMEOUT, 0 }, tick = { SERVER_TICK, 0 };
	char host[256];
	uint16_t port;

	*out = NULL;
	if (!srv)
		return err_set(err, "", "out of memory");
	srv->st = st;
	srv->o = o;
	srv->lim = *lim;
	if (server_limits_check(&srv->lim, err) < 0)
		goto fail;
	srv->max_conns = conn_limit(srv->lim.max_conns);
	if (srv->lim.polls_total > srv->max_conns - server_limits_reserve(srv->max_conns))
		srv->lim.polls_total = srv->max_conns - server_limits_reserve(srv->max_conns);
	if (conn_index < 0)
		conn_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, conn_free);
	if (conn_index < 0) {
		err_set(err, "", "OpenSSL ex-data index");
		goto fail;
	}
	if (server_split_listen(o->listen, host, sizeof(host), &port) < 0) {
		err_set(err, "listen", "'%s' is not host:port (or [v6]:port)", o->listen);
		goto fail;
	}
	srv->ctx = server_ctx_new(srv, err);
	if (!srv->ctx)
		goto fail;
	srv->base = event_base_new();
	srv->http = srv->base ? evhttp_new(srv->base) : NULL;
	srv->watch = srv->base ? watch_new(srv->base, st, handlers_config_done) : NULL;
	if (!srv->http || !srv->watch) {
		err_set(err, "", "out of memory");
		goto fail;
	}
	watch_on_tls_changed(srv->watch, tls_changed_cb, srv);
	srv->metrics = ctlmetrics_new(handlers_routes);
	srv->stats = stats_new();
	if (!srv->metrics || !srv->stats) {
		err_set(err, "", "out of memory");
		goto fail;
	}
	state_set_store_observer(st, ctlmetrics_store_observe, srv->metrics);
	if (o->metrics_listen && ctlmetrics_listen(srv->metrics, srv->base, o->metrics_listen,
	                                           metrics_gauges, srv, err) < 0)
		goto fail;
	watch_set_limits(srv->watch, srv->lim.polls_per_cert, srv->lim.polls_per_service,
	                 srv->lim.polls_total);
	log_info("limits: %zu connections (%zu never used by long polls); long polls at most %zu "
	         "per certificate, %zu per service, %zu in all", srv->max_conns,
	         srv->max_conns - srv->lim.polls_total, srv->lim.polls_per_cert,
	         srv->lim.polls_per_service, srv->lim.polls_total);
	evhttp_set_bevcb(srv->http, server_bevcb, srv);
	evhttp_set_gencb(srv->http, server_handle, srv);
	evhttp_set_max_headers_size(srv->http, SERVER_MAX_HEADERS);
	/* The gate refuses larger bodies from their heads; this is a backstop. */
	evhttp_set_max_body_size(srv->http, API_BODY_MAX);
	evhttp_set_timeout_tv(srv->http, &io);
	evhttp_set_allowed_methods(srv->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST |
	                                      EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
	                                      EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
	evhttp_set_default_content_type(srv->http, "application/json");
	srv->bound = evhttp_bind_socket_with_handle(srv->http, host, port);
	if (!srv->bound) {
		err_set(err, "listen", "cannot listen on %s: %s", o->listen, strerror(errno));
		goto fail;
	}
	srv->listener = evhttp_bound_socket_get_listener(srv->bound);
	{
		/* Accepted sockets inherit it: no Nagle delay between an answer's
		 * TLS records (a 40 ms stall per request against delayed ACKs). */
		int one = 1;
		setsockopt(evhttp_bound_socket_get_fd(srv->bound), IPPROTO_TCP, TCP_NODELAY, &one,
		           sizeof(one));
	}
	srv->sigterm = evsignal_new(srv->base, SIGTERM, on_signal, srv);
	srv->sigint = evsignal_new(srv->base, SIGINT, on_signal, srv);
	srv->tick = event_new(srv->base, -1, EV_PERSIST, on_tick, srv);
	srv->resume = evtimer_new(srv->base, on_resume, srv);
	if (srv->listener) {
		accept_error_srv = srv;
		evconnlistener_set_error_cb(srv->listener, on_accept_error);
	}
	if (!srv->sigterm || !srv->sigint || !srv->tick || !srv->resume || evsignal_add(srv->sigterm, NULL) < 0 ||
	    evsignal_add(srv->sigint, NULL) < 0 || evtimer_add(srv->tick, &tick) < 0) {
		err_set(err, "", "cannot set up signals and timers");
		goto fail;
	}
	signal(SIGPIPE, SIG_IGN);
	log_bound(srv);
	*out = srv;
	return 0;
fail:
	server_free(srv);
	return -EINVAL;
}

int server_run(struct control_server *srv)
{
	event_base_dispatch(srv->base);
	return 0;
}

void server_free(struct control_server *srv)
{
	if (!srv)
		return;
	/* Connections first: their close callbacks end pending long polls. */
	srv->stopping = true;
	if (srv->http)
		evhttp_free(srv->http);
	watch_free(srv->watch);
	/* The state outlives the server and writes to the store on close. */
	if (srv->metrics)
		state_set_store_observer(srv->st, NULL, NULL);
	ctlmetrics_free(srv->metrics);
	stats_free(srv->stats);
	if (srv->sigterm)
		event_free(srv->sigterm);
	if (srv->sigint)
		event_free(srv->sigint);
	if (srv->tick)
		event_free(srv->tick);
	if (srv->resume)
		event_free(srv->resume);
	if (accept_error_srv == srv)
		accept_error_srv = NULL;
	SSL_CTX_free(srv->ctx);
	if (srv->base)
		event_base_free(srv->base);
	free(srv);
}

struct watch *server_watch(struct control_server *srv)
{
	return srv->watch;
}

struct ctlmetrics *server_metrics(struct control_server *srv)
{
	return srv->metrics;
}

struct stats *server_stats(struct control_server *srv)
{
	return srv->stats;
}

struct control_state *server_state(struct control_server *srv)
{
	return srv->st;
}
