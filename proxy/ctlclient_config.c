/*
 * ctlclient_config: what the proxy serves from control (see
 * ctlclient-int.h): registering the inbound addresses, the config long poll,
 * and turning an answer into a snapshot source the host installs.
 */
#include "ctlclient-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/api.h"
#include "meshlet/log.h"
#include "meshlet/policy.h"
#include "meshlet/tls.h"
#include "snapshot.h"

int ctlc_register_inbound(struct ctlclient *c)
{
	const struct config *cfg = c->cfg;
	struct httpc *h = ctlc_mtls(c);
	char path[128];

	if (!h)
		return -1;
	snprintf(path, sizeof(path), "/v1/services/%s/endpoints", cfg->service);
	for (size_t i = 0; i < cfg->n_inbound; i++) {
		const struct config_inbound *in = &cfg->inbound[i];
		struct httpc_response r;
		json_t *body = json_pack("{s:s, s:[i]}", "address", in->advertise.text, "ports",
		                         (int)config_addr_port(&in->forward));
		int rc;

		if (!body)
			return ctlc_fail(c, "out of memory");
		rc = ctlc_call(c, h, "registering the inbound address", "POST", path, body,
		               CTL_CALL_TIMEOUT_MS, &r);
		json_decref(body);
		/* A refusal of this address (not ours, another service's, over a
		 * cap) will not change by retrying: say so, and keep polling the
		 * config (policy, certificates) instead of looping here. */
		if (rc >= 400 && rc < 500 && rc != 401) {
			log_error("%s: %s is not registered: callers using control's registry do not "
			          "find it here", c->why, in->advertise.text);
			continue;
		}
		if (rc != 0)
			return -1;
		httpc_response_clear(&r);
		log_info("registered %s (application port %u) for %s", in->advertise.text,
		         (unsigned)config_addr_port(&in->forward), cfg->service);
	}
	c->need_register = false;
	return 0;
}

/* The part of control's {service: [endpoint]} our outbound listeners take
 * their endpoints from (those without endpoints in the file); all of it in
 * transparent mode, which maps any original destination through the
 * registry. (Control sends no more than upstreams_param() asks for; this
 * also trims a cache written before.) */
json_t *ctlc_relevant_endpoints(const struct config *cfg, const json_t *all)
{
	json_t *out = json_object();

	if (cfg->has_transparent) {
		if (out && json_is_object(all) && json_object_update(out, (json_t *)all) < 0) {
			json_decref(out);
			return NULL;
		}
		return out;
	}
	for (size_t i = 0; out && i < cfg->n_outbound; i++) {
		const char *svc = cfg->outbound[i].service;
		json_t *list = json_object_get(all, svc);

		if (cfg->outbound[i].n_endpoints == 0 && json_is_array(list))
			json_object_set(out, svc, list);
	}
	return out;
}

/* True when cfg's proxy applies svc's traffic document: its own service
 * (inbound), or one its outbound listeners call (every one when
 * transparent). */
static bool wants_traffic(const struct config *cfg, const char *svc)
{
	if (cfg->has_transparent || strcmp(svc, cfg->service) == 0)
		return true;
	for (size_t i = 0; i < cfg->n_outbound; i++) {
		if (strcmp(cfg->outbound[i].service, svc) == 0)
			return true;
	}
	return false;
}

json_t *ctlc_relevant_traffic(const struct config *cfg, const json_t *all)
{
	json_t *out = json_object(), *v;
	const char *svc;

	json_object_foreach((json_t *)all, svc, v) {
		if (out && wants_traffic(cfg, svc))
			json_object_set(out, svc, v);
	}
	return out;
}

/*
 * The traffic documents of {service: {version, traffic}} into src. One
 * this proxy cannot use (from a newer control, or for another service
 * than its key) is left out with a warning: calls to that service get the
 * defaults, and nothing else stops being served.
 */
static int build_traffic(const json_t *traffic, struct snapshot_source *src)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct api_traffic_resp tr;
	const char *svc;
	char msg[600];
	json_t *v;

	src->traffic = calloc(json_object_size(traffic) + 1, sizeof(*src->traffic));
	if (!src->traffic)
		return -1;
	json_object_foreach((json_t *)traffic, svc, v) {
		struct snapshot_traffic *st = &src->traffic[src->n_traffic];

		st->t = api_parse_traffic_resp(v, &tr, &e) < 0 ? NULL : traffic_parse(tr.traffic, &e);
		if (st->t && strcmp(st->t->service, svc) != 0) {
			err_set(&e, "service", "names %s", st->t->service);
			traffic_free(st->t);
			st->t = NULL;
		}
		if (!st->t) {
			log_warn("ignoring control's traffic document for %s: %s", svc,
			         err_str(&e, msg, sizeof(msg)));
			continue;
		}
		st->version = tr.version;
		src->n_traffic++;
	}
	return 0;
}

