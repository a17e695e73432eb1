/* handlers: the control API's routes; see handlers.h and docs/design.md. */
#include "handlers.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>
#include <event2/http.h>
#include <openssl/evp.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/log.h"
#include "meshlet/policy.h"
#include "meshlet/traffic.h"
#include "ctlmetrics.h"
#include "state.h"
#include "stats.h"
#include "watch.h"

#ifndef MESHLET_VERSION
#define MESHLET_VERSION "dev"
#endif

/* A validation error: 400 with its JSON path. */
static int bad_request(struct api_call *call, const struct meshlet_err *e)
{
	return api_fail(&call->err, 400, e->path, "%s", e->message);
}

/* The one place where the state's refusals become HTTP statuses. */
int handlers_status(int err)
{
	switch (err) {
	case -EINVAL: return 400;
	case -EPERM: return 403;
	case -ENOENT: return 404;
	case -EEXIST: /* fall through */
	case -EBUSY: return 409;
	case -ESTALE: return 412;
	case -E2BIG: return 413;
	case -EDQUOT: return 429;
	case -EAGAIN: return 503;   /* the store (etcd) is unreachable: nothing was written */
	default: return 500;
	}
}

/* A state call failed with err: its message (and reason) as the answer. */
static int state_failed(struct api_call *call, int err, const struct state_error *se)
{
	int status = handlers_status(err);
	const char *msg = se->e.message[0] ? se->e.message : "internal error";

	if (se->reason)
		return api_fail_code(&call->err, status, se->reason, se->e.path, "%s", msg);
	return api_fail(&call->err, status, se->e.path, "%s", msg);
}

static int ok(struct api_call *call, int status, json_t *out)
{
	call->status = status;
	call->out = out;
	return out ? 0 : api_fail(&call->err, 500, "", "out of memory");
}

static void set_etag(struct api_call *call, int64_t version)
{
	snprintf(call->etag, sizeof(call->etag), "\"%lld\"", (long long)version);
}

/* The If-Match header: -1 when absent. */
static int if_match(struct api_call *call, int64_t *version)
{
	const char *h = evhttp_find_header(evhttp_request_get_input_headers(call->req), "If-Match");
	struct meshlet_err e = {0};

	*version = -1;
	if (!h)
		return 0;
	if (api_parse_if_match(h, version, &e) < 0)
		return bad_request(call, &e);
	return 0;
}

/* ---- anyone ---- */

static int h_health(struct api_call *call)
{
	/* 200 even when the store is down: this replica still serves what it can
	 * (a liveness probe must not restart it for etcd's trouble). */
	return ok(call, 200, json_pack("{s:s, s:s, s:s, s:o*}", "status", "ok", "version",
	                               MESHLET_VERSION, "trust_domain", state_trust_domain(call->st),
	                               "store", state_store_status(call->st)));
}

/* ---- proxies ---- */

