/*
 * ctlclient: the proxy's control-plane client (control mode); see ctlclient.h.
 *
 * One thread, blocking HTTPS calls (lib/httpc), one loop:
 *
 *   no usable SVID          -> join (token, pin, CSR)
 *   bundle version changed  -> GET /v1/bundle, install the new TLS contexts
 *   renewal due / asked for -> POST /v1/svid over mTLS with a new key, install
 *   (re)connected, renewed  -> POST /v1/services/{svc}/endpoints per inbound
 *   otherwise               -> long poll GET /v1/services/{svc}/config and
 *                              install what changed (policy, endpoints)
 *
 * Any failure: control_connected = 0, status "disconnected: <why>", one
 * warning per change of reason, exponential backoff with jitter, and the
 * proxy keeps serving what it has. Every applied state is cached in
 * state_dir (each file written atomically), so a restart while control is
 * down serves from the cache while the SVID is valid.
 *
 * Thread ownership: everything in struct ctlclient after the lock's block
 * belongs to the client's thread (and to ctlclient_start before the thread
 * exists); the lock guards stop, status and the request in flight.
 */
#include "ctlclient.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/file.h"
#include "meshlet/httpc.h"
#include "meshlet/log.h"
#include "meshlet/policy.h"
#include "meshlet/tls.h"
#include "proxy.h"

#define CTL_BACKOFF_MIN_MS 200
#define CTL_BACKOFF_MAX_MS 30000
#define CTL_POLL_WAIT_S 30                      /* long poll: control answers by then */
#define CTL_CALL_TIMEOUT_MS 10000               /* any other call, and slack for the poll */
#define CTL_TOKEN_MAX 1024
#define CTL_STATE_MAX (8 * 1024 * 1024)
#define CTL_REASON_MAX 400
#define CTL_USER_AGENT "meshlet-proxy/" MESHLET_VERSION

/* The cache in state_dir. */
#define F_KEY "svid.key"
#define F_CERT "svid.pem"
#define F_BUNDLE "bundle.pem"
#define F_STATE "state.json"

/* What control gave us, as last accepted: the SVID, the bundle, the config. */
struct ctl_state {
	EVP_PKEY *key;
	char *cert_pem;                 /* leaf first */
	char serial[CA_SERIAL_HEX_MAX];
	time_t not_before, not_after;
	char *bundle_pem;
	json_t *revoked;                /* array of serials */
	int64_t bundle_version;         /* -1: unknown, fetch */
	int64_t cert_generation;        /* -1: take the next answer's without renewing */
	int64_t version;                /* of the last applied config: the poll's after= */
	int64_t policy_version;
	json_t *policy;                 /* as control sent it (object or null); NULL: none yet */
	json_t *endpoints;              /* {service: [addr]} of our registry-fed outbounds */
};

struct ctlclient {
	struct meshlet_proxy *p;
	const struct config *cfg;
	char control_id[TRUST_DOMAIN_MAX + 32];   /* spiffe://<td>/control */
	pthread_t thread;
	bool thread_started;

	pthread_mutex_t lock;           /* guards stop, active, status */
	pthread_cond_t cond;            /* signalled on stop */
	bool stop;
	struct httpc *active;           /* the client of the request in flight */
	char status[CTL_REASON_MAX + 32];

	struct ctl_state st;
	struct httpc *http;             /* mutual TLS with our SVID; NULL: build it */
	bool have_svid;
	bool installed;                 /* the proxy serves a snapshot we installed */
	bool tls_dirty;                 /* SVID or bundle changed since the last install */
	bool need_bundle;
	bool need_renew;
	int64_t pending_generation;     /* cert_generation that asked for need_renew */
	/* The key (and CSR) of the renewal in progress, kept across retries until
	 * one succeeds: control recognises a retry by its public key and does not
	 * count it against the SVID's renewal cap (an answer lost to a timeout
	 * would otherwise use one up). Memory only; never the live key. */
	EVP_PKEY *renew_key;
	json_t *renew_body;
	char refusal[64];               /* error code of the last refused call, or "" */
	int64_t bundle_asked;           /* bundle version a config answer made us fetch */
	bool need_register;
	bool reconnecting;              /* no call answered since start or the last failure */
	bool warned_no_policy;
	time_t renew_at;
	unsigned backoff_ms;
	unsigned failures;
	char why[CTL_REASON_MAX];       /* reason of the step that just failed */
	char call_err[HTTPC_ERR_MAX];   /* httpc's message of the last failed call */
	char last_warned[CTL_REASON_MAX];
};

/* ---- small helpers ---------------------------------------------------- */

__attribute__((format(printf, 2, 3)))
static int fail(struct ctlclient *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
	return -1;
}

__attribute__((format(printf, 2, 3)))
static void set_status(struct ctlclient *c, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&c->lock);
	va_start(ap, fmt);
	vsnprintf(c->status, sizeof(c->status), fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&c->lock);
}

static bool stopping(struct ctlclient *c)
{
	bool s;

	pthread_mutex_lock(&c->lock);
	s = c->stop;
	pthread_mutex_unlock(&c->lock);
	return s;
}

/* A uniform value in [0, 1). */
static double rand_unit(void)
{
	uint32_t r = 0;

	if (RAND_bytes((unsigned char *)&r, sizeof(r)) != 1)
		r = (uint32_t)random();
	return (double)r / 4294967296.0;
}

