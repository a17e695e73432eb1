/* watch: long-poll waiters; see watch.h. */
#include "watch.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/bufferevent.h>
#include <event2/http.h>

#include "meshlet/identity.h"
#include "meshlet/log.h"
#include "tally.h"

/* Services remembered for a deferred notify; more make it one for all. */
#define WATCH_NOTIFY_SVCS 16

struct watch_waiter {
	struct watch *w;
	struct api_call *call;
	char svc[SERVICE_NAME_MAX + 1];
	char cert[CA_SERIAL_HEX_MAX];  /* the caller's certificate serial, "" if none */
	int64_t after;
	struct event *timer;
	struct event *closed;          /* the client's end closed (EV_CLOSED), or NULL */
	struct watch_waiter *prev, *next;
};

struct watch {
	struct event_base *base;
	struct event *store_changed;   /* another replica wrote (shared store), or NULL */
	void (*tls_changed)(void *arg);   /* the roots changed elsewhere, or NULL */
	void *tls_arg;
	struct control_state *st;
	watch_done_fn done;
	struct watch_waiter *head;
	size_t n;
	struct tally per_cert, per_svc;   /* waiters by certificate serial, by service */
	/* watch_notify() calls not yet carried out (on_notify): every
	 * service, or these; NULL event: carried out at once */
	struct event *notify_ev;
	bool notify_pending, notify_all;
	size_t n_notify;
	char notify_svc[WATCH_NOTIFY_SVCS][SERVICE_NAME_MAX + 1];
	size_t max_per_cert, max_per_service, max_total;   /* 0: no limit */
};

/* The store's follow thread saw a change: reload what the state caches,
 * then answer the waiters whose version moved. The thread only signals;
 * every store read happens here, on the event loop. */
static void on_store_changed(evutil_socket_t fd, short what, void *arg)
{
	struct watch *w = arg;
	bool tls = false;

	state_refresh(w->st, &tls);
	if (tls && w->tls_changed)
		w->tls_changed(w->tls_arg);
	watch_notify(w, NULL);
}

static void notify_now(struct watch *w, const char *svc);

/* The deferred watch_notify() calls, carried out together. */
static void on_notify(evutil_socket_t fd, short what, void *arg)
{
	struct watch *w = arg;
	char svcs[WATCH_NOTIFY_SVCS][SERVICE_NAME_MAX + 1];
	size_t n = w->n_notify;
	bool all = w->notify_all;

	memcpy(svcs, w->notify_svc, n * sizeof(svcs[0]));
	w->notify_pending = w->notify_all = false;
	w->n_notify = 0;
	if (all) {
		notify_now(w, NULL);
		return;
	}
	for (size_t i = 0; i < n; i++)
		notify_now(w, svcs[i]);
}

struct watch *watch_new(struct event_base *base, struct control_state *st, watch_done_fn done)
{
	struct watch *w = calloc(1, sizeof(*w));
	int fd;

	if (!w)
		return NULL;
	w->base = base;
	w->st = st;
	w->done = done;
	/* Without it, watch_notify() answers at once: slower writes, no harm. */
	w->notify_ev = event_new(base, -1, 0, on_notify, w);
	fd = state_follow_fd(st);
	if (fd >= 0) {
		w->store_changed = event_new(base, fd, EV_READ | EV_PERSIST, on_store_changed, w);
		if (!w->store_changed || event_add(w->store_changed, NULL) < 0) {
			if (w->store_changed)
				event_free(w->store_changed);
			free(w);
			return NULL;
		}
	}
	return w;
}

void watch_on_tls_changed(struct watch *w, void (*fn)(void *arg), void *arg)
{
	w->tls_changed = fn;
	w->tls_arg = arg;
}

void watch_set_limits(struct watch *w, size_t per_cert, size_t per_service, size_t total)
{
	w->max_per_cert = per_cert;
	w->max_per_service = per_service;
	w->max_total = total;
}

/* Counts ww in the tallies the limits are checked against: 0 or -ENOMEM
 * (then it is counted nowhere). */
