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
 * Any failure: the host hears "not connected" (the meshlet_control_connected
 * gauge), status "disconnected: <why>", one
 * warning per change of reason, exponential backoff with jitter, and the
 * proxy keeps serving what it has. Every applied state is cached in
 * state_dir (each file written atomically), so a restart while control is
 * down serves from the cache while the SVID is valid.
 *
 * Thread ownership: everything in struct ctlclient after the lock's block
 * belongs to the client's thread (and to ctlclient_start before the thread
 * exists); the lock guards stop, status and the request in flight.
 */
#include "ctlclient-int.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/rand.h>

#include "meshlet/api.h"
#include "meshlet/log.h"

__attribute__((format(printf, 2, 3)))
int ctlc_fail(struct ctlclient *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
	return -1;
}

__attribute__((format(printf, 2, 3)))
void ctlc_set_status(struct ctlclient *c, const char *fmt, ...)
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
double ctlc_rand_unit(void)
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

const char *ctlc_url(const struct ctlclient *c)
{
	return c->cfg->n_control_urls ? c->cfg->control_urls[c->url] : c->cfg->control_url;
}

/* t as RFC 3339 UTC in buf, for messages. */
const char *ctlc_when(time_t t, char *buf)
{
	if (ca_time_rfc3339((int64_t)t, buf) < 0)
		snprintf(buf, CA_TIME_LEN, "%lld", (long long)t);
	return buf;
}

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
int ctlc_call(struct ctlclient *c, struct httpc *h, const char *what, const char *method,
              const char *path, const json_t *body, int timeout_ms, struct httpc_response *r)
{
	return ctlc_call_with(c, h, what, method, path, body, NULL, timeout_ms, r);
}

int ctlc_call_with(struct ctlclient *c, struct httpc *h, const char *what, const char *method,
                   const char *path, const json_t *body, const char *const *headers,
                   int timeout_ms, struct httpc_response *r)
{
	char err[HTTPC_ERR_MAX] = "", text[300];
	int rc;

	pthread_mutex_lock(&c->lock);
	c->active = h;
	if (c->stop || (c->polling && c->nudged))
		httpc_cancel(h);
	pthread_mutex_unlock(&c->lock);
	httpc_set_timeout(h, timeout_ms);
	rc = httpc_request(h, method, path, body, NULL, 0, headers, r, err);
	pthread_mutex_lock(&c->lock);
	c->active = NULL;
	pthread_mutex_unlock(&c->lock);
	/* Another replica may do better: this one is down, or failing itself. */
	c->url_failed = rc == HTTPC_ECONNECT || (rc == 0 && r->status >= 500);
	c->retry_after_ms = 0;
	if (rc != 0) {
		snprintf(c->call_err, sizeof(c->call_err), "%s", err);
		ctlc_fail(c, "%s: %s", what, err);
		return rc;
	}
	if (r->status < 200 || r->status > 299) {
		struct api_error_resp e;

		api_parse_error_resp(r->json, &e);
		snprintf(c->refusal, sizeof(c->refusal), "%s", e.code ? e.code : "");
		api_error_text(r, text, sizeof(text));
		rc = r->status;
		if (r->retry_after > 0)
			c->retry_after_ms = r->retry_after * 1000u > CTL_RETRY_AFTER_MAX_MS
			                    ? CTL_RETRY_AFTER_MAX_MS : r->retry_after * 1000u;
		httpc_response_clear(r);
		ctlc_fail(c, "%s: control refused: %s", what, text);
		return rc;
	}
	c->moves = 0;
	/* Any verified answer means control is reachable. */
	if (!c->host.set_connected(c->host.ctx, true))
		ctlc_set_status(c, "connected");
	return 0;
}

/* The mutual-TLS client for our SVID and bundle, built when they changed. */
struct httpc *ctlc_mtls(struct ctlclient *c)
{
	STACK_OF(X509) *roots = ctlc_pem_certs(c->st.bundle_pem);
	STACK_OF(X509) *mine = ctlc_pem_certs(c->st.cert_pem);
	struct httpc_opts o = {
		.url = ctlc_url(c), .expect_uri = c->control_id, .key = c->st.key,
		.user_agent = CTL_USER_AGENT,
	};
	char err[HTTPC_ERR_MAX] = "";
	X509 *leaf = mine ? sk_X509_shift(mine) : NULL;

