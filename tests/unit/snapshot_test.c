/*
 * Unit tests for proxy/snapshot.c: building a snapshot from a real config,
 * policy and SVID; the transparent destination lookup (registry entries,
 * their application ports, static endpoints, services that disagree);
 * the decision counters by port; what a reload may not change.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "proxy_fixture.h"

#define BASE "\"service\": \"orders\", \"trust_domain\": \"mesh.local\"," \
	" \"tls\": {\"cert\": \"svid.pem\", \"key\": \"svid.key\", \"bundle\": \"bundle.pem\"}," \
	" \"policy_file\": \"policy.json\""
#define IN "\"inbound\": [{\"listen\": \"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\"}," \
	" {\"listen\": \"127.0.0.1:15007\", \"forward\": \"127.0.0.1:9090\"}]"

static const char config_in[] = "{" BASE ", " IN "}";
/* A static outbound for payments; nothing names billing or reports. */
static const char config_out[] = "{" BASE ", " IN ", \"outbound\": [{\"listen\": "
	"\"127.0.0.1:15001\", \"service\": \"payments\", \"endpoints\": [\"10.0.1.1:15006\"]}]}";

static const char policy_ports[] = "{\"service\": \"orders\", \"default\": \"deny\", \"rules\": ["
	"{\"name\": \"frontend-8080\", \"action\": \"allow\","
	" \"from\": [\"spiffe://mesh.local/svc/frontend\"], \"ports\": [8080]},"
	"{\"name\": \"tenant\", \"action\": \"allow\", \"ports\": [9090],"
	" \"paths\": [\"/t/*\"], \"headers\": {\"X-Tenant\": \"acme\"}},"
	"{\"name\": \"tenant-too\", \"action\": \"deny\", \"ports\": [9091],"
	" \"headers\": {\"x-tenant\": \"evil\", \"X-Region\": \"eu\"}}]}";

struct registry {
	struct snapshot_endpoints *e;
	size_t n;
};

/* Adds service's instance at addr, forwarding to ports[0..n_ports). */
static void reg_add(struct registry *r, const char *service, const char *addr,
                    const uint16_t *ports, size_t n_ports)
{
	struct snapshot_endpoints *e;

	r->e = realloc(r->e, (r->n + 1) * sizeof(*r->e));
	assert_non_null(r->e);
	e = &r->e[r->n++];
	memset(e, 0, sizeof(*e));
	snprintf(e->service, sizeof(e->service), "%s", service);
	e->addrs = calloc(1, sizeof(*e->addrs));
	e->app_ports = calloc(1, sizeof(*e->app_ports));
	assert_non_null(e->addrs);
	assert_non_null(e->app_ports);
	e->addrs[0] = fixture_addr(addr);
	e->n_addrs = 1;
	for (size_t i = 0; i < n_ports; i++)
		e->app_ports[0].port[e->app_ports[0].n++] = ports[i];
}

/* What the lookup says about dst: the service ("" for none), its inbound
 * address ("" for none), and whether services disagreed. */
struct found {
	char service[64], inbound[128];
	bool ambiguous;
};

static struct found lookup(const struct snapshot *s, const char *dst)
{
	struct config_addr a = fixture_addr(dst);
	const struct config_addr *inbound = (const void *)&a;    /* must be overwritten */
	struct found f = { "", "", true };
	const char *svc = snapshot_lookup_dest(s, &a.ss, &inbound, &f.ambiguous);

	snprintf(f.service, sizeof(f.service), "%s", svc ? svc : "");
	snprintf(f.inbound, sizeof(f.inbound), "%s", inbound ? inbound->text : "");
	if (!svc)
		assert_null(inbound);
	return f;
}

static void assert_found(const struct snapshot *s, const char *dst, const char *service,
                         const char *inbound, bool ambiguous)
{
	struct found f = lookup(s, dst);

	if (strcmp(f.service, service) != 0 || strcmp(f.inbound, inbound) != 0 ||
	    f.ambiguous != ambiguous)
		fail_msg("%s: got \"%s\" at \"%s\"%s, want \"%s\" at \"%s\"%s", dst, f.service,
		         f.inbound, f.ambiguous ? " (ambiguous)" : "", service, inbound,
		         ambiguous ? " (ambiguous)" : "");
}

