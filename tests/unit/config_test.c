/* Unit tests for lib/config.c: defaults, a full config, addresses, relative
 * file names and the errors (with their JSON paths). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include "meshlet/config.h"

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define FILE_NAME "/etc/meshlet/proxy.json"

static int parse_text(const char *text, const char *file, struct config **out,
                      struct meshlet_err *err)
{
	json_t *doc = json_parse_strict(text, strlen(text), MESHLET_JSON_MAX_DEPTH, err);
	int rc;

	if (!doc)
		fail_msg("bad test JSON: %s\n%s", err->message, text);
	rc = config_parse(doc, file, out, err);
	json_decref(doc);
	return rc;
}

static struct config *parse_ok(const char *text, const char *file)
{
	struct meshlet_err err = {{0}, {0}};
	struct config *c = NULL;
	char buf[600];

	if (parse_text(text, file, &c, &err) != 0)
		fail_msg("refused: %s\n%s", err_str(&err, buf, sizeof(buf)), text);
	assert_non_null(c);
	return c;
}

/* Pieces of documents. */
#define ID "\"service\": \"orders\", \"trust_domain\": \"mesh.local\""
#define TLS "\"tls\": {\"cert\": \"svid.pem\", \"key\": \"svid.key\", \"bundle\": \"bundle.pem\"}"
#define STATIC ID ", " TLS ", \"policy_file\": \"policy.json\""
#define CONTROL ID ", \"control\": {\"url\": \"https://control.mesh.local:7443\"}"
#define IN1 "\"inbound\": [{\"listen\": \"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\"}]"
#define INB(item) "\"inbound\": [" item "]"
#define OUTB(item) "\"outbound\": [" item "]"

static const char minimal_static[] = "{" STATIC ", " IN1 "}";

static long online_cpus(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n < 1 ? 1 : n > 256 ? 256 : n;
}

static void test_minimal_static_defaults(void **state)
{
	struct config *c = parse_ok(minimal_static, FILE_NAME);

	assert_string_equal(c->file, FILE_NAME);
	assert_string_equal(c->service, "orders");
	assert_string_equal(c->trust_domain, "mesh.local");
	assert_string_equal(c->state_dir, "/var/lib/meshlet-proxy");
	assert_false(c->has_control);
	assert_null(c->control_url);
	assert_null(c->control_token_file);
	assert_true(c->has_tls);
	assert_string_equal(c->tls_cert, "/etc/meshlet/svid.pem");
	assert_string_equal(c->tls_key, "/etc/meshlet/svid.key");
	assert_string_equal(c->tls_bundle, "/etc/meshlet/bundle.pem");
	assert_int_equal(c->tls_min_version, TLS1_3_VERSION);
	assert_null(c->tls_groups);
	assert_string_equal(c->policy_file, "/etc/meshlet/policy.json");
	assert_int_equal(c->n_inbound, 1);
	assert_string_equal(c->inbound[0].listen.text, "127.0.0.1:15006");
	assert_int_equal(config_addr_port(&c->inbound[0].listen), 15006);
	assert_string_equal(c->inbound[0].forward.text, "127.0.0.1:8080");
	assert_int_equal(c->inbound[0].protocol, PROTO_TCP);
	/* Not a wildcard: advertised as it listens. */
	assert_string_equal(c->inbound[0].advertise.text, "127.0.0.1:15006");
	assert_int_equal(c->n_outbound, 0);
	assert_null(c->outbound);
	assert_false(c->has_transparent);
	assert_string_equal(c->admin_listen.text, "127.0.0.1:15000");
	assert_int_equal(config_addr_port(&c->admin_listen), 15000);
	assert_int_equal(c->workers, online_cpus());
	assert_int_equal(c->max_connections, 10000);
	assert_int_equal(c->timeouts.handshake_ms, 10000);
	assert_int_equal(c->timeouts.connect_ms, 5000);
	assert_int_equal(c->timeouts.idle_ms, 300000);
	assert_int_equal(c->timeouts.drain_ms, 30000);
	assert_int_equal(c->log_level, CONFIG_LOG_INFO);
	assert_true(c->access_log);
	assert_int_equal(c->http2.max_concurrent_streams, 100);
	assert_int_equal(c->http2.max_header_list_bytes, 16384);
	assert_int_equal(c->http2.initial_window_bytes, 65535);
	assert_int_equal(c->inbound[0].app_protocol, APP_PROTO_AUTO);
	config_free(c);
}

static void test_http2_and_app_protocol(void **state)
{
	struct config *c = parse_ok("{" STATIC ", "
		INB("{\"listen\": \"127.0.0.1:1\", \"forward\": \"127.0.0.1:2\", \"protocol\": \"http\","
		    " \"app_protocol\": \"h2c\"}, {\"listen\": \"127.0.0.1:3\","
		    " \"forward\": \"127.0.0.1:4\", \"protocol\": \"http\", \"app_protocol\": \"http1\"}")
		", \"http2\": {\"max_concurrent_streams\": 50, \"max_header_list_bytes\": 8192,"
		" \"initial_window_bytes\": 1048576}}", FILE_NAME);

	(void)state;
	assert_int_equal(c->inbound[0].app_protocol, APP_PROTO_H2C);
	assert_int_equal(c->inbound[1].app_protocol, APP_PROTO_HTTP1);
	assert_int_equal(c->http2.max_concurrent_streams, 50);
	assert_int_equal(c->http2.max_header_list_bytes, 8192);
	assert_int_equal(c->http2.initial_window_bytes, 1048576);
	config_free(c);
}

