/*
 * meshletctl: the operator CLI of meshlet-control, a thin client of its
 * HTTPS JSON API (DESIGN.md, "meshletctl").
 *
 *   meshletctl [GLOBAL OPTIONS] COMMAND [SUBCOMMAND] [ARGS] [OPTIONS]
 *
 * Commands are rows of one table ({group, name, usage, options, handler});
 * main() parses the global options, finds the row, parses its options and
 * runs its handler. Output is an aligned table, or with -o json the API's
 * JSON as received (pretty-printed).
 *
 * Exit codes: 0 success; 1 the control refused the request (its error
 * message, with the JSON path when it has one, goes to stderr) or could not
 * be reached; 2 usage errors and local problems (unknown command or option,
 * missing argument, unreadable file, no token or CA file).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#include <jansson.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "meshlet/api.h"
#include "meshlet/ca.h"
#include "meshlet/file.h"
#include "meshlet/httpc.h"
#include "meshlet/identity.h"

#ifndef MESHLET_VERSION
#define MESHLET_VERSION "0.1.0"
#endif

#define EXIT_REFUSED 1
#define EXIT_USAGE 2
/* ca rotate --auto: how often it looks at the gates, and for how long. */
#define CA_AUTO_POLL_S 1.0
#define CA_AUTO_TIMEOUT_DEFAULT (3LL * 3600)

#define CTL_DEFAULT_CONTROL "https://127.0.0.1:7443"
#define CTL_DEFAULT_STATE_DIR "/var/lib/meshlet-control"
#define CTL_TOKEN_FILE_MAX 4096
#define CTL_POLICY_FILE_MAX (16 * 1024 * 1024)
#define CTL_MAX_OPTS 12
#define CTL_MAX_MULTI 64
#define CTL_MAX_POS 4
#define CTL_URL_PATH_MAX 1024

enum ctl_output { OUT_TABLE, OUT_JSON };

/* Everything a command handler needs; filled by main(), no globals. */
struct ctl {
	const char *prog;
	const char *control;       /* URL */
	const char *ca_file;       /* NULL: <state dir>/ca.pem */
	const char *token_file;    /* NULL: MESHLET_TOKEN, else <state dir>/admin.token */
	const char *state_dir;
	enum ctl_output output;
	int timeout_ms;
	struct httpc *http;     /* opened by ctl_connect() */
};

/* One option of a command: --name (and -s), taking an argument unless arg is NULL. */
struct ctl_opt {
	const char *name;
	char shortname;
	const char *arg;           /* metavariable, NULL for a flag */
	bool repeat;               /* may be given several times */
	const char *help;
};

/* The parsed command line of one command. */
struct ctl_args {
	const char *val[CTL_MAX_OPTS];   /* last value (or "" for a flag), NULL if absent */
	const char *multi[CTL_MAX_MULTI];/* every value of the repeatable option */
	size_t n_multi;
	const char *pos[CTL_MAX_POS];
	size_t n_pos;
};

struct ctl_cmd;
typedef int (*ctl_handler)(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);

struct ctl_cmd {
	const char *group;         /* "policy" */
	const char *name;          /* "apply", or NULL for a one-word command ("check") */
	const char *args;          /* usage after the command words */
	size_t min_pos, max_pos;   /* positional arguments */
	const struct ctl_opt *opts;/* terminated by {NULL} */
	const char *summary;
	const char *help;          /* longer description for COMMAND --help */
	ctl_handler run;
};

/* ---------------------------------------------------------------- messages */

/* "meshletctl: message" on stderr; returns code (the exit status to use). */
static int complain(const struct ctl *ctl, int code, const char *fmt, va_list ap)
{
	fprintf(stderr, "%s: ", ctl->prog);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	return code;
}

__attribute__((format(printf, 2, 3)))
static int usage_error(const struct ctl *ctl, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = complain(ctl, EXIT_USAGE, fmt, ap);
	va_end(ap);
	return rc;
}

__attribute__((format(printf, 2, 3)))
static int refused(const struct ctl *ctl, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = complain(ctl, EXIT_REFUSED, fmt, ap);
	va_end(ap);
	return rc;
}

/* ---------------------------------------------------------------- small parsers */

/* The longest duration any option takes (the API checks its own limits). */
#define CTL_DURATION_MAX (100LL * 366 * 86400)

/* A duration as api_parse_duration() reads it, 1 s .. 100 years. Returns
 * 0 and *secs, or -1 (callers print their own message). */
static int parse_duration(const char *s, long long *secs)
{
	int64_t v;

	if (api_parse_duration(s, 1, CTL_DURATION_MAX, &v, NULL) < 0)
		return -1;
	*secs = (long long)v;
	return 0;
}

static int parse_int(const char *s, long long min, long long max, long long *out)
{
	char *end;
	long long v;

	if (!*s || !(isdigit((unsigned char)*s) || *s == '-'))
		return -1;
	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno || *end || v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

/*
 * Reads a whole file (or stdin for "-") of at most max bytes: file_read(),
 * and for what is not a regular file (a pipe such as <(...), a device) its
 * stream until EOF. Returns a malloc'd NUL-terminated buffer and *len, or
 * NULL with errno set (EFBIG when over max).
 */
static char *read_file(const char *path, size_t max, size_t *len)
{
	char *buf = NULL;
	int rc = file_read(path, max, FILE_STDIN, &buf, len);

	if (rc == -EINVAL) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);

		rc = fd < 0 ? -errno : file_read_fd(fd, max, &buf, len);
		if (fd >= 0)
			close(fd);
	}
	if (rc < 0) {
		errno = -rc;
		return NULL;
	}
	return buf;
}

/* ---------------------------------------------------------------- tables */

struct table {
	size_t ncols, nrows, cap;
	char **cells;              /* row-major; row 0 is the header */
};

static char *cell_dup(const char *s)
{
	char *d = strdup(s ? s : "");

	if (!d) {
		fputs("meshletctl: out of memory\n", stderr);
		exit(EXIT_USAGE);
	}
	for (char *p = d; *p; p++)         /* no terminal control characters from the wire */
		if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
			*p = '?';
	return d;
}

static void table_init(struct table *t, size_t ncols)
{
	memset(t, 0, sizeof(*t));
	t->ncols = ncols;
}

/* Adds a row of t->ncols cells (copied). The first row is the header. */
static void table_add(struct table *t, const char *const *cells)
{
	if (t->nrows == t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 8;
		char **nc = realloc(t->cells, cap * t->ncols * sizeof(char *));

		if (!nc) {
			fputs("meshletctl: out of memory\n", stderr);
			exit(EXIT_USAGE);
		}
		t->cells = nc;
		t->cap = cap;
	}
	for (size_t c = 0; c < t->ncols; c++)
		t->cells[t->nrows * t->ncols + c] = cell_dup(cells[c]);
	t->nrows++;
}

static void table_print(struct table *t, FILE *out)
{
	size_t w[64] = { 0 };

	for (size_t r = 0; r < t->nrows; r++)
		for (size_t c = 0; c < t->ncols && c < 64; c++) {
			size_t l = strlen(t->cells[r * t->ncols + c]);

			if (l > w[c])
				w[c] = l;
		}
	for (size_t r = 0; r < t->nrows; r++) {
		for (size_t c = 0; c < t->ncols; c++) {
			const char *s = t->cells[r * t->ncols + c];

			if (c + 1 == t->ncols)
				fprintf(out, "%s", s);
			else
				fprintf(out, "%-*s  ", (int)w[c < 64 ? c : 63], s);
		}
		fputc('\n', out);
	}
}

static void table_free(struct table *t)
{
	for (size_t i = 0; i < t->nrows * t->ncols; i++)
		free(t->cells[i]);
	free(t->cells);
	memset(t, 0, sizeof(*t));
}

/* A JSON value as a table cell (malloc'd): strings as is, arrays joined
 * with ",", objects as k=v pairs, null and empty as "-". */
