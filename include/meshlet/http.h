/*
 * http: incremental, hardened HTTP/1.x message framing for the proxy's data
 * path, and the path normalisation that policy matching relies on.
 *
 * One struct http_parser_state per direction of a connection: a request
 * parser on the client side, a response parser on the upstream side. Bytes
 * are pushed in with http_feed() as they arrive; each call reports one event
 * and how many input bytes it used:
 *
 *   HEAD_COMPLETE      a request/status line and header block was parsed and
 *                      validated: event.head (also http_parser_state.head).
 *                      Forward http_head_serialize()'s output, not the bytes.
 *   BODY               event.data/event.len: bytes of this message after the
 *                      head (chunk framing and trailers included), pointing
 *                      into the caller's data: forward them verbatim.
 *   MESSAGE_COMPLETE   the message ended; the next byte starts the next one.
 *   PAUSED             (request side) the last request asked for Upgrade or
 *                      CONNECT: wait for its response, then http_resume().
 *   NEED_MORE          every input byte was used; feed more when it arrives.
 *   ERROR              event.status (400, 413, 414, 431, 501, 505; 502 on
 *                      the response side) and event.reason (static text).
 *                      Sticky. The caller answers status and closes.
 *
 * Driving it (request side):
 *
 *   for (;;) {
 *       size_t used;
 *       struct http_event ev = http_feed(&p, data, len, &used);
 *       data += used; len -= used;
 *       switch (ev.type) {
 *       case HTTP_EV_NEED_MORE:   goto read_more;
 *       case HTTP_EV_HEAD_COMPLETE: policy on ev.head; serialize; forward
 *       case HTTP_EV_BODY:        forward ev.data/ev.len (or drop if denied)
 *       case HTTP_EV_MESSAGE_COMPLETE: next request (ev.head still valid)
 *       case HTTP_EV_PAUSED:      stop reading until the response decides
 *       case HTTP_EV_ERROR:       answer ev.status, close
 *       }
 *   }
 *
 * Keep calling until NEED_MORE (or PAUSED/ERROR): MESSAGE_COMPLETE may be due
 * with len == 0. The caller may pass fewer bytes than it holds (backpressure);
 * nothing is consumed beyond what "used" says, and bodies are never copied.
 * On EOF call http_finish().
 *
 * A denied request: keep feeding and drop its BODY spans; answer 403 at
 * MESSAGE_COMPLETE and go on with the next request (or answer at once and
 * close when the body is not worth reading). A denied Upgrade/CONNECT: answer,
 * then http_resume(p, false). ev.head stays valid through BODY and
 * MESSAGE_COMPLETE, but the next request reuses the buffer: copy what the
 * response side needs later (req_flags, method and path for the log).
 *
 * Response side: http_response_init(), then before the first byte of each
 * response http_response_expect(req_flags of the request it answers, in
 * order; saved from that request's head). Interim 1xx responses (status
 * < 200, except 101) are complete messages of their own; the same request
 * still expects its final response, no new http_response_expect() needed.
 * After a 101 to an upgrade request or a 2xx to CONNECT (head->tunnel),
 * every further byte is reported as BODY: relay raw in both directions
 * (http_resume(req_parser, true)).
 *
 * Memory: the head is collected in a buffer that grows up to the limits
 * (line + header block) and is released by http_shrink(); nothing is kept
 * per body byte. Pointers in struct http_head point into that buffer.
 *
 * Decisions (see also lib/http.c):
 * - Request line longer than max_line: 414; header block over
 *   max_header_bytes or more than max_headers fields: 431.
 * - Any repeated Content-Length is refused (even identical values); so is a
 *   list value. Transfer-Encoding must be exactly one "chunked" (one field,
 *   one coding); other codings: 501; both CL and TE: 400; TE in HTTP/1.0: 400.
 * - Exactly one Host in HTTP/1.1 (at most one in 1.0). An absolute-form
 *   target (http/https only, no userinfo) is reduced to origin-form and its
 *   authority must equal Host (case-insensitive; Host required then, also in
 *   1.0), else 400. The query is forwarded verbatim and never normalised.
 * - Field names compare case-insensitively with '_' equal to '-' (CGI-style
 *   apps merge them) when fields are dropped or counted: x_tenant counts as
 *   a copy of x-tenant, and x_forwarded_client_cert is dropped like
 *   x-forwarded-client-cert. Framing/routing fields spelt with '_'
 *   (content_length, host, ...): 400. Policy lookups use exact names and
 *   http_head_check_policy_fields() refuses '_' spellings of them.
 * - Unknown methods (valid tokens http-parser does not know, e.g. "get"): 501.
 * - h2c upgrades and HTTP2-Settings: 400. Other Upgrade values are reported.
 * - Connection options other than close/keep-alive/upgrade are removed on
 *   serialisation together with the fields they name; options naming
 *   Content-Length, Transfer-Encoding or Host are refused (400 / 502).
 *   Keep-Alive and Proxy-Connection fields are dropped.
 * - Trailer fields are validated like header fields; trailers named
 *   content-length, transfer-encoding, host, connection, upgrade, trailer
 *   or x-forwarded-client-cert are refused, and so are trailers naming a
 *   header the policy evaluates (http_request_guard_trailers()).
 * Path rules: see http_path_normalize().
 */
