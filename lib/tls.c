/* tls: shared SSL_CTX construction and SVID verification for mutual TLS. */
#include "meshlet/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "meshlet/ca.h"
#include "meshlet/log.h"
#include "meshlet/metrics.h"

#define TLS_MAX_PEM_FILE (1024 * 1024)
#define TLS_VERIFY_DEPTH 4

/*
 * What the verify callback needs from the context: copied at context build
 * so the context does not depend on the lifetime of tls_material.
 */
struct tls_ctx_data {
	enum identity_role peer_role;
	char **revoked;
	size_t n_revoked;
	char trust_domain[TRUST_DOMAIN_MAX + 1];
};

/* Ex-data indices: set once by tls_init() before threads start. */
static int ssl_verify_index = -1;
static int ctx_data_index = -1;

static void ctx_data_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                          void *argp)
{
	struct tls_ctx_data *d = ptr;

	if (!d)
		return;
	for (size_t i = 0; i < d->n_revoked; i++)
		free(d->revoked[i]);
	free(d->revoked);
	free(d);
}

int tls_init(void)
{
	if (ssl_verify_index >= 0)
		return 0;
	ssl_verify_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
	ctx_data_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, ctx_data_free);
	return ssl_verify_index >= 0 && ctx_data_index >= 0 ? 0 : -EIO;
}

/* Most recent OpenSSL error as text, for messages; clears the queue. */
static const char *ssl_error_text(char *buf, size_t len)
{
	unsigned long e = ERR_peek_last_error();

	if (!e)
		snprintf(buf, len, "unknown error");
	else
		ERR_error_string_n(e, buf, len);
	ERR_clear_error();
	return buf;
}

/* Reads a whole PEM file, refusing huge ones; returns a memory BIO. */
static BIO *pem_open(const char *file, const char *what, struct meshlet_err *err)
{
	struct stat st;
	BIO *bio;

	if (stat(file, &st) < 0) {
		err_set(err, what, "%s %s: %s", what, file, strerror(errno));
		return NULL;
	}
	if (!S_ISREG(st.st_mode) || st.st_size > TLS_MAX_PEM_FILE) {
		err_set(err, what, "%s %s: not a regular file of at most 1 MiB", what, file);
		return NULL;
	}
	bio = BIO_new_file(file, "r");
	if (!bio)
		err_set(err, what, "%s %s: cannot open", what, file);
	return bio;
}

/* All certificates of a PEM file, in order; NULL with err set if none. */
static STACK_OF(X509) *load_cert_list(const char *file, const char *what, struct meshlet_err *err)
{
	STACK_OF(X509) *list;
	X509 *x;
	BIO *bio = pem_open(file, what, err);

	if (!bio)
		return NULL;
	list = sk_X509_new_null();
	while (list && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
		if (!sk_X509_push(list, x)) {
			X509_free(x);
			break;
		}
	}
	ERR_clear_error();    /* the loop ends on a "no start line" error */
	BIO_free(bio);
	if (!list || sk_X509_num(list) == 0) {
		sk_X509_pop_free(list, X509_free);
		err_set(err, what, "%s %s: no PEM certificate in it", what, file);
		return NULL;
	}
	return list;
}

static EVP_PKEY *load_key(const char *file, struct meshlet_err *err)
{
	char buf[256];
	struct stat st;
	EVP_PKEY *key;
	BIO *bio = pem_open(file, "key", err);

	if (!bio)
		return NULL;
	if (stat(file, &st) == 0 && (st.st_mode & 077))
		log_warn("key %s is readable by group or others (mode %03o); use 0600",
		         file, (unsigned)(st.st_mode & 0777));
	key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
	BIO_free(bio);
	if (!key)
		err_set(err, "key", "key %s: %s", file, ssl_error_text(buf, sizeof(buf)));
	return key;
}

time_t tls_cert_not_after(const X509 *cert)
{
	struct tm tm;
	const ASN1_TIME *t = X509_get0_notAfter(cert);

	if (!t || !ASN1_TIME_to_tm(t, &tm))
		return 0;
	return timegm(&tm);
}

/* Our own leaf must be a currently valid SVID of the trust domain. */
static int check_own_leaf(struct tls_material *m, const char *file, const char *td,
                          struct meshlet_err *err)
{
	enum identity_reason r;

