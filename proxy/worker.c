/* worker: a thread's event loop, its listeners and the commands it takes. */
#include "worker.h"
#include "apppool.h"
#include "h2flow.h"
#include "upool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <netinet/in.h>

#include "meshlet/log.h"
#include "meshlet/metrics.h"
#include "conn.h"
#include "endpick.h"
#include "snapshot.h"

#define LISTEN_BACKLOG 4096

static void on_accept(struct evconnlistener *ev, evutil_socket_t fd, struct sockaddr *from,
                      int fromlen, void *arg)
{
	conn_accept(arg, fd, from, fromlen);
}

/* Out of descriptors or memory: pause this listener (see acceptguard.h). */
static void on_accept_error(struct evconnlistener *ev, void *arg)
{
	struct listener *l = arg;

	accept_guard_failed(&l->guard);
}

static void free_listeners(struct worker *w)
{
	for (size_t i = 0; i < w->n_listeners; i++) {
		accept_guard_stop(&w->listeners[i].guard);
		if (w->listeners[i].ev)
			evconnlistener_free(w->listeners[i].ev);
		w->listeners[i].ev = NULL;
	}
}

/* A draining worker's loop ends with its last connection (conn_close does
 * the same when that one closes). */
static void maybe_finish(struct worker *w)
{
	if (w->draining && w->n_conns == 0)
		event_base_loopbreak(w->base);
}

static void on_worker_cmd(evutil_socket_t fd, short what, void *arg)
{
	struct worker *w = arg;
	unsigned cmd = atomic_exchange(&w->cmd, 0);

	if (cmd & WORKER_RECHECK) {
		struct snapshot *s = w->shared->snapshot(w->shared->arg);

		conn_close_revoked(w, s);
		for (size_t i = 0; i < w->n_upools; i++)
			upool_close_revoked(w->upools[i], s);
		h2flow_drain_stale(w, s);
		snapshot_unref(s);
	}
	if (cmd & WORKER_STOP) {
		w->draining = true;
		free_listeners(w);
		conn_close_all(w, CR_DRAIN_TIMEOUT);
		event_base_loopbreak(w->base);
		return;
	}
	if (cmd & WORKER_DRAIN) {
		if (!w->draining) {
			w->draining = true;
			free_listeners(w);    /* new connections are refused from here on */
			conn_drain(w);
		}
		maybe_finish(w);
	}
}

static int bind_one(struct worker *w, struct listener *l, const struct config_addr *a)
{
	unsigned flags = LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC | LEV_OPT_REUSEABLE |
	                 LEV_OPT_REUSEABLE_PORT;
	char what[sizeof(l->guard.what)];

	l->w = w;
	l->ev = evconnlistener_new_bind(w->base, on_accept, l, flags, LISTEN_BACKLOG,
	                                 (const struct sockaddr *)&a->ss, (int)a->len);
	if (!l->ev) {
		log_error("cannot listen on %s: %s", a->text, strerror(errno));
		return -errno;
	}
	snprintf(what, sizeof(what), "listener %s", a->text);
	if (accept_guard_init(&l->guard, l->ev, what) < 0)
		return -ENOMEM;
	evconnlistener_set_error_cb(l->ev, on_accept_error);
	return 0;
}

/* An IPv6-only socket bound to a (IPV6_V6ONLY: the IPv4 listener beside it
 * keeps IPv4), or -errno. */
