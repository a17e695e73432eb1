/*
 * Unit tests for lib/httpc.c against a real TLS server in a thread: the
 * three ways of verifying the server (nothing is sent to one that fails),
 * the client certificate, cancellation from another thread, keep-alive
 * (reuse, a server closing between requests, the retry rules, a cancelled
 * request on a kept connection), and option
 * checks. Also the join's building blocks of other modules that httpc's
 * users rely on: ca_make_csr() and tls_material_from_pem().
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "meshlet/ca.h"
#include "meshlet/httpc.h"
#include "meshlet/tls.h"

#define TD "mesh.local"
#define CONTROL_ID "spiffe://" TD "/control"

/* A one-connection HTTPS server in a thread. */
struct server {
	int lfd;
	int port;
	SSL_CTX *ctx;
	bool silent;                    /* accept TCP, never speak TLS */
	pthread_t th;
	char got[16384];                /* application bytes received */
	size_t got_len;
	char peer_uri[256];             /* of the client certificate, if any */
};

struct fixture {
	struct ca *ca, *other;
	EVP_PKEY *server_key;
	X509 *server_cert;
	char pin[CA_PIN_HEX_LEN], other_pin[CA_PIN_HEX_LEN];
	char url[64];
	struct server srv;
};

static void first_uri(X509 *x, char *out, size_t len)
{
	GENERAL_NAMES *gens = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);

	out[0] = '\0';
	for (int i = 0; gens && i < sk_GENERAL_NAME_num(gens); i++) {
		const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, i);

		if (g->type == GEN_URI) {
			snprintf(out, len, "%.*s", ASN1_STRING_length(g->d.uniformResourceIdentifier),
			         (const char *)ASN1_STRING_get0_data(g->d.uniformResourceIdentifier));
			break;
		}
	}
	GENERAL_NAMES_free(gens);
}

static void *server_main(void *arg)
{
	static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
	                             "ETag: \"7\"\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
	struct server *s = arg;
	int fd = accept(s->lfd, NULL, NULL);
	SSL *ssl;

	if (fd < 0)
		return NULL;
	if (s->silent) {
		char b[64];

		while (recv(fd, b, sizeof(b), 0) > 0)
			;
		close(fd);
		return NULL;
	}
	ssl = SSL_new(s->ctx);
	SSL_set_fd(ssl, fd);
	if (SSL_accept(ssl) == 1) {
		X509 *peer = SSL_get0_peer_certificate(ssl);

		if (peer)
			first_uri(peer, s->peer_uri, sizeof(s->peer_uri));
		for (;;) {
			int n = SSL_read(ssl, s->got + s->got_len, (int)(sizeof(s->got) - 1 - s->got_len));
			char *end;

			if (n <= 0)
				break;
			s->got_len += (size_t)n;
			s->got[s->got_len] = '\0';
			end = strstr(s->got, "\r\n\r\n");
			if (end) {
				const char *cl = strstr(s->got, "Content-Length: ");
				size_t want = cl ? (size_t)atoi(cl + 16) : 0;

				if (s->got_len >= (size_t)(end + 4 - s->got) + want)
					break;
			}
		}
		if (s->got_len)
			SSL_write(ssl, answer, (int)sizeof(answer) - 1);
		SSL_shutdown(ssl);
	}
	ERR_clear_error();
	SSL_free(ssl);
	close(fd);
	return NULL;
}

