/* endpick: endpoint choice, outlier ejection and the retry budget per worker. */
#include "endpick.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct pick_listener {
	struct config_addr *addrs;      /* the endpoints the state below is for */
	struct traffic_outlier_set out; /* out.n == number of addrs */
	unsigned rr;                    /* round-robin position */
	struct traffic_budget budget;
};

struct endpick {
	struct pick_listener *ls;
	size_t n;
};

struct endpick *endpick_new(size_t n_listeners)
{
	struct endpick *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->ls = calloc(n_listeners ? n_listeners : 1, sizeof(*p->ls));
	if (!p->ls) {
		free(p);
		return NULL;
	}
	p->n = n_listeners;
	return p;
}

void endpick_free(struct endpick *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->n; i++) {
		free(p->ls[i].addrs);
		traffic_outlier_set_free(&p->ls[i].out);
	}
	free(p->ls);
	free(p);
}

static bool same_addr(const struct config_addr *a, const struct config_addr *b)
{
	return a->len == b->len && memcmp(&a->ss, &b->ss, a->len) == 0;
}

static bool same_list(const struct pick_listener *l, const struct config_addr *eps, size_t n)
{
	if (l->out.n != n || !l->addrs)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!same_addr(&l->addrs[i], &eps[i]))
			return false;
	return true;
}

/*
 * The listener's endpoints changed (a new snapshot): new state, where an
 * address it still has keeps its streak and ejection. Returns 0 or -ENOMEM.
 */
static int follow(struct pick_listener *l, const struct config_addr *eps, size_t n)
{
	struct traffic_outlier_set out;
	struct config_addr *addrs = malloc(n * sizeof(*addrs));

	if (!addrs || traffic_outlier_set_init(&out, n) < 0) {
		free(addrs);
		return -ENOMEM;
	}
	memcpy(addrs, eps, n * sizeof(*addrs));
	for (size_t i = 0; i < n; i++) {
		for (size_t k = 0; l->addrs && k < l->out.n; k++) {
			if (!same_addr(&eps[i], &l->addrs[k]))
				continue;
			out.eps[i] = l->out.eps[k];
			out.n_ejected += out.eps[i].ejected;
			break;
		}
	}
	free(l->addrs);
	traffic_outlier_set_free(&l->out);
	l->addrs = addrs;
	l->out = out;
	return 0;
}

static bool was_tried(const struct endpick_tried *t, size_t i)
{
	return i < ENDPICK_TRACKED && (t->bits[i / 64] >> (i % 64) & 1);
}

static void mark_tried(struct endpick_tried *t, size_t i)
{
	if (i < ENDPICK_TRACKED)
		t->bits[i / 64] |= 1ull << (i % 64);
	t->n++;
}

int endpick_choose(struct endpick *p, size_t listener, const struct config_addr *eps, size_t n,
                   struct endpick_tried *tried, int64_t now_us)
{
	struct pick_listener *l;
	long fallback = -1;

	if (listener >= p->n || n == 0 || tried->n >= n)
		return -1;
	l = &p->ls[listener];
	if (!same_list(l, eps, n) && follow(l, eps, n) < 0)
		return -1;
	/* Ends the ejections whose time passed (so endpick_ejected is current). */
	for (size_t i = 0; l->out.n_ejected && i < n; i++)
		traffic_outlier_usable(&l->out, i, now_us);
	for (size_t k = 0; k < n; k++) {
		size_t i = (l->rr + k) % n;

		if (was_tried(tried, i))
			continue;
		if (!traffic_outlier_usable(&l->out, i, now_us)) {
			if (fallback < 0)
				fallback = (long)i;
			continue;
		}
		/* A call's first choice moves the rotation on; its retries do not
		 * (they would make every call start at the same endpoint). */
		if (tried->n == 0 && !tried->again)
			l->rr = (unsigned)(i + 1);
		mark_tried(tried, i);
		return (int)i;
	}
	if (fallback >= 0)
		mark_tried(tried, (size_t)fallback);
	return (int)fallback;
}

bool endpick_report(struct endpick *p, size_t listener, const struct config_addr *addr,
                    bool failed, const struct traffic_outlier *cfg, int64_t now_us)
{
	struct pick_listener *l = listener < p->n ? &p->ls[listener] : NULL;

	for (size_t i = 0; l && l->addrs && i < l->out.n; i++) {
		if (same_addr(&l->addrs[i], addr))
			return traffic_outlier_report(&l->out, cfg, i, failed, now_us);
	}
	return false;
}

size_t endpick_ejected(const struct endpick *p)
{
	size_t n = 0;

	for (size_t i = 0; i < p->n; i++)
		n += p->ls[i].out.n_ejected;
	return n;
}

void endpick_first_attempt(struct endpick *p, size_t listener, int64_t now_us)
{
	if (listener < p->n)
		traffic_budget_request(&p->ls[listener].budget, now_us);
}

bool endpick_may_retry(struct endpick *p, size_t listener, unsigned percent, int64_t now_us)
{
	return listener < p->n && traffic_budget_try_retry(&p->ls[listener].budget, percent, now_us);
}

void endpick_tried_restart(struct endpick_tried *t)
{
	memset(t->bits, 0, sizeof(t->bits));
	t->n = 0;
	t->again = true;
}

bool endpick_idempotent(const char *method, size_t len)
{
	static const char *const safe[] = { "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE" };

	for (size_t i = 0; i < sizeof(safe) / sizeof(safe[0]); i++)
		if (strlen(safe[i]) == len && memcmp(safe[i], method, len) == 0)
			return true;
	return false;
}

bool endpick_retryable(const struct traffic_retries *cfg, const struct endpick_request *r,
                       enum endpick_failure why, int status)
{
	bool named;

	if (!cfg || r->retries >= cfg->attempts || !r->idempotent || !r->resendable)
		return false;
	switch (why) {
	case ENDPICK_RESET:
		named = cfg->on & TRAFFIC_ON_RESET;
		break;
	case ENDPICK_TIMEOUT:
		named = cfg->on & TRAFFIC_ON_TIMEOUT;
		break;
	default:
		named = traffic_retry_on_status(cfg, status);
		break;
	}
	return named;
}
