/* Unit tests for lib/identity.c: SPIFFE ID parsing and X.509-SVID checks. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "meshlet/identity.h"

#define TD "mesh.local"

struct id_case {
	const char *uri;
	bool ok;
	const char *td;      /* expected when ok */
	const char *path;    /* expected when ok */
	const char *service; /* expected when ok */
};

static const struct id_case id_cases[] = {
	/* valid */
	{ "spiffe://mesh.local/svc/orders", true, "mesh.local", "/svc/orders", "orders" },
	{ "spiffe://mesh.local", true, "mesh.local", "", "" },
	{ "spiffe://a", true, "a", "", "" },
	{ "spiffe://my_td-1.example.org/svc/a", true, "my_td-1.example.org", "/svc/a", "a" },
	{ "spiffe://mesh.local/svc/a-b-9", true, "mesh.local", "/svc/a-b-9", "a-b-9" },
	{ "spiffe://mesh.local/ns/prod/sa/Web_1.x", true, "mesh.local", "/ns/prod/sa/Web_1.x", "" },
	{ "spiffe://mesh.local/svc/Orders", true, "mesh.local", "/svc/Orders", "" },
	{ "spiffe://mesh.local/svc/orders/extra", true, "mesh.local", "/svc/orders/extra", "" },
	{ "spiffe://mesh.local/svc", true, "mesh.local", "/svc", "" },
	{ "spiffe://mesh.local/svc/-orders", true, "mesh.local", "/svc/-orders", "" },
	{ "spiffe://mesh.local/svc/orders-", true, "mesh.local", "/svc/orders-", "" },
	{ "spiffe://mesh.local/svc/a_b", true, "mesh.local", "/svc/a_b", "" },
	{ "spiffe://mesh.local/svc/...", true, "mesh.local", "/svc/...", "" },
	{ "spiffe://mesh.local/.a/..b", true, "mesh.local", "/.a/..b", "" },
	{ "spiffe://mesh.local/svc/"
	  "a23456789012345678901234567890123456789012345678901234567890123", true,
	  "mesh.local", "/svc/a23456789012345678901234567890123456789012345678901234567890123",
	  "a23456789012345678901234567890123456789012345678901234567890123" },
	{ "spiffe://mesh.local/svc/"
	  "a234567890123456789012345678901234567890123456789012345678901234", true,
	  "mesh.local", "/svc/a234567890123456789012345678901234567890123456789012345678901234",
	  "" },
	/* invalid */
	{ "", false, NULL, NULL, NULL },
	{ "spiffe://", false, NULL, NULL, NULL },
	{ "spiffe:///svc/a", false, NULL, NULL, NULL },
	{ "SPIFFE://mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "Spiffe://mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe:/mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "https://mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://Mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local:8443/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://user@mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://user:pw@mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/a?x=1", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/a#frag", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local?x", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc%2Fa", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/%61", false, NULL, NULL, NULL },
	{ "spiffe://mesh%2elocal/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local//svc/a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc//a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/./svc/a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/./a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/../a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/..", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/.", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/a/", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/a b", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/a\\b", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/caf\xc3\xa9", false, NULL, NULL, NULL },
	{ "spiffe://mesh local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://[::1]/svc/a", false, NULL, NULL, NULL },
	{ " spiffe://mesh.local/svc/a", false, NULL, NULL, NULL },
	{ "spiffe://mesh.local/svc/a\n", false, NULL, NULL, NULL },
};

static void test_parse_table(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(id_cases) / sizeof(id_cases[0]); i++) {
		const struct id_case *c = &id_cases[i];
		struct spiffe_id id;
		const char *why = NULL;
		int rc = identity_parse(c->uri, strlen(c->uri), &id, &why);

		if (c->ok != (rc == 0))
			fail_msg("case %zu '%s': rc %d (%s)", i, c->uri, rc, why ? why : "");
		if (!c->ok) {
			assert_int_equal(rc, -EINVAL);
			assert_non_null(why);
			continue;
		}
		assert_string_equal(id.uri, c->uri);
		assert_string_equal(id.trust_domain, c->td);
		assert_string_equal(id.path, c->path);
		assert_string_equal(id.service, c->service);
		assert_ptr_equal(id.path, id.uri + strlen("spiffe://") + strlen(c->td));
	}
}

/* The reasons are meant for operators: spot-check that they say why. */
static void test_parse_reasons(void **state)
{
	static const struct { const char *uri, *why; } cases[] = {
		{ "spiffe://mesh.local:1/svc/a", "port not allowed" },
		{ "spiffe://u@mesh.local/svc/a", "userinfo not allowed" },
		{ "spiffe://mesh.local/a?b", "query not allowed" },
		{ "spiffe://mesh.local/a#b", "fragment not allowed" },
		{ "spiffe://mesh.local/a%2Fb", "percent-encoding not allowed" },
		{ "spiffe://MESH.local/a", "trust domain must be lower-case" },
		{ "spiffe://mesh.local/a/", "trailing slash not allowed" },
		{ "spiffe://mesh.local/a//b", "empty path segment" },
		{ "spiffe://mesh.local/a/../b", "dot segment not allowed" },
		{ "spiffe:///a", "empty trust domain" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct spiffe_id id;
		const char *why = NULL;
		assert_int_equal(identity_parse(cases[i].uri, strlen(cases[i].uri), &id, &why), -EINVAL);
		assert_string_equal(why, cases[i].why);
	}
}

static void test_parse_embedded_nul(void **state)
{
	static const char uri[] = "spiffe://mesh.local/svc/a\0b";
	struct spiffe_id id;
	const char *why = NULL;

	(void)state;
	assert_int_equal(identity_parse(uri, sizeof(uri) - 1, &id, &why), -EINVAL);
	assert_string_equal(why, "embedded NUL");
	/* len counts bytes: the part before the NUL alone is fine. */
	assert_int_equal(identity_parse(uri, strlen(uri), &id, &why), 0);
	assert_string_equal(id.service, "a");
}

/* len need not reach a NUL: the ID is the first len bytes. */
static void test_parse_not_terminated(void **state)
{
	static const char buf[] = "spiffe://mesh.local/svc/orders/more";
	struct spiffe_id id;

	(void)state;
	assert_int_equal(identity_parse(buf, strlen("spiffe://mesh.local/svc/orders"), &id, NULL), 0);
	assert_string_equal(id.uri, "spiffe://mesh.local/svc/orders");
	assert_string_equal(id.service, "orders");
}

/* Builds "spiffe://mesh.local/aaa.../aaa..." of exactly len bytes (malloc'd). */
static char *long_id(size_t len)
{
	static const char prefix[] = "spiffe://" TD;
	char *s = malloc(len + 1);
	size_t n = sizeof(prefix) - 1;

	assert_non_null(s);
	memcpy(s, prefix, n);
	for (; n < len; n++)
		s[n] = ((n - (sizeof(prefix) - 1)) % 64 == 0) ? '/' : 'a';
	s[len - 1] = 'a'; /* never a trailing slash */
	s[len] = '\0';
	return s;
}

static void test_parse_length_limits(void **state)
{
	struct spiffe_id id;
	const char *why = NULL;
	char *max = long_id(SPIFFE_ID_MAX);
	char *over = long_id(SPIFFE_ID_MAX + 1);
	char td[TRUST_DOMAIN_MAX + 2 + sizeof("spiffe://")];

	(void)state;
	assert_int_equal(identity_parse(max, SPIFFE_ID_MAX, &id, &why), 0);
	assert_int_equal(strlen(id.uri), SPIFFE_ID_MAX);
	assert_int_equal(identity_parse(over, SPIFFE_ID_MAX + 1, &id, &why), -EINVAL);
	assert_string_equal(why, "longer than 2048 bytes");
	free(max);
	free(over);

	/* Trust domain of exactly 255 bytes, then 256. */
	strcpy(td, "spiffe://");
	memset(td + 9, 'a', TRUST_DOMAIN_MAX);
	td[9 + TRUST_DOMAIN_MAX] = '\0';
	assert_int_equal(identity_parse(td, strlen(td), &id, &why), 0);
	assert_int_equal(strlen(id.trust_domain), TRUST_DOMAIN_MAX);
	strcat(td, "a");
	assert_int_equal(identity_parse(td, strlen(td), &id, &why), -EINVAL);
	assert_string_equal(why, "trust domain too long");
}

static void test_parse_untouched_on_failure(void **state)
{
	struct spiffe_id id;
	const char *why = NULL;

	(void)state;
	memset(&id, 0x5a, sizeof(id));
	assert_int_equal(identity_parse("spiffe://mesh.local/a/", 22, &id, &why), -EINVAL);
	assert_int_equal((unsigned char)id.uri[0], 0x5a);
	assert_int_equal(identity_parse(NULL, 0, &id, &why), -EINVAL);
	assert_int_equal(identity_parse("spiffe://a", 10, NULL, NULL), -EINVAL);
}

static void test_valid_service(void **state)
{
	(void)state;
	assert_true(identity_valid_service("a"));
	assert_true(identity_valid_service("0"));
	assert_true(identity_valid_service("orders"));
	assert_true(identity_valid_service("a-b--c9"));
	assert_true(identity_valid_service(
		"a23456789012345678901234567890123456789012345678901234567890123"));
	assert_false(identity_valid_service(
		"a234567890123456789012345678901234567890123456789012345678901234"));
	assert_false(identity_valid_service(""));
	assert_false(identity_valid_service(NULL));
	assert_false(identity_valid_service("-a"));
	assert_false(identity_valid_service("a-"));
	assert_false(identity_valid_service("-"));
	assert_false(identity_valid_service("Orders"));
	assert_false(identity_valid_service("a_b"));
	assert_false(identity_valid_service("a.b"));
	assert_false(identity_valid_service("a/b"));
}

static void test_valid_trust_domain(void **state)
{
	char big[TRUST_DOMAIN_MAX + 2];

	(void)state;
	assert_true(identity_valid_trust_domain("mesh.local"));
	assert_true(identity_valid_trust_domain("a_b-c.0"));
	assert_false(identity_valid_trust_domain(""));
	assert_false(identity_valid_trust_domain(NULL));
	assert_false(identity_valid_trust_domain("Mesh.local"));
	assert_false(identity_valid_trust_domain("mesh.local:80"));
	assert_false(identity_valid_trust_domain("mesh/local"));
	memset(big, 'a', TRUST_DOMAIN_MAX);
	big[TRUST_DOMAIN_MAX] = '\0';
	assert_true(identity_valid_trust_domain(big));
	big[TRUST_DOMAIN_MAX] = 'a';
	big[TRUST_DOMAIN_MAX + 1] = '\0';
	assert_false(identity_valid_trust_domain(big));
}

static void test_format(void **state)
{
	char out[SPIFFE_ID_MAX + 1];

	(void)state;
	assert_int_equal(identity_format(out, sizeof(out), TD, "orders"), 0);
	assert_string_equal(out, "spiffe://mesh.local/svc/orders");
	assert_int_equal(identity_format(out, sizeof(out), TD, "Orders"), -EINVAL);
	assert_string_equal(out, "");
	assert_int_equal(identity_format(out, sizeof(out), "MESH", "orders"), -EINVAL);
	assert_int_equal(identity_format(out, 10, TD, "orders"), -EINVAL);
	assert_int_equal(identity_format(NULL, 0, TD, "orders"), -EINVAL);
}

static void test_reason_str(void **state)
{
	(void)state;
	assert_string_equal(identity_reason_str(ID_OK), "ok");
	assert_string_equal(identity_reason_str(ID_NO_CERT), "no_certificate");
	assert_string_equal(identity_reason_str(ID_NO_URI_SAN), "no_uri_san");
	assert_string_equal(identity_reason_str(ID_MULTIPLE_URI_SANS), "multiple_uri_sans");
	assert_string_equal(identity_reason_str(ID_BAD_SPIFFE_ID), "bad_spiffe_id");
	assert_string_equal(identity_reason_str(ID_WRONG_TRUST_DOMAIN), "wrong_trust_domain");
	assert_string_equal(identity_reason_str(ID_NOT_A_SERVICE), "not_a_service");
	assert_string_equal(identity_reason_str(ID_LEAF_IS_CA), "leaf_is_ca");
	assert_string_equal(identity_reason_str(ID_BAD_KEY_USAGE), "bad_key_usage");
	assert_string_equal(identity_reason_str(ID_BAD_EXT_KEY_USAGE), "bad_ext_key_usage");
	assert_string_equal(identity_reason_str(ID_WRONG_IDENTITY), "wrong_identity");
	assert_string_equal(identity_reason_str(ID_REVOKED), "revoked");
	assert_string_equal(identity_reason_str(ID_NO_BASIC_CONSTRAINTS), "no_basic_constraints");
	assert_string_equal(identity_reason_str(ID_REASON_COUNT), "unknown");
	assert_string_equal(identity_reason_str((enum identity_reason)-1), "unknown");
}

/* ---- X.509-SVID checks against certificates built here ---- */

/* Extensions of a test certificate: NULL fields are left out. */
struct cert_spec {
	const char *san;   /* subjectAltName in openssl.cnf syntax */
	const char *bc;    /* basicConstraints */
	const char *ku;    /* keyUsage */
	const char *eku;   /* extendedKeyUsage */
	bool san_twice;    /* add the subjectAltName extension a second time */
};

static EVP_PKEY *test_key;

static int setup_key(void **state)
{
	(void)state;
	test_key = EVP_EC_gen("P-256");
	return test_key ? 0 : -1;
}

static int teardown_key(void **state)
{
	(void)state;
	EVP_PKEY_free(test_key);
	test_key = NULL;
	return 0;
}

static void add_ext(X509 *x, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509_EXTENSION *ext;

	X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
	ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
	assert_non_null(ext);
	assert_int_equal(X509_add_ext(x, ext, -1), 1);
	X509_EXTENSION_free(ext);
}

/* A self-signed P-256 certificate with the extensions of spec; chain
 * validity is not identity_check_svid's concern, so self-signed will do. */
static X509 *make_cert(const struct cert_spec *spec)
{
	X509 *x = X509_new();
	X509_NAME *name;

	assert_non_null(x);
	assert_int_equal(X509_set_version(x, X509_VERSION_3), 1);
	assert_int_equal(ASN1_INTEGER_set(X509_get_serialNumber(x), 42), 1);
	name = X509_get_subject_name(x);
	assert_int_equal(X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
	                 (const unsigned char *)"meshlet test", -1, -1, 0), 1);
	assert_int_equal(X509_set_issuer_name(x, name), 1);
	assert_non_null(X509_gmtime_adj(X509_getm_notBefore(x), -60));
	assert_non_null(X509_gmtime_adj(X509_getm_notAfter(x), 3600));
	assert_int_equal(X509_set_pubkey(x, test_key), 1);
	if (spec->san)
		add_ext(x, NID_subject_alt_name, spec->san);
	if (spec->san && spec->san_twice)
		add_ext(x, NID_subject_alt_name, spec->san);
	if (spec->bc)
		add_ext(x, NID_basic_constraints, spec->bc);
	if (spec->ku)
		add_ext(x, NID_key_usage, spec->ku);
	if (spec->eku)
		add_ext(x, NID_ext_key_usage, spec->eku);
	assert_true(X509_sign(x, test_key, EVP_sha256()) > 0);
	return x;
}

/* A certificate whose only SAN is a URI of exactly these n bytes (which
 * may hold a NUL: the config syntax cannot express that). */
static X509 *make_cert_raw_uri(const char *uri, int n)
{
	struct cert_spec spec = { .bc = "critical,CA:FALSE", .ku = "critical,digitalSignature",
	                          .eku = "serverAuth,clientAuth" };
	X509 *x = make_cert(&spec);
	GENERAL_NAMES *names = GENERAL_NAMES_new();
	GENERAL_NAME *gn = GENERAL_NAME_new();
	ASN1_IA5STRING *s = ASN1_IA5STRING_new();

	assert_true(names && gn && s);
	assert_int_equal(ASN1_STRING_set(s, uri, n), 1);
	GENERAL_NAME_set0_value(gn, GEN_URI, s);
	assert_true(sk_GENERAL_NAME_push(names, gn) > 0);
	assert_int_equal(X509_add1_ext_i2d(x, NID_subject_alt_name, names, 0, X509V3_ADD_DEFAULT), 1);
	GENERAL_NAMES_free(names);
	assert_true(X509_sign(x, test_key, EVP_sha256()) > 0);
	return x;
}

#define SVID_SAN "URI:spiffe://mesh.local/svc/orders"
#define SVID_BC "critical,CA:FALSE"
#define SVID_KU "critical,digitalSignature"
#define SVID_EKU "serverAuth,clientAuth"

struct svid_case {
	const char *name;
	struct cert_spec spec;
	enum identity_reason as_client;
	enum identity_reason as_server;
};

static const struct svid_case svid_cases[] = {
	{ "valid SVID", { SVID_SAN, SVID_BC, SVID_KU, SVID_EKU, false }, ID_OK, ID_OK },
	{ "valid, DNS SAN too", { SVID_SAN ",DNS:orders.mesh.local", SVID_BC, SVID_KU, SVID_EKU, false },
	  ID_OK, ID_OK },
	/* X509-SVID profile: basicConstraints, keyUsage and extKeyUsage must be there. */
	{ "no extensions but SAN", { SVID_SAN, NULL, NULL, NULL, false },
	  ID_NO_BASIC_CONSTRAINTS, ID_NO_BASIC_CONSTRAINTS },
	{ "no basicConstraints", { SVID_SAN, NULL, SVID_KU, SVID_EKU, false },
	  ID_NO_BASIC_CONSTRAINTS, ID_NO_BASIC_CONSTRAINTS },
	{ "no keyUsage", { SVID_SAN, SVID_BC, NULL, SVID_EKU, false },
	  ID_BAD_KEY_USAGE, ID_BAD_KEY_USAGE },
	{ "no EKU", { SVID_SAN, SVID_BC, SVID_KU, NULL, false },
	  ID_BAD_EXT_KEY_USAGE, ID_BAD_EXT_KEY_USAGE },
	{ "non-critical basicConstraints", { SVID_SAN, "CA:FALSE", SVID_KU, SVID_EKU, false },
	  ID_OK, ID_OK },
	{ "CA:TRUE, no keyUsage", { SVID_SAN, "critical,CA:TRUE", NULL, SVID_EKU, false },
	  ID_LEAF_IS_CA, ID_LEAF_IS_CA },
	{ "EKU anyExtendedKeyUsage only", { SVID_SAN, SVID_BC, SVID_KU, "anyExtendedKeyUsage",
	  false }, ID_BAD_EXT_KEY_USAGE, ID_BAD_EXT_KEY_USAGE },
	{ "no SAN", { NULL, SVID_BC, SVID_KU, SVID_EKU, false }, ID_NO_URI_SAN, ID_NO_URI_SAN },
	{ "DNS SAN only", { "DNS:orders.mesh.local", SVID_BC, SVID_KU, SVID_EKU, false },
	  ID_NO_URI_SAN, ID_NO_URI_SAN },
	{ "two URI SANs", { SVID_SAN ",URI:spiffe://mesh.local/svc/admin", SVID_BC, SVID_KU,
	  SVID_EKU, false }, ID_MULTIPLE_URI_SANS, ID_MULTIPLE_URI_SANS },
	{ "SAN extension twice", { SVID_SAN, SVID_BC, SVID_KU, SVID_EKU, true },
	  ID_MULTIPLE_URI_SANS, ID_MULTIPLE_URI_SANS },
	{ "other trust domain", { "URI:spiffe://evil.local/svc/orders", SVID_BC, SVID_KU,
	  SVID_EKU, false }, ID_WRONG_TRUST_DOMAIN, ID_WRONG_TRUST_DOMAIN },
	{ "bad URI", { "URI:spiffe://mesh.local/svc/../orders", SVID_BC, SVID_KU, SVID_EKU, false },
	  ID_BAD_SPIFFE_ID, ID_BAD_SPIFFE_ID },
	{ "https URI", { "URI:https://mesh.local/svc/orders", SVID_BC, SVID_KU, SVID_EKU, false },
	  ID_BAD_SPIFFE_ID, ID_BAD_SPIFFE_ID },
	{ "CA:TRUE leaf", { SVID_SAN, "critical,CA:TRUE", SVID_KU, SVID_EKU, false },
	  ID_LEAF_IS_CA, ID_LEAF_IS_CA },
	{ "keyCertSign", { SVID_SAN, SVID_BC, "critical,digitalSignature,keyCertSign", SVID_EKU,
	  false }, ID_LEAF_IS_CA, ID_LEAF_IS_CA },
	{ "cRLSign", { SVID_SAN, SVID_BC, "critical,digitalSignature,cRLSign", SVID_EKU, false },
	  ID_LEAF_IS_CA, ID_LEAF_IS_CA },
	{ "no digitalSignature", { SVID_SAN, SVID_BC, "critical,keyAgreement", SVID_EKU, false },
	  ID_BAD_KEY_USAGE, ID_BAD_KEY_USAGE },
	{ "EKU serverAuth only", { SVID_SAN, SVID_BC, SVID_KU, "serverAuth", false },
	  ID_BAD_EXT_KEY_USAGE, ID_OK },
	{ "EKU clientAuth only", { SVID_SAN, SVID_BC, SVID_KU, "clientAuth", false },
	  ID_OK, ID_BAD_EXT_KEY_USAGE },
	{ "EKU codeSigning only", { SVID_SAN, SVID_BC, SVID_KU, "codeSigning", false },
	  ID_BAD_EXT_KEY_USAGE, ID_BAD_EXT_KEY_USAGE },
	{ "non-service path", { "URI:spiffe://mesh.local/ns/prod", SVID_BC, SVID_KU, SVID_EKU,
	  false }, ID_OK, ID_OK },
};

static void test_svid_table(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(svid_cases) / sizeof(svid_cases[0]); i++) {
		const struct svid_case *c = &svid_cases[i];
		X509 *x = make_cert(&c->spec);
		enum identity_reason rc = identity_check_svid(x, TD, ROLE_CLIENT, NULL);
		enum identity_reason rs = identity_check_svid(x, TD, ROLE_SERVER, NULL);

		X509_free(x);
		if (rc != c->as_client || rs != c->as_server)
			fail_msg("%s: client %s (want %s), server %s (want %s)", c->name,
			         identity_reason_str(rc), identity_reason_str(c->as_client),
			         identity_reason_str(rs), identity_reason_str(c->as_server));
	}
}

