/*
 * http: hardened HTTP/1.x framing for the proxy's data path.
 *
 * Two parsers look at every head. Our own strict scanner collects the head
 * byte by byte (CRLF only, no obs-fold, token names, no whitespace before
 * the colon, bounded line and block sizes) and extracts what the proxy
 * uses; http-parser 2.9 then parses the same bytes and must agree (method,
 * version, status, number of fields): a head the two read differently is
 * refused, as is anything either refuses. http-parser 2.9 is lenient in
 * places (it accepts bare LF, obs-fold, "Host : a", several spaces in the
 * request line, HTTP/1.2, raw non-ASCII and '|' in targets), which is why
 * it is the second opinion, not the first.
 *
 * Bodies are framed by our own state machine (Content-Length, chunked with
 * strict chunk lines and trailers, close-delimited, tunnel): it only counts
 * and validates, never copies, and hands the caller spans of its own input.
 *
 * Decisions not in the header: up to 8 empty lines before a request line are
 * skipped (RFC 9112 2.2) and not forwarded; CONNECT with a body is refused;
 * a 101 that answers a request without Upgrade is a 502.
 *
 * This file is the parser only (head collection, field semantics, framing,
 * body state machine), and at about 1,400 lines it is over the size we aim
 * for on purpose: it is one state machine whose invariants (what a state
 * may assume about the bytes before it) are easier to check in one place
 * than across files. Path normalisation is in http_path.c, lookups and
 * serialisation of a parsed head in http_head.c, the character classes
 * they share in http-int.h.
 */
#include "meshlet/http.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <http_parser.h>

#include "http-int.h"

#define HEAD_BUF_MIN 1024
#define MAX_EMPTY_LINES 8
#define CL_MAX_DIGITS 18               /* < 2^63: no overflow */
#define CHUNK_SIZE_MAX (UINT64_C(1) << 60)

enum pstate {
	ST_IDLE,        /* between messages */
	ST_HEAD,        /* collecting a head */
	ST_BODY,        /* framing the body */
	ST_DONE,        /* MESSAGE_COMPLETE still to report */
	ST_PAUSED,      /* request side: waiting for the upgrade's answer */
	ST_TUNNEL,      /* raw bytes */
	ST_ERROR,
};

enum chunk_state {
	CH_SIZE,          /* first hex digit */
	CH_SIZE_MORE,     /* more digits, ';', BWS or CR */
	CH_EXT_WS,        /* BWS before ';' */
	CH_EXT,           /* chunk-ext up to CR */
	CH_SIZE_LF,
	CH_DATA,
	CH_DATA_CR,
	CH_DATA_LF,
	CH_TR_START,      /* start of a trailer line or the final CRLF */
	CH_TR_NAME,
	CH_TR_VALUE,
	CH_TR_LF,
	CH_END_LF,
};

/* ---- setup ----------------------------------------------------------------- */

void http_limits_default(struct http_limits *lim)
{
	lim->max_line = HTTP_DEFAULT_MAX_LINE;
	lim->max_header_bytes = HTTP_DEFAULT_MAX_HEADER_BYTES;
	lim->max_headers = HTTP_DEFAULT_MAX_HEADERS;
	lim->max_body = 0;
}

static void parser_init(struct http_parser_state *p, enum http_kind kind,
                        const struct http_limits *lim)
{
	memset(p, 0, sizeof(*p));
	p->kind = kind;
	http_limits_default(&p->lim);
	if (lim) {
		if (lim->max_line)
			p->lim.max_line = lim->max_line;
		if (lim->max_header_bytes)
			p->lim.max_header_bytes = lim->max_header_bytes;
		if (lim->max_headers)
			p->lim.max_headers = lim->max_headers;
		p->lim.max_body = lim->max_body;
	}
	p->state = ST_IDLE;
}

void http_request_init(struct http_parser_state *p, const struct http_limits *lim)
{
	parser_init(p, HTTP_KIND_REQUEST, lim);
}

void http_response_init(struct http_parser_state *p, const struct http_limits *lim)
{
	parser_init(p, HTTP_KIND_RESPONSE, lim);
}

void http_split_chunks(struct http_parser_state *p, bool split)
{
	p->split_chunks = split;
}

void http_request_guard_trailers(struct http_parser_state *p, const char *const *names,
                                 size_t n)
{
	p->guarded = names;
	p->n_guarded = n;
}

void http_response_expect(struct http_parser_state *p, unsigned req_flags)
{
	p->expect_flags = req_flags;
	p->expecting = true;
}

void http_resume(struct http_parser_state *p, bool tunnel)
{
	if (p->state == ST_PAUSED)
		p->state = tunnel ? ST_TUNNEL : ST_IDLE;
}

void http_shrink(struct http_parser_state *p)
{
	if (p->state == ST_HEAD || p->state == ST_BODY || p->state == ST_DONE)
		return;
	free(p->buf);
	free(p->fields);
	p->buf = NULL;
	p->fields = NULL;
	p->buf_len = p->buf_cap = p->fields_cap = 0;
	memset(&p->head, 0, sizeof(p->head));
}

void http_cleanup(struct http_parser_state *p)
{
	free(p->buf);
	free(p->fields);
	memset(p, 0, sizeof(*p));
	p->state = ST_ERROR;
	p->err_status = 500;
	p->err_reason = "parser cleaned up";
}

/* ---- events ---------------------------------------------------------------- */

static struct http_event ev_make(enum http_event_type t)
{
	struct http_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.type = t;
	return ev;
}

/* Records a failure (sticky) and returns its event. */
static struct http_event fail(struct http_parser_state *p, int status, const char *reason)
{
	struct http_event ev = ev_make(HTTP_EV_ERROR);

	if (p->kind == HTTP_KIND_RESPONSE && status != 500)
		status = 502;
	p->state = ST_ERROR;
	p->err_status = status;
	p->err_reason = reason;
	ev.status = status;
	ev.reason = reason;
	return ev;
}

static struct http_event error_event(const struct http_parser_state *p)
{
	struct http_event ev = ev_make(HTTP_EV_ERROR);

	ev.status = p->err_status;
	ev.reason = p->err_reason;
	return ev;
}

