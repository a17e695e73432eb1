/*
 * state_registry: the endpoints registry and the admin's assignments.
 *
 * An entry endpoints/<svc>/<addr> claims, on the IP of <addr>, the port of
 * <addr> (the inbound listener) and its application ports (what
 * transparent sidecars map to <svc>). Entries of different services never
 * claim a common ip:port while both are live, so that a destination maps
 * to one service or to none. Changes move every config version through
 * meta/endpoints, bumped at most once per CONTROL_ENDPOINTS_COALESCE_MS.
 */
#include "state-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- entries ---- */

/* The <svc> of an endpoints/<svc>/<addr> key into name (SERVICE_NAME_MAX + 1). */
static bool endpoint_key_service(const char *key, char *name)
{
	const char *svc = key + strlen("endpoints/");
	const char *slash = strchr(svc, '/');

	if (!slash || slash == svc || (size_t)(slash - svc) > SERVICE_NAME_MAX)
		return false;
	memcpy(name, svc, (size_t)(slash - svc));
	name[slash - svc] = '\0';
	return true;
}

/* Its SVID is unexpired and unrevoked. */
static bool endpoint_live(struct control_state *st, const json_t *v, int64_t now)
{
	return jint(v, "not_after") > now && !state_is_revoked(st, jstr(v, "serial"));
}

/* port is the entry's address port or one of its application ports. */
static bool entry_claims_port(const json_t *v, uint16_t addr_port, uint16_t port)
{
	size_t i;
	json_t *p;

	if (port == addr_port)
		return true;
	json_array_foreach(json_object_get(v, "ports"), i, p) {
		if (json_integer_value(p) == port)
			return true;
	}
	return false;
}

/* The entry v and address a with its application ports claim a common ip:port. */
static bool claims_overlap(const json_t *v, const struct api_addr *a, const uint16_t *ports,
                           size_t n_ports)
{
	struct api_addr b;

	if (api_addr_parse(jstr(v, "address"), false, &b) < 0 || !api_addr_same_ip(a, &b))
		return false;
	if (entry_claims_port(v, b.port, a->port))
		return true;
	for (size_t i = 0; i < n_ports; i++) {
		if (entry_claims_port(v, b.port, ports[i]))
			return true;
	}
	return false;
}

/* What a registration finds in the registry. */
struct reg_scan {
	json_t *cur;                   /* the entry at the same key, or NULL */
	int64_t cur_rev;
	bool cur_live;
	size_t n_service;              /* live entries of svc, cur excluded */
	size_t n_instance;             /* live entries of the serial, cur excluded */
	char holder[SERVICE_NAME_MAX + 1];   /* a live other service claiming the same */
	char held[API_ADDRESS_MAX];          /* its address */
};