static void test_outbound_pool(void **state)
{
	struct config *c = parse_ok("{" STATIC ", "
		OUTB("{\"listen\": \"127.0.0.1:1\", \"service\": \"orders\", \"protocol\": \"http\","
		     " \"endpoints\": [\"127.0.0.1:2\"]},"
		     "{\"listen\": \"127.0.0.1:3\", \"service\": \"orders\", \"protocol\": \"http\","
		     " \"endpoints\": [\"127.0.0.1:2\"], \"pool\": {\"max_connections\": 2,"
		     " \"max_streams\": 10, \"idle_seconds\": 5}}") "}", FILE_NAME);

	(void)state;
	/* The defaults: 4 connections of 100 streams, closed after 90 s idle. */
	assert_int_equal(c->outbound[0].pool.max_connections, 4);
	assert_int_equal(c->outbound[0].pool.max_streams, 100);
	assert_int_equal(c->outbound[0].pool.idle_ms, 90000);
	assert_int_equal(c->outbound[1].pool.max_connections, 2);
	assert_int_equal(c->outbound[1].pool.max_streams, 10);
	assert_int_equal(c->outbound[1].pool.idle_ms, 5000);
	config_free(c);
}

static const char full_control[] = "{" ID ","
	"\"state_dir\": \"/srv/meshlet\","
	"\"control\": {\"url\": \"https://control.mesh.local:7443\", \"token_file\": \"token\"},"
	"\"inbound\": [{\"listen\": \"0.0.0.0:15006\", \"forward\": \"127.0.0.1:8080\","
	"              \"protocol\": \"http\", \"advertise\": \"10.0.0.2:15006\"},"
	"             {\"listen\": \"[::1]:15007\", \"forward\": \"localhost:5432\","
	"              \"protocol\": \"tcp\"}],"
	"\"outbound\": [{\"listen\": \"127.0.0.1:9001\", \"service\": \"payments\","
	"               \"protocol\": \"http\", \"endpoints\": [\"10.0.0.3:15006\", \"[::1]:15008\"]},"
	"              {\"listen\": \"127.0.0.1:9002\", \"service\": \"users\"}],"
	"\"transparent\": {\"listen\": \"127.0.0.1:15001\"},"
	"\"admin\": {\"listen\": \"127.0.0.1:15100\"},"
	"\"workers\": 3, \"max_connections\": 500,"
	"\"timeouts\": {\"handshake_seconds\": 2.5, \"connect_seconds\": 1,"
	"              \"idle_seconds\": 60, \"drain_seconds\": 0},"
	"\"log\": {\"level\": \"debug\", \"access_log\": false}}";

/* control.urls: several replicas, in order; the first is control_url. */
static void test_control_urls(void **state)
{
	struct config *c = parse_ok("{" ID ", " IN1 ", \"control\": {\"urls\": [\"https://a:7443\", "
	                            "\"https://b:7443\", \"https://[::1]:7443\"]}}", FILE_NAME);

	assert_true(c->has_control);
	assert_int_equal(c->n_control_urls, 3);
	assert_string_equal(c->control_urls[0], "https://a:7443");
	assert_string_equal(c->control_urls[2], "https://[::1]:7443");
	assert_string_equal(c->control_url, "https://a:7443");
	config_free(c);
}

static void test_full_control(void **state)
{
	struct config *c = parse_ok(full_control, FILE_NAME);
	const struct sockaddr_in6 *s6;

	assert_string_equal(c->state_dir, "/srv/meshlet");
	assert_true(c->has_control);
	assert_false(c->has_tls);
	assert_null(c->policy_file);
	assert_string_equal(c->control_url, "https://control.mesh.local:7443");
	assert_int_equal(c->n_control_urls, 1);
	assert_string_equal(c->control_urls[0], "https://control.mesh.local:7443");
	assert_string_equal(c->control_token_file, "/etc/meshlet/token");
	assert_int_equal(c->n_inbound, 2);
	assert_int_equal(c->inbound[0].protocol, PROTO_HTTP);
	assert_string_equal(c->inbound[0].advertise.text, "10.0.0.2:15006");
	assert_int_equal(c->inbound[1].listen.ss.ss_family, AF_INET6);
	s6 = (const struct sockaddr_in6 *)&c->inbound[1].listen.ss;
	assert_true(IN6_IS_ADDR_LOOPBACK(&s6->sin6_addr));
	assert_int_equal(c->inbound[1].listen.len, sizeof(struct sockaddr_in6));
	assert_string_equal(c->inbound[1].listen.text, "[::1]:15007");
	assert_string_equal(c->inbound[1].forward.text, "localhost:5432");
	assert_int_equal(c->inbound[1].forward.ss.ss_family, AF_INET);
	assert_int_equal(c->inbound[1].protocol, PROTO_TCP);
	assert_int_equal(c->n_outbound, 2);
	assert_string_equal(c->outbound[0].service, "payments");
	assert_int_equal(c->outbound[0].protocol, PROTO_HTTP);
	assert_int_equal(c->outbound[0].n_endpoints, 2);
	assert_string_equal(c->outbound[0].endpoints[1].text, "[::1]:15008");
	assert_int_equal(config_addr_port(&c->outbound[0].endpoints[0]), 15006);
	/* Control mode: endpoints may come from the registry. */
	assert_int_equal(c->outbound[1].n_endpoints, 0);
	assert_null(c->outbound[1].endpoints);
	assert_int_equal(c->outbound[1].protocol, PROTO_TCP);
	assert_true(c->has_transparent);
	assert_string_equal(c->transparent_listen.text, "127.0.0.1:15001");
	assert_string_equal(c->admin_listen.text, "127.0.0.1:15100");
	assert_int_equal(c->workers, 3);
	assert_int_equal(c->max_connections, 500);
	assert_int_equal(c->timeouts.handshake_ms, 2500);
	assert_int_equal(c->timeouts.connect_ms, 1000);
	assert_int_equal(c->timeouts.idle_ms, 60000);
	assert_int_equal(c->timeouts.drain_ms, 0);
	assert_int_equal(c->log_level, CONFIG_LOG_DEBUG);
	assert_false(c->access_log);
	config_free(c);
}