static int ipv6_only_socket(const struct config_addr *a)
{
	int fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1, e;

	if (fd < 0)
		return -errno;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0 ||
	    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) < 0 ||
	    bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0) {
		e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

/*
 * The IPv6 side of an inbound or transparent listener on 0.0.0.0 or
 * 127.0.0.1 ([::] or [::1]), where ip6tables redirects IPv6 connections.
 * A host without IPv6 (no AF_INET6, or no ::1) is not an error: there is
 * no IPv6 traffic to take, and the first worker says so once.
 */
static int bind_twin(struct worker *w, struct listener *l, const struct config_addr *primary)
{
	unsigned flags = LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC;
	struct config_addr twin;
	int fd;

	if (!config_addr_ipv6_twin(primary, &twin))
		return 0;
	l->w = w;
	fd = ipv6_only_socket(&twin);
	if (fd == -EAFNOSUPPORT || fd == -EADDRNOTAVAIL) {
		if (w->id == 0)
			log_info("no IPv6 here (%s): %s listens on IPv4 only", strerror(-fd),
			         primary->text);
		return 0;
	}
	if (fd < 0) {
		log_error("cannot listen on %s (the IPv6 side of %s): %s", twin.text, primary->text,
		          strerror(-fd));
		return fd;
	}
	l->ev = evconnlistener_new(w->base, on_accept, l, flags, LISTEN_BACKLOG, fd);
	if (!l->ev) {
		close(fd);
		return -ENOMEM;
	}
	evconnlistener_set_error_cb(l->ev, on_accept_error);
	return 0;
}

static int worker_listen(struct worker *w, const struct config *cfg)
{
	/* each inbound and the transparent listener may have an IPv6 twin */
	size_t n = 2 * cfg->n_inbound + cfg->n_outbound + (cfg->has_transparent ? 2 : 0), k = 0;

	w->listeners = calloc(n ? n : 1, sizeof(*w->listeners));
	w->pick = endpick_new(cfg->n_outbound);
	w->apppools = calloc(cfg->n_inbound ? cfg->n_inbound : 1, sizeof(*w->apppools));
	w->upools = calloc(cfg->n_outbound ? cfg->n_outbound : 1, sizeof(*w->upools));
	if (!w->listeners || !w->pick || !w->apppools || !w->upools)
		return -ENOMEM;
	w->n_apppools = cfg->n_inbound;
	w->n_upools = cfg->n_outbound;
	w->n_listeners = n;
	for (size_t i = 0; i < cfg->n_inbound; i++, k += 2) {
		w->listeners[k].kind = w->listeners[k + 1].kind = LISTENER_INBOUND;
		w->listeners[k].index = w->listeners[k + 1].index = i;
		if (bind_one(w, &w->listeners[k], &cfg->inbound[i].listen) < 0 ||
		    bind_twin(w, &w->listeners[k + 1], &cfg->inbound[i].listen) < 0)
			return -EADDRINUSE;
	}
	for (size_t i = 0; i < cfg->n_outbound; i++, k++) {
		w->listeners[k].kind = LISTENER_OUTBOUND;
		w->listeners[k].index = i;
		if (bind_one(w, &w->listeners[k], &cfg->outbound[i].listen) < 0)
			return -EADDRINUSE;
	}
	if (cfg->has_transparent) {
		w->listeners[k].kind = w->listeners[k + 1].kind = LISTENER_TRANSPARENT;
		if (bind_one(w, &w->listeners[k], &cfg->transparent_listen) < 0 ||
		    bind_twin(w, &w->listeners[k + 1], &cfg->transparent_listen) < 0)
			return -EADDRINUSE;
	}
	return 0;
}

static struct event_base *new_base(void)
{
	struct event_config *ec = event_config_new();
	struct event_base *base;

	if (!ec)
		return NULL;
	/*
	 * Go back to epoll after 64 callbacks: a busy connection re-activates
	 * itself (event_active) to yield, and must not starve its neighbours.
	 */
	event_config_set_max_dispatch_interval(ec, NULL, 64, 0);
	base = event_base_new_with_config(ec);
	event_config_free(ec);
	return base;
}

int worker_init(struct worker *w, struct worker_shared *shared, int id, const struct config *cfg)
{
	w->shared = shared;
	w->id = id;
	w->base = new_base();
	if (!w->base)
		return -ENOMEM;
	w->cmd_ev = event_new(w->base, -1, 0, on_worker_cmd, w);
	if (!w->cmd_ev)
		return -ENOMEM;
	w->quiet_ev = evtimer_new(w->base, conn_release_quiet, w);
	if (!w->quiet_ev)
		return -ENOMEM;
	w->bio_method = conn_bio_method_new();
	if (!w->bio_method)
		return -ENOMEM;
	w->peers = peerstats_shard(shared->metrics->peers, (size_t)id);
	if (!w->peers)
		return -ENOMEM;
	return worker_listen(w, cfg);
}

void worker_destroy(struct worker *w)
{
	free_listeners(w);
	conn_close_all(w, CR_DRAIN_TIMEOUT);
	conn_free_buffers(w);
	snapshot_unref(w->sessions_from);
	w->sessions_from = NULL;
	if (w->cmd_ev)
		event_free(w->cmd_ev);
	if (w->quiet_ev)
		event_free(w->quiet_ev);
	BIO_meth_free(w->bio_method);
	/* After the connections: none holds a request of a pool any more. */
	for (size_t i = 0; i < w->n_apppools; i++)
		apppool_free(w->apppools[i]);
	free(w->apppools);
	for (size_t i = 0; i < w->n_upools; i++)
		upool_free(w->upools[i]);
	free(w->upools);
	if (w->base)
		event_base_free(w->base);
	free(w->listeners);
	endpick_free(w->pick);
}

void *worker_main(void *arg)
{
	struct worker *w = arg;

	event_base_loop(w->base, EVLOOP_NO_EXIT_ON_EMPTY);
	return NULL;
}

void worker_send(struct worker *w, enum worker_cmd cmd)
{
	atomic_fetch_or(&w->cmd, (unsigned)cmd);
	event_active(w->cmd_ev, EV_READ, 0);    /* thread-safe: bases have locks */
}
