/*
 * httpc: see meshlet/httpc.h. A deliberately small HTTP/1.1 client: one
 * request per TLS connection unless keep-alive is on (then one connection
 * kept in struct httpc between requests), non-blocking socket driven by poll() against a
 * single deadline and an eventfd that httpc_cancel() signals; Content-Length,
 * chunked and read-to-close bodies.
 */
#include "meshlet/httpc.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "meshlet/ca.h"
#include "meshlet/tlsio.h"

#define HTTPC_HOST_MAX 256
#define HTTPC_PREFIX_MAX 512
#define HTTPC_MAX_IDS 8

/* How the server's certificate is checked (see httpc.h). */
enum httpc_verify {
	VERIFY_CA_FILE,                 /* meshletctl: CA file, URL host or control ID */
	VERIFY_ROOTS,                   /* roots in memory, leaf URI SAN expect_uri */
	VERIFY_PIN,                     /* anchor pinned by SPKI hash, leaf URI SAN expect_uri */
};

struct httpc {
	char host[HTTPC_HOST_MAX];        /* without brackets */
	char port[8];
	char prefix[HTTPC_PREFIX_MAX];    /* "" or "/base" (no trailing '/') */
	char host_header[HTTPC_HOST_MAX + 16];
	bool host_is_ip;
	char *token;
	char *user_agent;
	int timeout_ms;
	size_t max_response;
	SSL_CTX *ctx;
	enum httpc_verify verify;
	char pin[CA_PIN_HEX_LEN];         /* VERIFY_PIN */
	char *expect_uri;                 /* VERIFY_ROOTS, VERIFY_PIN */
	/* spiffe://<td>/control for each trust domain of a root in the CA file */
	char *control_ids[HTTPC_MAX_IDS];
	size_t n_ids;
	int cancel_fd;                    /* eventfd, readable once cancelled */
	atomic_bool cancelled;
	bool keepalive;                   /* httpc_set_keepalive() */
	int ka_fd;                        /* the kept connection, or -1 */
	SSL *ka_ssl;
	unsigned long n_conns;            /* connections opened (httpc_connections()) */
};

__attribute__((format(printf, 2, 3)))
static int fail(char *err, const char *fmt, ...)
{
	va_list ap;

	if (err) {
		va_start(ap, fmt);
		vsnprintf(err, HTTPC_ERR_MAX, fmt, ap);
		va_end(ap);
	}
	return -1;
}

/* The first queued OpenSSL error as text (or "unknown error"), clearing the queue. */
static const char *ssl_errstr(char *buf, size_t len)
{
	unsigned long e = ERR_peek_last_error();

	if (!e) {
		snprintf(buf, len, "unknown error");
	} else {
		const char *reason = ERR_reason_error_string(e);

		snprintf(buf, len, "%s", reason ? reason : "unknown error");
	}
	ERR_clear_error();
	return buf;
}

/* ---------------------------------------------------------------- setup */

static int parse_url(struct httpc *h, const char *url, char *err)
{
	const char *p, *host_end, *rest;
	size_t n;

	if (strncasecmp(url, "https://", 8) != 0) {
		if (strncasecmp(url, "http://", 7) == 0)
			return fail(err, "control URL %s: only https:// is supported", url);
		return fail(err, "control URL %s: must look like https://HOST[:PORT]", url);
	}
	p = url + 8;
	if (*p == '[') {
		host_end = strchr(p, ']');
		if (!host_end)
			return fail(err, "control URL %s: unterminated [IPv6 address]", url);
		n = (size_t)(host_end - p - 1);
		if (n == 0 || n >= sizeof(h->host))
			return fail(err, "control URL %s: bad host", url);
		memcpy(h->host, p + 1, n);
		h->host[n] = '\0';
		rest = host_end + 1;
	} else {
		n = strcspn(p, ":/?#");
		if (n == 0 || n >= sizeof(h->host))
			return fail(err, "control URL %s: missing or too long host", url);
		memcpy(h->host, p, n);
		h->host[n] = '\0';
		rest = p + n;
	}
	for (const char *c = h->host; *c; c++)
		if (!isalnum((unsigned char)*c) && !strchr(".-_:%", *c))
			return fail(err, "control URL %s: bad character in host", url);
	snprintf(h->port, sizeof(h->port), "443");
	if (*rest == ':') {
		char *end;
		long port;

		rest++;
		errno = 0;
		port = strtol(rest, &end, 10);
		if (end == rest || errno || port < 1 || port > 65535)
			return fail(err, "control URL %s: bad port", url);
		snprintf(h->port, sizeof(h->port), "%ld", port);
		rest = end;
	}
	if (*rest == '?' || *rest == '#')
		return fail(err, "control URL %s: no query or fragment allowed", url);
	if (*rest && *rest != '/')
		return fail(err, "control URL %s: bad port", url);
	n = strlen(rest);
	while (n > 0 && rest[n - 1] == '/')
		n--;
	if (n >= sizeof(h->prefix))
		return fail(err, "control URL %s: path too long", url);
	memcpy(h->prefix, rest, n);
	h->prefix[n] = '\0';
	for (const char *c = h->prefix; *c; c++)
		if ((unsigned char)*c <= 0x20 || (unsigned char)*c >= 0x7f || *c == '?' || *c == '#')
			return fail(err, "control URL %s: bad character in path", url);

	{
		struct in6_addr a6;
		struct in_addr a4;

		h->host_is_ip = inet_pton(AF_INET, h->host, &a4) == 1 ||
		                inet_pton(AF_INET6, h->host, &a6) == 1;
	}
	if (strchr(h->host, ':'))
		snprintf(h->host_header, sizeof(h->host_header), "[%s]", h->host);
	else
		snprintf(h->host_header, sizeof(h->host_header), "%s", h->host);
	if (strcmp(h->port, "443") != 0) {
		size_t l = strlen(h->host_header);

		snprintf(h->host_header + l, sizeof(h->host_header) - l, ":%s", h->port);
	}
	return 0;
}

