/*
 * meshlet-control: the mesh's certificate authority, policy store and
 * HTTPS JSON API. See docs/design.md and control/README.md.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/api.h"
#include "meshlet/kek.h"
#include "meshlet/log.h"
#include "server.h"
#include "state.h"

#ifndef MESHLET_VERSION
#define MESHLET_VERSION "dev"
#endif

static void usage(FILE *f)
{
	fprintf(f,
	        "usage: meshlet-control --state-dir DIR --trust-domain TD [options]\n"
	        "       meshlet-control init-kek FILE\n"
	        "\n"
	        "The meshlet control plane: certificate authority, policy store and HTTPS API.\n"
	        "\n"
	        "  --listen ADDR        address to serve HTTPS on, host:port or [v6]:port\n"
	        "                       (default 0.0.0.0:7443; port 0 picks a free one)\n"
	        "  --state-dir DIR      CA keys, admin token and state (created 0700 on first start)\n"
	        "  --trust-domain TD    the mesh's SPIFFE trust domain, e.g. mesh.local\n"
	        "  --san NAME           DNS name or IP address for control's server certificate;\n"
	        "                       repeatable (localhost, 127.0.0.1 and ::1 are always included)\n"
	        "  --svid-ttl DURATION  lifetime of issued SVIDs: 90s, 15m, 1h, or seconds (default 1h)\n"
	        "  --store sqlite:PATH  the state database (default sqlite:DIR/state.db)\n"
	        "  --store etcd:URL[,URL...]\n"
	        "                       the state in an etcd cluster (http:// or https:// client\n"
	        "                       URLs), shared by any number of replicas; needs --kek-file\n"
	        "  --etcd-prefix P      keys under P in etcd (default /meshlet/)\n"
	        "  --etcd-cacert FILE   https: the CA certificates etcd's certificate chains to\n"
	        "  --etcd-cert FILE     https: a client certificate for etcd, with --etcd-key FILE\n"
	        "  --kek-file FILE      the key encryption key (32 bytes, mode 0600) that seals the\n"
	        "                       CA keys in etcd; every replica needs the same file\n"
	        "  --admin-token-file FILE\n"
	        "                       etcd: the admin token (one line of 16..%d characters, mode\n"
	        "                       0600) to initialise the store with (only its SHA-256 is\n"
	        "                       stored), or that the store's must equal; give every\n"
	        "                       replica and operator the same file\n"
	        "  --log-level LEVEL    debug, info, warn or error (default info)\n"
	        "  --max-connections N  open connections at most (default %d, up to %d); an\n"
	        "                       eighth of them (at least %d) is never used by long polls,\n"
	        "                       for admin calls and handshakes\n"
	        "  --max-polls N        long polls waiting at once, in all (default: the rest)\n"
	        "  --max-polls-per-service N\n"
	        "                       long polls waiting at once per service (default %d)\n"
	        "  --max-polls-per-cert N\n"
	        "                       long polls waiting at once per client certificate, i.e.\n"
	        "                       per proxy instance (default %d); over a limit: 429\n"
	        "  --max-endpoints-per-service N\n"
	        "                       registry entries one service may hold (default %d; each\n"
	        "                       proxy holds at most %d)\n"
	        "  --metrics-listen ADDR\n"
	        "                       also serve Prometheus metrics at http://ADDR/metrics: plain\n"
	        "                       HTTP without authentication, so a loopback address or a\n"
	        "                       network only Prometheus reaches (default: not served)\n"
	        "  --help               this text\n"
	        "  --version            the version\n"
	        "\n"
	        "First start creates DIR/ca.key (0600), DIR/ca-0.pem, DIR/ca.pem (the trust bundle\n"
	        "clients of control use as CA file) and DIR/admin.token (0600). On etcd the first\n"
	        "replica to find the store empty initialises it (the root CA, its key sealed under\n"
	        "the KEK, the admin token's digest) and writes DIR/admin.token (none with\n"
	        "--admin-token-file); the others load it.\n"
	        "init-kek FILE creates a new KEK file (never overwrites one). Logs go to stderr;\n"
	        "one JSON line per API request goes to stdout. SIGTERM or SIGINT stop it.\n",
	        ADMIN_TOKEN_MAX, SERVER_MAX_CONNS, SERVER_MAX_CONNS_LIMIT, SERVER_MIN_RESERVE,
	        SERVER_POLLS_PER_SERVICE,
	        SERVER_POLLS_PER_CERT,
	        CONTROL_ENDPOINTS_PER_SERVICE_DEFAULT, CONTROL_ENDPOINTS_PER_INSTANCE);
}

/* Parses the command line into o. Returns 0, 1 (--help/--version: exit 0)
 * or -1 (usage error, reported). */
