/*
 * Unit tests for proxy/ctlclient*.c, the proxy's control-plane client,
 * through its own interface (struct ctlclient_host) and without a proxy:
 * real files in a temporary state_dir, a real CA and SVID from lib/ca, and
 * either a control URL nothing listens on or a small HTTPS responder that
 * answers as control does (signing the CSR with that CA), so each test sees
 * what the client does: join and serve, serve from its cache, refuse a
 * state_dir, a join token, a pin or a malformed answer, and say why in its
 * status.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <cmocka.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/file.h"
#include "ctlclient.h"
#include "snapshot.h"

/* 43 characters: the secret control makes (32 bytes, base64url). */
#define SECRET43 "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

/* The outbound listener of the fixture's config: payments, endpoints from control. */
#define OUTBOUND_PAYMENTS "[{\"listen\": \"127.0.0.1:9001\", \"service\": \"payments\"}]"

/* What the client did to its host. */
struct host_log {
	pthread_mutex_t lock;
	int installs;
	int connected_calls;
	bool connected;
	bool had_tls, had_policy;
	size_t n_registry;
	char registry0[64];
	size_t registry0_addrs;
	uint16_t registry0_port;
};

static int on_install(void *ctx, struct snapshot_source *src, struct meshlet_err *err)
{
	struct host_log *h = ctx;

	pthread_mutex_lock(&h->lock);
	h->installs++;
	h->had_tls = src->tls != NULL;
	h->had_policy = src->policy != NULL;
	h->n_registry = src->n_registry;
	if (src->n_registry > 0) {
		snprintf(h->registry0, sizeof(h->registry0), "%s", src->registry[0].service);
		h->registry0_addrs = src->registry[0].n_addrs;
		h->registry0_port = src->registry[0].n_addrs ? src->registry[0].app_ports[0].port[0] : 0;
	}
	pthread_mutex_unlock(&h->lock);
	snapshot_source_free(src);
	return 0;
}

static bool on_set_connected(void *ctx, bool connected)
{
	struct host_log *h = ctx;
	bool was;

	pthread_mutex_lock(&h->lock);
	was = h->connected;
	h->connected = connected;
	h->connected_calls++;
	pthread_mutex_unlock(&h->lock);
	return was;
}

struct fixture {
	char url[64];                   /* control's */
	char dir[PATH_MAX];
	char state_dir[PATH_MAX + 16];
	char token_file[PATH_MAX + 16];
	char pin[CA_PIN_HEX_LEN];
	struct ca *ca;
	struct config *cfg;
	struct host_log log;
	struct ctlclient_host host;
};

static void path_in(const struct fixture *f, char *out, size_t len, const char *name)
{
	snprintf(out, len, "%s/%s", f->state_dir, name);
}

static void write_text(const char *path, mode_t mode, const char *text)
{
	assert_int_equal(file_replace(path, mode, text, strlen(text)), 0);
}

static void load_config(struct fixture *f, const char *outbound_json)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	char text[3 * PATH_MAX];
	json_error_t je;
	json_t *doc;

	snprintf(text, sizeof(text),
	         "{\"service\": \"orders\", \"trust_domain\": \"mesh.local\", \"state_dir\": \"%s\","
	         " \"control\": {\"url\": \"%s\", \"token_file\": \"%s\"},"
	         " \"inbound\": [{\"listen\": \"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\"}],"
	         " \"outbound\": %s, \"admin\": {\"listen\": \"127.0.0.1:15000\"}}",
	         f->state_dir, f->url, f->token_file, outbound_json);
	doc = json_loads(text, 0, &je);
	assert_non_null(doc);
	if (config_parse(doc, NULL, &f->cfg, &e) != 0)
		fail_msg("config: %s: %s", e.path, e.message);
	json_decref(doc);
}

