/* Unit tests for lib/policy.c: parsing errors with their paths, and the
 * evaluator as tables of requests and expected decisions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "meshlet/policy.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

static const char FRONTEND[] = "spiffe://mesh.local/svc/frontend";
static const char OPS[] = "spiffe://mesh.local/svc/ops";
static const char LEGACY[] = "spiffe://mesh.local/svc/legacy";
static const char API[] = "spiffe://mesh.local/svc/api";

static struct policy *parse_text(const char *text, struct meshlet_err *err)
{
	json_t *doc = json_parse_strict(text, strlen(text), MESHLET_JSON_MAX_DEPTH, err);
	struct policy *p;

	if (!doc)
		fail_msg("bad test JSON: %s", err->message);
	p = policy_parse(doc, err);
	json_decref(doc);
	return p;
}

static struct policy *parse_ok(const char *text)
{
	struct meshlet_err err = {{0}, {0}};
	char buf[600];
	struct policy *p = parse_text(text, &err);

	if (!p)
		fail_msg("refused: %s\n%s", err_str(&err, buf, sizeof(buf)), text);
	return p;
}

/* ---- parsing ---------------------------------------------------------- */

struct bad_case {
	const char *json;
	const char *want;               /* err_str(): "path: message" */
};

#define R(rule) "{\"service\": \"orders\", \"rules\": [" rule "]}"
#define OKRULE "{\"name\": \"ok\", \"action\": \"allow\"}"