	m->id = calloc(1, sizeof(*m->id));
	if (!m->id)
		return err_set(err, "", "out of memory");
	r = identity_check_svid(m->cert, td, ROLE_SERVER, m->id);
	if (r == ID_OK)
		r = identity_check_svid(m->cert, td, ROLE_CLIENT, m->id);
	if (r != ID_OK)
		return err_set(err, "cert", "cert %s: not a usable SVID of %s: %s", file, td,
		               identity_reason_str(r));
	if (X509_cmp_current_time(X509_get0_notBefore(m->cert)) > 0)
		return err_set(err, "cert", "cert %s: not valid yet", file);
	if (X509_cmp_current_time(X509_get0_notAfter(m->cert)) < 0)
		return err_set(err, "cert", "cert %s: expired", file);
	m->not_after = tls_cert_not_after(m->cert);
	return 0;
}

int tls_material_load(const char *cert_file, const char *key_file, const char *bundle_file,
                      const char *trust_domain, struct tls_material **out,
                      struct meshlet_err *err)
{
	struct tls_material *m = calloc(1, sizeof(*m));
	STACK_OF(X509) *certs = NULL;

	if (!m)
		return err_set(err, "", "out of memory");
	certs = load_cert_list(cert_file, "cert", err);
	if (!certs)
		goto fail;
	m->cert = sk_X509_shift(certs);
	m->chain = certs;
	m->key = load_key(key_file, err);
	if (!m->key)
		goto fail;
	if (X509_check_private_key(m->cert, m->key) != 1) {
		ERR_clear_error();
		err_set(err, "key", "key %s does not match cert %s", key_file, cert_file);
		goto fail;
	}
	m->roots = load_cert_list(bundle_file, "bundle", err);
	if (!m->roots)
		goto fail;
	if (check_own_leaf(m, cert_file, trust_domain, err) < 0)
		goto fail;
	*out = m;
	return 0;
fail:
	tls_material_free(m);
	return -EINVAL;
}

void tls_material_free(struct tls_material *m)
{
	if (!m)
		return;
	EVP_PKEY_free(m->key);
	X509_free(m->cert);
	sk_X509_pop_free(m->chain, X509_free);
	sk_X509_pop_free(m->roots, X509_free);
	for (size_t i = 0; i < m->n_revoked; i++)
		free(m->revoked[i]);
	free(m->revoked);
	free(m->id);
	free(m);
}