static int h_svid(struct api_call *call)
{
	struct api_svid_req r;
	struct api_join_token jt;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	EVP_PKEY *pub = NULL;
	json_t *out = NULL;
	const char *service, *token;
	int ret;

	if (api_parse_svid_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	if (call->caller != CALLER_SVID) {
		/* A join token: it names the service. (With a valid SVID too, the
		 * SVID decides and the token is not consumed.) */
		snprintf(call->caller_id, sizeof(call->caller_id), "token:invalid");
		if (api_token_parse(call->bearer, &jt, &e) < 0)
			return api_fail(&call->err, 403, "", "%s", e.message);
		if (r.service && strcmp(r.service, jt.service) != 0)
			return api_fail(&call->err, 403, "service", "this join token is for service %s, "
			                "not %s", jt.service, r.service);
		service = jt.service;
	} else {
		/* Renewal over mTLS: only for the caller's own service. */
		if (r.service && strcmp(r.service, call->peer_svc) != 0)
			return api_fail(&call->err, 403, "service", "an SVID of %s may not obtain an SVID "
			                "for %s", call->peer_svc, r.service);
		service = call->peer_svc;
	}
	if (ca_csr_check(r.csr, r.csr_len, &pub, &e) < 0)
		return bad_request(call, &e);
	token = call->caller == CALLER_SVID ? NULL : call->bearer;
	ret = state_svid_issue(call->st, service, token, token ? NULL : call->peer_serial, pub, &out,
	                       &se);
	EVP_PKEY_free(pub);
	if (ret)
		return state_failed(call, ret, &se);
	ctlmetrics_issued(server_metrics(call->srv), token ? ISSUE_JOIN : ISSUE_RENEWAL);
	if (token)
		snprintf(call->caller_id, sizeof(call->caller_id), "token:%s", service);
	return ok(call, 200, out);
}

static void seen(struct api_call *call, int64_t held, int polling)
{
	if (call->caller == CALLER_SVID)
		state_proxy_seen(call->st, call->peer_serial, call->peer_svc, call->peer_not_after, held,
		                 polling);
}

/* After seen(): what the proxy said about itself with its poll. */
static void seen_degraded(struct api_call *call, unsigned flags)
{
	if (call->caller == CALLER_SVID)
		state_proxy_degraded(call->st, call->peer_serial, flags);
}

static int h_bundle(struct api_call *call)
{
	uint64_t misses = state_store_misses(call->st);
	json_t *b = state_bundle(call->st);

	/* Its version comes from the store: without the store it would read 0. */
	if (state_store_misses(call->st) != misses) {
		json_decref(b);
		return api_fail(&call->err, 503, "", "the state store is unavailable; retry later");
	}
	seen(call, -1, 0);
	if (call->caller == CALLER_SVID)
		state_proxy_bundle_fetched(call->st, call->peer_serial);
	return ok(call, 200, b);
}

static int config_answer(struct api_call *call)
{
	struct api_config_query q;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	/* Parsed again for a long poll that waited: the query lives with req. */
	if (api_parse_config_query(call->query, &q, &e) < 0)
		return bad_request(call, &e);
	ret = state_config(call->st, call->svc, &q, &out, &se);
	if (ret)
		return state_failed(call, ret, &se);
	set_etag(call, json_integer_value(json_object_get(out, "version")));
	return ok(call, 200, out);
}

/*
 * The counter summary a proxy sent with its poll, if any. A bad one is
 * refused on its own (a log line, the answer's API_STATS_REFUSED_HEADER):
 * the long poll goes on, so a proxy with a bug keeps its config.
 */
static void take_stats(struct api_call *call)
{
	struct evhttp_request *req = call->req;
	const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), API_STATS_HEADER);
	struct api_stats_summary *sum;
	struct meshlet_err e = {0};
	char msg[sizeof(e.path) + sizeof(e.message) + 4], why[sizeof(msg)];

	if (!h)
		return;
	sum = malloc(sizeof(*sum));
	if (!sum)
		return;
	if (api_stats_parse(h, sum, &e) == 0) {
		stats_record(server_stats(call->srv), call->svc, sum, (int64_t)time(NULL));
	} else {
		/* Printable ASCII only: it goes into a header and the log. */
		api_stats_clean(why, sizeof(why), err_str(&e, msg, sizeof(msg)));
		log_warn("%s: counter summary for %s refused: %s", call->caller_id, call->svc, why);
		stats_refused(server_stats(call->srv), call->svc, why);
		evhttp_add_header(evhttp_request_get_output_headers(req), API_STATS_REFUSED_HEADER, why);
	}
	free(sum);
}

static int h_config(struct api_call *call)
{
	struct api_config_query q;
	struct meshlet_err e = {0};
	int64_t v = 0;
	int ret;

	if (api_parse_config_query(call->query, &q, &e) < 0)
		return bad_request(call, &e);
	take_stats(call);
	/* The version as the store's follower knows it (no round trip on
	 * etcd); from the store itself when that is behind the proxy's (the
	 * follower lags a write made elsewhere): it must not look older. */
	if (state_watch_version(call->st, call->svc, &v) < 0 ||
	    (v < q.after && state_config_version(call->st, call->svc, &v) < 0))
		return api_fail(&call->err, state_store_down(call->st) ? 503 : 500, "",
		                "the state store failed; see control's log");
	/* Past V: answer. Behind V (control's state was restored, or V came
	 * from elsewhere): answer too, so that the proxy resynchronises. */
	if (v != q.after || q.wait == 0) {
		seen(call, q.after, 0);
		seen_degraded(call, q.degraded);
		return config_answer(call);
	}
	ret = watch_add(call->watch, call, call->svc, q.after, q.wait);
	if (ret == -EBUSY)
		return ret;        /* over a long-poll limit: 429 in call->err */
	if (ret < 0)
		return api_fail(&call->err, 503, "", "cannot wait now; retry");
	seen(call, q.after, +1);
	seen_degraded(call, q.degraded);
	return SERVER_ASYNC;
}