#ifndef MESHLET_HTTP_H
#define MESHLET_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HTTP_DEFAULT_MAX_LINE 8192            /* request/status line, bytes */
#define HTTP_DEFAULT_MAX_HEADER_BYTES 65536   /* header block incl. CRLFs */
#define HTTP_DEFAULT_MAX_HEADERS 100

struct http_limits {
	size_t max_line;           /* 0: HTTP_DEFAULT_MAX_LINE */
	size_t max_header_bytes;   /* 0: HTTP_DEFAULT_MAX_HEADER_BYTES */
	size_t max_headers;        /* 0: HTTP_DEFAULT_MAX_HEADERS */
	uint64_t max_body;         /* 0: unlimited; else larger bodies get 413 */
};

/* How a message's body ends. */
enum http_framing {
	HTTP_BODY_NONE,        /* no body */
	HTTP_BODY_LENGTH,      /* content_length bytes */
	HTTP_BODY_CHUNKED,     /* chunked, up to the last chunk and trailers */
	HTTP_BODY_UNTIL_CLOSE, /* responses only: until the upstream closes */
	HTTP_BODY_TUNNEL,      /* after 101 / 2xx to CONNECT: raw bytes */
};

/* What a response parser must know about the request it answers. */
#define HTTP_REQ_HEAD     0x1u   /* method HEAD: the response has no body */
#define HTTP_REQ_CONNECT  0x2u   /* CONNECT: a 2xx turns into a tunnel */
#define HTTP_REQ_UPGRADE  0x4u   /* Upgrade asked: a 101 turns into a tunnel */

/* One header field; both strings NUL-terminated, value trimmed of OWS. */
struct http_field {
	const char *name;
	const char *value;
	uint32_t name_len;
	uint32_t value_len;
};

enum http_target_form {
	HTTP_TARGET_ORIGIN,     /* /path?query */
	HTTP_TARGET_ABSOLUTE,   /* http://host/path?query, reduced to origin */
	HTTP_TARGET_AUTHORITY,  /* host:port, CONNECT only */
	HTTP_TARGET_ASTERISK,   /* *, OPTIONS only */
};

/*
 * A parsed, validated head. All strings are NUL-terminated and live in the
 * parser's buffer: valid until the parser starts the next message (the
 * first http_feed() after MESSAGE_COMPLETE that sees a byte of it),
 * http_shrink() or http_cleanup().
 */