static void test_full_static_tls(void **state)
{
	struct config *c = parse_ok("{" ID ", \"policy_file\": \"/abs/policy.json\","
		"\"tls\": {\"cert\": \"/pki/svid.pem\", \"key\": \"k/svid.key\", \"bundle\": \"b.pem\","
		"          \"min_version\": \"1.2\", \"groups\": \"X25519:P-256\"},"
		"\"outbound\": [{\"listen\": \"127.0.0.1:9001\", \"service\": \"payments\","
		"               \"endpoints\": [\"10.0.0.3:15006\"]}],"
		"\"workers\": 0, \"log\": {\"level\": \"error\"}}", "conf/proxy.json");

	assert_int_equal(c->tls_min_version, TLS1_2_VERSION);
	assert_string_equal(c->tls_groups, "X25519:P-256");
	assert_string_equal(c->tls_cert, "/pki/svid.pem");
	assert_string_equal(c->tls_key, "conf/k/svid.key");
	assert_string_equal(c->tls_bundle, "conf/b.pem");
	assert_string_equal(c->policy_file, "/abs/policy.json");
	assert_int_equal(c->workers, online_cpus());
	assert_int_equal(c->log_level, CONFIG_LOG_ERROR);
	assert_true(c->access_log);
	assert_int_equal(c->n_inbound, 0);
	config_free(c);
}

static void test_relative_paths(void **state)
{
	static const char doc[] = "{" STATIC ", " IN1 ", \"state_dir\": \"state\"}";
	static const char ctl[] = "{" ID ", " IN1 ", \"control\": {\"url\": \"https://c:1\","
	                          " \"token_file\": \"secrets/t\"}}";
	static const struct { const char *file, *cert, *state; } cases[] = {
		{"/etc/meshlet/proxy.json", "/etc/meshlet/svid.pem", "/etc/meshlet/state"},
		{"/proxy.json", "/svid.pem", "/state"},
		{"conf/proxy.json", "conf/svid.pem", "conf/state"},
		{"proxy.json", "svid.pem", "state"},
		{NULL, "svid.pem", "state"},
	};
	struct config *c;
	size_t i;

	for (i = 0; i < ARRAY_LEN(cases); i++) {
		c = parse_ok(doc, cases[i].file);
		assert_string_equal(c->tls_cert, cases[i].cert);
		assert_string_equal(c->state_dir, cases[i].state);
		if (cases[i].file)
			assert_string_equal(c->file, cases[i].file);
		else
			assert_null(c->file);
		config_free(c);
	}
	c = parse_ok(ctl, "/a/b/proxy.json");
	assert_string_equal(c->control_token_file, "/a/b/secrets/t");
	config_free(c);
	c = parse_ok("{" CONTROL ", " IN1 "}", "/a/b/proxy.json");
	assert_string_equal(c->control_token_file, "/run/secrets/meshlet-token");
	config_free(c);
}

static void test_advertise_wildcard(void **state)
{
	struct config *c = parse_ok("{" STATIC ", "
		INB("{\"listen\": \"0.0.0.0:15006\", \"forward\": \"127.0.0.1:8080\"},"
		    "{\"listen\": \"[::]:15007\", \"forward\": \"127.0.0.1:8080\"}") "}", FILE_NAME);
	size_t i;

	for (i = 0; i < 2; i++) {
		const struct config_addr *a = &c->inbound[i].advertise;

		/* The first non-loopback IPv4 address, or the listen address
		 * on a machine without one. */
		assert_int_equal(config_addr_port(a), 15006 + i);
		if (strcmp(a->text, c->inbound[i].listen.text) != 0) {
			const struct sockaddr_in *sin = (const struct sockaddr_in *)&a->ss;
			char want[64], ip[INET_ADDRSTRLEN];

			assert_int_equal(a->ss.ss_family, AF_INET);
			assert_int_equal(a->len, sizeof(struct sockaddr_in));
			assert_int_not_equal(sin->sin_addr.s_addr, htonl(INADDR_ANY));
			assert_int_not_equal(ntohl(sin->sin_addr.s_addr) >> 24, 127);
			inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
			snprintf(want, sizeof(want), "%s:%zu", ip, 15006 + i);
			assert_string_equal(a->text, want);
		}
	}
	config_free(c);
}

