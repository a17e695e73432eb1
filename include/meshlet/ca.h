/*
 * ca: the mesh certificate authority run by meshlet-control.
 *
 * A struct ca is one root: a self-signed ECDSA P-256 certificate and its
 * private key, which never leaves the struct (or its 0600 file). It issues
 * X.509-SVIDs to proxies and a server certificate to control itself,
 * building every field itself: from a CSR only the public key is used.
 *
 * Serials are 128-bit random values in [2^126, 2^127), so always 32
 * lowercase hex digits; ca_serial_hex() and ca_serial_normalize() give the
 * canonical text form (lowercase, no leading zeros) that the API, the store
 * and revocation lists use.
 */
#ifndef MESHLET_CA_H
#define MESHLET_CA_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include "meshlet/json.h"

/* Root validity when none is given: 10 years (of 365.25 days). */
#define CA_ROOT_VALIDITY_DEFAULT ((int64_t)3652 * 24 * 3600)
/* Certificates start this long before "now", for clock skew. */
#define CA_CLOCK_SKEW 60
/* Longest lifetime ca_issue_svid()/ca_issue_server() accept. */
#define CA_TTL_MAX ((int64_t)366 * 24 * 3600)
/* Largest CSR (PEM text) ca_csr_check() reads. */
#define CA_CSR_MAX (16 * 1024)
/* Largest cert or key file ca_load() reads. */
#define CA_FILE_MAX (64 * 1024)
/* Most DNS/IP SANs in a server certificate. */
#define CA_SERVER_SANS_MAX 32

/* Buffer sizes, NUL included: a serial (at most 20 octets per RFC 5280),
 * a SHA-256 pin in hex, an RFC 3339 UTC time "2026-01-31T12:00:00Z". */
#define CA_SERIAL_HEX_MAX 41
#define CA_PIN_HEX_LEN 65
#define CA_TIME_LEN 21

struct ca;

/*
 * Generates a root for trust_domain: a new ECDSA P-256 key and a self-signed
 * certificate (subject CN "meshlet root <td>" cut to 64 bytes, O=meshlet;
 * CA:TRUE and keyUsage keyCertSign+cRLSign, both critical; subjectKeyIdentifier;
 * URI SAN spiffe://<td>) valid from now - CA_CLOCK_SKEW for validity seconds
 * (0: CA_ROOT_VALIDITY_DEFAULT). Returns 0 and *out (free with ca_free()),
 * or -EINVAL (bad trust domain or validity) / -EIO with a message in err.
 */
int ca_generate(struct ca **out, const char *trust_domain, int64_t validity,
                struct meshlet_err *err);

/*
 * Writes the root certificate (PEM, mode 0644) to cert_path and its private
 * key (unencrypted PKCS#8 PEM, mode 0600) to key_path, then fsyncs both and
 * their directories. Neither file may exist already (O_EXCL) and neither may
 * be a symlink (O_NOFOLLOW). On failure nothing is left behind.
 * Returns 0 or a negative errno (-EEXIST, -EACCES, ...) with a message in err.
 */
int ca_save(const struct ca *ca, const char *cert_path, const char *key_path,
            struct meshlet_err *err);

/*
 * Loads a root saved by ca_save(). Refuses, with a message in err: a key file
 * that group or others may access (-EACCES), a symlink, a file over
 * CA_FILE_MAX, unparsable PEM, a key that is not ECDSA P-256 or does not
 * match the certificate, a certificate that is not a CA or whose URI SAN is
 * not spiffe://<trust_domain> (-EINVAL). Returns 0 and *out (ca_free()).
 */
int ca_load(struct ca **out, const char *trust_domain, const char *cert_path,
            const char *key_path, struct meshlet_err *err);

/* The root's private key as unencrypted PKCS#8 PEM into *pem (malloc'd, NUL
 * after *len bytes; the caller cleanses and frees it). 0, -ENOMEM or -EIO. */
int ca_key_pem(const struct ca *ca, char **pem, size_t *len);

/* As ca_load(), from PEM text in memory (the etcd store keeps roots there);
 * what names the source in messages. */
int ca_load_pem(struct ca **out, const char *trust_domain, const char *cert_pem, size_t clen,
                const char *key_pem, size_t klen, const char *what, struct meshlet_err *err);

/* Frees the CA (the key is zeroised by OpenSSL). NULL is a no-op. */
void ca_free(struct ca *ca);

/* The root certificate, borrowed (X509_up_ref() to keep it). */
X509 *ca_cert(const struct ca *ca);

/* The trust domain the root signs for, borrowed. */
const char *ca_trust_domain(const struct ca *ca);

/*
 * The root of subject cross-signed by issuer, for CA rotation: a certificate
 * with subject's subject name, public key, validity (cut to issuer's),
 * basicConstraints, keyUsage, subjectKeyIdentifier and SAN, but issued and
 * signed (ECDSA with SHA-256) by issuer, with issuer's key identifier as
 * authorityKeyIdentifier and a random serial. A client that trusts only
 * issuer verifies, through it, what subject signs. Both roots must be of
 * one trust domain. Returns 0 and *out (X509_free()), or -EINVAL (another
 * trust domain) / -EIO with a message in err.
 */
