/* snapshot: immutable, reference-counted run-time configuration. */
#include "snapshot.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int build_tls(struct snapshot *s, struct meshlet_err *err)
{
	const struct config *c = s->cfg;
	struct tls_material *m = NULL;
	struct tls_options o = {
		.trust_domain = c->trust_domain,
		.min_version = c->tls_min_version,
		.groups = c->tls_groups,
	};

	if (tls_material_load(c->tls_cert, c->tls_key, c->tls_bundle, c->trust_domain, &m, err) < 0)
		return -EINVAL;
	if (strcmp(m->id->service, c->service) != 0) {
		err_set(err, "tls.cert", "certificate is for %s, not for service %s", m->id->uri,
		        c->service);
		goto fail;
	}
	snprintf(s->self_id, sizeof(s->self_id), "%s", m->id->uri);
	s->cert_not_after = m->not_after;
	s->server_ctx = tls_server_ctx(m, &o, err);
	s->client_ctx = s->server_ctx ? tls_client_ctx(m, &o, err) : NULL;
	if (!s->client_ctx)
		goto fail;
	tls_material_free(m);
	return 0;
fail:
	tls_material_free(m);
	return -EINVAL;
}

static int build_counters(struct snapshot *s, struct metrics *m)
{
	const struct policy *p = s->policy;

	s->rule_counters = calloc(p->n_rules ? p->n_rules : 1, sizeof(*s->rule_counters));
	if (!s->rule_counters)
		return -ENOMEM;
	for (size_t i = 0; i < p->n_rules; i++) {
		s->rule_counters[i] = metrics_decision(m, p->rules[i].action == POLICY_ALLOW,
		                                       p->rules[i].name);
		if (!s->rule_counters[i])
			return -ENOMEM;
	}
	s->default_counter = metrics_decision(m, p->default_action == POLICY_ALLOW, "default");
	return s->default_counter ? 0 : -ENOMEM;
}

static int build_outbound(struct snapshot *s, struct meshlet_err *err)
{
	const struct config *c = s->cfg;

	s->outbound = calloc(c->n_outbound ? c->n_outbound : 1, sizeof(*s->outbound));
	if (!s->outbound)
		return err_set(err, "", "out of memory");
	for (size_t i = 0; i < c->n_outbound; i++) {
		struct snapshot_outbound *o = &s->outbound[i];
		size_t slots = c->outbound[i].n_endpoints * (size_t)c->workers;

		if (identity_format(o->expect_id, sizeof(o->expect_id), c->trust_domain,
		                    c->outbound[i].service) < 0)
			return err_set(err, "outbound", "cannot form the upstream's SPIFFE ID");
		o->sessions = calloc(slots ? slots : 1, sizeof(*o->sessions));
		if (!o->sessions)
			return err_set(err, "", "out of memory");
	}
	return 0;
}

struct snapshot *snapshot_build(struct config *cfg, struct metrics *m, uint64_t version,
                                struct meshlet_err *err)
{
	struct snapshot *s = calloc(1, sizeof(*s));

	if (!s) {
		config_free(cfg);
		err_set(err, "", "out of memory");
		return NULL;
	}
	atomic_init(&s->refs, 1);
	s->version = version;
	s->cfg = cfg;
	if (!cfg->has_tls) {
		err_set(err, "control", "control mode is not available in this build yet; "
		        "use tls + policy_file");
		goto fail;
	}
	s->policy = policy_load(cfg->policy_file, err);
	if (!s->policy) {
		char msg[sizeof(err->message)];

		snprintf(msg, sizeof(msg), "%s", err->message);
		err_set(err, err->path, "%s: %s", cfg->policy_file, msg);
		goto fail;
	}
	if (strcmp(s->policy->service, cfg->service) != 0) {
		err_set(err, "service", "policy %s is for service %s, not %s", cfg->policy_file,
		        s->policy->service, cfg->service);
		goto fail;
	}
	if (build_tls(s, err) < 0 || build_outbound(s, err) < 0)
		goto fail;
	if (build_counters(s, m) < 0) {
		err_set(err, "", "out of memory");
		goto fail;
	}
	return s;
fail:
	snapshot_unref(s);
	return NULL;
}

struct snapshot *snapshot_ref(struct snapshot *s)
{
	atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
	return s;
}

static void free_sessions(struct snapshot *s)
{
	for (size_t i = 0; s->outbound && i < s->cfg->n_outbound; i++) {
		size_t slots = s->cfg->outbound[i].n_endpoints * (size_t)s->cfg->workers;

		for (size_t j = 0; s->outbound[i].sessions && j < slots; j++)
			SSL_SESSION_free(s->outbound[i].sessions[j]);
		free(s->outbound[i].sessions);
	}
	free(s->outbound);
}

void snapshot_unref(struct snapshot *s)
{
	if (!s || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
		return;
	free_sessions(s);
	SSL_CTX_free(s->server_ctx);
	SSL_CTX_free(s->client_ctx);
	policy_free(s->policy);
	free(s->rule_counters);
	config_free(s->cfg);
	free(s);
}

void snapshot_save_session(struct snapshot *s, size_t listener, size_t endpoint, int worker,
                           SSL_SESSION *sess)
{
	SSL_SESSION **slot;

	if (listener >= s->cfg->n_outbound || endpoint >= s->cfg->outbound[listener].n_endpoints)
		return;
	slot = &s->outbound[listener].sessions[endpoint * (size_t)s->cfg->workers + (size_t)worker];
	SSL_SESSION_free(*slot);
	*slot = sess;
}

SSL_SESSION *snapshot_session(const struct snapshot *s, size_t listener, size_t endpoint,
                              int worker)
{
	SSL_SESSION *sess;

	if (listener >= s->cfg->n_outbound || endpoint >= s->cfg->outbound[listener].n_endpoints)
		return NULL;
	sess = s->outbound[listener].sessions[endpoint * (size_t)s->cfg->workers + (size_t)worker];
	return sess && SSL_SESSION_is_resumable(sess) ? sess : NULL;
}

struct metrics_decision *snapshot_decision_counter(const struct snapshot *s,
                                                   const struct policy_decision *d)
{
	return d->rule ? s->rule_counters[d->rule_index] : s->default_counter;
}

static bool same_addr(const struct config_addr *a, const struct config_addr *b)
{
	return a->len == b->len && memcmp(&a->ss, &b->ss, a->len) == 0;
}

int snapshot_check_reloadable(const struct config *old, const struct config *n,
                              struct meshlet_err *err)
{
	if (n->n_inbound != old->n_inbound || n->n_outbound != old->n_outbound)
		return err_set(err, "", "the number of listeners changed: restart to apply");
	for (size_t i = 0; i < n->n_inbound; i++)
		if (!same_addr(&n->inbound[i].listen, &old->inbound[i].listen) ||
		    n->inbound[i].protocol != old->inbound[i].protocol)
			return err_set(err, "inbound", "listen address or protocol changed: restart to apply");
	for (size_t i = 0; i < n->n_outbound; i++)
		if (!same_addr(&n->outbound[i].listen, &old->outbound[i].listen) ||
		    n->outbound[i].protocol != old->outbound[i].protocol)
			return err_set(err, "outbound", "listen address or protocol changed: restart to apply");
	if (!same_addr(&n->admin_listen, &old->admin_listen))
		return err_set(err, "admin.listen", "changed: restart to apply");
	if (n->workers != old->workers)
		return err_set(err, "workers", "changed: restart to apply");
	if (n->has_transparent != old->has_transparent)
		return err_set(err, "transparent", "changed: restart to apply");
	return 0;
}
