/* snapshot: immutable, reference-counted run-time configuration. */
#include "snapshot.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <netinet/in.h>

#include <openssl/rand.h>

/* The documents of file (none when NULL) into src->traffic; errors name
 * the file as the policy's do. */
static int traffic_from_file(const char *file, struct snapshot_source *src,
                             struct meshlet_err *err)
{
	char msg[sizeof(err->message)];
	struct traffic **set = NULL;
	size_t n = 0;

	if (!file)
		return 0;
	if (traffic_load_set(file, &set, &n, err) < 0) {
		snprintf(msg, sizeof(msg), "%s", err->message);
		if (!strstr(msg, file))
			snprintf(err->message, sizeof(err->message), "%.*s (in %s)", 160, msg, file);
		return -EINVAL;
	}
	src->traffic = calloc(n ? n : 1, sizeof(*src->traffic));
	if (!src->traffic) {
		traffic_set_free(set, n);
		return err_set(err, "", "out of memory");
	}
	for (size_t i = 0; i < n; i++)
		src->traffic[i].t = set[i];
	src->n_traffic = n;
	free(set);
	return 0;
}

int snapshot_source_from_files(const struct config *cfg, struct snapshot_source *src,
                               struct meshlet_err *err)
{
	char msg[sizeof(err->message)];

	if (tls_material_load(cfg->tls_cert, cfg->tls_key, cfg->tls_bundle, cfg->trust_domain,
	                      &src->tls, err) < 0) {
		char path[MESHLET_PATH_MAX];

		/* Name the config field: "cert" -> "tls.cert". */
		json_path_key(path, sizeof(path), "tls", err->path[0] ? err->path : "cert");
		snprintf(err->path, sizeof(err->path), "%s", path);
		return -EINVAL;
	}
	src->policy = policy_load(cfg->policy_file, err);
	if (!src->policy) {
		/* "rules[1].ports[0]: must be 1..65535 (in /etc/meshlet/policy.json)" */
		snprintf(msg, sizeof(msg), "%s", err->message);
		if (!strstr(msg, cfg->policy_file))
			snprintf(err->message, sizeof(err->message), "%.*s (in %s)", 160, msg,
			         cfg->policy_file);
		return -EINVAL;
	}
	return traffic_from_file(cfg->traffic_file, src, err);
}

static void free_traffic(struct snapshot_traffic *t, size_t n)
{
	for (size_t i = 0; i < n; i++)
		traffic_free(t[i].t);
	free(t);
}

void snapshot_source_free(struct snapshot_source *src)
{
	tls_material_free(src->tls);
	policy_free(src->policy);
	free_traffic(src->traffic, src->n_traffic);
	for (size_t i = 0; i < src->n_registry; i++) {
		free(src->registry[i].addrs);
		free(src->registry[i].app_ports);
	}
	free(src->registry);
	memset(src, 0, sizeof(*src));
}

static struct tls_options tls_options_of(const struct config *c)
{
	return (struct tls_options){
		.trust_domain = c->trust_domain,
		.min_version = c->tls_min_version,
		.groups = c->tls_groups,
	};
}

static int build_tls(struct snapshot *s, const struct tls_material *m, struct meshlet_err *err)
{
	const struct config *c = s->cfg;
	struct tls_options o = tls_options_of(c);

	if (strcmp(m->id->service, c->service) != 0)
		return err_set(err, "tls.cert", "certificate is for %s, not for service %s",
		               m->id->uri, c->service);
	if (tls_material_digest(m, &o, s->tls_digest) < 0)
		return err_set(err, "", "out of memory");
	snprintf(s->self_id, sizeof(s->self_id), "%s", m->id->uri);
	s->cert_not_after = m->not_after;
	s->server_ctx = tls_server_ctx(m, &o, err);
	s->client_ctx = s->server_ctx ? tls_client_ctx(m, &o, err) : NULL;
	return s->client_ctx ? 0 : -EINVAL;
}

