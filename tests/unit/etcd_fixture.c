/* etcd_fixture: a real etcd for unit tests; see etcd_fixture.h. */
#include "etcd_fixture.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "meshlet/store.h"

#define ETCD_BIN "/usr/bin/etcd"

/* A port free now on 127.0.0.1 (the kernel's pick). */
static int free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

	if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&a, &len) == 0)
		port = ntohs(a.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static void run_etcd(const struct etcd_fixture *f, int peer)
{
	char data[128], log[128], peer_url[64], cluster[96];
	int fd;

	snprintf(data, sizeof(data), "%s/data", f->dir);
	snprintf(log, sizeof(log), "%s/etcd.log", f->dir);
	snprintf(peer_url, sizeof(peer_url), "http://127.0.0.1:%d", peer);
	snprintf(cluster, sizeof(cluster), "unit=%s", peer_url);
	fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd >= 0) {
		dup2(fd, 1);
		dup2(fd, 2);
	}
	execl(ETCD_BIN, ETCD_BIN, "--name", "unit", "--data-dir", data,
	      "--listen-client-urls", f->url, "--advertise-client-urls", f->url,
	      "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
	      "--initial-cluster", cluster, "--max-request-bytes", "4194304",
	      (char *)NULL);
	_exit(127);
}

/* Starts etcd on f's ports and waits until it answers. */
static int spawn(struct etcd_fixture *f)
{
	struct store_etcd_opts o = {0};
	struct meshlet_err err = {0};
	struct store *s = NULL;

	f->pid = fork();
	if (f->pid == 0)
		run_etcd(f, f->peer);
	if (f->pid < 0)
		return -1;
	o.endpoints = f->url;
	o.timeout_ms = 1000;
	for (int i = 0; i < 200; i++) {
		struct timespec ts = { 0, 100 * 1000 * 1000 };

		if (store_open_etcd(&s, &o, &err) == 0) {
			store_close(s);
			return 0;
		}
		nanosleep(&ts, NULL);
	}
	fprintf(stderr, "etcd_fixture: etcd at %s did not answer: %s (see %s/etcd.log)\n", f->url,
	        err.message, f->dir);
	return -1;
}

static void halt(struct etcd_fixture *f)
{
	if (f->pid > 0) {
		kill(f->pid, SIGTERM);
		for (int i = 0; i < 50 && waitpid(f->pid, NULL, WNOHANG) == 0; i++)
			usleep(100 * 1000);
		if (kill(f->pid, SIGKILL) == 0)
			waitpid(f->pid, NULL, 0);
		f->pid = 0;
	}
}

int etcd_fixture_restart(struct etcd_fixture *f)
{
	halt(f);
	return spawn(f);
}

int etcd_fixture_start(struct etcd_fixture *f)
{
	int client = free_port(), peer = free_port();

	memset(f, 0, sizeof(*f));
	if (access(ETCD_BIN, X_OK) != 0) {
		fprintf(stderr, "etcd_fixture: %s missing: install etcd-server\n", ETCD_BIN);
		return -1;
	}
	snprintf(f->dir, sizeof(f->dir), "/tmp/etcd_fixture.XXXXXX");
	if (!mkdtemp(f->dir) || client < 0 || peer < 0)
		return -1;
	snprintf(f->url, sizeof(f->url), "http://127.0.0.1:%d", client);
	f->peer = peer;
	if (spawn(f) == 0)
		return 0;
	etcd_fixture_stop(f);
	return -1;
}

void etcd_fixture_stop(struct etcd_fixture *f)
{
	halt(f);
	if (f->dir[0])
		nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	f->dir[0] = '\0';
}