/* Waits ms or until stopped. Returns false when stopped. */
static bool sleep_ms(struct ctlclient *c, unsigned ms)
{
	struct timespec ts;
	bool stop;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&c->lock);
	while (!c->stop && pthread_cond_timedwait(&c->cond, &c->lock, &ts) != ETIMEDOUT)
		;
	stop = c->stop;
	pthread_mutex_unlock(&c->lock);
	return !stop;
}

/* t as RFC 3339 UTC in buf, for messages. */
static const char *when(time_t t, char *buf)
{
	if (ca_time_rfc3339((int64_t)t, buf) < 0)
		snprintf(buf, CA_TIME_LEN, "%lld", (long long)t);
	return buf;
}

static time_t asn1_time(const ASN1_TIME *t)
{
	struct tm tm;

	if (!t || !ASN1_TIME_to_tm(t, &tm))
		return 0;
	return timegm(&tm);
}

/* Certificates of PEM text, in order (NULL when none). */
static STACK_OF(X509) *pem_certs(const char *pem)
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

/* ---- files -------------------------------------------------------------- */

/* Replaces state_dir/name with data atomically (file_replace). Returns 0,
 * or -errno with c->why set. */
static int write_atomic(struct ctlclient *c, const char *name, const void *data, size_t len,
                        mode_t mode)
{
	char path[PATH_MAX];
	int rc;

	snprintf(path, sizeof(path), "%s/%s", c->cfg->state_dir, name);
	rc = file_replace(path, mode, data, len);
	if (rc < 0)
		fail(c, "cannot write %s: %s", path, strerror(-rc));
	return rc;
}

static int save_key(struct ctlclient *c, EVP_PKEY *key)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *data;
	long len;
	int rc;

	if (!b || PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL) != 1) {
		BIO_free(b);
		ERR_clear_error();
		return fail(c, "cannot encode the private key");
	}
	len = BIO_get_mem_data(b, &data);
	rc = write_atomic(c, F_KEY, data, (size_t)len, 0600);
	OPENSSL_cleanse(data, (size_t)len);
	BIO_free(b);
	return rc;
}

static json_t *state_doc(const struct ctl_state *s)
{
	return json_pack("{s:i, s:I, s:I, s:O, s:O, s:I, s:O, s:I, s:s}", "format", 1,
	                 "version", (json_int_t)s->version,
	                 "policy_version", (json_int_t)s->policy_version,
	                 "policy", s->policy ? s->policy : json_null(),
	                 "endpoints", s->endpoints,
	                 "bundle_version", (json_int_t)s->bundle_version,
	                 "revoked", s->revoked,
	                 "cert_generation", (json_int_t)s->cert_generation,
	                 "serial", s->serial);
}

static int save_state(struct ctlclient *c)
{
	json_t *doc = state_doc(&c->st);
	char *text = doc ? json_dumps(doc, JSON_INDENT(1) | JSON_SORT_KEYS) : NULL;
	int rc;

	json_decref(doc);
	if (!text)
		return fail(c, "out of memory");
	rc = write_atomic(c, F_STATE, text, strlen(text), 0600);
	free(text);
	return rc;
}