static void test_svid_fills_out(void **state)
{
	const struct cert_spec spec = { SVID_SAN, SVID_BC, SVID_KU, SVID_EKU, false };
	const struct cert_spec other = { "URI:spiffe://mesh.local/ns/prod", SVID_BC, SVID_KU,
	                                 SVID_EKU, false };
	struct spiffe_id id;
	X509 *x = make_cert(&spec);

	(void)state;
	assert_int_equal(identity_check_svid(x, TD, ROLE_SERVER, &id), ID_OK);
	assert_string_equal(id.uri, "spiffe://mesh.local/svc/orders");
	assert_string_equal(id.trust_domain, TD);
	assert_string_equal(id.path, "/svc/orders");
	assert_ptr_equal(id.path, id.uri + strlen("spiffe://" TD));
	assert_string_equal(id.service, "orders");
	assert_int_equal(identity_check_svid(x, "other.local", ROLE_SERVER, &id),
	                 ID_WRONG_TRUST_DOMAIN);
	assert_int_equal(identity_check_svid(x, NULL, ROLE_SERVER, &id), ID_WRONG_TRUST_DOMAIN);
	X509_free(x);

	/* Not the /svc/ form: accepted, service left empty for callers to see. */
	x = make_cert(&other);
	assert_int_equal(identity_check_svid(x, TD, ROLE_CLIENT, &id), ID_OK);
	assert_string_equal(id.service, "");
	assert_string_equal(id.path, "/ns/prod");
	X509_free(x);
}

