/*
 * ca: root generation and storage, CSR checks, and certificate issuance
 * (see ca.h). Extensions with fixed values go through OpenSSL's v3 config
 * syntax; SANs, which carry caller-supplied names, are built as GENERAL_NAMEs
 * so that no name can smuggle in another ("a,URI:spiffe://...").
 */
#include "meshlet/ca.h"
#include "meshlet/file.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "meshlet/identity.h"

struct ca {
	X509 *cert;
	EVP_PKEY *key;
	char trust_domain[TRUST_DOMAIN_MAX + 1];
};

/* The fixed parts of a leaf certificate. */
struct leaf_profile {
	const char *cn;
	const char *eku;
};

/* Records "what: <OpenSSL reason>" in err and empties OpenSSL's error queue
 * (a stale entry would confuse a later SSL_get_error()). Returns -EIO. */
static int ossl_fail(struct meshlet_err *err, const char *path, const char *what)
{
	unsigned long e = ERR_peek_last_error();
	const char *reason = e ? ERR_reason_error_string(e) : NULL;

	err_set(err, path, "%s%s%s", what, reason ? ": " : "", reason ? reason : "");
	ERR_clear_error();
	return -EIO;
}

/* PEM password callback: our files are never encrypted, and the default
 * callback would prompt on a terminal. */
static int no_password(char *buf, int size, int rwflag, void *u)
{
	return 0;
}

/* ---- small helpers ---- */

static void hex_lower(const unsigned char *p, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t i;

	for (i = 0; i < n; i++) {
		out[2 * i] = digits[p[i] >> 4];
		out[2 * i + 1] = digits[p[i] & 0xf];
	}
	out[2 * n] = '\0';
}

int ca_serial_normalize(const char *in, char *out)
{
	size_t n = 0;
	const char *p;

	for (p = in; *p; p++) {
		if (*p == ':')
			continue;
		if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f') ||
		      (*p >= 'A' && *p <= 'F')))
			return -EINVAL;
		if (n == 0 && *p == '0')
			continue;
		if (n == CA_SERIAL_HEX_MAX - 1)
			return -EINVAL;
		out[n++] = (char)(*p >= 'A' && *p <= 'F' ? *p - 'A' + 'a' : *p);
	}
	if (n == 0 && !strpbrk(in, "0"))
		return -EINVAL;
	if (n == 0)
		out[n++] = '0';
	out[n] = '\0';
	return 0;
}

int ca_serial_hex(const X509 *cert, char *out)
{
	const ASN1_INTEGER *ai = X509_get0_serialNumber(cert);
	BIGNUM *bn = ASN1_INTEGER_to_BN(ai, NULL);
	char *hex = NULL;
	int ret = -ERANGE;

	if (!bn || BN_is_negative(bn) || BN_num_bytes(bn) > 20)
		goto out;
	hex = BN_bn2hex(bn);
	if (hex && ca_serial_normalize(hex, out) == 0)
		ret = 0;
out:
	OPENSSL_free(hex);
	BN_free(bn);
	ERR_clear_error();
	return ret;
}

int ca_time_rfc3339(int64_t epoch, char *out)
{
	struct tm tm;
	time_t t = (time_t)epoch;

	if (!gmtime_r(&t, &tm) || tm.tm_year < -1900 || tm.tm_year > 9999 - 1900)
		return -ERANGE;
	if (strftime(out, CA_TIME_LEN, "%Y-%m-%dT%H:%M:%SZ", &tm) != CA_TIME_LEN - 1)
		return -ERANGE;
	return 0;
}

int ca_cert_not_after(const X509 *cert, int64_t *epoch)
{
	struct tm tm;

	if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1) {
		ERR_clear_error();
		return -EINVAL;
	}
	*epoch = (int64_t)timegm(&tm);
	return 0;
}

int ca_pin_sha256(X509 *cert, char *out)
{
	unsigned char md[32], *der = NULL;
	unsigned int mdlen = 0;
	int n = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert), &der);
	int ret = -EIO;

	if (n > 0 && EVP_Digest(der, (size_t)n, md, &mdlen, EVP_sha256(), NULL) == 1 &&
	    mdlen == sizeof(md)) {
		hex_lower(md, sizeof(md), out);
		ret = 0;
	}
	OPENSSL_free(der);
	ERR_clear_error();
	return ret;
}

