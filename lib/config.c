/*
 * config: meshlet-proxy's configuration file, validated whole into a
 * struct config before anything is bound or loaded. Defaults are applied
 * here (including those that depend on the machine: workers, advertise) so
 * that the rest of the proxy never has to ask "was this given?".
 */
#include "meshlet/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define DEFAULT_STATE_DIR "/var/lib/meshlet-proxy"
#define DEFAULT_TOKEN_FILE "/run/secrets/meshlet-token"
#define DEFAULT_ADMIN_LISTEN "127.0.0.1:15000"
#define MAX_WORKERS 256

static const char *const top_keys[] = {
	"service", "trust_domain", "state_dir", "control", "tls", "policy_file", "traffic_file",
	"inbound", "outbound", "transparent", "admin", "workers", "max_connections", "timeouts",
	"log", "http2", NULL};
static const char *const control_keys[] = {"url", "urls", "token_file", NULL};
static const char *const tls_keys[] = {"cert", "key", "bundle", "min_version", "groups", NULL};
static const char *const inbound_keys[] = {"listen", "forward", "protocol", "advertise",
	"app_protocol", NULL};
static const char *const outbound_keys[] = {"listen", "service", "protocol", "endpoints", "pool",
	NULL};
static const char *const pool_keys[] = {"max_connections", "max_streams", "idle_seconds", NULL};
static const char *const listen_keys[] = {"listen", NULL};
static const char *const transparent_keys[] = {"listen", "outside_mesh", NULL};
static const char *const timeout_keys[] = {"handshake_seconds", "connect_seconds",
	"idle_seconds", "drain_seconds", "request_head_seconds", "response_head_seconds", NULL};
static const char *const http2_keys[] = {"max_concurrent_streams", "max_header_list_bytes",
	"initial_window_bytes", NULL};
static const char *const log_keys[] = {"level", "access_log", NULL};

/* What every parse step needs: the config being filled, the directory
 * relative file names are taken from, and where errors go. */
struct parse_ctx {
	struct config *c;
	char *dir;                      /* NULL: keep relative names as given */
	struct meshlet_err *err;
};

/* ---- addresses -------------------------------------------------------- */

/* Digits only, 1..65535: getaddrinfo would also take service names. */
static int parse_port(const char *s, const char **why)
{
	long v = 0;
	size_t i;

	if (!*s) {
		*why = "missing port";
		return -EINVAL;
	}
	for (i = 0; s[i]; i++) {
		if (s[i] < '0' || s[i] > '9' || i >= 5) {
			*why = "port must be 1..65535";
			return -EINVAL;
		}
		v = v * 10 + (s[i] - '0');
	}
	if (v < 1 || v > 65535) {
		*why = "port must be 1..65535";
		return -EINVAL;
	}
	return 0;
}

static bool valid_hostname(const char *h)
{
	size_t label = 0, n = 0;

	for (; *h; h++, n++) {
		char ch = *h;

		if (ch == '.') {
			if (label == 0)
				return false;
			label = 0;
			continue;
		}
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '-') || ++label > 63)
			return false;
	}
	return n > 0 && n <= 253;
}

static int resolve(const char *host, const char *port, int flags, int family,
                   struct config_addr *out, const char **why)
{
	struct addrinfo hints = {0}, *res = NULL, *ai, *pick = NULL;
	int rc;

