/*
 * ctlclient_svid: the proxy's identity from control (see ctlclient-int.h):
 * the join token (parsed by lib/api, the same rule control applies), joining
 * with a CSR, renewal at about half the SVID's lifetime, and the trust
 * bundle with its revocations.
 */
#include "ctlclient-int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "meshlet/api.h"
#include "meshlet/file.h"
#include "meshlet/log.h"
#include "meshlet/tls.h"

static time_t asn1_time(const ASN1_TIME *t)
{
	struct tm tm;

	if (!t || !ASN1_TIME_to_tm(t, &tm))
		return 0;
	return timegm(&tm);
}

/* Certificates of PEM text, in order (NULL when none). */
STACK_OF(X509) *ctlc_pem_certs(const char *pem)
{
	BIO *b = pem ? BIO_new_mem_buf(pem, -1) : NULL;
	STACK_OF(X509) *sk = b ? sk_X509_new_null() : NULL;
	X509 *x;

	while (sk && (x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL)
		if (!sk_X509_push(sk, x)) {
			X509_free(x);
			break;
		}
	ERR_clear_error();
	BIO_free(b);
	if (sk && sk_X509_num(sk) == 0) {
		sk_X509_free(sk);
		sk = NULL;
	}
	return sk;
}

/* The token file's content without surrounding white space; NULL with c->why set. */
char *ctlc_token_read(struct ctlclient *c)
{
	const char *file = c->cfg->control_token_file;
	size_t len = 0, start = 0;
	char *tok = NULL;
	int rc = file_read(file, CTL_TOKEN_MAX, 0, &tok, &len);

	if (rc < 0) {
		ctlc_fail(c, "cannot read the join token file %s: %s", file,
		          rc == -EFBIG ? "too large" : strerror(-rc));
		errno = -rc;
		return NULL;
	}
	while (len > 0 && (tok[len - 1] == '\n' || tok[len - 1] == '\r' || tok[len - 1] == ' ' ||
	                   tok[len - 1] == '\t'))
		tok[--len] = '\0';
	while (start < len && (tok[start] == ' ' || tok[start] == '\t' || tok[start] == '\n'))
		start++;
	memmove(tok, tok + start, len - start + 1);
	return tok;
}

void ctlc_token_free(char *tok)
{
	if (tok) {
		OPENSSL_cleanse(tok, strlen(tok));
		free(tok);
	}
}

static void plan_renewal(struct ctlclient *c)
{
	/* Control back-dates notBefore by CA_CLOCK_SKEW: the lifetime starts after it. */
	time_t start = c->st.not_before + CA_CLOCK_SKEW;
	double life, frac = 0.4 + 0.2 * ctlc_rand_unit();

	if (start >= c->st.not_after)
		start = c->st.not_before;
	life = (double)(c->st.not_after - start);
	c->renew_at = start + (time_t)(life * frac);
}

/*
 * Checks an SVID (cert_pem for key) and makes it ours: the SVID of our
 * service in our trust domain, currently valid. bundle_pem: the roots to
 * check it with (ours when NULL). Takes key over on success.
 */
int ctlc_adopt_svid(struct ctlclient *c, EVP_PKEY *key, const char *cert_pem,
                    const char *bundle_pem)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct tls_material *m = NULL;
	char msg[400];
	char *copy;

	if (tls_material_from_pem(cert_pem, key, bundle_pem ? bundle_pem : c->st.bundle_pem,
	                          NULL, 0, c->cfg->trust_domain, &m, &e) < 0)
		return ctlc_fail(c, "the SVID is unusable: %s", err_str(&e, msg, sizeof(msg)));
	if (strcmp(m->id->service, c->cfg->service) != 0) {
		ctlc_fail(c, "the certificate is %s, not an SVID of %s", m->id->uri, c->cfg->service);
		tls_material_free(m);
		return -1;
	}
	copy = strdup(cert_pem);
	if (!copy) {
		tls_material_free(m);
		return ctlc_fail(c, "out of memory");
	}
	EVP_PKEY_free(c->st.key);
	c->st.key = key;
	free(c->st.cert_pem);
	c->st.cert_pem = copy;
	c->st.not_before = asn1_time(X509_get0_notBefore(m->cert));
	c->st.not_after = m->not_after;
	if (ca_serial_hex(m->cert, c->st.serial) < 0)
		snprintf(c->st.serial, sizeof(c->st.serial), "?");
	tls_material_free(m);
	c->have_svid = true;
	c->tls_dirty = true;
	c->need_register = true;
	ctlc_drop_mtls(c);
	plan_renewal(c);
	return 0;
}