/* ---- errors ----------------------------------------------------------- */

struct bad_case {
	const char *json;
	const char *want;               /* err_str(): "path: message" */
};

#define SVC_RULE "([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)"

static const struct bad_case bad_cases[] = {
	{"[]", "must be an object"},
	{"{" STATIC ", " IN1 ", \"http2\": {\"max_streams\": 1}}", "http2.max_streams: unknown field"},
	{"{" STATIC ", " IN1 ", \"http2\": {\"max_concurrent_streams\": 0}}",
	 "http2.max_concurrent_streams: must be 1..1000"},
	{"{" STATIC ", " IN1 ", \"http2\": {\"max_header_list_bytes\": 100}}",
	 "http2.max_header_list_bytes: must be 1024..262144"},
	{"{" STATIC ", " IN1 ", \"http2\": {\"initial_window_bytes\": 2147483647}}",
	 "http2.initial_window_bytes: must be 1024..16777216"},
	{"{" STATIC ", " IN1 ", \"http2\": []}", "http2: must be an object"},
#define POOL_OUT(pool) OUTB("{\"listen\": \"127.0.0.1:1\", \"service\": \"orders\"," \
	" \"protocol\": \"http\", \"endpoints\": [\"127.0.0.1:2\"], \"pool\": " pool "}")
	{"{" STATIC ", " POOL_OUT("{\"max_connections\": 0}") "}",
	 "outbound[0].pool.max_connections: must be 1..64"},
	{"{" STATIC ", " POOL_OUT("{\"max_connections\": 65}") "}",
	 "outbound[0].pool.max_connections: must be 1..64"},
	{"{" STATIC ", " POOL_OUT("{\"max_streams\": 1001}") "}",
	 "outbound[0].pool.max_streams: must be 1..1000"},
	{"{" STATIC ", " POOL_OUT("{\"idle_seconds\": 0}") "}",
	 "outbound[0].pool.idle_seconds: must be 1..86400"},
	{"{" STATIC ", " POOL_OUT("{\"idle\": 5}") "}", "outbound[0].pool.idle: unknown field"},
	{"{" STATIC ", " POOL_OUT("[4]") "}", "outbound[0].pool: must be an object"},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:1\", \"service\": \"orders\","
	                      " \"endpoints\": [\"127.0.0.1:2\"], \"pool\": {}}") "}",
	 "outbound[0].pool: only for \"protocol\": \"http\" listeners"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:1\", \"forward\": \"127.0.0.1:2\","
	                    " \"protocol\": \"http\", \"app_protocol\": \"h3\"}") "}",
	 "inbound[0].app_protocol: must be \"auto\", \"http1\" or \"h2c\""},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:1\", \"forward\": \"127.0.0.1:2\","
	                    " \"app_protocol\": \"h2c\"}") "}",
	 "inbound[0].app_protocol: only for \"protocol\": \"http\" listeners"},
	{"{" STATIC ", " IN1 ", \"workrs\": 2}", "workrs: unknown field"},
	{"{" ID ", \"policy_file\": \"p\", " IN1 ", \"tls\": {\"crt\": \"a\"}}",
	 "tls.crt: unknown field"},
	{"{" STATIC ", " IN1 ", \"workers\": \"4\"}", "workers: must be an integer"},
	{"{" STATIC ", " IN1 ", \"workers\": 2.0}", "workers: must be an integer"},
	{"{" STATIC ", " IN1 ", \"workers\": 257}", "workers: must be 0..256"},
	{"{" STATIC ", " IN1 ", \"max_connections\": 0}", "max_connections: must be 1..1000000"},
	{"{" STATIC ", " IN1 ", \"state_dir\": 1}", "state_dir: must be a string"},
	{"{" STATIC ", " IN1 ", \"state_dir\": \"\"}", "state_dir: must not be empty"},
	{"{\"trust_domain\": \"mesh.local\"}", "service: required"},
	{"{\"service\": \"Orders\"}", "service: not a valid service name " SVC_RULE},
	{"{\"service\": \"orders-\"}", "service: not a valid service name " SVC_RULE},
	{"{\"service\": \"orders\"}", "trust_domain: required"},
	{"{\"service\": \"orders\", \"trust_domain\": \"Mesh.local\"}",
	 "trust_domain: not a valid trust domain (lower-case [a-z0-9._-], at most 255 bytes)"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:0\", \"forward\": \"127.0.0.1:80\"}") "}",
	 "inbound[0].listen: \"127.0.0.1:0\": port must be 1..65535"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:65536\", \"forward\": \"127.0.0.1:80\"}")
	 "}", "inbound[0].listen: \"127.0.0.1:65536\": port must be 1..65535"},
	{"{" STATIC ", " INB("{\"forward\": \"127.0.0.1:80\"}") "}", "inbound[0].listen: required"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:1\"}") "}", "inbound[0].forward: required"},
	{"{" STATIC ", " INB("{\"listen\": 15006, \"forward\": \"127.0.0.1:80\"}") "}",
	 "inbound[0].listen: must be a string"},
	{"{" STATIC ", \"inbound\": {}}", "inbound: must be an array"},
	{"{" STATIC ", \"inbound\": [\"127.0.0.1:1\"]}", "inbound[0]: must be an object"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:1\", \"forward\": \"127.0.0.1:2\","
	                    " \"protocol\": \"udp\"}") "}",
	 "inbound[0].protocol: must be \"tcp\" or \"http\""},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:1\", \"forward\": \"127.0.0.1:2\","
	                    " \"advertise\": \"0.0.0.0:1\"}") "}",
	 "inbound[0].advertise: must not be a wildcard address"},
	{"{" STATIC ", " INB("{\"listen\": \"::1:80\", \"forward\": \"127.0.0.1:2\"}") "}",
	 "inbound[0].listen: \"::1:80\": IPv6 addresses need brackets: [::1]:port"},
	{"{" STATIC ", " INB("{\"listen\": \"127.1:80\", \"forward\": \"127.0.0.1:2\"}") "}",
	 "inbound[0].listen: \"127.1:80\": invalid IPv4 address (want a.b.c.d)"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:1\", \"forward\": \"127.0.0.1:2\","
	                    " \"proto\": \"tcp\"}") "}", "inbound[0].proto: unknown field"},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"service\": \"pay_ments\","
	                     " \"endpoints\": [\"10.0.0.1:1\"]}") "}",
	 "outbound[0].service: not a valid service name " SVC_RULE},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"endpoints\": [\"10.0.0.1:1\"]}")
	 "}", "outbound[0].service: required"},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"service\": \"pay\"}") "}",
	 "outbound[0].endpoints: required"},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"service\": \"pay\","
	                     " \"endpoints\": []}") "}",
	 "outbound[0].endpoints: must not be empty"},
	{"{" CONTROL ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"service\": \"pay\","
	                      " \"endpoints\": []}") "}",
	 "outbound[0].endpoints: must not be empty (omit it to use control's registry)"},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"service\": \"pay\","
	                     " \"endpoints\": [\"10.0.0.1:1\", \"10.0.0.2\"]}") "}",
	 "outbound[0].endpoints[1]: \"10.0.0.2\": missing :port"},
	{"{" STATIC ", " OUTB("{\"listen\": \"127.0.0.1:9001\", \"service\": \"pay\","
	                     " \"endpoints\": [\"0.0.0.0:1\"]}") "}",
	 "outbound[0].endpoints[0]: must not be a wildcard address"},
	{"{" STATIC ", " IN1 ", " OUTB("{\"listen\": \"127.0.0.1:15006\", \"service\": \"pay\","
	                              " \"endpoints\": [\"10.0.0.1:1\"]}") "}",
	 "outbound[0].listen: 127.0.0.1:15006 is already used by inbound[0].listen"},
	{"{" STATIC ", " INB("{\"listen\": \"127.0.0.1:15000\", \"forward\": \"127.0.0.1:2\"}")
	 "}", "admin.listen: 127.0.0.1:15000 is already used by inbound[0].listen"},
	{"{" STATIC ", " INB("{\"listen\": \"0.0.0.0:15006\", \"forward\": \"127.0.0.1:2\"}") ", "
	 OUTB("{\"listen\": \"127.0.0.1:15006\", \"service\": \"pay\","
	      " \"endpoints\": [\"10.0.0.1:1\"]}") "}",
	 "outbound[0].listen: 127.0.0.1:15006 overlaps 0.0.0.0:15006 of inbound[0].listen"},
	{"{" STATIC ", " IN1 ", \"transparent\": {\"listen\": \"localhost:15006\"}}",
	 "transparent.listen: localhost:15006 is already used by inbound[0].listen"},
	{"{" STATIC ", " IN1 ", \"admin\": {\"listen\": \"[::]:15006\"}}",
	 "admin.listen: [::]:15006 overlaps 127.0.0.1:15006 of inbound[0].listen"},
	/* the IPv6 twins of inbound and transparent listeners are taken too */
	{"{" STATIC ", " IN1 ", " OUTB("{\"listen\": \"[::1]:15006\", \"service\": \"pay\","
	                              " \"endpoints\": [\"10.0.0.1:1\"]}") "}",
	 "outbound[0].listen: [::1]:15006 overlaps [::1]:15006, where inbound[0].listen also "
	 "listens for IPv6"},
	{"{" STATIC ", " INB("{\"listen\": \"[fd00::1]:15001\", \"forward\": \"127.0.0.1:2\"}")
	 ", \"transparent\": {\"listen\": \"0.0.0.0:15001\"}}",
	 "inbound[0].listen: [fd00::1]:15001 overlaps [::]:15001, where transparent.listen also "
	 "listens for IPv6"},
	{"{" STATIC ", " IN1 ", \"admin\": {\"port\": 1}}", "admin.port: unknown field"},
	{"{" STATIC ", " IN1 ", \"transparent\": {}}", "transparent.listen: required"},
	{"{" STATIC "}", "nothing to serve: give inbound, outbound or transparent"},
	{"{" STATIC ", \"inbound\": []}", "nothing to serve: give inbound, outbound or transparent"},
	{"{" STATIC ", " IN1 ", \"control\": {\"url\": \"https://c:1\"}}",
	 "both control and tls/policy_file given: use control (dynamic mode) or tls + "
	 "policy_file (static mode), not both"},
	{"{" ID ", " IN1 "}",
	 "no mode: give control (dynamic mode) or tls + policy_file (static mode)"},
	{"{" ID ", " TLS ", " IN1 "}", "policy_file: required with tls"},
	{"{" ID ", \"policy_file\": \"p.json\", " IN1 "}", "tls: required with policy_file"},
	{"{" ID ", " IN1 ", \"control\": {\"url\": \"http://c:1\"}}",
	 "control.url: must start with https://"},
	{"{" ID ", " IN1 ", \"control\": {\"url\": \"https://\"}}",
	 "control.url: missing host after https://"},
	{"{" ID ", " IN1 ", \"control\": {\"url\": \"https://c:1/a b\"}}",
	 "control.url: must not contain spaces or control characters"},
	{"{" ID ", " IN1 ", \"control\": {\"token_file\": \"t\"}}", "control.url: required"},
	{"{" ID ", " IN1 ", \"control\": {\"url\": \"https://a:1\", \"urls\": [\"https://b:1\"]}}",
	 "control: give url (one control) or urls (a list of control replicas), not both"},
	{"{" ID ", " IN1 ", \"control\": {\"urls\": []}}", "control.urls: must be a list of 1..16 URLs"},
	{"{" ID ", " IN1 ", \"control\": {\"urls\": \"https://a:1\"}}",
	 "control.urls: must be a list of 1..16 URLs"},
	{"{" ID ", " IN1 ", \"control\": {\"urls\": [\"https://a:1\", 7]}}",
	 "control.urls[1]: must be a string"},
	{"{" ID ", " IN1 ", \"control\": {\"urls\": [\"https://a:1\", \"http://b:1\"]}}",
	 "control.urls[1]: must start with https://"},
	{"{" ID ", " IN1 ", \"control\": {\"urls\": [\"https://a:1\", \"https://a:1\"]}}",
	 "control.urls[1]: listed twice"},
	{"{" ID ", " IN1 ", \"control\": {\"url\": 5}}", "control.url: must be a string"},
	{"{" ID ", " IN1 ", \"control\": \"https://c:1\"}", "control: must be an object"},
	{"{" ID ", \"policy_file\": \"p\", " IN1 ", \"tls\": {\"cert\": \"c\", \"bundle\": \"b\"}}",
	 "tls.key: required"},
	{"{" ID ", \"policy_file\": \"p\", " IN1 ", \"tls\": {\"cert\": \"\", \"key\": \"k\","
	 " \"bundle\": \"b\"}}", "tls.cert: must not be empty"},
	{"{" ID ", \"policy_file\": \"p\", " IN1 ", \"tls\": {\"cert\": \"c\", \"key\": \"k\","
	 " \"bundle\": \"b\", \"min_version\": \"1.1\"}}",
	 "tls.min_version: must be \"1.2\" or \"1.3\""},
	{"{" ID ", \"policy_file\": \"p\", " IN1 ", \"tls\": {\"cert\": \"c\", \"key\": \"k\","
	 " \"bundle\": \"b\", \"groups\": \"X25519:nosuchgroup\"}}",
	 "tls.groups: \"X25519:nosuchgroup\": unknown TLS group in list"},
	{"{" STATIC ", " IN1 ", \"timeouts\": {\"handshake_seconds\": 0.05}}",
	 "timeouts.handshake_seconds: must be 0.1..3600 seconds"},
	{"{" STATIC ", " IN1 ", \"timeouts\": {\"connect_seconds\": 3601}}",
	 "timeouts.connect_seconds: must be 0.1..3600 seconds"},
	{"{" STATIC ", " IN1 ", \"timeouts\": {\"idle_seconds\": 0.5}}",
	 "timeouts.idle_seconds: must be 1..86400 seconds"},
	{"{" STATIC ", " IN1 ", \"timeouts\": {\"drain_seconds\": -1}}",
	 "timeouts.drain_seconds: must be 0..3600 seconds"},
	{"{" STATIC ", " IN1 ", \"timeouts\": {\"drain_seconds\": \"30s\"}}",
	 "timeouts.drain_seconds: must be a number of seconds"},
	{"{" STATIC ", " IN1 ", \"timeouts\": {\"read_seconds\": 1}}",
	 "timeouts.read_seconds: unknown field"},
	{"{" STATIC ", " IN1 ", \"log\": {\"level\": \"verbose\"}}",
	 "log.level: must be \"debug\", \"info\", \"warn\" or \"error\""},
	{"{" STATIC ", " IN1 ", \"log\": {\"access_log\": \"yes\"}}",
	 "log.access_log: must be true or false"},
};

