/*
 * meshletctl dashboard: a small HTTP server on loopback for the web UI of
 * control/ctl/dashboard/ (built in: ctl_dashboard.h).
 *
 * The page reads one thing, GET /api/overview, which this process builds
 * from control's API reads (stats, proxies, policies, certs, ca, traffic,
 * endpoints)
 * made with this command's credentials: the admin token stays here, the
 * browser never sees it, and nothing but those GETs is relayed. Answers
 * carry no-store caching and a Content-Security-Policy that allows only
 * this origin's own script and style; methods other than GET and HEAD get
 * 405; a Host that is not the listen address gets 421 (a DNS-rebinding
 * page cannot read the overview through the browser).
 *
 * The relay is blocking (httpc) inside the event loop, which is fine for
 * the handful of browsers an operator points at it; an overview is reused
 * for DASH_CACHE_MS so that several tabs do not multiply the load on
 * control, and each call is bounded by DASH_CALL_TIMEOUT_MS unless
 * --timeout says otherwise.
 */
#include "ctl.h"
#include "ctl_dashboard.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"

#define DASH_DEFAULT_LISTEN "127.0.0.1:7480"
#define DASH_CACHE_MS 1000
#define DASH_CALL_TIMEOUT_MS 3000
#define DASH_CSP "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " \
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

/* The API reads an overview is made of: its key, control's path. */
static const struct { const char *key, *path; } dash_reads[] = {
	{ "stats", "/v1/stats" },
	{ "proxies", "/v1/proxies" },
	{ "policies", "/v1/policies" },
	{ "certs", "/v1/certs" },
	{ "ca", "/v1/ca" },
	{ "traffic", "/v1/traffic" },
	{ "endpoints", "/v1/endpoints" },
};

struct dash {
	struct ctl *ctl;
	struct event_base *base;
	struct evhttp *http;
	struct event *sigint, *sigterm;
	bool check_host;
	char hosts[4][API_ADDRESS_MAX + 16];   /* Host values accepted */
	char *cached;                  /* the last overview's JSON */
	struct timespec cached_at;
};

static double ms_since(const struct timespec *t)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - t->tv_sec) * 1e3 + (double)(now.tv_nsec - t->tv_nsec) / 1e6;
}

/* ---------------------------------------------------------------- the relay */

/*
 * One read from control into overview[key] (or errors[key]). Returns false
 * when control could not be reached at all (the rest is not tried).
 */
static bool relay_one(struct dash *d, json_t *overview, json_t *errors, const char *key,
                      const char *path)
{
	struct httpc_response r;
	char err[HTTPC_ERR_MAX] = "";
	int rc = httpc_request(d->ctl->http, "GET", path, NULL, NULL, 0, NULL, &r, err);

	if (rc != 0) {
		json_object_set_new(errors, key, json_string(err));
		return false;
	}
	if (r.status == 200 && r.json) {
		json_object_set(overview, key, r.json);
	} else {
		struct api_error_resp e;
		char msg[300];

		api_parse_error_resp(r.json, &e);
		snprintf(msg, sizeof(msg), "HTTP %d%s%s", r.status, e.message ? ": " : "",
		         e.message ? e.message : "");
		json_object_set_new(errors, key, json_string(msg));
	}
	httpc_response_clear(&r);
	return true;
}

/* The overview: every read of dash_reads, and whether control answered. */
static char *overview_build(struct dash *d)
{
	json_auto_t *o = json_object(), *errors = json_object();
	char when[CA_TIME_LEN] = "";
	bool reachable = true;

	if (!o || !errors)
		return NULL;
	for (size_t i = 0; reachable && i < sizeof(dash_reads) / sizeof(dash_reads[0]); i++)
		reachable = relay_one(d, o, errors, dash_reads[i].key, dash_reads[i].path);
	ca_time_rfc3339((int64_t)time(NULL), when);
	json_object_set_new(o, "fetched_at", json_string(when));
	json_object_set_new(o, "control", json_pack("{s:s, s:b}", "url", d->ctl->control,
	                                            "reachable", reachable));
	json_object_set(o, "errors", errors);
	return json_dumps(o, JSON_COMPACT);
}

