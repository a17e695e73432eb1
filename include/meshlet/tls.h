/*
 * tls: OpenSSL contexts for meshlet's mutual TLS.
 *
 * Credentials (our SVID, its key, the trust bundle) are loaded once per
 * config snapshot into struct tls_material; from it one server SSL_CTX and
 * one client SSL_CTX are built and shared by every connection of that
 * snapshot. Peer identity checks run inside the verify callback, so a wrong
 * peer fails the handshake with an alert rather than after it.
 */
#ifndef MESHLET_TLS_H
#define MESHLET_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>
#include <openssl/ssl.h>
#include "meshlet/identity.h"
#include "meshlet/json.h"

/*
 * Why a TLS handshake failed: one list, with one name table. The names
 * (tls_failure_str) are the reason label of
 * meshlet_tls_handshake_failures_total and the access log's tls_error, so
 * they are stable. First the peer certificate refused as an SVID (each is
 * an identity_check_svid reason, tls_failure_from_identity), then what TLS
 * itself refused.
 */
enum tls_failure {
	TLS_FAIL_NONE = 0,
	TLS_FAIL_NO_CERT,               /* "no_certificate" */
	TLS_FAIL_NO_URI_SAN,            /* "no_uri_san" */
	TLS_FAIL_MULTIPLE_URI_SANS,     /* "multiple_uri_sans" */
	TLS_FAIL_BAD_SPIFFE_ID,         /* "bad_spiffe_id" */
	TLS_FAIL_WRONG_TRUST_DOMAIN,    /* "wrong_trust_domain" */
	TLS_FAIL_NOT_A_SERVICE,         /* "not_a_service" */
	TLS_FAIL_LEAF_IS_CA,            /* "leaf_is_ca" */
	TLS_FAIL_BAD_KEY_USAGE,         /* "bad_key_usage" */
	TLS_FAIL_BAD_EXT_KEY_USAGE,     /* "bad_ext_key_usage" */
	TLS_FAIL_WRONG_IDENTITY,        /* "wrong_identity" */
	TLS_FAIL_REVOKED,               /* "revoked" */
	TLS_FAIL_NO_BASIC_CONSTRAINTS,  /* "no_basic_constraints" */
	TLS_FAIL_HANDSHAKE,             /* "handshake": protocol error, alert */
	TLS_FAIL_UNTRUSTED,             /* "untrusted": chain did not verify */
	TLS_FAIL_EXPIRED,               /* "expired": a certificate out of its validity */
	TLS_FAIL_NO_PEER_CERT,          /* "no_peer_certificate" */
	TLS_FAIL_TIMEOUT,               /* "timeout" */
	TLS_FAIL_COUNT
};

/* The label of f; "unknown" for a value outside the enum. */
const char *tls_failure_str(enum tls_failure f);

/* The failure for a certificate identity_check_svid refused with r
 * (TLS_FAIL_NONE for ID_OK). */
enum tls_failure tls_failure_from_identity(enum identity_reason r);

struct tls_material {
	EVP_PKEY *key;
	X509 *cert;                    /* our leaf SVID */
	STACK_OF(X509) *chain;         /* intermediates sent after the leaf */
	STACK_OF(X509) *roots;         /* trust bundle */
	struct spiffe_id *id;          /* our identity, from the leaf */
	time_t not_after;              /* leaf expiry */
	char **revoked;                /* lowercase hex serials, sorted; may be NULL */
	size_t n_revoked;
};

struct tls_options {
	const char *trust_domain;
	int min_version;               /* TLS1_3_VERSION or TLS1_2_VERSION */
	const char *groups;            /* NULL: "X25519:P-256" */
};

/*
 * Per-connection verification state, attached to the SSL with
 * tls_attach_verify() before the handshake; the verify callback reads the
 * role and expectation and records why it refused.
 */
struct tls_verify {
	const char *expect_id;         /* exact SPIFFE ID the peer must present, or NULL */
	enum tls_failure reason;       /* TLS_FAIL_NONE, or why the peer was refused */
};

/* One-time process setup (ex-data index). Call before any thread starts.
 * Returns 0 or -EIO. */
