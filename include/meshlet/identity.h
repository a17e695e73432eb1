/*
 * identity: SPIFFE IDs and X.509-SVIDs.
 *
 * A SPIFFE ID is spiffe://<trust-domain>/<path> (SPIFFE ID standard: lower-case
 * trust domain of [a-z0-9.-_], path segments of [a-zA-Z0-9.-_], no empty,
 * "." or ".." segments, no query, fragment, port or userinfo, at most 2048
 * bytes). meshlet's workload identities are spiffe://<td>/svc/<service> with
 * <service> matching [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?.
 */
#ifndef MESHLET_IDENTITY_H
#define MESHLET_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <openssl/x509.h>

#define SPIFFE_ID_MAX 2048
#define TRUST_DOMAIN_MAX 255
#define SERVICE_NAME_MAX 63

struct spiffe_id {
	char uri[SPIFFE_ID_MAX + 1];            /* the whole ID, as given */
	char trust_domain[TRUST_DOMAIN_MAX + 1];
	const char *path;                       /* points into uri: "/svc/orders" */
	char service[SERVICE_NAME_MAX + 1];     /* "" unless path is /svc/<name> */
};

/* Why an identity was refused. Strings are stable: they are metric labels. */
enum identity_reason {
	ID_OK = 0,
	ID_NO_CERT,              /* "no_certificate" */
	ID_NO_URI_SAN,           /* "no_uri_san" */
	ID_MULTIPLE_URI_SANS,    /* "multiple_uri_sans" */
	ID_BAD_SPIFFE_ID,        /* "bad_spiffe_id" */
	ID_WRONG_TRUST_DOMAIN,   /* "wrong_trust_domain" */
	ID_NOT_A_SERVICE,        /* "not_a_service" */
	ID_LEAF_IS_CA,           /* "leaf_is_ca": CA:TRUE, or keyCertSign/cRLSign */
	ID_BAD_KEY_USAGE,        /* "bad_key_usage": no digitalSignature */
	ID_BAD_EXT_KEY_USAGE,    /* "bad_ext_key_usage": EKU lacks the role's purpose */
	ID_WRONG_IDENTITY,       /* "wrong_identity": valid, but not the one expected */
	ID_REVOKED,              /* "revoked" */
	ID_NO_BASIC_CONSTRAINTS, /* "no_basic_constraints": a leaf must say CA:FALSE */
	ID_REASON_COUNT
};

const char *identity_reason_str(enum identity_reason r);

/* Which side of TLS the certificate's holder is on: its EKU must allow it. */
enum identity_role { ROLE_CLIENT, ROLE_SERVER };

/*
 * Parses a SPIFFE ID of len bytes (need not be NUL-terminated). Returns 0 and
 * fills *out, or -EINVAL and sets *why (static string) when it is not one.
 */
int identity_parse(const char *uri, size_t len, struct spiffe_id *out, const char **why);

/* True when name is a valid meshlet service name. */
bool identity_valid_service(const char *name);

/* True when td is a valid trust domain name. */
bool identity_valid_trust_domain(const char *td);

/* Writes spiffe://<td>/svc/<service> into out (len >= SPIFFE_ID_MAX + 1).
 * Returns 0, or -EINVAL if either part is invalid. */
int identity_format(char *out, size_t len, const char *trust_domain, const char *service);

/*
 * Checks leaf as an X.509-SVID held by a peer in the given role: exactly one
 * URI SAN which parses as a SPIFFE ID in trust_domain; basicConstraints
 * CA:FALSE; keyUsage with digitalSignature and without keyCertSign/cRLSign;
 * an extKeyUsage that holds clientAuth for ROLE_CLIENT, serverAuth for
 * ROLE_SERVER. All three extensions must be present (X509-SVID profile).
 * Chain validity is OpenSSL's job, not this.
 * Returns ID_OK and fills *out (may be NULL), or the reason for refusal.
 */
enum identity_reason identity_check_svid(X509 *leaf, const char *trust_domain,
                                         enum identity_role role, struct spiffe_id *out);

#endif
