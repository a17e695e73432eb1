/*
 * state: meshlet-control's durable state (the state directory and the
 * store) and every operation of the API on it. Nothing here knows HTTP:
 * handlers.c parses requests, calls these, and maps their errors (below)
 * to HTTP statuses and the error body.
 *
 * Errors: the functions that take a struct state_error return 0 or one of
 *   -EINVAL   the request is malformed (a CSR, an address, a service name)
 *   -EPERM    the caller may not do this (a join token, a renewal, an address
 *             on another IP than the proxy's)
 *   -ENOENT   what the request names does not exist
 *   -EEXIST   it clashes with what is stored (held or assigned elsewhere)
 *   -EBUSY    a CA rotation step cannot be taken now (se->reason says why)
 *   -ESTALE   If-Match names another version than the stored one
 *   -E2BIG    the write is too large to store
 *   -EDQUOT   over a registry cap
 *   -EIO      the store, memory or randomness failed (logged): control's fault
 * with a message (and the request field it concerns) in the state_error.
 *
 * State directory (0700, refused when group or others may access it):
 *   ca.pem          the trust bundle for clients of control: every root
 *                   currently in the bundle (just the first root until a CA
 *                   rotation), rewritten atomically when the bundle changes
 *   ca-<n>.pem      root n's certificate (n = 0, 1, ...)
 *   ca.key          root 0's private key (0600); ca-<n>.key for n >= 1
 *   admin.token     the admin bearer token, 64 hex digits (0600)
 *   state.db        the store (unless --store names another file)
 * On a shared store (--store etcd:...) the directory holds only ca.pem and,
 * on the replica that initialised the store, admin.token; the roots and
 * the admin token's digest are in the store:
 *   ca/<id>                 {cert: PEM, key: the PEM key sealed under the KEK}
 *   meta/admin              {sha256: hex digest of the admin token}
 *
 * Store keys (values are JSON objects):
 *   meta/control            {trust_domain, created_at}
 *   meta/ca                 {phase, roots: [root ids, bundle order], signing: id, next_id}
 *   meta/bundle             {version}            bumped when roots or revocations change
 *   meta/endpoints          {version}            bumped with every endpoint change
 *   meta/rotate-all         {cert_generation}    certs rotate --all, CA switch
 *   services/<svc>          {policy_writes, cert_generation}: policy_writes bumped
 *                           with every policy write of <svc>, cert_generation by
 *                           certs rotate --service <svc>
 *   policies/<svc>          the policy document; its revision is the policy version
 *   traffic/<svc>           the traffic document; its revision is its version
 *   meta/traffic            {version}            bumped with every traffic write
 *   tokens/<sha256 hex>     {service, expires_at, uses_left, created_at}
 *   certs/<serial>          {service, not_after, issued_at, root, via, parent, renewals}:
 *                           parent the serial renewed from (absent: via a join token),
 *                           renewals how often this one was used to renew,
 *                           origin the join-token SVID its lineage started with
 *   lineages/<origin>       {service, window_start, renewals, not_after}: renewals
 *                           of the lineage since window_start (one SVID lifetime)
 *   revoked/<serial>        {service, not_after, revoked_at}
 *   endpoints/<svc>/<addr>  {address, ports, serial, not_after, registered_at, via}:
 *                           via "connection" (addr is on the IP the proxy connects
 *                           from) or "assignment" (assigned/<addr> names svc)
 *   assigned/<addr>         {service, address, assigned_at}: the admin's assignment
 *   proxies/<serial>        {service, address, ports, last_seen, not_after, config_version}
 *
 * A service's config version is the largest revision among services/<svc>,
 * meta/bundle, meta/endpoints, meta/rotate-all and meta/traffic: it passes any V a proxy
 * holds as soon as anything in its config answer changes.
 *
 * Single-threaded: use from control's event loop only.
 */
#ifndef MESHLET_CONTROL_STATE_H
#define MESHLET_CONTROL_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/log.h"
#include "meshlet/store.h"