/* One endpoint from control (api_parse_endpoint), its address parsed.
 * 0, or -1 with *why set. */
static int parse_endpoint(const json_t *v, struct config_addr *addr,
                          struct snapshot_app_ports *ports, struct meshlet_err *e,
                          const char **why)
{
	struct api_endpoint ep;

	memset(ports, 0, sizeof(*ports));
	if (api_parse_endpoint(v, &ep, e) < 0) {
		*why = e->message;
		return -1;
	}
	if (config_parse_addr(ep.address, addr, why) < 0)
		return -1;
	for (size_t i = 0; i < ep.n_ports && ports->n < SNAPSHOT_APP_PORTS_MAX; i++)
		ports->port[ports->n++] = ep.ports[i];
	return 0;
}

/* The registry for snapshot_source from {service: [endpoint]}; counts them. */
static int build_registry(const json_t *eps, struct snapshot_source *src, size_t *count)
{
	const char *svc;
	const json_t *list;
	size_t n = json_object_size(eps);

	*count = 0;
	src->registry = calloc(n ? n : 1, sizeof(*src->registry));
	if (!src->registry)
		return -ENOMEM;
	json_object_foreach((json_t *)eps, svc, list) {
		struct snapshot_endpoints *e;
		const json_t *v;
		size_t i, m = json_array_size(list);

		if (strlen(svc) > SERVICE_NAME_MAX || m == 0)
			continue;
		if (m > CONFIG_MAX_ENDPOINTS)
			m = CONFIG_MAX_ENDPOINTS;
		e = &src->registry[src->n_registry++];
		snprintf(e->service, sizeof(e->service), "%s", svc);
		e->addrs = calloc(m, sizeof(*e->addrs));
		e->app_ports = calloc(m, sizeof(*e->app_ports));
		if (!e->addrs || !e->app_ports)
			return -ENOMEM;
		json_array_foreach(list, i, v) {
			struct meshlet_err pe = { { 0 }, { 0 } };
			const char *why = NULL;

			if (e->n_addrs >= m)
				break;
			if (parse_endpoint(v, &e->addrs[e->n_addrs], &e->app_ports[e->n_addrs], &pe,
			                   &why) < 0) {
				log_warn("ignoring endpoint %zu of %s from control: %s", i, svc,
				         why ? why : "malformed");
				continue;
			}
			e->n_addrs++;
			(*count)++;
		}
	}
	return 0;
}

/*
 * Installs policy (control's document, or null: deny everything inbound),
 * endpoints and, when they changed, our SVID and bundle as a new snapshot.
 */
int ctlc_install(struct ctlclient *c, const json_t *policy, int64_t policy_version,
                 const json_t *eps, const json_t *traffic, int64_t version)
{
	struct snapshot_source src = { 0 };
	struct meshlet_err e = { { 0 }, { 0 } };
	json_t *deny = NULL;
	char msg[600];
	size_t n_eps = 0;

	if (c->tls_dirty) {
		size_t n = json_array_size(c->st.revoked);
		const char **rev = calloc(n ? n : 1, sizeof(char *));
		int rc;

		if (!rev)
			return ctlc_fail(c, "out of memory");
		for (size_t i = 0; i < n; i++)
			rev[i] = json_string_value(json_array_get(c->st.revoked, i));
		rc = tls_material_from_pem(c->st.cert_pem, c->st.key, c->st.bundle_pem, rev, n,
		                           c->cfg->trust_domain, &src.tls, &e);
		free(rev);
		if (rc < 0)
			return ctlc_fail(c, "cannot use the SVID: %s", err_str(&e, msg, sizeof(msg)));
	}
	if (!json_is_object(policy)) {
		if (!c->warned_no_policy)
			log_warn("control holds no policy for %s: every inbound connection is denied "
			         "until one is applied", c->cfg->service);
		c->warned_no_policy = true;
		policy = deny = json_pack("{s:s, s:s, s:[]}", "service", c->cfg->service,
		                          "default", "deny", "rules");
	} else {
		c->warned_no_policy = false;
	}
	src.policy = policy ? policy_parse(policy, &e) : NULL;
	json_decref(deny);
	if (!src.policy) {
		snapshot_source_free(&src);
		return ctlc_fail(c, "the policy from control is unusable: %s", err_str(&e, msg, sizeof(msg)));
	}
	if (build_registry(eps, &src, &n_eps) < 0 || build_traffic(traffic, &src) < 0) {
		snapshot_source_free(&src);
		return ctlc_fail(c, "out of memory");
	}
	if (c->host.install(c->host.ctx, &src, &e) < 0)
		return ctlc_fail(c, "cannot install the config from control: %s",
		                 err_str(&e, msg, sizeof(msg)));
	c->tls_dirty = false;
	c->installed = true;
	log_info("installed config version %lld: policy v%lld, bundle v%lld, %zu endpoints, "
	         "%zu traffic documents", (long long)version, (long long)policy_version,
	         (long long)c->st.bundle_version, n_eps, json_object_size(traffic));
	return 0;
}

