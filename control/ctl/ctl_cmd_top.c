/* meshletctl top: GET /v1/stats as a table, refreshed (see ctl.h). */
#include "ctl.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TOP_RECENT_SHOWN 8

static double num(const json_t *o, const char *key)
{
	return json_number_value(json_object_get(o, key));
}

static int by_rate(const void *a, const void *b)
{
	double x = num(*(const json_t *const *)a, "request_rate");
	double y = num(*(const json_t *const *)b, "request_rate");

	return (x < y) - (x > y);
}

/* "rule=n rule=n" of an edge's denied_by_rule, into out. */
static void rules_text(const json_t *rules, char *out, size_t len)
{
	const char *k;
	json_t *v;
	size_t used = 0;

	out[0] = '\0';
	json_object_foreach((json_t *)rules, k, v) {
		int n = snprintf(out + used, len - used, "%s%s=%lld", used ? " " : "", k,
		                 (long long)json_integer_value(v));

		if (n < 0 || (size_t)n >= len - used)
			break;
		used += (size_t)n;
	}
}

static void print_edges(const json_t *doc)
{
	const json_t *edges = json_object_get(doc, "edges");
	size_t n = json_array_size(edges);
	const json_t **sorted = calloc(n ? n : 1, sizeof(*sorted));
	struct ctl_table t;

	if (!sorted)
		return;
	for (size_t i = 0; i < n; i++)
		sorted[i] = json_array_get(edges, i);
	qsort(sorted, n, sizeof(*sorted), by_rate);
	ctl_table_init(&t, 9);
	ctl_table_add(&t, (const char *const[]){ "FROM", "TO", "REQ/S", "DENIED/S", "5XX/S",
	                                         "P50_MS", "P99_MS", "REQUESTS", "DENIED_BY_RULE" });
	for (size_t i = 0; i < n; i++) {
		const json_t *e = sorted[i];
		char rate[24], denied[24], err[24], p50[24] = "-", p99[24] = "-", total[24], rules[256];

		snprintf(rate, sizeof(rate), "%.2f", num(e, "request_rate"));
		snprintf(denied, sizeof(denied), "%.2f", num(e, "denial_rate"));
		snprintf(err, sizeof(err), "%.2f", num(e, "error_rate"));
		if (json_object_get(e, "p50_ms")) {
			snprintf(p50, sizeof(p50), "%.1f", num(e, "p50_ms"));
			snprintf(p99, sizeof(p99), "%.1f", num(e, "p99_ms"));
		}
		snprintf(total, sizeof(total), "%lld",
		         (long long)json_integer_value(json_object_get(e, "requests")));
		rules_text(json_object_get(e, "denied_by_rule"), rules, sizeof(rules));
		ctl_table_add(&t, (const char *const[]){
			json_string_value(json_object_get(e, "from")),
			json_string_value(json_object_get(e, "to")), rate, denied, err, p50, p99, total,
			rules });
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
	free(sorted);
}

static void print_recent(const json_t *doc)
{
	const json_t *recent = json_object_get(doc, "recent_denials"), *d;
	struct ctl_table t;
	size_t i;

	if (json_array_size(recent) == 0)
		return;
	printf("\nrecent denials:\n");
	ctl_table_init(&t, 6);
	ctl_table_add(&t, (const char *const[]){ "AT", "FROM", "TO", "RULE", "METHOD", "PATH" });
	json_array_foreach(recent, i, d) {
		if (i >= TOP_RECENT_SHOWN)
			break;
		ctl_table_add(&t, (const char *const[]){
			json_string_value(json_object_get(d, "at")),
			json_string_value(json_object_get(d, "from")),
			json_string_value(json_object_get(d, "to")),
			json_string_value(json_object_get(d, "rule")),
			json_string_value(json_object_get(d, "method")),
			json_string_value(json_object_get(d, "path")) });
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
}

static void print_top(const json_t *doc)
{
	const json_t *others = json_object_get(doc, "others");

	printf("meshlet top  %s  rates over the last %llds\n",
	       json_string_value(json_object_get(doc, "now")) ? json_string_value(json_object_get(doc, "now")) : "",
	       (long long)json_integer_value(json_object_get(doc, "window_s")));
	if (json_array_size(json_object_get(doc, "edges")) == 0)
		printf("no traffic reported in the last minutes\n");
	else
		print_edges(doc);
	if (json_is_true(json_object_get(doc, "truncated")))
		printf("(truncated: %lld more callers counted together as (other))\n",
		       (long long)json_integer_value(json_object_get(others, "callers_folded")));
	print_recent(doc);
}

/* One snapshot: 0, or the exit code of a failed call. */
static int show(struct ctl *ctl, bool clear)
{
	struct httpc_response r;
	int rc = ctl_api_call(ctl, "GET", "/v1/stats", NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		ctl_print_json(r.json);
	} else {
		if (clear)
			fputs("\033[H\033[2J", stdout);
		print_top(r.json);
	}
	httpc_response_clear(&r);
	fflush(stdout);
	return 0;
}

int ctl_cmd_top(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *iv = ctl_arg(cmd, a, "interval");
	long long secs = 2;
	bool tty = isatty(STDOUT_FILENO);

	if (iv && ctl_parse_int(iv, 1, 3600, &secs) < 0)
		return ctl_usage_error(ctl, "--interval: expected seconds (1..3600), got '%s'", iv);
	if (ctl_arg(cmd, a, "once"))
		return show(ctl, false);
	for (;;) {
		/* Keep refreshing while control is away: say so, try again. */
		if (show(ctl, tty && ctl->output != OUT_JSON) != 0)
			fprintf(stderr, "%s: control unreachable; retrying in %llds\n", ctl->prog, secs);
		sleep((unsigned)secs);
	}
}
