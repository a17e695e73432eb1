/*
 * libFuzzer target for identity_parse, identity_valid_service and
 * identity_valid_trust_domain. Beyond "no crash", it checks that what the
 * parser accepts is consistent: the fields reassemble to the input, each
 * field is itself valid, and formatting a service ID reproduces it.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/identity.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond)
{
	if (!cond)
		abort();
}

/* Invariants of an accepted ID of size bytes. */
static void check_accepted(const uint8_t *data, size_t size, const struct spiffe_id *id)
{
	char again[SPIFFE_ID_MAX + 1];
	size_t td_len = strlen(id->trust_domain);

	check(size <= SPIFFE_ID_MAX);
	check(strlen(id->uri) == size && memcmp(id->uri, data, size) == 0);
	check(strncmp(id->uri, "spiffe://", 9) == 0);
	check(memcmp(id->uri + 9, id->trust_domain, td_len) == 0);
	check(id->path == id->uri + 9 + td_len);
	check(id->path[0] == '\0' || id->path[0] == '/');
	check(identity_valid_trust_domain(id->trust_domain));
	check(!strstr(id->path, "//") && !strstr(id->path, "/./") && !strstr(id->path, "/../"));
	if (id->service[0]) {
		check(identity_valid_service(id->service));
		check(identity_format(again, sizeof(again), id->trust_domain, id->service) == 0);
		check(strcmp(again, id->uri) == 0);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct spiffe_id id;
	const char *why = NULL;
	char *s;

	if (identity_parse((const char *)data, size, &id, &why) == 0)
		check_accepted(data, size, &id);
	else
		check(why != NULL);

	/* The validators take C strings: feed them the input up to any NUL. */
	s = malloc(size + 1);
	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	if (identity_valid_service(s)) {
		char uri[SPIFFE_ID_MAX + 1];
		check(identity_format(uri, sizeof(uri), "mesh.local", s) == 0);
		check(identity_parse(uri, strlen(uri), &id, &why) == 0);
		check(strcmp(id.service, s) == 0);
	}
	if (identity_valid_trust_domain(s)) {
		char uri[SPIFFE_ID_MAX + 1];
		check(identity_format(uri, sizeof(uri), s, "svc") == 0);
		check(identity_parse(uri, strlen(uri), &id, &why) == 0);
		check(strcmp(id.trust_domain, s) == 0);
	}
	free(s);
	return 0;
}
