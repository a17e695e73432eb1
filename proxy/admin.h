/*
 * admin: the proxy's admin listener (loopback by default), served from the
 * main thread: GET /healthz, /ready, /metrics, /config; POST /drain.
 * It is a separate socket from every data listener, so no data-path
 * connection can reach it; state changes only by POST.
 *
 * It knows the proxy only through struct admin_hooks: the current
 * snapshot, a status for /ready and a way to drain.
 */
#ifndef MESHLET_PROXY_ADMIN_H
#define MESHLET_PROXY_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <event2/event.h>

#include "meshlet/config.h"
#include "meshlet/metrics.h"

struct admin;
struct snapshot;

/* What /ready reports besides the snapshot, as the proxy sees it now. */
struct admin_status {
	bool draining;
	bool control_mode;              /* false: static mode */
	char control[1024];             /* control mode: "connected", "joining", ... */
};

struct admin_hooks {
	/* The current snapshot with a new reference, or NULL (none yet). */
	struct snapshot *(*snapshot)(void *arg);
	void (*status)(void *arg, struct admin_status *out);
	/* POST /drain: stop accepting, let connections finish, keep running. */
	void (*drain)(void *arg);
	void *arg;
};

/*
 * Binds the admin listener at boot_cfg's admin address on base (the main
 * thread's). boot_cfg, m and hooks are borrowed and must outlive the
 * listener. Returns 0 and *out (free with admin_stop), or -errno.
 */
int admin_start(struct event_base *base, const struct config *boot_cfg, struct metrics *m,
                const struct admin_hooks *hooks, struct admin **out);

/* Closes the listener and frees a (NULL is fine). */
void admin_stop(struct admin *a);

#endif