/* Collects spiffe://<td>/control for each root in file with a URI SAN spiffe://<td>. */
static void collect_control_ids(struct httpc *h, const char *file)
{
	FILE *f = fopen(file, "r");
	X509 *x;

	if (!f)
		return;
	while ((x = PEM_read_X509(f, NULL, NULL, NULL)) != NULL) {
		GENERAL_NAMES *gens = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);

		for (int i = 0; gens && i < sk_GENERAL_NAME_num(gens); i++) {
			const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
			const unsigned char *d;
			int len;
			char *id;

			if (g->type != GEN_URI)
				continue;
			d = ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
			len = ASN1_STRING_length(g->d.uniformResourceIdentifier);
			if (len <= 9 || len > 255 || strncmp((const char *)d, "spiffe://", 9) != 0 ||
			    memchr(d + 9, '/', (size_t)len - 9) || memchr(d, '\0', (size_t)len))
				continue;
			if (h->n_ids >= HTTPC_MAX_IDS)
				break;
			id = malloc((size_t)len + sizeof("/control"));
			if (!id)
				break;
			memcpy(id, d, (size_t)len);
			memcpy(id + len, "/control", sizeof("/control"));
			h->control_ids[h->n_ids++] = id;
		}
		GENERAL_NAMES_free(gens);
		X509_free(x);
	}
	ERR_clear_error();
	fclose(f);
}

static bool token_ok(const char *t)
{
	if (!*t)
		return false;
	for (; *t; t++)
		if ((unsigned char)*t <= 0x20 || (unsigned char)*t >= 0x7f)
			return false;
	return true;
}

static bool pin_ok(const char *pin)
{
	size_t n = 0;

	for (; pin[n]; n++)
		if (!isxdigit((unsigned char)pin[n]) || isupper((unsigned char)pin[n]))
			return false;
	return n == CA_PIN_HEX_LEN - 1;
}

static int verify_pin(X509_STORE_CTX *xs, void *arg);

/* The server verification of opts into h->ctx. 0, or -1 with err set. */
static int setup_verify(struct httpc *h, const struct httpc_opts *o, char *err)
{
	char ebuf[256];
	int modes = (o->ca_file != NULL) + (o->roots != NULL) + (o->pin_sha256 != NULL);
	FILE *f;

	if (modes != 1)
		return fail(err, "give exactly one of a CA file, roots or a pin to verify the control with");
	SSL_CTX_set_verify(h->ctx, SSL_VERIFY_PEER, NULL);
	if (o->ca_file) {
		h->verify = VERIFY_CA_FILE;
		f = fopen(o->ca_file, "r");
		if (!f)
			return fail(err, "cannot read CA file %s: %s", o->ca_file, strerror(errno));
		fclose(f);
		if (SSL_CTX_load_verify_locations(h->ctx, o->ca_file, NULL) != 1)
			return fail(err, "CA file %s: no usable PEM certificate (%s)", o->ca_file,
			            ssl_errstr(ebuf, sizeof(ebuf)));
		collect_control_ids(h, o->ca_file);
		return 0;
	}
	if (!o->expect_uri || !*o->expect_uri)
		return fail(err, "no SPIFFE ID to expect of the control");
	h->expect_uri = strdup(o->expect_uri);
	if (!h->expect_uri)
		return fail(err, "out of memory");
	if (o->roots) {
		X509_STORE *store = SSL_CTX_get_cert_store(h->ctx);

		h->verify = VERIFY_ROOTS;
		if (sk_X509_num(o->roots) == 0)
			return fail(err, "no root to verify the control with");
		for (int i = 0; i < sk_X509_num(o->roots); i++)
			if (X509_STORE_add_cert(store, sk_X509_value(o->roots, i)) != 1)
				return fail(err, "cannot use a root: %s", ssl_errstr(ebuf, sizeof(ebuf)));
		return 0;
	}
	h->verify = VERIFY_PIN;
	if (!pin_ok(o->pin_sha256))
		return fail(err, "the pin must be 64 lowercase hex digits");
	memcpy(h->pin, o->pin_sha256, CA_PIN_HEX_LEN);
	SSL_CTX_set_cert_verify_callback(h->ctx, verify_pin, h);
	return 0;
}