static int setup(void **state)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct fixture *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	snprintf(f->url, sizeof(f->url), "https://127.0.0.1:1");   /* nothing listens */
	snprintf(f->dir, sizeof(f->dir), "/tmp/ctlclient_test.XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->state_dir, sizeof(f->state_dir), "%s/state", f->dir);
	snprintf(f->token_file, sizeof(f->token_file), "%s/token", f->dir);
	assert_int_equal(ca_generate(&f->ca, "mesh.local", 24 * 3600, &e), 0);
	assert_int_equal(ca_pin_sha256(ca_cert(f->ca), f->pin), 0);
	pthread_mutex_init(&f->log.lock, NULL);
	f->host.install = on_install;
	f->host.set_connected = on_set_connected;
	f->host.ctx = &f->log;
	load_config(f, OUTBOUND_PAYMENTS);
	*state = f;
	return 0;
}

/* The same config with control at url. */
static void point_at(struct fixture *f, const char *url)
{
	snprintf(f->url, sizeof(f->url), "%s", url);
	config_free(f->cfg);
	f->cfg = NULL;
	load_config(f, OUTBOUND_PAYMENTS);
}

static int teardown(void **state)
{
	struct fixture *f = *state;
	char cmd[PATH_MAX + 32];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->dir);
	assert_int_equal(system(cmd), 0);
	config_free(f->cfg);
	ca_free(f->ca);
	pthread_mutex_destroy(&f->log.lock);
	free(f);
	return 0;
}

static char *pem_of_key(EVP_PKEY *key)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *data, *out;
	long n;

	assert_int_equal(PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL), 1);
	n = BIO_get_mem_data(b, &data);
	out = strndup(data, (size_t)n);
	BIO_free(b);
	return out;
}

static char *pem_of_cert(X509 *x)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *data, *out;
	long n;

	assert_int_equal(PEM_write_bio_X509(b, x), 1);
	n = BIO_get_mem_data(b, &data);
	out = strndup(data, (size_t)n);
	BIO_free(b);
	return out;
}

/* Writes what a client that joined as service leaves in state_dir:
 * svid.key, svid.pem and bundle.pem (and state.json when given). */
static void write_cache(struct fixture *f, const char *service, const char *state_json)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	char path[PATH_MAX + 64], serial[CA_SERIAL_HEX_MAX];
	EVP_PKEY *key = NULL;
	X509 *x = NULL;
	char *pem;

	assert_int_equal(mkdir(f->state_dir, 0700), 0);
	assert_int_equal(ca_new_key(&key), 0);
	assert_int_equal(ca_issue_svid(f->ca, service, key, 3600, &x, serial, &e), 0);
	pem = pem_of_key(key);
	path_in(f, path, sizeof(path), "svid.key");
	write_text(path, 0600, pem);
	free(pem);
	pem = pem_of_cert(x);
	path_in(f, path, sizeof(path), "svid.pem");
	write_text(path, 0644, pem);
	free(pem);
	pem = pem_of_cert(ca_cert(f->ca));
	path_in(f, path, sizeof(path), "bundle.pem");
	write_text(path, 0644, pem);
	free(pem);
	if (state_json) {
		path_in(f, path, sizeof(path), "state.json");
		write_text(path, 0600, state_json);
	}
	X509_free(x);
	EVP_PKEY_free(key);
}

static const char good_state[] =
	"{\"format\": 1, \"version\": 5, \"policy_version\": 2,"
	" \"policy\": {\"service\": \"orders\", \"default\": \"deny\", \"rules\": []},"
	" \"endpoints\": {\"payments\": [{\"address\": \"10.0.0.3:15006\", \"ports\": [8080]},"
	"                               {\"address\": \"not an address\"}],"
	"                 \"billing\": [\"10.0.0.9:15006\"]},"
	" \"bundle_version\": 1, \"revoked\": [\"0a\"], \"cert_generation\": 0, \"serial\": \"1\"}";

