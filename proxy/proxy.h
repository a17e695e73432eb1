/*
 * proxy: the meshlet-proxy process. One struct meshlet_proxy holds what the
 * process shares (current snapshot, metrics, workers); each worker thread
 * (worker.h) runs its own event base with its own SO_REUSEPORT listening
 * sockets. The main thread runs the admin listener and handles signals.
 * This is the one module that knows every other one.
 */
#ifndef MESHLET_PROXY_PROXY_H
#define MESHLET_PROXY_PROXY_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "meshlet/config.h"
#include "meshlet/metrics.h"
#include "snapshot.h"
#include "worker-t.h"

struct admin;
struct ctlclient;

struct meshlet_proxy {
	const char *config_file;
	struct config *boot_cfg;        /* as loaded at start: listeners, mode */
	json_t *good_doc;               /* control mode: the last config document that applied */
	struct event_base *base;        /* main thread: admin, signals, timers */
	struct metrics *metrics;
	pthread_mutex_t snap_lock;
	struct snapshot *snap;          /* current; guarded by snap_lock */
	uint64_t version;               /* of the current snapshot */
	struct worker *workers;
	int n_workers;
	struct admin *admin;
	struct ctlclient *ctl;          /* control mode: the control-plane client */
	struct event *installed_ev;     /* a snapshot was installed from another thread */
	atomic_bool workers_started;    /* set once every worker runs */
	struct event *drain_timer;
	atomic_bool draining;
	struct worker_shared shared;    /* what the workers share: ids, counts, the snapshot */
	int exit_code;
};

/* The current snapshot with a new reference (snapshot_unref when done);
 * NULL in control mode until the first state arrived. */
struct snapshot *proxy_snapshot(struct meshlet_proxy *p);

/*
 * Static mode: loads the config file and the files it names, builds a
 * snapshot and makes it current. On the first call it is what start-up
 * uses; later it is a reload that refuses listener changes. Returns 0, or
 * -EINVAL with err set and the current snapshot untouched.
 */
int proxy_load(struct meshlet_proxy *p, struct meshlet_err *err);

/*
 * Control mode: makes a snapshot of the config file and src (certificate,
 * bundle, policy, endpoints: taken over, also on failure) current. A NULL
 * src->tls keeps the current snapshot's TLS contexts (and so its sessions'
 * validity): pass it when only policy or endpoints changed. Callable from
 * any thread. Connections whose peer the new bundle revokes are closed.
 * Returns 0, or -EINVAL with err set and the current snapshot untouched.
 */
int proxy_install(struct meshlet_proxy *p, struct snapshot_source *src, struct meshlet_err *err);

/* Stop accepting and let connections finish (SIGTERM, POST /drain). When
 * exit is true the process exits once all are done or the drain timeout
 * passed. */
void proxy_drain(struct meshlet_proxy *p, bool exit);

/* Runs meshlet-proxy with an already validated config file. Returns the
 * process exit code. */
int proxy_run(const char *config_file);

#endif
