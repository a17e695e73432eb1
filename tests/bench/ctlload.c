/*
 * ctlload: N simulated proxies against meshlet-control, for the scale
 * benchmark (tests/bench/control_scale, docs/benchmarks.md).
 *
 * Set-up: join tokens for --services services (admin token), then one EC
 * P-256 key, CSR and SVID per proxy (POST /v1/svid with the service's join
 * token), --issue-threads blocking clients in parallel. Issued SVIDs are
 * kept in --svid-dir (key + chain, one file per proxy) and reused by a later
 * run against the same CA while they have more than 10 minutes left.
 *
 * Load: one libevent loop, non-blocking OpenSSL. Each proxy does what
 * proxy/ctlclient_config.c does: optionally POST
 * /v1/services/{svc}/endpoints once (--register), then GET
 * /v1/services/{svc}/config?after=V&wait=W with its own SVID, wait=0 for the
 * first answer, and again with after= the version it holds on every answer.
 * Without --keepalive each request is its own TLS connection ("Connection:
 * close"; control issues no session tickets), as meshlet-proxy did before
 * it kept its control connection; --keepalive is what it does now (one
 * connection per proxy, a new one only when control closes it). Proxies go
 * to the control URLs round robin; at most --max-connecting handshakes are
 * under way at once (the rest queue), so a reconnect storm is paced the
 * same way in every run.
 *
 * Output: stdout gets "issued ...", then "status ..." once a second, "ready
 * ..." once every proxy holds a waiting long poll, and at exit one JSON
 * summary line. --events FILE gets "proxy version t_ns" (CLOCK_MONOTONIC)
 * each time a proxy sees a version it did not hold. It runs until stdin
 * reaches EOF, SIGTERM/SIGINT, or --duration seconds.
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <jansson.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "meshlet/ca.h"
#include "meshlet/httpc.h"

#define MAX_URLS 16
#define MAX_HEAD 16384
#define MAX_BODY (1024 * 1024)
#define SVID_MIN_LEFT 600      /* a cached SVID with less left is issued again */
#define RETRY_MS 1000

enum px_state { PX_IDLE, PX_QUEUED, PX_CONNECTING, PX_SENT };
enum px_req { REQ_REGISTER, REQ_POLL };

struct target {
	char url[256];
	char host[200];
	char port[8];
	struct sockaddr_storage addr;
	socklen_t addr_len;
};

struct load;

struct px {
	struct load *L;
	int idx;
	int svc;
	X509 *cert;
	STACK_OF(X509) *chain;
	EVP_PKEY *key;
	struct bufferevent *bev;
	struct event *retry;
	enum px_state st;
	enum px_req req;
	int wait;                      /* of the poll in flight */
	bool have_version, registered, keepalive_ok;
	int64_t version;
	/* the response being read */
	bool head_done;
	int status;
	long retry_after;
	size_t body_len;
	bool server_closes;
	struct px *qnext;
};

struct opts {
	const char *urls, *ca, *admin_token_file, *svid_dir, *events;
	int proxies, services, issue_threads, max_connecting, wait, duration;
	bool keepalive, do_register;
	const char *prefix;
};

