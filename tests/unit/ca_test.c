/* Unit tests for lib/ca.c with real OpenSSL objects and files in a temporary directory. */
#include <arpa/inet.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509v3.h>

#include "meshlet/ca.h"
#include "meshlet/identity.h"

#define TD "mesh.local"

struct fixture {
	char dir[64];
	char cert_path[PATH_MAX];
	char key_path[PATH_MAX];
	struct ca *ca;
};

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	return remove(path);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	struct meshlet_err err = {0};

	assert_non_null(f);
	snprintf(f->dir, sizeof(f->dir), "/tmp/ca_test.XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->cert_path, sizeof(f->cert_path), "%s/ca.pem", f->dir);
	snprintf(f->key_path, sizeof(f->key_path), "%s/ca.key", f->dir);
	assert_int_equal(ca_generate(&f->ca, TD, 0, &err), 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	ca_free(f->ca);
	nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	free(f);
	/* nothing may be left on OpenSSL's error queue by the library */
	assert_int_equal(ERR_peek_error(), 0);
	return 0;
}

/* ---- helpers: keys, CSRs, certificate inspection ---- */

static EVP_PKEY *keygen(const char *type, const char *param)
{
	EVP_PKEY *k;

	if (strcmp(type, "EC") == 0)
		k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", param);
	else if (strcmp(type, "RSA") == 0)
		k = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)atoi(param));
	else
		k = EVP_PKEY_Q_keygen(NULL, NULL, type);
	assert_non_null(k);
	return k;
}

static void add_req_ext(STACK_OF(X509_EXTENSION) *exts, int nid, const char *value)
{
	X509_EXTENSION *e = X509V3_EXT_nconf_nid(NULL, NULL, nid, value);

	assert_non_null(e);
	assert_true(sk_X509_EXTENSION_push(exts, e) > 0);
}

/* A CSR for key with subject CN=cn; greedy ones also ask for CA:TRUE, a
 * foreign URI SAN and a DNS SAN. */
static X509_REQ *make_req(EVP_PKEY *key, const char *cn, bool greedy)
{
	X509_REQ *req = X509_REQ_new();
	X509_NAME *name = X509_REQ_get_subject_name(req);
	int id = EVP_PKEY_get_base_id(key);
	const EVP_MD *md = id == EVP_PKEY_ED25519 || id == EVP_PKEY_ED448 ? NULL : EVP_sha256();

	assert_int_equal(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
	                                            (const unsigned char *)cn, -1, -1, 0), 1);
	assert_int_equal(X509_REQ_set_pubkey(req, key), 1);
	if (greedy) {
		STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();

		add_req_ext(exts, NID_basic_constraints, "critical,CA:TRUE");
		add_req_ext(exts, NID_key_usage, "critical,keyCertSign");
		add_req_ext(exts, NID_subject_alt_name,
		            "URI:spiffe://" TD "/svc/admin,DNS:evil.example");
		assert_int_equal(X509_REQ_add_extensions(req, exts), 1);
		sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
	}
	assert_true(X509_REQ_sign(req, key, md) > 0);
	return req;
}

static char *req_pem(X509_REQ *req)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *data, *out;
	long len;

	assert_int_equal(PEM_write_bio_X509_REQ(b, req), 1);
	len = BIO_get_mem_data(b, &data);
	out = strndup(data, (size_t)len);
	BIO_free(b);
	return out;
}

static char *csr_pem(EVP_PKEY *key, const char *cn, bool greedy)
{
	X509_REQ *req = make_req(key, cn, greedy);
	char *pem = req_pem(req);

	X509_REQ_free(req);
	return pem;
}

/* Checks csr and expects -EINVAL with want in the message. */
static void assert_csr_refused(const char *pem, size_t len, const char *want)
{
	struct meshlet_err err = {0};
	EVP_PKEY *pub = (EVP_PKEY *)1;

	assert_int_equal(ca_csr_check(pem, len, &pub, &err), -EINVAL);
	assert_null(pub);
	assert_string_equal(err.path, "csr");
	if (!strstr(err.message, want))
		fail_msg("message \"%s\" lacks \"%s\"", err.message, want);
}

static void assert_key_refused(EVP_PKEY *key, const char *want)
{
	char *pem = csr_pem(key, "x", false);

	assert_csr_refused(pem, strlen(pem), want);
	free(pem);
	EVP_PKEY_free(key);
}

/* Issues an SVID for service from a CSR of a new key of the given type. */
static X509 *issue_from_csr(struct ca *ca, EVP_PKEY *key, const char *service, bool greedy,
                            char *serial)
{
	struct meshlet_err err = {0};
	char *pem = csr_pem(key, "evil", greedy);
	EVP_PKEY *pub = NULL;
	X509 *x = NULL;

	if (ca_csr_check(pem, strlen(pem), &pub, &err) != 0)
		fail_msg("csr refused: %s", err.message);
	assert_int_equal(EVP_PKEY_eq(pub, key), 1);
	if (ca_issue_svid(ca, service, pub, 3600, &x, serial, &err) != 0)
		fail_msg("issue failed: %s", err.message);
	EVP_PKEY_free(pub);
	free(pem);
	return x;
}

