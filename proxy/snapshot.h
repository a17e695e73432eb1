/*
 * snapshot: everything a connection needs that can change at run time
 * (config, policy, TLS contexts, endpoints), built whole, never modified,
 * and reference-counted. A connection holds the snapshot it started with;
 * a reload swaps in a new one for new connections only.
 */
#ifndef MESHLET_PROXY_SNAPSHOT_H
#define MESHLET_PROXY_SNAPSHOT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <openssl/ssl.h>

#include "meshlet/config.h"
#include "meshlet/json.h"
#include "meshlet/metrics.h"
#include "meshlet/policy.h"
#include "meshlet/tls.h"
#include "meshlet/traffic.h"

/* Per outbound listener: whom we expect upstream, where it is, resumable sessions. */
struct snapshot_outbound {
	char expect_id[SPIFFE_ID_MAX + 1];
	struct config_addr *endpoints;  /* the config's, or control's registry's */
	size_t n_endpoints;
	/* sessions[endpoint * workers + worker]: each worker touches only its own slots. */
	SSL_SESSION **sessions;
};

/*
 * A traffic document the proxy holds (docs/traffic.md): its own service's
 * (the inbound side applies rate_limits and faults) or an upstream's (the
 * outbound side applies timeouts, retries, outlier and limits).
 */
struct snapshot_traffic {
	struct traffic *t;
	int64_t version;                /* control's version of it; 0 from traffic_file */
};

/*
 * What a snapshot is built from besides the config: in static mode the
 * files the config names, in control mode what control sent. Everything
 * here is taken over by snapshot_build (also on failure).
 */
struct snapshot_source {
	/* NULL, or the same as reuse_tls's (certificate, chain, bundle,
	 * revocations, options): reuse_tls's contexts are shared, and with them
	 * its session tickets and the workers' session caches. reuse_tls is
	 * the snapshot being replaced (or NULL): its rate-limit buckets carry
	 * on too, where a limit did not change. */
	struct tls_material *tls;
	const struct snapshot *reuse_tls;
	struct policy *policy;
	/* Endpoints by upstream service name, for outbound listeners that name
	 * none in the config (control mode); NULL in static mode. */
	struct snapshot_endpoints *registry;
	size_t n_registry;
	/* Traffic documents, one per service at most. */
	struct snapshot_traffic *traffic;
	size_t n_traffic;
};

/* The application ports behind one registered inbound address. */
#define SNAPSHOT_APP_PORTS_MAX 64
struct snapshot_app_ports {
	uint16_t n;
	uint16_t port[SNAPSHOT_APP_PORTS_MAX];
};

struct snapshot_endpoints {
	char service[SERVICE_NAME_MAX + 1];
	struct config_addr *addrs;
	size_t n_addrs;
	/* app_ports[i]: the application ports addrs[i]'s inbound listener
	 * forwards to, as registered with control (n_addrs of them). */
	struct snapshot_app_ports *app_ports;
};

/*
 * The service's own traffic document as its inbound side applies it: rate
 * limits (one limiter the workers share; it locks itself, and its buckets
 * carry on from the previous snapshot's where a limit did not change) and
 * faults (stateless: every request rolls anew), with their counters
 * resolved once.
 */
struct snapshot_inbound_traffic {
	const struct traffic *t;                   /* in the snapshot's traffic */
	struct traffic_limiter *limiter;
	struct metrics_labeled **limited;          /* one per t->rate_limits */
	struct metrics_labeled **faulted;          /* one per t->faults */
};

/* What the inbound traffic rules make of one request. */
struct snapshot_traffic_verdict {
	int status;                     /* 0: forward it; else answer it with this status */
	bool fault;                     /* status is a fault's abort (else 429, a rate limit) */
	const char *name;               /* the limit or fault (owned by the snapshot) */
	unsigned retry_after;           /* 429: seconds for Retry-After */
	uint32_t delay_ms;              /* a fault's delay before forwarding (or before the
	                                   abort answers); 0: none */
	const char *delay_name;         /* the fault that delays (the snapshot's), or NULL */
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
	unsigned char tls_digest[TLS_DIGEST_LEN];  /* what the contexts were built from */
	struct metrics_decision **rule_counters;   /* one per policy rule */
	struct metrics_decision *default_counter;
	struct snapshot_outbound *outbound;        /* one per cfg->outbound */
	/* Header names the policy evaluates (lower-case, each once): a request
	 * carrying one of them twice is refused, never first-wins. */
	const char **policy_headers;
	size_t n_policy_headers;
	/* control's registry (control mode): for transparent destinations */
	struct snapshot_endpoints *registry;
	size_t n_registry;
	struct snapshot_traffic *traffic;          /* sorted by nothing; few */
	size_t n_traffic;
	struct snapshot_inbound_traffic *in_traffic;   /* NULL: no rate limits or faults */
};

