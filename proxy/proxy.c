/* proxy: process setup, worker threads, reload and drain. */
#include "proxy.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/thread.h>

#include "admin.h"
#include "conn.h"
#include "ctlclient.h"
#include "meshlet/log.h"
#include "meshlet/tls.h"
#include "worker.h"

struct snapshot *proxy_snapshot(struct meshlet_proxy *p)
{
	struct snapshot *s;

	pthread_mutex_lock(&p->snap_lock);
	s = p->snap ? snapshot_ref(p->snap) : NULL;
	pthread_mutex_unlock(&p->snap_lock);
	return s;
}

static void swap_snapshot(struct meshlet_proxy *p, struct snapshot *s)
{
	struct snapshot *old;

	pthread_mutex_lock(&p->snap_lock);
	old = p->snap;
	p->snap = s;
	p->version = s->version;
	pthread_mutex_unlock(&p->snap_lock);
	/* A new bundle may revoke peers of open connections; a new policy
	 * drains the pooled HTTP/2 connections from other sidecars. */
	if (old && (old->server_ctx != s->server_ctx || old->policy != s->policy) &&
	    atomic_load(&p->workers_started))
		for (int i = 0; i < p->n_workers; i++)
			worker_send(&p->workers[i], WORKER_RECHECK);
	atomic_store(&p->metrics->config_version, (int_fast64_t)s->version);
	atomic_store(&p->metrics->cert_expiry, (int_fast64_t)s->cert_not_after);
	snapshot_unref(old);    /* connections still using it keep it alive */
}

int proxy_load(struct meshlet_proxy *p, struct meshlet_err *err)
{
	struct snapshot_source src = { 0 };
	struct config *cfg = NULL;
	struct snapshot *s, *cur;
	bool kept;

	if (config_load(p->config_file, &cfg, err) < 0)
		return -EINVAL;
	if (snapshot_check_reloadable(p->boot_cfg, cfg, err) < 0) {
		config_free(cfg);
		return -EINVAL;
	}
	if (!cfg->has_tls) {
		config_free(cfg);
		return err_set(err, "control", "the file switched to control mode: restart to apply");
	}
	if (snapshot_source_from_files(cfg, &src, err) < 0) {
		config_free(cfg);
		snapshot_source_free(&src);
		return -EINVAL;
	}
	/* Unchanged certificate, chain and bundle: the same contexts, sessions and all. */
	cur = proxy_snapshot(p);
	src.reuse_tls = cur;
	s = snapshot_build(cfg, &src, p->metrics, p->version + 1, err);
	kept = s && cur && s->server_ctx == cur->server_ctx;
	snapshot_unref(cur);
	if (!s)
		return -EINVAL;
	SSL_CTX_sess_set_new_cb(s->client_ctx, conn_on_new_session);
	swap_snapshot(p, s);
	if (kept)
		log_info("certificate and bundle unchanged: TLS contexts and sessions kept");
	return 0;
}

/*
 * Control mode: the settings for the next snapshot. The file is re-read (it
 * may have been edited), but a file that no longer loads, or that changes
 * what needs a restart, must not stop certificates and revocations from
 * applying: then the last good document is used, and the problem logged.
 */
static struct config *install_config(struct meshlet_proxy *p, struct meshlet_err *err)
{
	struct meshlet_err ferr = { { 0 }, { 0 } };
	struct config *cfg = NULL;
	json_t *doc = json_load_strict(p->config_file, CONFIG_MAX_FILE, MESHLET_JSON_MAX_DEPTH, &ferr);
	char msg[600];

	if (doc && config_parse(doc, p->config_file, &cfg, &ferr) == 0 &&
	    snapshot_check_reloadable(p->boot_cfg, cfg, &ferr) == 0) {
		json_decref(p->good_doc);
		p->good_doc = doc;
		return cfg;
	}
	log_error("%s: %s; keeping the settings it had", p->config_file,
	          err_str(&ferr, msg, sizeof(msg)));
	config_free(cfg);
	json_decref(doc);
	cfg = NULL;
	if (config_parse(p->good_doc, p->config_file, &cfg, err) < 0)
		return NULL;
	return cfg;
}

