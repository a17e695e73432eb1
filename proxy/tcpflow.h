/*
 * tcpflow: the protocol of tcp listeners (and of every transparent
 * connection): what is read from one side is written to the other,
 * without a copy, and the policy decides once per connection. The
 * relay's fast path: every entry is trivial.
 */
#ifndef MESHLET_PROXY_TCPFLOW_H
#define MESHLET_PROXY_TCPFLOW_H

#include "conn-t.h"

extern const struct conn_proto_ops tcpflow_ops;

#endif