void handlers_config_done(struct api_call *call, bool aborted)
{
	seen(call, -1, -1);
	if (aborted) {
		server_abort(call);
		return;
	}
	if (config_answer(call) < 0)
		call->status = call->err.status;
	server_reply(call);
}

/* The coalesced bump of a registry change fell due. */
static void endpoints_flush_cb(evutil_socket_t fd, short what, void *arg)
{
	struct control_server *srv = arg;

	(void)fd;
	(void)what;
	if (state_endpoints_flush(server_state(srv)))
		watch_notify(server_watch(srv), NULL);
}

/* After a registry change: wake the long polls now, or once the
 * coalescing window ends (one timer for a whole burst). */
static void endpoints_changed(struct api_call *call)
{
	int64_t due = state_endpoints_touch(call->st);
	struct event_base *base = call->evcon ? evhttp_connection_get_base(call->evcon) : NULL;
	struct timeval tv;

	if (due == 0) {
		watch_notify(call->watch, NULL);
		return;
	}
	if (due < 0)
		return;
	tv.tv_sec = (time_t)(due / 1000);
	tv.tv_usec = (suseconds_t)(due % 1000) * 1000;
	/* No timer to be had: bump now rather than late. */
	if ((!base || event_base_once(base, -1, EV_TIMEOUT, endpoints_flush_cb, call->srv, &tv) < 0) &&
	    state_endpoints_flush(call->st))
		watch_notify(call->watch, NULL);
}

static int h_endpoints(struct api_call *call)
{
	struct api_endpoint_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_endpoint_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_endpoint_register(call->st, call->svc, &r, call->peer_serial,
	                              call->peer_not_after, call->remote, &out, &se);
	if (ret)
		return state_failed(call, ret, &se);
	seen(call, -1, 0);
	endpoints_changed(call);
	return ok(call, 200, out);
}

/* ---- registry (admin) ---- */