/*
 * A 2xx answer of POST /v1/svid: {cert_chain, serial, expires_at, spiffe_id,
 * trust_domain, bundle, bundle_version}. On a join the bundle becomes ours
 * (revocations follow with GET /v1/bundle); on a renewal a new bundle
 * version is fetched separately.
 */
static int accept_svid(struct ctlclient *c, const json_t *doc, EVP_PKEY *key, bool join)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct api_svid_resp a;
	char *bundle_pem = NULL;

	if (api_parse_svid_resp(doc, &a, &e) < 0)
		return ctlc_fail(c, "malformed answer to POST /v1/svid: %s%s%s", e.path, e.path[0] ? ": " : "",
		                 e.message);
	if (strcmp(a.trust_domain, c->cfg->trust_domain) != 0)
		return ctlc_fail(c, "control serves trust domain %.100s, not %s", a.trust_domain,
		                 c->cfg->trust_domain);
	bundle_pem = api_pem_join(a.bundle);
	if (!bundle_pem)
		return ctlc_fail(c, "out of memory");
	if (!join && a.bundle_version != c->st.bundle_version)
		c->need_bundle = true;
	if (ctlc_adopt_svid(c, key, a.cert_chain, join ? bundle_pem : NULL) < 0) {
		free(bundle_pem);
		return -1;
	}
	if (join) {
		free(c->st.bundle_pem);
		c->st.bundle_pem = bundle_pem;
		bundle_pem = NULL;
		c->st.bundle_version = -1;      /* revocations: from GET /v1/bundle */
		c->need_bundle = true;
		c->st.cert_generation = -1;     /* the first answer's is the one we hold */
	}
	free(bundle_pem);
	/* The key first: a crash between the two leaves a pair that does not
	 * match, which the next start refuses (and joins again). */
	if (ctlc_save_key(c, c->st.key) < 0 ||
	    ctlc_write_file(c, F_CERT, c->st.cert_pem, strlen(c->st.cert_pem), 0644) < 0 ||
	    (join && ctlc_write_file(c, F_BUNDLE, c->st.bundle_pem, strlen(c->st.bundle_pem), 0644) < 0))
		log_warn("cannot cache the SVID: %s (a restart will need a new join token)", c->why);
	return 0;
}

/* A new key and its CSR. Returns 0, or -1 with c->why set. */
static int new_csr(struct ctlclient *c, EVP_PKEY **key, json_t **body)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	char *csr = NULL;

	*key = NULL;
	*body = NULL;
	if (ca_new_key(key) < 0)
		return ctlc_fail(c, "cannot generate a key");
	if (ca_make_csr(*key, c->cfg->service, &csr, &e) < 0) {
		EVP_PKEY_free(*key);
		*key = NULL;
		return ctlc_fail(c, "cannot make the CSR: %s", e.message);
	}
	*body = json_pack("{s:s}", "csr", csr);
	free(csr);
	if (!*body) {
		EVP_PKEY_free(*key);
		*key = NULL;
		return ctlc_fail(c, "out of memory");
	}
	return 0;
}