static const char *overview(struct dash *d)
{
	if (d->cached && ms_since(&d->cached_at) < DASH_CACHE_MS)
		return d->cached;
	free(d->cached);
	d->cached = overview_build(d);
	clock_gettime(CLOCK_MONOTONIC, &d->cached_at);
	return d->cached;
}

/* ---------------------------------------------------------------- HTTP */

static void common_headers(struct evhttp_request *req, const char *type)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);

	evhttp_add_header(h, "Content-Type", type);
	evhttp_add_header(h, "Cache-Control", "no-store");
	evhttp_add_header(h, "Content-Security-Policy", DASH_CSP);
	evhttp_add_header(h, "X-Content-Type-Options", "nosniff");
	evhttp_add_header(h, "X-Frame-Options", "DENY");
	evhttp_add_header(h, "Referrer-Policy", "no-referrer");
	evhttp_add_header(h, "Cross-Origin-Resource-Policy", "same-origin");
}

static void reply(struct evhttp_request *req, int status, const char *type, const void *data,
                  size_t len)
{
	struct evbuffer *b = evbuffer_new();

	common_headers(req, type);
	if (b && len)
		evbuffer_add(b, data, len);
	evhttp_send_reply(req, status, status == 200 ? "OK" : "Refused", b);
	if (b)
		evbuffer_free(b);
}

static void reply_text(struct evhttp_request *req, int status, const char *text)
{
	reply(req, status, "text/plain; charset=utf-8", text, strlen(text));
}

static bool host_ok(const struct dash *d, struct evhttp_request *req)
{
	const char *host = evhttp_find_header(evhttp_request_get_input_headers(req), "Host");

	if (!d->check_host)
		return true;
	for (size_t i = 0; host && i < sizeof(d->hosts) / sizeof(d->hosts[0]); i++) {
		if (d->hosts[i][0] && strcasecmp(host, d->hosts[i]) == 0)
			return true;
	}
	return false;
}

static void on_request(struct evhttp_request *req, void *arg)
{
	struct dash *d = arg;
	enum evhttp_cmd_type m = evhttp_request_get_command(req);
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *path = uri ? evhttp_uri_get_path(uri) : NULL;

	if (m != EVHTTP_REQ_GET && m != EVHTTP_REQ_HEAD) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
		reply_text(req, 405, "the dashboard is read-only: GET and HEAD only\n");
		return;
	}
	if (!host_ok(d, req)) {
		reply_text(req, 421, "unexpected Host: open the dashboard at the address it listens on\n");
		return;
	}
	if (path && strcmp(path, "/api/overview") == 0) {
		const char *o = overview(d);

		if (!o)
			reply_text(req, 500, "out of memory\n");
		else
			reply(req, 200, "application/json", o, strlen(o));
		return;
	}
	for (const struct dash_asset *a = dash_assets; path && a->path; a++) {
		if (strcmp(path, a->path) == 0) {
			reply(req, 200, a->content_type, a->data, a->len);
			return;
		}
	}
	reply_text(req, 404, "not found\n");
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct dash *d = arg;

	(void)sig;
	(void)what;
	event_base_loopexit(d->base, NULL);
}

/* ---------------------------------------------------------------- setup */

static bool is_loopback(const struct api_addr *a)
{
	static const unsigned char v6_loopback[16] = { [15] = 1 };

	if (a->family == AF_INET)
		return a->ip[0] == 127;
	return memcmp(a->ip, v6_loopback, 16) == 0;
}

/* The Host values a browser sends for the address bound (port: the real one). */
static void accepted_hosts(struct dash *d, const struct api_addr *a, uint16_t port)
{
	struct api_addr real = *a;

	real.port = port;
	api_addr_format(&real, d->hosts[0], sizeof(d->hosts[0]));
	snprintf(d->hosts[1], sizeof(d->hosts[1]), "localhost:%u", (unsigned)port);
	if (port == 80) {
		snprintf(d->hosts[2], sizeof(d->hosts[2]), "localhost");
		snprintf(d->hosts[3], sizeof(d->hosts[3]), "%.*s", (int)(strrchr(d->hosts[0], ':') - d->hosts[0]),
		         d->hosts[0]);
	}
}