	if (c->http)
		goto out;
	if (!roots || !leaf) {
		ctlc_fail(c, "no bundle or no certificate to reach control with");
		goto out;
	}
	o.roots = roots;
	o.cert = leaf;
	o.chain = mine;
	if (httpc_new(&c->http, &o, err) != 0)
		ctlc_fail(c, "cannot set up the control client: %s", err);
	else
		/* One connection for the long polls and the other calls: a
		 * mutual-TLS handshake per long poll is most of control's CPU
		 * with many proxies (docs/benchmarks.md). It goes with c->http
		 * (new URL, SVID or bundle) and with any failed or cancelled
		 * call; control re-checks the SVID on every request. */
		httpc_set_keepalive(c->http, true);
out:
	X509_free(leaf);
	sk_X509_pop_free(mine, X509_free);
	sk_X509_pop_free(roots, X509_free);
	return c->http;
}

void ctlc_drop_mtls(struct ctlclient *c)
{
	httpc_free(c->http);
	c->http = NULL;
}

/*
 * The due renewal. Refused by control (a limit, a revoked ancestor) while
 * the SVID is valid for CTL_RENEW_RETRY_S more: keep polling the config
 * (policy updates go on) and say so (degraded=renewal), try again later.
 * Anything else fails the step as before (backoff).
 */
static int renew_or_defer(struct ctlclient *c, time_t now)
{
	int rc = ctlc_renew(c);

	if (rc == 0) {
		if (c->renew_failing)
			ctlc_set_status(c, "connected");
		c->renew_failing = false;
		c->renew_retry_at = 0;
		return 0;
	}
	if (rc != 403 || c->st.not_after - now <= CTL_RENEW_RETRY_S)
		return -1;
	if (!c->renew_failing)
		log_warn("%s; serving with the current SVID and trying again every %d s",
		         c->why, CTL_RENEW_RETRY_S);
	/* /ready: connected, but degraded. */
	ctlc_set_status(c, "connected, renewal refused: %s", c->why);
	c->renew_failing = true;
	c->renew_retry_at = now + CTL_RENEW_RETRY_S;
	return 0;
}

/* One turn of the loop. 0, or -1 with c->why set. */
static int step(struct ctlclient *c)
{
	time_t now = time(NULL);

	if (!c->have_svid || now >= c->st.not_after) {
		char t[CA_TIME_LEN];

		if (c->have_svid)
			log_warn("the SVID expired at %s: joining again with the token in %s",
			         ctlc_when(c->st.not_after, t), c->cfg->control_token_file);
		c->have_svid = false;
		c->renew_failing = false;      /* a new SVID, a new lineage */
		c->renew_retry_at = 0;
		return ctlc_join(c);
	}
	if (c->need_bundle && ctlc_fetch_bundle(c) < 0)
		return -1;
	if ((c->need_renew || now >= c->renew_at) && now >= c->renew_retry_at &&
	    renew_or_defer(c, now) < 0)
		return -1;
	if (c->tls_dirty && c->installed && ctlc_install_current(c) < 0)
		return -1;
	if (c->need_register && ctlc_register_inbound(c) < 0)
		return -1;
	return ctlc_poll_config(c);
}

/*
 * After a failure that the control replica in use is to blame for, the
 * next URL of the list: the mTLS client is rebuilt for it, and the long
 * poll resumes there with the version held (every replica on one store
 * numbers versions alike). Returns true when it moved to a URL not yet
 * tried in this round of failures, which is worth trying at once.
 */
static bool next_url(struct ctlclient *c)
{
	size_t n = c->cfg->n_control_urls;
	const char *from = ctlc_url(c);

	if (n < 2 || !c->url_failed)
		return false;
	c->url = (c->url + 1) % n;
	c->moves++;
	ctlc_drop_mtls(c);
	log_warn("control %s: %s; moving to %s", from, c->why, ctlc_url(c));
	return c->moves < n;
}

