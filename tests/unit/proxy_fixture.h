/*
 * proxy_fixture: real snapshots for the unit tests of proxy/ modules. The
 * config and the policy go through lib/'s parsers; the TLS material is an
 * SVID for spiffe://mesh.local/svc/orders issued by a throw-away root of
 * lib/ca.c; snapshot_build() puts them together as the proxy does.
 */
#ifndef MESHLET_TESTS_PROXY_FIXTURE_H
#define MESHLET_TESTS_PROXY_FIXTURE_H

#include "meshlet/metrics.h"
#include "snapshot.h"

#define FIXTURE_TD "mesh.local"
#define FIXTURE_SELF "spiffe://mesh.local/svc/orders"

/*
 * A snapshot of service "orders" from config_json (a whole config
 * document; the tls and policy_file names are never opened) and
 * policy_json, with registry[0..n) (taken over; may be NULL). Fails the
 * test when snapshot_build refuses; fixture_try_snapshot returns NULL and
 * err instead.
 */
struct snapshot *fixture_snapshot(const char *config_json, const char *policy_json,
                                  struct snapshot_endpoints *registry, size_t n,
                                  struct metrics *m);
struct snapshot *fixture_try_snapshot(const char *config_json, const char *policy_json,
                                      struct snapshot_endpoints *registry, size_t n,
                                      struct metrics *m, struct meshlet_err *err);

/* A config parsed from text, failing the test when refused. */
struct config *fixture_config(const char *config_json);

/* "ip:port" parsed as config does it, failing the test when refused. */
struct config_addr fixture_addr(const char *text);

/* Frees the root and the SVID made on first use. */
void fixture_cleanup(void);

#endif
