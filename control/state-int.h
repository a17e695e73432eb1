/*
 * state-int: what the state_*.c files share, and nothing else may use
 * (handlers, server and main see state.h only).
 *
 *   state.c           open/close, the admin token, store access (kv_*,
 *                     batches, counters), state_txn() and the error helpers
 *   state_ca.c        the roots: their files, ca.pem, rotation and its gates
 *   state_certs.c     certificate records: list, rotate, revoke; the
 *                     revocation list
 *   state_svid.c      join tokens and SVID issuance (renewal caps, lineages)
 *   state_doc.c       versioned documents per service (policies, traffic)
 *   state_policy.c    policies and the dry run
 *   state_traffic.c   traffic documents, their part of the dry run and of
 *                     the config answer
 *   state_config.c    the bundle, config versions and the config answer
 *   state_registry.c  endpoints, admin assignments, coalesced version bumps
 *   state_proxies.c   the proxies seen (in memory, written by housekeeping)
 *   state_gc.c        housekeeping: pruning what expired
 */
#ifndef MESHLET_CONTROL_STATE_INT_H
#define MESHLET_CONTROL_STATE_INT_H

#include <limits.h>

#include "meshlet/identity.h"
#include "meshlet/kek.h"
#include "meshlet/store.h"
#include "state.h"

/* A CA rotation has at most two roots in the bundle; room for one more. */
#define STATE_ROOTS_MAX 3
/* Writes per batch when pruning (below STORE_BATCH_MAX, leaving room). */
#define STATE_PRUNE_CHUNK 100
/* Runs of a read-modify-write that lost a race with another writer. */
#define STATE_RETRIES 5
/* Housekeeping runs on one replica of a shared store at a time: the one
 * holding this lock, whose lease outlives two housekeeping rounds (control
 * calls state_maintain() every minute), so a replica that dies hands it
 * over within about two and a half minutes, one that stops at once. */
#define STATE_HOUSEKEEPING_LOCK "locks/housekeeping"
#define STATE_HOUSEKEEPING_TTL 150
/* The trust bundle for control's clients, in the state directory. */
#define STATE_BUNDLE_FILE "ca.pem"

struct state_root {
	int id;
	struct ca *ca;
	char pin[CA_PIN_HEX_LEN];
	char *pem;
};

/* A proxy seen by control, keyed by the serial of the SVID it uses. */
struct state_proxy {
	char serial[CA_SERIAL_HEX_MAX];
	char service[SERVICE_NAME_MAX + 1];
	char address[64];
	json_t *ports;                 /* array, or NULL */
	int64_t not_after;
	int64_t last_seen;
	int64_t held;                  /* config version it holds, -1 unknown */
	int64_t bundle_rev;            /* revision of meta/bundle it last fetched */
	int polling;                   /* long polls pending now */
	unsigned degraded;             /* API_DEGRADED_* its last poll said (memory only) */
	bool dirty;                    /* not yet written to the store */
	struct state_proxy *next;
	struct state_proxy *hnext;     /* in its bucket of proxy_index */
};

struct control_state {
	struct control_opts o;
	char dir[PATH_MAX];
	char td[TRUST_DOMAIN_MAX + 1];
	struct store *store;
	/* A shared store (etcd, several replicas): the roots and the admin
	 * token's digest live in the store, root keys sealed under kek. */
	bool shared;
	unsigned char kek[KEK_LEN];
	int64_t bundle_rev;            /* revision of meta/bundle last loaded */
	int64_t ca_rev;                /* revision of meta/ca last loaded */
	bool housekeeper;              /* holds STATE_HOUSEKEEPING_LOCK (shared store) */
	bool store_down;               /* the last store call failed with -EAGAIN (etcd
	                                * unreachable): failures answer 503, not 500 */
	uint64_t store_misses;         /* store calls that failed so, ever: a caller that
	                                * reads several keys compares before and after */
	unsigned char admin_digest[32];
	struct state_root roots[STATE_ROOTS_MAX];
	X509 *root_certs[STATE_ROOTS_MAX];
	size_t n_roots;
	size_t signing;                /* index into roots */
	enum ca_phase phase;
	int next_id;
	X509 *cross;                   /* switched: the signing root cross-signed by the old */
	char **revoked;                /* sorted canonical serials */
	size_t n_revoked, cap_revoked;
	struct state_proxy *proxies;
	/* proxies by serial: found on every long poll, so not by a walk */
	struct state_proxy **proxy_index;
	size_t n_index, n_proxies;     /* buckets (a power of two), entries */
	char **gone;                   /* proxies/<serial> keys to delete */
	size_t n_gone;
	/* Registry changes bump meta/endpoints at most once per
	 * CONTROL_ENDPOINTS_COALESCE_MS (state_endpoints_touch). */
	int64_t max_endpoints;         /* entries per service */
	bool endpoints_pending;        /* a change not yet in the version */
	bool endpoints_timer;          /* a state_endpoints_flush() call is due */
	int64_t endpoints_bumped_ms;   /* monotonic time of the last bump */
	/* Config answers kept for reuse (state_config.c), NULL until the first. */
	struct config_cached *config_cache;
};