/* Verifies leaf against root alone, for the given purpose (0: none). */
static int verify(X509 *root, X509 *leaf, int purpose)
{
	X509_STORE *st = X509_STORE_new();
	X509_STORE_CTX *ctx = X509_STORE_CTX_new();
	int ok;

	assert_int_equal(X509_STORE_add_cert(st, root), 1);
	assert_int_equal(X509_STORE_CTX_init(ctx, st, leaf, NULL), 1);
	if (purpose)
		assert_int_equal(X509_STORE_CTX_set_purpose(ctx, purpose), 1);
	ok = X509_verify_cert(ctx);
	X509_STORE_CTX_free(ctx);
	X509_STORE_free(st);
	ERR_clear_error();
	return ok;
}

/* Asserts the extension nid is present with the given criticality. */
static void assert_ext_crit(X509 *x, int nid, int critical)
{
	int i = X509_get_ext_by_NID(x, nid, -1);

	assert_true(i >= 0);
	assert_int_equal(X509_EXTENSION_get_critical(X509_get_ext(x, i)), critical);
	assert_int_equal(X509_get_ext_by_NID(x, nid, i), -1); /* only once */
}

/* Asserts the SAN extension holds exactly the (type, text) names given. */
static void assert_sans(X509 *x, const int *types, const char *const *texts, int n)
{
	GENERAL_NAMES *gens = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
	int i;

	assert_non_null(gens);
	assert_int_equal(sk_GENERAL_NAME_num(gens), n);
	for (i = 0; i < n; i++) {
		GENERAL_NAME *gn = sk_GENERAL_NAME_value(gens, i);
		const ASN1_STRING *s = gn->type == GEN_IPADD ? gn->d.iPAddress : gn->d.ia5;
		char text[256] = "";

		assert_int_equal(gn->type, types[i]);
		if (gn->type == GEN_IPADD) {
			int af = ASN1_STRING_length(s) == 4 ? AF_INET : AF_INET6;

			assert_non_null(inet_ntop(af, ASN1_STRING_get0_data(s), text, sizeof(text)));
		} else {
			snprintf(text, sizeof(text), "%.*s", ASN1_STRING_length(s),
			         (const char *)ASN1_STRING_get0_data(s));
		}
		assert_string_equal(text, texts[i]);
	}
	GENERAL_NAMES_free(gens);
}

static void assert_subject_cn(X509 *x, const char *cn)
{
	char buf[128];

	assert_true(X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf,
	                                      sizeof(buf)) > 0);
	assert_string_equal(buf, cn);
}

static int64_t asn1_epoch(const ASN1_TIME *t)
{
	struct tm tm;

	assert_int_equal(ASN1_TIME_to_tm(t, &tm), 1);
	return (int64_t)timegm(&tm);
}

static void assert_serial_format(const char *serial)
{
	size_t i;

	assert_int_equal(strlen(serial), 32);
	for (i = 0; serial[i]; i++)
		assert_non_null(strchr("0123456789abcdef", serial[i]));
	assert_true(serial[0] >= '4' && serial[0] <= '7');
}

/* The properties every leaf has (docs/design.md, "Identity"). */
static void assert_leaf_common(X509 *root, X509 *x, int64_t ttl)
{
	BASIC_CONSTRAINTS *bc;
	int64_t now = (int64_t)time(NULL);
	int crit = -1;

	assert_int_equal(X509_get_version(x), X509_VERSION_3);
	assert_int_equal(X509_get_signature_nid(x), NID_ecdsa_with_SHA256);
	assert_int_equal(X509_NAME_cmp(X509_get_issuer_name(x), X509_get_subject_name(root)), 0);
	assert_int_equal(X509_get_ext_count(x), 6);
	bc = X509_get_ext_d2i(x, NID_basic_constraints, &crit, NULL);
	assert_non_null(bc);
	assert_int_equal(bc->ca, 0);
	assert_int_equal(crit, 1);
	BASIC_CONSTRAINTS_free(bc);
	assert_ext_crit(x, NID_basic_constraints, 1);
	assert_ext_crit(x, NID_key_usage, 1);
	assert_ext_crit(x, NID_ext_key_usage, 0);
	assert_ext_crit(x, NID_subject_alt_name, 0);
	assert_ext_crit(x, NID_subject_key_identifier, 0);
	assert_ext_crit(x, NID_authority_key_identifier, 0);
	assert_int_equal(X509_get_key_usage(x), KU_DIGITAL_SIGNATURE);
	assert_false(X509_get_extension_flags(x) & EXFLAG_CA);
	assert_non_null(X509_get0_subject_key_id(x));
	assert_int_equal(ASN1_OCTET_STRING_cmp(X509_get0_authority_key_id(x),
	                                       X509_get0_subject_key_id(root)), 0);
	assert_true(llabs(asn1_epoch(X509_get0_notBefore(x)) - (now - CA_CLOCK_SKEW)) <= 2);
	assert_true(llabs(asn1_epoch(X509_get0_notAfter(x)) - (now + ttl)) <= 2);
}

