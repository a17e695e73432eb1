/*
 * conn: the per-connection state machine, the TLS <-> plain relay and the
 * one way out. The handshake lives in conn_tls.c, transparent destinations
 * in conn_tdest.c; what the bytes mean is the protocol's (c->proto).
 */
#include "conn-int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event_struct.h>
#include <openssl/err.h>

#include "meshlet/log.h"
#include "httpflow.h"
#include "tcpflow.h"

/* Buffers a worker keeps for reuse; more are returned to malloc. */
#define RELAY_FREE_MAX 64
/* Read/write rounds per wakeup before yielding to other connections. */
#define RELAY_ROUNDS 16

/* Shorter names for the readiness bits of conn-t.h. */
enum {
	PLAIN_R = CONN_PLAIN_R,
	PLAIN_W = CONN_PLAIN_W,
	TLS_R = CONN_TLS_R,
	TLS_W = CONN_TLS_W,
};

static const char *const state_names[] = {
	[CONN_HANDSHAKE] = "handshake",
	[CONN_AUTHORIZING] = "authorizing",
	[CONN_CONNECTING] = "connecting",
	[CONN_RELAYING] = "relaying",
	[CONN_LINGERING] = "lingering",
	[CONN_CLOSED] = "closed",
};

static const char *const reason_names[] = {
	[CR_DONE] = "done",
	[CR_DENIED] = "denied",
	[CR_HANDSHAKE_FAILED] = "handshake_failed",
	[CR_HANDSHAKE_TIMEOUT] = "handshake_timeout",
	[CR_UPSTREAM_REFUSED] = "upstream_refused",
	[CR_UPSTREAM_TIMEOUT] = "upstream_timeout",
	[CR_IDLE_TIMEOUT] = "idle_timeout",
	[CR_RESET] = "reset",
	[CR_TLS_ERROR] = "tls_error",
	[CR_DRAIN_TIMEOUT] = "drain_timeout",
	[CR_OVERLOAD] = "overload",
	[CR_INTERNAL] = "internal_error",
	[CR_EXPIRED_SESSION] = "expired_peer_certificate",
	[CR_REVOKED] = "peer_revoked",
	[CR_OUTSIDE_MESH] = "outside_mesh",
	[CR_FAULT] = "fault_injected",
};

const char *conn_reason_str(enum conn_reason r)
{
	return (size_t)r < sizeof(reason_names) / sizeof(reason_names[0]) ? reason_names[r] : "?";
}

static void conn_step(struct conn *c, bool tls_side);
static void linger_read(struct conn *c);
static void unhold_buffers(struct conn *c);
static void on_tls_event(evutil_socket_t fd, short what, void *arg);
static void on_plain_event(evutil_socket_t fd, short what, void *arg);
static void on_tls_timer(evutil_socket_t fd, short what, void *arg);
static void on_plain_timer(evutil_socket_t fd, short what, void *arg);

/* ---- buffers ---------------------------------------------------------- */

static struct relay_buf *buf_get(struct worker *w)
{
	struct relay_buf *b = w->free_bufs;

	if (b) {
		w->free_bufs = b->next;
		w->n_free_bufs--;
	} else {
		b = malloc(sizeof(*b));
		if (!b)
			return NULL;
	}
	b->off = b->len = 0;
	b->next = NULL;
	return b;
}

static void buf_put(struct worker *w, struct relay_buf *b)
{
	if (!b)
		return;
	if (w->n_free_bufs >= RELAY_FREE_MAX) {
		free(b);
		return;
	}
	b->next = w->free_bufs;
	w->free_bufs = b;
	w->n_free_bufs++;
}

void conn_free_buffers(struct worker *w)
{
	while (w->free_bufs) {
		struct relay_buf *b = w->free_bufs;

		w->free_bufs = b->next;
		free(b);
	}
	w->n_free_bufs = 0;
}

/* ---- helpers ---------------------------------------------------------- */

uint64_t conn_clock_ms(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
}

/*
 * Handshake, connect and lingering have a hard deadline: the event timer
 * alone would restart on every byte, so a peer trickling bytes would never
 * time out.
 */
void conn_set_deadline(struct conn *c, uint32_t ms)
{
	c->deadline = conn_clock_ms() + ms;
}

bool conn_past_deadline(const struct conn *c)
{
	return conn_clock_ms() >= c->deadline;
}

void conn_set_state(struct conn *c, enum conn_state s)
{
	log_debug("conn %llu: %s -> %s", (unsigned long long)c->id, state_names[c->state],
	          state_names[s]);
	c->state = s;
}

static void touch(struct conn *c)
{
	c->last_active = conn_clock_ms();
}

void conn_addr_text(const struct sockaddr_storage *ss, char *out, size_t len)
{
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;

	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)ss;

		inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
		port = ntohs(a->sin_port);
		snprintf(out, len, "%s:%u", host, port);
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;

		inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
		port = ntohs(a->sin6_port);
		snprintf(out, len, "[%s]:%u", host, port);
	} else {
		snprintf(out, len, "?");
	}
}

static const struct config_addr *conn_destination(const struct conn *c)
{
	const struct config *cfg = conn_cfg(c);

	if (c->inbound)
		return &cfg->inbound[c->listener].forward;
	if (c->tdest)
		return &c->tdest->addr;
	const struct snapshot_outbound *o = &c->snap->outbound[c->listener];

	if (o->n_endpoints == 0)
		return NULL;
	return &o->endpoints[c->endpoint];
}

void conn_source_text(const struct conn *c, char *out, size_t len)
{
	conn_addr_text(&c->from, out, len);
}

const char *conn_destination_text(const struct conn *c)
{
	const struct config_addr *a = conn_destination(c);

	return a ? a->text : "";
}

static double elapsed_ms(const struct timespec *since)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - since->tv_sec) * 1e3 + (double)(now.tv_nsec - since->tv_nsec) / 1e6;
}