/* Binds the listener; 0 and *port (the one bound), or EXIT_USAGE. */
static int dash_bind(struct dash *d, const struct api_addr *a, uint16_t *port)
{
	char ip[INET6_ADDRSTRLEN];
	struct evhttp_bound_socket *bs;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);

	inet_ntop(a->family, a->ip, ip, sizeof(ip));
	bs = evhttp_bind_socket_with_handle(d->http, ip, a->port);
	if (!bs)
		return ctl_usage_error(d->ctl, "dashboard: cannot listen on %s port %u: %s", ip,
		                       (unsigned)a->port, strerror(errno));
	if (getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&ss, &sl) < 0)
		return ctl_usage_error(d->ctl, "dashboard: getsockname: %s", strerror(errno));
	*port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
	                                      : ((struct sockaddr_in6 *)&ss)->sin6_port);
	return 0;
}

static int dash_setup(struct dash *d, const struct api_addr *a)
{
	uint16_t port = 0;
	char shown[API_ADDRESS_MAX + 16];
	struct api_addr real = *a;
	int rc;

	d->base = event_base_new();
	d->http = d->base ? evhttp_new(d->base) : NULL;
	if (!d->http)
		return ctl_usage_error(d->ctl, "dashboard: out of memory");
	evhttp_set_allowed_methods(d->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST |
	                                    EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
	                                    EVHTTP_REQ_PATCH);
	evhttp_set_max_headers_size(d->http, 16 * 1024);
	evhttp_set_max_body_size(d->http, 64 * 1024);
	evhttp_set_timeout(d->http, 30);
	evhttp_set_gencb(d->http, on_request, d);
	rc = dash_bind(d, a, &port);
	if (rc)
		return rc;
	accepted_hosts(d, a, port);
	d->sigint = evsignal_new(d->base, SIGINT, on_signal, d);
	d->sigterm = evsignal_new(d->base, SIGTERM, on_signal, d);
	if (!d->sigint || !d->sigterm || event_add(d->sigint, NULL) < 0 ||
	    event_add(d->sigterm, NULL) < 0)
		return ctl_usage_error(d->ctl, "dashboard: cannot set up the signals");
	real.port = port;
	api_addr_format(&real, shown, sizeof(shown));
	printf("dashboard on http://%s/ (control %s); Ctrl-C stops it\n", shown, d->ctl->control);
	fflush(stdout);
	return 0;
}

static void dash_free(struct dash *d)
{
	if (d->sigint)
		event_free(d->sigint);
	if (d->sigterm)
		event_free(d->sigterm);
	if (d->http)
		evhttp_free(d->http);
	if (d->base)
		event_base_free(d->base);
	free(d->cached);
}

int ctl_cmd_dashboard(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *listen = ctl_arg(cmd, a, "listen");
	bool anywhere = ctl_arg(cmd, a, "allow-non-loopback") != NULL;
	struct dash d = { .ctl = ctl, .check_host = !anywhere };
	struct api_addr addr;
	int rc;

	listen = listen ? listen : DASH_DEFAULT_LISTEN;
	if (api_addr_parse(listen, true, &addr) < 0)
		return ctl_usage_error(ctl, "--listen: '%s' is not ip:port or [ipv6]:port", listen);
	if (!is_loopback(&addr) && !anywhere)
		return ctl_usage_error(ctl, "--listen %s is not a loopback address: the dashboard "
		                       "shows what the admin token sees to anyone who reaches it; give "
		                       "--allow-non-loopback if that is what you want", listen);
	rc = ctl_connect(ctl);
	if (rc)
		return rc;
	/* The default request timeout is for one-shot commands; a page that
	 * refreshes every 2 s wants to hear of an unreachable control sooner. */
	httpc_set_timeout(ctl->http, ctl->timeout_ms == HTTPC_TIMEOUT_MS_DEFAULT ? DASH_CALL_TIMEOUT_MS
	                                                                      : ctl->timeout_ms);
	rc = dash_setup(&d, &addr);
	if (rc == 0)
		event_base_dispatch(d.base);
	dash_free(&d);
	return rc;
}