	hints.ai_family = family;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = flags | AI_NUMERICSERV;
	rc = getaddrinfo(host, port, &hints, &res);
	if (rc != 0 || !res) {
		*why = (flags & AI_NUMERICHOST) ? "invalid IP address" : "cannot resolve host name";
		return -EINVAL;
	}
	/* IPv4 first: "localhost" should mean 127.0.0.1, which is what
	 * applications usually listen on and connect to. */
	for (ai = res; ai; ai = ai->ai_next) {
		if (!pick || (ai->ai_family == AF_INET && pick->ai_family != AF_INET))
			pick = ai;
	}
	if (pick->ai_addrlen > sizeof(out->ss)) {
		freeaddrinfo(res);
		*why = "unsupported address";
		return -EINVAL;
	}
	memset(&out->ss, 0, sizeof(out->ss));
	memcpy(&out->ss, pick->ai_addr, pick->ai_addrlen);
	out->len = pick->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

/* An unbracketed host: dotted-quad IPv4 or a host name. Legacy numeric forms
 * ("127.1", "0x7f000001") are refused: they read differently to people and
 * to inet_aton. */
static int resolve_plain(const char *host, const char *port, struct config_addr *out,
                         const char **why)
{
	struct config_addr tmp;
	struct in_addr a4;
	const char *ignored;

	if (strchr(host, ':')) {
		*why = "IPv6 addresses need brackets: [::1]:port";
		return -EINVAL;
	}
	if (inet_pton(AF_INET, host, &a4) == 1)
		return resolve(host, port, AI_NUMERICHOST, AF_INET, out, why);
	if (resolve(host, port, AI_NUMERICHOST, AF_UNSPEC, &tmp, &ignored) == 0 ||
	    strspn(host, "0123456789.") == strlen(host)) {
		*why = "invalid IPv4 address (want a.b.c.d)";
		return -EINVAL;
	}
	if (!valid_hostname(host)) {
		*why = "invalid host name";
		return -EINVAL;
	}
	return resolve(host, port, 0, AF_UNSPEC, out, why);
}

/*
 * "ip:port", "[ipv6]:port" or "host:port" (numeric port 1..65535; host
 * names resolved now, IPv4 preferred). Returns 0 and fills *out (text = as
 * written), or -EINVAL with a static reason in *why (why may be NULL).
 */
int config_parse_addr(const char *text, struct config_addr *out, const char **why)
{
	char buf[sizeof(out->text)];
	char *host, *port, *end;
	const char *dummy;
	struct config_addr a = {0};

	if (!why)
		why = &dummy;
	if (!text || !*text) {
		*why = "empty address";
		return -EINVAL;
	}
	if (strlen(text) >= sizeof(buf)) {
		*why = "address too long";
		return -EINVAL;
	}
	strcpy(buf, text);
	if (buf[0] == '[') {
		host = buf + 1;
		end = strchr(host, ']');
		if (!end || end[1] != ':') {
			*why = "want [ipv6]:port";
			return -EINVAL;
		}
		*end = '\0';
		port = end + 2;
	} else {
		host = buf;
		end = strrchr(buf, ':');
		if (!end) {
			*why = "missing :port";
			return -EINVAL;
		}
		*end = '\0';
		port = end + 1;
	}
	if (!*host) {
		*why = "missing host";
		return -EINVAL;
	}
	if (parse_port(port, why) < 0)
		return -EINVAL;
	if (buf[0] == '[' ? resolve(host, port, AI_NUMERICHOST, AF_INET6, &a, why) < 0
	                  : resolve_plain(host, port, &a, why) < 0)
		return -EINVAL;
	snprintf(a.text, sizeof(a.text), "%s", text);
	*out = a;
	return 0;
}

/* Port of a, host order; 0 for an address that is not IPv4/IPv6. */
uint16_t config_addr_port(const struct config_addr *a)
{
	if (a->ss.ss_family == AF_INET)
		return ntohs(((const struct sockaddr_in *)&a->ss)->sin_port);
	if (a->ss.ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)&a->ss)->sin6_port);
	return 0;
}

static bool addr_is_wildcard(const struct config_addr *a)
{
	if (a->ss.ss_family == AF_INET)
		return ((const struct sockaddr_in *)&a->ss)->sin_addr.s_addr == htonl(INADDR_ANY);
	if (a->ss.ss_family == AF_INET6)
		return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)&a->ss)->sin6_addr);
	return false;
}

static bool addr_same_ip(const struct config_addr *a, const struct config_addr *b)
{
	if (a->ss.ss_family != b->ss.ss_family)
		return false;
	if (a->ss.ss_family == AF_INET)
		return ((const struct sockaddr_in *)&a->ss)->sin_addr.s_addr ==
		       ((const struct sockaddr_in *)&b->ss)->sin_addr.s_addr;
	return memcmp(&((const struct sockaddr_in6 *)&a->ss)->sin6_addr,
	              &((const struct sockaddr_in6 *)&b->ss)->sin6_addr,
	              sizeof(struct in6_addr)) == 0;
}

bool config_addr_ipv6_twin(const struct config_addr *a, struct config_addr *out)
{
	const struct sockaddr_in *sin = (const struct sockaddr_in *)&a->ss;
	struct sockaddr_in6 six = {.sin6_family = AF_INET6};

	if (a->ss.ss_family != AF_INET)
		return false;
	if (sin->sin_addr.s_addr == htonl(INADDR_LOOPBACK))
		six.sin6_addr = in6addr_loopback;
	else if (sin->sin_addr.s_addr != htonl(INADDR_ANY))
		return false;
	six.sin6_port = sin->sin_port;
	memset(out, 0, sizeof(*out));
	memcpy(&out->ss, &six, sizeof(six));
	out->len = sizeof(six);
	snprintf(out->text, sizeof(out->text), "[%s]:%u",
	         IN6_IS_ADDR_LOOPBACK(&six.sin6_addr) ? "::1" : "::",
	         (unsigned)config_addr_port(a));
	return true;
}

enum addr_clash { CLASH_NONE, CLASH_SAME, CLASH_OVERLAP };

/* Two listeners clash on the same port when their addresses are equal, or
 * when one is a wildcard covering the other (with SO_REUSEPORT both binds
 * would succeed and connections would be split between them). [::] is
 * taken to cover IPv4 too (dual-stack, the Linux default). */
static enum addr_clash addr_clash(const struct config_addr *a, const struct config_addr *b)
{
	bool a6any, b6any;

	if (config_addr_port(a) != config_addr_port(b))
		return CLASH_NONE;
	if (addr_same_ip(a, b))
		return CLASH_SAME;
	a6any = a->ss.ss_family == AF_INET6 && addr_is_wildcard(a);
	b6any = b->ss.ss_family == AF_INET6 && addr_is_wildcard(b);
	if (a6any || b6any)
		return CLASH_OVERLAP;
	if (a->ss.ss_family == b->ss.ss_family && (addr_is_wildcard(a) || addr_is_wildcard(b)))
		return CLASH_OVERLAP;
	return CLASH_NONE;
}

/* The listen address, or for a wildcard the first non-loopback IPv4 address
 * of an interface that is up (the listen address when there is none). */
