/* meshletctl policy apply|get|delete|list and check, and the apply and
 * delete every versioned document shares (see ctl.h). */
#include "ctl.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- policy */

static const char *const policy_list_cols[] = { "service", "version", NULL };

static const struct ctl_doc_kind policy_doc = {
	.noun = "policy", .api_prefix = "/v1/policies/",
	.service_is = "the service the policy protects",
};

/* The document of FILE, its service named: *doc and the text sent. */
static int doc_read(struct ctl *ctl, const struct ctl_doc_kind *k, const char *file, char **text,
                    size_t *len, json_t **doc)
{
	json_error_t jerr;
	json_t *svc;

	*text = ctl_read_file(file, CTL_POLICY_FILE_MAX, len);
	if (!*text)
		return ctl_usage_error(ctl, "cannot read %s file %s: %s", k->noun,
		                       strcmp(file, "-") ? file : "(stdin)",
		                       errno == EFBIG ? "larger than 16 MiB" : strerror(errno));
	*doc = json_loadb(*text, *len, 0, &jerr);
	if (!*doc)
		return ctl_usage_error(ctl, "%s file %s: not valid JSON: line %d column %d: %s", k->noun,
		                       file, jerr.line, jerr.column, jerr.text);
	svc = json_is_object(*doc) ? json_object_get(*doc, "service") : NULL;
	if (!json_is_string(svc) || json_string_length(svc) == 0)
		return ctl_usage_error(ctl, "%s file %s: service: required (a string naming %s)",
		                       k->noun, file, k->service_is);
	return 0;
}

/* --if-match VALUE as a header into hdr, checked as a version or "*". */
static int doc_if_match(struct ctl *ctl, const struct ctl_doc_kind *k, const char *if_match,
                        char *hdr, size_t len)
{
	long long v;

	if (ctl_parse_int(if_match, 0, LLONG_MAX, &v) < 0 && if_match[0] != '"' &&
	    strcmp(if_match, "*") != 0)
		return ctl_usage_error(ctl, "--if-match: expected a %s version (an integer) or *, "
		                       "got '%s'", k->noun, if_match);
	snprintf(hdr, len, "If-Match: %s", if_match);
	return 0;
}

int ctl_doc_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a,
                  const struct ctl_doc_kind *k)
{
	const char *file = ctl_arg(cmd, a, "file"), *if_match = ctl_arg(cmd, a, "if-match");
	char path[CTL_URL_PATH_MAX], hdr[160];
	const char *headers[2] = { NULL, NULL };
	struct httpc_response r;
	json_t *doc = NULL;
	char *text = NULL;
	size_t len = 0;
	int rc;

	if (!file)
		return ctl_usage_error(ctl, "%s apply: -f FILE is required (see %s apply --help)",
		                       cmd->group, cmd->group);
	rc = doc_read(ctl, k, file, &text, &len, &doc);
	if (!rc)
		rc = ctl_api_path(ctl, path, sizeof(path), k->api_prefix,
		                  json_string_value(json_object_get(doc, "service")));
	if (!rc && if_match && !(rc = doc_if_match(ctl, k, if_match, hdr, sizeof(hdr))))
		headers[0] = hdr;
	if (!rc)
		rc = ctl_api_call(ctl, "PUT", path, NULL, text, len, headers, &r);
	if (!rc) {
		if (ctl->output == OUT_JSON)
			ctl_print_json(r.json);
		else
			ctl_print_object(r.json, policy_list_cols, stdout);
		httpc_response_clear(&r);
	}
	json_decref(doc);
	free(text);
	return rc;
}

int ctl_cmd_policy_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return ctl_doc_apply(ctl, cmd, a, &policy_doc);
}

/* One rule field as a cell: "*" when omitted (any). */
static char *rule_cell(const json_t *rule, const char *key)
{
	const json_t *v = json_object_get(rule, key);

	if (!v)
		return ctl_cell_dup("*");
	return ctl_json_cell(v);
}