uint64_t conn_bytes_from_client(const struct conn *c)
{
	return c->d[c->inbound ? RELAY_DOWN : RELAY_UP].bytes;
}

uint64_t conn_bytes_to_client(const struct conn *c)
{
	return c->d[c->inbound ? RELAY_UP : RELAY_DOWN].bytes;
}

/* One JSON line per connection: who, where, what was decided, how it ended. */
static void access_log(struct conn *c, enum conn_reason reason)
{
	char line[2048], when[40], from[80], peer[SPIFFE_ID_MAX * 2 + 8] = "null";
	char tls_err[96] = "null", rule[POLICY_RULE_NAME_MAX * 2 + 8] = "null";
	const struct config_addr *dest = conn_destination(c);
	int n;

	if (!conn_cfg(c)->access_log || c->proto->logged(c))
		return;
	log_format_time(when, sizeof(when), c->started_wall.tv_sec, c->started_wall.tv_nsec);
	conn_addr_text(&c->from, from, sizeof(from));
	if (c->peer) {
		peer[0] = '"';
		n = (int)log_json_escape(peer + 1, sizeof(peer) - 2, c->peer);
		snprintf(peer + 1 + n, sizeof(peer) - 1 - (size_t)n, "\"");
	}
	if (c->rule) {
		rule[0] = '"';
		n = (int)log_json_escape(rule + 1, sizeof(rule) - 2, c->rule);
		snprintf(rule + 1 + n, sizeof(rule) - 1 - (size_t)n, "\"");
	}
	if (c->tls_failure)
		snprintf(tls_err, sizeof(tls_err), "\"%s\"", tls_failure_str(c->tls_failure));
	n = snprintf(line, sizeof(line),
	             "{\"time\":\"%s\",\"conn\":%llu,\"direction\":\"%s\",\"protocol\":\"tcp\","
	             "\"source\":\"%s\",\"peer\":%s,\"destination\":\"%s\",\"decision\":%s%s%s,"
	             "\"rule\":%s,\"status\":\"%s\",\"tls_error\":%s,\"bytes_in\":%llu,"
	             "\"bytes_out\":%llu,\"duration_ms\":%.3f}",
	             when, (unsigned long long)c->id, c->inbound ? "inbound" : "outbound", from,
	             peer, dest ? dest->text : "", c->decided ? "\"" : "",
	             c->decided ? policy_action_str(c->decision) : "null", c->decided ? "\"" : "",
	             rule, conn_reason_str(reason), tls_err,
	             (unsigned long long)conn_bytes_from_client(c),
	             (unsigned long long)conn_bytes_to_client(c),
	             elapsed_ms(&c->started));
	if (n > 0 && (size_t)n < sizeof(line))
		log_access(line, (size_t)n);
}

/* ---- the one way out -------------------------------------------------- */

