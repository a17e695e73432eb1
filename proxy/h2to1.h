/*
 * h2to1: the heads of an HTTP/2 stream as HTTP/1.1 and back, for the
 * inbound pool of connections to an HTTP/1.1 app (app_protocol http1) and
 * later for HTTP/1.1 requests riding h2 streams between sidecars. Pure
 * functions over buffers the caller owns: no sockets, no sessions, so the
 * unit tests drive them with hostile values alone.
 *
 * Request (h2 -> HTTP/1.1): "METHOD target HTTP/1.1", Host from
 * :authority (else the host field), the regular fields minus pseudo-headers
 * and connection-specific ones (connection, keep-alive, proxy-connection,
 * transfer-encoding, upgrade, te, http2-settings, expect), cookie crumbs
 * joined with "; " (RFC 9113 8.2.3), the caller's x-forwarded-client-cert
 * and x-request-id replaced when given, and exactly one framing field
 * chosen here: content-length when the stream said it (or 0 for a body-less
 * POST/PUT/PATCH), else transfer-encoding: chunked when a body follows.
 * Every name must be a lower-case token and no value may hold CR, LF, NUL
 * or another control byte (h2_check_request refuses those before; this is
 * the last line: nothing that could split the HTTP/1.1 head reaches the app).
 *
 * Response (HTTP/1.1 -> h2): :status and the app's fields, names in lower
 * case, minus hop-by-hop ones (connection and the fields its options name,
 * keep-alive, proxy-connection, transfer-encoding, upgrade, te, trailer);
 * content-length kept except on 1xx/204 (where it cannot be).
 */
#ifndef MESHLET_PROXY_H2TO1_H
#define MESHLET_PROXY_H2TO1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nghttp2/nghttp2.h>

#include "meshlet/http.h"
#include "h2session.h"

/* An HTTP/2 request head, checked (h2_check_request) and decided. */
struct h2to1_request {
	const char *method;              /* :method */
	const char *target;              /* normalised path, "?" and the query, or "*" */
	const char *authority;           /* :authority or host; NULL: none (400 upstream) */
	const struct h2_field *fields;   /* the stream's header block, arrival order */
	size_t n_fields;
	const char *xfcc;                /* x-forwarded-client-cert to set, or NULL */
	const char *request_id;          /* x-request-id to set, or NULL: the caller's */
	bool no_body;                    /* END_STREAM came with the HEADERS */
};

/* How the HTTP/1.1 request's body is framed (the pool writes DATA that way). */
enum h2to1_framing {
	H2TO1_NO_BODY,
	H2TO1_LENGTH,      /* content-length: the DATA as it is */
	H2TO1_CHUNKED,     /* each DATA chunk-encoded, then "0\r\n\r\n" */
};

/*
 * Writes r's HTTP/1.1 head (up to and with the empty line) into out (cap
 * bytes), its length to *len and its body framing to *framing. Returns 0;
 * -ENOSPC with *len the size needed (out NULL and cap 0 to ask); -EINVAL
 * when a name is not a lower-case token, a value or the target holds a
 * control byte, the method is not a token, or the content-length copies
 * disagree or are not digits.
 */
int h2to1_request_head(const struct h2to1_request *r, char *out, size_t cap, size_t *len,
                       enum h2to1_framing *framing);

/*
 * The HTTP/2 response head for the app's final response h (status >= 200):
 * fills nv (cap_nv entries) with ":status" and the forwarded fields, their
 * names lower-cased into buf (buf_cap bytes; nv points into it and into
 * h). *n gets the count. Returns 0, -ENOSPC when nv or buf is too small,
 * -EINVAL when a value holds CR, LF or NUL.
 */
int h2to1_response_nv(const struct http_head *h, nghttp2_nv *nv, size_t cap_nv, size_t *n,
                      char *buf, size_t buf_cap);

/*
 * Between sidecars: the field the outbound sidecar sets on a stream whose
 * calling app spoke HTTP/1.1 (value "http1"), so that an inbound listener
 * with app_protocol auto reaches its app as HTTP/1.1 too. Neither side
 * ever forwards a copy it received: the outbound drops the app's, the
 * inbound strips the peer's before anything reaches the app.
 */
#define H2TO1_PROTO_FIELD "x-meshlet-app-protocol"

/*
 * HTTP/1.1 -> HTTP/2, for the pool between sidecars (upool.c): the request
 * head h (parsed and normalised by lib/http.c) as a header list into nv
 * (cap_nv entries), names lower-cased into buf (buf_cap bytes; nv points
 * into buf and h). :method, :scheme "http", :authority from the absolute
 * target or Host, :path the normalised path with the query as sent ("*"
 * for OPTIONS *); dropped: Host, connection-specific fields (connection and
 * the fields its options name, keep-alive, proxy-connection,
 * transfer-encoding, upgrade, te, http2-settings), expect (100-continue is
 * answered by the outbound sidecar), x-forwarded-client-cert, and the
 * caller's x-request-id when request_id replaces it; content-length kept
 * only for a body of that length (a chunked body ends with END_STREAM);
 * H2TO1_PROTO_FIELD added. Returns 0; -ENOSPC; -EINVAL for a name that is
 * not a token or a value with a control byte, or a CONNECT / Upgrade
 * request (those are tunnels, never streams).
 */
int h1to2_request_nv(const struct http_head *h, const char *request_id, nghttp2_nv *nv,
                     size_t cap_nv, size_t *n, char *buf, size_t buf_cap);

/*
 * HTTP/2 -> HTTP/1.1: the final response head nv (checked by
 * h2_check_response) for a request with req_flags (HTTP_REQ_HEAD) as an
 * HTTP/1.1 head into out. end: END_STREAM came with it. One framing,
 * chosen once: none for HEAD, 204 and 304 (content-length kept for HEAD
 * and 304, dropped for 204); the response's content-length (all copies
 * equal, digits only; written once) for a body; "content-length: 0" when END_STREAM came
 * with the head; else "transfer-encoding: chunked". close adds
 * "connection: close". Connection-specific fields are dropped. Returns 0
 * with *len and *framing; -ENOSPC with *len the size needed (out NULL, cap
 * 0 to ask); -EINVAL for a bad :status, content-length, name or value.
 */
int h2to1_response_head(const nghttp2_nv *nv, size_t n, unsigned req_flags, bool end, bool close,
                        char *out, size_t cap, size_t *len, enum h2to1_framing *framing);

/* The chunk header for n body bytes ("<hex>\r\n") into out (>= 20 bytes); its length. */
size_t h2to1_chunk_header(size_t n, char *out);

#endif
