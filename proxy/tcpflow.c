/* tcpflow: the protocol of a tcp listener: bytes relayed as they are. */
#include "tcpflow.h"

#include "conn.h"

static int tcp_init(struct conn *c)
{
	return 0;
}

static void tcp_nothing(struct conn *c)
{
}

static int tcp_eof(struct conn *c, int d)
{
	return 0;
}

static uint64_t tcp_due(const struct conn *c, bool tls_side)
{
	return 0;
}

static bool tcp_on_timeout(struct conn *c, uint64_t now)
{
	return false;
}

/* A byte stream has no way to say why: the client sees the close. */
static void tcp_fail_early(struct conn *c, int status, enum conn_reason reason)
{
	conn_close(c, reason);
}

/* A tcp connection cannot be told to stop between messages: it finishes
 * on its own, or at the drain timeout. */
static bool tcp_drain(struct conn *c)
{
	return false;
}

static bool tcp_done(const struct conn *c)
{
	return true;
}

static bool tcp_logged(const struct conn *c)
{
	return false;
}

const struct conn_proto_ops tcpflow_ops = {
	.name = "tcp",
	.per_request_policy = false,
	.answers_after_reset = false,
	.init = tcp_init,
	.release = tcp_nothing,
	.start = tcp_nothing,
	.produce = NULL,    /* relayed as is, by conn.c */
	.eof = tcp_eof,
	.due = tcp_due,
	.on_timeout = tcp_on_timeout,
	.fail_early = tcp_fail_early,
	.drain = tcp_drain,
	.shrink = tcp_nothing,
	.done = tcp_done,
	.logged = tcp_logged,
};