static void unlink_conn(struct conn *c)
{
	struct worker *w = c->w;

	if (c->prev)
		c->prev->next = c->next;
	else
		w->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	w->n_conns--;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

void conn_close(struct conn *c, enum conn_reason reason)
{
	struct worker *w = c->w;
	struct metrics *m = w->shared->metrics;

	if (reason != CR_DONE && reason != CR_DENIED)
		log_debug("conn %llu: closed in %s: %s", (unsigned long long)c->id,
		          state_names[c->state], conn_reason_str(reason));
	conn_set_state(c, CONN_CLOSED);
	access_log(c, reason);
	if (event_initialized(&c->tls_ev))
		event_del(&c->tls_ev);
	if (event_initialized(&c->plain_ev))
		event_del(&c->plain_ev);
	if (event_initialized(&c->tls_tev))
		event_del(&c->tls_tev);
	if (event_initialized(&c->plain_tev))
		event_del(&c->plain_tev);
	if (c->ssl) {
		/* A close_notify only when the handshake finished and we did not send one yet. */
		if (SSL_is_init_finished(c->ssl) && !c->d[RELAY_UP].dst_shut && reason != CR_RESET)
			SSL_shutdown(c->ssl);
		SSL_free(c->ssl);
		ERR_clear_error();
	}
	close_fd(&c->tls_fd);
	close_fd(&c->plain_fd);
	for (int d = 0; d < 2; d++) {
		buf_put(w, c->d[d].in);
		free(c->d[d].owned);
	}
	c->proto->release(c);
	unhold_buffers(c);
	conn_pick_release(c);
	free(c->tdest);
	metrics_add(&m->bytes_total[c->dir], c->d[RELAY_UP].bytes + c->d[RELAY_DOWN].bytes);
	atomic_fetch_sub_explicit(&m->connections_active[c->dir], 1, memory_order_relaxed);
	atomic_fetch_sub_explicit(&w->shared->open_conns, 1, memory_order_relaxed);
	unlink_conn(c);
	snapshot_unref(c->snap);
	free(c->peer);
	free(c);
	/* A draining worker's loop ends with its last connection. */
	if (w->draining && w->n_conns == 0)
		event_base_loopbreak(w->base);
}

void conn_close_all(struct worker *w, enum conn_reason reason)
{
	while (w->conns)
		conn_close(w->conns, reason);
}

void conn_drain(struct worker *w)
{
	struct conn *c = w->conns, *next;

	for (; c; c = next) {
		next = c->next;
		if (c->state == CONN_RELAYING && c->proto->drain(c))
			conn_close(c, CR_DONE);
	}
}

/* ---- deadlines and event registration ---------------------------------- */

#define LINGER_IDLE_MS 2000
#define LINGER_MAX_MS 10000

/*
 * When a side's timer must fire next (conn_clock_ms() time, 0: none): the
 * deadline of the current state. The timers are armed from this, and
 * on_timeout checks against this, so the two never disagree.
 */
static uint64_t side_due(const struct conn *c, bool tls_side)
{
	uint64_t due;

	switch (c->state) {
	case CONN_HANDSHAKE:
	case CONN_CONNECTING:
		return c->deadline;
	case CONN_RELAYING:
		due = c->proto->due(c, tls_side);
		return due ? due : c->last_active + conn_cfg(c)->timeouts.idle_ms;
	case CONN_LINGERING:
		due = c->last_active + LINGER_IDLE_MS;
		return due < c->deadline ? due : c->deadline;
	default:
		return 0;
	}
}

/*
 * Makes ev wait for exactly `what` (EV_READ/EV_WRITE, 0 = nothing), and
 * the side's timer tev wake up by `due` (conn_clock_ms() time, 0 = no
 * timer). ev stays persistent; changing its flags costs one epoll change,
 * keeping them costs nothing. The timer is an event of its own, one-shot:
 * a persistent event with a timeout has libevent re-add that timeout on
 * every wakeup (3% of a keep-alive request's instructions), and re-add it
 * for its whole first period, later than the deadline that asked for it.
 *
 * Deadlines are kept on conn_clock_ms() and only ever compared with it:
 * libevent arms a timer from its cached loop time, which lags the real
 * one, so a timer may fire a little early. It must never fire late, so it
 * is armed for exactly what is left until due; one that fires early is
 * re-armed for the rest (see on_timeout). *armed is when the current
 * timer ends (0: none). A timer that ends no later than due is kept: a
 * deadline that moved later (the idle one, on every byte) costs nothing
 * until the timer fires.
 */
static void watch(struct conn *c, struct event *ev, struct event *tev, short *reg,
                  uint64_t *armed, int fd, short what, uint64_t due, event_callback_fn cb,
                  event_callback_fn tcb)
{
	uint64_t now, left;
	struct timeval tv;

	if (what != *reg || !event_initialized(ev)) {
		if (event_initialized(ev))
			event_del(ev);
		event_assign(ev, c->w->base, fd, what | EV_PERSIST, cb, c);
		if (what)
			event_add(ev, NULL);
		*reg = what;
	}
	/* The steady state of a relaying connection returns here without
	 * touching libevent: this runs after every read and write. */
	if (due ? *armed && *armed <= due : !*armed)
		return;
	if (!event_initialized(tev))
		evtimer_assign(tev, c->w->base, tcb, c);
	*armed = 0;
	if (!due) {
		evtimer_del(tev);
		return;
	}
	now = conn_clock_ms();
	left = due > now ? due - now : 0;
	tv.tv_sec = (time_t)(left / 1000);
	tv.tv_usec = (suseconds_t)(left % 1000) * 1000;
	if (evtimer_add(tev, &tv) == 0)    /* a pending timer moves to tv */
		*armed = now + left;
}

void conn_watch_tls(struct conn *c, short what, uint64_t due)
{
	watch(c, &c->tls_ev, &c->tls_tev, &c->tls_reg, &c->tls_armed, c->tls_fd, what, due,
	      on_tls_event, on_tls_timer);
}

static void watch_plain(struct conn *c, short what, uint64_t due)
{
	watch(c, &c->plain_ev, &c->plain_tev, &c->plain_reg, &c->plain_armed, c->plain_fd, what,
	      due, on_plain_event, on_plain_timer);
}

/* ---- I/O on either side ------------------------------------------------ */

/*
 * The relay moves bytes between two sides: the plain socket and the TLS
 * one. These four calls hide which is which; they keep the readiness bits
 * (cleared on EAGAIN) and, for TLS, what OpenSSL waits for.
 * Results: > 0 bytes moved, 0 end of stream (reads), -EAGAIN, or another
 * negative errno on a fatal error.
 */
static short want_bit(short ev_flag)
{
	return ev_flag == EV_READ ? TLS_R : TLS_W;
}

static bool tls_ready_for(const struct conn *c, short wants)
{
	return (c->ready & want_bit(wants)) != 0;
}

static int ssl_result(struct conn *c, int rc, short *wants)
{
	switch (SSL_get_error(c->ssl, rc)) {
	case SSL_ERROR_WANT_READ:
		*wants = EV_READ;
		c->ready &= (uint8_t)~TLS_R;
		return -EAGAIN;
	case SSL_ERROR_WANT_WRITE:
		*wants = EV_WRITE;
		c->ready &= (uint8_t)~TLS_W;
		return -EAGAIN;
	case SSL_ERROR_ZERO_RETURN:
		return 0;
	case SSL_ERROR_SSL:
		/* A peer that closes TCP without close_notify ends its stream too. */
		if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
			ERR_clear_error();
			return 0;
		}
		return -EPROTO;
	default:
		return -EPROTO;
	}
}

/*
 * The "TLS side" is plain too for a transparent passthrough (no c->ssl):
 * then both sides use the socket calls, each with its own fd and bits.
 */
static int side_fd(const struct conn *c, bool tls)
{
	return tls ? c->tls_fd : c->plain_fd;
}

static uint8_t rbit(bool tls)
{
	return tls ? TLS_R : PLAIN_R;
}

static uint8_t wbit(bool tls)
{
	return tls ? TLS_W : PLAIN_W;
}

static bool io_readable(const struct conn *c, bool tls)
{
	if (!tls || !c->ssl)
		return (c->ready & rbit(tls)) != 0;
	/*
	 * Buffered bytes count only until SSL_read asked for the socket: they may
	 * be a partial record, which only more bytes from the peer complete.
	 */
	return tls_ready_for(c, c->ssl_read_wants) || (!c->ssl_starved && SSL_has_pending(c->ssl));
}

static bool io_writable(const struct conn *c, bool tls)
{
	return tls && c->ssl ? tls_ready_for(c, c->ssl_write_wants) : (c->ready & wbit(tls)) != 0;
}