/* A count for --NAME: 1..max. */
static int parse_count(const char *name, const char *s, size_t max, size_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (!*s || *end || errno || s[0] == '-' || v < 1 || v > max) {
		fprintf(stderr, "meshlet-control: --%s: expected a number 1..%zu\n", name, max);
		return -1;
	}
	*out = (size_t)v;
	return 0;
}

static int parse_args(int argc, char **argv, struct control_opts *o, struct server_limits *lim)
{
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "state-dir", required_argument, NULL, 'd' },
		{ "trust-domain", required_argument, NULL, 't' },
		{ "san", required_argument, NULL, 's' },
		{ "svid-ttl", required_argument, NULL, 'T' },
		{ "store", required_argument, NULL, 'S' },
		{ "log-level", required_argument, NULL, 'L' },
		{ "max-connections", required_argument, NULL, 'C' },
		{ "max-polls", required_argument, NULL, 'P' },
		{ "max-polls-per-service", required_argument, NULL, 'Q' },
		{ "max-polls-per-cert", required_argument, NULL, 'R' },
		{ "max-endpoints-per-service", required_argument, NULL, 'E' },
		{ "metrics-listen", required_argument, NULL, 'M' },
		{ "etcd-prefix", required_argument, NULL, 'X' },
		{ "etcd-cacert", required_argument, NULL, 'A' },
		{ "etcd-cert", required_argument, NULL, 'c' },
		{ "etcd-key", required_argument, NULL, 'k' },
		{ "kek-file", required_argument, NULL, 'K' },
		{ "admin-token-file", required_argument, NULL, 'a' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	struct meshlet_err e = {0};
	int c;

	memset(o, 0, sizeof(*o));
	server_limits_default(lim);
	o->listen = "0.0.0.0:7443";
	o->svid_ttl = CONTROL_SVID_TTL_DEFAULT;
	o->log_level = LOG_INFO;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (c) {
		case 'l': o->listen = optarg; break;
		case 'M': o->metrics_listen = optarg; break;
		case 'd': o->state_dir = optarg; break;
		case 't': o->trust_domain = optarg; break;
		case 's':
			if (o->n_sans >= CONTROL_MAX_SANS) {
				fprintf(stderr, "meshlet-control: at most %d --san\n", CONTROL_MAX_SANS);
				return -1;
			}
			o->sans[o->n_sans++] = optarg;
			break;
		case 'T':
			if (api_parse_duration(optarg, CONTROL_SVID_TTL_MIN, CA_TTL_MAX, &o->svid_ttl,
			                       &e) < 0) {
				fprintf(stderr, "meshlet-control: --svid-ttl: %s\n", e.message);
				return -1;
			}
			break;
		case 'S':
			if (strncmp(optarg, "sqlite:", 7) == 0 && optarg[7]) {
				o->store_path = optarg + 7;
			} else if (strncmp(optarg, "etcd:", 5) == 0 && optarg[5]) {
				o->etcd.endpoints = optarg + 5;
			} else {
				fprintf(stderr, "meshlet-control: --store: expected sqlite:PATH or "
				        "etcd:http://HOST:PORT[,...]\n");
				return -1;
			}
			break;
		case 'X': o->etcd.prefix = optarg; break;
		case 'A': o->etcd.cacert = optarg; break;
		case 'c': o->etcd.cert = optarg; break;
		case 'k': o->etcd.key = optarg; break;
		case 'K': o->kek_file = optarg; break;
		case 'a': o->admin_token_file = optarg; break;
		case 'L':
			if (log_level_parse(optarg, &o->log_level) < 0) {
				fprintf(stderr, "meshlet-control: --log-level: debug, info, warn or error\n");
				return -1;
			}
			break;
		case 'C':
			if (parse_count("max-connections", optarg, SERVER_MAX_CONNS_LIMIT, &lim->max_conns) < 0)
				return -1;
			break;
		case 'P':
			if (parse_count("max-polls", optarg, SERVER_MAX_CONNS_LIMIT, &lim->polls_total) < 0)
				return -1;
			break;
		case 'Q':
			if (parse_count("max-polls-per-service", optarg, SERVER_MAX_CONNS_LIMIT,
			                &lim->polls_per_service) < 0)
				return -1;
			break;
		case 'R':
			if (parse_count("max-polls-per-cert", optarg, SERVER_MAX_CONNS_LIMIT,
			                &lim->polls_per_cert) < 0)
				return -1;
			break;
		case 'E': {
			char *end = NULL;
			long long v;

			errno = 0;
			v = strtoll(optarg, &end, 10);
			if (errno || !end || *end || end == optarg || v < 1 ||
			    v > CONTROL_ENDPOINTS_PER_SERVICE_MAX) {
				fprintf(stderr, "meshlet-control: --max-endpoints-per-service: expected "
				        "1..%d\n", CONTROL_ENDPOINTS_PER_SERVICE_MAX);
				return -1;
			}
			o->max_endpoints_per_service = v;
			break;
		}
		case 'h': usage(stdout); return 1;
		case 'V': printf("meshlet-control %s\n", MESHLET_VERSION); return 1;
		default:
			fprintf(stderr, "meshlet-control: unknown or incomplete option '%s' (see --help)\n",
			        argv[optind - 1]);
			return -1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "meshlet-control: unexpected argument '%s' (see --help)\n", argv[optind]);
		return -1;
	}
	if (!o->state_dir || !o->trust_domain) {
		fprintf(stderr, "meshlet-control: --state-dir and --trust-domain are required "
		        "(see --help)\n");
		return -1;
	}
	if (!o->etcd.endpoints && (o->etcd.prefix || o->etcd.cacert || o->etcd.cert ||
	                           o->etcd.key || o->kek_file || o->admin_token_file)) {
		fprintf(stderr, "meshlet-control: --etcd-*, --kek-file and --admin-token-file go "
		        "with --store etcd:URL\n");
		return -1;
	}
	if (server_limits_check(lim, &e) < 0) {
		fprintf(stderr, "meshlet-control: --%s: %s\n", e.path, e.message);
		return -1;
	}
	return 0;
}

