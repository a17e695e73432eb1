/*
 * Unit tests for control/state*.c (the state domains of meshlet-control),
 * against a real state directory and a real SQLite store in a fresh
 * temporary directory: the state directory's files, policies, join tokens
 * and SVIDs with their renewal caps, revocation, the registry and admin
 * assignments, housekeeping, the dry run, CA rotation and its gates, and
 * the one mapping of state errors to HTTP statuses (control/handlers.c).
 */
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <openssl/evp.h>

#include "meshlet/api.h"
#include "meshlet/file.h"
#include "meshlet/store.h"
#include "handlers.h"
#include "state.h"

#define TD "mesh.local"

struct fixture {
	char tmp[64];
	char dir[128];                 /* the state dir, inside tmp */
	struct control_opts o;
	struct control_state *st;
};

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static int open_state(struct fixture *f)
{
	struct meshlet_err err = {0};
	int r = state_open(&f->st, &f->o, &err);

	if (r)
		print_message("state_open: %s\n", err.message);
	return r;
}

static void reopen(struct fixture *f)
{
	state_close(f->st);
	f->st = NULL;
	assert_int_equal(open_state(f), 0);
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));

	assert_non_null(f);
	log_init(LOG_OFF, "state_test");
	snprintf(f->tmp, sizeof(f->tmp), "/tmp/state_test.XXXXXX");
	assert_non_null(mkdtemp(f->tmp));
	snprintf(f->dir, sizeof(f->dir), "%s/state", f->tmp);
	f->o.state_dir = f->dir;
	f->o.trust_domain = TD;
	f->o.svid_ttl = CONTROL_SVID_TTL_DEFAULT;
	f->o.log_level = LOG_OFF;
	assert_int_equal(open_state(f), 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;

	state_close(f->st);
	nftw(f->tmp, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	free(f);
	return 0;
}

/* ---- helpers ---- */

static EVP_PKEY *new_key(void)
{
	EVP_PKEY *k = EVP_EC_gen("P-256");

	assert_non_null(k);
	return k;
}

/* A join token for svc (ttl seconds, may be negative: already expired). */
static char *join_token(struct fixture *f, const char *svc, int64_t uses, int64_t ttl)
{
	struct api_token_req r = { .service = svc, .ttl = ttl, .uses = uses };
	struct state_error se = {0};
	json_t *out = NULL;
	char *tok;

	assert_int_equal(state_token_create(f->st, &r, &out, &se), 0);
	tok = strdup(json_string_value(json_object_get(out, "token")));
	assert_non_null(tok);
	json_decref(out);
	return tok;
}

/* Issues an SVID (token: a join; else a renewal with renew) to a new key;
 * its serial into serial (may be NULL). Returns what state_svid_issue does. */
static int issue(struct fixture *f, const char *svc, const char *token, const char *renew,
                 EVP_PKEY *key, char *serial, struct state_error *se)
{
	EVP_PKEY *k = key ? key : new_key();
	json_t *out = NULL;
	int r = state_svid_issue(f->st, svc, token, renew, k, &out, se);

	if (!key)
		EVP_PKEY_free(k);
	if (r == 0 && serial)
		snprintf(serial, CA_SERIAL_HEX_MAX, "%s", json_string_value(json_object_get(out,
		         "serial")));
	json_decref(out);
	return r;
}

/* A joined proxy of svc: its SVID serial. */
static void joined(struct fixture *f, const char *svc, char *serial)
{
	struct state_error se = {0};
	char *tok = join_token(f, svc, 1, 600);

	assert_int_equal(issue(f, svc, tok, NULL, NULL, serial, &se), 0);
	free(tok);
}

/* The record of serial in the admin's list (a new reference), or NULL. */
static json_t *cert_record(struct fixture *f, const char *serial)
{
	struct state_error se = {0};
	json_t *out = NULL, *v, *found = NULL;
	size_t i;

	assert_int_equal(state_certs_list(f->st, &out, &se), 0);
	json_array_foreach(json_object_get(out, "certs"), i, v) {
		if (strcmp(json_string_value(json_object_get(v, "serial")), serial) == 0)
			found = json_incref(v);
	}
	json_decref(out);
	return found;
}

static int64_t jint_of(const json_t *o, const char *k)
{
	return (int64_t)json_integer_value(json_object_get(o, k));
}

static const char *jstr_of(const json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

static int64_t bundle_version(struct fixture *f)
{
	json_t *b = state_bundle(f->st);
	int64_t v = jint_of(b, "version");

	json_decref(b);
	return v;
}

static void mode_is(const char *dir, const char *name, mode_t want)
{
	char path[PATH_MAX];
	struct stat sb;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	assert_int_equal(lstat(path, &sb), 0);
	assert_int_equal(sb.st_mode & 07777, want);
}

/* ---- the state directory ---- */

static void test_first_start_files(void **state)
{
	struct fixture *f = *state;
	char path[PATH_MAX], *tok = NULL;
	size_t len = 0;
	json_t *ca;

	mode_is(f->tmp, "state", 0700);
	mode_is(f->dir, "admin.token", 0600);
	mode_is(f->dir, "ca.key", 0600);
	mode_is(f->dir, "ca.pem", 0644);
	mode_is(f->dir, "ca-0.pem", 0644);
	snprintf(path, sizeof(path), "%s/admin.token", f->dir);
	assert_int_equal(file_read(path, 256, 0, &tok, &len), 0);
	assert_int_equal(len, 65);
	assert_int_equal(tok[64], '\n');
	assert_int_equal(strspn(tok, "0123456789abcdef"), 64);
	assert_false(state_admin_ok(f->st, tok));     /* with the line end */
	tok[64] = '\0';
	assert_true(state_admin_ok(f->st, tok));
	tok[0] = tok[0] == 'a' ? 'b' : 'a';
	assert_false(state_admin_ok(f->st, tok));
	assert_false(state_admin_ok(f->st, NULL));
	free(tok);
	assert_string_equal(state_trust_domain(f->st), TD);
	ca = state_ca_show(f->st);
	assert_string_equal(jstr_of(ca, "phase"), "stable");
	assert_int_equal(json_array_size(json_object_get(ca, "roots")), 1);
	json_decref(ca);
	/* No temporary file is left behind. */
	snprintf(path, sizeof(path), "%s/ca.pem.tmp", f->dir);
	assert_int_not_equal(access(path, F_OK), 0);
}

static void test_reopen_keeps_everything(void **state)
{
	struct fixture *f = *state;
	json_t *before = state_ca_show(f->st), *after;
	int64_t v = 0;
	struct state_error se = {0};
	json_t *doc = json_pack("{s:s, s:[]}", "service", "orders", "rules");

	assert_int_equal(state_policy_put(f->st, "orders", doc, -1, &v, &se), 0);
	reopen(f);
	after = state_ca_show(f->st);
	assert_true(json_equal(json_object_get(before, "pins"), json_object_get(after, "pins")));
	json_decref(before);
	json_decref(after);
	json_decref(doc);
	doc = NULL;
	assert_int_equal(state_policy_get(f->st, "orders", &doc, &v, &se), 0);
	assert_string_equal(jstr_of(doc, "service"), "orders");
	json_decref(doc);
}

static void test_open_refusals(void **state)
{
	struct fixture *f = *state;
	char path[PATH_MAX], db[PATH_MAX], moved[PATH_MAX];

	state_close(f->st);
	f->st = NULL;
	/* Another trust domain. */
	f->o.trust_domain = "other.example";
	assert_int_equal(open_state(f), -EINVAL);
	f->o.trust_domain = "not a domain!";
	assert_int_equal(open_state(f), -EINVAL);
	f->o.trust_domain = TD;
	/* A directory others may read. */
	assert_int_equal(chmod(f->dir, 0755), 0);
	assert_int_equal(open_state(f), -EACCES);
	assert_int_equal(chmod(f->dir, 0700), 0);
	/* An admin token others may read. */
	snprintf(path, sizeof(path), "%s/admin.token", f->dir);
	assert_int_equal(chmod(path, 0644), 0);
	assert_int_equal(open_state(f), -EACCES);
	assert_int_equal(chmod(path, 0600), 0);
	/* An admin token that is not one token. */
	assert_int_equal(file_replace(path, 0600, "two words\n", 10), 0);
	assert_int_equal(open_state(f), -EINVAL);
	assert_int_equal(file_replace(path, 0600, "short\n", 6), 0);
	assert_int_equal(open_state(f), -EINVAL);
	assert_int_equal(file_replace(path, 0600, "0123456789abcdef0123\r\n", 22), 0);
	assert_int_equal(open_state(f), 0);
	assert_true(state_admin_ok(f->st, "0123456789abcdef0123"));
	state_close(f->st);
	f->st = NULL;
	/* The keys without the database: never re-initialised. */
	snprintf(db, sizeof(db), "%s/state.db", f->dir);
	snprintf(moved, sizeof(moved), "%s/state.db.away", f->tmp);
	assert_int_equal(rename(db, moved), 0);
	assert_int_equal(open_state(f), -EINVAL);
	assert_int_equal(rename(moved, db), 0);
	/* The database without the admin token. */
	assert_int_equal(unlink(path), 0);
	assert_int_not_equal(open_state(f), 0);
	assert_int_equal(file_write_new(path, 0600, "0123456789abcdef0123\n", 21), 0);
	assert_int_equal(open_state(f), 0);
}

/* ---- policies ---- */

static void test_policy_versions(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	json_t *doc = json_pack("{s:s, s:[]}", "service", "orders", "rules"), *got = NULL, *list;
	int64_t v1 = 0, v2 = 0, v = 0, cv1 = 0, cv2 = 0, rev = 0;

	assert_int_equal(state_policy_get(f->st, "orders", &got, &v, &se), -ENOENT);
	assert_null(got);
	/* If-Match "*" needs a policy to match. */
	assert_int_equal(state_policy_put(f->st, "orders", doc, 0, &v1, &se), -ESTALE);
	assert_string_equal(se.e.path, "If-Match");
	assert_int_equal(state_config_version(f->st, "orders", &cv1), 0);
	assert_int_equal(state_policy_put(f->st, "orders", doc, -1, &v1, &se), 0);
	assert_true(v1 > 0);
	assert_int_equal(state_config_version(f->st, "orders", &cv2), 0);
	assert_true(cv2 > cv1);
	assert_int_equal(state_policy_get(f->st, "orders", &got, &v, &se), 0);
	assert_int_equal(v, v1);
	assert_true(json_equal(got, doc));
	json_decref(got);
	/* A stale If-Match is refused and writes nothing. */
	assert_int_equal(state_policy_put(f->st, "orders", doc, v1 + 100, &v2, &se), -ESTALE);
	assert_int_equal(state_policy_put(f->st, "orders", doc, v1, &v2, &se), 0);
	assert_true(v2 > v1);
	assert_int_equal(state_policy_put(f->st, "orders", doc, v1, &v, &se), -ESTALE);
	assert_int_equal(state_policy_put(f->st, "orders", doc, 0, &v, &se), 0);
	assert_int_equal(state_policy_list(f->st, &list, &se), 0);
	assert_int_equal(json_array_size(json_object_get(list, "policies")), 1);
	json_decref(list);
	/* Delete: If-Match checked, then gone, then not found. */
	assert_int_equal(state_policy_delete(f->st, "orders", v2, &rev, &se), -ESTALE);
	assert_int_equal(state_policy_delete(f->st, "orders", -1, &rev, &se), 0);
	assert_int_equal(state_policy_delete(f->st, "orders", -1, &rev, &se), -ENOENT);
	assert_int_equal(state_policy_get(f->st, "orders", &got, &v, &se), -ENOENT);
	/* The deletion moved the service's config version too. */
	assert_int_equal(state_config_version(f->st, "orders", &cv1), 0);
	assert_true(cv1 > cv2);
	json_decref(doc);
}

/* Traffic documents: versions and If-Match as policies, a kind of their
 * own (no policy appears), every service's config version moves (callers
 * hold the document too), and the config answer carries the service's own
 * and its named upstreams' documents only. */
static void test_traffic_documents(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	json_t *doc = json_pack("{s:s}", "service", "orders"), *got = NULL, *list, *out, *tr;
	int64_t v1 = 0, v = 0, rev = 0, other1 = 0, other2 = 0;
	struct api_config_query q = {0};

	assert_int_equal(state_traffic_get(f->st, "orders", &got, &v, &se), -ENOENT);
	assert_int_equal(state_traffic_put(f->st, "orders", doc, 0, &v1, &se), -ESTALE);
	assert_int_equal(state_config_version(f->st, "billing", &other1), 0);
	assert_int_equal(state_traffic_put(f->st, "orders", doc, -1, &v1, &se), 0);
	assert_int_equal(state_config_version(f->st, "billing", &other2), 0);
	assert_true(other2 > other1);
	assert_int_equal(state_traffic_put(f->st, "orders", doc, v1 + 1, &v, &se), -ESTALE);
	assert_int_equal(state_traffic_get(f->st, "orders", &got, &v, &se), 0);
	assert_int_equal(v, v1);
	assert_true(json_equal(got, doc));
	json_decref(got);
	assert_int_equal(state_policy_get(f->st, "orders", &got, &v, &se), -ENOENT);
	assert_int_equal(state_traffic_list(f->st, &list, &se), 0);
	assert_int_equal(json_array_size(json_object_get(list, "traffic")), 1);
	json_decref(list);
	/* Own document: yes; another service's: only when named upstream. */
	assert_int_equal(state_config(f->st, "orders", &q, &out, &se), 0);
	tr = json_object_get(json_object_get(out, "traffic"), "orders");
	assert_int_equal(jint_of(tr, "version"), v1);
	assert_true(json_equal(json_object_get(tr, "traffic"), doc));
	json_decref(out);
	assert_int_equal(state_config(f->st, "billing", &q, &out, &se), 0);
	assert_int_equal(json_object_size(json_object_get(out, "traffic")), 0);
	json_decref(out);
	q.n_upstreams = 1;
	snprintf(q.upstreams[0], sizeof(q.upstreams[0]), "orders");
	assert_int_equal(state_config(f->st, "billing", &q, &out, &se), 0);
	assert_int_equal(json_object_size(json_object_get(out, "traffic")), 1);
	json_decref(out);
	assert_int_equal(state_traffic_delete(f->st, "orders", v1 + 1, &rev, &se), -ESTALE);
	assert_int_equal(state_traffic_delete(f->st, "orders", v1, &rev, &se), 0);
	assert_int_equal(state_traffic_delete(f->st, "orders", -1, &rev, &se), -ENOENT);
	assert_int_equal(state_config_version(f->st, "billing", &other1), 0);
	assert_true(other1 > other2);
	json_decref(doc);
}

/* Config answers are reused while the version stands: the same object
 * for the same service and upstreams; a write that moves the version, a
 * different query, or a proxy holding a later version gets a new one. */
static void test_config_answer_reused_per_version(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	json_t *doc = json_pack("{s:s, s:s, s:[]}", "service", "orders", "default", "deny", "rules");
	json_t *a, *b, *c, *d;
	struct api_config_query q = {0}, up = {0};
	int64_t v = 0;

	assert_int_equal(state_config(f->st, "orders", &q, &a, &se), 0);
	assert_int_equal(state_config(f->st, "orders", &q, &b, &se), 0);
	assert_ptr_equal(a, b);
	json_decref(b);
	/* Another query is another answer. */
	up.n_upstreams = 1;
	snprintf(up.upstreams[0], sizeof(up.upstreams[0]), "billing");
	assert_int_equal(state_config(f->st, "orders", &up, &b, &se), 0);
	assert_ptr_not_equal(a, b);
	json_decref(b);
	/* A proxy that says it holds a later version is not answered from
	 * what this replica kept (it may be behind): read again. */
	q.after = jint_of(a, "version") + 1;
	assert_int_equal(state_config(f->st, "orders", &q, &b, &se), 0);
	assert_ptr_not_equal(a, b);
	assert_int_equal(jint_of(b, "version"), jint_of(a, "version"));
	json_decref(b);
	q.after = 0;
	/* A write moves the version: a new answer with the new policy. */
	assert_int_equal(state_policy_put(f->st, "orders", doc, -1, &v, &se), 0);
	assert_int_equal(state_config(f->st, "orders", &q, &c, &se), 0);
	assert_ptr_not_equal(a, c);
	assert_true(jint_of(c, "version") > jint_of(a, "version"));
	assert_true(json_equal(json_object_get(c, "policy"), doc));
	assert_int_equal(state_config(f->st, "orders", &q, &d, &se), 0);
	assert_ptr_equal(c, d);
	json_decref(a);
	json_decref(c);
	json_decref(d);
	json_decref(doc);
}

static void test_policy_too_large(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	size_t n = 2 * 1024 * 1024;
	char *big = malloc(n + 1);
	json_t *doc;
	int64_t v = 0;

	assert_non_null(big);
	memset(big, 'a', n);
	big[n] = '\0';
	doc = json_pack("{s:s, s:[], s:s}", "service", "orders", "rules", "x", big);
	assert_int_equal(state_policy_put(f->st, "orders", doc, -1, &v, &se), -E2BIG);
	json_decref(doc);
	assert_int_equal(state_policy_get(f->st, "orders", &doc, &v, &se), -ENOENT);
	free(big);
}

/* ---- the dry run ---- */

static void test_check(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	struct api_check_req r = { .from = "spiffe://" TD "/svc/frontend", .service = "orders",
	                           .port = 8080 };
	json_t *doc = json_pack("{s:s, s:[{s:s, s:s, s:[s], s:[i], s:[s]}]}", "service", "orders",
	                        "rules", "name", "reads", "action", "allow",
	                        "from", "spiffe://" TD "/svc/frontend", "ports", 8080,
	                        "paths", "/orders/*");
	json_t *out = NULL;
	int64_t v = 0;

	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "deny");
	assert_string_equal(jstr_of(out, "rule"), "no_policy");
	json_decref(out);
	assert_int_equal(state_policy_put(f->st, "orders", doc, -1, &v, &se), 0);
	r.http = true;
	r.path = "/orders/./42";
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "allow");
	assert_string_equal(jstr_of(out, "rule"), "reads");
	assert_string_equal(jstr_of(out, "path"), "/orders/42");
	assert_int_equal(jint_of(out, "policy_version"), v);
	json_decref(out);
	r.path = "/orders/../admin";
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "deny");
	json_decref(out);
	r.path = "/orders/%00";
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "deny");
	assert_string_equal(jstr_of(out, "rule"), "invalid_path");
	json_decref(out);
	r.path = "/orders/1";
	r.from = "spiffe://" TD "/svc/intruder";
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "deny");
	assert_string_equal(jstr_of(out, "rule"), "default");
	json_decref(out);
	json_decref(doc);
}