/* ---- root ---- */

static void test_root_properties(void **state)
{
	struct fixture *f = *state;
	static const int uri[] = { GEN_URI };
	static const char *const td[] = { "spiffe://" TD };
	X509 *root = ca_cert(f->ca);
	EVP_PKEY *pub = X509_get0_pubkey(root);
	char serial[CA_SERIAL_HEX_MAX], buf[128];
	int64_t now = (int64_t)time(NULL), na;
	int crit = -1;
	BASIC_CONSTRAINTS *bc;

	assert_string_equal(ca_trust_domain(f->ca), TD);
	assert_int_equal(X509_get_version(root), X509_VERSION_3);
	assert_int_equal(X509_verify(root, pub), 1);
	assert_int_equal(X509_NAME_cmp(X509_get_issuer_name(root), X509_get_subject_name(root)), 0);
	assert_int_equal(X509_get_signature_nid(root), NID_ecdsa_with_SHA256);
	assert_int_equal(EVP_PKEY_get_base_id(pub), EVP_PKEY_EC);
	assert_int_equal(EVP_PKEY_get_group_name(pub, buf, sizeof(buf), NULL), 1);
	assert_string_equal(buf, "prime256v1");
	assert_subject_cn(root, "meshlet root " TD);
	assert_true(X509_NAME_get_text_by_NID(X509_get_subject_name(root), NID_organizationName,
	                                      buf, sizeof(buf)) > 0);
	assert_string_equal(buf, "meshlet");
	bc = X509_get_ext_d2i(root, NID_basic_constraints, &crit, NULL);
	assert_non_null(bc);
	assert_int_not_equal(bc->ca, 0);
	assert_int_equal(crit, 1);
	BASIC_CONSTRAINTS_free(bc);
	assert_ext_crit(root, NID_key_usage, 1);
	assert_int_equal(X509_get_key_usage(root), KU_KEY_CERT_SIGN | KU_CRL_SIGN);
	assert_non_null(X509_get0_subject_key_id(root));
	assert_sans(root, uri, td, 1);
	assert_int_equal(X509_check_ca(root), 1);
	assert_int_equal(ca_serial_hex(root, serial), 0);
	assert_serial_format(serial);
	assert_int_equal(ca_cert_not_after(root, &na), 0);
	assert_true(llabs(na - (now + CA_ROOT_VALIDITY_DEFAULT)) <= 2);
	assert_true(llabs(asn1_epoch(X509_get0_notBefore(root)) - (now - CA_CLOCK_SKEW)) <= 2);
}

static void test_root_bad_arguments(void **state)
{
	struct meshlet_err err = {0};
	struct ca *ca = (struct ca *)1;

	assert_int_equal(ca_generate(&ca, "Mesh.Local", 0, &err), -EINVAL);
	assert_null(ca);
	assert_int_equal(ca_generate(&ca, "", 0, &err), -EINVAL);
	assert_int_equal(ca_generate(&ca, TD, -5, &err), -EINVAL);
	assert_int_equal(ca_generate(&ca, TD, 3600, &err), 0);
	ca_free(ca);
}

static void test_root_save_load(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct ca *loaded = NULL;
	char p1[CA_PIN_HEX_LEN], p2[CA_PIN_HEX_LEN];
	struct stat st;

	assert_int_equal(ca_save(f->ca, f->cert_path, f->key_path, &err), 0);
	assert_int_equal(stat(f->key_path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);
	assert_int_equal(stat(f->cert_path, &st), 0);
	assert_int_equal(st.st_mode & 0077, 0044);
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, f->key_path, &err), 0);
	assert_int_equal(X509_cmp(ca_cert(loaded), ca_cert(f->ca)), 0);
	assert_string_equal(ca_trust_domain(loaded), TD);
	assert_int_equal(ca_pin_sha256(ca_cert(f->ca), p1), 0);
	assert_int_equal(ca_pin_sha256(ca_cert(loaded), p2), 0);
	assert_string_equal(p1, p2);
	ca_free(loaded);
	/* never overwrites */
	assert_int_equal(ca_save(f->ca, f->cert_path, f->key_path, &err), -EEXIST);
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, f->key_path, &err), 0);
	ca_free(loaded);
}

