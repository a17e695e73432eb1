/* etcd: a blocking client of etcd's v3 JSON gateway; see etcd.h. */
#include "meshlet/etcd.h"
#include "meshlet/tlsio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

struct endpoint {
	char url[256];        /* as given, for messages */
	char host[256];
	char port[8];
	bool tls;
};

struct etcd {
	struct endpoint ep[ETCD_ENDPOINTS_MAX];
	size_t n_ep, cur;     /* cur: the endpoint tried first */
	SSL_CTX *tls;         /* NULL when no endpoint is https */
	bool client_cert;     /* --etcd-cert given */
	int timeout_ms;
	char err[ETCD_ERR_MAX];
	struct tlsio keep;    /* the connection of the last call, kept alive (fd -1: none) */
	size_t keep_ep;       /* its endpoint */
	unsigned long connects;   /* connections opened, ever */
};

static void conn_close(struct tlsio *cn)
{
	tlsio_close(cn, false);
}

__attribute__((format(printf, 2, 3)))
static void set_err(struct etcd *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->err, sizeof(c->err), fmt, ap);
	va_end(ap);
}

const char *etcd_strerror(const struct etcd *c)
{
	return c->err;
}

unsigned long etcd_connects(const struct etcd *c)
{
	return c->connects;
}

const char *etcd_endpoint(const struct etcd *c)
{
	return c->ep[c->cur].url;
}

static int64_t now_ms(void)
{
	return tlsio_now_ms();
}

/* ---- base64 and JSON fields ---- */

static const char b64chars[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *etcd_b64(const void *p, size_t n)
{
	const unsigned char *in = p;
	char *out = malloc(4 * ((n + 2) / 3) + 1), *o = out;
	size_t i;

	if (!out)
		return NULL;
	for (i = 0; i + 2 < n; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
		*o++ = b64chars[v >> 18];
		*o++ = b64chars[(v >> 12) & 63];
		*o++ = b64chars[(v >> 6) & 63];
		*o++ = b64chars[v & 63];
	}
	if (i < n) {
		uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
		*o++ = b64chars[v >> 18];
		*o++ = b64chars[(v >> 12) & 63];
		*o++ = i + 1 < n ? b64chars[(v >> 6) & 63] : '=';
		*o++ = '=';
	}
	*o = '\0';
	return out;
}

static int b64val(char ch)
{
	const char *p = ch ? strchr(b64chars, ch) : NULL;

	return p ? (int)(p - b64chars) : -1;
}

int etcd_unb64(const char *text, char **out, size_t *n)
{
	size_t len = strlen(text), i, k = 0;
	unsigned char *buf;

	*out = NULL;
	*n = 0;
	if (len % 4)
		return -EINVAL;
	buf = malloc(len / 4 * 3 + 1);
	if (!buf)
		return -ENOMEM;
	for (i = 0; i < len; i += 4) {
		int a = b64val(text[i]), b = b64val(text[i + 1]);
		int pad = (text[i + 2] == '=') + (text[i + 3] == '=');
		int cc = pad >= 2 ? 0 : b64val(text[i + 2]), d = pad >= 1 ? 0 : b64val(text[i + 3]);

		if (a < 0 || b < 0 || cc < 0 || d < 0 || (pad && i + 4 != len) ||
		    (pad == 1 && text[i + 2] == '=')) {
			free(buf);
			return -EINVAL;
		}
		uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)cc << 6 | (uint32_t)d;
		buf[k++] = (unsigned char)(v >> 16);
		if (pad < 2)
			buf[k++] = (unsigned char)(v >> 8);
		if (pad < 1)
			buf[k++] = (unsigned char)v;
	}
	buf[k] = '\0';
	*out = (char *)buf;
	*n = k;
	return 0;
}

int64_t etcd_int(const json_t *obj, const char *field)
{
	const json_t *v = json_object_get(obj, field);
	const char *s;
	char *end;
	long long n;

	if (!v)
		return 0;
	if (json_is_integer(v))
		return (int64_t)json_integer_value(v);
	s = json_string_value(v);
	if (!s || !*s)
		return -1;
	errno = 0;
	n = strtoll(s, &end, 10);
	return *end || errno ? -1 : (int64_t)n;
}

