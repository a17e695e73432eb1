/*
 * policy: the access policy document of docs/design.md, parsed into an immutable
 * struct policy, and its evaluation. One evaluator serves L4 connections,
 * HTTP requests and control's dry-run (/v1/check).
 *
 * Decision: a matching deny rule wins; otherwise a matching allow rule
 * allows; otherwise the policy's default (deny when omitted). On a tcp port
 * an allow rule that names HTTP fields never matches, and a deny rule that
 * names HTTP fields matches on its other fields (fail closed).
 */
#ifndef MESHLET_POLICY_H
#define MESHLET_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "meshlet/json.h"

#define POLICY_MAX_RULES 4096
#define POLICY_RULE_NAME_MAX 128
#define POLICY_MAX_FILE (1024 * 1024)   /* policy_load(); as control's body limit */

enum policy_action { POLICY_DENY = 0, POLICY_ALLOW = 1 };

enum policy_from_kind { FROM_EXACT, FROM_PREFIX, FROM_ANY };

struct policy_from {
	enum policy_from_kind kind;
	char *id;               /* exact ID, or prefix including the final '/' */
	size_t len;
};

struct policy_path {
	char *path;             /* exact path, or prefix including the final '/' */
	size_t len;
	bool prefix;
};

struct policy_header {
	char *name;             /* lower-cased */
	char *value;
};

struct policy_rule {
	char *name;
	enum policy_action action;
	struct policy_from *from;      size_t n_from;     /* 0: field omitted = any */
	uint16_t *ports;               size_t n_ports;
	char **methods;                size_t n_methods;
	struct policy_path *paths;     size_t n_paths;
	struct policy_header *headers; size_t n_headers;
	bool names_http;               /* methods, paths or headers given */
};

struct policy {
	char *service;
	enum policy_action default_action;
	struct policy_rule *rules;
	size_t n_rules;
};

/* What is being decided. For L4, http is false and method/path/header unused. */
struct policy_request {
	const char *peer_id;           /* verified SPIFFE ID of the caller */
	uint16_t port;                 /* the application's port */
	bool http;
	const char *method;
	const char *path;              /* normalised, without query */
	/* Value of header lname (lower-case), or NULL when absent. */
	const char *(*header)(const void *ctx, const char *lname);
	const void *header_ctx;
};

struct policy_decision {
	enum policy_action action;
	const struct policy_rule *rule;  /* NULL when the default decided */
	size_t rule_index;               /* index in policy->rules, if rule */
};

/*
 * Validates and compiles a policy document. Unknown fields, wrong types,
 * duplicate rule names and bad IDs are refused with the JSON path.
 * Returns a new policy (free with policy_free) or NULL with err set.
 */
struct policy *policy_parse(const json_t *doc, struct meshlet_err *err);

/* json_load_strict + policy_parse. */
struct policy *policy_load(const char *file, struct meshlet_err *err);

void policy_free(struct policy *p);

/* Decides req under p. Never fails; p and req are only read. */
struct policy_decision policy_eval(const struct policy *p, const struct policy_request *req);

/* Name of the deciding rule, or "default". */
const char *policy_decision_rule(const struct policy_decision *d);

/* True when s can name a rule: 1..POLICY_RULE_NAME_MAX of [A-Za-z0-9._-]. */
bool policy_valid_rule_name(const char *s);

const char *policy_action_str(enum policy_action a);   /* "allow" / "deny" */

#endif
