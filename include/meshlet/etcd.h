/*
 * etcd: a small blocking client of etcd's v3 API through its JSON gateway
 * (HTTP/1.1 POSTs of JSON to /v3/kv/range, /v3/kv/txn, /v3/watch, ...),
 * for the etcd store backend and its watch thread.
 *
 * Calls reuse one kept-alive connection (a new one when etcd closed it, or
 * after an answer that did not end cleanly); plain http or https
 * (TLS 1.2+, server verified against a CA file and the endpoint's host;
 * optional client certificate). Every call runs against one deadline;
 * when an endpoint cannot be reached the next one of the list is tried,
 * and the one that answered is tried first next time.
 *
 * Keys and values travel base64-encoded (etcd_b64/etcd_unb64); int64 fields
 * come back as JSON strings (etcd_int reads both forms).
 *
 * A struct etcd is used by one thread at a time (the watch thread opens
 * its own). The process must ignore SIGPIPE: a TLS write to an endpoint
 * that hung up would otherwise kill it.
 */
#ifndef MESHLET_ETCD_H
#define MESHLET_ETCD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "meshlet/json.h"

#define ETCD_ENDPOINTS_MAX 16
/* Largest answer accepted (a listing of the whole prefix, base64'd). */
#define ETCD_RESPONSE_MAX (256u * 1024 * 1024)
/* Longest wait for one TCP connect (an endpoint that is down but does not
 * refuse must not eat the whole deadline of a call). */
#define ETCD_CONNECT_TIMEOUT_MS 1000
#define ETCD_ERR_MAX 256

struct etcd_opts {
	const char *endpoints;   /* "http://h:p[,https://h:p...]" */
	const char *cacert;      /* https: PEM roots; NULL: the system's */
	const char *cert;        /* https: client certificate (PEM), or NULL */
	const char *key;         /* its key */
	int timeout_ms;          /* whole call */
};

struct etcd;

/* Parses the endpoints and prepares TLS. 0 and *out (etcd_free()), or
 * -EINVAL with a message in err. */
int etcd_new(struct etcd **out, const struct etcd_opts *o, struct meshlet_err *err);
void etcd_free(struct etcd *c);

/*
 * POSTs req to path (e.g. "/v3/kv/range") and parses the JSON answer into
 * *resp (json_decref()). retry_any: a read, safe to send again to another
 * endpoint whatever went wrong; otherwise (a write) the next endpoint is
 * tried only when the request could not have reached etcd (no connection)
 * or etcd answered 503 before applying it (no leader, not ready).
 * Returns 0; -EAGAIN (no endpoint answered in time; for a write: it may
 * have been applied), -EPROTO (an answer that is not etcd's), -EINVAL
 * (etcd refused the request: 4xx); the reason in c's etcd_strerror().
 */
int etcd_call(struct etcd *c, const char *path, json_t *req, json_t **resp, bool retry_any);

/*
 * A stream (POST /v3/watch, /v3/lease/keepalive): sends req, then calls
 * fn(arg, msg) for every JSON message of the answer until fn returns
 * non-zero, the stream ends or fails, or stop_fd (may be -1) becomes
 * readable. No deadline once the stream is open; connecting and the
 * first answer are bound by the timeout. Returns fn's non-zero value, 0
 * (stopped through stop_fd), or -EAGAIN / -EPROTO (etcd_strerror()).
 */
typedef int (*etcd_msg_fn)(void *arg, json_t *msg);
int etcd_stream(struct etcd *c, const char *path, json_t *req, int stop_fd, etcd_msg_fn fn,
                void *arg);

/* The last failure's description. */
const char *etcd_strerror(const struct etcd *c);

/* Connections opened so far (for tests and logs: calls share one). */
unsigned long etcd_connects(const struct etcd *c);

/* The endpoint the last call used ("http://h:p"). */
const char *etcd_endpoint(const struct etcd *c);

/* base64 of n bytes (a new string, free()); NULL: out of memory. */
char *etcd_b64(const void *p, size_t n);
/* Decodes base64 text (padding required) into *out (malloc'd, NUL after
 * *n bytes). 0, -EINVAL (not base64) or -ENOMEM. */
int etcd_unb64(const char *text, char **out, size_t *n);

/* An int64 field of etcd's JSON: a string of digits or a number; 0 when
 * absent (proto3 leaves zero values out). -1 when malformed. */
int64_t etcd_int(const json_t *obj, const char *field);

/* The etcd range end for every key starting with prefix (base64-encoded,
 * free()): prefix with its last byte incremented (bytes 0xff dropped
 * first); "\0" (all keys) for "". NULL: out of memory. */
char *etcd_prefix_end_b64(const char *prefix, size_t len);

#endif