char *etcd_prefix_end_b64(const char *prefix, size_t len)
{
	char *end, *out;

	while (len > 0 && (unsigned char)prefix[len - 1] == 0xff)
		len--;
	if (len == 0)
		return etcd_b64("", 1);
	end = malloc(len);
	if (!end)
		return NULL;
	memcpy(end, prefix, len);
	end[len - 1] = (char)((unsigned char)end[len - 1] + 1);
	out = etcd_b64(end, len);
	free(end);
	return out;
}

/* ---- endpoints ---- */

/* "http[s]://host[:port]" (a bracketed IPv6 host allowed; no path). */
static int parse_endpoint(struct endpoint *ep, const char *s, size_t len,
                          struct meshlet_err *err)
{
	const char *p, *end = s + len, *colon;
	size_t hl;

	if (len >= sizeof(ep->url))
		return err_set(err, "", "etcd endpoint too long");
	memcpy(ep->url, s, len);
	ep->url[len] = '\0';
	if (strncmp(ep->url, "http://", 7) == 0) {
		p = s + 7;
	} else if (strncmp(ep->url, "https://", 8) == 0) {
		p = s + 8;
		ep->tls = true;
	} else {
		return err_set(err, "", "etcd endpoint '%s': expected http://HOST:PORT or "
		               "https://HOST:PORT", ep->url);
	}
	if (end > p && end[-1] == '/')
		end--;
	if (*p == '[') {
		const char *rb = memchr(p, ']', (size_t)(end - p));

		if (!rb)
			return err_set(err, "", "etcd endpoint '%s': unclosed [", ep->url);
		hl = (size_t)(rb - p - 1);
		memcpy(ep->host, p + 1, hl);
		colon = rb + 1 < end && rb[1] == ':' ? rb + 1 : NULL;
		if (!colon && rb + 1 != end)
			return err_set(err, "", "etcd endpoint '%s': bad host", ep->url);
	} else {
		colon = memchr(p, ':', (size_t)(end - p));
		hl = (size_t)((colon ? colon : end) - p);
		if (hl >= sizeof(ep->host))
			return err_set(err, "", "etcd endpoint '%s': host too long", ep->url);
		memcpy(ep->host, p, hl);
	}
	ep->host[hl] = '\0';
	if (hl == 0 || strpbrk(ep->host, "/?#@ "))
		return err_set(err, "", "etcd endpoint '%s': bad host (no path, no user)", ep->url);
	if (colon) {
		size_t pl = (size_t)(end - colon - 1);
		char *e;
		long port;

		if (pl == 0 || pl >= sizeof(ep->port))
			return err_set(err, "", "etcd endpoint '%s': bad port", ep->url);
		memcpy(ep->port, colon + 1, pl);
		ep->port[pl] = '\0';
		port = strtol(ep->port, &e, 10);
		if (*e || port < 1 || port > 65535)
			return err_set(err, "", "etcd endpoint '%s': bad port", ep->url);
	} else {
		snprintf(ep->port, sizeof(ep->port), "2379");
	}
	return 0;
}

static int tls_setup(struct etcd *c, const struct etcd_opts *o, struct meshlet_err *err)
{
	c->tls = SSL_CTX_new(TLS_client_method());
	if (!c->tls)
		return err_set(err, "", "etcd: cannot create a TLS context");
	SSL_CTX_set_min_proto_version(c->tls, TLS1_2_VERSION);
	SSL_CTX_set_verify(c->tls, SSL_VERIFY_PEER, NULL);
	if (o->cacert ? SSL_CTX_load_verify_locations(c->tls, o->cacert, NULL) != 1
	              : SSL_CTX_set_default_verify_paths(c->tls) != 1)
		return err_set(err, "", "--etcd-cacert %s: cannot load CA certificates",
		               o->cacert ? o->cacert : "(system)");
	if (!o->cert != !o->key)
		return err_set(err, "", "--etcd-cert and --etcd-key go together");
	c->client_cert = o->cert != NULL;
	if (o->cert && (SSL_CTX_use_certificate_chain_file(c->tls, o->cert) != 1 ||
	                SSL_CTX_use_PrivateKey_file(c->tls, o->key, SSL_FILETYPE_PEM) != 1 ||
	                SSL_CTX_check_private_key(c->tls) != 1))
		return err_set(err, "", "--etcd-cert %s / --etcd-key %s: cannot load them, or they "
		               "do not match", o->cert, o->key);
	return 0;
}

