/*
 * Unit tests for lib/tlsio.c, the blocking I/O under lib/httpc.c and
 * lib/etcd.c, against real sockets on 127.0.0.1 and a real TLS server in
 * a thread: connecting (refused, a name that does not resolve), reading
 * and writing in plain TCP and TLS, the deadline and both ways of
 * cancelling while blocked, a peer that closes, and a peer that speaks
 * garbage instead of TLS.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "meshlet/ca.h"
#include "meshlet/tlsio.h"

/* What the peer in the thread does with the one connection it accepts. */
enum peer_mode {
	PEER_ECHO,       /* reads a line, writes it back, closes */
	PEER_SILENT,     /* reads and says nothing until the client goes */
	PEER_GARBAGE,    /* answers anything with bytes that are not TLS */
	PEER_CLOSE,      /* closes at once */
};

struct peer {
	int lfd, port;
	enum peer_mode mode;
	SSL_CTX *ctx;                  /* TLS, or NULL: plain TCP */
	pthread_t th;
};

static struct ca *test_ca;
static EVP_PKEY *test_key;
static X509 *test_cert;

static void peer_talk(struct peer *p, int fd, SSL *ssl)
{
	char b[256];
	int n = 0;

	if (p->mode == PEER_CLOSE)
		return;
	if (p->mode == PEER_GARBAGE) {
		(void)!recv(fd, b, sizeof(b), 0);
		(void)!send(fd, "HTTP/1.1 400 No\r\n\r\n", 19, MSG_NOSIGNAL);
		return;
	}
	if (ssl && SSL_accept(ssl) != 1)
		return;
	if (p->mode == PEER_SILENT) {
		while ((ssl ? SSL_read(ssl, b, sizeof(b)) : (int)recv(fd, b, sizeof(b), 0)) > 0)
			;
		return;
	}
	while (n < (int)sizeof(b) - 1 && (n == 0 || b[n - 1] != '\n')) {
		int r = ssl ? SSL_read(ssl, b + n, (int)sizeof(b) - 1 - n)
		            : (int)recv(fd, b + n, sizeof(b) - 1 - (size_t)n, 0);
		if (r <= 0)
			return;
		n += r;
	}
	if (ssl) {
		SSL_write(ssl, b, n);
		SSL_shutdown(ssl);
	} else {
		(void)!send(fd, b, (size_t)n, MSG_NOSIGNAL);
	}
}

static void *peer_main(void *arg)
{
	struct peer *p = arg;
	int fd = accept(p->lfd, NULL, NULL);
	SSL *ssl = NULL;

	if (fd < 0)
		return NULL;
	if (p->ctx && p->mode != PEER_GARBAGE && p->mode != PEER_CLOSE) {
		ssl = SSL_new(p->ctx);
		SSL_set_fd(ssl, fd);
	}
	peer_talk(p, fd, ssl);
	SSL_free(ssl);
	ERR_clear_error();
	close(fd);
	return NULL;
}

static void peer_start(struct peer *p, enum peer_mode mode, bool tls)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);

	memset(p, 0, sizeof(*p));
	p->mode = mode;
	p->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(p->lfd >= 0);
	assert_int_equal(bind(p->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(p->lfd, 4), 0);
	assert_int_equal(getsockname(p->lfd, (struct sockaddr *)&a, &al), 0);
	p->port = ntohs(a.sin_port);
	if (tls) {
		p->ctx = SSL_CTX_new(TLS_server_method());
		assert_non_null(p->ctx);
		assert_int_equal(SSL_CTX_use_certificate(p->ctx, test_cert), 1);
		assert_int_equal(SSL_CTX_use_PrivateKey(p->ctx, test_key), 1);
	}
	assert_int_equal(pthread_create(&p->th, NULL, peer_main, p), 0);
}

static void peer_join(struct peer *p)
{
	pthread_join(p->th, NULL);
	close(p->lfd);
	SSL_CTX_free(p->ctx);
}