static void test_errors(void **state)
{
	char buf[600];
	size_t i;

	for (i = 0; i < ARRAY_LEN(bad_cases); i++) {
		struct meshlet_err err = {{0}, {0}};
		struct config *c = (struct config *)1;
		int rc = parse_text(bad_cases[i].json, FILE_NAME, &c, &err);

		if (rc == 0) {
			config_free(c);
			fail_msg("case %zu accepted: %s", i, bad_cases[i].json);
		}
		assert_int_equal(rc, -EINVAL);
		assert_null(c);
		if (strcmp(err_str(&err, buf, sizeof(buf)), bad_cases[i].want) != 0)
			fail_msg("case %zu: got  \"%s\"\n          want \"%s\"", i, buf,
			         bad_cases[i].want);
	}
}

static void test_too_many_listeners(void **state)
{
	struct meshlet_err err = {{0}, {0}};
	struct config *c = NULL;
	json_t *doc = json_pack("{s:s, s:s, s:{s:s}, s:[]}", "service", "orders",
	                        "trust_domain", "mesh.local", "control", "url", "https://c:1",
	                        "inbound");
	json_t *arr = json_object_get(doc, "inbound");
	char listen[32];
	int i;

	assert_non_null(doc);
	for (i = 0; i < CONFIG_MAX_LISTENERS; i++) {
		snprintf(listen, sizeof(listen), "127.0.0.1:%d", 20000 + i);
		assert_int_equal(json_array_append_new(arr, json_pack("{s:s, s:s}", "listen", listen,
		                                                      "forward", "127.0.0.1:80")), 0);
	}
	assert_int_equal(config_parse(doc, NULL, &c, &err), 0);
	assert_int_equal(c->n_inbound, CONFIG_MAX_LISTENERS);
	config_free(c);
	assert_int_equal(json_array_append_new(arr, json_pack("{s:s, s:s}", "listen",
	                 "127.0.0.1:30000", "forward", "127.0.0.1:80")), 0);
	assert_int_equal(config_parse(doc, NULL, &c, &err), -EINVAL);
	assert_string_equal(err.path, "inbound");
	assert_string_equal(err.message, "at most 64 listeners");
	json_decref(doc);
}

