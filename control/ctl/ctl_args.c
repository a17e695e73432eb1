/*
 * meshletctl's command line (see ctl.h):
 *
 *   meshletctl [GLOBAL OPTIONS] COMMAND [SUBCOMMAND] [ARGS] [OPTIONS]
 *
 * Global options come before the command or anywhere after it; a command's
 * own options and arguments after its words; "--" ends the options. Help
 * (--help, -h, or a group without its subcommand) is printed from the
 * command table, so usage and help never disagree with what is parsed.
 */
#include "ctl.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/api.h"

/* ---------------------------------------------------------------- small parsers */

/* The longest duration any option takes (the API checks its own limits). */
#define CTL_DURATION_MAX (100LL * 366 * 86400)

/* A duration as api_parse_duration() reads it, 1 s .. 100 years. Returns
 * 0 and *secs, or -1 (callers print their own message). */
int ctl_parse_duration(const char *s, long long *secs)
{
	int64_t v;

	if (api_parse_duration(s, 1, CTL_DURATION_MAX, &v, NULL) < 0)
		return -1;
	*secs = (long long)v;
	return 0;
}

int ctl_parse_int(const char *s, long long min, long long max, long long *out)
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

/* ---------------------------------------------------------------- option lookup */

static int opt_index(const struct ctl_cmd *cmd, const char *name)
{
	for (int i = 0; cmd->opts && cmd->opts[i].name; i++)
		if (strcmp(cmd->opts[i].name, name) == 0)
			return i;
	return -1;
}

/* The value of option name, or NULL when it was not given. */
const char *ctl_arg(const struct ctl_cmd *cmd, const struct ctl_args *a, const char *name)
{
	int i = opt_index(cmd, name);

	return i < 0 ? NULL : a->val[i];
}

/* ---------------------------------------------------------------- help */

