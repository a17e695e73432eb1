/*
 * state_ca: the roots of control's CA (their files, ca.pem, meta/ca) and
 * CA rotation, stable -> prepared -> switched -> stable, with the gates
 * that hold each step back; see state.h.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "meshlet/file.h"
#include "meshlet/kek.h"

/* The largest ca.pem read back to compare (a few roots of ~1 KiB). */
#define BUNDLE_FILE_MAX (64 * 1024)

static const char *const phase_names[] = {
	[CA_PHASE_STABLE] = "stable",
	[CA_PHASE_PREPARED] = "prepared",
	[CA_PHASE_SWITCHED] = "switched",
};

const char *state_phase_name(enum ca_phase phase)
{
	return phase_names[phase];
}

static int parse_phase(const char *s, enum ca_phase *out)
{
	for (int i = 0; i <= CA_PHASE_SWITCHED; i++) {
		if (strcmp(s, phase_names[i]) == 0) {
			*out = (enum ca_phase)i;
			return 0;
		}
	}
	return -EINVAL;
}

/* ---- files ---- */

void state_root_paths(const struct control_state *st, int id, char *cert, char *key, size_t len)
{
	char name[32];

	snprintf(name, sizeof(name), "ca-%d.pem", id);
	state_path(st, cert, len, name);
	if (id == 0)
		snprintf(name, sizeof(name), "ca.key");
	else
		snprintf(name, sizeof(name), "ca-%d.key", id);
	state_path(st, key, len, name);
}

int state_bundle_write(struct control_state *st)
{
	char path[PATH_MAX], *cur = NULL;
	char *pem = ca_pem_encode(st->root_certs, st->n_roots);
	size_t len = 0;
	int r = 0;

	if (!pem)
		return -ENOMEM;
	state_path(st, path, sizeof(path), STATE_BUNDLE_FILE);
	if (file_read(path, BUNDLE_FILE_MAX, FILE_NOFOLLOW, &cur, &len) < 0 ||
	    len != strlen(pem) || memcmp(cur, pem, len) != 0)
		r = file_replace(path, 0644, pem, strlen(pem));
	if (r)
		log_error("cannot write %s: %s", path, strerror(-r));
	free(cur);
	free(pem);
	return r;
}

/* ---- roots ---- */

void state_roots_free(struct control_state *st)
{
	for (size_t i = 0; i < st->n_roots; i++) {
		ca_free(st->roots[i].ca);
		free(st->roots[i].pem);
	}
	memset(st->roots, 0, sizeof(st->roots));
	memset(st->root_certs, 0, sizeof(st->root_certs));
	st->n_roots = 0;
	X509_free(st->cross);
	st->cross = NULL;
}

/* The other root of a rotation (the one not signing), or NULL. */
static const struct state_root *old_root(const struct control_state *st)
{
	if (st->n_roots != 2)
		return NULL;
	return &st->roots[st->signing == 0 ? 1 : 0];
}

/* Keeps st->cross in step with the phase: while switched, the signing root
 * cross-signed by the old one, which control's server sends in its chain
 * so that a proxy that missed the prepared phase (it holds only the old
 * root) can still verify control, fetch the new bundle and renew. */
static void cross_update(struct control_state *st)
{
	const struct state_root *old = old_root(st);
	struct meshlet_err e = {0};

	X509_free(st->cross);
	st->cross = NULL;
	if (st->phase != CA_PHASE_SWITCHED || !old)
		return;
	if (ca_cross_sign(old->ca, st->roots[st->signing].ca, &st->cross, &e) < 0)
		log_warn("cannot cross-sign root %d with root %d: %s; proxies holding only the old "
		         "root cannot verify control until they join again", st->roots[st->signing].id,
		         old->id, e.message);
}

/* Fills roots[i] from ca (taken over). */
static int root_set(struct control_state *st, size_t i, int id, struct ca *ca)
{
	X509 *cert = ca_cert(ca);

	st->roots[i].id = id;
	st->roots[i].ca = ca;
	st->roots[i].pem = ca_pem_encode(&cert, 1);
	st->root_certs[i] = cert;
	if (!st->roots[i].pem || ca_pin_sha256(cert, st->roots[i].pin) < 0)
		return -ENOMEM;
	return 0;
}

