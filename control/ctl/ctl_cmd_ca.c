/* meshletctl ca show|status|rotate, and the walk of rotate --auto (see ctl.h). */
#include "ctl.h"

#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "meshlet/api.h"

/* ca rotate --auto: how often it looks at the gates, and for how long. */
#define CA_AUTO_POLL_S 1.0
#define CA_AUTO_TIMEOUT_DEFAULT (3LL * 3600)

/* ---------------------------------------------------------------- ca */

static void asn1_time_str(const ASN1_TIME *t, char *out, size_t len)
{
	struct tm tm;

	if (!t || ASN1_TIME_to_tm(t, &tm) != 1) {
		snprintf(out, len, "?");
		return;
	}
	strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Columns for one root PEM: subject CN, validity, SHA-256 of its public key. */
static void root_cells(const char *pem, char cn[128], char nb[32], char na[32], char pin[65])
{
	BIO *bio = BIO_new_mem_buf(pem, -1);
	X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
	unsigned char *der = NULL, md[32];
	int dlen;

	snprintf(cn, 128, "?");
	snprintf(nb, 32, "?");
	snprintf(na, 32, "?");
	snprintf(pin, 65, "?");
	if (x) {
		X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, 128);
		asn1_time_str(X509_get0_notBefore(x), nb, 32);
		asn1_time_str(X509_get0_notAfter(x), na, 32);
		dlen = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &der);
		if (dlen > 0 && EVP_Digest(der, (size_t)dlen, md, NULL, EVP_sha256(), NULL) == 1)
			for (int i = 0; i < 32; i++)
				snprintf(pin + 2 * i, 3, "%02x", md[i]);
		OPENSSL_free(der);
	}
	X509_free(x);
	BIO_free(bio);
	ERR_clear_error();
}

static const char *phase_next(const char *phase)
{
	if (!phase)
		return "-";
	if (strcmp(phase, "stable") == 0)
		return "ca rotate adds a new root to the trust bundle (phase prepared)";
	if (strcmp(phase, "prepared") == 0)
		return "ca rotate switches signing to the new root (phase switched), once proxies hold the new bundle";
	if (strcmp(phase, "switched") == 0)
		return "ca rotate removes the old root from the bundle (phase stable), once nothing it signed is valid";
	return "-";
}

static void print_ca_summary(const json_t *ca, bool with_next)
{
	const json_t *roots = json_object_get(ca, "roots");
	const char *phase = json_string_value(json_object_get(ca, "phase"));
	const json_t *gate = json_object_get(ca, "gate");
	char *signing = ctl_json_cell(json_object_get(ca, "signing"));
	char n[32];
	struct ctl_table t;

	snprintf(n, sizeof(n), "%zu", json_array_size(roots));
	ctl_table_init(&t, with_next ? 4 : 3);
	ctl_table_add(&t, (const char *[]){ "PHASE", "SIGNING", "ROOTS", "NEXT" });
	ctl_table_add(&t, (const char *[]){ phase ? phase : "-", signing, n, phase_next(phase) });
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
	free(signing);
	if (with_next && json_is_object(gate))
		printf("\nnext step -> %s: %s\n",
		       json_string_value(json_object_get(gate, "next_phase")) ?
		       json_string_value(json_object_get(gate, "next_phase")) : "?",
		       json_is_true(json_object_get(gate, "open")) ? "ready" :
		       json_string_value(json_object_get(gate, "waiting_for")) ?
		       json_string_value(json_object_get(gate, "waiting_for")) : "waiting");
}