static int waiter_count(struct watch *w, const struct watch_waiter *ww)
{
	if (tally_inc(&w->per_svc, ww->svc) < 0)
		return -ENOMEM;
	if (ww->cert[0] && tally_inc(&w->per_cert, ww->cert) < 0) {
		tally_dec(&w->per_svc, ww->svc);
		return -ENOMEM;
	}
	return 0;
}

static void waiter_uncount(struct watch *w, const struct watch_waiter *ww)
{
	tally_dec(&w->per_svc, ww->svc);
	if (ww->cert[0])
		tally_dec(&w->per_cert, ww->cert);
}

/* Takes ww off the list and frees it; its call goes to done. */
static void waiter_finish(struct watch_waiter *ww, bool aborted)
{
	struct watch *w = ww->w;
	struct api_call *call = ww->call;

	if (ww->prev)
		ww->prev->next = ww->next;
	else
		w->head = ww->next;
	if (ww->next)
		ww->next->prev = ww->prev;
	w->n--;
	waiter_uncount(w, ww);
	event_free(ww->timer);
	if (ww->closed)
		event_free(ww->closed);
	if (!aborted && call->evcon)
		evhttp_connection_set_closecb(call->evcon, NULL, NULL);
	free(ww);
	w->done(call, aborted);
}

static void waiter_timeout(evutil_socket_t fd, short what, void *arg)
{
	waiter_finish(arg, false);
}

/* evhttp is closing the connection the call came on. */
static void waiter_closed(struct evhttp_connection *evcon, void *arg)
{
	struct watch_waiter *ww = arg;

	log_debug("long poll of %s: client closed the connection", ww->svc);
	waiter_finish(ww, true);
}

/*
 * evhttp does not read from a connection while its request is being
 * handled, so it would notice a client gone only when the answer fails to
 * be written. An EV_CLOSED event (EPOLLRDHUP) on the socket notices the
 * peer's FIN or RST at once without reading anything; freeing the
 * connection then runs waiter_closed() through the close callback.
 */
static void waiter_peer_closed(evutil_socket_t fd, short what, void *arg)
{
	struct watch_waiter *ww = arg;

	evhttp_connection_free(ww->call->evcon);
}

/* Refuses (429 in call->err, -EBUSY) a waiter over one of the limits. */
static int watch_admit(const struct watch *w, struct api_call *call, const char *svc)
{
	const char *cert = call->caller == CALLER_SVID ? call->peer_serial : "";
	size_t of_cert = cert[0] ? tally_get(&w->per_cert, cert) : 0;
	size_t of_svc = tally_get(&w->per_svc, svc);

	if (w->max_total && w->n >= w->max_total) {
		api_fail(&call->err, 429, "", "control holds %zu long polls, its limit; retry later",
		         w->n);
		return -EBUSY;
	}
	if (w->max_per_cert && of_cert >= w->max_per_cert) {
		api_fail(&call->err, 429, "", "this certificate (serial %s) already holds %zu long "
		         "polls, the limit per certificate; retry later", cert, of_cert);
		return -EBUSY;
	}
	if (w->max_per_service && of_svc >= w->max_per_service) {
		api_fail(&call->err, 429, "", "service %s already holds %zu long polls, the limit "
		         "per service; retry later", svc, of_svc);
		return -EBUSY;
	}
	return 0;
}

