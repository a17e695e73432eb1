/*
 * libFuzzer target for the HTTP/2 module as the relay drives it: a real
 * struct conn on an inbound http listener (a real snapshot: config, policy
 * "deny /admin", SVID from tests/unit/proxy_fixture.c) starts as HTTP/1.1,
 * is handed to h2flow by the client preface, and gets the input as the
 * client's bytes (after the preface) and, from the offset in its first two
 * bytes, as the app's bytes (after an empty SETTINGS). Both directions are
 * run to a standstill after each piece, then every timer is fired.
 *
 * What the flow sends to the app is read by a real nghttp2 server session
 * playing the app, and every request it sees must hold: one :path that is
 * normalised (http_path_normalize gives it back unchanged) and not under
 * /admin, and exactly one x-forwarded-client-cert, ours. Beyond that: no
 * crash, no leak, no undefined behaviour (ASan, UBSan).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "meshlet/http.h"
#include "conn.h"
#include "h2session.h"
#include "httpflow.h"
#include "proxy_fixture.h"
#include "worker-t.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FRONTEND "spiffe://mesh.local/svc/frontend"
#define XFCC "By=" FIXTURE_SELF ";URI=" FRONTEND

static const char config_json[] = "{\"service\": \"orders\", \"trust_domain\": \"mesh.local\","
	" \"tls\": {\"cert\": \"svid.pem\", \"key\": \"svid.key\", \"bundle\": \"bundle.pem\"},"
	" \"policy_file\": \"policy.json\", \"log\": {\"access_log\": false, \"level\": \"error\"},"
	" \"inbound\": [{\"listen\": \"127.0.0.1:15006\", \"forward\": \"127.0.0.1:8080\","
	" \"protocol\": \"http\"}]}";

static const char policy_json[] = "{\"service\": \"orders\", \"default\": \"deny\", \"rules\": ["
	"{\"name\": \"no-admin\", \"action\": \"deny\", \"paths\": [\"/admin\", \"/admin/*\"]},"
	"{\"name\": \"frontend\", \"action\": \"allow\", \"from\": [\"" FRONTEND "\"]}]}";

static struct {
	struct metrics *m;
	struct snapshot *s;
	struct worker_shared sh;
	struct worker w;
	nghttp2_session_callbacks *app_cb;
} fz;

/* The app's view of one request. */
struct app_req {
	int paths, xfcc;
	bool bad;
};

static struct snapshot *current(void *arg)
{
	return snapshot_ref(fz.s);
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
}

static void check(int cond)
{
	if (!cond)
		abort();
}

static bool normalised(const uint8_t *v, size_t len)
{
	char out[4096];
	size_t n = 0, plen = len;
	const char *why = NULL;
	const uint8_t *q = memchr(v, '?', len);

	if (len == 1 && v[0] == '*')
		return true;
	if (q)
		plen = (size_t)(q - v);
	if (plen + 2 > sizeof(out) || plen == 0 || v[0] != '/')
		return false;
	if (http_path_normalize((const char *)v, plen, out, sizeof(out), &n, &why) < 0)
		return false;
	if (n != plen || memcmp(out, v, n) != 0)
		return false;
	return !(n >= 6 && !memcmp(out, "/admin", 6) && (n == 6 || out[6] == '/'));
}

static int app_begin(nghttp2_session *s, const nghttp2_frame *f, void *user)
{
	memset(user, 0, sizeof(struct app_req));
	return 0;
}

static int app_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                      const uint8_t *value, size_t vl, uint8_t flags, void *user)
{
	struct app_req *r = user;

	if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
		return 0;
	if (nl == 5 && !memcmp(name, ":path", 5)) {
		r->paths++;
		r->bad |= !normalised(value, vl);
	}
	if (nl == 23 && !memcmp(name, "x-forwarded-client-cert", 23)) {
		r->xfcc++;
		r->bad |= vl != strlen(XFCC) || memcmp(value, XFCC, vl) != 0;
	}
	return 0;
}

static int app_frame(nghttp2_session *s, const nghttp2_frame *f, void *user)
{
	const struct app_req *r = user;

	if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST)
		check(r->paths == 1 && r->xfcc == 1 && !r->bad);
	return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	fz.m = metrics_new();
	fz.s = fixture_snapshot(config_json, policy_json, NULL, 0, fz.m);
	fz.sh.metrics = fz.m;
	fz.sh.snapshot = current;
	fz.w.shared = &fz.sh;
	fz.w.base = event_base_new();
	check(fz.w.base != NULL && nghttp2_session_callbacks_new(&fz.app_cb) == 0);
	nghttp2_session_callbacks_set_on_begin_headers_callback(fz.app_cb, app_begin);
	nghttp2_session_callbacks_set_on_header_callback(fz.app_cb, app_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(fz.app_cb, app_frame);
	return 0;
}