static ssize_t io_read(struct conn *c, bool tls, char *buf, size_t len)
{
	ssize_t n;

	if (tls && c->ssl) {
		c->tls_drained = false;
		n = SSL_read(c->ssl, buf, (int)len);
		if (n <= 0) {
			n = ssl_result(c, (int)n, &c->ssl_read_wants);
			c->ssl_starved = n == -EAGAIN;
			return n;
		}
		c->ssl_read_wants = EV_READ;
		c->ssl_starved = false;
		/* Socket drained and nothing buffered: the next SSL_read would only get EAGAIN. */
		if (c->tls_drained && !SSL_has_pending(c->ssl))
			c->ready &= (uint8_t)~TLS_R;
		return n;
	}
	n = recv(side_fd(c, tls), buf, len, 0);
	if (n > 0 && (size_t)n < len)
		c->ready &= (uint8_t)~rbit(tls);    /* a short read drained the socket */
	if (n >= 0)
		return n;
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
		c->ready &= (uint8_t)~rbit(tls);
		return -EAGAIN;
	}
	return -errno;
}

static ssize_t io_write(struct conn *c, bool tls, const char *buf, size_t len)
{
	ssize_t n;

	if (tls && c->ssl) {
		n = SSL_write(c->ssl, buf, (int)len);
		if (n <= 0) {
			/*
			 * Once a close_notify came in, OpenSSL reports a failed
			 * write (EPIPE: the peer is gone) as ZERO_RETURN. For a
			 * write that is an end, not "0 bytes, try again": taken
			 * as progress it spun the loop at 100 % CPU.
			 */
			n = ssl_result(c, (int)n, &c->ssl_write_wants);
			return n == 0 ? -EPIPE : n;
		}
		c->ssl_write_wants = EV_WRITE;
		return n;
	}
	n = send(side_fd(c, tls), buf, len, MSG_NOSIGNAL);
	if (n > 0 && (size_t)n < len)
		c->ready &= (uint8_t)~wbit(tls);
	if (n >= 0)
		return n;
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
		c->ready &= (uint8_t)~wbit(tls);
		return -EAGAIN;
	}
	return -errno;
}

/* Passes EOF on: close_notify on TLS (a TLS 1.3 half-close), FIN on plain. */
static int io_shutdown(struct conn *c, bool tls)
{
	int rc;

	if (!tls || !c->ssl)
		return shutdown(side_fd(c, tls), SHUT_WR), 0;
	rc = SSL_shutdown(c->ssl);
	if (rc >= 0)
		return 0;
	rc = ssl_result(c, rc, &c->ssl_write_wants);
	ERR_clear_error();
	return rc == -EAGAIN ? -EAGAIN : 0;    /* a failed close_notify still ends our side */
}

/* ---- relay -------------------------------------------------------------- */

static bool src_is_tls(int d)
{
	return d == RELAY_DOWN;
}

/* The direction whose source is the upstream (the app inbound, the peer proxy outbound). */
static int upstream_dir(const struct conn *c)
{
	return c->inbound ? RELAY_UP : RELAY_DOWN;
}

/*
 * The one place a connection's protocol is chosen, from its listener.
 * Transparent connections are relayed as tcp: their protocol is unknown.
 */
static const struct conn_proto_ops *proto_of(const struct listener *l, const struct snapshot *s)
{
	enum listener_protocol p;

	if (l->kind == LISTENER_TRANSPARENT)
		return &tcpflow_ops;
	p = l->kind == LISTENER_INBOUND ? s->cfg->inbound[l->index].protocol
	                                : s->cfg->outbound[l->index].protocol;
	/* HTTP/1.1 first: httpflow switches to h2flow on the HTTP/2 preface. */
	return p == PROTO_HTTP ? &httpflow_ops : &tcpflow_ops;
}

/*
 * The upstream reset the connection (a read or a write failed): for a
 * protocol that still owes the client answers, nothing more goes to it
 * (its direction's dst_shut says so) and its end is the protocol's to
 * handle. Returns progress (1) or -1.
 */
static int upstream_lost(struct conn *c)
{
	struct relay_dir *to_up = &c->d[1 - upstream_dir(c)], *from_up = &c->d[upstream_dir(c)];

	to_up->dst_shut = true;
	to_up->out_len = 0;
	to_up->out = NULL;
	free(to_up->owned);
	to_up->owned = NULL;
	/* Whether the client is still read is the protocol's: HTTP/1.1 stops
	 * taking requests, HTTP/2 answers the streams still arriving. */
	log_info("conn %llu: %s reset the connection", (unsigned long long)c->id,
	         conn_destination_text(c));
	if (from_up->src_eof)
		return 1;
	from_up->src_eof = true;
	return c->proto->eof(c, upstream_dir(c)) < 0 ? -1 : 1;
}

/* Writes what direction d has pending. Returns progress (0/1) or -1 when closed. */
static int pump_write(struct conn *c, int d)
{
	struct relay_dir *r = &c->d[d];
	ssize_t n;

	if (!io_writable(c, !src_is_tls(d)))
		return 0;
	n = io_write(c, !src_is_tls(d), r->out, r->out_len);
	if (n == -EAGAIN)
		return 0;
	if (n < 0 && c->proto->answers_after_reset && d != upstream_dir(c))
		return upstream_lost(c);    /* d's sink is the upstream */
	if (n < 0)
		return conn_close(c, CR_RESET), -1;
	r->out += n;
	r->out_len -= (size_t)n;
	r->bytes += (uint64_t)n;
	if (r->out_len == 0) {
		free(r->owned);
		r->owned = NULL;
		r->out = NULL;
	}
	return 1;
}

