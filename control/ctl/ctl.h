/*
 * ctl.h: what the files of meshletctl share (a program's private header,
 * not an interface).
 *
 *   ctl_main.c          main(): parse, run one command, flush
 *   ctl_args.c          the command line: options, command words, help
 *   ctl_commands.c      the command table: words, options, help, handler
 *   ctl_client.c        talking to control: token, CA file, one API call,
 *                       messages and exit codes
 *   ctl_render.c        output: aligned tables and JSON
 *   ctl_cmd_policy.c    policy apply|get|delete|list, check; apply and
 *                       delete of any versioned document (ctl_doc_*)
 *   ctl_cmd_traffic.c   traffic apply|get|delete|list
 *   ctl_cmd_certs.c     token create, certs list|rotate|revoke
 *   ctl_cmd_ca.c        ca show|status|rotate (and rotate --auto)
 *   ctl_cmd_registry.c  endpoints list|add|remove, proxies list
 *   ctl_cmd_top.c       top: GET /v1/stats as a live table
 *   ctl_cmd_dashboard.c dashboard: the web UI's server and its relay to control
 *   ctl_cmd_status.c    status: every control replica of --control and its store
 *
 * Exit codes: 0 success; EXIT_REFUSED (1) the control refused the request
 * or could not be reached; EXIT_USAGE (2) usage errors and local problems.
 * Functions that return an int exit code print why before returning it.
 */
#ifndef MESHLET_CTL_H
#define MESHLET_CTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include <jansson.h>

#include "meshlet/httpc.h"

#ifndef MESHLET_VERSION
#define MESHLET_VERSION "0.1.0"
#endif

#define EXIT_REFUSED 1
#define EXIT_USAGE 2

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
	const char *control;       /* URL, or several: URL,URL (control replicas) */
	size_t control_at;         /* index of the URL in use; see ctl_control_url() */
	char control_url[512];     /* that URL */
	const char *ca_file;       /* NULL: <state dir>/ca.pem */
	const char *token_file;    /* NULL: MESHLET_TOKEN, else <state dir>/admin.token */
	const char *state_dir;
	enum ctl_output output;
	int timeout_ms;
	struct httpc *http;     /* opened by ctl_connect() */
};

/* Control replicas one --control may list. */
#define CTL_CONTROLS_MAX 16

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

/* Returned by ctl_parse_args when the command is to run. */
#define CTL_RUN (-1)

/* ctl_args.c */
/* Parses argv: global options, the command words, the command's options
 * and arguments, then the environment's defaults. Returns CTL_RUN with
 * *cmd and *a set, or an exit status after printing help, the version or
 * a usage error. */
int ctl_parse_args(struct ctl *ctl, int argc, char **argv, const struct ctl_cmd **cmd,
                   struct ctl_args *a);
/* The value of cmd's option name in a, or NULL when it was not given. */
const char *ctl_arg(const struct ctl_cmd *cmd, const struct ctl_args *a, const char *name);
/* A duration as api_parse_duration() reads it, 1 s .. 100 years: 0 and
 * *secs, or -1 (callers print their own message). */
int ctl_parse_duration(const char *s, long long *secs);
/* A decimal integer in [min, max]: 0 and *out, or -1. */
int ctl_parse_int(const char *s, long long min, long long max, long long *out);

/* ctl_commands.c */
extern const struct ctl_cmd ctl_commands[];
extern const size_t ctl_n_commands;

/* ctl_client.c */
__attribute__((format(printf, 2, 3)))
int ctl_usage_error(const struct ctl *ctl, const char *fmt, ...);
__attribute__((format(printf, 2, 3)))
int ctl_refused(const struct ctl *ctl, const char *fmt, ...);
/* A whole file (or stdin for "-") of at most max bytes: a malloc'd
 * NUL-terminated buffer and *len, or NULL with errno set (EFBIG over max). */