/* Creates state_dir (0700) when missing; refuses one others may write to. */
static int state_dir_prepare(const struct config *cfg, struct meshlet_err *err)
{
	const char *dir = cfg->state_dir;
	struct stat st;

	if (mkdir(dir, 0700) == 0)
		log_info("created the state directory %s", dir);
	else if (errno != EEXIST)
		return err_set(err, "state_dir", "cannot create %s: %s", dir, strerror(errno));
	if (stat(dir, &st) < 0)
		return err_set(err, "state_dir", "%s: %s", dir, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return err_set(err, "state_dir", "%s is not a directory", dir);
	if (st.st_mode & 022)
		return err_set(err, "state_dir", "%s is writable by group or others (mode %03o): "
		               "chmod 700 it", dir, (unsigned)(st.st_mode & 0777));
	if (st.st_uid != geteuid())
		return err_set(err, "state_dir", "%s belongs to uid %u, not to this user (uid %u)",
		               dir, (unsigned)st.st_uid, (unsigned)geteuid());
	return 0;
}

/* ---- calls ---------------------------------------------------------------- */

/* The API's error of a non-2xx answer as text (never a token: control does not echo them). */
static void api_error_text(const struct httpc_response *r, char *out, size_t len)
{
	struct api_error_resp e;

	api_parse_error_resp(r->json, &e);
	if (e.message)
		snprintf(out, len, "HTTP %d %s: %.200s", r->status, e.code ? e.code : "", e.message);
	else
		snprintf(out, len, "HTTP %d", r->status);
}

/*
 * One request on h, interruptible by ctlclient_stop. Returns 0 with *r
 * filled on a 2xx answer (caller clears it); a negative enum httpc_status,
 * or the HTTP status of a refusal, with c->why set (what: the call's name).
 */
static int call(struct ctlclient *c, struct httpc *h, const char *what, const char *method,
                const char *path, const json_t *body, int timeout_ms, struct httpc_response *r)
{
	char err[HTTPC_ERR_MAX] = "", text[300];
	int rc;

	pthread_mutex_lock(&c->lock);
	c->active = h;
	if (c->stop)
		httpc_cancel(h);
	pthread_mutex_unlock(&c->lock);
	httpc_set_timeout(h, timeout_ms);
	rc = httpc_request(h, method, path, body, NULL, 0, NULL, r, err);
	pthread_mutex_lock(&c->lock);
	c->active = NULL;
	pthread_mutex_unlock(&c->lock);
	if (rc != 0) {
		snprintf(c->call_err, sizeof(c->call_err), "%s", err);
		fail(c, "%s: %s", what, err);
		return rc;
	}
	if (r->status < 200 || r->status > 299) {
		struct api_error_resp e;

		api_parse_error_resp(r->json, &e);
		snprintf(c->refusal, sizeof(c->refusal), "%s", e.code ? e.code : "");
		api_error_text(r, text, sizeof(text));
		rc = r->status;
		httpc_response_clear(r);
		fail(c, "%s: control refused: %s", what, text);
		return rc;
	}
	/* Any verified answer means control is reachable. */
	if (atomic_exchange(&c->p->metrics->control_connected, 1) == 0)
		set_status(c, "connected");
	return 0;
}

/* The mutual-TLS client for our SVID and bundle, built when they changed. */
static struct httpc *mtls(struct ctlclient *c)
{
	STACK_OF(X509) *roots = pem_certs(c->st.bundle_pem);
	STACK_OF(X509) *mine = pem_certs(c->st.cert_pem);
	struct httpc_opts o = {
		.url = c->cfg->control_url, .expect_uri = c->control_id, .key = c->st.key,
		.user_agent = CTL_USER_AGENT,
	};
	char err[HTTPC_ERR_MAX] = "";
	X509 *leaf = mine ? sk_X509_shift(mine) : NULL;

	if (c->http)
		goto out;
	if (!roots || !leaf) {
		fail(c, "no bundle or no certificate to reach control with");
		goto out;
	}
	o.roots = roots;
	o.cert = leaf;
	o.chain = mine;
	if (httpc_new(&c->http, &o, err) != 0)
		fail(c, "cannot set up the control client: %s", err);
out:
	X509_free(leaf);
	sk_X509_pop_free(mine, X509_free);
	sk_X509_pop_free(roots, X509_free);
	return c->http;
}

static void drop_mtls(struct ctlclient *c)
{
	httpc_free(c->http);
	c->http = NULL;
}

/* ---- join token --------------------------------------------------------- */

/* The token file's content without surrounding white space; NULL with c->why set. */
static char *token_read(struct ctlclient *c)
{
	const char *file = c->cfg->control_token_file;
	size_t len = 0, start = 0;
	char *tok = NULL;
	int rc = file_read(file, CTL_TOKEN_MAX, 0, &tok, &len);

	if (rc < 0) {
		fail(c, "cannot read the join token file %s: %s", file,
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

static void token_free(char *tok)
{
	if (tok) {
		OPENSSL_cleanse(tok, strlen(tok));
		free(tok);
	}
}

/* ---- accepting an SVID -------------------------------------------------- */

static void plan_renewal(struct ctlclient *c)
{
	/* Control back-dates notBefore by CA_CLOCK_SKEW: the lifetime starts after it. */
	time_t start = c->st.not_before + CA_CLOCK_SKEW;
	double life, frac = 0.4 + 0.2 * rand_unit();

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
static int adopt_svid(struct ctlclient *c, EVP_PKEY *key, const char *cert_pem,
                      const char *bundle_pem)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct tls_material *m = NULL;
	char msg[400];
	char *copy;

	if (tls_material_from_pem(cert_pem, key, bundle_pem ? bundle_pem : c->st.bundle_pem,
	                          NULL, 0, c->cfg->trust_domain, &m, &e) < 0)
		return fail(c, "the SVID is unusable: %s", err_str(&e, msg, sizeof(msg)));
	if (strcmp(m->id->service, c->cfg->service) != 0) {
		fail(c, "the certificate is %s, not an SVID of %s", m->id->uri, c->cfg->service);
		tls_material_free(m);
		return -1;
	}
	copy = strdup(cert_pem);
	if (!copy) {
		tls_material_free(m);
		return fail(c, "out of memory");
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
	drop_mtls(c);
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
		return fail(c, "malformed answer to POST /v1/svid: %s%s%s", e.path, e.path[0] ? ": " : "",
		            e.message);
	if (strcmp(a.trust_domain, c->cfg->trust_domain) != 0)
		return fail(c, "control serves trust domain %.100s, not %s", a.trust_domain,
		            c->cfg->trust_domain);
	bundle_pem = api_pem_join(a.bundle);
	if (!bundle_pem)
		return fail(c, "out of memory");
	if (!join && a.bundle_version != c->st.bundle_version)
		c->need_bundle = true;
	if (adopt_svid(c, key, a.cert_chain, join ? bundle_pem : NULL) < 0) {
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
	if (save_key(c, c->st.key) < 0 ||
	    write_atomic(c, F_CERT, c->st.cert_pem, strlen(c->st.cert_pem), 0644) < 0 ||
	    (join && write_atomic(c, F_BUNDLE, c->st.bundle_pem, strlen(c->st.bundle_pem), 0644) < 0))
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
		return fail(c, "cannot generate a key");
	if (ca_make_csr(*key, c->cfg->service, &csr, &e) < 0) {
		EVP_PKEY_free(*key);
		*key = NULL;
		return fail(c, "cannot make the CSR: %s", e.message);
	}
	*body = json_pack("{s:s}", "csr", csr);
	free(csr);
	if (!*body) {
		EVP_PKEY_free(*key);
		*key = NULL;
		return fail(c, "out of memory");
	}
	return 0;
}

/* ---- the steps ------------------------------------------------------------ */

static int join(struct ctlclient *c)
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
		set_status(c, "joining");   /* a retry keeps showing why the last one failed */
	tok = token_read(c);
	if (!tok)
		return -1;
	/* The same parser control checks tokens with: what it makes, nothing else. */
	if (api_token_parse(tok, &jt, &te) < 0) {
		fail(c, "the join token in %s is unusable: %s (create one with meshletctl token "
		     "create --service %s)", c->cfg->control_token_file, te.message, c->cfg->service);
		goto out;
	}
	if (strcmp(jt.service, c->cfg->service) != 0) {
		fail(c, "the join token in %s is for service %s, not for %s: create one with "
		     "meshletctl token create --service %s", c->cfg->control_token_file, jt.service,
		     c->cfg->service, c->cfg->service);
		goto out;
	}
	{
		struct httpc_opts o = {
			.url = c->cfg->control_url, .pin_sha256 = jt.pin, .expect_uri = c->control_id,
			.token = tok, .user_agent = CTL_USER_AGENT,
		};

		if (httpc_new(&h, &o, err) != 0) {
			fail(c, "cannot set up the control client: %s", err);
			goto out;
		}
	}
	if (new_csr(c, &key, &body) < 0)
		goto out;
	rc = call(c, h, "join", "POST", "/v1/svid", body, CTL_CALL_TIMEOUT_MS, &r);
	if (rc == HTTPC_EVERIFY) {
		fail(c, "not sending the CSR to %s: %s", c->cfg->control_url, c->call_err);
	} else if (rc == 401 || rc == 403) {
		char detail[CTL_REASON_MAX];

		snprintf(detail, sizeof(detail), "%s", c->why);
		fail(c, "%s (the join token is unknown, expired or used up: create a new one with "
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

		log_info("joined %s as %s: SVID serial %s valid until %s", c->cfg->control_url,
		         c->cfg->service, c->st.serial, when(c->st.not_after, t));
		set_status(c, "connected");
	}
out:
	EVP_PKEY_free(key);
	json_decref(body);
	httpc_free(h);
	token_free(tok);
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
	          "--service %s%s", c->st.serial, c->refusal, c->why, when(c->st.not_after, t),
	          c->cfg->control_token_file, c->cfg->service,
	          strcmp(c->refusal, "lineage_limit") == 0 ?
	          " (lineage_limit lifts when the window of one SVID lifetime ends)" : "");
}

static int renew(struct ctlclient *c)
{
	char t[CA_TIME_LEN];
	struct httpc_response r;
	struct httpc *h = mtls(c);
	int rc;

	if (!h)
		return -1;
	/* A retry sends the same key: a new one per successful renewal only. */
	if (!c->renew_key && new_csr(c, &c->renew_key, &c->renew_body) < 0)
		return -1;
	c->refusal[0] = '\0';
	rc = call(c, h, "renewing the SVID", "POST", "/v1/svid", c->renew_body,
	          CTL_CALL_TIMEOUT_MS, &r);
	if (rc == 403)
		renew_refused(c);
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
	         c->need_renew ? " (control asked)" : "", c->st.serial, when(c->st.not_after, t),
	         (long long)(c->renew_at - time(NULL)));
	c->need_renew = false;
	c->pending_generation = -1;
	return 0;
}

static int fetch_bundle(struct ctlclient *c)
{
	struct httpc_response r;
	struct httpc *h = mtls(c);
	struct meshlet_err e = { { 0 }, { 0 } };
	struct api_bundle_resp a;
	int64_t version;
	STACK_OF(X509) *check;
	char *pem;
	bool roots_changed;
	size_t n_roots;

	if (!h)
		return -1;
	if (call(c, h, "fetching the trust bundle", "GET", "/v1/bundle", NULL, CTL_CALL_TIMEOUT_MS,
	         &r) != 0)
		return -1;
	if (api_parse_bundle_resp(r.json, &a, &e) < 0) {
		httpc_response_clear(&r);
		return fail(c, "malformed answer to GET /v1/bundle: %s%s%s", e.path,
		            e.path[0] ? ": " : "", e.message);
	}
	if (strcmp(a.trust_domain, c->cfg->trust_domain) != 0) {
		fail(c, "control serves trust domain %.100s, not %s", a.trust_domain,
		     c->cfg->trust_domain);
		httpc_response_clear(&r);
		return -1;
	}
	pem = api_pem_join(a.roots);
	if (!pem) {
		httpc_response_clear(&r);
		return fail(c, "out of memory");
	}
	version = a.version;
	check = pem_certs(pem);
	if (!check || sk_X509_num(check) != (int)json_array_size(a.roots)) {
		sk_X509_pop_free(check, X509_free);
		free(pem);
		httpc_response_clear(&r);
		return fail(c, "the trust bundle from control holds an unreadable root");
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
		drop_mtls(c);   /* control is verified with the new roots from now on */
		if (write_atomic(c, F_BUNDLE, pem, strlen(pem), 0644) < 0)
			log_warn("cannot cache the trust bundle: %s", c->why);
	}
	log_info("trust bundle version %lld: %zu root(s), %zu revoked serial(s)",
	         (long long)version, n_roots, json_array_size(c->st.revoked));
	return 0;
}

static int register_inbound(struct ctlclient *c)
{
	const struct config *cfg = c->cfg;
	struct httpc *h = mtls(c);
	char path[128];

	if (!h)
		return -1;
	snprintf(path, sizeof(path), "/v1/services/%s/endpoints", cfg->service);
	for (size_t i = 0; i < cfg->n_inbound; i++) {
		const struct config_inbound *in = &cfg->inbound[i];
		struct httpc_response r;
		json_t *body = json_pack("{s:s, s:[i]}", "address", in->advertise.text, "ports",
		                         (int)config_addr_port(&in->forward));
		int rc;

		if (!body)
			return fail(c, "out of memory");
		rc = call(c, h, "registering the inbound address", "POST", path, body,
		          CTL_CALL_TIMEOUT_MS, &r);
		json_decref(body);
		/* A refusal of this address (not ours, another service's, over a
		 * cap) will not change by retrying: say so, and keep polling the
		 * config (policy, certificates) instead of looping here. */
		if (rc >= 400 && rc < 500 && rc != 401) {
			log_error("%s: %s is not registered: callers using control's registry do not "
			          "find it here", c->why, in->advertise.text);
			continue;
		}
		if (rc != 0)
			return -1;
		httpc_response_clear(&r);
		log_info("registered %s (application port %u) for %s", in->advertise.text,
		         (unsigned)config_addr_port(&in->forward), cfg->service);
	}
	c->need_register = false;
	return 0;
}

/* The part of control's {service: [endpoint]} our outbound listeners take
 * their endpoints from (those without endpoints in the file); all of it in
 * transparent mode, which maps any original destination through the
 * registry. (Control sends no more than upstreams_param() asks for; this
 * also trims a cache written before.) */
static json_t *relevant_endpoints(const struct config *cfg, const json_t *all)
{
	json_t *out = json_object();

	if (cfg->has_transparent) {
		if (out && json_is_object(all) && json_object_update(out, (json_t *)all) < 0) {
			json_decref(out);
			return NULL;
		}
		return out;
	}
	for (size_t i = 0; out && i < cfg->n_outbound; i++) {
		const char *svc = cfg->outbound[i].service;
		json_t *list = json_object_get(all, svc);

		if (cfg->outbound[i].n_endpoints == 0 && json_is_array(list))
			json_object_set(out, svc, list);
	}
	return out;
}

/* One endpoint from control (api_parse_endpoint), its address parsed.
 * 0, or -1 with *why set. */
static int parse_endpoint(const json_t *v, struct config_addr *addr,
                          struct snapshot_app_ports *ports, struct meshlet_err *e,
                          const char **why)
{
	struct api_endpoint ep;

	memset(ports, 0, sizeof(*ports));
	if (api_parse_endpoint(v, &ep, e) < 0) {
		*why = e->message;
		return -1;
	}
	if (config_parse_addr(ep.address, addr, why) < 0)
		return -1;
	for (size_t i = 0; i < ep.n_ports && ports->n < SNAPSHOT_APP_PORTS_MAX; i++)
		ports->port[ports->n++] = ep.ports[i];
	return 0;
}

/* The registry for snapshot_source from {service: [endpoint]}; counts them. */
static int build_registry(const json_t *eps, struct snapshot_source *src, size_t *count)
{
	const char *svc;
	const json_t *list;
	size_t n = json_object_size(eps);

	*count = 0;
	src->registry = calloc(n ? n : 1, sizeof(*src->registry));
	if (!src->registry)
		return -ENOMEM;
	json_object_foreach((json_t *)eps, svc, list) {
		struct snapshot_endpoints *e;
		const json_t *v;
		size_t i, m = json_array_size(list);

		if (strlen(svc) > SERVICE_NAME_MAX || m == 0)
			continue;
		if (m > CONFIG_MAX_ENDPOINTS)
			m = CONFIG_MAX_ENDPOINTS;
		e = &src->registry[src->n_registry++];
		snprintf(e->service, sizeof(e->service), "%s", svc);
		e->addrs = calloc(m, sizeof(*e->addrs));
		e->app_ports = calloc(m, sizeof(*e->app_ports));
		if (!e->addrs || !e->app_ports)
			return -ENOMEM;
		json_array_foreach(list, i, v) {
			struct meshlet_err pe = { { 0 }, { 0 } };
			const char *why = NULL;

			if (e->n_addrs >= m)
				break;
			if (parse_endpoint(v, &e->addrs[e->n_addrs], &e->app_ports[e->n_addrs], &pe,
			                   &why) < 0) {
				log_warn("ignoring endpoint %zu of %s from control: %s", i, svc,
				         why ? why : "malformed");
				continue;
			}
			e->n_addrs++;
			(*count)++;
		}
	}
	return 0;
}

/*
 * Installs policy (control's document, or null: deny everything inbound),
 * endpoints and, when they changed, our SVID and bundle as a new snapshot.
 */
static int install(struct ctlclient *c, const json_t *policy, int64_t policy_version,
                   const json_t *eps, int64_t version)
{
	struct snapshot_source src = { 0 };
	struct meshlet_err e = { { 0 }, { 0 } };
	json_t *deny = NULL;
	char msg[600];
	size_t n_eps = 0;

	if (c->tls_dirty) {
		size_t n = json_array_size(c->st.revoked);
		const char **rev = calloc(n ? n : 1, sizeof(char *));
		int rc;

		if (!rev)
			return fail(c, "out of memory");
		for (size_t i = 0; i < n; i++)
			rev[i] = json_string_value(json_array_get(c->st.revoked, i));
		rc = tls_material_from_pem(c->st.cert_pem, c->st.key, c->st.bundle_pem, rev, n,
		                           c->cfg->trust_domain, &src.tls, &e);
		free(rev);
		if (rc < 0)
			return fail(c, "cannot use the SVID: %s", err_str(&e, msg, sizeof(msg)));
	}
	if (!json_is_object(policy)) {
		if (!c->warned_no_policy)
			log_warn("control holds no policy for %s: every inbound connection is denied "
			         "until one is applied", c->cfg->service);
		c->warned_no_policy = true;
		policy = deny = json_pack("{s:s, s:s, s:[]}", "service", c->cfg->service,
		                          "default", "deny", "rules");
	} else {
		c->warned_no_policy = false;
	}
	src.policy = policy ? policy_parse(policy, &e) : NULL;
	json_decref(deny);
	if (!src.policy) {
		snapshot_source_free(&src);
		return fail(c, "the policy from control is unusable: %s", err_str(&e, msg, sizeof(msg)));
	}
	if (build_registry(eps, &src, &n_eps) < 0) {
		snapshot_source_free(&src);
		return fail(c, "out of memory");
	}
	if (proxy_install(c->p, &src, &e) < 0)
		return fail(c, "cannot install the config from control: %s",
		            err_str(&e, msg, sizeof(msg)));
	c->tls_dirty = false;
	c->installed = true;
	log_info("installed config version %lld: policy v%lld, bundle v%lld, %zu endpoints",
	         (long long)version, (long long)policy_version, (long long)c->st.bundle_version,
	         n_eps);
	return 0;
}

/* Installs what we hold (after a renewal or a new bundle), and caches it. */
static int install_current(struct ctlclient *c)
{
	if (install(c, c->st.policy, c->st.policy_version, c->st.endpoints, c->st.version) < 0)
		return -1;
	if (save_state(c) < 0)
		log_warn("cannot cache the state: %s", c->why);
	return 0;
}

/* A config answer: applies what changed. */
static int apply_config(struct ctlclient *c, const json_t *doc)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct api_config_resp a;
	int64_t version, pver, bver, gen;
	json_t *policy, *eps;
	bool changed;

	if (api_parse_config_resp(doc, &a, &e) < 0)
		return fail(c, "malformed config answer: %s%s%s", e.path, e.path[0] ? ": " : "",
		            e.message);
	version = a.version;
	pver = a.policy_version;
	bver = a.bundle_version;
	gen = a.cert_generation;
	policy = (json_t *)a.policy;
	/* Bundle and certificate first; the loop polls again (at once: same after=). */
	if (bver != c->st.bundle_version) {
		/* Asked for before and still not what GET /v1/bundle gave: do not spin. */
		if (c->bundle_asked == bver)
			return fail(c, "control's config names bundle version %lld, its bundle is "
			            "version %lld", (long long)bver, (long long)c->st.bundle_version);
		c->bundle_asked = bver;
		c->need_bundle = true;
		return 0;
	}
	c->bundle_asked = -1;
	if (c->st.cert_generation < 0) {
		c->st.cert_generation = gen;
	} else if (gen != c->st.cert_generation) {
		c->need_renew = true;
		c->pending_generation = gen;
		return 0;
	}
	eps = relevant_endpoints(c->cfg, a.endpoints);
	if (!eps)
		return fail(c, "out of memory");
	changed = !c->installed || c->tls_dirty || pver != c->st.policy_version ||
	          !c->st.policy || !json_equal(policy, c->st.policy) ||
	          !c->st.endpoints || !json_equal(eps, c->st.endpoints);
	if (changed && install(c, policy, pver, eps, version) < 0) {
		json_decref(eps);
		return -1;
	}
	c->st.version = version;
	if (changed) {
		json_decref(c->st.policy);
		c->st.policy = json_incref(policy);
		c->st.policy_version = pver;
		json_decref(c->st.endpoints);
		c->st.endpoints = eps;
		if (save_state(c) < 0)
			log_warn("cannot cache the state: %s", c->why);
	} else {
		json_decref(eps);
	}
	return 0;
}

/*
 * "&upstreams=..." for the config poll: the services whose endpoints we
 * take from control, "*" in transparent mode (any destination may be one),
 * nothing when there are none. Control answers no more than that.
 */
static void upstreams_param(const struct config *cfg, char *out, size_t len)
{
	size_t n = 0, used;

	out[0] = '\0';
	if (cfg->has_transparent) {
		snprintf(out, len, "&upstreams=*");
		return;
	}
	for (size_t i = 0; i < cfg->n_outbound; i++) {
		const char *svc = cfg->outbound[i].service;
		bool dup = false;

		if (cfg->outbound[i].n_endpoints > 0)
			continue;
		for (size_t j = 0; j < i && !dup; j++)
			dup = cfg->outbound[j].n_endpoints == 0 && strcmp(cfg->outbound[j].service, svc) == 0;
		if (dup)
			continue;
		used = strlen(out);
		snprintf(out + used, len - used, "%s%s", n++ ? "," : "&upstreams=", svc);
	}
}

static int poll_config(struct ctlclient *c)
{
	struct httpc_response r;
	struct httpc *h = mtls(c);
	/* 64 listeners of 63-character names, and the rest. */
	char path[CONFIG_MAX_LISTENERS * (SERVICE_NAME_MAX + 1) + 256], ups[sizeof(path) - 200];
	long long wait = CTL_POLL_WAIT_S, until_renewal = (long long)(c->renew_at - time(NULL));
	int rc;

	if (!h)
		return -1;
	if (until_renewal < wait)
		wait = until_renewal < 1 ? 1 : until_renewal;
	/* A quick answer first: it shows control is reachable (status, gauge). */
	if (!c->installed || c->reconnecting)
		wait = 0;
	upstreams_param(c->cfg, ups, sizeof(ups));
	snprintf(path, sizeof(path), "/v1/services/%s/config?after=%lld&wait=%lld%s", c->cfg->service,
	         (long long)(c->installed ? c->st.version : 0), wait, ups);
	if (call(c, h, "watching the config", "GET", path, NULL,
	         (int)(wait * 1000 + CTL_CALL_TIMEOUT_MS), &r) != 0)
		return -1;
	c->reconnecting = false;
	rc = apply_config(c, r.json);
	httpc_response_clear(&r);
	return rc;
}

/* One turn of the loop. 0, or -1 with c->why set. */
static int step(struct ctlclient *c)
{
	time_t now = time(NULL);

	if (!c->have_svid || now >= c->st.not_after) {
		char t[CA_TIME_LEN];

		if (c->have_svid)
			log_warn("the SVID expired at %s: joining again with the token in %s",
			         when(c->st.not_after, t), c->cfg->control_token_file);
		c->have_svid = false;
		return join(c);
	}
	if (c->need_bundle && fetch_bundle(c) < 0)
		return -1;
	if ((c->need_renew || now >= c->renew_at) && renew(c) < 0)
		return -1;
	if (c->tls_dirty && c->installed && install_current(c) < 0)
		return -1;
	if (c->need_register && register_inbound(c) < 0)
		return -1;
	return poll_config(c);
}

static void failed(struct ctlclient *c)
{
	unsigned ms;

	atomic_store(&c->p->metrics->control_connected, 0);
	set_status(c, "disconnected: %s", c->why);
	if (strcmp(c->why, c->last_warned) != 0) {
		log_warn("control %s: %s; retrying with backoff", c->cfg->control_url, c->why);
		snprintf(c->last_warned, sizeof(c->last_warned), "%s", c->why);
	} else {
		log_debug("control %s: %s (again)", c->cfg->control_url, c->why);
	}
	c->failures++;
	c->reconnecting = true;
	if (c->have_svid)
		c->need_register = true;    /* after a reconnect */
	c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : CTL_BACKOFF_MIN_MS;
	if (c->backoff_ms > CTL_BACKOFF_MAX_MS)
		c->backoff_ms = CTL_BACKOFF_MAX_MS;
	ms = c->backoff_ms / 2 + (unsigned)(rand_unit() * (c->backoff_ms / 2));
	sleep_ms(c, ms);
}

static void *ctl_main(void *arg)
{
	struct ctlclient *c = arg;

	while (!stopping(c)) {
		if (step(c) < 0) {
			if (stopping(c))
				break;
			failed(c);
			continue;
		}
		if (c->failures) {
			log_info("control %s: reachable again after %u failed attempt(s)",
			         c->cfg->control_url, c->failures);
			c->failures = 0;
		}
		c->backoff_ms = 0;
		c->last_warned[0] = '\0';
	}
	return NULL;
}

/* ---- the cache -------------------------------------------------------- */

/* state.json into c->st (versions, policy, endpoints, revoked). 0 or -1. */
static int cache_load_state(struct ctlclient *c)
{
	char path[PATH_MAX];
	struct meshlet_err e = { { 0 }, { 0 } };
	json_t *doc, *policy = NULL, *eps = NULL, *revoked = NULL;
	json_int_t version = 0, pver = 0, bver = 0, gen = 0;
	int fmt = 0;

	snprintf(path, sizeof(path), "%s/%s", c->cfg->state_dir, F_STATE);
	doc = json_load_strict(path, CTL_STATE_MAX, 64, &e);
	if (!doc)
		return -1;
	if (json_unpack(doc, "{s:i, s:I, s:I, s:o, s:o, s:I, s:o, s:I}", "format", &fmt,
	                "version", &version, "policy_version", &pver, "policy", &policy,
	                "endpoints", &eps, "bundle_version", &bver, "revoked", &revoked,
	                "cert_generation", &gen) < 0 || fmt != 1 ||
	    !(json_is_object(policy) || json_is_null(policy)) || !json_is_object(eps) ||
	    !api_valid_serial_list(revoked)) {
		log_warn("ignoring %s: not a state file of this version", path);
		json_decref(doc);
		return -1;
	}
	c->st.version = version;
	c->st.policy_version = pver;
	json_decref(c->st.policy);
	c->st.policy = json_incref(policy);
	json_decref(c->st.endpoints);
	c->st.endpoints = relevant_endpoints(c->cfg, eps);
	c->st.bundle_version = bver;
	json_decref(c->st.revoked);
	c->st.revoked = json_incref(revoked);
	c->st.cert_generation = gen;
	json_decref(doc);
	return 0;
}

/*
 * Loads the cached SVID and bundle and, when present, the last state, and
 * installs them when the SVID is currently valid. Nothing cached, or
 * nothing usable: a join follows.
 */
static void cache_load(struct ctlclient *c)
{
	const char *dir = c->cfg->state_dir;
	char path[PATH_MAX], msg[400];
	char *key_pem = NULL, *cert_pem = NULL, *bundle_pem = NULL;
	EVP_PKEY *key = NULL;
	BIO *b;

	snprintf(path, sizeof(path), "%s/%s", dir, F_KEY);
	if (file_read(path, 64 * 1024, FILE_NOFOLLOW, &key_pem, NULL) < 0)
		key_pem = NULL;
	snprintf(path, sizeof(path), "%s/%s", dir, F_CERT);
	if (file_read(path, 1024 * 1024, FILE_NOFOLLOW, &cert_pem, NULL) < 0)
		cert_pem = NULL;
	snprintf(path, sizeof(path), "%s/%s", dir, F_BUNDLE);
	if (file_read(path, 1024 * 1024, FILE_NOFOLLOW, &bundle_pem, NULL) < 0)
		bundle_pem = NULL;
	if (!key_pem || !cert_pem || !bundle_pem) {
		log_info("no cached SVID in %s: joining %s", dir, c->cfg->control_url);
		goto out;
	}
	b = BIO_new_mem_buf(key_pem, -1);
	key = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
	BIO_free(b);
	ERR_clear_error();
	if (!key) {
		log_warn("the cached key %s/%s is unreadable: joining again", dir, F_KEY);
		goto out;
	}
	c->st.bundle_pem = bundle_pem;
	bundle_pem = NULL;
	if (adopt_svid(c, key, cert_pem, NULL) < 0) {
		/* Expired, another service's, not matching the key, ... */
		log_warn("the cached SVID in %s is unusable (%s): joining again", dir, c->why);
		goto out;
	}
	key = NULL;
	c->need_renew = false;
	if (cache_load_state(c) < 0) {
		log_info("using the cached SVID %s; no cached config yet", c->st.serial);
		c->st.bundle_version = -1;
		c->need_bundle = true;
		goto out;
	}
	if (install(c, c->st.policy, c->st.policy_version, c->st.endpoints, c->st.version) < 0) {
		log_warn("cannot serve from the cache in %s: %s", dir, c->why);
		goto out;
	}
	log_info("serving from the cache in %s (SVID %s valid until %s) while connecting to %s",
	         dir, c->st.serial, when(c->st.not_after, msg), c->cfg->control_url);
out:
	EVP_PKEY_free(key);
	if (key_pem) {
		OPENSSL_cleanse(key_pem, strlen(key_pem));
		free(key_pem);
	}
	free(cert_pem);
	free(bundle_pem);
}

/* ---- interface -------------------------------------------------------- */

static void state_clear(struct ctl_state *s)
{
	EVP_PKEY_free(s->key);
	free(s->cert_pem);
	free(s->bundle_pem);
	json_decref(s->revoked);
	json_decref(s->policy);
	json_decref(s->endpoints);
	memset(s, 0, sizeof(*s));
}

static void client_free(struct ctlclient *c)
{
	drop_mtls(c);
	state_clear(&c->st);
	EVP_PKEY_free(c->renew_key);
	json_decref(c->renew_body);
	pthread_cond_destroy(&c->cond);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

int ctlclient_start(struct meshlet_proxy *p, const struct config *cfg, struct ctlclient **out,
                    struct meshlet_err *err)
{
	struct ctlclient *c;
	pthread_condattr_t ca;
	sigset_t block, old;
	int rc;

	*out = NULL;
	if (state_dir_prepare(cfg, err) < 0)
		return -EINVAL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return err_set(err, "", "out of memory");
	c->p = p;
	c->cfg = cfg;
	snprintf(c->control_id, sizeof(c->control_id), "spiffe://%s/control", cfg->trust_domain);
	pthread_mutex_init(&c->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cond, &ca);
	pthread_condattr_destroy(&ca);
	c->st.bundle_version = -1;
	c->st.cert_generation = -1;
	c->pending_generation = -1;
	c->bundle_asked = -1;
	c->reconnecting = true;
	c->st.revoked = json_array();
	c->st.endpoints = json_object();
	snprintf(c->status, sizeof(c->status), "connecting");
	atomic_store(&p->metrics->control_connected, 0);

	cache_load(c);
	if (!c->have_svid) {
		char *tok = token_read(c);

		if (!tok) {
			rc = errno ? -errno : -EIO;
			err_set(err, "control.token_file", "%s", c->why);
			client_free(c);
			return rc;
		}
		token_free(tok);
		snprintf(c->status, sizeof(c->status), "joining");
	}

	sigfillset(&block);
	pthread_sigmask(SIG_BLOCK, &block, &old);
	rc = pthread_create(&c->thread, NULL, ctl_main, c);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		client_free(c);
		return err_set(err, "", "cannot start the control client: %s", strerror(rc));
	}
	c->thread_started = true;
	*out = c;
	return 0;
}

void ctlclient_stop(struct ctlclient *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->lock);
	c->stop = true;
	if (c->active)
		httpc_cancel(c->active);
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	if (c->thread_started)
		pthread_join(c->thread, NULL);
	client_free(c);
}

void ctlclient_status(struct ctlclient *c, char *out, size_t len)
{
	pthread_mutex_lock(&c->lock);
	snprintf(out, len, "%s", c->status);
	pthread_mutex_unlock(&c->lock);
}