static const struct bad_case bad_cases[] = {
	{"[]", "must be an object"},
	{"{\"service\": \"orders\", \"servce\": 1}", "servce: unknown field"},
	{"{\"rules\": []}", "service: required"},
	{"{\"service\": 7}", "service: must be a string"},
	{"{\"service\": \"Orders\"}",
	 "service: not a valid service name ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)"},
	{"{\"service\": \"orders\", \"default\": \"permit\"}",
	 "default: must be \"allow\" or \"deny\""},
	{"{\"service\": \"orders\", \"rules\": {}}", "rules: must be an array"},
	{R("7"), "rules[0]: must be an object"},
	{R(OKRULE ", {\"name\": \"r\", \"action\": \"allow\", \"port\": [1]}"),
	 "rules[1].port: unknown field"},
	{R("{\"action\": \"allow\"}"), "rules[0].name: required"},
	{R("{\"name\": \"bad name\", \"action\": \"allow\"}"),
	 "rules[0].name: must be 1..128 characters of [A-Za-z0-9._-]"},
	{R("{\"name\": \"\", \"action\": \"allow\"}"),
	 "rules[0].name: must be 1..128 characters of [A-Za-z0-9._-]"},
	{R(OKRULE ", {\"name\": \"x\", \"action\": \"deny\"}, " OKRULE),
	 "rules[2].name: duplicate rule name \"ok\""},
	{R("{\"name\": \"r\"}"), "rules[0].action: required"},
	{R("{\"name\": \"r\", \"action\": \"Allow\"}"),
	 "rules[0].action: must be \"allow\" or \"deny\""},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": []}"),
	 "rules[0].from: must not be empty"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": null}"),
	 "rules[0].from: must be an array"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": [\"*\", 1]}"),
	 "rules[0].from[1]: must be a string"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": [\"*\", \"frontend\"]}"),
	 "rules[0].from[1]: not a SPIFFE ID, prefix (.../*) or \"*\": scheme must be spiffe://"},
	{R("{\"name\": \"r\", \"action\": \"allow\", "
	   "\"from\": [\"spiffe://Mesh.local/svc/a\"]}"),
	 "rules[0].from[0]: not a SPIFFE ID, prefix (.../*) or \"*\": "
	 "trust domain must be lower-case"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": [\"spiffe://mesh.local/svc/\"]}"),
	 "rules[0].from[0]: not a SPIFFE ID, prefix (.../*) or \"*\": trailing slash not allowed"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": [\"spiffe://mesh.local//*\"]}"),
	 "rules[0].from[0]: not a SPIFFE ID prefix: trailing slash not allowed"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": [\"spiffe:///*\"]}"),
	 "rules[0].from[0]: not a SPIFFE ID prefix: empty trust domain"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"from\": [\"spiffe://mesh.local/svc*\"]}"),
	 "rules[0].from[0]: not a SPIFFE ID, prefix (.../*) or \"*\": invalid character in path"},
	{R(OKRULE ", {\"name\": \"r\", \"action\": \"allow\", \"ports\": [65536]}"),
	 "rules[1].ports[0]: must be 1..65535"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"ports\": [80, 0]}"),
	 "rules[0].ports[1]: must be 1..65535"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"ports\": [80.0]}"),
	 "rules[0].ports[0]: must be an integer"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"ports\": [\"80\"]}"),
	 "rules[0].ports[0]: must be an integer"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"ports\": []}"),
	 "rules[0].ports: must not be empty"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"methods\": [\"GET\", \"GE T\"]}"),
	 "rules[0].methods[1]: not a valid HTTP method (RFC 7230 token)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"methods\": [\"\"]}"),
	 "rules[0].methods[0]: not a valid HTTP method (RFC 7230 token)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"orders\"]}"),
	 "rules[0].paths[0]: must start with '/'"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a//b\"]}"),
	 "rules[0].paths[0]: must not contain \"//\" (paths are matched normalised)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a/../b\"]}"),
	 "rules[0].paths[0]: must not contain \".\" or \"..\" segments (paths are matched "
	 "normalised)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a/./*\"]}"),
	 "rules[0].paths[0]: must not contain \".\" or \"..\" segments (paths are matched "
	 "normalised)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a/..\"]}"),
	 "rules[0].paths[0]: must not contain \".\" or \"..\" segments (paths are matched "
	 "normalised)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a%2Fb\"]}"),
	 "rules[0].paths[0]: must not contain '%' (write the decoded path)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a?x=1\"]}"),
	 "rules[0].paths[0]: must not contain '\\', '?' or '#'"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a\\\\b\"]}"),
	 "rules[0].paths[0]: must not contain '\\', '?' or '#'"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a#f\"]}"),
	 "rules[0].paths[0]: must not contain '\\', '?' or '#'"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/orders*\"]}"),
	 "rules[0].paths[0]: '*' is only allowed as a final \"/*\""},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"paths\": [\"/a b\"]}"),
	 "rules[0].paths[0]: must not contain spaces or control characters"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {}}"),
	 "rules[0].headers: must not be empty"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": []}"),
	 "rules[0].headers: must be an object"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {\"x tenant\": \"a\"}}"),
	 "rules[0].headers.x tenant: not a valid header name (RFC 7230 token)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {\"x_tenant\": \"a\"}}"),
	 "rules[0].headers.x_tenant: '_' in a header name: spell it with '-' (requests spelling a policy header with '_' are refused)"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {\"Keep-Alive\": \"a\"}}"),
	 "rules[0].headers.Keep-Alive: the proxy does not forward this header as received"},
	{R("{\"name\": \"r\", \"action\": \"deny\", \"headers\": {\"x-forwarded-client-cert\": \"a\"}}"),
	 "rules[0].headers.x-forwarded-client-cert: the proxy does not forward this header as received"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {\"x-a\": \"a\\r\\nb\"}}"),
	 "rules[0].headers.x-a: must not contain CR, LF or other control characters"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {\"x-a\": 1}}"),
	 "rules[0].headers.x-a: must be a string"},
	{R("{\"name\": \"r\", \"action\": \"allow\", \"headers\": {\"X-A\": \"1\", \"x-a\": \"2\"}}"),
	 "rules[0].headers.x-a: duplicate header name (names are case-insensitive)"},
};

static void test_parse_errors(void **state)
{
	char buf[600];
	size_t i;

	for (i = 0; i < ARRAY_LEN(bad_cases); i++) {
		struct meshlet_err err = {{0}, {0}};
		struct policy *p = parse_text(bad_cases[i].json, &err);

		if (p) {
			policy_free(p);
			fail_msg("case %zu accepted: %s", i, bad_cases[i].json);
		}
		if (strcmp(err_str(&err, buf, sizeof(buf)), bad_cases[i].want) != 0)
			fail_msg("case %zu: got  \"%s\"\n          want \"%s\"", i, buf,
			         bad_cases[i].want);
	}
}

static void test_parse_minimal(void **state)
{
	struct policy *p = parse_ok("{\"service\": \"orders\"}");

	assert_string_equal(p->service, "orders");
	assert_int_equal(p->default_action, POLICY_DENY);
	assert_int_equal(p->n_rules, 0);
	policy_free(p);
	p = parse_ok("{\"service\": \"orders\", \"default\": \"allow\", \"rules\": []}");
	assert_int_equal(p->default_action, POLICY_ALLOW);
	policy_free(p);
}

