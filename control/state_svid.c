/*
 * state_svid: join tokens and SVID issuance. A join costs one use of a
 * token; a renewal is counted against the parent certificate (distinct
 * keys) and its lineage (per SVID lifetime), in the same atomic write
 * that records the new certificate; see state.h.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

/* Ancestors followed when checking a renewal's lineage: a proxy's chain
 * of unexpired SVIDs is a few long (records go when certificates expire). */
#define STATE_LINEAGE_DEPTH_MAX 64

/* ---- tokens ---- */

int state_token_create(struct control_state *st, const struct api_token_req *r, json_t **out,
                       struct state_error *se)
{
	unsigned char secret[API_TOKEN_SECRET_BYTES];
	char token[API_TOKEN_MAX], hash[API_SHA256_HEX_LEN], key[STORE_KEY_MAX], t[CA_TIME_LEN];
	struct batch b = {0};
	int64_t now = state_now(), expires = now + r->ttl;
	int ret;

	if (RAND_bytes(secret, sizeof(secret)) != 1)
		return state_fail(se, -EIO, "", "no randomness");
	ret = api_token_format(token, sizeof(token), r->service, st->roots[st->signing].pin, secret);
	OPENSSL_cleanse(secret, sizeof(secret));
	if (ret)
		return state_fail(se, -EIO, "", "cannot format the token");
	api_sha256_hex(token, strlen(token), hash);
	state_key(key, sizeof(key), "tokens/", hash);
	/* A new random key: no race to retry, so no state_txn(). */
	batch_put(&b, key, json_pack("{s:s, s:I, s:I, s:I}", "service", r->service,
	                             "expires_at", (json_int_t)expires,
	                             "uses_left", (json_int_t)r->uses,
	                             "created_at", (json_int_t)now), 0);
	ret = batch_commit(st, &b, NULL);
	if (ret) {
		OPENSSL_cleanse(token, sizeof(token));
		return state_store_failed(st, se, "token write", ret);
	}
	*out = json_pack("{s:s, s:s, s:s, s:I}", "token", token, "service", r->service,
	                 "expires_at", state_fmt_time(expires, t), "uses", (json_int_t)r->uses);
	OPENSSL_cleanse(token, sizeof(token));
	return 0;
}

/* ---- one issuance ---- */

struct svid_txn {
	const char *service;
	const char *renew_serial;      /* a renewal: the caller's SVID */
	char tkey[STORE_KEY_MAX];      /* a join: tokens/<sha256 of the token>, else "" */
	char khash[API_SHA256_HEX_LEN];   /* SHA-256 of the new key */
	EVP_PKEY *pubkey;
	int64_t now;
	/* out */
	X509 *cert;
	char serial[CA_SERIAL_HEX_MAX];
	int64_t not_after;
	char origin[CA_SERIAL_HEX_MAX];   /* the lineage a renewal belongs to */
};

/* Checks the join token and takes one of its uses into b. */
static int token_use(struct control_state *st, struct batch *b, const struct svid_txn *t,
                     struct state_error *se)
{
	char tm[CA_TIME_LEN];
	json_t *tok = NULL;
	int64_t rev = 0;
	int r = kv_json(st, t->tkey, &tok, &rev);

	if (r == -ENOENT)
		return state_fail(se, -EPERM, "", "unknown join token");
	if (r)
		return state_store_failed(st, se, "read", r);
	if (strcmp(jstr(tok, "service"), t->service) != 0)
		r = state_fail(se, -EPERM, "service", "this join token is for service %s, not %s",
		               jstr(tok, "service"), t->service);
	else if (jint(tok, "expires_at") <= t->now)
		r = state_fail(se, -EPERM, "", "join token expired at %s",
		               state_fmt_time(jint(tok, "expires_at"), tm));
	else if (jint(tok, "uses_left") <= 0)
		r = state_fail(se, -EPERM, "", "join token has no uses left");
	if (r) {
		json_decref(tok);
		return r;
	}
	json_object_set_new(tok, "uses_left", json_integer(jint(tok, "uses_left") - 1));
	batch_put(b, t->tkey, tok, rev);
	return 0;
}