/* Installs what we hold (after a renewal or a new bundle), and caches it. */
int ctlc_install_current(struct ctlclient *c)
{
	if (ctlc_install(c, c->st.policy, c->st.policy_version, c->st.endpoints, c->st.traffic,
	                 c->st.version) < 0)
		return -1;
	if (ctlc_save_state(c) < 0)
		log_warn("cannot cache the state: %s", c->why);
	return 0;
}

/* A config answer: applies what changed. */
static int apply_config(struct ctlclient *c, const json_t *doc)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct api_config_resp a;
	int64_t version, pver, bver, gen;
	json_t *policy, *eps, *traffic;
	bool changed;

	if (api_parse_config_resp(doc, &a, &e) < 0)
		return ctlc_fail(c, "malformed config answer: %s%s%s", e.path, e.path[0] ? ": " : "",
		                 e.message);
	version = a.version;
	pver = a.policy_version;
	bver = a.bundle_version;
	gen = a.cert_generation;
	policy = (json_t *)a.policy;
	/* Bundle and certificate first; the loop polls again (at once: same after=). */
	if (bver != c->st.bundle_version) {
		/* Asked for before and still not what GET /v1/bundle gave: do not spin. */
		if (c->bundle_asked == bver)
			return ctlc_fail(c, "control's config names bundle version %lld, its bundle is "
			                 "version %lld", (long long)bver, (long long)c->st.bundle_version);
		c->bundle_asked = bver;
		c->need_bundle = true;
		return 0;
	}
	c->bundle_asked = -1;
	if (c->st.cert_generation < 0) {
		c->st.cert_generation = gen;
	} else if (gen != c->st.cert_generation) {
		c->need_renew = true;
		c->pending_generation = gen;
		/* While control refuses the renewal, apply the rest (and wait on
		 * this version) instead of asking again at once. */
		if (!c->renew_failing)
			return 0;
	}
	eps = ctlc_relevant_endpoints(c->cfg, a.endpoints);
	traffic = ctlc_relevant_traffic(c->cfg, a.traffic);
	if (!eps || !traffic) {
		json_decref(eps);
		json_decref(traffic);
		return ctlc_fail(c, "out of memory");
	}
	changed = !c->installed || c->tls_dirty || pver != c->st.policy_version ||
	          !c->st.policy || !json_equal(policy, c->st.policy) ||
	          !c->st.endpoints || !json_equal(eps, c->st.endpoints) ||
	          !json_equal(traffic, c->st.traffic);
	if (changed && ctlc_install(c, policy, pver, eps, traffic, version) < 0) {
		json_decref(eps);
		json_decref(traffic);
		return -1;
	}
	c->st.version = version;
	if (changed) {
		json_decref(c->st.policy);
		c->st.policy = json_incref(policy);
		c->st.policy_version = pver;
		json_decref(c->st.endpoints);
		c->st.endpoints = eps;
		json_decref(c->st.traffic);
		c->st.traffic = traffic;
		if (ctlc_save_state(c) < 0)
			log_warn("cannot cache the state: %s", c->why);
	} else {
		json_decref(eps);
		json_decref(traffic);
	}
	return 0;
}

/*
 * "&upstreams=..." for the config poll: the services our outbound
 * listeners call, whose traffic documents we apply and whose endpoints we
 * take from control where the config names none (ctlc_relevant_endpoints
 * keeps only those); "*" in transparent mode (any destination may be one),
 * nothing when there are none. Control answers no more than that.
 */