static void failed(struct ctlclient *c)
{
	unsigned ms;

	if (next_url(c)) {
		c->reconnecting = true;
		if (c->have_svid)
			c->need_register = true;
		sleep_ms(c, 20 + (unsigned)(ctlc_rand_unit() * 80));
		return;
	}
	c->host.set_connected(c->host.ctx, false);
	ctlc_set_status(c, "disconnected: %s", c->why);
	if (strcmp(c->why, c->last_warned) != 0) {
		log_warn("control %s: %s; retrying with backoff", ctlc_url(c), c->why);
		snprintf(c->last_warned, sizeof(c->last_warned), "%s", c->why);
	} else {
		log_debug("control %s: %s (again)", ctlc_url(c), c->why);
	}
	c->failures++;
	c->reconnecting = true;
	if (c->have_svid)
		c->need_register = true;    /* after a reconnect */
	c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : CTL_BACKOFF_MIN_MS;
	if (c->backoff_ms > CTL_BACKOFF_MAX_MS)
		c->backoff_ms = CTL_BACKOFF_MAX_MS;
	ms = c->backoff_ms / 2 + (unsigned)(ctlc_rand_unit() * (c->backoff_ms / 2));
	/* Control said when it can take us again (a rate limit, a store that
	 * is down): sooner would only be refused, and adds to its load. */
	if (ms < c->retry_after_ms)
		ms = c->retry_after_ms + (unsigned)(ctlc_rand_unit() * 500);
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
			         ctlc_url(c), c->failures);
			c->failures = 0;
		}
		c->backoff_ms = 0;
		c->last_warned[0] = '\0';
	}
	return NULL;
}

static void state_clear(struct ctl_state *s)
{
	EVP_PKEY_free(s->key);
	free(s->cert_pem);
	free(s->bundle_pem);
	json_decref(s->revoked);
	json_decref(s->policy);
	json_decref(s->endpoints);
	json_decref(s->traffic);
	memset(s, 0, sizeof(*s));
}

static void client_free(struct ctlclient *c)
{
	ctlc_drop_mtls(c);
	state_clear(&c->st);
	EVP_PKEY_free(c->renew_key);
	json_decref(c->renew_body);
	pthread_cond_destroy(&c->cond);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

int ctlclient_start(const struct ctlclient_host *host, const struct config *cfg,
                    struct ctlclient **out, struct meshlet_err *err)
{
	struct ctlclient *c;
	pthread_condattr_t ca;
	sigset_t block, old;
	int rc;

	*out = NULL;
	if (ctlc_state_dir_prepare(cfg, err) < 0)
		return -EINVAL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return err_set(err, "", "out of memory");
	c->host = *host;
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
	c->st.traffic = json_object();
	snprintf(c->status, sizeof(c->status), "connecting");
	c->host.set_connected(c->host.ctx, false);

	ctlc_cache_load(c);
	if (!c->have_svid) {
		char *tok = ctlc_token_read(c);

		if (!tok) {
			rc = errno ? -errno : -EIO;
			err_set(err, "control.token_file", "%s", c->why);
			client_free(c);
			return rc;
		}
		ctlc_token_free(tok);
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

static long long ms_since(const struct timespec *then, const struct timespec *now)
{
	return (long long)(now->tv_sec - then->tv_sec) * 1000 +
	       (now->tv_nsec - then->tv_nsec) / 1000000;
}

void ctlclient_nudge(struct ctlclient *c)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&c->lock);
	if (c->polling && !c->nudged && !c->stop &&
	    ms_since(&c->last_nudge, &now) >= CTL_NUDGE_MIN_MS) {
		c->nudged = true;
		c->last_nudge = now;
		if (c->active)
			httpc_cancel(c->active);
	}
	pthread_mutex_unlock(&c->lock);
}

void ctlc_poll_begin(struct ctlclient *c)
{
	pthread_mutex_lock(&c->lock);
	c->polling = true;
	c->nudged = false;
	pthread_mutex_unlock(&c->lock);
}

bool ctlc_poll_end(struct ctlclient *c, struct httpc *h)
{
	bool nudged;

	pthread_mutex_lock(&c->lock);
	nudged = c->nudged && !c->stop;
	/* Every cancel but stop's happens under this lock: undoing ours here
	 * cannot undo a stop. */
	if (nudged)
		httpc_uncancel(h);
	c->polling = false;
	c->nudged = false;
	pthread_mutex_unlock(&c->lock);
	return nudged;
}

void ctlclient_status(struct ctlclient *c, char *out, size_t len)
{
	pthread_mutex_lock(&c->lock);
	snprintf(out, len, "%s", c->status);
	pthread_mutex_unlock(&c->lock);
}
