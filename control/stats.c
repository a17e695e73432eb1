/*
 * stats: the edges between services as the proxies' summaries report them
 * (see stats.h). Fixed arrays allocated once: STATS_EDGES_MAX edges of
 * STATS_BUCKETS buckets, a ring of STATS_RECENT_MAX denials.
 */
#include "stats.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/ca.h"

struct stats_bucket {
	int64_t epoch;                 /* time / STATS_BUCKET_S; 0: empty */
	int64_t requests, denied, errors_5xx;
	int64_t timed;                 /* requests behind the latencies below */
	double p50_sum;                /* p50 weighted by requests: averaged on reading */
	double p99_max;
};

struct stats_rule {
	char rule[POLICY_RULE_NAME_MAX + 1];
	int64_t n;
	int64_t last;
};

struct stats_edge {
	char from[SERVICE_NAME_MAX + 1], to[SERVICE_NAME_MAX + 1];
	int64_t last;                  /* last summary that named it */
	struct stats_bucket b[STATS_BUCKETS];
	struct stats_rule rules[STATS_RULES_PER_EDGE + 1];   /* last: API_STATS_OTHER */
};

struct stats_denial {
	int64_t at;
	char from[SERVICE_NAME_MAX + 1], to[SERVICE_NAME_MAX + 1];
	char rule[POLICY_RULE_NAME_MAX + 1];
	char method[API_STATS_METHOD_MAX + 1];
	char path[API_STATS_PATH_MAX + 1];
};

struct stats {
	size_t n_edges;
	struct stats_edge edges[STATS_EDGES_MAX];
	struct stats_edge other;       /* the edges beyond STATS_EDGES_MAX */
	int64_t folded;                /* summaries' callers counted in other */
	struct stats_denial recent[STATS_RECENT_MAX];   /* oldest first, distinct */
	size_t n_recent;
	int64_t accepted, refused;
	char last_refusal[300];
};

struct stats *stats_new(void)
{
	struct stats *s = calloc(1, sizeof(*s));

	if (s) {
		snprintf(s->other.from, sizeof(s->other.from), "%s", API_STATS_OTHER);
		snprintf(s->other.to, sizeof(s->other.to), "%s", API_STATS_OTHER);
	}
	return s;
}

void stats_free(struct stats *s)
{
	free(s);
}

static bool edge_alive(const struct stats_edge *e, int64_t now)
{
	return e->last > now - (int64_t)STATS_BUCKETS * STATS_BUCKET_S;
}

/* Drops the edges whose ring holds nothing any more. */
static void evict(struct stats *s, int64_t now)
{
	for (size_t i = 0; i < s->n_edges;) {
		if (edge_alive(&s->edges[i], now)) {
			i++;
			continue;
		}
		s->edges[i] = s->edges[--s->n_edges];
	}
}

/* The edge from -> to, made when there is room, else the overflow edge. */
static struct stats_edge *edge_of(struct stats *s, const char *from, const char *to)
{
	struct stats_edge *e;

	for (size_t i = 0; i < s->n_edges; i++) {
		e = &s->edges[i];
		if (strcmp(e->from, from) == 0 && strcmp(e->to, to) == 0)
			return e;
	}
	if (s->n_edges == STATS_EDGES_MAX)
		return &s->other;
	e = &s->edges[s->n_edges++];
	memset(e, 0, sizeof(*e));
	snprintf(e->from, sizeof(e->from), "%s", from);
	snprintf(e->to, sizeof(e->to), "%s", to);
	return e;
}

static struct stats_bucket *bucket_of(struct stats_edge *e, int64_t now)
{
	int64_t epoch = now / STATS_BUCKET_S;
	struct stats_bucket *b = &e->b[epoch % STATS_BUCKETS];

	if (b->epoch != epoch) {
		memset(b, 0, sizeof(*b));
		b->epoch = epoch;
	}
	return b;
}

static void add_caller(struct stats_edge *e, const struct api_stats_caller *c, int64_t now)
{
	struct stats_bucket *b = bucket_of(e, now);

	e->last = now;
	b->requests += c->requests;
	b->denied += c->denied;
	b->errors_5xx += c->errors_5xx;
	if (c->has_latency && c->requests > 0) {
		b->timed += c->requests;
		b->p50_sum += c->p50_ms * (double)c->requests;
		if (c->p99_ms > b->p99_max)
			b->p99_max = c->p99_ms;
	}
}