int httpc_new(struct httpc **out, const struct httpc_opts *opts, char *err)
{
	struct httpc *h;
	char ebuf[256];

	*out = NULL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return fail(err, "out of memory"), HTTPC_EUSAGE;
	h->cancel_fd = -1;
	h->ka_fd = -1;
	h->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (h->cancel_fd < 0) {
		fail(err, "eventfd: %s", strerror(errno));
		goto fail;
	}
	if (!opts->url || parse_url(h, opts->url, err) < 0)
		goto fail;
	if (opts->token && !token_ok(opts->token)) {
		fail(err, "the token is empty or holds spaces or control characters");
		goto fail;
	}
	h->token = opts->token ? strdup(opts->token) : NULL;
	h->user_agent = strdup(opts->user_agent ? opts->user_agent : "meshlet");
	if ((opts->token && !h->token) || !h->user_agent) {
		fail(err, "out of memory");
		goto fail;
	}
	h->timeout_ms = opts->timeout_ms > 0 ? opts->timeout_ms : HTTPC_TIMEOUT_MS_DEFAULT;
	h->max_response = opts->max_response ? opts->max_response : HTTPC_MAX_RESPONSE_DEFAULT;

	h->ctx = SSL_CTX_new(TLS_client_method());
	if (!h->ctx) {
		fail(err, "TLS setup: %s", ssl_errstr(ebuf, sizeof(ebuf)));
		goto fail;
	}
	SSL_CTX_set_min_proto_version(h->ctx, TLS1_3_VERSION);
	SSL_CTX_set_max_proto_version(h->ctx, TLS1_3_VERSION);
	SSL_CTX_set_options(h->ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
	SSL_CTX_set_session_cache_mode(h->ctx, SSL_SESS_CACHE_OFF);
	/* Send the chain we are given and nothing OpenSSL would build from
	 * the trust store: a root sent along costs control a parsed copy of it
	 * for as long as the connection lives (docs/benchmarks.md). */
	SSL_CTX_set_mode(h->ctx, SSL_MODE_NO_AUTO_CHAIN);
	if (setup_verify(h, opts, err) < 0)
		goto fail;
	if (opts->cert || opts->key) {
		if (!opts->cert || !opts->key) {
			fail(err, "a client certificate needs both the certificate and its key");
			goto fail;
		}
		if (SSL_CTX_use_cert_and_key(h->ctx, opts->cert, opts->key, opts->chain, 1) != 1 ||
		    SSL_CTX_check_private_key(h->ctx) != 1) {
			fail(err, "client certificate: %s", ssl_errstr(ebuf, sizeof(ebuf)));
			goto fail;
		}
	}
	*out = h;
	return 0;
fail:
	httpc_free(h);
	return HTTPC_EUSAGE;
}

void httpc_free(struct httpc *h)
{
	if (!h)
		return;
	httpc_set_keepalive(h, false);
	SSL_CTX_free(h->ctx);
	if (h->token) {
		OPENSSL_cleanse(h->token, strlen(h->token));
		free(h->token);
	}
	free(h->user_agent);
	free(h->expect_uri);
	for (size_t i = 0; i < h->n_ids; i++)
		free(h->control_ids[i]);
	if (h->cancel_fd >= 0)
		close(h->cancel_fd);
	free(h);
}

void httpc_set_timeout(struct httpc *h, int timeout_ms)
{
	h->timeout_ms = timeout_ms > 0 ? timeout_ms : HTTPC_TIMEOUT_MS_DEFAULT;
}

/* Closes the kept connection, if any, without a close_notify: the peer
 * sees EOF, which is all an idle HTTP/1.1 connection needs. */
static void ka_drop(struct httpc *h)
{
	SSL_free(h->ka_ssl);
	if (h->ka_fd >= 0)
		close(h->ka_fd);
	h->ka_ssl = NULL;
	h->ka_fd = -1;
}

void httpc_set_keepalive(struct httpc *h, bool on)
{
	h->keepalive = on;
	if (!on)
		ka_drop(h);
}

unsigned long httpc_connections(const struct httpc *h)
{
	return h->n_conns;
}

void httpc_cancel(struct httpc *h)
{
	uint64_t one = 1;

	atomic_store(&h->cancelled, true);
	/* Wakes a poll() in progress; the counter stays readable from then on. */
	if (write(h->cancel_fd, &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is already non-zero, which is all we need. */
	}
}

void httpc_uncancel(struct httpc *h)
{
	uint64_t v;

	/* Drain the eventfd first: a poll() of the next request must not wake. */
	if (read(h->cancel_fd, &v, sizeof(v)) < 0) {
		/* EAGAIN: it was not signalled. */
	}
	atomic_store(&h->cancelled, false);
}

void httpc_response_clear(struct httpc_response *resp)
{
	free(resp->body);
	json_decref(resp->json);
	memset(resp, 0, sizeof(*resp));
}

int httpc_escape(char *out, size_t outlen, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t o = strlen(out);

	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
			if (o + 1 >= outlen)
				return -1;
			out[o++] = (char)c;
		} else {
			if (o + 3 >= outlen)
				return -1;
			out[o++] = '%';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		}
	}
	out[o] = '\0';
	return 0;
}