int proxy_install(struct meshlet_proxy *p, struct snapshot_source *src, struct meshlet_err *err)
{
	struct config *cfg = NULL;
	struct snapshot *cur = NULL, *s;
	uint64_t version;
	int rc = -EINVAL;

	cfg = install_config(p, err);
	if (!cfg)
		goto fail;
	pthread_mutex_lock(&p->snap_lock);
	cur = p->snap ? snapshot_ref(p->snap) : NULL;
	version = p->version + 1;
	pthread_mutex_unlock(&p->snap_lock);
	if (!src->tls && !cur) {
		err_set(err, "", "no certificate yet");
		goto fail;
	}
	src->reuse_tls = cur;
	s = snapshot_build(cfg, src, p->metrics, version, err);
	cfg = NULL;
	if (!s)
		goto out;
	if (s->client_ctx != (cur ? cur->client_ctx : NULL))
		SSL_CTX_sess_set_new_cb(s->client_ctx, conn_on_new_session);
	swap_snapshot(p, s);
	if (!atomic_load(&p->workers_started))
		event_active(p->installed_ev, EV_READ, 0);    /* the main thread starts them */
	rc = 0;
	goto out;
fail:
	config_free(cfg);
	snapshot_source_free(src);
out:
	snapshot_unref(cur);
	return rc;
}

/* ---- what admin and the workers may ask of the proxy --------------------- */

static struct snapshot *current_snapshot(void *arg)
{
	return proxy_snapshot(arg);
}

static void report_status(void *arg, struct admin_status *out)
{
	struct meshlet_proxy *p = arg;

	out->draining = atomic_load(&p->draining);
	out->control_mode = p->ctl != NULL;
	if (p->ctl)
		ctlclient_status(p->ctl, out->control, sizeof(out->control));
}

static void admin_drain(void *arg)
{
	proxy_drain(arg, false);
}

static int start_admin(struct meshlet_proxy *p)
{
	struct admin_hooks h = {
		.snapshot = current_snapshot, .status = report_status, .drain = admin_drain, .arg = p,
	};

	return admin_start(p->base, p->boot_cfg, p->metrics, &h, &p->admin);
}

/* ---- drain and signals ------------------------------------------------- */

static void on_drain_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct meshlet_proxy *p = arg;

	log_warn("drain timeout reached: closing the remaining connections");
	for (int i = 0; i < p->n_workers; i++)
		worker_send(&p->workers[i], WORKER_STOP);
}

void proxy_drain(struct meshlet_proxy *p, bool exit_after)
{
	uint32_t ms = p->boot_cfg->timeouts.drain_ms;
	struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };

	if (!atomic_exchange(&p->draining, true))
		log_info("draining: no new connections; waiting up to %u ms for open ones", ms);
	for (int i = 0; i < p->n_workers; i++)
		worker_send(&p->workers[i], WORKER_DRAIN);
	if (exit_after && !p->drain_timer) {
		p->drain_timer = evtimer_new(p->base, on_drain_timeout, p);
		if (p->drain_timer)
			evtimer_add(p->drain_timer, &tv);
		/* The main loop ends when every worker has finished (see wait_workers). */
		event_base_loopexit(p->base, NULL);
	}
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct meshlet_proxy *p = arg;
	struct meshlet_err err = { { 0 }, { 0 } };
	char msg[600];

	if (sig == SIGHUP) {
		if (p->ctl) {
			/* Control mode: the file only holds listeners and settings; the next
			 * state from control applies them, since each install re-reads it. */
			log_info("SIGHUP: the next update from control re-reads %s", p->config_file);
			return;
		}
		if (proxy_load(p, &err) < 0)
			log_error("reload refused, keeping config version %llu: %s",
			          (unsigned long long)p->version, err_str(&err, msg, sizeof(msg)));
		else
			log_info("reloaded %s: config version %llu", p->config_file,
			         (unsigned long long)p->version);
		return;
	}
	log_info("%s: draining", sig == SIGTERM ? "SIGTERM" : "SIGINT");
	proxy_drain(p, true);
}