struct http_head {
	bool is_request;
	int version_minor;              /* HTTP/1.<version_minor>: 0 or 1 */
	/* requests */
	const char *method;             /* case-sensitive token, e.g. "GET" */
	enum http_target_form form;
	const char *path;               /* normalised path ("*" for asterisk,
	                                   "" for authority form) */
	const char *query;              /* after '?', verbatim; NULL when no '?' */
	const char *authority;          /* absolute/authority form, else NULL */
	const char *host;               /* the Host field, or NULL */
	const char *upgrade;            /* the Upgrade field, or NULL */
	unsigned req_flags;             /* HTTP_REQ_*, for http_response_expect */
	/* responses */
	int status;
	const char *reason;             /* reason phrase, may be "" */
	bool tunnel;                    /* 101 / 2xx to CONNECT: raw bytes follow */
	bool te_coded;                  /* Transfer-Encoding names a coding besides
	                                   chunked (gzip...): the content is encoded,
	                                   and only an HTTP/1.1 hop can say so */
	/* both */
	const struct http_field *fields;
	size_t n_fields;
	enum http_framing framing;
	uint64_t content_length;        /* when framing == HTTP_BODY_LENGTH */
	bool keep_alive;                /* connection may carry another message */
};

enum http_event_type {
	HTTP_EV_NEED_MORE,
	HTTP_EV_HEAD_COMPLETE,
	HTTP_EV_BODY,
	HTTP_EV_MESSAGE_COMPLETE,
	HTTP_EV_PAUSED,
	HTTP_EV_ERROR,
};

struct http_event {
	enum http_event_type type;
	const struct http_head *head;   /* HEAD_COMPLETE, MESSAGE_COMPLETE */
	const char *data;               /* BODY: span of the fed data */
	size_t len;
	bool framing;                   /* BODY with http_split_chunks(): the span is
	                                   chunk sizes, CRLFs or trailers, not content */
	int status;                     /* ERROR: HTTP status to answer */
	const char *reason;             /* ERROR: short static text */
};

enum http_kind { HTTP_KIND_REQUEST, HTTP_KIND_RESPONSE };

/* Internal state; fields are private to lib/http.c. */
struct http_parser_state {
	enum http_kind kind;
	struct http_limits lim;
	int state;
	/* head collection */
	char *buf;
	size_t buf_len, buf_cap;
	size_t line_start;              /* offset of the current line */
	size_t hdr_start;               /* offset of the first field line */
	size_t n_lines;                 /* lines of this head so far */
	size_t skipped_empty;           /* empty lines before the start line */
	bool saw_cr;
	struct http_field *fields;
	size_t fields_cap;
	struct http_head head;
	/* body */
	uint64_t remaining;             /* bytes of the current length/chunk */
	uint64_t body_total;
	int chunk_state;
	size_t chunk_line;              /* bytes of the current chunk/trailer line */
	size_t trailer_bytes, n_trailers;
	char trailer_name[64];
	size_t trailer_name_len;
	bool split_chunks;              /* see http_split_chunks() */
	const char *const *guarded;     /* trailer names refused (policy's) */
	size_t n_guarded;
	/* response side */
	unsigned expect_flags;
	bool expecting;
	/* error */
	int err_status;
	const char *err_reason;
};

/* Fills *lim with the defaults. */
void http_limits_default(struct http_limits *lim);

/*
 * Initialises p as a request parser (client -> proxy). lim may be NULL for
 * the defaults; zero fields take the defaults. Allocates nothing until bytes
 * arrive. Release with http_cleanup().
 */
void http_request_init(struct http_parser_state *p, const struct http_limits *lim);

/*
 * Chunked bodies: split true reports chunk content and framing (sizes,
 * CRLFs, trailers) as separate BODY spans, the latter with event.framing
 * set, so a caller that re-frames the body (HTTP/1.1 -> HTTP/2) passes on
 * the content alone without a decoder of its own. Off by default: BODY
 * spans then mix both, to be forwarded verbatim.
 */
void http_split_chunks(struct http_parser_state *p, bool split);

/*
 * Request side: trailers of chunked requests naming one of names[0..n)
 * (compared case-insensitively, '_' == '-') are refused with 400, because
 * the policy decided on the head before they arrived. names must outlive
 * p (the connection's snapshot); n 0 turns it off.
 */