/* ---- head collection ------------------------------------------------------- */

/* Outcome of one step of head parsing: 0 or an HTTP status with reason. */
struct verdict {
	int status;
	const char *reason;
};

static const struct verdict ok_verdict = { 0, NULL };

static struct verdict refuse(int status, const char *reason)
{
	struct verdict v = { status, reason };

	return v;
}

static size_t head_cap_max(const struct http_parser_state *p)
{
	return p->lim.max_line + 2 + p->lim.max_header_bytes + 2;
}

static int buf_reserve(struct http_parser_state *p, size_t need)
{
	size_t cap = p->buf_cap ? p->buf_cap : HEAD_BUF_MIN;
	char *nb;

	if (need <= p->buf_cap)
		return 0;
	while (cap < need)
		cap *= 2;
	nb = realloc(p->buf, cap);
	if (!nb)
		return -ENOMEM;
	p->buf = nb;
	p->buf_cap = cap;
	return 0;
}

/* Validates a field line (without CRLF): name ":" OWS value OWS. */
static struct verdict check_field_line(const char *l, size_t len)
{
	size_t i = 0;

	if (len > 0 && is_ows((unsigned char)l[0]))
		return refuse(400, "obs-fold (line folding)");
	while (i < len && is_tchar((unsigned char)l[i]))
		i++;
	if (i < len && is_ows((unsigned char)l[i]) && i > 0)
		return refuse(400, "whitespace before colon");
	if (i == 0 || i >= len || l[i] != ':')
		return refuse(400, "invalid header name");
	for (i++; i < len; i++)
		if (!is_value_char((unsigned char)l[i]))
			return refuse(400, "invalid character in header value");
	return ok_verdict;
}

/* "HTTP/1.0" or "HTTP/1.1" at s (8 bytes): minor version, or a refusal. */
static struct verdict check_version(const char *s, size_t len, int *minor)
{
	if (len != 8 || memcmp(s, "HTTP/", 5) != 0 || !is_digit((unsigned char)s[5]) ||
	    s[6] != '.' || !is_digit((unsigned char)s[7]))
		return refuse(400, "malformed HTTP version");
	if (s[5] != '1' || (s[7] != '0' && s[7] != '1'))
		return refuse(505, "HTTP version not supported");
	*minor = s[7] - '0';
	return ok_verdict;
}

/* Offsets of the parts of a request line, filled by check_request_line. */
struct req_line {
	size_t method_len;
	size_t target_off, target_len;
};

/* method SP request-target SP HTTP-version, each exactly once. */
static struct verdict check_request_line(const char *l, size_t len, struct req_line *rl,
                                         int *minor)
{
	size_t i = 0, t;

	while (i < len && is_tchar((unsigned char)l[i]))
		i++;
	if (i == 0 || i >= len || l[i] != ' ')
		return refuse(400, "malformed request line");
	rl->method_len = i;
	t = ++i;
	while (i < len && l[i] != ' ') {
		unsigned char c = (unsigned char)l[i];

		if (c < 0x21 || c == 0x7f)
			return refuse(400, "control character in request target");
		i++;
	}
	if (i == t || i >= len)
		return refuse(400, "malformed request line");
	rl->target_off = t;
	rl->target_len = i - t;
	return check_version(l + i + 1, len - i - 1, minor);
}

/* HTTP-version SP 3DIGIT [SP reason-phrase]. */
static struct verdict check_status_line(const char *l, size_t len, int *minor, int *status)
{
	struct verdict v;
	size_t i;

	if (len < 12 || l[8] != ' ')
		return refuse(502, "malformed status line");
	v = check_version(l, 8, minor);
	if (v.status)
		return v;
	if (!is_digit((unsigned char)l[9]) || !is_digit((unsigned char)l[10]) ||
	    !is_digit((unsigned char)l[11]) || (len > 12 && l[12] != ' '))
		return refuse(502, "malformed status code");
	*status = (l[9] - '0') * 100 + (l[10] - '0') * 10 + (l[11] - '0');
	if (*status < 100 || *status > 599)
		return refuse(502, "status code out of range");
	for (i = 13; i < len; i++)
		if (!is_value_char((unsigned char)l[i]))
			return refuse(502, "invalid character in reason phrase");
	return ok_verdict;
}

/* A complete line [line_start, buf_len - 2) ended; checks it. *done at the
 * empty line that ends the head. */
static struct verdict end_line(struct http_parser_state *p, bool *done)
{
	const char *l = p->buf + p->line_start;
	size_t len = p->buf_len - 2 - p->line_start;
	struct verdict v = ok_verdict;

	if (p->n_lines == 0) {
		if (len == 0) {
			if (p->kind == HTTP_KIND_RESPONSE || ++p->skipped_empty > MAX_EMPTY_LINES)
				return refuse(400, "empty line before start line");
			p->buf_len = 0;
			return ok_verdict;
		}
		if (p->kind == HTTP_KIND_REQUEST) {
			struct req_line rl;

			v = check_request_line(l, len, &rl, &p->head.version_minor);
		} else
			v = check_status_line(l, len, &p->head.version_minor, &p->head.status);
		p->hdr_start = p->buf_len;
	} else if (len == 0) {
		*done = true;
	} else {
		if (p->n_lines > p->lim.max_headers)
			return refuse(431, "too many header fields");
		v = check_field_line(l, len);
	}
	p->n_lines++;
	p->line_start = p->buf_len;
	return v;
}

/* Limits checked as each byte c arrives, so that the buffer stays bounded. */
static struct verdict check_sizes(const struct http_parser_state *p, unsigned char c)
{
	size_t eol = c == '\n' ? 2 : c == '\r' ? 1 : 0;

	if (p->n_lines == 0) {
		if (p->buf_len - p->line_start - eol > p->lim.max_line)
			return p->kind == HTTP_KIND_REQUEST ? refuse(414, "request line too long")
			                                    : refuse(502, "status line too long");
	} else if (p->buf_len - p->hdr_start > p->lim.max_header_bytes) {
		return refuse(431, "header block too large");
	}
	return ok_verdict;
}

/* Bytes that may still be added to the current line or block, plus one so
 * that check_sizes() sees an overflow. */