char *ca_pem_encode(X509 *const *certs, size_t n)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *data, *out = NULL;
	long len;
	size_t i;

	if (!b)
		return NULL;
	for (i = 0; i < n; i++)
		if (PEM_write_bio_X509(b, certs[i]) != 1)
			goto out;
	len = BIO_get_mem_data(b, &data);
	out = malloc((size_t)len + 1);
	if (out) {
		if (len > 0)
			memcpy(out, data, (size_t)len);
		out[len] = '\0';
	}
out:
	BIO_free(b);
	ERR_clear_error();
	return out;
}

int ca_new_key(EVP_PKEY **out)
{
	*out = EVP_EC_gen("P-256");
	if (!*out) {
		ERR_clear_error();
		return -EIO;
	}
	return 0;
}

/* True when key is an ECDSA key on the named curve P-256. */
static bool key_is_p256(EVP_PKEY *key)
{
	char group[64] = "", enc[32] = "named_curve";

	if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC)
		return false;
	if (EVP_PKEY_get_group_name(key, group, sizeof(group), NULL) != 1)
		return false;
	/* Absent means the default, named_curve; "explicit" parameters are refused. */
	EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_EC_ENCODING, enc, sizeof(enc), NULL);
	ERR_clear_error();
	return strcmp(group, "prime256v1") == 0 && strcmp(enc, "named_curve") == 0;
}

/* ---- certificate building ---- */

/* A random serial in [2^126, 2^127): positive, 126 random bits, 32 hex digits. */
static int set_random_serial(X509 *x)
{
	unsigned char b[16];
	BIGNUM *bn = NULL;
	ASN1_INTEGER *ai = NULL;
	int ret = -EIO;

	if (RAND_bytes(b, sizeof(b)) != 1)
		return -EIO;
	b[0] = (unsigned char)((b[0] & 0x3f) | 0x40);
	bn = BN_bin2bn(b, sizeof(b), NULL);
	ai = bn ? BN_to_ASN1_INTEGER(bn, NULL) : NULL;
	if (ai && X509_set_serialNumber(x, ai) == 1)
		ret = 0;
	ASN1_INTEGER_free(ai);
	BN_free(bn);
	return ret;
}

/* O=meshlet, CN=cn (cut to the 64 bytes X.520 allows). */
static X509_NAME *make_name(const char *cn)
{
	X509_NAME *name = X509_NAME_new();
	int len = (int)strnlen(cn, 64);

	if (!name ||
	    !X509_NAME_add_entry_by_NID(name, NID_organizationName, MBSTRING_UTF8,
	                                (const unsigned char *)"meshlet", -1, -1, 0) ||
	    !X509_NAME_add_entry_by_NID(name, NID_commonName, MBSTRING_UTF8,
	                                (const unsigned char *)cn, len, -1, 0)) {
		X509_NAME_free(name);
		return NULL;
	}
	return name;
}

/* A v3 certificate with a random serial, subject O=meshlet,CN=cn, the
 * issuer's subject as issuer (or its own when issuer is NULL), validity
 * [not_before, not_after] and pubkey. */
static X509 *start_cert(const X509 *issuer, const char *cn, int64_t not_before,
                        int64_t not_after, EVP_PKEY *pubkey)
{
	X509 *x = X509_new();
	X509_NAME *name = make_name(cn);

	if (!x || !name || X509_set_version(x, X509_VERSION_3) != 1 ||
	    set_random_serial(x) != 0 || X509_set_subject_name(x, name) != 1 ||
	    X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name) != 1 ||
	    !ASN1_TIME_set(X509_getm_notBefore(x), (time_t)not_before) ||
	    !ASN1_TIME_set(X509_getm_notAfter(x), (time_t)not_after) ||
	    X509_set_pubkey(x, pubkey) != 1) {
		X509_free(x);
		x = NULL;
	}
	X509_NAME_free(name);
	return x;
}

/* Adds one extension given in OpenSSL's config syntax ("critical,CA:FALSE"). */
static int add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509_EXTENSION *ext;
	int ok;

	X509V3_set_ctx(&ctx, issuer, x, NULL, NULL, 0);
	ext = X509V3_EXT_nconf_nid(NULL, &ctx, nid, value);
	if (!ext)
		return -EIO;
	ok = X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	return ok == 1 ? 0 : -EIO;
}