static void default_advertise(const struct config_addr *listen, struct config_addr *out)
{
	struct ifaddrs *ifs = NULL, *i;
	struct sockaddr_in sin;
	char ip[INET_ADDRSTRLEN];

	*out = *listen;
	if (!addr_is_wildcard(listen) || getifaddrs(&ifs) < 0)
		return;
	for (i = ifs; i; i = i->ifa_next) {
		if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET ||
		    (i->ifa_flags & IFF_LOOPBACK) || !(i->ifa_flags & IFF_UP))
			continue;
		memcpy(&sin, i->ifa_addr, sizeof(sin));
		sin.sin_port = htons(config_addr_port(listen));
		if (!inet_ntop(AF_INET, &sin.sin_addr, ip, sizeof(ip)))
			continue;
		memset(out, 0, sizeof(*out));
		memcpy(&out->ss, &sin, sizeof(sin));
		out->len = sizeof(sin);
		snprintf(out->text, sizeof(out->text), "%s:%u", ip,
		         (unsigned)config_addr_port(listen));
		break;
	}
	freeifaddrs(ifs);
}

/* ---- field helpers ---------------------------------------------------- */

/* Reads an address field. Returns 1 when set, 0 when absent, -EINVAL. */
static int get_addr(const json_t *obj, const char *path, const char *key, bool required,
                    struct config_addr *out, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const char *s = NULL, *why = "invalid address";

	if (json_get_str(obj, path, key, required, &s, err) < 0)
		return -EINVAL;
	if (!s)
		return 0;
	if (config_parse_addr(s, out, &why) < 0) {
		json_path_key(p, sizeof(p), path, key);
		return err_set(err, p, "\"%s\": %s", s, why);
	}
	return 1;
}

static int get_nonempty_str(const json_t *obj, const char *path, const char *key,
                            bool required, const char **out, struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];

	if (json_get_str(obj, path, key, required, out, err) < 0)
		return -EINVAL;
	if (*out && !**out) {
		json_path_key(p, sizeof(p), path, key);
		return err_set(err, p, "must not be empty");
	}
	return 0;
}

/* Relative names are taken from the config file's directory. */
static int resolve_file(const struct parse_ctx *x, const char *name, char **out)
{
	size_t n;

	free(*out);
	if (name[0] == '/' || !x->dir) {
		*out = strdup(name);
	} else {
		n = strlen(x->dir) + 1 + strlen(name) + 1;
		*out = malloc(n);
		if (*out)
			snprintf(*out, n, "%s/%s", x->dir, name);
	}
	return *out ? 0 : -ENOMEM;
}

/* A file-name field; *out keeps its default when absent. */
static int get_file(const struct parse_ctx *x, const json_t *obj, const char *path,
                    const char *key, bool required, char **out)
{
	const char *s = NULL;

	if (get_nonempty_str(obj, path, key, required, &s, x->err) < 0)
		return -EINVAL;
	if (!s)
		return 0;
	return resolve_file(x, s, out);
}

static int get_protocol(const json_t *obj, const char *path, enum listener_protocol *out,
                        struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const char *s = NULL;

	*out = PROTO_TCP;
	if (json_get_str(obj, path, "protocol", false, &s, err) < 0)
		return -EINVAL;
	if (!s || strcmp(s, "tcp") == 0)
		return 0;
	if (strcmp(s, "http") == 0) {
		*out = PROTO_HTTP;
		return 0;
	}
	json_path_key(p, sizeof(p), path, "protocol");
	return err_set(err, p, "must be \"tcp\" or \"http\"");
}

static int get_app_protocol(const json_t *obj, const char *path, struct config_inbound *in,
                            struct meshlet_err *err)
{
	static const char *const names[] = {"auto", "http1", "h2c"};
	char p[MESHLET_PATH_MAX];
	const char *s = NULL;

	in->app_protocol = APP_PROTO_AUTO;
	if (json_get_str(obj, path, "app_protocol", false, &s, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "app_protocol");
	if (s && in->protocol != PROTO_HTTP)
		return err_set(err, p, "only for \"protocol\": \"http\" listeners");
	for (size_t i = 0; s && i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i]) == 0) {
			in->app_protocol = (enum app_protocol)i;
			return 0;
		}
	}
	return s ? err_set(err, p, "must be \"auto\", \"http1\" or \"h2c\"") : 0;
}

