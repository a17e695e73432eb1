/*
 * policy: parsing of the policy document (docs/design.md, "The policy document") into
 * an immutable struct policy, and the one evaluator used for L4
 * connections, HTTP requests and control's dry run.
 *
 * Parsing is strict: everything the evaluator compares byte for byte (IDs,
 * methods, paths, header values) must already be in the exact form requests
 * arrive in, so a rule that could never match is refused at load rather than
 * silently ignored at run time.
 */
#include "meshlet/policy.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "meshlet/identity.h"

static const char *const policy_keys[] = {"service", "default", "rules", NULL};
static const char *const rule_keys[] = {"name", "action", "from", "ports", "methods",
                                        "paths", "headers", NULL};

/* ---- small helpers ---------------------------------------------------- */

static struct policy *fail_nomem(struct meshlet_err *err)
{
	err_set(err, "", "out of memory");
	return NULL;
}

static bool is_alnum(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* RFC 7230 tchar: methods and header names are tokens. */
static bool is_tchar(unsigned char c)
{
	return is_alnum(c) || (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static bool is_token(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++) {
		if (!is_tchar((unsigned char)*s))
			return false;
	}
	return true;
}

bool policy_valid_rule_name(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > POLICY_RULE_NAME_MAX)
		return false;
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (!is_alnum(c) && c != '.' && c != '_' && c != '-')
			return false;
	}
	return true;
}

static int parse_action(const char *s, const char *path, enum policy_action *out,
                        struct meshlet_err *err)
{
	if (strcmp(s, "allow") == 0)
		*out = POLICY_ALLOW;
	else if (strcmp(s, "deny") == 0)
		*out = POLICY_DENY;
	else
		return err_set(err, path, "must be \"allow\" or \"deny\"");
	return 0;
}

/* Fetches the optional array field key of rule as a non-empty array; *arr is
 * NULL when the field is omitted (= any). */
static int get_nonempty_array(const json_t *rule, const char *path, const char *key,
                              const json_t **arr, char *apath, size_t apath_len,
                              struct meshlet_err *err)
{
	*arr = NULL;
	if (json_get_array(rule, path, key, false, arr, err) < 0)
		return -EINVAL;
	json_path_key(apath, apath_len, path, key);
	if (*arr && json_array_size(*arr) == 0)
		return err_set(err, apath, "must not be empty");
	return 0;
}

/* ---- from ------------------------------------------------------------- */

/* "spiffe://<td>" (no path), so that "spiffe://<td>/" + "*" names a whole
 * trust domain. Reads s[0..n) only. */
static bool is_td_uri(const char *s, size_t n)
{
	static const char scheme[] = "spiffe://";
	const size_t sl = sizeof(scheme) - 1;
	char td[TRUST_DOMAIN_MAX + 1];

	if (n <= sl || n - sl > TRUST_DOMAIN_MAX || memcmp(s, scheme, sl) != 0)
		return false;
	memcpy(td, s + sl, n - sl);
	td[n - sl] = '\0';
	return identity_valid_trust_domain(td);
}

/* Parses one element v (at epath) of a rule's list into item. */
typedef int (*list_entry_fn)(const json_t *v, const char *epath, void *item,
                             struct meshlet_err *err);

/*
 * The shape every list field of a rule shares: absent = any, else a
 * non-empty array whose elements entry() parses into a new array of
 * elem_size items (*items, *n; freed by policy_free even when half done).
 */
static int parse_list(const json_t *rule, const char *path, const char *key, size_t elem_size,
                      void **items, size_t *n, list_entry_fn entry, struct meshlet_err *err)
{
	char apath[MESHLET_PATH_MAX], epath[MESHLET_PATH_MAX];
	const json_t *arr, *v;
	size_t i;
	int rc;

	if (get_nonempty_array(rule, path, key, &arr, apath, sizeof(apath), err) < 0)
		return -EINVAL;
	if (!arr)
		return 0;
	*items = calloc(json_array_size(arr), elem_size);
	if (!*items)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		json_path_index(epath, sizeof(epath), apath, i);
		rc = entry(v, epath, (char *)*items + i * elem_size, err);
		if (rc < 0)
			return rc;
		*n = i + 1;
	}
	return 0;
}

