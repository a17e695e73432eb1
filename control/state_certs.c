/*
 * state_certs: the records of issued certificates (certs/<serial>): the
 * admin's list, rotation requests and revocation, and the revocation list
 * kept in memory for every handshake; see state.h.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the revocation list (in memory, sorted) ---- */

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

bool state_is_revoked(const struct control_state *st, const char *serial)
{
	return st->n_revoked &&
	       bsearch(&serial, st->revoked, st->n_revoked, sizeof(char *), cmp_str) != NULL;
}

static int revoked_add(struct control_state *st, const char *serial)
{
	char *s;

	if (state_is_revoked(st, serial))
		return 0;
	if (st->n_revoked == st->cap_revoked) {
		size_t cap = st->cap_revoked ? 2 * st->cap_revoked : 16;
		char **n = realloc(st->revoked, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		st->revoked = n;
		st->cap_revoked = cap;
	}
	s = strdup(serial);
	if (!s)
		return -ENOMEM;
	st->revoked[st->n_revoked++] = s;
	qsort(st->revoked, st->n_revoked, sizeof(char *), cmp_str);
	return 0;
}

void state_revoked_remove(struct control_state *st, const char *serial)
{
	for (size_t i = 0; i < st->n_revoked; i++) {
		if (strcmp(st->revoked[i], serial) == 0) {
			free(st->revoked[i]);
			memmove(&st->revoked[i], &st->revoked[i + 1],
			        (st->n_revoked - i - 1) * sizeof(char *));
			st->n_revoked--;
			return;
		}
	}
}

int state_revoked_load(struct control_state *st)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int r = store_list(st->store, "revoked/", &e, &n, NULL);

	for (size_t i = 0; r == 0 && i < n; i++)
		r = revoked_add(st, e[i].key + strlen("revoked/"));
	store_entries_free(e, n);
	return r;
}

void state_revoked_free(struct control_state *st)
{
	for (size_t i = 0; i < st->n_revoked; i++)
		free(st->revoked[i]);
	free(st->revoked);
	st->revoked = NULL;
	st->n_revoked = st->cap_revoked = 0;
}

/* ---- list ---- */

/* One certificate record as the admin's list shows it. */
static json_t *cert_json(struct control_state *st, const char *serial, const json_t *v)
{
	char id[SPIFFE_ID_MAX + 1] = "", t1[CA_TIME_LEN], t2[CA_TIME_LEN];
	json_t *o;

	identity_format(id, sizeof(id), st->td, jstr(v, "service"));
	o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:b, s:i, s:s, s:O?, s:I}", "serial", serial,
	              "service", jstr(v, "service"), "spiffe_id", id,
	              "issued_at", state_fmt_time(jint(v, "issued_at"), t1),
	              "expires_at", state_fmt_time(jint(v, "not_after"), t2),
	              "revoked", state_is_revoked(st, serial), "root", (int)jint(v, "root"),
	              "via", jstr(v, "via"), "parent", json_object_get(v, "parent"),
	              "renewals", (json_int_t)jint(v, "renewals"));
	/* Records from before lineages were kept: each starts its own. */
	json_object_set_new(o, "lineage", json_string(json_string_value(json_object_get(v,
	                    "origin")) ? jstr(v, "origin") : serial));
	return o;
}

int state_certs_list(struct control_state *st, json_t **out, struct state_error *se)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = state_now();
	json_t *list;
	int r = store_list(st->store, "certs/", &e, &n, NULL);

	if (r)
		return state_store_failed(st, se, "list", r);
	list = json_array();
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);

		if (v && jint(v, "not_after") > now)
			json_array_append_new(list, cert_json(st, e[i].key + strlen("certs/"), v));
		json_decref(v);
	}
	store_entries_free(e, n);
	*out = json_pack("{s:o}", "certs", list);
	return 0;
}

/* ---- rotate ---- */

struct rotate_txn {
	char key[STORE_KEY_MAX];       /* services/<svc> or meta/rotate-all */
	int64_t gen;                   /* the new cert_generation */
};

static int rotate_txn(struct control_state *st, struct batch *b, void *arg,
                      struct state_error *se)
{
	struct rotate_txn *t = arg;

	if (bump_counter(st, b, t->key, "cert_generation", &t->gen) < 0)
		return state_store_failed(st, se, "read", -EIO);
	return 0;
}

int state_certs_rotate(struct control_state *st, const struct api_rotate_req *r, json_t **out,
                       struct state_error *se)
{
	struct rotate_txn t = {0};
	int64_t rev = 0;
	int ret;

	if (r->service)
		state_key(t.key, sizeof(t.key), "services/", r->service);
	else
		snprintf(t.key, sizeof(t.key), "meta/rotate-all");
	ret = state_txn(st, "rotate", rotate_txn, &t, &rev, se);
	if (ret)
		return ret;
	log_info("certificate rotation requested for %s", r->service ? r->service : "all services");
	*out = json_pack("{s:s?, s:b, s:I, s:I}", "service", r->service, "all", r->all,
	                 "generation", (json_int_t)t.gen, "version", (json_int_t)rev);
	return 0;
}

/* ---- revoke ---- */

/* Unexpired certificates descending from serial (children, their
 * children, ...), not yet revoked, into *out (a new array of serials). */