/* Waits up to 10 s for the status to start with prefix; returns it. */
static const char *wait_status(struct ctlclient *c, const char *prefix, char *buf, size_t len)
{
	for (int i = 0; i < 1000; i++) {
		ctlclient_status(c, buf, len);
		if (strncmp(buf, prefix, strlen(prefix)) == 0)
			return buf;
		usleep(10000);
	}
	fail_msg("status still '%s', not '%s...'", buf, prefix);
	return buf;
}

/* ---- a control that answers like one ------------------------------------ */

/*
 * An HTTPS responder in a thread: control's server certificate from the
 * fixture's CA, one request per connection (the client sends Connection:
 * close), and the answers of POST /v1/svid (the CSR really signed),
 * GET /v1/bundle, POST .../endpoints and GET .../config (config_answer, as
 * given by the test).
 */
struct fake_control {
	int lfd;
	char url[64];
	SSL_CTX *ctx;
	struct ca *ca;
	pthread_t th;
	pthread_mutex_t lock;
	bool stop;
	const char *config_answer;
	int svids, bundles, registers, polls;
};

/* Reads one request (head and Content-Length body) into buf; its length or -1. */
static int read_request(SSL *ssl, char *buf, size_t cap)
{
	size_t got = 0;

	for (;;) {
		int n = SSL_read(ssl, buf + got, (int)(cap - 1 - got));
		char *end;

		if (n <= 0)
			return -1;
		got += (size_t)n;
		buf[got] = '\0';
		end = strstr(buf, "\r\n\r\n");
		if (end) {
			const char *cl = strcasestr(buf, "Content-Length: ");
			size_t want = cl ? (size_t)atoi(cl + 16) : 0;

			if (got >= (size_t)(end + 4 - buf) + want)
				return (int)got;
		}
		if (got + 1 >= cap)
			return -1;
	}
}

static char *svid_answer(struct fake_control *fc, const char *req)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	const char *body = strstr(req, "\r\n\r\n") + 4;
	json_t *doc = json_loads(body, 0, NULL), *ans;
	const char *csr = json_string_value(json_object_get(doc, "csr"));
	char serial[CA_SERIAL_HEX_MAX], *chain, *root, *text;
	EVP_PKEY *pub = NULL;
	X509 *x = NULL, *rootx = ca_cert(fc->ca);

	assert_non_null(csr);
	assert_int_equal(ca_csr_check(csr, strlen(csr), &pub, &e), 0);
	assert_int_equal(ca_issue_svid(fc->ca, "orders", pub, 3600, &x, serial, &e), 0);
	chain = ca_pem_encode(&x, 1);
	root = ca_pem_encode(&rootx, 1);
	ans = json_pack("{s:s, s:s, s:s, s:s, s:s, s:[s], s:i}", "cert_chain", chain,
	                "serial", serial, "expires_at", "2099-01-01T00:00:00Z",
	                "spiffe_id", "spiffe://mesh.local/svc/orders", "trust_domain", "mesh.local",
	                "bundle", root, "bundle_version", 1);
	text = json_dumps(ans, 0);
	json_decref(ans);
	json_decref(doc);
	free(chain);
	free(root);
	X509_free(x);
	EVP_PKEY_free(pub);
	return text;
}

static char *bundle_answer(struct fake_control *fc)
{
	X509 *rootx = ca_cert(fc->ca);
	char *root = ca_pem_encode(&rootx, 1), *text;
	json_t *ans = json_pack("{s:s, s:[s], s:[], s:i}", "trust_domain", "mesh.local",
	                        "roots", root, "revoked", "version", 1);

	text = json_dumps(ans, 0);
	json_decref(ans);
	free(root);
	return text;
}