struct load {
	struct opts o;
	struct target t[MAX_URLS];
	int n_t;
	struct event_base *base;
	SSL_CTX *ctx;
	struct px *px;
	struct px *qhead, *qtail;
	int connecting;
	FILE *events;
	struct event *tick, *stdin_ev, *sigterm, *sigint, *stop_timer;
	struct timespec t0;
	bool ready;
	/* counters */
	uint64_t answers, changes, timeouts_429, errors, reconnects, handshakes, registered;
	uint64_t first_answers;
	char admin_token[256];
	char (*tokens)[512];
	/* issuance */
	atomic_int next_issue;
	atomic_int issued, cached, issue_failed;
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double since(const struct load *L)
{
	return (double)(now_ns() - ((int64_t)L->t0.tv_sec * 1000000000 + L->t0.tv_nsec)) / 1e9;
}

static void svc_name(const struct load *L, int svc, char *out, size_t len)
{
	snprintf(out, len, "%s-%03d", L->o.prefix, svc);
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* ---- set-up: targets, tokens, SVIDs ---- */

static int parse_targets(struct load *L)
{
	char buf[MAX_URLS * 256];
	char *save = NULL;

	snprintf(buf, sizeof(buf), "%s", L->o.urls);
	for (char *u = strtok_r(buf, ",", &save); u; u = strtok_r(NULL, ",", &save)) {
		struct target *t;
		struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai = NULL;
		const char *h;
		char *colon;

		if (L->n_t >= MAX_URLS || strncmp(u, "https://", 8) != 0 || strlen(u) >= sizeof(t->url)) {
			say("ctlload: --url: expected https://HOST:PORT[,...] (at most %d)", MAX_URLS);
			return -1;
		}
		t = &L->t[L->n_t];
		snprintf(t->url, sizeof(t->url), "%s", u);
		h = u + 8;
		snprintf(t->host, sizeof(t->host), "%s", h);
		t->host[strcspn(t->host, "/")] = '\0';
		colon = strrchr(t->host, ':');
		if (!colon || strchr(t->host, ']') > colon) {
			snprintf(t->port, sizeof(t->port), "443");
		} else {
			snprintf(t->port, sizeof(t->port), "%s", colon + 1);
			*colon = '\0';
		}
		{
			char host[200];

			snprintf(host, sizeof(host), "%s", t->host);
			if (host[0] == '[') {
				memmove(host, host + 1, strlen(host));
				host[strcspn(host, "]")] = '\0';
			}
			if (getaddrinfo(host, t->port, &hints, &ai) != 0 || !ai) {
				say("ctlload: cannot resolve %s", u);
				return -1;
			}
		}
		memcpy(&t->addr, ai->ai_addr, ai->ai_addrlen);
		t->addr_len = ai->ai_addrlen;
		freeaddrinfo(ai);
		/* Host header: host[:port] as in the URL */
		snprintf(t->host, sizeof(t->host), "%.*s", (int)strcspn(h, "/"), h);
		L->n_t++;
	}
	if (L->n_t == 0) {
		say("ctlload: --url is required");
		return -1;
	}
	return 0;
}

static int read_small(const char *path, char *out, size_t len)
{
	FILE *f = fopen(path, "r");
	size_t n;

	if (!f) {
		say("ctlload: %s: %s", path, strerror(errno));
		return -1;
	}
	n = fread(out, 1, len - 1, f);
	fclose(f);
	out[n] = '\0';
	while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' ' || out[n - 1] == '\r'))
		out[--n] = '\0';
	return n ? 0 : -1;
}

static struct httpc *client(const struct load *L, int which, const char *token)
{
	struct httpc_opts o = { .url = L->t[which % L->n_t].url, .ca_file = L->o.ca, .token = token,
	                        .user_agent = "meshlet-ctlload", .timeout_ms = 60000 };
	char err[HTTPC_ERR_MAX];
	struct httpc *h = NULL;

	if (httpc_new(&h, &o, err) != 0) {
		say("ctlload: %s", err);
		return NULL;
	}
	return h;
}

/* A join token per service, with as many uses as it has proxies to join. */
static int make_tokens(struct load *L, const bool *need)
{
	struct httpc *h = client(L, 0, L->admin_token);
	int rc = 0;

	if (!h)
		return -1;
	for (int s = 0; s < L->o.services && rc == 0; s++) {
		char name[64], err[HTTPC_ERR_MAX] = "";
		int uses = 0;
		struct httpc_response r;
		json_t *body;

		for (int i = s; i < L->o.proxies; i += L->o.services)
			uses += need[i];
		if (uses == 0)
			continue;
		svc_name(L, s, name, sizeof(name));
		body = json_pack("{s:s, s:i, s:i}", "service", name, "ttl_seconds", 3600, "uses", uses);
		if (httpc_request(h, "POST", "/v1/tokens", body, NULL, 0, NULL, &r, err) != 0) {
			say("ctlload: POST /v1/tokens: %s", err);
			rc = -1;
		} else if (r.status != 200 && r.status != 201) {
			say("ctlload: POST /v1/tokens: HTTP %d %.300s", r.status, r.body ? r.body : "");
			rc = -1;
		} else {
			const char *tok = json_string_value(json_object_get(r.json, "token"));

			snprintf(L->tokens[s], sizeof(L->tokens[s]), "%s", tok ? tok : "");
		}
		json_decref(body);
		if (rc == 0)
			httpc_response_clear(&r);
	}
	httpc_free(h);
	return rc;
}

static void cache_path(const struct load *L, int i, char *out, size_t len)
{
	snprintf(out, len, "%s/%d.pem", L->o.svid_dir, i);
}

/* The URI SAN of cert, "" when it has none. */
static void cert_uri(X509 *cert, char *out, size_t len)
{
	GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);

	out[0] = '\0';
	for (int k = 0; sans && k < sk_GENERAL_NAME_num(sans); k++) {
		GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, k);

		if (g->type == GEN_URI)
			snprintf(out, len, "%.*s", ASN1_STRING_length(g->d.uniformResourceIdentifier),
			         (const char *)ASN1_STRING_get0_data(g->d.uniformResourceIdentifier));
	}
	GENERAL_NAMES_free(sans);
}