int etcd_new(struct etcd **out, const struct etcd_opts *o, struct meshlet_err *err)
{
	struct etcd *c = calloc(1, sizeof(*c));
	const char *s = o->endpoints, *comma;
	bool any_tls = false;
	int r = 0;

	*out = NULL;
	if (!c)
		return err_set(err, "", "out of memory");
	tlsio_init(&c->keep);
	c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 5000;
	if (!s || !*s)
		r = err_set(err, "", "no etcd endpoint");
	for (; !r && s && *s; s = comma ? comma + 1 : s + strlen(s)) {
		comma = strchr(s, ',');
		if (c->n_ep == ETCD_ENDPOINTS_MAX)
			r = err_set(err, "", "at most %d etcd endpoints", ETCD_ENDPOINTS_MAX);
		else
			r = parse_endpoint(&c->ep[c->n_ep], s, comma ? (size_t)(comma - s) : strlen(s),
			                   err);
		if (!r)
			any_tls |= c->ep[c->n_ep++].tls;
	}
	if (!r && (any_tls || o->cacert || o->cert))
		r = tls_setup(c, o, err);
	if (r) {
		etcd_free(c);
		return r;
	}
	*out = c;
	return 0;
}

void etcd_free(struct etcd *c)
{
	if (!c)
		return;
	conn_close(&c->keep);
	SSL_CTX_free(c->tls);
	free(c);
}

/* ---- one connection ---- */

static int tls_start(struct etcd *c, struct tlsio *cn, const struct endpoint *ep)
{
	struct in6_addr a6;
	struct in_addr a4;
	bool ip = inet_pton(AF_INET, ep->host, &a4) == 1 || inet_pton(AF_INET6, ep->host, &a6) == 1;
	int r;

	cn->ssl = SSL_new(c->tls);
	if (!cn->ssl || SSL_set_fd(cn->ssl, cn->fd) != 1)
		return -ENOMEM;
	if (ip)
		X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(cn->ssl), ep->host);
	else if (SSL_set1_host(cn->ssl, ep->host) != 1 ||
	         SSL_set_tlsext_host_name(cn->ssl, ep->host) != 1)
		return -ENOMEM;
	r = tlsio_handshake(cn);
	ERR_clear_error();
	if (r <= 0) {
		long v = SSL_get_verify_result(cn->ssl);
		set_err(c, "%s: TLS handshake failed%s%s", ep->url, v != X509_V_OK ? ": " : "",
		        v != X509_V_OK ? X509_verify_cert_error_string(v) : "");
		return r < 0 ? r : -EPROTO;
	}
	return 0;
}

/* Connects to ep (any of its addresses), TLS included. */
static int conn_open(struct etcd *c, struct tlsio *cn, const struct endpoint *ep)
{
	char why[256] = "";
	int r;

	cn->fd = -1;
	cn->ssl = NULL;
	cn->cancel_fd = -1;
	cn->cancelled = NULL;
	c->connects++;
	r = tlsio_connect(cn, ep->host, ep->port, ETCD_CONNECT_TIMEOUT_MS, why, sizeof(why));
	if (r == -EHOSTUNREACH) {
		set_err(c, "%s: %s", ep->url, why);
		return -EAGAIN;
	}
	if (r) {
		set_err(c, "%s: cannot connect: %s", ep->url, why);
		return -EAGAIN;
	}
	if (ep->tls && c->tls && tls_start(c, cn, ep) < 0) {
		conn_close(cn);
		return -EAGAIN;
	}
	return 0;
}