static void add_rule(struct stats_edge *e, const char *rule, int64_t n, int64_t now)
{
	struct stats_rule *r;
	size_t i;

	for (i = 0; i < STATS_RULES_PER_EDGE; i++) {
		r = &e->rules[i];
		if (r->rule[0] && r->last <= now - STATS_WINDOW_S)
			memset(r, 0, sizeof(*r));     /* out of the window: reuse */
		if (!r->rule[0] || strcmp(r->rule, rule) == 0)
			break;
	}
	r = &e->rules[i];
	if (!r->rule[0])
		snprintf(r->rule, sizeof(r->rule), "%s",
		         i < STATS_RULES_PER_EDGE ? rule : API_STATS_OTHER);
	if (r->last <= now - STATS_WINDOW_S)
		r->n = 0;
	r->n += n;
	r->last = now;
}

static bool same_denial(const struct stats_denial *d, const struct stats_denial *n)
{
	return strcmp(d->from, n->from) == 0 && strcmp(d->to, n->to) == 0 &&
	       strcmp(d->rule, n->rule) == 0 && strcmp(d->method, n->method) == 0 &&
	       strcmp(d->path, n->path) == 0;
}

/* Appends a denial (oldest first); the same one again only moves to the
 * end with its new time, so repeats do not push other kinds out. */
static void add_recent(struct stats *s, const char *to, const struct api_stats_recent *r)
{
	struct stats_denial n;
	size_t i;

	n.at = r->at;
	snprintf(n.from, sizeof(n.from), "%s", r->from);
	snprintf(n.to, sizeof(n.to), "%s", to);
	snprintf(n.rule, sizeof(n.rule), "%s", r->rule);
	snprintf(n.method, sizeof(n.method), "%s", r->method);
	snprintf(n.path, sizeof(n.path), "%s", r->path);
	for (i = 0; i < s->n_recent && !same_denial(&s->recent[i], &n); i++)
		;
	if (i == s->n_recent && s->n_recent == STATS_RECENT_MAX)
		i = 0;
	else if (i == s->n_recent)
		s->n_recent++;
	memmove(&s->recent[i], &s->recent[i + 1], (s->n_recent - 1 - i) * sizeof(n));
	s->recent[s->n_recent - 1] = n;
}

void stats_record(struct stats *s, const char *service, const struct api_stats_summary *sum,
                  int64_t now)
{
	evict(s, now);
	for (size_t i = 0; i < sum->n_callers; i++) {
		struct stats_edge *e = edge_of(s, sum->callers[i].from, service);

		if (e == &s->other)
			s->folded++;
		add_caller(e, &sum->callers[i], now);
	}
	for (size_t i = 0; i < sum->n_denied; i++)
		add_rule(edge_of(s, sum->denied[i].from, service), sum->denied[i].rule,
		         sum->denied[i].n, now);
	for (size_t i = 0; i < sum->n_recent; i++)
		add_recent(s, service, &sum->recent[i]);
	s->accepted++;
}

void stats_refused(struct stats *s, const char *service, const char *why)
{
	s->refused++;
	snprintf(s->last_refusal, sizeof(s->last_refusal), "%s: %s", service, why);
}

/* ---------------------------------------------------------------- the answer */

/* The sums of an edge's buckets within the window. */
struct stats_sum {
	int64_t requests, denied, errors_5xx, timed, kept;
	double p50_sum, p99_max;
};

static void sum_edge(const struct stats_edge *e, int64_t now, struct stats_sum *t)
{
	int64_t epoch = now / STATS_BUCKET_S, oldest = (now - STATS_WINDOW_S) / STATS_BUCKET_S;

	memset(t, 0, sizeof(*t));
	for (size_t i = 0; i < STATS_BUCKETS; i++) {
		const struct stats_bucket *b = &e->b[i];

		if (b->epoch <= epoch - STATS_BUCKETS || b->epoch > epoch)
			continue;
		t->kept += b->requests;
		if (b->epoch <= oldest)
			continue;
		t->requests += b->requests;
		t->denied += b->denied;
		t->errors_5xx += b->errors_5xx;
		t->timed += b->timed;
		t->p50_sum += b->p50_sum;
		if (b->p99_max > t->p99_max)
			t->p99_max = b->p99_max;
	}
}

static double rate(int64_t n)
{
	return (double)(int64_t)((double)n / STATS_WINDOW_S * 1000 + 0.5) / 1000;
}

static json_t *counts_json(const struct stats_sum *t)
{
	json_t *o = json_pack("{s:I, s:I, s:I, s:f, s:f, s:f}", "requests", (json_int_t)t->requests,
	                      "denied", (json_int_t)t->denied, "errors_5xx",
	                      (json_int_t)t->errors_5xx, "request_rate", rate(t->requests),
	                      "denial_rate", rate(t->denied), "error_rate", rate(t->errors_5xx));

	if (o && t->timed > 0) {
		json_object_set_new(o, "p50_ms", json_real(t->p50_sum / (double)t->timed));
		json_object_set_new(o, "p99_ms", json_real(t->p99_max));
	}
	return o;
}

