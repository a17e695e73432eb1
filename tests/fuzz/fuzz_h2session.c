/*
 * libFuzzer target for proxy/h2session.c alone, the nghttp2 side of the
 * HTTP/2 module (fuzz_h2.c drives the whole module): the input (after the client preface, so the fuzzer starts past
 * the magic) is fed as frames to a server session set up by
 * h2_session_new() with the default limits, in two reads split at a point
 * taken from the input. Every header block nghttp2 accepts goes through
 * h2_check_request() / h2_check_response(), every frame header through
 * the abuse counters, grpc-timeout values through their parser; the
 * session's answers are drained as h2flow drains them. Beyond "no crash,
 * no leak", it checks that a block the checks accept has exactly one
 * :method and a :path starting with '/' or "*", and that no accepted
 * field carries CR, LF or NUL.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "h2session.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_FIELDS 64

struct fuzz_ctx {
	struct h2_guard guard;
	struct h2_field f[MAX_FIELDS];
	char *copies[MAX_FIELDS * 2];
	size_t n;
	bool dead;
};

static void check(int cond)
{
	if (!cond)
		abort();
}

static void reset_fields(struct fuzz_ctx *x)
{
	for (size_t i = 0; i < x->n * 2; i++)
		free(x->copies[i]);
	x->n = 0;
}

static char *copy(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (s) {
		memcpy(s, p, n);
		s[n] = '\0';
	}
	return s;
}

static int on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *user)
{
	struct fuzz_ctx *x = user;

	if (x->dead)
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	if (h2_guard_frame(&x->guard, hd, nghttp2_session_get_next_stream_id(s) / 2,
	                   hd->type == NGHTTP2_HEADERS, 0) >= 0) {
		x->dead = true;
		nghttp2_session_terminate_session(s, NGHTTP2_ENHANCE_YOUR_CALM);
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	}
	return 0;
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *user)
{
	reset_fields(user);
	return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                     const uint8_t *value, size_t vl, uint8_t flags, void *user)
{
	struct fuzz_ctx *x = user;
	char *n, *v;

	if (h2_guard_header(&x->guard, nl, vl) >= 0 || x->n == MAX_FIELDS)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
	n = copy(name, nl);
	v = copy(value, vl);
	if (!n || !v) {
		free(n);
		free(v);
		return NGHTTP2_ERR_CALLBACK_FAILURE;
	}
	x->copies[2 * x->n] = n;
	x->copies[2 * x->n + 1] = v;
	x->f[x->n++] = (struct h2_field){ n, v, nl, vl };
	return 0;
}

static void check_accepted(const struct fuzz_ctx *x)
{
	size_t methods = 0;
	const struct h2_field *path = NULL;

	for (size_t i = 0; i < x->n; i++) {
		check(!memchr(x->f[i].value, '\r', x->f[i].value_len));
		check(!memchr(x->f[i].value, '\n', x->f[i].value_len));
		check(!memchr(x->f[i].value, '\0', x->f[i].value_len));
		if (x->f[i].name_len == 7 && !memcmp(x->f[i].name, ":method", 7))
			methods++;
		if (x->f[i].name_len == 5 && !memcmp(x->f[i].name, ":path", 5))
			path = &x->f[i];
		if (x->f[i].name_len == 12 && !memcmp(x->f[i].name, "grpc-timeout", 12))
			(void)h2_grpc_timeout_ms(x->f[i].value, x->f[i].value_len);
	}
	check(methods == 1 && path && (path->value[0] == '/' || !strcmp(path->value, "*")));
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *user)
{
	struct fuzz_ctx *x = user;
	const char *why = NULL;

	if (f->hd.type != NGHTTP2_HEADERS)
		return 0;
	if (f->headers.cat == NGHTTP2_HCAT_REQUEST) {
		enum h2_refusal r = h2_check_request(x->f, x->n, &why);

		check((r == H2_OK) == (why == NULL));
		if (r == H2_OK)
			check_accepted(x);
		else if (r == H2_MALFORMED)
			nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, f->hd.stream_id,
			                          NGHTTP2_PROTOCOL_ERROR);
	} else {
		(void)h2_check_response(x->f, x->n, true, &why);
	}
	return 0;
}

static void drain(nghttp2_session *s)
{
	const uint8_t *out;

	for (int i = 0; i < 64 && nghttp2_session_mem_send(s, &out) > 0; i++)
		;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const struct config_http2 lim = { 100, 16384, 65535 };
	struct fuzz_ctx x = { .n = 0 };
	nghttp2_session_callbacks *cb;
	nghttp2_session *s;
	size_t split = size ? data[0] % (size + 1) : 0;

	if (nghttp2_session_callbacks_new(&cb) != 0)
		return 0;
	nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
	nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
	nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
	h2_guard_init(&x.guard, &lim, 0);
	if (h2_session_new(&s, true, &lim, cb, &x) == 0) {
		drain(s);
		if (nghttp2_session_mem_recv(s, (const uint8_t *)H2_PREFACE, H2_PREFACE_LEN) ==
		    H2_PREFACE_LEN &&
		    nghttp2_session_mem_recv(s, data, split) >= 0) {
			drain(s);
			if (nghttp2_session_mem_recv(s, data + split, size - split) >= 0)
				drain(s);
		}
		nghttp2_session_del(s);
	}
	reset_fields(&x);
	nghttp2_session_callbacks_del(cb);
	return 0;
}
