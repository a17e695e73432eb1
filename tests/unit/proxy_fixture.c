/* proxy_fixture: see proxy_fixture.h. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdlib.h>
#ifdef FIXTURE_NO_CMOCKA
/* The fuzz targets link it too: there a failed set-up aborts. */
#include <stdio.h>
#define assert_int_equal(a, b) do { if ((a) != (b)) abort(); } while (0)
#define assert_non_null(p) do { if (!(p)) abort(); } while (0)
#define fail_msg(...) do { fprintf(stderr, __VA_ARGS__); abort(); } while (0)
#else
#include <cmocka.h>
#endif
#include <string.h>

#include "meshlet/ca.h"
#include "meshlet/json.h"
#include "meshlet/tls.h"
#include "proxy_fixture.h"

/* Made once per test program: key generation and signing are slow. */
static struct {
	EVP_PKEY *key;
	char *cert_pem, *bundle_pem;
} fx;

static void make_svid(void)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	struct ca *ca = NULL;
	X509 *leaf = NULL, *root;

	if (fx.key)
		return;
	assert_int_equal(tls_init(), 0);
	assert_int_equal(ca_generate(&ca, FIXTURE_TD, 0, &err), 0);
	assert_int_equal(ca_new_key(&fx.key), 0);
	assert_int_equal(ca_issue_svid(ca, "orders", fx.key, 3600, &leaf, NULL, &err), 0);
	root = ca_cert(ca);
	fx.cert_pem = ca_pem_encode(&leaf, 1);
	fx.bundle_pem = ca_pem_encode(&root, 1);
	assert_non_null(fx.cert_pem);
	assert_non_null(fx.bundle_pem);
	X509_free(leaf);
	ca_free(ca);
}

void fixture_cleanup(void)
{
	EVP_PKEY_free(fx.key);
	free(fx.cert_pem);
	free(fx.bundle_pem);
	memset(&fx, 0, sizeof(fx));
}

static json_t *parse_json(const char *text)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	json_t *doc = json_parse_strict(text, strlen(text), MESHLET_JSON_MAX_DEPTH, &err);

	if (!doc)
		fail_msg("bad test JSON: %s\n%s", err.message, text);
	return doc;
}

struct config *fixture_config(const char *config_json)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	struct config *cfg = NULL;
	json_t *doc = parse_json(config_json);
	char msg[600];

	if (config_parse(doc, "/etc/meshlet/proxy.json", &cfg, &err) < 0)
		fail_msg("config refused: %s\n%s", err_str(&err, msg, sizeof(msg)), config_json);
	json_decref(doc);
	return cfg;
}

struct config_addr fixture_addr(const char *text)
{
	struct config_addr a;
	const char *why = NULL;

	if (config_parse_addr(text, &a, &why) < 0)
		fail_msg("address %s refused: %s", text, why ? why : "?");
	return a;
}

struct snapshot *fixture_try_snapshot(const char *config_json, const char *policy_json,
                                      struct snapshot_endpoints *registry, size_t n,
                                      struct metrics *m, struct meshlet_err *err)
{
	struct snapshot_source src = { 0 };
	struct config *cfg = fixture_config(config_json);
	json_t *doc = parse_json(policy_json);

	make_svid();
	src.policy = policy_parse(doc, err);
	json_decref(doc);
	assert_non_null(src.policy);
	assert_int_equal(tls_material_from_pem(fx.cert_pem, fx.key, fx.bundle_pem, NULL, 0,
	                                       FIXTURE_TD, &src.tls, err), 0);
	src.registry = registry;
	src.n_registry = n;
	return snapshot_build(cfg, &src, m, 1, err);
}

struct snapshot *fixture_snapshot(const char *config_json, const char *policy_json,
                                  struct snapshot_endpoints *registry, size_t n,
                                  struct metrics *m)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	char msg[600];
	struct snapshot *s = fixture_try_snapshot(config_json, policy_json, registry, n, m, &err);

	if (!s)
		fail_msg("snapshot refused: %s", err_str(&err, msg, sizeof(msg)));
	return s;
}