/* Loads proxy i's cached SVID if it is for its service, chains to the CA
 * file's roots and has SVID_MIN_LEFT seconds left. */
static bool load_cached(struct load *L, X509_STORE *roots, struct px *p)
{
	char path[512], uri[300], want[128];
	FILE *f;
	X509 *x;
	X509_STORE_CTX *vc;
	bool ok = false;
	time_t later = time(NULL) + SVID_MIN_LEFT;

	if (!L->o.svid_dir)
		return false;
	cache_path(L, p->idx, path, sizeof(path));
	f = fopen(path, "r");
	if (!f)
		return false;
	p->key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
	p->cert = PEM_read_X509(f, NULL, NULL, NULL);
	p->chain = sk_X509_new_null();
	while (p->chain && (x = PEM_read_X509(f, NULL, NULL, NULL)) != NULL)
		sk_X509_push(p->chain, x);
	fclose(f);
	ERR_clear_error();
	if (!p->key || !p->cert || !X509_check_private_key(p->cert, p->key))
		goto out;
	cert_uri(p->cert, uri, sizeof(uri));
	svc_name(L, p->svc, want, sizeof(want));
	/* spiffe://<td>/svc/<want> */
	snprintf(path, sizeof(path), "/svc/%s", want);
	if (strncmp(uri, "spiffe://", 9) != 0 || strlen(uri) <= strlen(path) ||
	    strcmp(uri + strlen(uri) - strlen(path), path) != 0 ||
	    X509_cmp_time(X509_get0_notAfter(p->cert), &later) <= 0)
		goto out;
	vc = X509_STORE_CTX_new();
	if (vc && X509_STORE_CTX_init(vc, roots, p->cert, p->chain) == 1)
		ok = X509_verify_cert(vc) == 1;
	X509_STORE_CTX_free(vc);
out:
	ERR_clear_error();
	if (!ok) {
		EVP_PKEY_free(p->key);
		X509_free(p->cert);
		sk_X509_pop_free(p->chain, X509_free);
		p->key = NULL;
		p->cert = NULL;
		p->chain = NULL;
	}
	return ok;
}

static int save_cached(const struct load *L, const struct px *p, const char *chain_pem)
{
	char path[512], tmp[520];
	FILE *f;
	int ok;

	if (!L->o.svid_dir)
		return 0;
	cache_path(L, p->idx, path, sizeof(path));
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f)
		return -1;
	fchmod(fileno(f), 0600);
	ok = PEM_write_PrivateKey(f, p->key, NULL, NULL, 0, NULL, NULL) == 1 &&
	     fputs(chain_pem, f) >= 0;
	ok = fclose(f) == 0 && ok;
	return ok && rename(tmp, path) == 0 ? 0 : -1;
}

static int adopt_chain(struct px *p, const char *pem)
{
	BIO *b = BIO_new_mem_buf(pem, -1);
	X509 *x;

	p->cert = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
	p->chain = sk_X509_new_null();
	while (b && p->chain && (x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL)
		sk_X509_push(p->chain, x);
	BIO_free(b);
	ERR_clear_error();
	return p->cert && p->chain ? 0 : -1;
}

/* One SVID for p through h with its service's join token. */
static int issue_one(struct load *L, struct httpc *h, struct px *p)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	char name[64], auth[600], err[HTTPC_ERR_MAX] = "";
	const char *hdrs[] = { auth, NULL };
	struct httpc_response r;
	const char *chain;
	char *csr = NULL;
	json_t *body;
	int rc = -1;

	svc_name(L, p->svc, name, sizeof(name));
	if (ca_new_key(&p->key) < 0 || ca_make_csr(p->key, name, &csr, &e) < 0) {
		say("ctlload: key or CSR for proxy %d: %s", p->idx, e.message);
		return -1;
	}
	body = json_pack("{s:s}", "csr", csr);
	free(csr);
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", L->tokens[p->svc]);
	if (httpc_request(h, "POST", "/v1/svid", body, NULL, 0, hdrs, &r, err) != 0) {
		say("ctlload: POST /v1/svid for proxy %d: %s", p->idx, err);
		json_decref(body);
		return -1;
	}
	json_decref(body);
	chain = json_string_value(json_object_get(r.json, "cert_chain"));
	if (r.status != 200 || !chain) {
		say("ctlload: POST /v1/svid for proxy %d: HTTP %d %.300s", p->idx, r.status,
		    r.body ? r.body : "");
	} else if (adopt_chain(p, chain) < 0) {
		say("ctlload: proxy %d: unreadable cert_chain", p->idx);
	} else {
		if (save_cached(L, p, chain) < 0)
			say("ctlload: cannot cache the SVID of proxy %d in %s", p->idx, L->o.svid_dir);
		rc = 0;
	}
	httpc_response_clear(&r);
	return rc;
}

