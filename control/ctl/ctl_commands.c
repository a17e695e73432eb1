/* meshletctl's commands as one table: words, usage, options, help, handler (see ctl.h). */
#include "ctl.h"


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
static const struct ctl_opt traffic_apply_opts[] = {
	{ "file", 'f', "FILE", false, "the traffic document (JSON); - reads standard input" },
	{ "if-match", 0, "VERSION", false, "apply only if the stored document is at VERSION (else 412)" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt traffic_delete_opts[] = {
	{ "if-match", 0, "VERSION", false, "delete only if the stored document is at VERSION (else 412)" },
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

static const struct ctl_opt top_opts[] = {
	{ "once", 0, NULL, false, "print one snapshot and exit (for scripts and tests)" },
	{ "interval", 'n', "SECONDS", false, "refresh every SECONDS (default 2)" },
	{ NULL, 0, NULL, false, NULL },
};
static const struct ctl_opt dashboard_opts[] = {
	{ "listen", 'l', "ADDR", false, "where the web UI listens (default 127.0.0.1:7480)" },
	{ "allow-non-loopback", 0, NULL, false, "accept a --listen address that is not loopback: "
	  "anyone who reaches it sees what the admin token sees" },
	{ NULL, 0, NULL, false, NULL },
};

const struct ctl_cmd ctl_commands[] = {
	{ "policy", "apply", "-f FILE [--if-match VERSION]", 0, 0, policy_apply_opts,
	  "create or replace the policy of the service named in FILE",
	  "Sends FILE to PUT /v1/policies/SERVICE, SERVICE being the file's \"service\" field.\n"
	  "The control validates it; an error names the JSON path of the offending value\n"
	  "(rules[1].ports[0]: must be 1..65535). Prints the service and its new version.",
	  ctl_cmd_policy_apply },
	{ "policy", "get", "SERVICE", 1, 1, no_opts,
	  "show the policy of SERVICE and its version",
	  "GET /v1/policies/SERVICE. The table shows the policy's rules (\"*\": any);\n"
	  "-o json prints {\"version\", \"policy\"} with the document as stored.",
	  ctl_cmd_policy_get },
	{ "policy", "delete", "SERVICE [--if-match VERSION]", 1, 1, policy_delete_opts,
	  "delete the policy of SERVICE",
	  "DELETE /v1/policies/SERVICE. Its proxies fall back to denying everything.",
	  ctl_cmd_policy_delete },
	{ "policy", "list", "", 0, 0, no_opts,
	  "list the services that have a policy, with their versions",
	  "GET /v1/policies.", ctl_cmd_policy_list },
	{ "traffic", "apply", "-f FILE [--if-match VERSION]", 0, 0, traffic_apply_opts,
	  "create or replace the traffic document of the service named in FILE",
	  "Sends FILE to PUT /v1/traffic/SERVICE: how calls to SERVICE are handled (timeouts,\n"
	  "retries, outlier ejection, limits: applied by the callers' sidecars; rate_limits and\n"
	  "faults: applied by SERVICE's own sidecars; docs/traffic.md). The control validates\n"
	  "the whole document; an error names the JSON path (faults[0].percent: must be\n"
	  "0..100) and nothing is stored. Prints the service and its new version.",
	  ctl_cmd_traffic_apply },
	{ "traffic", "get", "SERVICE", 1, 1, no_opts,
	  "show the traffic document of SERVICE and its version",
	  "GET /v1/traffic/SERVICE. \"-\": the default applies; \"*\": any caller or request.\n"
	  "-o json prints {\"version\", \"traffic\"} with the document as stored.",
	  ctl_cmd_traffic_get },
	{ "traffic", "delete", "SERVICE [--if-match VERSION]", 1, 1, traffic_delete_opts,
	  "delete the traffic document of SERVICE",
	  "DELETE /v1/traffic/SERVICE. Calls to SERVICE fall back to the defaults: connect\n"
	  "timeout 5 s, request timeout 30 s, no retries, no ejection, no limits, no faults.",
	  ctl_cmd_traffic_delete },
	{ "traffic", "list", "", 0, 0, no_opts,
	  "list the services that have a traffic document, with their versions",
	  "GET /v1/traffic.", ctl_cmd_traffic_list },
	{ "token", "create", "--service SERVICE [--ttl 1h] [--uses 1]", 0, 0, token_create_opts,
	  "create a join token with which a new proxy of SERVICE enrols",
	  "POST /v1/tokens. The token is printed once and stored by the control only as a hash;\n"
	  "it carries the root's pin, so a proxy needs only the control URL and the token.",
	  ctl_cmd_token_create },
	{ "certs", "list", "", 0, 0, no_opts,
	  "list the SVIDs the control has issued",
	  "GET /v1/certs.", ctl_cmd_certs_list },
	{ "certs", "rotate", "(--service SERVICE | --all)", 0, 0, certs_rotate_opts,
	  "make proxies renew their SVIDs now",
	  "POST /v1/certs/rotate: the proxies of SERVICE (or all of them) renew at their next\n"
	  "config poll.", ctl_cmd_certs_rotate },
	{ "certs", "revoke", "SERIAL", 1, 1, no_opts,
	  "put an SVID's serial on the bundle's revocation list",
	  "POST /v1/certs/revoke. SERIAL is hex (as certs list shows it; ':' separators and\n"
	  "upper case are accepted). Every proxy refuses the certificate once it holds the new\n"
	  "bundle.", ctl_cmd_certs_revoke },
	{ "ca", "show", "", 0, 0, no_opts,
	  "show the roots of the trust bundle, the signing root and the rotation phase",
	  "GET /v1/ca. KEY_SHA256 is the SHA-256 of the root's public key, the pin that join\n"
	  "tokens carry.", ctl_cmd_ca_show },
	{ "ca", "rotate", "[--force] [--auto [--timeout DURATION]]", 0, 0, ca_rotate_opts,
	  "advance CA rotation by one phase and print the new phase",
	  "POST /v1/ca/rotate. Rotation has three steps, one per call:\n"
	  "  stable   -> prepared  a new root joins the trust bundle\n"
	  "  prepared -> switched  signing switches to the new root and every proxy renews;\n"
	  "                        ctl_refused (409) while a proxy seen within the last SVID\n"
	  "                        lifetime has not acknowledged the new root, unless --force\n"
	  "  switched -> stable    the old root leaves the bundle; refused while SVIDs it\n"
	  "                        signed are unexpired and unrevoked, unless --force\n"
	  "ca status shows what the next step waits for. --auto takes each step as soon as\n"
	  "its gate opens, until the phase is stable again (exit 1 after --timeout).",
	  ctl_cmd_ca_rotate },
	{ "ca", "status", "", 0, 0, no_opts,
	  "show the rotation phase and what the next ca rotate does",
	  "GET /v1/ca, summarised.", ctl_cmd_ca_status },
	{ "endpoints", "list", "", 0, 0, no_opts,
	  "list the registry: the proxies' entries and the admin's assignments",
	  "GET /v1/endpoints. An entry is what a proxy registered: its inbound address, the\n"
	  "application ports behind it, how it was allowed (via: connection, the IP the proxy\n"
	  "connects from; assignment, an address assigned below) and whether its SVID is live.",
	  ctl_cmd_endpoints_list },
	{ "endpoints", "add", "--service SERVICE ADDR", 1, 1, endpoints_assign_opts,
	  "assign ADDR (ip:port) to SERVICE: its proxies may register it from anywhere",
	  "POST /v1/endpoints/assign. A proxy may register only addresses on the IP it connects\n"
	  "to the control from; an address behind NAT or on another interface needs this.\n"
	  "No other service may register ADDR while it is assigned. Refused (exit 1) when ADDR\n"
	  "is assigned to another service or held by a live entry of another service.",
	  ctl_cmd_endpoints_add },
	{ "endpoints", "remove", "--service SERVICE ADDR", 1, 1, endpoints_assign_opts,
	  "withdraw the assignment of ADDR to SERVICE",
	  "POST /v1/endpoints/unassign. The entry the assignment allowed is removed with it.",
	  ctl_cmd_endpoints_remove },
	{ "proxies", "list", "", 0, 0, no_opts,
	  "list connected proxies: config version held, certificate expiry",
	  "GET /v1/proxies.", ctl_cmd_proxies_list },
	{ "status", NULL, "", 0, 0, no_opts,
	  "each control replica of --control: reachable, its version, its store's health",
	  "GET /v1/health on every URL of --control (URL,URL,...), one row each: whether it\n"
	  "answers and how fast, and whether its store (SQLite, or etcd) answers, with the\n"
	  "store's revision. Exit 1 when any replica or its store is down.",
	  ctl_cmd_status },
	{ "check", NULL, "--from ID --to SERVICE --port PORT [--method M --path P] [--header NAME=VALUE]...",
	  0, 0, check_opts,
	  "dry run: would SERVICE's policy allow this call, and which rule decides",
	  "POST /v1/check, answered by the same evaluator the proxies run. Without --method\n"
	  "and --path the call is judged as a TCP connection. Also lists the rate limits and\n"
	  "faults of SERVICE's traffic document that would apply. Exits 0 whatever the decision.",
	  ctl_cmd_check },
	{ "top", NULL, "[--once] [--interval SECONDS]", 0, 0, top_opts,
	  "live table of the traffic between services: request, denial and 5xx rates",
	  "GET /v1/stats, refreshed every --interval seconds (Ctrl-C ends it), or once with\n"
	  "--once. Rates are per second over the last minute, as the proxies report them with\n"
	  "their config polls (every 5 s while traffic flows). -o json prints the answer as is.",
	  ctl_cmd_top },
	{ "dashboard", NULL, "[--listen 127.0.0.1:7480]", 0, 0, dashboard_opts,
	  "serve a read-only web UI of the mesh on loopback",
	  "Serves the dashboard (services, proxies, edges with live rates, recent denials,\n"
	  "certificates, CA phase) at http://ADDR/ and relays the page's reads to control with\n"
	  "this command's credentials: the browser never holds the admin token. Only GET and\n"
	  "HEAD of a fixed list of API reads are relayed. Runs until interrupted.",
	  ctl_cmd_dashboard },
};
const size_t ctl_n_commands = sizeof(ctl_commands) / sizeof(ctl_commands[0]);