static void test_parse_compiled(void **state)
{
	struct policy *p = parse_ok(R(
		"{\"name\": \"frontend-reads\", \"action\": \"allow\","
		" \"from\": [\"spiffe://mesh.local/svc/frontend\", \"*\","
		"            \"spiffe://partner.example/*\", \"spiffe://mesh.local/svc/*\"],"
		" \"ports\": [8080, 65535], \"methods\": [\"GET\", \"get\"],"
		" \"paths\": [\"/orders\", \"/orders/*\", \"/*\", \"/\", \"/a/\"],"
		" \"headers\": {\"X-Tenant\": \"Acme Corp\"}},"
		"{\"name\": \"tcp.only_1\", \"action\": \"deny\", \"ports\": [1]}"));
	const struct policy_rule *r = &p->rules[0];

	assert_int_equal(p->n_rules, 2);
	assert_string_equal(r->name, "frontend-reads");
	assert_int_equal(r->action, POLICY_ALLOW);
	assert_int_equal(r->n_from, 4);
	assert_int_equal(r->from[0].kind, FROM_EXACT);
	assert_string_equal(r->from[0].id, FRONTEND);
	assert_int_equal(r->from[0].len, strlen(FRONTEND));
	assert_int_equal(r->from[1].kind, FROM_ANY);
	assert_int_equal(r->from[2].kind, FROM_PREFIX);
	assert_string_equal(r->from[2].id, "spiffe://partner.example/");
	assert_int_equal(r->from[2].len, strlen("spiffe://partner.example/"));
	assert_string_equal(r->from[3].id, "spiffe://mesh.local/svc/");
	assert_int_equal(r->n_ports, 2);
	assert_int_equal(r->ports[1], 65535);
	assert_int_equal(r->n_methods, 2);
	assert_string_equal(r->methods[1], "get");
	assert_int_equal(r->n_paths, 5);
	assert_false(r->paths[0].prefix);
	assert_string_equal(r->paths[1].path, "/orders/");
	assert_true(r->paths[1].prefix);
	assert_string_equal(r->paths[2].path, "/");
	assert_true(r->paths[2].prefix);
	assert_false(r->paths[3].prefix);
	assert_string_equal(r->paths[4].path, "/a/");
	assert_false(r->paths[4].prefix);
	assert_int_equal(r->n_headers, 1);
	assert_string_equal(r->headers[0].name, "x-tenant");
	assert_string_equal(r->headers[0].value, "Acme Corp");
	assert_true(r->names_http);
	assert_false(p->rules[1].names_http);
	assert_int_equal(p->rules[1].n_from, 0);
	policy_free(p);
}

/* Builds a policy document of n rules named r0..r(n-1). */
static json_t *many_rules(size_t n)
{
	json_t *doc = json_pack("{s:s, s:[]}", "service", "orders", "rules");
	json_t *rules = json_object_get(doc, "rules");
	char name[32];
	size_t i;

	assert_non_null(doc);
	for (i = 0; i < n; i++) {
		snprintf(name, sizeof(name), "r%zu", i);
		assert_int_equal(json_array_append_new(rules,
			json_pack("{s:s, s:s, s:[i]}", "name", name, "action", "allow", "ports",
			          (int)(i % 65535) + 1)), 0);
	}
	return doc;
}

static void test_parse_limits(void **state)
{
	struct meshlet_err err = {{0}, {0}};
	json_t *doc = many_rules(POLICY_MAX_RULES);
	struct policy *p = policy_parse(doc, &err);
	char name[130];

	assert_non_null(p);
	assert_int_equal(p->n_rules, POLICY_MAX_RULES);
	policy_free(p);
	json_decref(doc);

	doc = many_rules(POLICY_MAX_RULES + 1);
	assert_null(policy_parse(doc, &err));
	assert_string_equal(err.path, "rules");
	assert_string_equal(err.message, "at most 4096 rules");
	json_decref(doc);

	/* Names: 128 characters are fine, 129 are not. */
	memset(name, 'a', 128);
	name[128] = '\0';
	doc = json_pack("{s:s, s:[{s:s, s:s}]}", "service", "orders", "rules", "name", name,
	                "action", "deny");
	p = policy_parse(doc, &err);
	assert_non_null(p);
	policy_free(p);
	json_decref(doc);
	name[128] = 'a';
	name[129] = '\0';
	doc = json_pack("{s:s, s:[{s:s, s:s}]}", "service", "orders", "rules", "name", name,
	                "action", "deny");
	assert_null(policy_parse(doc, &err));
	assert_string_equal(err.path, "rules[0].name");
	json_decref(doc);
}