static size_t room(const struct http_parser_state *p)
{
	size_t used = p->n_lines == 0 ? p->buf_len - p->line_start : p->buf_len - p->hdr_start;
	size_t max = p->n_lines == 0 ? p->lim.max_line : p->lim.max_header_bytes;

	return used > max ? 1 : max - used + 1;
}

/* Appends n bytes to the head buffer. */
static struct verdict append(struct http_parser_state *p, const char *s, size_t n)
{
	if (p->buf_len + n > head_cap_max(p))
		return refuse(431, "head too large");
	if (buf_reserve(p, p->buf_len + n) < 0)
		return refuse(500, "out of memory");
	memcpy(p->buf + p->buf_len, s, n);
	p->buf_len += n;
	return ok_verdict;
}

/* One CR or LF at data[0] (saw_cr tells whether a CR came before). */
static struct verdict line_end_byte(struct http_parser_state *p, char c, bool *done)
{
	struct verdict v;

	if (p->saw_cr != (c == '\n'))
		return refuse(400, p->saw_cr ? "bare CR" : "bare LF");
	if ((v = append(p, &c, 1)).status || (v = check_sizes(p, (unsigned char)c)).status)
		return v;
	p->saw_cr = c == '\r';
	return c == '\n' ? end_line(p, done) : ok_verdict;
}

/*
 * Collects head bytes from data. Returns the bytes used; *done when the
 * head's final CRLF was among them; v set on a refusal. Runs of line
 * content are copied at once; line content is validated at each line end.
 */
static size_t collect_head(struct http_parser_state *p, const char *data, size_t len,
                           bool *done, struct verdict *v)
{
	size_t i = 0;

	*v = ok_verdict;
	while (i < len && !*done) {
		size_t j = i, max;

		if (p->saw_cr || data[i] == '\r' || data[i] == '\n') {
			*v = line_end_byte(p, data[i], done);
			if (v->status)
				return i;
			i++;
			continue;
		}
		max = room(p);
		while (j < len && j - i < max && data[j] != '\r' && data[j] != '\n')
			j++;
		if ((*v = append(p, data + i, j - i)).status || (*v = check_sizes(p, 0)).status)
			return i;
		i = j;
	}
	return i;
}

/* ---- http-parser cross-check ------------------------------------------------ */

struct xcheck {
	size_t n_fields;
	bool headers_done;
	bool skip_body;
};

static int xc_field(http_parser *hp, const char *at, size_t len)
{
	struct xcheck *x = hp->data;

	(void)at;
	(void)len;
	x->n_fields++;
	return 0;
}

static int xc_headers_complete(http_parser *hp)
{
	struct xcheck *x = hp->data;

	x->headers_done = true;
	return x->skip_body ? 1 : 0;
}

/* Runs http-parser over the collected head; it must accept it and agree. */
static struct verdict cross_check(const struct http_parser_state *p, const char *method,
                                  size_t method_len)
{
	http_parser hp;
	http_parser_settings s;
	struct xcheck x = { 0, false, false };
	size_t n;
	enum http_errno e;

	http_parser_settings_init(&s);
	s.on_header_field = xc_field;
	s.on_headers_complete = xc_headers_complete;
	http_parser_init(&hp, p->kind == HTTP_KIND_REQUEST ? HTTP_REQUEST : HTTP_RESPONSE);
	hp.data = &x;
	x.skip_body = p->kind == HTTP_KIND_RESPONSE && (p->expect_flags & HTTP_REQ_HEAD);
	n = http_parser_execute(&hp, &s, p->buf, p->buf_len);
	e = HTTP_PARSER_ERRNO(&hp);
	if (e == HPE_INVALID_METHOD)
		return refuse(501, "unknown method");
	if (e == HPE_HEADER_OVERFLOW)
		return refuse(431, "head too large");
	if (e != HPE_OK || n != p->buf_len || !x.headers_done)
		return refuse(400, e != HPE_OK ? http_errno_description(e) : "http-parser disagrees");
	if (x.n_fields != p->head.n_fields || hp.http_major != 1 ||
	    hp.http_minor != p->head.version_minor)
		return refuse(400, "http-parser disagrees");
	if (p->kind == HTTP_KIND_REQUEST) {
		const char *m = http_method_str((enum http_method)hp.method);

		if (strlen(m) != method_len || memcmp(m, method, method_len) != 0)
			return refuse(501, "unknown method");
	} else if (hp.status_code != p->head.status) {
		return refuse(502, "http-parser disagrees");
	}
	return ok_verdict;
}

/* ---- field extraction and semantics ---------------------------------------- */

static int fields_reserve(struct http_parser_state *p, size_t n)
{
	struct http_field *nf;
	size_t cap = p->fields_cap ? p->fields_cap : 16;

	if (n <= p->fields_cap)
		return 0;
	while (cap < n)
		cap *= 2;
	nf = realloc(p->fields, cap * sizeof(*nf));
	if (!nf)
		return -ENOMEM;
	p->fields = nf;
	p->fields_cap = cap;
	return 0;
}

/* Fills p->fields from the (validated) field lines; not yet NUL-terminated. */
static int extract_fields(struct http_parser_state *p)
{
	size_t off = p->hdr_start, n = 0;

	if (fields_reserve(p, p->n_lines) < 0)
		return -ENOMEM;
	while (off + 2 < p->buf_len) {
		const char *l = p->buf + off;
		const char *eol = memchr(l, '\r', p->buf_len - off);
		const char *colon = memchr(l, ':', (size_t)(eol - l));
		const char *v = colon + 1, *ve = eol;
		struct http_field *f = &p->fields[n++];

		while (v < ve && is_ows((unsigned char)*v))
			v++;
		while (ve > v && is_ows((unsigned char)ve[-1]))
			ve--;
		f->name = l;
		f->name_len = (uint32_t)(colon - l);
		f->value = v;
		f->value_len = (uint32_t)(ve - v);
		off = (size_t)(eol - p->buf) + 2;
	}
	p->head.fields = p->fields;
	p->head.n_fields = n;
	return 0;
}