void http_request_guard_trailers(struct http_parser_state *p, const char *const *names,
                                 size_t n);

/*
 * Initialises p as a response parser (upstream -> proxy). Call
 * http_response_expect() before feeding the first response.
 */
void http_response_init(struct http_parser_state *p, const struct http_limits *lim);

/*
 * Response side: the next response answers a request with req_flags
 * (struct http_head.req_flags of that request). Call after init and after
 * each MESSAGE_COMPLETE of a final (status >= 200) response. Bytes fed
 * without an expected request are an ERROR 502 ("unsolicited response").
 */
void http_response_expect(struct http_parser_state *p, unsigned req_flags);

/*
 * Feeds len bytes (len may be 0). Sets *consumed to the bytes used (<= len)
 * and returns the next event; see the top of this header. Head bytes are
 * copied into p's buffer; body bytes are not copied. After ERROR every call
 * returns the same error and consumes nothing. Never fails otherwise (an
 * allocation failure is reported as ERROR 500 "out of memory").
 */
struct http_event http_feed(struct http_parser_state *p, const char *data, size_t len,
                            size_t *consumed);

/*
 * The peer closed its sending side. Returns MESSAGE_COMPLETE when that ends
 * a close-delimited response, NEED_MORE when no message was in progress (or
 * in a tunnel), ERROR (400 / 502, "truncated message") when it cut one short.
 */
struct http_event http_finish(struct http_parser_state *p);

/*
 * Request side, after PAUSED: tunnel true when the upstream switched
 * protocols (101 to an Upgrade, 2xx to CONNECT): from then on every byte is
 * BODY. tunnel false: parse the next request normally. No-op otherwise.
 */
void http_resume(struct http_parser_state *p, bool tunnel);

/*
 * Frees the head buffer when no head is being collected (an idle keep-alive
 * connection then holds no buffer). Invalidates the last head.
 */
void http_shrink(struct http_parser_state *p);

/* Frees everything p holds; p may be initialised again. */
void http_cleanup(struct http_parser_state *p);

/* A field the proxy sets or adds when it serialises a head. */
struct http_rewrite_field {
	const char *name;
	const char *value;   /* NULL in set[]: remove incoming copies only */
};

struct http_rewrite {
	const struct http_rewrite_field *set;   /* every incoming copy removed, value added once */
	size_t n_set;
	const struct http_rewrite_field *add;   /* added only when the head has no such field */
	size_t n_add;
};

/*
 * Writes h as it should be forwarded: start line (requests: normalised path
 * plus the original query, origin-form for absolute-form targets; version
 * kept), the fields in their original order as "name: value" minus
 * hop-by-hop ones (see the decisions above) and minus those named in
 * rw->set, then rw->set's and rw->add's fields, then CRLF. rw may be NULL.
 * On the inbound side pass set = {{"x-forwarded-client-cert", value}} and
 * add = {{"x-request-id", id}}.
 * Returns 0 and *len; -ENOSPC with *len = the size needed when cap is too
 * small (cap 0 and out NULL to ask); -EINVAL when a rewrite name is not a
 * token or a value holds CR, LF, NUL or other control characters.
 */
int http_head_serialize(const struct http_head *h, const struct http_rewrite *rw,
                        char *out, size_t cap, size_t *len);

/*
 * How many fields of h are named name (case-insensitive, '_' == '-').
 * *first (may be NULL) gets the first one's value, or NULL when none.
 * Policy code must refuse a request (400) when a field it evaluates occurs
 * more than once, so that the proxy and the app never read different copies.
 */
size_t http_head_count(const struct http_head *h, const char *name, const char **first);

/* Whether s (len bytes) has only the characters a Host field may (RFC 3986
 * host and port: unreserved, sub-delims, ':', '[', ']', '%'), the rule an
 * HTTP/1.1 Host is checked by; other protocols' authorities use it too. */
bool http_host_chars_ok(const char *s, size_t len);

