/*
 * metrics: counters bumped with relaxed atomics on the data path, rendered
 * as Prometheus text (exposition format 0.0.4) for the admin listener.
 *
 * Rendering reads each counter once without a global snapshot: a scrape
 * may mix values a few increments apart, which Prometheus tolerates.
 */
#include "meshlet/metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

/* Bucket bounds of meshlet_request_duration_seconds, as numbers and as the
 * exact "le" label text (so "0.0005" never prints as "5e-04"). */
static const double duration_bounds[METRICS_DURATION_BUCKETS] = {
	0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
};
static const char *const duration_labels[METRICS_DURATION_BUCKETS + 1] = {
	"0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
	"0.25", "0.5", "1", "2.5", "+Inf",
};

static const char *const direction_names[DIR_COUNT] = { "inbound", "outbound" };

/* Returns a zeroed metrics set, or NULL on allocation failure. Free with
 * metrics_free(). */
struct metrics *metrics_new(void)
{
	struct metrics *m = calloc(1, sizeof(*m));

	if (!m)
		return NULL;
	/* calloc's zero bytes are the zero value of every atomic here on the
	 * platforms we support; only the mutex needs real initialisation. */
	m->peers = peerstats_new();
	if (!m->peers)
		goto fail;
	if (pthread_mutex_init(&m->lock, NULL) != 0)
		goto fail;
	return m;
fail:
	peerstats_free(m->peers);
	free(m);
	return NULL;
}

/* Frees m and every decision counter (their pointers become invalid). NULL ok. */
void metrics_free(struct metrics *m)
{
	if (!m)
		return;
	struct metrics_decision *d = m->decisions;
	while (d) {
		struct metrics_decision *next = d->next;
		free(d);
		d = next;
	}
	for (struct metrics_labeled *l = m->labeled, *next; l; l = next) {
		next = l->next;
		free(l);
	}
	pthread_mutex_destroy(&m->lock);
	peerstats_free(m->peers);
	free(m);
}

static struct metrics_decision *decision_new(int allow, const char *rule)
{
	size_t n = strlen(rule);
	struct metrics_decision *d = malloc(sizeof(*d) + n + 1);

	if (!d)
		return NULL;
	d->next = NULL;
	atomic_init(&d->count, 0);
	d->allow = allow;
	memcpy(d->rule, rule, n + 1);
	return d;
}

/*
 * Returns the counter of (allow, rule) (allow: non-zero = "allow"; rule NULL
 * = ""), creating it on first use. Stable until metrics_free. NULL only on
 * allocation failure.
 */
struct metrics_decision *metrics_decision(struct metrics *m, int allow, const char *rule)
{
	struct metrics_decision *d, **tail;

	if (!m)
		return NULL;
	allow = allow != 0;
	rule = rule ? rule : "";
	pthread_mutex_lock(&m->lock);
	for (tail = &m->decisions; (d = *tail) != NULL; tail = &d->next) {
		if (d->allow == allow && strcmp(d->rule, rule) == 0)
			goto out;
	}
	/* Appended, so a scrape lists rules in first-use order. */
	d = decision_new(allow, rule);
	if (d)
		*tail = d;
out:
	pthread_mutex_unlock(&m->lock);
	return d;
}

struct metrics_labeled *metrics_labeled(struct metrics *m, enum metrics_family family,
                                        const char *label)
{
	struct metrics_labeled *l, **tail;
	size_t n;

	if (!m || family >= MF_COUNT)
		return NULL;
	label = label ? label : "";
	n = strlen(label);
	pthread_mutex_lock(&m->lock);
	for (tail = &m->labeled; (l = *tail) != NULL; tail = &l->next) {
		if (l->family == family && strcmp(l->label, label) == 0)
			goto out;
	}
	l = malloc(sizeof(*l) + n + 1);
	if (l) {
		l->next = NULL;
		atomic_init(&l->count, 0);
		l->family = family;
		memcpy(l->label, label, n + 1);
		*tail = l;
	}
out:
	pthread_mutex_unlock(&m->lock);
	return l;
}

/* Counts one request of the given duration. NaN and negatives count as 0;
 * the sum is kept in microseconds. */
void metrics_observe_duration(struct metrics *m, double seconds)
{
	int i;

	if (!m)
		return;
	if (!(seconds > 0))
		seconds = 0;
	if (seconds > 1e9)
		seconds = 1e9; /* keeps the conversion below defined */
	for (i = 0; i < METRICS_DURATION_BUCKETS; i++) {
		if (seconds <= duration_bounds[i])
			break;
	}
	metrics_inc(&m->duration_buckets[i]);
	metrics_inc(&m->duration_count);
	metrics_add(&m->duration_sum_us, (uint64_t)(seconds * 1e6 + 0.5));
}

/* Counts one HTTP response by status; codes outside 100..599 are ignored. */
void metrics_count_http(struct metrics *m, int status)
{
	if (!m || status < 100 || status > 599)
		return;
	metrics_inc(&m->http_requests[status]);
}