/* Empties roots[i] (after a failed root_set or a failed rotation write). */
static void root_clear(struct control_state *st, size_t i)
{
	ca_free(st->roots[i].ca);
	free(st->roots[i].pem);
	memset(&st->roots[i], 0, sizeof(st->roots[i]));
	st->root_certs[i] = NULL;
}

/* The additional data a root's sealed key is bound to. */
static void root_aad(const struct control_state *st, int id, char *out, size_t len)
{
	snprintf(out, len, "meshlet ca-key td=%s id=%d", st->td, id);
}

json_t *state_root_record(const struct control_state *st, int id, const struct ca *ca)
{
	X509 *cert = ca_cert(ca);
	char *pem = ca_pem_encode(&cert, 1), *key = NULL, *sealed = NULL, aad[300];
	size_t klen = 0;
	json_t *rec = NULL;

	root_aad(st, id, aad, sizeof(aad));
	if (pem && ca_key_pem(ca, &key, &klen) == 0)
		sealed = kek_seal(st->kek, aad, key, klen);
	if (sealed)
		rec = json_pack("{s:s, s:s}", "cert", pem, "key", sealed);
	if (key)
		OPENSSL_cleanse(key, klen);
	free(key);
	free(sealed);
	free(pem);
	return rec;
}

/* A new root id, saved to its files (stale ones from a failed rotation,
 * never referenced, are replaced) or, on a shared store, to the store;
 * *out on success. */
static int root_generate(struct control_state *st, int id, struct ca **out,
                         struct meshlet_err *err)
{
	char cert[PATH_MAX], key[PATH_MAX];
	struct ca *ca = NULL;
	int r;

	if (st->shared) {
		/* Its ca/<id> record goes into the step's own transaction
		 * (ca_commit), conditioned with meta/ca: written before it, a
		 * replica acting on a stale next_id would replace a root in use. */
		r = ca_generate(&ca, st->td, 0, err);
		if (r) {
			ca_free(ca);
			return r;
		}
		*out = ca;
		return 0;
	}
	state_root_paths(st, id, cert, key, sizeof(cert));
	if (id > 0) {
		unlink(cert);
		unlink(key);
	}
	r = ca_generate(&ca, st->td, 0, err);
	if (!r)
		r = ca_save(ca, cert, key, err);
	if (r) {
		ca_free(ca);
		return r;
	}
	*out = ca;
	return 0;
}

int state_roots_create(struct control_state *st, struct meshlet_err *err)
{
	struct ca *ca = NULL;
	int r = root_generate(st, 0, &ca, err);

	if (r)
		return r;
	r = root_set(st, 0, 0, ca);
	st->n_roots = 1;
	st->signing = 0;
	st->phase = CA_PHASE_STABLE;
	st->next_id = 1;
	return r ? err_set(err, "", "out of memory") : 0;
}

/* A shared store: root id from ca/<id>, its key opened with the KEK. A KEK
 * that does not open it is refused here, before anything is written. */
static int load_root_shared(struct control_state *st, int id, struct ca **ca,
                            struct meshlet_err *err)
{
	char key[32], aad[300], *pem = NULL;
	const char *cert;
	size_t len = 0;
	json_t *rec = NULL;
	int r;

	snprintf(key, sizeof(key), "ca/%d", id);
	if (kv_json(st, key, &rec, NULL) < 0)
		return err_set(err, "", "the store has no readable %s record", key);
	cert = jstr(rec, "cert");
	root_aad(st, id, aad, sizeof(aad));
	r = kek_open(st->kek, aad, jstr(rec, "key"), &pem, &len);
	if (r == -EBADMSG)
		r = err_set(err, "", "--kek-file %s does not decrypt root %d's key in the store: it is "
		            "not the KEK the store was initialised with (every replica needs the "
		            "same KEK file); refusing to start", st->o.kek_file, id);
	else if (r)
		r = err_set(err, "", "the store's %s record is damaged (no sealed key)", key);
	if (!r)
		r = ca_load_pem(ca, st->td, cert, strlen(cert), pem, len, key, err);
	if (pem)
		OPENSSL_cleanse(pem, len);
	free(pem);
	json_decref(rec);
	return r;
}