/* The answer to req (malloc'd JSON text), counting what was asked. */
static char *answer(struct fake_control *fc, const char *req)
{
	char *text;

	pthread_mutex_lock(&fc->lock);
	if (strncmp(req, "POST /v1/svid ", 14) == 0) {
		fc->svids++;
		pthread_mutex_unlock(&fc->lock);
		return svid_answer(fc, req);
	}
	if (strncmp(req, "GET /v1/bundle ", 15) == 0) {
		fc->bundles++;
		pthread_mutex_unlock(&fc->lock);
		return bundle_answer(fc);
	}
	if (strncmp(req, "POST /v1/services/orders/endpoints ", 35) == 0) {
		fc->registers++;
		text = strdup("{}");
	} else if (strncmp(req, "GET /v1/services/orders/config?", 31) == 0) {
		/* A poll that already holds this answer waits a little, as
		 * control's long poll would, rather than spin. */
		if (fc->polls++ > 0 && !strstr(req, "after=0&"))
			usleep(50000);
		text = strdup(fc->config_answer);
	} else {
		text = NULL;
	}
	pthread_mutex_unlock(&fc->lock);
	return text;
}

static void serve_one(struct fake_control *fc, int fd)
{
	static char req[64 * 1024];
	SSL *ssl = SSL_new(fc->ctx);
	char head[160], *body = NULL;

	SSL_set_fd(ssl, fd);
	if (SSL_accept(ssl) == 1 && read_request(ssl, req, sizeof(req)) > 0) {
		body = answer(fc, req);
		snprintf(head, sizeof(head), "HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
		         "Content-Length: %zu\r\nConnection: close\r\n\r\n",
		         body ? "200 OK" : "404 Not Found", body ? strlen(body) : 0);
		SSL_write(ssl, head, (int)strlen(head));
		if (body)
			SSL_write(ssl, body, (int)strlen(body));
		SSL_shutdown(ssl);
	}
	free(body);
	ERR_clear_error();
	SSL_free(ssl);
	close(fd);
}

static void *fake_control_main(void *arg)
{
	struct fake_control *fc = arg;

	for (;;) {
		struct pollfd pfd = { .fd = fc->lfd, .events = POLLIN };
		bool stop;

		pthread_mutex_lock(&fc->lock);
		stop = fc->stop;
		pthread_mutex_unlock(&fc->lock);
		if (stop)
			return NULL;
		if (poll(&pfd, 1, 50) == 1) {
			int fd = accept(fc->lfd, NULL, NULL);

			if (fd >= 0)
				serve_one(fc, fd);
		}
	}
}

static void fake_control_start(struct fake_control *fc, struct ca *ca, const char *config_answer)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	static const char *const sans[] = { "127.0.0.1" };
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	EVP_PKEY *key = NULL;
	X509 *cert = NULL;

	memset(fc, 0, sizeof(*fc));
	fc->ca = ca;
	fc->config_answer = config_answer;
	pthread_mutex_init(&fc->lock, NULL);
	fc->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(fc->lfd >= 0);
	assert_int_equal(bind(fc->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(fc->lfd, 16), 0);
	assert_int_equal(getsockname(fc->lfd, (struct sockaddr *)&a, &al), 0);
	snprintf(fc->url, sizeof(fc->url), "https://127.0.0.1:%d", ntohs(a.sin_port));
	assert_int_equal(ca_new_key(&key), 0);
	assert_int_equal(ca_issue_server(ca, key, sans, 1, 3600, &cert, NULL, &e), 0);
	fc->ctx = SSL_CTX_new(TLS_server_method());
	assert_non_null(fc->ctx);
	assert_int_equal(SSL_CTX_use_certificate(fc->ctx, cert), 1);
	assert_int_equal(SSL_CTX_use_PrivateKey(fc->ctx, key), 1);
	assert_int_equal(SSL_CTX_add1_chain_cert(fc->ctx, ca_cert(ca)), 1);
	X509_free(cert);
	EVP_PKEY_free(key);
	assert_int_equal(pthread_create(&fc->th, NULL, fake_control_main, fc), 0);
}