/* A client connection to p; with TLS verified against the test CA. */
static void client_open(struct tlsio *io, const struct peer *p, int timeout_ms, SSL_CTX **cctx)
{
	char port[8], why[128] = "";

	tlsio_init(io);
	io->deadline = tlsio_now_ms() + timeout_ms;
	snprintf(port, sizeof(port), "%d", p->port);
	assert_int_equal(tlsio_connect(io, "127.0.0.1", port, 0, why, sizeof(why)), 0);
	*cctx = NULL;
	if (!p->ctx)
		return;
	*cctx = SSL_CTX_new(TLS_client_method());
	assert_non_null(*cctx);
	assert_int_equal(X509_STORE_add_cert(SSL_CTX_get_cert_store(*cctx), ca_cert(test_ca)), 1);
	SSL_CTX_set_verify(*cctx, SSL_VERIFY_PEER, NULL);
	io->ssl = SSL_new(*cctx);
	assert_non_null(io->ssl);
	assert_int_equal(SSL_set_fd(io->ssl, io->fd), 1);
}

static void echo_round_trip(bool tls)
{
	struct peer p;
	struct tlsio io;
	SSL_CTX *cctx;
	char got[64] = "";
	size_t sent = 0;
	ssize_t n, total = 0;

	peer_start(&p, PEER_ECHO, tls);
	client_open(&io, &p, 5000, &cctx);
	if (tls)
		assert_int_equal(tlsio_handshake(&io), 1);
	assert_int_equal(tlsio_write_all(&io, "hello tlsio\n", 12, &sent), 0);
	assert_int_equal(sent, 12);
	while ((n = tlsio_read(&io, got + total, sizeof(got) - 1 - (size_t)total)) > 0)
		total += n;
	assert_int_equal(n, 0);             /* the peer's clean end */
	assert_string_equal(got, "hello tlsio\n");
	tlsio_close(&io, true);
	assert_int_equal(io.fd, -1);
	assert_null(io.ssl);
	SSL_CTX_free(cctx);
	peer_join(&p);
}

static void test_plain_round_trip(void **state)
{
	(void)state;
	echo_round_trip(false);
}

static void test_tls_round_trip(void **state)
{
	(void)state;
	echo_round_trip(true);
}

static void test_connect_refused_and_unresolvable(void **state)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	struct tlsio io;
	char port[8], why[128] = "";
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	(void)state;
	/* A port bound but never listened on: refused. */
	assert_true(s >= 0);
	assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(getsockname(s, (struct sockaddr *)&a, &al), 0);
	snprintf(port, sizeof(port), "%d", ntohs(a.sin_port));
	tlsio_init(&io);
	io.deadline = tlsio_now_ms() + 2000;
	assert_int_equal(tlsio_connect(&io, "127.0.0.1", port, 0, why, sizeof(why)), -ECONNREFUSED);
	assert_non_null(strstr(why, "refused"));
	assert_int_equal(io.fd, -1);
	/* A service name that does not exist fails in the resolver, at once. */
	assert_int_equal(tlsio_connect(&io, "127.0.0.1", "no-such-service-x", 0, why, sizeof(why)),
	                 -EHOSTUNREACH);
	assert_true(why[0] != '\0');
	assert_int_equal(io.fd, -1);
	close(s);
}

/* A peer that never answers: the read ends at the deadline, not later. */
static void test_deadline_bounds_a_silent_peer(void **state)
{
	struct peer p;
	struct tlsio io;
	SSL_CTX *cctx;
	char b[16];
	int64_t t0;

	(void)state;
	peer_start(&p, PEER_SILENT, true);
	client_open(&io, &p, 5000, &cctx);
	assert_int_equal(tlsio_handshake(&io), 1);
	io.deadline = tlsio_now_ms() + 300;
	t0 = tlsio_now_ms();
	assert_int_equal(tlsio_read(&io, b, sizeof(b)), -ETIMEDOUT);
	assert_true(tlsio_now_ms() - t0 >= 250);
	assert_true(tlsio_now_ms() - t0 < 2000);
	tlsio_close(&io, false);
	SSL_CTX_free(cctx);
	peer_join(&p);
}