/* Moves the endpoints registered under old_serial to the new SVID. */
static void migrate_endpoints(struct control_state *st, struct batch *b, const char *svc,
                              const char *old_serial, const char *serial, int64_t not_after)
{
	char prefix[STORE_KEY_MAX];
	struct store_entry *e = NULL;
	size_t n = 0;

	snprintf(prefix, sizeof(prefix), "endpoints/%s/", svc);
	if (store_list(st->store, prefix, &e, &n, NULL) < 0)
		return;
	for (size_t i = 0; i < n && b->n < STATE_PRUNE_CHUNK; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && strcmp(jstr(v, "serial"), old_serial) == 0) {
			json_object_set_new(v, "serial", json_string(serial));
			json_object_set_new(v, "not_after", json_integer(not_after));
			batch_put(b, e[i].key, json_incref(v), e[i].revision);
		}
		json_decref(v);
	}
	store_entries_free(e, n);
}

/* The SHA-256 of pubkey's SubjectPublicKeyInfo (DER) in hex into out
 * (API_SHA256_HEX_LEN bytes). Returns 0 or -ENOMEM. */
static int key_sha256(EVP_PKEY *pubkey, char *out)
{
	unsigned char *der = NULL;
	int len = i2d_PUBKEY(pubkey, &der);

	if (len <= 0)
		return -ENOMEM;
	api_sha256_hex((const char *)der, (size_t)len, out);
	OPENSSL_free(der);
	return 0;
}

/* Whether a child of the certificate *rec already has the key khash: the
 * parent lists its children's keys (child_keys, at most
 * CONTROL_RENEWALS_MAX, all unexpired while the parent is: a child is
 * issued after it, for the same lifetime). */
static bool child_has_key(const json_t *rec, const char *khash)
{
	const json_t *keys = json_object_get(rec, "child_keys"), *v;
	size_t i;

	json_array_foreach(keys, i, v)
		if (json_is_string(v) && strcmp(json_string_value(v), khash) == 0)
			return true;
	return false;
}

/* Refuses a renewal by parent when an ancestor of it was revoked
 * (another control instance on the store may not know it yet). The walk
 * ends at the root or at an ancestor whose record is gone (it expired, so
 * did its revocation). It fails closed: a store error, or a lineage deeper
 * than any real renewal chain, refuses rather than letting a descendant of
 * a revoked certificate through unchecked. */
static int ancestors_check(struct control_state *st, const char *parent, const json_t *rec,
                           struct state_error *se)
{
	const char *up = json_string_value(json_object_get(rec, "parent"));
	json_t *anc = NULL;
	char key[STORE_KEY_MAX];
	int depth, r = 0;

	for (depth = 0; up && depth < STATE_LINEAGE_DEPTH_MAX; depth++) {
		char serial[CA_SERIAL_HEX_MAX];
		int64_t rrev = 0;

		snprintf(serial, sizeof(serial), "%s", up);
		state_key(key, sizeof(key), "revoked/", serial);
		if (!state_is_revoked(st, serial) && (r = kv_rev(st, key, &rrev)) < 0)
			break;
		if (state_is_revoked(st, serial) || rrev > 0) {
			json_decref(anc);
			return state_refuse(se, -EPERM, "ancestor_revoked", "", "your SVID (serial %s) "
			                    "descends from the revoked certificate %s", parent, serial);
		}
		state_key(key, sizeof(key), "certs/", serial);
		json_decref(anc);
		anc = NULL;
		if ((r = kv_json(st, key, &anc, NULL)) < 0)
			break;
		up = json_string_value(json_object_get(anc, "parent"));
	}
	json_decref(anc);
	if (r < 0 && r != -ENOENT)
		return state_store_failed(st, se, "lineage read", r);
	if (r == 0 && up && depth == STATE_LINEAGE_DEPTH_MAX)
		return state_refuse(se, -EPERM, "lineage_too_deep", "", "your SVID (serial %s) has "
		                    "more than %d unexpired ancestors; join again with a token", parent,
		                    STATE_LINEAGE_DEPTH_MAX);
	return 0;
}

/* The record of the certificate a renewal is made with (*rec, *rev): it
 * must exist, have renewals left, and descend from no revoked certificate.
 * *retry: a child of it already has the key khash, so this is a proxy
 * retrying after a lost answer; it takes no renewal of the cap, which
 * therefore bounds distinct keys (the lineage cap still counts it). */