/* Reads some bytes: > 0, 0 at the end, or -errno (-ECANCELED: stop_fd,
 * may be -1, became readable). */
static ssize_t conn_read(struct tlsio *cn, char *buf, size_t len, int stop_fd)
{
	ssize_t n;

	cn->cancel_fd = stop_fd;
	n = tlsio_read(cn, buf, len);
	cn->cancel_fd = -1;
	if (n == -EPROTO)
		ERR_clear_error();
	return n;
}

/* ---- HTTP ---- */

static int send_request(struct tlsio *cn, const struct endpoint *ep, const char *path,
                        const char *body, bool keep)
{
	size_t blen = strlen(body), cap = 768 + blen;
	char *msg = malloc(cap);
	int n, r;

	if (!msg)
		return -ENOMEM;
	/* Head and body in one write: two small segments would wait on the
	 * peer's delayed ACK. */
	n = snprintf(msg, cap,
	             "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
	             "Content-Length: %zu\r\nConnection: %s\r\nUser-Agent: meshlet-control\r\n\r\n",
	             path, ep->host, ep->port, blen, keep ? "keep-alive" : "close");
	if (n < 0 || (size_t)n + blen >= cap) {
		free(msg);
		return -EINVAL;
	}
	memcpy(msg + n, body, blen);
	r = tlsio_write_all(cn, msg, (size_t)n + blen, NULL);
	if (r == -EPROTO)
		ERR_clear_error();
	free(msg);
	return r;
}

/* A growing buffer. */
struct buf {
	char *p;
	size_t len, cap;
};

static int buf_add(struct buf *b, const char *p, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *q;

		while (cap < b->len + n + 1)
			cap *= 2;
		q = realloc(b->p, cap);
		if (!q)
			return -ENOMEM;
		b->p = q;
		b->cap = cap;
	}
	memcpy(b->p + b->len, p, n);
	b->len += n;
	b->p[b->len] = '\0';
	return 0;
}

static void buf_drop(struct buf *b, size_t n)
{
	memmove(b->p, b->p + n, b->len - n);
	b->len -= n;
	b->p[b->len] = '\0';
}

/* What an answer's head says about its body. */
struct head {
	int status;
	bool chunked;
	long long length;     /* Content-Length, -1: none */
	bool close;           /* Connection: close, or HTTP/1.0 */
};

/* The value of a header line that starts with name (lowercase, with the
 * colon), spaces skipped; NULL if the line is another header. */
static const char *header_value(const char *line, const char *name)
{
	size_t n = strlen(name);

	if (strncasecmp(line, name, n) != 0)
		return NULL;
	line += n;
	while (*line == ' ' || *line == '\t')
		line++;
	return line;
}

/* Parses the head that starts at p and ends at the first empty line. */
static int parse_head(const char *p, struct head *h)
{
	const char *line = strstr(p, "\r\n"), *v;

	if (strncmp(p, "HTTP/1.", 7) != 0 || sscanf(p + 8, " %3d", &h->status) != 1)
		return -EPROTO;
	h->chunked = false;
	h->length = -1;
	h->close = p[7] == '0';
	while (line && strncmp(line, "\r\n\r\n", 4) != 0) {
		line += 2;
		if ((v = header_value(line, "transfer-encoding:")))
			h->chunked = strncasecmp(v, "chunked", 7) == 0;
		else if ((v = header_value(line, "content-length:")))
			h->length = strtoll(v, NULL, 10);
		else if ((v = header_value(line, "connection:")))
			h->close = strncasecmp(v, "close", 5) == 0;
		line = strstr(line, "\r\n");
	}
	return h->length < -1 ? -EPROTO : 0;
}

/*
 * Incremental de-chunking: moves the data of complete chunks from raw (the
 * bytes after the head) into out. Returns 1 at the last chunk, 0 when more
 * bytes are needed, -EPROTO on a malformed chunk.
 */