/* Appends a URI, DNS (IA5 string) or IP (octets) general name to gens. */
static int push_name(GENERAL_NAMES *gens, int type, const void *data, int len)
{
	GENERAL_NAME *gn = GENERAL_NAME_new();
	ASN1_STRING *s = type == GEN_IPADD ? ASN1_OCTET_STRING_new() : ASN1_IA5STRING_new();

	if (!gn || !s || ASN1_STRING_set(s, data, len) != 1)
		goto fail;
	GENERAL_NAME_set0_value(gn, type, s);
	s = NULL;
	if (sk_GENERAL_NAME_push(gens, gn) <= 0)
		goto fail;
	return 0;
fail:
	ASN1_STRING_free(s);
	GENERAL_NAME_free(gn);
	return -ENOMEM;
}

static int add_sans(X509 *x, GENERAL_NAMES *gens)
{
	return X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT) == 1
	       ? 0 : -EIO;
}

/* ---- the root ---- */

/* "spiffe://<td>" into out (SPIFFE_ID_MAX + 1 bytes). */
static void td_uri(char *out, const char *trust_domain)
{
	snprintf(out, SPIFFE_ID_MAX + 1, "spiffe://%s", trust_domain);
}

/* Adds the root's extensions, including the URI SAN spiffe://<td>. */
static int add_root_exts(X509 *x, const char *trust_domain)
{
	char uri[SPIFFE_ID_MAX + 1];
	GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
	int ret = gens ? 0 : -ENOMEM;

	td_uri(uri, trust_domain);
	if (!ret)
		ret = add_ext(x, x, NID_basic_constraints, "critical,CA:TRUE");
	if (!ret)
		ret = add_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign");
	if (!ret)
		ret = add_ext(x, x, NID_subject_key_identifier, "hash");
	if (!ret)
		ret = push_name(gens, GEN_URI, uri, (int)strlen(uri));
	if (!ret)
		ret = add_sans(x, gens);
	GENERAL_NAMES_free(gens);
	return ret;
}

int ca_generate(struct ca **out, const char *trust_domain, int64_t validity,
                struct meshlet_err *err)
{
	char cn[TRUST_DOMAIN_MAX + 16];
	int64_t now = (int64_t)time(NULL);
	struct ca *ca;

	*out = NULL;
	if (!identity_valid_trust_domain(trust_domain))
		return err_set(err, "trust_domain", "not a valid trust domain");
	if (validity == 0)
		validity = CA_ROOT_VALIDITY_DEFAULT;
	if (validity < 0 || validity > (int64_t)100 * 366 * 24 * 3600)
		return err_set(err, "validity", "must be 1 second to 100 years");
	ca = calloc(1, sizeof(*ca));
	if (!ca)
		return err_set(err, "", "out of memory"), -ENOMEM;
	snprintf(ca->trust_domain, sizeof(ca->trust_domain), "%s", trust_domain);
	snprintf(cn, sizeof(cn), "meshlet root %s", trust_domain);
	if (ca_new_key(&ca->key) != 0) {
		ossl_fail(err, "", "generating the root key");
		goto fail;
	}
	ca->cert = start_cert(NULL, cn, now - CA_CLOCK_SKEW, now + validity, ca->key);
	if (!ca->cert || add_root_exts(ca->cert, trust_domain) != 0 ||
	    X509_sign(ca->cert, ca->key, EVP_sha256()) <= 0) {
		ossl_fail(err, "", "building the root certificate");
		goto fail;
	}
	*out = ca;
	return 0;
fail:
	ca_free(ca);
	return -EIO;
}

void ca_free(struct ca *ca)
{
	if (!ca)
		return;
	X509_free(ca->cert);
	EVP_PKEY_free(ca->key);
	free(ca);
}

X509 *ca_cert(const struct ca *ca)
{
	return ca->cert;
}

const char *ca_trust_domain(const struct ca *ca)
{
	return ca->trust_domain;
}

/* ---- cross-signing ---- */

/* Copies subject's extension nid (with its criticality) to x. */
static int copy_ext(X509 *x, const X509 *subject, int nid)
{
	int i = X509_get_ext_by_NID(subject, nid, -1);

	if (i < 0)
		return -EIO;
	return X509_add_ext(x, X509_get_ext(subject, i), -1) == 1 ? 0 : -EIO;
}