static int parse_from_entry(const char *s, const char *path, struct policy_from *f,
                            struct meshlet_err *err)
{
	struct spiffe_id id;
	const char *why = NULL;
	size_t n = strlen(s);

	if (strcmp(s, "*") == 0) {
		f->kind = FROM_ANY;
		f->id = NULL;
		f->len = 0;
		return 0;
	}
	if (n >= 2 && strcmp(s + n - 2, "/*") == 0) {
		/* Prefix: what precedes the final "/" "*" is a trust domain
		 * URI or an ID. */
		if (!is_td_uri(s, n - 2) && identity_parse(s, n - 2, &id, &why) < 0)
			return err_set(err, path, "not a SPIFFE ID prefix: %s", why);
		f->kind = FROM_PREFIX;
		f->len = n - 1;         /* keep the final '/' */
	} else {
		if (identity_parse(s, n, &id, &why) < 0)
			return err_set(err, path, "not a SPIFFE ID, prefix (.../*) or \"*\": %s",
			               why);
		f->kind = FROM_EXACT;
		f->len = n;
	}
	f->id = strndup(s, f->len);
	if (!f->id)
		return -ENOMEM;
	return 0;
}

static int from_entry(const json_t *v, const char *epath, void *item, struct meshlet_err *err)
{
	const char *str;

	if (json_as_str(v, epath, &str, err) < 0)
		return -EINVAL;
	return parse_from_entry(str, epath, item, err);
}

static int parse_from(const json_t *rule, const char *path, struct policy_rule *r,
                      struct meshlet_err *err)
{
	return parse_list(rule, path, "from", sizeof(*r->from), (void **)&r->from, &r->n_from,
	                  from_entry, err);
}

/* ---- ports, methods --------------------------------------------------- */

static int port_entry(const json_t *v, const char *epath, void *item, struct meshlet_err *err)
{
	long long port;

	if (json_as_int(v, epath, 1, 65535, &port, err) < 0)
		return -EINVAL;
	*(uint16_t *)item = (uint16_t)port;
	return 0;
}

static int parse_ports(const json_t *rule, const char *path, struct policy_rule *r,
                       struct meshlet_err *err)
{
	return parse_list(rule, path, "ports", sizeof(*r->ports), (void **)&r->ports, &r->n_ports,
	                  port_entry, err);
}

static int method_entry(const json_t *v, const char *epath, void *item, struct meshlet_err *err)
{
	const char *str;

	if (json_as_str(v, epath, &str, err) < 0)
		return -EINVAL;
	/* Methods are case-sensitive (RFC 7231 4.1): "get" is not GET. */
	if (!is_token(str))
		return err_set(err, epath, "not a valid HTTP method (RFC 7230 token)");
	*(char **)item = strdup(str);
	return *(char **)item ? 0 : -ENOMEM;
}

static int parse_methods(const json_t *rule, const char *path, struct policy_rule *r,
                         struct meshlet_err *err)
{
	return parse_list(rule, path, "methods", sizeof(*r->methods), (void **)&r->methods,
	                  &r->n_methods, method_entry, err);
}

/* ---- paths ------------------------------------------------------------ */

/* Why p (without any trailing '*' of a prefix, so it may end in '/') is not in the form
 * the proxy's normaliser produces, or NULL. */
static const char *path_problem(const char *p, size_t n)
{
	size_t i, seg = 1;

	if (n == 0 || p[0] != '/')
		return "must start with '/'";
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)p[i];

		if (c == '%')
			return "must not contain '%' (write the decoded path)";
		if (c == '\\' || c == '?' || c == '#')
			return "must not contain '\\', '?' or '#'";
		if (c < 0x21 || c == 0x7f)
			return "must not contain spaces or control characters";
		if (c == '*')
			return "'*' is only allowed as a final \"/*\"";
	}
	/* Segments: no empty one (but a trailing '/' is fine), no "." or "..". */
	for (i = 1; i <= n; i++) {
		if (i < n && p[i] != '/')
			continue;
		if (i == seg && i < n)
			return "must not contain \"//\" (paths are matched normalised)";
		if ((i - seg == 1 && p[seg] == '.') ||
		    (i - seg == 2 && p[seg] == '.' && p[seg + 1] == '.'))
			return "must not contain \".\" or \"..\" segments (paths are matched normalised)";
		seg = i + 1;
	}
	return NULL;
}