static int load_root(struct control_state *st, size_t i, int id, struct meshlet_err *err)
{
	char cert[PATH_MAX], key[PATH_MAX];
	struct ca *ca = NULL;
	int r;

	if (st->shared) {
		r = load_root_shared(st, id, &ca, err);
		return r < 0 ? r : root_set(st, i, id, ca);
	}
	state_root_paths(st, id, cert, key, sizeof(cert));
	r = ca_load(&ca, st->td, cert, key, err);
	if (r < 0)
		return r;
	return root_set(st, i, id, ca);
}

static int root_index(const struct control_state *st, int id)
{
	for (size_t i = 0; i < st->n_roots; i++) {
		if (st->roots[i].id == id)
			return (int)i;
	}
	return -1;
}

json_t *state_ca_meta(const struct control_state *st)
{
	json_t *ids = json_array();

	for (size_t i = 0; i < st->n_roots; i++)
		json_array_append_new(ids, json_integer(st->roots[i].id));
	return json_pack("{s:s, s:o, s:i, s:i}", "phase", phase_names[st->phase], "roots", ids,
	                 "signing", st->roots[st->signing].id, "next_id", st->next_id);
}

int state_roots_load(struct control_state *st, struct meshlet_err *err)
{
	json_t *meta = NULL, *ids;
	int64_t rev = 0;
	size_t i;
	int r, signing_id;

	if (kv_json(st, "meta/ca", &meta, &rev) < 0)
		return err_set(err, "", "the store has no readable meta/ca record");
	ids = json_object_get(meta, "roots");
	signing_id = (int)jint(meta, "signing");
	st->next_id = (int)jint(meta, "next_id");
	if (!json_is_array(ids) || json_array_size(ids) == 0 ||
	    json_array_size(ids) > STATE_ROOTS_MAX ||
	    parse_phase(jstr(meta, "phase"), &st->phase) < 0) {
		json_decref(meta);
		return err_set(err, "", "the store's meta/ca record is damaged");
	}
	for (i = 0; i < json_array_size(ids); i++) {
		r = load_root(st, i, (int)json_integer_value(json_array_get(ids, i)), err);
		if (r < 0) {
			json_decref(meta);
			return r;
		}
		st->n_roots++;
	}
	json_decref(meta);
	r = root_index(st, signing_id);
	if (r < 0)
		return err_set(err, "", "the store's meta/ca names a signing root not in the bundle");
	st->signing = (size_t)r;
	st->ca_rev = rev;
	cross_update(st);
	return 0;
}

/* What state_roots_reload() swaps out, to put back when the reload fails. */
struct roots_saved {
	struct state_root roots[STATE_ROOTS_MAX];
	X509 *root_certs[STATE_ROOTS_MAX];
	size_t n_roots, signing;
	enum ca_phase phase;
	int next_id;
	X509 *cross;
};

static void roots_swap(struct control_state *st, struct roots_saved *sv)
{
	struct roots_saved tmp;

	memcpy(tmp.roots, st->roots, sizeof(tmp.roots));
	memcpy(tmp.root_certs, st->root_certs, sizeof(tmp.root_certs));
	tmp.n_roots = st->n_roots;
	tmp.signing = st->signing;
	tmp.phase = st->phase;
	tmp.next_id = st->next_id;
	tmp.cross = st->cross;
	memcpy(st->roots, sv->roots, sizeof(st->roots));
	memcpy(st->root_certs, sv->root_certs, sizeof(st->root_certs));
	st->n_roots = sv->n_roots;
	st->signing = sv->signing;
	st->phase = sv->phase;
	st->next_id = sv->next_id;
	st->cross = sv->cross;
	*sv = tmp;
}