int ca_cross_sign(const struct ca *issuer, const struct ca *subject, X509 **out,
                  struct meshlet_err *err)
{
	const X509 *sub = subject->cert;
	const ASN1_TIME *na = X509_get0_notAfter(sub);
	X509 *x = NULL;
	int ret = 0;

	*out = NULL;
	if (strcmp(issuer->trust_domain, subject->trust_domain) != 0)
		return err_set(err, "", "the roots are of different trust domains (%s, %s)",
		               issuer->trust_domain, subject->trust_domain);
	/* Not valid past the issuer: a client would refuse the chain then anyway. */
	if (ASN1_TIME_compare(X509_get0_notAfter(issuer->cert), na) < 0)
		na = X509_get0_notAfter(issuer->cert);
	x = X509_new();
	if (!x || X509_set_version(x, X509_VERSION_3) != 1 || set_random_serial(x) != 0 ||
	    X509_set_subject_name(x, X509_get_subject_name(sub)) != 1 ||
	    X509_set_issuer_name(x, X509_get_subject_name(issuer->cert)) != 1 ||
	    X509_set1_notBefore(x, X509_get0_notBefore(sub)) != 1 ||
	    X509_set1_notAfter(x, na) != 1 ||
	    X509_set_pubkey(x, X509_get0_pubkey(sub)) != 1)
		ret = -EIO;
	/* The new root's own extensions, so that the chain it heads is checked
	 * as it would be with the self-signed root; the key identifier of the
	 * old root as AKID, which is how a client finds the old root above it. */
	if (!ret)
		ret = copy_ext(x, sub, NID_basic_constraints);
	if (!ret)
		ret = copy_ext(x, sub, NID_key_usage);
	if (!ret)
		ret = copy_ext(x, sub, NID_subject_key_identifier);
	if (!ret)
		ret = copy_ext(x, sub, NID_subject_alt_name);
	if (!ret)
		ret = add_ext(x, issuer->cert, NID_authority_key_identifier, "keyid:always");
	if (!ret && X509_sign(x, issuer->key, EVP_sha256()) <= 0)
		ret = -EIO;
	if (ret) {
		X509_free(x);
		return ossl_fail(err, "", "cross-signing the new root");
	}
	*out = x;
	return 0;
}

/* ---- saving and loading ---- */

/* Creates path (which must not exist) durably; says in err which file failed. */
static int write_new_file(const char *path, mode_t mode, const char *data, size_t len,
                          struct meshlet_err *err)
{
	int ret = file_write_new(path, mode, data, len);

	if (ret)
		err_set(err, "", "%s: %s", path, strerror(-ret));
	return ret;
}

/* Writes the key as PEM through a secure-memory BIO (zeroised when freed). */
static int save_key(EVP_PKEY *key, const char *path, struct meshlet_err *err)
{
	BIO *b = BIO_new(BIO_s_secmem());
	char *data;
	long len;
	int ret;

	if (!b || PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL) != 1) {
		BIO_free(b);
		return ossl_fail(err, "", "encoding the root key");
	}
	len = BIO_get_mem_data(b, &data);
	ret = write_new_file(path, 0600, data, (size_t)len, err);
	BIO_free(b);
	return ret;
}

int ca_save(const struct ca *ca, const char *cert_path, const char *key_path,
            struct meshlet_err *err)
{
	X509 *cert = ca->cert;
	char *pem = ca_pem_encode(&cert, 1);
	int ret;

	if (!pem)
		return err_set(err, "", "out of memory"), -ENOMEM;
	ret = save_key(ca->key, key_path, err);
	if (!ret) {
		ret = write_new_file(cert_path, 0644, pem, strlen(pem), err);
		if (ret)
			unlink(key_path);
	}
	free(pem);
	return ret;
}

/* Reads a regular file of at most CA_FILE_MAX bytes, not through a symlink;
 * when secret, refuses one that group or others may access. *data is
 * malloc'd; the caller cleanses and frees it. */
static int read_file(const char *path, bool secret, char **data, size_t *len,
                     struct meshlet_err *err)
{
	unsigned flags = FILE_NOFOLLOW | (secret ? FILE_SECRET : 0);
	struct stat st;
	int ret = file_read(path, CA_FILE_MAX, flags, data, len);

