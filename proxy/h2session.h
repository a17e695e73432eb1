/*
 * h2session: the nghttp2 side of the HTTP/2 module (h2flow.c), apart from
 * any connection so that unit tests and the fuzz target use it alone:
 * sessions set up with the config's limits and nghttp2's own flood guards,
 * the header checks nghttp2 leaves to the application, and the counters
 * that end an abusive connection (rapid reset, control-frame floods,
 * CONTINUATION floods, oversized header lists).
 */
#ifndef MESHLET_PROXY_H2SESSION_H
#define MESHLET_PROXY_H2SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "meshlet/config.h"
#include "meshlet/metrics.h"

/* The 24-byte client connection preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"). */
#define H2_PREFACE NGHTTP2_CLIENT_MAGIC
#define H2_PREFACE_LEN NGHTTP2_CLIENT_MAGIC_LEN

/*
 * Whether data (len bytes, the first bytes of a connection) starts the
 * HTTP/2 preface: 1 it does (all 24 bytes there), 0 it does not, -1 too
 * short to tell (a prefix of the preface).
 */
int h2_is_preface(const char *data, size_t len);

/*
 * A new session facing a client (server) or an upstream (client), with
 * lim's limits announced in its first SETTINGS (submitted here) and
 * enforced: no automatic WINDOW_UPDATE (the caller consumes what it
 * passed on: backpressure), nghttp2's reset rate limit, CONTINUATION,
 * SETTINGS-entry and pending-ack limits. Returns 0 or a negative nghttp2
 * error.
 */
int h2_session_new(nghttp2_session **out, bool server, const struct config_http2 *lim,
                   const nghttp2_session_callbacks *cb, void *user);

/* A field of a header block as nghttp2 delivered it. */
struct h2_field {
	const char *name, *value;
	size_t name_len, value_len;
};

/* What is wrong with a header block: how to refuse it. */
enum h2_refusal {
	H2_OK = 0,
	H2_MALFORMED,    /* RFC 9113 8.1.1: RST_STREAM PROTOCOL_ERROR */
	H2_BAD_REQUEST,  /* well-formed but refused like HTTP/1.1 would: 400 */
};

/*
 * Checks a request header block (fields in arrival order), whatever
 * nghttp2 checked already: names lower-case tokens, values without CR,
 * LF or NUL, pseudo-headers known, once each and before regular fields,
 * no connection-specific fields (connection, keep-alive, proxy-connection,
 * transfer-encoding, upgrade; te other than "trailers"), :method, :scheme
 * and :path present, :path "/..." or "*" for OPTIONS, CONNECT refused,
 * one content-length of digits, :authority and host agreeing. *why gets a
 * short static text.
 */
enum h2_refusal h2_check_request(const struct h2_field *f, size_t n, const char **why);

/* The same for a response (or trailers: trailers true, no pseudo-headers). */
enum h2_refusal h2_check_response(const struct h2_field *f, size_t n, bool trailers,
                                  const char **why);

/* One token bucket: burst tokens, refilled at rate per second. */
struct h2_bucket {
	double tokens;
	uint64_t at_ms;
};

/* Counts what a peer makes us do for nothing; see h2_guard_frame(). */
struct h2_guard {
	struct h2_bucket control;     /* SETTINGS, PING, PRIORITY, empty DATA, unknown */
	struct h2_bucket resets;      /* RST_STREAM from the peer */
	uint32_t continuations;       /* CONTINUATION frames of the header block in progress */
	size_t header_bytes;          /* decoded bytes of the header block in progress */
	uint32_t max_streams, max_header_bytes;
};

void h2_guard_init(struct h2_guard *g, const struct config_http2 *lim, uint64_t now_ms);

/*
 * A frame header arrived (nghttp2's on_begin_frame). Returns -1 when it is
 * fine, else the abuse it completes (enum metrics_h2_abuse). open_streams:
 * the peer's streams open now.
 */
int h2_guard_frame(struct h2_guard *g, const nghttp2_frame_hd *hd, size_t open_streams,
                   bool new_stream, uint64_t now_ms);

/* A decoded header field of namelen + valuelen bytes: -1 or H2_ABUSE_HEADER_LIST. */
int h2_guard_header(struct h2_guard *g, size_t namelen, size_t valuelen);

/* gRPC's grpc-timeout ("<digits><H|M|S|m|u|n>", at most 8 digits) in ms
 * (rounded up), or -1 when malformed. */
int64_t h2_grpc_timeout_ms(const char *v, size_t len);

/* A content-type that makes a request gRPC: application/grpc, +proto, ;... */
bool h2_is_grpc(const char *content_type, size_t len);

#endif
