/*
 * state_config: what a proxy fetches: the trust bundle, and its service's
 * config (policy, endpoints, traffic documents, versions); see state.h for how the config
 * version is made.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tally.h"

json_t *state_bundle(struct control_state *st)
{
	json_t *revoked = json_array();

	for (size_t i = 0; i < st->n_revoked; i++)
		json_array_append_new(revoked, json_string(st->revoked[i]));
	return json_pack("{s:s, s:o, s:o, s:I}", "trust_domain", st->td,
	                 "roots", state_roots_pem(st), "revoked", revoked,
	                 "version", (json_int_t)counter_value(st, "meta/bundle", "version"));
}

/* key's revision: with cached, as the store's follower knows it when it
 * can tell (no round trip), else read from the store. */
static int version_rev(struct control_state *st, const char *key, bool cached, int64_t *rev)
{
	return cached ? kv_rev_followed(st, key, rev) : kv_rev(st, key, rev);
}

static int version_shared(struct control_state *st, bool cached, int64_t *version)
{
	static const char *const shared[] = {"meta/bundle", "meta/endpoints", "meta/rotate-all",
	                                     "meta/traffic"};
	int64_t v = 0, rev;

	for (size_t i = 0; i < sizeof(shared) / sizeof(shared[0]); i++) {
		if (version_rev(st, shared[i], cached, &rev) < 0)
			return -EIO;
		if (rev > v)
			v = rev;
	}
	*version = v;
	return 0;
}

static int version_own(struct control_state *st, const char *svc, bool cached,
                       int64_t *version)
{
	char key[STORE_KEY_MAX];

	state_key(key, sizeof(key), "services/", svc);
	return version_rev(st, key, cached, version);
}

int state_config_version_shared(struct control_state *st, int64_t *version)
{
	return version_shared(st, false, version);
}

int state_config_version_own(struct control_state *st, const char *svc, int64_t *version)
{
	return version_own(st, svc, false, version);
}

int state_watch_version_shared(struct control_state *st, int64_t *version)
{
	return version_shared(st, true, version);
}

int state_watch_version_own(struct control_state *st, const char *svc, int64_t *version)
{
	return version_own(st, svc, true, version);
}

int state_config_version(struct control_state *st, const char *svc, int64_t *version)
{
	int64_t shared = 0, own = 0;

	if (state_config_version_shared(st, &shared) < 0 ||
	    state_config_version_own(st, svc, &own) < 0)
		return -EIO;
	*version = shared > own ? shared : own;
	return 0;
}

int state_watch_version(struct control_state *st, const char *svc, int64_t *version)
{
	int64_t shared = 0, own = 0;

	if (version_shared(st, true, &shared) < 0 || version_own(st, svc, true, &own) < 0)
		return -EIO;
	*version = shared > own ? shared : own;
	return 0;
}

/* ---- config answers kept for reuse ----
 *
 * A config answer is a function of the service, the services its query
 * asks for and the config version (which moves with every write that
 * changes the answer), except for endpoints that stop being live as their
 * SVID expires (an answer is kept at most CONFIG_CACHE_MAX_AGE_MS) and
 * registrations whose version bump is coalesced (none is reused while one
 * made here waits for its bump; one made on another replica shows with
 * its bump, within CONTROL_ENDPOINTS_COALESCE_MS). Its
 * version is checked against the one the store's follower knows (no round
 * trip on etcd), so a long poll that times out, or one woken with many
 * others, is answered without reading the store again. Direct-mapped:
 * a slot per hash, a collision replaces the older answer. */
#define CONFIG_CACHE_SLOTS 1024
#define CONFIG_CACHE_MAX_AGE_MS 10000

struct config_cached {
	char *key;                     /* service "\n" what the query asks for; NULL: empty */
	int64_t version;               /* of answer */
	int64_t built_ms;              /* state_mono_ms() */
	json_t *answer;
};

/* "svc\n*" (every service) or "svc\na,b,..." (the upstreams as asked). */
static char *config_key(const char *svc, const struct api_config_query *q)
{
	size_t len = strlen(svc) + 3;
	char *k, *p;

	for (size_t i = 0; i < q->n_upstreams; i++)
		len += strlen(q->upstreams[i]) + 1;
	k = malloc(len);
	if (!k)
		return NULL;
	p = k + sprintf(k, "%s\n%s", svc, q->upstreams_all ? "*" : "");
	for (size_t i = 0; !q->upstreams_all && i < q->n_upstreams; i++)
		p += sprintf(p, "%s%s", i ? "," : "", q->upstreams[i]);
	return k;
}

