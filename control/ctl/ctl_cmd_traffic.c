/* meshletctl traffic apply|get|delete|list (see ctl.h, docs/traffic.md). */
#include "ctl.h"

#include <stdlib.h>
#include <string.h>

#include "meshlet/api.h"

static const struct ctl_doc_kind traffic_doc = {
	.noun = "traffic", .api_prefix = "/v1/traffic/",
	.service_is = "the service whose calls the document governs",
};

static const char *const traffic_list_cols[] = { "service", "version", NULL };

int ctl_cmd_traffic_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return ctl_doc_apply(ctl, cmd, a, &traffic_doc);
}

int ctl_cmd_traffic_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return ctl_doc_delete(ctl, cmd, a, &traffic_doc);
}

int ctl_cmd_traffic_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return ctl_list_command(ctl, "/v1/traffic", "traffic", traffic_list_cols);
}

/* A section's field as a cell; "-" when the section or field is absent
 * (the default applies). */
static char *field_cell(const json_t *doc, const char *section, const char *key)
{
	const json_t *v = json_object_get(json_object_get(doc, section), key);

	return v ? ctl_json_cell(v) : ctl_cell_dup("-");
}

/* One row per setting: what callers' sidecars apply. */
static void print_settings(const json_t *doc, const char *version)
{
	static const struct { const char *section, *key; } rows[] = {
		{"timeouts", "connect_seconds"}, {"timeouts", "request_seconds"},
		{"retries", "attempts"}, {"retries", "on"}, {"retries", "budget_percent"},
		{"retries", "backoff_ms"}, {"outlier", "consecutive_failures"},
		{"outlier", "eject_seconds"}, {"outlier", "max_ejected_percent"},
		{"limits", "max_connections"}, {"limits", "max_pending_requests"},
	};
	struct ctl_table t;
	char name[96];

	ctl_table_init(&t, 2);
	ctl_table_add(&t, (const char *[]){ "SETTING", "VALUE" });
	ctl_table_add(&t, (const char *[]){ "service",
	                                    json_string_value(json_object_get(doc, "service")) });
	ctl_table_add(&t, (const char *[]){ "version", version });
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		char *cell = field_cell(doc, rows[i].section, rows[i].key);

		snprintf(name, sizeof(name), "%s.%s", rows[i].section, rows[i].key);
		ctl_table_add(&t, (const char *[]){ name, cell });
		free(cell);
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
}

/* A list of rules (rate_limits, faults) as a table of cols; "*" for an
 * omitted selector (any), "-" for another omitted field. */
static void print_rules(const json_t *rules, const char *const *cols, size_t ncols)
{
	static const char *const selectors[] = { "from", "methods", "paths", "headers" };
	struct ctl_table t;
	const json_t *rule;
	char head[32], *row[12];
	size_t i;

	if (!json_array_size(rules))
		return;
	fputc('\n', stdout);
	ctl_table_init(&t, ncols);
	for (size_t c = 0; c < ncols; c++) {
		size_t k = 0;

		for (; cols[c][k] && k + 1 < sizeof(head); k++)
			head[k] = cols[c][k] == '_' ? ' ' : (char)(cols[c][k] & ~0x20);
		head[k] = '\0';
		row[c] = ctl_cell_dup(head);
	}
	ctl_table_add(&t, (const char *const *)row);
	for (size_t c = 0; c < ncols; c++)
		free(row[c]);
	json_array_foreach((json_t *)rules, i, rule) {
		for (size_t c = 0; c < ncols; c++) {
			const json_t *v = json_object_get(rule, cols[c]);
			bool sel = false;

			for (size_t s = 0; s < sizeof(selectors) / sizeof(selectors[0]); s++)
				sel = sel || strcmp(cols[c], selectors[s]) == 0;
			row[c] = v ? ctl_json_cell(v) : ctl_cell_dup(sel ? "*" : "-");
		}
		ctl_table_add(&t, (const char *const *)row);
		for (size_t c = 0; c < ncols; c++)
			free(row[c]);
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
}

int ctl_cmd_traffic_get(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const rate_cols[] = { "name", "requests_per_second", "burst", "per",
	                                         "from", "methods", "paths", "headers" };
	static const char *const fault_cols[] = { "name", "percent", "delay_ms", "abort_status",
	                                          "from", "methods", "paths", "headers" };
	struct api_traffic_resp tr;
	struct meshlet_err e = {0};
	char path[CTL_URL_PATH_MAX], ver[32];
	struct httpc_response r;
	int rc = ctl_api_path(ctl, path, sizeof(path), traffic_doc.api_prefix, a->pos[0]);

	if (rc || (rc = ctl_api_call(ctl, "GET", path, NULL, NULL, 0, NULL, &r)))
		return rc;
	if (ctl->output == OUT_JSON) {
		ctl_print_json(r.json);
	} else if (api_parse_traffic_resp(r.json, &tr, &e) < 0) {
		rc = ctl_refused(ctl, "unexpected answer from control: %s: %s", e.path, e.message);
	} else {
		snprintf(ver, sizeof(ver), "%lld", (long long)tr.version);
		print_settings(tr.traffic, ver);
		print_rules(json_object_get(tr.traffic, "rate_limits"), rate_cols, 8);
		print_rules(json_object_get(tr.traffic, "faults"), fault_cols, 8);
	}
	httpc_response_clear(&r);
	return rc;
}
