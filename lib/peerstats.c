/*
 * peerstats: a proxy's per-caller counters between two summaries (see
 * peerstats.h). Fixed arrays, no allocation after peerstats_new(): a
 * caller beyond PEERSTATS_CALLERS is counted in the API_STATS_OTHER slot,
 * so 10,000 callers cost what 64 do.
 */
#include "meshlet/peerstats.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "meshlet/identity.h"

static const double bucket_ms[PEERSTATS_BUCKETS - 1] = {
	0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000,
};

struct ps_caller {
	char from[SERVICE_NAME_MAX + 1];   /* "" when the slot is free */
	int64_t requests, denied, errors_5xx, answers;
	int64_t buckets[PEERSTATS_BUCKETS];
};

struct ps_denied {
	char from[SERVICE_NAME_MAX + 1];
	char rule[POLICY_RULE_NAME_MAX + 1];
	int64_t n;
};

struct peerstats {
	pthread_mutex_t lock;
	time_t since;                      /* start of the interval (monotonic) */
	struct ps_caller callers[PEERSTATS_CALLERS + 1];   /* last: API_STATS_OTHER */
	struct ps_denied denied[PEERSTATS_DENIED + 1];     /* last: API_STATS_OTHER */
	struct api_stats_recent recent[API_STATS_RECENT_MAX];   /* oldest first, distinct */
	size_t n_recent;
	int64_t decisions;                 /* in this interval */
	bool quiet;                        /* the last interval counted nothing */
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
	p->quiet = true;
	return p;
}

void peerstats_free(struct peerstats *p)
{
	if (!p)
		return;
	pthread_mutex_destroy(&p->lock);
	free(p);
}

void peerstats_caller(const char *peer_id, char *out)
{
	const char *name = peer_id ? strrchr(peer_id, '/') : NULL;

	/* spiffe://<td>/svc/<name>: the name after the last '/', preceded by "/svc". */
	if (name && name - peer_id >= 4 && strncmp(name - 4, "/svc", 4) == 0 &&
	    strncmp(peer_id, "spiffe://", 9) == 0 && identity_valid_service(name + 1)) {
		snprintf(out, SERVICE_NAME_MAX + 1, "%s", name + 1);
		return;
	}
	snprintf(out, SERVICE_NAME_MAX + 1, "%s", API_STATS_OTHER);
}

/* The slot of from (claiming a free one), or the API_STATS_OTHER slot. */
static struct ps_caller *caller_slot(struct peerstats *p, const char *from)
{
	for (size_t i = 0; i < PEERSTATS_CALLERS; i++) {
		struct ps_caller *c = &p->callers[i];

		if (c->from[0] == '\0') {
			snprintf(c->from, sizeof(c->from), "%s", from);
			return c;
		}
		if (strcmp(c->from, from) == 0)
			return c;
	}
	return &p->callers[PEERSTATS_CALLERS];
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

void peerstats_decision(struct peerstats *p, const char *peer_id, bool allow, const char *rule,
                        const char *method, const char *path)
{
	char from[SERVICE_NAME_MAX + 1];
	struct ps_caller *c;
	bool news;

	if (!p)
		return;
	if (!rule || !policy_rule_name_valid(rule))
		rule = API_STATS_OTHER;
	peerstats_caller(peer_id, from);
	pthread_mutex_lock(&p->lock);
	c = caller_slot(p, from);
	c->requests++;
	/* The first decision after a quiet interval, or a new kind of denial,
	 * is news worth reporting now rather than at the next poll. */
	news = p->quiet && p->decisions == 0;
	p->decisions++;
	if (!allow) {
		c->denied++;
		denied_slot(p, from, rule)->n++;
		news |= remember_denial(p, from, rule, method, path);
	}
	/* Under the lock: peerstats_set_nudge(NULL) then waits for a call in
	 * progress, so the hook's owner may be freed after it. */
	if (news && p->nudge)
		p->nudge(p->nudge_ctx);
	pthread_mutex_unlock(&p->lock);
}

void peerstats_answer(struct peerstats *p, const char *peer_id, int status, double seconds)
{
	char from[SERVICE_NAME_MAX + 1];
	double ms = seconds > 0 ? seconds * 1e3 : 0;
	size_t b = 0;
	struct ps_caller *c;

	if (!p)
		return;
	while (b < PEERSTATS_BUCKETS - 1 && ms > bucket_ms[b])
		b++;
	peerstats_caller(peer_id, from);
	pthread_mutex_lock(&p->lock);
	c = caller_slot(p, from);
	c->answers++;
	c->buckets[b]++;
	if (status >= 500 && status <= 599)
		c->errors_5xx++;
	pthread_mutex_unlock(&p->lock);
}

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
		if (all[i].requests == 0 && all[i].answers == 0)
			continue;
		if (kept < API_STATS_CALLERS_MAX - 1 && strcmp(all[i].from, API_STATS_OTHER) != 0)
			caller_out(&out->callers[kept++], &all[i]);
		else
			merge_caller(&other, &all[i]);
	}
	if (other.requests || other.answers)
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
	/* Copied out under the lock, sorted and folded outside it. */
	struct ps_caller *callers = malloc(sizeof(p->callers));
	struct ps_denied *denied = malloc(sizeof(p->denied));
	time_t now = mono_now();
	int64_t total = 0;

	memset(out, 0, sizeof(*out));
	if (!callers || !denied) {
		free(callers);
		free(denied);
		return 0;
	}
	pthread_mutex_lock(&p->lock);
	memcpy(callers, p->callers, sizeof(p->callers));
	memcpy(denied, p->denied, sizeof(p->denied));
	memcpy(out->recent, p->recent, p->n_recent * sizeof(p->recent[0]));
	out->n_recent = p->n_recent;
	out->interval_s = now - p->since < 1 ? 1 : now - p->since;
	if (out->interval_s > API_STATS_INTERVAL_MAX)
		out->interval_s = API_STATS_INTERVAL_MAX;
	memset(p->callers, 0, sizeof(p->callers));
	memset(p->denied, 0, sizeof(p->denied));
	p->n_recent = 0;
	p->quiet = p->decisions == 0;
	p->decisions = 0;
	p->since = now;
	pthread_mutex_unlock(&p->lock);
	snprintf(callers[PEERSTATS_CALLERS].from, sizeof(callers->from), "%s", API_STATS_OTHER);
	snprintf(denied[PEERSTATS_DENIED].from, sizeof(denied->from), "%s", API_STATS_OTHER);
	snprintf(denied[PEERSTATS_DENIED].rule, sizeof(denied->rule), "%s", API_STATS_OTHER);
	total = take_callers(callers, PEERSTATS_CALLERS + 1, out);
	take_denied(denied, PEERSTATS_DENIED + 1, out);
	free(callers);
	free(denied);
	return total;
}