/* ---- run ---------------------------------------------------------------- */

static int start_workers(struct meshlet_proxy *p, const struct config *cfg)
{
	sigset_t block, old;
	int rc = 0;

	p->n_workers = cfg->workers;
	p->workers = calloc((size_t)p->n_workers, sizeof(*p->workers));
	if (!p->workers)
		return -ENOMEM;
	for (int i = 0; i < p->n_workers; i++)
		if ((rc = worker_init(&p->workers[i], &p->shared, i, cfg)) < 0)
			return rc;
	/* Signals are the main thread's: workers block them. */
	sigfillset(&block);
	pthread_sigmask(SIG_BLOCK, &block, &old);
	for (int i = 0; i < p->n_workers && rc == 0; i++)
		rc = -pthread_create(&p->workers[i].thread, NULL, worker_main, &p->workers[i]);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	/* Only now may other threads (the control client) send workers commands. */
	if (rc == 0)
		atomic_store(&p->workers_started, true);
	return rc;
}

/* After the main loop ended for a drain: wait for workers, running the
 * main base so the drain timer and admin keep working. */
static void wait_workers(struct meshlet_proxy *p)
{
	for (int i = 0; i < p->n_workers; i++) {
		struct worker *w = &p->workers[i];

		if (!w->thread)
			continue;
		while (pthread_tryjoin_np(w->thread, NULL) == EBUSY)
			event_base_loop(p->base, EVLOOP_ONCE | EVLOOP_NONBLOCK), usleep(10000);
		w->thread = 0;
	}
}

static void proxy_free(struct meshlet_proxy *p)
{
	if (p->ctl) {
		peerstats_set_nudge(p->metrics->peers, NULL, NULL);
		ctlclient_stop(p->ctl);    /* first: it may install snapshots */
	}
	p->ctl = NULL;
	for (int i = 0; p->workers && i < p->n_workers; i++)
		worker_destroy(&p->workers[i]);
	free(p->workers);
	admin_stop(p->admin);
	p->admin = NULL;
	if (p->installed_ev)
		event_free(p->installed_ev);
	json_decref(p->good_doc);
	config_free(p->boot_cfg);
	if (p->drain_timer)
		event_free(p->drain_timer);
	snapshot_unref(p->snap);
	if (p->base)
		event_base_free(p->base);
	metrics_free(p->metrics);
	pthread_mutex_destroy(&p->snap_lock);
}

/* Control mode: the first snapshot arrived; serve. */
static void on_installed(evutil_socket_t fd, short what, void *arg)
{
	struct meshlet_proxy *p = arg;
	struct snapshot *s;

	if (atomic_load(&p->workers_started) || atomic_load(&p->draining))
		return;
	s = proxy_snapshot(p);
	if (start_workers(p, p->boot_cfg) < 0) {
		log_error("cannot start serving: %s", strerror(errno));
		p->exit_code = 1;
		event_base_loopbreak(p->base);
	} else {
		log_info("%s serving: %zu inbound, %zu outbound listener(s), %d worker(s)", s->self_id,
		         s->cfg->n_inbound, s->cfg->n_outbound, p->n_workers);
	}
	snapshot_unref(s);
}

/* ctlclient_host callbacks: what the control client may do to the proxy. */
static int ctl_install(void *ctx, struct snapshot_source *src, struct meshlet_err *err)
{
	return proxy_install(ctx, src, err);
}

static bool ctl_set_connected(void *ctx, bool connected)
{
	struct meshlet_proxy *p = ctx;

	return atomic_exchange(&p->metrics->control_connected, connected ? 1 : 0) != 0;
}

/* The inbound counters since the last summary, for control; NULL when
 * nothing was counted. */
static char *ctl_stats(void *ctx)
{
	struct meshlet_proxy *p = ctx;
	struct api_stats_summary *sum = malloc(sizeof(*sum));
	char *text = NULL;

	if (!sum)
		return NULL;
	peerstats_take(p->metrics->peers, sum);
	if (sum->n_callers > 0)
		text = api_stats_format(sum);
	free(sum);
	return text;
}