	if (ret == -ELOOP)
		err_set(err, "", "%s: %s (symlinks are refused)", path, strerror(-ret));
	else if (ret == -EINVAL || ret == -EFBIG)
		err_set(err, "", "%s: not a regular file of at most %d bytes", path, CA_FILE_MAX);
	else if (ret == -EACCES && secret && lstat(path, &st) == 0 && (st.st_mode & 077))
		err_set(err, "", "%s: private key is accessible by group or others (mode %04o); "
		        "run chmod 600 on it", path, (unsigned)(st.st_mode & 07777));
	else if (ret)
		err_set(err, "", "%s: %s", path, strerror(-ret));
	return ret;
}

/* The URI SAN of cert, if it is the only URI SAN, else NULL (borrowed). */
static const ASN1_IA5STRING *single_uri_san(X509 *cert, GENERAL_NAMES **gens)
{
	const ASN1_IA5STRING *uri = NULL;
	int i, count = 0;

	*gens = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
	for (i = 0; *gens && i < sk_GENERAL_NAME_num(*gens); i++) {
		GENERAL_NAME *gn = sk_GENERAL_NAME_value(*gens, i);

		if (gn->type == GEN_URI) {
			uri = gn->d.uniformResourceIdentifier;
			count++;
		}
	}
	return count == 1 ? uri : NULL;
}

/* A loaded root must be a CA for trust_domain whose key is P-256 and matches. */
static int check_root(struct ca *ca, const char *cert_path, struct meshlet_err *err)
{
	char want[SPIFFE_ID_MAX + 1];
	GENERAL_NAMES *gens = NULL;
	const ASN1_IA5STRING *uri = single_uri_san(ca->cert, &gens);
	int ret = 0;

	td_uri(want, ca->trust_domain);
	if (!key_is_p256(ca->key))
		ret = err_set(err, "", "%s: the root key is not ECDSA P-256", cert_path);
	else if (X509_check_private_key(ca->cert, ca->key) != 1)
		ret = err_set(err, "", "%s: the key file does not belong to this certificate",
		              cert_path);
	else if (X509_check_ca(ca->cert) != 1)
		ret = err_set(err, "", "%s: not a CA certificate", cert_path);
	else if (!uri || (size_t)ASN1_STRING_length(uri) != strlen(want) ||
	         memcmp(ASN1_STRING_get0_data(uri), want, strlen(want)) != 0)
		ret = err_set(err, "", "%s: not a root for trust domain %s (its URI SAN is not %s)",
		              cert_path, ca->trust_domain, want);
	GENERAL_NAMES_free(gens);
	ERR_clear_error();
	return ret;
}

/* Parses the first PEM certificate of a file's contents. */
static X509 *parse_cert(const char *data, size_t len)
{
	BIO *b = BIO_new_mem_buf(data, (int)len);
	X509 *x = b ? PEM_read_bio_X509(b, NULL, no_password, NULL) : NULL;

	BIO_free(b);
	return x;
}

static EVP_PKEY *parse_key(const char *data, size_t len)
{
	BIO *b = BIO_new_mem_buf(data, (int)len);
	EVP_PKEY *k = b ? PEM_read_bio_PrivateKey(b, NULL, no_password, NULL) : NULL;

	BIO_free(b);
	return k;
}

int ca_load(struct ca **out, const char *trust_domain, const char *cert_path,
            const char *key_path, struct meshlet_err *err)
{
	char *cdata = NULL, *kdata = NULL;
	size_t clen = 0, klen = 0;
	struct ca *ca = calloc(1, sizeof(*ca));
	int ret;

	*out = NULL;
	if (!ca)
		return err_set(err, "", "out of memory"), -ENOMEM;
	snprintf(ca->trust_domain, sizeof(ca->trust_domain), "%s", trust_domain);
	ret = read_file(key_path, true, &kdata, &klen, err);
	if (!ret)
		ret = read_file(cert_path, false, &cdata, &clen, err);
	if (ret)
		goto fail;
	ca->cert = parse_cert(cdata, clen);
	ca->key = ca->cert ? parse_key(kdata, klen) : NULL;
	if (!ca->key) {
		ossl_fail(err, "", ca->cert ? key_path : cert_path);
		ret = -EINVAL;
		goto fail;
	}
	ret = check_root(ca, cert_path, err);
	if (ret)
		goto fail;
	*out = ca;
	goto out;
fail:
	ca_free(ca);
out:
	if (kdata)
		OPENSSL_cleanse(kdata, klen);
	free(kdata);
	free(cdata);
	return ret;
}

