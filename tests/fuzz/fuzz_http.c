/*
 * libFuzzer target for lib/http.c: the request and response parsers and the
 * path normaliser. Beyond "no crash, no leak", it checks:
 * - feeding the input in two reads (split at a point taken from the input)
 *   gives the same events as feeding it at once (incremental == whole);
 * - consumed never exceeds what was fed, NEED_MORE means all of it was used,
 *   BODY spans lie inside the fed data;
 * - an accepted request head serialises to a head that parses again to the
 *   same method, path and query, with the proxy's x-forwarded-client-cert
 *   exactly once;
 * - the normaliser's output is a fixed point, starts with '/', and holds no
 *   empty or dot segments and no encoded '/', '\' or NUL.
 */
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "meshlet/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define TRACE_MAX 4096

static void check(int cond)
{
	if (!cond)
		abort();
}

/* A compact record of the events of one run. */
struct trace {
	char s[TRACE_MAX];
	size_t len;
	uint64_t body;           /* body bytes of the current message */
};

static void trace_put(struct trace *t, const char *s, size_t n)
{
	if (n > TRACE_MAX - t->len)
		n = TRACE_MAX - t->len;
	memcpy(t->s + t->len, s, n);
	t->len += n;
}

static void trace_num(struct trace *t, char tag, uint64_t v)
{
	char b[24];
	size_t i = sizeof(b);

	do
		b[--i] = (char)('0' + v % 10);
	while ((v /= 10) && i > 1);
	b[--i] = tag;
	trace_put(t, b + i, sizeof(b) - i);
}

static void check_normalized(const char *p, size_t len)
{
	char again[16384];
	size_t l2;
	const char *why;

	check(len > 0 && p[0] == '/');
	check(!memmem(p, len, "//", 2) && !memmem(p, len, "/./", 3) && !memmem(p, len, "/../", 4));
	check(!(len >= 2 && memcmp(p + len - 2, "/.", 2) == 0));
	check(!(len >= 3 && memcmp(p + len - 3, "/..", 3) == 0));
	check(!memmem(p, len, "%2F", 3) && !memmem(p, len, "%5C", 3) && !memmem(p, len, "%00", 3));
	check(!memchr(p, '\\', len) && !memchr(p, ';', len) && !memchr(p, '?', len));
	/* No encoded '%': an app that decodes twice or reads %uXXXX sees what we saw. */
	check(!memmem(p, len, "%25", 3) && !memmem(p, len, "%u", 2) && !memmem(p, len, "%U", 2));
	if (len + 2 > sizeof(again))
		return;
	check(http_path_normalize(p, len, again, sizeof(again), &l2, &why) == 0);
	check(l2 == len && memcmp(again, p, len) == 0);
}

static const char *const policy_names[] = { "x-tenant", "x-role" };