static void fake_control_stop(struct fake_control *fc)
{
	pthread_mutex_lock(&fc->lock);
	fc->stop = true;
	pthread_mutex_unlock(&fc->lock);
	pthread_join(fc->th, NULL);
	close(fc->lfd);
	SSL_CTX_free(fc->ctx);
	pthread_mutex_destroy(&fc->lock);
}

static void test_serves_from_cache(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;

	write_cache(f, "orders", good_state);
	/* No token file: with a valid cached SVID none is needed. */
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	/* Installed before ctlclient_start returned, from the cache alone. */
	assert_int_equal(f->log.installs, 1);
	assert_true(f->log.had_tls);
	assert_true(f->log.had_policy);
	/* Only the upstream our outbound listener takes from control, and of
	 * it only the endpoint that parses. */
	assert_int_equal(f->log.n_registry, 1);
	assert_string_equal(f->log.registry0, "payments");
	assert_int_equal(f->log.registry0_addrs, 1);
	assert_int_equal(f->log.registry0_port, 8080);
	ctlclient_stop(c);
	/* Control was never reached: the gauge never said connected. */
	assert_false(f->log.connected);
	assert_true(f->log.connected_calls >= 1);
}

static void test_cache_without_state_waits(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;
	char buf[512];

	/* An SVID but no state.json: nothing to serve until control answers. */
	write_cache(f, "orders", NULL);
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	assert_int_equal(f->log.installs, 0);
	/* It tries control (the bundle first) and says why it cannot. */
	wait_status(c, "disconnected: ", buf, sizeof(buf));
	ctlclient_stop(c);
	assert_int_equal(f->log.installs, 0);
}

static void test_cache_of_another_service(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;
	char buf[512];

	/* Someone else's SVID is not ours: join again (the token is needed). */
	write_cache(f, "payments", good_state);
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), -ENOENT);
	assert_string_equal(e.path, "control.token_file");
	assert_int_equal(f->log.installs, 0);

	write_text(f->token_file, 0600, "x");
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	ctlclient_status(c, buf, sizeof(buf));
	assert_true(strcmp(buf, "joining") == 0 || strncmp(buf, "disconnected: ", 14) == 0);
	ctlclient_stop(c);
	assert_int_equal(f->log.installs, 0);
}

static void test_unusable_cache_files(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;
	char path[PATH_MAX + 64];

	write_cache(f, "orders", good_state);
	/* A key behind a symlink is not read (FILE_NOFOLLOW). */
	path_in(f, path, sizeof(path), "svid.key");
	assert_int_equal(rename(path, f->token_file), 0);
	assert_int_equal(symlink(f->token_file, path), 0);
	write_text(f->token_file, 0600, "mlt1.orders.x.y");   /* read at start, judged later */
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	ctlclient_stop(c);
	assert_int_equal(f->log.installs, 0);
}

static void test_state_dir_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;

	assert_int_equal(mkdir(f->state_dir, 0700), 0);
	assert_int_equal(chmod(f->state_dir, 0777), 0);
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), -EINVAL);
	assert_null(c);
	assert_string_equal(e.path, "state_dir");
	assert_non_null(strstr(e.message, "writable by group or others"));
	/* A file where the directory should be. */
	assert_int_equal(rmdir(f->state_dir), 0);
	write_text(f->state_dir, 0600, "");
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), -EINVAL);
	assert_non_null(strstr(e.message, "not a directory"));
}

static void test_no_cache_no_token(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;

	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), -ENOENT);
	assert_null(c);
	assert_string_equal(e.path, "control.token_file");
	assert_non_null(strstr(e.message, f->token_file));
	/* The state directory was made, private. */
	{
		struct stat st;

		assert_int_equal(stat(f->state_dir, &st), 0);
		assert_int_equal(st.st_mode & 0777, 0700);
	}
}

/* Starts with token as the join token and returns the status the first
 * join attempt ends in. */