int ca_key_pem(const struct ca *ca, char **pem, size_t *len)
{
	BIO *b = BIO_new(BIO_s_secmem());
	char *data;
	long n;
	int ret = -EIO;

	*pem = NULL;
	*len = 0;
	if (!b || PEM_write_bio_PrivateKey(b, ca->key, NULL, NULL, 0, NULL, NULL) != 1)
		goto out;
	n = BIO_get_mem_data(b, &data);
	*pem = malloc((size_t)n + 1);
	ret = *pem ? 0 : -ENOMEM;
	if (*pem) {
		memcpy(*pem, data, (size_t)n);
		(*pem)[n] = '\0';
		*len = (size_t)n;
	}
out:
	BIO_free(b);
	ERR_clear_error();
	return ret;
}

int ca_load_pem(struct ca **out, const char *trust_domain, const char *cert_pem, size_t clen,
                const char *key_pem, size_t klen, const char *what, struct meshlet_err *err)
{
	struct ca *ca = calloc(1, sizeof(*ca));
	int ret;

	*out = NULL;
	if (!ca)
		return err_set(err, "", "out of memory"), -ENOMEM;
	snprintf(ca->trust_domain, sizeof(ca->trust_domain), "%s", trust_domain);
	ca->cert = parse_cert(cert_pem, clen);
	ca->key = ca->cert ? parse_key(key_pem, klen) : NULL;
	if (!ca->key) {
		ossl_fail(err, "", what);
		ca_free(ca);
		return -EINVAL;
	}
	ret = check_root(ca, what, err);
	if (ret) {
		ca_free(ca);
		return ret;
	}
	*out = ca;
	return 0;
}

/* ---- CSRs ---- */

/* Full check that an EC public key is a point of its group. */
static bool ec_point_valid(EVP_PKEY *key)
{
	EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
	bool ok = c && EVP_PKEY_public_check(c) == 1;

	EVP_PKEY_CTX_free(c);
	ERR_clear_error();
	return ok;
}

/* Accepts a valid point on the named curve P-256 only. */
static int check_ec_key(EVP_PKEY *key, struct meshlet_err *err)
{
	char curve[64] = "", enc[32] = "named_curve";

	EVP_PKEY_get_group_name(key, curve, sizeof(curve), NULL);
	EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_EC_ENCODING, enc, sizeof(enc), NULL);
	ERR_clear_error();
	if (strcmp(enc, "named_curve") != 0)
		return err_set(err, "csr", "EC key with explicit curve parameters is not accepted: "
		               "use the named curve P-256");
	if (strcmp(curve, "prime256v1") != 0)
		return err_set(err, "csr", "EC key on curve %s is not accepted: use P-256 "
		               "(prime256v1)", curve[0] ? curve : "(unknown)");
	if (!ec_point_valid(key))
		return err_set(err, "csr", "EC public key is not a valid P-256 point");
	return 0;
}

/* Accepts ECDSA P-256 only (docs/design.md: SVIDs carry P-256 keys); names
 * what was sent and what to use instead. */
static int check_key_type(EVP_PKEY *key, struct meshlet_err *err)
{
	const char *type = EVP_PKEY_get0_type_name(key);

	if (EVP_PKEY_get_base_id(key) == EVP_PKEY_EC)
		return check_ec_key(key, err);
	return err_set(err, "csr", "%s key is not accepted: use ECDSA P-256 (prime256v1)",
	               type ? type : "unknown");
}

/* Parses one PEM request from text of len bytes. */
static X509_REQ *parse_csr(const char *pem, size_t len)
{
	BIO *b = BIO_new_mem_buf(pem, (int)len);
	X509_REQ *req = b ? PEM_read_bio_X509_REQ(b, NULL, no_password, NULL) : NULL;

	BIO_free(b);
	return req;
}