/* Defaults and limits of the command line. */
#define CONTROL_SVID_TTL_DEFAULT 3600
#define CONTROL_SVID_TTL_MIN 60
#define CONTROL_MAX_SANS 16
/* Renewals one SVID may make (POST /v1/svid over mTLS with it), counted
 * by distinct public keys: a proxy that loses an answer retries with the
 * same SVID and the same key, which is not counted again (the lineage cap
 * still counts it); more keys is a loop minting certificates, refused
 * (-EPERM, reason renewal_limit). */
#define CONTROL_RENEWALS_MAX 3
/* Renewals per lineage (the SVIDs descending from one join) per SVID
 * lifetime: a proxy renews about twice per lifetime, plus certs rotate, a
 * CA switch and retries; more is refused (-EPERM, reason lineage_limit). */
#define CONTROL_LINEAGE_RENEWALS_MAX 10
/* Registry limits (docs/control.md): entries one proxy (one SVID) may
 * hold, entries per service (--max-endpoints-per-service), and the window
 * within which registry changes share one config version bump. */
#define CONTROL_ENDPOINTS_PER_INSTANCE 16
#define CONTROL_ENDPOINTS_PER_SERVICE_DEFAULT 1024
#define CONTROL_ENDPOINTS_PER_SERVICE_MAX 1000000
#define CONTROL_ENDPOINTS_COALESCE_MS 500

/* The command line of meshlet-control; strings borrowed from argv. */
/* The longest admin token accepted from a file (characters). */
#define ADMIN_TOKEN_MAX 256

struct control_opts {
	const char *listen;            /* "host:port" */
	const char *state_dir;
	const char *trust_domain;
	const char *sans[CONTROL_MAX_SANS];
	size_t n_sans;
	int64_t svid_ttl;              /* seconds */
	const char *store_path;        /* NULL: <state_dir>/state.db */
	/* --store etcd:URLS: a shared store; then kek_file is required. */
	struct store_etcd_opts etcd;   /* etcd.endpoints NULL: SQLite */
	const char *kek_file;
	/* etcd: the admin token (one line, 0600) the store is initialised
	 * with, or checked against when it already is; NULL: a new random one
	 * written to DIR/admin.token of the replica that initialises. */
	const char *admin_token_file;
	int64_t max_endpoints_per_service;   /* 0: CONTROL_ENDPOINTS_PER_SERVICE_DEFAULT */
	const char *metrics_listen;    /* plain-HTTP /metrics "host:port", NULL: none */
	enum log_level log_level;
};

enum ca_phase { CA_PHASE_STABLE, CA_PHASE_PREPARED, CA_PHASE_SWITCHED };

/* Why an operation was refused (see the table above). */
struct state_error {
	const char *reason;            /* static ("renewal_limit") for refusals a client
	                                * tells apart; NULL: none */
	struct meshlet_err e;          /* message, and the request field it concerns */
};

struct control_state;

/*
 * Opens the state directory: on first start creates it (0700), a root CA,
 * admin.token and the store, and logs where they are and the root's pin;
 * later starts reuse them. Refuses (-EACCES / -EINVAL / -EIO, message in
 * err): a directory others may access, a trust domain other than the
 * stored one, a damaged or foreign database, a half-initialised directory.
 * Returns 0 and *out (free with state_close()).
 */
int state_open(struct control_state **out, const struct control_opts *o, struct meshlet_err *err);

/* Writes what is only in memory (proxies last seen) and frees st. */
void state_close(struct control_state *st);

/* ---- several replicas (a shared store) ---- */

/* A descriptor that becomes readable when another replica changed the
 * store (store_follow()), or -1 (SQLite: nobody else writes). */
int state_follow_fd(struct control_state *st);

/* After that descriptor was readable: empties it and reloads what this
 * replica keeps in memory from the store (the roots when meta/ca moved,
 * then *tls_changed: control's server certificate is to be reissued by the
 * signing root; the revocation list when the bundle's version moved). The
 * caller then answers its long polls. */
void state_refresh(struct control_state *st, bool *tls_changed);

/* ---- metrics ---- */

/* Times every store call with fn(arg, ...) (store_set_observer); NULL: stop. */
void state_set_store_observer(struct control_state *st, store_observer_fn fn, void *arg);