int ctl_cmd_ca_show(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	struct httpc_response r;
	const json_t *roots, *root;
	json_int_t signing;
	struct ctl_table t;
	size_t i;
	int rc = ctl_api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	if (ctl->output == OUT_JSON) {
		ctl_print_json(r.json);
		httpc_response_clear(&r);
		return 0;
	}
	print_ca_summary(r.json, false);
	roots = json_object_get(r.json, "roots");
	signing = json_integer_value(json_object_get(r.json, "signing"));
	fputc('\n', stdout);
	ctl_table_init(&t, 6);
	ctl_table_add(&t, (const char *[]){ "INDEX", "SIGNING", "SUBJECT", "NOT_BEFORE",
	                                    "NOT_AFTER", "KEY_SHA256" });
	json_array_foreach((json_t *)roots, i, root) {
		char idx[24], cn[128], nb[32], na[32], pin[65];

		snprintf(idx, sizeof(idx), "%zu", i);
		root_cells(json_string_value(root) ? json_string_value(root) : "", cn, nb, na, pin);
		ctl_table_add(&t, (const char *[]){ idx, (json_int_t)i == signing ? "yes" : "no",
		                                    cn, nb, na, pin });
	}
	ctl_table_print(&t, stdout);
	ctl_table_free(&t);
	httpc_response_clear(&r);
	return 0;
}

/* Prints a CA state answer (JSON as it is, or the summary) and frees it. */
static int print_ca_state(struct ctl *ctl, struct httpc_response *r)
{
	if (ctl->output == OUT_JSON)
		ctl_print_json(r->json);
	else
		print_ca_summary(r->json, true);
	httpc_response_clear(r);
	return 0;
}

int ctl_cmd_ca_status(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	struct httpc_response r;
	int rc = ctl_api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, &r);

	return rc ? rc : print_ca_state(ctl, &r);
}

/* GET /v1/ca over a new connection: a rotation step rewrites the CA file
 * (and the root control's certificate chains to), so it is read afresh. */
static int ca_get(struct ctl *ctl, struct httpc_response *r)
{
	httpc_free(ctl->http);
	ctl->http = NULL;
	return ctl_api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, r);
}

/* One POST /v1/ca/rotate for --auto. Returns 0 and *answer (the new
 * state; json_decref()), EXIT_REFUSED, EXIT_USAGE, or -1 for a 409 (a gate
 * closed again: --auto keeps waiting) without printing. */
static int ca_step(struct ctl *ctl, bool force, json_t **answer)
{
	struct httpc_response r;
	char err[HTTPC_ERR_MAX] = "";
	json_t *body = json_object();
	int rc;

	if (!body)
		return ctl_usage_error(ctl, "out of memory");
	if (force)
		json_object_set_new(body, "force", json_true());
	memset(&r, 0, sizeof(r));
	rc = ctl_connect(ctl);
	if (rc) {
		json_decref(body);
		return rc;
	}
	rc = httpc_request(ctl->http, "POST", "/v1/ca/rotate", body, NULL, 0, NULL, &r, err);
	json_decref(body);
	if (rc == HTTPC_EUSAGE)
		rc = ctl_usage_error(ctl, "%s", err);
	else if (rc)
		rc = ctl_refused(ctl, "%s: %s", ctl->control_url, err);
	else if (r.status == 409)
		rc = -1;
	else if (r.status < 200 || r.status > 299)
		rc = ctl_api_error(ctl, &r);
	else
		*answer = json_incref(r.json);
	httpc_response_clear(&r);
	return rc;
}

static double mono_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ca rotate --auto: each step as soon as GET /v1/ca says its gate is open,
 * until the phase is back to stable; EXIT_REFUSED when timeout passes. */