/* ---------------------------------------------------------------- I/O */

struct conn {
	struct tlsio io;                /* the socket, its TLS, the deadline and cancelling */
	const struct httpc *h;
	int why;                        /* enum httpc_status of a failure */
	const char *verify_why;         /* VERIFY_PIN: why the chain was refused */
	STACK_OF(X509) *anchors;        /* VERIFY_PIN: the pinned certificate (borrowed) */
};

/* A connection of h, none yet, bounded by deadline and httpc_cancel(). */
static void conn_init(struct conn *c, const struct httpc *h, int64_t deadline)
{
	memset(c, 0, sizeof(*c));
	tlsio_init(&c->io);
	c->h = h;
	c->io.deadline = deadline;
	c->io.cancel_fd = h->cancel_fd;
	c->io.cancelled = &h->cancelled;
}

/*
 * VERIFY_PIN, in place of OpenSSL's chain verification: the anchor is the
 * certificate of the server's own chain whose SPKI pin is ours; the chain
 * must verify up to it as to any trusted root (signatures, validity, CA
 * flags, purpose).
 */
static int verify_pin(X509_STORE_CTX *xs, void *arg)
{
	const struct httpc *h = arg;
	SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
	struct conn *c = ssl ? SSL_get_app_data(ssl) : NULL;
	STACK_OF(X509) *presented = X509_STORE_CTX_get0_untrusted(xs);
	X509 *leaf = X509_STORE_CTX_get0_cert(xs), *anchor = NULL;
	char pin[CA_PIN_HEX_LEN];

	if (!c)
		return 0;
	for (int i = 0; i < sk_X509_num(presented) && !anchor; i++) {
		X509 *x = sk_X509_value(presented, i);

		if (x != leaf && ca_pin_sha256(x, pin) == 0 && strcmp(pin, h->pin) == 0)
			anchor = x;
	}
	if (!anchor) {
		c->verify_why = "it is not the control the join token pins (no certificate of its "
		                "chain has the pinned root key)";
		X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
		return 0;
	}
	if (!c->anchors)
		c->anchors = sk_X509_new_null();
	if (!c->anchors || !sk_X509_push(c->anchors, anchor)) {
		X509_STORE_CTX_set_error(xs, X509_V_ERR_OUT_OF_MEM);
		return 0;
	}
	X509_STORE_CTX_set0_trusted_stack(xs, c->anchors);
	/* The pin names a key: the certificate carrying it is the anchor even
	 * when it is not self-signed (during a CA rotation control's chain
	 * holds the new root cross-signed by the old one). */
	X509_STORE_CTX_set_flags(xs, X509_V_FLAG_PARTIAL_CHAIN);
	if (X509_verify_cert(xs) == 1)
		return 1;
	c->verify_why = "its chain does not verify up to the pinned root";
	return 0;
}

static int tcp_connect(struct conn *c, char *err)
{
	const struct httpc *h = c->h;
	char why[256] = "";
	int r = tlsio_connect(&c->io, h->host, h->port, 0, why, sizeof(why));

	if (r == 0)
		return 0;
	if (r == -ECANCELED)
		c->why = HTTPC_ECANCELED;
	if (r == -EHOSTUNREACH)
		return fail(err, "cannot resolve %s: %s", h->host, why);
	return fail(err, "cannot connect to %s port %s: %s", h->host, h->port, why);
}

/* The message for a server certificate that did not verify. */
static int verify_failed(struct conn *c, const char *what, char *err)
{
	long vr = SSL_get_verify_result(c->io.ssl);
	const char *detail = vr != X509_V_OK ? X509_verify_cert_error_string(vr) : "refused";

	c->why = HTTPC_EVERIFY;
	switch (c->h->verify) {
	case VERIFY_CA_FILE:
		return fail(err, "%s: the control's certificate does not verify against the CA file: %s",
		            what, detail);
	case VERIFY_ROOTS:
		return fail(err, "%s: the control's certificate does not verify against the trust "
		            "bundle: %s", what, detail);
	case VERIFY_PIN:
	default:
		if (c->verify_why)
			return fail(err, "%s: refusing the server: %s", what, c->verify_why);
		return fail(err, "%s: refusing the server: its certificate does not verify: %s", what,
		            detail);
	}
}

/* The result r of a tlsio step on c: r when >= 0, else -1 with err saying
 * what failed (and c->why when it was a cancel or the verification). */
static int io_result(struct conn *c, int r, bool handshake, const char *what, char *err)
{
	char ebuf[256];

	if (r >= 0)
		return r;
	switch (r) {
	case -ECANCELED:
		c->why = HTTPC_ECANCELED;
		return fail(err, "%s: cancelled", what);
	case -ETIMEDOUT:
		return fail(err, "%s: timed out after %d ms", what, c->h->timeout_ms);
	case -EPROTO:
		if (handshake && SSL_get_verify_result(c->io.ssl) != X509_V_OK)
			return verify_failed(c, what, err);
		return fail(err, "%s: %s", what, ssl_errstr(ebuf, sizeof(ebuf)));
	default:
		return fail(err, "%s: %s", what, strerror(-r));
	}
}