/* The loaded CA signs SVIDs that verify against the saved certificate. */
static void test_loaded_root_issues(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct ca *loaded = NULL;
	EVP_PKEY *key = keygen("EC", "P-256");
	X509 *leaf;

	assert_int_equal(ca_save(f->ca, f->cert_path, f->key_path, &err), 0);
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, f->key_path, &err), 0);
	leaf = issue_from_csr(loaded, key, "orders", false, NULL);
	assert_int_equal(verify(ca_cert(f->ca), leaf, 0), 1);
	X509_free(leaf);
	EVP_PKEY_free(key);
	ca_free(loaded);
}

static void test_load_refusals(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct ca *loaded = (struct ca *)1, *other = NULL;
	char link[PATH_MAX + 8], ocert[PATH_MAX + 8], okey[PATH_MAX + 8];

	assert_int_equal(ca_save(f->ca, f->cert_path, f->key_path, &err), 0);
	/* a key file others can read */
	assert_int_equal(chmod(f->key_path, 0640), 0);
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, f->key_path, &err), -EACCES);
	assert_null(loaded);
	assert_non_null(strstr(err.message, "chmod 600"));
	assert_int_equal(chmod(f->key_path, 0600), 0);
	/* a symlinked key */
	snprintf(link, sizeof(link), "%s/link.key", f->dir);
	assert_int_equal(symlink(f->key_path, link), 0);
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, link, &err), -ELOOP);
	/* another trust domain */
	assert_int_equal(ca_load(&loaded, "other.local", f->cert_path, f->key_path, &err), -EINVAL);
	assert_non_null(strstr(err.message, "trust domain"));
	/* a key of another root */
	assert_int_equal(ca_generate(&other, TD, 0, &err), 0);
	snprintf(ocert, sizeof(ocert), "%s/other.pem", f->dir);
	snprintf(okey, sizeof(okey), "%s/other.key", f->dir);
	assert_int_equal(ca_save(other, ocert, okey, &err), 0);
	ca_free(other);
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, okey, &err), -EINVAL);
	assert_non_null(strstr(err.message, "does not belong"));
	/* garbage instead of a certificate */
	assert_int_equal(ca_load(&loaded, TD, okey, okey, &err), -EINVAL);
	assert_non_null(strstr(err.message, "other.key"));
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, ocert, &err), -EACCES);
	/* missing files */
	assert_int_equal(ca_load(&loaded, TD, f->cert_path, "/nonexistent/ca.key", &err), -ENOENT);
	assert_null(loaded);
}

/* ---- CSRs and SVIDs ---- */

static void test_svid_from_p256_csr(void **state)
{
	struct fixture *f = *state;
	static const int uri[] = { GEN_URI };
	static const char *const id[] = { "spiffe://" TD "/svc/orders" };
	EVP_PKEY *key = keygen("EC", "P-256");
	char serial[CA_SERIAL_HEX_MAX], again[CA_SERIAL_HEX_MAX];
	X509 *x = issue_from_csr(f->ca, key, "orders", false, serial);
	uint32_t xku;

	assert_int_equal(verify(ca_cert(f->ca), x, 0), 1);
	assert_int_equal(verify(ca_cert(f->ca), x, X509_PURPOSE_SSL_CLIENT), 1);
	assert_int_equal(verify(ca_cert(f->ca), x, X509_PURPOSE_SSL_SERVER), 1);
	assert_leaf_common(ca_cert(f->ca), x, 3600);
	assert_sans(x, uri, id, 1);
	xku = X509_get_extended_key_usage(x);
	assert_int_equal(xku, XKU_SSL_SERVER | XKU_SSL_CLIENT);
	/* The X509-SVID profile the proxies and control check, for both roles. */
	assert_int_equal(identity_check_svid(x, TD, ROLE_CLIENT, NULL), ID_OK);
	assert_int_equal(identity_check_svid(x, TD, ROLE_SERVER, NULL), ID_OK);
	assert_int_equal(EVP_PKEY_eq(X509_get0_pubkey(x), key), 1);
	assert_subject_cn(x, "orders");
	assert_serial_format(serial);
	assert_int_equal(ca_serial_hex(x, again), 0);
	assert_string_equal(serial, again);
	X509_free(x);
	EVP_PKEY_free(key);
}

static void test_svid_does_not_verify_elsewhere(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	EVP_PKEY *key = keygen("EC", "P-256");
	X509 *x = issue_from_csr(f->ca, key, "orders", false, NULL);
	struct ca *other = NULL;

	assert_int_equal(ca_generate(&other, TD, 0, &err), 0);
	assert_int_equal(verify(ca_cert(other), x, 0), 0);
	ca_free(other);
	X509_free(x);
	EVP_PKEY_free(key);
}

