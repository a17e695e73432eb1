/* meshletctl token create and certs list|rotate|revoke (see ctl.h). */
#include "ctl.h"

#include <stdint.h>
#include <string.h>

#include "meshlet/ca.h"

/* ---------------------------------------------------------------- token */

int ctl_cmd_token_create(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "token", "service", "expires_at", "uses", NULL };
	const char *svc = ctl_arg(cmd, a, "service"), *ttl = ctl_arg(cmd, a, "ttl"), *uses = ctl_arg(cmd, a, "uses");
	long long ttl_s = 3600, n_uses = 1;
	json_t *body;

	if (!svc)
		return ctl_usage_error(ctl, "token create: --service SERVICE is required");
	if (ttl && ctl_parse_duration(ttl, &ttl_s) < 0)
		return ctl_usage_error(ctl, "--ttl: expected a duration such as 90s, 15m, 1h, 7d or "
		                       "seconds, got '%s'", ttl);
	if (uses && ctl_parse_int(uses, 1, INT32_MAX, &n_uses) < 0)
		return ctl_usage_error(ctl, "--uses: expected a positive integer, got '%s'", uses);
	body = json_pack("{s:s, s:I, s:I}", "service", svc, "ttl_seconds", (json_int_t)ttl_s,
	                 "uses", (json_int_t)n_uses);
	return ctl_send(ctl, "POST", "/v1/tokens", body, cols, NULL);
}

/* ---------------------------------------------------------------- certs */

int ctl_cmd_certs_list(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	static const char *const cols[] = { "serial", "service", "issued_at", "expires_at",
	                                    "not_after", "root", "via", "parent", "renewals",
	                                    "revoked", NULL };

	return ctl_list_command(ctl, "/v1/certs", "certs", cols);
}

int ctl_cmd_certs_rotate(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	const char *svc = ctl_arg(cmd, a, "service");
	bool all = ctl_arg(cmd, a, "all") != NULL;
	char text[320];
	json_t *body;

	if (!!svc == all)
		return ctl_usage_error(ctl, "certs rotate: give exactly one of --service SERVICE or --all");
	body = all ? json_pack("{s:b}", "all", 1) : json_pack("{s:s}", "service", svc);
	snprintf(text, sizeof(text), "rotation requested for %s\n", all ? "all services" : svc);
	return ctl_send(ctl, "POST", "/v1/certs/rotate", body,
	                (const char *const[]){ "service", "all", NULL }, text);
}

int ctl_cmd_certs_revoke(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	char serial[CA_SERIAL_HEX_MAX], text[CA_SERIAL_HEX_MAX + 32];
	json_t *body;

	if (ca_serial_normalize(a->pos[0], serial) < 0)
		return ctl_usage_error(ctl, "certs revoke: '%s' is not a certificate serial (hex digits, "
		                       "optionally with ':' separators)", a->pos[0]);
	body = json_pack("{s:s}", "serial", serial);
	snprintf(text, sizeof(text), "certificate %s revoked\n", serial);
	return ctl_send(ctl, "POST", "/v1/certs/revoke", body,
	                (const char *const[]){ "serial", NULL }, text);
}