int watch_add(struct watch *w, struct api_call *call, const char *svc, int64_t after, int wait_s)
{
	struct watch_waiter *ww;
	struct timeval tv = { .tv_sec = wait_s, .tv_usec = 0 };
	int ret = watch_admit(w, call, svc);

	if (ret < 0)
		return ret;
	ww = calloc(1, sizeof(*ww));
	if (!ww)
		return -ENOMEM;
	snprintf(ww->svc, sizeof(ww->svc), "%s", svc);
	if (call->caller == CALLER_SVID)
		snprintf(ww->cert, sizeof(ww->cert), "%s", call->peer_serial);
	if (waiter_count(w, ww) < 0) {
		free(ww);
		return -ENOMEM;
	}
	ww->timer = evtimer_new(w->base, waiter_timeout, ww);
	if (!ww->timer || evtimer_add(ww->timer, &tv) < 0) {
		if (ww->timer)
			event_free(ww->timer);
		waiter_uncount(w, ww);
		free(ww);
		return -ENOMEM;
	}
	ww->w = w;
	ww->call = call;
	ww->after = after;
	ww->next = w->head;
	if (w->head)
		w->head->prev = ww;
	w->head = ww;
	w->n++;
	evhttp_connection_set_closecb(call->evcon, waiter_closed, ww);
	if (event_base_get_features(w->base) & EV_FEATURE_EARLY_CLOSE) {
		struct bufferevent *bev = evhttp_connection_get_bufferevent(call->evcon);
		evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;

		if (fd >= 0)
			ww->closed = event_new(w->base, fd, EV_CLOSED, waiter_peer_closed, ww);
		if (ww->closed && event_add(ww->closed, NULL) < 0) {
			event_free(ww->closed);
			ww->closed = NULL;
		}
	}
	return 0;
}

/* Config versions of the services one watch_notify() looked up: each is
 * looked up once per call, however many waiters it has (on etcd from the
 * revisions the store's follower keeps; a store read, a network round
 * trip, only while it cannot tell). */
struct seen_version {
	char svc[SERVICE_NAME_MAX + 1];
	int64_t own;
	struct seen_version *next;
};

static int own_version(struct watch *w, struct seen_version **seen, const char *svc,
                       int64_t *own)
{
	struct seen_version *s;

	for (s = *seen; s; s = s->next) {
		if (strcmp(s->svc, svc) == 0) {
			*own = s->own;
			return 0;
		}
	}
	if (state_watch_version_own(w->st, svc, own) < 0)
		return -EIO;
	s = malloc(sizeof(*s));
	if (s) {
		snprintf(s->svc, sizeof(s->svc), "%s", svc);
		s->own = *own;
		s->next = *seen;
		*seen = s;
	}
	return 0;
}

void watch_notify(struct watch *w, const char *svc)
{
	bool known = false;

	if (!w->notify_ev) {
		notify_now(w, svc);
		return;
	}
	for (size_t i = 0; svc && i < w->n_notify; i++)
		known = known || strcmp(w->notify_svc[i], svc) == 0;
	if (!svc || (!known && w->n_notify == WATCH_NOTIFY_SVCS))
		w->notify_all = true;
	else if (!known)
		snprintf(w->notify_svc[w->n_notify++], sizeof(w->notify_svc[0]), "%s", svc);
	if (!w->notify_pending) {
		w->notify_pending = true;
		event_active(w->notify_ev, EV_TIMEOUT, 0);
	}
}

static void notify_now(struct watch *w, const char *svc)
{
	struct watch_waiter *ww, *next;
	struct seen_version *seen = NULL;
	int64_t shared = 0, own;

	if (!w->head || state_watch_version_shared(w->st, &shared) < 0)
		return;
	/* Answering may not add waiters, so walking with a saved next is safe. */
	for (ww = w->head; ww; ww = next) {
		next = ww->next;
		if (svc && strcmp(svc, ww->svc) != 0)
			continue;
		if (shared <= ww->after) {
			if (own_version(w, &seen, ww->svc, &own) < 0)
				break;
			if (own <= ww->after)
				continue;
		}
		waiter_finish(ww, false);
	}
	while (seen) {
		struct seen_version *s = seen->next;

		free(seen);
		seen = s;
	}
}

void watch_flush(struct watch *w)
{
	while (w->head)
		waiter_finish(w->head, false);
}

size_t watch_count(const struct watch *w)
{
	return w->n;
}

void watch_free(struct watch *w)
{
	if (!w)
		return;
	while (w->head) {
		struct api_call *call = w->head->call;
		if (call->evcon)
			evhttp_connection_set_closecb(call->evcon, NULL, NULL);
		waiter_finish(w->head, true);
	}
	if (w->store_changed)
		event_free(w->store_changed);
	if (w->notify_ev)
		event_free(w->notify_ev);
	tally_free(&w->per_cert);
	tally_free(&w->per_svc);
	free(w);
}
