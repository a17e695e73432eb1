/*
 * identity: SPIFFE IDs and X.509-SVIDs.
 *
 * Parsing is strict on purpose: an identity is compared byte for byte with
 * policy "from" entries, so any form that two parsers could read differently
 * (case, percent-encoding, dot segments, ports...) is refused rather than
 * normalised.
 */
#include "meshlet/identity.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <openssl/x509v3.h>

static const char SPIFFE_SCHEME[] = "spiffe://";
#define SPIFFE_SCHEME_LEN (sizeof(SPIFFE_SCHEME) - 1)

static const char *const reason_names[ID_REASON_COUNT] = {
	[ID_OK] = "ok",
	[ID_NO_CERT] = "no_certificate",
	[ID_NO_URI_SAN] = "no_uri_san",
	[ID_MULTIPLE_URI_SANS] = "multiple_uri_sans",
	[ID_BAD_SPIFFE_ID] = "bad_spiffe_id",
	[ID_WRONG_TRUST_DOMAIN] = "wrong_trust_domain",
	[ID_NOT_A_SERVICE] = "not_a_service",
	[ID_LEAF_IS_CA] = "leaf_is_ca",
	[ID_BAD_KEY_USAGE] = "bad_key_usage",
	[ID_BAD_EXT_KEY_USAGE] = "bad_ext_key_usage",
	[ID_WRONG_IDENTITY] = "wrong_identity",
	[ID_REVOKED] = "revoked",
	[ID_NO_BASIC_CONSTRAINTS] = "no_basic_constraints",
};

/* Returns the stable label of r ("unknown" when out of range). */
const char *identity_reason_str(enum identity_reason r)
{
	if ((unsigned)r >= ID_REASON_COUNT || !reason_names[r])
		return "unknown";
	return reason_names[r];
}