static int cmp_serial(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* All certificates of PEM text, in order; NULL with err set if none. */
static STACK_OF(X509) *cert_list_from_pem(const char *pem, const char *what,
                                          struct meshlet_err *err)
{
	size_t len = pem ? strlen(pem) : 0;
	STACK_OF(X509) *list = NULL;
	BIO *bio;
	X509 *x;

	if (len == 0 || len > TLS_MAX_PEM_FILE) {
		err_set(err, what, "%s: empty or over 1 MiB", what);
		return NULL;
	}
	bio = BIO_new_mem_buf(pem, (int)len);
	list = bio ? sk_X509_new_null() : NULL;
	while (list && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
		if (!sk_X509_push(list, x)) {
			X509_free(x);
			break;
		}
	}
	ERR_clear_error();
	BIO_free(bio);
	if (!list || sk_X509_num(list) == 0) {
		sk_X509_pop_free(list, X509_free);
		err_set(err, what, "%s: no PEM certificate in it", what);
		return NULL;
	}
	return list;
}

static int copy_revoked(struct tls_material *m, const char *const *revoked, size_t n,
                        struct meshlet_err *err)
{
	char hex[CA_SERIAL_HEX_MAX];

	if (n == 0)
		return 0;
	m->revoked = calloc(n, sizeof(char *));
	if (!m->revoked)
		return err_set(err, "", "out of memory");
	for (size_t i = 0; i < n; i++) {
		if (ca_serial_normalize(revoked[i], hex) < 0)
			return err_set(err, "revoked", "revoked serial %zu is not a serial", i);
		m->revoked[i] = strdup(hex);
		if (!m->revoked[i])
			return err_set(err, "", "out of memory");
		m->n_revoked = i + 1;
	}
	qsort(m->revoked, m->n_revoked, sizeof(char *), cmp_serial);
	return 0;
}

int tls_material_from_pem(const char *cert_pem, EVP_PKEY *key, const char *bundle_pem,
                          const char *const *revoked, size_t n_revoked,
                          const char *trust_domain, struct tls_material **out,
                          struct meshlet_err *err)
{
	struct tls_material *m = calloc(1, sizeof(*m));
	STACK_OF(X509) *certs;

	if (!m)
		return err_set(err, "", "out of memory");
	certs = cert_list_from_pem(cert_pem, "cert", err);
	if (!certs)
		goto fail;
	m->cert = sk_X509_shift(certs);
	m->chain = certs;
	if (!key || !EVP_PKEY_up_ref(key)) {
		err_set(err, "key", "no key");
		goto fail;
	}
	m->key = key;
	if (X509_check_private_key(m->cert, m->key) != 1) {
		ERR_clear_error();
		err_set(err, "key", "the key does not match the certificate");
		goto fail;
	}
	m->roots = cert_list_from_pem(bundle_pem, "bundle", err);
	if (!m->roots)
		goto fail;
	if (copy_revoked(m, revoked, n_revoked, err) < 0)
		goto fail;
	if (check_own_leaf(m, "(in memory)", trust_domain, err) < 0)
		goto fail;
	*out = m;
	return 0;
fail:
	tls_material_free(m);
	return -EINVAL;
}

/* True when the certificate's serial (canonical lowercase hex) is on the sorted list. */
static bool serial_revoked(X509 *cert, const struct tls_ctx_data *d)
{
	char hex[CA_SERIAL_HEX_MAX];
	const char *key = hex;

	if (d->n_revoked == 0)
		return false;
	if (ca_serial_hex(cert, hex) < 0)
		return true;    /* fail closed */
	return bsearch(&key, d->revoked, d->n_revoked, sizeof(char *), cmp_serial) != NULL;
}

bool tls_is_revoked(SSL_CTX *ctx, X509 *cert)
{
	const struct tls_ctx_data *d = SSL_CTX_get_ex_data(ctx, ctx_data_index);

	return d && cert && serial_revoked(cert, d);
}

static const char *const failure_names[TLS_FAIL_COUNT] = {
	[TLS_FAIL_NONE] = "none",
	[TLS_FAIL_NO_CERT] = "no_certificate",
	[TLS_FAIL_NO_URI_SAN] = "no_uri_san",
	[TLS_FAIL_MULTIPLE_URI_SANS] = "multiple_uri_sans",
	[TLS_FAIL_BAD_SPIFFE_ID] = "bad_spiffe_id",
	[TLS_FAIL_WRONG_TRUST_DOMAIN] = "wrong_trust_domain",
	[TLS_FAIL_NOT_A_SERVICE] = "not_a_service",
	[TLS_FAIL_LEAF_IS_CA] = "leaf_is_ca",
	[TLS_FAIL_BAD_KEY_USAGE] = "bad_key_usage",
	[TLS_FAIL_BAD_EXT_KEY_USAGE] = "bad_ext_key_usage",
	[TLS_FAIL_WRONG_IDENTITY] = "wrong_identity",
	[TLS_FAIL_REVOKED] = "revoked",
	[TLS_FAIL_NO_BASIC_CONSTRAINTS] = "no_basic_constraints",
	[TLS_FAIL_HANDSHAKE] = "handshake",
	[TLS_FAIL_UNTRUSTED] = "untrusted",
	[TLS_FAIL_EXPIRED] = "expired",
	[TLS_FAIL_NO_PEER_CERT] = "no_peer_certificate",
	[TLS_FAIL_TIMEOUT] = "timeout",
};

const char *tls_failure_str(enum tls_failure f)
{
	if ((unsigned)f >= TLS_FAIL_COUNT || !failure_names[f])
		return "unknown";
	return failure_names[f];
}

/* Identity's refusals, each once; a new identity reason that is not here
 * fails tls_test (every reason must have its own label). */
static const enum tls_failure identity_failures[ID_REASON_COUNT] = {
	[ID_OK] = TLS_FAIL_NONE,
	[ID_NO_CERT] = TLS_FAIL_NO_CERT,
	[ID_NO_URI_SAN] = TLS_FAIL_NO_URI_SAN,
	[ID_MULTIPLE_URI_SANS] = TLS_FAIL_MULTIPLE_URI_SANS,
	[ID_BAD_SPIFFE_ID] = TLS_FAIL_BAD_SPIFFE_ID,
	[ID_WRONG_TRUST_DOMAIN] = TLS_FAIL_WRONG_TRUST_DOMAIN,
	[ID_NOT_A_SERVICE] = TLS_FAIL_NOT_A_SERVICE,
	[ID_LEAF_IS_CA] = TLS_FAIL_LEAF_IS_CA,
	[ID_BAD_KEY_USAGE] = TLS_FAIL_BAD_KEY_USAGE,
	[ID_BAD_EXT_KEY_USAGE] = TLS_FAIL_BAD_EXT_KEY_USAGE,
	[ID_WRONG_IDENTITY] = TLS_FAIL_WRONG_IDENTITY,
	[ID_REVOKED] = TLS_FAIL_REVOKED,
	[ID_NO_BASIC_CONSTRAINTS] = TLS_FAIL_NO_BASIC_CONSTRAINTS,
};

enum tls_failure tls_failure_from_identity(enum identity_reason r)
{
	/* An unknown reason is still a refusal: never TLS_FAIL_NONE. */
	if ((unsigned)r >= ID_REASON_COUNT)
		return TLS_FAIL_HANDSHAKE;
	return identity_failures[r];
}

static enum tls_failure chain_error_reason(int e)
{
	switch (e) {
	case X509_V_ERR_CERT_HAS_EXPIRED:
	case X509_V_ERR_CERT_NOT_YET_VALID:
		return TLS_FAIL_EXPIRED;
	default:
		return TLS_FAIL_UNTRUSTED;
	}
}

/* Checks the leaf (depth 0) as an SVID of the expected role and identity. */
static enum tls_failure check_peer_leaf(X509 *leaf, const struct tls_ctx_data *d,
                                        struct tls_verify *v)
{
	struct spiffe_id id;
	enum identity_reason r = identity_check_svid(leaf, d->trust_domain, d->peer_role, &id);

	if (r == ID_OK && v->expect_id && strcmp(id.uri, v->expect_id) != 0)
		r = ID_WRONG_IDENTITY;
	if (r == ID_OK && !v->expect_id && id.service[0] == '\0')
		r = ID_NOT_A_SERVICE;
	if (r == ID_OK && serial_revoked(leaf, d))
		r = ID_REVOKED;
	return tls_failure_from_identity(r);
}

static int verify_cb(int preverify_ok, X509_STORE_CTX *store)
{
	SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
	struct tls_verify *v = ssl ? SSL_get_ex_data(ssl, ssl_verify_index) : NULL;
	const struct tls_ctx_data *d = ssl ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ctx_data_index) : NULL;
	enum tls_failure reason;

	if (!v || !d)
		return 0;    /* no verification state: never accept */
	if (!preverify_ok) {
		if (!v->reason)
			v->reason = chain_error_reason(X509_STORE_CTX_get_error(store));
		return 0;
	}
	if (X509_STORE_CTX_get_error_depth(store) != 0)
		return 1;
	reason = check_peer_leaf(X509_STORE_CTX_get_current_cert(store), d, v);
	if (reason != TLS_FAIL_NONE) {
		v->reason = reason;
		X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
		return 0;
	}
	return 1;
}

