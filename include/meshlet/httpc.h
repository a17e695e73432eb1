/*
 * httpc: a small blocking HTTPS client for the control API, shared by
 * meshletctl and the proxy's control client.
 *
 * By default one request per connection (Connection: close); with
 * httpc_set_keepalive() the connection of a complete response is kept for
 * the next request on the same client while the server keeps it open.
 * TLS 1.3 only, JSON bodies in and out through jansson. Every step (resolve, connect, handshake,
 * write, read) runs against one deadline, the response is refused past a
 * size limit, and another thread may interrupt a request (httpc_cancel).
 *
 * The server is verified in one of three ways, chosen by the options:
 *  - ca_file (meshletctl): the chain ends at a root of the file, and the
 *    leaf names the URL's host (DNS name or IP address) or, failing that,
 *    spiffe://<td>/control for the trust domain <td> of a root in the file;
 *  - roots (the proxy once joined): the chain ends at one of these roots
 *    and the leaf carries the URI SAN expect_uri;
 *  - pin_sha256 (the proxy's join): the anchor is a certificate the server
 *    presents in its own chain whose SHA-256 SPKI pin (ca_pin_sha256) is
 *    the given one, and the leaf carries the URI SAN expect_uri.
 * In every mode nothing (token, body) is sent before the server verified.
 * Verification happens at each new handshake: a kept-alive connection was
 * verified when it was made and is not verified again when reused.
 */
#ifndef MESHLET_HTTPC_H
#define MESHLET_HTTPC_H

#include <stdbool.h>
#include <stddef.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

/* Defaults for struct httpc_opts fields left 0. */
#define HTTPC_TIMEOUT_MS_DEFAULT 30000
#define HTTPC_MAX_RESPONSE_DEFAULT (16u * 1024 * 1024)
#define HTTPC_MAX_HEADER 16384
#define HTTPC_ERR_MAX 512

/* What httpc_request() failed with (0 is success). */
enum httpc_status {
	HTTPC_OK = 0,
	HTTPC_EUSAGE = -1,        /* bad URL, unreadable CA file, bad token: local problem */
	HTTPC_ECONNECT = -2,      /* resolve/connect/TLS/timeout/protocol */
	HTTPC_EVERIFY = -3,       /* the server's certificate did not verify (pin, roots, name) */
	HTTPC_ECANCELED = -4,     /* httpc_cancel() was called */
};

struct httpc_opts {
	const char *url;          /* https://host[:port][/prefix]; required */
	/* Server verification: exactly one of ca_file, roots, pin_sha256. */
	const char *ca_file;      /* PEM roots the server must chain to */
	STACK_OF(X509) *roots;    /* roots in memory (the client keeps its own references) */
	const char *pin_sha256;   /* 64 lowercase hex digits */
	const char *expect_uri;   /* with roots or pin_sha256: the leaf's URI SAN; required */
	/* Client certificate for mutual TLS, optional (the client keeps references). */
	X509 *cert;
	STACK_OF(X509) *chain;    /* intermediates after cert; may be NULL */
	EVP_PKEY *key;
	const char *token;        /* Bearer token, or NULL for none */
	int timeout_ms;           /* whole request; 0: HTTPC_TIMEOUT_MS_DEFAULT */
	size_t max_response;      /* headers + body; 0: HTTPC_MAX_RESPONSE_DEFAULT */
	const char *user_agent;   /* NULL: "meshlet" */
};

struct httpc;

struct httpc_response {
	int status;               /* HTTP status code */
	char *body;               /* raw body, NUL-terminated after body_len (malloc'd) */
	size_t body_len;
	json_t *json;             /* body parsed as JSON, or NULL (empty or not JSON) */
	char etag[128];           /* ETag header value, "" if absent */
	char content_type[128];
	int retry_after;          /* Retry-After in seconds (at most a day), -1 if absent */
};

/*
 * Checks the options and prepares a TLS context. Returns 0 and *out (free
 * with httpc_free()), or HTTPC_EUSAGE with a message in err (HTTPC_ERR_MAX
 * bytes): bad URL, unreadable or empty CA file, not exactly one way of
 * verifying the server, a bad pin, a key that does not match cert, a token
 * with characters that cannot go in a header.
 */
int httpc_new(struct httpc **out, const struct httpc_opts *opts, char *err);

/* Frees h (the token is wiped). No request may be running. NULL is a no-op. */
void httpc_free(struct httpc *h);

/* The deadline of each later request (0: the default). Not thread-safe
 * against a running request on h. */
void httpc_set_timeout(struct httpc *h, int timeout_ms);

/*
 * Sends method path (path starts with '/', query included; appended to the
 * URL's prefix) with body (serialised compactly; NULL: no body) or raw_body
 * (raw_len bytes sent as is, Content-Type application/json; used when
 * body is NULL and raw_body is not), and extra headers ("Name: value"
 * strings, NULL-terminated list, may be NULL). Fills *resp (release with
 * httpc_response_clear()) and returns 0 whatever the HTTP status; with a
 * message in err (may be NULL) when no complete response was received:
 * HTTPC_EVERIFY (the server's certificate did not verify: nothing was
 * sent), HTTPC_ECANCELED, or HTTPC_ECONNECT (connection refused, TLS
 * failure, timeout, response over the size limit, malformed HTTP).
 */
int httpc_request(struct httpc *h, const char *method, const char *path,
                  const json_t *body, const char *raw_body, size_t raw_len,
                  const char *const *headers, struct httpc_response *resp, char *err);

/*
 * Keep-alive (off by default): the connection of a complete response
 * (Content-Length, chunked, or no body; the server did not say
 * Connection: close) is kept for the next request on h. A request on a
 * kept connection that fails before a complete response is retried once on
 * a new connection when nothing of it was written or the method is GET or
 * HEAD (same deadline); otherwise its error is returned. Any failure,
 * cancellation or timeout drops the connection. Not thread-safe against a
 * running request on h (httpc_cancel() is).
 */
void httpc_set_keepalive(struct httpc *h, bool on);

/* Connections h opened so far (TCP connects that reached the TLS
 * handshake): a request that reused one does not count. */
unsigned long httpc_connections(const struct httpc *h);

/*
 * Interrupts the request running on h in another thread (it returns
 * HTTPC_ECANCELED promptly) and makes every later request on h fail the
 * same way. Thread-safe; async-signal-safe.
 */
void httpc_cancel(struct httpc *h);

/*
 * Makes h usable again after httpc_cancel() (a request to be interrupted
 * and made anew, not abandoned). Not safe against a concurrent
 * httpc_cancel(): the caller serialises both (the proxy's control client
 * does it under its lock).
 */
void httpc_uncancel(struct httpc *h);

void httpc_response_clear(struct httpc_response *resp);

/*
 * Appends s to out (of outlen bytes) percent-encoding everything but RFC
 * 3986 unreserved characters, for a path segment or query value.
 * Returns 0, or -1 when it does not fit.
 */
int httpc_escape(char *out, size_t outlen, const char *s);

#endif
