/* httpreq: the per-request decision, IDs, error bodies and log line shared by HTTP/1.1 and HTTP/2. */
#include "httpreq.h"

#include <stdio.h>
#include <string.h>

#include <openssl/rand.h>

#include "meshlet/log.h"
#include "meshlet/peerstats.h"
#include "conn.h"
#include "snapshot.h"
#include "worker-t.h"

static double ms_since(const struct timespec *t)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - t->tv_sec) * 1e3 + (double)(now.tv_nsec - t->tv_nsec) / 1e6;
}

/* An allowed request: the service's rate limits and faults. Returns true to forward it. */
static bool traffic_admits(const struct conn *c, const struct policy_request *req,
                           struct httpreq_verdict *v)
{
	struct snapshot_traffic_verdict t;

	snapshot_traffic_inbound(c->snap, req, &t);
	v->delay_ms = t.delay_ms;
	if (!t.status)
		return true;
	v->local_status = t.status;
	v->traffic_name = t.name;
	v->traffic_fault = t.fault;
	v->retry_after = t.retry_after;
	return false;
}

bool httpreq_decide(struct conn *c, const struct http_head *h, struct httpreq_verdict *v)
{
	const struct snapshot *s = c->snap;
	struct policy_request req = {
		.peer_id = c->peer,
		.port = config_addr_port(&s->cfg->inbound[c->listener].forward),
		.http = true,
		.method = h->method,
		.path = h->path,
		.header = http_head_policy_header,
		.header_ctx = h,
	};
	struct policy_decision d;
	struct metrics_decision *counter;
	char override[32];

	/* Decide on the head as the app will receive it, or not at all. */
	v->local_reason = http_head_check_policy_fields(h, s->policy_headers, s->n_policy_headers);
	if (!v->local_reason)
		v->local_reason = http_head_method_override(h, override, sizeof(override));
	if (v->local_reason) {
		v->local_status = 400;
		return false;
	}
	d = policy_eval(s->policy, &req);
	/* An app may act on the override instead: both methods must pass. */
	if (d.action == POLICY_ALLOW && override[0] && strcmp(override, h->method) != 0) {
		req.method = override;
		d = policy_eval(s->policy, &req);
	}
	counter = snapshot_decision_counter(s, &d);
	if (counter)
		metrics_inc(&counter->count);
	v->decided = true;
	v->decision = d.action;
	v->rule = policy_decision_rule(&d);
	peerstats_decision(c->w->peers, c->peer, d.action == POLICY_ALLOW, v->rule,
	                   h->method, h->path);
	if (d.action == POLICY_ALLOW)
		return traffic_admits(c, &req, v);
	v->local_status = 403;
	log_info("conn %llu: %s %s%s%s %s denied by rule %s", (unsigned long long)c->id, c->peer,
	         h->method, req.method != h->method ? " overridden as " : "",
	         req.method != h->method ? req.method : "", h->path, v->rule);
	return false;
}

static bool usable_request_id(const char *id)
{
	size_t n = strlen(id);

	if (n == 0 || n > HTTPREQ_ID_LEN)
		return false;
	for (; *id; id++)
		if (*id <= ' ' || *id > '~' || *id == '"' || *id == '\\')
			return false;
	return true;
}

/*
 * A new request ID: 16 random bytes in hex ("" when the DRBG fails).
 * The bytes come from the worker's pool, refilled 32 IDs at a time: a
 * RAND_bytes call per request cost a tenth of the request's handling,
 * and printing the hex with snprintf a fifth.
 */
#define ID_BYTES 16

static void new_request_id(struct worker *w, char out[2 * ID_BYTES + 1])
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *raw;

	if (w->rand_left < ID_BYTES) {
		if (RAND_bytes(w->rand_pool, sizeof(w->rand_pool)) != 1) {
			out[0] = '\0';
			return;
		}
		w->rand_left = sizeof(w->rand_pool);
	}
	raw = w->rand_pool + sizeof(w->rand_pool) - w->rand_left;
	w->rand_left -= ID_BYTES;
	for (size_t i = 0; i < ID_BYTES; i++) {
		out[2 * i] = hex[raw[i] >> 4];
		out[2 * i + 1] = hex[raw[i] & 0xf];
	}
	out[2 * ID_BYTES] = '\0';
}

void httpreq_request_id(struct worker *w, const char *caller, char out[HTTPREQ_ID_LEN + 1],
                        bool *replace)
{
	if (caller && usable_request_id(caller)) {
		snprintf(out, HTTPREQ_ID_LEN + 1, "%s", caller);
		*replace = false;
		return;
	}
	*replace = true;
	new_request_id(w, out);
}

