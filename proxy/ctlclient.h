/*
 * ctlclient: the proxy's control-plane client (control mode).
 *
 * It runs in a thread of its own with blocking HTTPS calls, so the data path
 * never waits on control, and hands each new state to its host (struct
 * ctlclient_host: the proxy, or a test) through a callback. It:
 *  - serves from the cache in state_dir at start when it holds a valid SVID
 *    (last-known-good: control may be down);
 *  - otherwise joins: reads the join token, trusts control only if its root
 *    matches the token's pin, makes a P-256 key (0600 in state_dir, never
 *    sent anywhere), sends a CSR, stores the SVID and the bundle;
 *  - registers the inbound listeners' advertise addresses with control;
 *  - long-polls /v1/services/{svc}/config and installs policy, bundle
 *    (revocations included), endpoints; renews the SVID at 50 % of its
 *    lifetime (with jitter) and at once when control bumps cert_generation;
 *  - caches every installed state atomically in state_dir;
 *  - retries with exponential backoff and jitter, and keeps
 *    meshlet_control_connected up to date.
 */
#ifndef MESHLET_PROXY_CTLCLIENT_H
#define MESHLET_PROXY_CTLCLIENT_H

#include <stdbool.h>
#include <stddef.h>

#include "meshlet/config.h"
#include "meshlet/json.h"

struct ctlclient;
struct snapshot_source;

/*
 * What the client needs from the program it serves (the proxy, or a test).
 * Both callbacks run on the client's thread (install also in
 * ctlclient_start, before the thread exists) and must be thread-safe
 * towards the host's own threads.
 */
struct ctlclient_host {
	/* Makes src current (everything in it is taken over, also on
	 * failure). A NULL src->tls keeps the current TLS contexts. Returns 0,
	 * or -errno with err set. */
	int (*install)(void *ctx, struct snapshot_source *src, struct meshlet_err *err);
	/* Control answered (true) or a call failed (false): the
	 * meshlet_control_connected gauge. Returns the previous value. */
	bool (*set_connected)(void *ctx, bool connected);
	/* Optional: the counter summary for the next config poll (the value
	 * of API_STATS_HEADER, malloc'd), or NULL when nothing was counted
	 * since the last one. */
	char *(*stats)(void *ctx);
	void *ctx;
};

/*
 * Starts the client for cfg (control mode; borrowed, must outlive the
 * client), reporting to host (copied). If the cache in state_dir holds a
 * currently valid SVID, the cached state is installed before this returns.
 * Returns 0 and *out, or -errno with err set (unusable state_dir,
 * unreadable token file when there is no cache).
 */
int ctlclient_start(const struct ctlclient_host *host, const struct config *cfg,
                    struct ctlclient **out, struct meshlet_err *err);

/* Stops the thread (interrupting a pending poll) and frees the client. */
void ctlclient_stop(struct ctlclient *c);

/*
 * News to report (peerstats_set_nudge): interrupts the config long poll
 * in flight, at most once per second, so the next one carries the counter
 * summary at once. Thread-safe, quick, never blocks on the network; a
 * no-op while no poll is being made (the next one takes the summary).
 */
void ctlclient_nudge(struct ctlclient *c);

/*
 * For /ready's body: "connected", "connected, renewal refused: <why>",
 * "connecting", "joining" or "disconnected: <last error>" into out.
 */
void ctlclient_status(struct ctlclient *c, char *out, size_t len);

#endif