int tls_init(void);

/*
 * Loads our certificate (leaf first, then intermediates), private key and
 * bundle (one or more root certificates) from PEM files, checks that key and
 * certificate match, that the leaf is a valid SVID of trust_domain, and that
 * it is currently valid. Warns when the key file is readable by others.
 * Returns 0 and *out (free with tls_material_free), or -errno with err set;
 * err->path is "cert", "key" or "bundle": the file at fault.
 */
int tls_material_load(const char *cert_file, const char *key_file, const char *bundle_file,
                      const char *trust_domain, struct tls_material **out,
                      struct meshlet_err *err);

/*
 * The same from memory (the proxy's control mode): cert_pem (leaf first,
 * then intermediates), key (the material takes its own reference),
 * bundle_pem (one or more roots) and the revoked serials (any case, ':'
 * allowed: stored canonical and sorted, copied), with the same checks as
 * tls_material_load. Returns 0 and *out (tls_material_free), or -EINVAL
 * with err set; err->path is "cert", "key", "bundle" or "revoked".
 */
int tls_material_from_pem(const char *cert_pem, EVP_PKEY *key, const char *bundle_pem,
                          const char *const *revoked, size_t n_revoked,
                          const char *trust_domain, struct tls_material **out,
                          struct meshlet_err *err);

void tls_material_free(struct tls_material *m);

/*
 * Builds the context for accepting mutual TLS (server) or for connecting
 * (client): our SVID and key, peer verification against the roots with the
 * SVID checks of identity_check_svid(), TLS 1.3 (or 1.2 if min_version
 * allows), released idle buffers, read-ahead. The server side issues one
 * stateless ticket per handshake under keys private to this context, so
 * sessions never outlive the material they were made under. The context
 * keeps its own references: m may be freed afterwards.
 * Returns the context (SSL_CTX_free) or NULL with err set.
 */
SSL_CTX *tls_server_ctx(const struct tls_material *m, const struct tls_options *o,
                        struct meshlet_err *err);

/*
 * The ALPN list (wire format) a client connecting an HTTP listener offers
 * and the server prefers in this order: h2, then http/1.1. The server
 * context selects from it; connections that offer nothing (tcp) get none.
 */
/* Sessions a server context keeps for resumption (stateful tickets, about
 * 1 KB each; the least recently used go first). */
#define TLS_SERVER_SESSIONS 1024

#define TLS_ALPN_HTTP "\x02h2\x08http/1.1"
SSL_CTX *tls_client_ctx(const struct tls_material *m, const struct tls_options *o,
                        struct meshlet_err *err);

#define TLS_DIGEST_LEN 32

/*
 * SHA-256 over everything a context is built from: the leaf, chain and
 * roots (DER), the revoked serials and the options. Two materials with the
 * same digest make equivalent contexts, so a reload may keep the old ones
 * (and their session tickets). The key is not hashed: it must match the
 * leaf's public key, so the same leaf means the same key pair.
 * Returns 0 or -ENOMEM.
 */
int tls_material_digest(const struct tls_material *m, const struct tls_options *o,
                        unsigned char out[TLS_DIGEST_LEN]);

/* Attaches v (owned by the caller, must outlive the handshake) to ssl. */
void tls_attach_verify(SSL *ssl, struct tls_verify *v);

/*
 * After a completed handshake: copies the peer's SPIFFE ID (already checked
 * by the verify callback, or taken from a resumed session) into out.
 * Returns 0, or -ENOENT when the peer presented no usable ID.
 */
int tls_peer_id(SSL *ssl, char *out, size_t len);

/*
 * Classifies a failed handshake: the reason the verify callback recorded,
 * else one read from the OpenSSL error queue (no certificate, expired,
 * untrusted, protocol). Clears the error queue.
 */
enum tls_failure tls_failure_reason(SSL *ssl, const struct tls_verify *v);

/* True when cert's serial is on the revocation list ctx was built with. */
bool tls_is_revoked(SSL_CTX *ctx, X509 *cert);

/* Expiry of a certificate as unix time (0 if unreadable). */
time_t tls_cert_not_after(const X509 *cert);

#endif