int ca_csr_check(const char *pem, size_t len, EVP_PKEY **pubkey, struct meshlet_err *err)
{
	X509_REQ *req = NULL;
	EVP_PKEY *key;
	int ret;

	*pubkey = NULL;
	if (!pem || len == 0 || len > CA_CSR_MAX)
		return err_set(err, "csr", "must be a PEM certificate request of 1..%d bytes",
		               CA_CSR_MAX);
	req = parse_csr(pem, len);
	if (!req) {
		ossl_fail(err, "csr", "not a PEM certificate request");
		return -EINVAL;
	}
	key = X509_REQ_get0_pubkey(req);
	ret = key ? check_key_type(key, err) : err_set(err, "csr", "no usable public key");
	if (ret)
		goto out;
	if (X509_REQ_verify(req, key) != 1) {
		ret = err_set(err, "csr", "signature does not verify with the request's key");
		goto out;
	}
	EVP_PKEY_up_ref(key);
	*pubkey = key;
out:
	X509_REQ_free(req);
	ERR_clear_error();
	return ret;
}

/* ---- issuance ---- */

/* Clamps [now - skew, now + ttl] into the root's validity. */
static int leaf_validity(const struct ca *ca, int64_t ttl, int64_t *nb, int64_t *na,
                         struct meshlet_err *err)
{
	int64_t now = (int64_t)time(NULL), ca_na;

	if (ttl < 1 || ttl > CA_TTL_MAX)
		return err_set(err, "ttl", "must be 1..%lld seconds", (long long)CA_TTL_MAX);
	if (ca_cert_not_after(ca->cert, &ca_na) != 0)
		return err_set(err, "", "the root's notAfter is unreadable");
	if (now >= ca_na) {
		err_set(err, "", "the root certificate has expired: rotate the CA");
		return -EKEYEXPIRED;
	}
	*nb = now - CA_CLOCK_SKEW;
	*na = now + ttl < ca_na ? now + ttl : ca_na;
	return 0;
}

/* Builds, signs and returns a leaf for pubkey with the given SANs. */
static int issue_leaf(const struct ca *ca, const struct leaf_profile *p, GENERAL_NAMES *gens,
                      EVP_PKEY *pubkey, int64_t ttl, X509 **out, char *serial,
                      struct meshlet_err *err)
{
	int64_t nb = 0, na = 0;
	X509 *x = NULL;
	int ret = leaf_validity(ca, ttl, &nb, &na, err);

	if (ret)
		return ret;
	if (!pubkey)
		return err_set(err, "", "no public key");
	x = start_cert(ca->cert, p->cn, nb, na, pubkey);
	ret = x ? 0 : -EIO;
	if (!ret)
		ret = add_ext(x, ca->cert, NID_basic_constraints, "critical,CA:FALSE");
	if (!ret)
		ret = add_ext(x, ca->cert, NID_key_usage, "critical,digitalSignature");
	if (!ret)
		ret = add_ext(x, ca->cert, NID_ext_key_usage, p->eku);
	if (!ret)
		ret = add_ext(x, ca->cert, NID_subject_key_identifier, "hash");
	if (!ret)
		ret = add_ext(x, ca->cert, NID_authority_key_identifier, "keyid:always");
	if (!ret)
		ret = add_sans(x, gens);
	if (!ret && X509_sign(x, ca->key, EVP_sha256()) <= 0)
		ret = -EIO;
	if (!ret && serial)
		ret = ca_serial_hex(x, serial) ? -EIO : 0;
	if (ret) {
		X509_free(x);
		return ossl_fail(err, "", "building the certificate");
	}
	*out = x;
	return 0;
}

int ca_issue_svid(const struct ca *ca, const char *service, EVP_PKEY *pubkey, int64_t ttl,
                  X509 **out, char *serial, struct meshlet_err *err)
{
	const struct leaf_profile p = { service, "serverAuth,clientAuth" };
	char uri[SPIFFE_ID_MAX + 1];
	GENERAL_NAMES *gens;
	int ret;

	*out = NULL;
	if (!service || identity_format(uri, sizeof(uri), ca->trust_domain, service) != 0)
		return err_set(err, "service", "not a valid service name");
	gens = sk_GENERAL_NAME_new_null();
	ret = gens ? push_name(gens, GEN_URI, uri, (int)strlen(uri)) : -ENOMEM;
	if (!ret)
		ret = issue_leaf(ca, &p, gens, pubkey, ttl, out, serial, err);
	else
		err_set(err, "", "out of memory");
	GENERAL_NAMES_free(gens);
	return ret;
}

/* True for a DNS name of LDH labels (1..63 bytes, no leading/trailing '-'),
 * at most 253 bytes, no wildcard. */