/* Reads the next input of direction d. Returns progress (0/1) or -1 when closed. */
static int pump_read(struct conn *c, int d)
{
	struct relay_dir *r = &c->d[d];
	ssize_t n;

	uint32_t keep = 0;

	if (r->in && r->in->off < r->in->len && !r->need_more)
		return 0;    /* input not processed yet: produce() is blocked */
	if (!io_readable(c, src_is_tls(d)))
		return 0;
	if (!r->in && !(r->in = buf_get(c->w)))
		return conn_close(c, CR_INTERNAL), -1;
	if (r->need_more) {
		/* The protocol needs these bytes together with the next ones. */
		keep = r->in->len - r->in->off;
		memmove(r->in->data, r->in->data + r->in->off, keep);
	}
	r->in->off = 0;
	r->in->len = keep;
	n = io_read(c, src_is_tls(d), r->in->data + keep, sizeof(r->in->data) - keep);
	if (n > 0) {
		r->in->len = keep + (uint32_t)n;
		r->need_more = false;
		return 1;
	}
	if (keep && n == -EAGAIN)
		return 0;
	r->need_more = false;
	if (!keep) {
		buf_put(c->w, r->in);
		r->in = NULL;
	}
	if (n == -EAGAIN)
		return 0;
	if (n < 0 && !(c->proto->answers_after_reset && d == upstream_dir(c)))
		return conn_close(c, src_is_tls(d) ? CR_TLS_ERROR : CR_RESET), -1;
	if (n < 0)    /* a reset upstream is a gone upstream; the client is still owed answers */
		return upstream_lost(c);
	r->src_eof = true;
	return c->proto->eof(c, d) < 0 ? -1 : 1;
}

/* A NULL produce: what was read is what gets written, without a copy. */
static int produce_as_is(struct relay_dir *r)
{
	if (!r->in || r->in->off == r->in->len)
		return 0;
	r->out = r->in->data + r->in->off;
	r->out_len = r->in->len - r->in->off;
	r->in->off = r->in->len;
	return 1;
}

/*
 * Moves direction d forward as far as it goes without blocking: write what
 * is pending, else produce output from the input, else read. Returns
 * progress (0/1) or -1 when the connection was closed.
 */
static int pump(struct conn *c, int d)
{
	struct relay_dir *r = &c->d[d];
	int rc;

	if (r->out_len)
		return pump_write(c, d);
	/* Tested here rather than an indirect call: this runs on every
	 * wakeup of every tcp connection. */
	rc = c->proto->produce ? c->proto->produce(c, d) : produce_as_is(r);
	if (rc != 0)
		return rc;
	if (r->in && r->in->off == r->in->len) {
		buf_put(c->w, r->in);    /* fully relayed: an idle direction holds no buffer */
		r->in = NULL;
	}
	if (!r->src_eof && !r->paused)
		return pump_read(c, d);
	if (r->src_eof && !r->dst_shut && !c->closing) {
		rc = io_shutdown(c, !src_is_tls(d));
		if (rc == -EAGAIN)
			return 0;
		r->dst_shut = true;
		return 1;
	}
	return 0;
}

static bool dir_done(const struct relay_dir *r)
{
	return r->src_eof && r->dst_shut && r->out_len == 0;
}

/* What a side must wait for: reading as a source, writing as a sink. */
static short side_wants(const struct conn *c, bool tls)
{
	const struct relay_dir *src = &c->d[tls ? RELAY_DOWN : RELAY_UP];
	const struct relay_dir *dst = &c->d[tls ? RELAY_UP : RELAY_DOWN];
	short rd = tls && c->ssl ? c->ssl_read_wants : EV_READ;
	short wr = tls && c->ssl ? c->ssl_write_wants : EV_WRITE;
	short what = 0;

	if (!src->src_eof && !src->paused && !src->out_len &&
	    (!src->in || src->in->off == src->in->len || src->need_more) &&
	    !io_readable(c, tls))
		what |= rd;
	if ((dst->out_len || (dst->src_eof && !dst->dst_shut && !c->closing)) && !io_writable(c, tls))
		what |= wr;
	return what;
}

/* Registers for what the relay waits on; each side carries a timer (idle or HTTP's). */
static void relay_watch(struct conn *c)
{
	watch_plain(c, side_wants(c, false), side_due(c, false));
	conn_watch_tls(c, side_wants(c, true), side_due(c, true));
}

/*
 * Closing while the client may still be sending (a refused upload, a bad
 * request): closing a socket with unread input makes the kernel send a
 * reset, which can destroy our answer before the client read it. So: end
 * our sending side, drop the upstream, and read and discard what the client
 * still sends until it closes too, or LINGER_IDLE_MS passes quietly, or
 * LINGER_MAX_MS in all (nginx's lingering close).
 */
static void drop_upstream(struct conn *c)
{
	if (c->inbound) {
		watch_plain(c, 0, 0);
		close_fd(&c->plain_fd);
		return;
	}
	conn_watch_tls(c, 0, 0);
	if (c->ssl) {
		/*
		 * A best-effort close_notify: OpenSSL marks the session of a
		 * connection freed without one as not resumable, and our session
		 * cache holds that very session.
		 */
		if (SSL_is_init_finished(c->ssl))
			SSL_shutdown(c->ssl);
		ERR_clear_error();
		SSL_free(c->ssl);
		c->ssl = NULL;
	}
	close_fd(&c->tls_fd);
}

static void linger_start(struct conn *c)
{
	bool tls = c->inbound;    /* the client's side */

	conn_set_state(c, CONN_LINGERING);
	drop_upstream(c);
	io_shutdown(c, tls);
	shutdown(tls ? c->tls_fd : c->plain_fd, SHUT_WR);
	c->d[c->inbound ? RELAY_UP : RELAY_DOWN].dst_shut = true;
	conn_set_deadline(c, LINGER_MAX_MS);
	touch(c);
	c->ready |= tls ? TLS_R : PLAIN_R;
	if (tls)
		c->ssl_read_wants = EV_READ;
	linger_read(c);
}

