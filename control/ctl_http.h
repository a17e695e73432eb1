/*
 * ctl_http: meshletctl's small blocking HTTPS client for the control API.
 *
 * One request per connection (Connection: close), TLS 1.3 only, the server
 * verified against a CA file and, by name, against the URL's host (DNS name
 * or IP address) or, failing that, the control's SPIFFE ID
 * spiffe://<td>/control where <td> is the trust domain of a root in the CA
 * file (its URI SAN spiffe://<td>). JSON bodies in and out through jansson.
 * Every step (resolve, connect, handshake, write, read) runs against one
 * deadline, and the response is refused past a size limit.
 *
 * Needs only OpenSSL 3 and jansson, so the CLI does not depend on the
 * daemon's code.
 */
#ifndef MESHLET_CTL_HTTP_H
#define MESHLET_CTL_HTTP_H

#include <stddef.h>
#include <jansson.h>

/* Defaults for struct ctl_http_opts fields left 0. */
#define CTL_HTTP_TIMEOUT_MS_DEFAULT 30000
#define CTL_HTTP_MAX_RESPONSE_DEFAULT (16u * 1024 * 1024)
#define CTL_HTTP_MAX_HEADER 16384
#define CTL_HTTP_ERR_MAX 512

/* What ctl_http_request() failed with (0 is success). */
enum ctl_http_status {
	CTL_HTTP_OK = 0,
	CTL_HTTP_EUSAGE = -1,     /* bad URL, unreadable CA file, bad token: local problem */
	CTL_HTTP_ECONNECT = -2,   /* resolve/connect/TLS/verification/timeout/protocol */
};

struct ctl_http_opts {
	const char *url;          /* https://host[:port][/prefix]; required */
	const char *ca_file;      /* PEM roots the server must chain to; required */
	const char *token;        /* Bearer token, or NULL for none */
	int timeout_ms;           /* whole request; 0: CTL_HTTP_TIMEOUT_MS_DEFAULT */
	size_t max_response;      /* headers + body; 0: CTL_HTTP_MAX_RESPONSE_DEFAULT */
	const char *user_agent;   /* NULL: "meshletctl" */
};

struct ctl_http;

struct ctl_http_response {
	int status;               /* HTTP status code */
	char *body;               /* raw body, NUL-terminated after body_len (malloc'd) */
	size_t body_len;
	json_t *json;             /* body parsed as JSON, or NULL (empty or not JSON) */
	char etag[128];           /* ETag header value, "" if absent */
	char content_type[128];
};

/*
 * Checks the options and prepares a TLS context (loads the CA file). Returns
 * 0 and *out (free with ctl_http_free()), or CTL_HTTP_EUSAGE with a message
 * in err (CTL_HTTP_ERR_MAX bytes): bad URL, unreadable or empty CA file,
 * a token with characters that cannot go in a header.
 */
int ctl_http_new(struct ctl_http **out, const struct ctl_http_opts *opts, char *err);

void ctl_http_free(struct ctl_http *h);

/*
 * Sends method path (path starts with '/', query included; appended to the
 * URL's prefix) with body (serialised compactly; NULL: no body) or raw_body
 * (raw_len bytes sent as is, Content-Type application/json; used when
 * body is NULL and raw_body is not), and extra headers ("Name: value"
 * strings, NULL-terminated list, may be NULL). Fills *resp (release with
 * ctl_http_response_clear()) and returns 0 whatever the HTTP status;
 * CTL_HTTP_ECONNECT (with a message in err) when no complete response was
 * received: connection refused, TLS or certificate verification failure,
 * timeout, response over the size limit, malformed HTTP.
 */
int ctl_http_request(struct ctl_http *h, const char *method, const char *path,
                     const json_t *body, const char *raw_body, size_t raw_len,
                     const char *const *headers, struct ctl_http_response *resp, char *err);

void ctl_http_response_clear(struct ctl_http_response *resp);

/*
 * Appends s to out (of outlen bytes) percent-encoding everything but RFC
 * 3986 unreserved characters, for a path segment or query value.
 * Returns 0, or -1 when it does not fit.
 */
int ctl_http_escape(char *out, size_t outlen, const char *s);

#endif