/* True when cert carries exactly one URI SAN, and it is uri. */
static bool has_only_uri(X509 *cert, const char *uri)
{
	GENERAL_NAMES *gens = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	int n = 0;
	bool match = false;

	for (int i = 0; gens && i < sk_GENERAL_NAME_num(gens); i++) {
		const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
		const unsigned char *d;
		int len;

		if (g->type != GEN_URI)
			continue;
		n++;
		d = ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
		len = ASN1_STRING_length(g->d.uniformResourceIdentifier);
		match = (size_t)len == strlen(uri) && memcmp(d, uri, (size_t)len) == 0;
	}
	GENERAL_NAMES_free(gens);
	ERR_clear_error();
	return n == 1 && match;
}

/*
 * After the handshake, before anything is sent: VERIFY_CA_FILE wants the
 * URL host or the control's SPIFFE ID, the other modes the expected URI SAN.
 */
static int check_name(struct conn *c, char *err)
{
	const struct httpc *h = c->h;
	X509 *cert = SSL_get0_peer_certificate(c->io.ssl);
	GENERAL_NAMES *gens;
	bool ok = false;

	c->why = HTTPC_EVERIFY;
	if (!cert)
		return fail(err, "the control presented no certificate");
	if (h->verify != VERIFY_CA_FILE) {
		if (has_only_uri(cert, h->expect_uri))
			return c->why = 0;
		return fail(err, "refusing the server: its certificate does not carry the control's "
		            "SPIFFE ID %s", h->expect_uri);
	}
	if (h->host_is_ip)
		ok = X509_check_ip_asc(cert, h->host, 0) == 1;
	else
		ok = X509_check_host(cert, h->host, 0, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) == 1;
	if (ok)
		return c->why = 0;
	gens = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	for (int i = 0; !ok && gens && i < sk_GENERAL_NAME_num(gens); i++) {
		const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);
		const unsigned char *d;
		int len;

		if (g->type != GEN_URI)
			continue;
		d = ASN1_STRING_get0_data(g->d.uniformResourceIdentifier);
		len = ASN1_STRING_length(g->d.uniformResourceIdentifier);
		for (size_t k = 0; k < h->n_ids; k++)
			if ((size_t)len == strlen(h->control_ids[k]) &&
			    memcmp(d, h->control_ids[k], (size_t)len) == 0)
				ok = true;
	}
	GENERAL_NAMES_free(gens);
	ERR_clear_error();
	if (ok)
		return c->why = 0;
	return fail(err, "the control's certificate is not valid for %s (nor does it carry the "
	            "control's SPIFFE ID of the CA file's trust domain)", h->host);
}

/* ---------------------------------------------------------------- response parsing */

struct buf {
	char *d;
	size_t len, cap;
};

static int buf_add(struct buf *b, const void *d, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *nd;

		while (cap < b->len + n + 1)
			cap *= 2;
		nd = realloc(b->d, cap);
		if (!nd)
			return -1;
		b->d = nd;
		b->cap = cap;
	}
	memcpy(b->d + b->len, d, n);
	b->len += n;
	b->d[b->len] = '\0';
	return 0;
}

__attribute__((format(printf, 2, 3)))
static int buf_printf(struct buf *b, const char *fmt, ...)
{
	char tmp[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(tmp))
		return -1;
	return buf_add(b, tmp, (size_t)n);
}

struct head {
	bool done;              /* headers parsed */
	size_t hdr_len;         /* bytes up to and including the blank line */
	int status;
	bool chunked;
	bool has_length;
	bool close;             /* Connection: close, or HTTP/1.0 */
	size_t length;
	char etag[128];
	char content_type[128];
	int retry_after;        /* seconds, -1 when absent or not delta-seconds */
};

/* Retry-After as delta-seconds (an HTTP-date is not something control
 * sends): capped at a day so a hostile value cannot park a client forever
 * in one sleep; -1 for anything else. */
static int retry_after_value(const char *v, size_t vlen)
{
	long n = 0;
	size_t i = 0;

	while (i < vlen && (v[i] == ' ' || v[i] == '\t'))
		i++;
	if (i == vlen)
		return -1;
	for (; i < vlen && v[i] >= '0' && v[i] <= '9'; i++)
		n = n < 86400 ? n * 10 + (v[i] - '0') : n;
	while (i < vlen && (v[i] == ' ' || v[i] == '\t'))
		i++;
	if (i != vlen)
		return -1;
	return n > 86400 ? 86400 : (int)n;
}

static void copy_value(char *dst, size_t dlen, const char *v, size_t vlen)
{
	while (vlen && (*v == ' ' || *v == '\t'))
		v++, vlen--;
	while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
		vlen--;
	if (vlen >= dlen)
		vlen = dlen - 1;
	memcpy(dst, v, vlen);
	dst[vlen] = '\0';
}

/* Parses the status line and headers once they are complete in b.
 * Returns 1 when parsed, 0 when more is needed, -1 on malformed HTTP. */