/* News in the counters (peerstats_set_nudge): report it now. */
static void ctl_nudge(void *ctx)
{
	ctlclient_nudge(ctx);
}

/* Static mode serves at once; control mode once control (or the cache) gave a state. */
static int start_serving(struct meshlet_proxy *p, struct meshlet_err *err)
{
	if (p->boot_cfg->has_tls) {
		if (proxy_load(p, err) < 0 || start_admin(p) < 0)
			return -EINVAL;
		if (start_workers(p, p->boot_cfg) < 0)
			return err_set(err, "", "cannot start the workers");
		log_info("%s ready: %zu inbound, %zu outbound listener(s), %d worker(s), admin on %s",
		         p->snap->self_id, p->boot_cfg->n_inbound, p->boot_cfg->n_outbound,
		         p->n_workers, p->boot_cfg->admin_listen.text);
		return 0;
	}
	p->installed_ev = event_new(p->base, -1, 0, on_installed, p);
	p->good_doc = json_load_strict(p->config_file, CONFIG_MAX_FILE, MESHLET_JSON_MAX_DEPTH, err);
	if (!p->installed_ev || !p->good_doc || start_admin(p) < 0)
		return -EINVAL;
	log_info("control mode: %s; admin on %s", p->boot_cfg->control_url,
	         p->boot_cfg->admin_listen.text);
	{
		const struct ctlclient_host host = {
			.install = ctl_install, .set_connected = ctl_set_connected, .stats = ctl_stats,
			.ctx = p,
		};

		int rc = ctlclient_start(&host, p->boot_cfg, &p->ctl, err);

		if (rc < 0)
			return rc;
		peerstats_set_nudge(p->metrics->peers, ctl_nudge, p->ctl);
		return 0;
	}
}

static int add_signal(struct meshlet_proxy *p, int sig, struct event **out)
{
	*out = evsignal_new(p->base, sig, on_signal, p);
	return *out && evsignal_add(*out, NULL) == 0 ? 0 : -ENOMEM;
}

int proxy_run(const char *config_file)
{
	struct meshlet_proxy p = { .config_file = config_file, .exit_code = 1 };
	struct meshlet_err err = { { 0 }, { 0 } };
	struct event *sigs[3] = { NULL, NULL, NULL };
	char msg[600];

	signal(SIGPIPE, SIG_IGN);
	pthread_mutex_init(&p.snap_lock, NULL);
	if (evthread_use_pthreads() < 0 || tls_init() < 0 || !(p.metrics = metrics_new()) ||
	    !(p.base = event_base_new())) {
		log_error("start-up failed: out of memory");
		goto out;
	}
	p.shared.metrics = p.metrics;
	p.shared.snapshot = current_snapshot;
	p.shared.arg = &p;
	if (config_load(config_file, &p.boot_cfg, &err) < 0 || start_serving(&p, &err) < 0) {
		if (err.message[0])
			log_error("%s", err_str(&err, msg, sizeof(msg)));
		goto out;
	}
	if (add_signal(&p, SIGHUP, &sigs[0]) < 0 || add_signal(&p, SIGTERM, &sigs[1]) < 0 ||
	    add_signal(&p, SIGINT, &sigs[2]) < 0)
		goto out;
	event_base_loop(p.base, EVLOOP_NO_EXIT_ON_EMPTY);
	wait_workers(&p);
	if (p.exit_code == 1 && atomic_load(&p.draining)) {
		log_info("drained; exiting");
		p.exit_code = 0;
	}
out:
	for (size_t i = 0; i < 3; i++)
		if (sigs[i])
			event_free(sigs[i]);
	if (p.workers && p.exit_code != 0) {
		for (int i = 0; i < p.n_workers; i++)
			if (p.workers[i].thread)
				worker_send(&p.workers[i], WORKER_STOP);
		wait_workers(&p);
	}
	proxy_free(&p);
	return p.exit_code;
}