static const struct ctl_opt global_opts[] = {
	{ "control", 0, "URL[,URL]", false, "the control's API, or several replicas tried in order (env "
	  "MESHLET_CONTROL; default " CTL_DEFAULT_CONTROL ")" },
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
	for (size_t i = 0; i < ctl_n_commands; i++) {
		char words[64], left[160];

		cmd_words(&ctl_commands[i], words, sizeof(words));
		snprintf(left, sizeof(left), "%s%s%s", words, ctl_commands[i].args[0] ? " " : "",
		         ctl_commands[i].args);
		fprintf(out, "  %s\n      %s\n", left, ctl_commands[i].summary);
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
	for (size_t i = 0; i < ctl_n_commands; i++) {
		char words[64];

		if (strcmp(ctl_commands[i].group, group) != 0)
			continue;
		cmd_words(&ctl_commands[i], words, sizeof(words));
		fprintf(out, "  %s%s%s\n      %s\n", words, ctl_commands[i].args[0] ? " " : "",
		        ctl_commands[i].args, ctl_commands[i].summary);
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
				ctl_usage_error(ctl, "option -%c needs an argument (%s)", opts[k].shortname, opts[k].arg);
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
				ctl_usage_error(ctl, "option --%s takes no argument", opts[k].name);
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
			ctl_usage_error(ctl, "option --%s needs an argument (%s)", opts[k].name, opts[k].arg);
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
			return ctl_usage_error(ctl, "-o: expected table or json, got '%s'", v);
	} else if (k == GOPT_TIMEOUT) {
		long long s;

		if (ctl_parse_duration(v, &s) < 0 || s > 3600)
			return ctl_usage_error(ctl, "--timeout: expected a duration up to 1h (30s, 2m), got '%s'", v);
		ctl->timeout_ms = (int)(s * 1000);
	}
	return 0;
}

static const struct ctl_cmd *find_cmd(const char *group, const char *name)
{
	for (size_t i = 0; i < ctl_n_commands; i++)
		if (strcmp(ctl_commands[i].group, group) == 0 &&
		    ((!ctl_commands[i].name && !name) ||
		     (ctl_commands[i].name && name && strcmp(ctl_commands[i].name, name) == 0)))
			return &ctl_commands[i];
	return NULL;
}

static bool group_has_subcommands(const char *group)
{
	for (size_t i = 0; i < ctl_n_commands; i++)
		if (strcmp(ctl_commands[i].group, group) == 0)
			return ctl_commands[i].name != NULL;
	return false;
}

static bool group_exists(const char *group)
{
	for (size_t i = 0; i < ctl_n_commands; i++)
		if (strcmp(ctl_commands[i].group, group) == 0)
			return true;
	return false;
}

static const char *env_or(const char *name, const char *dflt)
{
	const char *v = getenv(name);

	return v && *v ? v : dflt;
}

/* Global options before the command; *i ends at the first command word. */
static int parse_globals(struct ctl *ctl, struct globals *g, int argc, char **argv, int *i)
{
	const char *v;
	int k, rc;

	for (; *i < argc; (*i)++) {
		if (strcmp(argv[*i], "--") == 0) {
			(*i)++;
			break;
		}
		k = match_opt(ctl, global_opts, argc, argv, i, &v);
		if (k == -2)
			return EXIT_USAGE;
		if (k == -1) {
			if (argv[*i][0] == '-' && argv[*i][1])
				return ctl_usage_error(ctl, "unknown option '%s' (see meshletctl --help)", argv[*i]);
			break;
		}
		if ((rc = set_global(ctl, g, k, v)))
			return rc;
	}
	if (g->val[GOPT_VERSION]) {
		printf("meshletctl %s\n", MESHLET_VERSION);
		return 0;
	}
	if (*i >= argc) {
		if (g->val[GOPT_HELP]) {
			print_main_help(stdout);
			return 0;
		}
		print_main_help(stderr);
		return ctl_usage_error(ctl, "no command given");
	}
	return CTL_RUN;
}

/* The command words from argv[*i] on: *cmd. */
static int parse_words(struct ctl *ctl, const struct globals *g, int argc, char **argv, int *i,
                       const struct ctl_cmd **cmd)
{
	const char *group = argv[(*i)++], *sub;

	if (!group_exists(group))
		return ctl_usage_error(ctl, "unknown command '%s' (see meshletctl --help)", group);
	if (group_has_subcommands(group)) {
		if (*i >= argc || argv[*i][0] == '-') {
			bool help = g->val[GOPT_HELP] != NULL;

			for (int j = *i; j < argc; j++)
				if (strcmp(argv[j], "--help") == 0 || strcmp(argv[j], "-h") == 0)
					help = true;
			if (help) {
				print_group_help(stdout, group);
				return 0;
			}
			print_group_help(stderr, group);
			return ctl_usage_error(ctl, "%s: missing subcommand", group);
		}
		sub = argv[(*i)++];
		*cmd = find_cmd(group, sub);
		if (!*cmd) {
			print_group_help(stderr, group);
			return ctl_usage_error(ctl, "unknown command '%s %s'", group, sub);
		}
	} else {
		*cmd = find_cmd(group, NULL);
	}
	if (g->val[GOPT_HELP]) {
		print_cmd_help(stdout, *cmd);
		return 0;
	}
	return CTL_RUN;
}

/* One option of cmd (or a global one) at argv[*i] into a. */
static int parse_cmd_opt(struct ctl *ctl, struct globals *g, const struct ctl_cmd *cmd, int argc,
                         char **argv, int *i, struct ctl_args *a)
{
	const char *v;
	int k = match_opt(ctl, cmd->opts, argc, argv, i, &v), rc;

	if (k == -2)
		return EXIT_USAGE;
	if (k >= 0) {
		if (cmd->opts[k].repeat) {
			if (a->n_multi >= CTL_MAX_MULTI)
				return ctl_usage_error(ctl, "too many --%s options", cmd->opts[k].name);
			a->multi[a->n_multi++] = v;
		}
		a->val[k] = v;
		return CTL_RUN;
	}
	k = match_opt(ctl, global_opts, argc, argv, i, &v);
	if (k == -2)
		return EXIT_USAGE;
	if (k == GOPT_HELP) {
		print_cmd_help(stdout, cmd);
		return 0;
	}
	if (k >= 0) {
		if ((rc = set_global(ctl, g, k, v)))
			return rc;
		return CTL_RUN;
	}
	return ctl_usage_error(ctl, "%s%s%s: unknown option '%s' (see meshletctl %s%s%s --help)",
	                       cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", argv[*i],
	                       cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "");
}

/* The command's own options, its arguments, and global options anywhere. */
static int parse_cmd_args(struct ctl *ctl, struct globals *g, const struct ctl_cmd *cmd, int argc,
                          char **argv, int i, struct ctl_args *a)
{
	bool only_positional = false;
	int rc;

	for (; i < argc; i++) {
		if (!only_positional && strcmp(argv[i], "--") == 0) {
			only_positional = true;
			continue;
		}
		if (!only_positional && argv[i][0] == '-' && argv[i][1]) {
			if ((rc = parse_cmd_opt(ctl, g, cmd, argc, argv, &i, a)) != CTL_RUN)
				return rc;
			continue;
		}
		if (a->n_pos >= cmd->max_pos || a->n_pos >= CTL_MAX_POS)
			return ctl_usage_error(ctl, "%s%s%s: unexpected argument '%s' (usage: meshletctl %s%s%s %s)",
			                       cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", argv[i],
			                       cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", cmd->args);
		a->pos[a->n_pos++] = argv[i];
	}
	if (g->val[GOPT_VERSION]) {
		printf("meshletctl %s\n", MESHLET_VERSION);
		return 0;
	}
	if (a->n_pos < cmd->min_pos)
		return ctl_usage_error(ctl, "%s%s%s: missing argument (usage: meshletctl %s%s%s %s)",
		                       cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "",
		                       cmd->group, cmd->name ? " " : "", cmd->name ? cmd->name : "", cmd->args);
	for (size_t p = 0; p < a->n_pos; p++)
		if (!a->pos[p][0])
			return ctl_usage_error(ctl, "%s: empty argument", cmd->group);
	return CTL_RUN;
}

/* Options win over the environment, the environment over the defaults. */
static void apply_env(struct ctl *ctl, const struct globals *g)
{
	ctl->control = g->val[GOPT_CONTROL] ? g->val[GOPT_CONTROL] : env_or("MESHLET_CONTROL", CTL_DEFAULT_CONTROL);
	ctl->ca_file = g->val[GOPT_CA] ? g->val[GOPT_CA] : env_or("MESHLET_CA", NULL);
	ctl->token_file = g->val[GOPT_TOKEN_FILE] ? g->val[GOPT_TOKEN_FILE] : env_or("MESHLET_TOKEN_FILE", NULL);
	ctl->state_dir = g->val[GOPT_STATE_DIR] ? g->val[GOPT_STATE_DIR] : env_or("MESHLET_STATE_DIR", NULL);
	if (!ctl->timeout_ms) {
		const char *t = getenv("MESHLET_TIMEOUT");
		long long s;

		ctl->timeout_ms = HTTPC_TIMEOUT_MS_DEFAULT;
		if (t && *t && ctl_parse_duration(t, &s) == 0 && s <= 3600)
			ctl->timeout_ms = (int)(s * 1000);
	}
}

int ctl_parse_args(struct ctl *ctl, int argc, char **argv, const struct ctl_cmd **cmd,
                   struct ctl_args *a)
{
	struct globals g = { 0 };
	int i = 1, rc;

	if ((rc = parse_globals(ctl, &g, argc, argv, &i)) != CTL_RUN ||
	    (rc = parse_words(ctl, &g, argc, argv, &i, cmd)) != CTL_RUN ||
	    (rc = parse_cmd_args(ctl, &g, *cmd, argc, argv, i, a)) != CTL_RUN)
		return rc;
	apply_env(ctl, &g);
	return CTL_RUN;
}