static char *json_cell(const json_t *v)
{
	char num[64];

	if (!v || json_is_null(v))
		return cell_dup("-");
	if (json_is_string(v))
		return cell_dup(json_string_length(v) ? json_string_value(v) : "-");
	if (json_is_integer(v)) {
		snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
		return cell_dup(num);
	}
	if (json_is_real(v)) {
		snprintf(num, sizeof(num), "%g", json_real_value(v));
		return cell_dup(num);
	}
	if (json_is_boolean(v))
		return cell_dup(json_is_true(v) ? "true" : "false");
	if (json_is_array(v) || json_is_object(v)) {
		size_t cap = 64, len = 0;
		char *s = malloc(cap);
		bool first = true;
		size_t i;
		const char *k;
		json_t *e;

		if (!s)
			return cell_dup("?");
		s[0] = '\0';
#define APPEND(str) do { \
		const char *a_ = (str); size_t al_ = strlen(a_); \
		while (len + al_ + 1 > cap) { char *ns_ = realloc(s, cap *= 2); if (!ns_) { free(s); return cell_dup("?"); } s = ns_; } \
		memcpy(s + len, a_, al_ + 1); len += al_; \
	} while (0)
		if (json_is_array(v)) {
			json_array_foreach((json_t *)v, i, e) {
				char *c = json_cell(e);

				if (!first)
					APPEND(",");
				APPEND(c);
				free(c);
				first = false;
			}
		} else {
			json_object_foreach((json_t *)v, k, e) {
				char *c = json_cell(e);

				if (!first)
					APPEND(",");
				APPEND(k);
				APPEND("=");
				APPEND(c);
				free(c);
				first = false;
			}
		}
#undef APPEND
		if (first) {
			free(s);
			return cell_dup("-");
		}
		{
			char *d = cell_dup(s);

			free(s);
			return d;
		}
	}
	return cell_dup("?");
}

static void upper_header(char *dst, size_t len, const char *key)
{
	size_t i;

	for (i = 0; key[i] && i + 1 < len; i++)
		dst[i] = (char)toupper((unsigned char)key[i]);
	dst[i] = '\0';
}

/*
 * Prints an array of objects as a table: the preferred columns that any
 * element has, then (unless only_preferred and some preferred column was
 * found) every other key in the order first seen, so that fields the CLI
 * does not know about still show. Non-object elements are printed one per
 * line.
 */
static void print_object_list(const json_t *arr, const char *const *preferred, bool only_preferred,
                              FILE *out)
{
	const char *cols[64];
	size_t ncols = 0, i;
	json_t *e;
	struct table t;

	for (size_t p = 0; preferred && preferred[p]; p++)
		json_array_foreach((json_t *)arr, i, e)
			if (json_is_object(e) && json_object_get(e, preferred[p])) {
				if (ncols < 64)
					cols[ncols++] = preferred[p];
				break;
			}
	if (ncols > 0 && only_preferred)
		goto header;
	json_array_foreach((json_t *)arr, i, e) {
		const char *k;
		json_t *v;

		if (!json_is_object(e)) {
			char *c = json_cell(e);

			fprintf(out, "%s\n", c);
			free(c);
			continue;
		}
		json_object_foreach(e, k, v) {
			bool seen = false;

			for (size_t c = 0; c < ncols; c++)
				if (strcmp(cols[c], k) == 0)
					seen = true;
			if (!seen && ncols < 64)
				cols[ncols++] = k;
		}
	}
header:
	if (ncols == 0) {
		if (json_array_size(arr) == 0)
			fprintf(out, "(none)\n");
		return;
	}
	table_init(&t, ncols);
	{
		char hdr[64][64];
		const char *row[64];

		for (size_t c = 0; c < ncols; c++) {
			upper_header(hdr[c], sizeof(hdr[c]), cols[c]);
			row[c] = hdr[c];
		}
		table_add(&t, row);
	}
	json_array_foreach((json_t *)arr, i, e) {
		char *row[64];

		if (!json_is_object(e))
			continue;
		for (size_t c = 0; c < ncols; c++)
			row[c] = json_cell(json_object_get(e, cols[c]));
		table_add(&t, (const char *const *)row);
		for (size_t c = 0; c < ncols; c++)
			free(row[c]);
	}
	table_print(&t, out);
	table_free(&t);
}

/* Prints an object's scalar fields as one table row (preferred keys first),
 * and each array of objects it holds as a table of its own. */
static void print_object(const json_t *obj, const char *const *preferred, FILE *out)
{
	json_t *arr = json_array();
	const char *k;
	json_t *v;
	bool printed = false;

	if (!json_is_object(obj)) {
		if (json_is_array(obj)) {
			print_object_list(obj, preferred, false, out);
		} else if (obj) {
			char *c = json_cell(obj);

			fprintf(out, "%s\n", c);
			free(c);
		}
		json_decref(arr);
		return;
	}
	{
		json_t *scalars = json_object();

		json_object_foreach((json_t *)obj, k, v) {
			bool list = json_is_array(v) && json_array_size(v) > 0 &&
			            json_is_object(json_array_get(v, 0));

			if (!list)
				json_object_set(scalars, k, v);
		}
		if (json_object_size(scalars)) {
			json_array_append_new(arr, scalars);
			print_object_list(arr, preferred, false, out);
			printed = true;
		} else {
			json_decref(scalars);
		}
	}
	json_object_foreach((json_t *)obj, k, v) {
		if (json_is_array(v) && json_array_size(v) > 0 && json_is_object(json_array_get(v, 0))) {
			if (printed)
				fputc('\n', out);
			print_object_list(v, NULL, false, out);
			printed = true;
		}
	}
	json_decref(arr);
}

static void print_json(const json_t *v)
{
	if (!v) {
		return;
	}
	json_dumpf(v, stdout, JSON_INDENT(2) | JSON_ENCODE_ANY);
	fputc('\n', stdout);
}

/* ---------------------------------------------------------------- talking to control */

static const char *state_dir(const struct ctl *ctl)
{
	return ctl->state_dir ? ctl->state_dir : CTL_DEFAULT_STATE_DIR;
}

/* The admin token: --token-file, MESHLET_TOKEN_FILE, MESHLET_TOKEN, or
 * <state dir>/admin.token. Returns 0 and *out (malloc'd), or EXIT_USAGE. */
static int load_token(const struct ctl *ctl, char **out)
{
	char path[PATH_MAX];
	const char *file = ctl->token_file, *env = getenv("MESHLET_TOKEN");
	const char *why = "";
	size_t len;
	char *tok;

	*out = NULL;
	if (!file && env && *env) {
		tok = strdup(env);
		if (!tok)
			return usage_error(ctl, "out of memory");
		*out = tok;
		return 0;
	}
	if (!file) {
		snprintf(path, sizeof(path), "%s/admin.token", state_dir(ctl));
		file = path;
		why = " (give --token-file FILE or --state-dir DIR, or set MESHLET_TOKEN_FILE or MESHLET_TOKEN)";
	}
	tok = read_file(file, CTL_TOKEN_FILE_MAX, &len);
	if (!tok)
		return usage_error(ctl, "cannot read the admin token file %s: %s%s", file,
		                   errno == EFBIG ? "too large" : strerror(errno), why);
	while (len > 0 && isspace((unsigned char)tok[len - 1]))
		tok[--len] = '\0';
	if (len == 0 || strlen(tok) != len) {
		free(tok);
		return usage_error(ctl, "the admin token file %s is empty or not text", file);
	}
	*out = tok;
	return 0;
}

/* Opens the HTTPS client (CA file and token loaded). 0 or EXIT_USAGE. */
static int ctl_connect(struct ctl *ctl)
{
	char ca_path[PATH_MAX], err[HTTPC_ERR_MAX];
	struct httpc_opts o = { 0 };
	char *token = NULL;
	int rc;

	if (ctl->http)
		return 0;
	rc = load_token(ctl, &token);
	if (rc)
		return rc;
	if (ctl->ca_file) {
		o.ca_file = ctl->ca_file;
	} else {
		snprintf(ca_path, sizeof(ca_path), "%s/ca.pem", state_dir(ctl));
		if (access(ca_path, R_OK) != 0) {
			int e = errno;

			OPENSSL_cleanse(token, strlen(token));
			free(token);
			return usage_error(ctl, "cannot read the control's CA file %s: %s (give --ca FILE "
			                   "or --state-dir DIR, or set MESHLET_CA)", ca_path, strerror(e));
		}
		o.ca_file = ca_path;
	}
	o.url = ctl->control;
	o.token = token;
	o.timeout_ms = ctl->timeout_ms;
	o.user_agent = "meshletctl/" MESHLET_VERSION;
	rc = httpc_new(&ctl->http, &o, err);
	OPENSSL_cleanse(token, strlen(token));
	free(token);
	if (rc)
		return usage_error(ctl, "%s", err);
	return 0;
}