static void test_parse_duplicate_order(void **state)
{
	struct meshlet_err err = {{0}, {0}};
	struct policy *p = parse_text(R(
		"{\"name\": \"a\", \"action\": \"allow\"}, {\"name\": \"b\", \"action\": \"allow\"},"
		"{\"name\": \"c\", \"action\": \"allow\"}, {\"name\": \"b\", \"action\": \"deny\"},"
		"{\"name\": \"a\", \"action\": \"deny\"}"), &err);

	/* The first rule, in document order, whose name was used before. */
	assert_null(p);
	assert_string_equal(err.path, "rules[3].name");
	assert_string_equal(err.message, "duplicate rule name \"b\"");
	/* Names are case-sensitive. */
	p = parse_ok(R("{\"name\": \"a\", \"action\": \"allow\"}, "
	               "{\"name\": \"A\", \"action\": \"allow\"}"));
	policy_free(p);
}

static void test_load(void **state)
{
	struct meshlet_err err = {{0}, {0}};
	char name[] = "/tmp/meshlet-policy-test-XXXXXX";
	const char text[] = "{\"service\": \"orders\", \"default\": \"allow\"}";
	int fd = mkstemp(name);
	struct policy *p;

	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, sizeof(text) - 1), (ssize_t)sizeof(text) - 1);
	close(fd);
	p = policy_load(name, &err);
	assert_non_null(p);
	assert_int_equal(p->default_action, POLICY_ALLOW);
	policy_free(p);
	unlink(name);
	assert_null(policy_load(name, &err));
	assert_non_null(strstr(err.message, "cannot open"));
	policy_free(NULL);
}

/* ---- evaluation ------------------------------------------------------- */

/* Request headers for the callback: lower-case names, NULL-terminated. */
struct hdrs {
	const char *kv[6];
};

static const char *hdr_get(const void *ctx, const char *lname)
{
	const struct hdrs *h = ctx;
	size_t i;

	for (i = 0; h->kv[i]; i += 2) {
		if (strcmp(h->kv[i], lname) == 0)
			return h->kv[i + 1];
	}
	return NULL;
}

struct eval_case {
	const char *peer;
	uint16_t port;
	bool http;
	const char *method, *path;
	struct hdrs headers;
	enum policy_action want;
	const char *want_rule;
};

static void run_table(const char *policy_json, const struct eval_case *cases, size_t n)
{
	struct policy *p = parse_ok(policy_json);
	size_t i;

	for (i = 0; i < n; i++) {
		const struct eval_case *c = &cases[i];
		struct policy_request req = {
			.peer_id = c->peer, .port = c->port, .http = c->http,
			.method = c->method, .path = c->path,
			.header = hdr_get, .header_ctx = &c->headers,
		};
		struct policy_decision d = policy_eval(p, &req);

		if (d.action != c->want || strcmp(policy_decision_rule(&d), c->want_rule) != 0)
			fail_msg("case %zu (%s %u %s %s): got %s by %s, want %s by %s", i,
			         c->peer ? c->peer : "(none)", c->port, c->method ? c->method : "-",
			         c->path ? c->path : "-", policy_action_str(d.action),
			         policy_decision_rule(&d), policy_action_str(c->want), c->want_rule);
		if (d.rule)
			assert_ptr_equal(d.rule, &p->rules[d.rule_index]);
	}
	policy_free(p);
}

#define ACME {{"x-tenant", "acme", NULL}}
#define NOHDR {{NULL}}

/* docs/design.md's example, with an allow for ops placed before the deny it
 * collides with, a method deny and an unauthenticated health check. */
static const char http_policy[] = R(
	"{\"name\": \"frontend-reads\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/frontend\"],"
	" \"ports\": [8080], \"methods\": [\"GET\", \"HEAD\"],"
	" \"paths\": [\"/orders\", \"/orders/*\"], \"headers\": {\"X-Tenant\": \"acme\"}},"
	"{\"name\": \"ops-admin\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/ops\"], \"paths\": [\"/admin/*\"]},"
	"{\"name\": \"no-admin\", \"action\": \"deny\", \"from\": [\"*\"], \"paths\": [\"/admin/*\"]},"
	"{\"name\": \"health\", \"action\": \"allow\", \"paths\": [\"/healthz\"]},"
	"{\"name\": \"no-delete\", \"action\": \"deny\", \"methods\": [\"DELETE\"]}");