static void *issue_thread(void *arg)
{
	struct load *L = arg;
	struct httpc *h = NULL;
	int i, n = 0;

	while ((i = atomic_fetch_add(&L->next_issue, 1)) < L->o.proxies) {
		struct px *p = &L->px[i];

		if (p->cert)
			continue;
		if (!h)
			h = client(L, n++, NULL);
		if (!h || issue_one(L, h, p) < 0) {
			atomic_fetch_add(&L->issue_failed, 1);
			continue;
		}
		atomic_fetch_add(&L->issued, 1);
	}
	httpc_free(h);
	return NULL;
}

static int setup_svids(struct load *L)
{
	X509_STORE *roots = X509_STORE_new();
	pthread_t th[64];
	bool *need = calloc((size_t)L->o.proxies, sizeof(bool));
	int missing = 0, nth = L->o.issue_threads;
	int64_t t0 = now_ns();

	if (!roots || !need || X509_STORE_load_file(roots, L->o.ca) != 1) {
		say("ctlload: cannot load the CA file %s", L->o.ca);
		X509_STORE_free(roots);
		free(need);
		return -1;
	}
	if (L->o.svid_dir)
		mkdir(L->o.svid_dir, 0700);
	for (int i = 0; i < L->o.proxies; i++) {
		struct px *p = &L->px[i];

		p->L = L;
		p->idx = i;
		p->svc = i % L->o.services;
		if (load_cached(L, roots, p))
			atomic_fetch_add(&L->cached, 1);
		else
			need[i] = true, missing++;
	}
	X509_STORE_free(roots);
	if (missing && (read_small(L->o.admin_token_file, L->admin_token, sizeof(L->admin_token)) < 0 ||
	                make_tokens(L, need) < 0)) {
		free(need);
		return -1;
	}
	free(need);
	if (nth > 64)
		nth = 64;
	for (int k = 0; missing && k < nth; k++)
		pthread_create(&th[k], NULL, issue_thread, L);
	for (int k = 0; missing && k < nth; k++)
		pthread_join(th[k], NULL);
	printf("issued %d cached %d failed %d seconds %.2f\n", atomic_load(&L->issued),
	       atomic_load(&L->cached), atomic_load(&L->issue_failed), (double)(now_ns() - t0) / 1e9);
	fflush(stdout);
	return atomic_load(&L->issue_failed) ? -1 : 0;
}

/* ---- load: one proxy's requests ---- */

static void px_start(struct px *p);
static void px_read(struct bufferevent *bev, void *arg);
static void px_event(struct bufferevent *bev, short what, void *arg);

static void px_drop_conn(struct px *p)
{
	if (p->bev) {
		SSL *ssl = bufferevent_openssl_get_ssl(p->bev);

		if (ssl)
			SSL_set_shutdown(ssl, SSL_RECEIVED_SHUTDOWN | SSL_SENT_SHUTDOWN);
		bufferevent_free(p->bev);
		p->bev = NULL;
	}
	if (p->st == PX_CONNECTING)
		p->L->connecting--;
	p->st = PX_IDLE;
}

/* Starts queued connections while fewer than --max-connecting handshake. */
static void queue_run(struct load *L)
{
	while (L->qhead && L->connecting < L->o.max_connecting) {
		struct px *p = L->qhead;

		L->qhead = p->qnext;
		if (!L->qhead)
			L->qtail = NULL;
		p->qnext = NULL;
		p->st = PX_IDLE;
		px_start(p);
	}
}

static void px_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	px_start(arg);
}

/* A failure: count it, close, try again after ms (plus up to 50 % jitter). */
static void px_fail(struct px *p, long ms)
{
	struct timeval tv;

	p->L->errors++;
	px_drop_conn(p);
	ms += rand() % (ms / 2 + 1);
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	evtimer_add(p->retry, &tv);
	queue_run(p->L);
}