static void test_too_many_endpoints(void **state)
{
	struct meshlet_err err = {{0}, {0}};
	struct config *c = NULL;
	json_t *doc = json_pack("{s:s, s:s, s:{s:s}, s:[{s:s, s:s, s:[]}]}", "service", "orders",
	                        "trust_domain", "mesh.local", "control", "url", "https://c:1",
	                        "outbound", "listen", "127.0.0.1:9001", "service", "pay",
	                        "endpoints");
	json_t *arr = json_object_get(json_array_get(json_object_get(doc, "outbound"), 0),
	                              "endpoints");
	char ep[32];
	int i;

	assert_non_null(arr);
	for (i = 0; i < CONFIG_MAX_ENDPOINTS; i++) {
		snprintf(ep, sizeof(ep), "10.0.%d.%d:15006", i / 200, i % 200 + 1);
		assert_int_equal(json_array_append_new(arr, json_string(ep)), 0);
	}
	assert_int_equal(config_parse(doc, NULL, &c, &err), 0);
	assert_int_equal(c->outbound[0].n_endpoints, CONFIG_MAX_ENDPOINTS);
	config_free(c);
	assert_int_equal(json_array_append_new(arr, json_string("10.1.0.1:1")), 0);
	assert_int_equal(config_parse(doc, NULL, &c, &err), -EINVAL);
	assert_string_equal(err.path, "outbound[0].endpoints");
	assert_string_equal(err.message, "at most 256 endpoints");
	json_decref(doc);
}

