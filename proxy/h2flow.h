/*
 * h2flow: HTTP/2 on an http listener, beside HTTP/1.1 (httpflow.c). A
 * connection whose client opens with the HTTP/2 preface (h2c prior
 * knowledge from an app, or h2 between sidecars) is switched to this
 * table by httpflow before its first request. Two nghttp2 sessions hold
 * it: one facing the client (server), one facing the upstream (client);
 * each client stream is checked, decided by the policy (inbound) and
 * forwarded as a stream of the upstream session, with its DATA passed on
 * only as the other side takes it (flow-control windows are reopened when
 * bytes leave, never when they arrive). The streams of one client
 * connection share one upstream connection in this version (1:1); a
 * stream keeps nothing of the connection it rides but its session, so
 * pooled upstream sessions can carry them later.
 */
#ifndef MESHLET_PROXY_H2FLOW_H
#define MESHLET_PROXY_H2FLOW_H

#include "conn-t.h"

extern const struct conn_proto_ops h2flow_ops;

struct snapshot;
struct worker;

/* Drains w's inbound HTTP/2 connections decided under another policy than s's. */
void h2flow_drain_stale(struct worker *w, const struct snapshot *s);

#endif
