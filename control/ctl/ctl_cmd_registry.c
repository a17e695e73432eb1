/* meshletctl endpoints list|add|remove and proxies list (see ctl.h). */
#include "ctl.h"

#include <string.h>

#include "meshlet/api.h"
#include "meshlet/identity.h"

/* ---------------------------------------------------------------- endpoints */

int ctl_cmd_endpoints_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "service", "address", "ports", "via", "live",
	                                    "expires_at", "serial", NULL };
	static const char *const acols[] = { "service", "address", "assigned_at", NULL };
	struct httpc_response r;
	const json_t *asg;
	int rc = ctl_api_call(ctl, "GET", "/v1/endpoints", NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		ctl_print_json(r.json);
	} else {
		ctl_print_list(json_object_get(r.json, "endpoints"), cols, true, stdout);
		asg = json_object_get(r.json, "assignments");
		if (json_array_size(asg) > 0) {
			printf("\nassigned by the admin:\n");
			ctl_print_list(asg, acols, true, stdout);
		}
	}
	httpc_response_clear(&r);
	return 0;
}

/* endpoints add|remove --service S ADDR: POST /v1/endpoints/<verb>. */
static int endpoints_assign(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a,
                            const char *verb)
{
	const char *svc = ctl_arg(cmd, a, "service"), *addr = a->pos[0];
	char path[64], text[320];
	json_t *body;

	if (!svc)
		return ctl_usage_error(ctl, "endpoints %s: --service SERVICE is required", cmd->name);
	if (!identity_valid_service(svc))
		return ctl_usage_error(ctl, "--service: '%s' is not a service name", svc);
	if (!api_valid_address(addr))
		return ctl_usage_error(ctl, "endpoints %s: '%s' is not an address (ip:port or [ipv6]:port)",
		                       cmd->name, addr);
	body = json_pack("{s:s, s:s}", "service", svc, "address", addr);
	snprintf(path, sizeof(path), "/v1/endpoints/%s", verb);
	snprintf(text, sizeof(text), "%s %s service %s\n", addr, strcmp(verb, "assign") == 0 ?
	         "assigned to" : "no longer assigned to", svc);
	return ctl_send(ctl, "POST", path, body, NULL, text);
}

int ctl_cmd_endpoints_add(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return endpoints_assign(ctl, cmd, a, "assign");
}

int ctl_cmd_endpoints_remove(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	return endpoints_assign(ctl, cmd, a, "unassign");
}

/* ---------------------------------------------------------------- proxies, check */

int ctl_cmd_proxies_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "service", "address", "ports", "config_version",
	                                    "up_to_date", "connected", "cert_serial",
	                                    "cert_expires_at", "last_seen", "degraded", NULL };

	return ctl_list_command(ctl, "/v1/proxies", "proxies", cols);
}
