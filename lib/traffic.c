/*
 * traffic: the traffic document (docs/traffic.md) parsed whole into a
 * struct traffic, and the pure pieces that apply it (see traffic.h).
 *
 * Parsing refuses anything that would be silently ignored or could not be
 * honoured (an unknown field, a negative time, a percent over 100), so an
 * operator's typo never turns into "no fault injected" or "no limit".
 */
#include "meshlet/traffic.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/identity.h"

static const char *const doc_keys[] = {"service", "timeouts", "retries", "outlier", "limits",
                                       "rate_limits", "faults", NULL};
static const char *const timeout_keys[] = {"connect_seconds", "request_seconds", NULL};
static const char *const retry_keys[] = {"attempts", "on", "budget_percent", "backoff_ms", NULL};
static const char *const outlier_keys[] = {"consecutive_failures", "eject_seconds",
                                           "max_ejected_percent", NULL};
static const char *const limit_keys[] = {"max_connections", "max_pending_requests", NULL};
static const char *const rate_keys[] = {"name", "from", "methods", "paths", "headers",
                                        "requests_per_second", "burst", "per", NULL};
static const char *const fault_keys[] = {"name", "from", "methods", "paths", "headers",
                                         "percent", "delay_ms", "abort_status", NULL};

/* ---- small helpers ---------------------------------------------------- */

/* A number (integer or real) in [min, max]; absent leaves *out. */
static int get_number(const json_t *obj, const char *path, const char *key, bool required,
                      double min, double max, double *out, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *v = json_object_get(obj, key);
	double d;

	json_path_key(p, sizeof(p), path, key);
	if (!v)
		return required ? err_set(err, p, "required") : 0;
	if (!json_is_number(v))
		return err_set(err, p, "must be a number");
	d = json_number_value(v);
	if (!(d >= min && d <= max))   /* NaN fails too */
		return err_set(err, p, "must be %g..%g", min, max);
	*out = d;
	return 0;
}

static int get_uint(const json_t *obj, const char *path, const char *key, long long min,
                    long long max, unsigned *out, struct meshlet_err *err)
{
	long long v = *out;

	if (json_get_int(obj, path, key, false, min, max, &v, err) < 0)
		return -EINVAL;
	*out = (unsigned)v;
	return 0;
}

static int get_u32(const json_t *obj, const char *path, const char *key, long long min,
                   long long max, uint32_t *out, struct meshlet_err *err)
{
	unsigned v = *out;

	if (get_uint(obj, path, key, min, max, &v, err) < 0)
		return -EINVAL;
	*out = v;
	return 0;
}

/* An optional sub-object key of doc, checked against keys; *out NULL when absent. */
static int get_section(const json_t *doc, const char *key, const char *const *keys,
                       const json_t **out, struct meshlet_err *err)
{
	*out = NULL;
	if (json_get_object(doc, "", key, false, out, err) < 0)
		return -EINVAL;
	return *out ? json_check_object(*out, key, keys, err) : 0;
}

/* ---- timeouts, limits, outlier ------------------------------------------ */