static int parse_path_entry(const char *s, const char *path, struct policy_path *pp,
                            struct meshlet_err *err)
{
	size_t n = strlen(s);
	const char *why;

	pp->prefix = n >= 2 && strcmp(s + n - 2, "/*") == 0;
	pp->len = pp->prefix ? n - 1 : n;
	why = path_problem(s, pp->len);
	if (why)
		return err_set(err, path, "%s", why);
	pp->path = strndup(s, pp->len);
	if (!pp->path)
		return -ENOMEM;
	return 0;
}

static int path_entry(const json_t *v, const char *epath, void *item, struct meshlet_err *err)
{
	const char *str;

	if (json_as_str(v, epath, &str, err) < 0)
		return -EINVAL;
	return parse_path_entry(str, epath, item, err);
}

static int parse_paths(const json_t *rule, const char *path, struct policy_rule *r,
                       struct meshlet_err *err)
{
	return parse_list(rule, path, "paths", sizeof(*r->paths), (void **)&r->paths, &r->n_paths,
	                  path_entry, err);
}

/* ---- headers ---------------------------------------------------------- */

static bool valid_header_value(const char *v)
{
	for (; *v; v++) {
		unsigned char c = (unsigned char)*v;

		/* CR, LF and the other controls cannot occur in a received
		 * field value (RFC 7230 field-vchar), so such a rule could
		 * never match; HTAB can. */
		if ((c < 0x20 && c != '\t') || c == 0x7f)
			return false;
	}
	return true;
}

/* Hop-by-hop fields the proxy removes, and the one it sets itself. */
static bool not_forwarded_header(const char *name)
{
	static const char *const names[] = { "connection", "keep-alive", "proxy-connection",
		                             "x-forwarded-client-cert" };

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcasecmp(name, names[i]) == 0)
			return true;
	return false;
}

static int add_header(struct policy_rule *r, const char *name, const char *value,
                      const char *hpath, struct meshlet_err *err)
{
	struct policy_header *h = &r->headers[r->n_headers];
	size_t i;

	if (!is_token(name))
		return err_set(err, hpath, "not a valid header name (RFC 7230 token)");
	if (!valid_header_value(value))
		return err_set(err, hpath, "must not contain CR, LF or other control characters");
	/*
	 * The proxy decides on the head as the app receives it: '_' spellings
	 * of a policy header are refused on the wire (apps disagree on whether
	 * x_a is X-A), and these fields never reach the app as the caller sent them.
	 */
	if (strchr(name, '_'))
		return err_set(err, hpath, "'_' in a header name: spell it with '-' (requests "
		               "spelling a policy header with '_' are refused)");
	if (not_forwarded_header(name))
		return err_set(err, hpath, "the proxy does not forward this header as received");
	h->name = strdup(name);
	h->value = strdup(value);
	if (!h->name || !h->value) {
		free(h->name);
		free(h->value);
		return -ENOMEM;
	}
	for (i = 0; h->name[i]; i++)
		h->name[i] = (char)tolower((unsigned char)h->name[i]);
	r->n_headers++;
	/* Names are case-insensitive: "X-A" and "x-a" are the same header. */
	for (i = 0; i + 1 < r->n_headers; i++) {
		if (strcmp(r->headers[i].name, h->name) == 0)
			return err_set(err, hpath, "duplicate header name (names are case-insensitive)");
	}
	return 0;
}

