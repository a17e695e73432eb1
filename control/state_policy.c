/*
 * state_policy: policy documents (policies/<svc>, their revision is the
 * version If-Match names; stored by state_doc.c) and the dry run that
 * evaluates one; see state.h.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "meshlet/http.h"
#include "meshlet/policy.h"

static const struct state_doc_kind policy_kind = {
	.prefix = "policies/", .noun = "policy", .list_key = "policies",
	.counter_prefix = "services/", .counter_field = "policy_writes",
};

int state_policy_put(struct control_state *st, const char *svc, const json_t *doc,
                     int64_t if_match, int64_t *version, struct state_error *se)
{
	return state_doc_put(st, &policy_kind, svc, doc, if_match, version, se);
}

int state_policy_delete(struct control_state *st, const char *svc, int64_t if_match,
                        int64_t *revision, struct state_error *se)
{
	return state_doc_delete(st, &policy_kind, svc, if_match, revision, se);
}

int state_policy_get(struct control_state *st, const char *svc, json_t **doc, int64_t *version,
                     struct state_error *se)
{
	return state_doc_get(st, &policy_kind, svc, doc, version, se);
}

int state_policy_list(struct control_state *st, json_t **out, struct state_error *se)
{
	return state_doc_list(st, &policy_kind, out, se);
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

/* The request r describes, its path already normalised (path). */
static void check_request(const struct api_check_req *r, const char *path,
                          struct policy_request *req)
{
	memset(req, 0, sizeof(*req));
	req->peer_id = r->from;
	req->port = r->port;
	req->http = r->http;
	req->method = r->method ? r->method : "GET";
	req->path = path;
	req->header = check_header;
	req->header_ctx = r->headers;
}

/* The policy decision for req into *out: no_policy when svc has none.
 * override: a method-override header's method ("" for none); as on the
 * proxy, both methods must be allowed. */
static int check_policy(struct control_state *st, const char *svc, struct policy_request *req,
                        const char *override, json_t **out, struct state_error *se)
{
	struct meshlet_err e = {0};
	struct policy_decision d;
	struct policy *p;
	json_t *doc = NULL;
	int64_t version = 0;
	int ret = state_policy_get(st, svc, &doc, &version, se);

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
	d = policy_eval(p, req);
	if (d.action == POLICY_ALLOW && override[0] && strcmp(override, req->method) != 0) {
		req->method = override;
		d = policy_eval(p, req);
	}
	*out = json_pack("{s:s, s:s, s:I}", "decision", policy_action_str(d.action),
	                 "rule", policy_decision_rule(&d), "policy_version", (json_int_t)version);
	policy_free(p);
	return 0;
}

/* The normalised path of r into a new string (*norm), or an answer
 * refusing it (*out). Returns 0 or -EIO. */
static int check_path(const struct api_check_req *r, char **norm, json_t **out)
{
	size_t cap = strlen(r->path) + 2, len = 0;
	const char *why = NULL;

	*norm = malloc(cap);
	if (!*norm)
		return -EIO;
	if (http_path_normalize(r->path, strlen(r->path), *norm, cap, &len, &why) < 0) {
		free(*norm);
		*norm = NULL;
		*out = json_pack("{s:s, s:s, s:s}", "decision", "deny", "rule", "invalid_path",
		                 "message", why ? why : "path refused");
	}
	return 0;
}

/* The dry run: the policy's decision, and the traffic rules that would
 * apply (state_traffic_check), for the request r describes. */
int state_check(struct control_state *st, const struct api_check_req *r, json_t **out,
                struct state_error *se)
{
	struct policy_request req;
	char *norm = NULL, override[32];
	const char *why;
	int ret;

	*out = NULL;
	if (r->path && check_path(r, &norm, out) < 0)
		return state_fail(se, -EIO, "", "out of memory");
	if (*out)
		return 0;
	check_request(r, norm ? norm : "/", &req);
	why = http_method_override(check_header, r->headers, override, sizeof(override));
	if (why) {
		free(norm);
		*out = json_pack("{s:s, s:s, s:s}", "decision", "deny", "rule", "invalid_request",
		                 "message", why);
		return *out ? 0 : state_fail(se, -EIO, "", "out of memory");
	}
	ret = check_policy(st, r->service, &req, override, out, se);
	if (!ret && override[0])
		json_object_set_new(*out, "method_override", json_string(override));
	if (!ret && r->path && strcmp(norm, r->path) != 0)
		json_object_set_new(*out, "path", json_string(norm));
	if (!ret)
		ret = state_traffic_check(st, r->service, &req, *out, se);
	free(norm);
	if (ret) {
		json_decref(*out);
		*out = NULL;
	}
	return ret;
}
