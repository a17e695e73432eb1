/*
 * state_proxies: the proxies control has seen, keyed by the serial of the
 * SVID each uses. Kept in memory (a request is no reason for a store
 * write) and written by housekeeping and at close; see state.h.
 */
#include "state-int.h"
#include "tally.h"

#include <errno.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static struct state_proxy **index_slot(const struct control_state *st, const char *serial)
{
	struct state_proxy **pp = &st->proxy_index[tally_hash(serial) & (st->n_index - 1)];

	while (*pp && strcmp((*pp)->serial, serial) != 0)
		pp = &(*pp)->hnext;
	return pp;
}

/* Doubles the index's buckets; without memory the chains grow longer. */
static void index_grow(struct control_state *st)
{
	size_t n = st->n_index ? st->n_index * 2 : 256;
	struct state_proxy **b = calloc(n, sizeof(*b));

	if (!b)
		return;
	free(st->proxy_index);
	st->proxy_index = b;
	st->n_index = n;
	for (struct state_proxy *p = st->proxies; p; p = p->next) {
		size_t k = tally_hash(p->serial) & (n - 1);

		p->hnext = b[k];
		b[k] = p;
	}
}

struct state_proxy *state_proxy_find(struct control_state *st, const char *serial)
{
	return st->n_index ? *index_slot(st, serial) : NULL;
}

struct state_proxy *state_proxy_add(struct control_state *st, const char *serial,
                                    const char *svc)
{
	struct state_proxy *p = calloc(1, sizeof(*p)), **slot;

	if (!p)
		return NULL;
	snprintf(p->serial, sizeof(p->serial), "%s", serial);
	snprintf(p->service, sizeof(p->service), "%s", svc);
	p->held = -1;
	p->next = st->proxies;
	st->proxies = p;
	st->n_proxies++;
	if (st->n_proxies > st->n_index) {
		index_grow(st);      /* also indexes p */
		if (st->n_index)
			return p;
	}
	if (!st->n_index) {
		/* Not even a first index: p is unfindable, so not kept. */
		st->proxies = p->next;
		st->n_proxies--;
		free(p);
		return NULL;
	}
	slot = index_slot(st, serial);
	p->hnext = *slot;
	*slot = p;
	return p;
}

/* Frees p, already out of the list. */
static void proxy_free(struct state_proxy *p)
{
	json_decref(p->ports);
	free(p);
}

void state_proxy_drop(struct control_state *st, struct state_proxy *p)
{
	char **n = realloc(st->gone, (st->n_gone + 1) * sizeof(*n));

	/* Without room the record stays in the store until it expires. */
	if (n) {
		st->gone = n;
		st->gone[st->n_gone] = strdup(p->serial);
		if (st->gone[st->n_gone])
			st->n_gone++;
	}
	for (struct state_proxy **pp = &st->proxies; *pp; pp = &(*pp)->next) {
		if (*pp == p) {
			*pp = p->next;
			break;
		}
	}
	for (struct state_proxy **pp = st->n_index ? &st->proxy_index[tally_hash(p->serial) &
	                                                           (st->n_index - 1)] : NULL;
	     pp && *pp; pp = &(*pp)->hnext) {
		if (*pp == p) {
			*pp = p->hnext;
			break;
		}
	}
	st->n_proxies--;
	proxy_free(p);
}

void state_proxies_free(struct control_state *st)
{
	while (st->proxies) {
		struct state_proxy *p = st->proxies;

		st->proxies = p->next;
		proxy_free(p);
	}
	free(st->proxy_index);
	st->proxy_index = NULL;
	st->n_index = st->n_proxies = 0;
	for (size_t i = 0; i < st->n_gone; i++)
		free(st->gone[i]);
	free(st->gone);
	st->gone = NULL;
	st->n_gone = 0;
}

void state_proxies_load(struct control_state *st)
{
	struct store_entry *e = NULL;
	size_t n = 0;

	if (store_list(st->store, "proxies/", &e, &n, NULL) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		struct state_proxy *p = v ? state_proxy_add(st, e[i].key + strlen("proxies/"),
		                                            jstr(v, "service")) : NULL;
		if (p) {
			snprintf(p->address, sizeof(p->address), "%s", jstr(v, "address"));
			p->ports = json_incref(json_object_get(v, "ports"));
			p->not_after = jint(v, "not_after");
			p->last_seen = jint(v, "last_seen");
			p->held = jint(v, "config_version");
		}
		json_decref(v);
	}
	store_entries_free(e, n);
}

static json_t *proxy_json(const struct state_proxy *p)
{
	return json_pack("{s:s, s:s, s:O?, s:I, s:I, s:I}", "service", p->service,
	                 "address", p->address, "ports", p->ports, "last_seen", (json_int_t)p->last_seen,
	                 "not_after", (json_int_t)p->not_after, "config_version", (json_int_t)p->held);
}