static int parse_timeouts(const json_t *doc, struct traffic *t, struct meshlet_err *err)
{
	const json_t *o;

	if (get_section(doc, "timeouts", timeout_keys, &o, err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	if (json_get_seconds(o, "timeouts", "connect_seconds", 0.001, 3600, &t->connect_ms, err) < 0 ||
	    json_get_seconds(o, "timeouts", "request_seconds", 0.001, 86400, &t->request_ms, err) < 0)
		return -EINVAL;
	return 0;
}

static int parse_limits(const json_t *doc, struct traffic *t, struct meshlet_err *err)
{
	const json_t *o;

	if (get_section(doc, "limits", limit_keys, &o, err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	if (get_u32(o, "limits", "max_connections", 1, TRAFFIC_LIMIT_MAX, &t->max_connections,
	            err) < 0 ||
	    get_u32(o, "limits", "max_pending_requests", 1, TRAFFIC_LIMIT_MAX,
	            &t->max_pending_requests, err) < 0)
		return -EINVAL;
	return 0;
}

static int parse_outlier(const json_t *doc, struct traffic *t, struct meshlet_err *err)
{
	struct traffic_outlier *ol = &t->outlier;
	const json_t *o;

	if (get_section(doc, "outlier", outlier_keys, &o, err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	/* The section turns ejection on: its fields default. */
	ol->consecutive_failures = TRAFFIC_OUTLIER_FAILURES_DEFAULT;
	ol->eject_ms = TRAFFIC_OUTLIER_EJECT_MS_DEFAULT;
	ol->max_ejected_percent = TRAFFIC_OUTLIER_MAX_PERCENT_DEFAULT;
	if (get_uint(o, "outlier", "consecutive_failures", 1, 1000, &ol->consecutive_failures,
	             err) < 0 ||
	    json_get_seconds(o, "outlier", "eject_seconds", 1, 3600, &ol->eject_ms, err) < 0 ||
	    get_uint(o, "outlier", "max_ejected_percent", 0, 100, &ol->max_ejected_percent,
	             err) < 0)
		return -EINVAL;
	return 0;
}

/* ---- retries ------------------------------------------------------------ */

/* One entry of retries.on: a name, or a 5xx status as a string ("503"). */
static int retry_on_entry(const char *s, const char *path, struct traffic_retries *r,
                          struct meshlet_err *err)
{
	static const struct { const char *name; unsigned bit; } names[] = {
		{"connect-failure", TRAFFIC_ON_CONNECT_FAILURE}, {"reset", TRAFFIC_ON_RESET},
		{"timeout", TRAFFIC_ON_TIMEOUT}, {"5xx", TRAFFIC_ON_5XX},
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i].name) != 0)
			continue;
		if (r->on & names[i].bit)
			return err_set(err, path, "\"%s\" given twice", s);
		r->on |= names[i].bit;
		return 0;
	}
	if (strlen(s) == 3 && s[0] == '5' && s[1] >= '0' && s[1] <= '9' && s[2] >= '0' &&
	    s[2] <= '9') {
		int k = (s[1] - '0') * 10 + (s[2] - '0');

		if (r->on_status[k])
			return err_set(err, path, "\"%s\" given twice", s);
		r->on_status[k] = true;
		return 0;
	}
	return err_set(err, path, "must be \"connect-failure\", \"reset\", \"timeout\", \"5xx\" "
	               "or a status 500..599 as a string");
}

static int parse_retry_on(const json_t *o, struct traffic_retries *r, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *arr = NULL, *v;
	const char *s;
	size_t i;

	if (json_get_array(o, "retries", "on", false, &arr, err) < 0)
		return -EINVAL;
	if (!arr) {
		r->on = TRAFFIC_ON_CONNECT_FAILURE | TRAFFIC_ON_RESET;
		r->on_status[3] = true;                     /* 503 */
		return 0;
	}
	if (json_array_size(arr) == 0)
		return err_set(err, "retries.on", "must not be empty (omit retries for none)");
	json_array_foreach(arr, i, v) {
		json_path_index(p, sizeof(p), "retries.on", i);
		if (json_as_str(v, p, &s, err) < 0 || retry_on_entry(s, p, r, err) < 0)
			return -EINVAL;
	}
	return 0;
}

static int parse_retries(const json_t *doc, struct traffic *t, struct meshlet_err *err)
{
	struct traffic_retries *r = &t->retries;
	const json_t *o;

	if (get_section(doc, "retries", retry_keys, &o, err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	r->attempts = 1;
	r->budget_percent = TRAFFIC_BUDGET_PERCENT_DEFAULT;
	r->backoff_ms = TRAFFIC_BACKOFF_MS_DEFAULT;
	if (get_uint(o, "retries", "attempts", 0, TRAFFIC_ATTEMPTS_MAX, &r->attempts, err) < 0 ||
	    get_uint(o, "retries", "budget_percent", 0, 100, &r->budget_percent, err) < 0 ||
	    get_u32(o, "retries", "backoff_ms", 0, TRAFFIC_BACKOFF_MS_MAX, &r->backoff_ms, err) < 0)
		return -EINVAL;
	return parse_retry_on(o, r, err);
}

/* ---- rate limits and faults --------------------------------------------- */

/* The name and the selectors every rule of a list has. */
static int parse_selector(const json_t *v, const char *path, const char *const *keys,
                          struct policy_rule *sel, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const char *name = NULL;

	if (json_check_object(v, path, keys, err) < 0 ||
	    json_get_str(v, path, "name", true, &name, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "name");
	if (!policy_rule_name_valid(name))
		return err_set(err, p, "must be 1..%d characters of [A-Za-z0-9._-]",
		               POLICY_RULE_NAME_MAX);
	sel->name = strdup(name);
	if (!sel->name)
		return -ENOMEM;
	/* Selected as an allow rule is: HTTP fields never select a tcp connection. */
	sel->action = POLICY_ALLOW;
	return policy_rule_parse_select(v, path, sel, err);
}

static int parse_rate_limit(const json_t *v, const char *path, void *item,
                            struct meshlet_err *err)
{
	struct traffic_rate_limit *rl = item;
	const char *per = "caller";
	char p[MESHLET_PATH_MAX];
	double burst = 0;
	int rc;

	if ((rc = parse_selector(v, path, rate_keys, &rl->sel, err)) < 0)
		return rc;
	if (get_number(v, path, "requests_per_second", true, 0.001, TRAFFIC_RPS_MAX, &rl->rps,
	               err) < 0 ||
	    get_number(v, path, "burst", false, 1, TRAFFIC_BURST_MAX, &burst, err) < 0 ||
	    json_get_str(v, path, "per", false, &per, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "burst");
	if (burst != (double)(uint32_t)burst)
		return err_set(err, p, "must be a whole number of requests");
	/* Default burst: one second's worth, at least one request. */
	rl->burst = burst > 0 ? (uint32_t)burst : (rl->rps < 1 ? 1 : (uint32_t)(rl->rps + 0.999));
	json_path_key(p, sizeof(p), path, "per");
	if (strcmp(per, "caller") != 0 && strcmp(per, "rule") != 0)
		return err_set(err, p, "must be \"caller\" (a bucket per caller identity) or "
		               "\"rule\" (one bucket for every caller)");
	rl->per_caller = strcmp(per, "caller") == 0;
	return 0;
}

static int parse_fault(const json_t *v, const char *path, void *item, struct meshlet_err *err)
{
	struct traffic_fault *f = item;
	long long delay = -1, status = 0;
	int rc;

	if ((rc = parse_selector(v, path, fault_keys, &f->sel, err)) < 0)
		return rc;
	if (get_number(v, path, "percent", true, 0, 100, &f->percent, err) < 0 ||
	    json_get_int(v, path, "delay_ms", false, 0, TRAFFIC_DELAY_MS_MAX, &delay, err) < 0 ||
	    json_get_int(v, path, "abort_status", false, 400, 599, &status, err) < 0)
		return -EINVAL;
	if (delay < 0 && status == 0)
		return err_set(err, path, "a fault needs delay_ms, abort_status or both");
	f->has_delay = delay >= 0;
	f->delay_ms = f->has_delay ? (uint32_t)delay : 0;
	f->abort_status = (int)status;
	return 0;
}

typedef int (*rule_fn)(const json_t *v, const char *path, void *item, struct meshlet_err *err);

/* A list of named rules (key of doc): items of size elem, parsed by fn,
 * counted in *n before each is parsed so traffic_free() sees a half one. */
static int parse_rules(const json_t *doc, const char *key, size_t elem, void **items, size_t *n,
                       rule_fn fn, policy_name_at_fn name_at, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *arr = NULL, *v;
	size_t i;
	int rc;

	if (json_get_array(doc, "", key, false, &arr, err) < 0)
		return -EINVAL;
	if (!arr || json_array_size(arr) == 0)
		return 0;
	if (json_array_size(arr) > TRAFFIC_MAX_RULES)
		return err_set(err, key, "at most %d rules", TRAFFIC_MAX_RULES);
	*items = calloc(json_array_size(arr), elem);
	if (!*items)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		json_path_index(p, sizeof(p), key, i);
		*n = i + 1;
		rc = fn(v, p, (char *)*items + i * elem, err);
		if (rc < 0)
			return rc;
	}
	return policy_names_unique(*items, *n, name_at, key, err);
}

static const char *rate_name_at(const void *items, size_t i)
{
	return ((const struct traffic_rate_limit *)items)[i].sel.name;
}

static const char *fault_name_at(const void *items, size_t i)
{
	return ((const struct traffic_fault *)items)[i].sel.name;
}

/* ---- the document ------------------------------------------------------- */

static void set_defaults(struct traffic *t)
{
	t->connect_ms = TRAFFIC_CONNECT_MS_DEFAULT;
	t->request_ms = TRAFFIC_REQUEST_MS_DEFAULT;
}

static int parse_top(const json_t *doc, struct traffic *t, struct meshlet_err *err)
{
	const char *service = NULL;
	int rc;

	if (json_check_object(doc, "", doc_keys, err) < 0 ||
	    json_get_str(doc, "", "service", true, &service, err) < 0)
		return -EINVAL;
	if (!identity_valid_service(service))
		return err_set(err, "service",
		               "not a valid service name ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)");
	t->service = strdup(service);
	if (!t->service)
		return -ENOMEM;
	if (parse_timeouts(doc, t, err) < 0 || parse_retries(doc, t, err) < 0 ||
	    parse_outlier(doc, t, err) < 0 || parse_limits(doc, t, err) < 0)
		return -EINVAL;
	rc = parse_rules(doc, "rate_limits", sizeof(*t->rate_limits), (void **)&t->rate_limits,
	                 &t->n_rate_limits, parse_rate_limit, rate_name_at, err);
	if (rc < 0)
		return rc;
	return parse_rules(doc, "faults", sizeof(*t->faults), (void **)&t->faults, &t->n_faults,
	                   parse_fault, fault_name_at, err);
}

struct traffic *traffic_parse(const json_t *doc, struct meshlet_err *err)
{
	struct traffic *t = calloc(1, sizeof(*t));
	int rc;

	if (!t) {
		err_set(err, "", "out of memory");
		return NULL;
	}
	set_defaults(t);
	rc = parse_top(doc, t, err);
	if (rc < 0) {
		if (rc == -ENOMEM)
			err_set(err, "", "out of memory");
		traffic_free(t);
		return NULL;
	}
	return t;
}

struct traffic *traffic_load(const char *file, struct meshlet_err *err)
{
	struct traffic *t;
	json_t *doc;

	doc = json_load_strict(file, POLICY_MAX_FILE, MESHLET_JSON_MAX_DEPTH, err);
	if (!doc)
		return NULL;
	t = traffic_parse(doc, err);
	json_decref(doc);
	return t;
}

/* Element i of a set refused: its path prefixed with "[i]". */
static void set_err_prefix(struct meshlet_err *err, size_t i)
{
	char elem[32], path[MESHLET_PATH_MAX];

	if (!err)
		return;
	json_path_index(elem, sizeof(elem), "", i);
	json_path_key(path, sizeof(path), elem, err->path);
	if (!err->path[0])
		snprintf(path, sizeof(path), "%s", elem);
	snprintf(err->path, sizeof(err->path), "%s", path);
}

int traffic_parse_set(const json_t *doc, struct traffic ***out, size_t *n,
                      struct meshlet_err *err)
{
	size_t count = json_is_array(doc) ? json_array_size(doc) : 1, i;
	struct traffic **set = calloc(count ? count : 1, sizeof(*set));

	*out = NULL;
	*n = 0;
	if (!set)
		return err_set(err, "", "out of memory");
	for (i = 0; i < count; i++) {
		set[i] = traffic_parse(json_is_array(doc) ? json_array_get(doc, i) : doc, err);
		if (!set[i]) {
			if (json_is_array(doc))
				set_err_prefix(err, i);
			goto fail;
		}
		for (size_t k = 0; k < i; k++) {
			if (strcmp(set[k]->service, set[i]->service) == 0) {
				char elem[MESHLET_PATH_MAX], p[MESHLET_PATH_MAX];

				json_path_index(elem, sizeof(elem), "", i);
				json_path_key(p, sizeof(p), elem, "service");
				err_set(err, p, "a second document for service %s", set[i]->service);
				i++;
				goto fail;
			}
		}
	}
	*out = set;
	*n = count;
	return 0;
fail:
	traffic_set_free(set, i);
	return -EINVAL;
}

int traffic_load_set(const char *file, struct traffic ***out, size_t *n, struct meshlet_err *err)
{
	json_t *doc = json_load_strict(file, POLICY_MAX_FILE, MESHLET_JSON_MAX_DEPTH, err);
	int rc;

	*out = NULL;
	*n = 0;
	if (!doc)
		return -EINVAL;
	rc = traffic_parse_set(doc, out, n, err);
	json_decref(doc);
	return rc;
}

void traffic_set_free(struct traffic **set, size_t n)
{
	for (size_t i = 0; set && i < n; i++)
		traffic_free(set[i]);
	free(set);
}

struct traffic *traffic_default(const char *service)
{
	struct traffic *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	set_defaults(t);
	t->service = strdup(service);
	if (!t->service) {
		free(t);
		return NULL;
	}
	return t;
}

void traffic_free(struct traffic *t)
{
	size_t i;

	if (!t)
		return;
	for (i = 0; i < t->n_rate_limits; i++)
		policy_rule_free(&t->rate_limits[i].sel);
	for (i = 0; i < t->n_faults; i++)
		policy_rule_free(&t->faults[i].sel);
	free(t->rate_limits);
	free(t->faults);
	free(t->service);
	free(t);
}

bool traffic_rate_limit_selects(const struct traffic_rate_limit *rl,
                                const struct policy_request *req)
{
	return policy_rule_matches(&rl->sel, req);
}

bool traffic_fault_selects(const struct traffic_fault *f, const struct policy_request *req)
{
	return policy_rule_matches(&f->sel, req);
}

bool traffic_retry_on_status(const struct traffic_retries *r, int status)
{
	if (status < 500 || status > 599)
		return false;
	return (r->on & TRAFFIC_ON_5XX) || r->on_status[status - 500];
}

/* ---- token buckets ------------------------------------------------------ */

int64_t traffic_bucket_take(struct traffic_bucket *b, double rps, double burst, int64_t now_us)
{
	if (!b->started) {
		b->tokens = burst;
		b->last_us = now_us;
		b->started = true;
	}
	if (now_us > b->last_us) {
		b->tokens += (double)(now_us - b->last_us) * rps / 1e6;
		if (b->tokens > burst)
			b->tokens = burst;
		b->last_us = now_us;
	}
	if (b->tokens >= 1.0) {
		b->tokens -= 1.0;
		return 0;
	}
	/* Rounded up, so that waiting that long always finds the token. */
	return (int64_t)((1.0 - b->tokens) * 1e6 / rps) + 1;
}

unsigned traffic_retry_after_s(int64_t retry_after_us)
{
	int64_t s = (retry_after_us + 999999) / 1000000;

	return s < 1 ? 1 : (unsigned)s;
}

struct caller_bucket {
	char *caller;
	struct traffic_bucket b;
};

/*
 * The buckets of one rate limit: one per caller up to TRAFFIC_CALLERS_MAX,
 * then the overflow bucket (also the rule's one bucket when per rule).
 * Reference-counted: a new limiter for a new version of the document
 * shares them (traffic_limiter_inherit) with the old one, which
 * connections on the old snapshot still use; lock guards them.
 */
struct limit_buckets {
	atomic_int refs;
	pthread_mutex_t lock;
	struct caller_bucket *callers;
	size_t n, cap;
	struct traffic_bucket shared;
};

struct traffic_limiter {
	const struct traffic *t;
	struct limit_buckets **limits;     /* one per t->rate_limits */
};

static struct limit_buckets *buckets_new(void)
{
	struct limit_buckets *lb = calloc(1, sizeof(*lb));

	if (!lb)
		return NULL;
	atomic_init(&lb->refs, 1);
	pthread_mutex_init(&lb->lock, NULL);
	return lb;
}

static void buckets_unref(struct limit_buckets *lb)
{
	if (!lb || atomic_fetch_sub(&lb->refs, 1) != 1)
		return;
	for (size_t k = 0; k < lb->n; k++)
		free(lb->callers[k].caller);
	free(lb->callers);
	pthread_mutex_destroy(&lb->lock);
	free(lb);
}

struct traffic_limiter *traffic_limiter_new(const struct traffic *t)
{
	struct traffic_limiter *l = calloc(1, sizeof(*l));

	if (!l)
		return NULL;
	l->t = t;
	l->limits = calloc(t->n_rate_limits ? t->n_rate_limits : 1, sizeof(*l->limits));
	if (!l->limits) {
		free(l);
		return NULL;
	}
	for (size_t i = 0; i < t->n_rate_limits; i++) {
		if (!(l->limits[i] = buckets_new())) {
			traffic_limiter_free(l);
			return NULL;
		}
	}
	return l;
}

void traffic_limiter_free(struct traffic_limiter *l)
{
	if (!l)
		return;
	for (size_t i = 0; i < l->t->n_rate_limits; i++)
		buckets_unref(l->limits[i]);
	free(l->limits);
	free(l);
}

/* Same name, rate, burst and kind: the buckets mean the same. */
static bool same_limit(const struct traffic_rate_limit *a, const struct traffic_rate_limit *b)
{
	return strcmp(a->sel.name, b->sel.name) == 0 && a->rps == b->rps && a->burst == b->burst &&
	       a->per_caller == b->per_caller;
}

size_t traffic_limiter_inherit(struct traffic_limiter *l, const struct traffic_limiter *from)
{
	size_t kept = 0;

	for (size_t i = 0; from && i < l->t->n_rate_limits; i++) {
		for (size_t j = 0; j < from->t->n_rate_limits; j++) {
			if (!same_limit(&l->t->rate_limits[i], &from->t->rate_limits[j]))
				continue;
			atomic_fetch_add(&from->limits[j]->refs, 1);
			buckets_unref(l->limits[i]);
			l->limits[i] = from->limits[j];
			kept++;
			break;
		}
	}
	return kept;
}

/* Drops the buckets that have refilled to full by now: such a bucket is
 * the same as a new one, so forgetting it changes no decision. */
static void sweep_full(struct limit_buckets *lb, const struct traffic_rate_limit *rl,
                       int64_t now_us)
{
	size_t k = 0;

	for (size_t i = 0; i < lb->n; i++) {
		struct caller_bucket *cb = &lb->callers[i];
		double refill = (double)(now_us - cb->b.last_us) * rl->rps / 1e6;

		if (cb->b.tokens + refill >= (double)rl->burst) {
			free(cb->caller);
			continue;
		}
		lb->callers[k++] = *cb;
	}
	lb->n = k;
}

/* The bucket of caller under limit lb: found, made, or the shared one
 * when TRAFFIC_CALLERS_MAX callers hold a partly used bucket. */
static struct traffic_bucket *caller_bucket(struct limit_buckets *lb,
                                            const struct traffic_rate_limit *rl,
                                            const char *caller, int64_t now_us)
{
	struct caller_bucket *cb;

	for (size_t i = 0; i < lb->n; i++) {
		if (strcmp(lb->callers[i].caller, caller) == 0)
			return &lb->callers[i].b;
	}
	if (lb->n == TRAFFIC_CALLERS_MAX)
		sweep_full(lb, rl, now_us);
	if (lb->n == TRAFFIC_CALLERS_MAX)
		return &lb->shared;
	if (lb->n == lb->cap) {
		size_t cap = lb->cap ? lb->cap * 2 : 8;
		struct caller_bucket *grown;

		if (cap > TRAFFIC_CALLERS_MAX)
			cap = TRAFFIC_CALLERS_MAX;
		grown = realloc(lb->callers, cap * sizeof(*grown));
		if (!grown)
			return &lb->shared;
		lb->callers = grown;
		lb->cap = cap;
	}
	cb = &lb->callers[lb->n];
	cb->caller = strdup(caller);
	if (!cb->caller)
		return &lb->shared;
	cb->b = (struct traffic_bucket){0};
	lb->n++;
	return &cb->b;
}

const struct traffic_rate_limit *traffic_limiter_admit(struct traffic_limiter *l,
                                                       const struct policy_request *req,
                                                       int64_t now_us, int64_t *retry_after_us)
{
	for (size_t i = 0; i < l->t->n_rate_limits; i++) {
		const struct traffic_rate_limit *rl = &l->t->rate_limits[i];
		struct traffic_bucket *b;
		int64_t wait;

		struct limit_buckets *lb = l->limits[i];

		if (!traffic_rate_limit_selects(rl, req))
			continue;
		pthread_mutex_lock(&lb->lock);
		/* An unauthenticated caller (none on mTLS listeners) is one "". */
		b = rl->per_caller ? caller_bucket(lb, rl, req->peer_id ? req->peer_id : "", now_us)
		                   : &lb->shared;
		wait = traffic_bucket_take(b, rl->rps, (double)rl->burst, now_us);
		pthread_mutex_unlock(&lb->lock);
		if (wait > 0) {
			*retry_after_us = wait;
			return rl;
		}
	}
	return NULL;
}

/* ---- faults ------------------------------------------------------------- */

bool traffic_roll(double percent, uint64_t r)
{
	/* The top 53 bits as a uniform double in [0, 1). */
	double u = (double)(r >> 11) * (1.0 / 9007199254740992.0);

	return u * 100.0 < percent;
}

void traffic_fault_decide(const struct traffic *t, const struct policy_request *req,
                          traffic_rng_fn rng, void *rng_arg, struct traffic_fault_decision *out)
{
	memset(out, 0, sizeof(*out));
	for (size_t i = 0; i < t->n_faults; i++) {
		const struct traffic_fault *f = &t->faults[i];

		if (!traffic_fault_selects(f, req) || !traffic_roll(f->percent, rng(rng_arg)))
			continue;
		if (f->has_delay && (!out->delay || f->delay_ms > out->delay_ms)) {
			out->delay = f;
			out->delay_ms = f->delay_ms;
		}
		if (f->abort_status && !out->abort) {
			out->abort = f;
			out->abort_status = f->abort_status;
		}
	}
}

/* ---- retries ------------------------------------------------------------ */

/* The slot of now's second, emptied when it last held an older second. */
static size_t budget_slot(struct traffic_budget *b, int64_t now_us)
{
	int64_t s = now_us / 1000000;
	size_t i = (size_t)(s % TRAFFIC_BUDGET_WINDOW_S);

	if (b->slot_s[i] != s) {
		b->slot_s[i] = s;
		b->requests[i] = 0;
		b->retries[i] = 0;
	}
	return i;
}

void traffic_budget_request(struct traffic_budget *b, int64_t now_us)
{
	size_t i = budget_slot(b, now_us);

	if (b->requests[i] < UINT32_MAX)
		b->requests[i]++;
}

bool traffic_budget_try_retry(struct traffic_budget *b, unsigned percent, int64_t now_us)
{
	size_t cur = budget_slot(b, now_us);
	int64_t s = now_us / 1000000;
	uint64_t requests = 0, retries = 0;

	for (size_t i = 0; i < TRAFFIC_BUDGET_WINDOW_S; i++) {
		if (b->slot_s[i] > s - TRAFFIC_BUDGET_WINDOW_S && b->slot_s[i] <= s) {
			requests += b->requests[i];
			retries += b->retries[i];
		}
	}
	/* (retries + 1) / requests <= percent / 100, in integers. */
	if ((retries + 1) * 100 > requests * percent)
		return false;
	b->retries[cur]++;
	return true;
}

uint32_t traffic_backoff_ms(uint32_t base_ms, unsigned attempt, uint64_t r)
{
	uint64_t whole = base_ms;
	unsigned shift = attempt > 1 ? attempt - 1 : 0;

	whole <<= shift > 3 ? 3 : shift;
	if (whole == 0)
		return 0;
	return (uint32_t)(whole - whole / 2 + r % (whole / 2 + 1));
}

/* ---- outlier ejection --------------------------------------------------- */

int traffic_outlier_set_init(struct traffic_outlier_set *s, size_t n)
{
	s->eps = calloc(n ? n : 1, sizeof(*s->eps));
	s->n = n;
	s->n_ejected = 0;
	return s->eps ? 0 : -ENOMEM;
}

void traffic_outlier_set_free(struct traffic_outlier_set *s)
{
	free(s->eps);
	s->eps = NULL;
	s->n = 0;
	s->n_ejected = 0;
}

size_t traffic_outlier_cap(const struct traffic_outlier *cfg, size_t n)
{
	return n * cfg->max_ejected_percent / 100;
}

bool traffic_outlier_usable(struct traffic_outlier_set *s, size_t i, int64_t now_us)
{
	struct traffic_outlier_ep *ep = &s->eps[i];

	if (!ep->ejected)
		return true;
	if (now_us < ep->until_us)
		return false;
	ep->ejected = false;
	ep->failures = 0;
	s->n_ejected--;
	return true;
}

/* Ends every ejection whose time has passed, so the cap counts only
 * endpoints really out. */
static void outlier_sweep(struct traffic_outlier_set *s, int64_t now_us)
{
	for (size_t i = 0; i < s->n; i++)
		(void)traffic_outlier_usable(s, i, now_us);
}

static int64_t eject_us(const struct traffic_outlier *cfg, unsigned ejections)
{
	int64_t ms = cfg->eject_ms;
	int64_t cap = cfg->eject_ms > TRAFFIC_EJECT_MAX_MS ? cfg->eject_ms : TRAFFIC_EJECT_MAX_MS;

	for (unsigned k = 1; k < ejections && ms < cap; k++)
		ms *= 2;
	return (ms < cap ? ms : cap) * 1000;
}

bool traffic_outlier_report(struct traffic_outlier_set *s, const struct traffic_outlier *cfg,
                            size_t i, bool failed, int64_t now_us)
{
	struct traffic_outlier_ep *ep;

	if (cfg->consecutive_failures == 0 || i >= s->n || !traffic_outlier_usable(s, i, now_us))
		return false;
	ep = &s->eps[i];
	if (!failed) {
		ep->failures = 0;
		ep->ejections = 0;
		return false;
	}
	ep->failures++;
	if (ep->failures < cfg->consecutive_failures)
		return false;
	outlier_sweep(s, now_us);
	if (s->n_ejected >= traffic_outlier_cap(cfg, s->n))
		return false;
	ep->ejections++;
	ep->ejected = true;
	ep->until_us = now_us + eject_us(cfg, ep->ejections);
	s->n_ejected++;
	return true;
}