static void linger_read(struct conn *c)
{
	bool tls = c->inbound;
	char sink[4096];
	ssize_t n = 0;

	for (int i = 0; i < 64; i++) {
		if (conn_past_deadline(c))
			break;
		n = io_read(c, tls, sink, sizeof(sink));
		if (n == -EAGAIN) {
			if (tls)
				conn_watch_tls(c, c->ssl_read_wants, side_due(c, true));
			else
				watch_plain(c, EV_READ, side_due(c, false));
			return;
		}
		if (n <= 0)
			break;
		touch(c);
	}
	if (!conn_past_deadline(c) && n > 0) {
		conn_kick(c);    /* more to discard: after the others had their turn */
		return;
	}
	conn_close(c, CR_DONE);
}

/*
 * Buffers while busy, none while idle. Releasing OpenSSL's record buffers
 * (about 17 KiB each way) and the protocol's whenever a wakeup ends costs
 * a free and a malloc per record on a keep-alive connection. So up to
 * HOLD_MAX connections per worker keep theirs, and the worker's quiet
 * timer releases them once the connection stayed quiet for QUIET_MS; any
 * more release at the end of each wakeup as before. The bound keeps a
 * burst of connections from growing the heap by their buffers (which
 * malloc would not give back once freed between live structs). The timer
 * runs only while some connection holds buffers: an idle worker sleeps.
 */
#define HOLD_MAX 64
#define QUIET_MS 1000

static void arm_quiet(struct worker *w)
{
	struct timeval tv = { .tv_sec = QUIET_MS / 1000, .tv_usec = (QUIET_MS % 1000) * 1000 };

	evtimer_add(w->quiet_ev, &tv);
}

static void release_buffers(struct conn *c)
{
	/* OpenSSL keeps a buffer holding part of a record: the rest of it
	 * is activity, which brings the connection back here. */
	if (c->ssl)
		SSL_free_buffers(c->ssl);
	c->proto->shrink(c);
}

static void unhold_buffers(struct conn *c)
{
	if (c->holds_buffers) {
		c->holds_buffers = false;
		c->w->n_holding--;
	}
}

/* The end of a wakeup: keep the buffers for the next one, or release them. */
static void hold_or_release(struct conn *c, bool progress)
{
	struct worker *w = c->w;

	if (c->holds_buffers)
		return;
	if (w->n_holding < HOLD_MAX) {
		c->holds_buffers = true;
		w->n_holding++;
		if (!evtimer_pending(w->quiet_ev, NULL))
			arm_quiet(w);
		return;
	}
	if (!progress && !c->d[RELAY_UP].out_len && !c->d[RELAY_DOWN].out_len)
		release_buffers(c);
}

void conn_release_quiet(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	uint64_t now = conn_clock_ms();

	for (struct conn *c = w->conns; c; c = c->next) {
		if (!c->holds_buffers)
			continue;
		if (c->state == CONN_RELAYING &&
		    (now - c->last_active < QUIET_MS || c->d[RELAY_UP].out_len ||
		     c->d[RELAY_DOWN].out_len))
			continue;
		/* Lingering connections read into a stack sink and close soon. */
		if (c->state == CONN_RELAYING)
			release_buffers(c);
		unhold_buffers(c);
	}
	if (w->n_holding)
		arm_quiet(w);
}

static void connect_detached(struct conn *c);

static void relay(struct conn *c)
{
	int rounds = 0, progress;

	do {
		int up = pump(c, RELAY_UP), down;

		if (up < 0)
			return;
		down = pump(c, RELAY_DOWN);
		if (down < 0)
			return;
		progress = up + down;
	} while (progress && ++rounds < RELAY_ROUNDS);
	if (rounds)
		touch(c);
	if (c->connect_pending) {
		connect_detached(c);    /* its connect's and handshake's watches rule now */
		return;
	}
	if (dir_done(&c->d[RELAY_UP]) && dir_done(&c->d[RELAY_DOWN])) {
		conn_close(c, CR_DONE);
		return;
	}
	if (c->closing && !c->d[RELAY_UP].out_len && !c->d[RELAY_DOWN].out_len &&
	    c->proto->done(c)) {
		linger_start(c);
		return;
	}
	relay_watch(c);
	hold_or_release(c, progress);
	if (progress) {
		/* Out of rounds with work left: come back after other connections ran. */
		event_active(&c->tls_ev, 0, 0);
	}
}

int conn_switch_proto(struct conn *c, const struct conn_proto_ops *ops)
{
	log_debug("conn %llu: %s -> %s", (unsigned long long)c->id, c->proto->name, ops->name);
	c->proto->release(c);
	c->proto = ops;
	if (ops->init(c) < 0) {
		conn_close(c, CR_INTERNAL);
		return -1;
	}
	ops->start(c);
	return 0;
}

void conn_kick(struct conn *c)
{
	event_active(&c->tls_ev, 0, 0);
}

void conn_write_client_now(struct conn *c, const char *buf, size_t len)
{
	bool tls = c->inbound;

	/* Best effort on a socket that just connected or handshook: it has room. */
	if (tls && (!c->ssl || !SSL_is_init_finished(c->ssl)))
		return;
	c->ready |= tls ? TLS_W : PLAIN_W;
	if (io_write(c, tls, buf, len) > 0)
		c->d[c->inbound ? RELAY_UP : RELAY_DOWN].bytes += len;
}

/* ---- connect ------------------------------------------------------------ */

