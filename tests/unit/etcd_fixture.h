/*
 * etcd_fixture: a real one-member etcd (/usr/bin/etcd, the etcd-server
 * package) on 127.0.0.1 with ports it picks and a data dir under /tmp,
 * for the unit tests of the etcd client and the etcd store backend.
 */
#ifndef MESHLET_TEST_ETCD_FIXTURE_H
#define MESHLET_TEST_ETCD_FIXTURE_H

#include <sys/types.h>

struct etcd_fixture {
	pid_t pid;
	char dir[64];
	char url[64];      /* "http://127.0.0.1:<port>" */
	int peer;          /* its peer port */
};

/* Starts etcd and waits (up to 20 s) until it answers. 0 or -1 (printed). */
int etcd_fixture_start(struct etcd_fixture *f);

/* Stops it (SIGTERM) and starts it again on the same ports and data, waiting
 * until it answers. 0 or -1. */
int etcd_fixture_restart(struct etcd_fixture *f);

/* Stops it (SIGTERM, then SIGKILL) and removes its data dir. */
void etcd_fixture_stop(struct etcd_fixture *f);

#endif
