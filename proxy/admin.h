/*
 * admin: the proxy's admin listener (loopback by default), served from the
 * main thread: GET /healthz, /ready, /metrics, /config; POST /drain.
 * It is a separate socket from every data listener, so no data-path
 * connection can reach it; state changes only by POST.
 */
#ifndef MESHLET_PROXY_ADMIN_H
#define MESHLET_PROXY_ADMIN_H

#include "proxy.h"

/* Binds the admin listener of the current snapshot's config. Returns 0 or -errno. */
int admin_start(struct meshlet_proxy *p);
void admin_stop(struct meshlet_proxy *p);

#endif