static int parse_head(const struct buf *b, struct head *hd, char *err)
{
	const char *end = b->len ? strstr(b->d, "\r\n\r\n") : NULL;
	const char *line, *eol;

	if (!end) {
		if (b->len > HTTPC_MAX_HEADER)
			return fail(err, "response headers over %d bytes", HTTPC_MAX_HEADER);
		return 0;
	}
	hd->hdr_len = (size_t)(end - b->d) + 4;
	hd->retry_after = -1;
	if (strncmp(b->d, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)b->d[7]) ||
	    b->d[8] != ' ' || !isdigit((unsigned char)b->d[9]) ||
	    !isdigit((unsigned char)b->d[10]) || !isdigit((unsigned char)b->d[11]))
		return fail(err, "malformed HTTP status line from the control");
	hd->status = (b->d[9] - '0') * 100 + (b->d[10] - '0') * 10 + (b->d[11] - '0');
	hd->close = b->d[7] == '0';
	line = strstr(b->d, "\r\n") + 2;
	while (line < end + 2) {
		const char *colon;
		size_t nlen, vlen;

		eol = strstr(line, "\r\n");
		colon = memchr(line, ':', (size_t)(eol - line));
		if (!colon)
			return fail(err, "malformed HTTP header from the control");
		nlen = (size_t)(colon - line);
		vlen = (size_t)(eol - colon - 1);
		if (nlen == 14 && strncasecmp(line, "Content-Length", 14) == 0) {
			char tmp[32], *e;
			unsigned long long v;

			copy_value(tmp, sizeof(tmp), colon + 1, vlen);
			errno = 0;
			v = strtoull(tmp, &e, 10);
			if (!tmp[0] || *e || errno || !isdigit((unsigned char)tmp[0]))
				return fail(err, "bad Content-Length from the control");
			if (hd->has_length && hd->length != v)
				return fail(err, "conflicting Content-Length headers from the control");
			hd->has_length = true;
			hd->length = (size_t)v;
		} else if (nlen == 17 && strncasecmp(line, "Transfer-Encoding", 17) == 0) {
			char tmp[64];

			copy_value(tmp, sizeof(tmp), colon + 1, vlen);
			if (strcasecmp(tmp, "chunked") == 0)
				hd->chunked = true;
			else if (strcasecmp(tmp, "identity") != 0)
				return fail(err, "unsupported Transfer-Encoding %s from the control", tmp);
		} else if (nlen == 10 && strncasecmp(line, "Connection", 10) == 0) {
			char tmp[64];

			copy_value(tmp, sizeof(tmp), colon + 1, vlen);
			if (strcasecmp(tmp, "close") == 0)
				hd->close = true;
		} else if (nlen == 4 && strncasecmp(line, "ETag", 4) == 0) {
			copy_value(hd->etag, sizeof(hd->etag), colon + 1, vlen);
		} else if (nlen == 12 && strncasecmp(line, "Content-Type", 12) == 0) {
			copy_value(hd->content_type, sizeof(hd->content_type), colon + 1, vlen);
		} else if (nlen == 11 && strncasecmp(line, "Retry-After", 11) == 0) {
			hd->retry_after = retry_after_value(colon + 1, vlen);
		}
		line = eol + 2;
	}
	if (hd->chunked)
		hd->has_length = false;
	hd->done = true;
	return 1;
}

/* Decodes a chunked body from in[0..n). Returns 1 with the body in out when
 * the last chunk was seen, 0 when more is needed, -1 when malformed. */
static int dechunk(const char *in, size_t n, struct buf *out, char *err)
{
	size_t i = 0;

	out->len = 0;
	for (;;) {
		const char *eol = NULL;
		unsigned long long sz;
		char *e;

		for (size_t k = i; k + 1 < n; k++)
			if (in[k] == '\r' && in[k + 1] == '\n') {
				eol = in + k;
				break;
			}
		if (!eol)
			return 0;
		if (!isxdigit((unsigned char)in[i]))
			return fail(err, "malformed chunked body from the control");
		errno = 0;
		sz = strtoull(in + i, &e, 16);
		if (errno || sz > (1ull << 40) || (e != eol && *e != ';' && *e != ' '))
			return fail(err, "malformed chunk size from the control");
		i = (size_t)(eol - in) + 2;
		if (sz == 0) {
			/* trailers, up to an empty line */
			for (;;) {
				const char *t = NULL;

				for (size_t k = i; k + 1 < n; k++)
					if (in[k] == '\r' && in[k + 1] == '\n') {
						t = in + k;
						break;
					}
				if (!t)
					return 0;
				if (t == in + i)
					return 1;
				i = (size_t)(t - in) + 2;
			}
		}
		if (n - i < sz + 2)
			return 0;
		if (buf_add(out, in + i, (size_t)sz) < 0)
			return fail(err, "out of memory");
		if (in[i + sz] != '\r' || in[i + sz + 1] != '\n')
			return fail(err, "malformed chunked body from the control");
		i += (size_t)sz + 2;
	}
}

static bool body_expected(const char *method, int status)
{
	return strcmp(method, "HEAD") != 0 && status != 204 && status != 304 &&
	       !(status >= 100 && status < 200);
}

/* ---------------------------------------------------------------- request */

/* The kept connection, if the server has not closed it meanwhile: an idle
 * HTTP/1.1 connection has nothing to read, so anything readable (EOF, a
 * close_notify, stray bytes) means it is not worth a request. */