static void test_lookup_registry(void **state)
{
	static const uint16_t billing_ports[] = { 8080, 9090 };
	struct metrics *m = metrics_new();
	struct registry r = { 0 };
	struct snapshot *s;

	(void)state;
	reg_add(&r, "billing", "10.0.0.5:15006", billing_ports, 2);
	reg_add(&r, "reports", "10.0.0.6:15006", NULL, 0);
	reg_add(&r, "reports", "[fd00::6]:15006", billing_ports, 1);
	s = fixture_snapshot(config_in, policy_ports, r.e, r.n, m);

	/* the inbound address itself, and each application port behind it */
	assert_found(s, "10.0.0.5:15006", "billing", "10.0.0.5:15006", false);
	assert_found(s, "10.0.0.5:8080", "billing", "10.0.0.5:15006", false);
	assert_found(s, "10.0.0.5:9090", "billing", "10.0.0.5:15006", false);
	assert_found(s, "10.0.0.6:15006", "reports", "10.0.0.6:15006", false);
	assert_found(s, "[fd00::6]:8080", "reports", "[fd00::6]:15006", false);
	/* outside the mesh: a port nobody registered, an address nobody holds */
	assert_found(s, "10.0.0.5:7777", "", "", false);
	assert_found(s, "10.0.0.6:8080", "", "", false);
	assert_found(s, "10.0.0.7:15006", "", "", false);
	assert_found(s, "[fd00::5]:8080", "", "", false);
	/* the IPv4 instance's port on the IPv6 address, and back */
	assert_found(s, "[fd00::6]:9090", "", "", false);
	snapshot_unref(s);
	metrics_free(m);
}

static void test_lookup_static_endpoints(void **state)
{
	struct metrics *m = metrics_new();
	struct snapshot *s = fixture_snapshot(config_out, policy_ports, NULL, 0, m);

	(void)state;
	assert_found(s, "10.0.1.1:15006", "payments", "10.0.1.1:15006", false);
	/* a static endpoint is an address and a port, no application ports */
	assert_found(s, "10.0.1.1:8080", "", "", false);
	assert_found(s, "10.0.1.2:15006", "", "", false);
	snapshot_unref(s);
	metrics_free(m);
}

/* Two services at one destination: never a guess between them. */
static void test_lookup_ambiguous(void **state)
{
	static const uint16_t web[] = { 8080 };
	struct metrics *m = metrics_new();
	struct registry r = { 0 };
	struct snapshot *s;

	(void)state;
	reg_add(&r, "billing", "10.0.0.5:15006", web, 1);
	reg_add(&r, "reports", "10.0.0.5:15007", web, 1);     /* same IP, same app port */
	reg_add(&r, "billing", "10.0.0.9:15006", NULL, 0);
	reg_add(&r, "billing", "10.0.0.9:15006", NULL, 0);    /* twice, same service: fine */
	reg_add(&r, "audit", "10.0.1.1:15006", NULL, 0);      /* the static payments endpoint */
	s = fixture_snapshot(config_out, policy_ports, r.e, r.n, m);

	assert_found(s, "10.0.0.5:8080", "", "", true);
	assert_found(s, "10.0.0.5:15006", "billing", "10.0.0.5:15006", false);
	assert_found(s, "10.0.0.5:15007", "reports", "10.0.0.5:15007", false);
	assert_found(s, "10.0.0.9:15006", "billing", "10.0.0.9:15006", false);
	assert_found(s, "10.0.1.1:15006", "", "", true);
	snapshot_unref(s);
	metrics_free(m);
}

/* Each rule has its own counter, the default one more; which one a
 * decision bumps follows the port the policy matched. */