/* Nothing of the CSR but its key reaches the certificate. */
static void test_csr_contents_ignored(void **state)
{
	struct fixture *f = *state;
	static const int uri[] = { GEN_URI };
	static const char *const id[] = { "spiffe://" TD "/svc/orders" };
	EVP_PKEY *key = keygen("EC", "P-256");
	X509 *x = issue_from_csr(f->ca, key, "orders", true, NULL);

	assert_leaf_common(ca_cert(f->ca), x, 3600);
	assert_sans(x, uri, id, 1);
	assert_subject_cn(x, "orders");
	assert_false(X509_check_ca(x));
	X509_free(x);
	EVP_PKEY_free(key);
}

/* docs/design.md fixes ECDSA P-256 for SVIDs: RSA (of any size) and Ed25519 keys
 * are refused with a message that names the key and what to use instead. */
static void test_ed25519_and_rsa_refused(void **state)
{
	assert_key_refused(keygen("ED25519", NULL), "ED25519 key is not accepted: use ECDSA P-256");
	assert_key_refused(keygen("RSA", "2048"), "RSA key is not accepted: use ECDSA P-256");
	assert_key_refused(keygen("RSA", "4096"), "RSA key is not accepted: use ECDSA P-256");
}

/* P-256 written out as explicit curve parameters (openssl ecparam -param_enc explicit). */
static const char explicit_p256_csr[] =
	"-----BEGIN CERTIFICATE REQUEST-----\n"
	"MIIBvDCCAWICAQAwDDEKMAgGA1UEAwwBeDCCAUswggEDBgcqhkjOPQIBMIH3AgEB\n"
	"MCwGByqGSM49AQECIQD/////AAAAAQAAAAAAAAAAAAAAAP///////////////zBb\n"
	"BCD/////AAAAAQAAAAAAAAAAAAAAAP///////////////AQgWsY12Ko6k+ez671V\n"
	"dpiGvGUdBrDMU7D2O848PifSYEsDFQDEnTYIhucEk2pmeOETnSa3gZ9+kARBBGsX\n"
	"0fLhLEJH+Lzm5WOkQPJ3A32BLeszoPShOUXYmMKWT+NC4v4af5uO5+tKfA+eFivO\n"
	"M1drMV7Oy7ZAaDe/UfUCIQD/////AAAAAP//////////vOb6racXnoTzucrC/GMl\n"
	"UQIBAQNCAARmFjQhRYhAufbmLZTUsTew4Au9tMaYHtjWdogf6idRzMcFQw/JfpvJ\n"
	"q+qu9jVxhy3VJKd2OdDO6gnJ1tD9S2izoAAwCgYIKoZIzj0EAwIDSAAwRQIgRWJS\n"
	"ynfiE7IAIzkdIqpjhWFhWlRBMOEVcSOX5iNDbwACIQCFSkPil+IdK7VXYifyKh2o\n"
	"ygH9VF2W5ea0q8/2wNu32w==\n"
	"-----END CERTIFICATE REQUEST-----\n";

static void test_weak_or_foreign_keys_refused(void **state)
{
	assert_csr_refused(explicit_p256_csr, strlen(explicit_p256_csr), "explicit curve parameters");
	assert_key_refused(keygen("RSA", "1024"), "RSA key is not accepted");
	assert_key_refused(keygen("EC", "P-384"), "EC key on curve secp384r1 is not accepted: use P-256");
	assert_key_refused(keygen("EC", "secp256k1"), "P-256");
	assert_key_refused(keygen("ED448", NULL), "ED448");
}

static void test_bad_signature_refused(void **state)
{
	EVP_PKEY *key = keygen("EC", "P-256");
	X509_REQ *req = make_req(key, "x", false), *bad;
	unsigned char *der = NULL;
	const unsigned char *p;
	int len = i2d_X509_REQ(req, &der);
	char *pem;

	assert_true(len > 0);
	der[len - 1] ^= 0x01; /* last byte of the signature */
	p = der;
	bad = d2i_X509_REQ(NULL, &p, len);
	assert_non_null(bad);
	pem = req_pem(bad);
	assert_csr_refused(pem, strlen(pem), "signature does not verify");
	free(pem);
	X509_REQ_free(bad);
	OPENSSL_free(der);
	X509_REQ_free(req);
	EVP_PKEY_free(key);
}

static void test_malformed_csrs_refused(void **state)
{
	struct fixture *f = *state;
	EVP_PKEY *key = keygen("EC", "P-256");
	char *pem = csr_pem(key, "x", false);
	char *cert = ca_pem_encode((X509 *const[]){ ca_cert(f->ca) }, 1);
	char *big = malloc(CA_CSR_MAX + 1);
	static const char junk[] = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
	                           "-----END CERTIFICATE REQUEST-----\n";

	assert_csr_refused("", 0, "bytes");
	assert_csr_refused(NULL, 10, "bytes");
	assert_csr_refused("hello", 5, "not a PEM certificate request");
	assert_csr_refused(junk, strlen(junk), "not a PEM certificate request");
	assert_csr_refused(cert, strlen(cert), "not a PEM certificate request");
	assert_csr_refused(pem, strlen(pem) / 2, "not a PEM certificate request");
	memset(big, ' ', CA_CSR_MAX + 1);
	memcpy(big, pem, strlen(pem));
	assert_csr_refused(big, CA_CSR_MAX + 1, "bytes");
	free(big);
	free(cert);
	free(pem);
	EVP_PKEY_free(key);
}

