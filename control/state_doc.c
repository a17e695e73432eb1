/*
 * state_doc: versioned documents stored per service (policies/<svc>,
 * traffic/<svc>): put, get, delete and list with If-Match, one
 * implementation for every kind (see state-int.h).
 */
#include "state-int.h"

#include <errno.h>
#include <string.h>

struct doc_txn {
	const struct state_doc_kind *kind;
	const char *svc;
	const json_t *doc;             /* NULL: delete */
	int64_t if_match;              /* -1 none, 0 must exist, > 0 the version */
	char dkey[STORE_KEY_MAX];
	char ckey[STORE_KEY_MAX];
};

/* The stored version against If-Match; 0 or -ENOENT / -ESTALE. */
static int doc_match(const struct doc_txn *t, int64_t prev, struct state_error *se)
{
	const char *noun = t->kind->noun;

	if (!t->doc && prev == 0)
		return state_fail(se, -ENOENT, "", "no %s for service %s", noun, t->svc);
	if (t->if_match == 0 && prev == 0)
		return state_fail(se, -ESTALE, "If-Match", "there is no %s for %s to match", noun,
		                  t->svc);
	if (t->if_match > 0 && prev != t->if_match)
		return state_fail(se, -ESTALE, "If-Match", prev ?
		                  "%s %s is at version %lld, not %lld" :
		                  "there is no %s for %s (version %lld), not version %lld", noun,
		                  t->svc, (long long)prev, (long long)t->if_match);
	return 0;
}

/* A put or delete of the document, with the kind's counter bumped (it
 * moves the config versions that carry the document even when the
 * document's revision alone would not: a delete). */
static int doc_txn(struct control_state *st, struct batch *b, void *arg, struct state_error *se)
{
	struct doc_txn *t = arg;
	int64_t prev = 0;
	int r;

	if (kv_rev(st, t->dkey, &prev) < 0)
		return state_store_failed(st, se, "read", -EIO);
	r = doc_match(t, prev, se);
	if (r)
		return r;
	if (t->doc)
		batch_put(b, t->dkey, json_deep_copy(t->doc),
		          t->if_match >= 0 ? prev : STORE_REV_ANY);
	else
		batch_del(b, t->dkey, prev);
	if (bump_counter(st, b, t->ckey, t->kind->counter_field, NULL) < 0)
		return state_store_failed(st, se, "read", -EIO);
	return 0;
}

static void doc_keys(struct doc_txn *t)
{
	state_key(t->dkey, sizeof(t->dkey), t->kind->prefix, t->svc);
	if (t->kind->counter_prefix)
		state_key(t->ckey, sizeof(t->ckey), t->kind->counter_prefix, t->svc);
	else
		state_key(t->ckey, sizeof(t->ckey), t->kind->counter_key, "");
}

int state_doc_put(struct control_state *st, const struct state_doc_kind *kind, const char *svc,
                  const json_t *doc, int64_t if_match, int64_t *version, struct state_error *se)
{
	struct doc_txn t = { .kind = kind, .svc = svc, .doc = doc, .if_match = if_match };

	doc_keys(&t);
	return state_txn(st, kind->noun, doc_txn, &t, version, se);
}

int state_doc_delete(struct control_state *st, const struct state_doc_kind *kind,
                     const char *svc, int64_t if_match, int64_t *revision,
                     struct state_error *se)
{
	struct doc_txn t = { .kind = kind, .svc = svc, .if_match = if_match };

	doc_keys(&t);
	return state_txn(st, kind->noun, doc_txn, &t, revision, se);
}

int state_doc_get(struct control_state *st, const struct state_doc_kind *kind, const char *svc,
                  json_t **doc, int64_t *version, struct state_error *se)
{
	char key[STORE_KEY_MAX];
	int r;

	state_key(key, sizeof(key), kind->prefix, svc);
	r = kv_json(st, key, doc, version);
	if (r == -ENOENT)
		return state_fail(se, -ENOENT, "", "no %s for service %s", kind->noun, svc);
	if (r)
		return state_store_failed(st, se, "read", r);
	return 0;
}

int state_doc_list(struct control_state *st, const struct state_doc_kind *kind, json_t **out,
                   struct state_error *se)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	json_t *list;
	int r = store_list(st->store, kind->prefix, &e, &n, NULL);

	if (r)
		return state_store_failed(st, se, "list", r);
	list = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(list, json_pack("{s:s, s:I}", "service",
		                                      e[i].key + strlen(kind->prefix),
		                                      "version", (json_int_t)e[i].revision));
	store_entries_free(e, n);
	*out = json_pack("{s:o}", kind->list_key, list);
	return 0;
}
