/*
 * state_policy: policy documents (policies/<svc>, their revision is the
 * version If-Match names) and the dry run that evaluates one; see state.h.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "meshlet/http.h"
#include "meshlet/policy.h"

struct policy_txn {
	const char *svc;
	const json_t *doc;             /* NULL: delete */
	int64_t if_match;              /* -1 none, 0 must exist, > 0 the version */
	char pkey[STORE_KEY_MAX];
	char skey[STORE_KEY_MAX];
};

/* The stored version against If-Match; 0 or -ENOENT / -ESTALE. */
static int policy_match(const struct policy_txn *t, int64_t prev, struct state_error *se)
{
	if (!t->doc && prev == 0)
		return state_fail(se, -ENOENT, "", "no policy for service %s", t->svc);
	if (t->if_match == 0 && prev == 0)
		return state_fail(se, -ESTALE, "If-Match", "there is no policy for %s to match",
		                  t->svc);
	if (t->if_match > 0 && prev != t->if_match)
		return state_fail(se, -ESTALE, "If-Match", prev ?
		                  "policy %s is at version %lld, not %lld" :
		                  "there is no policy for %s (version %lld), not version %lld", t->svc,
		                  (long long)prev, (long long)t->if_match);
	return 0;
}

/* A put or delete of the policy, with services/<svc> policy_writes bumped
 * (it moves svc's config version even when the policy's revision alone
 * would not: a delete). */
static int policy_txn(struct control_state *st, struct batch *b, void *arg,
                      struct state_error *se)
{
	struct policy_txn *t = arg;
	int64_t prev = 0;
	int r;

	if (kv_rev(st, t->pkey, &prev) < 0)
		return state_store_failed(st, se, "read", -EIO);
	r = policy_match(t, prev, se);
	if (r)
		return r;
	if (t->doc)
		batch_put(b, t->pkey, json_deep_copy(t->doc),
		          t->if_match >= 0 ? prev : STORE_REV_ANY);
	else
		batch_del(b, t->pkey, prev);
	if (bump_counter(st, b, t->skey, "policy_writes", NULL) < 0)
		return state_store_failed(st, se, "read", -EIO);
	return 0;
}

static void policy_keys(struct policy_txn *t)
{
	state_key(t->pkey, sizeof(t->pkey), "policies/", t->svc);
	state_key(t->skey, sizeof(t->skey), "services/", t->svc);
}

int state_policy_put(struct control_state *st, const char *svc, const json_t *doc,
                     int64_t if_match, int64_t *version, struct state_error *se)
{
	struct policy_txn t = { .svc = svc, .doc = doc, .if_match = if_match };

	policy_keys(&t);
	return state_txn(st, "policy", policy_txn, &t, version, se);
}

int state_policy_delete(struct control_state *st, const char *svc, int64_t if_match,
                        int64_t *revision, struct state_error *se)
{
	struct policy_txn t = { .svc = svc, .if_match = if_match };

	policy_keys(&t);
	return state_txn(st, "policy delete", policy_txn, &t, revision, se);
}

int state_policy_get(struct control_state *st, const char *svc, json_t **doc, int64_t *version,
                     struct state_error *se)
{
	char key[STORE_KEY_MAX];
	int r;

	state_key(key, sizeof(key), "policies/", svc);
	r = kv_json(st, key, doc, version);
	if (r == -ENOENT)
		return state_fail(se, -ENOENT, "", "no policy for service %s", svc);
	if (r)
		return state_store_failed(st, se, "read", r);
	return 0;
}

int state_policy_list(struct control_state *st, json_t **out, struct state_error *se)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	json_t *list;
	int r = store_list(st->store, "policies/", &e, &n, NULL);

	if (r)
		return state_store_failed(st, se, "list", r);
	list = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(list, json_pack("{s:s, s:I}", "service",
		                                      e[i].key + strlen("policies/"),
		                                      "version", (json_int_t)e[i].revision));
	store_entries_free(e, n);
	*out = json_pack("{s:o}", "policies", list);
	return 0;
}

/* ---- dry run ---- */

static const char *check_header(const void *ctx, const char *lname)
{
	const char *k;
	json_t *v;

	if (!ctx)
		return NULL;
	json_object_foreach((json_t *)ctx, k, v) {
		if (strcasecmp(k, lname) == 0)
			return json_string_value(v);
	}
	return NULL;
}

/* Evaluates p for r (path already normalised: path) into *out. */
static void check_eval(const struct policy *p, const struct api_check_req *r, const char *path,
                       int64_t version, json_t **out)
{
	struct policy_request req = {0};
	struct policy_decision d;

	req.peer_id = r->from;
	req.port = r->port;
	req.http = r->http;
	req.method = r->method ? r->method : "GET";
	req.path = path;
	req.header = check_header;
	req.header_ctx = r->headers;
	d = policy_eval(p, &req);
	*out = json_pack("{s:s, s:s, s:I}", "decision", policy_action_str(d.action),
	                 "rule", policy_decision_rule(&d), "policy_version", (json_int_t)version);
	if (r->path && strcmp(path, r->path) != 0)
		json_object_set_new(*out, "path", json_string(path));
}

int state_check(struct control_state *st, const struct api_check_req *r, json_t **out,
                struct state_error *se)
{
	struct meshlet_err e = {0};
	struct policy *p;
	json_t *doc = NULL;
	int64_t version = 0;
	char *norm = NULL;
	int ret;

	ret = state_policy_get(st, r->service, &doc, &version, se);
	if (ret == -ENOENT) {
		*out = json_pack("{s:s, s:s}", "decision", "deny", "rule", "no_policy");
		return 0;
	}
	if (ret)
		return ret;
	p = policy_parse(doc, &e);
	json_decref(doc);
	if (!p)
		return state_fail(se, -EIO, e.path, "the stored policy does not parse: %s", e.message);
	if (r->path) {
		size_t cap = strlen(r->path) + 2, len = 0;
		const char *why = NULL;

		norm = malloc(cap);
		if (!norm || http_path_normalize(r->path, strlen(r->path), norm, cap, &len, &why) < 0) {
			free(norm);
			policy_free(p);
			*out = json_pack("{s:s, s:s, s:s, s:I}", "decision", "deny", "rule", "invalid_path",
			                 "message", why ? why : "path refused", "policy_version",
			                 (json_int_t)version);
			return 0;
		}
	}
	check_eval(p, r, norm ? norm : "/", version, out);
	free(norm);
	policy_free(p);
	return 0;
}