static void test_issue_bad_arguments(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	EVP_PKEY *key = keygen("EC", "P-256");
	X509 *x = (X509 *)1;

	assert_int_equal(ca_issue_svid(f->ca, "Orders", key, 3600, &x, NULL, &err), -EINVAL);
	assert_null(x);
	assert_string_equal(err.path, "service");
	assert_int_equal(ca_issue_svid(f->ca, "a_b", key, 3600, &x, NULL, &err), -EINVAL);
	assert_int_equal(ca_issue_svid(f->ca, "", key, 3600, &x, NULL, &err), -EINVAL);
	assert_int_equal(ca_issue_svid(f->ca, NULL, key, 3600, &x, NULL, &err), -EINVAL);
	assert_int_equal(ca_issue_svid(f->ca, "orders", key, 0, &x, NULL, &err), -EINVAL);
	assert_string_equal(err.path, "ttl");
	assert_int_equal(ca_issue_svid(f->ca, "orders", key, CA_TTL_MAX + 1, &x, NULL, &err),
	                 -EINVAL);
	assert_int_equal(ca_issue_svid(f->ca, "orders", NULL, 3600, &x, NULL, &err), -EINVAL);
	assert_null(x);
	EVP_PKEY_free(key);
}

/* A leaf never outlives its root. */
static void test_ttl_clamped_to_root(void **state)
{
	struct meshlet_err err = {0};
	EVP_PKEY *key = keygen("EC", "P-256");
	struct ca *ca = NULL;
	int64_t root_na, leaf_na;
	X509 *x = NULL;

	assert_int_equal(ca_generate(&ca, TD, 600, &err), 0);
	assert_int_equal(ca_issue_svid(ca, "orders", key, 3600, &x, NULL, &err), 0);
	assert_int_equal(ca_cert_not_after(ca_cert(ca), &root_na), 0);
	assert_int_equal(ca_cert_not_after(x, &leaf_na), 0);
	assert_int_equal(leaf_na, root_na);
	assert_int_equal(verify(ca_cert(ca), x, 0), 1);
	X509_free(x);
	ca_free(ca);
	EVP_PKEY_free(key);
}

static void test_serials_unique(void **state)
{
	enum { N = 64 };
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	EVP_PKEY *key = keygen("EC", "P-256");
	char serials[N][CA_SERIAL_HEX_MAX];
	int i, j;

	for (i = 0; i < N; i++) {
		X509 *x = NULL;

		assert_int_equal(ca_issue_svid(f->ca, "orders", key, 60, &x, serials[i], &err), 0);
		assert_serial_format(serials[i]);
		for (j = 0; j < i; j++)
			assert_string_not_equal(serials[i], serials[j]);
		X509_free(x);
	}
	EVP_PKEY_free(key);
}

static void test_server_cert(void **state)
{
	struct fixture *f = *state;
	static const char *const sans[] = { "control.mesh.local", "localhost", "127.0.0.1", "::1" };
	static const int types[] = { GEN_URI, GEN_DNS, GEN_DNS, GEN_IPADD, GEN_IPADD };
	static const char *const texts[] = { "spiffe://" TD "/control", "control.mesh.local",
	                                     "localhost", "127.0.0.1", "::1" };
	struct meshlet_err err = {0};
	EVP_PKEY *key = keygen("EC", "P-256");
	char serial[CA_SERIAL_HEX_MAX];
	X509 *x = NULL;

	assert_int_equal(ca_issue_server(f->ca, key, sans, 4, 86400, &x, serial, &err), 0);
	assert_leaf_common(ca_cert(f->ca), x, 86400);
	assert_sans(x, types, texts, 5);
	assert_int_equal(X509_get_extended_key_usage(x), XKU_SSL_SERVER);
	assert_int_equal(verify(ca_cert(f->ca), x, X509_PURPOSE_SSL_SERVER), 1);
	assert_int_equal(verify(ca_cert(f->ca), x, X509_PURPOSE_SSL_CLIENT), 0);
	assert_int_equal(X509_check_host(x, "control.mesh.local", 0, 0, NULL), 1);
	assert_int_equal(X509_check_ip_asc(x, "127.0.0.1", 0), 1);
	assert_subject_cn(x, "meshlet-control");
	assert_serial_format(serial);
	X509_free(x);
	EVP_PKEY_free(key);
}