/* What the fields say about framing and connection handling. */
struct field_info {
	const struct http_field *cl, *te, *host, *upgrade;
	bool conn_close, conn_keep_alive;
};

/* Fields the parser interprets; a '_' spelling of them is refused. */
enum field_id {
	FID_OTHER,
	FID_CONTENT_LENGTH,
	FID_TRANSFER_ENCODING,
	FID_HOST,
	FID_CONNECTION,
	FID_UPGRADE,
	FID_HTTP2_SETTINGS,
	FID_COUNT
};

static const struct {
	const char *name;
	size_t len;
} known_fields[FID_COUNT] = {
	[FID_OTHER] = { "", 0 },
	[FID_CONTENT_LENGTH] = { "content-length", 14 },
	[FID_TRANSFER_ENCODING] = { "transfer-encoding", 17 },
	[FID_HOST] = { "host", 4 },
	[FID_CONNECTION] = { "connection", 10 },
	[FID_UPGRADE] = { "upgrade", 7 },
	[FID_HTTP2_SETTINGS] = { "http2-settings", 14 },
};

/* Which known field f names ('_' == '-'); *exact when spelt with '-'. */
static enum field_id classify(const struct http_field *f, bool *exact)
{
	int i;

	*exact = true;
	for (i = FID_OTHER + 1; i < FID_COUNT; i++) {
		if (f->name_len != known_fields[i].len ||
		    !name_eq_loose(f->name, f->name_len, known_fields[i].name))
			continue;
		*exact = !memchr(f->name, '_', f->name_len);
		return (enum field_id)i;
	}
	return FID_OTHER;
}

/* Connection options: close, keep-alive, and names of hop-by-hop fields. */
static struct verdict scan_connection(const struct http_field *f, struct field_info *fi)
{
	const char *s = f->value, *end = f->value + f->value_len, *t;
	size_t tl;

	while (list_next(&s, end, &t, &tl)) {
		if (tl == 0)
			continue;
		if (!is_token(t, tl))
			return refuse(400, "invalid Connection option");
		if (mem_ieq(t, tl, "close", 5))
			fi->conn_close = true;
		else if (mem_ieq(t, tl, "keep-alive", 10))
			fi->conn_keep_alive = true;
		else if (name_eq_loose(t, tl, "content-length") ||
		         name_eq_loose(t, tl, "transfer-encoding") || name_eq_loose(t, tl, "host"))
			return refuse(400, "Connection names a framing field");
	}
	return ok_verdict;
}

/* Refuses h2c among the Upgrade protocols. */
static struct verdict scan_upgrade(const struct http_field *f)
{
	const char *s = f->value, *end = f->value + f->value_len, *t;
	size_t tl;

	while (list_next(&s, end, &t, &tl)) {
		const char *slash = memchr(t, '/', tl);
		size_t nl = slash ? (size_t)(slash - t) : tl;

		if (mem_ieq(t, nl, "h2c", 3))
			return refuse(400, "h2c upgrade not supported");
	}
	return ok_verdict;
}

/* Walks the fields once: single-instance checks and framing fields. */
static struct verdict scan_fields(const struct http_head *h, struct field_info *fi)
{
	size_t i;

	memset(fi, 0, sizeof(*fi));
	for (i = 0; i < h->n_fields; i++) {
		const struct http_field *f = &h->fields[i];
		const struct http_field **slot = NULL;
		struct verdict v = ok_verdict;
		bool exact;
		enum field_id id = classify(f, &exact);

		if (!exact)
			return refuse(400, "'_' in a framing field name");
		if (id == FID_CONTENT_LENGTH)
			slot = &fi->cl;
		else if (id == FID_TRANSFER_ENCODING)
			slot = &fi->te;
		else if (id == FID_HOST)
			slot = &fi->host;
		else if (id == FID_UPGRADE)
			slot = &fi->upgrade;
		else if (id == FID_CONNECTION)
			v = scan_connection(f, fi);
		else if (id == FID_HTTP2_SETTINGS && h->is_request)
			v = refuse(400, "HTTP2-Settings not supported");
		if (v.status)
			return v;
		if (slot && *slot)
			return refuse(400, slot == &fi->cl   ? "repeated Content-Length"
			                   : slot == &fi->te ? "repeated Transfer-Encoding"
			                   : slot == &fi->host ? "repeated Host"
			                                       : "repeated Upgrade");
		if (slot)
			*slot = f;
	}
	return ok_verdict;
}

static struct verdict parse_content_length(const struct http_field *f, uint64_t *out)
{
	uint64_t n = 0;
	size_t i;

	if (f->value_len == 0 || f->value_len > CL_MAX_DIGITS)
		return refuse(400, f->value_len ? "Content-Length too large" : "invalid Content-Length");
	for (i = 0; i < f->value_len; i++) {
		if (!is_digit((unsigned char)f->value[i]))
			return refuse(400, "invalid Content-Length");
		n = n * 10 + (uint64_t)(f->value[i] - '0');
	}
	*out = n;
	return ok_verdict;
}

/*
 * Transfer-Encoding list: *chunked true when "chunked" is the final coding.
 * *only_chunked when it is the only one. Refuses malformed lists and
 * chunked applied more than once.
 */
static struct verdict parse_te(const struct http_field *f, bool *chunked, bool *only_chunked)
{
	const char *s = f->value, *end = f->value + f->value_len, *t;
	size_t tl, n = 0, n_chunked = 0;

	*chunked = false;
	while (list_next(&s, end, &t, &tl)) {
		if (!is_token(t, tl))
			return refuse(400, "invalid Transfer-Encoding");
		*chunked = mem_ieq(t, tl, "chunked", 7);
		n_chunked += *chunked;
		n++;
	}
	if (n_chunked > 1 || (n_chunked == 1 && !*chunked))
		return refuse(400, "chunked is not the final coding");
	*only_chunked = n == 1 && *chunked;
	return ok_verdict;
}

/* Content-Length / Transfer-Encoding of a request into h->framing. */
static struct verdict request_framing(struct http_parser_state *p, const struct field_info *fi)
{
	struct http_head *h = &p->head;
	bool chunked, only;
	struct verdict v;