static int h_endpoints_list(struct api_call *call)
{
	struct state_error se = {0};
	json_t *out = NULL;
	int ret = state_endpoints_list(call->st, &out, &se);

	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

static int h_endpoints_assign(struct api_call *call)
{
	struct api_assign_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_assign_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_endpoint_assign(call->st, &r, &out, &se);
	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

static int h_endpoints_unassign(struct api_call *call)
{
	struct api_assign_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_assign_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_endpoint_unassign(call->st, &r, &out, &se);
	if (ret)
		return state_failed(call, ret, &se);
	watch_notify(call->watch, NULL);
	return ok(call, 200, out);
}

/* ---- policies ---- */

static int h_policy_put(struct api_call *call)
{
	struct state_error se = {0};
	struct meshlet_err e = {0};
	struct policy *p = policy_parse(call->body, &e);
	const char *svc;
	int64_t expect, version = 0;
	int ret;

	if (!p)
		return bad_request(call, &e);
	policy_free(p);
	svc = json_string_value(json_object_get(call->body, "service"));
	if (!svc || strcmp(svc, call->svc) != 0)
		return api_fail(&call->err, 400, "service", "the policy is for service %s but the URL "
		                "names %s", svc ? svc : "(none)", call->svc);
	if ((ret = if_match(call, &expect)) < 0)
		return ret;
	ret = state_policy_put(call->st, call->svc, call->body, expect, &version, &se);
	if (ret)
		return state_failed(call, ret, &se);
	set_etag(call, version);
	watch_notify(call->watch, call->svc);
	return ok(call, 200, json_pack("{s:s, s:I}", "service", call->svc,
	                               "version", (json_int_t)version));
}

static int h_policy_get(struct api_call *call)
{
	struct state_error se = {0};
	json_t *doc = NULL;
	int64_t version = 0;
	int ret = state_policy_get(call->st, call->svc, &doc, &version, &se);

	if (ret)
		return state_failed(call, ret, &se);
	set_etag(call, version);
	return ok(call, 200, json_pack("{s:I, s:o}", "version", (json_int_t)version, "policy", doc));
}

static int h_policy_delete(struct api_call *call)
{
	struct state_error se = {0};
	int64_t expect, rev = 0;
	int ret;

	if ((ret = if_match(call, &expect)) < 0)
		return ret;
	ret = state_policy_delete(call->st, call->svc, expect, &rev, &se);
	if (ret)
		return state_failed(call, ret, &se);
	watch_notify(call->watch, call->svc);
	return ok(call, 200, json_pack("{s:s, s:b, s:I}", "service", call->svc, "deleted", 1,
	                               "version", (json_int_t)rev));
}

static int h_policy_list(struct api_call *call)
{
	struct state_error se = {0};
	json_t *out = NULL;
	int ret = state_policy_list(call->st, &out, &se);

	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

/* ---- traffic documents ---- */

/* The whole document validated (nothing of a bad one is stored) and for
 * the service the URL names. */
static int traffic_valid(struct api_call *call)
{
	struct meshlet_err e = {0};
	struct traffic *t = traffic_parse(call->body, &e);
	const char *svc;

	if (!t)
		return bad_request(call, &e);
	traffic_free(t);
	svc = json_string_value(json_object_get(call->body, "service"));
	if (!svc || strcmp(svc, call->svc) != 0)
		return api_fail(&call->err, 400, "service", "the traffic document is for service %s "
		                "but the URL names %s", svc ? svc : "(none)", call->svc);
	return 0;
}

static int h_traffic_put(struct api_call *call)
{
	struct state_error se = {0};
	int64_t expect, version = 0;
	int ret;

	if ((ret = traffic_valid(call)) < 0 || (ret = if_match(call, &expect)) < 0)
		return ret;
	ret = state_traffic_put(call->st, call->svc, call->body, expect, &version, &se);
	if (ret)
		return state_failed(call, ret, &se);
	set_etag(call, version);
	/* Callers of the service hold its document too: wake every poll. */
	watch_notify(call->watch, NULL);
	return ok(call, 200, json_pack("{s:s, s:I}", "service", call->svc,
	                               "version", (json_int_t)version));
}

static int h_traffic_get(struct api_call *call)
{
	struct state_error se = {0};
	json_t *doc = NULL, *out;
	int64_t version = 0;
	int ret = state_traffic_get(call->st, call->svc, &doc, &version, &se);

	if (ret)
		return state_failed(call, ret, &se);
	set_etag(call, version);
	out = api_traffic_entry(doc, version);
	json_decref(doc);
	return ok(call, 200, out);
}

static int h_traffic_delete(struct api_call *call)
{
	struct state_error se = {0};
	int64_t expect, rev = 0;
	int ret;

	if ((ret = if_match(call, &expect)) < 0)
		return ret;
	ret = state_traffic_delete(call->st, call->svc, expect, &rev, &se);
	if (ret)
		return state_failed(call, ret, &se);
	watch_notify(call->watch, NULL);
	return ok(call, 200, json_pack("{s:s, s:b, s:I}", "service", call->svc, "deleted", 1,
	                               "version", (json_int_t)rev));
}

static int h_traffic_list(struct api_call *call)
{
	struct state_error se = {0};
	json_t *out = NULL;
	int ret = state_traffic_list(call->st, &out, &se);

	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

/* ---- admin ---- */

static int h_tokens(struct api_call *call)
{
	struct api_token_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_token_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_token_create(call->st, &r, &out, &se);
	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

static int h_proxies(struct api_call *call)
{
	return ok(call, 200, state_proxies(call->st));
}

static int h_certs(struct api_call *call)
{
	struct state_error se = {0};
	json_t *out = NULL;
	int ret = state_certs_list(call->st, &out, &se);

	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

static int h_certs_rotate(struct api_call *call)
{
	struct api_rotate_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_rotate_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_certs_rotate(call->st, &r, &out, &se);
	if (ret)
		return state_failed(call, ret, &se);
	watch_notify(call->watch, r.service);
	return ok(call, 200, out);
}

static int h_certs_revoke(struct api_call *call)
{
	struct api_revoke_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_revoke_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_certs_revoke(call->st, r.serial, &out, &se);
	if (ret)
		return state_failed(call, ret, &se);
	watch_notify(call->watch, NULL);
	return ok(call, 200, out);
}

static int h_stats(struct api_call *call)
{
	return ok(call, 200, stats_json(server_stats(call->srv), (int64_t)time(NULL)));
}

static int h_ca(struct api_call *call)
{
	return ok(call, 200, state_ca_show(call->st));
}

static int h_ca_rotate(struct api_call *call)
{
	struct api_ca_rotate_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	bool tls_changed = false;
	int ret;

	if (api_parse_ca_rotate_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_ca_rotate(call->st, r.force, &out, &tls_changed, &se);
	if (tls_changed)              /* also on a refusal that reloaded the roots */
		server_tls_changed(call->srv);
	if (ret)
		return state_failed(call, ret, &se);
	watch_notify(call->watch, NULL);
	return ok(call, 200, out);
}

static int h_check(struct api_call *call)
{
	struct api_check_req r;
	struct state_error se = {0};
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	if (api_parse_check_req(call->body, &r, &e) < 0)
		return bad_request(call, &e);
	ret = state_check(call->st, &r, &out, &se);
	return ret ? state_failed(call, ret, &se) : ok(call, 200, out);
}

const struct route handlers_routes[] = {
	{ "GET",    "/v1/health",                   AUTH_NONE,         false, h_health },
	{ "POST",   "/v1/svid",                     AUTH_ISSUE,        true,  h_svid },
	{ "GET",    "/v1/bundle",                   AUTH_ANY_SVID,     false, h_bundle },
	{ "GET",    "/v1/services/{svc}/config",    AUTH_SVC_OR_ADMIN, false, h_config },
	{ "POST",   "/v1/services/{svc}/endpoints", AUTH_SVC_SVID,     true,  h_endpoints },
	{ "GET",    "/v1/endpoints",                AUTH_ADMIN,        false, h_endpoints_list },
	{ "POST",   "/v1/endpoints/assign",         AUTH_ADMIN,        true,  h_endpoints_assign },
	{ "POST",   "/v1/endpoints/unassign",       AUTH_ADMIN,        true,  h_endpoints_unassign },
	{ "GET",    "/v1/policies",                 AUTH_ADMIN,        false, h_policy_list },
	{ "PUT",    "/v1/policies/{svc}",           AUTH_ADMIN,        true,  h_policy_put },
	{ "GET",    "/v1/policies/{svc}",           AUTH_ADMIN,        false, h_policy_get },
	{ "DELETE", "/v1/policies/{svc}",           AUTH_ADMIN,        false, h_policy_delete },
	{ "GET",    "/v1/traffic",                  AUTH_ADMIN,        false, h_traffic_list },
	{ "PUT",    "/v1/traffic/{svc}",            AUTH_ADMIN,        true,  h_traffic_put },
	{ "GET",    "/v1/traffic/{svc}",            AUTH_ADMIN,        false, h_traffic_get },
	{ "DELETE", "/v1/traffic/{svc}",            AUTH_ADMIN,        false, h_traffic_delete },
	{ "POST",   "/v1/tokens",                   AUTH_ADMIN,        true,  h_tokens },
	{ "GET",    "/v1/proxies",                  AUTH_ADMIN,        false, h_proxies },
	{ "GET",    "/v1/certs",                    AUTH_ADMIN,        false, h_certs },
	{ "POST",   "/v1/certs/rotate",             AUTH_ADMIN,        true,  h_certs_rotate },
	{ "POST",   "/v1/certs/revoke",             AUTH_ADMIN,        true,  h_certs_revoke },
	{ "GET",    "/v1/ca",                       AUTH_ADMIN,        false, h_ca },
	{ "POST",   "/v1/ca/rotate",                AUTH_ADMIN,        true,  h_ca_rotate },
	{ "POST",   "/v1/check",                    AUTH_ADMIN,        true,  h_check },
	{ "GET",    "/v1/stats",                    AUTH_ADMIN,        false, h_stats },
	{ NULL, NULL, AUTH_NONE, false, NULL },
};