/* The dry run decides a method-override header as the proxy does: both
 * methods must be allowed, and a malformed override is refused. */
static void test_check_method_override(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	json_t *hdrs = json_pack("{s:s}", "X-HTTP-Method-Override", "delete");
	struct api_check_req r = { .from = "spiffe://" TD "/svc/frontend", .service = "orders",
	                           .port = 8080, .http = true, .method = "GET",
	                           .path = "/orders/1", .headers = hdrs };
	json_t *doc = json_pack("{s:s, s:[{s:s, s:s, s:[s], s:[s]}]}", "service", "orders",
	                        "rules", "name", "reads", "action", "allow",
	                        "from", "spiffe://" TD "/svc/frontend", "methods", "GET");
	json_t *out = NULL;
	int64_t v = 0;

	assert_int_equal(state_policy_put(f->st, "orders", doc, -1, &v, &se), 0);
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "deny");
	assert_string_equal(jstr_of(out, "method_override"), "DELETE");
	json_decref(out);
	json_object_set_new(hdrs, "X-HTTP-Method-Override", json_string("GET"));
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "allow");
	json_decref(out);
	json_object_set_new(hdrs, "X-Method-Override", json_string("PUT"));
	assert_int_equal(state_check(f->st, &r, &out, &se), 0);
	assert_string_equal(jstr_of(out, "decision"), "deny");
	assert_string_equal(jstr_of(out, "rule"), "invalid_request");
	json_decref(out);
	json_decref(hdrs);
	json_decref(doc);
}