/* meshlet-control init-kek FILE */
static int init_kek(int argc, char **argv)
{
	struct meshlet_err err = {0};

	if (argc != 3) {
		fprintf(stderr, "usage: meshlet-control init-kek FILE\n");
		return 2;
	}
	if (kek_create(argv[2], &err) < 0) {
		fprintf(stderr, "meshlet-control: %s\n", err.message);
		return 1;
	}
	printf("created %s (32 random bytes, mode 0600): give every control replica a copy "
	       "(--kek-file); without it the CA keys in the store cannot be read\n", argv[2]);
	return 0;
}

int main(int argc, char **argv)
{
	struct control_opts o;
	struct server_limits lim;
	struct control_state *st = NULL;
	struct control_server *srv = NULL;
	struct meshlet_err err = {0};
	char msg[600];
	int r;

	if (argc >= 2 && strcmp(argv[1], "init-kek") == 0)
		return init_kek(argc, argv);
	r = parse_args(argc, argv, &o, &lim);

	if (r != 0)
		return r > 0 ? 0 : 2;
	log_init(o.log_level, "meshlet-control");
	/* Before the store opens: a TLS write to an etcd that hung up must be an
	 * error, not SIGPIPE (the server ignores it later too). */
	signal(SIGPIPE, SIG_IGN);
	if (state_open(&st, &o, &err) < 0) {
		log_error("%s", err_str(&err, msg, sizeof(msg)));
		return 1;
	}
	if (server_new(&srv, st, &o, &lim, &err) < 0) {
		log_error("%s", err_str(&err, msg, sizeof(msg)));
		state_close(st);
		return 1;
	}
	server_run(srv);
	server_free(srv);
	state_close(st);
	log_info("stopped");
	return 0;
}
