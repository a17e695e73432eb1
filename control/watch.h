/*
 * watch: the long polls of GET /v1/services/{svc}/config?after=V&wait=S.
 *
 * A waiting request costs a small struct and a timer, no thread: it sits in
 * a list until watch_notify() (called by the write handlers after a change)
 * finds its service's config version past V, until its wait timer fires, or
 * until its client closes the connection. On a shared store (etcd) a
 * change made through another replica wakes them too (state_follow_fd()).
 */
#ifndef MESHLET_CONTROL_WATCH_H
#define MESHLET_CONTROL_WATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <event2/event.h>

#include "server.h"
#include "state.h"

struct watch;

/* Called once per waiter: aborted (the client went away) or not (answer
 * now with the current config). It owns call from then on. */
typedef void (*watch_done_fn)(struct api_call *call, bool aborted);

/* Returns a new watch, or NULL (out of memory). */
struct watch *watch_new(struct event_base *base, struct control_state *st, watch_done_fn done);

/* fn(arg) runs when another replica's CA step changed the roots (control's
 * server certificate is to be reissued), before the waiters are answered. */
void watch_on_tls_changed(struct watch *w, void (*fn)(void *arg), void *arg);

/* Caps the waiters: per client certificate (call->peer_serial), per
 * service, and in all. */
void watch_set_limits(struct watch *w, size_t per_cert, size_t per_service, size_t total);

/* Frees the watch; waiters still pending are handed to done as aborted. */
void watch_free(struct watch *w);

/* Keeps call until svc's config version passes after or wait_s seconds
 * pass. Returns 0, -EBUSY over a limit (watch_set_limits(); 429 in
 * call->err), or -ENOMEM (call untouched). */
int watch_add(struct watch *w, struct api_call *call, const char *svc, int64_t after, int wait_s);

/* Something changed: answers the waiters of svc (NULL: of every service)
 * whose config version has passed their after. They are answered on the
 * next turn of the event loop, not within this call: the write that
 * caused the change is answered first (answering thousands of waiters can
 * take seconds on etcd, longer than the writer's connection may idle),
 * and a burst of writes wakes them once. */
void watch_notify(struct watch *w, const char *svc);

/* Answers every waiter now (shutting down). */
void watch_flush(struct watch *w);

/* Waiters pending now. */
size_t watch_count(const struct watch *w);

#endif
