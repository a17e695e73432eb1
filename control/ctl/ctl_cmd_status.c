/* meshletctl status: every control replica of --control and its store (see ctl.h). */
#include "ctl.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

/* One replica's row: reachability, version, store; true when all is well. */
static bool status_row(struct ctl *ctl, json_t *rows, struct ctl_table *t)
{
	char err[HTTPC_ERR_MAX] = "", state[HTTPC_ERR_MAX + 16], ms[24] = "-", rev[24] = "-";
	struct httpc_response r;
	struct timespec t0, t1;
	const json_t *store;
	const char *version = "-", *backend = "-", *store_state = "-";
	bool good = false;
	int rc = ctl_connect(ctl);

	memset(&r, 0, sizeof(r));
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!rc)
		rc = httpc_request(ctl->http, "GET", "/v1/health", NULL, NULL, 0, NULL, &r, err);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	store = json_object_get(r.json, "store");
	if (rc) {
		snprintf(state, sizeof(state), "unreachable: %s", err[0] ? err : "see above");
	} else if (r.status != 200) {
		snprintf(state, sizeof(state), "HTTP %d", r.status);
	} else {
		snprintf(state, sizeof(state), "up");
		snprintf(ms, sizeof(ms), "%.1f", (double)(t1.tv_sec - t0.tv_sec) * 1e3 +
		         (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
		version = json_string_value(json_object_get(r.json, "version"));
		backend = json_string_value(json_object_get(store, "backend"));
		good = json_is_true(json_object_get(store, "ok"));
		store_state = good ? "ok" : json_string_value(json_object_get(store, "error"));
		if (json_integer_value(json_object_get(store, "revision")))
			snprintf(rev, sizeof(rev), "%lld",
			         (long long)json_integer_value(json_object_get(store, "revision")));
	}
	{
		const char *cells[] = { ctl->control_url, state, version ? version : "-", ms,
		                        backend ? backend : "-", store_state ? store_state : "?", rev };

		ctl_table_add(t, cells);
	}
	json_array_append_new(rows, json_pack("{s:s, s:s, s:O?}", "url", ctl->control_url,
	                                      "state", state, "health",
	                                      rc == 0 && r.status == 200 ? r.json : NULL));
	httpc_response_clear(&r);
	httpc_free(ctl->http);
	ctl->http = NULL;
	return good;
}

int ctl_cmd_status(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const head[] = { "CONTROL", "STATE", "VERSION", "MS", "STORE",
	                                     "STORE STATE", "STORE REVISION" };
	struct ctl_table t;
	json_t *rows = json_array();
	size_t n = 1, bad = 0;

	(void)cmd;
	(void)a;
	for (const char *p = ctl->control; *p; p++)
		n += *p == ',';
	ctl_table_init(&t, 7);
	ctl_table_add(&t, head);
	for (size_t i = 0; i < n; i++) {
		ctl->control_at = i;
		bad += !status_row(ctl, rows, &t);
	}
	if (ctl->output == OUT_JSON)
		ctl_print_json(rows);
	else
		ctl_table_print(&t, stdout);
	ctl_table_free(&t);
	json_decref(rows);
	return bad ? EXIT_REFUSED : 0;
}
