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
#include <openssl/x509v3.h>

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
	enum tls_failure server_reason, client_reason;
	char server_saw[SPIFFE_ID_MAX + 1];
};

/* One enum, one name table: identity's refusals keep identity's labels. */
static void test_failure_names(void **state)
{
	bool seen[TLS_FAIL_COUNT] = { false };

	(void)state;
	assert_string_equal(tls_failure_str(TLS_FAIL_HANDSHAKE), "handshake");
	assert_string_equal(tls_failure_str(TLS_FAIL_UNTRUSTED), "untrusted");
	assert_string_equal(tls_failure_str(TLS_FAIL_EXPIRED), "expired");
	assert_string_equal(tls_failure_str(TLS_FAIL_NO_PEER_CERT), "no_peer_certificate");
	assert_string_equal(tls_failure_str(TLS_FAIL_TIMEOUT), "timeout");
	assert_string_equal(tls_failure_str(TLS_FAIL_COUNT), "unknown");
	assert_string_equal(tls_failure_str((enum tls_failure)-1), "unknown");
	assert_int_equal(tls_failure_from_identity(ID_OK), TLS_FAIL_NONE);
	for (int r = ID_OK + 1; r < ID_REASON_COUNT; r++) {
		enum tls_failure f = tls_failure_from_identity((enum identity_reason)r);

		/* each refusal its own failure, with identity's label */
		assert_int_not_equal(f, TLS_FAIL_NONE);
		assert_false(seen[f]);
		seen[f] = true;
		assert_string_equal(tls_failure_str(f), identity_reason_str((enum identity_reason)r));
	}
	/* A reason identity may add later is still a refusal. */
	assert_int_equal(tls_failure_from_identity(ID_REASON_COUNT), TLS_FAIL_HANDSHAKE);
}

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
	assert_int_equal(o.client_reason, TLS_FAIL_WRONG_IDENTITY);
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
	assert_int_equal(o.server_reason, TLS_FAIL_REVOKED);
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

static void test_material_digest(void **state)
{
	struct fixture *fx = *state;
	struct tls_material *a = load(fx, "orders", "bundle.pem");
	struct tls_material *b = load(fx, "orders", "bundle.pem");
	struct tls_material *other_bundle = load(fx, "orders", "other-bundle.pem");
	struct tls_material *other_cert = load(fx, "frontend", "bundle.pem");
	struct tls_options o12 = opts, groups = opts;
	unsigned char da[TLS_DIGEST_LEN], d[TLS_DIGEST_LEN];

	o12.min_version = TLS1_2_VERSION;
	groups.groups = "P-256";
	assert_int_equal(tls_material_digest(a, &opts, da), 0);
	/* The same files read again: the same contexts would come out. */
	assert_int_equal(tls_material_digest(b, &opts, d), 0);
	assert_memory_equal(da, d, sizeof(d));
	/* Anything a context is built from changes it. */
	assert_int_equal(tls_material_digest(other_bundle, &opts, d), 0);
	assert_memory_not_equal(da, d, sizeof(d));
	assert_int_equal(tls_material_digest(other_cert, &opts, d), 0);
	assert_memory_not_equal(da, d, sizeof(d));
	assert_int_equal(tls_material_digest(a, &o12, d), 0);
	assert_memory_not_equal(da, d, sizeof(d));
	assert_int_equal(tls_material_digest(a, &groups, d), 0);
	assert_memory_not_equal(da, d, sizeof(d));
	b->revoked = calloc(1, sizeof(char *));
	assert_non_null(b->revoked);
	b->revoked[0] = strdup("01");
	b->n_revoked = 1;
	assert_int_equal(tls_material_digest(b, &opts, d), 0);
	assert_memory_not_equal(da, d, sizeof(d));
	tls_material_free(a);
	tls_material_free(b);
	tls_material_free(other_bundle);
	tls_material_free(other_cert);
}

/* ---- the X509-SVID profile, through real handshakes ---------------------- */