static bool ka_take(struct httpc *h, struct conn *c)
{
	struct pollfd p = { .fd = h->ka_fd, .events = POLLIN };

	if (!h->ka_ssl)
		return false;
	if (poll(&p, 1, 0) != 0 || SSL_pending(h->ka_ssl) > 0) {
		ka_drop(h);
		return false;
	}
	c->io.fd = h->ka_fd;
	c->io.ssl = h->ka_ssl;
	h->ka_fd = -1;
	h->ka_ssl = NULL;
	return true;
}

/* A new verified TLS connection into c. 0, or -1 with err set. */
static int conn_open(struct httpc *h, struct conn *c, char *err)
{
	if (tcp_connect(c, err) < 0)
		return -1;
	h->n_conns++;
	c->io.ssl = SSL_new(h->ctx);
	if (!c->io.ssl || SSL_set_fd(c->io.ssl, c->io.fd) != 1)
		return fail(err, "TLS setup failed");
	SSL_set_app_data(c->io.ssl, c);
	if (!h->host_is_ip)
		SSL_set_tlsext_host_name(c->io.ssl, h->host);
	if (io_result(c, tlsio_handshake(&c->io), true, "TLS handshake with the control", err) <= 0) {
		if (!err || !*err)
			fail(err, "TLS handshake with the control: connection closed");
		return -1;
	}
	return check_name(c, err);
}

/* Reads a response on c into in/hd/dec until it is complete. 0, or -1
 * with err set. */
static int read_response(struct conn *c, const char *method, struct buf *in, struct head *hd,
                         struct buf *dec, char *err)
{
	bool eof = false, complete = false;

	while (!complete) {
		char tmp[16384];
		int n;

		if (eof)
			break;
		n = io_result(c, (int)tlsio_read(&c->io, tmp, sizeof(tmp)), false,
		              "reading the response", err);
		if (n < 0) {
			if (!hd->done || hd->has_length || hd->chunked)
				return -1;
			break;
		}
		if (n == 0) {
			eof = true;
		} else {
			if (in->len + (size_t)n > c->h->max_response)
				return fail(err, "the control's response is over %zu bytes", c->h->max_response);
			if (buf_add(in, tmp, (size_t)n) < 0)
				return fail(err, "out of memory");
		}
		if (!hd->done) {
			int r = parse_head(in, hd, err);

			if (r < 0)
				return -1;
			if (r == 0) {
				if (eof)
					return fail(err, "the control closed the connection %s",
					            in->len ? "in the middle of the response headers"
					                    : "without answering");
				continue;
			}
			if (hd->status >= 100 && hd->status < 200) {
				/* interim response: drop it and parse the next head */
				memmove(in->d, in->d + hd->hdr_len, in->len - hd->hdr_len);
				in->len -= hd->hdr_len;
				in->d[in->len] = '\0';
				memset(hd, 0, sizeof(*hd));
				continue;
			}
		}
		if (!body_expected(method, hd->status)) {
			complete = true;
		} else if (hd->chunked) {
			int r = dechunk(in->d + hd->hdr_len, in->len - hd->hdr_len, dec, err);

			if (r < 0)
				return -1;
			complete = r == 1;
		} else if (hd->has_length) {
			complete = in->len - hd->hdr_len >= hd->length;
		} else {
			complete = eof;
			hd->close = true;       /* read to close: nothing to keep */
		}
		if (!complete && eof)
			return fail(err, "the control closed the connection in the middle of the body");
	}
	if (!hd->done) {
		if (!err || !*err)
			fail(err, "no response from the control");
		return -1;
	}
	return 0;
}

/* Fills resp from a complete response. 0, or -1 out of memory. */
static int fill_response(const char *method, const struct buf *in, const struct head *hd,
                         const struct buf *dec, struct httpc_response *resp)
{
	const char *src = "";
	size_t n = 0;

	resp->status = hd->status;
	snprintf(resp->etag, sizeof(resp->etag), "%s", hd->etag);
	snprintf(resp->content_type, sizeof(resp->content_type), "%s", hd->content_type);
	resp->retry_after = hd->retry_after;
	if (!body_expected(method, hd->status)) {
		n = 0;
	} else if (hd->chunked) {
		src = dec->d ? dec->d : "";
		n = dec->len;
	} else {
		src = in->d + hd->hdr_len;
		n = in->len - hd->hdr_len;
		if (hd->has_length && n > hd->length)
			n = hd->length;
	}
	resp->body = malloc(n + 1);
	if (!resp->body)
		return -1;
	memcpy(resp->body, src, n);
	resp->body[n] = '\0';
	resp->body_len = n;
	if (n > 0)
		resp->json = json_loadb(resp->body, n, JSON_DECODE_ANY, NULL);
	return 0;
}

/* Whether the connection of this complete response can carry another:
 * the server did not close it and no byte beyond the response arrived. */
static bool keepable(const char *method, const struct buf *in, const struct head *hd)
{
	if (hd->close)
		return false;
	if (!body_expected(method, hd->status))
		return in->len == hd->hdr_len;
	if (hd->has_length)
		return in->len == hd->hdr_len + hd->length;
	return hd->chunked;
}