static bool same_value(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Serialise a request head, parse the result, compare. */
static void check_round_trip(const struct http_head *h)
{
	static const struct http_rewrite_field set[] = {
		{ "x-forwarded-client-cert", "By=spiffe://td/svc/a;URI=spiffe://td/svc/b" },
	};
	static const struct http_rewrite_field add[] = { { "x-request-id", "fuzz" } };
	struct http_rewrite rw = { set, 1, add, 1 };
	struct http_parser_state q;
	struct http_event ev;
	size_t need, len, used;
	char *out;
	const char *v;

	check(http_head_serialize(h, &rw, NULL, 0, &need) == -ENOSPC || need == 0);
	out = malloc(need);
	if (!out)
		return;
	check(http_head_serialize(h, &rw, out, need, &len) == 0 && len == need);
	http_request_init(&q, NULL);
	ev = http_feed(&q, out, len, &used);
	/* The rewritten head may only grow past the limits. */
	if (ev.type == HTTP_EV_ERROR) {
		check(ev.status == 431 || ev.status == 414);
	} else {
		check(ev.type == HTTP_EV_HEAD_COMPLETE && used == len);
		check(strcmp(ev.head->method, h->method) == 0);
		check(strcmp(ev.head->path, h->path) == 0);
		check((ev.head->query == NULL) == (h->query == NULL));
		check(!h->query || strcmp(ev.head->query, h->query) == 0);
		check(http_head_count(ev.head, "x-forwarded-client-cert", &v) == 1);
		check(strcmp(v, set[0].value) == 0);
		check(http_head_count(ev.head, "x-request-id", NULL) >= 1);
		check(ev.head->framing == h->framing);
		/* What a policy reads of an accepted head is what the app receives. */
		if (!http_head_check_policy_fields(h, policy_names, 2))
			for (size_t i = 0; i < 2; i++)
				check(same_value(http_head_policy_header(h, policy_names[i]),
				                 http_head_policy_header(ev.head, policy_names[i])));
	}
	http_cleanup(&q);
	free(out);
}

static void on_head(struct trace *t, const struct http_head *h, bool round_trip)
{
	trace_put(t, "H", 1);
	if (h->is_request) {
		check(h->method && h->method[0]);
		trace_put(t, h->path, strlen(h->path) + 1);
		if (h->form == HTTP_TARGET_ORIGIN || h->form == HTTP_TARGET_ABSOLUTE)
			check_normalized(h->path, strlen(h->path));
		if (round_trip)
			check_round_trip(h);
	} else {
		trace_num(t, 'S', (uint64_t)h->status);
	}
	trace_num(t, 'F', h->framing);
}

/* Feeds [data, data+len) until NEED_MORE; false once the run is over. */
static bool feed(struct http_parser_state *p, const char *data, size_t len, bool tunnel,
                 bool round_trip, struct trace *t)
{
	for (;;) {
		size_t used = (size_t)-1;
		struct http_event ev = http_feed(p, data, len, &used);

		check(used <= len);
		switch (ev.type) {
		case HTTP_EV_NEED_MORE:
			check(used == len);
			return true;
		case HTTP_EV_HEAD_COMPLETE:
			on_head(t, ev.head, round_trip);
			break;
		case HTTP_EV_BODY:
			check(ev.data == data && ev.len == used && used > 0);
			t->body += ev.len;
			break;
		case HTTP_EV_MESSAGE_COMPLETE:
			trace_num(t, 'E', t->body);
			t->body = 0;
			if (!p->head.is_request && p->head.status >= 200)
				http_response_expect(p, 0);
			break;
		case HTTP_EV_PAUSED:
			check(used == 0);
			trace_put(t, "P", 1);
			http_resume(p, tunnel);
			break;
		case HTTP_EV_ERROR:
			check(ev.status >= 400 && ev.status <= 505 && ev.reason);
			trace_num(t, 'X', (uint64_t)ev.status);
			return false;
		}
		data += used;
		len -= used;
	}
}

static void run(bool request, unsigned flags, const char *in, size_t size, size_t split,
                struct trace *t)
{
	struct http_parser_state p;
	struct http_event ev;

	memset(t, 0, sizeof(*t));
	if (request) {
		http_request_init(&p, NULL);
	} else {
		http_response_init(&p, NULL);
		http_response_expect(&p, flags);
	}
	if (feed(&p, in, split, flags & 8, split == size, t) &&
	    feed(&p, in + split, size - split, flags & 8, false, t)) {
		ev = http_finish(&p);
		if (ev.type == HTTP_EV_MESSAGE_COMPLETE)
			trace_num(t, 'E', t->body);
		else if (ev.type == HTTP_EV_ERROR)
			trace_num(t, 'X', (uint64_t)ev.status);
	}
	http_cleanup(&p);
}

static void check_parsers(const char *in, size_t size, size_t split, unsigned flags)
{
	static const bool kinds[] = { true, false };
	struct trace *whole = malloc(sizeof(*whole)), *parts = malloc(sizeof(*parts));
	size_t i;

	if (!whole || !parts)
		goto out;
	for (i = 0; i < 2; i++) {
		run(kinds[i], flags & 7, in, size, size, whole);
		run(kinds[i], flags & 7, in, size, split, parts);
		check(whole->len == parts->len && memcmp(whole->s, parts->s, whole->len) == 0);
	}
out:
	free(whole);
	free(parts);
}

static void check_normalizer(const char *in, size_t size)
{
	char *out = malloc(size + 2);
	size_t len;
	const char *why = NULL;

	if (!out)
		return;
	if (http_path_normalize(in, size, out, size + 2, &len, &why) == 0) {
		check(len <= size + 1 && out[len] == '\0');
		check_normalized(out, len);
	} else {
		check(why != NULL);
	}
	free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t split;
	unsigned flags;

	if (size < 3)
		return 0;
	split = ((size_t)data[0] << 8 | data[1]) % (size - 2 + 1);
	flags = data[2];
	check_parsers((const char *)data + 3, size - 3, split > size - 3 ? size - 3 : split, flags);
	check_normalizer((const char *)data + 3, size - 3);
	return 0;
}