/* Prints the API's error for a non-2xx response and returns EXIT_REFUSED. */
static int api_error(const struct ctl *ctl, const struct httpc_response *r)
{
	struct api_error_resp e;
	const char *msg, *path, *code;

	api_parse_error_resp(r->json, &e);
	msg = e.message;
	path = e.path;
	code = e.code;
	if (!msg && code)
		msg = code;
	if (msg) {
		size_t pl = path ? strlen(path) : 0;

		if (pl && !(strncmp(msg, path, pl) == 0 && msg[pl] == ':'))
			return refused(ctl, "%s: %s", path, msg);
		return refused(ctl, "%s", msg);
	}
	{
		char snippet[201];
		size_t n = r->body_len < 200 ? r->body_len : 200;

		memcpy(snippet, r->body ? r->body : "", n);
		snippet[n] = '\0';
		for (char *p = snippet; *p; p++)
			if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
				*p = ' ';
		return refused(ctl, "the control answered HTTP %d%s%s", r->status, n ? ": " : "", snippet);
	}
}

/*
 * One API call. On a 2xx answer returns 0 with *resp filled (the caller
 * clears it). Otherwise prints why and returns the exit code: EXIT_REFUSED
 * (non-2xx, or the control unreachable), EXIT_USAGE (local problem).
 */
static int api_call(struct ctl *ctl, const char *method, const char *path, const json_t *body,
                    const char *raw, size_t raw_len, const char *const *headers,
                    struct httpc_response *resp)
{
	char err[HTTPC_ERR_MAX] = "";
	int rc = ctl_connect(ctl);

	memset(resp, 0, sizeof(*resp));
	if (rc)
		return rc;
	rc = httpc_request(ctl->http, method, path, body, raw, raw_len, headers, resp, err);
	if (rc == HTTPC_EUSAGE)
		return usage_error(ctl, "%s", err);
	if (rc)
		return refused(ctl, "%s: %s", ctl->control, err);
	if (resp->status < 200 || resp->status > 299) {
		rc = api_error(ctl, resp);
		httpc_response_clear(resp);
		return rc;
	}
	return 0;
}

/* "/v1/<a><escaped b>" into out. Returns 0 or EXIT_USAGE. */
static int api_path(const struct ctl *ctl, char *out, size_t len, const char *prefix, const char *seg)
{
	snprintf(out, len, "%s", prefix);
	if (httpc_escape(out, len, seg) < 0)
		return usage_error(ctl, "argument too long: %.40s...", seg);
	return 0;
}

/* ---------------------------------------------------------------- option lookup */

static int opt_index(const struct ctl_cmd *cmd, const char *name)
{
	for (int i = 0; cmd->opts && cmd->opts[i].name; i++)
		if (strcmp(cmd->opts[i].name, name) == 0)
			return i;
	return -1;
}

/* The value of option name, or NULL when it was not given. */
static const char *arg(const struct ctl_cmd *cmd, const struct ctl_args *a, const char *name)
{
	int i = opt_index(cmd, name);

	return i < 0 ? NULL : a->val[i];
}

/* ---------------------------------------------------------------- policy */

static const char *const policy_list_cols[] = { "service", "version", NULL };

static int cmd_policy_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *file = arg(cmd, a, "file"), *if_match = arg(cmd, a, "if-match");
	char path[CTL_URL_PATH_MAX], hdr[160];
	const char *headers[2] = { NULL, NULL };
	struct httpc_response r;
	json_error_t jerr;
	json_t *doc, *svc;
	size_t len;
	char *text;
	int rc;

	if (!file)
		return usage_error(ctl, "policy apply: -f FILE is required (see policy apply --help)");
	text = read_file(file, CTL_POLICY_FILE_MAX, &len);
	if (!text)
		return usage_error(ctl, "cannot read policy file %s: %s", strcmp(file, "-") ? file : "(stdin)",
		                   errno == EFBIG ? "larger than 16 MiB" : strerror(errno));
	doc = json_loadb(text, len, 0, &jerr);
	if (!doc) {
		rc = usage_error(ctl, "policy file %s: not valid JSON: line %d column %d: %s", file,
		                 jerr.line, jerr.column, jerr.text);
		free(text);
		return rc;
	}
	svc = json_is_object(doc) ? json_object_get(doc, "service") : NULL;
	if (!json_is_string(svc) || json_string_length(svc) == 0) {
		json_decref(doc);
		free(text);
		return usage_error(ctl, "policy file %s: service: required (a string naming the service "
		                   "the policy protects)", file);
	}
	rc = api_path(ctl, path, sizeof(path), "/v1/policies/", json_string_value(svc));
	if (rc)
		goto out;
	if (if_match) {
		long long v;

		if (parse_int(if_match, 0, LLONG_MAX, &v) < 0 && if_match[0] != '"' &&
		    strcmp(if_match, "*") != 0) {
			rc = usage_error(ctl, "--if-match: expected a policy version (an integer) or *, "
			                 "got '%s'", if_match);
			goto out;
		}
		snprintf(hdr, sizeof(hdr), "If-Match: %s", if_match);
		headers[0] = hdr;
	}
	rc = api_call(ctl, "PUT", path, NULL, text, len, headers, &r);
	if (rc)
		goto out;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else
		print_object(r.json, policy_list_cols, stdout);
	httpc_response_clear(&r);
out:
	json_decref(doc);
	free(text);
	return rc;
}

/* One rule field as a cell: "*" when omitted (any). */
static char *rule_cell(const json_t *rule, const char *key)
{
	const json_t *v = json_object_get(rule, key);

	if (!v)
		return cell_dup("*");
	return json_cell(v);
}

static void print_policy(const json_t *resp)
{
	const json_t *pol = json_object_get(resp, "policy");
	const json_t *rules = pol ? json_object_get(pol, "rules") : NULL;
	const char *def = pol ? json_string_value(json_object_get(pol, "default")) : NULL;
	char *ver = json_cell(json_object_get(resp, "version"));
	char *svc = json_cell(pol ? json_object_get(pol, "service") : NULL);
	struct table t;
	size_t i;
	json_t *rule;

	table_init(&t, 4);
	table_add(&t, (const char *[]){ "SERVICE", "VERSION", "DEFAULT", "RULES" });
	{
		char n[32];

		snprintf(n, sizeof(n), "%zu", json_array_size(rules));
		table_add(&t, (const char *[]){ svc, ver, def ? def : "deny", n });
	}
	table_print(&t, stdout);
	table_free(&t);
	free(ver);
	free(svc);
	if (!json_array_size(rules))
		return;
	fputc('\n', stdout);
	table_init(&t, 7);
	table_add(&t, (const char *[]){ "RULE", "ACTION", "FROM", "PORTS", "METHODS", "PATHS", "HEADERS" });
	json_array_foreach((json_t *)rules, i, rule) {
		static const char *const keys[] = { "name", "action", "from", "ports", "methods",
		                                     "paths", "headers" };
		char *row[7];

		for (size_t c = 0; c < 7; c++)
			row[c] = rule_cell(rule, keys[c]);
		table_add(&t, (const char *const *)row);
		for (size_t c = 0; c < 7; c++)
			free(row[c]);
	}
	table_print(&t, stdout);
	table_free(&t);
}

static int cmd_policy_get(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	char path[CTL_URL_PATH_MAX];
	struct httpc_response r;
	int rc = api_path(ctl, path, sizeof(path), "/v1/policies/", a->pos[0]);

	if (rc || (rc = api_call(ctl, "GET", path, NULL, NULL, 0, NULL, &r)))
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else if (json_is_object(json_object_get(r.json, "policy")))
		print_policy(r.json);
	else
		print_object(r.json, NULL, stdout);
	httpc_response_clear(&r);
	return 0;
}

static int cmd_policy_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *if_match = arg(cmd, a, "if-match");
	const char *headers[2] = { NULL, NULL };
	char path[CTL_URL_PATH_MAX], hdr[160];
	struct httpc_response r;
	int rc = api_path(ctl, path, sizeof(path), "/v1/policies/", a->pos[0]);

	if (rc)
		return rc;
	if (if_match) {
		snprintf(hdr, sizeof(hdr), "If-Match: %s", if_match);
		headers[0] = hdr;
	}
	rc = api_call(ctl, "DELETE", path, NULL, NULL, 0, headers, &r);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		if (r.json)
			print_json(r.json);
		else
			printf("{\"service\": \"%s\", \"deleted\": true}\n", path + strlen("/v1/policies/"));
	} else {
		printf("policy %s deleted\n", a->pos[0]);
	}
	httpc_response_clear(&r);
	return 0;
}