int state_roots_reload(struct control_state *st)
{
	struct roots_saved sv = {0};
	struct meshlet_err err = {0};
	int64_t ca_rev = st->ca_rev;
	int r;

	roots_swap(st, &sv);              /* st now empty, sv the current roots */
	r = state_roots_load(st, &err);
	if (r) {
		st->ca_rev = ca_rev;
		log_error("cannot reload the roots after another replica's CA step: %s; keeping "
		          "the ones loaded before", err.message);
		state_roots_free(st);
		roots_swap(st, &sv);
		return r;
	}
	roots_swap(st, &sv);              /* sv the new ones: free the old */
	state_roots_free(st);
	roots_swap(st, &sv);
	state_bundle_write(st);
	log_info("CA: reloaded after another replica's step: %zu root(s), phase %s, signing "
	         "root %d", st->n_roots, state_phase_name(st->phase), st->roots[st->signing].id);
	return 0;
}

json_t *state_roots_pem(const struct control_state *st)
{
	json_t *a = json_array();

	for (size_t i = 0; i < st->n_roots; i++)
		json_array_append_new(a, json_string(st->roots[i].pem));
	return a;
}

/* ---- TLS material ---- */

const struct ca *state_signing_ca(const struct control_state *st)
{
	return st->roots[st->signing].ca;
}

X509 *const *state_roots(const struct control_state *st, size_t *n)
{
	*n = st->n_roots;
	return st->root_certs;
}

size_t state_server_chain(const struct control_state *st, X509 **out)
{
	const struct state_root *old = old_root(st);

	if (st->cross && old) {
		out[0] = st->cross;
		out[1] = ca_cert(old->ca);
		return 2;
	}
	out[0] = ca_cert(st->roots[st->signing].ca);
	return 1;
}

/* ---- the gates ---- */

/* Unexpired, unrevoked SVIDs signed by root id: count and last expiry. */
static int count_signed_by(struct control_state *st, int id, size_t *count, int64_t *last)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = state_now();
	int r = store_list(st->store, "certs/", &e, &n, NULL);

	*count = 0;
	*last = 0;
	if (r)
		return r;
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && jint(v, "root") == id && jint(v, "not_after") > now &&
		    !state_is_revoked(st, e[i].key + strlen("certs/"))) {
			(*count)++;
			if (jint(v, "not_after") > *last)
				*last = jint(v, "not_after");
		}
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* The config version at which the new root joined the bundle: meta/ca is
 * written by the prepare step and not again until the switch. */
static int64_t new_root_version(struct control_state *st)
{
	int64_t rev = 0;

	if (st->phase != CA_PHASE_PREPARED || kv_rev(st, "meta/ca", &rev) < 0)
		return 0;
	return rev;
}

static int cmp_behind(const void *a, const void *b)
{
	const json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
	int c = strcmp(jstr(x, "service"), jstr(y, "service"));

	return c ? c : strcmp(jstr(x, "serial"), jstr(y, "serial"));
}

/* The proxies the switch waits for: seen within the last SVID lifetime,
 * with an SVID that is unexpired and unrevoked (else it cannot come back),
 * that neither reported holding a config version >= since nor fetched the
 * bundle since then. A new array of {service, serial, config_version,
 * last_seen}, sorted. */
static json_t *proxies_behind(struct control_state *st, int64_t since)
{
	int64_t now = state_now();
	json_t *list = json_array();
	json_t **v;
	size_t n = 0, i = 0;

	for (struct state_proxy *p = st->proxies; p; p = p->next)
		n++;
	v = calloc(n ? n : 1, sizeof(*v));
	if (!v)
		return list;
	for (struct state_proxy *p = st->proxies; p; p = p->next) {
		char t[CA_TIME_LEN];

		if (p->last_seen < now - st->o.svid_ttl || p->not_after <= now ||
		    state_is_revoked(st, p->serial) || p->held >= since || p->bundle_rev >= since)
			continue;
		v[i++] = json_pack("{s:s, s:s, s:I, s:s}", "service", p->service, "serial", p->serial,
		                   "config_version", (json_int_t)p->held,
		                   "last_seen", state_fmt_time(p->last_seen, t));
	}
	qsort(v, i, sizeof(*v), cmp_behind);
	for (size_t k = 0; k < i; k++)
		json_array_append_new(list, v[k]);
	free(v);
	return list;
}

