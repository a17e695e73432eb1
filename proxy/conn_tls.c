/*
 * conn_tls: a connection's mutual-TLS handshake, as the server (inbound)
 * or as the client (outbound), and the checks around it that the verify
 * callback cannot make: a resumed session's expired certificate, a peer
 * revoked while the handshake ran; the outbound session cache; the sweep
 * that closes connections whose peer a new bundle revokes.
 */
#include "conn-int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

#include "meshlet/log.h"

/*
 * The TLS socket's BIO: OpenSSL's socket BIO whose read also notes a short
 * read: the kernel had no more, which saves the EAGAIN round trip after
 * each record (one syscall in five on a keep-alive request). A method of
 * its own, not a BIO callback: a callback also runs twice around each of
 * the dozen BIO_ctrl calls OpenSSL makes per request (~7% of a keep-alive
 * request's instructions).
 */
static int bio_read(BIO *bio, char *buf, int len)
{
	int n = BIO_meth_get_read(BIO_s_socket())(bio, buf, len);
	struct conn *c = (struct conn *)BIO_get_callback_arg(bio);

	if (n < len)
		c->tls_drained = true;
	return n;
}

BIO_METHOD *conn_bio_method_new(void)
{
	const BIO_METHOD *sock = BIO_s_socket();
	/* A socket BIO to whoever looks (BIO_find_type, SSL_get_fd). */
	BIO_METHOD *m = BIO_meth_new(BIO_TYPE_SOCKET, "meshlet socket");

	if (!m || !BIO_meth_set_read(m, bio_read) ||
	    !BIO_meth_set_write(m, BIO_meth_get_write(sock)) ||
	    !BIO_meth_set_puts(m, BIO_meth_get_puts(sock)) ||
	    !BIO_meth_set_ctrl(m, BIO_meth_get_ctrl(sock)) ||
	    !BIO_meth_set_create(m, BIO_meth_get_create(sock)) ||
	    !BIO_meth_set_destroy(m, BIO_meth_get_destroy(sock))) {
		BIO_meth_free(m);
		return NULL;
	}
	return m;
}

static int ssl_attach(struct conn *c, SSL_CTX *ctx)
{
	BIO *bio;

	c->ssl = SSL_new(ctx);
	if (!c->ssl)
		return -ENOMEM;
	bio = BIO_new(c->w->bio_method);
	if (!bio)
		return -ENOMEM;
	/* Only the argument, no callback: a plain pointer, where the app
	 * data would allocate an ex_data stack per connection. */
	BIO_set_callback_arg(bio, (char *)c);
	BIO_set_fd(bio, c->tls_fd, BIO_NOCLOSE);    /* conn_close closes it */
	SSL_set_bio(c->ssl, bio, bio);
	SSL_set_app_data(c->ssl, c);
	tls_attach_verify(c->ssl, &c->verify);
	return 0;
}

/*
 * The handshake ran under c's snapshot; a newer one may revoke the peer
 * (the revocation sweep skips unfinished handshakes).
 */
static bool revoked_since(struct conn *c)
{
	struct snapshot *cur = c->w->shared->snapshot(c->w->shared->arg);
	bool revoked = cur && cur->server_ctx != c->snap->server_ctx &&
	               tls_is_revoked(cur->server_ctx, SSL_get0_peer_certificate(c->ssl));

	snapshot_unref(cur);
	return revoked;
}

static bool peer_cert_expired(SSL *ssl)
{
	X509 *peer = SSL_get0_peer_certificate(ssl);

	return !peer || X509_cmp_current_time(X509_get0_notAfter(peer)) < 0;
}

static void handshake_done(struct conn *c)
{
	char id[SPIFFE_ID_MAX + 1];

	/* A resumed session skips verification: its certificate may have expired since. */
	if (SSL_session_reused(c->ssl) && peer_cert_expired(c->ssl)) {
		conn_close(c, CR_EXPIRED_SESSION);
		return;
	}
	if (SSL_session_reused(c->ssl))
		metrics_inc(&c->w->shared->metrics->tls_resumed[c->dir]);
	if (revoked_since(c)) {
		log_info("conn %llu: the peer's certificate was revoked during the handshake",
		         (unsigned long long)c->id);
		conn_close(c, CR_REVOKED);
		return;
	}
	if (tls_peer_id(c->ssl, id, sizeof(id)) < 0 || !(c->peer = strdup(id))) {
		c->tls_failure = TLS_FAIL_NO_URI_SAN;
		conn_close(c, CR_HANDSHAKE_FAILED);
		return;
	}
	c->ready |= CONN_TLS_R | CONN_TLS_W;
	if (c->inbound)
		conn_authorize(c);
	else
		conn_relay_start(c);
}