static bool dns_name_valid(const char *s)
{
	size_t total = strlen(s), label = 0, i;

	if (total == 0 || total > 253)
		return false;
	for (i = 0; i <= total; i++) {
		char c = s[i];

		if (c == '.' || c == '\0') {
			if (label == 0 || label > 63 || s[i - 1] == '-')
				return false;
			label = 0;
		} else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		           (c >= '0' && c <= '9') || (c == '-' && label > 0)) {
			label++;
		} else {
			return false;
		}
	}
	return true;
}

/* Appends each of sans as an IP or DNS general name. */
static int push_server_sans(GENERAL_NAMES *gens, const char *const *sans, size_t n,
                            struct meshlet_err *err)
{
	ASN1_OCTET_STRING *ip;
	char path[32];
	size_t i;
	int ret = 0;

	for (i = 0; i < n && !ret; i++) {
		snprintf(path, sizeof(path), "sans[%zu]", i);
		ip = sans[i] ? a2i_IPADDRESS(sans[i]) : NULL;
		ERR_clear_error();
		if (ip) {
			ret = push_name(gens, GEN_IPADD, ASN1_STRING_get0_data(ip),
			                ASN1_STRING_length(ip));
			ASN1_OCTET_STRING_free(ip);
		} else if (sans[i] && dns_name_valid(sans[i])) {
			ret = push_name(gens, GEN_DNS, sans[i], (int)strlen(sans[i]));
		} else {
			return err_set(err, path, "\"%s\" is neither an IP address nor a DNS name",
			               sans[i] ? sans[i] : "(null)");
		}
	}
	if (ret)
		err_set(err, "", "out of memory");
	return ret;
}

int ca_issue_server(const struct ca *ca, EVP_PKEY *pubkey, const char *const *sans, size_t n,
                    int64_t ttl, X509 **out, char *serial, struct meshlet_err *err)
{
	static const struct leaf_profile server = { "meshlet-control", "serverAuth" };
	char uri[SPIFFE_ID_MAX + 1];
	GENERAL_NAMES *gens;
	int ret;

	*out = NULL;
	if (n > CA_SERVER_SANS_MAX || (n && !sans))
		return err_set(err, "sans", "at most %d names", CA_SERVER_SANS_MAX);
	snprintf(uri, sizeof(uri), "spiffe://%s/control", ca->trust_domain);
	gens = sk_GENERAL_NAME_new_null();
	ret = gens ? push_name(gens, GEN_URI, uri, (int)strlen(uri)) : -ENOMEM;
	if (ret)
		err_set(err, "", "out of memory");
	if (!ret)
		ret = push_server_sans(gens, sans, n, err);
	if (!ret)
		ret = issue_leaf(ca, &server, gens, pubkey, ttl, out, serial, err);
	GENERAL_NAMES_free(gens);
	return ret;
}

int ca_make_csr(EVP_PKEY *key, const char *service, char **pem, struct meshlet_err *err)
{
	X509_REQ *req = X509_REQ_new();
	X509_NAME *name = X509_NAME_new();
	BIO *b = BIO_new(BIO_s_mem());
	char *data;
	long len;
	int ret = -EIO;

	*pem = NULL;
	if (!identity_valid_service(service)) {
		ret = err_set(err, "service", "not a service name");
		goto out;
	}
	if (!req || !name || !b ||
	    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"meshlet",
	                               -1, -1, 0) != 1 ||
	    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)service,
	                               -1, -1, 0) != 1 ||
	    X509_REQ_set_version(req, X509_REQ_VERSION_1) != 1 ||
	    X509_REQ_set_subject_name(req, name) != 1 || X509_REQ_set_pubkey(req, key) != 1 ||
	    X509_REQ_sign(req, key, EVP_sha256()) <= 0 || PEM_write_bio_X509_REQ(b, req) != 1) {
		err_set(err, "", "cannot build the CSR: %s",
		        ERR_reason_error_string(ERR_peek_last_error()) ?
		        ERR_reason_error_string(ERR_peek_last_error()) : "out of memory");
		goto out;
	}
	len = BIO_get_mem_data(b, &data);
	*pem = malloc((size_t)len + 1);
	if (!*pem) {
		err_set(err, "", "out of memory");
		goto out;
	}
	memcpy(*pem, data, (size_t)len);
	(*pem)[len] = '\0';
	ret = 0;
out:
	X509_REQ_free(req);
	X509_NAME_free(name);
	BIO_free(b);
	ERR_clear_error();
	return ret;
}
