/*
 * ctlclient-int.h: what the files of the control-plane client share (not
 * an interface: proxy.c and admin.c use ctlclient.h).
 *
 *   ctlclient.c         the thread, its loop and backoff, one call to control,
 *                       start/stop/status
 *   ctlclient_svid.c    the join token, joining, renewal, the trust bundle
 *   ctlclient_config.c  registration, the config long poll, installing a
 *                       snapshot source through the host
 *   ctlclient_cache.c   the files in state_dir: key, SVID, bundle, state.json
 *
 * Functions here return 0, or -1 (or -errno) with c->why set, unless they
 * say otherwise; all run on the client's thread (or in ctlclient_start
 * before it exists).
 */
#ifndef MESHLET_PROXY_CTLCLIENT_INT_H
#define MESHLET_PROXY_CTLCLIENT_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "meshlet/ca.h"
#include "meshlet/config.h"
#include "meshlet/httpc.h"
#include "ctlclient.h"

#ifndef MESHLET_VERSION
#define MESHLET_VERSION "0.1.0"
#endif

#define CTL_BACKOFF_MIN_MS 200
#define CTL_BACKOFF_MAX_MS 30000
/* Longest Retry-After honoured: control asks for seconds, never this. */
#define CTL_RETRY_AFTER_MAX_MS 300000
#define CTL_POLL_WAIT_S 30                      /* long poll: control answers by then */
/* While traffic flows, the poll waits at most this long, so that control
 * gets a counter summary that often (an idle proxy waits CTL_POLL_WAIT_S). */
#define CTL_STATS_WAIT_S 5
/* ctlclient_nudge interrupts the config poll at most once per this many
 * ms, and the poll after an interrupted one waits at most
 * CTL_NUDGE_WAIT_S: news that came too soon after a nudge still leaves
 * within about a second, and a storm of denials costs control one poll a
 * second per proxy. */
#define CTL_NUDGE_MIN_MS 1000
#define CTL_NUDGE_WAIT_S 1
/* A renewal control refused is tried again after this long, while the
 * proxy keeps polling with its SVID (still valid for a while). */
#define CTL_RENEW_RETRY_S 60
#define CTL_CALL_TIMEOUT_MS 10000               /* any other call, and slack for the poll */
#define CTL_TOKEN_MAX 1024
#define CTL_STATE_MAX (8 * 1024 * 1024)
#define CTL_REASON_MAX 400
#define CTL_USER_AGENT "meshlet-proxy/" MESHLET_VERSION

/* The cache in state_dir. */
#define F_KEY "svid.key"
#define F_CERT "svid.pem"
#define F_BUNDLE "bundle.pem"
#define F_STATE "state.json"

/* What control gave us, as last accepted: the SVID, the bundle, the config. */
struct ctl_state {
	EVP_PKEY *key;
	char *cert_pem;                 /* leaf first */
	char serial[CA_SERIAL_HEX_MAX];
	time_t not_before, not_after;
	char *bundle_pem;
	json_t *revoked;                /* array of serials */
	int64_t bundle_version;         /* -1: unknown, fetch */
	int64_t cert_generation;        /* -1: take the next answer's without renewing */
	int64_t version;                /* of the last applied config: the poll's after= */
	int64_t policy_version;
	json_t *policy;                 /* as control sent it (object or null); NULL: none yet */
	json_t *endpoints;              /* {service: [addr]} of our registry-fed outbounds */
	json_t *traffic;                /* {service: {version, traffic}}: ours and our upstreams' */
};

struct ctlclient {
	struct ctlclient_host host;
	const struct config *cfg;
	char control_id[TRUST_DOMAIN_MAX + 32];   /* spiffe://<td>/control */
	pthread_t thread;
	bool thread_started;

	pthread_mutex_t lock;           /* guards stop, active, status */
	pthread_cond_t cond;            /* signalled on stop */
	bool stop;
	struct httpc *active;           /* the client of the request in flight */
	bool polling;                   /* a config poll is being prepared or in flight */
	bool nudged;                    /* ctlclient_nudge interrupted it */
	struct timespec last_nudge;     /* monotonic */
	char status[CTL_REASON_MAX + 32];

	struct ctl_state st;
	struct httpc *http;             /* mutual TLS with our SVID; NULL: build it */
	bool have_svid;
	bool installed;                 /* the proxy serves a snapshot we installed */
	bool tls_dirty;                 /* SVID or bundle changed since the last install */
	bool need_bundle;
	bool need_renew;
	int64_t pending_generation;     /* cert_generation that asked for need_renew */
	/* The key (and CSR) of the renewal in progress, kept across retries until
	 * one succeeds: control recognises a retry by its public key and does not
	 * count it against the SVID's renewal cap (an answer lost to a timeout
	 * would otherwise use one up). Memory only; never the live key. */
	EVP_PKEY *renew_key;
	json_t *renew_body;
	char refusal[64];               /* error code of the last refused call, or "" */
	int64_t bundle_asked;           /* bundle version a config answer made us fetch */
	bool need_register;
	bool reconnecting;              /* no call answered since start or the last failure */
	bool warned_no_policy;
	bool after_nudge;               /* the last poll was interrupted by a nudge */
	/* Control refused the due renewal: the proxy keeps polling with its
	 * valid SVID (degraded=renewal) and tries again at renew_retry_at. */
	bool renew_failing;
	time_t renew_retry_at;
	time_t renew_at;
	unsigned backoff_ms;
	unsigned retry_after_ms;        /* the last refusal's Retry-After, 0 if none */
	unsigned failures;
	size_t url;                     /* index of the control URL in use (cfg->control_urls) */
	bool url_failed;                /* the last call could not reach it or got a 5xx */
	size_t moves;                   /* URLs moved to since the last answered call */
	char why[CTL_REASON_MAX];       /* reason of the step that just failed */
	char call_err[HTTPC_ERR_MAX];   /* httpc's message of the last failed call */
	char last_warned[CTL_REASON_MAX];
};