static int parse_headers(const json_t *rule, const char *path, struct policy_rule *r,
                         struct meshlet_err *err)
{
	char opath[MESHLET_PATH_MAX], hpath[MESHLET_PATH_MAX];
	const json_t *obj = NULL;
	const char *name, *value;
	json_t *v;
	int rc;

	if (json_get_object(rule, path, "headers", false, &obj, err) < 0)
		return -EINVAL;
	if (!obj)
		return 0;
	json_path_key(opath, sizeof(opath), path, "headers");
	if (json_object_size(obj) == 0)
		return err_set(err, opath, "must not be empty");
	r->headers = calloc(json_object_size(obj), sizeof(*r->headers));
	if (!r->headers)
		return -ENOMEM;
	json_object_foreach((json_t *)obj, name, v) {
		json_path_key(hpath, sizeof(hpath), opath, name);
		if (json_as_str(v, hpath, &value, err) < 0)
			return -EINVAL;
		rc = add_header(r, name, value, hpath, err);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* ---- rules ------------------------------------------------------------ */

static int parse_rule(const json_t *rule, const char *path, struct policy_rule *r,
                      struct meshlet_err *err)
{
	char p[MESHLET_PATH_MAX];
	const char *name = NULL, *action = NULL;
	int rc;

	if (json_check_object(rule, path, rule_keys, err) < 0)
		return -EINVAL;
	if (json_get_str(rule, path, "name", true, &name, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "name");
	if (!policy_valid_rule_name(name))
		return err_set(err, p, "must be 1..%d characters of [A-Za-z0-9._-]",
		               POLICY_RULE_NAME_MAX);
	r->name = strdup(name);
	if (!r->name)
		return -ENOMEM;
	if (json_get_str(rule, path, "action", true, &action, err) < 0)
		return -EINVAL;
	json_path_key(p, sizeof(p), path, "action");
	if (parse_action(action, p, &r->action, err) < 0)
		return -EINVAL;
	if ((rc = parse_from(rule, path, r, err)) < 0 ||
	    (rc = parse_ports(rule, path, r, err)) < 0 ||
	    (rc = parse_methods(rule, path, r, err)) < 0 ||
	    (rc = parse_paths(rule, path, r, err)) < 0 ||
	    (rc = parse_headers(rule, path, r, err)) < 0)
		return rc;
	r->names_http = r->n_methods || r->n_paths || r->n_headers;
	return 0;
}

struct name_ref {
	const char *name;
	size_t index;
};

static int name_ref_cmp(const void *a, const void *b)
{
	const struct name_ref *x = a, *y = b;
	int c = strcmp(x->name, y->name);

	if (c)
		return c;
	return x->index < y->index ? -1 : x->index > y->index;
}

/* Refuses duplicate rule names, naming the first rule (in document order)
 * whose name was already used. Sorting keeps this O(n log n) at 4096 rules. */
static int check_unique_names(const struct policy *p, struct meshlet_err *err)
{
	char path[MESHLET_PATH_MAX], npath[MESHLET_PATH_MAX];
	struct name_ref *refs;
	size_t i, dup = SIZE_MAX;

	if (p->n_rules < 2)
		return 0;
	refs = calloc(p->n_rules, sizeof(*refs));
	if (!refs)
		return -ENOMEM;
	for (i = 0; i < p->n_rules; i++)
		refs[i] = (struct name_ref){p->rules[i].name, i};
	qsort(refs, p->n_rules, sizeof(*refs), name_ref_cmp);
	for (i = 1; i < p->n_rules; i++) {
		if (strcmp(refs[i - 1].name, refs[i].name) == 0 && refs[i].index < dup)
			dup = refs[i].index;
	}
	free(refs);
	if (dup == SIZE_MAX)
		return 0;
	json_path_index(path, sizeof(path), "rules", dup);
	json_path_key(npath, sizeof(npath), path, "name");
	return err_set(err, npath, "duplicate rule name \"%s\"", p->rules[dup].name);
}

static int parse_rules(const json_t *doc, struct policy *p, struct meshlet_err *err)
{
	char path[MESHLET_PATH_MAX];
	const json_t *arr = NULL, *v;
	size_t i;
	int rc;

	if (json_get_array(doc, "", "rules", false, &arr, err) < 0)
		return -EINVAL;
	if (!arr || json_array_size(arr) == 0)
		return 0;
	if (json_array_size(arr) > POLICY_MAX_RULES)
		return err_set(err, "rules", "at most %d rules", POLICY_MAX_RULES);
	p->rules = calloc(json_array_size(arr), sizeof(*p->rules));
	if (!p->rules)
		return -ENOMEM;
	json_array_foreach(arr, i, v) {
		json_path_index(path, sizeof(path), "rules", i);
		/* Counted before parsing so that policy_free() sees a partial rule. */
		p->n_rules = i + 1;
		rc = parse_rule(v, path, &p->rules[i], err);
		if (rc < 0)
			return rc;
	}
	return check_unique_names(p, err);
}

static int parse_top(const json_t *doc, struct policy *p, struct meshlet_err *err)
{
	const char *service = NULL, *def = NULL;

	if (json_check_object(doc, "", policy_keys, err) < 0)
		return -EINVAL;
	if (json_get_str(doc, "", "service", true, &service, err) < 0)
		return -EINVAL;
	if (!identity_valid_service(service))
		return err_set(err, "service",
		               "not a valid service name ([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)");
	p->service = strdup(service);
	if (!p->service)
		return -ENOMEM;
	p->default_action = POLICY_DENY;
	if (json_get_str(doc, "", "default", false, &def, err) < 0)
		return -EINVAL;
	if (def && parse_action(def, "default", &p->default_action, err) < 0)
		return -EINVAL;
	return parse_rules(doc, p, err);
}

/*
 * Validates and compiles doc. Returns a new policy (free with policy_free)
 * or NULL with err set ("out of memory" on allocation failure).
 */
struct policy *policy_parse(const json_t *doc, struct meshlet_err *err)
{
	struct policy *p = calloc(1, sizeof(*p));
	int rc;

	if (!p)
		return fail_nomem(err);
	rc = parse_top(doc, p, err);
	if (rc == -ENOMEM)
		goto nomem;
	if (rc < 0)
		goto fail;
	return p;
nomem:
	policy_free(p);
	return fail_nomem(err);
fail:
	policy_free(p);
	return NULL;
}

/* json_load_strict (at most POLICY_MAX_FILE bytes) + policy_parse. Returns a
 * new policy or NULL with err set. */
struct policy *policy_load(const char *file, struct meshlet_err *err)
{
	struct policy *p;
	json_t *doc;

	doc = json_load_strict(file, POLICY_MAX_FILE, MESHLET_JSON_MAX_DEPTH, err);
	if (!doc)
		return NULL;
	p = policy_parse(doc, err);
	json_decref(doc);
	return p;
}

static void rule_free(struct policy_rule *r)
{
	size_t i;

	free(r->name);
	for (i = 0; i < r->n_from; i++)
		free(r->from[i].id);
	free(r->from);
	free(r->ports);
	for (i = 0; i < r->n_methods; i++)
		free(r->methods[i]);
	free(r->methods);
	for (i = 0; i < r->n_paths; i++)
		free(r->paths[i].path);
	free(r->paths);
	for (i = 0; i < r->n_headers; i++) {
		free(r->headers[i].name);
		free(r->headers[i].value);
	}
	free(r->headers);
}

/* Frees p and everything it owns; p may be NULL. */
void policy_free(struct policy *p)
{
	size_t i;

	if (!p)
		return;
	for (i = 0; i < p->n_rules; i++)
		rule_free(&p->rules[i]);
	free(p->rules);
	free(p->service);
	free(p);
}

/* ---- evaluation ------------------------------------------------------- */

static bool match_from(const struct policy_rule *r, const char *peer)
{
	size_t i;

	if (r->n_from == 0)
		return true;
	/* An unauthenticated caller is no one: not even "*" names it. */
	if (!peer)
		return false;
	for (i = 0; i < r->n_from; i++) {
		const struct policy_from *f = &r->from[i];

		if (f->kind == FROM_ANY)
			return true;
		if (f->kind == FROM_EXACT && strcmp(peer, f->id) == 0)
			return true;
		if (f->kind == FROM_PREFIX && strncmp(peer, f->id, f->len) == 0)
			return true;
	}
	return false;
}

static bool match_port(const struct policy_rule *r, uint16_t port)
{
	size_t i;

	if (r->n_ports == 0)
		return true;
	for (i = 0; i < r->n_ports; i++) {
		if (r->ports[i] == port)
			return true;
	}
	return false;
}

/*
 * CONNECT opens a tunnel whose bytes the proxy no longer reads: no later
 * request in it is decided, no path is ever seen, and a forged
 * x-forwarded-client-cert would reach the app untouched. So only a rule
 * that names CONNECT in its methods can allow one, and a deny rule that
 * names paths still refuses it (fail closed, as HTTP fields on a tcp port).
 */
static bool is_connect(const char *method)
{
	return method && strcmp(method, "CONNECT") == 0;
}

static bool match_method(const struct policy_rule *r, const char *method)
{
	size_t i;

	if (r->n_methods == 0)
		return r->action == POLICY_DENY || !is_connect(method);
	if (!method)
		return false;
	for (i = 0; i < r->n_methods; i++) {
		if (strcmp(r->methods[i], method) == 0)
			return true;
	}
	return false;
}

static bool match_path(const struct policy_rule *r, const char *path)
{
	size_t i;

	if (r->n_paths == 0)
		return true;
	for (i = 0; i < r->n_paths; i++) {
		const struct policy_path *pp = &r->paths[i];

		if (pp->prefix && pp->len == 1)
			return true;        /* "/" "*": any path */
		if (!path)
			continue;
		if (pp->prefix ? strncmp(path, pp->path, pp->len) == 0 : strcmp(path, pp->path) == 0)
			return true;
	}
	return false;
}

static bool match_headers(const struct policy_rule *r, const struct policy_request *req)
{
	size_t i;
	const char *v;

	for (i = 0; i < r->n_headers; i++) {
		if (!req->header)
			return false;
		v = req->header(req->header_ctx, r->headers[i].name);
		if (!v || strcmp(v, r->headers[i].value) != 0)
			return false;
	}
	return true;
}

static bool rule_matches(const struct policy_rule *r, const struct policy_request *req)
{
	if (!match_from(r, req->peer_id) || !match_port(r, req->port))
		return false;
	if (!req->http && r->names_http) {
		/* HTTP fields cannot be checked on a tcp port: fail closed. An
		 * allow rule cannot be satisfied, a deny rule still applies. */
		return r->action == POLICY_DENY;
	}
	if (!req->http)
		return true;
	if (is_connect(req->method) && r->n_paths > 0)
		return r->action == POLICY_DENY && match_method(r, req->method) &&
		       match_headers(r, req);
	return match_method(r, req->method) && match_path(r, req->path) &&
	       match_headers(r, req);
}

/* Decides req under p: the first matching deny rule, else the first
 * matching allow rule, else the default. Never fails; only reads. */
struct policy_decision policy_eval(const struct policy *p, const struct policy_request *req)
{
	struct policy_decision d = {p->default_action, NULL, 0};
	bool have_allow = false;
	size_t i;

	for (i = 0; i < p->n_rules; i++) {
		const struct policy_rule *r = &p->rules[i];

		if (!rule_matches(r, req))
			continue;
		if (r->action == POLICY_DENY)
			return (struct policy_decision){POLICY_DENY, r, i};
		if (!have_allow) {
			d = (struct policy_decision){POLICY_ALLOW, r, i};
			have_allow = true;
		}
	}
	return d;
}

/* Name of the deciding rule, or "default". */
const char *policy_decision_rule(const struct policy_decision *d)
{
	return d->rule ? d->rule->name : "default";
}

/* "allow" or "deny". */
const char *policy_action_str(enum policy_action a)
{
	return a == POLICY_ALLOW ? "allow" : "deny";
}
