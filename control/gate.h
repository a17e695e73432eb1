/*
 * gate: the filter bufferevent between TLS and evhttp that judges each
 * request's head before evhttp may read its body.
 *
 * evhttp (libevent 2.1) reads a whole body before it calls us, and has no
 * server-side hook after the headers. So the gate frames every request
 * with lib/http.c. At each head it makes the checks that need no route
 * (method, target form, framing, one Authorization field) and, for a head
 * with a body, asks its judge (the server: route, authentication, size).
 * A head that passes goes to evhttp as lib/http.c serialises it (the path
 * evhttp routes is the one judged here), its body after it; a refused one
 * is replaced by a bodiless head marked with a reserved field, which the
 * server answers with the stored error (gate_refused()), while the body is
 * read and discarded so that the connection stays usable and nothing is
 * held. Bodies are only accepted with Content-Length (411 otherwise).
 *
 * evhttp must never close a connection after an answer: the filter hands
 * the answer to TLS at once and reports it written, so evhttp would shut
 * the socket before TLS wrote it. Heads therefore reach evhttp without
 * Connection: close (HTTP/1.0 ones with keep-alive), answers never carry
 * it, and connections end when the client closes them or by the timeouts.
 * "Expect: 100-continue" is answered here for the same reason.
 */
#ifndef MESHLET_CONTROL_GATE_H
#define MESHLET_CONTROL_GATE_H

#include <stdbool.h>
#include <event2/bufferevent.h>
#include <event2/http.h>

#include "meshlet/api.h"
#include "meshlet/http.h"

/*
 * Judges a head with a non-empty body: 0 (evhttp may read it) or an HTTP
 * status with the answer in *ae. authz: its Authorization field, or NULL.
 */
typedef int (*gate_judge_fn)(void *arg, const struct http_head *h, const char *authz,
                             struct api_error *ae);

/* One connection's gate; embedded in the server's connection. */
struct gate {
	struct http_parser_state parser;
	struct bufferevent *tls;       /* where "100 Continue" is written */
	gate_judge_fn judge;
	void *arg;
	bool in_body;                  /* between a head and its end */
	bool drop;                     /* this body is refused: read and discard it */
	bool dead;                     /* framing lost or refusals piling up: discard all */
	struct api_error *err;         /* the answer to the marked head, or NULL
	                                * (allocated: one gate lives per connection) */
};

/* Sets g up for a connection over tls with the head limits lim. */
void gate_init(struct gate *g, const struct http_limits *lim, struct bufferevent *tls,
               gate_judge_fn judge, void *arg);

/* Frees what the parser holds. */
void gate_cleanup(struct gate *g);

/* The input filter for bufferevent_filter_new() (arg: the struct gate):
 * TLS plaintext in src, what evhttp may read out in dst. */
enum bufferevent_filter_result gate_in(struct evbuffer *src, struct evbuffer *dst,
                                       ev_ssize_t limit, enum bufferevent_flush_mode mode,
                                       void *arg);

/* True when req is a head the gate wrote in place of a refused one; *ae
 * then gets the stored answer, which the gate forgets (the next refusal
 * may be stored). */
bool gate_refused(struct gate *g, struct evhttp_request *req, struct api_error *ae);

/* Records status and message (no path) in ae; returns status. */
int gate_fail(struct api_error *ae, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