/* The first of names[0..n) that occurs more than once in h, or NULL. */
const char *http_head_find_duplicate(const struct http_head *h, const char *const *names,
                                     size_t n);

/*
 * For struct policy_request.header (ctx: the struct http_head): the value
 * of the field named exactly lname (case-insensitive; "x_a" is not "x-a")
 * when it occurs once, NULL when absent or repeated. Check
 * http_head_check_policy_fields() first: NULL is not a refusal by itself.
 */
const char *http_head_policy_header(const void *ctx, const char *lname);

/*
 * The policy must decide on the head as it is forwarded. For the header
 * names a policy evaluates (names[0..n), lower-case), returns why h must be
 * refused with 400, or NULL:
 * - a field spelt with '_' that reads as one of names with '-' ("x_tenant"
 *   for "x-tenant"): frameworks disagree on whether that is X-Tenant;
 * - one of names occurring more than once (counting '_' spellings);
 * - a Connection option naming one of names: the field would be removed
 *   before forwarding, so the app would not see what the policy saw.
 */
const char *http_head_check_policy_fields(const struct http_head *h, const char *const *names,
                                          size_t n);

/*
 * Method-override fields (X-HTTP-Method-Override, X-HTTP-Method,
 * X-Method-Override): many frameworks let them replace the request line's
 * method, so a policy that allows GET would let a DELETE through. The
 * proxy decides on both methods (both must be allowed). Writes the
 * overriding method, upper-cased as those frameworks read it, to out
 * (cap bytes), or "" when h has none; returns why h must be refused with
 * 400, or NULL: a field repeated, spelt with '_', named by a Connection
 * option, or two of them that disagree, or a value that is not a method
 * token shorter than cap.
 */
const char *http_head_method_override(const struct http_head *h, char *out, size_t cap);

/* A field's value by lower-case name, or NULL when absent. */
typedef const char *(*http_field_lookup)(const void *ctx, const char *lname);

/*
 * As http_head_method_override(), over fields that get() looks up (the
 * dry run's JSON headers): the overriding method in out or "", or why the
 * fields must be refused. The repetition and spelling checks are the
 * head's alone.
 */
const char *http_method_override(http_field_lookup get, const void *ctx, char *out, size_t cap);

/*
 * Normalises the path of a request target (in, len bytes; the part before
 * '?', which must not be in it) as docs/design.md says, writing a NUL-terminated
 * result to out (cap >= len + 2) and its length to *out_len:
 * - "" becomes "/"; anything else must start with '/';
 * - %XX of unreserved characters (ALPHA DIGIT - . _ ~) is decoded, other
 *   escapes are kept with upper-case hex;
 * - dot segments are removed (RFC 3986 5.2.4), empty segments merged; a
 *   trailing '/' (or trailing "." / ".." segment) leaves a trailing '/';
 * - refused (-EINVAL, *why static text): %2F, %5C, '\', NUL raw or %00,
 *   other control characters raw or encoded (%01-%1F, %7F), SP, DEL, raw
 *   bytes >= 0x80, encoded bytes >= 0x80 that are not valid UTF-8 (overlong
 *   forms, surrogates), invalid escapes ("%", "%4", "%zz"), double
 *   encoding (any "%25": whatever follows it, an app that decodes
 *   twice or reads IIS-style "%uXXXX" would differ), raw ';' (path parameters:
 *   Tomcat/Jetty read "/admin;x/" as "/admin/" and "/..;/" as "/../"), raw
 *   characters outside RFC 3986 pchar ("|^`{}[]<>\"#?"), and ".." above
 *   the root ("/../x").
 * Returns 0, -EINVAL, or -ENOSPC when cap is too small. The result is a
 * fixed point: normalising it again gives the same bytes.
 */
int http_path_normalize(const char *in, size_t len, char *out, size_t cap, size_t *out_len,
                        const char **why);

/* Standard reason phrase for status ("Bad Request"), "Unknown" otherwise. */
const char *http_status_reason(int status);

#endif
