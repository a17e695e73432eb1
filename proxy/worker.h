/*
 * worker: one thread with its own event base and its own SO_REUSEPORT
 * listening sockets, accepting connections and running them to the end.
 * Other threads talk to it only through worker_send().
 */
#ifndef MESHLET_PROXY_WORKER_H
#define MESHLET_PROXY_WORKER_H

#include "meshlet/config.h"
#include "worker-t.h"

/*
 * Sets w up as worker id of a process serving cfg's listeners (bound now,
 * accepting once the thread runs). Returns 0 or -errno; call
 * worker_destroy() either way.
 */
int worker_init(struct worker *w, struct worker_shared *shared, int id, const struct config *cfg);

/* Closes w's listeners and connections and frees what w holds (not w). */
void worker_destroy(struct worker *w);

/* The thread's body: runs w's event loop until a drain or stop ends it. */
void *worker_main(void *arg);

/* Queues cmd for w's thread; callable from any thread. */
void worker_send(struct worker *w, enum worker_cmd cmd);

#endif
