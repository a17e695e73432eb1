/*
 * tls_test: credentials loading and the SVID checks of the verify callback,
 * through real TLS 1.3 handshakes between our server and client contexts
 * over in-memory BIO pairs (no sockets).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>

#include "meshlet/ca.h"
#include "meshlet/metrics.h"
#include "meshlet/tls.h"

#define TD "mesh.local"
#define HOUR 3600

struct fixture {
	char dir[64];
	struct ca *ca;        /* the mesh's root */
	struct ca *other;     /* an unrelated root of the same trust domain */
	struct ca *foreign;   /* a root of another trust domain */
};

static void write_file(const char *path, const char *text, mode_t mode)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	assert_int_equal(fputs(text, f) >= 0, 1);
	fclose(f);
	chmod(path, mode);
}

static char *path_in(const struct fixture *fx, const char *name)
{
	static char buf[4][128];
	static int next;
	char *p = buf[next++ % 4];

	snprintf(p, sizeof(buf[0]), "%s/%s", fx->dir, name);
	return p;
}

/* Issues an SVID for service from ca, writes NAME.pem/NAME.key; returns the serial. */
static void issue(const struct fixture *fx, const struct ca *ca, const char *service,
                  const char *name, char *serial)
{
	EVP_PKEY *key = NULL;
	X509 *cert = NULL;
	char file[160], serial_buf[CA_SERIAL_HEX_MAX];
	char *pem;
	BIO *bio;
	BUF_MEM *mem;

	assert_int_equal(ca_new_key(&key), 0);
	assert_int_equal(ca_issue_svid(ca, service, key, HOUR, &cert,
	                               serial ? serial : serial_buf, NULL), 0);
	pem = ca_pem_encode(&cert, 1);
	assert_non_null(pem);
	snprintf(file, sizeof(file), "%s/%s.pem", fx->dir, name);
	write_file(file, pem, 0644);
	free(pem);
	bio = BIO_new(BIO_s_mem());
	assert_int_equal(PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL), 1);
	BIO_write(bio, "", 1);
	BIO_get_mem_ptr(bio, &mem);
	snprintf(file, sizeof(file), "%s/%s.key", fx->dir, name);
	write_file(file, mem->data, 0600);
	BIO_free(bio);
	X509_free(cert);
	EVP_PKEY_free(key);
}

static void write_bundle(const struct fixture *fx, const struct ca *ca, const char *name)
{
	X509 *root = ca_cert(ca);
	char *pem = ca_pem_encode(&root, 1);

	assert_non_null(pem);
	write_file(path_in(fx, name), pem, 0644);
	free(pem);
}

static int setup(void **state)
{
	struct fixture *fx = calloc(1, sizeof(*fx));

	assert_non_null(fx);
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/meshlet-tls-test-XXXXXX");
	assert_non_null(mkdtemp(fx->dir));
	assert_int_equal(tls_init(), 0);
	assert_int_equal(ca_generate(&fx->ca, TD, 24 * HOUR, NULL), 0);
	assert_int_equal(ca_generate(&fx->other, TD, 24 * HOUR, NULL), 0);
	assert_int_equal(ca_generate(&fx->foreign, "other.example", 24 * HOUR, NULL), 0);
	write_bundle(fx, fx->ca, "bundle.pem");
	write_bundle(fx, fx->other, "other-bundle.pem");
	issue(fx, fx->ca, "orders", "orders", NULL);
	issue(fx, fx->ca, "frontend", "frontend", NULL);
	issue(fx, fx->other, "frontend", "impostor", NULL);
	issue(fx, fx->foreign, "frontend", "foreign", NULL);
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *fx = *state;
	char cmd[128];

	ca_free(fx->ca);
	ca_free(fx->other);
	ca_free(fx->foreign);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->dir);
	assert_int_equal(system(cmd), 0);
	free(fx);
	return 0;
}

static struct tls_material *load(const struct fixture *fx, const char *name, const char *bundle)
{
	struct tls_material *m = NULL;
	struct meshlet_err err;
	char cert[160], key[160];

	snprintf(cert, sizeof(cert), "%s/%s.pem", fx->dir, name);
	snprintf(key, sizeof(key), "%s/%s.key", fx->dir, name);
	assert_int_equal(tls_material_load(cert, key, path_in(fx, bundle), TD, &m, &err), 0);
	return m;
}

static const struct tls_options opts = { .trust_domain = TD, .min_version = TLS1_3_VERSION };

/* Result of one in-memory handshake. */
struct outcome {
	bool ok;
	int server_reason, client_reason;
	char server_saw[SPIFFE_ID_MAX + 1];
};

