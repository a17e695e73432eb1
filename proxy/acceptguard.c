/* acceptguard: pause a listener instead of spinning when accept() fails. */
#include "acceptguard.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static uint64_t monotonic_ms(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
	struct accept_guard *g = arg;

	evconnlistener_enable(g->lev);
}

void accept_guard_failed(struct accept_guard *g)
{
	static const struct timeval pause = { 0, ACCEPT_PAUSE_MS * 1000 };
	int e = EVUTIL_SOCKET_ERROR();
	uint64_t held;

	/* Paused first: the log line must not be what keeps the loop busy. */
	evconnlistener_disable(g->lev);
	evtimer_add(g->retry, &pause);
	if (log_enabled(LOG_WARN) && log_limit_pass(&g->log, monotonic_ms(), &held))
		log_write(LOG_WARN, "%s: accept failed: %s; pausing it for %d ms "
		          "(%llu more such failures since the last line)", g->what,
		          evutil_socket_error_to_string(e), ACCEPT_PAUSE_MS,
		          (unsigned long long)held);
}

int accept_guard_init(struct accept_guard *g, struct evconnlistener *lev, const char *what)
{
	g->lev = lev;
	g->log = LOG_LIMIT_INIT(ACCEPT_LOG_INTERVAL_MS);
	snprintf(g->what, sizeof(g->what), "%s", what);
	g->retry = evtimer_new(evconnlistener_get_base(lev), on_retry, g);
	return g->retry ? 0 : -ENOMEM;
}

void accept_guard_stop(struct accept_guard *g)
{
	if (g->retry)
		event_free(g->retry);
	g->retry = NULL;
	g->lev = NULL;
}