static int collect_policy_headers(struct snapshot *s)
{
	const struct policy *p = s->policy;
	size_t total = 0;

	for (size_t i = 0; i < p->n_rules; i++)
		total += p->rules[i].n_headers;
	s->policy_headers = calloc(total ? total : 1, sizeof(char *));
	if (!s->policy_headers)
		return -ENOMEM;
	for (size_t i = 0; i < p->n_rules; i++) {
		for (size_t j = 0; j < p->rules[i].n_headers; j++) {
			const char *name = p->rules[i].headers[j].name;
			size_t k = 0;

			while (k < s->n_policy_headers && strcmp(s->policy_headers[k], name) != 0)
				k++;
			if (k == s->n_policy_headers)
				s->policy_headers[s->n_policy_headers++] = name;
		}
	}
	return 0;
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

/* Same certificate and bundle as before: the same contexts, tickets and all. */
static int share_tls(struct snapshot *s, const struct snapshot *from)
{
	if (!SSL_CTX_up_ref(from->server_ctx))
		return -ENOMEM;
	if (!SSL_CTX_up_ref(from->client_ctx)) {
		SSL_CTX_free(from->server_ctx);
		return -ENOMEM;
	}
	s->server_ctx = from->server_ctx;
	s->client_ctx = from->client_ctx;
	memcpy(s->tls_digest, from->tls_digest, sizeof(s->tls_digest));
	snprintf(s->self_id, sizeof(s->self_id), "%s", from->self_id);
	s->cert_not_after = from->cert_not_after;
	return 0;
}

/*
 * True when m and s's options would build the very contexts `from` has: a
 * reload that changed only the policy (or endpoints) keeps them, and with
 * them every session ticket the server side issued and the sessions the
 * client side cached. Rebuilding would make every peer handshake afresh.
 */
static bool unchanged_tls(const struct snapshot *s, const struct tls_material *m,
                          const struct snapshot *from)
{
	struct tls_options o = tls_options_of(s->cfg);
	unsigned char digest[TLS_DIGEST_LEN];

	return from && strcmp(from->cfg->service, s->cfg->service) == 0 &&
	       tls_material_digest(m, &o, digest) == 0 &&
	       memcmp(digest, from->tls_digest, sizeof(digest)) == 0;
}

/* The config's endpoints, else the registry's for that service (may be none). */
static int copy_endpoints(struct snapshot_outbound *o, const struct config_outbound *co,
                          const struct snapshot_source *src)
{
	const struct config_addr *from = co->endpoints;
	size_t n = co->n_endpoints;

	for (size_t i = 0; n == 0 && i < src->n_registry; i++) {
		if (strcmp(src->registry[i].service, co->service) == 0) {
			from = src->registry[i].addrs;
			n = src->registry[i].n_addrs;
		}
	}
	if (n == 0)
		return 0;
	o->endpoints = malloc(n * sizeof(*o->endpoints));
	if (!o->endpoints)
		return -ENOMEM;
	memcpy(o->endpoints, from, n * sizeof(*o->endpoints));
	o->n_endpoints = n;
	return 0;
}

static int build_outbound(struct snapshot *s, const struct snapshot_source *src,
                          struct meshlet_err *err)
{
	const struct config *c = s->cfg;

	s->outbound = calloc(c->n_outbound ? c->n_outbound : 1, sizeof(*s->outbound));
	if (!s->outbound)
		return err_set(err, "", "out of memory");
	for (size_t i = 0; i < c->n_outbound; i++) {
		struct snapshot_outbound *o = &s->outbound[i];
		size_t slots;

		if (identity_format(o->expect_id, sizeof(o->expect_id), c->trust_domain,
		                    c->outbound[i].service) < 0)
			return err_set(err, "outbound", "cannot form the upstream's SPIFFE ID");
		if (copy_endpoints(o, &c->outbound[i], src) < 0)
			return err_set(err, "", "out of memory");
		slots = o->n_endpoints * (size_t)c->workers;
		o->sessions = calloc(slots ? slots : 1, sizeof(*o->sessions));
		if (!o->sessions)
			return err_set(err, "", "out of memory");
	}
	return 0;
}

static void free_inbound_traffic(struct snapshot_inbound_traffic *it)
{
	if (!it)
		return;
	traffic_limiter_free(it->limiter);
	free(it->limited);
	free(it->faulted);
	free(it);
}

/* s->in_traffic from the service's own document, when it has rate limits
 * or faults; its buckets carry on from prev's (the snapshot it replaces,
 * or NULL) where a limit did not change. Returns 0 or -ENOMEM. */
static int build_inbound_traffic(struct snapshot *s, const struct snapshot *prev,
                                 struct metrics *m)
{
	const struct snapshot_traffic *own = snapshot_traffic(s, s->cfg->service);
	const struct traffic *t = own ? own->t : NULL;
	struct snapshot_inbound_traffic *it;

	if (!t || (t->n_rate_limits == 0 && t->n_faults == 0))
		return 0;
	it = calloc(1, sizeof(*it));
	if (!it)
		return -ENOMEM;
	it->t = t;
	it->limiter = traffic_limiter_new(t);
	if (it->limiter && prev && prev->in_traffic && strcmp(prev->cfg->service, s->cfg->service) == 0)
		traffic_limiter_inherit(it->limiter, prev->in_traffic->limiter);
	it->limited = calloc(t->n_rate_limits + 1, sizeof(*it->limited));
	it->faulted = calloc(t->n_faults + 1, sizeof(*it->faulted));
	s->in_traffic = it;
	if (!it->limiter || !it->limited || !it->faulted)
		return -ENOMEM;
	for (size_t i = 0; i < t->n_rate_limits; i++)
		it->limited[i] = metrics_labeled(m, MF_RATE_LIMITED, t->rate_limits[i].sel.name);
	for (size_t i = 0; i < t->n_faults; i++)
		it->faulted[i] = metrics_labeled(m, MF_FAULTS, t->faults[i].sel.name);
	return 0;
}

static uint64_t random_u64(void *arg)
{
	uint64_t v = 0;

	(void)arg;
	/* OpenSSL's DRBG: no generator state of our own to share between workers. */
	if (RAND_bytes((unsigned char *)&v, sizeof(v)) != 1)
		v = 0;
	return v;
}

static void count(struct metrics_labeled *l)
{
	if (l)
		metrics_inc(&l->count);
}

void snapshot_traffic_inbound(const struct snapshot *s, const struct policy_request *req,
                              struct snapshot_traffic_verdict *v)
{
	struct snapshot_inbound_traffic *it = s->in_traffic;
	const struct traffic_rate_limit *rl;
	struct traffic_fault_decision d;
	struct timespec now;
	int64_t wait = 0;

	memset(v, 0, sizeof(*v));
	if (!it)
		return;
	clock_gettime(CLOCK_MONOTONIC, &now);
	rl = traffic_limiter_admit(it->limiter, req,
	                           (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000, &wait);
	if (rl) {
		count(it->limited[rl - it->t->rate_limits]);
		v->status = 429;
		v->name = rl->sel.name;
		v->retry_after = traffic_retry_after_s(wait);
		return;
	}
	traffic_fault_decide(it->t, req, random_u64, NULL, &d);
	if (d.delay && d.delay_ms) {
		count(it->faulted[d.delay - it->t->faults]);
		v->delay_ms = d.delay_ms;
		v->delay_name = d.delay->sel.name;
	}
	if (!d.abort)
		return;
	if (d.abort != d.delay || !d.delay_ms)
		count(it->faulted[d.abort - it->t->faults]);
	v->status = d.abort_status;
	v->fault = true;
	v->name = d.abort->sel.name;
}

const char *snapshot_traffic_tcp_fault(const struct snapshot *s, const struct policy_request *req)
{
	const struct snapshot_inbound_traffic *it = s->in_traffic;

	for (size_t i = 0; it && i < it->t->n_faults; i++) {
		const struct traffic_fault *f = &it->t->faults[i];

		if (!f->abort_status || !traffic_fault_selects(f, req) ||
		    !traffic_roll(f->percent, random_u64(NULL)))
			continue;
		count(it->faulted[i]);
		return f->sel.name;
	}
	return NULL;
}

struct snapshot *snapshot_build(struct config *cfg, struct snapshot_source *src,
                                struct metrics *m, uint64_t version, struct meshlet_err *err)
{
	struct snapshot *s = calloc(1, sizeof(*s));

	if (!s) {
		config_free(cfg);
		snapshot_source_free(src);
		err_set(err, "", "out of memory");
		return NULL;
	}
	atomic_init(&s->refs, 1);
	s->version = version;
	s->cfg = cfg;
	s->policy = src->policy;
	src->policy = NULL;
	if (!s->policy || (!src->tls && !src->reuse_tls)) {
		err_set(err, "", "no policy or no certificate to serve with");
		goto fail;
	}
	if (strcmp(s->policy->service, cfg->service) != 0) {
		err_set(err, "service", "the policy is for service %s, not %s", s->policy->service,
		        cfg->service);
		goto fail;
	}
	if (src->tls && unchanged_tls(s, src->tls, src->reuse_tls)) {
		tls_material_free(src->tls);
		src->tls = NULL;
	}
	if (src->tls ? build_tls(s, src->tls, err) < 0 : share_tls(s, src->reuse_tls) < 0)
		goto fail;
	if (build_outbound(s, src, err) < 0)
		goto fail;
	if (build_counters(s, m) < 0 || collect_policy_headers(s) < 0) {
		err_set(err, "", "out of memory");
		goto fail;
	}
	s->registry = src->registry;
	s->n_registry = src->n_registry;
	src->registry = NULL;
	src->n_registry = 0;
	s->traffic = src->traffic;
	s->n_traffic = src->n_traffic;
	src->traffic = NULL;
	src->n_traffic = 0;
	if (build_inbound_traffic(s, src->reuse_tls, m) < 0) {
		err_set(err, "", "out of memory");
		goto fail;
	}
	snapshot_source_free(src);
	return s;
fail:
	snapshot_source_free(src);
	snapshot_unref(s);
	return NULL;
}

struct snapshot *snapshot_ref(struct snapshot *s)
{
	atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
	return s;
}

static void free_outbound(struct snapshot *s)
{
	for (size_t i = 0; s->outbound && i < s->cfg->n_outbound; i++) {
		struct snapshot_outbound *o = &s->outbound[i];
		size_t slots = o->n_endpoints * (size_t)s->cfg->workers;

		for (size_t j = 0; o->sessions && j < slots; j++)
			SSL_SESSION_free(o->sessions[j]);
		free(o->sessions);
		free(o->endpoints);
	}
	free(s->outbound);
}

void snapshot_unref(struct snapshot *s)
{
	if (!s || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
		return;
	free_outbound(s);
	SSL_CTX_free(s->server_ctx);
	SSL_CTX_free(s->client_ctx);
	policy_free(s->policy);
	free(s->rule_counters);
	free(s->policy_headers);
	for (size_t i = 0; i < s->n_registry; i++) {
		free(s->registry[i].addrs);
		free(s->registry[i].app_ports);
	}
	free(s->registry);
	free_inbound_traffic(s->in_traffic);
	free_traffic(s->traffic, s->n_traffic);
	config_free(s->cfg);
	free(s);
}

const struct snapshot_traffic *snapshot_traffic(const struct snapshot *s, const char *service)
{
	for (size_t i = 0; i < s->n_traffic; i++) {
		if (strcmp(s->traffic[i].t->service, service) == 0)
			return &s->traffic[i];
	}
	return NULL;
}

int snapshot_save_session(struct snapshot *s, size_t listener, size_t endpoint, int worker,
                          SSL_SESSION *sess)
{
	SSL_SESSION **slot;

	if (listener >= s->cfg->n_outbound || endpoint >= s->outbound[listener].n_endpoints)
		return -ENOENT;
	slot = &s->outbound[listener].sessions[endpoint * (size_t)s->cfg->workers + (size_t)worker];
	SSL_SESSION_free(*slot);
	*slot = sess;
	return 0;
}

SSL_SESSION *snapshot_session(const struct snapshot *s, size_t listener, size_t endpoint,
                              int worker)
{
	SSL_SESSION *sess;

	if (listener >= s->cfg->n_outbound || endpoint >= s->outbound[listener].n_endpoints)
		return NULL;
	sess = s->outbound[listener].sessions[endpoint * (size_t)s->cfg->workers + (size_t)worker];
	return sess && SSL_SESSION_is_resumable(sess) ? sess : NULL;
}

static bool same_ip(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return false;
	if (a->ss_family == AF_INET)
		return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
		       ((const struct sockaddr_in *)b)->sin_addr.s_addr;
	if (a->ss_family == AF_INET6)
		return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
		              &((const struct sockaddr_in6 *)b)->sin6_addr, 16) == 0;
	return false;
}

static uint16_t port_of(const struct sockaddr_storage *a)
{
	if (a->ss_family == AF_INET)
		return ntohs(((const struct sockaddr_in *)a)->sin_port);
	if (a->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)a)->sin6_port);
	return 0;
}