/* ---- addresses -------------------------------------------------------- */

static void test_parse_addr_ok(void **state)
{
	struct config_addr a;
	const struct sockaddr_in *sin = (const struct sockaddr_in *)&a.ss;
	const char *why = NULL;

	assert_int_equal(config_parse_addr("1.2.3.4:80", &a, &why), 0);
	assert_int_equal(a.ss.ss_family, AF_INET);
	assert_int_equal(a.len, sizeof(struct sockaddr_in));
	assert_int_equal(ntohl(sin->sin_addr.s_addr), 0x01020304);
	assert_int_equal(config_addr_port(&a), 80);
	assert_string_equal(a.text, "1.2.3.4:80");

	assert_int_equal(config_parse_addr("[::1]:65535", &a, &why), 0);
	assert_int_equal(a.ss.ss_family, AF_INET6);
	assert_int_equal(config_addr_port(&a), 65535);
	assert_string_equal(a.text, "[::1]:65535");

	assert_int_equal(config_parse_addr("localhost:8080", &a, &why), 0);
	assert_int_equal(a.ss.ss_family, AF_INET);
	assert_int_equal(ntohl(sin->sin_addr.s_addr), 0x7f000001);
	assert_string_equal(a.text, "localhost:8080");

	assert_int_equal(config_parse_addr("0.0.0.0:1", &a, NULL), 0);
	assert_int_equal(config_parse_addr("[::]:1", &a, NULL), 0);
}