static int ca_rotate_auto(struct ctl *ctl, bool force, long long timeout)
{
	double deadline = mono_s() + (double)timeout;
	char waiting[512] = "";
	int steps = 0;

	for (;;) {
		struct httpc_response r;
		struct api_ca_resp ca;
		const char *phase, *why;
		char from[16];
		int rc = ca_get(ctl, &r);

		if (rc)
			return rc;
		if (api_parse_ca_resp(r.json, &ca, NULL) < 0 || !ca.has_gate) {
			httpc_response_clear(&r);
			return ctl_refused(ctl, "the control's GET /v1/ca answer has no phase or gate (an "
			                   "older control?); rotate one step at a time");
		}
		phase = ca.phase;
		why = ca.waiting_for;
		if (steps > 0 && strcmp(phase, "stable") == 0) {
			if (ctl->output == OUT_JSON)
				ctl_print_json(r.json);
			else
				printf("CA rotation complete: phase stable\n");
			httpc_response_clear(&r);
			return 0;
		}
		snprintf(from, sizeof(from), "%s", phase);
		if (ca.gate_open || force) {
			const char *to = ca.next_phase;
			bool last = to && strcmp(to, "stable") == 0;
			json_t *answer = NULL;

			if (ctl->output != OUT_JSON)
				printf("%s -> %s\n", from, to ? to : "?");
			fflush(stdout);
			httpc_response_clear(&r);
			rc = ca_step(ctl, force, &answer);
			if (rc > 0)
				return rc;
			/* Done: no further call, which a CA file holding only the
			 * old root (--ca of an old copy) could no longer make. */
			if (rc == 0 && last) {
				if (ctl->output == OUT_JSON)
					ctl_print_json(answer);
				else
					printf("CA rotation complete: phase stable\n");
				json_decref(answer);
				return 0;
			}
			json_decref(answer);
			if (rc == 0)
				steps++;
			waiting[0] = '\0';
			continue;
		}
		if (mono_s() >= deadline) {
			rc = ctl_refused(ctl, "ca rotate --auto: timed out after %llds in phase %s, waiting for "
			                 "%s", timeout, from, why ? why : "?");
			httpc_response_clear(&r);
			return rc;
		}
		if (why && strcmp(why, waiting) != 0) {
			fprintf(stderr, "%s: phase %s: waiting for %s\n", ctl->prog, from, why);
			snprintf(waiting, sizeof(waiting), "%s", why);
		}
		httpc_response_clear(&r);
		{
			double left = deadline - mono_s();
			double nap = left < CA_AUTO_POLL_S ? (left > 0 ? left : 0) : CA_AUTO_POLL_S;
			struct timespec ts = { (time_t)nap, (long)((nap - (double)(time_t)nap) * 1e9) };

			nanosleep(&ts, NULL);
		}
	}
}

int ctl_cmd_ca_rotate(struct ctl *ctl, const struct ctl_cmd *cmd, const struct ctl_args *a)
{
	struct httpc_response r;
	const char *t = ctl_arg(cmd, a, "timeout");
	bool force = ctl_arg(cmd, a, "force") != NULL;
	long long timeout = CA_AUTO_TIMEOUT_DEFAULT;
	json_t *body;
	int rc;

	/* Without --auto, --timeout after the command is the global one (the
	 * limit of each request), as it was before --auto existed. */
	if (t && !ctl_arg(cmd, a, "auto")) {
		if (ctl_parse_duration(t, &timeout) < 0 || timeout > 3600)
			return ctl_usage_error(ctl, "--timeout: expected a duration up to 1h (30s, 2m), got "
			                       "'%s'", t);
		ctl->timeout_ms = (int)(timeout * 1000);
	} else if (t && ctl_parse_duration(t, &timeout) < 0) {
		return ctl_usage_error(ctl, "--timeout: expected a duration such as 90s, 15m, 2h or "
		                       "seconds, got '%s'", t);
	}
	if (ctl_arg(cmd, a, "auto"))
		return ca_rotate_auto(ctl, force, timeout);
	body = json_object();
	if (!body)
		return ctl_usage_error(ctl, "out of memory");
	if (force)
		json_object_set_new(body, "force", json_true());
	rc = ctl_api_call(ctl, "POST", "/v1/ca/rotate", body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (!json_is_string(json_object_get(r.json, "phase"))) {
		/* The answer does not say: ask. */
		httpc_response_clear(&r);
		rc = ctl_api_call(ctl, "GET", "/v1/ca", NULL, NULL, 0, NULL, &r);
		if (rc)
			return rc;
	}
	return print_ca_state(ctl, &r);
}