/*
 * A root and leaves built here in memory, so that a leaf can lack what
 * ca_issue_svid always sets. NULL extension values are left out.
 */
struct leaf_spec {
	const char *name;
	const char *bc, *ku, *eku;
	enum tls_failure as_client, as_server;    /* the reason the other side gives; 0: accepted */
};

static void add_ext_nid(X509 *x, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX v3;
	X509_EXTENSION *ext;

	if (!value)
		return;
	X509V3_set_ctx(&v3, issuer, x, NULL, NULL, 0);
	ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
	assert_non_null(ext);
	assert_int_equal(X509_add_ext(x, ext, -1), 1);
	X509_EXTENSION_free(ext);
}

static X509 *make_signed(EVP_PKEY *key, X509 *issuer, EVP_PKEY *issuer_key, const char *san,
                         const char *bc, const char *ku, const char *eku, long serial)
{
	X509 *x = X509_new();

	assert_non_null(x);
	assert_int_equal(X509_set_version(x, X509_VERSION_3), 1);
	assert_int_equal(ASN1_INTEGER_set(X509_get_serialNumber(x), serial), 1);
	assert_int_equal(X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC,
	                 (const unsigned char *)(san ? "leaf" : "root"), -1, -1, 0), 1);
	assert_int_equal(X509_set_issuer_name(x, X509_get_subject_name(issuer ? issuer : x)), 1);
	assert_non_null(X509_gmtime_adj(X509_getm_notBefore(x), -60));
	assert_non_null(X509_gmtime_adj(X509_getm_notAfter(x), HOUR));
	assert_int_equal(X509_set_pubkey(x, key), 1);
	add_ext_nid(x, issuer ? issuer : x, NID_subject_alt_name, san);
	add_ext_nid(x, issuer ? issuer : x, NID_basic_constraints, bc);
	add_ext_nid(x, issuer ? issuer : x, NID_key_usage, ku);
	add_ext_nid(x, issuer ? issuer : x, NID_ext_key_usage, eku);
	assert_true(X509_sign(x, issuer_key ? issuer_key : key, EVP_sha256()) > 0);
	return x;
}

/* Material for service's leaf with the given extensions, under root. */
static struct tls_material *leaf_material(X509 *root, EVP_PKEY *root_key, const char *service,
                                          const char *bc, const char *ku, const char *eku)
{
	static long serial = 100;
	struct tls_material *m = calloc(1, sizeof(*m));
	char san[128];

	assert_non_null(m);
	snprintf(san, sizeof(san), "URI:spiffe://%s/svc/%s", TD, service);
	m->key = EVP_EC_gen("P-256");
	assert_non_null(m->key);
	m->cert = make_signed(m->key, root, root_key, san, bc, ku, eku, serial++);
	m->chain = sk_X509_new_null();
	m->roots = sk_X509_new_null();
	assert_true(m->chain && m->roots);
	assert_true(X509_up_ref(root) && sk_X509_push(m->roots, root) > 0);
	return m;
}

#define P_BC "critical,CA:FALSE"
#define P_KU "critical,digitalSignature"
#define P_EKU "serverAuth,clientAuth"