static int dechunk(struct buf *raw, struct buf *out)
{
	for (;;) {
		char *crlf = raw->len ? strstr(raw->p, "\r\n") : NULL, *end;
		unsigned long size;

		if (!crlf)
			return raw->len > 64 ? -EPROTO : 0;
		size = strtoul(raw->p, &end, 16);
		if (end == raw->p || (*end != '\r' && *end != ';'))
			return -EPROTO;
		if (size == 0) {
			/* The last chunk and the empty line after it (no trailers:
			 * we do not ask for them): the connection is clean again. */
			if (raw->len < (size_t)(crlf + 4 - raw->p))
				return 0;
			if (strncmp(crlf + 2, "\r\n", 2) != 0)
				return -EPROTO;
			buf_drop(raw, (size_t)(crlf + 4 - raw->p));
			return 1;
		}
		if (raw->len < (size_t)(crlf + 2 - raw->p) + size + 2)
			return 0;
		if (buf_add(out, crlf + 2, size) < 0)
			return -ENOMEM;
		buf_drop(raw, (size_t)(crlf + 2 - raw->p) + size + 2);
	}
}

/* Reads until the head is complete; the rest stays in b after it. */
static int read_head(struct tlsio *cn, struct buf *b, int stop_fd, struct head *h)
{
	char tmp[16384];
	char *hend;

	while (!(hend = b->len ? strstr(b->p, "\r\n\r\n") : NULL)) {
		ssize_t n = conn_read(cn, tmp, sizeof(tmp), stop_fd);

		if (n <= 0)
			return n == 0 ? -EPIPE : (int)n;
		if (buf_add(b, tmp, (size_t)n) < 0)
			return -ENOMEM;
		if (b->len > 65536)
			return -EPROTO;
	}
	if (parse_head(b->p, h) < 0)
		return -EPROTO;
	buf_drop(b, (size_t)(hend + 4 - b->p));
	return 0;
}

/* The outcome of one exchange on a connection. */
struct exch {
	int status;
	bool sent;            /* the request went out */
	bool answered;        /* some byte of an answer came back */
	bool reusable;        /* the answer ended cleanly and the connection may stay */
};

/* Reads the body that h announces (after the head, raw holds its start). */
static int read_body(struct tlsio *cn, const struct head *h, struct buf *raw, struct buf *body)
{
	char tmp[65536];
	int r = 0, done = 0;

	for (;;) {
		ssize_t n;

		if (h->chunked && (done = dechunk(raw, body)) != 0)
			return done < 0 ? done : 0;
		if (!h->chunked && h->length >= 0 && raw->len >= (size_t)h->length)
			return buf_add(body, raw->p ? raw->p : "", (size_t)h->length);
		n = conn_read(cn, tmp, sizeof(tmp), -1);
		if (n < 0)
			return (int)n;
		if (n == 0) {
			/* The end: fine for a body framed by the close only. */
			if (h->chunked || h->length >= 0)
				return -EPIPE;
			return buf_add(body, raw->p ? raw->p : "", raw->len);
		}
		if (raw->len + (size_t)n > ETCD_RESPONSE_MAX)
			return -EFBIG;
		r = buf_add(raw, tmp, (size_t)n);
		if (r)
			return r;
	}
}

/* One request on one connection: the whole answer body into body. */
static int exchange(struct etcd *c, struct tlsio *cn, const struct endpoint *ep, const char *path,
                    const char *req, struct buf *body, struct exch *x)
{
	struct buf raw = {0};
	struct head h = {0};
	int r = send_request(cn, ep, path, req, true);

	memset(x, 0, sizeof(*x));
	x->sent = r == 0;
	if (!r) {
		r = read_head(cn, &raw, -1, &h);
		x->answered = r == 0 || raw.len > 0;
	}
	if (!r)
		r = read_body(cn, &h, &raw, body);
	x->status = h.status;
	x->reusable = !r && !h.close && (h.chunked || h.length >= 0) && raw.len ==
	              (h.chunked ? 0 : (size_t)h.length);
	free(raw.p);
	if (r)
		set_err(c, "%s%s: %s%s", ep->url, path, r == -ETIMEDOUT ? "timed out" : strerror(-r),
		        cn->ssl && !c->client_cert && (r == -EPIPE || r == -ECONNRESET || r == -EPROTO) ?
		        " (etcd closed the TLS connection: does it want a client certificate, "
		        "--etcd-cert and --etcd-key?)" : "");
	return r;
}