/* ---- small helpers (state.c) ---- */

static inline int64_t jint(const json_t *o, const char *k)
{
	return (int64_t)json_integer_value(json_object_get(o, k));
}

static inline const char *jstr(const json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

int64_t state_now(void);

/* CLOCK_MONOTONIC in milliseconds. */
int64_t state_mono_ms(void);

/* RFC 3339 of t into out (CA_TIME_LEN); returns out. */
const char *state_fmt_time(int64_t t, char *out);

/* prefix + name into out (a store key). */
void state_key(char *out, size_t len, const char *prefix, const char *name);

/* dir/name into out; a name that does not fit leaves "" (no such file). */
void state_path(const struct control_state *st, char *out, size_t len, const char *name);

/* Records path and message in se (may be NULL); returns err (a negative
 * errno of the table in state.h) so callers can `return state_fail(...)`. */
int state_fail(struct state_error *se, int err, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* As state_fail(), with reason (static) for a refusal clients tell apart. */
int state_refuse(struct state_error *se, int err, const char *reason, const char *path,
                 const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* A failed store call (r its errno): logged once here; returns -EIO. */
int state_store_failed(struct control_state *st, struct state_error *se, const char *what, int r);

/* ---- store access (state.c) ---- */

/* Reads key as JSON. Returns 0 (*out a new reference), -ENOENT (*out NULL,
 * *rev 0) or -EIO (logged). rev may be NULL. */
int kv_json(struct control_state *st, const char *key, json_t **out, int64_t *rev);

/* The revision of key, 0 when it does not exist; -EIO on error. */
int kv_rev(struct control_state *st, const char *key, int64_t *rev);

/* As kv_rev(), from the revisions the store's follower keeps for meta/ and
 * services/ keys when it can tell (no round trip; it may lag the store by
 * a watch event, whose wake-up comes after), else from the store. */
int kv_rev_followed(struct control_state *st, const char *key, int64_t *rev);

/* One atomic store write being assembled; keys and values are owned. */
struct batch {
	struct store_op ops[STORE_BATCH_MAX];
	char *mem[2 * STORE_BATCH_MAX];
	size_t n, nmem;
	int err;
};

/* Adds key = v (stolen; dumped compactly) with the condition expected. */
void batch_put(struct batch *b, const char *key, json_t *v, int64_t expected);
void batch_del(struct batch *b, const char *key, int64_t expected);
void batch_clear(struct batch *b);

/* Applies and clears b. Returns 0 (*rev the new revision; may be NULL),
 * -ECANCELED/-ENOENT when a condition failed, or another negative errno. */
int batch_commit(struct control_state *st, struct batch *b, int64_t *rev);

/* Adds to b a write of the record key with its counter field += 1 (other
 * fields kept; a missing record starts at 0); *value (may be NULL) the new
 * value. Returns 0 or -EIO. */
int bump_counter(struct control_state *st, struct batch *b, const char *key, const char *field,
                 int64_t *value);

/* The counter field of the record key (0 when missing or unreadable). */
int64_t counter_value(struct control_state *st, const char *key, const char *field);

/*
 * One read-modify-write of the store. fn reads what it needs, decides, and
 * adds its writes to b, conditioned on the revisions it read; it returns 0
 * (commit b; an empty b writes nothing) or a negative errno with se filled
 * (b is dropped). When the commit finds that another writer came first
 * (a condition failed; fn may also return -ECANCELED when it finds so
 * itself), fn runs again from the start, up to STATE_RETRIES times.
 * Returns 0 (*rev, may be NULL, the revision written), fn's error, -E2BIG
 * (the write is too large to store) or -EIO (logged). what names the write
 * for the log.
 */
typedef int (*state_txn_fn)(struct control_state *st, struct batch *b, void *arg,
                            struct state_error *se);
int state_txn(struct control_state *st, const char *what, state_txn_fn fn, void *arg,
              int64_t *rev, struct state_error *se);

/* ---- versioned documents (state_doc.c) ---- */

/* A kind of document stored as <prefix><svc>, whose revision is its
 * version. Each write also bumps a counter, so that the config versions
 * carrying the document move even on a delete: counter_field of
 * <counter_prefix><svc>, or of counter_key when counter_prefix is NULL. */
struct state_doc_kind {
	const char *prefix;            /* "policies/" */
	const char *noun;              /* "policy", for messages and the log */
	const char *list_key;          /* "policies": the list answer's key */
	const char *counter_prefix;
	const char *counter_key;
	const char *counter_field;
};

/* As state_policy_put/get/delete/list (state.h), for any kind. */
int state_doc_put(struct control_state *st, const struct state_doc_kind *kind, const char *svc,
                  const json_t *doc, int64_t if_match, int64_t *version, struct state_error *se);
int state_doc_get(struct control_state *st, const struct state_doc_kind *kind, const char *svc,
                  json_t **doc, int64_t *version, struct state_error *se);
int state_doc_delete(struct control_state *st, const struct state_doc_kind *kind,
                     const char *svc, int64_t if_match, int64_t *revision,
                     struct state_error *se);
int state_doc_list(struct control_state *st, const struct state_doc_kind *kind, json_t **out,
                   struct state_error *se);

/* ---- CA (state_ca.c) ---- */

/* The files of root id: ca-<id>.pem and its key (ca.key for root 0). */
void state_root_paths(const struct control_state *st, int id, char *cert, char *key, size_t len);

/* First start: root 0, created and saved to its files. */
int state_roots_create(struct control_state *st, struct meshlet_err *err);

/* ca/<id>: root id's certificate and its key sealed under the KEK (a new
 * reference, NULL: out of memory). */
json_t *state_root_record(const struct control_state *st, int id, const struct ca *ca);

/* Later starts: the roots meta/ca names, from their files (a shared store:
 * from their ca/<id> records). */
int state_roots_load(struct control_state *st, struct meshlet_err *err);
void state_roots_free(struct control_state *st);

/* A shared store, after meta/ca moved (another replica's CA step): the
 * roots again from the store; on failure the ones loaded before stay.
 * 0 or a negative errno (logged). */
int state_roots_reload(struct control_state *st);

/* meta/ca as JSON. */
json_t *state_ca_meta(const struct control_state *st);

/* The PEMs of the bundle's roots (a new array). */
json_t *state_roots_pem(const struct control_state *st);

/* Rewrites ca.pem with the roots of the bundle if it differs; 0 or -errno
 * (logged). */
int state_bundle_write(struct control_state *st);

/* ---- revocations (state_certs.c) ---- */

int state_revoked_load(struct control_state *st);
void state_revoked_remove(struct control_state *st, const char *serial);
void state_revoked_free(struct control_state *st);

/* ---- registry (state_registry.c) ---- */

/* Bumps meta/endpoints now: every config version moves. 0 or -errno. */
int state_endpoints_bump(struct control_state *st);

/* At start: bumps a registration a crash left unbumped. */
void state_endpoints_repair(struct control_state *st);

/* {svc: [{address, ports}]} of the live entries of the services q asks
 * for (none when it asks for none). 0 or -errno. */
int state_endpoints_json(struct control_state *st, const struct api_config_query *q,
                         json_t **out);

/* ---- proxies (state_proxies.c) ---- */

struct state_proxy *state_proxy_find(struct control_state *st, const char *serial);
struct state_proxy *state_proxy_add(struct control_state *st, const char *serial,
                                    const char *svc);
/* Forgets p and deletes its record with the next state_proxies_flush(). */
void state_proxy_drop(struct control_state *st, struct state_proxy *p);
void state_proxies_load(struct control_state *st);
/* Writes dirty entries and deletes dropped ones, in chunks; 0 or -errno. */
int state_proxies_flush(struct control_state *st);
void state_proxies_free(struct control_state *st);

/* Frees the config answers kept for reuse (state_config.c). */
void state_config_cache_free(struct control_state *st);

#endif