static void test_svid_profile_in_handshakes(void **state)
{
	/* as_client: what a server says of this leaf presented by a client;
	 * as_server: what a client says of it presented by a server. */
	static const struct leaf_spec cases[] = {
		{ "proper SVID", P_BC, P_KU, P_EKU, 0, 0 },
		{ "no basicConstraints", NULL, P_KU, P_EKU, TLS_FAIL_NO_BASIC_CONSTRAINTS,
		  TLS_FAIL_NO_BASIC_CONSTRAINTS },
		{ "no keyUsage", P_BC, NULL, P_EKU, TLS_FAIL_BAD_KEY_USAGE, TLS_FAIL_BAD_KEY_USAGE },
		{ "no extKeyUsage", P_BC, P_KU, NULL, TLS_FAIL_BAD_EXT_KEY_USAGE, TLS_FAIL_BAD_EXT_KEY_USAGE },
		{ "none of the three", NULL, NULL, NULL, TLS_FAIL_NO_BASIC_CONSTRAINTS,
		  TLS_FAIL_NO_BASIC_CONSTRAINTS },
		{ "CA:TRUE", "critical,CA:TRUE", P_KU, P_EKU, TLS_FAIL_LEAF_IS_CA, TLS_FAIL_LEAF_IS_CA },
		{ "keyUsage without digitalSignature", P_BC, "critical,keyAgreement", P_EKU,
		  TLS_FAIL_BAD_KEY_USAGE, TLS_FAIL_BAD_KEY_USAGE },
		/*
		 * A present extKeyUsage without the role's purpose fails OpenSSL's
		 * own purpose check (ssl_client, ssl_server) before ours: untrusted.
		 * A client needs clientAuth, a server serverAuth.
		 */
		{ "extKeyUsage codeSigning", P_BC, P_KU, "codeSigning", TLS_FAIL_UNTRUSTED,
		  TLS_FAIL_UNTRUSTED },
		{ "extKeyUsage serverAuth only", P_BC, P_KU, "serverAuth", TLS_FAIL_UNTRUSTED, 0 },
		{ "extKeyUsage clientAuth only", P_BC, P_KU, "clientAuth", 0, TLS_FAIL_UNTRUSTED },
	};
	EVP_PKEY *root_key = EVP_EC_gen("P-256");
	X509 *root;

	(void)state;
	assert_non_null(root_key);
	root = make_signed(root_key, NULL, NULL, NULL, "critical,CA:TRUE",
	                   "critical,keyCertSign,cRLSign", NULL, 1);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct leaf_spec *c = &cases[i];
		struct tls_material *good_orders = leaf_material(root, root_key, "orders", P_BC, P_KU,
		                                                 P_EKU);
		struct tls_material *good_front = leaf_material(root, root_key, "frontend", P_BC, P_KU,
		                                                P_EKU);
		struct tls_material *client = leaf_material(root, root_key, "frontend", c->bc, c->ku,
		                                            c->eku);
		struct tls_material *server = leaf_material(root, root_key, "orders", c->bc, c->ku,
		                                            c->eku);
		/* The leaf as a client's, then as a server's. */
		struct outcome as_client = handshake(good_orders, client, "spiffe://" TD "/svc/orders");
		struct outcome as_server = handshake(server, good_front, "spiffe://" TD "/svc/orders");

		if (as_client.ok != (c->as_client == 0) || as_client.server_reason != c->as_client ||
		    as_server.ok != (c->as_server == 0) || as_server.client_reason != c->as_server)
			fail_msg("%s: as client %s (want %s), as server %s (want %s)", c->name,
			         tls_failure_str(as_client.server_reason),
			         tls_failure_str(c->as_client),
			         tls_failure_str(as_server.client_reason),
			         tls_failure_str(c->as_server));
		tls_material_free(good_orders);
		tls_material_free(good_front);
		tls_material_free(client);
		tls_material_free(server);
	}
	X509_free(root);
	EVP_PKEY_free(root_key);
}

/* Pumps one client-server pair until both finished the handshake (or
 * one failed); then the client reads the session ticket the server sent. */