static void print_policy(const json_t *resp)
{
	const json_t *pol = json_object_get(resp, "policy");
	const json_t *rules = pol ? json_object_get(pol, "rules") : NULL;
	const char *def = pol ? json_string_value(json_object_get(pol, "default")) : NULL;
	char *ver = ctl_json_cell(json_object_get(resp, "version"));
	char *svc = ctl_json_cell(pol ? json_object_get(pol, "service") : NULL);
	struct ctl_table t;
	size_t i;
	json_t *rule;

	ctl_table_init(&t, 4);
	ctl_table_add(&t, (const char *[]){ "SERVICE", "VERSION", "DEFAULT", "RULES" });
	{
		char n[32];

		snprintf(n, sizeof(n), "%zu", json_array_size(rules));
		ctl_table_add(&t, (const char *[]){ svc, ver, def ? def : "deny", n });
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
	free(ver);
	free(svc);
	if (!json_array_size(rules))
		return;
	fputc('\n', stdout);
	ctl_table_init(&t, 7);
	ctl_table_add(&t, (const char *[]){ "RULE", "ACTION", "FROM", "PORTS", "METHODS", "PATHS", "HEADERS" });
	json_array_foreach((json_t *)rules, i, rule) {
		static const char *const keys[] = { "name", "action", "from", "ports", "methods",
		                                     "paths", "headers" };
		char *row[7];

		for (size_t c = 0; c < 7; c++)
			row[c] = rule_cell(rule, keys[c]);
		ctl_table_add(&t, (const char *const *)row);
		for (size_t c = 0; c < 7; c++)
			free(row[c]);
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
}

int ctl_cmd_policy_get(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	char path[CTL_URL_PATH_MAX];
	struct httpc_response r;
	int rc = ctl_api_path(ctl, path, sizeof(path), "/v1/policies/", a->pos[0]);

	if (rc || (rc = ctl_api_call(ctl, "GET", path, NULL, NULL, 0, NULL, &r)))
		return rc;
	if (ctl->output == OUT_JSON)
		ctl_print_json(r.json);
	else if (json_is_object(json_object_get(r.json, "policy")))
		print_policy(r.json);
	else
		ctl_print_object(r.json, NULL, stdout);
	httpc_response_clear(&r);
	return 0;
}

int ctl_doc_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a,
                   const struct ctl_doc_kind *k)
{
	const char *if_match = ctl_arg(cmd, a, "if-match");
	const char *headers[2] = { NULL, NULL };
	char path[CTL_URL_PATH_MAX], hdr[160];
	struct httpc_response r;
	int rc = ctl_api_path(ctl, path, sizeof(path), k->api_prefix, a->pos[0]);

	if (rc)
		return rc;
	if (if_match) {
		snprintf(hdr, sizeof(hdr), "If-Match: %s", if_match);
		headers[0] = hdr;
	}
	rc = ctl_api_call(ctl, "DELETE", path, NULL, NULL, 0, headers, &r);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		if (r.json)
			ctl_print_json(r.json);
		else
			printf("{\"service\": \"%s\", \"deleted\": true}\n", path + strlen(k->api_prefix));
	} else {
		printf("%s %s deleted\n", k->noun, a->pos[0]);
	}
	httpc_response_clear(&r);
	return 0;
}

int ctl_cmd_policy_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return ctl_doc_delete(ctl, cmd, a, &policy_doc);
}

int ctl_cmd_policy_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return ctl_list_command(ctl, "/v1/policies", "policies", policy_list_cols);
}

int ctl_cmd_check(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *from = ctl_arg(cmd, a, "from"), *to = ctl_arg(cmd, a, "to"), *port = ctl_arg(cmd, a, "port");
	const char *method = ctl_arg(cmd, a, "method"), *path = ctl_arg(cmd, a, "path");
	json_t *body, *headers = NULL;
	long long p;

	if (!from || !to || !port)
		return ctl_usage_error(ctl, "check: --from ID, --to SERVICE and --port PORT are required "
		                       "(see check --help)");
	if (ctl_parse_int(port, 1, 65535, &p) < 0)
		return ctl_usage_error(ctl, "--port: expected 1..65535, got '%s'", port);
	if (a->n_multi) {
		headers = json_object();
		for (size_t i = 0; i < a->n_multi; i++) {
			const char *eq = strchr(a->multi[i], '=');
			char name[256];

			if (!eq || eq == a->multi[i] || (size_t)(eq - a->multi[i]) >= sizeof(name)) {
				json_decref(headers);
				return ctl_usage_error(ctl, "--header: expected NAME=VALUE, got '%s'", a->multi[i]);
			}
			memcpy(name, a->multi[i], (size_t)(eq - a->multi[i]));
			name[eq - a->multi[i]] = '\0';
			for (char *c = name; *c; c++)
				*c = (char)tolower((unsigned char)*c);
			json_object_set_new(headers, name, json_string(eq + 1));
		}
	}
	body = json_pack("{s:s, s:s, s:I}", "from", from, "service", to, "port", (json_int_t)p);
	if (!body) {
		json_decref(headers);
		return ctl_usage_error(ctl, "--from/--to: not valid UTF-8");
	}
	if (method)
		json_object_set_new(body, "method", json_string(method));
	if (path)
		json_object_set_new(body, "path", json_string(path));
	if (headers)
		json_object_set_new(body, "headers", headers);
	return ctl_send(ctl, "POST", "/v1/check", body,
	                (const char *const[]){ "decision", "rule", NULL }, NULL);
}