static const struct eval_case http_cases[] = {
	{FRONTEND, 8080, true, "GET", "/orders", ACME, POLICY_ALLOW, "frontend-reads"},
	{FRONTEND, 8080, true, "HEAD", "/orders/42", ACME, POLICY_ALLOW, "frontend-reads"},
	{FRONTEND, 8080, true, "GET", "/orders/", ACME, POLICY_ALLOW, "frontend-reads"},
	{FRONTEND, 8080, true, "GET", "/orders/a/b", ACME, POLICY_ALLOW, "frontend-reads"},
	{FRONTEND, 8080, true, "GET", "/ordersx", ACME, POLICY_DENY, "default"},
	{FRONTEND, 8080, true, "GET", "/order", ACME, POLICY_DENY, "default"},
	{FRONTEND, 8080, true, "POST", "/orders", ACME, POLICY_DENY, "default"},
	{FRONTEND, 8080, true, "get", "/orders", ACME, POLICY_DENY, "default"},
	{FRONTEND, 8080, true, "GET", "/orders", {{"x-tenant", "Acme", NULL}}, POLICY_DENY,
	 "default"},
	{FRONTEND, 8080, true, "GET", "/orders", {{"x-other", "acme", NULL}}, POLICY_DENY,
	 "default"},
	{FRONTEND, 8080, true, "GET", "/orders", NOHDR, POLICY_DENY, "default"},
	{FRONTEND, 8081, true, "GET", "/orders", ACME, POLICY_DENY, "default"},
	{API, 8080, true, "GET", "/orders", ACME, POLICY_DENY, "default"},
	{NULL, 8080, true, "GET", "/orders", ACME, POLICY_DENY, "default"},
	/* Deny wins over an earlier matching allow. */
	{OPS, 8080, true, "GET", "/admin/users", NOHDR, POLICY_DENY, "no-admin"},
	{OPS, 8080, true, "GET", "/admin", NOHDR, POLICY_DENY, "default"},
	{FRONTEND, 8080, true, "GET", "/admin/x", ACME, POLICY_DENY, "no-admin"},
	/* No "from": matches even an unauthenticated caller; "*" does not. */
	{NULL, 8080, true, "GET", "/healthz", NOHDR, POLICY_ALLOW, "health"},
	{NULL, 8080, true, "GET", "/admin/x", NOHDR, POLICY_DENY, "default"},
	{API, 9999, true, "GET", "/healthz", NOHDR, POLICY_ALLOW, "health"},
	{API, 9999, true, "DELETE", "/healthz", NOHDR, POLICY_DENY, "no-delete"},
	{NULL, 9999, true, NULL, "/healthz", NOHDR, POLICY_ALLOW, "health"},
	{API, 9999, true, "GET", NULL, NOHDR, POLICY_DENY, "default"},
};

static void test_eval_http(void **state)
{
	run_table(http_policy, http_cases, ARRAY_LEN(http_cases));
}

/* The same policy on a tcp port: the deny rules naming HTTP fields match
 * on their other fields; the HTTP allow rules never match. */
static const struct eval_case http_policy_tcp_cases[] = {
	{FRONTEND, 8080, false, NULL, NULL, NOHDR, POLICY_DENY, "no-admin"},
	{NULL, 8080, false, NULL, NULL, NOHDR, POLICY_DENY, "no-delete"},
};

static void test_eval_http_policy_on_tcp(void **state)
{
	run_table(http_policy, http_policy_tcp_cases, ARRAY_LEN(http_policy_tcp_cases));
}

/* CONNECT opens a tunnel the proxy no longer reads: only a rule naming
 * CONNECT allows it, and a deny rule naming paths refuses it (no path is
 * seen, and the tunnel could reach any). */
static const char connect_policy[] = R(
	"{\"name\": \"frontend-all\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/frontend\"]},"
	"{\"name\": \"ops-tunnel\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/ops\"], \"methods\": [\"CONNECT\"]},"
	"{\"name\": \"no-admin\", \"action\": \"deny\","
	" \"from\": [\"spiffe://mesh.local/svc/frontend\"], \"paths\": [\"/admin/*\"]},"
	"{\"name\": \"no-delete\", \"action\": \"deny\", \"from\": [\"*\"],"
	" \"methods\": [\"DELETE\"], \"paths\": [\"/x\"]}");