static void px_send(struct px *p)
{
	struct load *L = p->L;
	const struct target *t = &L->t[p->idx % L->n_t];
	struct evbuffer *out = bufferevent_get_output(p->bev);
	const char *conn = L->o.keepalive ? "keep-alive" : "close";
	char name[64];

	svc_name(L, p->svc, name, sizeof(name));
	p->head_done = false;
	p->status = 0;
	p->body_len = 0;
	p->retry_after = 0;
	p->server_closes = false;
	if (L->o.do_register && !p->registered) {
		char body[128];
		/* Ports of its own: an address or application port another service
		 * holds from the same IP is refused (409). */
		int port = 10000 + p->idx % 55000;
		int n = snprintf(body, sizeof(body), "{\"address\":\"127.0.0.1:%d\",\"ports\":[%d]}",
		                 port, port);

		p->req = REQ_REGISTER;
		evbuffer_add_printf(out, "POST /v1/services/%s/endpoints HTTP/1.1\r\nHost: %s\r\n"
		                    "User-Agent: meshlet-ctlload\r\nAccept: application/json\r\n"
		                    "Connection: %s\r\nContent-Type: application/json\r\n"
		                    "Content-Length: %d\r\n\r\n%s", name, t->host, conn, n, body);
	} else {
		p->req = REQ_POLL;
		p->wait = p->have_version ? L->o.wait : 0;
		evbuffer_add_printf(out, "GET /v1/services/%s/config?after=%lld&wait=%d HTTP/1.1\r\n"
		                    "Host: %s\r\nUser-Agent: meshlet-ctlload\r\nAccept: application/json\r\n"
		                    "Connection: %s\r\n\r\n", name,
		                    (long long)(p->have_version ? p->version : 0), p->wait, t->host, conn);
	}
	p->st = PX_SENT;
}

static void px_start(struct px *p)
{
	struct load *L = p->L;
	const struct target *t = &L->t[p->idx % L->n_t];
	SSL *ssl;

	if (p->st != PX_IDLE)
		return;
	if (L->connecting >= L->o.max_connecting) {
		p->st = PX_QUEUED;
		if (L->qtail)
			L->qtail->qnext = p;
		else
			L->qhead = p;
		L->qtail = p;
		return;
	}
	ssl = SSL_new(L->ctx);
	/* The SVID and its chain as given (none after the leaf: control signs
	 * with a root), as lib/httpc.c sets them: never a chain OpenSSL builds
	 * from the CA file, which would send control the root as well and make
	 * it parse and hold a copy of it per connection (about 3 KB). */
	if (!ssl || SSL_use_cert_and_key(ssl, p->cert, p->key, p->chain, 1) != 1) {
		SSL_free(ssl);
		say("ctlload: proxy %d: cannot set up TLS", p->idx);
		px_fail(p, RETRY_MS);
		return;
	}
	p->bev = bufferevent_openssl_socket_new(L->base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
	                                        BEV_OPT_CLOSE_ON_FREE);
	if (!p->bev) {
		SSL_free(ssl);
		px_fail(p, RETRY_MS);
		return;
	}
	bufferevent_openssl_set_allow_dirty_shutdown(p->bev, 1);
	bufferevent_setcb(p->bev, px_read, NULL, px_event, p);
	p->st = PX_CONNECTING;
	L->connecting++;
	if (bufferevent_socket_connect(p->bev, (struct sockaddr *)&t->addr, (int)t->addr_len) < 0) {
		px_fail(p, RETRY_MS);
		return;
	}
	bufferevent_enable(p->bev, EV_READ);
}

static void px_event(struct bufferevent *bev, short what, void *arg)
{
	struct px *p = arg;
	struct load *L = p->L;

	if (what & BEV_EVENT_CONNECTED) {
		L->connecting--;
		L->handshakes++;
		px_send(p);
		queue_run(L);
		return;
	}
	/* EOF or error before a whole answer (an answer ends in px_answer). */
	if (what & BEV_EVENT_ERROR) {
		unsigned long e = bufferevent_get_openssl_error(bev);

		if (e && L->errors < 20) {
			char buf[256];

			ERR_error_string_n(e, buf, sizeof(buf));
			say("ctlload: proxy %d: TLS: %s", p->idx, buf);
		} else if (L->errors < 20) {
			say("ctlload: proxy %d: %s", p->idx, strerror(EVUTIL_SOCKET_ERROR()));
		}
	}
	px_fail(p, RETRY_MS);
}

static void px_record(struct px *p, int64_t version)
{
	struct load *L = p->L;

	if (!p->have_version)
		L->first_answers++;
	if (!p->have_version || version != p->version) {
		L->changes++;
		if (L->events)
			fprintf(L->events, "%d %lld %lld\n", p->idx, (long long)version,
			        (long long)now_ns());
	}
	p->have_version = true;
	p->version = version;
}

