/* admin: health, readiness, metrics and config over plain HTTP on loopback. */
#include "admin.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <jansson.h>

#include "meshlet/log.h"
#include "acceptguard.h"
#include "snapshot.h"

#define ADMIN_MAX_HEADERS 8192
#define ADMIN_MAX_BODY 4096
#define ADMIN_TIMEOUT_S 10

struct admin {
	struct evhttp *http;
	struct accept_guard guard;
	const struct config *boot_cfg;
	struct metrics *metrics;
	struct admin_hooks hooks;
};

struct admin_route {
	enum evhttp_cmd_type method;
	const char *path;
	void (*handler)(struct admin *a, struct evhttp_request *req);
};

static void reply(struct evhttp_request *req, int code, const char *type, const char *body,
                  size_t len)
{
	struct evbuffer *out = evbuffer_new();
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);

	evhttp_add_header(h, "Content-Type", type);
	evhttp_add_header(h, "Cache-Control", "no-store");
	if (out)
		evbuffer_add(out, body, len);
	evhttp_send_reply(req, code, NULL, out);
	if (out)
		evbuffer_free(out);
}

static void reply_json(struct evhttp_request *req, int code, json_t *doc)
{
	char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;

	if (!text) {
		reply(req, 500, "application/json", "{\"error\":\"out of memory\"}\n", 26);
		return;
	}
	reply(req, code, "application/json", text, strlen(text));
	free(text);
}

static void on_healthz(struct admin *a, struct evhttp_request *req)
{
	reply(req, 200, "text/plain", "ok\n", 3);
}

/*
 * Ready = a policy and a currently valid SVID are loaded, and not draining.
 * In control mode the body also says how control is doing: a proxy serving
 * from its cache while control is down is ready, but degraded.
 */
static void on_ready(struct admin *a, struct evhttp_request *req)
{
	struct snapshot *s = a->hooks.snapshot(a->hooks.arg);
	struct admin_status st = { .control = "static" };
	const char *why = NULL;
	json_t *doc;

	a->hooks.status(a->hooks.arg, &st);
	if (!st.control_mode)
		snprintf(st.control, sizeof(st.control), "static");
	if (st.draining)
		why = "draining";
	else if (!s)
		why = "waiting for a certificate and a policy from control";
	else if (!s->policy)
		why = "no policy loaded";
	else if (s->cert_not_after <= time(NULL))
		why = "certificate expired";
	doc = json_pack("{s:b, s:s?, s:I, s:s?, s:s, s:b}", "ready", why == NULL,
	                "identity", s ? s->self_id : NULL,
	                "config_version", (json_int_t)(s ? s->version : 0), "reason", why,
	                "control", st.control,
	                "degraded", st.control_mode && strcmp(st.control, "connected") != 0);
	reply_json(req, why ? 503 : 200, doc);
	json_decref(doc);
	snapshot_unref(s);
}

static void on_metrics(struct admin *a, struct evhttp_request *req)
{
	char *text = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	if (!f || metrics_render(a->metrics, f) < 0) {
		if (f)
			fclose(f);
		free(text);
		reply(req, 500, "text/plain", "metrics unavailable\n", 20);
		return;
	}
	fclose(f);
	reply(req, 200, "text/plain; version=0.0.4", text, len);
	free(text);
}

static const char *proto_str(enum listener_protocol pr)
{
	return pr == PROTO_HTTP ? "http" : "tcp";
}

static json_t *inbound_json(const struct config *c)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < c->n_inbound; i++)
		json_array_append_new(a, json_pack("{s:s, s:s, s:s, s:s}",
		        "listen", c->inbound[i].listen.text, "forward", c->inbound[i].forward.text,
		        "advertise", c->inbound[i].advertise.text,
		        "protocol", proto_str(c->inbound[i].protocol)));
	return a;
}

static json_t *outbound_json(const struct config *c)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < c->n_outbound; i++) {
		json_t *eps = json_array();

		for (size_t j = 0; eps && j < c->outbound[i].n_endpoints; j++)
			json_array_append_new(eps, json_string(c->outbound[i].endpoints[j].text));
		json_array_append_new(a, json_pack("{s:s, s:s, s:s, s:o*}",
		        "listen", c->outbound[i].listen.text, "service", c->outbound[i].service,
		        "protocol", proto_str(c->outbound[i].protocol), "endpoints", eps));
	}
	return a;
}