/*
 * Appends s to the string of n bytes in out (cap bytes), truncating as
 * snprintf would. Returns the new length. For the per-request header
 * value: snprintf cost 3% of an inbound request.
 */
static size_t cat(char *out, size_t cap, size_t n, const char *s)
{
	size_t len = strlen(s);

	if (len > cap - 1 - n)
		len = cap - 1 - n;
	memcpy(out + n, s, len);
	out[n + len] = '\0';
	return n + len;
}

void httpreq_xfcc(const struct conn *c, char *out, size_t len)
{
	size_t n = cat(out, len, 0, "By=");

	n = cat(out, len, n, c->snap->self_id);
	n = cat(out, len, n, ";URI=");
	cat(out, len, n, c->peer ? c->peer : "");
}

int httpreq_error_body(int status, const struct httpreq_verdict *v, const char *reason,
                       char *out, size_t len)
{
	char esc[256];
	int n;

	if (status == 403) {
		log_json_escape(esc, sizeof(esc), v && v->rule ? v->rule : "default");
		n = snprintf(out, len, "{\"error\":\"forbidden\",\"rule\":\"%s\"}\n", esc);
	} else if (v && v->traffic_name) {
		log_json_escape(esc, sizeof(esc), v->traffic_name);
		n = snprintf(out, len, v->traffic_fault ?
		             "{\"error\":\"fault injected\",\"fault\":\"%s\"}\n" :
		             "{\"error\":\"rate limited\",\"limit\":\"%s\"}\n", esc);
	} else {
		log_json_escape(esc, sizeof(esc), reason ? reason : http_status_reason(status));
		n = snprintf(out, len, "{\"error\":\"%s\",\"status\":%d}\n", esc, status);
	}
	return n < 0 ? 0 : (size_t)n >= len ? (int)len - 1 : n;
}

void httpreq_started(struct httpreq_record *r)
{
	clock_gettime(CLOCK_MONOTONIC, &r->started);
	clock_gettime(CLOCK_REALTIME, &r->started_wall);
}

static void json_str(char *out, size_t len, const char *s)
{
	size_t n;

	if (!s) {
		snprintf(out, len, "null");
		return;
	}
	out[0] = '"';
	n = log_json_escape(out + 1, len - 2, s);
	snprintf(out + 1 + n, len - 1 - n, "\"");
}

void httpreq_log(struct conn *c, const struct httpreq_record *e)
{
	struct metrics *m = c->w->shared->metrics;
	char line[4096], when[40], from[80], peer[SPIFFE_ID_MAX + 8], path[1024], method[64];
	char rule[POLICY_RULE_NAME_MAX + 8], rid[HTTPREQ_ID_LEN + 8], grpc[24] = "";
	double ms = ms_since(&e->started);
	int n;

	metrics_count_http(m, e->status);
	if (e->grpc_status >= 0) {
		metrics_count_grpc(m, e->grpc_status);
		snprintf(grpc, sizeof(grpc), ",\"grpc_status\":%d", e->grpc_status);
	}
	metrics_observe_duration(m, ms / 1e3);
	if (c->inbound)
		peerstats_answer(c->w->peers, c->peer, e->status, ms / 1e3);
	if (!c->snap->cfg->access_log)
		return;
	log_format_time(when, sizeof(when), e->started_wall.tv_sec, e->started_wall.tv_nsec);
	conn_source_text(c, from, sizeof(from));
	json_str(peer, sizeof(peer), c->peer);
	json_str(path, sizeof(path), e->path);
	json_str(method, sizeof(method), e->method);
	json_str(rule, sizeof(rule), e->rule);
	json_str(rid, sizeof(rid), e->request_id);
	n = snprintf(line, sizeof(line),
	             "{\"time\":\"%s\",\"conn\":%llu,\"direction\":\"%s\",\"protocol\":\"http\","
	             "\"http_version\":\"%s\",\"source\":\"%s\",\"peer\":%s,\"destination\":\"%s\","
	             "\"method\":%s,\"path\":%s,\"request_id\":%s,\"decision\":%s%s%s,\"rule\":%s,"
	             "\"status\":%d%s,\"bytes_in\":%llu,\"bytes_out\":%llu,\"duration_ms\":%.3f}",
	             when, (unsigned long long)c->id, c->inbound ? "inbound" : "outbound",
	             e->version ? e->version : "1.1", from, peer, conn_destination_text(c), method,
	             path, rid, e->decided ? "\"" : "",
	             e->decided ? policy_action_str(e->decision) : "null", e->decided ? "\"" : "",
	             rule, e->status, grpc, (unsigned long long)e->bytes_in,
	             (unsigned long long)e->bytes_out, ms);
	if (n > 0 && (size_t)n < sizeof(line))
		log_access(line, (size_t)n);
}