/* What control's gauges report, read from memory (no store access). */
struct state_counts {
	size_t revoked;                /* serials on the revocation list */
	size_t roots;                  /* roots in the trust bundle */
	size_t proxies_polling;        /* proxies (SVIDs) with a long poll pending */
	enum ca_phase phase;
};
void state_counts(const struct control_state *st, struct state_counts *c);

/* "stable", "prepared", "switched". */
const char *state_phase_name(enum ca_phase phase);

/* ---- identity ---- */

const char *state_trust_domain(const struct control_state *st);

/* {backend: "sqlite"|"etcd", ok, revision | error}: one cheap store read,
 * for GET /v1/health and meshletctl status. */
json_t *state_store_status(struct control_state *st);

/* How many store reads ever found the store unreachable: a caller that
 * reads several keys compares the count before and after. */
uint64_t state_store_misses(const struct control_state *st);

/* True when the last store call found the store unreachable (etcd down):
 * a failure now is worth a 503 and a retry, not a 500. */
bool state_store_down(const struct control_state *st);

/* True when token is the admin token (constant time over SHA-256 digests). */
bool state_admin_ok(const struct control_state *st, const char *token);

/* True when serial (canonical hex) is on the revocation list. */
bool state_is_revoked(const struct control_state *st, const char *serial);

/* ---- TLS material for control's own server ---- */

/* The root that signs now (borrowed). */
const struct ca *state_signing_ca(const struct control_state *st);

/* The roots of the bundle, oldest first (borrowed; *n of them). */
X509 *const *state_roots(const struct control_state *st, size_t *n);

/* The certificates control's server sends after its own, into out (room
 * for 2; borrowed); returns how many. The signing root; while the phase
 * is switched, the signing root cross-signed by the old root, then the old
 * root, so that a client holding only the old root (a proxy that was down
 * through the prepared phase, a join token pinning the old root) still
 * verifies control. */
size_t state_server_chain(const struct control_state *st, X509 **out);

/* ---- policies ---- */

/* if_match: -1 none, 0 "*" (must exist), > 0 the version it must have
 * (-ESTALE otherwise). get and delete: -ENOENT when svc has no policy. */
int state_policy_put(struct control_state *st, const char *svc, const json_t *doc,
                     int64_t if_match, int64_t *version, struct state_error *se);
int state_policy_get(struct control_state *st, const char *svc, json_t **doc, int64_t *version,
                     struct state_error *se);
int state_policy_delete(struct control_state *st, const char *svc, int64_t if_match,
                        int64_t *revision, struct state_error *se);
int state_policy_list(struct control_state *st, json_t **out, struct state_error *se);

/* ---- traffic documents ---- */

/* As the policy calls above, for traffic/<svc> (docs/traffic.md). The
 * caller validates doc (traffic_parse) before a put. */
int state_traffic_put(struct control_state *st, const char *svc, const json_t *doc,
                      int64_t if_match, int64_t *version, struct state_error *se);
int state_traffic_get(struct control_state *st, const char *svc, json_t **doc,
                      int64_t *version, struct state_error *se);
int state_traffic_delete(struct control_state *st, const char *svc, int64_t if_match,
                         int64_t *revision, struct state_error *se);
int state_traffic_list(struct control_state *st, json_t **out, struct state_error *se);

/* The config answer's "traffic": {service: {version, traffic}} for svc
 * and the upstreams q names. Returns 0 or -EIO. */
int state_traffic_config(struct control_state *st, const char *svc,
                         const struct api_config_query *q, json_t **out);

/* Adds to the dry run's answer out the rate limits and faults of svc's
 * traffic document that select req (api_check_add_traffic). */
int state_traffic_check(struct control_state *st, const char *svc,
                        const struct policy_request *req, json_t *out, struct state_error *se);

/* ---- tokens and SVIDs ---- */

/* Creates a join token; *out is {token, service, expires_at, uses}. */
int state_token_create(struct control_state *st, const struct api_token_req *r, json_t **out,
                       struct state_error *se);