/* A whole answer is in body (NUL-terminated). Returns the retry delay in
 * ms, 0 to go on at once. */
static long px_answer(struct px *p, const char *body)
{
	struct load *L = p->L;
	json_error_t je;
	json_t *doc;
	json_int_t v;

	L->answers++;
	if (p->req == REQ_REGISTER) {
		/* 2xx, or a 4xx that retrying will not change (ctlclient_config.c) */
		if (p->status >= 500 || p->status == 401 || p->status == 429)
			return p->status == 429 ? p->retry_after * 1000 : RETRY_MS;
		if (p->status < 300)
			L->registered++;
		else if (L->errors < 20)
			say("ctlload: proxy %d: registration refused: %d %.200s", p->idx, p->status, body);
		p->registered = true;
		return 0;
	}
	if (p->status == 429) {
		L->timeouts_429++;
		return (p->retry_after > 0 ? p->retry_after : 5) * 1000;
	}
	if (p->status != 200) {
		L->errors++;
		if (L->errors < 20)
			say("ctlload: proxy %d: config: HTTP %d %.200s", p->idx, p->status, body);
		return RETRY_MS;
	}
	doc = json_loads(body, 0, &je);
	if (!doc || json_unpack(doc, "{s:I}", "version", &v) < 0) {
		json_decref(doc);
		say("ctlload: proxy %d: config answer without a version", p->idx);
		return RETRY_MS;
	}
	json_decref(doc);
	px_record(p, v);
	return 0;
}

/* Parses the status line and the headers we use. -1: malformed. */
static int parse_head(struct px *p, const char *head)
{
	const char *line;

	if (sscanf(head, "HTTP/1.%*d %d", &p->status) != 1)
		return -1;
	p->body_len = 0;
	for (line = strstr(head, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
		const char *h = line + 2;

		if (strncasecmp(h, "Content-Length:", 15) == 0)
			p->body_len = strtoul(h + 15, NULL, 10);
		else if (strncasecmp(h, "Retry-After:", 12) == 0)
			p->retry_after = strtol(h + 12, NULL, 10);
		else if (strncasecmp(h, "Connection:", 11) == 0 && strcasestr(h, "close") &&
		         strcasestr(h, "close") < strstr(h, "\r\n"))
			p->server_closes = true;
		else if (strncasecmp(h, "Transfer-Encoding:", 18) == 0)
			return -1;   /* control sends Content-Length */
	}
	return p->body_len > MAX_BODY ? -1 : 0;
}

static void px_read(struct bufferevent *bev, void *arg)
{
	struct px *p = arg;
	struct load *L = p->L;
	struct evbuffer *in = bufferevent_get_input(bev);
	char *body;
	long delay;

	if (p->st != PX_SENT) {
		px_fail(p, RETRY_MS);
		return;
	}
	if (!p->head_done) {
		struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
		char head[MAX_HEAD + 1];

		if (end.pos < 0) {
			if (evbuffer_get_length(in) > MAX_HEAD)
				px_fail(p, RETRY_MS);
			return;
		}
		if (end.pos + 4 > MAX_HEAD) {
			px_fail(p, RETRY_MS);
			return;
		}
		evbuffer_remove(in, head, (size_t)end.pos + 4);
		head[end.pos + 2] = '\0';
		if (parse_head(p, head) < 0) {
			say("ctlload: proxy %d: malformed answer head", p->idx);
			px_fail(p, RETRY_MS);
			return;
		}
		p->head_done = true;
	}
	if (evbuffer_get_length(in) < p->body_len)
		return;
	body = malloc(p->body_len + 1);
	if (!body) {
		px_fail(p, RETRY_MS);
		return;
	}
	evbuffer_remove(in, body, p->body_len);
	body[p->body_len] = '\0';
	delay = px_answer(p, body);
	free(body);
	if (delay > 0) {
		L->errors--;      /* px_fail counts; a 429 or refusal was counted above */
		px_fail(p, delay);
		return;
	}
	if (L->o.keepalive && !p->server_closes) {
		px_send(p);
		return;
	}
	L->reconnects++;
	px_drop_conn(p);
	px_start(p);
}

/* ---- the loop: status, stop ---- */

static void count_states(const struct load *L, int *sent_wait, int *sent, int *queued)
{
	*sent_wait = *sent = *queued = 0;
	for (int i = 0; i < L->o.proxies; i++) {
		const struct px *p = &L->px[i];

		*sent += p->st == PX_SENT;
		*sent_wait += p->st == PX_SENT && p->req == REQ_POLL && p->wait > 0;
		*queued += p->st == PX_QUEUED;
	}
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct load *L = arg;
	int waiting, sent, queued;

	count_states(L, &waiting, &sent, &queued);
	if (L->events)
		fflush(L->events);
	if (!L->ready && waiting == L->o.proxies) {
		L->ready = true;
		printf("ready proxies %d seconds %.2f handshakes %llu\n", L->o.proxies, since(L),
		       (unsigned long long)L->handshakes);
	}
	printf("status t %.1f waiting %d sent %d connecting %d queued %d answers %llu changes %llu "
	       "handshakes %llu errors %llu r429 %llu\n", since(L), waiting, sent, L->connecting,
	       queued, (unsigned long long)L->answers, (unsigned long long)L->changes,
	       (unsigned long long)L->handshakes, (unsigned long long)L->errors,
	       (unsigned long long)L->timeouts_429);
	fflush(stdout);
}

static void stop_cb(evutil_socket_t fd, short what, void *arg)
{
	struct load *L = arg;

	if (what & EV_READ) {
		char buf[256];

		if (read(0, buf, sizeof(buf)) > 0)
			return;
	}
	event_base_loopbreak(L->base);
}

static SSL_CTX *client_ctx(const char *ca)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

	if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
	    SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
		say("ctlload: cannot set up TLS with CA file %s", ca);
		SSL_CTX_free(ctx);
		return NULL;
	}
	/* Control's certificate must chain to its CA; like lib/httpc.c, no
	 * session cache (control issues no tickets anyway). */
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
	return ctx;
}