/* Names of n rules (rate limits, faults: each starts with its selector). */
static json_t *rule_names(const void *rules, size_t n, size_t stride)
{
	json_t *arr = json_array();

	for (size_t i = 0; arr && i < n; i++) {
		const struct policy_rule *sel = (const void *)((const char *)rules + i * stride);

		json_array_append_new(arr, json_string(sel->name));
	}
	return arr;
}

/* The traffic documents the snapshot holds, as what each side applies. */
static json_t *traffic_json(const struct snapshot *s)
{
	json_t *arr = json_array();

	for (size_t i = 0; arr && i < s->n_traffic; i++) {
		const struct traffic *t = s->traffic[i].t;

		json_array_append_new(arr, json_pack(
			"{s:s, s:I, s:f, s:f, s:{s:i, s:i, s:i}, s:{s:i, s:f, s:i}, s:{s:i, s:i},"
			" s:o, s:o}",
			"service", t->service, "version", (json_int_t)s->traffic[i].version,
			"connect_seconds", t->connect_ms / 1000.0, "request_seconds", t->request_ms / 1000.0,
			"retries", "attempts", (int)t->retries.attempts,
			"budget_percent", (int)t->retries.budget_percent,
			"backoff_ms", (int)t->retries.backoff_ms,
			"outlier", "consecutive_failures", (int)t->outlier.consecutive_failures,
			"eject_seconds", t->outlier.eject_ms / 1000.0,
			"max_ejected_percent", (int)t->outlier.max_ejected_percent,
			"limits", "max_connections", (int)t->max_connections,
			"max_pending_requests", (int)t->max_pending_requests,
			"rate_limits", rule_names(t->rate_limits, t->n_rate_limits, sizeof(*t->rate_limits)),
			"faults", rule_names(t->faults, t->n_faults, sizeof(*t->faults))));
	}
	return arr;
}

/* The running config: file names but never key material (not even the key's path). */
static void on_config(struct admin *a, struct evhttp_request *req)
{
	struct snapshot *s = a->hooks.snapshot(a->hooks.arg);
	const struct config *c = s ? s->cfg : NULL;
	json_t *doc;

	if (!s) {
		doc = json_pack("{s:s, s:s, s:s, s:s}", "service", a->boot_cfg->service,
		                "trust_domain", a->boot_cfg->trust_domain, "mode", "control",
		                "state", "waiting for control");
		reply_json(req, 200, doc);
		json_decref(doc);
		return;
	}
	doc = json_pack("{s:I, s:s, s:s, s:s, s:I, s:s, s:{s:s?, s:s?, s:s}, s:s?,"
	                        " s:{s:i, s:s}, s:o*, s:o*, s:s, s:i, s:i,"
	                        " s:{s:f, s:f, s:f, s:f}}",
	        "version", (json_int_t)s->version, "service", c->service,
	        "trust_domain", c->trust_domain, "identity", s->self_id,
	        "cert_expires_at", (json_int_t)s->cert_not_after,
	        "mode", c->has_tls ? "static" : "control",
	        "tls", "cert", c->tls_cert, "bundle", c->tls_bundle,
	        "min_version", c->tls_min_version == TLS1_2_VERSION ? "1.2" : "1.3",
	        "policy_file", c->policy_file,
	        "policy", "rules", (int)(s->policy ? s->policy->n_rules : 0),
	        "default", s->policy ? policy_action_str(s->policy->default_action) : "deny",
	        "inbound", inbound_json(c), "outbound", outbound_json(c),
	        "admin", c->admin_listen.text, "workers", c->workers,
	        "max_connections", (int)c->max_connections,
	        "timeouts", "handshake_seconds", c->timeouts.handshake_ms / 1000.0,
	        "connect_seconds", c->timeouts.connect_ms / 1000.0,
	        "idle_seconds", c->timeouts.idle_ms / 1000.0,
	        "drain_seconds", c->timeouts.drain_ms / 1000.0);

	if (doc && (json_object_set_new(doc, "traffic", traffic_json(s)) < 0 ||
	            (c->traffic_file &&
	             json_object_set_new(doc, "traffic_file", json_string(c->traffic_file)) < 0))) {
		json_decref(doc);
		doc = NULL;
	}
	reply_json(req, doc ? 200 : 500, doc);
	json_decref(doc);
	snapshot_unref(s);
}

