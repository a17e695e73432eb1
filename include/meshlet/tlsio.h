/*
 * tlsio: blocking I/O on one client connection, TLS or plain TCP, for the
 * two blocking HTTP clients: lib/httpc.c (proxies and meshletctl to
 * control) and lib/etcd.c (control to etcd).
 *
 * The socket is non-blocking and every wait is a poll() bounded by one
 * deadline (CLOCK_MONOTONIC milliseconds, 0: none) and, when given, an
 * eventfd-like descriptor or an atomic flag that cancels. The caller owns
 * what is specific to it: the SSL object's settings (SNI, name checks,
 * verify callbacks), the HTTP messages, keep-alive.
 *
 * Results: > 0 bytes or done, 0 the peer's clean end (a close_notify, or
 * a close without one that OpenSSL reports as no error), or a negative
 * errno: -ETIMEDOUT (deadline), -ECANCELED (cancel_fd readable or
 * *cancelled set), -EPROTO (a TLS error: OpenSSL's error queue still holds
 * it, for the caller's message; the caller clears it), other -errno from
 * the socket.
 */
#ifndef MESHLET_TLSIO_H
#define MESHLET_TLSIO_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/ssl.h>

struct tlsio {
	int fd;                        /* -1: not connected */
	SSL *ssl;                      /* on fd; NULL: plain TCP */
	int64_t deadline;              /* tlsio_now_ms() value; 0: none */
	int cancel_fd;                 /* readable: give up; -1: none */
	const atomic_bool *cancelled;  /* true: give up; NULL: none */
};

/* A connection that is none yet: fd -1, no TLS, no deadline, no cancel. */
void tlsio_init(struct tlsio *io);

/* CLOCK_MONOTONIC in milliseconds: the clock of deadlines. */
int64_t tlsio_now_ms(void);

/*
 * Connects io->fd to host:port (a name or an IP literal, IPv6 without
 * brackets), each address in turn, with TCP_NODELAY (requests are small
 * writes answered at once). Each address gets at most connect_ms (0: up to
 * the deadline). 0, or a negative errno with why (may be NULL) saying it
 * in words: -EHOSTUNREACH when the name does not resolve, -ETIMEDOUT and
 * -ECANCELED (no further address is tried), else the last address's error.
 */
int tlsio_connect(struct tlsio *io, const char *host, const char *port, int connect_ms,
                  char *why, size_t why_len);

/* Waits until fd is ready for events (POLLIN, POLLOUT): 0 or -errno. */
int tlsio_wait(struct tlsio *io, short events);

/* SSL_connect() on io->ssl until done: 1, 0 (the peer closed), -errno. */
int tlsio_handshake(struct tlsio *io);

/* Reads up to len bytes: > 0, 0 at the peer's end, -errno. */
ssize_t tlsio_read(struct tlsio *io, void *buf, size_t len);

/* Writes all len bytes: 0 or -errno; *sent (may be NULL) says how many
 * went out, so that a caller can still read an early answer. */
int tlsio_write_all(struct tlsio *io, const void *buf, size_t len, size_t *sent);

/* Frees the SSL (after one close_notify when clean, without waiting for
 * the peer's) and closes fd; io can connect again. */
void tlsio_close(struct tlsio *io, bool clean);

#endif