static void raise_nofile(int want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= (rlim_t)want)
		return;
	rl.rlim_cur = (rlim_t)want;
	if (rl.rlim_max < (rlim_t)want)
		rl.rlim_max = (rlim_t)want;       /* works as root */
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
		getrlimit(RLIMIT_NOFILE, &rl);
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
		say("ctlload: open files limited to %llu; %d proxies may not all connect",
		    (unsigned long long)rl.rlim_max, want - 256);
	}
}

static int run_load(struct load *L)
{
	struct timeval sec = { 1, 0 };

	L->base = event_base_new();
	L->ctx = client_ctx(L->o.ca);
	if (!L->base || !L->ctx)
		return -1;
	L->tick = event_new(L->base, -1, EV_PERSIST, tick_cb, L);
	L->stdin_ev = event_new(L->base, 0, EV_READ | EV_PERSIST, stop_cb, L);
	L->sigterm = evsignal_new(L->base, SIGTERM, stop_cb, L);
	L->sigint = evsignal_new(L->base, SIGINT, stop_cb, L);
	if (!L->tick || !L->stdin_ev || !L->sigterm || !L->sigint)
		return -1;
	event_add(L->tick, &sec);
	{
		struct stat sb;

		/* stdin ending stops the run when it is a pipe or a terminal (a
		 * regular file or /dev/null cannot be polled). */
		if (fstat(0, &sb) == 0 && (S_ISFIFO(sb.st_mode) || S_ISSOCK(sb.st_mode) || isatty(0)))
			event_add(L->stdin_ev, NULL);
	}
	event_add(L->sigterm, NULL);
	event_add(L->sigint, NULL);
	if (L->o.duration > 0) {
		struct timeval d = { L->o.duration, 0 };

		L->stop_timer = evtimer_new(L->base, stop_cb, L);
		evtimer_add(L->stop_timer, &d);
	}
	clock_gettime(CLOCK_MONOTONIC, &L->t0);
	for (int i = 0; i < L->o.proxies; i++) {
		struct px *p = &L->px[i];

		p->retry = evtimer_new(L->base, px_retry_cb, p);
		if (!p->retry)
			return -1;
		px_start(p);
	}
	event_base_dispatch(L->base);
	return 0;
}

static void summary(const struct load *L)
{
	int waiting, sent, queued;

	count_states(L, &waiting, &sent, &queued);
	printf("{\"proxies\": %d, \"services\": %d, \"urls\": %d, \"issued\": %d, \"cached\": %d, "
	       "\"ready\": %s, \"waiting\": %d, \"answers\": %llu, \"changes\": %llu, "
	       "\"handshakes\": %llu, \"errors\": %llu, \"r429\": %llu, \"registered\": %llu, "
	       "\"first_answers\": %llu, \"seconds\": %.2f}\n",
	       L->o.proxies, L->o.services, L->n_t, atomic_load(&L->issued), atomic_load(&L->cached),
	       L->ready ? "true" : "false", waiting, (unsigned long long)L->answers,
	       (unsigned long long)L->changes, (unsigned long long)L->handshakes,
	       (unsigned long long)L->errors, (unsigned long long)L->timeouts_429,
	       (unsigned long long)L->registered, (unsigned long long)L->first_answers, since(L));
	fflush(stdout);
}