/* The first array in an object response (or the response if it is an array). */
static const json_t *list_of(const json_t *resp, const char *key)
{
	const char *k;
	json_t *v;

	if (json_is_array(resp))
		return resp;
	if (json_is_array(json_object_get(resp, key)))
		return json_object_get(resp, key);
	json_object_foreach((json_t *)resp, k, v)
		if (json_is_array(v))
			return v;
	return NULL;
}

static int list_command(struct ctl *ctl, const char *path, const char *key,
                        const char *const *cols)
{
	struct httpc_response r;
	const json_t *list;
	int rc = api_call(ctl, "GET", path, NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	list = list_of(r.json, key);
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else if (list)
		print_object_list(list, cols, true, stdout);
	else
		print_object(r.json, cols, stdout);
	httpc_response_clear(&r);
	return 0;
}

static int cmd_policy_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return list_command(ctl, "/v1/policies", "policies", policy_list_cols);
}

/* ---------------------------------------------------------------- token */

static int cmd_token_create(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "token", "service", "expires_at", "uses", NULL };
	const char *svc = arg(cmd, a, "service"), *ttl = arg(cmd, a, "ttl"), *uses = arg(cmd, a, "uses");
	long long ttl_s = 3600, n_uses = 1;
	struct httpc_response r;
	json_t *body;
	int rc;

	if (!svc)
		return usage_error(ctl, "token create: --service SERVICE is required");
	if (ttl && parse_duration(ttl, &ttl_s) < 0)
		return usage_error(ctl, "--ttl: expected a duration such as 90s, 15m, 1h, 7d or "
		                   "seconds, got '%s'", ttl);
	if (uses && parse_int(uses, 1, INT32_MAX, &n_uses) < 0)
		return usage_error(ctl, "--uses: expected a positive integer, got '%s'", uses);
	body = json_pack("{s:s, s:I, s:I}", "service", svc, "ttl_seconds", (json_int_t)ttl_s,
	                 "uses", (json_int_t)n_uses);
	if (!body)
		return usage_error(ctl, "out of memory");
	rc = api_call(ctl, "POST", "/v1/tokens", body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else
		print_object(r.json, cols, stdout);
	httpc_response_clear(&r);
	return 0;
}

/* ---------------------------------------------------------------- certs */

static int cmd_certs_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "serial", "service", "issued_at", "expires_at",
	                                    "not_after", "root", "via", "parent", "renewals",
	                                    "revoked", NULL };

	return list_command(ctl, "/v1/certs", "certs", cols);
}

static int cmd_certs_rotate(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *svc = arg(cmd, a, "service");
	bool all = arg(cmd, a, "all") != NULL;
	struct httpc_response r;
	json_t *body;
	int rc;

	if (!!svc == all)
		return usage_error(ctl, "certs rotate: give exactly one of --service SERVICE or --all");
	body = all ? json_pack("{s:b}", "all", 1) : json_pack("{s:s}", "service", svc);
	if (!body)
		return usage_error(ctl, "out of memory");
	rc = api_call(ctl, "POST", "/v1/certs/rotate", body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else if (r.json && json_object_size(r.json))
		print_object(r.json, (const char *const[]){ "service", "all", NULL }, stdout);
	else
		printf("rotation requested for %s\n", all ? "all services" : svc);
	httpc_response_clear(&r);
	return 0;
}

static int cmd_certs_revoke(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	char serial[CA_SERIAL_HEX_MAX];
	struct httpc_response r;
	json_t *body;
	int rc;

	if (ca_serial_normalize(a->pos[0], serial) < 0)
		return usage_error(ctl, "certs revoke: '%s' is not a certificate serial (hex digits, "
		                   "optionally with ':' separators)", a->pos[0]);
	body = json_pack("{s:s}", "serial", serial);
	if (!body)
		return usage_error(ctl, "out of memory");
	rc = api_call(ctl, "POST", "/v1/certs/revoke", body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else if (r.json && json_object_size(r.json))
		print_object(r.json, (const char *const[]){ "serial", NULL }, stdout);
	else
		printf("certificate %s revoked\n", serial);
	httpc_response_clear(&r);
	return 0;
}

/* ---------------------------------------------------------------- ca */

static void asn1_time_str(const ASN1_TIME *t, char *out, size_t len)
{
	struct tm tm;

	if (!t || ASN1_TIME_to_tm(t, &tm) != 1) {
		snprintf(out, len, "?");
		return;
	}
	strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Columns for one root PEM: subject CN, validity, SHA-256 of its public key. */
static void root_cells(const char *pem, char cn[128], char nb[32], char na[32], char pin[65])
{
	BIO *bio = BIO_new_mem_buf(pem, -1);
	X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
	unsigned char *der = NULL, md[32];
	int dlen;

	snprintf(cn, 128, "?");
	snprintf(nb, 32, "?");
	snprintf(na, 32, "?");
	snprintf(pin, 65, "?");
	if (x) {
		X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, 128);
		asn1_time_str(X509_get0_notBefore(x), nb, 32);
		asn1_time_str(X509_get0_notAfter(x), na, 32);
		dlen = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &der);
		if (dlen > 0 && EVP_Digest(der, (size_t)dlen, md, NULL, EVP_sha256(), NULL) == 1)
			for (int i = 0; i < 32; i++)
				snprintf(pin + 2 * i, 3, "%02x", md[i]);
		OPENSSL_free(der);
	}
	X509_free(x);
	BIO_free(bio);
	ERR_clear_error();
}

static const char *phase_next(const char *phase)
{
	if (!phase)
		return "-";
	if (strcmp(phase, "stable") == 0)
		return "ca rotate adds a new root to the trust bundle (phase prepared)";
	if (strcmp(phase, "prepared") == 0)
		return "ca rotate switches signing to the new root (phase switched), once proxies hold the new bundle";
	if (strcmp(phase, "switched") == 0)
		return "ca rotate removes the old root from the bundle (phase stable), once nothing it signed is valid";
	return "-";
}

static void print_ca_summary(const json_t *ca, bool with_next)
{
	const json_t *roots = json_object_get(ca, "roots");
	const char *phase = json_string_value(json_object_get(ca, "phase"));
	const json_t *gate = json_object_get(ca, "gate");
	char *signing = json_cell(json_object_get(ca, "signing"));
	char n[32];
	struct table t;

	snprintf(n, sizeof(n), "%zu", json_array_size(roots));
	table_init(&t, with_next ? 4 : 3);
	table_add(&t, (const char *[]){ "PHASE", "SIGNING", "ROOTS", "NEXT" });
	table_add(&t, (const char *[]){ phase ? phase : "-", signing, n, phase_next(phase) });
	table_print(&t, stdout);
	table_free(&t);
	free(signing);
	if (with_next && json_is_object(gate))
		printf("\nnext step -> %s: %s\n",
		       json_string_value(json_object_get(gate, "next_phase")) ?
		       json_string_value(json_object_get(gate, "next_phase")) : "?",
		       json_is_true(json_object_get(gate, "open")) ? "ready" :
		       json_string_value(json_object_get(gate, "waiting_for")) ?
		       json_string_value(json_object_get(gate, "waiting_for")) : "waiting");
}

static int cmd_ca_show(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	struct httpc_response r;
	const json_t *roots, *root;
	json_int_t signing;
	struct table t;
	size_t i;
	int rc = api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		print_json(r.json);
		httpc_response_clear(&r);
		return 0;
	}
	print_ca_summary(r.json, false);
	roots = json_object_get(r.json, "roots");
	signing = json_integer_value(json_object_get(r.json, "signing"));
	fputc('\n', stdout);
	table_init(&t, 6);
	table_add(&t, (const char *[]){ "INDEX", "SIGNING", "SUBJECT", "NOT_BEFORE", "NOT_AFTER",
	                                "KEY_SHA256" });
	json_array_foreach((json_t *)roots, i, root) {
		char idx[24], cn[128], nb[32], na[32], pin[65];

		snprintf(idx, sizeof(idx), "%zu", i);
		root_cells(json_string_value(root) ? json_string_value(root) : "", cn, nb, na, pin);
		table_add(&t, (const char *[]){ idx, (json_int_t)i == signing ? "yes" : "no", cn, nb,
		                                na, pin });
	}
	table_print(&t, stdout);
	table_free(&t);
	httpc_response_clear(&r);
	return 0;
}