static void test_svid_raw_uri(void **state)
{
	static const char nul[] = "spiffe://mesh.local/svc/orders\0.evil";
	static const char ok[] = "spiffe://mesh.local/svc/orders";
	X509 *x;

	(void)state;
	x = make_cert_raw_uri(nul, (int)sizeof(nul) - 1);
	assert_int_equal(identity_check_svid(x, TD, ROLE_CLIENT, NULL), ID_BAD_SPIFFE_ID);
	X509_free(x);
	x = make_cert_raw_uri(ok, (int)sizeof(ok) - 1);
	assert_int_equal(identity_check_svid(x, TD, ROLE_CLIENT, NULL), ID_OK);
	X509_free(x);
}

static void test_svid_no_cert(void **state)
{
	(void)state;
	assert_int_equal(identity_check_svid(NULL, TD, ROLE_CLIENT, NULL), ID_NO_CERT);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_table),
		cmocka_unit_test(test_parse_reasons),
		cmocka_unit_test(test_parse_embedded_nul),
		cmocka_unit_test(test_parse_not_terminated),
		cmocka_unit_test(test_parse_length_limits),
		cmocka_unit_test(test_parse_untouched_on_failure),
		cmocka_unit_test(test_valid_service),
		cmocka_unit_test(test_valid_trust_domain),
		cmocka_unit_test(test_format),
		cmocka_unit_test(test_reason_str),
		cmocka_unit_test(test_svid_table),
		cmocka_unit_test(test_svid_fills_out),
		cmocka_unit_test(test_svid_raw_uri),
		cmocka_unit_test(test_svid_no_cert),
	};
	return cmocka_run_group_tests(tests, setup_key, teardown_key);
}