static struct conn *open_conn(void)
{
	struct conn *c = calloc(1, sizeof(*c));

	check(c != NULL);
	c->w = &fz.w;
	c->snap = snapshot_ref(fz.s);
	c->id = 1;
	c->inbound = true;
	c->dir = DIR_INBOUND;
	c->tls_fd = c->plain_fd = -1;
	c->peer = strdup(FRONTEND);
	c->state = CONN_RELAYING;
	clock_gettime(CLOCK_MONOTONIC, &c->started);
	clock_gettime(CLOCK_REALTIME, &c->started_wall);
	c->proto = &httpflow_ops;
	check(c->proto->init(c) == 0);
	event_assign(&c->tls_ev, fz.w.base, -1, 0, on_kick, c);
	fz.w.conns = c;
	fz.w.n_conns = 1;
	atomic_fetch_add(&fz.sh.open_conns, 1);
	atomic_fetch_add(&fz.m->connections_active[c->dir], 1);
	c->proto->start(c);
	return c;
}

/* The source of direction d delivers len bytes (at most one buffer). */
static void put(struct conn *c, int d, const uint8_t *p, size_t len)
{
	struct relay_dir *r = &c->d[d];
	size_t keep = r->in ? r->in->len - r->in->off : 0;

	if (!r->in)
		r->in = calloc(1, sizeof(*r->in));
	check(r->in != NULL && keep + len <= RELAY_BUF_SIZE);
	memmove(r->in->data, r->in->data + r->in->off, keep);    /* need_more keeps bytes */
	memcpy(r->in->data + keep, p, len);
	r->in->off = 0;
	r->in->len = (uint32_t)(keep + len);
	r->need_more = false;
}

/* Runs direction d until it waits; the app's output is read by app. Returns false once c closed. */
static bool run(struct conn **cp, int d, nghttp2_session *app)
{
	for (int i = 0; i < 100000; i++) {
		struct relay_dir *r = &(*cp)->d[d];
		int rc;

		if (r->out_len) {
			if (d == RELAY_DOWN && app)    /* inbound: RELAY_DOWN goes to the app */
				nghttp2_session_mem_recv(app, (const uint8_t *)r->out, r->out_len);
			free(r->owned);
			r->owned = NULL;
			r->out = NULL;
			r->out_len = 0;
			continue;
		}
		rc = (*cp)->proto->produce(*cp, d);
		if (rc < 0) {
			*cp = NULL;
			return false;
		}
		if (rc == 0)
			return true;
	}
	return true;
}

/* Feeds data to direction d in buffer-sized pieces, running both directions. */
static bool feed(struct conn **cp, int d, const uint8_t *p, size_t len, nghttp2_session *app)
{
	while (*cp && len) {
		size_t n = len < 4096 ? len : 4096;

		put(*cp, d, p, n);
		p += n;
		len -= n;
		if (!run(cp, RELAY_DOWN, app) || !run(cp, RELAY_UP, app))
			return false;
	}
	return *cp != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint8_t settings[] = { 0, 0, 0, NGHTTP2_SETTINGS, 0, 0, 0, 0, 0 };
	struct app_req req = { 0 };
	nghttp2_session *app = NULL;
	struct conn *c;
	size_t split;

	if (size < 2)
		return 0;
	split = ((size_t)data[0] << 8 | data[1]) % (size - 1);
	data += 2;
	size -= 2;
	check(nghttp2_session_server_new(&app, fz.app_cb, &req) == 0);
	c = open_conn();
	if (feed(&c, RELAY_DOWN, (const uint8_t *)H2_PREFACE, H2_PREFACE_LEN, app) &&
	    feed(&c, RELAY_DOWN, data, split, app) && feed(&c, RELAY_UP, settings, sizeof(settings), app))
		feed(&c, RELAY_UP, data + split, size - split, app);
	if (c && c->proto->on_timeout(c, conn_clock_ms() + 86400000ULL) && c) {
		run(&c, RELAY_DOWN, app);
		if (c)
			run(&c, RELAY_UP, app);
	}
	if (c)
		conn_close(c, CR_DONE);
	check(fz.w.n_conns == 0);
	conn_free_buffers(&fz.w);
	nghttp2_session_del(app);
	return 0;
}
