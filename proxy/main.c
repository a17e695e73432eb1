/* meshlet-proxy: the sidecar. Thin: parse arguments, validate, run. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/config.h"
#include "meshlet/log.h"
#include "meshlet/tls.h"
#include "proxy.h"
#include "snapshot.h"

static void usage(FILE *out)
{
	fprintf(out,
	        "usage: meshlet-proxy -c FILE [--check-config]\n"
	        "\n"
	        "  -c, --config FILE   proxy configuration (JSON), see README.md\n"
	        "      --check-config  validate the configuration, policy and certificates, then exit\n"
	        "  -h, --help          this text\n"
	        "  -V, --version       print the version\n"
	        "\n"
	        "Signals: SIGHUP reloads the file, SIGTERM drains and exits 0.\n");
}

/* Full validation: config, policy, certificates, as start-up would load them. */
static int check_config(const char *file)
{
	struct meshlet_err err = { { 0 }, { 0 } };
	struct config *cfg = NULL;
	struct metrics *m = metrics_new();
	struct snapshot *s = NULL;
	char msg[600];
	int rc = 1;

	if (tls_init() < 0 || !m)
		goto out;
	struct snapshot_source src = { 0 };

	if (config_load(file, &cfg, &err) < 0)
		goto out;
	if (!cfg->has_tls) {
		/* Control mode: certificates and policy come from control at run time. */
		printf("%s: ok (control mode, %s)\n", file, cfg->control_url);
		config_free(cfg);
		rc = 0;
		goto out;
	}
	if (snapshot_source_from_files(cfg, &src, &err) < 0) {
		config_free(cfg);
		snapshot_source_free(&src);
		goto out;
	}
	s = snapshot_build(cfg, &src, m, 1, &err);
	if (!s)
		goto out;
	printf("%s: ok (%s, %zu inbound, %zu outbound)\n", file, s->self_id, s->cfg->n_inbound,
	       s->cfg->n_outbound);
	rc = 0;
out:
	if (rc)
		fprintf(stderr, "%s: %s\n", file, err_str(&err, msg, sizeof(msg)));
	snapshot_unref(s);
	metrics_free(m);
	return rc;
}

/* Log level from the file before anything else logs; errors surface later. */
static enum log_level level_of(const char *file)
{
	struct meshlet_err err;
	struct config *cfg = NULL;
	enum log_level lvl = LOG_INFO;

	if (config_load(file, &cfg, &err) == 0) {
		lvl = (enum log_level)cfg->log_level;
		config_free(cfg);
	}
	return lvl;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check-config", no_argument, NULL, 'k' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *file = NULL;
	int check = 0, o;

	while ((o = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
		switch (o) {
		case 'c': file = optarg; break;
		case 'k': check = 1; break;
		case 'h': usage(stdout); return 0;
		case 'V': printf("meshlet-proxy %s\n", MESHLET_VERSION); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!file || optind != argc) {
		usage(stderr);
		return 2;
	}
	log_init(LOG_INFO, "meshlet-proxy");
	if (check)
		return check_config(file);
	log_set_level(level_of(file));
	return proxy_run(file);
}