	if (fi->te) {
		if (fi->cl)
			return refuse(400, "both Content-Length and Transfer-Encoding");
		if (h->version_minor == 0)
			return refuse(400, "Transfer-Encoding in HTTP/1.0");
		v = parse_te(fi->te, &chunked, &only);
		if (v.status)
			return v;
		if (!only)
			return refuse(501, "unsupported transfer coding");
		h->framing = HTTP_BODY_CHUNKED;
	} else if (fi->cl) {
		v = parse_content_length(fi->cl, &h->content_length);
		if (v.status)
			return v;
		h->framing = HTTP_BODY_LENGTH;
		if (p->lim.max_body && h->content_length > p->lim.max_body)
			return refuse(413, "body too large");
	} else
		h->framing = HTTP_BODY_NONE;
	if ((h->req_flags & HTTP_REQ_CONNECT) &&
	    (h->framing == HTTP_BODY_CHUNKED || h->content_length > 0))
		return refuse(400, "CONNECT with a body");
	return ok_verdict;
}

/* RFC 9112 6.3 for responses. */
static struct verdict response_framing(struct http_parser_state *p, const struct field_info *fi)
{
	struct http_head *h = &p->head;
	bool chunked, only;
	struct verdict v;

	if (h->status == 101 && !(p->expect_flags & HTTP_REQ_UPGRADE))
		return refuse(502, "101 without an Upgrade request");
	if (fi->te && fi->cl)
		return refuse(502, "both Content-Length and Transfer-Encoding");
	if (fi->te && h->version_minor == 0)
		return refuse(502, "Transfer-Encoding in HTTP/1.0");
	if (fi->te && (v = parse_te(fi->te, &chunked, &only)).status)
		return v;
	h->te_coded = fi->te && !only;
	if (fi->cl && (v = parse_content_length(fi->cl, &h->content_length)).status)
		return v;
	if ((p->expect_flags & HTTP_REQ_CONNECT) && h->status >= 200 && h->status < 300)
		h->tunnel = true;
	if (h->status == 101)
		h->tunnel = true;
	if (h->tunnel)
		h->framing = HTTP_BODY_TUNNEL;
	else if ((p->expect_flags & HTTP_REQ_HEAD) || h->status < 200 || h->status == 204 ||
	         h->status == 304)
		h->framing = HTTP_BODY_NONE;
	else if (fi->te)
		h->framing = chunked ? HTTP_BODY_CHUNKED : HTTP_BODY_UNTIL_CLOSE;
	else if (fi->cl)
		h->framing = HTTP_BODY_LENGTH;
	else
		h->framing = HTTP_BODY_UNTIL_CLOSE;
	return ok_verdict;
}

/* ---- request target ---------------------------------------------------------- */

static bool all_host_chars(const char *s, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (!is_host_char((unsigned char)s[i]))
			return false;
	return true;
}

bool http_host_chars_ok(const char *s, size_t len)
{
	return all_host_chars(s, len);
}

/* host ":" port for CONNECT. */
static bool valid_authority_form(const char *t, size_t len)
{
	const char *colon = NULL;
	size_t i;

	if (!all_host_chars(t, len))
		return false;
	for (i = 0; i < len; i++)
		if (t[i] == ':')
			colon = t + i;
	if (!colon || colon == t || colon == t + len - 1)
		return false;
	for (i = (size_t)(colon - t) + 1; i < len; i++)
		if (!is_digit((unsigned char)t[i]))
			return false;
	return true;
}

/* Where the parts of the request target are (offsets into the buffer). */
struct target {
	size_t off, len;                /* the whole target */
	size_t path_off, path_len;
	size_t query_off;               /* after '?'; query ends at off + len */
	bool has_query;
	size_t auth_off, auth_len;
	bool options;                   /* the method is OPTIONS */
};

/* http[s]://authority[path-abempty][?query]: locates authority and path. */
static struct verdict split_absolute(const char *b, struct target *t)
{
	const char *s = b + t->off, *end = s + t->len, *a, *ae;

	if (t->len > 7 && mem_ieq(s, 7, "http://", 7))
		a = s + 7;
	else if (t->len > 8 && mem_ieq(s, 8, "https://", 8))
		a = s + 8;
	else
		return refuse(400, "invalid request target");
	ae = a;
	while (ae < end && *ae != '/' && *ae != '?')
		ae++;
	if (memchr(a, '@', (size_t)(ae - a)))
		return refuse(400, "userinfo in target");
	if (ae == a || !all_host_chars(a, (size_t)(ae - a)))
		return refuse(400, "invalid authority in target");
	t->auth_off = (size_t)(a - b);
	t->auth_len = (size_t)(ae - a);
	t->path_off = (size_t)(ae - b);
	return ok_verdict;
}

/* Classifies the target by form and method; locates path and query. */
static struct verdict split_target(struct http_parser_state *p, struct target *t)
{
	const char *b = p->buf, *s = b + t->off, *q;
	bool connect = (p->head.req_flags & HTTP_REQ_CONNECT) != 0;
	struct verdict v;

	if (memchr(s, '#', t->len))
		return refuse(400, "fragment in request target");
	if (connect) {
		if (!valid_authority_form(s, t->len))
			return refuse(400, "CONNECT needs host:port");
		p->head.form = HTTP_TARGET_AUTHORITY;
		return ok_verdict;
	}
	if (t->len == 1 && s[0] == '*') {
		if (!t->options)
			return refuse(400, "asterisk-form only with OPTIONS");
		p->head.form = HTTP_TARGET_ASTERISK;
		return ok_verdict;
	}
	t->path_off = t->off;
	if (s[0] != '/') {
		v = split_absolute(b, t);
		if (v.status)
			return v;
		p->head.form = HTTP_TARGET_ABSOLUTE;
	} else
		p->head.form = HTTP_TARGET_ORIGIN;
	q = memchr(b + t->path_off, '?', t->off + t->len - t->path_off);
	t->has_query = q != NULL;
	t->path_len = (q ? (size_t)(q - b) : t->off + t->len) - t->path_off;
	t->query_off = q ? (size_t)(q - b) + 1 : 0;
	return ok_verdict;
}

/*
 * The string area after the head holds the normalised path and the
 * authority (absolute form); everything else is NUL-terminated in place.
 */
