/*
 * libFuzzer target for api_stats_parse, the counter summary a proxy sends
 * in a header (control parses whatever arrives there). Beyond "no crash":
 * an accepted summary keeps its caps, and formatting it gives text that
 * parses to the same counts (the proxy's side of the same wire shape).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int cond)
{
	if (!cond)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct api_stats_summary s, again;
	struct meshlet_err e = { { 0 }, { 0 } };
	char *text = malloc(size + 1), *out;

	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	if (api_stats_parse(text, &s, &e) == 0) {
		check(s.n_callers <= API_STATS_CALLERS_MAX && s.n_denied <= API_STATS_DENIED_MAX &&
		      s.n_recent <= API_STATS_RECENT_MAX);
		for (size_t i = 0; i < s.n_callers; i++)
			check(s.callers[i].requests >= s.callers[i].denied);
		out = api_stats_format(&s);
		/* Reals may print longer than they were written ("1e3" as
		 * "1000.0"): an input near the limit may not fit again. */
		if (!out) {
			check(size > API_STATS_MAX - 1024);
			free(text);
			return 0;
		}
		check(api_stats_parse(out, &again, &e) == 0);
		check(again.n_callers == s.n_callers && again.n_denied == s.n_denied);
		for (size_t i = 0; i < s.n_callers; i++)
			check(again.callers[i].requests == s.callers[i].requests);
		free(out);
	}
	free(text);
	return 0;
}