/*
 * Static mode: loads the TLS material, the policy and the traffic documents
 * (traffic_file, when given) from the files cfg names into src. Returns 0,
 * or -EINVAL with err naming the file.
 */
int snapshot_source_from_files(const struct config *cfg, struct snapshot_source *src,
                               struct meshlet_err *err);

/* Frees what src holds (what snapshot_build did not take). */
void snapshot_source_free(struct snapshot_source *src);

/*
 * Builds a snapshot from cfg and src (both taken over: freed with the
 * snapshot, also on failure): checks that policy and certificate belong to
 * cfg's service, builds both SSL contexts, resolves the decision counters
 * and each outbound listener's endpoints. Returns it with one reference, or
 * NULL with err set.
 */
struct snapshot *snapshot_build(struct config *cfg, struct snapshot_source *src,
                                struct metrics *m, uint64_t version, struct meshlet_err *err);

/* The traffic document of service, or NULL: the defaults apply
 * (TRAFFIC_*_DEFAULT: no retries, no ejection, no limits, no faults). */
const struct snapshot_traffic *snapshot_traffic(const struct snapshot *s, const char *service);

/*
 * Inbound, a request the policy allowed: the service's rate limits take a
 * token for its caller (429 when one has none), then its faults roll
 * (the longest delay that hit, and the first abort: the request waits the
 * delay, then is forwarded or aborted). Counts meshlet_rate_limited_total
 * and meshlet_faults_injected_total (a fault that both delays and aborts
 * once). Safe from any worker.
 */
void snapshot_traffic_inbound(const struct snapshot *s, const struct policy_request *req,
                              struct snapshot_traffic_verdict *v);

/*
 * Inbound on a tcp listener, a connection the policy allowed: the first
 * fault of the service's document that selects it (one with no HTTP
 * fields), rolls and aborts (abort_status set) closes it. Returns that
 * fault's name (counted in meshlet_faults_injected_total) or NULL. Rate
 * limits and delays do not apply to tcp connections.
 */
const char *snapshot_traffic_tcp_fault(const struct snapshot *s, const struct policy_request *req);

struct snapshot *snapshot_ref(struct snapshot *s);
void snapshot_unref(struct snapshot *s);

/*
 * Keeps sess (taking the caller's reference) as the resumable session of
 * (outbound listener, endpoint) for worker. Returns 0, or -ENOENT when there
 * is no such slot (the caller still owns sess).
 */
int snapshot_save_session(struct snapshot *s, size_t listener, size_t endpoint, int worker,
                          SSL_SESSION *sess);
SSL_SESSION *snapshot_session(const struct snapshot *s, size_t listener, size_t endpoint,
                              int worker);

/*
 * Moves worker's sessions from an older snapshot into s when both share
 * the client context that made them: per outbound listener that expects
 * the same upstream ID, per endpoint with the same address, into slots s
 * has empty. Call from that worker's thread only (each worker touches its
 * own slots). from may be NULL.
 */
void snapshot_adopt_sessions(struct snapshot *s, struct snapshot *from, int worker);

/*
 * Transparent mode: the service at dst, IP and port. A registry entry
 * holds dst when dst's IP is its address's and dst's port is the
 * address's port or one of its application ports; an outbound listener's
 * static endpoint when it is dst exactly. The instance's inbound address
 * goes to *inbound. Returns the service name, or NULL when dst is outside
 * the mesh: nothing holds it, or entries of two services do (*ambiguous
 * set: never a guess between services; the caller refuses it even where
 * outside destinations are passed through).
 */
const char *snapshot_lookup_dest(const struct snapshot *s, const struct sockaddr_storage *dst,
                                 const struct config_addr **inbound, bool *ambiguous);

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