static struct verdict place_target(struct http_parser_state *p, const struct target *t)
{
	struct http_head *h = &p->head;
	size_t at = p->buf_len, out_len;
	const char *why = "invalid path";
	char *b = p->buf;

	if (h->form == HTTP_TARGET_AUTHORITY) {
		h->authority = b + t->off;
		h->path = "";
		return ok_verdict;
	}
	if (h->form == HTTP_TARGET_ASTERISK) {
		h->path = "*";
		return ok_verdict;
	}
	if (http_path_normalize(b + t->path_off, t->path_len, b + at, t->path_len + 2, &out_len,
	                        &why) < 0)
		return refuse(400, why);
	h->path = b + at;
	at += out_len + 1;
	if (h->form == HTTP_TARGET_ABSOLUTE) {
		memcpy(b + at, b + t->auth_off, t->auth_len);
		b[at + t->auth_len] = '\0';
		h->authority = b + at;
	}
	if (t->has_query)
		h->query = b + t->query_off;
	return ok_verdict;
}

/* ---- head completion -------------------------------------------------------- */

static void terminate_fields(struct http_parser_state *p)
{
	size_t i;

	for (i = 0; i < p->head.n_fields; i++) {
		struct http_field *f = &p->fields[i];

		((char *)f->name)[f->name_len] = '\0';
		((char *)f->value)[f->value_len] = '\0';
	}
}

/*
 * Host rules: one in 1.1 (at most one in 1.0), matching an absolute target.
 * An absolute target needs Host in 1.0 too: the app only sees origin-form.
 */
static struct verdict check_host(const struct http_head *h, const struct field_info *fi,
                                 const struct target *t, const char *b)
{
	if (!fi->host)
		return h->version_minor == 1 || h->form == HTTP_TARGET_ABSOLUTE
		               ? refuse(400, "missing Host")
		               : ok_verdict;
	if (!all_host_chars(fi->host->value, fi->host->value_len))
		return refuse(400, "invalid Host");
	if (h->form == HTTP_TARGET_ABSOLUTE &&
	    !mem_ieq(b + t->auth_off, t->auth_len, fi->host->value, fi->host->value_len))
		return refuse(400, "Host does not match the request target");
	return ok_verdict;
}

static void set_keep_alive(struct http_head *h, const struct field_info *fi)
{
	if (h->version_minor == 1)
		h->keep_alive = !fi->conn_close;
	else
		h->keep_alive = fi->conn_keep_alive && !fi->conn_close;
	if (h->framing == HTTP_BODY_UNTIL_CLOSE || h->framing == HTTP_BODY_TUNNEL)
		h->keep_alive = false;
}

/* Request-specific part of finishing a head. */
static struct verdict finish_request(struct http_parser_state *p)
{
	struct http_head *h = &p->head;
	struct req_line rl;
	struct field_info fi;
	struct target t;
	struct verdict v;
	int minor;

	check_request_line(p->buf, p->hdr_start - 2, &rl, &minor);
	if (mem_eq(p->buf, rl.method_len, "HEAD"))
		h->req_flags |= HTTP_REQ_HEAD;
	if (mem_eq(p->buf, rl.method_len, "CONNECT"))
		h->req_flags |= HTTP_REQ_CONNECT;
	if ((v = scan_fields(h, &fi)).status)
		return v;
	if (fi.upgrade) {
		h->req_flags |= HTTP_REQ_UPGRADE;
		if ((v = scan_upgrade(fi.upgrade)).status)
			return v;
	}
	if ((v = request_framing(p, &fi)).status)
		return v;
	memset(&t, 0, sizeof(t));
	t.off = rl.target_off;
	t.len = rl.target_len;
	t.options = mem_eq(p->buf, rl.method_len, "OPTIONS");
	if ((v = split_target(p, &t)).status || (v = check_host(h, &fi, &t, p->buf)).status)
		return v;
	/* Our checks first (they give the precise status), then http-parser's. */
	if ((v = cross_check(p, p->buf, rl.method_len)).status || (v = place_target(p, &t)).status)
		return v;
	p->buf[rl.method_len] = '\0';
	h->method = p->buf;
	p->buf[t.off + t.len] = '\0';   /* ends the query or the authority form */
	terminate_fields(p);
	h->host = fi.host ? fi.host->value : NULL;
	h->upgrade = fi.upgrade ? fi.upgrade->value : NULL;
	set_keep_alive(h, &fi);
	return ok_verdict;
}

/* Response-specific part of finishing a head. */
static struct verdict finish_response(struct http_parser_state *p)
{
	struct http_head *h = &p->head;
	struct field_info fi;
	struct verdict v;

	if ((v = scan_fields(h, &fi)).status || (v = response_framing(p, &fi)).status ||
	    (v = cross_check(p, NULL, 0)).status)
		return v;
	if (h->framing == HTTP_BODY_LENGTH && p->lim.max_body &&
	    h->content_length > p->lim.max_body)
		return refuse(502, "body too large");
	h->reason = p->buf + (p->hdr_start - 2 > 12 ? 13 : 12);
	p->buf[p->hdr_start - 2] = '\0';
	terminate_fields(p);
	set_keep_alive(h, &fi);
	return ok_verdict;
}

/* The head is complete: extract, validate and prepare the body state. */
static struct verdict finish_head(struct http_parser_state *p)
{
	struct verdict v;

	p->head.is_request = p->kind == HTTP_KIND_REQUEST;
	/* Room for the string area (place_target) before any pointer is taken. */
	if (buf_reserve(p, p->buf_len + 2 * p->hdr_start + 8) < 0 || extract_fields(p) < 0)
		return refuse(500, "out of memory");
	v = p->kind == HTTP_KIND_REQUEST ? finish_request(p) : finish_response(p);
	if (v.status)
		return v;
	p->remaining = p->head.content_length;
	p->body_total = 0;
	p->chunk_state = CH_SIZE;
	p->chunk_line = 0;
	p->trailer_bytes = p->n_trailers = 0;
	return ok_verdict;
}

