/*
 * libFuzzer target: bytes -> json_parse_strict -> config_parse (no file
 * I/O: the file name only anchors relative paths). Host names are not
 * looked up: getaddrinfo is wrapped to numeric hosts only, so the fuzzer
 * neither waits on DNS nor depends on the network it runs in.
 */
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "meshlet/config.h"
#include "meshlet/json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *,
                              struct addrinfo **);

/* Overrides libc's (and the sanitizer's interceptor) for this binary. */
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
	static getaddrinfo_fn real;
	struct addrinfo h = {0};

	if (!real)
		*(void **)&real = dlsym(RTLD_NEXT, "getaddrinfo");
	if (!real)
		return EAI_FAIL;
	if (hints)
		h = *hints;
	h.ai_flags |= AI_NUMERICHOST;
	return real(node, service, &h, res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct meshlet_err err = {{0}, {0}};
	struct config *c = NULL;
	json_t *doc;
	int rc;

	doc = json_parse_strict((const char *)data, size, MESHLET_JSON_MAX_DEPTH, &err);
	if (!doc)
		return 0;
	rc = config_parse(doc, "/etc/meshlet/proxy.json", &c, &err);
	json_decref(doc);
	/* The contract: 0 with a config, or an error with a message and none. */
	if ((rc == 0) != (c != NULL) || (rc < 0 && !err.message[0]))
		abort();
	config_free(c);
	return 0;
}
