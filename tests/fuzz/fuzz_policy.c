/*
 * libFuzzer target: bytes -> json_parse_strict -> policy_parse, then
 * policy_eval on a few fixed requests when the policy is accepted.
 * Besides memory errors it checks the evaluator's contract: a decision made
 * by a rule carries that rule's action and index.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/json.h"
#include "meshlet/policy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *header(const void *ctx, const char *lname)
{
	(void)ctx;
	if (strcmp(lname, "x-tenant") == 0)
		return "acme";
	if (strcmp(lname, "x-empty") == 0)
		return "";
	return NULL;
}

static const struct policy_request requests[] = {
	{"spiffe://mesh.local/svc/frontend", 8080, true, "GET", "/orders/1", header, NULL},
	{"spiffe://mesh.local/svc/frontend", 8080, false, NULL, NULL, NULL, NULL},
	{"spiffe://partner.example/svc/x", 443, true, "DELETE", "/", header, NULL},
	{"spiffe://mesh.local/svc/ops", 9000, true, "POST", "/admin/users", NULL, NULL},
	{NULL, 8080, true, "GET", "/healthz", header, NULL},
	{NULL, 1, false, NULL, NULL, NULL, NULL},
	{"spiffe://mesh.local/svc/api", 65535, true, NULL, NULL, header, NULL},
};

static void check_decisions(const struct policy *p)
{
	size_t i;

	for (i = 0; i < sizeof(requests) / sizeof(requests[0]); i++) {
		struct policy_decision d = policy_eval(p, &requests[i]);

		if (d.rule) {
			if (d.rule_index >= p->n_rules || d.rule != &p->rules[d.rule_index] ||
			    d.rule->action != d.action)
				abort();
		} else if (d.action != p->default_action ||
		           strcmp(policy_decision_rule(&d), "default") != 0) {
			abort();
		}
		(void)policy_action_str(d.action);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct meshlet_err err = {{0}, {0}};
	struct policy *p;
	json_t *doc;

	doc = json_parse_strict((const char *)data, size, MESHLET_JSON_MAX_DEPTH, &err);
	if (!doc)
		return 0;
	p = policy_parse(doc, &err);
	json_decref(doc);
	if (!p) {
		/* Every refusal says why. */
		if (!err.message[0])
			abort();
		return 0;
	}
	check_decisions(p);
	policy_free(p);
	return 0;
}
