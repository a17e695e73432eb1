/*
 * api: both ends of meshlet-control's HTTP API, for control, the proxy and
 * meshletctl alike: route patterns, request bodies and query strings, join
 * tokens, durations, the answers clients read, and the error shape of
 * docs/design.md:
 *
 *   {"error": {"code": "bad_request", "message": "...", "path": "rules[0].ports[0]"}}
 *
 * Everything here is pure (no I/O, no global state) and validates strictly:
 * in requests, unknown fields, wrong types and out-of-range values are
 * refused with the JSON path of the offending value in err.path; in
 * answers, unknown fields are ignored (control may add some) and the
 * fields a client relies on are checked the same way.
 */
#ifndef MESHLET_API_H
#define MESHLET_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "meshlet/identity.h"
#include "meshlet/json.h"
#include "meshlet/policy.h"
#include "meshlet/traffic.h"

/* Request bodies over this are refused with 413 (docs/design.md). */
#define API_BODY_MAX (1024 * 1024)
/* Nesting deeper than this is refused with 400 (docs/design.md). */
#define API_JSON_DEPTH MESHLET_JSON_MAX_DEPTH

/*
 * Join tokens: "mlt1.<service>.<pin>.<secret>"
 *   mlt1     format tag (version 1)
 *   service  the service the token may obtain an SVID for
 *   pin      64 lowercase hex digits: SHA-256 of the SubjectPublicKeyInfo of
 *            the root that signs control's server certificate (ca_pin_sha256),
 *            so that a sidecar needs only the control URL and the token to
 *            authenticate control on first contact
 *   secret   32 random bytes, base64url without padding (43 characters)
 * Control stores only api_token_hash() of the whole string.
 */
#define API_TOKEN_TAG "mlt1"
#define API_TOKEN_SECRET_BYTES 32
#define API_TOKEN_SECRET_LEN 43          /* base64url of 32 bytes, no padding */
#define API_TOKEN_MAX 192                /* longest token, NUL included */
#define API_SHA256_HEX_LEN 65            /* 64 hex digits and a NUL */

/* Limits of the bodies below. */
#define API_TOKEN_TTL_DEFAULT 3600
#define API_TOKEN_TTL_MAX ((int64_t)366 * 24 * 3600)
#define API_TOKEN_USES_MAX 1000000
#define API_ENDPOINT_PORTS_MAX 64
#define API_CHECK_HEADERS_MAX 64
#define API_WAIT_DEFAULT 30
#define API_WAIT_MAX 300
/* Services a config long poll may name in upstreams= (one per outbound
 * listener at most: CONFIG_MAX_LISTENERS). */
#define API_UPSTREAMS_MAX 64
/* "[v6]:port" and a NUL fit. */
#define API_ADDRESS_MAX 64

/* The parts of a join token, as parsed by api_token_parse(). */
struct api_join_token {
	char service[64];
	char pin[API_SHA256_HEX_LEN];
};

/* An API refusal: HTTP status, and where/why for the error body. */
struct api_error {
	int status;
	const char *code;          /* static; NULL: api_status_code(status) */
	struct meshlet_err e;
};

/* Records status, path and message in ae (may be NULL); returns -status so
 * handlers can `return api_fail(...)`. */