static void test_server_cert_bad_sans(void **state)
{
	struct fixture *f = *state;
	static const char *const bad[] = { "a.example,URI:spiffe://mesh.local/svc/x", "*.mesh.local",
	                                   "-a.example", "a..b", "", "a b", "a.example.", NULL };
	struct meshlet_err err = {0};
	EVP_PKEY *key = keygen("EC", "P-256");
	X509 *x = NULL;
	int i;

	for (i = 0; bad[i]; i++) {
		const char *sans[] = { "ok.example", bad[i] };

		assert_int_equal(ca_issue_server(f->ca, key, sans, 2, 3600, &x, NULL, &err), -EINVAL);
		assert_null(x);
		assert_string_equal(err.path, "sans[1]");
	}
	assert_int_equal(ca_issue_server(f->ca, key, NULL, 0, 3600, &x, NULL, &err), 0);
	X509_free(x);
	EVP_PKEY_free(key);
}

/* ---- helpers for control ---- */

static void test_pin(void **state)
{
	struct fixture *f = *state;
	X509 *root = ca_cert(f->ca);
	unsigned char *der = NULL, md[32];
	char pin[CA_PIN_HEX_LEN], want[CA_PIN_HEX_LEN];
	int len = i2d_PUBKEY(X509_get0_pubkey(root), &der), i;

	assert_true(len > 0);
	assert_int_equal(EVP_Digest(der, (size_t)len, md, NULL, EVP_sha256(), NULL), 1);
	for (i = 0; i < 32; i++)
		snprintf(want + 2 * i, 3, "%02x", md[i]);
	assert_int_equal(ca_pin_sha256(root, pin), 0);
	assert_string_equal(pin, want);
	OPENSSL_free(der);
}

static void test_pem_chain(void **state)
{
	struct fixture *f = *state;
	EVP_PKEY *key = keygen("EC", "P-256");
	X509 *leaf = issue_from_csr(f->ca, key, "orders", false, NULL);
	X509 *chain[2] = { leaf, ca_cert(f->ca) };
	char *pem = ca_pem_encode(chain, 2);
	BIO *b = BIO_new_mem_buf(pem, -1);
	X509 *a = PEM_read_bio_X509(b, NULL, NULL, NULL);
	X509 *c = PEM_read_bio_X509(b, NULL, NULL, NULL);

	assert_non_null(pem);
	assert_int_equal(X509_cmp(a, leaf), 0);
	assert_int_equal(X509_cmp(c, ca_cert(f->ca)), 0);
	assert_null(PEM_read_bio_X509(b, NULL, NULL, NULL));
	ERR_clear_error();
	X509_free(a);
	X509_free(c);
	BIO_free(b);
	free(pem);
	pem = ca_pem_encode(NULL, 0);
	assert_string_equal(pem, "");
	free(pem);
	X509_free(leaf);
	EVP_PKEY_free(key);
}

static void test_time_and_serial_text(void **state)
{
	char t[CA_TIME_LEN], s[CA_SERIAL_HEX_MAX];

	assert_int_equal(ca_time_rfc3339(0, t), 0);
	assert_string_equal(t, "1970-01-01T00:00:00Z");
	assert_int_equal(ca_time_rfc3339(1700000000, t), 0);
	assert_string_equal(t, "2023-11-14T22:13:20Z");
	assert_int_equal(ca_time_rfc3339(253402300799LL, t), 0);
	assert_string_equal(t, "9999-12-31T23:59:59Z");
	assert_int_equal(ca_time_rfc3339(253402300800LL, t), -ERANGE);
	assert_int_equal(ca_serial_normalize("4A:0b:FF", s), 0);
	assert_string_equal(s, "4a0bff");
	assert_int_equal(ca_serial_normalize("0004a", s), 0);
	assert_string_equal(s, "4a");
	assert_int_equal(ca_serial_normalize("00", s), 0);
	assert_string_equal(s, "0");
	assert_int_equal(ca_serial_normalize("", s), -EINVAL);
	assert_int_equal(ca_serial_normalize(":", s), -EINVAL);
	assert_int_equal(ca_serial_normalize("0x4a", s), -EINVAL);
	assert_int_equal(ca_serial_normalize("4g", s), -EINVAL);
	assert_int_equal(ca_serial_normalize("1234567890123456789012345678901234567890", s), 0);
	assert_int_equal(ca_serial_normalize("12345678901234567890123456789012345678901", s),
	                 -EINVAL);
}

/* Verifies leaf against trusted roots with untrusted intermediates, as a
 * TLS client does with a server's chain. */