/*
 * Issues an SVID for service to pubkey and records it. With token (a join
 * token presented by the caller), the token must be valid for service and
 * one of its uses is consumed in the same atomic write that records the
 * certificate. Without, the caller proved service with its SVID
 * renew_serial (moved to the new serial in the proxies registry).
 * *out: {cert_chain, serial, expires_at, spiffe_id, trust_domain, bundle,
 * bundle_version}. Refused: -EINVAL a bad service name or key; -EPERM a
 * token that is unknown, for another service, expired or used up, or a
 * renewal past a cap (reasons unknown_certificate, renewal_limit,
 * ancestor_revoked, lineage_limit).
 */
int state_svid_issue(struct control_state *st, const char *service, const char *token,
                     const char *renew_serial, EVP_PKEY *pubkey, json_t **out,
                     struct state_error *se);

/* ---- bundle and config ---- */

/* {trust_domain, roots[], revoked[], version}: a new reference. */
json_t *state_bundle(struct control_state *st);

/* The config version of svc (see above). Returns 0 or -EIO. */
int state_config_version(struct control_state *st, const char *svc, int64_t *version);

/* The same in two parts, for checking many services at once: the part
 * every service shares, and svc's own; the version is the larger. */
int state_config_version_shared(struct control_state *st, int64_t *version);
int state_config_version_own(struct control_state *st, const char *svc, int64_t *version);

/* As those two, for waking long polls: on etcd from the revisions the
 * store's follower keeps in memory (its watch events and this replica's
 * own writes), no round trip; from the store while it cannot tell (not yet
 * primed, the watch being resumed). A version read so may lag the store
 * by a watch event, which wakes the long polls again when it arrives. */
int state_watch_version_shared(struct control_state *st, int64_t *version);
int state_watch_version_own(struct control_state *st, const char *svc, int64_t *version);
/* Both, the larger: svc's config version as the follower knows it. */
int state_watch_version(struct control_state *st, const char *svc, int64_t *version);

/* {service, version, policy|null, policy_version, bundle_version,
 *  cert_generation, endpoints: {svc: [{address, ports}]}, traffic: {svc:
 *  {version, traffic}}}: endpoints of the live entries of the services q
 *  asks for (upstreams=), none when it asks for none; traffic documents of
 *  svc and of those services. The same answer (a new reference to one
 *  object: do not change it) is reused for the same service and upstreams
 *  while the version the follower knows is its version, for at most 10 s,
 *  and never for a proxy that holds a later version (q->after). */
int state_config(struct control_state *st, const char *svc, const struct api_config_query *q,
                 json_t **out, struct state_error *se);

/* ---- registry ---- */

/*
 * Records that the proxy holding SVID serial (of svc, valid until
 * not_after), connecting from remote ("ip:port"), serves r. An entry
 * claims the ip:port of its address and its application ports on that IP.
 * Refused: -EPERM an address on another IP than remote's that the admin
 * did not assign to svc; -EEXIST an address the admin assigned to another
 * service, or a claim that a live entry (unexpired, unrevoked SVID) or an
 * assignment of another service shares; -EDQUOT a new entry over
 * CONTROL_ENDPOINTS_PER_INSTANCE for serial or over the per-service cap.
 * Re-registering an identical entry writes nothing. A change visible in
 * config answers is left pending: call state_endpoints_touch().
 * *out: {service, address, ports, version}.
 */
int state_endpoint_register(struct control_state *st, const char *svc,
                            const struct api_endpoint_req *r, const char *serial,
                            int64_t not_after, const char *remote, json_t **out,
                            struct state_error *se);

/*
 * Coalesced version bumps. After a registration: bumps the endpoints
 * version now if the last bump is CONTROL_ENDPOINTS_COALESCE_MS old
 * (returns 0: wake the long polls); otherwise returns the milliseconds
 * after which state_endpoints_flush() must be called, or -1 when nothing
 * is pending or such a call is already due.
 */
int64_t state_endpoints_touch(struct control_state *st);

/* The due call: bumps a pending change. True when it did (wake the polls). */
bool state_endpoints_flush(struct control_state *st);