/* Starts the server; require_client: a client certificate of the root is required. */
static void server_start(struct fixture *f, bool silent, bool require_client)
{
	struct server *s = &f->srv;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);

	memset(s, 0, sizeof(*s));
	s->silent = silent;
	s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(s->lfd >= 0);
	assert_int_equal(bind(s->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(s->lfd, 4), 0);
	assert_int_equal(getsockname(s->lfd, (struct sockaddr *)&a, &al), 0);
	s->port = ntohs(a.sin_port);
	snprintf(f->url, sizeof(f->url), "https://127.0.0.1:%d", s->port);
	s->ctx = SSL_CTX_new(TLS_server_method());
	assert_non_null(s->ctx);
	SSL_CTX_set_min_proto_version(s->ctx, TLS1_3_VERSION);
	assert_int_equal(SSL_CTX_use_certificate(s->ctx, f->server_cert), 1);
	assert_int_equal(SSL_CTX_use_PrivateKey(s->ctx, f->server_key), 1);
	assert_int_equal(SSL_CTX_add1_chain_cert(s->ctx, ca_cert(f->ca)), 1);
	if (require_client) {
		assert_int_equal(X509_STORE_add_cert(SSL_CTX_get_cert_store(s->ctx), ca_cert(f->ca)), 1);
		SSL_CTX_set_verify(s->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
	}
	assert_int_equal(pthread_create(&s->th, NULL, server_main, s), 0);
}

static void server_join(struct fixture *f)
{
	pthread_join(f->srv.th, NULL);
	close(f->srv.lfd);
	SSL_CTX_free(f->srv.ctx);
	f->srv.ctx = NULL;
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	struct meshlet_err err = { { 0 }, { 0 } };
	static const char *const sans[] = { "127.0.0.1" };

	assert_non_null(f);
	assert_int_equal(ca_generate(&f->ca, TD, 0, &err), 0);
	assert_int_equal(ca_generate(&f->other, TD, 0, &err), 0);
	assert_int_equal(ca_new_key(&f->server_key), 0);
	assert_int_equal(ca_issue_server(f->ca, f->server_key, sans, 1, 3600, &f->server_cert, NULL,
	                                 &err), 0);
	assert_int_equal(ca_pin_sha256(ca_cert(f->ca), f->pin), 0);
	assert_int_equal(ca_pin_sha256(ca_cert(f->other), f->other_pin), 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	X509_free(f->server_cert);
	EVP_PKEY_free(f->server_key);
	ca_free(f->ca);
	ca_free(f->other);
	free(f);
	return 0;
}

static STACK_OF(X509) *roots_of(struct ca *ca)
{
	STACK_OF(X509) *sk = sk_X509_new_null();

	assert_non_null(sk);
	X509_up_ref(ca_cert(ca));
	sk_X509_push(sk, ca_cert(ca));
	return sk;
}

/* One POST; returns httpc_request's result, the status in *status. */
static int post(const struct httpc_opts *o, int *status, char *err)
{
	struct httpc *h = NULL;
	struct httpc_response r;
	json_t *body = json_pack("{s:s}", "csr", "x");
	int rc = httpc_new(&h, o, err);

	assert_int_equal(rc, 0);
	rc = httpc_request(h, "POST", "/v1/svid", body, NULL, 0, NULL, &r, err);
	*status = rc == 0 ? r.status : 0;
	if (rc == 0) {
		assert_true(json_is_true(json_object_get(r.json, "ok")));
		assert_string_equal(r.etag, "\"7\"");
		httpc_response_clear(&r);
	}
	json_decref(body);
	httpc_free(h);
	return rc;
}

static void test_pin_accepts_the_pinned_root(void **state)
{
	struct fixture *f = *state;
	struct httpc_opts o = { .pin_sha256 = f->pin, .expect_uri = CONTROL_ID, .token = "mlt1.x" };
	char err[HTTPC_ERR_MAX] = "";
	int status;

	server_start(f, false, false);
	o.url = f->url;
	assert_int_equal(post(&o, &status, err), 0);
	assert_int_equal(status, 200);
	server_join(f);
	assert_non_null(strstr(f->srv.got, "POST /v1/svid HTTP/1.1\r\n"));
	assert_non_null(strstr(f->srv.got, "Authorization: Bearer mlt1.x\r\n"));
}

static void test_pin_of_another_root_sends_nothing(void **state)
{
	struct fixture *f = *state;
	struct httpc_opts o = { .pin_sha256 = f->other_pin, .expect_uri = CONTROL_ID,
	                        .token = "mlt1.secret" };
	char err[HTTPC_ERR_MAX] = "";
	int status;

	server_start(f, false, false);
	o.url = f->url;
	assert_int_equal(post(&o, &status, err), HTTPC_EVERIFY);
	assert_non_null(strstr(err, "not the control the join token pins"));
	server_join(f);
	assert_int_equal(f->srv.got_len, 0);
}

static void test_pin_with_wrong_control_id_sends_nothing(void **state)
{
	struct fixture *f = *state;
	struct httpc_opts o = { .pin_sha256 = f->pin, .expect_uri = "spiffe://other.local/control",
	                        .token = "mlt1.secret" };
	char err[HTTPC_ERR_MAX] = "";
	int status;

	server_start(f, false, false);
	o.url = f->url;
	assert_int_equal(post(&o, &status, err), HTTPC_EVERIFY);
	assert_non_null(strstr(err, "spiffe://other.local/control"));
	server_join(f);
	assert_int_equal(f->srv.got_len, 0);
}

static void test_roots_and_client_certificate(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	STACK_OF(X509) *roots = roots_of(f->ca);
	EVP_PKEY *key = NULL;
	X509 *svid = NULL;
	struct httpc_opts o = { .expect_uri = CONTROL_ID };
	char err[HTTPC_ERR_MAX] = "";
	int status;

	assert_int_equal(ca_new_key(&key), 0);
	assert_int_equal(ca_issue_svid(f->ca, "orders", key, 600, &svid, NULL, &e), 0);
	o.roots = roots;
	o.cert = svid;
	o.key = key;
	server_start(f, false, true);
	o.url = f->url;
	assert_int_equal(post(&o, &status, err), 0);
	assert_int_equal(status, 200);
	server_join(f);
	assert_string_equal(f->srv.peer_uri, "spiffe://" TD "/svc/orders");
	assert_null(strstr(f->srv.got, "Authorization"));

	/* The bundle of another CA: refused, nothing sent. */
	sk_X509_pop_free(roots, X509_free);
	roots = roots_of(f->other);
	o.roots = roots;
	server_start(f, false, true);
	o.url = f->url;
	assert_int_equal(post(&o, &status, err), HTTPC_EVERIFY);
	assert_non_null(strstr(err, "does not verify against the trust bundle"));
	server_join(f);
	assert_int_equal(f->srv.got_len, 0);
	sk_X509_pop_free(roots, X509_free);
	X509_free(svid);
	EVP_PKEY_free(key);
}

struct canceller {
	struct httpc *h;
	int delay_ms;
};

static void *cancel_later(void *arg)
{
	struct canceller *c = arg;

	usleep((useconds_t)c->delay_ms * 1000);
	httpc_cancel(c->h);
	return NULL;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_cancel_interrupts_a_blocked_request(void **state)
{
	struct fixture *f = *state;
	struct httpc_opts o = { .pin_sha256 = f->pin, .expect_uri = CONTROL_ID, .timeout_ms = 20000 };
	struct httpc_response r;
	struct canceller c = { .delay_ms = 100 };
	char err[HTTPC_ERR_MAX] = "";
	pthread_t th;
	double t0;

	server_start(f, true, false);     /* never answers the handshake */
	o.url = f->url;
	assert_int_equal(httpc_new(&c.h, &o, err), 0);
	assert_int_equal(pthread_create(&th, NULL, cancel_later, &c), 0);
	t0 = now_s();
	assert_int_equal(httpc_request(c.h, "GET", "/v1/bundle", NULL, NULL, 0, NULL, &r, err),
	                 HTTPC_ECANCELED);
	assert_true(now_s() - t0 < 2.0);
	assert_non_null(strstr(err, "cancelled"));
	pthread_join(th, NULL);
	/* Sticky: later requests fail at once. */
	assert_int_equal(httpc_request(c.h, "GET", "/v1/bundle", NULL, NULL, 0, NULL, &r, err),
	                 HTTPC_ECANCELED);
	httpc_free(c.h);
	server_join(f);
}

/* ---------------------------------------------------------------- keep-alive */

/*
 * A keep-alive server in a thread: accepts up to accepts connections one
 * after the other; on each answers up to answers requests (Content-Length,
 * no Connection: close), then closes it either at once (close_idle) or
 * after reading the next request without answering it (the race a client
 * reusing a connection must survive). hang: after the first answer, reads
 * the next request and waits for the client to go away.
 */
struct ka_server {
	int lfd;
	SSL_CTX *ctx;
	pthread_t th;
	int accepts, answers;
	bool close_idle, hang;
	int n_accepted, n_requests;      /* counted by the thread */
	char last[4096];                 /* the last request line seen */
	bool saw_eof;                    /* hang: the client closed the connection */
};

/* Reads one request head (no bodies but Content-Length ones). 1, or 0 at EOF. */
static int ka_read_request(SSL *ssl, char *last, size_t len)
{
	char b[8192];
	size_t n = 0;

	for (;;) {
		int r = SSL_read(ssl, b + n, (int)(sizeof(b) - 1 - n));
		char *end;

		if (r <= 0)
			return 0;
		n += (size_t)r;
		b[n] = '\0';
		end = strstr(b, "\r\n\r\n");
		if (end) {
			const char *cl = strstr(b, "Content-Length: ");
			size_t want = cl ? (size_t)atoi(cl + 16) : 0;

			if (n >= (size_t)(end + 4 - b) + want) {
				snprintf(last, len, "%.*s", (int)strcspn(b, "\r"), b);
				return 1;
			}
		}
	}
}

static void *ka_main(void *arg)
{
	static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
	                             "Content-Length: 11\r\n\r\n{\"ok\":true}";
	struct ka_server *s = arg;

	for (int a = 0; a < s->accepts; a++) {
		int fd = accept(s->lfd, NULL, NULL);
		SSL *ssl;

		if (fd < 0)
			return NULL;
		s->n_accepted++;
		ssl = SSL_new(s->ctx);
		SSL_set_fd(ssl, fd);
		if (SSL_accept(ssl) == 1) {
			for (int i = 0; i < s->answers && ka_read_request(ssl, s->last, sizeof(s->last)); i++) {
				s->n_requests++;
				SSL_write(ssl, answer, (int)sizeof(answer) - 1);
			}
			if (s->hang) {
				char b[256];

				if (ka_read_request(ssl, s->last, sizeof(s->last)))
					s->n_requests++;
				while (SSL_read(ssl, b, sizeof(b)) > 0)
					;
				s->saw_eof = true;
			} else if (!s->close_idle && ka_read_request(ssl, s->last, sizeof(s->last))) {
				s->n_requests++;        /* read, never answered */
			}
		}
		ERR_clear_error();
		SSL_free(ssl);
		close(fd);
	}
	return NULL;
}

static void ka_start(struct fixture *f, struct ka_server *s)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);

	s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(s->lfd >= 0);
	assert_int_equal(bind(s->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(s->lfd, 4), 0);
	assert_int_equal(getsockname(s->lfd, (struct sockaddr *)&a, &al), 0);
	snprintf(f->url, sizeof(f->url), "https://127.0.0.1:%d", ntohs(a.sin_port));
	s->ctx = SSL_CTX_new(TLS_server_method());
	assert_non_null(s->ctx);
	SSL_CTX_set_min_proto_version(s->ctx, TLS1_3_VERSION);
	SSL_CTX_set_num_tickets(s->ctx, 0);
	assert_int_equal(SSL_CTX_use_certificate(s->ctx, f->server_cert), 1);
	assert_int_equal(SSL_CTX_use_PrivateKey(s->ctx, f->server_key), 1);
	assert_int_equal(SSL_CTX_add1_chain_cert(s->ctx, ca_cert(f->ca)), 1);
	assert_int_equal(pthread_create(&s->th, NULL, ka_main, s), 0);
}

static void ka_join(struct ka_server *s)
{
	pthread_join(s->th, NULL);
	close(s->lfd);
	SSL_CTX_free(s->ctx);
}

static struct httpc *ka_client(struct fixture *f, int timeout_ms)
{
	struct httpc_opts o = { .pin_sha256 = f->pin, .expect_uri = CONTROL_ID, .url = f->url,
	                        .timeout_ms = timeout_ms };
	char err[HTTPC_ERR_MAX] = "";
	struct httpc *h = NULL;

	assert_int_equal(httpc_new(&h, &o, err), 0);
	httpc_set_keepalive(h, true);
	return h;
}

/* One request on h; returns httpc_request's result and checks a 200. */
static int ka_call(struct httpc *h, const char *method, char *err)
{
	struct httpc_response r;
	json_t *body = strcmp(method, "POST") == 0 ? json_pack("{s:i}", "n", 1) : NULL;
	int rc = httpc_request(h, method, "/v1/config", body, NULL, 0, NULL, &r, err);

	json_decref(body);
	if (rc == 0) {
		assert_int_equal(r.status, 200);
		assert_true(json_is_true(json_object_get(r.json, "ok")));
		httpc_response_clear(&r);
	}
	return rc;
}

static void test_keepalive_reuses_one_connection(void **state)
{
	struct fixture *f = *state;
	struct ka_server s = { .accepts = 1, .answers = 3, .close_idle = true };
	char err[HTTPC_ERR_MAX] = "";
	struct httpc *h;

	ka_start(f, &s);
	h = ka_client(f, 5000);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(ka_call(h, "POST", err), 0);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(httpc_connections(h), 1);
	httpc_free(h);
	ka_join(&s);
	assert_int_equal(s.n_accepted, 1);
	assert_int_equal(s.n_requests, 3);
}

static void test_keepalive_server_closes_between_requests(void **state)
{
	struct fixture *f = *state;
	struct ka_server s = { .accepts = 2, .answers = 1, .close_idle = true };
	char err[HTTPC_ERR_MAX] = "";
	struct httpc *h;

	ka_start(f, &s);
	h = ka_client(f, 5000);
	assert_int_equal(ka_call(h, "GET", err), 0);
	usleep(100 * 1000);             /* the server's close has arrived */
	/* Even a POST goes: the closed connection is noticed before sending. */
	assert_int_equal(ka_call(h, "POST", err), 0);
	assert_int_equal(httpc_connections(h), 2);
	httpc_free(h);
	ka_join(&s);
	assert_int_equal(s.n_requests, 2);
}

static void test_keepalive_retries_only_what_is_safe(void **state)
{
	struct fixture *f = *state;
	struct ka_server s = { .accepts = 2, .answers = 1 };
	char err[HTTPC_ERR_MAX] = "";
	struct httpc *h;

	/* A GET the server read but dropped on the kept connection: sent
	 * again on a new one, answered there. */
	ka_start(f, &s);
	h = ka_client(f, 5000);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(httpc_connections(h), 2);
	httpc_free(h);
	ka_join(&s);
	assert_int_equal(s.n_accepted, 2);
	assert_int_equal(s.n_requests, 3);

	/* A POST in the same case is not sent twice: the caller learns. */
	memset(&s, 0, sizeof(s));
	s.accepts = 1;
	s.answers = 1;
	ka_start(f, &s);
	h = ka_client(f, 5000);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(ka_call(h, "POST", err), HTTPC_ECONNECT);
	assert_true(err[0] != '\0');
	assert_int_equal(httpc_connections(h), 1);
	httpc_free(h);
	ka_join(&s);
	assert_int_equal(s.n_requests, 2);
	assert_non_null(strstr(s.last, "POST /v1/config"));

	/* Without keep-alive: Connection: close, one connection per request. */
	memset(&s, 0, sizeof(s));
	s.accepts = 2;
	s.answers = 1;
	s.close_idle = true;
	ka_start(f, &s);
	h = ka_client(f, 5000);
	httpc_set_keepalive(h, false);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(ka_call(h, "GET", err), 0);
	assert_int_equal(httpc_connections(h), 2);
	httpc_free(h);
	ka_join(&s);
}

static void test_keepalive_cancel_drops_the_connection(void **state)
{
	struct fixture *f = *state;
	struct ka_server s = { .accepts = 1, .answers = 1, .hang = true };
	struct canceller c = { .delay_ms = 200 };
	char err[HTTPC_ERR_MAX] = "";
	pthread_t th;
	double t0;

	ka_start(f, &s);
	c.h = ka_client(f, 20000);
	assert_int_equal(ka_call(c.h, "GET", err), 0);
	assert_int_equal(pthread_create(&th, NULL, cancel_later, &c), 0);
	t0 = now_s();
	/* The long poll on the kept connection never gets an answer. */
	assert_int_equal(ka_call(c.h, "GET", err), HTTPC_ECANCELED);
	assert_true(now_s() - t0 < 2.0);
	pthread_join(th, NULL);
	/* The server sees the connection go away before the client is freed. */
	for (int i = 0; i < 100 && !s.saw_eof; i++)
		usleep(20 * 1000);
	assert_true(s.saw_eof);
	assert_int_equal(httpc_connections(c.h), 1);
	httpc_free(c.h);
	ka_join(&s);
	assert_int_equal(s.n_requests, 2);
}

static void test_options(void **state)
{
	struct fixture *f = *state;
	STACK_OF(X509) *roots = roots_of(f->ca);
	struct httpc *h = NULL;
	char err[HTTPC_ERR_MAX];
	EVP_PKEY *key = NULL;
	struct httpc_opts none = { .url = "https://127.0.0.1:1" };
	struct httpc_opts two = { .url = "https://127.0.0.1:1", .roots = roots, .pin_sha256 = f->pin,
	                          .expect_uri = CONTROL_ID };
	struct httpc_opts upper = { .url = "https://127.0.0.1:1", .expect_uri = CONTROL_ID,
	                            .pin_sha256 = "ABCDEF" };
	struct httpc_opts no_id = { .url = "https://127.0.0.1:1", .roots = roots };
	struct httpc_opts key_only = { .url = "https://127.0.0.1:1", .roots = roots,
	                               .expect_uri = CONTROL_ID };
	struct httpc_opts plain = { .url = "http://127.0.0.1:1", .roots = roots,
	                            .expect_uri = CONTROL_ID };
	struct httpc_opts ok = { .url = "https://127.0.0.1:1/base/", .roots = roots,
	                         .expect_uri = CONTROL_ID };
	char out[64] = "/v1/policies/";

	assert_int_equal(ca_new_key(&key), 0);
	key_only.key = key;
	assert_int_equal(httpc_new(&h, &none, err), HTTPC_EUSAGE);
	assert_int_equal(httpc_new(&h, &two, err), HTTPC_EUSAGE);
	assert_int_equal(httpc_new(&h, &upper, err), HTTPC_EUSAGE);
	assert_non_null(strstr(err, "64 lowercase hex"));
	assert_int_equal(httpc_new(&h, &no_id, err), HTTPC_EUSAGE);
	assert_int_equal(httpc_new(&h, &key_only, err), HTTPC_EUSAGE);
	assert_int_equal(httpc_new(&h, &plain, err), HTTPC_EUSAGE);
	assert_null(h);
	assert_int_equal(httpc_new(&h, &ok, err), 0);
	httpc_free(h);
	httpc_free(NULL);
	assert_int_equal(httpc_escape(out, sizeof(out), "a b/c"), 0);
	assert_string_equal(out, "/v1/policies/a%20b%2Fc");
	EVP_PKEY_free(key);
	sk_X509_pop_free(roots, X509_free);
}

/* ca_make_csr -> ca_csr_check -> ca_issue_svid -> tls_material_from_pem: the join. */
static void test_join_building_blocks(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	EVP_PKEY *key = NULL, *pub = NULL, *other = NULL;
	struct tls_material *m = NULL;
	const char *revoked[] = { "0A:BC", "ff", "00012" };
	char *csr = NULL, *cert_pem, *bundle_pem;
	X509 *svid = NULL;

	assert_int_equal(ca_new_key(&key), 0);
	assert_int_equal(ca_make_csr(key, "orders", &csr, &e), 0);
	assert_non_null(strstr(csr, "BEGIN CERTIFICATE REQUEST"));
	assert_int_equal(ca_make_csr(key, "Not_A_Service", &cert_pem, &e), -EINVAL);
	assert_int_equal(ca_csr_check(csr, strlen(csr), &pub, &e), 0);
	assert_int_equal(ca_issue_svid(f->ca, "orders", pub, 600, &svid, NULL, &e), 0);
	cert_pem = ca_pem_encode(&svid, 1);
	bundle_pem = ca_pem_encode((X509 *const[]){ ca_cert(f->ca) }, 1);
	assert_int_equal(tls_material_from_pem(cert_pem, key, bundle_pem, revoked, 3, TD, &m, &e), 0);
	assert_string_equal(m->id->uri, "spiffe://" TD "/svc/orders");
	assert_int_equal(m->n_revoked, 3);
	assert_string_equal(m->revoked[0], "12");
	assert_string_equal(m->revoked[1], "abc");
	assert_string_equal(m->revoked[2], "ff");
	assert_true(m->not_after > time(NULL));
	tls_material_free(m);
	/* Another key, another trust domain, garbage: refused with the field named. */
	assert_int_equal(ca_new_key(&other), 0);
	assert_int_equal(tls_material_from_pem(cert_pem, other, bundle_pem, NULL, 0, TD, &m, &e),
	                 -EINVAL);
	assert_string_equal(e.path, "key");
	assert_int_equal(tls_material_from_pem(cert_pem, key, bundle_pem, NULL, 0, "other.local",
	                                       &m, &e), -EINVAL);
	assert_string_equal(e.path, "cert");
	assert_int_equal(tls_material_from_pem(cert_pem, key, "junk", NULL, 0, TD, &m, &e), -EINVAL);
	assert_string_equal(e.path, "bundle");
	assert_int_equal(tls_material_from_pem(cert_pem, key, bundle_pem, (const char *[]){ "xyz" },
	                                       1, TD, &m, &e), -EINVAL);
	assert_string_equal(e.path, "revoked");
	free(csr);
	free(cert_pem);
	free(bundle_pem);
	X509_free(svid);
	EVP_PKEY_free(key);
	EVP_PKEY_free(pub);
	EVP_PKEY_free(other);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_pin_accepts_the_pinned_root, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pin_of_another_root_sends_nothing, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pin_with_wrong_control_id_sends_nothing, setup,
		                                teardown),
		cmocka_unit_test_setup_teardown(test_roots_and_client_certificate, setup, teardown),
		cmocka_unit_test_setup_teardown(test_cancel_interrupts_a_blocked_request, setup, teardown),
		cmocka_unit_test_setup_teardown(test_keepalive_reuses_one_connection, setup, teardown),
		cmocka_unit_test_setup_teardown(test_keepalive_server_closes_between_requests, setup,
		                                teardown),
		cmocka_unit_test_setup_teardown(test_keepalive_retries_only_what_is_safe, setup,
		                                teardown),
		cmocka_unit_test_setup_teardown(test_keepalive_cancel_drops_the_connection, setup,
		                                teardown),
		cmocka_unit_test_setup_teardown(test_options, setup, teardown),
		cmocka_unit_test_setup_teardown(test_join_building_blocks, setup, teardown),
	};

	signal(SIGPIPE, SIG_IGN);
	if (tls_init() < 0)
		return 1;
	return cmocka_run_group_tests(tests, NULL, NULL);
}