/* One attempt: the request req on the kept connection (*reused) or a new
 * one, the response into resp. *written: a byte of req went out. */
static int exchange(struct httpc *h, int64_t deadline, const char *method, const struct buf *req,
                    struct httpc_response *resp, char *err, bool *reused, bool *written)
{
	struct conn c;
	struct buf in = { 0 }, dec = { 0 };
	struct head hd = { 0 };
	size_t off = 0;
	int rc = HTTPC_ECONNECT, w;

	conn_init(&c, h, deadline);
	*written = false;
	*reused = h->keepalive && ka_take(h, &c);
	if (*reused)
		SSL_set_app_data(c.io.ssl, &c);
	else if (conn_open(h, &c, err) < 0)
		goto out;

	w = tlsio_write_all(&c.io, req->d, req->len, &off);
	*written = off > 0;
	/* On failure the server may have answered early (413) and closed: the
	 * answer is read all the same. */
	if (w == -EPIPE)
		fail(err, "sending the request: connection closed by the control");
	else if (w < 0)
		io_result(&c, w, false, "sending the request", err);
	if (read_response(&c, method, &in, &hd, &dec, err) < 0)
		goto out;
	if (err)
		err[0] = '\0';
	if (fill_response(method, &in, &hd, &dec, resp) < 0) {
		fail(err, "out of memory");
		goto out;
	}
	rc = 0;
	if (h->keepalive && off == req->len && keepable(method, &in, &hd)) {
		SSL_set_app_data(c.io.ssl, NULL);
		h->ka_fd = c.io.fd;
		h->ka_ssl = c.io.ssl;
		c.io.fd = -1;
		c.io.ssl = NULL;
	}
out:
	tlsio_close(&c.io, rc == 0);    /* one close_notify when clean, no waiting for the peer's */
	sk_X509_free(c.anchors);
	if (rc != 0 && c.why != 0)
		rc = c.why;
	ERR_clear_error();
	free(in.d);
	free(dec.d);
	if (rc != 0)
		httpc_response_clear(resp);
	return rc;
}

/* The request's bytes into req. 0, or -1 out of memory. */
static int build_request(const struct httpc *h, const char *method, const char *path,
                         const char *payload, size_t plen, bool has_body,
                         const char *const *headers, struct buf *req)
{
	if (buf_printf(req, "%s %s%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\n"
	               "Accept: application/json\r\nConnection: %s\r\n",
	               method, h->prefix, path, h->host_header, h->user_agent,
	               h->keepalive ? "keep-alive" : "close") < 0)
		return -1;
	if (h->token && (buf_add(req, "Authorization: Bearer ", 22) < 0 ||
	                 buf_add(req, h->token, strlen(h->token)) < 0 || buf_add(req, "\r\n", 2) < 0))
		return -1;
	for (size_t i = 0; headers && headers[i]; i++)
		if (buf_printf(req, "%s\r\n", headers[i]) < 0)
			return -1;
	if (has_body) {
		if (buf_printf(req, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n", plen) < 0)
			return -1;
		return buf_add(req, payload, plen);
	}
	if (strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0)
		return buf_printf(req, "Content-Length: 0\r\n\r\n");
	return buf_add(req, "\r\n", 2);
}

int httpc_request(struct httpc *h, const char *method, const char *path,
                     const json_t *body, const char *raw_body, size_t raw_len,
                     const char *const *headers, struct httpc_response *resp, char *err)
{
	int64_t deadline = tlsio_now_ms() + h->timeout_ms;
	struct buf req = { 0 };
	char *payload = NULL;
	size_t plen = 0;
	bool reused, written, idempotent;
	int rc;

	memset(resp, 0, sizeof(*resp));
	if (err)
		err[0] = '\0';
	if (atomic_load(&h->cancelled)) {
		fail(err, "cancelled");
		return HTTPC_ECANCELED;
	}
	if (body) {
		payload = json_dumps(body, JSON_COMPACT);
		if (!payload) {
			fail(err, "cannot serialise the request body");
			return HTTPC_EUSAGE;
		}
		plen = strlen(payload);
	} else if (raw_body) {
		plen = raw_len;
	}
	if (build_request(h, method, path, payload ? payload : raw_body, plen,
	                  body || raw_body, headers, &req) < 0) {
		fail(err, "out of memory");
		rc = HTTPC_ECONNECT;
		goto out;
	}
	rc = exchange(h, deadline, method, &req, resp, err, &reused, &written);
	/* A kept connection the server closed just as we reused it: once more
	 * on a new one, when that cannot run the request twice. */
	idempotent = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
	if (rc == HTTPC_ECONNECT && reused && (!written || idempotent) &&
	    tlsio_now_ms() < deadline && !atomic_load(&h->cancelled))
		rc = exchange(h, deadline, method, &req, resp, err, &reused, &written);
out:
	if (payload)
		OPENSSL_cleanse(payload, plen);
	free(payload);
	if (req.d)
		OPENSSL_cleanse(req.d, req.len);
	free(req.d);
	return rc;
}
