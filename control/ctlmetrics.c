/* ctlmetrics: meshlet-control's counters and their Prometheus text; see ctlmetrics.h. */
#include "ctlmetrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/http.h>

#include "meshlet/json.h"
#include "meshlet/log.h"
#include "server.h"

/* The metrics listener's limits: a scrape is a GET without a body. */
#define CTLMETRICS_MAX_HEADERS 8192
#define CTLMETRICS_TIMEOUT_S 10

/* (route, method, status) triples kept. Control answers a handful of
 * statuses, so real use stays far below; past it new triples are counted
 * in meshlet_control_api_requests_dropped_total instead of growing. */
#define CTLMETRICS_MAX_SERIES 1024

/* Store calls take microseconds to milliseconds (SQLite, fsync on writes). */
static const double store_bounds[CTLMETRICS_STORE_BUCKETS] = {
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
};
static const char *const store_labels[CTLMETRICS_STORE_BUCKETS + 1] = {
	"0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
	"0.1", "0.25", "1", "+Inf",
};
static const char *const call_names[STORE_CALL_COUNT] = { "get", "list", "apply" };
static const char *const issue_names[ISSUE_COUNT] = { "join", "renewal" };

struct request_count {
	const struct route *route;     /* NULL: unmatched */
	const char *method;            /* static */
	int status;
	uint64_t n;
};

struct store_histogram {
	uint64_t buckets[CTLMETRICS_STORE_BUCKETS + 1];   /* per interval; last: +Inf */
	uint64_t sum_ns;
};

struct ctlmetrics {
	const struct route *routes;
	struct request_count *requests;
	size_t n_requests, cap_requests;
	uint64_t requests_dropped;
	uint64_t issued[ISSUE_COUNT];
	struct store_histogram store[STORE_CALL_COUNT];
	struct evhttp *http;           /* the --metrics-listen listener, or NULL */
	ctlmetrics_gauges_fn gauges;
	void *gauges_arg;
};

struct ctlmetrics *ctlmetrics_new(const struct route *routes)
{
	struct ctlmetrics *m = calloc(1, sizeof(*m));

	if (m)
		m->routes = routes;
	return m;
}

void ctlmetrics_free(struct ctlmetrics *m)
{
	if (!m)
		return;
	if (m->http)
		evhttp_free(m->http);
	free(m->requests);
	free(m);
}

static struct request_count *request_slot(struct ctlmetrics *m, const struct route *r,
                                          const char *method, int status)
{
	struct request_count *rc;

	for (size_t i = 0; i < m->n_requests; i++) {
		rc = &m->requests[i];
		if (rc->route == r && rc->status == status && strcmp(rc->method, method) == 0)
			return rc;
	}
	if (m->n_requests == CTLMETRICS_MAX_SERIES)
		return NULL;
	if (m->n_requests == m->cap_requests) {
		size_t cap = m->cap_requests ? 2 * m->cap_requests : 32;
		void *p = realloc(m->requests, cap * sizeof(*m->requests));

		if (!p)
			return NULL;
		m->requests = p;
		m->cap_requests = cap;
	}
	rc = &m->requests[m->n_requests++];
	*rc = (struct request_count){ r, method, status, 0 };
	return rc;
}

void ctlmetrics_request(struct ctlmetrics *m, const struct route *r, const char *method,
                        int status)
{
	struct request_count *rc;

	if (!m)
		return;
	rc = request_slot(m, r, method ? method : "OTHER", status);
	if (rc)
		rc->n++;
	else
		m->requests_dropped++;
}

void ctlmetrics_issued(struct ctlmetrics *m, enum ctlmetrics_issue kind)
{
	if (m && kind >= 0 && kind < ISSUE_COUNT)
		m->issued[kind]++;
}

void ctlmetrics_store_observe(void *arg, enum store_call call, double seconds)
{
	struct ctlmetrics *m = arg;
	struct store_histogram *h;
	int i;

	if (!m || call < 0 || call >= STORE_CALL_COUNT)
		return;
	if (!(seconds > 0))
		seconds = 0;
	if (seconds > 1e6)
		seconds = 1e6; /* keeps the conversion below defined */
	h = &m->store[call];
	for (i = 0; i < CTLMETRICS_STORE_BUCKETS; i++) {
		if (seconds <= store_bounds[i])
			break;
	}
	h->buckets[i]++;
	h->sum_ns += (uint64_t)(seconds * 1e9 + 0.5);
}

