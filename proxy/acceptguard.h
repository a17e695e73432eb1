/*
 * acceptguard: what a listening socket does when accept() fails for want
 * of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM). The pending
 * connection stays in the backlog, so the socket stays readable and the
 * event loop would call accept() again at once, forever, logging each
 * failure. The guard pauses the listener for ACCEPT_PAUSE_MS instead and
 * logs at most one line a second. The data listeners of every worker and
 * the admin listener use it.
 */
#ifndef MESHLET_PROXY_ACCEPTGUARD_H
#define MESHLET_PROXY_ACCEPTGUARD_H

#include <event2/event.h>
#include <event2/listener.h>

#include "meshlet/log.h"

#define ACCEPT_PAUSE_MS 100
#define ACCEPT_LOG_INTERVAL_MS 1000

struct accept_guard {
	struct evconnlistener *lev;
	struct event *retry;            /* re-enables accepting after a pause */
	struct log_limit log;
	char what[160];                 /* "admin 127.0.0.1:15000", for the log */
};

/*
 * Sets g up for lev (which stays the caller's); what names the listener in
 * the log. The owner's accept error callback (evconnlistener_set_error_cb)
 * calls accept_guard_failed(). Returns 0 or -ENOMEM.
 */
int accept_guard_init(struct accept_guard *g, struct evconnlistener *lev, const char *what);

/* accept() failed on g's listener: pause it, log (at most once a second). */
void accept_guard_failed(struct accept_guard *g);

/* Frees the retry timer; call before freeing the listener. */
void accept_guard_stop(struct accept_guard *g);

#endif