/* Fills sc (emptied first) from the entries; 0 or -errno. */
static int registry_scan(struct control_state *st, const char *svc, const char *serial,
                         const char *key, const struct api_addr *a, const uint16_t *ports,
                         size_t n_ports, struct reg_scan *sc)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = state_now();
	int r = store_list(st->store, "endpoints/", &e, &n, NULL);

	memset(sc, 0, sizeof(*sc));
	if (r)
		return r;
	for (size_t i = 0; i < n; i++) {
		char name[SERVICE_NAME_MAX + 1];
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		bool live = v && endpoint_live(st, v, now);

		if (!v || !endpoint_key_service(e[i].key, name)) {
			json_decref(v);
			continue;
		}
		if (strcmp(e[i].key, key) == 0) {
			sc->cur = v;
			sc->cur_rev = e[i].revision;
			sc->cur_live = live;
			continue;
		}
		if (live && strcmp(name, svc) == 0) {
			sc->n_service++;
			if (strcmp(jstr(v, "serial"), serial) == 0)
				sc->n_instance++;
		} else if (live && !sc->holder[0] && claims_overlap(v, a, ports, n_ports)) {
			snprintf(sc->holder, sizeof(sc->holder), "%s", name);
			snprintf(sc->held, sizeof(sc->held), "%s", jstr(v, "address"));
		}
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* Another service's admin assignment on a claimed ip:port: its name into
 * holder/held. Returns 0 or -EIO. */
static int assignment_conflict(struct control_state *st, const char *svc,
                               const struct api_addr *a, const uint16_t *ports, size_t n_ports,
                               struct reg_scan *sc)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int r = store_list(st->store, "assigned/", &e, &n, NULL);

	if (r)
		return -EIO;
	for (size_t i = 0; i < n && !sc->holder[0]; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		json_t *probe = v ? json_pack("{s:s, s:[]}", "address", jstr(v, "address"),
		                              "ports") : NULL;

		if (probe && strcmp(jstr(v, "service"), svc) != 0 &&
		    claims_overlap(probe, a, ports, n_ports)) {
			snprintf(sc->holder, sizeof(sc->holder), "%s", jstr(v, "service"));
			snprintf(sc->held, sizeof(sc->held), "%s", jstr(v, "address"));
		}
		json_decref(probe);
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* {"address", "ports"} of an entry, as the config answer carries it. */
static json_t *endpoint_answer(const json_t *v)
{
	json_t *ports = json_object_get(v, "ports");

	return json_pack("{s:s, s:O}", "address", jstr(v, "address"), "ports",
	                 json_is_array(ports) ? ports : json_array());
}

int state_endpoints_json(struct control_state *st, const struct api_config_query *q,
                         json_t **out)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = state_now();
	json_t *all = json_object();
	int r = all ? 0 : -ENOMEM;

	*out = all;
	if (r || (!q->upstreams_all && q->n_upstreams == 0))
		return r;
	r = store_list(st->store, "endpoints/", &e, &n, NULL);
	if (r) {
		json_decref(all);
		*out = NULL;
		return r;
	}
	for (size_t i = 0; i < n; i++) {
		char name[SERVICE_NAME_MAX + 1];
		json_t *v, *list;

		if (!endpoint_key_service(e[i].key, name) || !api_config_query_wants(q, name))
			continue;
		v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (!v || !endpoint_live(st, v, now)) {
			json_decref(v);
			continue;
		}
		list = json_object_get(all, name);
		if (!list) {
			list = json_array();
			json_object_set_new(all, name, list);
		}
		json_array_append_new(list, endpoint_answer(v));
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* ---- coalesced version bumps ---- */

static int64_t mono_ms(void)
{
	return state_mono_ms();
}

static int bump_txn(struct control_state *st, struct batch *b, void *arg,
                    struct state_error *se)
{
	(void)arg;
	if (bump_counter(st, b, "meta/endpoints", "version", NULL) < 0)
		return state_store_failed(st, se, "read", -EIO);
	return 0;
}

int state_endpoints_bump(struct control_state *st)
{
	int r = state_txn(st, "endpoints version", bump_txn, NULL, NULL, NULL);

	if (r)
		return r;
	st->endpoints_pending = false;
	st->endpoints_bumped_ms = mono_ms();
	return 0;
}

int64_t state_endpoints_touch(struct control_state *st)
{
	int64_t left;

	if (!st->endpoints_pending)
		return -1;
	left = st->endpoints_bumped_ms + CONTROL_ENDPOINTS_COALESCE_MS - mono_ms();
	if (left <= 0 && !st->endpoints_timer)
		return state_endpoints_bump(st) == 0 ? 0 : -1;
	if (st->endpoints_timer)
		return -1;
	st->endpoints_timer = true;
	return left > 0 ? left : 1;
}

bool state_endpoints_flush(struct control_state *st)
{
	st->endpoints_timer = false;
	return st->endpoints_pending && state_endpoints_bump(st) == 0;
}

/* Registrations written before a crash, whose bump was still pending:
 * an entry newer than meta/endpoints. */
void state_endpoints_repair(struct control_state *st)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t bumped = 0, newest = 0;

	if (kv_rev(st, "meta/endpoints", &bumped) < 0 ||
	    store_list(st->store, "endpoints/", &e, &n, NULL) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		if (e[i].revision > newest)
			newest = e[i].revision;
	}
	store_entries_free(e, n);
	if (newest > bumped)
		state_endpoints_bump(st);
}

/* ---- registration ---- */

/* May svc's proxy, connecting from remote, register a? Sets *via. */
static int endpoint_allowed(struct control_state *st, const char *svc, const struct api_addr *a,
                            const char *address, const char *remote, const char **via,
                            struct state_error *se)
{
	char key[STORE_KEY_MAX];
	struct api_addr from;
	json_t *asg = NULL;
	int r;

	state_key(key, sizeof(key), "assigned/", address);
	r = kv_json(st, key, &asg, NULL);
	if (r == -EIO)
		return state_store_failed(st, se, "read", r);
	if (asg) {
		char holder[SERVICE_NAME_MAX + 1];

		snprintf(holder, sizeof(holder), "%s", jstr(asg, "service"));
		json_decref(asg);
		if (strcmp(holder, svc) != 0)
			return state_fail(se, -EEXIST, "address", "%s is assigned to service %s by the "
			                  "admin", address, holder);
		*via = "assignment";
		return 0;
	}
	if (!remote || api_addr_parse(remote, true, &from) < 0 || !api_addr_same_ip(a, &from))
		return state_fail(se, -EPERM, "address", "a proxy may register only addresses on the "
		                  "IP it connects to control from (%s); an administrator may assign %s "
		                  "to %s with: meshletctl endpoints add --service %s %s",
		                  remote ? remote : "unknown", address, svc, svc, address);
	*via = "connection";
	return 0;
}

/* The caps of a new entry; 0 or the refusal. */
static int endpoint_caps(struct control_state *st, const struct reg_scan *sc, const char *svc,
                         const char *serial, struct state_error *se)
{
	bool new_for_service = !(sc->cur && sc->cur_live);
	bool new_for_instance = new_for_service || strcmp(jstr(sc->cur, "serial"), serial) != 0;

	if (new_for_instance && sc->n_instance >= CONTROL_ENDPOINTS_PER_INSTANCE)
		return state_fail(se, -EDQUOT, "address", "this proxy (SVID %s) already has %d "
		                  "registry entries, the limit per instance", serial,
		                  CONTROL_ENDPOINTS_PER_INSTANCE);
	if (new_for_service && (int64_t)sc->n_service >= st->max_endpoints)
		return state_fail(se, -EDQUOT, "address", "service %s already has %lld registry "
		                  "entries, the limit per service (meshlet-control "
		                  "--max-endpoints-per-service)", svc, (long long)st->max_endpoints);
	return 0;
}

struct reg_txn {
	const char *svc, *serial, *via;
	const struct api_endpoint_req *r;
	struct api_addr a;
	json_t *ports;                 /* r's application ports as JSON */
	int64_t not_after;
	char key[STORE_KEY_MAX];
	struct reg_scan sc;
	bool visible;                  /* the write changes config answers */
};

static int register_txn(struct control_state *st, struct batch *b, void *arg,
                        struct state_error *se)
{
	struct reg_txn *t = arg;
	struct reg_scan *sc = &t->sc;
	int r;

	json_decref(sc->cur);
	if (registry_scan(st, t->svc, t->serial, t->key, &t->a, t->r->ports, t->r->n_ports,
	                  sc) < 0 ||
	    assignment_conflict(st, t->svc, &t->a, t->r->ports, t->r->n_ports, sc) < 0)
		return state_store_failed(st, se, "list", -EIO);
	if (sc->holder[0])
		return state_fail(se, -EEXIST, "address", "%s or one of its application ports is "
		                  "held by service %s (%s)", t->r->address, sc->holder, sc->held);
	t->visible = !sc->cur || !sc->cur_live ||
	             !json_equal(json_object_get(sc->cur, "ports"), t->ports);
	/* Re-registering the same thing changes nothing: no write, no bump. */
	if (!t->visible && strcmp(jstr(sc->cur, "serial"), t->serial) == 0 &&
	    strcmp(jstr(sc->cur, "via"), t->via) == 0)
		return 0;
	r = endpoint_caps(st, sc, t->svc, t->serial, se);
	if (r)
		return r;
	batch_put(b, t->key, json_pack("{s:s, s:O, s:s, s:I, s:I, s:s}", "address",
	                               t->r->address, "ports", t->ports, "serial", t->serial,
	                               "not_after", (json_int_t)t->not_after,
	                               "registered_at", (json_int_t)state_now(), "via", t->via),
	          sc->cur ? sc->cur_rev : 0);
	return 0;
}

/* The proxy with serial serves what it registered. */
static void proxy_registered(struct control_state *st, const struct reg_txn *t)
{
	struct state_proxy *p = state_proxy_find(st, t->serial);

	if (!p)
		p = state_proxy_add(st, t->serial, t->svc);
	if (!p)
		return;
	snprintf(p->address, sizeof(p->address), "%s", t->r->address);
	json_decref(p->ports);
	p->ports = json_incref(t->ports);
	p->not_after = t->not_after;
	p->last_seen = state_now();
	p->dirty = true;
}

int state_endpoint_register(struct control_state *st, const char *svc,
                            const struct api_endpoint_req *r, const char *serial,
                            int64_t not_after, const char *remote, json_t **out,
                            struct state_error *se)
{
	struct reg_txn t = { .svc = svc, .serial = serial, .r = r, .not_after = not_after };
	int64_t version = 0;
	int ret;

	if (api_addr_parse(r->address, false, &t.a) < 0)
		return state_fail(se, -EINVAL, "address", "must be ip:port");
	t.ports = json_array();
	if (!t.ports)
		return state_fail(se, -EIO, "", "out of memory");
	for (size_t i = 0; i < r->n_ports; i++)
		json_array_append_new(t.ports, json_integer(r->ports[i]));
	snprintf(t.key, sizeof(t.key), "endpoints/%s/%s", svc, r->address);
	ret = endpoint_allowed(st, svc, &t.a, r->address, remote, &t.via, se);
	if (!ret)
		ret = state_txn(st, "endpoint", register_txn, &t, NULL, se);
	json_decref(t.sc.cur);
	if (ret) {
		json_decref(t.ports);
		return ret;
	}
	if (t.visible)
		st->endpoints_pending = true;
	proxy_registered(st, &t);
	state_config_version(st, svc, &version);
	*out = json_pack("{s:s, s:s, s:o, s:I}", "service", svc, "address", r->address,
	                 "ports", t.ports, "version", (json_int_t)version);
	return 0;
}

/* ---- admin assignments ---- */

struct assign_txn {
	const struct api_assign_req *r;
	struct api_addr a;
	char key[STORE_KEY_MAX];       /* assigned/<addr> */
	int64_t at;                    /* assigned_at */
	bool wrote;
};

static int assign_txn(struct control_state *st, struct batch *b, void *arg,
                      struct state_error *se)
{
	struct assign_txn *t = arg;
	struct reg_scan sc = {0};
	json_t *cur = NULL;
	int64_t rev = 0;
	int r = kv_json(st, t->key, &cur, &rev);

	if (r == -EIO)
		return state_store_failed(st, se, "read", r);
	t->wrote = false;
	if (cur) {
		char holder[SERVICE_NAME_MAX + 1];

		snprintf(holder, sizeof(holder), "%s", jstr(cur, "service"));
		t->at = jint(cur, "assigned_at");
		json_decref(cur);
		if (strcmp(holder, t->r->service) != 0)
			return state_fail(se, -EEXIST, "address", "%s is assigned to service %s; remove "
			                  "that first (meshletctl endpoints remove --service %s %s)",
			                  t->r->address, holder, holder, t->r->address);
		return 0;
	}
	/* Another live service's entry on it: refused, as a registration would be. */
	if (registry_scan(st, t->r->service, "", "", &t->a, NULL, 0, &sc) < 0)
		return state_store_failed(st, se, "list", -EIO);
	json_decref(sc.cur);
	if (sc.holder[0])
		return state_fail(se, -EEXIST, "address", "%s is held by a live entry of service %s "
		                  "(%s)", t->r->address, sc.holder, sc.held);
	t->at = state_now();
	t->wrote = true;
	batch_put(b, t->key, json_pack("{s:s, s:s, s:I}", "service", t->r->service, "address",
	                               t->r->address, "assigned_at", (json_int_t)t->at), 0);
	return 0;
}

int state_endpoint_assign(struct control_state *st, const struct api_assign_req *r,
                          json_t **out, struct state_error *se)
{
	struct assign_txn t = { .r = r };
	char tm[CA_TIME_LEN];
	int ret;

	if (api_addr_parse(r->address, false, &t.a) < 0)
		return state_fail(se, -EINVAL, "address", "must be ip:port");
	state_key(t.key, sizeof(t.key), "assigned/", r->address);
	ret = state_txn(st, "assignment", assign_txn, &t, NULL, se);
	if (ret)
		return ret;
	if (t.wrote)
		log_info("admin assigned %s to service %s", r->address, r->service);
	*out = json_pack("{s:s, s:s, s:s}", "service", r->service, "address", r->address,
	                 "assigned_at", state_fmt_time(t.at, tm));
	return 0;
}

struct unassign_txn {
	const struct api_assign_req *r;
	char akey[STORE_KEY_MAX];      /* assigned/<addr> */
	char ekey[STORE_KEY_MAX];      /* endpoints/<svc>/<addr> */
	bool drop;                     /* the entry goes too */
};

static int unassign_txn(struct control_state *st, struct batch *b, void *arg,
                        struct state_error *se)
{
	struct unassign_txn *t = arg;
	json_t *cur = NULL, *entry = NULL;
	int64_t arev = 0, erev = 0;
	int r = kv_json(st, t->akey, &cur, &arev);

	if (r == -ENOENT)
		return state_fail(se, -ENOENT, "address", "%s is not assigned to any service",
		                  t->r->address);
	if (r)
		return state_store_failed(st, se, "read", r);
	if (strcmp(jstr(cur, "service"), t->r->service) != 0)
		r = state_fail(se, -EEXIST, "service", "%s is assigned to service %s, not %s",
		               t->r->address, jstr(cur, "service"), t->r->service);
	json_decref(cur);
	if (r)
		return r;
	r = kv_json(st, t->ekey, &entry, &erev);
	if (r == -EIO)
		return state_store_failed(st, se, "read", r);
	/* The registration the assignment allowed goes with it. */
	t->drop = entry && strcmp(jstr(entry, "via"), "assignment") == 0;
	json_decref(entry);
	batch_del(b, t->akey, arev);
	if (t->drop)
		batch_del(b, t->ekey, erev);
	return 0;
}

int state_endpoint_unassign(struct control_state *st, const struct api_assign_req *r,
                            json_t **out, struct state_error *se)
{
	struct unassign_txn t = { .r = r };
	int ret;

	state_key(t.akey, sizeof(t.akey), "assigned/", r->address);
	snprintf(t.ekey, sizeof(t.ekey), "endpoints/%s/%s", r->service, r->address);
	ret = state_txn(st, "assignment delete", unassign_txn, &t, NULL, se);
	if (ret)
		return ret;
	if (t.drop)
		state_endpoints_bump(st);
	log_info("admin removed the assignment of %s to service %s%s", r->address, r->service,
	         t.drop ? " and its registry entry" : "");
	*out = json_pack("{s:s, s:s, s:b, s:b}", "service", r->service, "address", r->address,
	                 "removed", 1, "entry_removed", t.drop);
	return 0;
}

/* ---- the admin's list ---- */

static json_t *entry_json(struct control_state *st, const char *svc, const json_t *v,
                          int64_t now)
{
	char t1[CA_TIME_LEN], t2[CA_TIME_LEN];

	return json_pack("{s:s, s:s, s:O, s:s, s:s, s:s, s:s, s:b}", "service", svc,
	                 "address", jstr(v, "address"), "ports", json_object_get(v, "ports"),
	                 "via", json_object_get(v, "via") ? jstr(v, "via") : "connection",
	                 "serial", jstr(v, "serial"),
	                 "registered_at", state_fmt_time(jint(v, "registered_at"), t1),
	                 "expires_at", state_fmt_time(jint(v, "not_after"), t2),
	                 "live", endpoint_live(st, v, now));
}

static json_t *assignment_json(const json_t *v)
{
	char t[CA_TIME_LEN];

	return json_pack("{s:s, s:s, s:s}", "service", jstr(v, "service"), "address",
	                 jstr(v, "address"), "assigned_at",
	                 state_fmt_time(jint(v, "assigned_at"), t));
}

int state_endpoints_list(struct control_state *st, json_t **out, struct state_error *se)
{
	struct store_entry *e = NULL, *a = NULL;
	size_t n = 0, na = 0;
	int64_t now = state_now();
	json_t *eps, *asg;
	int r = store_list(st->store, "endpoints/", &e, &n, NULL);

	if (!r)
		r = store_list(st->store, "assigned/", &a, &na, NULL);
	if (r) {
		store_entries_free(e, n);
		return state_store_failed(st, se, "list", r);
	}
	eps = json_array();
	asg = json_array();
	for (size_t i = 0; i < n; i++) {
		char name[SERVICE_NAME_MAX + 1];
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);

		if (v && endpoint_key_service(e[i].key, name))
			json_array_append_new(eps, entry_json(st, name, v, now));
		json_decref(v);
	}
	for (size_t i = 0; i < na; i++) {
		json_t *v = json_loadb(a[i].value, a[i].len, 0, NULL);

		if (v)
			json_array_append_new(asg, assignment_json(v));
		json_decref(v);
	}
	store_entries_free(e, n);
	store_entries_free(a, na);
	*out = json_pack("{s:o, s:o}", "endpoints", eps, "assignments", asg);
	return 0;
}