static int verify_with(X509 *const *trusted, int n_trusted, X509 *const *untrusted,
                       int n_untrusted, X509 *leaf)
{
	X509_STORE *st = X509_STORE_new();
	X509_STORE_CTX *ctx = X509_STORE_CTX_new();
	STACK_OF(X509) *sk = sk_X509_new_null();
	int ok;

	for (int i = 0; i < n_trusted; i++)
		assert_int_equal(X509_STORE_add_cert(st, trusted[i]), 1);
	for (int i = 0; i < n_untrusted; i++)
		assert_true(sk_X509_push(sk, untrusted[i]) > 0);
	assert_int_equal(X509_STORE_CTX_init(ctx, st, leaf, sk), 1);
	assert_int_equal(X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_SERVER), 1);
	ok = X509_verify_cert(ctx);
	X509_STORE_CTX_free(ctx);
	X509_STORE_free(st);
	sk_X509_free(sk);
	ERR_clear_error();
	return ok;
}

/* The new root cross-signed by the old: a client holding only the old root
 * verifies what the new root signs, through it. */
static void test_cross_sign(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct ca *next = NULL, *foreign = NULL;
	EVP_PKEY *key = NULL;
	X509 *cross = NULL, *leaf = NULL, *old_root = ca_cert(f->ca), *new_root;
	const char *sans[] = {"localhost"};
	char pin_new[CA_PIN_HEX_LEN], pin_cross[CA_PIN_HEX_LEN];

	assert_int_equal(ca_generate(&next, TD, 0, &err), 0);
	new_root = ca_cert(next);
	assert_int_equal(ca_cross_sign(f->ca, next, &cross, &err), 0);
	assert_non_null(cross);

	/* Same subject, key and key identifier as the new root; issued by the old. */
	assert_int_equal(X509_NAME_cmp(X509_get_subject_name(cross), X509_get_subject_name(new_root)), 0);
	assert_int_equal(X509_NAME_cmp(X509_get_issuer_name(cross), X509_get_subject_name(old_root)), 0);
	assert_int_equal(ca_pin_sha256(cross, pin_cross), 0);
	assert_int_equal(ca_pin_sha256(new_root, pin_new), 0);
	assert_string_equal(pin_cross, pin_new);
	assert_int_equal(ASN1_OCTET_STRING_cmp(X509_get0_subject_key_id(cross),
	                                       X509_get0_subject_key_id(new_root)), 0);
	assert_int_equal(ASN1_OCTET_STRING_cmp(X509_get0_authority_key_id(cross),
	                                       X509_get0_subject_key_id(old_root)), 0);
	assert_int_equal(X509_check_issued(old_root, cross), X509_V_OK);
	assert_int_equal(X509_self_signed(cross, 1), 0);
	assert_int_equal(X509_check_ca(cross), 1);
	assert_ext_crit(cross, NID_basic_constraints, 1);
	assert_ext_crit(cross, NID_key_usage, 1);
	assert_true(X509_cmp_time(X509_get0_notAfter(cross), NULL) > 0);
	assert_true(ASN1_TIME_compare(X509_get0_notAfter(cross), X509_get0_notAfter(old_root)) <= 0);

	/* A server certificate of the new root. */
	assert_int_equal(ca_new_key(&key), 0);
	assert_int_equal(ca_issue_server(next, key, sans, 1, 3600, &leaf, NULL, &err), 0);
	/* Old root only: not without the cross-signed certificate, yes with it. */
	assert_int_equal(verify_with(&old_root, 1, NULL, 0, leaf), 0);
	assert_int_equal(verify_with(&old_root, 1, (X509 *[]){ cross, old_root }, 2, leaf), 1);
	/* New root, or both: still verifies (the trusted root is found first). */
	assert_int_equal(verify_with(&new_root, 1, (X509 *[]){ cross, old_root }, 2, leaf), 1);
	assert_int_equal(verify_with((X509 *[]){ old_root, new_root }, 2,
	                             (X509 *[]){ cross, old_root }, 2, leaf), 1);

	/* Roots of another trust domain are not cross-signed. */
	assert_int_equal(ca_generate(&foreign, "other.local", 0, &err), 0);
	X509_free(cross);
	cross = NULL;
	assert_int_equal(ca_cross_sign(f->ca, foreign, &cross, &err), -EINVAL);
	assert_null(cross);

	ca_free(foreign);
	ca_free(next);
	X509_free(leaf);
	EVP_PKEY_free(key);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
	const struct CMUnitTest tests[] = {
		T(test_root_properties),
		T(test_root_bad_arguments),
		T(test_root_save_load),
		T(test_loaded_root_issues),
		T(test_load_refusals),
		T(test_svid_from_p256_csr),
		T(test_svid_does_not_verify_elsewhere),
		T(test_csr_contents_ignored),
		T(test_ed25519_and_rsa_refused),
		T(test_weak_or_foreign_keys_refused),
		T(test_bad_signature_refused),
		T(test_malformed_csrs_refused),
		T(test_issue_bad_arguments),
		T(test_ttl_clamped_to_root),
		T(test_serials_unique),
		T(test_server_cert),
		T(test_server_cert_bad_sans),
		T(test_pin),
		T(test_pem_chain),
		T(test_time_and_serial_text),
		T(test_cross_sign),
	};
#undef T

	umask(022);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
