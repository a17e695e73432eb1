/*
 * config: meshlet-proxy's JSON configuration (docs/design.md, "The proxy config"),
 * validated whole before anything is bound. Relative file names are taken
 * relative to the directory of the config file.
 */
#ifndef MESHLET_CONFIG_H
#define MESHLET_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <jansson.h>
#include "meshlet/identity.h"
#include "meshlet/json.h"

#define CONFIG_MAX_FILE (1024 * 1024)
#define CONFIG_MAX_LISTENERS 64
#define CONFIG_MAX_ENDPOINTS 256
/* Control replicas a proxy may list (control.urls). */
#define CONFIG_CONTROL_URLS_MAX 16

enum listener_protocol { PROTO_TCP = 0, PROTO_HTTP = 1 };

/* inbound[].app_protocol: what an http listener speaks to its app. */
enum app_protocol {
	APP_PROTO_AUTO = 0,             /* what the calling app used (default) */
	APP_PROTO_HTTP1,
	APP_PROTO_H2C,
};

/* A socket address given as "ip:port" or "[ipv6]:port" (hostnames are
 * resolved once, at load). text keeps the form as written. */
struct config_addr {
	struct sockaddr_storage ss;
	socklen_t len;
	char text[128];
};

struct config_inbound {
	struct config_addr listen;
	struct config_addr forward;
	struct config_addr advertise;
	enum listener_protocol protocol;
	enum app_protocol app_protocol;
};

/* outbound[].pool: the worker's mTLS HTTP/2 connections to each endpoint of
 * an http listener's service (proxy/upool.c). */
struct config_pool {
	uint32_t max_connections;       /* per endpoint and worker: default 4 */
	uint32_t max_streams;           /* per connection (and the peer's limit): default 100 */
	uint32_t idle_ms;               /* an idle connection closes after: default 90 s */
};

struct config_outbound {
	struct config_addr listen;
	struct config_pool pool;
	char service[SERVICE_NAME_MAX + 1];
	enum listener_protocol protocol;
	struct config_addr *endpoints;
	size_t n_endpoints;
};

struct config_timeouts {            /* all in milliseconds */
	uint32_t handshake_ms;          /* TLS handshake: default 10 s */
	uint32_t connect_ms;            /* upstream TCP connect: default 5 s */
	uint32_t idle_ms;               /* no bytes either way: default 300 s */
	uint32_t drain_ms;              /* SIGTERM drain: default 30 s */
	uint32_t request_head_ms;       /* http: a request head must arrive whole: 10 s */
	uint32_t response_head_ms;      /* http: upstream's response head, else 504: 30 s */
};

/* The "http2" section: limits of every HTTP/2 session. */
struct config_http2 {
	uint32_t max_concurrent_streams;    /* default 100 */
	uint32_t max_header_list_bytes;     /* default 16384 */
	uint32_t initial_window_bytes;      /* default 65535 */
};

enum config_log_level { CONFIG_LOG_DEBUG, CONFIG_LOG_INFO, CONFIG_LOG_WARN, CONFIG_LOG_ERROR };

struct config {
	char *file;                     /* the config file as given */
	char service[SERVICE_NAME_MAX + 1];
	char trust_domain[TRUST_DOMAIN_MAX + 1];
	char *state_dir;                /* default /var/lib/meshlet-proxy */

	bool has_control;
	char *control_url;             /* the first of control_urls */
	char **control_urls;           /* control.url, or control.urls: the replicas in order */
	size_t n_control_urls;
	char *control_token_file;

	bool has_tls;                   /* static mode */
	char *tls_cert, *tls_key, *tls_bundle;
	int tls_min_version;            /* TLS1_3_VERSION (default) or TLS1_2_VERSION */
	char *tls_groups;               /* OpenSSL group list; NULL = library default */
	char *policy_file;
	char *traffic_file;             /* static mode: traffic documents; NULL: none */

	struct config_inbound *inbound;   size_t n_inbound;
	struct config_outbound *outbound; size_t n_outbound;

	bool has_transparent;
	struct config_addr transparent_listen;
	bool outside_mesh_passthrough;   /* transparent: plain TCP to non-mesh destinations
	                                    (default: refused and logged) */

	struct config_addr admin_listen;  /* default 127.0.0.1:15000 */

	int workers;                    /* 0 in the file = one per core, resolved here */
	uint32_t max_connections;       /* per process; default 10000 */
	struct config_timeouts timeouts;
	struct config_http2 http2;
	enum config_log_level log_level; /* default info */
	bool access_log;                 /* default true */
};

/*
 * Validates doc (from the file at file, used for relative paths and for
 * messages) into a new config. Every error names its JSON path. Returns 0
 * and *out (free with config_free), or -EINVAL with err set.
 */
int config_parse(const json_t *doc, const char *file, struct config **out,
                 struct meshlet_err *err);

/* Reads file (json_load_strict) and config_parse()s it. */
int config_load(const char *file, struct config **out, struct meshlet_err *err);

void config_free(struct config *c);

/* Parses "ip:port", "[ipv6]:port" or "host:port" into out. Returns 0 or -EINVAL
 * with a reason in *why. */
int config_parse_addr(const char *text, struct config_addr *out, const char **why);

/* Port of an address, in host order. */
uint16_t config_addr_port(const struct config_addr *a);

/* The IPv6 twin of an IPv4 wildcard or loopback address: [::]:P for
 * 0.0.0.0:P, [::1]:P for 127.0.0.1:P. The proxy's inbound and transparent
 * listeners listen on it too (IPv6 only), so that ip6tables can redirect
 * to them. Returns true and fills out, false for any other address. */
bool config_addr_ipv6_twin(const struct config_addr *a, struct config_addr *out);

#endif