int state_proxies_flush(struct control_state *st)
{
	struct batch b = {0};
	char key[STORE_KEY_MAX];
	int r = 0;

	for (struct state_proxy *p = st->proxies; p && !r; p = p->next) {
		if (!p->dirty)
			continue;
		snprintf(key, sizeof(key), "proxies/%s", p->serial);
		batch_put(&b, key, proxy_json(p), STORE_REV_ANY);
		p->dirty = false;
		if (b.n >= STATE_PRUNE_CHUNK)
			r = batch_commit(st, &b, NULL);
	}
	if (!r)
		r = batch_commit(st, &b, NULL);
	for (size_t i = 0; i < st->n_gone; i++) {
		snprintf(key, sizeof(key), "proxies/%s", st->gone[i]);
		int d = store_delete(st->store, key, STORE_REV_ANY, NULL);
		if (d < 0 && d != -ENOENT && !r)
			r = d;
		free(st->gone[i]);
	}
	st->n_gone = 0;
	batch_clear(&b);
	return r;
}

/* ---- what handlers report ---- */

void state_proxy_seen(struct control_state *st, const char *serial, const char *svc,
                      int64_t not_after, int64_t held, int polling)
{
	struct state_proxy *p = state_proxy_find(st, serial);

	if (!p)
		p = state_proxy_add(st, serial, svc);
	if (!p)
		return;
	p->not_after = not_after;
	p->last_seen = state_now();
	if (held >= 0)
		p->held = held;
	p->polling += polling;
	if (p->polling < 0)
		p->polling = 0;
	p->dirty = true;
}

void state_proxy_degraded(struct control_state *st, const char *serial, unsigned flags)
{
	struct state_proxy *p = state_proxy_find(st, serial);

	if (p)
		p->degraded = flags;
}

void state_proxy_bundle_fetched(struct control_state *st, const char *serial)
{
	struct state_proxy *p = state_proxy_find(st, serial);
	int64_t rev = 0;

	if (p && kv_rev(st, "meta/bundle", &rev) == 0)
		p->bundle_rev = rev;
}

static int cmp_proxy(const void *a, const void *b)
{
	const struct state_proxy *x = *(struct state_proxy *const *)a;
	const struct state_proxy *y = *(struct state_proxy *const *)b;
	int c = strcmp(x->service, y->service);

	return c ? c : strcmp(x->address, y->address);
}

/* One proxy as the admin's list shows it. */
static json_t *proxy_show(struct control_state *st, const struct state_proxy *p)
{
	char id[SPIFFE_ID_MAX + 1] = "", seen[CA_TIME_LEN], exp[CA_TIME_LEN];
	int64_t current = 0;
	unsigned degraded = p->degraded;

	identity_format(id, sizeof(id), st->td, p->service);
	state_config_version(st, p->service, &current);
	/* Control sees an expiry coming by itself, even when the proxy is silent. */
	if (p->not_after - state_now() < API_CERT_WARN_S)
		degraded |= API_DEGRADED_EXPIRY;
	return json_pack("{s:s, s:s, s:s?, s:O?, s:s, s:s, s:s, s:I, s:I, s:b, s:b, s:o*}",
	                 "service", p->service, "spiffe_id", id,
	                 "address", p->address[0] ? p->address : NULL, "ports", p->ports,
	                 "last_seen", state_fmt_time(p->last_seen, seen), "cert_serial", p->serial,
	                 "cert_expires_at", state_fmt_time(p->not_after, exp),
	                 "config_version", (json_int_t)p->held, "current_version",
	                 (json_int_t)current, "connected", p->polling > 0,
	                 "up_to_date", p->held >= current,
	                 "degraded", api_degraded_json(degraded));
}

json_t *state_proxies(struct control_state *st)
{
	json_t *list = json_array();
	struct state_proxy **v;
	size_t n = 0, i = 0;
	int64_t now = state_now();

	for (struct state_proxy *p = st->proxies; p; p = p->next)
		n++;
	v = calloc(n ? n : 1, sizeof(*v));
	if (!v)
		return json_pack("{s:o}", "proxies", list);
	for (struct state_proxy *p = st->proxies; p; p = p->next)
		v[i++] = p;
	qsort(v, n, sizeof(*v), cmp_proxy);
	for (i = 0; i < n; i++) {
		if (v[i]->not_after <= now && v[i]->polling == 0)
			continue;
		json_array_append_new(list, proxy_show(st, v[i]));
	}
	free(v);
	return json_pack("{s:o}", "proxies", list);
}