static void join_with(struct fixture *f, const char *token, const char *expect)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;
	char buf[1024];

	write_text(f->token_file, 0600, token);
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	wait_status(c, "disconnected: ", buf, sizeof(buf));
	if (!strstr(buf, expect))
		fail_msg("status '%s' does not say '%s'", buf, expect);
	/* A token's secret never shows in the status. */
	assert_null(strstr(buf, "AAAAAAAAAAAAAAAA"));
	ctlclient_stop(c);
	assert_int_equal(f->log.installs, 0);
	assert_false(f->log.connected);
}

static void test_join_token_rule(void **state)
{
	struct fixture *f = *state;
	char tok[512];

	/* A secret of 16 characters, which the proxy used to take: refused
	 * before anything is sent, with the reason. */
	snprintf(tok, sizeof(tok), "mlt1.orders.%s.%.16s\n", f->pin, SECRET43);
	join_with(f, tok, "bad secret part");
}

static void test_join_token_garbage(void **state)
{
	struct fixture *f = *state;

	join_with(f, "  not a token  \n", "not a meshlet join token");
}

static void test_join_token_other_service(void **state)
{
	struct fixture *f = *state;
	char tok[512];

	snprintf(tok, sizeof(tok), "mlt1.payments.%s.%s", f->pin, SECRET43);
	join_with(f, tok, "is for service payments, not for orders");
}

static void test_join_well_formed_token(void **state)
{
	struct fixture *f = *state;
	char tok[512];

	/* What control makes parses; the join then fails only on the network
	 * (nothing listens at the control URL). */
	snprintf(tok, sizeof(tok), "mlt1.orders.%s.%s\n", f->pin, SECRET43);
	join_with(f, tok, "join: ");
}

static void wait_installs(struct host_log *h, int n)
{
	for (int i = 0; i < 1000; i++) {
		int v;

		pthread_mutex_lock(&h->lock);
		v = h->installs;
		pthread_mutex_unlock(&h->lock);
		if (v >= n)
			return;
		usleep(10000);
	}
	fail_msg("fewer than %d installs", n);
}

static const char config_answer[] =
	"{\"version\": 3, \"policy\": {\"service\": \"orders\", \"default\": \"deny\", \"rules\": []},"
	" \"policy_version\": 1, \"bundle_version\": 1, \"cert_generation\": 0,"
	" \"endpoints\": {\"payments\": [{\"address\": \"10.0.0.3:15006\", \"ports\": [8080]}]}}";

static void test_join_and_serve(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct fake_control fc;
	struct ctlclient *c = NULL;
	char tok[512], path[PATH_MAX + 64], *text = NULL;
	struct stat st;

	fake_control_start(&fc, f->ca, config_answer);
	point_at(f, fc.url);
	snprintf(tok, sizeof(tok), "mlt1.orders.%s.%s\n", f->pin, SECRET43);
	write_text(f->token_file, 0600, tok);
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	wait_installs(&f->log, 1);
	ctlclient_stop(c);
	fake_control_stop(&fc);
	/* Joined once, fetched the bundle, registered, polled; served what
	 * the config answer said. */
	assert_int_equal(fc.svids, 1);
	assert_true(fc.bundles >= 1);
	assert_int_equal(fc.registers, 1);
	assert_true(fc.polls >= 1);
	assert_true(f->log.had_tls);
	assert_true(f->log.had_policy);
	assert_int_equal(f->log.n_registry, 1);
	assert_int_equal(f->log.registry0_port, 8080);
	assert_true(f->log.connected);
	/* What it keeps: the key private, the state as applied. */
	path_in(f, path, sizeof(path), "svid.key");
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	path_in(f, path, sizeof(path), "state.json");
	assert_int_equal(file_read(path, 1 << 20, 0, &text, NULL), 0);
	assert_non_null(strstr(text, "\"version\": 3"));
	free(text);

	/* Control gone: the next start serves from what the first one kept,
	 * and needs no token for it. */
	assert_int_equal(unlink(f->token_file), 0);
	f->log.installs = 0;
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	assert_int_equal(f->log.installs, 1);
	assert_int_equal(f->log.registry0_port, 8080);
	ctlclient_stop(c);
}

