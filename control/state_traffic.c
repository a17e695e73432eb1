/*
 * state_traffic: traffic documents (traffic/<svc>, versioned like
 * policies; stored by state_doc.c), what of them a proxy's config answer
 * carries, and their part of the dry run; see state.h.
 *
 * Every write bumps meta/traffic, which is part of every service's config
 * version: a document concerns its own service's proxies (rate limits,
 * faults) and every caller's (timeouts, retries, ...), and control does
 * not know who calls whom. Traffic writes are rare; a long poll that
 * wakes for another service's document finds nothing changed for it.
 */
#include "state-int.h"

#include <errno.h>
#include <string.h>

#include "meshlet/traffic.h"

static const struct state_doc_kind traffic_kind = {
	.prefix = "traffic/", .noun = "traffic document", .list_key = "traffic",
	.counter_key = "meta/traffic", .counter_field = "version",
};

int state_traffic_put(struct control_state *st, const char *svc, const json_t *doc,
                      int64_t if_match, int64_t *version, struct state_error *se)
{
	return state_doc_put(st, &traffic_kind, svc, doc, if_match, version, se);
}

int state_traffic_delete(struct control_state *st, const char *svc, int64_t if_match,
                         int64_t *revision, struct state_error *se)
{
	return state_doc_delete(st, &traffic_kind, svc, if_match, revision, se);
}

int state_traffic_get(struct control_state *st, const char *svc, json_t **doc,
                      int64_t *version, struct state_error *se)
{
	return state_doc_get(st, &traffic_kind, svc, doc, version, se);
}

int state_traffic_list(struct control_state *st, json_t **out, struct state_error *se)
{
	return state_doc_list(st, &traffic_kind, out, se);
}

/* The entry of one stored document, or NULL (logged) when it is not JSON. */
static json_t *config_entry(const struct store_entry *e)
{
	json_error_t jerr;
	json_t *doc = json_loadb(e->value, e->len, 0, &jerr), *entry;

	if (!doc) {
		log_error("store: %s is not JSON: %s", e->key, jerr.text);
		return NULL;
	}
	entry = api_traffic_entry(doc, e->revision);
	json_decref(doc);
	return entry;
}

int state_traffic_config(struct control_state *st, const char *svc,
                         const struct api_config_query *q, json_t **out)
{
	struct store_entry *e = NULL;
	size_t n = 0, plen = strlen(traffic_kind.prefix);
	json_t *obj;
	int r = store_list(st->store, traffic_kind.prefix, &e, &n, NULL);

	if (r)
		return -EIO;
	obj = json_object();
	for (size_t i = 0; obj && i < n; i++) {
		const char *name = e[i].key + plen;
		json_t *entry;

		if (strcmp(name, svc) != 0 && !api_config_query_wants(q, name))
			continue;
		entry = config_entry(&e[i]);
		if (entry)
			json_object_set_new(obj, name, entry);
	}
	store_entries_free(e, n);
	*out = obj;
	return obj ? 0 : -EIO;
}

int state_traffic_check(struct control_state *st, const char *svc,
                        const struct policy_request *req, json_t *out, struct state_error *se)
{
	struct meshlet_err e = {0};
	struct traffic *t = NULL;
	json_t *doc = NULL;
	int64_t version = 0;
	int r = state_traffic_get(st, svc, &doc, &version, se);

	if (r && r != -ENOENT)
		return r;
	if (doc) {
		t = traffic_parse(doc, &e);
		json_decref(doc);
		if (!t)
			return state_fail(se, -EIO, e.path, "the stored traffic document does not "
			                  "parse: %s", e.message);
	}
	r = api_check_add_traffic(out, t, version, req);
	traffic_free(t);
	return r ? state_fail(se, -EIO, "", "out of memory") : 0;
}