static void *cancel_soon(void *arg)
{
	int *fd = arg;
	uint64_t one = 1;

	usleep(150 * 1000);
	(void)!write(*fd, &one, sizeof(one));
	return NULL;
}

/* A read blocked without a deadline wakes when the cancel fd becomes
 * readable; a set flag stops any wait before it starts. */
static void test_cancel_wakes_a_blocked_read(void **state)
{
	struct peer p;
	struct tlsio io;
	SSL_CTX *cctx;
	atomic_bool flag = false;
	int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	pthread_t th;
	char b[16];
	int64_t t0;

	(void)state;
	assert_true(efd >= 0);
	peer_start(&p, PEER_SILENT, false);
	client_open(&io, &p, 5000, &cctx);
	io.deadline = 0;
	io.cancel_fd = efd;
	io.cancelled = &flag;
	assert_int_equal(pthread_create(&th, NULL, cancel_soon, &efd), 0);
	t0 = tlsio_now_ms();
	assert_int_equal(tlsio_read(&io, b, sizeof(b)), -ECANCELED);
	assert_true(tlsio_now_ms() - t0 < 3000);
	pthread_join(th, NULL);
	/* The flag alone, with the fd drained and time left. */
	(void)!read(efd, b, 8);
	io.deadline = tlsio_now_ms() + 5000;
	atomic_store(&flag, true);
	assert_int_equal(tlsio_wait(&io, POLLIN), -ECANCELED);
	assert_int_equal(tlsio_write_all(&io, "x", 1, NULL), 0);   /* writing needs no wait */
	tlsio_close(&io, false);
	close(efd);
	peer_join(&p);
}

/* Hostile peers: garbage in place of a TLS handshake is a TLS error (the
 * reason in OpenSSL's queue); a peer that closes at once is the end, and
 * a write after it fails instead of raising SIGPIPE. */
static void test_garbage_and_early_close(void **state)
{
	struct peer p;
	struct tlsio io;
	SSL_CTX *cctx;
	char b[16];
	int r;

	(void)state;
	peer_start(&p, PEER_GARBAGE, true);
	client_open(&io, &p, 3000, &cctx);
	assert_int_equal(tlsio_handshake(&io), -EPROTO);
	assert_true(ERR_peek_error() != 0);
	tlsio_close(&io, false);
	assert_int_equal(ERR_peek_error(), 0);
	SSL_CTX_free(cctx);
	peer_join(&p);

	peer_start(&p, PEER_CLOSE, false);
	client_open(&io, &p, 3000, &cctx);
	peer_join(&p);
	assert_int_equal(tlsio_read(&io, b, sizeof(b)), 0);
	r = 0;
	for (int i = 0; i < 50 && r == 0; i++)
		r = tlsio_write_all(&io, "x", 1, NULL);
	assert_true(r == -EPIPE || r == -ECONNRESET);
	tlsio_close(&io, false);
}

static int group_setup(void **state)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	static const char *const sans[] = { "127.0.0.1" };

	(void)state;
	assert_int_equal(ca_generate(&test_ca, "tlsio.test", 0, &err), 0);
	assert_int_equal(ca_new_key(&test_key), 0);
	assert_int_equal(ca_issue_server(test_ca, test_key, sans, 1, 3600, &test_cert, NULL, &err), 0);
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	X509_free(test_cert);
	EVP_PKEY_free(test_key);
	ca_free(test_ca);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_plain_round_trip),
		cmocka_unit_test(test_tls_round_trip),
		cmocka_unit_test(test_connect_refused_and_unresolvable),
		cmocka_unit_test(test_deadline_bounds_a_silent_peer),
		cmocka_unit_test(test_cancel_wakes_a_blocked_read),
		cmocka_unit_test(test_garbage_and_early_close),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
