/*
 * state_gc: housekeeping. Prunes what expired (tokens, certificate records,
 * lineages, revocations of expired certificates, endpoints whose SVID
 * expired or was revoked) and writes the proxies registry; see state.h.
 */
#include "state-int.h"

#include <errno.h>
#include <string.h>

typedef bool (*expired_fn)(struct control_state *st, const json_t *v, int64_t now);

/* Deletes the keys under prefix for which expired(value) holds, in chunks;
 * the counter (meta key, field; key may be NULL) bumped with each chunk.
 * *n_deleted counts deletions. A chunk that races another writer is left
 * for the next round. */
static int prune(struct control_state *st, const char *prefix, const char *counter,
                 const char *field, expired_fn expired, size_t *n_deleted)
{
	struct store_entry *e = NULL;
	struct batch b = {0};
	size_t n = 0;
	int64_t now = state_now();
	int r = store_list(st->store, prefix, &e, &n, NULL);

	*n_deleted = 0;
	for (size_t i = 0; i < n && !r; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && expired(st, v, now)) {
			batch_del(&b, e[i].key, e[i].revision);
			(*n_deleted)++;
		}
		json_decref(v);
		if (b.n >= STATE_PRUNE_CHUNK || (i + 1 == n && b.n > 0)) {
			if (counter)
				r = bump_counter(st, &b, counter, field, NULL);
			if (!r)
				r = batch_commit(st, &b, NULL);
			batch_clear(&b);
		}
	}
	store_entries_free(e, n);
	return r == -ECANCELED || r == -ENOENT ? 0 : r;
}

static bool token_expired(struct control_state *st, const json_t *v, int64_t now)
{
	(void)st;
	return jint(v, "expires_at") <= now;
}

static bool cert_expired(struct control_state *st, const json_t *v, int64_t now)
{
	(void)st;
	return jint(v, "not_after") <= now;
}

static bool endpoint_stale(struct control_state *st, const json_t *v, int64_t now)
{
	return jint(v, "not_after") <= now || state_is_revoked(st, jstr(v, "serial"));
}

/* Revocations of expired certificates: the certificate is refused anyway.
 * *changed when some went (the bundle version moved). */
static int prune_revoked(struct control_state *st, bool *changed)
{
	struct store_entry *e = NULL;
	size_t ne = 0, n = 0;
	int64_t now = state_now();
	int r = store_list(st->store, "revoked/", &e, &ne, NULL);

	if (r)
		return r;
	r = prune(st, "revoked/", "meta/bundle", "version", cert_expired, &n);
	for (size_t i = 0; i < ne && n; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && jint(v, "not_after") <= now)
			state_revoked_remove(st, e[i].key + strlen("revoked/"));
		json_decref(v);
	}
	if (n)
		*changed = true;
	store_entries_free(e, ne);
	return r;
}

/* Proxies whose SVID expired and that wait for nothing. */
static void drop_gone_proxies(struct control_state *st)
{
	int64_t now = state_now();

	for (struct state_proxy *p = st->proxies, *next; p; p = next) {
		next = p->next;
		if (p->not_after <= now && p->polling == 0)
			state_proxy_drop(st, p);
	}
}

/* A shared store: whether this replica does the pruning this round. */
static bool housekeeper(struct control_state *st)
{
	int held = st->shared ? store_lock_hold(st->store, STATE_HOUSEKEEPING_LOCK,
	                                         STATE_HOUSEKEEPING_TTL) : 1;

	if ((held == 1) != st->housekeeper)
		log_info("housekeeping: %s", held == 1 ? "this replica prunes the store now" :
		         "another replica prunes the store");
	if (held < 0)
		log_warn("housekeeping: cannot take or keep the lock (%s)",
		         store_strerror(st->store));
	st->housekeeper = held == 1;
	return st->housekeeper;
}

int state_maintain(struct control_state *st, bool *changed)
{
	size_t n = 0;
	int r, ret = 0;

	*changed = false;
	if (!housekeeper(st)) {
		/* What this replica alone keeps: its coalesced registry bump and
		 * the proxies it has seen. */
		if (st->endpoints_pending && !st->endpoints_timer && state_endpoints_bump(st) == 0)
			*changed = true;
		drop_gone_proxies(st);
		return state_proxies_flush(st);
	}
	if ((r = prune(st, "tokens/", NULL, NULL, token_expired, &n)) != 0)
		ret = r;
	if ((r = prune(st, "certs/", NULL, NULL, cert_expired, &n)) != 0)
		ret = r;
	if ((r = prune(st, "lineages/", NULL, NULL, cert_expired, &n)) != 0)
		ret = r;
	if ((r = prune(st, "endpoints/", "meta/endpoints", "version", endpoint_stale, &n)) != 0)
		ret = r;
	if (n)
		*changed = true;
	/* A coalesced bump whose timer was lost: never later than this. */
	if (st->endpoints_pending && !st->endpoints_timer && state_endpoints_bump(st) == 0)
		*changed = true;
	if ((r = prune_revoked(st, changed)) != 0)
		ret = r;
	drop_gone_proxies(st);
	if ((r = state_proxies_flush(st)) != 0)
		ret = r;
	if (ret)
		log_warn("housekeeping: %s (%s)", strerror(-ret), store_strerror(st->store));
	return ret;
}