/* "orders (serial 1f..), frontend (serial 2e..) and 3 more" into out. */
static const char *name_proxies(const json_t *list, char *out, size_t len)
{
	size_t n = json_array_size(list), used = 0, i;

	out[0] = '\0';
	for (i = 0; i < n; i++) {
		const json_t *p = json_array_get(list, i);
		char one[SERVICE_NAME_MAX + CA_SERIAL_HEX_MAX + 16];
		int w = snprintf(one, sizeof(one), "%s%s (serial %s)", i ? ", " : "",
		                 jstr(p, "service"), jstr(p, "serial"));

		if (used + (size_t)w + 16 >= len)
			break;
		memcpy(out + used, one, (size_t)w + 1);
		used += (size_t)w;
	}
	if (i < n)
		snprintf(out + used, len - used, " and %zu more", n - i);
	return out;
}

/* The gate of the switched -> stable step. */
static json_t *finish_gate(struct control_state *st)
{
	const struct state_root *old = old_root(st);
	char msg[256], t[CA_TIME_LEN];
	size_t count = 0;
	int64_t last = 0;

	if (old && count_signed_by(st, old->id, &count, &last) < 0)
		return json_pack("{s:s, s:b, s:s}", "next_phase", "stable", "open", 0,
		                 "waiting_for", "the state store (see control's log)");
	if (count)
		snprintf(msg, sizeof(msg), "%zu SVID(s) signed by the old root to expire (the "
		         "last at %s) or be revoked", count, state_fmt_time(last, t));
	else
		snprintf(msg, sizeof(msg), "nothing");
	return json_pack("{s:s, s:b, s:s, s:I, s:s?}", "next_phase", "stable",
	                 "open", count == 0, "waiting_for", msg, "certs", (json_int_t)count,
	                 "until", count ? state_fmt_time(last, t) : NULL);
}

/* What the next rotation step waits for: {next_phase, open, waiting_for,
 * proxies[] (prepared) | certs, until (switched)}. */
static json_t *ca_gate(struct control_state *st)
{
	char names[160], msg[256];
	json_t *behind;

	switch (st->phase) {
	case CA_PHASE_STABLE:
		return json_pack("{s:s, s:b, s:s}", "next_phase", "prepared", "open",
		                 st->n_roots < STATE_ROOTS_MAX, "waiting_for", "nothing");
	case CA_PHASE_PREPARED:
		behind = proxies_behind(st, new_root_version(st));
		if (json_array_size(behind))
			snprintf(msg, sizeof(msg), "%zu proxy(s) to acknowledge the new root: %s",
			         json_array_size(behind), name_proxies(behind, names, sizeof(names)));
		else
			snprintf(msg, sizeof(msg), "nothing");
		return json_pack("{s:s, s:b, s:s, s:o}", "next_phase", "switched",
		                 "open", json_array_size(behind) == 0, "waiting_for", msg,
		                 "proxies", behind);
	default:
		return finish_gate(st);
	}
}

json_t *state_ca_show(struct control_state *st)
{
	json_t *pins = json_array(), *ids = json_array(), *out;

	for (size_t i = 0; i < st->n_roots; i++) {
		json_array_append_new(pins, json_string(st->roots[i].pin));
		json_array_append_new(ids, json_integer(st->roots[i].id));
	}
	out = json_pack("{s:o, s:i, s:s, s:o, s:o, s:I, s:s, s:o}", "roots", state_roots_pem(st),
	                "signing", (int)st->signing, "phase", phase_names[st->phase],
	                "pins", pins, "root_ids", ids,
	                "bundle_version", (json_int_t)counter_value(st, "meta/bundle", "version"),
	                "trust_domain", st->td, "gate", ca_gate(st));
	if (out && st->phase == CA_PHASE_PREPARED)
		json_object_set_new(out, "new_root_version", json_integer(new_root_version(st)));
	return out;
}

/* ---- the steps ---- */

/*
 * Writes meta/ca as st now has it, with the counter (key, field) that tells
 * the proxies, and on a shared store the new root's record ca/<new_id>
 * (new_id < 0: none). The write is conditioned on the revision of meta/ca
 * this replica loaded its CA from (st->ca_rev), the premise of the step:
 * when another control took a step since, it returns -ECANCELED and the
 * caller rolls back (state_ca_rotate then reloads and refuses). One
 * attempt, not state_txn(): a step is an operator's decision made on what
 * `ca show` said; taking a different step than the one asked for, on a
 * re-read, would be a surprise.
 */