static int get_service(const json_t *obj, const char *path, char *out, size_t len,
                       struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const char *s = NULL;

	if (json_get_str(obj, path, "service", true, &s, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "service");
	if (!identity_valid_service(s))
		return err_set(err, p, "not a valid service name ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)");
	snprintf(out, len, "%s", s);
	return 0;
}

/* ---- sections --------------------------------------------------------- */

static int parse_identity(const json_t *doc, struct parse_ctx *x)
{
	const char *td = NULL;

	if (get_service(doc, "", x->c->service, sizeof(x->c->service), x->err) < 0)
		return -EINVAL;
	if (json_get_str(doc, "", "trust_domain", true, &td, x->err) < 0)
		return -EINVAL;
	if (!identity_valid_trust_domain(td))
		return err_set(x->err, "trust_domain",
		               "not a valid trust domain (lower-case [a-z0-9._-], at most %d bytes)",
		               TRUST_DOMAIN_MAX);
	snprintf(x->c->trust_domain, sizeof(x->c->trust_domain), "%s", td);
	return 0;
}

/* One control URL: https://host..., no spaces or control characters. */
static int check_control_url(const char *url, const char *path, struct meshlet_err *err)
{
	static const char scheme[] = "https://";

	if (strncmp(url, scheme, sizeof(scheme) - 1) != 0)
		return err_set(err, path, "must start with https://");
	if (!url[sizeof(scheme) - 1] || url[sizeof(scheme) - 1] == '/')
		return err_set(err, path, "missing host after https://");
	for (const char *s = url; *s; s++) {
		if ((unsigned char)*s <= 0x20 || *s == 0x7f)
			return err_set(err, path, "must not contain spaces or control characters");
	}
	return 0;
}

/* "url": one replica, or "urls": [...] several (tried in order, the next
 * one when one fails); exactly one of the two. */
static int parse_control_urls(const json_t *o, struct parse_ctx *x)
{
	const json_t *one = json_object_get(o, "url"), *list = json_object_get(o, "urls");
	struct config *c = x->c;
	char path[48];
	size_t i, n;

	if (!one && !list)
		return err_set(x->err, "control.url", "required");
	if (one && list)
		return err_set(x->err, "control", "give url (one control) or urls (a list of "
		               "control replicas), not both");
	if (one && !json_is_string(one))
		return err_set(x->err, "control.url", "must be a string");
	n = one ? 1 : json_array_size(list);
	if (list && (!json_is_array(list) || n == 0 || n > CONFIG_CONTROL_URLS_MAX))
		return err_set(x->err, "control.urls", "must be a list of 1..%d URLs",
		               CONFIG_CONTROL_URLS_MAX);
	c->control_urls = calloc(n, sizeof(*c->control_urls));
	if (!c->control_urls)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		const json_t *u = one ? one : json_array_get(list, i);

		if (one)
			snprintf(path, sizeof(path), "control.url");
		else
			snprintf(path, sizeof(path), "control.urls[%zu]", i);
		if (!json_is_string(u))
			return err_set(x->err, path, "must be a string");
		if (check_control_url(json_string_value(u), path, x->err) < 0)
			return -EINVAL;
		for (size_t j = 0; j < i; j++)
			if (strcmp(c->control_urls[j], json_string_value(u)) == 0)
				return err_set(x->err, path, "listed twice");
		c->control_urls[i] = strdup(json_string_value(u));
		c->n_control_urls = i + 1;
		if (!c->control_urls[i])
			return -ENOMEM;
	}
	c->control_url = strdup(c->control_urls[0]);
	return c->control_url ? 0 : -ENOMEM;
}

static int parse_control(const json_t *doc, struct parse_ctx *x)
{
	const json_t *o = NULL;
	struct config *c = x->c;
	int r;

	if (json_get_object(doc, "", "control", false, &o, x->err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	if (json_check_object(o, "control", control_keys, x->err) < 0)
		return -EINVAL;
	r = parse_control_urls(o, x);
	if (r)
		return r;
	c->has_control = true;
	c->control_token_file = strdup(DEFAULT_TOKEN_FILE);
	if (!c->control_token_file)
		return -ENOMEM;
	return get_file(x, o, "control", "token_file", false, &c->control_token_file);
}

/* Refuses a group list this OpenSSL does not know, now rather than at the
 * first handshake. */
static int check_groups(const char *groups, struct meshlet_err *err)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_method());
	int ok;

	if (!ctx)
		return -ENOMEM;
	ok = SSL_CTX_set1_groups_list(ctx, groups);
	SSL_CTX_free(ctx);
	ERR_clear_error();
	if (ok != 1)
		return err_set(err, "tls.groups", "\"%s\": unknown TLS group in list", groups);
	return 0;
}

static int parse_tls_version(const json_t *o, struct config *c, struct meshlet_err *err)
{
	const char *v = NULL;

	c->tls_min_version = TLS1_3_VERSION;
	if (json_get_str(o, "tls", "min_version", false, &v, err) < 0)
		return -EINVAL;
	if (!v || strcmp(v, "1.3") == 0)
		return 0;
	if (strcmp(v, "1.2") == 0) {
		c->tls_min_version = TLS1_2_VERSION;
		return 0;
	}
	return err_set(err, "tls.min_version", "must be \"1.2\" or \"1.3\"");
}