static int renewal_check(struct control_state *st, const char *parent, const char *khash,
                         json_t **rec, int64_t *rev, bool *retry, struct state_error *se)
{
	char key[STORE_KEY_MAX];
	int r;

	state_key(key, sizeof(key), "certs/", parent);
	r = kv_json(st, key, rec, rev);
	if (r == -ENOENT)
		return state_refuse(se, -EPERM, "unknown_certificate", "", "control has no record of "
		                    "your SVID (serial %s); join again with a token", parent);
	if (r)
		return state_store_failed(st, se, "read", r);
	*retry = child_has_key(*rec, khash);
	if (!*retry && jint(*rec, "renewals") >= CONTROL_RENEWALS_MAX)
		return state_refuse(se, -EPERM, "renewal_limit", "", "your SVID (serial %s) was "
		                    "already renewed with %d keys, the most one certificate may be; "
		                    "renew with the SVID it gave you, retry with the same key, or "
		                    "join again with a token", parent, CONTROL_RENEWALS_MAX);
	return ancestors_check(st, parent, *rec, se);
}

/* Counts a renewal in the lineage origin (lineages/<origin>: {service,
 * window_start, renewals, not_after}) into b, or refuses it: a lineage
 * renews at most CONTROL_LINEAGE_RENEWALS_MAX times per SVID lifetime,
 * however it branches (the per-certificate cap alone lets a tree of
 * renewals grow 3, 9, 27, ... wide). */
static int lineage_count(struct control_state *st, struct batch *b, const char *origin,
                         const char *service, int64_t now, struct state_error *se)
{
	char key[STORE_KEY_MAX];
	json_t *v = NULL;
	int64_t rev = 0, start, n;
	int r;

	state_key(key, sizeof(key), "lineages/", origin);
	r = kv_json(st, key, &v, &rev);
	if (r == -EIO)
		return state_store_failed(st, se, "read", r);
	start = jint(v, "window_start");
	n = jint(v, "renewals");
	if (!v || now - start >= st->o.svid_ttl) {
		start = now;
		n = 0;
	}
	json_decref(v);
	if (n >= CONTROL_LINEAGE_RENEWALS_MAX) {
		char t[CA_TIME_LEN];

		return state_refuse(se, -EPERM, "lineage_limit", "", "the SVIDs descending from the "
		                    "join of %s renewed %d times since %s, the most per SVID "
		                    "lifetime; retry later, or join again with a token", origin,
		                    CONTROL_LINEAGE_RENEWALS_MAX, state_fmt_time(start, t));
	}
	/* not_after: no SVID of the lineage outlives it, so it is pruned then. */
	batch_put(b, key, json_pack("{s:s, s:I, s:I, s:I}", "service", service,
	                            "window_start", (json_int_t)start, "renewals", (json_int_t)n + 1,
	                            "not_after", (json_int_t)(now + st->o.svid_ttl)), rev);
	return 0;
}

/* Checks the renewal and counts it into b: in the parent's record (its
 * revision orders concurrent renewals) and in its lineage. */
static int renewal_use(struct control_state *st, struct batch *b, struct svid_txn *t,
                       struct state_error *se)
{
	char pkey[STORE_KEY_MAX];
	json_t *prec = NULL;
	int64_t prev = 0;
	bool retry = false;
	int r = renewal_check(st, t->renew_serial, t->khash, &prec, &prev, &retry, se);

	/* Records from before lineages were kept: the parent starts one. */
	if (!r)
		snprintf(t->origin, sizeof(t->origin), "%s", json_string_value(json_object_get(
		         prec, "origin")) ? jstr(prec, "origin") : t->renew_serial);
	if (!r)
		r = lineage_count(st, b, t->origin, t->service, t->now, se);
	if (r) {
		json_decref(prec);
		return r;
	}
	if (!retry) {
		json_t *keys = json_object_get(prec, "child_keys");

		if (!json_is_array(keys)) {
			keys = json_array();
			json_object_set_new(prec, "child_keys", keys);
		}
		json_array_append_new(keys, json_string(t->khash));
		json_object_set_new(prec, "renewals", json_integer(jint(prec, "renewals") + 1));
	}
	/* A retry still writes the parent: its revision orders it against a
	 * concurrent renewal with a new key. */
	state_key(pkey, sizeof(pkey), "certs/", t->renew_serial);
	batch_put(b, pkey, prec, prev);
	return 0;
}