/* Starts collecting a new head. */
static void begin_message(struct http_parser_state *p)
{
	if (p->buf_cap > 4 * HEAD_BUF_MIN) {
		free(p->buf);
		p->buf = NULL;
		p->buf_cap = 0;
	}
	memset(&p->head, 0, sizeof(p->head));
	p->buf_len = p->line_start = p->hdr_start = 0;
	p->n_lines = p->skipped_empty = 0;
	p->saw_cr = false;
	p->state = ST_HEAD;
}

static bool body_follows(const struct http_head *h)
{
	return h->framing == HTTP_BODY_CHUNKED || h->framing == HTTP_BODY_UNTIL_CLOSE ||
	       h->framing == HTTP_BODY_TUNNEL ||
	       (h->framing == HTTP_BODY_LENGTH && h->content_length > 0);
}

static struct http_event feed_head(struct http_parser_state *p, const char *data, size_t len,
                                   size_t *consumed)
{
	struct http_event ev;
	struct verdict v;
	bool done = false;

	*consumed = collect_head(p, data, len, &done, &v);
	if (v.status)
		return fail(p, v.status, v.reason);
	if (!done)
		return ev_make(HTTP_EV_NEED_MORE);
	v = finish_head(p);
	if (v.status)
		return fail(p, v.status, v.reason);
	if (p->head.framing == HTTP_BODY_TUNNEL)
		p->state = ST_DONE;     /* the tunnel starts after MESSAGE_COMPLETE */
	else
		p->state = body_follows(&p->head) ? ST_BODY : ST_DONE;
	ev = ev_make(HTTP_EV_HEAD_COMPLETE);
	ev.head = &p->head;
	return ev;
}

/* ---- body framing ----------------------------------------------------------- */

/* Result of one body step: bytes used, message done, or a refusal. */
struct body_step {
	size_t used;
	bool done;
	bool framing;     /* split_chunks: the span is chunk framing or trailers */
	struct verdict v;
};

static struct verdict chunk_size_digit(struct http_parser_state *p, unsigned char c)
{
	int h = hexval(c);

	if (p->remaining >= (CHUNK_SIZE_MAX >> 4))
		return refuse(400, "chunk size too large");
	p->remaining = p->remaining * 16 + (uint64_t)h;
	return ok_verdict;
}

/* The CRLF after a chunk size line: data, or the trailer section. */
static struct verdict chunk_size_done(struct http_parser_state *p)
{
	if (p->remaining > CHUNK_SIZE_MAX)
		return refuse(400, "chunk size too large");
	p->body_total += p->remaining;
	if (p->lim.max_body && p->body_total > p->lim.max_body)
		return refuse(413, "body too large");
	p->chunk_state = p->remaining ? CH_DATA : CH_TR_START;
	p->chunk_line = 0;
	return ok_verdict;
}

/* Trailer names that must not reach an app that merges trailers into headers. */
static const char *const forbidden_trailers[] = {
	"content-length", "transfer-encoding", "host", "connection", "upgrade", "trailer",
	"x-forwarded-client-cert",
};

static struct verdict trailer_name_done(struct http_parser_state *p)
{
	size_t i;

	if (p->trailer_name_len == 0)
		return refuse(400, "invalid trailer name");
	if (p->trailer_name_len > sizeof(p->trailer_name)) {
		/* Longer than any forbidden name; a guarded name may be as long. */
		for (i = 0; i < p->n_guarded; i++)
			if (strlen(p->guarded[i]) > sizeof(p->trailer_name))
				return refuse(400, "trailer name too long to check");
		return ok_verdict;
	}
	for (i = 0; i < sizeof(forbidden_trailers) / sizeof(forbidden_trailers[0]); i++)
		if (name_eq_loose(p->trailer_name, p->trailer_name_len, forbidden_trailers[i]))
			return refuse(400, "forbidden trailer field");
	/* The decision was made on the head: a trailer must not add to it. */
	for (i = 0; i < p->n_guarded; i++)
		if (name_eq_loose(p->trailer_name, p->trailer_name_len, p->guarded[i]))
			return refuse(400, "trailer names a header that the policy evaluates");
	return ok_verdict;
}

/* Trailer section bytes (one at a time). */
static struct verdict chunk_trailer_byte(struct http_parser_state *p, unsigned char c)
{
	if (++p->trailer_bytes > p->lim.max_header_bytes)
		return refuse(400, "trailer section too large");
	switch (p->chunk_state) {
	case CH_TR_START:
		if (c == '\r') {
			p->chunk_state = CH_END_LF;
			return ok_verdict;
		}
		if (is_ows(c))
			return refuse(400, "obs-fold (line folding)");
		if (++p->n_trailers > p->lim.max_headers)
			return refuse(400, "too many trailer fields");
		p->trailer_name_len = 0;
		p->chunk_state = CH_TR_NAME;
		/* fall through */
	case CH_TR_NAME:
		if (c == ':') {
			p->chunk_state = CH_TR_VALUE;
			return trailer_name_done(p);
		}
		if (!is_tchar(c))
			return refuse(400, is_ows(c) ? "whitespace before colon" : "invalid trailer name");
		if (p->trailer_name_len < sizeof(p->trailer_name))
			p->trailer_name[p->trailer_name_len] = (char)c;
		p->trailer_name_len++;
		return ok_verdict;
	case CH_TR_VALUE:
		if (c == '\r')
			p->chunk_state = CH_TR_LF;
		else if (!is_value_char(c))
			return refuse(400, c == '\n' ? "bare LF" : "invalid character in trailer");
		return ok_verdict;
	case CH_TR_LF:
		if (c != '\n')
			return refuse(400, "bare CR");
		p->chunk_state = CH_TR_START;
		return ok_verdict;
	default:
		return refuse(400, "internal chunk state");
	}
}