static json_t *edge_json(const struct stats_edge *e, const struct stats_sum *t, int64_t now)
{
	json_t *o = counts_json(t), *rules = json_object();
	char when[CA_TIME_LEN] = "";

	if (!o || !rules) {
		json_decref(o);
		json_decref(rules);
		return NULL;
	}
	for (size_t i = 0; i <= STATS_RULES_PER_EDGE; i++) {
		const struct stats_rule *r = &e->rules[i];

		if (r->rule[0] && r->n > 0 && r->last > now - STATS_WINDOW_S)
			json_object_set_new(rules, r->rule, json_integer(r->n));
	}
	ca_time_rfc3339(e->last, when);
	json_object_set_new(o, "from", json_string(e->from));
	json_object_set_new(o, "to", json_string(e->to));
	json_object_set_new(o, "denied_by_rule", rules);
	json_object_set_new(o, "last_seen", json_string(when));
	return o;
}

static void bump(json_t *o, const char *key, int64_t n)
{
	json_object_set_new(o, key, json_integer(json_integer_value(json_object_get(o, key)) + n));
}

/* Adds t into the service name's entry of the services object. */
static void add_service(json_t *svcs, const char *name, const struct stats_sum *t)
{
	json_t *o = json_object_get(svcs, name);

	if (!o) {
		o = json_pack("{s:I, s:I, s:I}", "requests", (json_int_t)0, "denied", (json_int_t)0,
		              "errors_5xx", (json_int_t)0);
		if (!o || json_object_set_new(svcs, name, o) < 0)
			return;
	}
	bump(o, "requests", t->requests);
	bump(o, "denied", t->denied);
	bump(o, "errors_5xx", t->errors_5xx);
}

/* {name: {...}} as [{"name", ..., rates}] */
static json_t *services_list(json_t *svcs)
{
	json_t *arr = json_array(), *o;
	const char *name;

	json_object_foreach(svcs, name, o) {
		struct stats_sum t = {
			.requests = json_integer_value(json_object_get(o, "requests")),
			.denied = json_integer_value(json_object_get(o, "denied")),
			.errors_5xx = json_integer_value(json_object_get(o, "errors_5xx")),
		};
		json_t *e = counts_json(&t);

		if (e && json_object_set_new(e, "name", json_string(name)) == 0)
			json_array_append_new(arr, e);
	}
	return arr;
}

static json_t *recent_json(const struct stats *s)
{
	json_t *arr = json_array();

	/* Newest first. */
	for (size_t i = 0; arr && i < s->n_recent; i++) {
		const struct stats_denial *d = &s->recent[s->n_recent - 1 - i];
		char when[CA_TIME_LEN] = "";

		ca_time_rfc3339(d->at, when);
		json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "at", when,
		                                     "from", d->from, "to", d->to, "rule", d->rule,
		                                     "method", d->method, "path", d->path));
	}
	return arr;
}

static json_t *edges_json(struct stats *s, int64_t now, json_t *svcs)
{
	json_t *arr = json_array();
	struct stats_sum t;

	for (size_t i = 0; arr && i < s->n_edges; i++) {
		sum_edge(&s->edges[i], now, &t);
		if (t.kept == 0 && !edge_alive(&s->edges[i], now))
			continue;
		json_array_append_new(arr, edge_json(&s->edges[i], &t, now));
		add_service(svcs, s->edges[i].to, &t);
	}
	return arr;
}

json_t *stats_json(struct stats *s, int64_t now)
{
	json_auto_t *svcs = json_object();
	json_t *out, *edges;
	struct stats_sum other;
	char when[CA_TIME_LEN] = "";

	evict(s, now);
	edges = edges_json(s, now, svcs);
	sum_edge(&s->other, now, &other);
	ca_time_rfc3339(now, when);
	out = json_pack("{s:s, s:i, s:i, s:o, s:o, s:o, s:b, s:{s:I, s:I, s:I}, s:{s:I, s:I, s:s}}",
	                "now", when, "window_s", STATS_WINDOW_S, "kept_s",
	                STATS_BUCKETS * STATS_BUCKET_S, "edges", edges, "services",
	                services_list(svcs), "recent_denials", recent_json(s), "truncated",
	                edge_alive(&s->other, now), "others", "callers_folded",
	                (json_int_t)s->folded, "requests", (json_int_t)other.requests, "denied",
	                (json_int_t)other.denied, "summaries", "accepted", (json_int_t)s->accepted,
	                "refused", (json_int_t)s->refused, "last_refusal", s->last_refusal);
	return out;
}