static int ca_commit_once(struct control_state *st, const char *key, const char *field,
                          int new_id, struct state_error *se)
{
	struct batch b = {0};
	char rec[32];
	int64_t rev = 0;
	int r;

	batch_put(&b, "meta/ca", state_ca_meta(st), st->ca_rev);
	if (new_id >= 0 && st->shared) {
		json_t *v = state_root_record(st, new_id, st->roots[st->n_roots - 1].ca);

		if (!v) {
			batch_clear(&b);
			return state_fail(se, -EIO, "", "cannot seal root %d's key", new_id);
		}
		snprintf(rec, sizeof(rec), "ca/%d", new_id);
		batch_put(&b, rec, v, STORE_REV_ANY);
	}
	r = bump_counter(st, &b, key, field, NULL);
	if (!r)
		r = batch_commit(st, &b, &rev);
	batch_clear(&b);
	if (r == -ECANCELED || r == -ENOENT)
		return -ECANCELED;
	if (r)
		return state_store_failed(st, se, "CA rotation", r);
	st->ca_rev = rev;
	return 0;
}

/* ca_commit_once(), again while only the counter raced (a revocation or a
 * renewal bumped it meanwhile): meta/ca still as loaded, the premise holds. */
static int ca_commit(struct control_state *st, const char *key, const char *field,
                     int new_id, struct state_error *se)
{
	int64_t now = 0;
	int r = -ECANCELED;

	for (int i = 0; i < STATE_RETRIES && r == -ECANCELED; i++) {
		r = ca_commit_once(st, key, field, new_id, se);
		if (r == -ECANCELED && (kv_rev(st, "meta/ca", &now) < 0 || now != st->ca_rev))
			break;
	}
	return r;
}

/* stable -> prepared: a new root, saved to its files, joins the bundle. */
static int ca_prepare(struct control_state *st, struct state_error *se)
{
	char cert[PATH_MAX], key[PATH_MAX];
	struct meshlet_err e = {0};
	struct ca *ca = NULL;
	int id = st->next_id, r;

	if (st->n_roots >= STATE_ROOTS_MAX)
		return state_fail(se, -EBUSY, "", "too many roots in the bundle");
	if (root_generate(st, id, &ca, &e) < 0)
		return state_fail(se, -EIO, "", "cannot create the new root: %s", e.message);
	if (root_set(st, st->n_roots, id, ca) < 0) {
		root_clear(st, st->n_roots);
		return state_fail(se, -EIO, "", "out of memory");
	}
	st->n_roots++;
	st->phase = CA_PHASE_PREPARED;
	st->next_id = id + 1;
	r = ca_commit(st, "meta/bundle", "version", id, se);
	if (r) {
		st->n_roots--;
		root_clear(st, st->n_roots);
		st->phase = CA_PHASE_STABLE;
		st->next_id = id;
		if (!st->shared) {
			state_root_paths(st, id, cert, key, sizeof(cert));
			unlink(cert);
			unlink(key);
		}
		return r;
	}
	log_info("CA rotation: new root %d (pin %s) joined the bundle; signing stays with root %d",
	         id, st->roots[st->n_roots - 1].pin, st->roots[st->signing].id);
	return 0;
}

/* prepared -> switched: the new root signs; every proxy renews. Refused
 * (unless force) while a recent proxy has not acknowledged the new root:
 * it would refuse peers with certificates of the new root. */