/* Admin assignments: r->address may be registered by r->service's proxies
 * from anywhere, and by no other service. Assign: -EEXIST when assigned to
 * another service or claimed by another live service; idempotent.
 * *out {service, address, assigned_at}. Unassign: -ENOENT when not
 * assigned, -EEXIST when assigned to another service; also drops the entry the
 * assignment allowed (bumping the version). *out {service, address,
 * removed, entry_removed}. */
int state_endpoint_assign(struct control_state *st, const struct api_assign_req *r,
                          json_t **out, struct state_error *se);
int state_endpoint_unassign(struct control_state *st, const struct api_assign_req *r,
                            json_t **out, struct state_error *se);

/* {endpoints: [{service, address, ports, via, serial, registered_at,
 *  expires_at, live}], assignments: [{service, address, assigned_at}]} */
int state_endpoints_list(struct control_state *st, json_t **out, struct state_error *se);

/* Notes a request from the proxy with SVID serial. held: the config
 * version it holds (-1: unknown). polling: +1 when a long poll starts,
 * -1 when it ends, 0 otherwise. Kept in memory, written to the store by
 * state_maintain(). */
void state_proxy_seen(struct control_state *st, const char *serial, const char *svc,
                      int64_t not_after, int64_t held, int polling);

/* What the proxy with SVID serial said about itself with its config poll
 * (API_DEGRADED_*), shown by state_proxies(). */
void state_proxy_degraded(struct control_state *st, const char *serial, unsigned flags);

/* Notes that the proxy with SVID serial fetched the bundle (GET /v1/bundle):
 * it then holds the roots, which is what the CA switch waits for. */
void state_proxy_bundle_fetched(struct control_state *st, const char *serial);

/* {"proxies": [...]} */
json_t *state_proxies(struct control_state *st);

/* ---- certificates ---- */

int state_certs_list(struct control_state *st, json_t **out, struct state_error *se);
int state_certs_rotate(struct control_state *st, const struct api_rotate_req *r, json_t **out,
                       struct state_error *se);
/* Revokes serial and its unexpired descendants; -ENOENT: no record of it. */
int state_certs_revoke(struct control_state *st, const char *serial, json_t **out,
                       struct state_error *se);

/* ---- CA ---- */

/* {roots: [PEM], signing: index, phase, pins: [...], root_ids, bundle_version,
 *  trust_domain, gate: {next_phase, open, waiting_for, proxies[] | certs,
 *  until}, new_root_version (prepared only)}: gate says what the next
 *  state_ca_rotate() waits for. */
json_t *state_ca_show(struct control_state *st);

/*
 * Advances CA rotation one phase: stable -> prepared (a new root joins the
 * bundle), prepared -> switched (the new root signs; every proxy is told
 * to renew: refused (-EBUSY, reason proxies_not_updated) while a proxy seen within
 * the last SVID lifetime, with an unexpired unrevoked SVID, has neither
 * reported a config version >= the one that added the new root nor
 * fetched the bundle since, unless force), switched -> stable (the old
 * root leaves the bundle: refused (-EBUSY, reason old_root_in_use) while SVIDs it
 * signed are unexpired and unrevoked, unless force). A shared store: the
 * step is written only if meta/ca is at the revision this replica loaded
 * it from; otherwise nothing is written, the roots are reloaded and it
 * answers -EBUSY, reason ca_changed. *tls_changed: control's server
 * context must be rebuilt (also on that refusal).
 */
int state_ca_rotate(struct control_state *st, bool force, json_t **out, bool *tls_changed,
                    struct state_error *se);

/* ---- dry run ---- */

int state_check(struct control_state *st, const struct api_check_req *r, json_t **out,
                struct state_error *se);

/* ---- housekeeping ---- */

/*
 * Prunes expired tokens, certificate records, revocations of expired
 * certificates and endpoints whose SVID expired or was revoked; writes the
 * proxies registry. *changed: some config version moved (wake waiters).
 * Returns 0 or a negative errno (logged).
 */
int state_maintain(struct control_state *st, bool *changed);

#endif