static void set_nodelay(int fd)
{
	int one = 1;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Starts a non-blocking connect to a. Returns the fd (connecting), or -errno. */
static int start_connect(const struct config_addr *a)
{
	int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	set_nodelay(fd);
	if (connect(fd, (const struct sockaddr *)&a->ss, a->len) < 0 && errno != EINPROGRESS) {
		int e = errno;

		close(fd);
		return -e;
	}
	return fd;
}

static int *upstream_fd(struct conn *c)
{
	return c->inbound ? &c->plain_fd : &c->tls_fd;
}

static void watch_upstream(struct conn *c, short what, uint64_t due)
{
	if (c->inbound)
		watch_plain(c, what, due);
	else
		conn_watch_tls(c, what, due);
}

/*
 * Connects to the current destination; outbound moves on to another
 * endpoint on failure as its traffic rules say (conn_pick.c).
 */
static void connect_from(struct conn *c, bool timed_out)
{
	while (conn_pick_next(c)) {
		const struct config_addr *dest = conn_destination(c);
		int fd = start_connect(dest);

		if (fd >= 0) {
			*upstream_fd(c) = fd;
			conn_set_state(c, CONN_CONNECTING);
			conn_set_deadline(c, conn_pick_connect_ms(c));
			watch_upstream(c, EV_WRITE, c->deadline);
			return;
		}
		log_warn("conn %llu: connect to %s failed: %s", (unsigned long long)c->id,
		         dest->text, strerror(-fd));
		conn_pick_report(c, true);
		timed_out = false;
	}
	if (timed_out)
		c->proto->fail_early(c, 504, CR_UPSTREAM_TIMEOUT);
	else
		c->proto->fail_early(c, 502, CR_UPSTREAM_REFUSED);
}

void conn_connect_next(struct conn *c)
{
	connect_from(c, false);
}

/* The connect to the current endpoint failed (refused, or timed out): the next. */
static void connect_failed(struct conn *c, bool timed_out)
{
	conn_pick_report(c, true);
	watch_upstream(c, 0, 0);
	close_fd(upstream_fd(c));
	connect_from(c, timed_out);
}

static void connect_done(struct conn *c)
{
	int *fd = upstream_fd(c);
	int err = 0;
	socklen_t len = sizeof(err);

	if (getsockopt(*fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err == EINPROGRESS)
		return;
	if (err) {
		log_warn("conn %llu: connect to %s failed: %s", (unsigned long long)c->id,
		         conn_destination(c)->text, strerror(err));
		connect_failed(c, false);
		return;
	}
	conn_pick_report(c, false);
	if (c->inbound || (c->tdest && !c->tdest->expect_id[0]))
		conn_relay_start(c);    /* to the app, or a passthrough outside the mesh */
	else
		conn_tls_connect(c);
}

/* ---- authorization and the start of the relay --------------------------- */

void conn_authorize(struct conn *c)
{
	const struct config *cfg = conn_cfg(c);
	struct policy_request req = {
		.peer_id = c->peer,
		.port = config_addr_port(&cfg->inbound[c->listener].forward),
	};
	struct policy_decision d;
	struct metrics_decision *counter;
	const char *fault;

	conn_set_state(c, CONN_AUTHORIZING);
	conn_watch_tls(c, 0, 0);    /* the peer waits until the app is connected */
	if (c->proto->per_request_policy) {
		/* Every request is decided (and counted) on its own, with its
		 * method, path and headers. */
		conn_connect_next(c);
		return;
	}
	d = policy_eval(c->snap->policy, &req);
	counter = snapshot_decision_counter(c->snap, &d);
	c->decided = true;
	c->decision = d.action;
	c->rule = policy_decision_rule(&d);
	if (counter)
		metrics_inc(&counter->count);
	peerstats_decision(c->w->peers, c->peer, d.action == POLICY_ALLOW, c->rule,
	                   NULL, NULL);
	if (d.action != POLICY_ALLOW) {
		log_info("conn %llu: %s denied by rule %s", (unsigned long long)c->id, c->peer, c->rule);
		conn_close(c, CR_DENIED);
		return;
	}
	if ((fault = snapshot_traffic_tcp_fault(c->snap, &req))) {
		log_info("conn %llu: %s closed by fault %s", (unsigned long long)c->id, c->peer, fault);
		conn_close(c, CR_FAULT);
		return;
	}
	conn_connect_next(c);
}

/* Both sockets are up (and the peer verified): start moving bytes. */
void conn_relay_start(struct conn *c)
{
	conn_set_state(c, CONN_RELAYING);
	c->ready |= PLAIN_R | PLAIN_W | TLS_R | TLS_W;
	c->ssl_read_wants = EV_READ;
	c->ssl_write_wants = EV_WRITE;
	touch(c);
	c->proto->start(c);
	/* Drop the connect/handshake timers: from here on the idle timer rules. */
	watch_plain(c, 0, 0);
	conn_watch_tls(c, 0, 0);
	relay(c);
}

/* ---- events ------------------------------------------------------------ */

/*
 * A side's timer fired: early (libevent's cached clock, or a deadline that
 * moved since it was armed) or on time. Early, it is re-armed for exactly
 * what is left; on time, the state's deadline applies.
 */
static void on_timeout(struct conn *c, bool tls_side)
{
	uint64_t now = conn_clock_ms(), due = side_due(c, tls_side);

	if (due > now) {
		if (tls_side)
			conn_watch_tls(c, c->tls_reg, due);
		else
			watch_plain(c, c->plain_reg, due);
		return;
	}
	switch (c->state) {
	case CONN_HANDSHAKE:
		conn_tls_timeout(c);
		return;
	case CONN_CONNECTING:
		log_warn("conn %llu: connect to %s timed out", (unsigned long long)c->id,
		         conn_destination(c)->text);
		connect_failed(c, true);
		return;
	case CONN_LINGERING:
		conn_close(c, CR_DONE);    /* the client went quiet: enough */
		return;
	case CONN_RELAYING:
		if (c->proto->on_timeout(c, now))
			return;
		conn_close(c, CR_IDLE_TIMEOUT);    /* due was the idle deadline */
		return;
	default:
		return;
	}
}

static void on_event(struct conn *c, short what, bool tls_side)
{
	if (what & EV_READ)
		c->ready |= tls_side ? TLS_R : PLAIN_R;
	if (what & EV_WRITE)
		c->ready |= tls_side ? TLS_W : PLAIN_W;
	conn_step(c, tls_side);
}

static void on_tls_event(evutil_socket_t fd, short what, void *arg)
{
	on_event(arg, what, true);
}

static void on_plain_event(evutil_socket_t fd, short what, void *arg)
{
	on_event(arg, what, false);
}

static void on_tls_timer(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	c->tls_armed = 0;
	on_timeout(c, true);
}

static void on_plain_timer(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	c->plain_armed = 0;
	on_timeout(c, false);
}

static void conn_step(struct conn *c, bool tls_side)
{
	switch (c->state) {
	case CONN_HANDSHAKE:
		conn_tls_step(c);
		break;
	case CONN_CONNECTING:
		/* Only the upstream socket's writability ends a connect. */
		if (tls_side != c->inbound)
			connect_done(c);
		break;
	case CONN_RELAYING:
		relay(c);
		break;
	case CONN_LINGERING:
		linger_read(c);
		break;
	default:
		break;
	}
}

/* ---- accept ------------------------------------------------------------ */

/* Takes over the snapshot reference s. */
static struct conn *conn_new(struct listener *l, struct snapshot *s, int fd,
                             const struct sockaddr *from, int fromlen)
{
	struct worker *w = l->w;
	struct conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->w = w;
	c->snap = s;
	c->id = atomic_fetch_add_explicit(&w->shared->next_conn_id, 1, memory_order_relaxed) + 1;
	c->inbound = l->kind == LISTENER_INBOUND;
	c->transparent = l->kind == LISTENER_TRANSPARENT;
	c->dir = c->inbound ? DIR_INBOUND : DIR_OUTBOUND;
	c->listener = (uint16_t)l->index;
	c->tls_fd = c->inbound ? fd : -1;
	c->plain_fd = c->inbound ? -1 : fd;
	c->ssl_read_wants = EV_READ;
	c->ssl_write_wants = EV_WRITE;
	c->proto = proto_of(l, s);
	if (c->proto->init(c) < 0) {
		free(c);
		return NULL;
	}
	if (fromlen > 0 && (size_t)fromlen <= sizeof(c->from))
		memcpy(&c->from, from, (size_t)fromlen);
	clock_gettime(CLOCK_MONOTONIC, &c->started);
	clock_gettime(CLOCK_REALTIME, &c->started_wall);
	c->next = w->conns;
	if (w->conns)
		w->conns->prev = c;
	w->conns = c;
	w->n_conns++;
	atomic_fetch_add_explicit(&w->shared->open_conns, 1, memory_order_relaxed);
	metrics_inc(&w->shared->metrics->connections_total[c->dir]);
	atomic_fetch_add_explicit(&w->shared->metrics->connections_active[c->dir], 1, memory_order_relaxed);
	return c;
}

/*
 * An outbound http connection starts without an upstream: its requests go
 * over the worker's pool of connections between sidecars (httpflow.c,
 * h2flow.c, upool.c), so relaying starts at once, with only the client's
 * side. The upstream direction has no source (paused) until a tunnel asks
 * for a connection of its own (conn_connect_upstream).
 */
static void detached_start(struct conn *c)
{
	c->detached = true;
	c->d[RELAY_DOWN].paused = true;
	conn_set_state(c, CONN_RELAYING);
	c->ready |= PLAIN_R | PLAIN_W;
	touch(c);
	c->proto->start(c);
	watch_plain(c, 0, 0);
	conn_watch_tls(c, 0, 0);
	relay(c);
}

void conn_connect_upstream(struct conn *c)
{
	if (c->detached)
		c->connect_pending = true;
}

static void connect_detached(struct conn *c)
{
	const struct snapshot_outbound *o = &c->snap->outbound[c->listener];

	c->connect_pending = false;
	c->detached = false;
	c->d[RELAY_DOWN].paused = false;
	watch_plain(c, 0, 0);    /* the client waits for the upstream */
	if (o->n_endpoints == 0) {
		c->proto->fail_early(c, 502, CR_UPSTREAM_REFUSED);
		return;
	}
	c->tries = 0;
	conn_connect_next(c);    /* admitted (limits) when it started */
}

static void outbound_start(struct conn *c)
{
	const struct snapshot_outbound *o = &c->snap->outbound[c->listener];

	if (c->proto->per_request_policy) {
		/* limits.max_connections counts the app connections an http
		 * listener carries, pooled or not (docs/traffic.md). */
		if (conn_pick_admit(c))
			detached_start(c);
		return;
	}
	if (o->n_endpoints == 0) {
		log_warn("conn %llu: no endpoint known for %s", (unsigned long long)c->id, o->expect_id);
		conn_close(c, CR_UPSTREAM_REFUSED);
		return;
	}
	if (conn_pick_admit(c))
		conn_connect_next(c);
}

void conn_accept(struct listener *l, int fd, const struct sockaddr *from, int fromlen)
{
	struct worker_shared *sh = l->w->shared;
	struct conn *c;
	struct snapshot *s;
	uint32_t max;

	s = sh->snapshot(sh->arg);
	max = s->cfg->max_connections;
	if (atomic_load_explicit(&sh->open_conns, memory_order_relaxed) >= max) {
		log_warn("refusing a connection: max_connections (%u) reached", max);
		snapshot_unref(s);
		close(fd);
		return;
	}
	set_nodelay(fd);
	c = conn_new(l, s, fd, from, fromlen);
	if (!c) {
		snapshot_unref(s);
		close(fd);
		return;
	}
	if (l->kind == LISTENER_INBOUND)
		conn_tls_accept(c);
	else if (l->kind == LISTENER_TRANSPARENT)
		conn_transparent_start(c, fd);
	else
		outbound_start(c);
}