static int cmd_ca_status(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	struct httpc_response r;
	int rc = api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else
		print_ca_summary(r.json, true);
	httpc_response_clear(&r);
	return 0;
}

/* GET /v1/ca over a new connection: a rotation step rewrites the CA file
 * (and the root control's certificate chains to), so it is read afresh. */
static int ca_get(struct ctl *ctl, struct httpc_response *r)
{
	httpc_free(ctl->http);
	ctl->http = NULL;
	return api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, r);
}

/* One POST /v1/ca/rotate for --auto. Returns 0 and *answer (the new
 * state; json_decref()), EXIT_REFUSED, EXIT_USAGE, or -1 for a 409 (a gate
 * closed again: --auto keeps waiting) without printing. */
static int ca_step(struct ctl *ctl, bool force, json_t **answer)
{
	struct httpc_response r;
	char err[HTTPC_ERR_MAX] = "";
	json_t *body = json_object();
	int rc;

	if (!body)
		return usage_error(ctl, "out of memory");
	if (force)
		json_object_set_new(body, "force", json_true());
	memset(&r, 0, sizeof(r));
	rc = ctl_connect(ctl);
	if (rc) {
		json_decref(body);
		return rc;
	}
	rc = httpc_request(ctl->http, "POST", "/v1/ca/rotate", body, NULL, 0, NULL, &r, err);
	json_decref(body);
	if (rc == HTTPC_EUSAGE)
		rc = usage_error(ctl, "%s", err);
	else if (rc)
		rc = refused(ctl, "%s: %s", ctl->control, err);
	else if (r.status == 409)
		rc = -1;
	else if (r.status < 200 || r.status > 299)
		rc = api_error(ctl, &r);
	else
		*answer = json_incref(r.json);
	httpc_response_clear(&r);
	return rc;
}

static double mono_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ca rotate --auto: each step as soon as GET /v1/ca says its gate is open,
 * until the phase is back to stable; EXIT_REFUSED when timeout passes. */
static int ca_rotate_auto(struct ctl *ctl, bool force, long long timeout)
{
	double deadline = mono_s() + (double)timeout;
	char waiting[512] = "";
	int steps = 0;

	for (;;) {
		struct httpc_response r;
		struct api_ca_resp ca;
		const char *phase, *why;
		char from[16];
		int rc = ca_get(ctl, &r);

		if (rc)
			return rc;
		if (api_parse_ca_resp(r.json, &ca, NULL) < 0 || !ca.has_gate) {
			httpc_response_clear(&r);
			return refused(ctl, "the control's GET /v1/ca answer has no phase or gate (an "
			               "older control?); rotate one step at a time");
		}
		phase = ca.phase;
		why = ca.waiting_for;
		if (steps > 0 && strcmp(phase, "stable") == 0) {
			if (ctl->output == OUT_JSON)
				print_json(r.json);
			else
				printf("CA rotation complete: phase stable\n");
			httpc_response_clear(&r);
			return 0;
		}
		snprintf(from, sizeof(from), "%s", phase);
		if (ca.gate_open || force) {
			const char *to = ca.next_phase;
			bool last = to && strcmp(to, "stable") == 0;
			json_t *answer = NULL;

			if (ctl->output != OUT_JSON)
				printf("%s -> %s\n", from, to ? to : "?");
			fflush(stdout);
			httpc_response_clear(&r);
			rc = ca_step(ctl, force, &answer);
			if (rc > 0)
				return rc;
			/* Done: no further call, which a CA file holding only the
			 * old root (--ca of an old copy) could no longer make. */
			if (rc == 0 && last) {
				if (ctl->output == OUT_JSON)
					print_json(answer);
				else
					printf("CA rotation complete: phase stable\n");
				json_decref(answer);
				return 0;
			}
			json_decref(answer);
			if (rc == 0)
				steps++;
			waiting[0] = '\0';
			continue;
		}
		if (mono_s() >= deadline) {
			rc = refused(ctl, "ca rotate --auto: timed out after %llds in phase %s, waiting for "
			             "%s", timeout, from, why ? why : "?");
			httpc_response_clear(&r);
			return rc;
		}
		if (why && strcmp(why, waiting) != 0) {
			fprintf(stderr, "%s: phase %s: waiting for %s\n", ctl->prog, from, why);
			snprintf(waiting, sizeof(waiting), "%s", why);
		}
		httpc_response_clear(&r);
		{
			double left = deadline - mono_s();
			double nap = left < CA_AUTO_POLL_S ? (left > 0 ? left : 0) : CA_AUTO_POLL_S;
			struct timespec ts = { (time_t)nap, (long)((nap - (double)(time_t)nap) * 1e9) };

			nanosleep(&ts, NULL);
		}
	}
}

static int cmd_ca_rotate(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	struct httpc_response r;
	const char *t = arg(cmd, a, "timeout");
	bool force = arg(cmd, a, "force") != NULL;
	long long timeout = CA_AUTO_TIMEOUT_DEFAULT;
	json_t *body;
	int rc;

	/* Without --auto, --timeout after the command is the global one (the
	 * limit of each request), as it was before --auto existed. */
	if (t && !arg(cmd, a, "auto")) {
		if (parse_duration(t, &timeout) < 0 || timeout > 3600)
			return usage_error(ctl, "--timeout: expected a duration up to 1h (30s, 2m), got "
			                   "'%s'", t);
		ctl->timeout_ms = (int)(timeout * 1000);
	} else if (t && parse_duration(t, &timeout) < 0) {
		return usage_error(ctl, "--timeout: expected a duration such as 90s, 15m, 2h or "
		                   "seconds, got '%s'", t);
	}
	if (arg(cmd, a, "auto"))
		return ca_rotate_auto(ctl, force, timeout);
	body = json_object();
	if (!body)
		return usage_error(ctl, "out of memory");
	if (force)
		json_object_set_new(body, "force", json_true());
	rc = api_call(ctl, "POST", "/v1/ca/rotate", body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (!json_is_string(json_object_get(r.json, "phase"))) {
		/* The answer does not say: ask. */
		httpc_response_clear(&r);
		rc = api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, &r);
		if (rc)
			return rc;
	}
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else
		print_ca_summary(r.json, true);
	httpc_response_clear(&r);
	return 0;
}

/* ---------------------------------------------------------------- endpoints */

static int cmd_endpoints_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "service", "address", "ports", "via", "live",
	                                    "expires_at", "serial", NULL };
	static const char *const acols[] = { "service", "address", "assigned_at", NULL };
	struct httpc_response r;
	const json_t *asg;
	int rc = api_call(ctl, "GET", "/v1/endpoints", NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		print_json(r.json);
	} else {
		print_object_list(json_object_get(r.json, "endpoints"), cols, true, stdout);
		asg = json_object_get(r.json, "assignments");
		if (json_array_size(asg) > 0) {
			printf("\nassigned by the admin:\n");
			print_object_list(asg, acols, true, stdout);
		}
	}
	httpc_response_clear(&r);
	return 0;
}

/* endpoints add|remove --service S ADDR: POST /v1/endpoints/<verb>. */
static int endpoints_assign(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a,
                            const char *verb)
{
	const char *svc = arg(cmd, a, "service"), *addr = a->pos[0];
	struct httpc_response r;
	char path[64];
	json_t *body;
	int rc;

	if (!svc)
		return usage_error(ctl, "endpoints %s: --service SERVICE is required", cmd->name);
	if (!identity_valid_service(svc))
		return usage_error(ctl, "--service: '%s' is not a service name", svc);
	if (!api_valid_address(addr))
		return usage_error(ctl, "endpoints %s: '%s' is not an address (ip:port or [ipv6]:port)",
		                   cmd->name, addr);
	body = json_pack("{s:s, s:s}", "service", svc, "address", addr);
	if (!body)
		return usage_error(ctl, "out of memory");
	snprintf(path, sizeof(path), "/v1/endpoints/%s", verb);
	rc = api_call(ctl, "POST", path, body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else
		printf("%s %s service %s\n", addr, strcmp(verb, "assign") == 0 ?
		       "assigned to" : "no longer assigned to", svc);
	httpc_response_clear(&r);
	return 0;
}

static int cmd_endpoints_add(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return endpoints_assign(ctl, cmd, a, "assign");
}

static int cmd_endpoints_remove(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return endpoints_assign(ctl, cmd, a, "unassign");
}

/* ---------------------------------------------------------------- proxies, check */

static int cmd_proxies_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "service", "address", "ports", "config_version",
	                                    "up_to_date", "connected", "cert_serial",
	                                    "cert_expires_at", "last_seen", NULL };

	return list_command(ctl, "/v1/proxies", "proxies", cols);
}