/* ctlclient.c */
__attribute__((format(printf, 2, 3)))
int ctlc_fail(struct ctlclient *c, const char *fmt, ...);
__attribute__((format(printf, 2, 3)))
void ctlc_set_status(struct ctlclient *c, const char *fmt, ...);
/* The control URL in use: one of cfg->control_urls, the next one after a
 * connection failure or a 5xx answer. */
const char *ctlc_url(const struct ctlclient *c);
/* A uniform value in [0, 1). */
double ctlc_rand_unit(void);
/* t as RFC 3339 UTC in buf (CA_TIME_LEN bytes), for messages. */
const char *ctlc_when(time_t t, char *buf);
/* One request on h, interruptible by ctlclient_stop: 0 with *r filled on a
 * 2xx answer (caller clears it); a negative enum httpc_status, or the HTTP
 * status of a refusal, with c->why set (what: the call's name). */
int ctlc_call(struct ctlclient *c, struct httpc *h, const char *what, const char *method,
              const char *path, const json_t *body, int timeout_ms, struct httpc_response *r);
/* As ctlc_call, with extra request headers ("Name: value", NULL-terminated). */
int ctlc_call_with(struct ctlclient *c, struct httpc *h, const char *what, const char *method,
                   const char *path, const json_t *body, const char *const *headers,
                   int timeout_ms, struct httpc_response *r);
/* The mutual-TLS client for our SVID and bundle (built when they changed);
 * NULL with c->why set. */
struct httpc *ctlc_mtls(struct ctlclient *c);
void ctlc_drop_mtls(struct ctlclient *c);

/* ctlclient_svid.c */
/* Certificates of PEM text, in order (NULL when none). */
STACK_OF(X509) *ctlc_pem_certs(const char *pem);
/* The join token file's content, trimmed; NULL with c->why and errno set.
 * Free with ctlc_token_free (which cleanses it). */
char *ctlc_token_read(struct ctlclient *c);
void ctlc_token_free(char *tok);
/* Checks cert_pem (for key) is a valid SVID of our service against
 * bundle_pem (ours when NULL) and makes it ours; takes key over on success. */
int ctlc_adopt_svid(struct ctlclient *c, EVP_PKEY *key, const char *cert_pem,
                    const char *bundle_pem);
int ctlc_join(struct ctlclient *c);
/* 0, 403 when control refused the renewal (c->refusal says why), or -1. */
int ctlc_renew(struct ctlclient *c);
int ctlc_fetch_bundle(struct ctlclient *c);

/* ctlclient_config.c */
int ctlc_register_inbound(struct ctlclient *c);
/* The part of {service: [endpoint]} our outbound listeners take; NULL: no memory. */
json_t *ctlc_relevant_endpoints(const struct config *cfg, const json_t *all);
/* The part of the config answer's {service: {version, traffic}} this
 * proxy applies: its own service's and its outbound listeners' (every
 * one in transparent mode); NULL: no memory. */
json_t *ctlc_relevant_traffic(const struct config *cfg, const json_t *all);
/* Hands policy (or null: deny all), endpoints, traffic documents and, when
 * changed, our SVID and bundle to the host as a new snapshot source. */
int ctlc_install(struct ctlclient *c, const json_t *policy, int64_t policy_version,
                 const json_t *eps, const json_t *traffic, int64_t version);
/* ctlc_install of what we hold, then cached. */
int ctlc_install_current(struct ctlclient *c);
int ctlc_poll_config(struct ctlclient *c);
/* Around the config poll: ctlclient_nudge may interrupt it in between.
 * ctlc_poll_end returns true when it did (h is usable again). */
void ctlc_poll_begin(struct ctlclient *c);
bool ctlc_poll_end(struct ctlclient *c, struct httpc *h);

/* ctlclient_cache.c */
/* Replaces state_dir/name with data atomically (file_replace). */
int ctlc_write_file(struct ctlclient *c, const char *name, const void *data, size_t len,
                    mode_t mode);
int ctlc_save_key(struct ctlclient *c, EVP_PKEY *key);
int ctlc_save_state(struct ctlclient *c);
/* Creates state_dir (0700) when missing; refuses one others may write to. */
int ctlc_state_dir_prepare(const struct config *cfg, struct meshlet_err *err);
/* Loads and, when the SVID is valid, installs the cache; else a join follows. */
void ctlc_cache_load(struct ctlclient *c);

#endif
