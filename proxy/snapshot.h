/*
 * snapshot: everything a connection needs that can change at run time
 * (config, policy, TLS contexts, endpoints), built whole, never modified,
 * and reference-counted. A connection holds the snapshot it started with;
 * a reload swaps in a new one for new connections only.
 */
#ifndef MESHLET_PROXY_SNAPSHOT_H
#define MESHLET_PROXY_SNAPSHOT_H

#include <stdatomic.h>
#include <stdint.h>
#include <openssl/ssl.h>

#include "meshlet/config.h"
#include "meshlet/json.h"
#include "meshlet/metrics.h"
#include "meshlet/policy.h"
#include "meshlet/tls.h"

/* Per outbound listener: whom we expect upstream, and resumable sessions. */
struct snapshot_outbound {
	char expect_id[SPIFFE_ID_MAX + 1];
	/* sessions[endpoint * workers + worker]: each worker touches only its own slots. */
	SSL_SESSION **sessions;
};

struct snapshot {
	atomic_int refs;
	uint64_t version;
	struct config *cfg;
	struct policy *policy;
	char self_id[SPIFFE_ID_MAX + 1];
	time_t cert_not_after;
	SSL_CTX *server_ctx;
	SSL_CTX *client_ctx;
	struct metrics_decision **rule_counters;   /* one per policy rule */
	struct metrics_decision *default_counter;
	struct snapshot_outbound *outbound;        /* one per cfg->outbound */
};

/*
 * Builds a snapshot from cfg (taken over: freed with the snapshot, also on
 * failure): loads the policy and TLS material, builds both SSL contexts and
 * resolves the decision counters. Returns it with one reference, or NULL
 * with err set.
 */
struct snapshot *snapshot_build(struct config *cfg, struct metrics *m, uint64_t version,
                                struct meshlet_err *err);

struct snapshot *snapshot_ref(struct snapshot *s);
void snapshot_unref(struct snapshot *s);

/* The snapshot of an SSL_CTX's new-session callback: see snapshot_save_session. */
void snapshot_save_session(struct snapshot *s, size_t listener, size_t endpoint, int worker,
                           SSL_SESSION *sess);
SSL_SESSION *snapshot_session(const struct snapshot *s, size_t listener, size_t endpoint,
                              int worker);

/* Counter for a decision (rule NULL: the default). */
struct metrics_decision *snapshot_decision_counter(const struct snapshot *s,
                                                   const struct policy_decision *d);

/*
 * Refuses a new config that would need new listening sockets (listen
 * addresses, protocols, admin): those are bound once at start.
 * Returns 0 or -EINVAL with err naming the field.
 */
int snapshot_check_reloadable(const struct config *old, const struct config *new_cfg,
                              struct meshlet_err *err);

#endif