static int ca_switch(struct control_state *st, bool force, struct state_error *se)
{
	size_t old = st->signing;
	int64_t since = new_root_version(st);
	json_t *behind = proxies_behind(st, since);
	size_t n_behind = json_array_size(behind);
	char names[140];
	int r;

	if (n_behind && !force) {
		r = state_refuse(se, -EBUSY, "proxies_not_updated", "", "not switching: %zu recent "
		                 "proxy(s) have not acknowledged the new root (config version %lld; "
		                 "wait, or --force): %s", n_behind, (long long)since,
		                 name_proxies(behind, names, sizeof(names)));
		json_decref(behind);
		return r;
	}
	if (n_behind)
		log_warn("CA rotation: switching by force; %zu proxy(s) have not acknowledged the new "
		         "root: %s", n_behind, name_proxies(behind, names, sizeof(names)));
	json_decref(behind);
	st->signing = st->n_roots - 1;
	st->phase = CA_PHASE_SWITCHED;
	r = ca_commit(st, "meta/rotate-all", "cert_generation", -1, se);
	if (r) {
		st->signing = old;
		st->phase = CA_PHASE_PREPARED;
		return r;
	}
	cross_update(st);
	log_info("CA rotation: root %d signs now; all proxies were asked to renew",
	         st->roots[st->signing].id);
	return 0;
}

/* switched -> stable: the old root leaves the bundle. */
static int ca_finish(struct control_state *st, bool force, struct state_error *se)
{
	struct state_root saved[STATE_ROOTS_MAX], old;
	X509 *saved_certs[STATE_ROOTS_MAX];
	char t[CA_TIME_LEN];
	size_t count = 0, keep = st->signing, saved_n = st->n_roots;
	int64_t last = 0;
	int r;

	if (st->n_roots != 2)
		return state_fail(se, -EBUSY, "", "no old root to remove");
	old = st->roots[keep == 0 ? 1 : 0];
	r = count_signed_by(st, old.id, &count, &last);
	if (r)
		return state_store_failed(st, se, "list", r);
	if (count > 0 && !force)
		return state_refuse(se, -EBUSY, "old_root_in_use", "", "%zu SVID(s) signed by the old "
		                    "root are still valid (the last until %s); retry then, or pass "
		                    "{\"force\": true} to remove the old root now and cut them off",
		                    count, state_fmt_time(last, t));
	memcpy(saved, st->roots, sizeof(saved));
	memcpy(saved_certs, st->root_certs, sizeof(saved_certs));
	st->roots[0] = saved[keep];
	st->root_certs[0] = saved_certs[keep];
	memset(&st->roots[1], 0, sizeof(st->roots[1]));
	st->root_certs[1] = NULL;
	st->n_roots = 1;
	st->signing = 0;
	st->phase = CA_PHASE_STABLE;
	r = ca_commit(st, "meta/bundle", "version", -1, se);
	if (r) {
		memcpy(st->roots, saved, sizeof(saved));
		memcpy(st->root_certs, saved_certs, sizeof(saved_certs));
		st->n_roots = saved_n;
		st->signing = keep;
		st->phase = CA_PHASE_SWITCHED;
		return r;
	}
	cross_update(st);
	log_info("CA rotation complete: root %d left the bundle%s", old.id,
	         count ? " (forced while SVIDs it signed were still valid)" : "");
	ca_free(old.ca);
	free(old.pem);
	return 0;
}

int state_ca_rotate(struct control_state *st, bool force, json_t **out, bool *tls_changed,
                    struct state_error *se)
{
	enum ca_phase from = st->phase;
	int r;

	*tls_changed = false;
	switch (st->phase) {
	case CA_PHASE_STABLE: r = ca_prepare(st, se); break;
	case CA_PHASE_PREPARED: r = ca_switch(st, force, se); break;
	default: r = ca_finish(st, force, se); break;
	}
	if (r == -ECANCELED) {
		/* Another replica's step came first: nothing of this one was
		 * written. The roots as they are now, and a refusal that says so. */
		if (state_roots_reload(st) == 0)
			*tls_changed = true;
		return state_refuse(se, -EBUSY, "ca_changed", "", "another control replica took a "
		                    "CA rotation step after this one loaded the CA (phase %s then, "
		                    "%s now); nothing was applied: check `meshletctl ca show` and "
		                    "run the step again if it is still wanted",
		                    phase_names[from], phase_names[st->phase]);
	}
	if (r)
		return r;
	*tls_changed = true;
	state_bundle_write(st);
	*out = state_ca_show(st);
	json_object_set_new(*out, "previous_phase", json_string(phase_names[from]));
	return 0;
}