static int attach_ctx_data(SSL_CTX *ctx, const struct tls_material *m, const char *td,
                           enum identity_role peer_role)
{
	struct tls_ctx_data *d = calloc(1, sizeof(*d));

	if (!d)
		return -ENOMEM;
	d->peer_role = peer_role;
	snprintf(d->trust_domain, sizeof(d->trust_domain), "%s", td);
	if (m->n_revoked) {
		d->revoked = calloc(m->n_revoked, sizeof(char *));
		for (size_t i = 0; d->revoked && i < m->n_revoked; i++) {
			d->revoked[i] = strdup(m->revoked[i]);
			if (!d->revoked[i])
				break;
			d->n_revoked = i + 1;
		}
		if (d->n_revoked != m->n_revoked) {
			ctx_data_free(NULL, d, NULL, 0, 0, NULL);
			return -ENOMEM;
		}
		qsort(d->revoked, d->n_revoked, sizeof(char *), cmp_serial);
	}
	if (!SSL_CTX_set_ex_data(ctx, ctx_data_index, d)) {
		ctx_data_free(NULL, d, NULL, 0, 0, NULL);
		return -ENOMEM;
	}
	return 0;
}

static X509_STORE *build_store(const struct tls_material *m)
{
	X509_STORE *store = X509_STORE_new();

	if (!store)
		return NULL;
	for (int i = 0; i < sk_X509_num(m->roots); i++) {
		if (!X509_STORE_add_cert(store, sk_X509_value(m->roots, i))) {
			X509_STORE_free(store);
			return NULL;
		}
	}
	return store;
}

