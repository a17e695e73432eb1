/*
 * httpflow: HTTP/1.1 on an http listener. It sits between the reads and the
 * writes of the relay (conn.c): the request direction is parsed, every
 * request decided by the policy (inbound) and forwarded with a rewritten
 * head (normalised path, x-forwarded-client-cert, x-request-id); the
 * response direction is parsed to match each response to its request, in
 * order, with the proxy's own answers (403, 400, 502, 504, ...) slotted in
 * where pipelining puts them. Bodies stream through unchanged.
 *
 * conn.c reaches it only through this table (conn-t.h says what each entry
 * does); its state hangs off c->proto_ctx.
 */
#ifndef MESHLET_PROXY_HTTPFLOW_H
#define MESHLET_PROXY_HTTPFLOW_H

#include "conn-t.h"

/* Requests read but not yet answered. Past this many, the request side
 * stops reading (backpressure on pipelining clients). */
#define HTTPFLOW_INFLIGHT 16

extern const struct conn_proto_ops httpflow_ops;

#endif