static int parse_tls(const json_t *doc, struct parse_ctx *x)
{
	const json_t *o = NULL;
	const char *groups = NULL;
	struct config *c = x->c;
	int rc;

	if (json_get_object(doc, "", "tls", false, &o, x->err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	c->has_tls = true;
	if (json_check_object(o, "tls", tls_keys, x->err) < 0)
		return -EINVAL;
	if ((rc = get_file(x, o, "tls", "cert", true, &c->tls_cert)) < 0 ||
	    (rc = get_file(x, o, "tls", "key", true, &c->tls_key)) < 0 ||
	    (rc = get_file(x, o, "tls", "bundle", true, &c->tls_bundle)) < 0 ||
	    (rc = parse_tls_version(o, c, x->err)) < 0)
		return rc;
	if (get_nonempty_str(o, "tls", "groups", false, &groups, x->err) < 0)
		return -EINVAL;
	if (!groups)
		return 0;
	if ((rc = check_groups(groups, x->err)) < 0)
		return rc;
	c->tls_groups = strdup(groups);
	return c->tls_groups ? 0 : -ENOMEM;
}

/* Exactly one of dynamic (control) and static (tls + policy_file) mode. */
static int check_mode(const struct config *c, struct meshlet_err *err)
{
	bool is_static = c->has_tls || c->policy_file;

	if (c->has_control && is_static)
		return err_set(err, "", "both control and tls/policy_file given: use control "
		               "(dynamic mode) or tls + policy_file (static mode), not both");
	if (!c->has_control && !is_static)
		return err_set(err, "", "no mode: give control (dynamic mode) or tls + policy_file "
		               "(static mode)");
	if (c->has_tls && !c->policy_file)
		return err_set(err, "policy_file", "required with tls");
	if (!c->has_tls && c->policy_file)
		return err_set(err, "tls", "required with policy_file");
	if (c->has_control && c->traffic_file)
		return err_set(err, "traffic_file", "static mode only: with control, traffic "
		               "documents come from control (meshletctl traffic apply)");
	return 0;
}

static int parse_files(const json_t *doc, struct parse_ctx *x)
{
	int rc;

	x->c->state_dir = strdup(DEFAULT_STATE_DIR);
	if (!x->c->state_dir)
		return -ENOMEM;
	if ((rc = get_file(x, doc, "", "state_dir", false, &x->c->state_dir)) < 0 ||
	    (rc = get_file(x, doc, "", "policy_file", false, &x->c->policy_file)) < 0 ||
	    (rc = get_file(x, doc, "", "traffic_file", false, &x->c->traffic_file)) < 0)
		return rc;
	return 0;
}

/* Fetches an optional listener array of at most CONFIG_MAX_LISTENERS. */
static int get_listener_array(const json_t *doc, const char *key, const json_t **arr,
                              struct meshlet_err *err)
{
	*arr = NULL;
	if (json_get_array(doc, "", key, false, arr, err) < 0)
		return -EINVAL;
	if (*arr && json_array_size(*arr) > CONFIG_MAX_LISTENERS)
		return err_set(err, key, "at most %d listeners", CONFIG_MAX_LISTENERS);
	return 0;
}

static int parse_inbound_item(const json_t *o, const char *path, struct config_inbound *in,
                              struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	int rc;

	if (json_check_object(o, path, inbound_keys, err) < 0 ||
	    get_addr(o, path, "listen", true, &in->listen, err) < 0 ||
	    get_addr(o, path, "forward", true, &in->forward, err) < 0 ||
	    get_protocol(o, path, &in->protocol, err) < 0 ||
	    get_app_protocol(o, path, in, err) < 0)
		return -EINVAL;
	rc = get_addr(o, path, "advertise", false, &in->advertise, err);
	if (rc < 0)
		return -EINVAL;
	if (rc == 0) {
		default_advertise(&in->listen, &in->advertise);
		return 0;
	}
	if (addr_is_wildcard(&in->advertise)) {
		json_path_key(p, sizeof(p), path, "advertise");
		return err_set(err, p, "must not be a wildcard address");
	}
	return 0;
}

static int parse_inbound(const json_t *doc, struct parse_ctx *x)
{
	char path[MESHLET_PATH_MAX];
	const json_t *arr, *v;
	size_t i;

	if (get_listener_array(doc, "inbound", &arr, x->err) < 0)
		return -EINVAL;
	if (!arr || json_array_size(arr) == 0)
		return 0;
	x->c->inbound = calloc(json_array_size(arr), sizeof(*x->c->inbound));
	if (!x->c->inbound)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		json_path_index(path, sizeof(path), "inbound", i);
		if (parse_inbound_item(v, path, &x->c->inbound[i], x->err) < 0)
			return -EINVAL;
		x->c->n_inbound = i + 1;
	}
	return 0;
}

static int parse_endpoints(const json_t *o, const char *path, bool is_static,
                           struct config_outbound *out, struct meshlet_err *err)
{
	char apath[MESHLET_PATH_MAX], epath[MESHLET_PATH_MAX];
	const json_t *arr = NULL, *v;
	const char *s, *why = "invalid address";
	size_t i;

	if (json_get_array(o, path, "endpoints", is_static, &arr, err) < 0)
		return -EINVAL;
	if (!arr)
		return 0;
	json_path_key(apath, sizeof(apath), path, "endpoints");
	if (json_array_size(arr) == 0)
		return err_set(err, apath, is_static ? "must not be empty" :
		               "must not be empty (omit it to use control's registry)");
	if (json_array_size(arr) > CONFIG_MAX_ENDPOINTS)
		return err_set(err, apath, "at most %d endpoints", CONFIG_MAX_ENDPOINTS);
	out->endpoints = calloc(json_array_size(arr), sizeof(*out->endpoints));
	if (!out->endpoints)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		json_path_index(epath, sizeof(epath), apath, i);
		if (json_as_str(v, epath, &s, err) < 0)
			return -EINVAL;
		if (config_parse_addr(s, &out->endpoints[i], &why) < 0)
			return err_set(err, epath, "\"%s\": %s", s, why);
		if (addr_is_wildcard(&out->endpoints[i]))
			return err_set(err, epath, "must not be a wildcard address");
		out->n_endpoints = i + 1;
	}
	return 0;
}