static struct config_cached *config_slot(struct control_state *st, const char *key)
{
	if (!st->config_cache)
		st->config_cache = calloc(CONFIG_CACHE_SLOTS, sizeof(*st->config_cache));
	if (!st->config_cache)
		return NULL;
	return &st->config_cache[tally_hash(key) & (CONFIG_CACHE_SLOTS - 1)];
}

static void config_slot_clear(struct config_cached *c)
{
	free(c->key);
	json_decref(c->answer);
	memset(c, 0, sizeof(*c));
}

void state_config_cache_free(struct control_state *st)
{
	for (size_t i = 0; st->config_cache && i < CONFIG_CACHE_SLOTS; i++)
		config_slot_clear(&st->config_cache[i]);
	free(st->config_cache);
	st->config_cache = NULL;
}

/* The kept answer for key, if it is the current version (as the follower
 * knows it) and not behind the proxy's: a new reference, or NULL. */
static json_t *config_cached_answer(struct control_state *st, const struct config_cached *c,
                                    const char *key, const char *svc, int64_t after)
{
	int64_t now;

	/* A registration not yet in the version (its bump is coalesced,
	 * state_registry.c) changes answers without moving it: build. */
	if (!c || !c->key || st->endpoints_pending || strcmp(c->key, key) != 0 ||
	    c->version < after ||
	    state_watch_version(st, svc, &now) < 0 || now != c->version ||
	    state_mono_ms() - c->built_ms > CONFIG_CACHE_MAX_AGE_MS)
		return NULL;
	return json_incref(c->answer);
}

static int config_build(struct control_state *st, const char *svc,
                        const struct api_config_query *q, json_t **out, struct state_error *se);

int state_config(struct control_state *st, const char *svc, const struct api_config_query *q,
                 json_t **out, struct state_error *se)
{
	char *key = config_key(svc, q);
	struct config_cached *c = key ? config_slot(st, key) : NULL;
	int r;

	*out = c ? config_cached_answer(st, c, key, svc, q->after) : NULL;
	if (*out) {
		free(key);
		return 0;
	}
	r = config_build(st, svc, q, out, se);
	if (r || !c) {
		free(key);
		return r;
	}
	config_slot_clear(c);
	c->key = key;
	c->version = (int64_t)json_integer_value(json_object_get(*out, "version"));
	c->built_ms = state_mono_ms();
	c->answer = json_incref(*out);
	return 0;
}

/* The answer, read from the store. */
static int config_build(struct control_state *st, const char *svc,
                        const struct api_config_query *q, json_t **out, struct state_error *se)
{
	char key[STORE_KEY_MAX];
	json_t *policy = NULL, *eps = NULL, *traffic = NULL;
	int64_t version = 0, pver = 0, gen, bver;
	uint64_t misses = st->store_misses;
	int r;

	/* The version first, then what it versions: the answer is never older
	 * than its version says. The follower's version saves five round
	 * trips on etcd; the store's when the proxy holds a later one. */
	if (state_watch_version(st, svc, &version) < 0 ||
	    (version < q->after && state_config_version(st, svc, &version) < 0))
		return state_store_failed(st, se, "read", -EIO);
	state_key(key, sizeof(key), "policies/", svc);
	r = kv_json(st, key, &policy, &pver);
	if (r == -EIO)
		return state_store_failed(st, se, "read", r);
	state_key(key, sizeof(key), "services/", svc);
	gen = counter_value(st, key, "cert_generation") +
	      counter_value(st, "meta/rotate-all", "cert_generation");
	r = state_endpoints_json(st, q, &eps);
	if (!r && (r = state_traffic_config(st, svc, q, &traffic)) < 0)
		json_decref(eps);
	if (r) {
		json_decref(policy);
		return state_store_failed(st, se, "list", r);
	}
	bver = counter_value(st, "meta/bundle", "version");
	if (st->store_misses != misses) {
		/* A counter read failed on the way (read as 0): no half answer. */
		json_decref(policy);
		json_decref(eps);
		json_decref(traffic);
		return state_store_failed(st, se, "read", -EAGAIN);
	}
	*out = json_pack("{s:s, s:I, s:o?, s:I, s:I, s:I, s:o, s:o}", "service", svc,
	                 "version", (json_int_t)version, "policy", policy ? policy : json_null(),
	                 "policy_version", (json_int_t)pver,
	                 "bundle_version", (json_int_t)bver,
	                 "cert_generation", (json_int_t)gen, "endpoints", eps,
	                 "traffic", traffic);
	return 0;
}