static void on_drain(struct admin *a, struct evhttp_request *req)
{
	a->hooks.drain(a->hooks.arg);
	reply(req, 200, "application/json", "{\"draining\":true}\n", 18);
}

static const struct admin_route routes[] = {
	{ EVHTTP_REQ_GET, "/healthz", on_healthz },
	{ EVHTTP_REQ_GET, "/ready", on_ready },
	{ EVHTTP_REQ_GET, "/metrics", on_metrics },
	{ EVHTTP_REQ_GET, "/config", on_config },
	{ EVHTTP_REQ_POST, "/drain", on_drain },
};

/*
 * evhttp owns its listener's callback argument, so the accept error
 * callback cannot be handed the guard: it is this one pointer, set by
 * admin_start() on the main thread (one admin listener per process).
 */
static struct accept_guard *admin_guard;

static void on_admin_accept_error(struct evconnlistener *lev, void *http)
{
	if (admin_guard)
		accept_guard_failed(admin_guard);
	else
		evconnlistener_disable(lev);    /* never spin */
}

static void on_request(struct evhttp_request *req, void *arg)
{
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
	enum evhttp_cmd_type method = evhttp_request_get_command(req);
	bool path_known = false;

	for (size_t i = 0; path && i < sizeof(routes) / sizeof(routes[0]); i++) {
		if (strcmp(path, routes[i].path) != 0)
			continue;
		path_known = true;
		if (routes[i].method == method ||
		    (method == EVHTTP_REQ_HEAD && routes[i].method == EVHTTP_REQ_GET)) {
			routes[i].handler(arg, req);
			return;
		}
	}
	if (path_known) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
		                  strcmp(path, "/drain") == 0 ? "POST" : "GET, HEAD");
		reply(req, 405, "application/json", "{\"error\":\"method not allowed\"}\n", 31);
		return;
	}
	reply(req, 404, "application/json", "{\"error\":\"not found\"}\n", 22);
}

int admin_start(struct event_base *base, const struct config *boot_cfg, struct metrics *m,
                const struct admin_hooks *hooks, struct admin **out)
{
	const struct config_addr *addr = &boot_cfg->admin_listen;
	struct evhttp_bound_socket *sock;
	struct evconnlistener *lev;
	struct admin *a = calloc(1, sizeof(*a));
	char host[128], what[sizeof(a->guard.what)];
	const char *colon;
	int rc = -ENOMEM;

	if (!a)
		return -ENOMEM;
	a->boot_cfg = boot_cfg;
	a->metrics = m;
	a->hooks = *hooks;
	a->http = evhttp_new(base);
	if (!a->http)
		goto fail;
	evhttp_set_max_headers_size(a->http, ADMIN_MAX_HEADERS);
	evhttp_set_max_body_size(a->http, ADMIN_MAX_BODY);
	evhttp_set_timeout(a->http, ADMIN_TIMEOUT_S);
	evhttp_set_allowed_methods(a->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST);
	evhttp_set_gencb(a->http, on_request, a);
	/* evhttp binds by host and port: split the validated "host:port" text. */
	colon = strrchr(addr->text, ':');
	snprintf(host, sizeof(host), "%.*s", (int)(colon - addr->text), addr->text);
	if (host[0] == '[') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
	}
	sock = evhttp_bind_socket_with_handle(a->http, host, config_addr_port(addr));
	if (!sock) {
		log_error("cannot listen on admin address %s: %s", addr->text, strerror(errno));
		rc = -EADDRINUSE;
		goto fail;
	}
	snprintf(what, sizeof(what), "admin %s", addr->text);
	lev = evhttp_bound_socket_get_listener(sock);
	if (!lev || accept_guard_init(&a->guard, lev, what) < 0)
		goto fail;
	admin_guard = &a->guard;
	evconnlistener_set_error_cb(lev, on_admin_accept_error);
	*out = a;
	return 0;
fail:
	admin_stop(a);
	return rc;
}

void admin_stop(struct admin *a)
{
	if (!a)
		return;
	admin_guard = NULL;
	accept_guard_stop(&a->guard);
	if (a->http)
		evhttp_free(a->http);
	free(a);
}