static int descendants(struct control_state *st, const char *serial, json_t **out)
{
	struct store_entry *e = NULL;
	size_t n = 0, done = 0;
	int64_t now = state_now();
	json_t *parents, *found = json_array(), *queue = json_array();
	int r = store_list(st->store, "certs/", &e, &n, NULL);

	*out = NULL;
	if (r || !found || !queue) {
		json_decref(found);
		json_decref(queue);
		return r ? r : -ENOMEM;
	}
	/* serial -> parent of every unexpired record */
	parents = json_object();
	for (size_t i = 0; i < n && parents; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		const char *p = json_string_value(json_object_get(v, "parent"));

		if (p && jint(v, "not_after") > now)
			json_object_set_new(parents, e[i].key + strlen("certs/"), json_string(p));
		json_decref(v);
	}
	store_entries_free(e, n);
	json_array_append_new(queue, json_string(serial));
	/* Breadth first; each record has one parent, so nothing is seen twice. */
	while (parents && done < json_array_size(queue)) {
		const char *cur = json_string_value(json_array_get(queue, done++)), *child;
		json_t *p;

		json_object_foreach(parents, child, p) {
			if (strcmp(json_string_value(p), cur) != 0)
				continue;
			json_array_append_new(queue, json_string(child));
			if (!state_is_revoked(st, child))
				json_array_append_new(found, json_string(child));
		}
	}
	r = parents ? 0 : -ENOMEM;
	json_decref(parents);
	json_decref(queue);
	if (r)
		json_decref(found);
	else
		*out = found;
	return r;
}

/* Adds the revocation record of serial (its certificate record cert). */
static void revoke_put(struct batch *b, const char *serial, const json_t *cert, int64_t now)
{
	char key[STORE_KEY_MAX];

	state_key(key, sizeof(key), "revoked/", serial);
	batch_put(b, key, json_pack("{s:s, s:I, s:I}", "service", jstr(cert, "service"),
	                            "not_after", (json_int_t)jint(cert, "not_after"),
	                            "revoked_at", (json_int_t)now), STORE_REV_ANY);
}

struct revoke_txn {
	const char *serial;
	const json_t *cert;            /* its record */
	json_t *desc;                  /* its unexpired unrevoked descendants */
	bool self;                     /* serial itself is not yet revoked */
	int64_t version;               /* the bundle version after the write */
};

/*
 * The revocations of serial and of its descendants with one bundle version
 * bump: one atomic write when they fit in a batch; otherwise the
 * descendants go first, in chunks written here, and serial with the last
 * one (left in b), so that a failure part-way leaves serial unrevoked and
 * the call can be repeated.
 */
static int revoke_txn(struct control_state *st, struct batch *b, void *arg,
                      struct state_error *se)
{
	struct revoke_txn *t = arg;
	int64_t now = state_now();
	size_t n, i = 0;
	int r;

	json_decref(t->desc);
	r = descendants(st, t->serial, &t->desc);
	if (r)
		return state_store_failed(st, se, "list", r);
	t->self = !state_is_revoked(st, t->serial);
	n = json_array_size(t->desc);
	if (!t->self && n == 0) {
		t->version = counter_value(st, "meta/bundle", "version");
		return 0;
	}
	for (;;) {
		for (; i < n && b->n < STORE_BATCH_MAX - 2; i++) {
			const char *s = json_string_value(json_array_get(t->desc, i));
			char key[STORE_KEY_MAX];
			json_t *v = NULL;

			state_key(key, sizeof(key), "certs/", s);
			if (kv_json(st, key, &v, NULL) == 0)
				revoke_put(b, s, v, now);
			json_decref(v);
		}
		if (i == n && t->self)
			revoke_put(b, t->serial, t->cert, now);
		if (bump_counter(st, b, "meta/bundle", "version", &t->version) < 0)
			return state_store_failed(st, se, "read", -EIO);
		if (i == n)
			return 0;
		r = batch_commit(st, b, NULL);
		if (r == -ECANCELED || r == -ENOENT)
			return -ECANCELED;
		if (r)
			return state_store_failed(st, se, "revoke", r);
	}
}

int state_certs_revoke(struct control_state *st, const char *serial, json_t **out,
                       struct state_error *se)
{
	char ckey[STORE_KEY_MAX], t[CA_TIME_LEN];
	struct revoke_txn tx = { .serial = serial };
	json_t *cert = NULL;
	int r;

	state_key(ckey, sizeof(ckey), "certs/", serial);
	r = kv_json(st, ckey, &cert, NULL);
	if (r == -ENOENT)
		return state_fail(se, -ENOENT, "serial", "no unexpired certificate with serial %s "
		                  "was issued", serial);
	if (r)
		return state_store_failed(st, se, "read", r);
	tx.cert = cert;
	r = state_txn(st, "revoke", revoke_txn, &tx, NULL, se);
	if (r) {
		json_decref(cert);
		json_decref(tx.desc);
		state_revoked_load(st);    /* what a chunked write did store is refused */
		return r;
	}
	revoked_add(st, serial);
	for (size_t i = 0; i < json_array_size(tx.desc); i++)
		revoked_add(st, json_string_value(json_array_get(tx.desc, i)));
	if (tx.self || json_array_size(tx.desc))
		log_info("revoked certificate %s of %s (valid until %s) and %zu descendant(s)", serial,
		         jstr(cert, "service"), state_fmt_time(jint(cert, "not_after"), t),
		         json_array_size(tx.desc));
	*out = json_pack("{s:s, s:s, s:b, s:I, s:o}", "serial", serial, "service",
	                 jstr(cert, "service"), "revoked", 1, "bundle_version",
	                 (json_int_t)tx.version, "descendants", tx.desc);
	json_decref(cert);
	return 0;
}