static void test_parse_addr_refused(void **state)
{
	static const struct { const char *text, *why; } cases[] = {
		{"", "empty address"},
		{"1.2.3.4:0", "port must be 1..65535"},
		{"1.2.3.4:65536", "port must be 1..65535"},
		{"1.2.3.4:000080", "port must be 1..65535"},
		{"1.2.3.4:http", "port must be 1..65535"},
		{"1.2.3.4:+80", "port must be 1..65535"},
		{"1.2.3.4:-1", "port must be 1..65535"},
		{"1.2.3.4:", "missing port"},
		{"1.2.3.4", "missing :port"},
		{":80", "missing host"},
		{"[]:80", "missing host"},
		{"[::1]80", "want [ipv6]:port"},
		{"[::1", "want [ipv6]:port"},
		{"[1.2.3.4]:80", "invalid IP address"},
		{"[nothost]:80", "invalid IP address"},
		{"::1:80", "IPv6 addresses need brackets: [::1]:port"},
		{"256.1.1.1:80", "invalid IPv4 address (want a.b.c.d)"},
		{"127.1:80", "invalid IPv4 address (want a.b.c.d)"},
		{"0x7f.0.0.1:80", "invalid IPv4 address (want a.b.c.d)"},
		{"bad_host:80", "invalid host name"},
		{"a..b:80", "invalid host name"},
		{"a b:80", "invalid host name"},
	};
	struct config_addr a;
	const char *why;
	char longaddr[200];
	size_t i;

	for (i = 0; i < ARRAY_LEN(cases); i++) {
		why = NULL;
		if (config_parse_addr(cases[i].text, &a, &why) != -EINVAL)
			fail_msg("accepted \"%s\"", cases[i].text);
		if (!why || strcmp(why, cases[i].why) != 0)
			fail_msg("\"%s\": got \"%s\", want \"%s\"", cases[i].text, why ? why : "(null)",
			         cases[i].why);
	}
	memset(longaddr, 'a', sizeof(longaddr));
	memcpy(longaddr + sizeof(longaddr) - 4, ":80", 4);
	assert_int_equal(config_parse_addr(longaddr, &a, &why), -EINVAL);
	assert_string_equal(why, "address too long");
	assert_int_equal(config_parse_addr(NULL, &a, &why), -EINVAL);
}

/* 0.0.0.0 and 127.0.0.1 have an IPv6 twin ([::], [::1], same port);
 * other addresses, IPv6 ones included, have none. */
static void test_ipv6_twin(void **state)
{
	static const struct { const char *text, *twin; } cases[] = {
		{"0.0.0.0:15006", "[::]:15006"},
		{"127.0.0.1:15001", "[::1]:15001"},
		{"localhost:1", "[::1]:1"},
		{"10.0.0.2:15006", NULL},
		{"127.0.0.2:15001", NULL},
		{"[::]:15006", NULL},
		{"[::1]:15001", NULL},
	};
	struct config_addr a, t, want;
	size_t i;

	for (i = 0; i < ARRAY_LEN(cases); i++) {
		assert_int_equal(config_parse_addr(cases[i].text, &a, NULL), 0);
		if (!cases[i].twin) {
			if (config_addr_ipv6_twin(&a, &t))
				fail_msg("%s: unexpected twin %s", cases[i].text, t.text);
			continue;
		}
		if (!config_addr_ipv6_twin(&a, &t))
			fail_msg("%s: no twin", cases[i].text);
		assert_string_equal(t.text, cases[i].twin);
		assert_int_equal(config_parse_addr(cases[i].twin, &want, NULL), 0);
		assert_int_equal(t.len, want.len);
		assert_memory_equal(&t.ss, &want.ss, want.len);
	}
}

/* ---- loading ---------------------------------------------------------- */

static void test_load(void **state)
{
	struct meshlet_err err = {{0}, {0}};
	char dir[] = "/tmp/meshlet-config-test-XXXXXX", file[128], want[160];
	struct config *c = NULL;
	FILE *f;

	assert_non_null(mkdtemp(dir));
	snprintf(file, sizeof(file), "%s/proxy.json", dir);
	f = fopen(file, "w");
	assert_non_null(f);
	fputs(minimal_static, f);
	fclose(f);
	assert_int_equal(config_load(file, &c, &err), 0);
	snprintf(want, sizeof(want), "%s/svid.pem", dir);
	assert_string_equal(c->tls_cert, want);
	assert_string_equal(c->file, file);
	config_free(c);

	f = fopen(file, "w");
	assert_non_null(f);
	fputs("{\"service\": \"orders\",\n \"service\": \"x\"}", f);
	fclose(f);
	assert_int_equal(config_load(file, &c, &err), -EINVAL);
	assert_null(c);
	assert_non_null(strstr(err.message, "duplicate"));
	assert_non_null(strstr(err.message, "line 2"));

	unlink(file);
	assert_int_equal(config_load(file, &c, &err), -EINVAL);
	assert_non_null(strstr(err.message, "cannot open"));
	rmdir(dir);
	config_free(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_minimal_static_defaults),
		cmocka_unit_test(test_http2_and_app_protocol),
		cmocka_unit_test(test_outbound_pool),
		cmocka_unit_test(test_full_control),
		cmocka_unit_test(test_control_urls),
		cmocka_unit_test(test_full_static_tls),
		cmocka_unit_test(test_relative_paths),
		cmocka_unit_test(test_advertise_wildcard),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_too_many_listeners),
		cmocka_unit_test(test_too_many_endpoints),
		cmocka_unit_test(test_parse_addr_ok),
		cmocka_unit_test(test_parse_addr_refused),
		cmocka_unit_test(test_ipv6_twin),
		cmocka_unit_test(test_load),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