static int svid_txn(struct control_state *st, struct batch *b, void *arg,
                    struct state_error *se)
{
	struct svid_txn *t = arg;
	const struct state_root *root = &st->roots[st->signing];
	char ckey[STORE_KEY_MAX];
	struct meshlet_err e = {0};
	int r = 0;

	t->origin[0] = '\0';
	if (t->tkey[0])
		r = token_use(st, b, t, se);
	else if (t->renew_serial)
		r = renewal_use(st, b, t, se);
	if (r)
		return r;
	X509_free(t->cert);
	t->cert = NULL;
	r = ca_issue_svid(root->ca, t->service, t->pubkey, st->o.svid_ttl, &t->cert, t->serial, &e);
	if (r == -EINVAL)
		return state_fail(se, -EINVAL, "csr", "%s", e.message);
	if (r)
		return state_fail(se, -EIO, "", "cannot issue: %s", e.message);
	ca_cert_not_after(t->cert, &t->not_after);
	state_key(ckey, sizeof(ckey), "certs/", t->serial);
	batch_put(b, ckey, json_pack("{s:s, s:I, s:I, s:i, s:s, s:s?, s:i, s:s, s:s}",
	                             "service", t->service, "not_after", (json_int_t)t->not_after,
	                             "issued_at", (json_int_t)t->now, "root", root->id,
	                             "via", t->tkey[0] ? "token" : "svid",
	                             "parent", t->tkey[0] ? NULL : t->renew_serial,
	                             "renewals", 0,
	                             "origin", t->origin[0] ? t->origin : t->serial,
	                             "key_sha256", t->khash), 0);
	if (t->renew_serial)
		migrate_endpoints(st, b, t->service, t->renew_serial, t->serial, t->not_after);
	return 0;
}

/* The proxy known by old_serial goes on under the new SVID. */
static void proxy_renewed(struct control_state *st, const struct svid_txn *t)
{
	struct state_proxy *p = state_proxy_find(st, t->renew_serial), *np;

	if (!p || !(np = state_proxy_add(st, t->serial, t->service)))
		return;
	memcpy(np->address, p->address, sizeof(np->address));
	np->ports = json_incref(p->ports);
	np->held = p->held;
	np->bundle_rev = p->bundle_rev;
	np->last_seen = t->now;
	np->not_after = t->not_after;
	np->dirty = true;
	state_proxy_drop(st, p);
}

int state_svid_issue(struct control_state *st, const char *service, const char *token,
                     const char *renew_serial, EVP_PKEY *pubkey, json_t **out,
                     struct state_error *se)
{
	struct svid_txn t = { .service = service, .pubkey = pubkey, .now = state_now() };
	char id[SPIFFE_ID_MAX + 1], tm[CA_TIME_LEN], hash[API_SHA256_HEX_LEN];
	char *pem;
	int r;

	if (identity_format(id, sizeof(id), st->td, service) < 0)
		return state_fail(se, -EINVAL, "service", "not a service name");
	if (token) {
		api_sha256_hex(token, strlen(token), hash);
		state_key(t.tkey, sizeof(t.tkey), "tokens/", hash);
	} else {
		t.renew_serial = renew_serial;
	}
	if (key_sha256(pubkey, t.khash) < 0)
		return state_fail(se, -EIO, "", "out of memory");
	r = state_txn(st, "certificate record", svid_txn, &t, NULL, se);
	if (r) {
		X509_free(t.cert);
		return r;
	}
	if (t.renew_serial)
		proxy_renewed(st, &t);
	pem = ca_pem_encode(&t.cert, 1);
	X509_free(t.cert);
	if (!pem)
		return state_fail(se, -EIO, "", "out of memory");
	*out = json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:I}", "cert_chain", pem,
	                 "serial", t.serial, "expires_at", state_fmt_time(t.not_after, tm),
	                 "spiffe_id", id, "trust_domain", st->td, "bundle", state_roots_pem(st),
	                 "bundle_version", (json_int_t)counter_value(st, "meta/bundle", "version"));
	free(pem);
	log_info("issued SVID %s serial %s until %s (%s)", id, t.serial, tm,
	         token ? "join token" : "renewal");
	return 0;
}