static const struct eval_case connect_cases[] = {
	{FRONTEND, 8080, true, "GET", "/x", NOHDR, POLICY_ALLOW, "frontend-all"},
	{FRONTEND, 8080, true, "GET", "/admin/x", NOHDR, POLICY_DENY, "no-admin"},
	{FRONTEND, 8080, true, "CONNECT", NULL, NOHDR, POLICY_DENY, "no-admin"},
	{FRONTEND, 8080, true, "CONNECT", "/", NOHDR, POLICY_DENY, "no-admin"},
	{OPS, 8080, true, "CONNECT", NULL, NOHDR, POLICY_ALLOW, "ops-tunnel"},
	{OPS, 8080, true, "GET", "/x", NOHDR, POLICY_DENY, "default"},
	{API, 8080, true, "CONNECT", NULL, NOHDR, POLICY_DENY, "default"},
};

static void test_eval_connect(void **state)
{
	run_table(connect_policy, connect_cases, ARRAY_LEN(connect_cases));
}

static const char tcp_policy[] =
	"{\"service\": \"db\", \"default\": \"allow\", \"rules\": ["
	"{\"name\": \"legacy-get\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/legacy\"], \"methods\": [\"GET\"]},"
	"{\"name\": \"legacy-x\", \"action\": \"deny\","
	" \"from\": [\"spiffe://mesh.local/svc/legacy\"], \"ports\": [5432], \"paths\": [\"/x\"]},"
	"{\"name\": \"no-partners\", \"action\": \"deny\", \"from\": [\"spiffe://partner.example/*\"]},"
	"{\"name\": \"mesh-svc\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/*\"], \"ports\": [5432, 5433]}"
	"]}";

static const struct eval_case tcp_cases[] = {
	/* Deny naming HTTP fields: fails closed on tcp. */
	{LEGACY, 5432, false, NULL, NULL, NOHDR, POLICY_DENY, "legacy-x"},
	/* Allow naming HTTP fields never matches on tcp. */
	{LEGACY, 5433, false, NULL, NULL, NOHDR, POLICY_ALLOW, "mesh-svc"},
	{LEGACY, 6000, false, NULL, NULL, NOHDR, POLICY_ALLOW, "default"},
	/* Trust-domain prefix: exact domain only, not a longer one. */
	{"spiffe://partner.example/svc/x", 5432, false, NULL, NULL, NOHDR, POLICY_DENY,
	 "no-partners"},
	{"spiffe://partner.example/a/b/c", 1, false, NULL, NULL, NOHDR, POLICY_DENY,
	 "no-partners"},
	{"spiffe://partner.example.com/svc/x", 5432, false, NULL, NULL, NOHDR, POLICY_ALLOW,
	 "default"},
	{API, 5432, false, NULL, NULL, NOHDR, POLICY_ALLOW, "mesh-svc"},
	{"spiffe://mesh.local/svcx/api", 5432, false, NULL, NULL, NOHDR, POLICY_ALLOW,
	 "default"},
	{NULL, 5432, false, NULL, NULL, NOHDR, POLICY_ALLOW, "default"},
	/* The same rules over HTTP. */
	{LEGACY, 6000, true, "GET", "/y", NOHDR, POLICY_ALLOW, "legacy-get"},
	{LEGACY, 5432, true, "GET", "/x", NOHDR, POLICY_DENY, "legacy-x"},
	{LEGACY, 5432, true, "GET", "/y", NOHDR, POLICY_ALLOW, "legacy-get"},
	{LEGACY, 6000, true, "POST", "/y", NOHDR, POLICY_ALLOW, "default"},
};

static void test_eval_tcp(void **state)
{
	run_table(tcp_policy, tcp_cases, ARRAY_LEN(tcp_cases));
}