static void header(FILE *out, const char *name, const char *type, const char *help)
{
	fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Route patterns and methods are ours (handlers.c): no label escaping needed. */
static void render_requests(const struct ctlmetrics *m, FILE *out)
{
	header(out, "meshlet_control_api_requests_total", "counter",
	       "API requests answered, by route pattern, method and HTTP status.");
	for (size_t i = 0; i < m->n_requests; i++) {
		const struct request_count *rc = &m->requests[i];

		fprintf(out, "meshlet_control_api_requests_total{route=\"%s\",method=\"%s\","
		        "code=\"%d\"} %" PRIu64 "\n", rc->route ? rc->route->pattern : "unmatched",
		        rc->method, rc->status, rc->n);
	}
	header(out, "meshlet_control_api_requests_dropped_total", "counter",
	       "API requests not counted above because its series limit was reached.");
	fprintf(out, "meshlet_control_api_requests_dropped_total %" PRIu64 "\n",
	        m->requests_dropped);
}

static void render_issued(const struct ctlmetrics *m, FILE *out)
{
	header(out, "meshlet_control_certificates_issued_total", "counter",
	       "SVIDs issued to proxies, by kind (join: with a join token; renewal: with an SVID).");
	for (int k = 0; k < ISSUE_COUNT; k++)
		fprintf(out, "meshlet_control_certificates_issued_total{kind=\"%s\"} %" PRIu64 "\n",
		        issue_names[k], m->issued[k]);
}

/* Buckets are kept per interval and summed here: Prometheus's are cumulative. */
static void render_store(const struct ctlmetrics *m, FILE *out)
{
	const char *name = "meshlet_control_store_duration_seconds";

	header(out, name, "histogram", "Store (SQLite) calls, by operation, in seconds.");
	for (int c = 0; c < STORE_CALL_COUNT; c++) {
		const struct store_histogram *h = &m->store[c];
		uint64_t total = 0;

		for (int i = 0; i <= CTLMETRICS_STORE_BUCKETS; i++) {
			total += h->buckets[i];
			fprintf(out, "%s_bucket{op=\"%s\",le=\"%s\"} %" PRIu64 "\n", name,
			        call_names[c], store_labels[i], total);
		}
		fprintf(out, "%s_sum{op=\"%s\"} %" PRIu64 ".%09" PRIu64 "\n", name, call_names[c],
		        h->sum_ns / 1000000000u, h->sum_ns % 1000000000u);
		fprintf(out, "%s_count{op=\"%s\"} %" PRIu64 "\n", name, call_names[c], total);
	}
}

static void gauge(FILE *out, const char *name, const char *help, long long v)
{
	header(out, name, "gauge", help);
	fprintf(out, "%s %lld\n", name, v);
}

/* Every phase is listed, 1 for the current one: alerts and panels can
 * select a phase without knowing the others. */
static void render_phase(const struct ctlmetrics_gauges *g, FILE *out)
{
	header(out, "meshlet_control_ca_phase", "gauge",
	       "1 for the CA rotation phase control is in, 0 for the others.");
	for (int p = CA_PHASE_STABLE; p <= CA_PHASE_SWITCHED; p++)
		fprintf(out, "meshlet_control_ca_phase{phase=\"%s\"} %d\n",
		        state_phase_name((enum ca_phase)p), p == (int)g->ca_phase);
}

int ctlmetrics_render(const struct ctlmetrics *m, const struct ctlmetrics_gauges *g, FILE *out)
{
	if (!m || !g || !out)
		return -EIO;
	render_requests(m, out);
	render_issued(m, out);
	render_store(m, out);
	gauge(out, "meshlet_control_long_polls_waiting", "Config long polls waiting now.",
	      (long long)g->long_polls);
	gauge(out, "meshlet_control_proxies_polling",
	      "Distinct proxies (SVIDs) holding a config long poll now.",
	      (long long)g->proxies_polling);
	gauge(out, "meshlet_control_connections_open", "TLS connections open to the API.",
	      (long long)g->connections);
	header(out, "meshlet_control_connections_accepted_total", "counter",
	       "TCP connections accepted on the API (each a TLS handshake): with proxies "
	       "keeping their connection, it grows with proxies, not with long polls.");
	fprintf(out, "meshlet_control_connections_accepted_total %" PRIu64 "\n", g->accepted);
	gauge(out, "meshlet_control_revoked_certificates",
	      "Serials on the revocation list (unexpired revoked SVIDs).", (long long)g->revoked);
	gauge(out, "meshlet_control_bundle_roots", "Root certificates in the trust bundle.",
	      (long long)g->roots);
	render_phase(g, out);
	gauge(out, "meshlet_control_server_cert_expiry_timestamp_seconds",
	      "Expiry of control's own server certificate, as a Unix timestamp.",
	      (long long)g->server_cert_expiry);
	if (fflush(out) != 0 || ferror(out))
		return -EIO;
	return 0;
}

/* ---- the listener ---- */

static void reply(struct evhttp_request *req, int code, const char *type, const char *body,
                  size_t len)
{
	struct evbuffer *out = evbuffer_new();
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);

	evhttp_add_header(h, "Content-Type", type);
	evhttp_add_header(h, "Cache-Control", "no-store");
	if (out)
		evbuffer_add(out, body, len);
	evhttp_send_reply(req, code, NULL, out);
	if (out)
		evbuffer_free(out);
}