char *ctl_read_file(const char *path, size_t max, size_t *len);
/* Opens the HTTPS client (CA file and token loaded). 0 or EXIT_USAGE. */
int ctl_connect(struct ctl *ctl);
/* Prints the API's error of a non-2xx answer; returns EXIT_REFUSED. */
int ctl_api_error(const struct ctl *ctl, const struct httpc_response *r);
/* Moves to the next URL of --control (after why, printed), dropping the
 * client; false when there is none left. */
bool ctl_next_control(struct ctl *ctl, const char *why);
/* One API call: 0 with *resp filled on a 2xx answer (the caller clears
 * it), else the exit code after printing why. With several --control
 * URLs, one that cannot be reached or answers 5xx hands the call to the
 * next. */
int ctl_api_call(struct ctl *ctl, const char *method, const char *path, const json_t *body,
                 const char *raw, size_t raw_len, const char *const *headers,
                 struct httpc_response *resp);
/* prefix followed by the escaped segment seg into out: 0 or EXIT_USAGE. */
int ctl_api_path(const struct ctl *ctl, char *out, size_t len, const char *prefix,
                 const char *seg);
/* Sends body (taken over; NULL: out of memory) and shows the answer: as
 * JSON with -o json; else its fields as a row (cols first), or text when
 * the answer is empty, or text alone when cols is NULL. 0 or exit code. */
int ctl_send(struct ctl *ctl, const char *method, const char *path, json_t *body,
             const char *const *cols, const char *text);
/* GET path and print the list under key (cols first) or as JSON. */
int ctl_list_command(struct ctl *ctl, const char *path, const char *key,
                     const char *const *cols);

/* ctl_render.c */
struct ctl_table {
	size_t ncols, nrows, cap;
	char **cells;              /* row-major; row 0 is the header */
};
/* A copy of s (NULL: "") with control characters replaced, for a cell;
 * exits with EXIT_USAGE when out of memory. */
char *ctl_cell_dup(const char *s);
void ctl_table_init(struct ctl_table *t, size_t ncols);
/* Adds a row of t->ncols cells (copied). The first row is the header. */
void ctl_table_add(struct ctl_table *t, const char *const *cells);
void ctl_table_print(struct ctl_table *t, FILE *out);
void ctl_table_free(struct ctl_table *t);
/* A JSON value as a table cell (malloc'd). */
char *ctl_json_cell(const json_t *v);
/* An array of objects as a table, preferred columns first. */
void ctl_print_list(const json_t *arr, const char *const *preferred, bool only_preferred,
                    FILE *out);
/* An object's scalar fields as one row, and each array of objects it holds
 * as a table of its own. */
void ctl_print_object(const json_t *obj, const char *const *preferred, FILE *out);
/* v as indented JSON on stdout. */
void ctl_print_json(const json_t *v);

/* A kind of versioned document (policy, traffic): apply -f FILE
 * [--if-match V] PUTs FILE to api_prefix + its "service"; delete SERVICE
 * [--if-match V]. Both return an exit code (ctl_cmd_policy.c). */
struct ctl_doc_kind {
	const char *noun;          /* "policy" */
	const char *api_prefix;    /* "/v1/policies/" */
	const char *service_is;    /* what "service" names, for the usage error */
};
int ctl_doc_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a,
                  const struct ctl_doc_kind *k);
int ctl_doc_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a,
                   const struct ctl_doc_kind *k);

/* The handlers of the command table (ctl_cmd_*.c). */
int ctl_cmd_policy_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_policy_get(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_policy_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_policy_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_traffic_apply(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_traffic_get(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_traffic_delete(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_traffic_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_token_create(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_certs_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_certs_rotate(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_certs_revoke(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_ca_show(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_ca_rotate(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_ca_status(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_status(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_endpoints_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_endpoints_add(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_endpoints_remove(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_proxies_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_check(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_top(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);
int ctl_cmd_dashboard(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a);

#endif