/* Joins fc with a well-formed token whose pin is pin; returns the status
 * the client ends in ("disconnected: ..."). */
static void join_fake(struct fixture *f, struct fake_control *fc, const char *pin, char *buf,
                      size_t len)
{
	struct meshlet_err e = { { 0 }, { 0 } };
	struct ctlclient *c = NULL;
	char tok[512];

	point_at(f, fc->url);
	snprintf(tok, sizeof(tok), "mlt1.orders.%s.%s\n", pin, SECRET43);
	write_text(f->token_file, 0600, tok);
	assert_int_equal(ctlclient_start(&f->host, f->cfg, &c, &e), 0);
	wait_status(c, "disconnected: ", buf, len);
	ctlclient_stop(c);
}

static void test_malformed_config_answer(void **state)
{
	struct fixture *f = *state;
	struct fake_control fc;
	char buf[1024];

	/* A policy that is neither a document nor null: refused by the
	 * parser of that answer, nothing installed, the reason shown. */
	fake_control_start(&fc, f->ca, "{\"version\": 1, \"policy\": [], \"policy_version\": 1,"
	                   " \"bundle_version\": 1, \"cert_generation\": 0, \"endpoints\": {}}");
	join_fake(f, &fc, f->pin, buf, sizeof(buf));
	fake_control_stop(&fc);
	if (!strstr(buf, "malformed config answer: policy: must be a policy document or null"))
		fail_msg("status: %s", buf);
	assert_int_equal(fc.svids, 1);
	assert_int_equal(f->log.installs, 0);
}

static void test_pin_of_another_root(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err e = { { 0 }, { 0 } };
	struct fake_control fc;
	struct ca *other = NULL;
	char pin[CA_PIN_HEX_LEN], buf[1024];

	/* A token pinning another root: control is not trusted, the CSR and
	 * the token are not sent. */
	assert_int_equal(ca_generate(&other, "mesh.local", 24 * 3600, &e), 0);
	assert_int_equal(ca_pin_sha256(ca_cert(other), pin), 0);
	ca_free(other);
	fake_control_start(&fc, f->ca, config_answer);
	join_fake(f, &fc, pin, buf, sizeof(buf));
	fake_control_stop(&fc);
	if (!strstr(buf, "not sending the CSR"))
		fail_msg("status: %s", buf);
	assert_int_equal(fc.svids, 0);
	assert_int_equal(f->log.installs, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_serves_from_cache, setup, teardown),
		cmocka_unit_test_setup_teardown(test_cache_without_state_waits, setup, teardown),
		cmocka_unit_test_setup_teardown(test_cache_of_another_service, setup, teardown),
		cmocka_unit_test_setup_teardown(test_unusable_cache_files, setup, teardown),
		cmocka_unit_test_setup_teardown(test_state_dir_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_no_cache_no_token, setup, teardown),
		cmocka_unit_test_setup_teardown(test_join_token_rule, setup, teardown),
		cmocka_unit_test_setup_teardown(test_join_token_garbage, setup, teardown),
		cmocka_unit_test_setup_teardown(test_join_token_other_service, setup, teardown),
		cmocka_unit_test_setup_teardown(test_join_well_formed_token, setup, teardown),
		cmocka_unit_test_setup_teardown(test_join_and_serve, setup, teardown),
		cmocka_unit_test_setup_teardown(test_malformed_config_answer, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pin_of_another_root, setup, teardown),
	};
	/* The responder writes to clients that may have gone (a cancelled
	 * poll): an error to ignore, as the proxy does, not a signal. */
	signal(SIGPIPE, SIG_IGN);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