static void usage(FILE *f)
{
	fprintf(f,
	        "usage: ctlload --url https://HOST:PORT[,URL...] --ca CA.pem --admin-token-file F\n"
	        "               [--proxies N] [--services S] [--svid-dir DIR] [--events FILE]\n"
	        "               [--wait S] [--max-connecting N] [--issue-threads N] [--keepalive]\n"
	        "               [--register] [--service-prefix P] [--duration S]\n"
	        "Simulates N meshlet proxies long-polling control (see the comment in\n"
	        "tests/bench/ctlload.c). Defaults: 100 proxies, 10 services, wait 30, 256 handshakes\n"
	        "at once, 4 issuing threads; runs until stdin closes or SIGTERM.\n");
}

static int parse_int(const char *name, const char *s, int min, int max, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (!*s || *end || errno || v < min || v > max) {
		say("ctlload: --%s: expected %d..%d", name, min, max);
		return -1;
	}
	*out = (int)v;
	return 0;
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{ "url", required_argument, NULL, 'u' }, { "ca", required_argument, NULL, 'c' },
		{ "admin-token-file", required_argument, NULL, 'a' },
		{ "proxies", required_argument, NULL, 'n' }, { "services", required_argument, NULL, 's' },
		{ "svid-dir", required_argument, NULL, 'd' }, { "events", required_argument, NULL, 'e' },
		{ "wait", required_argument, NULL, 'w' }, { "max-connecting", required_argument, NULL, 'm' },
		{ "issue-threads", required_argument, NULL, 't' },
		{ "keepalive", no_argument, NULL, 'k' }, { "register", no_argument, NULL, 'r' },
		{ "service-prefix", required_argument, NULL, 'p' },
		{ "duration", required_argument, NULL, 'D' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c, rc = 0;

	*o = (struct opts){ .proxies = 100, .services = 10, .issue_threads = 4,
	                    .max_connecting = 256, .wait = 30, .prefix = "load" };
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1 && rc == 0) {
		switch (c) {
		case 'u': o->urls = optarg; break;
		case 'c': o->ca = optarg; break;
		case 'a': o->admin_token_file = optarg; break;
		case 'd': o->svid_dir = optarg; break;
		case 'e': o->events = optarg; break;
		case 'p': o->prefix = optarg; break;
		case 'k': o->keepalive = true; break;
		case 'r': o->do_register = true; break;
		case 'n': rc = parse_int("proxies", optarg, 1, 200000, &o->proxies); break;
		case 's': rc = parse_int("services", optarg, 1, 1000, &o->services); break;
		case 'w': rc = parse_int("wait", optarg, 1, 300, &o->wait); break;
		case 'm': rc = parse_int("max-connecting", optarg, 1, 100000, &o->max_connecting); break;
		case 't': rc = parse_int("issue-threads", optarg, 1, 64, &o->issue_threads); break;
		case 'D': rc = parse_int("duration", optarg, 1, 86400, &o->duration); break;
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); return -1;
		}
	}
	if (rc < 0)
		return -1;
	if (optind < argc || !o->urls || !o->ca || !o->admin_token_file) {
		usage(stderr);
		return -1;
	}
	if (strlen(o->prefix) > 40) {
		say("ctlload: --service-prefix: at most 40 characters");
		return -1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	static struct load L;
	int rc;

	if (parse_args(argc, argv, &L.o) < 0)
		return 2;
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	raise_nofile(L.o.proxies + 256);
	if (parse_targets(&L) < 0)
		return 2;
	L.px = calloc((size_t)L.o.proxies, sizeof(*L.px));
	L.tokens = calloc((size_t)L.o.services, sizeof(*L.tokens));
	if (!L.px || !L.tokens)
		return 1;
	if (L.o.events && !(L.events = fopen(L.o.events, "w"))) {
		say("ctlload: %s: %s", L.o.events, strerror(errno));
		return 1;
	}
	if (setup_svids(&L) < 0)
		return 1;
	rc = run_load(&L);
	if (L.events)
		fclose(L.events);
	summary(&L);
	return rc < 0 ? 1 : 0;
}