static void on_request(struct evhttp_request *req, void *arg)
{
	struct ctlmetrics *m = arg;
	struct ctlmetrics_gauges g = {0};
	const char *uri = evhttp_request_get_uri(req);
	size_t n = strcspn(uri, "?");
	char *text = NULL;
	size_t len = 0;
	FILE *f;

	if (n != strlen("/metrics") || strncmp(uri, "/metrics", n) != 0) {
		reply(req, 404, "text/plain", "only /metrics is served here\n", 29);
		return;
	}
	m->gauges(m->gauges_arg, &g);
	f = open_memstream(&text, &len);
	if (!f || ctlmetrics_render(m, &g, f) < 0) {
		if (f)
			fclose(f);
		free(text);
		reply(req, 500, "text/plain", "metrics unavailable\n", 20);
		return;
	}
	fclose(f);
	reply(req, 200, "text/plain; version=0.0.4", text, len);
	free(text);
}

/* The address as bound (port 0 picked one): tests and operators read it here. */
static void log_bound(struct evhttp_bound_socket *bound)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char host[INET6_ADDRSTRLEN] = "?";
	bool v6 = false;
	unsigned port = 0;

	if (getsockname(evhttp_bound_socket_get_fd(bound), (struct sockaddr *)&ss, &len) < 0)
		return;
	if (ss.ss_family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)&ss;
		inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
		port = ntohs(in->sin_port);
	} else if (ss.ss_family == AF_INET6) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
		inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
		port = ntohs(in6->sin6_port);
		v6 = true;
	}
	log_info("metrics on http://%s%s%s:%u/metrics (plain HTTP, no authentication)",
	         v6 ? "[" : "", host, v6 ? "]" : "", port);
}

int ctlmetrics_listen(struct ctlmetrics *m, struct event_base *base, const char *addr,
                      ctlmetrics_gauges_fn fn, void *arg, struct meshlet_err *err)
{
	struct timeval io = { CTLMETRICS_TIMEOUT_S, 0 };
	struct evhttp_bound_socket *bound;
	char host[256];
	uint16_t port;

	if (m->http)
		return err_set(err, "metrics-listen", "given twice");
	if (server_split_listen(addr, host, sizeof(host), &port) < 0)
		return err_set(err, "metrics-listen", "'%s' is not host:port (or [v6]:port)", addr);
	m->http = evhttp_new(base);
	if (!m->http)
		return err_set(err, "metrics-listen", "out of memory");
	m->gauges = fn;
	m->gauges_arg = arg;
	evhttp_set_gencb(m->http, on_request, m);
	evhttp_set_allowed_methods(m->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
	evhttp_set_max_headers_size(m->http, CTLMETRICS_MAX_HEADERS);
	evhttp_set_max_body_size(m->http, 0);
	evhttp_set_timeout_tv(m->http, &io);
	bound = evhttp_bind_socket_with_handle(m->http, host, port);
	if (!bound) {
		evhttp_free(m->http);
		m->http = NULL;
		return err_set(err, "metrics-listen", "cannot listen on %s: %s", addr, strerror(errno));
	}
	log_bound(bound);
	return 0;
}
