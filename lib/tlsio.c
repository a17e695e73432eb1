/* tlsio: blocking client I/O over TLS or TCP with a deadline; see meshlet/tlsio.h. */
#include "meshlet/tlsio.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <openssl/err.h>

/* One SSL_write() at most this much (an int). */
#define TLSIO_WRITE_MAX (1 << 30)

void tlsio_init(struct tlsio *io)
{
	memset(io, 0, sizeof(*io));
	io->fd = -1;
	io->cancel_fd = -1;
}

int64_t tlsio_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool cancelled(const struct tlsio *io)
{
	return io->cancelled && atomic_load(io->cancelled);
}

int tlsio_wait(struct tlsio *io, short events)
{
	for (;;) {
		struct pollfd p[2] = { { .fd = io->fd, .events = events },
		                       { .fd = io->cancel_fd, .events = POLLIN } };
		int64_t left = io->deadline ? io->deadline - tlsio_now_ms() : -1;
		int r;

		if (cancelled(io))
			return -ECANCELED;
		if (io->deadline && left <= 0)
			return -ETIMEDOUT;
		r = poll(p, io->cancel_fd >= 0 ? 2 : 1, left > INT32_MAX ? INT32_MAX : (int)left);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (io->cancel_fd >= 0 && p[1].revents)
			return -ECANCELED;
		if (r > 0)
			return 0;
		/* r == 0: the deadline passed (checked again at the top) */
	}
}

/* ---- connecting ---- */

static bool is_ip_literal(const char *host)
{
	struct in6_addr a6;
	struct in_addr a4;

	return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

static int resolve(const char *host, const char *port, struct addrinfo **res, char *why,
                   size_t why_len)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
	                          .ai_flags = AI_ADDRCONFIG };
	int r;

	if (is_ip_literal(host))
		hints.ai_flags |= AI_NUMERICHOST;
	r = getaddrinfo(host, port, &hints, res);
	if (r == EAI_ADDRFAMILY || r == EAI_NONAME) {
		/* AI_ADDRCONFIG hides loopback-only families (a container
		 * without a routable address reaching 127.0.0.1 or ::1). */
		hints.ai_flags &= ~AI_ADDRCONFIG;
		r = getaddrinfo(host, port, &hints, res);
	}
	if (r == 0)
		return 0;
	if (why)
		snprintf(why, why_len, "%s", gai_strerror(r));
	return -EHOSTUNREACH;
}

/* One address within connect_ms (0: the deadline only): 0 or -errno. */
static int connect_one(struct tlsio *io, const struct addrinfo *ai, int connect_ms)
{
	int64_t saved = io->deadline, cap = tlsio_now_ms() + connect_ms;
	int one = 1, soerr = 0, r;
	socklen_t sl = sizeof(soerr);

	io->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
	                ai->ai_protocol);
	if (io->fd < 0)
		return -errno;
	setsockopt(io->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(io->fd, ai->ai_addr, ai->ai_addrlen) == 0)
		return 0;
	if (errno != EINPROGRESS)
		return -errno;
	if (connect_ms > 0 && (!io->deadline || cap < io->deadline))
		io->deadline = cap;
	r = tlsio_wait(io, POLLOUT);
	io->deadline = saved;
	if (r)
		return r;
	if (getsockopt(io->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0)
		return -errno;
	return -soerr;
}

int tlsio_connect(struct tlsio *io, const char *host, const char *port, int connect_ms,
                  char *why, size_t why_len)
{
	struct addrinfo *res = NULL;
	int r = resolve(host, port, &res, why, why_len);

	if (r)
		return r;
	r = -EADDRNOTAVAIL;
	for (const struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		r = connect_one(io, ai, connect_ms);
		if (!r)
			break;
		if (io->fd >= 0)
			close(io->fd);
		io->fd = -1;
		/* Cancelled, or out of time (the whole deadline, not one
		 * address's cap): no point in another address. */
		if (r == -ECANCELED || (io->deadline && tlsio_now_ms() >= io->deadline))
			break;
	}
	freeaddrinfo(res);
	if (r && why)
		snprintf(why, why_len, "%s", r == -ECANCELED ? "cancelled" :
		         r == -ETIMEDOUT ? "timed out" : r == -EADDRNOTAVAIL ? "no address" :
		         strerror(-r));
	return r;
}

/* ---- TLS ---- */

enum tlsio_op { OP_HANDSHAKE, OP_READ, OP_WRITE };

static int ssl_op(SSL *ssl, enum tlsio_op op, void *buf, int len)
{
	switch (op) {
	case OP_HANDSHAKE:
		return SSL_connect(ssl);
	case OP_READ:
		return SSL_read(ssl, buf, len);
	default:
		return SSL_write(ssl, buf, len);
	}
}

/* Runs one SSL step until it stops wanting I/O. */
static int ssl_step(struct tlsio *io, enum tlsio_op op, void *buf, int len)
{
	for (;;) {
		int r, e, w;

		ERR_clear_error();
		errno = 0;
		r = ssl_op(io->ssl, op, buf, len);
		if (r > 0)
			return r;
		e = SSL_get_error(io->ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			w = tlsio_wait(io, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT);
			if (w)
				return w;
			continue;
		}
		if (e == SSL_ERROR_ZERO_RETURN)
			return 0;
		if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
			/* A close without close_notify: the end, unless the socket said why. */
			return errno ? -errno : 0;
		return -EPROTO;
	}
}

int tlsio_handshake(struct tlsio *io)
{
	return ssl_step(io, OP_HANDSHAKE, NULL, 0);
}

ssize_t tlsio_read(struct tlsio *io, void *buf, size_t len)
{
	int cap = len > TLSIO_WRITE_MAX ? TLSIO_WRITE_MAX : (int)len;

	if (io->ssl)
		return ssl_step(io, OP_READ, buf, cap);
	for (;;) {
		ssize_t n = recv(io->fd, buf, len, 0);
		int w;

		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		if ((w = tlsio_wait(io, POLLIN)) != 0)
			return w;
	}
}

/* One write of some of buf: > 0 bytes, or -errno (-EPIPE: closed). */
static ssize_t write_some(struct tlsio *io, const char *buf, size_t len)
{
	size_t n = len > TLSIO_WRITE_MAX ? TLSIO_WRITE_MAX : len;

	if (io->ssl) {
		int r = ssl_step(io, OP_WRITE, (void *)buf, (int)n);

		return r == 0 ? -EPIPE : r;
	}
	for (;;) {
		ssize_t w = send(io->fd, buf, n, MSG_NOSIGNAL);
		int r;

		if (w >= 0)
			return w;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		if ((r = tlsio_wait(io, POLLOUT)) != 0)
			return r;
	}
}

int tlsio_write_all(struct tlsio *io, const void *buf, size_t len, size_t *sent)
{
	size_t off = 0;
	int r = 0;

	while (off < len) {
		ssize_t w = write_some(io, (const char *)buf + off, len - off);

		if (w < 0) {
			r = (int)w;
			break;
		}
		off += (size_t)w;
	}
	if (sent)
		*sent = off;
	return r;
}

void tlsio_close(struct tlsio *io, bool clean)
{
	if (io->ssl) {
		if (clean)
			SSL_shutdown(io->ssl);
		SSL_free(io->ssl);
		io->ssl = NULL;
	}
	if (io->fd >= 0)
		close(io->fd);
	io->fd = -1;
	ERR_clear_error();
}