/* Settings common to both sides. */
static SSL_CTX *ctx_common(const SSL_METHOD *method, const struct tls_material *m,
                           const struct tls_options *o, enum identity_role peer_role,
                           struct meshlet_err *err)
{
	char buf[256];
	SSL_CTX *ctx = SSL_CTX_new(method);
	X509_STORE *store = NULL;

	if (!ctx)
		goto fail;
	SSL_CTX_set_min_proto_version(ctx, o->min_version ? o->min_version : TLS1_3_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
	                         SSL_OP_CIPHER_SERVER_PREFERENCE);
	/*
	 * Moving retry buffers, partial writes for relaying. No
	 * SSL_MODE_RELEASE_BUFFERS: it frees and re-allocates both record
	 * buffers around every record (13% of a keep-alive request's
	 * instructions); the proxy calls SSL_free_buffers on connections that
	 * went quiet instead, which keeps idle connections as small.
	 */
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
	                      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	SSL_CTX_set_read_ahead(ctx, 1);
	/*
	 * Room for four records per socket read: a bulk transfer took one
	 * read per 16 KiB record. Only pages that bytes reach count, and the
	 * proxy releases the buffer of a quiet connection.
	 */
	SSL_CTX_set_default_read_buffer_len(ctx, 65536);
	if (!SSL_CTX_set1_groups_list(ctx, o->groups ? o->groups : "X25519:P-256")) {
		err_set(err, "tls.groups", "unknown key-exchange group in \"%s\"",
		        o->groups ? o->groups : "");
		goto fail_quiet;
	}
	if (!SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
	                                  "ECDHE-ECDSA-CHACHA20-POLY1305"))
		goto fail;
	if (SSL_CTX_use_cert_and_key(ctx, m->cert, m->key, m->chain, 1) != 1)
		goto fail;
	store = build_store(m);
	if (!store || !SSL_CTX_set1_verify_cert_store(ctx, store))
		goto fail;
	X509_STORE_free(store);
	store = NULL;
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, verify_cb);
	SSL_CTX_set_verify_depth(ctx, TLS_VERIFY_DEPTH);
	if (attach_ctx_data(ctx, m, o->trust_domain, peer_role) < 0)
		goto fail;
	return ctx;
fail:
	err_set(err, "", "TLS context: %s", ssl_error_text(buf, sizeof(buf)));
fail_quiet:
	X509_STORE_free(store);
	SSL_CTX_free(ctx);
	return NULL;
}

/*
 * ALPN, server side: h2 when the client offers it, else http/1.1; a
 * client that offers neither (a tcp listener offers nothing) gets no ALPN
 * answer and the handshake goes on.
 */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
	(void)ssl;
	(void)arg;
	if (SSL_select_next_proto((unsigned char **)out, outlen, (const unsigned char *)TLS_ALPN_HTTP,
	                          sizeof(TLS_ALPN_HTTP) - 1, in, inlen) == OPENSSL_NPN_NEGOTIATED)
		return SSL_TLSEXT_ERR_OK;
	return SSL_TLSEXT_ERR_NOACK;
}

SSL_CTX *tls_server_ctx(const struct tls_material *m, const struct tls_options *o,
                        struct meshlet_err *err)
{
	static const unsigned char sid_ctx[] = "meshlet";
	SSL_CTX *ctx = ctx_common(TLS_server_method(), m, o, ROLE_CLIENT, err);

	if (!ctx)
		return NULL;
	/*
	 * One ticket per handshake, naming a session in this context's own
	 * cache (stateful), so a new bundle (a new context) invalidates every
	 * older session. Stateless tickets carry the session, the client's
	 * certificate included, and decoding that certificate's key on each
	 * resumption (OpenSSL 3's decoder lookup) was 55% of the inbound's
	 * CPU per new connection; a cached session is found by its ID. The
	 * cache is bounded (least recently used sessions go first), and
	 * sessions resumed from one another share one parsed certificate.
	 */
	SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
	SSL_CTX_sess_set_cache_size(ctx, TLS_SERVER_SESSIONS);
	SSL_CTX_set_num_tickets(ctx, 1);
	SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
	SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
	return ctx;
}

