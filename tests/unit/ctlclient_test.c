/*
 * Unit tests for proxy/ctlclient*.c, the proxy's control-plane client,
 * through its own interface (struct ctlclient_host) and without a proxy:
 * real files in a temporary state_dir, a real CA and SVID from lib/ca, and
 * a control URL nothing listens on, so each test sees what the client does
 * on its own: serve from its cache, refuse a state_dir or a join token, and
 * say why in its status.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <cmocka.h>

#include <openssl/pem.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/file.h"
#include "ctlclient.h"
#include "snapshot.h"

/* 43 characters: the secret control makes (32 bytes, base64url). */
#define SECRET43 "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

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
	         " \"control\": {\"url\": \"https://127.0.0.1:1\", \"token_file\": \"%s\"},"
	         " \"inbound\": [{\"listen\": \"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\"}],"
	         " \"outbound\": %s, \"admin\": {\"listen\": \"127.0.0.1:15000\"}}",
	         f->state_dir, f->token_file, outbound_json);
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
	load_config(f, "[{\"listen\": \"127.0.0.1:9001\", \"service\": \"payments\"}]");
	*state = f;
	return 0;
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
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