int ctlc_join(struct ctlclient *c)
{
	char err[HTTPC_ERR_MAX] = "";
	struct meshlet_err te = { { 0 }, { 0 } };
	struct api_join_token jt;
	struct httpc_response r;
	struct httpc *h = NULL;
	EVP_PKEY *key = NULL;
	json_t *body = NULL;
	char *tok;
	int rc = -1;

	if (c->failures == 0)
		ctlc_set_status(c, "joining");   /* a retry keeps showing why the last one failed */
	tok = ctlc_token_read(c);
	if (!tok)
		return -1;
	/* The same parser control checks tokens with: what it makes, nothing else. */
	if (api_token_parse(tok, &jt, &te) < 0) {
		ctlc_fail(c, "the join token in %s is unusable: %s (create one with meshletctl token "
		          "create --service %s)", c->cfg->control_token_file, te.message, c->cfg->service);
		goto out;
	}
	if (strcmp(jt.service, c->cfg->service) != 0) {
		ctlc_fail(c, "the join token in %s is for service %s, not for %s: create one with "
		          "meshletctl token create --service %s", c->cfg->control_token_file, jt.service,
		          c->cfg->service, c->cfg->service);
		goto out;
	}
	{
		struct httpc_opts o = {
			.url = ctlc_url(c), .pin_sha256 = jt.pin, .expect_uri = c->control_id,
			.token = tok, .user_agent = CTL_USER_AGENT,
		};

		if (httpc_new(&h, &o, err) != 0) {
			ctlc_fail(c, "cannot set up the control client: %s", err);
			goto out;
		}
	}
	if (new_csr(c, &key, &body) < 0)
		goto out;
	rc = ctlc_call(c, h, "join", "POST", "/v1/svid", body, CTL_CALL_TIMEOUT_MS, &r);
	if (rc == HTTPC_EVERIFY) {
		ctlc_fail(c, "not sending the CSR to %s: %s", ctlc_url(c), c->call_err);
	} else if (rc == 401 || rc == 403) {
		char detail[CTL_REASON_MAX];

		snprintf(detail, sizeof(detail), "%s", c->why);
		ctlc_fail(c, "%s (the join token is unknown, expired or used up: create a new one with "
		          "meshletctl token create --service %s)", detail, c->cfg->service);
	}
	if (rc != 0) {
		rc = -1;
		goto out;
	}
	rc = accept_svid(c, r.json, key, true);
	httpc_response_clear(&r);
	if (rc == 0) {
		key = NULL;
		char t[CA_TIME_LEN];

		log_info("joined %s as %s: SVID serial %s valid until %s", ctlc_url(c),
		         c->cfg->service, c->st.serial, ctlc_when(c->st.not_after, t));
		ctlc_set_status(c, "connected");
	}
out:
	EVP_PKEY_free(key);
	json_decref(body);
	httpc_free(h);
	ctlc_token_free(tok);
	return rc < 0 ? -1 : 0;
}

/* Says what a refused renewal leaves the operator to do: the caps do not
 * lift by retrying, and the proxy keeps serving only until the SVID expires. */
static void renew_refused(struct ctlclient *c)
{
	char t[CA_TIME_LEN];

	if (strcmp(c->refusal, "renewal_limit") != 0 && strcmp(c->refusal, "lineage_limit") != 0)
		return;
	log_error("control refused to renew the SVID (serial %s) with %s: %s. The proxy keeps "
	          "serving with it until it expires at %s and then joins again with the token in "
	          "%s, which must then be valid: create one with meshletctl token create "
	          "--service %s%s", c->st.serial, c->refusal, c->why, ctlc_when(c->st.not_after, t),
	          c->cfg->control_token_file, c->cfg->service,
	          strcmp(c->refusal, "lineage_limit") == 0 ?
	          " (lineage_limit lifts when the window of one SVID lifetime ends)" : "");
}