SSL_CTX *tls_client_ctx(const struct tls_material *m, const struct tls_options *o,
                        struct meshlet_err *err)
{
	SSL_CTX *ctx = ctx_common(TLS_client_method(), m, o, ROLE_SERVER, err);

	if (!ctx)
		return NULL;
	/* The caller keeps sessions per upstream (new-session callback). */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
	return ctx;
}

/*
 * Adds one length-prefixed field, so that no two sequences hash alike;
 * p NULL adds the length alone (a count).
 */
static int digest_bytes(EVP_MD_CTX *md, const void *p, size_t len)
{
	uint64_t n = len;

	return EVP_DigestUpdate(md, &n, sizeof(n)) == 1 &&
	       (!p || len == 0 || EVP_DigestUpdate(md, p, len) == 1) ? 0 : -ENOMEM;
}

static int digest_cert(EVP_MD_CTX *md, X509 *x)
{
	unsigned char *der = NULL;
	int len = i2d_X509(x, &der);
	int rc = len > 0 ? digest_bytes(md, der, (size_t)len) : -ENOMEM;

	OPENSSL_free(der);
	return rc;
}

static int digest_certs(EVP_MD_CTX *md, STACK_OF(X509) *list)
{
	int n = sk_X509_num(list);
	int rc = digest_bytes(md, NULL, n > 0 ? (size_t)n : 0);    /* the count */

	for (int i = 0; rc == 0 && i < n; i++)
		rc = digest_cert(md, sk_X509_value(list, i));
	return rc;
}

static int digest_text(EVP_MD_CTX *md, const char *s)
{
	return digest_bytes(md, s ? s : "", s ? strlen(s) : 0);
}

int tls_material_digest(const struct tls_material *m, const struct tls_options *o,
                        unsigned char out[TLS_DIGEST_LEN])
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int len = 0;
	int64_t min_version = o->min_version;
	int rc = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 ? 0 : -ENOMEM;

	if (rc == 0)
		rc = digest_cert(md, m->cert);
	if (rc == 0)
		rc = digest_certs(md, m->chain);
	if (rc == 0)
		rc = digest_certs(md, m->roots);
	if (rc == 0)
		rc = digest_bytes(md, NULL, m->n_revoked);    /* the count, then each */
	for (size_t i = 0; rc == 0 && i < m->n_revoked; i++)
		rc = digest_text(md, m->revoked[i]);
	if (rc == 0)
		rc = digest_text(md, o->trust_domain);
	if (rc == 0)
		rc = digest_bytes(md, &min_version, sizeof(min_version));
	if (rc == 0)
		rc = digest_text(md, o->groups);
	if (rc == 0 && (EVP_DigestFinal_ex(md, out, &len) != 1 || len != TLS_DIGEST_LEN))
		rc = -ENOMEM;
	EVP_MD_CTX_free(md);
	return rc;
}

void tls_attach_verify(SSL *ssl, struct tls_verify *v)
{
	SSL_set_ex_data(ssl, ssl_verify_index, v);
}

int tls_peer_id(SSL *ssl, char *out, size_t len)
{
	X509 *peer = SSL_get0_peer_certificate(ssl);
	GENERAL_NAMES *names;
	int found = -ENOENT;

	if (!peer)
		return -ENOENT;
	names = X509_get_ext_d2i(peer, NID_subject_alt_name, NULL, NULL);
	for (int i = 0; names && i < sk_GENERAL_NAME_num(names); i++) {
		const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
		const ASN1_IA5STRING *uri;

		if (gn->type != GEN_URI)
			continue;
		uri = gn->d.uniformResourceIdentifier;
		if ((size_t)uri->length >= len || found == 0) {
			found = -ENOENT;    /* too long, or a second URI SAN */
			break;
		}
		memcpy(out, uri->data, (size_t)uri->length);
		out[uri->length] = '\0';
		found = 0;
	}
	GENERAL_NAMES_free(names);
	return found;
}

enum tls_failure tls_failure_reason(SSL *ssl, const struct tls_verify *v)
{
	unsigned long e;
	enum tls_failure reason = TLS_FAIL_HANDSHAKE;

	if (v && v->reason)
		reason = v->reason;
	else if ((e = ERR_peek_error()) != 0) {
		if (ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE)
			reason = TLS_FAIL_NO_PEER_CERT;
		else if (ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED)
			reason = chain_error_reason((int)SSL_get_verify_result(ssl));
	}
	ERR_clear_error();
	return reason;
}
