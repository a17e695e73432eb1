/*
 * libFuzzer target: bytes -> json_parse_strict -> traffic_parse_set, then the
 * pieces a proxy would run on an accepted document: fault decisions and
 * the limiter on a few fixed requests. Besides memory errors it checks
 * the contracts: a refusal says why, a decision names a fault of the
 * document with the fields it reports, a limiter refusal names one of its
 * limits and a positive wait.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/json.h"
#include "meshlet/traffic.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const struct policy_request requests[] = {
	{"spiffe://mesh.local/svc/frontend", 8080, true, "GET", "/orders/1", NULL, NULL},
	{"spiffe://mesh.local/svc/frontend", 8080, false, NULL, NULL, NULL, NULL},
	{NULL, 8080, true, "POST", "/", NULL, NULL},
};

static uint64_t counter_rng(void *arg)
{
	uint64_t *s = arg;

	*s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
	return *s;
}

static void check_fault(const struct traffic *t, const struct traffic_fault *f)
{
	if (f && (f < t->faults || f >= t->faults + t->n_faults))
		abort();
}

static void run(const struct traffic *t)
{
	struct traffic_limiter *l = traffic_limiter_new(t);
	uint64_t seed = 1;

	for (size_t i = 0; i < sizeof(requests) / sizeof(requests[0]); i++) {
		struct traffic_fault_decision d;
		const struct traffic_rate_limit *rl;
		int64_t wait = 0;

		traffic_fault_decide(t, &requests[i], counter_rng, &seed, &d);
		check_fault(t, d.delay);
		check_fault(t, d.abort);
		if ((d.abort && d.abort_status != d.abort->abort_status) ||
		    (d.delay && d.delay_ms != d.delay->delay_ms))
			abort();
		if (!l)
			continue;
		for (int k = 0; k < 3; k++) {
			rl = traffic_limiter_admit(l, &requests[i], k * 1000, &wait);
			if (rl && (rl < t->rate_limits || rl >= t->rate_limits + t->n_rate_limits ||
			           wait <= 0))
				abort();
		}
	}
	traffic_limiter_free(l);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct meshlet_err err = {{0}, {0}};
	struct traffic **set;
	size_t n;
	json_t *doc;

	doc = json_parse_strict((const char *)data, size, MESHLET_JSON_MAX_DEPTH, &err);
	if (!doc)
		return 0;
	/* One document or an array of them, as traffic_file holds. */
	if (traffic_parse_set(doc, &set, &n, &err) < 0) {
		json_decref(doc);
		if (!err.message[0])
			abort();
		return 0;
	}
	json_decref(doc);
	for (size_t i = 0; i < n; i++)
		run(set[i]);
	traffic_set_free(set, n);
	return 0;
}