void metrics_count_grpc(struct metrics *m, int grpc_status)
{
	if (!m || grpc_status < 0 || grpc_status >= METRICS_GRPC_CODES)
		return;
	metrics_inc(&m->grpc_requests[grpc_status]);
}

const char *metrics_h2_abuse_str(enum metrics_h2_abuse k)
{
	static const char *const names[H2_ABUSE_COUNT] = {
		"rapid_reset", "control_flood", "continuation_flood", "header_list",
		"too_many_streams", "protocol",
	};

	return k < H2_ABUSE_COUNT ? names[k] : "protocol";
}

static uint64_t load_u(atomic_uint_fast64_t *c)
{
	return atomic_load_explicit(c, memory_order_relaxed);
}

static int64_t load_i(atomic_int_fast64_t *c)
{
	return atomic_load_explicit(c, memory_order_relaxed);
}

static void header(FILE *out, const char *name, const char *type, const char *help)
{
	fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value escaped per the exposition format: \\, \" and \n. */
static void put_label_value(FILE *out, const char *s)
{
	for (; *s; s++) {
		switch (*s) {
		case '\\': fputs("\\\\", out); break;
		case '"': fputs("\\\"", out); break;
		case '\n': fputs("\\n", out); break;
		default: fputc(*s, out); break;
		}
	}
}

static void render_connections(struct metrics *m, FILE *out)
{
	header(out, "meshlet_connections_total", "counter", "Connections accepted or opened.");
	for (int d = 0; d < DIR_COUNT; d++)
		fprintf(out, "meshlet_connections_total{direction=\"%s\"} %" PRIu64 "\n",
		        direction_names[d], load_u(&m->connections_total[d]));
	header(out, "meshlet_connections_active", "gauge", "Connections currently open.");
	for (int d = 0; d < DIR_COUNT; d++)
		fprintf(out, "meshlet_connections_active{direction=\"%s\"} %" PRId64 "\n",
		        direction_names[d], load_i(&m->connections_active[d]));
	header(out, "meshlet_upstream_connections_active", "gauge",
	       "Pooled mutual-TLS HTTP/2 connections to upstream sidecars, open and verified.");
	fprintf(out, "meshlet_upstream_connections_active %" PRId64 "\n",
	        load_i(&m->upstream_connections_active));
	header(out, "meshlet_bytes_total", "counter", "Application bytes relayed.");
	for (int d = 0; d < DIR_COUNT; d++)
		fprintf(out, "meshlet_bytes_total{direction=\"%s\"} %" PRIu64 "\n",
		        direction_names[d], load_u(&m->bytes_total[d]));
}

/* Every reason is listed, zeros included, so that rate() and alerts see a
 * series from the first scrape on; TLS_FAIL_NONE is not a failure and is skipped. */
static void render_tls_failures(struct metrics *m, FILE *out)
{
	header(out, "meshlet_tls_handshake_failures_total", "counter",
	       "TLS handshakes refused, by reason.");
	for (int r = TLS_FAIL_NONE + 1; r < TLS_FAIL_COUNT; r++)
		fprintf(out, "meshlet_tls_handshake_failures_total{reason=\"%s\"} %" PRIu64 "\n",
		        tls_failure_str((enum tls_failure)r), load_u(&m->handshake_failures[r]));
	header(out, "meshlet_tls_resumptions_total", "counter",
	       "TLS handshakes that resumed an earlier session (no certificate exchange).");
	for (int d = 0; d < DIR_COUNT; d++)
		fprintf(out, "meshlet_tls_resumptions_total{direction=\"%s\"} %" PRIu64 "\n",
		        direction_names[d], load_u(&m->tls_resumed[d]));
}

static void render_decisions(struct metrics *m, FILE *out)
{
	header(out, "meshlet_policy_decisions_total", "counter",
	       "Policy decisions, by decision and deciding rule.");
	pthread_mutex_lock(&m->lock);
	for (struct metrics_decision *d = m->decisions; d; d = d->next) {
		fprintf(out, "meshlet_policy_decisions_total{decision=\"%s\",rule=\"",
		        d->allow ? "allow" : "deny");
		put_label_value(out, d->rule);
		fprintf(out, "\"} %" PRIu64 "\n", load_u(&d->count));
	}
	pthread_mutex_unlock(&m->lock);
}

static void render_labeled(struct metrics *m, FILE *out)
{
	static const struct { const char *name, *label, *help; } families[MF_COUNT] = {
		[MF_RATE_LIMITED] = {"meshlet_rate_limited_total", "limit",
		                     "Requests refused 429 by a rate limit, by limit."},
		[MF_FAULTS] = {"meshlet_faults_injected_total", "fault",
		               "Requests a fault was injected into, by fault."},
	};

	pthread_mutex_lock(&m->lock);
	for (int f = 0; f < MF_COUNT; f++) {
		header(out, families[f].name, "counter", families[f].help);
		for (struct metrics_labeled *l = m->labeled; l; l = l->next) {
			if ((int)l->family != f)
				continue;
			fprintf(out, "%s{%s=\"", families[f].name, families[f].label);
			put_label_value(out, l->label);
			fprintf(out, "\"} %" PRIu64 "\n", load_u(&l->count));
		}
	}
	pthread_mutex_unlock(&m->lock);
}

/* Only codes seen at least once: 500 zero series would swamp a scrape. */
static void render_http(struct metrics *m, FILE *out)
{
	header(out, "meshlet_http_requests_total", "counter", "HTTP responses, by status code.");
	for (int code = 100; code < 600; code++) {
		uint64_t n = load_u(&m->http_requests[code]);
		if (n)
			fprintf(out, "meshlet_http_requests_total{code=\"%d\"} %" PRIu64 "\n", code, n);
	}
}

/* gRPC codes seen at least once; every abuse kind (zeros are a useful baseline). */
static void render_grpc_h2(struct metrics *m, FILE *out)
{
	header(out, "meshlet_grpc_requests_total", "counter", "gRPC calls, by grpc-status.");
	for (int code = 0; code < METRICS_GRPC_CODES; code++) {
		uint64_t n = load_u(&m->grpc_requests[code]);
		if (n)
			fprintf(out, "meshlet_grpc_requests_total{grpc_status=\"%d\"} %" PRIu64 "\n",
			        code, n);
	}
	header(out, "meshlet_http2_abuse_total", "counter",
	       "HTTP/2 connections ended with GOAWAY for abuse, by kind.");
	for (int k = 0; k < H2_ABUSE_COUNT; k++)
		fprintf(out, "meshlet_http2_abuse_total{kind=\"%s\"} %" PRIu64 "\n",
		        metrics_h2_abuse_str((enum metrics_h2_abuse)k), load_u(&m->http2_abuse[k]));
}

/* Buckets are stored per interval and summed here, as Prometheus buckets are
 * cumulative. _count is the +Inf total, so the series stays consistent even
 * if a request lands between the reads. */
static void render_duration(struct metrics *m, FILE *out)
{
	const char *name = "meshlet_request_duration_seconds";
	uint64_t total = 0;

	header(out, name, "histogram", "Request duration in seconds.");
	for (int i = 0; i <= METRICS_DURATION_BUCKETS; i++) {
		total += load_u(&m->duration_buckets[i]);
		fprintf(out, "%s_bucket{le=\"%s\"} %" PRIu64 "\n", name, duration_labels[i], total);
	}
	uint64_t sum_us = load_u(&m->duration_sum_us);
	fprintf(out, "%s_sum %" PRIu64 ".%06" PRIu64 "\n", name, sum_us / 1000000, sum_us % 1000000);
	fprintf(out, "%s_count %" PRIu64 "\n", name, total);
}

static void gauge(FILE *out, const char *name, const char *help, atomic_int_fast64_t *v)
{
	header(out, name, "gauge", help);
	fprintf(out, "%s %" PRId64 "\n", name, load_i(v));
}

static void counter(FILE *out, const char *name, const char *help, atomic_uint_fast64_t *v)
{
	header(out, name, "counter", help);
	fprintf(out, "%s %" PRIu64 "\n", name, load_u(v));
}

/* The callers' traffic rules on the connect step. */
static void render_traffic(struct metrics *m, FILE *out)
{
	counter(out, "meshlet_retries_total", "Retries of upstream connects (to another endpoint).",
	        &m->retries);
	counter(out, "meshlet_outlier_ejections_total", "Upstream endpoints ejected as outliers.",
	        &m->outlier_ejections);
	gauge(out, "meshlet_endpoints_ejected", "Upstream endpoints ejected now.",
	      &m->endpoints_ejected);
	counter(out, "meshlet_overloaded_total",
	        "Calls refused at once for a traffic document's limits.", &m->overloaded);
}

/* Writes the Prometheus text exposition (version 0.0.4) of m to out.
 * Returns 0, or -EIO when out reports an error. */
int metrics_render(struct metrics *m, FILE *out)
{
	if (!m || !out)
		return -EIO;
	render_connections(m, out);
	render_tls_failures(m, out);
	render_decisions(m, out);
	render_labeled(m, out);
	render_http(m, out);
	render_grpc_h2(m, out);
	render_duration(m, out);
	render_traffic(m, out);
	gauge(out, "meshlet_cert_expiry_timestamp_seconds",
	      "Expiry of the current SVID, as a Unix timestamp.", &m->cert_expiry);
	gauge(out, "meshlet_config_version", "Version of the config snapshot in use.",
	      &m->config_version);
	gauge(out, "meshlet_control_connected", "1 when connected to meshlet-control, else 0.",
	      &m->control_connected);
	if (fflush(out) != 0 || ferror(out))
		return -EIO;
	return 0;
}
