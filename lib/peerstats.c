/*
 * peerstats: a proxy's per-caller counters between two summaries (see
 * peerstats.h). Fixed arrays, no allocation after a shard exists: a
 * caller beyond PEERSTATS_CALLERS is counted in the API_STATS_OTHER slot,
 * so 10,000 callers cost what 64 do.
 *
 * A shard's slots count for ever (they never go back to zero); the taker
 * keeps per slot what it took last ("base") and reports the difference.
 * A slot changes hands to a new caller only once everything it counted
 * was taken (its counters equal its base), checked under the shard's
 * lock, which the taker holds while it reads: so no count is lost, none
 * is taken twice, and none is reported under another caller's name.
 */
#include "meshlet/peerstats.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "meshlet/identity.h"

static const double bucket_ms[PEERSTATS_BUCKETS - 1] = {
	0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000,
};

/* Plain counters: what a take reports (and a slot's base). */
struct ps_caller {
	char from[SERVICE_NAME_MAX + 1];   /* "" when the slot is free */
	int64_t requests, denied, errors_5xx, answers;
	int64_t buckets[PEERSTATS_BUCKETS];
};

/* A slot's counts since it was made: what the writer adds to, and (as
 * plain numbers) what the taker took last. */
#define PS_COUNTERS (3 + PEERSTATS_BUCKETS)
enum { PS_ALLOWED, PS_DENIED, PS_5XX, PS_BUCKET0 };

/*
 * A shard's slot. Its one writer adds with load + store (no locked
 * instruction). Each event moves exactly one counter, and what depends
 * on another is derived at the take (requests = allowed + denied, answers
 * = the sum of the buckets), so a take that reads in the middle of a
 * request's counting still reports no more denials than requests.
 */
struct ps_slot {
	char from[SERVICE_NAME_MAX + 1];   /* changed by the writer under the shard lock */
	_Atomic int64_t n[PS_COUNTERS];
	int64_t base[PS_COUNTERS];         /* the taker's, under the shard lock */
};

struct peerstats_shard {
	struct peerstats *p;
	pthread_mutex_t lock;              /* slot names vs. the taker's reads */
	size_t n_named;                    /* slots with a caller (the writer's) */
	struct ps_slot slots[PEERSTATS_CALLERS + 1];   /* last: API_STATS_OTHER */
	/* The writer's memory of its last caller: a keep-alive connection asks
	 * for the same slot on every request. */
	char last_peer[SPIFFE_ID_MAX + 1];
	size_t last_slot;
	bool has_last;
};

struct ps_denied {
	char from[SERVICE_NAME_MAX + 1];
	char rule[POLICY_RULE_NAME_MAX + 1];
	int64_t n;
};

struct peerstats {
	pthread_mutex_t lock;              /* denials, the nudge hook, shards, takes */
	time_t since;                      /* start of the interval (monotonic) */
	_Atomic(struct peerstats_shard *) shards[PEERSTATS_SHARDS_MAX];
	struct ps_denied denied[PEERSTATS_DENIED + 1];     /* last: API_STATS_OTHER */
	struct api_stats_recent recent[API_STATS_RECENT_MAX];   /* oldest first, distinct */
	size_t n_recent;
	atomic_bool quiet;                 /* the last interval counted nothing */
	peerstats_nudge_fn nudge;          /* see peerstats_set_nudge */
	void *nudge_ctx;
};

static time_t mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec;
}

struct peerstats *peerstats_new(void)
{
	struct peerstats *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	if (pthread_mutex_init(&p->lock, NULL) != 0) {
		free(p);
		return NULL;
	}
	p->since = mono_now();
	atomic_init(&p->quiet, true);
	return p;
}

void peerstats_free(struct peerstats *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < PEERSTATS_SHARDS_MAX; i++) {
		struct peerstats_shard *s = atomic_load(&p->shards[i]);

		if (s) {
			pthread_mutex_destroy(&s->lock);
			free(s);
		}
	}
	pthread_mutex_destroy(&p->lock);
	free(p);
}

struct peerstats_shard *peerstats_shard(struct peerstats *p, size_t i)
{
	struct peerstats_shard *s;