static void upstreams_param(const struct config *cfg, char *out, size_t len)
{
	size_t n = 0, used;

	out[0] = '\0';
	if (cfg->has_transparent) {
		snprintf(out, len, "&upstreams=*");
		return;
	}
	for (size_t i = 0; i < cfg->n_outbound; i++) {
		const char *svc = cfg->outbound[i].service;
		bool dup = false;

		for (size_t j = 0; j < i && !dup; j++)
			dup = strcmp(cfg->outbound[j].service, svc) == 0;
		if (dup)
			continue;
		used = strlen(out);
		snprintf(out + used, len - used, "%s%s", n++ ? "," : "&upstreams=", svc);
	}
}

/* "&degraded=..." for the config poll: what control's view of this proxy
 * should say (a refused renewal, an SVID close to expiry); "" when fine. */
static void degraded_param(const struct ctlclient *c, time_t now, char *out, size_t len)
{
	unsigned flags = 0;
	char names[48];

	if (c->renew_failing)
		flags |= API_DEGRADED_RENEWAL;
	if (c->st.not_after - now < API_CERT_WARN_S)
		flags |= API_DEGRADED_EXPIRY;
	api_degraded_format(flags, names, sizeof(names));
	snprintf(out, len, "%s%s", names[0] ? "&degraded=" : "", names);
}

/* "Meshlet-Stats: <summary>" into *out (malloc'd; NULL without a summary,
 * which ends the header list). 0, or -1 (no memory). A summary lost with
 * a failed poll is not sent again: the dashboard shows rates. */
static int stats_header(const char *stats, char **out)
{
	size_t n;

	*out = NULL;
	if (!stats)
		return 0;
	n = strlen(API_STATS_HEADER) + 2 + strlen(stats) + 1;
	*out = malloc(n);
	if (!*out)
		return -1;
	snprintf(*out, n, "%s: %s", API_STATS_HEADER, stats);
	return 0;
}

int ctlc_poll_config(struct ctlclient *c)
{
	struct httpc_response r;
	struct httpc *h = ctlc_mtls(c);
	/* 64 listeners of 63-character names, and the rest. */
	char path[CONFIG_MAX_LISTENERS * (SERVICE_NAME_MAX + 1) + 256], ups[sizeof(path) - 200];
	time_t now = time(NULL);
	long long wait = CTL_POLL_WAIT_S, until_renewal = (long long)(c->renew_at - now);
	char *stats, *header = NULL, degraded[64];
	int rc;

	if (!h)
		return -1;
	if (c->renew_failing)
		until_renewal = (long long)(c->renew_retry_at - now);
	if (until_renewal < wait)
		wait = until_renewal < 1 ? 1 : until_renewal;
	/* A quick answer first: it shows control is reachable (status, gauge). */
	if (!c->installed || c->reconnecting)
		wait = 0;
	ctlc_poll_begin(c);        /* before taking the summary: news after it nudges */
	stats = c->host.stats ? c->host.stats(c->host.ctx) : NULL;
	if (stats && wait > CTL_STATS_WAIT_S)
		wait = CTL_STATS_WAIT_S;   /* traffic flows: report again soon */
	if (c->after_nudge && wait > CTL_NUDGE_WAIT_S)
		wait = CTL_NUDGE_WAIT_S;
	upstreams_param(c->cfg, ups, sizeof(ups));
	degraded_param(c, now, degraded, sizeof(degraded));
	snprintf(path, sizeof(path), "/v1/services/%s/config?after=%lld&wait=%lld%s%s",
	         c->cfg->service, (long long)(c->installed ? c->st.version : 0), wait, ups, degraded);
	rc = stats_header(stats, &header);
	free(stats);
	if (rc < 0) {
		ctlc_poll_end(c, h);
		return ctlc_fail(c, "out of memory");
	}
	rc = ctlc_call_with(c, h, "watching the config", "GET", path, NULL,
	                    (const char *const[]){ header, NULL },
	                    (int)(wait * 1000 + CTL_CALL_TIMEOUT_MS), &r);
	free(header);
	c->after_nudge = ctlc_poll_end(c, h);
	if (rc != 0 && c->after_nudge && rc == HTTPC_ECANCELED)
		return 0;          /* news to report: poll again at once */
	if (rc != 0)
		return -1;
	c->reconnecting = false;
	rc = apply_config(c, r.json);
	httpc_response_clear(&r);
	return rc;
}