/* The registry entry (e, i) holds dst: same IP, and dst's port is the
 * inbound address's or one of the application ports behind it. */
static bool entry_holds(const struct snapshot_endpoints *e, size_t i,
                        const struct sockaddr_storage *dst)
{
	uint16_t port = port_of(dst);

	if (!same_ip(&e->addrs[i].ss, dst))
		return false;
	if (port == port_of(&e->addrs[i].ss))
		return true;
	for (size_t k = 0; e->app_ports && k < e->app_ports[i].n; k++) {
		if (e->app_ports[i].port[k] == port)
			return true;
	}
	return false;
}

/* Adds a match of service svc at addr: false when it contradicts an
 * earlier match of another service. */
static bool match(const char **svc, const struct config_addr **inbound, const char *service,
                  const struct config_addr *addr)
{
	if (*svc && strcmp(*svc, service) != 0)
		return false;
	if (!*svc) {
		*svc = service;
		*inbound = addr;
	}
	return true;
}

const char *snapshot_lookup_dest(const struct snapshot *s, const struct sockaddr_storage *dst,
                                 const struct config_addr **inbound, bool *ambiguous)
{
	const char *svc = NULL;

	*ambiguous = false;
	*inbound = NULL;
	for (size_t i = 0; i < s->n_registry; i++) {
		const struct snapshot_endpoints *e = &s->registry[i];

		for (size_t j = 0; j < e->n_addrs; j++) {
			if (entry_holds(e, j, dst) && !match(&svc, inbound, e->service, &e->addrs[j]))
				goto ambiguous;
		}
	}
	for (size_t i = 0; i < s->cfg->n_outbound; i++) {
		const struct config_outbound *co = &s->cfg->outbound[i];

		for (size_t j = 0; j < co->n_endpoints; j++) {
			const struct config_addr *a = &co->endpoints[j];

			if (same_ip(&a->ss, dst) && port_of(&a->ss) == port_of(dst) &&
			    !match(&svc, inbound, co->service, a))
				goto ambiguous;
		}
	}
	return svc;
ambiguous:
	*ambiguous = true;
	*inbound = NULL;
	return NULL;
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

static SSL_SESSION **session_slot(struct snapshot *s, size_t listener, size_t endpoint, int worker)
{
	return &s->outbound[listener].sessions[endpoint * (size_t)s->cfg->workers + (size_t)worker];
}

void snapshot_adopt_sessions(struct snapshot *s, struct snapshot *from, int worker)
{
	size_t n;

	if (!from || from == s || from->client_ctx != s->client_ctx ||
	    from->cfg->workers != s->cfg->workers)
		return;
	n = s->cfg->n_outbound < from->cfg->n_outbound ? s->cfg->n_outbound : from->cfg->n_outbound;
	for (size_t i = 0; i < n; i++) {
		const struct snapshot_outbound *to = &s->outbound[i], *old = &from->outbound[i];

		if (strcmp(to->expect_id, old->expect_id) != 0)
			continue;
		for (size_t j = 0; j < to->n_endpoints; j++) {
			SSL_SESSION **dst = session_slot(s, i, j, worker);

			for (size_t k = 0; !*dst && k < old->n_endpoints; k++) {
				SSL_SESSION **src = session_slot(from, i, k, worker);

				if (*src && same_addr(&to->endpoints[j], &old->endpoints[k])) {
					*dst = *src;
					*src = NULL;
				}
			}
		}
	}
}