	if (!p || i >= PEERSTATS_SHARDS_MAX)
		return NULL;
	if ((s = atomic_load_explicit(&p->shards[i], memory_order_acquire)))
		return s;
	pthread_mutex_lock(&p->lock);
	s = atomic_load(&p->shards[i]);
	if (!s && (s = calloc(1, sizeof(*s)))) {
		if (pthread_mutex_init(&s->lock, NULL) != 0) {
			free(s);
			s = NULL;
		} else {
			s->p = p;
			snprintf(s->slots[PEERSTATS_CALLERS].from, sizeof(s->slots->from), "%s",
			         API_STATS_OTHER);
			atomic_store_explicit(&p->shards[i], s, memory_order_release);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return s;
}

void peerstats_caller(const char *peer_id, char *out)
{
	const char *name = peer_id ? strrchr(peer_id, '/') : NULL;
	size_t n;

	/* spiffe://<td>/svc/<name>: the name after the last '/', preceded by "/svc". */
	if (name && name - peer_id >= 4 && strncmp(name - 4, "/svc", 4) == 0 &&
	    strncmp(peer_id, "spiffe://", 9) == 0 && identity_valid_service(name + 1)) {
		n = strnlen(name + 1, SERVICE_NAME_MAX);
		memcpy(out, name + 1, n);
		out[n] = '\0';
		return;
	}
	memcpy(out, API_STATS_OTHER, sizeof(API_STATS_OTHER));
}

/* ---- the writer's side: one thread per shard -------------------------- */

static void bump(struct ps_slot *sl, size_t k)
{
	atomic_store_explicit(&sl->n[k], atomic_load_explicit(&sl->n[k], memory_order_relaxed) + 1,
	                      memory_order_relaxed);
}

/* Everything the slot counted was taken (the writer's own counters
 * against the taker's base; under the shard lock). */
static bool slot_taken(const struct ps_slot *sl)
{
	for (size_t k = 0; k < PS_COUNTERS; k++)
		if (atomic_load_explicit(&sl->n[k], memory_order_relaxed) != sl->base[k])
			return false;
	return true;
}

/* A slot for from: a free one, else one whose counts were all taken; the
 * API_STATS_OTHER slot when none is. */
static size_t claim_slot(struct peerstats_shard *s, const char *from)
{
	size_t i = PEERSTATS_CALLERS;

	pthread_mutex_lock(&s->lock);
	if (s->n_named < PEERSTATS_CALLERS) {
		i = s->n_named++;
	} else {
		for (i = 0; i < PEERSTATS_CALLERS && !slot_taken(&s->slots[i]); i++)
			;
	}
	if (i < PEERSTATS_CALLERS)
		snprintf(s->slots[i].from, sizeof(s->slots[i].from), "%s", from);
	pthread_mutex_unlock(&s->lock);
	if (s->has_last && s->last_slot == i && i < PEERSTATS_CALLERS)
		s->has_last = false;    /* the slot changed hands */
	return i;
}

static struct ps_slot *slot_of(struct peerstats_shard *s, const char *peer_id)
{
	char from[SERVICE_NAME_MAX + 1];
	size_t i;

	if (s->has_last && peer_id && strcmp(s->last_peer, peer_id) == 0)
		return &s->slots[s->last_slot];
	peerstats_caller(peer_id, from);
	if (strcmp(from, API_STATS_OTHER) == 0)
		return &s->slots[PEERSTATS_CALLERS];
	for (i = 0; i < s->n_named && strcmp(s->slots[i].from, from) != 0; i++)
		;
	if (i == s->n_named)
		i = claim_slot(s, from);
	/* Not remembered when it landed in "(other)" for want of a slot:
	 * a slot may free up at the next take. */
	if (i < PEERSTATS_CALLERS && strlen(peer_id) <= SPIFFE_ID_MAX) {
		strcpy(s->last_peer, peer_id);
		s->last_slot = i;
		s->has_last = true;
	}
	return &s->slots[i];
}

static struct ps_denied *denied_slot(struct peerstats *p, const char *from, const char *rule)
{
	for (size_t i = 0; i < PEERSTATS_DENIED; i++) {
		struct ps_denied *d = &p->denied[i];

		if (d->from[0] == '\0') {
			snprintf(d->from, sizeof(d->from), "%s", from);
			snprintf(d->rule, sizeof(d->rule), "%s", rule);
			return d;
		}
		if (strcmp(d->from, from) == 0 && strcmp(d->rule, rule) == 0)
			return d;
	}
	return &p->denied[PEERSTATS_DENIED];
}

/* The same denial again (caller, rule, method, path) only moves to the
 * newest place: a repeated denial must not push a new kind out. */
static bool same_denial(const struct api_stats_recent *r, const struct api_stats_recent *n)
{
	return strcmp(r->from, n->from) == 0 && strcmp(r->rule, n->rule) == 0 &&
	       strcmp(r->method, n->method) == 0 && strcmp(r->path, n->path) == 0;
}

/* True when the denial is new in this interval (not a repeat). */
static bool remember_denial(struct peerstats *p, const char *from, const char *rule,
                            const char *method, const char *path)
{
	struct api_stats_recent n;
	bool is_new;
	size_t i;

	n.at = (int64_t)time(NULL);
	snprintf(n.from, sizeof(n.from), "%s", from);
	snprintf(n.rule, sizeof(n.rule), "%s", rule);
	api_stats_clean(n.method, sizeof(n.method), method ? method : "");
	api_stats_clean(n.path, sizeof(n.path), path ? path : "");
	/* p->recent is ordered oldest first. */
	for (i = 0; i < p->n_recent && !same_denial(&p->recent[i], &n); i++)
		;
	is_new = i == p->n_recent;
	if (i == p->n_recent && p->n_recent == API_STATS_RECENT_MAX)
		i = 0;                        /* full: the oldest goes */
	else if (i == p->n_recent)
		p->n_recent++;
	memmove(&p->recent[i], &p->recent[i + 1], (p->n_recent - 1 - i) * sizeof(n));
	p->recent[p->n_recent - 1] = n;
	return is_new;
}

void peerstats_set_nudge(struct peerstats *p, peerstats_nudge_fn fn, void *ctx)
{
	pthread_mutex_lock(&p->lock);
	p->nudge = fn;
	p->nudge_ctx = ctx;
	pthread_mutex_unlock(&p->lock);
}

/* A denial: counted per rule and kept among the recent ones, under the
 * shared lock (denials are logged one by one anyway). */
static bool count_denial(struct peerstats *p, const char *from, const char *rule,
                         const char *method, const char *path)
{
	denied_slot(p, from, rule)->n++;
	return remember_denial(p, from, rule, method, path);
}

void peerstats_decision(struct peerstats_shard *s, const char *peer_id, bool allow,
                        const char *rule, const char *method, const char *path)
{
	char from[SERVICE_NAME_MAX + 1];
	struct peerstats *p;
	struct ps_slot *sl;
	bool news;

	if (!s)
		return;
	p = s->p;
	sl = slot_of(s, peer_id);
	bump(sl, allow ? PS_ALLOWED : PS_DENIED);
	/* The first decision after a quiet interval, or a new kind of denial,
	 * is news worth reporting now rather than at the next poll. */
	news = atomic_load_explicit(&p->quiet, memory_order_relaxed) &&
	       atomic_exchange(&p->quiet, false);
	if (allow && !news)
		return;
	if (!rule || !policy_rule_name_valid(rule))
		rule = API_STATS_OTHER;
	/* The caller's own name even when its counts went to "(other)". */
	if (!allow)
		peerstats_caller(peer_id, from);
	pthread_mutex_lock(&p->lock);
	if (!allow)
		news |= count_denial(p, from, rule, method, path);
	/* Under the lock: peerstats_set_nudge(NULL) then waits for a call in
	 * progress, so the hook's owner may be freed after it. */
	if (news && p->nudge)
		p->nudge(p->nudge_ctx);
	pthread_mutex_unlock(&p->lock);
}

void peerstats_answer(struct peerstats_shard *s, const char *peer_id, int status,
                      double seconds)
{
	double ms = seconds > 0 ? seconds * 1e3 : 0;
	struct ps_slot *sl;
	size_t b = 0;

	if (!s)
		return;
	while (b < PEERSTATS_BUCKETS - 1 && ms > bucket_ms[b])
		b++;
	sl = slot_of(s, peer_id);
	bump(sl, PS_BUCKET0 + b);
	if (status >= 500 && status <= 599)
		bump(sl, PS_5XX);
}

/* ---- the taker's side --------------------------------------------------- */

/* The q-quantile of the buckets (ms), interpolated inside its bucket. */
static double quantile(const int64_t *buckets, int64_t total, double q)
{
	double want = q * (double)total, seen = 0;

	for (size_t b = 0; b < PEERSTATS_BUCKETS; b++) {
		double lo = b ? bucket_ms[b - 1] : 0;

		if (buckets[b] == 0)
			continue;
		if (b == PEERSTATS_BUCKETS - 1)
			return lo;       /* above the last bound: say the bound */
		if (seen + (double)buckets[b] >= want)
			return lo + (bucket_ms[b] - lo) * ((want - seen) / (double)buckets[b]);
		seen += (double)buckets[b];
	}
	return 0;
}

static void merge_caller(struct ps_caller *into, const struct ps_caller *c)
{
	into->requests += c->requests;
	into->denied += c->denied;
	into->errors_5xx += c->errors_5xx;
	into->answers += c->answers;
	for (size_t b = 0; b < PEERSTATS_BUCKETS; b++)
		into->buckets[b] += c->buckets[b];
}

/* What slot sl counted since the last take into *d; its base moves on. */
static bool slot_delta(struct ps_slot *sl, struct ps_caller *d)
{
	int64_t delta[PS_COUNTERS];

	for (size_t k = 0; k < PS_COUNTERS; k++) {
		int64_t now = atomic_load_explicit(&sl->n[k], memory_order_relaxed);

		delta[k] = now - sl->base[k];
		sl->base[k] = now;
	}
	memcpy(d->from, sl->from, sizeof(d->from));
	d->requests = delta[PS_ALLOWED] + delta[PS_DENIED];
	d->denied = delta[PS_DENIED];
	d->errors_5xx = delta[PS_5XX];
	d->answers = 0;
	for (size_t k = 0; k < PEERSTATS_BUCKETS; k++) {
		d->buckets[k] = delta[PS_BUCKET0 + k];
		d->answers += d->buckets[k];
	}
	return d->requests || d->answers || d->errors_5xx;
}

/* Adds d to its caller's row of the merged table (n rows used of
 * PEERSTATS_CALLERS; the last row, API_STATS_OTHER, takes the rest). */
static void merge_into(struct ps_caller *all, size_t *n, const struct ps_caller *d)
{
	size_t i = 0;

	if (strcmp(d->from, API_STATS_OTHER) != 0) {
		for (i = 0; i < *n && strcmp(all[i].from, d->from) != 0; i++)
			;
		if (i == *n && *n < PEERSTATS_CALLERS)
			memcpy(all[(*n)++].from, d->from, sizeof(d->from));
	}
	merge_caller(strcmp(d->from, API_STATS_OTHER) == 0 || i == PEERSTATS_CALLERS
	                     ? &all[PEERSTATS_CALLERS] : &all[i], d);
}

/* Every shard's counts since the last take, merged by caller. */
static void take_shards(struct peerstats *p, struct ps_caller *all)
{
	struct ps_caller d;
	size_t n = 0;

	for (size_t i = 0; i < PEERSTATS_SHARDS_MAX; i++) {
		struct peerstats_shard *s = atomic_load_explicit(&p->shards[i], memory_order_acquire);

		if (!s)
			continue;
		pthread_mutex_lock(&s->lock);
		for (size_t k = 0; k < s->n_named; k++)
			if (slot_delta(&s->slots[k], &d))
				merge_into(all, &n, &d);
		if (slot_delta(&s->slots[PEERSTATS_CALLERS], &d))
			merge_into(all, &n, &d);
		pthread_mutex_unlock(&s->lock);
	}
}

static int by_requests(const void *a, const void *b)
{
	const struct ps_caller *x = a, *y = b;

	return (x->requests < y->requests) - (x->requests > y->requests);
}

static int by_count(const void *a, const void *b)
{
	const struct ps_denied *x = a, *y = b;

	return (x->n < y->n) - (x->n > y->n);
}

static void caller_out(struct api_stats_caller *o, const struct ps_caller *c)
{
	snprintf(o->from, sizeof(o->from), "%s", c->from[0] ? c->from : API_STATS_OTHER);
	o->requests = c->requests;
	o->denied = c->denied;
	/* 5xx answers can outnumber decisions: a request refused before any
	 * decision (bad head) is answered without one. */
	o->errors_5xx = c->errors_5xx;
	if (o->requests < o->errors_5xx)
		o->requests = o->errors_5xx;
	o->has_latency = c->answers > 0;
	if (o->has_latency) {
		o->p50_ms = quantile(c->buckets, c->answers, 0.50);
		o->p99_ms = quantile(c->buckets, c->answers, 0.99);
	}
}

/* The callers of the interval into out, the busiest first, the rest and
 * the API_STATS_OTHER slot in one last entry. */
static int64_t take_callers(struct ps_caller *all, size_t n, struct api_stats_summary *out)
{
	struct ps_caller other = { .from = API_STATS_OTHER };
	int64_t total = 0;
	size_t kept = 0;

	qsort(all, n, sizeof(*all), by_requests);
	for (size_t i = 0; i < n; i++) {
		total += all[i].requests;
		/* A 5xx counted apart from its answer's bucket (a take in between)
		 * still makes a row: caller_out counts it as a request. */
		if (all[i].requests == 0 && all[i].answers == 0 && all[i].errors_5xx == 0)
			continue;
		if (kept < API_STATS_CALLERS_MAX - 1 && strcmp(all[i].from, API_STATS_OTHER) != 0)
			caller_out(&out->callers[kept++], &all[i]);
		else
			merge_caller(&other, &all[i]);
	}
	if (other.requests || other.answers || other.errors_5xx)
		caller_out(&out->callers[kept++], &other);
	out->n_callers = kept;
	return total;
}

static void take_denied(struct ps_denied *all, size_t n, struct api_stats_summary *out)
{
	struct api_stats_denied *o;
	int64_t other = 0;
	size_t kept = 0;

	qsort(all, n, sizeof(*all), by_count);
	for (size_t i = 0; i < n && all[i].n > 0; i++) {
		if (kept < API_STATS_DENIED_MAX - 1 && strcmp(all[i].from, API_STATS_OTHER) != 0 &&
		    all[i].from[0]) {
			o = &out->denied[kept++];
			snprintf(o->from, sizeof(o->from), "%s", all[i].from);
			snprintf(o->rule, sizeof(o->rule), "%s", all[i].rule);
			o->n = all[i].n;
		} else {
			other += all[i].n;
		}
	}
	if (other) {
		o = &out->denied[kept++];
		snprintf(o->from, sizeof(o->from), "%s", API_STATS_OTHER);
		snprintf(o->rule, sizeof(o->rule), "%s", API_STATS_OTHER);
		o->n = other;
	}
	out->n_denied = kept;
}

int64_t peerstats_take(struct peerstats *p, struct api_stats_summary *out)
{
	/* Copied out under the locks, sorted and folded outside them. */
	struct ps_caller *callers = calloc(PEERSTATS_CALLERS + 1, sizeof(*callers));
	struct ps_denied *denied = malloc(sizeof(p->denied));
	time_t now = mono_now();
	int64_t total = 0;

	memset(out, 0, sizeof(*out));
	if (!callers || !denied) {
		free(callers);
		free(denied);
		return 0;
	}
	snprintf(callers[PEERSTATS_CALLERS].from, sizeof(callers->from), "%s", API_STATS_OTHER);
	pthread_mutex_lock(&p->lock);
	take_shards(p, callers);
	memcpy(denied, p->denied, sizeof(p->denied));
	memcpy(out->recent, p->recent, p->n_recent * sizeof(p->recent[0]));
	out->n_recent = p->n_recent;
	out->interval_s = now - p->since < 1 ? 1 : now - p->since;
	if (out->interval_s > API_STATS_INTERVAL_MAX)
		out->interval_s = API_STATS_INTERVAL_MAX;
	memset(p->denied, 0, sizeof(p->denied));
	p->n_recent = 0;
	p->since = now;
	total = take_callers(callers, PEERSTATS_CALLERS + 1, out);
	atomic_store(&p->quiet, total == 0);
	pthread_mutex_unlock(&p->lock);
	snprintf(denied[PEERSTATS_DENIED].from, sizeof(denied->from), "%s", API_STATS_OTHER);
	snprintf(denied[PEERSTATS_DENIED].rule, sizeof(denied->rule), "%s", API_STATS_OTHER);
	take_denied(denied, PEERSTATS_DENIED + 1, out);
	free(callers);
	free(denied);
	return total;
}