/* Chunk size line bytes (one at a time). */
static struct verdict chunk_line_byte(struct http_parser_state *p, unsigned char c)
{
	if (++p->chunk_line > p->lim.max_line)
		return refuse(400, "chunk line too long");
	switch (p->chunk_state) {
	case CH_SIZE:
		if (hexval(c) < 0)
			return refuse(400, "invalid chunk size");
		p->remaining = 0;
		p->chunk_state = CH_SIZE_MORE;
		return chunk_size_digit(p, c);
	case CH_SIZE_MORE:
		if (hexval(c) >= 0)
			return chunk_size_digit(p, c);
		if (c == '\r')
			p->chunk_state = CH_SIZE_LF;
		else if (c == ';')
			p->chunk_state = CH_EXT;
		else if (is_ows(c))
			p->chunk_state = CH_EXT_WS;
		else
			return refuse(400, "invalid chunk size");
		return ok_verdict;
	case CH_EXT_WS:
		if (c == ';')
			p->chunk_state = CH_EXT;
		else if (!is_ows(c))
			return refuse(400, "invalid chunk extension");
		return ok_verdict;
	case CH_EXT:
		if (c == '\r')
			p->chunk_state = CH_SIZE_LF;
		else if (!is_value_char(c))
			return refuse(400, c == '\n' ? "bare LF" : "invalid chunk extension");
		return ok_verdict;
	case CH_SIZE_LF:
		if (c != '\n')
			return refuse(400, "bare CR");
		return chunk_size_done(p);
	default:
		return refuse(400, "internal chunk state");
	}
}

/* Frames chunked bytes; data runs are skipped without looking at them. */
static struct body_step chunked_step(struct http_parser_state *p, const char *data, size_t len)
{
	struct body_step r = { 0, false, p->split_chunks, { 0, NULL } };

	while (r.used < len && !r.done) {
		unsigned char c = (unsigned char)data[r.used];

		if (p->chunk_state == CH_DATA) {
			uint64_t n = len - r.used;

			/* Split: content and framing never share a span. */
			if (p->split_chunks && r.used)
				return r;
			r.framing = false;

			if (n > p->remaining)
				n = p->remaining;
			r.used += (size_t)n;
			p->remaining -= n;
			if (p->remaining == 0)
				p->chunk_state = CH_DATA_CR;
			if (p->split_chunks)
				return r;
			continue;
		}
		r.used++;
		if (p->chunk_state == CH_DATA_CR || p->chunk_state == CH_DATA_LF) {
			if (c != (p->chunk_state == CH_DATA_CR ? '\r' : '\n')) {
				r.v = refuse(400, "missing CRLF after chunk data");
				return r;
			}
			p->chunk_state = p->chunk_state == CH_DATA_CR ? CH_DATA_LF : CH_SIZE;
			continue;
		}
		if (p->chunk_state == CH_END_LF) {
			if (c != '\n')
				r.v = refuse(400, "bare CR");
			r.done = true;
			continue;
		}
		r.v = p->chunk_state >= CH_TR_START ? chunk_trailer_byte(p, c) : chunk_line_byte(p, c);
		if (r.v.status)
			return r;
	}
	return r;
}

static struct body_step body_step(struct http_parser_state *p, const char *data, size_t len)
{
	struct body_step r = { 0, false, false, { 0, NULL } };

	switch (p->head.framing) {
	case HTTP_BODY_LENGTH:
		r.used = len < p->remaining ? len : (size_t)p->remaining;
		p->remaining -= r.used;
		r.done = p->remaining == 0;
		return r;
	case HTTP_BODY_CHUNKED:
		return chunked_step(p, data, len);
	default:
		r.used = len;
		return r;
	}
}

static struct http_event feed_body(struct http_parser_state *p, const char *data, size_t len,
                                   size_t *consumed)
{
	struct body_step r;
	struct http_event ev;

	if (len == 0)
		return ev_make(HTTP_EV_NEED_MORE);
	r = body_step(p, data, len);
	if (r.v.status)
		return fail(p, r.v.status, r.v.reason);
	*consumed = r.used;
	if (r.done)
		p->state = ST_DONE;
	ev = ev_make(HTTP_EV_BODY);
	ev.data = data;
	ev.len = r.used;
	ev.framing = r.framing;
	return ev;
}

/* Reports MESSAGE_COMPLETE and moves to what follows the message. */
static struct http_event complete(struct http_parser_state *p)
{
	struct http_event ev = ev_make(HTTP_EV_MESSAGE_COMPLETE);

	ev.head = &p->head;
	if (p->kind == HTTP_KIND_REQUEST) {
		p->state = (p->head.req_flags & (HTTP_REQ_UPGRADE | HTTP_REQ_CONNECT)) ? ST_PAUSED
		                                                                    : ST_IDLE;
	} else {
		p->state = p->head.tunnel ? ST_TUNNEL : ST_IDLE;
		if (p->head.status >= 200 || p->head.tunnel)
			p->expecting = false;
	}
	return ev;
}

struct http_event http_feed(struct http_parser_state *p, const char *data, size_t len,
                            size_t *consumed)
{
	struct http_event ev;

	*consumed = 0;
	switch (p->state) {
	case ST_ERROR:
		return error_event(p);
	case ST_PAUSED:
		return ev_make(HTTP_EV_PAUSED);
	case ST_DONE:
		return complete(p);
	case ST_TUNNEL:
		if (len == 0)
			return ev_make(HTTP_EV_NEED_MORE);
		*consumed = len;
		ev = ev_make(HTTP_EV_BODY);
		ev.data = data;
		ev.len = len;
		return ev;
	case ST_BODY:
		return feed_body(p, data, len, consumed);
	case ST_IDLE:
		if (len == 0)
			return ev_make(HTTP_EV_NEED_MORE);
		if (p->kind == HTTP_KIND_RESPONSE && !p->expecting)
			return fail(p, 502, "unsolicited response");
		begin_message(p);
		/* fall through */
	default:
		return feed_head(p, data, len, consumed);
	}
}

struct http_event http_finish(struct http_parser_state *p)
{
	switch (p->state) {
	case ST_ERROR:
		return error_event(p);
	case ST_DONE:
		return complete(p);
	case ST_HEAD:
		if (p->buf_len == 0)
			return ev_make(HTTP_EV_NEED_MORE);
		return fail(p, 400, "truncated message");
	case ST_BODY:
		if (p->head.framing != HTTP_BODY_UNTIL_CLOSE)
			return fail(p, 400, "truncated message");
		p->state = ST_DONE;
		return complete(p);
	default:
		return ev_make(HTTP_EV_NEED_MORE);
	}
}
