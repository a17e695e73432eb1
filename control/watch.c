/* watch: long-poll waiters; see watch.h. */
#include "watch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <event2/bufferevent.h>
#include <event2/http.h>

#include "meshlet/identity.h"
#include "meshlet/log.h"

struct watch_waiter {
	struct watch *w;
	struct api_call *call;
	char svc[SERVICE_NAME_MAX + 1];
	int64_t after;
	struct event *timer;
	struct event *closed;          /* the client's end closed (EV_CLOSED), or NULL */
	struct watch_waiter *prev, *next;
};

struct watch {
	struct event_base *base;
	struct control_state *st;
	watch_done_fn done;
	struct watch_waiter *head;
	size_t n;
};

struct watch *watch_new(struct event_base *base, struct control_state *st, watch_done_fn done)
{
	struct watch *w = calloc(1, sizeof(*w));

	if (!w)
		return NULL;
	w->base = base;
	w->st = st;
	w->done = done;
	return w;
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

int watch_add(struct watch *w, struct api_call *call, const char *svc, int64_t after, int wait_s)
{
	struct watch_waiter *ww = calloc(1, sizeof(*ww));
	struct timeval tv = { .tv_sec = wait_s, .tv_usec = 0 };

	if (!ww)
		return -ENOMEM;
	ww->timer = evtimer_new(w->base, waiter_timeout, ww);
	if (!ww->timer || evtimer_add(ww->timer, &tv) < 0) {
		if (ww->timer)
			event_free(ww->timer);
		free(ww);
		return -ENOMEM;
	}
	ww->w = w;
	ww->call = call;
	ww->after = after;
	snprintf(ww->svc, sizeof(ww->svc), "%s", svc);
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

void watch_notify(struct watch *w, const char *svc)
{
	struct watch_waiter *ww, *next;
	int64_t shared = 0, own;

	if (!w->head || state_config_version_shared(w->st, &shared) < 0)
		return;
	/* Answering may not add waiters, so walking with a saved next is safe. */
	for (ww = w->head; ww; ww = next) {
		next = ww->next;
		if (svc && strcmp(svc, ww->svc) != 0)
			continue;
		if (shared <= ww->after) {
			if (state_config_version_own(w->st, ww->svc, &own) < 0)
				return;
			if (own <= ww->after)
				continue;
		}
		waiter_finish(ww, false);
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
	free(w);
}