static bool is_lower_alnum(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static bool is_td_char(unsigned char c)
{
	return is_lower_alnum(c) || c == '.' || c == '-' || c == '_';
}

static bool is_path_char(unsigned char c)
{
	return is_td_char(c) || (c >= 'A' && c <= 'Z');
}

/* A specific reason for a byte that is not allowed in an ID, so operators
 * see "port not allowed" rather than a generic "bad character". */
static const char *bad_char_reason(unsigned char c, bool in_td)
{
	switch (c) {
	case '%': return "percent-encoding not allowed";
	case '?': return "query not allowed";
	case '#': return "fragment not allowed";
	case '@': return "userinfo not allowed";
	case ':': return in_td ? "port not allowed" : "invalid character in path";
	default: break;
	}
	if (in_td && c >= 'A' && c <= 'Z')
		return "trust domain must be lower-case";
	return in_td ? "invalid character in trust domain" : "invalid character in path";
}

/* Checks td[0..len) as a trust domain. Returns NULL or a static reason. */
static const char *check_trust_domain(const char *td, size_t len)
{
	if (len == 0)
		return "empty trust domain";
	if (len > TRUST_DOMAIN_MAX)
		return "trust domain too long";
	for (size_t i = 0; i < len; i++) {
		if (!is_td_char((unsigned char)td[i]))
			return bad_char_reason((unsigned char)td[i], true);
	}
	return NULL;
}

/* Checks p[0..len) (starting with '/') as a SPIFFE path. NULL or a reason. */
static const char *check_path(const char *p, size_t len)
{
	size_t seg = 1; /* start of the current segment, after its '/' */

	for (size_t i = 0; i <= len; i++) {
		if (i < len && p[i] != '/') {
			if (!is_path_char((unsigned char)p[i]))
				return bad_char_reason((unsigned char)p[i], false);
			continue;
		}
		if (i == 0)
			continue; /* the leading '/' opens the first segment */
		size_t n = i - seg;
		if (n == 0)
			return i == len ? "trailing slash not allowed" : "empty path segment";
		if ((n == 1 && p[seg] == '.') || (n == 2 && p[seg] == '.' && p[seg + 1] == '.'))
			return "dot segment not allowed";
		seg = i + 1;
	}
	return NULL;
}

/* Validates name[0..len) against [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?. */
static bool valid_service_n(const char *name, size_t len)
{
	if (len == 0 || len > SERVICE_NAME_MAX)
		return false;
	if (!is_lower_alnum((unsigned char)name[0]) || !is_lower_alnum((unsigned char)name[len - 1]))
		return false;
	for (size_t i = 1; i + 1 < len; i++) {
		if (!is_lower_alnum((unsigned char)name[i]) && name[i] != '-')
			return false;
	}
	return true;
}

/* Returns the service of a path that is exactly /svc/<name>, else len 0. */
static size_t path_service(const char *path, size_t len, const char **svc)
{
	static const char prefix[] = "/svc/";
	const size_t plen = sizeof(prefix) - 1;

	if (len <= plen || memcmp(path, prefix, plen) != 0)
		return 0;
	*svc = path + plen;
	if (!valid_service_n(*svc, len - plen))
		return 0;
	return len - plen;
}

static int parse_fail(const char **why, const char *reason)
{
	if (why)
		*why = reason;
	return -EINVAL;
}

/*
 * Parses a SPIFFE ID of len bytes (need not be NUL-terminated). Returns 0 and
 * fills *out, or -EINVAL and sets *why (static string; why may be NULL).
 * *out is left untouched on failure. out->path points into out->uri, so a
 * copied struct must have its path re-pointed.
 */
int identity_parse(const char *uri, size_t len, struct spiffe_id *out, const char **why)
{
	const char *reason;

	if (!uri || !out)
		return parse_fail(why, "no input");
	if (len > SPIFFE_ID_MAX)
		return parse_fail(why, "longer than 2048 bytes");
	if (memchr(uri, '\0', len))
		return parse_fail(why, "embedded NUL");
	if (len < SPIFFE_SCHEME_LEN || memcmp(uri, SPIFFE_SCHEME, SPIFFE_SCHEME_LEN) != 0)
		return parse_fail(why, "scheme must be spiffe://");

	const char *td = uri + SPIFFE_SCHEME_LEN;
	const char *end = uri + len;
	const char *slash = memchr(td, '/', (size_t)(end - td));
	size_t td_len = (size_t)((slash ? slash : end) - td);

	reason = check_trust_domain(td, td_len);
	if (reason)
		return parse_fail(why, reason);
	if (slash) {
		reason = check_path(slash, (size_t)(end - slash));
		if (reason)
			return parse_fail(why, reason);
	}

	memcpy(out->uri, uri, len);
	out->uri[len] = '\0';
	memcpy(out->trust_domain, td, td_len);
	out->trust_domain[td_len] = '\0';
	out->path = out->uri + SPIFFE_SCHEME_LEN + td_len;

	const char *svc = NULL;
	size_t svc_len = path_service(out->path, strlen(out->path), &svc);
	memcpy(out->service, svc ? svc : "", svc_len);
	out->service[svc_len] = '\0';
	return 0;
}

/* True when name is a valid meshlet service name (NULL is not). */
bool identity_valid_service(const char *name)
{
	return name && valid_service_n(name, strnlen(name, SERVICE_NAME_MAX + 1));
}

/* True when td is a valid trust domain name (NULL is not). */
bool identity_valid_trust_domain(const char *td)
{
	return td && check_trust_domain(td, strnlen(td, TRUST_DOMAIN_MAX + 1)) == NULL;
}

/* Writes spiffe://<td>/svc/<service> into out (len >= SPIFFE_ID_MAX + 1).
 * Returns 0, or -EINVAL if either part is invalid or out is too small. */
int identity_format(char *out, size_t len, const char *trust_domain, const char *service)
{
	if (!out || len == 0)
		return -EINVAL;
	out[0] = '\0';
	if (!identity_valid_trust_domain(trust_domain) || !identity_valid_service(service))
		return -EINVAL;
	int n = snprintf(out, len, "%s%s/svc/%s", SPIFFE_SCHEME, trust_domain, service);
	if (n < 0 || (size_t)n >= len) {
		out[0] = '\0';
		return -EINVAL;
	}
	return 0;
}

/* Copies a parsed ID, re-pointing path into the destination's uri. */
static void spiffe_id_copy(struct spiffe_id *dst, const struct spiffe_id *src)
{
	*dst = *src;
	dst->path = dst->uri + (src->path - src->uri);
}

/*
 * Finds the single URI SAN of leaf. Returns ID_OK with *uri set (owned by
 * *names, which the caller frees with GENERAL_NAMES_free), or the reason.
 */
static enum identity_reason find_uri_san(X509 *leaf, GENERAL_NAMES **names,
                                         const ASN1_IA5STRING **uri)
{
	int crit = -1;
	int count = 0;

	*names = X509_get_ext_d2i(leaf, NID_subject_alt_name, &crit, NULL);
	if (!*names) {
		/* -2: the extension appears more than once; refuse, as two
		 * verifiers could each pick a different one. */
		return crit == -2 ? ID_MULTIPLE_URI_SANS : ID_NO_URI_SAN;
	}
	for (int i = 0; i < sk_GENERAL_NAME_num(*names); i++) {
		const GENERAL_NAME *gn = sk_GENERAL_NAME_value(*names, i);
		if (gn->type != GEN_URI)
			continue;
		*uri = gn->d.uniformResourceIdentifier;
		count++;
	}
	if (count == 0)
		return ID_NO_URI_SAN;
	return count > 1 ? ID_MULTIPLE_URI_SANS : ID_OK;
}

/* The SAN part of the check: one URI SAN, a SPIFFE ID in trust_domain. */
static enum identity_reason check_san(X509 *leaf, const char *trust_domain, struct spiffe_id *id)
{
	GENERAL_NAMES *names = NULL;
	const ASN1_IA5STRING *uri = NULL;
	enum identity_reason r = find_uri_san(leaf, &names, &uri);

	if (r != ID_OK)
		goto out;
	const char *data = (const char *)ASN1_STRING_get0_data(uri);
	int n = ASN1_STRING_length(uri);
	if (!data || n < 0 || identity_parse(data, (size_t)n, id, NULL) != 0) {
		r = ID_BAD_SPIFFE_ID;
		goto out;
	}
	if (!trust_domain || strcmp(id->trust_domain, trust_domain) != 0)
		r = ID_WRONG_TRUST_DOMAIN;
out:
	GENERAL_NAMES_free(names);
	return r;
}

/*
 * The usage part of the check, as the X509-SVID profile has it: a leaf
 * (basicConstraints present, CA:FALSE), able to sign (keyUsage present with
 * digitalSignature, without keyCertSign/cRLSign), and an extKeyUsage that
 * allows the holder's role. The extensions must be there: RFC 5280 reads
 * an absent keyUsage or extKeyUsage as "any use", which an SVID may not be.
 */
static enum identity_reason check_usage(X509 *leaf, enum identity_role role)
{
	uint32_t flags = X509_get_extension_flags(leaf);
	uint32_t ku = X509_get_key_usage(leaf);     /* UINT32_MAX: absent */
	uint32_t xku = X509_get_extended_key_usage(leaf);
	uint32_t need = role == ROLE_CLIENT ? XKU_SSL_CLIENT : XKU_SSL_SERVER;

	if (flags & EXFLAG_CA)
		return ID_LEAF_IS_CA;
	if (ku != UINT32_MAX && (ku & (KU_KEY_CERT_SIGN | KU_CRL_SIGN)))
		return ID_LEAF_IS_CA;
	if (!(flags & EXFLAG_BCONS))
		return ID_NO_BASIC_CONSTRAINTS;
	if (ku == UINT32_MAX || !(ku & KU_DIGITAL_SIGNATURE))
		return ID_BAD_KEY_USAGE;
	if (xku == UINT32_MAX || !(xku & need))
		return ID_BAD_EXT_KEY_USAGE;
	return ID_OK;
}

/*
 * Checks leaf as an X.509-SVID held by a peer in the given role (see the
 * header). Does not require the /svc/<name> form: callers that need a
 * service look at out->service. Returns ID_OK and fills *out (may be NULL;
 * untouched on refusal), or the reason for refusal.
 */
enum identity_reason identity_check_svid(X509 *leaf, const char *trust_domain,
                                         enum identity_role role, struct spiffe_id *out)
{
	struct spiffe_id id;
	enum identity_reason r;

	if (!leaf)
		return ID_NO_CERT;
	r = check_san(leaf, trust_domain, &id);
	if (r != ID_OK)
		return r;
	r = check_usage(leaf, role);
	if (r != ID_OK)
		return r;
	if (out)
		spiffe_id_copy(out, &id);
	return ID_OK;
}