static const char deny_default_policy[] = R(
	"{\"name\": \"tcp-any\", \"action\": \"allow\", \"from\": [\"*\"], \"ports\": [7000]},"
	"{\"name\": \"http-get\", \"action\": \"allow\", \"from\": [\"*\"], \"ports\": [7001],"
	" \"methods\": [\"GET\"]},"
	"{\"name\": \"any-path\", \"action\": \"allow\", \"ports\": [7002], \"paths\": [\"/*\"]},"
	"{\"name\": \"root\", \"action\": \"allow\", \"ports\": [7003], \"paths\": [\"/\"]},"
	"{\"name\": \"hdr\", \"action\": \"allow\", \"ports\": [7004],"
	" \"headers\": {\"x-a\": \"1\", \"X-B\": \"\"}}");

static const struct eval_case deny_default_cases[] = {
	{API, 7000, false, NULL, NULL, NOHDR, POLICY_ALLOW, "tcp-any"},
	{API, 7000, true, "PUT", "/z", NOHDR, POLICY_ALLOW, "tcp-any"},
	{NULL, 7000, false, NULL, NULL, NOHDR, POLICY_DENY, "default"},
	{API, 7001, false, NULL, NULL, NOHDR, POLICY_DENY, "default"},
	{API, 7001, true, "GET", "/", NOHDR, POLICY_ALLOW, "http-get"},
	{API, 7001, true, "POST", "/", NOHDR, POLICY_DENY, "default"},
	{API, 7002, true, "GET", "/", NOHDR, POLICY_ALLOW, "any-path"},
	{API, 7002, true, "GET", "/a/b/c", NOHDR, POLICY_ALLOW, "any-path"},
	{API, 7002, false, NULL, NULL, NOHDR, POLICY_DENY, "default"},
	{API, 7003, true, "GET", "/", NOHDR, POLICY_ALLOW, "root"},
	{API, 7003, true, "GET", "/a", NOHDR, POLICY_DENY, "default"},
	{API, 7004, true, "GET", "/", {{"x-a", "1", "x-b", "", NULL}}, POLICY_ALLOW, "hdr"},
	{API, 7004, true, "GET", "/", {{"x-a", "1", NULL}}, POLICY_DENY, "default"},
	{API, 7004, true, "GET", "/", {{"x-b", "", "x-a", "2", NULL}}, POLICY_DENY, "default"},
	{API, 7005, true, "GET", "/", NOHDR, POLICY_DENY, "default"},
};

static void test_eval_default_deny(void **state)
{
	run_table(deny_default_policy, deny_default_cases, ARRAY_LEN(deny_default_cases));
}

static const struct eval_case empty_cases[] = {
	{API, 1, false, NULL, NULL, NOHDR, POLICY_ALLOW, "default"},
	{NULL, 1, true, "GET", "/", NOHDR, POLICY_ALLOW, "default"},
};

static const struct eval_case empty_deny_cases[] = {
	{API, 1, false, NULL, NULL, NOHDR, POLICY_DENY, "default"},
};

static void test_eval_defaults(void **state)
{
	run_table("{\"service\": \"a\", \"default\": \"allow\"}", empty_cases,
	          ARRAY_LEN(empty_cases));
	run_table("{\"service\": \"a\"}", empty_deny_cases, ARRAY_LEN(empty_deny_cases));
}

/* Without a header callback, a rule naming headers cannot match. */
static void test_eval_no_header_callback(void **state)
{
	struct policy *p = parse_ok(deny_default_policy);
	struct policy_request req = {.peer_id = API, .port = 7004, .http = true,
	                             .method = "GET", .path = "/"};
	struct policy_decision d = policy_eval(p, &req);

	assert_int_equal(d.action, POLICY_DENY);
	assert_null(d.rule);
	assert_string_equal(policy_decision_rule(&d), "default");
	policy_free(p);
}

static void test_action_str(void **state)
{
	assert_string_equal(policy_action_str(POLICY_ALLOW), "allow");
	assert_string_equal(policy_action_str(POLICY_DENY), "deny");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_errors),
		cmocka_unit_test(test_parse_minimal),
		cmocka_unit_test(test_parse_compiled),
		cmocka_unit_test(test_parse_limits),
		cmocka_unit_test(test_parse_duplicate_order),
		cmocka_unit_test(test_load),
		cmocka_unit_test(test_eval_http),
		cmocka_unit_test(test_eval_http_policy_on_tcp),
		cmocka_unit_test(test_eval_connect),
		cmocka_unit_test(test_eval_tcp),
		cmocka_unit_test(test_eval_default_deny),
		cmocka_unit_test(test_eval_defaults),
		cmocka_unit_test(test_eval_no_header_callback),
		cmocka_unit_test(test_action_str),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