static bool pair_handshake(SSL_CTX *sctx, SSL_CTX *cctx, SSL_SESSION *offer, SSL_SESSION **got,
                           bool *reused, char *server_saw)
{
	struct tls_verify sv = { 0 }, cv = { .expect_id = "spiffe://" TD "/svc/orders" };
	SSL *s = SSL_new(sctx), *c = SSL_new(cctx);
	BIO *sb, *cb;
	int sr = 0, cr = 0;
	char byte;
	bool ok;

	assert_non_null(s);
	assert_non_null(c);
	assert_int_equal(BIO_new_bio_pair(&sb, 0, &cb, 0), 1);
	SSL_set_bio(s, sb, sb);
	SSL_set_bio(c, cb, cb);
	tls_attach_verify(s, &sv);
	tls_attach_verify(c, &cv);
	SSL_set_accept_state(s);
	SSL_set_connect_state(c);
	if (offer)
		assert_int_equal(SSL_set_session(c, offer), 1);
	for (int i = 0; i < 20 && (sr != 1 || cr != 1); i++) {
		if (cr != 1)
			cr = SSL_do_handshake(c);
		if (sr != 1)
			sr = SSL_do_handshake(s);
	}
	ok = sr == 1 && cr == 1;
	if (ok) {
		assert_int_equal(SSL_read(c, &byte, 1), -1);    /* takes the ticket, no data */
		*reused = SSL_session_reused(s);
		assert_int_equal(SSL_session_reused(c), *reused);
		assert_int_equal(tls_peer_id(s, server_saw, SPIFFE_ID_MAX + 1), 0);
		*got = SSL_get1_session(c);
		/* OpenSSL drops the session of a connection freed without a
		 * close_notify from the cache; the proxy sends one (conn.c). */
		SSL_shutdown(s);
		SSL_shutdown(c);
	}
	ERR_clear_error();
	SSL_free(s);
	SSL_free(c);
	return ok;
}

/*
 * Resumption through the server context's own session cache (stateful
 * tickets: no certificate to decode per resumption): a ticket resumes,
 * the resumed connection still knows its peer, and a ticket from another
 * server context (a new bundle or certificate) is refused: a full
 * handshake, not a resumed one.
 */
static void test_resumption_from_server_cache(void **state)
{
	struct fixture *fx = *state;
	struct tls_material *orders = load(fx, "orders", "bundle.pem");
	struct tls_material *frontend = load(fx, "frontend", "bundle.pem");
	SSL_CTX *sctx = tls_server_ctx(orders, &opts, NULL);
	SSL_CTX *other = tls_server_ctx(orders, &opts, NULL);
	SSL_CTX *cctx = tls_client_ctx(frontend, &opts, NULL);
	SSL_SESSION *first = NULL, *second = NULL, *third = NULL;
	char saw[SPIFFE_ID_MAX + 1];
	bool reused = true;

	assert_non_null(sctx);
	assert_non_null(other);
	assert_non_null(cctx);
	assert_int_equal(SSL_CTX_sess_get_cache_size(sctx), TLS_SERVER_SESSIONS);
	assert_true(pair_handshake(sctx, cctx, NULL, &first, &reused, saw));
	assert_false(reused);
	assert_non_null(first);
	assert_int_equal(SSL_CTX_sess_number(sctx), 1);     /* one ticket, one session */
	assert_true(pair_handshake(sctx, cctx, first, &second, &reused, saw));
	assert_true(reused);
	assert_string_equal(saw, "spiffe://" TD "/svc/frontend");
	/* Another context never saw the session: full handshake. */
	assert_true(pair_handshake(other, cctx, second, &third, &reused, saw));
	assert_false(reused);
	assert_string_equal(saw, "spiffe://" TD "/svc/frontend");
	SSL_SESSION_free(first);
	SSL_SESSION_free(second);
	SSL_SESSION_free(third);
	SSL_CTX_free(sctx);
	SSL_CTX_free(other);
	SSL_CTX_free(cctx);
	tls_material_free(orders);
	tls_material_free(frontend);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_failure_names),
		cmocka_unit_test(test_allowed_handshake),
		cmocka_unit_test(test_upstream_with_wrong_identity),
		cmocka_unit_test(test_client_from_other_ca),
		cmocka_unit_test(test_revoked_client),
		cmocka_unit_test(test_material_refusals),
		cmocka_unit_test(test_svid_profile_in_handshakes),
		cmocka_unit_test(test_material_digest),
		cmocka_unit_test(test_resumption_from_server_cache),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