int ctlc_renew(struct ctlclient *c)
{
	char t[CA_TIME_LEN];
	struct httpc_response r;
	struct httpc *h = ctlc_mtls(c);
	int rc;

	if (!h)
		return -1;
	/* A retry sends the same key: a new one per successful renewal only. */
	if (!c->renew_key && new_csr(c, &c->renew_key, &c->renew_body) < 0)
		return -1;
	c->refusal[0] = '\0';
	rc = ctlc_call(c, h, "renewing the SVID", "POST", "/v1/svid", c->renew_body,
	               CTL_CALL_TIMEOUT_MS, &r);
	if (rc == 403) {
		renew_refused(c);
		return 403;
	}
	if (rc != 0)
		return -1;
	rc = accept_svid(c, r.json, c->renew_key, false);
	httpc_response_clear(&r);
	if (rc < 0)
		return -1;
	c->renew_key = NULL;            /* installed: accept_svid owns it now */
	json_decref(c->renew_body);
	c->renew_body = NULL;
	if (c->need_renew && c->pending_generation >= 0)
		c->st.cert_generation = c->pending_generation;
	log_info("renewed the SVID%s: serial %s valid until %s, next renewal in %llds",
	         c->need_renew ? " (control asked)" : "", c->st.serial, ctlc_when(c->st.not_after, t),
	         (long long)(c->renew_at - time(NULL)));
	c->need_renew = false;
	c->pending_generation = -1;
	return 0;
}

int ctlc_fetch_bundle(struct ctlclient *c)
{
	struct httpc_response r;
	struct httpc *h = ctlc_mtls(c);
	struct meshlet_err e = { { 0 }, { 0 } };
	struct api_bundle_resp a;
	int64_t version;
	STACK_OF(X509) *check;
	char *pem;
	bool roots_changed;
	size_t n_roots;

	if (!h)
		return -1;
	if (ctlc_call(c, h, "fetching the trust bundle", "GET", "/v1/bundle", NULL, CTL_CALL_TIMEOUT_MS,
	              &r) != 0)
		return -1;
	if (api_parse_bundle_resp(r.json, &a, &e) < 0) {
		httpc_response_clear(&r);
		return ctlc_fail(c, "malformed answer to GET /v1/bundle: %s%s%s", e.path,
		                 e.path[0] ? ": " : "", e.message);
	}
	if (strcmp(a.trust_domain, c->cfg->trust_domain) != 0) {
		ctlc_fail(c, "control serves trust domain %.100s, not %s", a.trust_domain,
		          c->cfg->trust_domain);
		httpc_response_clear(&r);
		return -1;
	}
	pem = api_pem_join(a.roots);
	if (!pem) {
		httpc_response_clear(&r);
		return ctlc_fail(c, "out of memory");
	}
	version = a.version;
	check = ctlc_pem_certs(pem);
	if (!check || sk_X509_num(check) != (int)json_array_size(a.roots)) {
		sk_X509_pop_free(check, X509_free);
		free(pem);
		httpc_response_clear(&r);
		return ctlc_fail(c, "the trust bundle from control holds an unreadable root");
	}
	sk_X509_pop_free(check, X509_free);
	roots_changed = !c->st.bundle_pem || strcmp(pem, c->st.bundle_pem) != 0;
	if (roots_changed || !c->st.revoked || !json_equal(a.revoked, c->st.revoked))
		c->tls_dirty = true;
	free(c->st.bundle_pem);
	c->st.bundle_pem = pem;
	json_decref(c->st.revoked);
	c->st.revoked = json_incref((json_t *)a.revoked);
	c->st.bundle_version = version;
	c->need_bundle = false;
	n_roots = json_array_size(a.roots);
	httpc_response_clear(&r);       /* roots and td are gone from here on */
	if (roots_changed) {
		ctlc_drop_mtls(c);   /* control is verified with the new roots from now on */
		if (ctlc_write_file(c, F_BUNDLE, pem, strlen(pem), 0644) < 0)
			log_warn("cannot cache the trust bundle: %s", c->why);
	}
	log_info("trust bundle version %lld: %zu root(s), %zu revoked serial(s)",
	         (long long)version, n_roots, json_array_size(c->st.revoked));
	return 0;
}