static void test_decision_counters_by_port(void **state)
{
	struct metrics *m = metrics_new();
	struct snapshot *s = fixture_snapshot(config_in, policy_ports, NULL, 0, m);
	struct policy_request req = { .peer_id = "spiffe://mesh.local/svc/frontend", .port = 8080 };
	struct policy_decision d;

	(void)state;
	d = policy_eval(s->policy, &req);
	assert_int_equal(d.action, POLICY_ALLOW);
	assert_ptr_equal(snapshot_decision_counter(s, &d), metrics_decision(m, 1, "frontend-8080"));
	req.port = 9090;    /* tenant needs http fields: no rule, the default */
	d = policy_eval(s->policy, &req);
	assert_int_equal(d.action, POLICY_DENY);
	assert_ptr_equal(snapshot_decision_counter(s, &d), s->default_counter);
	assert_ptr_equal(s->default_counter, metrics_decision(m, 0, "default"));
	req.port = 9091;    /* a deny naming http fields still applies to tcp: fail closed */
	d = policy_eval(s->policy, &req);
	assert_int_equal(d.action, POLICY_DENY);
	assert_ptr_equal(snapshot_decision_counter(s, &d), metrics_decision(m, 0, "tenant-too"));
	req.peer_id = "spiffe://mesh.local/svc/intruder";
	req.port = 8080;
	d = policy_eval(s->policy, &req);
	assert_ptr_equal(snapshot_decision_counter(s, &d), s->default_counter);
	/* the header names the policy reads: lower-case, each once */
	assert_int_equal(s->n_policy_headers, 2);
	assert_string_equal(s->policy_headers[0], "x-tenant");
	assert_string_equal(s->policy_headers[1], "x-region");
	snapshot_unref(s);
	metrics_free(m);
}

static void test_build_refusals(void **state)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	struct metrics *m = metrics_new();
	struct snapshot *s;

	(void)state;
	s = fixture_try_snapshot(config_in, "{\"service\": \"billing\", \"rules\": []}", NULL, 0, m,
	                         &err);
	assert_null(s);
	assert_string_equal(err.path, "service");
	assert_non_null(strstr(err.message, "billing"));
	metrics_free(m);
}

static void test_reloadable(void **state)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	struct config *old = fixture_config(config_out);
	struct config *same = fixture_config(config_out);
	struct config *moved = fixture_config("{" BASE ", \"inbound\": [{\"listen\": "
		"\"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\"}, {\"listen\": \"127.0.0.1:15008\","
		" \"forward\": \"127.0.0.1:9090\"}], \"outbound\": [{\"listen\": \"127.0.0.1:15001\","
		" \"service\": \"payments\", \"endpoints\": [\"10.0.1.1:15006\"]}]}");
	struct config *http = fixture_config("{" BASE ", " IN ", \"outbound\": [{\"listen\": "
		"\"127.0.0.1:15001\", \"service\": \"payments\", \"protocol\": \"http\","
		" \"endpoints\": [\"10.0.1.1:15006\"]}]}");
	struct config *fewer = fixture_config(config_in);

	(void)state;
	assert_int_equal(snapshot_check_reloadable(old, same, &err), 0);
	assert_int_equal(snapshot_check_reloadable(old, moved, &err), -EINVAL);
	assert_string_equal(err.path, "inbound");
	assert_int_equal(snapshot_check_reloadable(old, http, &err), -EINVAL);
	assert_string_equal(err.path, "outbound");
	assert_int_equal(snapshot_check_reloadable(old, fewer, &err), -EINVAL);
	assert_non_null(strstr(err.message, "number of listeners"));
	config_free(old);
	config_free(same);
	config_free(moved);
	config_free(http);
	config_free(fewer);
}

static int teardown(void **state)
{
	(void)state;
	fixture_cleanup();
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_lookup_registry),
		cmocka_unit_test(test_lookup_static_endpoints),
		cmocka_unit_test(test_lookup_ambiguous),
		cmocka_unit_test(test_decision_counters_by_port),
		cmocka_unit_test(test_build_refusals),
		cmocka_unit_test(test_reloadable),
	};

	return cmocka_run_group_tests(tests, NULL, teardown);
}