/* etcd's error body: {"error": "...", "code": N, "message": "..."}. */
static void answer_error(struct etcd *c, const struct endpoint *ep, int status, json_t *j,
                         const struct buf *body)
{
	const char *m = json_string_value(json_object_get(j, "message"));

	if (!m)
		m = json_string_value(json_object_get(j, "error"));
	set_err(c, "%s answered %d: %.160s", ep->url, status, m ? m : body->p ? body->p : "");
}

/* The connection to endpoint i: the one kept from the last call, or a new
 * one. *reused: it is the kept one. */
static int conn_get(struct etcd *c, size_t i, struct tlsio *cn, int64_t deadline, bool *reused)
{
	*reused = c->keep.fd >= 0 && c->keep_ep == i;
	if (*reused) {
		*cn = c->keep;
		c->keep.fd = -1;
		c->keep.ssl = NULL;
		cn->deadline = deadline;
		return 0;
	}
	conn_close(&c->keep);
	cn->deadline = deadline;
	return conn_open(c, cn, &c->ep[i]);
}

/* One attempt at endpoint i. 0 (answered 2xx, *resp), -EAGAIN (try the
 * next), -EINVAL (4xx), -EPROTO. */
static int attempt(struct etcd *c, size_t i, const char *path, const char *req, int64_t deadline,
                   json_t **resp, struct exch *x)
{
	const struct endpoint *ep = &c->ep[i];
	struct tlsio cn = { .fd = -1, .deadline = deadline, .cancel_fd = -1 };
	struct buf body = {0};
	json_error_t je;
	json_t *j;
	bool reused;
	int r;

	memset(x, 0, sizeof(*x));
	r = conn_get(c, i, &cn, deadline, &reused);
	if (!r)
		r = exchange(c, &cn, ep, path, req, &body, x);
	if (r && r != -ETIMEDOUT && reused && !x->answered) {
		/* etcd closed the idle kept connection before reading the
		 * request: nothing was done; once more on a new connection.
		 * Not after a timeout: a stalled etcd (SIGSTOP, overload) has
		 * the request and may carry it out; sending it again would
		 * have it twice (loopback connects at once, past the deadline). */
		conn_close(&cn);
		body.len = 0;
		r = conn_open(c, &cn, ep);
		if (!r)
			r = exchange(c, &cn, ep, path, req, &body, x);
	}
	if (!r && x->reusable) {
		c->keep = cn;
		c->keep_ep = i;
	} else {
		conn_close(&cn);
	}
	if (r) {
		free(body.p);
		return -EAGAIN;
	}
	j = json_loadb(body.p ? body.p : "", body.len, 0, &je);
	if (x->status / 100 != 2 || !json_is_object(j)) {
		answer_error(c, ep, x->status, j, &body);
		r = x->status >= 500 ? -EAGAIN : x->status >= 400 ? -EINVAL : -EPROTO;
		json_decref(j);
	} else {
		*resp = j;
	}
	free(body.p);
	return r;
}

int etcd_call(struct etcd *c, const char *path, json_t *req, json_t **resp, bool retry_any)
{
	char *text = json_dumps(req, JSON_COMPACT);
	int64_t deadline = now_ms() + c->timeout_ms;
	int r = -EAGAIN;

	*resp = NULL;
	if (!text) {
		set_err(c, "out of memory");
		return -ENOMEM;
	}
	for (size_t k = 0; k < c->n_ep && now_ms() < deadline; k++) {
		size_t i = (c->cur + k) % c->n_ep;
		struct exch x;

		r = attempt(c, i, path, text, deadline, resp, &x);
		if (r != -EAGAIN) {
			c->cur = i;
			break;
		}
		/* A write that reached etcd may have been applied: sending it
		 * again elsewhere could apply it twice. 503 is etcd saying it did
		 * not take it (no leader, not ready). */
		if (!retry_any && x.sent && x.status != 503)
			break;
	}
	free(text);
	return r;
}