/* Pumps both ends through a BIO pair until both finish or one fails. */
static struct outcome handshake(struct tls_material *server, struct tls_material *client,
                                const char *client_expects)
{
	struct outcome o = { 0 };
	struct tls_verify sv = { 0 }, cv = { .expect_id = client_expects };
	SSL_CTX *sctx = tls_server_ctx(server, &opts, NULL);
	SSL_CTX *cctx = tls_client_ctx(client, &opts, NULL);
	SSL *s, *c;
	BIO *sb, *cb;
	int sr = 0, cr = 0;

	assert_non_null(sctx);
	assert_non_null(cctx);
	s = SSL_new(sctx);
	c = SSL_new(cctx);
	assert_int_equal(BIO_new_bio_pair(&sb, 0, &cb, 0), 1);
	SSL_set_bio(s, sb, sb);
	SSL_set_bio(c, cb, cb);
	tls_attach_verify(s, &sv);
	tls_attach_verify(c, &cv);
	SSL_set_accept_state(s);
	SSL_set_connect_state(c);
	for (int i = 0; i < 20 && (sr != 1 || cr != 1); i++) {
		if (cr != 1)
			cr = SSL_do_handshake(c);
		if (sr != 1)
			sr = SSL_do_handshake(s);
		if ((cr <= 0 && SSL_get_error(c, cr) != SSL_ERROR_WANT_READ) ||
		    (sr <= 0 && SSL_get_error(s, sr) != SSL_ERROR_WANT_READ))
			break;
	}
	/* TLS 1.3: the server judges the client's certificate after the client finished. */
	o.ok = sr == 1 && cr == 1;
	if (sr != 1)
		o.server_reason = tls_failure_reason(s, &sv);
	if (cr != 1)
		o.client_reason = tls_failure_reason(c, &cv);
	if (o.ok)
		assert_int_equal(tls_peer_id(s, o.server_saw, sizeof(o.server_saw)), 0);
	ERR_clear_error();
	SSL_free(s);
	SSL_free(c);
	SSL_CTX_free(sctx);
	SSL_CTX_free(cctx);
	return o;
}

static void test_allowed_handshake(void **state)
{
	struct fixture *fx = *state;
	struct tls_material *orders = load(fx, "orders", "bundle.pem");
	struct tls_material *frontend = load(fx, "frontend", "bundle.pem");
	struct outcome o = handshake(orders, frontend, "spiffe://" TD "/svc/orders");

	assert_true(o.ok);
	assert_string_equal(o.server_saw, "spiffe://" TD "/svc/frontend");
	assert_string_equal(orders->id->uri, "spiffe://" TD "/svc/orders");
	assert_true(orders->not_after > 0);
	tls_material_free(orders);
	tls_material_free(frontend);
}

static void test_upstream_with_wrong_identity(void **state)
{
	struct fixture *fx = *state;
	struct tls_material *orders = load(fx, "orders", "bundle.pem");
	struct tls_material *frontend = load(fx, "frontend", "bundle.pem");
	struct outcome o = handshake(orders, frontend, "spiffe://" TD "/svc/payments");

	assert_false(o.ok);
	assert_int_equal(o.client_reason, ID_WRONG_IDENTITY);
	tls_material_free(orders);
	tls_material_free(frontend);
}

static void test_client_from_other_ca(void **state)
{
	struct fixture *fx = *state;
	struct tls_material *orders = load(fx, "orders", "bundle.pem");
	/* Trusts both roots, so its own handshake side is happy; the server is not. */
	struct tls_material *impostor = load(fx, "impostor", "other-bundle.pem");

	sk_X509_push(impostor->roots, X509_dup(ca_cert(fx->ca)));
	struct outcome o = handshake(orders, impostor, "spiffe://" TD "/svc/orders");

	assert_false(o.ok);
	assert_int_equal(o.server_reason, TLS_FAIL_UNTRUSTED);
	tls_material_free(orders);
	tls_material_free(impostor);
}

static void test_revoked_client(void **state)
{
	struct fixture *fx = *state;
	char serial[CA_SERIAL_HEX_MAX];
	struct tls_material *orders, *revoked;

	issue(fx, fx->ca, "frontend", "revoked", serial);
	orders = load(fx, "orders", "bundle.pem");
	revoked = load(fx, "revoked", "bundle.pem");
	orders->revoked = calloc(1, sizeof(char *));
	assert_non_null(orders->revoked);
	orders->revoked[0] = strdup(serial);
	orders->n_revoked = 1;
	struct outcome o = handshake(orders, revoked, "spiffe://" TD "/svc/orders");

	assert_false(o.ok);
	assert_int_equal(o.server_reason, ID_REVOKED);
	tls_material_free(orders);
	tls_material_free(revoked);
}

static void test_material_refusals(void **state)
{
	struct fixture *fx = *state;
	struct tls_material *m = NULL;
	struct meshlet_err err;

	/* Key of another certificate. */
	assert_int_equal(tls_material_load(path_in(fx, "orders.pem"), path_in(fx, "frontend.key"),
	                                   path_in(fx, "bundle.pem"), TD, &m, &err), -EINVAL);
	assert_non_null(strstr(err.message, "does not match"));
	/* Missing file. */
	assert_int_equal(tls_material_load(path_in(fx, "nope.pem"), path_in(fx, "orders.key"),
	                                   path_in(fx, "bundle.pem"), TD, &m, &err), -EINVAL);
	assert_non_null(strstr(err.message, "nope.pem"));
	/* A bundle without certificates. */
	write_file(path_in(fx, "empty.pem"), "not pem\n", 0644);
	assert_int_equal(tls_material_load(path_in(fx, "orders.pem"), path_in(fx, "orders.key"),
	                                   path_in(fx, "empty.pem"), TD, &m, &err), -EINVAL);
	assert_non_null(strstr(err.message, "no PEM certificate"));
	/* Our own certificate is of another trust domain. */
	assert_int_equal(tls_material_load(path_in(fx, "foreign.pem"), path_in(fx, "foreign.key"),
	                                   path_in(fx, "bundle.pem"), TD, &m, &err), -EINVAL);
	assert_non_null(strstr(err.message, "wrong_trust_domain"));
	assert_null(m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_allowed_handshake),
		cmocka_unit_test(test_upstream_with_wrong_identity),
		cmocka_unit_test(test_client_from_other_ca),
		cmocka_unit_test(test_revoked_client),
		cmocka_unit_test(test_material_refusals),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