int ca_cross_sign(const struct ca *issuer, const struct ca *subject, X509 **out,
                  struct meshlet_err *err);

/* Generates an ECDSA P-256 key pair (for control's own TLS key, and tests).
 * Returns 0 and *out (EVP_PKEY_free()), or -EIO. */
int ca_new_key(EVP_PKEY **out);

/*
 * Checks a certificate signing request: PEM text of len bytes (at most
 * CA_CSR_MAX), one PKCS#10 request whose key is ECDSA P-256 on the named
 * curve (RSA, Ed25519, P-384 and anything else are refused: docs/design.md fixes
 * P-256 for the mesh), and whose signature verifies
 * with that key. Its subject, attributes and requested extensions are ignored.
 * Returns 0 and *pubkey (a new reference: EVP_PKEY_free()), or -EINVAL with
 * the reason in err (path "csr").
 */
int ca_csr_check(const char *pem, size_t len, EVP_PKEY **pubkey, struct meshlet_err *err);

/*
 * Issues an X.509-SVID for spiffe://<td>/svc/<service> to pubkey: v3, subject
 * O=meshlet, CN=<service>; exactly one SAN, the URI; CA:FALSE and keyUsage
 * digitalSignature, both critical; extKeyUsage serverAuth+clientAuth;
 * subject and authority key identifiers; notBefore now - CA_CLOCK_SKEW,
 * notAfter now + ttl (1..CA_TTL_MAX seconds) but never past the root's;
 * a random serial; ECDSA with SHA-256 by the root's key.
 * Returns 0, *out (X509_free()) and serial (lowercase hex, CA_SERIAL_HEX_MAX
 * bytes; may be NULL); -EINVAL (bad service, ttl, key) or -EKEYEXPIRED (the
 * root has expired) / -EIO, with a message in err.
 */
int ca_issue_svid(const struct ca *ca, const char *service, EVP_PKEY *pubkey, int64_t ttl,
                  X509 **out, char *serial, struct meshlet_err *err);

/*
 * Issues control's own server certificate to pubkey: as ca_issue_svid() but
 * subject CN "meshlet-control", extKeyUsage serverAuth only, and SANs
 * URI:spiffe://<td>/control followed by each of sans[0..n): an IP SAN when it
 * parses as an IPv4/IPv6 address, otherwise a DNS SAN (letters, digits,
 * hyphens and dots; no wildcards). At most CA_SERVER_SANS_MAX sans.
 * Returns as ca_issue_svid(); a bad SAN is -EINVAL naming it.
 */
int ca_issue_server(const struct ca *ca, EVP_PKEY *pubkey, const char *const *sans, size_t n,
                    int64_t ttl, X509 **out, char *serial, struct meshlet_err *err);

/*
 * A PKCS#10 request for key (subject O=meshlet, CN=<service>, no
 * extensions: control builds the SVID from the caller's identity and uses
 * only the public key), signed with key (SHA-256). Returns 0 and *pem
 * (malloc'd, NUL-terminated; caller frees), or -EINVAL (bad service name) /
 * -EIO with a message in err.
 */
int ca_make_csr(EVP_PKEY *key, const char *service, char **pem, struct meshlet_err *err);

/* PEM text of certs[0..n) in order (leaf first for a chain), malloc'd and
 * NUL-terminated (caller frees); NULL on allocation failure. */
char *ca_pem_encode(X509 *const *certs, size_t n);

/*
 * The pin of cert: lowercase hex of SHA-256 over the DER encoding of its
 * SubjectPublicKeyInfo (the same bytes HPKP and curl --pinnedpubkey hash),
 * into out (CA_PIN_HEX_LEN bytes). It follows the key, not the certificate:
 * a re-issued root with the same key keeps its pin. Returns 0 or -EIO.
 */
int ca_pin_sha256(X509 *cert, char *out);

/* cert's serial in canonical form into out (CA_SERIAL_HEX_MAX bytes).
 * Returns 0, or -ERANGE for a negative serial or one over 20 octets. */
int ca_serial_hex(const X509 *cert, char *out);

/* Canonical form of a serial typed by a user: hex digits in either case,
 * optional ':' separators; lowercased, leading zeros removed ("0" stays).
 * Returns 0, or -EINVAL if it is empty, not hex, or over 40 digits. */
int ca_serial_normalize(const char *in, char *out);

/* cert's notAfter as seconds since the epoch. Returns 0 or -EINVAL. */
int ca_cert_not_after(const X509 *cert, int64_t *epoch);

/* epoch as RFC 3339 UTC "YYYY-MM-DDTHH:MM:SSZ" into out (CA_TIME_LEN
 * bytes). Returns 0, or -ERANGE for a time outside years 1000..9999. */
int ca_time_rfc3339(int64_t epoch, char *out);

#endif