int api_fail(struct api_error *ae, int status, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* As api_fail(), with code (a static string such as "renewal_limit") in
 * place of the status's generic code, for refusals a client tells apart. */
int api_fail_code(struct api_error *ae, int status, const char *code, const char *path,
                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* The error code of docs/design.md's error shape for an HTTP status:
 * 400 "bad_request", 401 "unauthorized", 403 "forbidden", 404 "not_found",
 * 405 "method_not_allowed", 409 "conflict", 412 "precondition_failed",
 * 413 "payload_too_large", 429 "too_many_requests", 503 "unavailable",
 * else "internal". */
const char *api_status_code(int status);

/* {"error": {"code", "message", "path"}} for ae (its code, else the
 * status's); a new reference or NULL. */
json_t *api_error_body(const struct api_error *ae);

/*
 * Matches path against pattern, where each "{name}" of pattern matches one
 * non-empty path segment (no '/'). Up to ncaps captured segments are
 * copied, NUL-terminated, into caps[i] (each capsz bytes); a segment that
 * does not fit makes the match fail. Returns true on a match.
 */
bool api_route_match(const char *pattern, const char *path, char (*caps)[64], size_t ncaps);

/*
 * A duration: plain seconds ("90"), or one or more <number><unit> with
 * units s, m, h, d ("90s", "15m", "1h", "1h30m"). Must lie in [min, max].
 * Returns 0 and *out seconds, or -EINVAL with err set (path "").
 */
int api_parse_duration(const char *s, int64_t min, int64_t max, int64_t *out,
                       struct meshlet_err *err);

/* Formats a join token into out (API_TOKEN_MAX bytes) from service, the
 * pin (64 hex digits) and API_TOKEN_SECRET_BYTES secret bytes.
 * Returns 0, or -EINVAL for a bad service or pin. */
int api_token_format(char *out, size_t len, const char *service, const char *pin,
                     const unsigned char *secret);

/* Parses a join token. Returns 0 and *out, or -EINVAL with err set (path
 * "token") when token is not one; says nothing about whether it is valid. */
int api_token_parse(const char *token, struct api_join_token *out, struct meshlet_err *err);

/* Lowercase hex SHA-256 of the bytes of s into out (API_SHA256_HEX_LEN). */
void api_sha256_hex(const char *s, size_t len, char *out);

/*
 * An If-Match header: a version as a decimal integer, bare or in double
 * quotes (an ETag as we send it: "5"); "*" gives *version = 0 (any
 * existing version). Returns 0, or -EINVAL with err set (path "If-Match").
 */
int api_parse_if_match(const char *value, int64_t *version, struct meshlet_err *err);

/*
 * What a proxy says about itself with its config poll: degraded=NAME[,NAME]
 * (absent: nothing to say). Control shows it in GET /v1/proxies.
 */
#define API_DEGRADED_RENEWAL 0x1u   /* "renewal": its SVID's renewal is due and fails */
#define API_DEGRADED_EXPIRY 0x2u    /* "expiry": its SVID expires within API_CERT_WARN_S */
#define API_CERT_WARN_S 600
/* flags as "renewal,expiry" into out (len bytes; "" for none). */
void api_degraded_format(unsigned flags, char *out, size_t len);
/* flags as a JSON array of their names; NULL: no memory. */
json_t *api_degraded_json(unsigned flags);

/*
 * GET /v1/services/{svc}/config?after=V&wait=S&upstreams=LIST. Missing:
 * after 0, wait API_WAIT_DEFAULT, upstreams none (the answer carries no
 * endpoints). LIST is "*" (every service's endpoints: transparent mode) or
 * up to API_UPSTREAMS_MAX service names separated by commas. Unknown or
 * repeated parameters are refused. degraded=NAME[,NAME] (names above;
 * others refused) is what the proxy says about itself.
 */
struct api_config_query {
	int64_t after;
	int wait;          /* seconds, 0..API_WAIT_MAX */
	unsigned degraded; /* API_DEGRADED_* */
	bool upstreams_all;
	size_t n_upstreams;
	char upstreams[API_UPSTREAMS_MAX][64];
};
int api_parse_config_query(const char *query, struct api_config_query *out,
                           struct meshlet_err *err);

/* POST /v1/tokens {"service", "ttl_seconds"?, "uses"?} */
struct api_token_req {
	const char *service;       /* borrowed from the body */
	int64_t ttl;               /* default API_TOKEN_TTL_DEFAULT */
	int64_t uses;              /* default 1 */
};
int api_parse_token_req(const json_t *body, struct api_token_req *out, struct meshlet_err *err);

/* POST /v1/svid {"csr", "service"?}: service, when given, must be the
 * caller's own (checked by the caller). */
struct api_svid_req {
	const char *csr;
	size_t csr_len;
	const char *service;       /* NULL when absent */
};
int api_parse_svid_req(const json_t *body, struct api_svid_req *out, struct meshlet_err *err);

/* POST /v1/check {"from", "service", "port", "method"?, "path"?, "headers"?} */
struct api_check_req {
	const char *from;
	const char *service;
	uint16_t port;
	bool http;                 /* method, path or headers given */
	const char *method;        /* NULL when absent */
	const char *path;
	const json_t *headers;     /* object of string values, or NULL */
};
int api_parse_check_req(const json_t *body, struct api_check_req *out, struct meshlet_err *err);

/* True when the config query asked for svc's endpoints. */
bool api_config_query_wants(const struct api_config_query *q, const char *svc);

/* An IP address and port, IPv4-mapped IPv6 addresses folded to IPv4. */
struct api_addr {
	int family;                /* AF_INET or AF_INET6 */
	unsigned char ip[16];      /* 4 or 16 bytes used */
	uint16_t port;
};

/*
 * Parses "a.b.c.d:port" or "[ipv6]:port" (port 1..65535, or 0..65535
 * with allow_port0, for a peer's address). Returns 0 and *out, or -EINVAL.
 */
int api_addr_parse(const char *s, bool allow_port0, struct api_addr *out);

/* The canonical text of a (inet_ntop, "[v6]:port") into out
 * (API_ADDRESS_MAX bytes). */
void api_addr_format(const struct api_addr *a, char *out, size_t len);

/* True when a and b have the same IP (ports ignored). */
bool api_addr_same_ip(const struct api_addr *a, const struct api_addr *b);

/* POST /v1/services/{svc}/endpoints {"address": "ip:port", "ports"?: [..]}:
 * address is canonicalised (api_addr_format) into canon. */
struct api_endpoint_req {
	const char *address;       /* canonical form: a.b.c.d:p or [v6]:p (points to canon) */
	char canon[API_ADDRESS_MAX];
	uint16_t ports[API_ENDPOINT_PORTS_MAX];
	size_t n_ports;
};
int api_parse_endpoint_req(const json_t *body, struct api_endpoint_req *out,
                           struct meshlet_err *err);

/* POST /v1/endpoints/assign and /v1/endpoints/unassign
 * {"service", "address"}: address canonicalised into canon. */
struct api_assign_req {
	const char *service;
	const char *address;       /* points to canon */
	char canon[API_ADDRESS_MAX];
};
int api_parse_assign_req(const json_t *body, struct api_assign_req *out, struct meshlet_err *err);

/* True when s is "a.b.c.d:port" or "[ipv6]:port" with a port of 1..65535. */
bool api_valid_address(const char *s);

/* POST /v1/certs/rotate {"service"} | {"all": true} */
struct api_rotate_req {
	const char *service;       /* NULL when all */
	bool all;
};
int api_parse_rotate_req(const json_t *body, struct api_rotate_req *out, struct meshlet_err *err);

/* POST /v1/certs/revoke {"serial"}: serial normalised (ca_serial_normalize). */
struct api_revoke_req {
	char serial[41];
};
int api_parse_revoke_req(const json_t *body, struct api_revoke_req *out, struct meshlet_err *err);

/* POST /v1/ca/rotate {} | {"force": bool} */
struct api_ca_rotate_req {
	bool force;
};
int api_parse_ca_rotate_req(const json_t *body, struct api_ca_rotate_req *out,
                            struct meshlet_err *err);

/* ---- answers: what meshletctl and the proxy parse out of control's JSON ----
 *
 * Each parser checks the shape it relies on and borrows strings and
 * arrays from doc (valid while doc is). Returns 0, or -EINVAL with err set
 * (the path of the field at fault) for an answer of another shape.
 */

/* {"error": {"code", "message", "path"}} of a refusal; each NULL when
 * absent or not a string. Never fails: any answer may come back. */
struct api_error_resp {
	const char *code;
	const char *message;
	const char *path;
};
void api_parse_error_resp(const json_t *doc, struct api_error_resp *out);

/* True when arr is an array of certificate serials in hex (a revocation
 * list as GET /v1/bundle sends it). */
bool api_valid_serial_list(const json_t *arr);

/* The PEM strings of a non-empty array joined into one malloc'd text, each
 * ending in a newline; NULL when arr is not such an array (or no memory). */
char *api_pem_join(const json_t *arr);

/* POST /v1/svid's answer: {"cert_chain", "trust_domain", "bundle": [PEM],
 * "bundle_version", ...}; bundle is a non-empty array of strings. */
struct api_svid_resp {
	const char *cert_chain;
	const char *trust_domain;
	const json_t *bundle;
	int64_t bundle_version;
};
int api_parse_svid_resp(const json_t *doc, struct api_svid_resp *out, struct meshlet_err *err);

/* GET /v1/bundle's answer: {"trust_domain", "roots": [PEM], "revoked":
 * [serial], "version"}. */
struct api_bundle_resp {
	const char *trust_domain;
	const json_t *roots;
	const json_t *revoked;
	int64_t version;
};
int api_parse_bundle_resp(const json_t *doc, struct api_bundle_resp *out,
                          struct meshlet_err *err);

/* GET /v1/services/{svc}/config's answer: {"version", "policy" (object or
 * null), "policy_version", "bundle_version", "cert_generation",
 * "endpoints": {service: [endpoint]}, "traffic": {service: {"version",
 * "traffic"}}}: traffic holds the traffic documents of the proxy's own
 * service (its inbound side applies rate_limits and faults) and of the
 * upstreams the query named (timeouts, retries, outlier, limits); a
 * service without a document is absent. Each entry is what GET
 * /v1/traffic/{svc} answers (api_traffic_entry, api_parse_traffic_resp). */
struct api_config_resp {
	int64_t version;
	int64_t policy_version;
	int64_t bundle_version;
	int64_t cert_generation;
	const json_t *policy;
	const json_t *endpoints;
	const json_t *traffic;     /* NULL when absent (older control) */
};
int api_parse_config_resp(const json_t *doc, struct api_config_resp *out,
                          struct meshlet_err *err);

/* One endpoint of a config answer: {"address", "ports"?: [1..65535]} (or,
 * as caches written by older versions hold it, the bare "ip:port" string).
 * The address is not parsed here. At most max ports are copied (further
 * ones are checked, not kept). */
struct api_endpoint {
	const char *address;
	uint16_t ports[API_ENDPOINT_PORTS_MAX];
	size_t n_ports;
};
int api_parse_endpoint(const json_t *v, struct api_endpoint *out, struct meshlet_err *err);

/* {"version": V, "traffic": doc}: GET /v1/traffic/{svc}'s answer and an
 * entry of the config answer's traffic. A new reference (doc is copied by
 * reference) or NULL. */
json_t *api_traffic_entry(const json_t *doc, int64_t version);

struct api_traffic_resp {
	int64_t version;
	const json_t *traffic;     /* the document, an object (not parsed here) */
};
int api_parse_traffic_resp(const json_t *doc, struct api_traffic_resp *out,
                           struct meshlet_err *err);

/*
 * What POST /v1/check adds to its answer about traffic: "rate_limits":
 * [{name, requests_per_second, burst, per}] and "faults": [{name, percent,
 * delay_ms?, abort_status?}] of t (NULL: no document) that select req,
 * and "traffic_version" (0: no document). Returns 0 or -ENOMEM.
 */
int api_check_add_traffic(json_t *out, const struct traffic *t, int64_t version,
                          const struct policy_request *req);

/* POST /v1/tokens's answer: {"token", "service", "expires_at", ...}; the
 * token must parse (api_token_parse) and name service. */
struct api_token_resp {
	const char *token;
	const char *service;
	const char *expires_at;
};
int api_parse_token_resp(const json_t *doc, struct api_token_resp *out, struct meshlet_err *err);

/* GET /v1/ca's answer, the parts a rotation walks by: {"phase", "gate"?:
 * {"open", "next_phase"?, "waiting_for"?}}. has_gate is false for a control
 * that does not say (older versions). */
struct api_ca_resp {
	const char *phase;
	bool has_gate;
	bool gate_open;
	const char *next_phase;    /* NULL when absent */
	const char *waiting_for;   /* NULL when absent */
};
int api_parse_ca_resp(const json_t *doc, struct api_ca_resp *out, struct meshlet_err *err);


/* ---- the proxies' counter summaries (docs/observability.md) ----
 *
 * With each config long poll a proxy sends, in the request header
 * API_STATS_HEADER, what its inbound listeners counted since its last
 * summary, as one line of compact JSON:
 *
 *   {"interval_s": 5,
 *    "callers": [{"from": "web", "requests": 12, "denied": 3, "errors_5xx": 0,
 *                 "p50_ms": 1.5, "p99_ms": 9.0}],
 *    "denied":  [{"from": "web", "rule": "no-admin", "n": 3}],
 *    "recent":  [{"at": 1764770000, "from": "web", "rule": "no-admin",
 *                 "method": "POST", "path": "/admin"}]}
 *
 * "from" is the caller's service (or API_STATS_OTHER, the bucket of the
 * callers beyond the caps), requests counts decisions (HTTP requests, or
 * TCP connections), p50/p99 are over HTTP requests only (absent without
 * any). The caps below keep a summary under API_STATS_MAX bytes whatever
 * the traffic; control refuses a summary over them.
 */
#define API_STATS_HEADER "Meshlet-Stats"
/* The answer header naming why control refused a summary (the long poll
 * itself is answered as usual). */
#define API_STATS_REFUSED_HEADER "Meshlet-Stats-Refused"
#define API_STATS_MAX 8192
#define API_STATS_CALLERS_MAX 16
#define API_STATS_DENIED_MAX 16
#define API_STATS_RECENT_MAX 4
#define API_STATS_PATH_MAX 96
#define API_STATS_METHOD_MAX 15
#define API_STATS_INTERVAL_MAX 3600
/* Counts above this are refused (exact in a JSON number everywhere). */
#define API_STATS_COUNT_MAX ((int64_t)1 << 50)
#define API_STATS_MS_MAX 3600000.0
/* The bucket of callers (and rules) beyond the caps: not a service name. */
#define API_STATS_OTHER "(other)"

struct api_stats_caller {
	char from[SERVICE_NAME_MAX + 1];
	int64_t requests, denied, errors_5xx;
	bool has_latency;
	double p50_ms, p99_ms;
};

struct api_stats_denied {
	char from[SERVICE_NAME_MAX + 1];
	char rule[POLICY_RULE_NAME_MAX + 1];
	int64_t n;
};

struct api_stats_recent {
	int64_t at;                          /* unix seconds */
	char from[SERVICE_NAME_MAX + 1];
	char rule[POLICY_RULE_NAME_MAX + 1];
	char method[API_STATS_METHOD_MAX + 1];   /* "" for a TCP connection */
	char path[API_STATS_PATH_MAX + 1];
};

struct api_stats_summary {
	int64_t interval_s;
	size_t n_callers, n_denied, n_recent;
	struct api_stats_caller callers[API_STATS_CALLERS_MAX];
	struct api_stats_denied denied[API_STATS_DENIED_MAX];
	struct api_stats_recent recent[API_STATS_RECENT_MAX];
};

/* The header value of s: a malloc'd line of at most API_STATS_MAX bytes,
 * or NULL (no memory). Strings are copied as they are (api_stats_clean
 * makes a path fit). */
char *api_stats_format(const struct api_stats_summary *s);

/*
 * Parses a header value. Refuses, with err naming the field: over
 * API_STATS_MAX bytes, not JSON, unknown fields, wrong types, negative or
 * huge counts, more entries than the caps, names that are neither service
 * (rule) names nor API_STATS_OTHER, denied > requests.
 */
int api_stats_parse(const char *text, struct api_stats_summary *out, struct meshlet_err *err);

/* Copies s into out (len bytes) as printable ASCII, other bytes as '?',
 * cut to fit: for a request path or method in a summary. */
void api_stats_clean(char *out, size_t len, const char *s);

#endif