void conn_tls_timeout(struct conn *c)
{
	c->tls_failure = TLS_FAIL_TIMEOUT;
	metrics_inc(&c->w->shared->metrics->handshake_failures[c->tls_failure]);
	/* Outbound, the app waits on a plain socket and can be answered. */
	if (c->inbound)
		conn_close(c, CR_HANDSHAKE_TIMEOUT);
	else
		c->proto->fail_early(c, 504, CR_HANDSHAKE_TIMEOUT);
}

void conn_tls_step(struct conn *c)
{
	int rc, e;

	if (conn_past_deadline(c)) {
		conn_tls_timeout(c);
		return;
	}
	rc = SSL_do_handshake(c->ssl);

	if (rc == 1) {
		handshake_done(c);
		return;
	}
	e = SSL_get_error(c->ssl, rc);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		conn_watch_tls(c, e == SSL_ERROR_WANT_READ ? EV_READ : EV_WRITE, c->deadline);
		return;
	}
	c->tls_failure = tls_failure_reason(c->ssl, &c->verify);
	metrics_inc(&c->w->shared->metrics->handshake_failures[c->tls_failure]);
	log_info("conn %llu: TLS handshake %s failed: %s", (unsigned long long)c->id,
	         c->inbound ? "from peer" : "with upstream", tls_failure_str(c->tls_failure));
	if (c->inbound)
		conn_close(c, CR_HANDSHAKE_FAILED);
	else
		c->proto->fail_early(c, 502, CR_HANDSHAKE_FAILED);
}

/*
 * The first outbound handshake of a worker under a newer snapshot takes
 * over the sessions the worker cached under the one before, when the two
 * share their TLS contexts (a reload that changed only the policy).
 */
static void adopt_sessions(struct conn *c)
{
	struct worker *w = c->w;

	if (w->sessions_from == c->snap ||
	    (w->sessions_from && w->sessions_from->version > c->snap->version))
		return;
	snapshot_adopt_sessions(c->snap, w->sessions_from, w->id);
	snapshot_unref(w->sessions_from);
	w->sessions_from = snapshot_ref(c->snap);
}

void conn_tls_connect(struct conn *c)
{
	SSL_SESSION *sess;

	c->verify.expect_id = c->tdest ? c->tdest->expect_id
	                               : c->snap->outbound[c->listener].expect_id;
	if (ssl_attach(c, c->snap->client_ctx) < 0) {
		conn_close(c, CR_INTERNAL);
		return;
	}
	SSL_set_connect_state(c->ssl);
	/* An http listener offers both; the protocol a connection speaks
	 * is still its client's (the preface, conn_proto_ops). */
	if (c->proto->per_request_policy &&
	    SSL_set_alpn_protos(c->ssl, (const unsigned char *)TLS_ALPN_HTTP,
	                        sizeof(TLS_ALPN_HTTP) - 1) != 0) {
		conn_close(c, CR_INTERNAL);
		return;
	}
	if (!c->tdest)
		adopt_sessions(c);
	sess = c->tdest ? NULL : snapshot_session(c->snap, c->listener, c->endpoint, c->w->id);
	if (sess)
		SSL_set_session(c->ssl, sess);
	conn_set_state(c, CONN_HANDSHAKE);
	conn_set_deadline(c, conn_cfg(c)->timeouts.handshake_ms);
	conn_watch_tls(c, 0, 0);    /* ends the connect timer; conn_tls_step() sets its own */
	conn_tls_step(c);
}

int conn_on_new_session(SSL *ssl, SSL_SESSION *sess)
{
	struct conn *c = SSL_get_app_data(ssl);

	if (!c || c->inbound || c->tdest)
		return 0;
	/* 1: we keep the reference; 0: OpenSSL frees it. */
	return snapshot_save_session(c->snap, c->listener, c->endpoint, c->w->id, sess) == 0;
}

void conn_tls_accept(struct conn *c)
{
	if (ssl_attach(c, c->snap->server_ctx) < 0) {
		conn_close(c, CR_INTERNAL);
		return;
	}
	SSL_set_accept_state(c->ssl);
	conn_set_state(c, CONN_HANDSHAKE);
	conn_set_deadline(c, conn_cfg(c)->timeouts.handshake_ms);
	conn_watch_tls(c, EV_READ, c->deadline);
}

void conn_close_revoked(struct worker *w, struct snapshot *s)
{
	struct conn *c = w->conns, *next;

	for (; c; c = next) {
		next = c->next;
		if (c->ssl && SSL_is_init_finished(c->ssl) &&
		    tls_is_revoked(s->server_ctx, SSL_get0_peer_certificate(c->ssl))) {
			log_info("conn %llu: closing: %s's certificate was revoked",
			         (unsigned long long)c->id, c->peer ? c->peer : "peer");
			conn_close(c, CR_REVOKED);
		}
	}
}