/*
 * outbound[].pool: only http listeners pool (a tcp connection is the app's
 * own byte stream). The bounds keep a typo from opening thousands of
 * connections per worker or pinning windows for thousands of streams.
 */
static int get_pool(const json_t *o, const char *path, struct config_outbound *out,
                    struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const json_t *po = NULL;
	long long conns = 4, streams = 100, idle = 90;

	if (json_get_object(o, path, "pool", false, &po, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "pool");
	if (po && out->protocol != PROTO_HTTP)
		return err_set(err, p, "only for \"protocol\": \"http\" listeners");
	if (po && (json_check_object(po, p, pool_keys, err) < 0 ||
	           json_get_int(po, p, "max_connections", false, 1, 64, &conns, err) < 0 ||
	           json_get_int(po, p, "max_streams", false, 1, 1000, &streams, err) < 0 ||
	           json_get_int(po, p, "idle_seconds", false, 1, 86400, &idle, err) < 0))
		return -EINVAL;
	out->pool.max_connections = (uint32_t)conns;
	out->pool.max_streams = (uint32_t)streams;
	out->pool.idle_ms = (uint32_t)idle * 1000;
	return 0;
}

static int parse_outbound_item(const json_t *o, const char *path, bool is_static,
                               struct config_outbound *out, struct meshlet_err *err)
{
	if (json_check_object(o, path, outbound_keys, err) < 0 ||
	    get_addr(o, path, "listen", true, &out->listen, err) < 0 ||
	    get_service(o, path, out->service, sizeof(out->service), err) < 0 ||
	    get_protocol(o, path, &out->protocol, err) < 0 || get_pool(o, path, out, err) < 0)
		return -EINVAL;
	return parse_endpoints(o, path, is_static, out, err);
}

static int parse_outbound(const json_t *doc, struct parse_ctx *x)
{
	char path[MESHLET_PATH_MAX];
	const json_t *arr, *v;
	size_t i;
	int rc;

	if (get_listener_array(doc, "outbound", &arr, x->err) < 0)
		return -EINVAL;
	if (!arr || json_array_size(arr) == 0)
		return 0;
	x->c->outbound = calloc(json_array_size(arr), sizeof(*x->c->outbound));
	if (!x->c->outbound)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		json_path_index(path, sizeof(path), "outbound", i);
		/* Counted first: a half-parsed item may own endpoints. */
		x->c->n_outbound = i + 1;
		rc = parse_outbound_item(v, path, x->c->has_tls, &x->c->outbound[i], x->err);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* transparent.outside_mesh: what to do with a destination no service has. */
static int parse_outside_mesh(const json_t *o, struct parse_ctx *x)
{
	const char *mode = NULL;

	if (json_get_str(o, "transparent", "outside_mesh", false, &mode, x->err) < 0)
		return -EINVAL;
	if (!mode || strcmp(mode, "refuse") == 0)
		x->c->outside_mesh_passthrough = false;
	else if (strcmp(mode, "passthrough") == 0)
		x->c->outside_mesh_passthrough = true;
	else
		return err_set(x->err, "transparent.outside_mesh", "must be \"refuse\" or \"passthrough\"");
	return 0;
}

/* transparent {listen, outside_mesh} and admin {listen}. */
static int parse_single_listeners(const json_t *doc, struct parse_ctx *x)
{
	const json_t *o = NULL;
	const char *why = "invalid address";
	int rc;

	if (json_get_object(doc, "", "transparent", false, &o, x->err) < 0)
		return -EINVAL;
	if (o && (json_check_object(o, "transparent", transparent_keys, x->err) < 0 ||
	          get_addr(o, "transparent", "listen", true, &x->c->transparent_listen,
	                   x->err) < 0))
		return -EINVAL;
	x->c->has_transparent = o != NULL;
	if (o && parse_outside_mesh(o, x) < 0)
		return -EINVAL;

	if (config_parse_addr(DEFAULT_ADMIN_LISTEN, &x->c->admin_listen, &why) < 0)
		return err_set(x->err, "admin.listen", "default: %s", why);
	o = NULL;
	if (json_get_object(doc, "", "admin", false, &o, x->err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	if (json_check_object(o, "admin", listen_keys, x->err) < 0)
		return -EINVAL;
	rc = get_addr(o, "admin", "listen", false, &x->c->admin_listen, x->err);
	return rc < 0 ? rc : 0;
}

static int parse_limits(const json_t *doc, struct parse_ctx *x)
{
	long long workers = 0, maxc = 10000;
	long cpus;

	if (json_get_int(doc, "", "workers", false, 0, MAX_WORKERS, &workers, x->err) < 0 ||
	    json_get_int(doc, "", "max_connections", false, 1, 1000000, &maxc, x->err) < 0)
		return -EINVAL;
	if (workers == 0) {
		cpus = sysconf(_SC_NPROCESSORS_ONLN);
		workers = cpus < 1 ? 1 : cpus > MAX_WORKERS ? MAX_WORKERS : cpus;
	}
	x->c->workers = (int)workers;
	x->c->max_connections = (uint32_t)maxc;
	return 0;
}

static int parse_timeouts(const json_t *doc, struct parse_ctx *x)
{
	struct config_timeouts *t = &x->c->timeouts;
	const json_t *o = NULL;
	struct meshlet_err *err = x->err;

	*t = (struct config_timeouts){10000, 5000, 300000, 30000, 10000, 30000};
	if (json_get_object(doc, "", "timeouts", false, &o, err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	if (json_check_object(o, "timeouts", timeout_keys, err) < 0 ||
	    json_get_seconds(o, "timeouts", "handshake_seconds", 0.1, 3600, &t->handshake_ms,
	                     err) < 0 ||
	    json_get_seconds(o, "timeouts", "connect_seconds", 0.1, 3600, &t->connect_ms,
	                     err) < 0 ||
	    json_get_seconds(o, "timeouts", "idle_seconds", 1, 86400, &t->idle_ms, err) < 0 ||
	    json_get_seconds(o, "timeouts", "drain_seconds", 0, 3600, &t->drain_ms, err) < 0 ||
	    json_get_seconds(o, "timeouts", "request_head_seconds", 0.1, 3600,
	                     &t->request_head_ms, err) < 0 ||
	    json_get_seconds(o, "timeouts", "response_head_seconds", 0.1, 86400,
	                     &t->response_head_ms, err) < 0)
		return -EINVAL;
	return 0;
}

/*
 * The limits are what every HTTP/2 session announces and enforces. The
 * bounds keep a typo from opening a door: a window above 16 MiB or
 * thousands of streams per connection multiply the memory a peer can pin.
 */
static int parse_http2(const json_t *doc, struct parse_ctx *x)
{
	struct config_http2 *h = &x->c->http2;
	const json_t *o = NULL;
	long long streams = 100, hdr = 16384, win = 65535;

	if (json_get_object(doc, "", "http2", false, &o, x->err) < 0)
		return -EINVAL;
	if (o && (json_check_object(o, "http2", http2_keys, x->err) < 0 ||
	          json_get_int(o, "http2", "max_concurrent_streams", false, 1, 1000, &streams,
	                       x->err) < 0 ||
	          json_get_int(o, "http2", "max_header_list_bytes", false, 1024, 262144, &hdr,
	                       x->err) < 0 ||
	          json_get_int(o, "http2", "initial_window_bytes", false, 1024, 16777216, &win,
	                       x->err) < 0))
		return -EINVAL;
	h->max_concurrent_streams = (uint32_t)streams;
	h->max_header_list_bytes = (uint32_t)hdr;
	h->initial_window_bytes = (uint32_t)win;
	return 0;
}

static int parse_log(const json_t *doc, struct parse_ctx *x)
{
	static const char *const levels[] = {"debug", "info", "warn", "error"};
	const json_t *o = NULL;
	const char *level = NULL;
	size_t i;

	x->c->log_level = CONFIG_LOG_INFO;
	x->c->access_log = true;
	if (json_get_object(doc, "", "log", false, &o, x->err) < 0)
		return -EINVAL;
	if (!o)
		return 0;
	if (json_check_object(o, "log", log_keys, x->err) < 0 ||
	    json_get_str(o, "log", "level", false, &level, x->err) < 0 ||
	    json_get_bool(o, "log", "access_log", false, &x->c->access_log, x->err) < 0)
		return -EINVAL;
	if (!level)
		return 0;
	for (i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
		if (strcmp(level, levels[i]) == 0) {
			x->c->log_level = (enum config_log_level)i;
			return 0;
		}
	}
	return err_set(x->err, "log.level", "must be \"debug\", \"info\", \"warn\" or \"error\"");
}

/* ---- whole-config checks ---------------------------------------------- */

struct listen_ref {
	const struct config_addr *addr;
	char path[48];
	bool has_twin;                  /* inbound, transparent: see config_addr_ipv6_twin */
};

/* All listen addresses in document order: inbound, outbound, transparent,
 * admin. refs holds 2 * CONFIG_MAX_LISTENERS + 2 entries. The listeners
 * iptables redirects to also listen on their IPv6 twin. */
static size_t collect_listeners(const struct config *c, struct listen_ref *refs)
{
	size_t i, n = 0;

	for (i = 0; i < c->n_inbound; i++, n++) {
		refs[n].addr = &c->inbound[i].listen;
		snprintf(refs[n].path, sizeof(refs[n].path), "inbound[%zu].listen", i);
		refs[n].has_twin = true;
	}
	for (i = 0; i < c->n_outbound; i++, n++) {
		refs[n].addr = &c->outbound[i].listen;
		snprintf(refs[n].path, sizeof(refs[n].path), "outbound[%zu].listen", i);
		refs[n].has_twin = false;
	}
	if (c->has_transparent) {
		refs[n].addr = &c->transparent_listen;
		snprintf(refs[n].path, sizeof(refs[n].path), "transparent.listen");
		refs[n].has_twin = true;
		n++;
	}
	refs[n].addr = &c->admin_listen;
	snprintf(refs[n].path, sizeof(refs[n].path), "admin.listen");
	refs[n].has_twin = false;
	return n + 1;
}

/* Another listener must not take the IPv6 side of b either. */
static int check_twin_clash(const struct listen_ref *a, const struct listen_ref *b,
                            struct meshlet_err *err)
{
	struct config_addr twin;

	if (!b->has_twin || !config_addr_ipv6_twin(b->addr, &twin) ||
	    addr_clash(a->addr, &twin) == CLASH_NONE)
		return 0;
	return err_set(err, a->path, "%s overlaps %s, where %s also listens for IPv6",
	               a->addr->text, twin.text, b->path);
}

static int check_listen_dups(const struct config *c, struct meshlet_err *err)
{
	struct listen_ref refs[2 * CONFIG_MAX_LISTENERS + 2];
	size_t n = collect_listeners(c, refs), i, j;

	for (i = 1; i < n; i++) {
		for (j = 0; j < i; j++) {
			switch (addr_clash(refs[i].addr, refs[j].addr)) {
			case CLASH_SAME:
				return err_set(err, refs[i].path, "%s is already used by %s",
				               refs[i].addr->text, refs[j].path);
			case CLASH_OVERLAP:
				return err_set(err, refs[i].path, "%s overlaps %s of %s",
				               refs[i].addr->text, refs[j].addr->text, refs[j].path);
			case CLASH_NONE:
				break;
			}
			if (check_twin_clash(&refs[i], &refs[j], err) < 0 ||
			    check_twin_clash(&refs[j], &refs[i], err) < 0)
				return -EINVAL;
		}
	}
	return 0;
}

static int parse_all(const json_t *doc, struct parse_ctx *x)
{
	int rc;

	if (json_check_object(doc, "", top_keys, x->err) < 0)
		return -EINVAL;
	if ((rc = parse_identity(doc, x)) < 0 || (rc = parse_files(doc, x)) < 0 ||
	    (rc = parse_control(doc, x)) < 0 || (rc = parse_tls(doc, x)) < 0 ||
	    (rc = check_mode(x->c, x->err)) < 0 || (rc = parse_inbound(doc, x)) < 0 ||
	    (rc = parse_outbound(doc, x)) < 0 || (rc = parse_single_listeners(doc, x)) < 0 ||
	    (rc = parse_limits(doc, x)) < 0 || (rc = parse_timeouts(doc, x)) < 0 ||
	    (rc = parse_http2(doc, x)) < 0 || (rc = parse_log(doc, x)) < 0)
		return rc;
	if (x->c->n_inbound == 0 && x->c->n_outbound == 0 && !x->c->has_transparent)
		return err_set(x->err, "", "nothing to serve: give inbound, outbound or transparent");
	return check_listen_dups(x->c, x->err);
}

/* The directory part of file, or NULL when it has none ("proxy.json"). */
static int file_dir(const char *file, char **out)
{
	const char *slash = file ? strrchr(file, '/') : NULL;

	*out = NULL;
	if (!slash)
		return 0;
	*out = slash == file ? strdup("") : strndup(file, (size_t)(slash - file));
	return *out ? 0 : -ENOMEM;
}

/*
 * Validates doc into a new config; file (may be NULL) is the file doc came
 * from: relative file names are resolved against its directory. Returns 0
 * and *out (free with config_free), -EINVAL with err naming the JSON path,
 * or -ENOMEM ("out of memory" in err).
 */
int config_parse(const json_t *doc, const char *file, struct config **out,
                 struct meshlet_err *err)
{
	struct parse_ctx x = {calloc(1, sizeof(struct config)), NULL, err};
	int rc = -ENOMEM;

	*out = NULL;
	if (!x.c || file_dir(file, &x.dir) < 0)
		goto fail;
	if (file && !(x.c->file = strdup(file)))
		goto fail;
	rc = parse_all(doc, &x);
	if (rc < 0)
		goto fail;
	free(x.dir);
	*out = x.c;
	return 0;
fail:
	if (rc == -ENOMEM)
		err_set(err, "", "out of memory");
	free(x.dir);
	config_free(x.c);
	return rc;
}

/* Reads file (at most CONFIG_MAX_FILE bytes, nesting at most 32) and
 * config_parse()s it. Returns as config_parse. */
int config_load(const char *file, struct config **out, struct meshlet_err *err)
{
	json_t *doc;
	int rc;

	*out = NULL;
	doc = json_load_strict(file, CONFIG_MAX_FILE, MESHLET_JSON_MAX_DEPTH, err);
	if (!doc)
		return -EINVAL;
	rc = config_parse(doc, file, out, err);
	json_decref(doc);
	return rc;
}

/* Frees c and everything it owns; c may be NULL. */
void config_free(struct config *c)
{
	size_t i;

	if (!c)
		return;
	free(c->file);
	free(c->state_dir);
	free(c->control_url);
	for (size_t u = 0; u < c->n_control_urls; u++)
		free(c->control_urls[u]);
	free(c->control_urls);
	free(c->control_token_file);
	free(c->tls_cert);
	free(c->tls_key);
	free(c->tls_bundle);
	free(c->tls_groups);
	free(c->policy_file);
	free(c->traffic_file);
	free(c->inbound);
	for (i = 0; i < c->n_outbound; i++)
		free(c->outbound[i].endpoints);
	free(c->outbound);
	free(c);
}