static int cmd_check(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *from = arg(cmd, a, "from"), *to = arg(cmd, a, "to"), *port = arg(cmd, a, "port");
	const char *method = arg(cmd, a, "method"), *path = arg(cmd, a, "path");
	struct httpc_response r;
	json_t *body, *headers = NULL;
	long long p;
	int rc;

	if (!from || !to || !port)
		return usage_error(ctl, "check: --from ID, --to SERVICE and --port PORT are required "
		                   "(see check --help)");
	if (parse_int(port, 1, 65535, &p) < 0)
		return usage_error(ctl, "--port: expected 1..65535, got '%s'", port);
	if (a->n_multi) {
		headers = json_object();
		for (size_t i = 0; i < a->n_multi; i++) {
			const char *eq = strchr(a->multi[i], '=');
			char name[256];

			if (!eq || eq == a->multi[i] || (size_t)(eq - a->multi[i]) >= sizeof(name)) {
				json_decref(headers);
				return usage_error(ctl, "--header: expected NAME=VALUE, got '%s'", a->multi[i]);
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
		return usage_error(ctl, "--from/--to: not valid UTF-8");
	}
	if (method)
		json_object_set_new(body, "method", json_string(method));
	if (path)
		json_object_set_new(body, "path", json_string(path));
	if (headers)
		json_object_set_new(body, "headers", headers);
	rc = api_call(ctl, "POST", "/v1/check", body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		print_json(r.json);
	else
		print_object(r.json, (const char *const[]){ "decision", "rule", NULL }, stdout);
	httpc_response_clear(&r);
	return 0;
}

/* ---------------------------------------------------------------- the command table */

static const struct ctl_opt no_opts[] = { { NULL, 0, NULL, false, NULL } };

static const struct ctl_opt policy_apply_opts[] = {
	{ "file", 'f', "FILE", false, "the policy document (JSON); - reads standard input" },
	{ "if-match", 0, "VERSION", false, "apply only if the stored policy is at VERSION (else 412)" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt policy_delete_opts[] = {
	{ "if-match", 0, "VERSION", false, "delete only if the stored policy is at VERSION (else 412)" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt token_create_opts[] = {
	{ "service", 0, "SERVICE", false, "the service the token enrols (required)" },
	{ "ttl", 0, "DURATION", false, "how long the token is valid: 90s, 15m, 1h, 7d or seconds (default 1h)" },
	{ "uses", 0, "N", false, "how many proxies may enrol with it (default 1)" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt certs_rotate_opts[] = {
	{ "service", 0, "SERVICE", false, "make the proxies of SERVICE renew their SVIDs now" },
	{ "all", 0, NULL, false, "make every proxy renew its SVID now" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt ca_rotate_opts[] = {
	{ "force", 0, NULL, false, "take the step although its gate is closed: switch while proxies "
	  "have not acknowledged the new root, or remove the old root while SVIDs it signed are "
	  "valid" },
	{ "auto", 0, NULL, false, "walk stable -> prepared -> switched -> stable, each step as soon "
	  "as its gate opens" },
	{ "timeout", 0, "DURATION", false, "with --auto: give up (exit 1) after this long "
	  "(default 3h); without --auto, the request timeout as before the command" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt endpoints_assign_opts[] = {
	{ "service", 0, "SERVICE", false, "the service the address is assigned to (required)" },
	{ NULL, 0, NULL, false, NULL },
};

static const struct ctl_opt check_opts[] = {
	{ "from", 0, "ID", false, "the caller's SPIFFE ID, e.g. spiffe://mesh.local/svc/frontend (required)" },
	{ "to", 0, "SERVICE", false, "the service whose policy decides (required)" },
	{ "port", 0, "PORT", false, "the application port called (required)" },
	{ "method", 0, "METHOD", false, "HTTP method (HTTP checks only)" },
	{ "path", 0, "PATH", false, "HTTP path (HTTP checks only)" },
	{ "header", 0, "NAME=VALUE", true, "an HTTP request header; may be repeated" },
	{ NULL, 0, NULL, false, NULL },
};

static const struct ctl_cmd commands[] = {
	{ "policy", "apply", "-f FILE [--if-match VERSION]", 0, 0, policy_apply_opts,
	  "create or replace the policy of the service named in FILE",
	  "Sends FILE to PUT /v1/policies/SERVICE, SERVICE being the file's \"service\" field.\n"
	  "The control validates it; an error names the JSON path of the offending value\n"
	  "(rules[1].ports[0]: must be 1..65535). Prints the service and its new version.",
	  cmd_policy_apply },
	{ "policy", "get", "SERVICE", 1, 1, no_opts,
	  "show the policy of SERVICE and its version",
	  "GET /v1/policies/SERVICE. The table shows the policy's rules (\"*\": any);\n"
	  "-o json prints {\"version\", \"policy\"} with the document as stored.",
	  cmd_policy_get },
	{ "policy", "delete", "SERVICE [--if-match VERSION]", 1, 1, policy_delete_opts,
	  "delete the policy of SERVICE",
	  "DELETE /v1/policies/SERVICE. Its proxies fall back to denying everything.",
	  cmd_policy_delete },
	{ "policy", "list", "", 0, 0, no_opts,
	  "list the services that have a policy, with their versions",
	  "GET /v1/policies.", cmd_policy_list },
	{ "token", "create", "--service SERVICE [--ttl 1h] [--uses 1]", 0, 0, token_create_opts,
	  "create a join token with which a new proxy of SERVICE enrols",
	  "POST /v1/tokens. The token is printed once and stored by the control only as a hash;\n"
	  "it carries the root's pin, so a proxy needs only the control URL and the token.",
	  cmd_token_create },
	{ "certs", "list", "", 0, 0, no_opts,
	  "list the SVIDs the control has issued",
	  "GET /v1/certs.", cmd_certs_list },
	{ "certs", "rotate", "(--service SERVICE | --all)", 0, 0, certs_rotate_opts,
	  "make proxies renew their SVIDs now",
	  "POST /v1/certs/rotate: the proxies of SERVICE (or all of them) renew at their next\n"
	  "config poll.", cmd_certs_rotate },
	{ "certs", "revoke", "SERIAL", 1, 1, no_opts,
	  "put an SVID's serial on the bundle's revocation list",
	  "POST /v1/certs/revoke. SERIAL is hex (as certs list shows it; ':' separators and\n"
	  "upper case are accepted). Every proxy refuses the certificate once it holds the new\n"
	  "bundle.", cmd_certs_revoke },
	{ "ca", "show", "", 0, 0, no_opts,
	  "show the roots of the trust bundle, the signing root and the rotation phase",
	  "GET /v1/ca. KEY_SHA256 is the SHA-256 of the root's public key, the pin that join\n"
	  "tokens carry.", cmd_ca_show },
	{ "ca", "rotate", "[--force] [--auto [--timeout DURATION]]", 0, 0, ca_rotate_opts,
	  "advance CA rotation by one phase and print the new phase",
	  "POST /v1/ca/rotate. Rotation has three steps, one per call:\n"
	  "  stable   -> prepared  a new root joins the trust bundle\n"
	  "  prepared -> switched  signing switches to the new root and every proxy renews;\n"
	  "                        refused (409) while a proxy seen within the last SVID\n"
	  "                        lifetime has not acknowledged the new root, unless --force\n"
	  "  switched -> stable    the old root leaves the bundle; refused while SVIDs it\n"
	  "                        signed are unexpired and unrevoked, unless --force\n"
	  "ca status shows what the next step waits for. --auto takes each step as soon as\n"
	  "its gate opens, until the phase is stable again (exit 1 after --timeout).",
	  cmd_ca_rotate },
	{ "ca", "status", "", 0, 0, no_opts,
	  "show the rotation phase and what the next ca rotate does",
	  "GET /v1/ca, summarised.", cmd_ca_status },
	{ "endpoints", "list", "", 0, 0, no_opts,
	  "list the registry: the proxies' entries and the admin's assignments",
	  "GET /v1/endpoints. An entry is what a proxy registered: its inbound address, the\n"
	  "application ports behind it, how it was allowed (via: connection, the IP the proxy\n"
	  "connects from; assignment, an address assigned below) and whether its SVID is live.",
	  cmd_endpoints_list },
	{ "endpoints", "add", "--service SERVICE ADDR", 1, 1, endpoints_assign_opts,
	  "assign ADDR (ip:port) to SERVICE: its proxies may register it from anywhere",
	  "POST /v1/endpoints/assign. A proxy may register only addresses on the IP it connects\n"
	  "to the control from; an address behind NAT or on another interface needs this.\n"
	  "No other service may register ADDR while it is assigned. Refused (exit 1) when ADDR\n"
	  "is assigned to another service or held by a live entry of another service.",
	  cmd_endpoints_add },
	{ "endpoints", "remove", "--service SERVICE ADDR", 1, 1, endpoints_assign_opts,
	  "withdraw the assignment of ADDR to SERVICE",
	  "POST /v1/endpoints/unassign. The entry the assignment allowed is removed with it.",
	  cmd_endpoints_remove },
	{ "proxies", "list", "", 0, 0, no_opts,
	  "list connected proxies: config version held, certificate expiry",
	  "GET /v1/proxies.", cmd_proxies_list },
	{ "check", NULL, "--from ID --to SERVICE --port PORT [--method M --path P] [--header NAME=VALUE]...",
	  0, 0, check_opts,
	  "dry run: would SERVICE's policy allow this call, and which rule decides",
	  "POST /v1/check, answered by the same evaluator the proxies run. Without --method\n"
	  "and --path the call is judged as a TCP connection. Exits 0 whatever the decision.",
	  cmd_check },
};
#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

/* ---------------------------------------------------------------- help */

static const struct ctl_opt global_opts[] = {
	{ "control", 0, "URL", false, "the control's API (env MESHLET_CONTROL; default " CTL_DEFAULT_CONTROL ")" },
	{ "ca", 0, "FILE", false, "PEM roots to verify the control with (env MESHLET_CA; default STATE_DIR/ca.pem)" },
	{ "token-file", 0, "FILE", false, "file holding the admin token (env MESHLET_TOKEN_FILE, or the token "
	  "itself in MESHLET_TOKEN; default STATE_DIR/admin.token)" },
	{ "state-dir", 0, "DIR", false, "the control's state directory, for the defaults above (env "
	  "MESHLET_STATE_DIR; default " CTL_DEFAULT_STATE_DIR ")" },
	{ "output", 'o', "table|json", false, "output format (default table)" },
	{ "timeout", 0, "DURATION", false, "give up on a request after DURATION (default 30s)" },
	{ "help", 'h', NULL, false, "show help (also after a command)" },
	{ "version", 0, NULL, false, "print the version" },
	{ NULL, 0, NULL, false, NULL },
};

static void print_opts(FILE *out, const struct ctl_opt *opts)
{
	for (size_t i = 0; opts[i].name; i++) {
		char left[64];

		if (opts[i].shortname)
			snprintf(left, sizeof(left), "-%c, --%s%s%s", opts[i].shortname, opts[i].name,
			         opts[i].arg ? " " : "", opts[i].arg ? opts[i].arg : "");
		else
			snprintf(left, sizeof(left), "    --%s%s%s", opts[i].name, opts[i].arg ? " " : "",
			         opts[i].arg ? opts[i].arg : "");
		if (strlen(left) > 24)
			fprintf(out, "  %s\n  %-24s  %s\n", left, "", opts[i].help);
		else
			fprintf(out, "  %-24s  %s\n", left, opts[i].help);
	}
}

static void cmd_words(const struct ctl_cmd *c, char *out, size_t len)
{
	snprintf(out, len, "%s%s%s", c->group, c->name ? " " : "", c->name ? c->name : "");
}

static void print_main_help(FILE *out)
{
	fprintf(out,
	        "Usage: meshletctl [OPTIONS] COMMAND [ARGS] [OPTIONS]\n"
	        "\n"
	        "Operator CLI of meshlet-control, the mesh's CA and policy store.\n"
	        "\n"
	        "Commands:\n");
	for (size_t i = 0; i < N_COMMANDS; i++) {
		char words[64], left[160];

		cmd_words(&commands[i], words, sizeof(words));
		snprintf(left, sizeof(left), "%s%s%s", words, commands[i].args[0] ? " " : "",
		         commands[i].args);
		fprintf(out, "  %s\n      %s\n", left, commands[i].summary);
	}
	fprintf(out, "\nOptions (before or after the command):\n");
	print_opts(out, global_opts);
	fprintf(out,
	        "\n"
	        "Environment: MESHLET_CONTROL, MESHLET_CA, MESHLET_TOKEN_FILE, MESHLET_TOKEN (the\n"
	        "admin token itself), MESHLET_STATE_DIR. Options win over the environment;\n"
	        "--token-file and MESHLET_TOKEN_FILE win over MESHLET_TOKEN.\n"
	        "Durations: 90s, 15m, 1h, 7d, combinations such as 1h30m, or plain seconds.\n"
	        "\n"
	        "Output: aligned tables; -o json prints the API's JSON answer.\n"
	        "\n"
	        "Exit status:\n"
	        "  0  success\n"
	        "  1  the control refused the request (its message, with the JSON path of the\n"
	        "     offending value when there is one, is printed to stderr), or it could not\n"
	        "     be reached or its certificate did not verify\n"
	        "  2  usage error (unknown command or option, missing or bad argument) or a\n"
	        "     local problem (unreadable file, no admin token or CA file)\n"
	        "\n"
	        "Run 'meshletctl COMMAND --help' for a command's options.\n");
}

static void print_group_help(FILE *out, const char *group)
{
	fprintf(out, "Usage: meshletctl %s COMMAND [ARGS] [OPTIONS]\n\nCommands:\n", group);
	for (size_t i = 0; i < N_COMMANDS; i++) {
		char words[64];

		if (strcmp(commands[i].group, group) != 0)
			continue;
		cmd_words(&commands[i], words, sizeof(words));
		fprintf(out, "  %s%s%s\n      %s\n", words, commands[i].args[0] ? " " : "",
		        commands[i].args, commands[i].summary);
	}
	fprintf(out, "\nRun 'meshletctl %s COMMAND --help' for details, 'meshletctl --help' for the\n"
	        "global options.\n", group);
}

static void print_cmd_help(FILE *out, const struct ctl_cmd *c)
{
	char words[64];

	cmd_words(c, words, sizeof(words));
	fprintf(out, "Usage: meshletctl %s%s%s [OPTIONS]\n\n%s.\n\n%s\n", words, c->args[0] ? " " : "",
	        c->args, c->summary, c->help);
	if (c->opts[0].name) {
		fprintf(out, "\nOptions:\n");
		print_opts(out, c->opts);
	}
	fprintf(out, "\nGlobal options:\n");
	print_opts(out, global_opts);
}

/* ---------------------------------------------------------------- argument parsing */

enum { GOPT_CONTROL, GOPT_CA, GOPT_TOKEN_FILE, GOPT_STATE_DIR, GOPT_OUTPUT, GOPT_TIMEOUT,
       GOPT_HELP, GOPT_VERSION };

/*
 * Matches argv[*i] against opts. Returns the option's index and sets *value
 * (consuming the next argument if needed), -1 when argv[*i] is not one of
 * opts, or -2 after printing a usage error (missing value, value given to a
 * flag).
 */
static int match_opt(const struct ctl *ctl, const struct ctl_opt *opts, int argc, char **argv,
                     int *i, const char **value)
{
	const char *a = argv[*i], *eq = NULL;
	size_t nlen;

	*value = NULL;
	if (a[0] != '-' || a[1] == '\0')
		return -1;
	if (a[1] != '-') {
		for (int k = 0; opts[k].name; k++) {
			if (!opts[k].shortname || a[1] != opts[k].shortname)
				continue;
			if (!opts[k].arg) {
				if (a[2])
					return -1;
				*value = "";
				return k;
			}
			if (a[2]) {
				*value = a + 2;
				return k;
			}
			if (*i + 1 >= argc) {
				usage_error(ctl, "option -%c needs an argument (%s)", opts[k].shortname, opts[k].arg);
				return -2;
			}
			*value = argv[++*i];
			return k;
		}
		return -1;
	}
	a += 2;
	eq = strchr(a, '=');
	nlen = eq ? (size_t)(eq - a) : strlen(a);
	for (int k = 0; opts[k].name; k++) {
		if (strlen(opts[k].name) != nlen || strncmp(opts[k].name, a, nlen) != 0)
			continue;
		if (!opts[k].arg) {
			if (eq) {
				usage_error(ctl, "option --%s takes no argument", opts[k].name);
				return -2;
			}
			*value = "";
			return k;
		}
		if (eq) {
			*value = eq + 1;
			return k;
		}
		if (*i + 1 >= argc) {
			usage_error(ctl, "option --%s needs an argument (%s)", opts[k].name, opts[k].arg);
			return -2;
		}
		*value = argv[++*i];
		return k;
	}
	return -1;
}

struct globals {
	const char *val[8];
};

/* Records a global option. Returns 0, or EXIT_USAGE after a message. */
static int set_global(struct ctl *ctl, struct globals *g, int k, const char *v)
{
	g->val[k] = v;
	if (k == GOPT_OUTPUT) {
		if (strcmp(v, "json") == 0)
			ctl->output = OUT_JSON;
		else if (strcmp(v, "table") == 0)
			ctl->output = OUT_TABLE;
		else
			return usage_error(ctl, "-o: expected table or json, got '%s'", v);
	} else if (k == GOPT_TIMEOUT) {
		long long s;

		if (parse_duration(v, &s) < 0 || s > 3600)
			return usage_error(ctl, "--timeout: expected a duration up to 1h (30s, 2m), got '%s'", v);
		ctl->timeout_ms = (int)(s * 1000);
	}
	return 0;
}

static const struct ctl_cmd *find_cmd(const char *group, const char *name)
{
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (strcmp(commands[i].group, group) == 0 &&
		    ((!commands[i].name && !name) ||
		     (commands[i].name && name && strcmp(commands[i].name, name) == 0)))
			return &commands[i];
	return NULL;
}

static bool group_has_subcommands(const char *group)
{
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (strcmp(commands[i].group, group) == 0)
			return commands[i].name != NULL;
	return false;
}

static bool group_exists(const char *group)
{
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (strcmp(commands[i].group, group) == 0)
			return true;
	return false;
}

static const char *env_or(const char *name, const char *dflt)
{
	const char *v = getenv(name);

	return v && *v ? v : dflt;
}

int main(int argc, char **argv)
{
	struct ctl ctl = { .prog = "meshletctl", .output = OUT_TABLE };
	struct globals g = { 0 };
	const struct ctl_cmd *cmd = NULL;
	struct ctl_args a = { 0 };
	const char *group = NULL, *sub = NULL, *v;
	bool only_positional = false;
	int i = 1, k, rc;

	signal(SIGPIPE, SIG_IGN);

	/* global options before the command */
	for (; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0) {
			i++;
			break;
		}
		k = match_opt(&ctl, global_opts, argc, argv, &i, &v);
		if (k == -2)
			return EXIT_USAGE;
		if (k == -1) {
			if (argv[i][0] == '-' && argv[i][1])
				return usage_error(&ctl, "unknown option '%s' (see meshletctl --help)", argv[i]);
			break;
		}
		if ((rc = set_global(&ctl, &g, k, v)))
			return rc;
	}
	if (g.val[GOPT_VERSION]) {
		printf("meshletctl %s\n", MESHLET_VERSION);
		return 0;
	}
	if (i >= argc) {
		if (g.val[GOPT_HELP]) {
			print_main_help(stdout);
			return 0;
		}
		print_main_help(stderr);
		return usage_error(&ctl, "no command given");
	}

	/* the command words */
	group = argv[i++];
	if (!group_exists(group))
		return usage_error(&ctl, "unknown command '%s' (see meshletctl --help)", group);
	if (group_has_subcommands(group)) {
		if (i >= argc || argv[i][0] == '-') {
			bool help = g.val[GOPT_HELP] != NULL;

			for (int j = i; j < argc; j++)
				if (strcmp(argv[j], "--help") == 0 || strcmp(argv[j], "-h") == 0)
					help = true;
			if (help) {
				print_group_help(stdout, group);
				return 0;
			}
			print_group_help(stderr, group);
			return usage_error(&ctl, "%s: missing subcommand", group);
		}
		sub = argv[i++];
		cmd = find_cmd(group, sub);
		if (!cmd) {
			print_group_help(stderr, group);
			return usage_error(&ctl, "unknown command '%s %s'", group, sub);
		}
	} else {
		cmd = find_cmd(group, NULL);
	}
	if (g.val[GOPT_HELP]) {
		print_cmd_help(stdout, cmd);
		return 0;
	}

	/* the command's own options, its arguments, and global options anywhere */
	for (; i < argc; i++) {
		if (!only_positional && strcmp(argv[i], "--") == 0) {
			only_positional = true;
			continue;
		}
		if (!only_positional && argv[i][0] == '-' && argv[i][1]) {
			k = match_opt(&ctl, cmd->opts, argc, argv, &i, &v);
			if (k == -2)
				return EXIT_USAGE;
			if (k >= 0) {
				if (cmd->opts[k].repeat) {
					if (a.n_multi >= CTL_MAX_MULTI)
						return usage_error(&ctl, "too many --%s options", cmd->opts[k].name);
					a.multi[a.n_multi++] = v;
				}
				a.val[k] = v;
				continue;
			}
			k = match_opt(&ctl, global_opts, argc, argv, &i, &v);
			if (k == -2)
				return EXIT_USAGE;
			if (k == GOPT_HELP) {
				print_cmd_help(stdout, cmd);
				return 0;
			}
			if (k >= 0) {
				if ((rc = set_global(&ctl, &g, k, v)))
					return rc;
				continue;
			}
			return usage_error(&ctl, "%s%s%s: unknown option '%s' (see meshletctl %s%s%s --help)",
			                   cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", argv[i],
			                   cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "");
		}
		if (a.n_pos >= cmd->max_pos || a.n_pos >= CTL_MAX_POS)
			return usage_error(&ctl, "%s%s%s: unexpected argument '%s' (usage: meshletctl %s%s%s %s)",
			                   cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", argv[i],
			                   cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", cmd->args);
		a.pos[a.n_pos++] = argv[i];
	}
	if (g.val[GOPT_VERSION]) {
		printf("meshletctl %s\n", MESHLET_VERSION);
		return 0;
	}
	if (a.n_pos < cmd->min_pos)
		return usage_error(&ctl, "%s%s%s: missing argument (usage: meshletctl %s%s%s %s)",
		                   cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "",
		                   cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", cmd->args);
	for (size_t p = 0; p < a.n_pos; p++)
		if (!a.pos[p][0])
			return usage_error(&ctl, "%s: empty argument", cmd->group);

	ctl.control = g.val[GOPT_CONTROL] ? g.val[GOPT_CONTROL] : env_or("MESHLET_CONTROL", CTL_DEFAULT_CONTROL);
	ctl.ca_file = g.val[GOPT_CA] ? g.val[GOPT_CA] : env_or("MESHLET_CA", NULL);
	ctl.token_file = g.val[GOPT_TOKEN_FILE] ? g.val[GOPT_TOKEN_FILE] : env_or("MESHLET_TOKEN_FILE", NULL);
	ctl.state_dir = g.val[GOPT_STATE_DIR] ? g.val[GOPT_STATE_DIR] : env_or("MESHLET_STATE_DIR", NULL);
	if (!ctl.timeout_ms) {
		const char *t = getenv("MESHLET_TIMEOUT");
		long long s;

		ctl.timeout_ms = HTTPC_TIMEOUT_MS_DEFAULT;
		if (t && *t && parse_duration(t, &s) == 0 && s <= 3600)
			ctl.timeout_ms = (int)(s * 1000);
	}

	rc = cmd->run(&ctl, cmd, &a);
	httpc_free(ctl.http);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		fprintf(stderr, "meshletctl: cannot write the output: %s\n", strerror(errno));
		return rc ? rc : EXIT_USAGE;
	}
	return rc;
}