/* ---- tokens and SVIDs ---- */

static void test_join_token_single_use(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char *tok = join_token(f, "orders", 1, 600), serial[CA_SERIAL_HEX_MAX];
	json_t *rec;

	assert_int_equal(issue(f, "orders", tok, NULL, NULL, serial, &se), 0);
	rec = cert_record(f, serial);
	assert_non_null(rec);
	assert_string_equal(jstr_of(rec, "service"), "orders");
	assert_string_equal(jstr_of(rec, "via"), "token");
	assert_string_equal(jstr_of(rec, "lineage"), serial);
	json_decref(rec);
	assert_int_equal(issue(f, "orders", tok, NULL, NULL, NULL, &se), -EPERM);
	assert_non_null(strstr(se.e.message, "no uses left"));
	free(tok);
	/* Two uses: two SVIDs, then none. */
	tok = join_token(f, "orders", 2, 600);
	assert_int_equal(issue(f, "orders", tok, NULL, NULL, NULL, &se), 0);
	assert_int_equal(issue(f, "orders", tok, NULL, NULL, NULL, &se), 0);
	assert_int_equal(issue(f, "orders", tok, NULL, NULL, NULL, &se), -EPERM);
	free(tok);
}

static void test_join_token_refusals(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char *tok = join_token(f, "orders", 5, 600), *old = join_token(f, "orders", 5, -1);
	char made_up[] = "not-a-token-that-control-made";

	assert_int_equal(issue(f, "billing", tok, NULL, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.e.path, "service");
	assert_int_equal(issue(f, "orders", old, NULL, NULL, NULL, &se), -EPERM);
	assert_non_null(strstr(se.e.message, "expired"));
	assert_int_equal(issue(f, "orders", made_up, NULL, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.e.message, "unknown join token");
	assert_int_equal(issue(f, "Not A Service", tok, NULL, NULL, NULL, &se), -EINVAL);
	/* None of the refusals used up the token. */
	assert_int_equal(issue(f, "orders", tok, NULL, NULL, NULL, &se), 0);
	free(tok);
	free(old);
}

static void test_renewal_caps(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char parent[CA_SERIAL_HEX_MAX], child[CA_SERIAL_HEX_MAX], again[CA_SERIAL_HEX_MAX];
	EVP_PKEY *k = new_key();
	json_t *rec;

	joined(f, "orders", parent);
	assert_int_equal(issue(f, "orders", NULL, parent, k, child, &se), 0);
	rec = cert_record(f, child);
	assert_string_equal(jstr_of(rec, "via"), "svid");
	assert_string_equal(jstr_of(rec, "parent"), parent);
	assert_string_equal(jstr_of(rec, "lineage"), parent);
	json_decref(rec);
	/* A retry with the same key after a lost answer is not counted. */
	assert_int_equal(issue(f, "orders", NULL, parent, k, again, &se), 0);
	assert_string_not_equal(again, child);
	rec = cert_record(f, parent);
	assert_int_equal(jint_of(rec, "renewals"), 1);
	json_decref(rec);
	/* Distinct keys are, up to the cap. */
	for (int i = 1; i < CONTROL_RENEWALS_MAX; i++)
		assert_int_equal(issue(f, "orders", NULL, parent, NULL, NULL, &se), 0);
	assert_int_equal(issue(f, "orders", NULL, parent, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.reason, "renewal_limit");
	/* The same key still may retry. */
	assert_int_equal(issue(f, "orders", NULL, parent, k, NULL, &se), 0);
	/* A serial control never issued. */
	assert_int_equal(issue(f, "orders", NULL, "0badc0ffee", NULL, NULL, &se), -EPERM);
	assert_string_equal(se.reason, "unknown_certificate");
	EVP_PKEY_free(k);
}

static void test_lineage_cap(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char cur[CA_SERIAL_HEX_MAX], origin[CA_SERIAL_HEX_MAX], next[CA_SERIAL_HEX_MAX];
	int i;

	joined(f, "orders", origin);
	snprintf(cur, sizeof(cur), "%s", origin);
	/* A chain of renewals, each by the newest SVID: the lineage counts them all. */
	for (i = 0; i < CONTROL_LINEAGE_RENEWALS_MAX; i++) {
		assert_int_equal(issue(f, "orders", NULL, cur, NULL, next, &se), 0);
		snprintf(cur, sizeof(cur), "%s", next);
	}
	assert_int_equal(issue(f, "orders", NULL, cur, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.reason, "lineage_limit");
	/* Another join starts another lineage. */
	joined(f, "orders", cur);
	assert_int_equal(issue(f, "orders", NULL, cur, NULL, NULL, &se), 0);
}

/* ---- revocation ---- */

static void test_revoke_with_descendants(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char a[CA_SERIAL_HEX_MAX], b[CA_SERIAL_HEX_MAX], c[CA_SERIAL_HEX_MAX];
	char other[CA_SERIAL_HEX_MAX];
	int64_t v0 = bundle_version(f);
	json_t *out = NULL, *bundle;

	joined(f, "orders", a);
	joined(f, "billing", other);
	assert_int_equal(issue(f, "orders", NULL, a, NULL, b, &se), 0);
	assert_int_equal(issue(f, "orders", NULL, b, NULL, c, &se), 0);
	assert_int_equal(state_certs_revoke(f->st, "ffff", &out, &se), -ENOENT);
	assert_string_equal(se.e.path, "serial");
	assert_int_equal(state_certs_revoke(f->st, a, &out, &se), 0);
	assert_int_equal(json_array_size(json_object_get(out, "descendants")), 2);
	assert_true(jint_of(out, "bundle_version") > v0);
	json_decref(out);
	assert_true(state_is_revoked(f->st, a));
	assert_true(state_is_revoked(f->st, b));
	assert_true(state_is_revoked(f->st, c));
	assert_false(state_is_revoked(f->st, other));
	bundle = state_bundle(f->st);
	assert_int_equal(json_array_size(json_object_get(bundle, "revoked")), 3);
	json_decref(bundle);
	/* Again: nothing new, no version bump. */
	v0 = bundle_version(f);
	assert_int_equal(state_certs_revoke(f->st, a, &out, &se), 0);
	assert_int_equal(json_array_size(json_object_get(out, "descendants")), 0);
	assert_int_equal(jint_of(out, "bundle_version"), v0);
	json_decref(out);
	/* The list survives a restart. */
	reopen(f);
	assert_true(state_is_revoked(f->st, c));
}

/* A second control on the same store revokes; the first, which has not
 * heard of it, still refuses a renewal by a descendant. */
static void test_revoked_ancestor_other_instance(void **state)
{
	struct fixture *f = *state;
	struct control_state *other = NULL;
	struct meshlet_err err = {0};
	struct state_error se = {0};
	char a[CA_SERIAL_HEX_MAX], b[CA_SERIAL_HEX_MAX];
	json_t *out = NULL;

	joined(f, "orders", a);
	assert_int_equal(issue(f, "orders", NULL, a, NULL, b, &se), 0);
	assert_int_equal(state_open(&other, &f->o, &err), 0);
	assert_int_equal(state_certs_revoke(other, a, &out, &se), 0);
	json_decref(out);
	state_close(other);
	assert_false(state_is_revoked(f->st, a));
	assert_int_equal(issue(f, "orders", NULL, b, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.reason, "ancestor_revoked");
}

/* A lineage that never reaches its root (here a record made its own
 * parent, as a corrupted or hostile store could hold) is refused, not
 * walked 64 steps and let through. */
static void test_lineage_too_deep_refused(void **state)
{
	struct fixture *f = *state;
	struct meshlet_err err = {0};
	struct state_error se = {0};
	struct store *db = NULL;
	char a[CA_SERIAL_HEX_MAX], b[CA_SERIAL_HEX_MAX], key[STORE_KEY_MAX], path[256];
	char *val = NULL, *loop;
	size_t len = 0;
	json_t *rec;

	joined(f, "orders", a);
	assert_int_equal(issue(f, "orders", NULL, a, NULL, b, &se), 0);
	state_close(f->st);
	f->st = NULL;
	snprintf(path, sizeof(path), "%s/state.db", f->dir);
	assert_int_equal(store_open(&db, path, &err), 0);
	snprintf(key, sizeof(key), "certs/%s", b);
	assert_int_equal(store_get(db, key, &val, &len, NULL), 0);
	rec = json_loadb(val, len, 0, NULL);
	assert_non_null(rec);
	json_object_set_new(rec, "parent", json_string(b));
	loop = json_dumps(rec, JSON_COMPACT);
	assert_int_equal(store_put(db, key, loop, strlen(loop), NULL), 0);
	free(loop);
	free(val);
	json_decref(rec);
	store_close(db);
	assert_int_equal(open_state(f), 0);
	assert_int_equal(issue(f, "orders", NULL, b, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.reason, "lineage_too_deep");
}

static void test_certs_rotate(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	struct api_rotate_req one = { .service = "orders" }, all = { .all = true };
	struct api_config_query q = {0};
	json_t *out = NULL;
	int64_t before = 0, after = 0;

	assert_int_equal(state_config_version(f->st, "orders", &before), 0);
	assert_int_equal(state_certs_rotate(f->st, &one, &out, &se), 0);
	assert_int_equal(jint_of(out, "generation"), 1);
	json_decref(out);
	assert_int_equal(state_certs_rotate(f->st, &all, &out, &se), 0);
	assert_int_equal(jint_of(out, "generation"), 1);
	json_decref(out);
	assert_int_equal(state_config_version(f->st, "orders", &after), 0);
	assert_true(after > before);
	assert_int_equal(state_config(f->st, "orders", &q, &out, &se), 0);
	assert_int_equal(jint_of(out, "cert_generation"), 2);
	assert_int_equal(jint_of(out, "version"), after);
	json_decref(out);
	assert_int_equal(state_config(f->st, "billing", &q, &out, &se), 0);
	assert_int_equal(jint_of(out, "cert_generation"), 1);
	json_decref(out);
}

/* ---- the registry ---- */

/* Registers address (with application port app, 0: none) for svc's proxy
 * with SVID serial, connecting from remote. */
static int reg(struct fixture *f, const char *svc, const char *address, int app,
               const char *serial, int64_t not_after, const char *remote,
               struct state_error *se)
{
	json_t *body = app ? json_pack("{s:s, s:[i]}", "address", address, "ports", app) :
	                     json_pack("{s:s}", "address", address);
	struct api_endpoint_req r;
	struct meshlet_err e = {0};
	json_t *out = NULL;
	int ret;

	assert_int_equal(api_parse_endpoint_req(body, &r, &e), 0);
	ret = state_endpoint_register(f->st, svc, &r, serial, not_after, remote, &out, se);
	json_decref(out);
	json_decref(body);
	return ret;
}

static int assign(struct fixture *f, bool add, const char *svc, const char *address,
                  json_t **out, struct state_error *se)
{
	json_t *body = json_pack("{s:s, s:s}", "service", svc, "address", address);
	struct api_assign_req r;
	struct meshlet_err e = {0};
	int ret;

	assert_int_equal(api_parse_assign_req(body, &r, &e), 0);
	ret = add ? state_endpoint_assign(f->st, &r, out, se) :
	            state_endpoint_unassign(f->st, &r, out, se);
	json_decref(body);
	return ret;
}

/* The live entries of svc in a config answer that asks for every service. */
static size_t live_entries(struct fixture *f, const char *svc)
{
	struct api_config_query q = { .upstreams_all = true };
	struct state_error se = {0};
	json_t *out = NULL;
	size_t n;

	assert_int_equal(state_config(f->st, "anyone", &q, &out, &se), 0);
	n = json_array_size(json_object_get(json_object_get(out, "endpoints"), svc));
	json_decref(out);
	return n;
}

static void test_registry_claims(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	int64_t later = time(NULL) + 600, v1 = 0, v2 = 0;
	char serial[CA_SERIAL_HEX_MAX];

	joined(f, "orders", serial);
	assert_int_equal(reg(f, "orders", "10.0.0.1:8443", 8080, serial, later, "10.0.0.1:40000",
	                     &se), 0);
	/* The bump is due at once (no bump yet), then coalesced. */
	assert_int_equal(state_endpoints_touch(f->st), 0);
	assert_int_equal(live_entries(f, "orders"), 1);
	assert_int_equal(state_config_version(f->st, "orders", &v1), 0);
	/* Registering the same again writes nothing. */
	assert_int_equal(reg(f, "orders", "10.0.0.1:8443", 8080, serial, later, "10.0.0.1:40001",
	                     &se), 0);
	assert_int_equal(state_endpoints_touch(f->st), -1);
	assert_int_equal(state_config_version(f->st, "orders", &v2), 0);
	assert_int_equal(v1, v2);
	/* Another service on the same ip:port, or on an application port of it. */
	assert_int_equal(reg(f, "billing", "10.0.0.1:8443", 0, "b1", later, "10.0.0.1:1", &se), -EEXIST);
	assert_string_equal(se.e.path, "address");
	assert_int_equal(reg(f, "billing", "10.0.0.1:8080", 0, "b1", later, "10.0.0.1:1", &se), -EEXIST);
	/* Nor with an application port of its own that orders claims. */
	assert_int_equal(reg(f, "billing", "10.0.0.1:9443", 8080, "b1", later, "10.0.0.1:1", &se),
	                 -EEXIST);
	/* Other ports of the IP are free. */
	assert_int_equal(reg(f, "billing", "10.0.0.1:9443", 9090, "b1", later, "10.0.0.1:1", &se),
	                 0);
	/* An address on another IP than the proxy's. */
	assert_int_equal(reg(f, "orders", "10.0.0.2:8443", 0, serial, later, "10.0.0.1:1", &se), -EPERM);
	assert_int_equal(reg(f, "orders", "10.0.0.2:8443", 0, serial, later, NULL, &se), -EPERM);
	/* An expired SVID's entry holds nothing. */
	assert_int_equal(reg(f, "ghost", "10.0.0.3:8443", 0, "g1", time(NULL) - 1, "10.0.0.3:1", &se), 0);
	assert_int_equal(live_entries(f, "ghost"), 0);
	assert_int_equal(reg(f, "orders", "10.0.0.3:8443", 0, serial, later, "10.0.0.3:1", &se), 0);
}

/* A registration whose version bump is coalesced (pending) changes the
 * answer without moving the version: the kept answer is not reused then. */
static void test_config_answer_shows_pending_registration(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	struct api_config_query q = { .upstreams_all = true };
	int64_t later = time(NULL) + 600, v1 = 0, v2 = 0;
	char serial[CA_SERIAL_HEX_MAX];
	json_t *a, *b;

	joined(f, "orders", serial);
	assert_int_equal(reg(f, "orders", "10.0.0.1:8443", 8080, serial, later, "10.0.0.1:1", &se), 0);
	assert_int_equal(state_endpoints_touch(f->st), 0);          /* bumped at once */
	assert_int_equal(state_config(f->st, "frontend", &q, &a, &se), 0);
	assert_int_equal(json_array_size(json_object_get(json_object_get(a, "endpoints"),
	                                                 "orders")), 1);
	assert_int_equal(state_config_version(f->st, "frontend", &v1), 0);
	assert_int_equal(reg(f, "orders", "10.0.0.1:9443", 9090, serial, later, "10.0.0.1:1", &se), 0);
	assert_true(state_endpoints_touch(f->st) > 0);              /* coalesced: later */
	assert_int_equal(state_config_version(f->st, "frontend", &v2), 0);
	assert_int_equal(v1, v2);
	assert_int_equal(state_config(f->st, "frontend", &q, &b, &se), 0);
	assert_ptr_not_equal(a, b);
	assert_int_equal(json_array_size(json_object_get(json_object_get(b, "endpoints"),
	                                                 "orders")), 2);
	json_decref(a);
	json_decref(b);
}

static void test_registry_revoked_entry_frees_claim(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	int64_t later = time(NULL) + 600;
	char a[CA_SERIAL_HEX_MAX];
	json_t *out = NULL;

	joined(f, "orders", a);
	assert_int_equal(reg(f, "orders", "10.0.0.1:8443", 0, a, later, "10.0.0.1:1", &se), 0);
	assert_int_equal(reg(f, "billing", "10.0.0.1:8443", 0, "b1", later, "10.0.0.1:1", &se), -EEXIST);
	assert_int_equal(state_certs_revoke(f->st, a, &out, &se), 0);
	json_decref(out);
	assert_int_equal(live_entries(f, "orders"), 0);
	assert_int_equal(reg(f, "billing", "10.0.0.1:8443", 0, "b1", later, "10.0.0.1:1", &se), 0);
}

static void test_registry_caps(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	int64_t later = time(NULL) + 600;
	char addr[32];
	int i;

	/* Per instance (one SVID). */
	for (i = 0; i < CONTROL_ENDPOINTS_PER_INSTANCE; i++) {
		snprintf(addr, sizeof(addr), "10.0.1.1:%d", 10000 + i);
		assert_int_equal(reg(f, "orders", addr, 0, "s1", later, "10.0.1.1:1", &se), 0);
	}
	assert_int_equal(reg(f, "orders", "10.0.1.1:20000", 0, "s1", later, "10.0.1.1:1", &se),
	                 -EDQUOT);
	/* Updating an entry it holds is no new entry. */
	assert_int_equal(reg(f, "orders", "10.0.1.1:10000", 0, "s1", later, "10.0.1.1:1", &se), 0);
	/* Per service. */
	state_close(f->st);
	f->st = NULL;
	f->o.max_endpoints_per_service = CONTROL_ENDPOINTS_PER_INSTANCE + 1;
	assert_int_equal(open_state(f), 0);
	assert_int_equal(reg(f, "orders", "10.0.1.2:1", 0, "s2", later, "10.0.1.2:1", &se), 0);
	assert_int_equal(reg(f, "orders", "10.0.1.3:1", 0, "s3", later, "10.0.1.3:1", &se), -EDQUOT);
	assert_non_null(strstr(se.e.message, "--max-endpoints-per-service"));
}

static void test_assignments(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	int64_t later = time(NULL) + 600;
	json_t *out = NULL;
	char at[CA_TIME_LEN];

	assert_int_equal(assign(f, true, "billing", "192.0.2.7:443", &out, &se), 0);
	snprintf(at, sizeof(at), "%s", jstr_of(out, "assigned_at"));
	json_decref(out);
	/* Idempotent for the same service; refused for another. */
	assert_int_equal(assign(f, true, "billing", "192.0.2.7:443", &out, &se), 0);
	assert_string_equal(jstr_of(out, "assigned_at"), at);
	json_decref(out);
	assert_int_equal(assign(f, true, "orders", "192.0.2.7:443", &out, &se), -EEXIST);
	/* billing's proxy may register it from anywhere; nobody else may. */
	assert_int_equal(reg(f, "billing", "192.0.2.7:443", 8080, "b1", later, "10.9.9.9:1", &se),
	                 0);
	assert_int_equal(reg(f, "orders", "192.0.2.7:443", 0, "o1", later, "192.0.2.7:1", &se),
	                 -EEXIST);
	/* Nor an application port billing's entry claims there, by
	 * registration or assignment. */
	assert_int_equal(reg(f, "orders", "192.0.2.7:8080", 0, "o1", later, "192.0.2.7:1", &se),
	                 -EEXIST);
	assert_int_equal(assign(f, true, "orders", "192.0.2.7:8080", &out, &se), -EEXIST);
	/* An address a live entry of another service holds. */
	assert_int_equal(reg(f, "orders", "192.0.2.8:80", 0, "o2", later, "192.0.2.8:1", &se), 0);
	assert_int_equal(assign(f, true, "billing", "192.0.2.8:80", &out, &se), -EEXIST);
	/* Unassign: unknown, by the wrong service, then for real. */
	assert_int_equal(assign(f, false, "billing", "192.0.2.99:1", &out, &se), -ENOENT);
	assert_int_equal(assign(f, false, "orders", "192.0.2.7:443", &out, &se), -EEXIST);
	assert_int_equal(live_entries(f, "billing"), 1);
	assert_int_equal(assign(f, false, "billing", "192.0.2.7:443", &out, &se), 0);
	assert_true(json_is_true(json_object_get(out, "entry_removed")));
	json_decref(out);
	assert_int_equal(live_entries(f, "billing"), 0);
	assert_int_equal(state_endpoints_list(f->st, &out, &se), 0);
	assert_int_equal(json_array_size(json_object_get(out, "assignments")), 0);
	assert_int_equal(json_array_size(json_object_get(out, "endpoints")), 1);   /* orders' */
	json_decref(out);
}

/* ---- proxies and CA rotation ---- */

static void test_proxies_seen(void **state)
{
	struct fixture *f = *state;
	int64_t later = time(NULL) + 600;
	json_t *out;

	state_proxy_seen(f->st, "aa01", "orders", later, 5, +1);
	state_proxy_seen(f->st, "bb02", "billing", time(NULL) - 5, -1, 0);
	out = state_proxies(f->st);
	/* The expired one, waiting for nothing, is not listed. */
	assert_int_equal(json_array_size(json_object_get(out, "proxies")), 1);
	assert_true(json_is_true(json_object_get(json_array_get(json_object_get(out, "proxies"), 0),
	                                         "connected")));
	json_decref(out);
	state_proxy_seen(f->st, "aa01", "orders", later, -1, -1);
	reopen(f);
	out = state_proxies(f->st);
	assert_int_equal(json_array_size(json_object_get(out, "proxies")), 1);
	assert_int_equal(jint_of(json_array_get(json_object_get(out, "proxies"), 0),
	                         "config_version"), 5);
	json_decref(out);
}

static int rotate(struct fixture *f, bool force, struct state_error *se)
{
	json_t *out = NULL;
	bool tls = false;
	int r = state_ca_rotate(f->st, force, &out, &tls, se);

	assert_true(r == 0 ? tls : !tls);
	json_decref(out);
	return r;
}

static size_t pem_certs(struct fixture *f)
{
	char path[PATH_MAX], *pem = NULL, *p;
	size_t n = 0;

	snprintf(path, sizeof(path), "%s/ca.pem", f->dir);
	assert_int_equal(file_read(path, 1 << 20, 0, &pem, NULL), 0);
	for (p = pem; (p = strstr(p, "BEGIN CERTIFICATE")) != NULL; p++)
		n++;
	free(pem);
	return n;
}

static void test_ca_rotation_gates(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char old_svid[CA_SERIAL_HEX_MAX];
	int64_t later = time(NULL) + 600, v0 = bundle_version(f);
	X509 *chain[2];
	json_t *ca;
	size_t n;

	joined(f, "orders", old_svid);
	state_proxy_seen(f->st, old_svid, "orders", later, -1, 0);
	/* stable -> prepared: always open. */
	assert_int_equal(rotate(f, false, &se), 0);
	assert_true(bundle_version(f) > v0);
	assert_int_equal(pem_certs(f), 2);
	state_roots(f->st, &n);
	assert_int_equal(n, 2);
	/* prepared -> switched: waits for the proxy to learn the new root. */
	ca = state_ca_show(f->st);
	assert_string_equal(jstr_of(ca, "phase"), "prepared");
	assert_false(json_is_true(json_object_get(json_object_get(ca, "gate"), "open")));
	json_decref(ca);
	assert_int_equal(rotate(f, false, &se), -EBUSY);
	assert_string_equal(se.reason, "proxies_not_updated");
	assert_non_null(strstr(se.e.message, old_svid));
	state_proxy_bundle_fetched(f->st, old_svid);
	assert_int_equal(rotate(f, false, &se), 0);
	assert_int_equal(state_server_chain(f->st, chain), 2);
	/* switched -> stable: waits for the old root's SVIDs. */
	assert_int_equal(rotate(f, false, &se), -EBUSY);
	assert_string_equal(se.reason, "old_root_in_use");
	ca = state_ca_show(f->st);
	assert_int_equal(jint_of(json_object_get(ca, "gate"), "certs"), 1);
	json_decref(ca);
	assert_int_equal(rotate(f, true, &se), 0);
	ca = state_ca_show(f->st);
	assert_string_equal(jstr_of(ca, "phase"), "stable");
	assert_int_equal(json_array_size(json_object_get(ca, "roots")), 1);
	json_decref(ca);
	assert_int_equal(pem_certs(f), 1);
	assert_int_equal(state_server_chain(f->st, chain), 1);
	/* The new root survives a restart and signs. */
	reopen(f);
	joined(f, "orders", old_svid);
}

static void test_ca_revoked_old_svids_open_gate(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char a[CA_SERIAL_HEX_MAX];
	json_t *out = NULL;

	joined(f, "orders", a);
	assert_int_equal(rotate(f, false, &se), 0);
	assert_int_equal(rotate(f, false, &se), 0);     /* no proxy seen: open */
	assert_int_equal(rotate(f, false, &se), -EBUSY);
	assert_int_equal(state_certs_revoke(f->st, a, &out, &se), 0);
	json_decref(out);
	assert_int_equal(rotate(f, false, &se), 0);
}

/* ---- housekeeping ---- */

static void test_maintain_prunes(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char *old = join_token(f, "orders", 1, -1), *live = join_token(f, "orders", 1, 600);
	char a[CA_SERIAL_HEX_MAX];
	json_t *out = NULL;
	bool changed = false;

	assert_int_equal(reg(f, "gone", "10.0.0.5:1", 0, "g1", time(NULL) - 1, "10.0.0.5:1", &se), 0);
	assert_int_equal(state_endpoints_touch(f->st), 0);
	assert_int_equal(state_maintain(f->st, &changed), 0);
	assert_true(changed);
	assert_int_equal(state_endpoints_list(f->st, &out, &se), 0);
	assert_int_equal(json_array_size(json_object_get(out, "endpoints")), 0);
	json_decref(out);
	/* The expired token is gone (unknown, not expired); the live one stays. */
	assert_int_equal(issue(f, "orders", old, NULL, NULL, NULL, &se), -EPERM);
	assert_string_equal(se.e.message, "unknown join token");
	assert_int_equal(issue(f, "orders", live, NULL, NULL, a, &se), 0);
	/* Nothing more to do: nothing changes. */
	assert_int_equal(state_maintain(f->st, &changed), 0);
	assert_false(changed);
	out = cert_record(f, a);
	assert_non_null(out);
	json_decref(out);
	free(old);
	free(live);
}

/* Records of certificates that expired go, with their revocations. */
static void test_maintain_expired_certs(void **state)
{
	struct fixture *f = *state;
	struct state_error se = {0};
	char a[CA_SERIAL_HEX_MAX];
	json_t *out = NULL, *bundle;
	bool changed = false;
	int64_t v;

	state_close(f->st);
	f->st = NULL;
	f->o.svid_ttl = 1;
	assert_int_equal(open_state(f), 0);
	joined(f, "orders", a);
	assert_int_equal(state_certs_revoke(f->st, a, &out, &se), 0);
	json_decref(out);
	v = bundle_version(f);
	sleep(2);
	assert_int_equal(state_maintain(f->st, &changed), 0);
	assert_true(changed);
	assert_false(state_is_revoked(f->st, a));
	bundle = state_bundle(f->st);
	assert_int_equal(json_array_size(json_object_get(bundle, "revoked")), 0);
	assert_true(jint_of(bundle, "version") > v);
	json_decref(bundle);
	assert_int_equal(state_certs_revoke(f->st, a, &out, &se), -ENOENT);
}

/* ---- the HTTP mapping (control/handlers.c) ---- */

static void test_http_status(void **state)
{
	(void)state;
	assert_int_equal(handlers_status(-EINVAL), 400);
	assert_int_equal(handlers_status(-EPERM), 403);
	assert_int_equal(handlers_status(-ENOENT), 404);
	assert_int_equal(handlers_status(-EEXIST), 409);
	assert_int_equal(handlers_status(-EBUSY), 409);
	assert_int_equal(handlers_status(-ESTALE), 412);
	assert_int_equal(handlers_status(-E2BIG), 413);
	assert_int_equal(handlers_status(-EDQUOT), 429);
	assert_int_equal(handlers_status(-EIO), 500);
	assert_int_equal(handlers_status(-ENOMEM), 500);
	assert_int_equal(handlers_status(-ECANCELED), 500);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_first_start_files),
		T(test_reopen_keeps_everything),
		T(test_open_refusals),
		T(test_policy_versions),
		T(test_traffic_documents),
		T(test_config_answer_reused_per_version),
		T(test_config_answer_shows_pending_registration),
		T(test_policy_too_large),
		T(test_check),
		T(test_check_method_override),
		T(test_join_token_single_use),
		T(test_join_token_refusals),
		T(test_renewal_caps),
		T(test_lineage_cap),
		T(test_revoke_with_descendants),
		T(test_revoked_ancestor_other_instance),
		T(test_lineage_too_deep_refused),
		T(test_certs_rotate),
		T(test_registry_claims),
		T(test_registry_revoked_entry_frees_claim),
		T(test_registry_caps),
		T(test_assignments),
		T(test_proxies_seen),
		T(test_ca_rotation_gates),
		T(test_ca_revoked_old_svids_open_gate),
		T(test_maintain_prunes),
		T(test_maintain_expired_certs),
		cmocka_unit_test(test_http_status),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