/* Feeds the complete newline-separated JSON messages of data to fn. */
static int feed(struct etcd *c, struct buf *data, etcd_msg_fn fn, void *arg)
{
	char *nl;

	while ((nl = data->len ? memchr(data->p, '\n', data->len) : NULL)) {
		json_error_t je;
		json_t *msg = json_loadb(data->p, (size_t)(nl - data->p), 0, &je);
		int r;

		buf_drop(data, (size_t)(nl + 1 - data->p));
		if (!msg) {
			set_err(c, "stream: a message that is not JSON: %s", je.text);
			return -EPROTO;
		}
		r = fn(arg, msg);
		json_decref(msg);
		if (r)
			return r;
	}
	return data->len > ETCD_RESPONSE_MAX ? -EPROTO : 0;
}

/* Reads the stream's body until fn, the peer or stop_fd ends it. */
static int stream_body(struct etcd *c, struct tlsio *cn, struct buf *raw, bool chunked,
                       int stop_fd, etcd_msg_fn fn, void *arg)
{
	struct buf data = {0};
	char tmp[16384];
	int r = 0;

	cn->deadline = 0;
	for (;;) {
		int last = 0;
		ssize_t n;

		if (chunked) {
			last = dechunk(raw, &data);
			if (last < 0) {
				r = -EPROTO;
				break;
			}
		} else if (raw->len) {
			r = buf_add(&data, raw->p, raw->len);
			raw->len = 0;
		}
		r = r ? r : feed(c, &data, fn, arg);
		if (!r && last) {
			/* etcd ended the answer (a graceful shutdown does): to the
			 * caller a broken stream, never 0, which means stopped. */
			set_err(c, "stream ended: etcd finished the answer");
			r = -EAGAIN;
		}
		if (r)
			break;
		n = conn_read(cn, tmp, sizeof(tmp), stop_fd);
		if (n == -ECANCELED) {
			r = 0;
			break;
		}
		if (n <= 0) {
			set_err(c, "stream ended: %s", n == 0 ? "closed by etcd" : strerror((int)-n));
			r = -EAGAIN;
			break;
		}
		if (buf_add(raw, tmp, (size_t)n) < 0) {
			r = -ENOMEM;
			break;
		}
	}
	free(data.p);
	return r;
}

int etcd_stream(struct etcd *c, const char *path, json_t *req, int stop_fd, etcd_msg_fn fn,
                void *arg)
{
	char *text = json_dumps(req, JSON_COMPACT);
	int r = -EAGAIN;

	if (!text)
		return -ENOMEM;
	for (size_t k = 0; k < c->n_ep && r == -EAGAIN; k++) {
		size_t i = (c->cur + k) % c->n_ep;
		struct tlsio cn = { .fd = -1, .deadline = now_ms() + c->timeout_ms, .cancel_fd = -1 };
		struct buf raw = {0};
		struct head h = {0};

		r = conn_open(c, &cn, &c->ep[i]);
		if (!r)
			r = send_request(&cn, &c->ep[i], path, text, true);
		if (!r)
			r = read_head(&cn, &raw, stop_fd, &h);
		if (!r && h.status != 200) {
			set_err(c, "%s%s answered %d", c->ep[i].url, path, h.status);
			r = -EAGAIN;
		} else if (r == -ECANCELED) {
			r = 0;
		} else if (!r) {
			c->cur = i;
			r = stream_body(c, &cn, &raw, h.chunked, stop_fd, fn, arg);
			k = c->n_ep;   /* it was open: the caller decides about retrying */
		} else if (r != -EAGAIN) {
			set_err(c, "%s%s: %s", c->ep[i].url, path, strerror(-r));
			r = -EAGAIN;
		}
		free(raw.p);
		conn_close(&cn);
	}
	free(text);
	return r;
}
