/* meshletctl talking to control: credentials, one API call, messages (see ctl.h). */
#include "ctl.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "meshlet/api.h"
#include "meshlet/file.h"

/* ---------------------------------------------------------------- messages */

/* "meshletctl: message" on stderr; returns code (the exit status to use). */
__attribute__((format(printf, 3, 0)))
static int complain(const struct ctl *ctl, int code, const char *fmt, va_list ap)
{
	fprintf(stderr, "%s: ", ctl->prog);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	return code;
}

__attribute__((format(printf, 2, 3)))
int ctl_usage_error(const struct ctl *ctl, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = complain(ctl, EXIT_USAGE, fmt, ap);
	va_end(ap);
	return rc;
}

__attribute__((format(printf, 2, 3)))
int ctl_refused(const struct ctl *ctl, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = complain(ctl, EXIT_REFUSED, fmt, ap);
	va_end(ap);
	return rc;
}

/*
 * Reads a whole file (or stdin for "-") of at most max bytes: file_read(),
 * and for what is not a regular file (a pipe such as <(...), a device) its
 * stream until EOF. Returns a malloc'd NUL-terminated buffer and *len, or
 * NULL with errno set (EFBIG when over max).
 */
char *ctl_read_file(const char *path, size_t max, size_t *len)
{
	char *buf = NULL;
	int rc = file_read(path, max, FILE_STDIN, &buf, len);

	if (rc == -EINVAL) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);

		rc = fd < 0 ? -errno : file_read_fd(fd, max, &buf, len);
		if (fd >= 0)
			close(fd);
	}
	if (rc < 0) {
		errno = -rc;
		return NULL;
	}
	return buf;
}

/* ---------------------------------------------------------------- talking to control */

static const char *state_dir(const struct ctl *ctl)
{
	return ctl->state_dir ? ctl->state_dir : CTL_DEFAULT_STATE_DIR;
}

/* The admin token: --token-file, MESHLET_TOKEN_FILE, MESHLET_TOKEN, or
 * <state dir>/admin.token. Returns 0 and *out (malloc'd), or EXIT_USAGE. */
static int load_token(const struct ctl *ctl, char **out)
{
	char path[PATH_MAX];
	const char *file = ctl->token_file, *env = getenv("MESHLET_TOKEN");
	const char *why = "";
	size_t len;
	char *tok;

	*out = NULL;
	if (!file && env && *env) {
		tok = strdup(env);
		if (!tok)
			return ctl_usage_error(ctl, "out of memory");
		*out = tok;
		return 0;
	}
	if (!file) {
		snprintf(path, sizeof(path), "%s/admin.token", state_dir(ctl));
		file = path;
		why = " (give --token-file FILE or --state-dir DIR, or set MESHLET_TOKEN_FILE or MESHLET_TOKEN)";
	}
	tok = ctl_read_file(file, CTL_TOKEN_FILE_MAX, &len);
	if (!tok)
		return ctl_usage_error(ctl, "cannot read the admin token file %s: %s%s", file,
		                       errno == EFBIG ? "too large" : strerror(errno), why);
	while (len > 0 && isspace((unsigned char)tok[len - 1]))
		tok[--len] = '\0';
	if (len == 0 || strlen(tok) != len) {
		free(tok);
		return ctl_usage_error(ctl, "the admin token file %s is empty or not text", file);
	}
	*out = tok;
	return 0;
}

/* How many URLs --control lists (comma-separated). */
static size_t control_count(const struct ctl *ctl)
{
	size_t n = 1;

	for (const char *p = ctl->control; *p; p++)
		n += *p == ',';
	return n;
}

/* The URL in use (the control_at-th of --control) into ctl->control_url.
 * 0 or EXIT_USAGE (an empty or too long entry, too many). */
static int control_pick(struct ctl *ctl)
{
	const char *p = ctl->control, *end;
	size_t len;

	if (control_count(ctl) > CTL_CONTROLS_MAX)
		return ctl_usage_error(ctl, "--control: at most %d URLs", CTL_CONTROLS_MAX);
	for (size_t i = 0; i < ctl->control_at; i++)
		p = strchr(p, ',') + 1;
	end = strchr(p, ',');
	len = end ? (size_t)(end - p) : strlen(p);
	if (len == 0 || len >= sizeof(ctl->control_url))
		return ctl_usage_error(ctl, "--control: an empty or too long URL in '%s'", ctl->control);
	memcpy(ctl->control_url, p, len);
	ctl->control_url[len] = '\0';
	return 0;
}

/* Opens the HTTPS client (CA file and token loaded). 0 or EXIT_USAGE. */
int ctl_connect(struct ctl *ctl)
{
	char ca_path[PATH_MAX], err[HTTPC_ERR_MAX];
	struct httpc_opts o = { 0 };
	char *token = NULL;
	int rc;

	if (ctl->http)
		return 0;
	rc = control_pick(ctl);
	if (!rc)
		rc = load_token(ctl, &token);
	if (rc)
		return rc;
	if (ctl->ca_file) {
		o.ca_file = ctl->ca_file;
	} else {
		snprintf(ca_path, sizeof(ca_path), "%s/ca.pem", state_dir(ctl));
		if (access(ca_path, R_OK) != 0) {
			int e = errno;

			OPENSSL_cleanse(token, strlen(token));
			free(token);
			return ctl_usage_error(ctl, "cannot read the control's CA file %s: %s (give --ca FILE "
			                       "or --state-dir DIR, or set MESHLET_CA)", ca_path, strerror(e));
		}
		o.ca_file = ca_path;
	}
	o.url = ctl->control_url;
	o.token = token;
	o.timeout_ms = ctl->timeout_ms;
	o.user_agent = "meshletctl/" MESHLET_VERSION;
	rc = httpc_new(&ctl->http, &o, err);
	OPENSSL_cleanse(token, strlen(token));
	free(token);
	if (rc)
		return ctl_usage_error(ctl, "%s", err);
	return 0;
}

/* Prints the API's error for a non-2xx response and returns EXIT_REFUSED. */
int ctl_api_error(const struct ctl *ctl, const struct httpc_response *r)
{
	struct api_error_resp e;
	const char *msg, *path, *code;

	api_parse_error_resp(r->json, &e);
	msg = e.message;
	path = e.path;
	code = e.code;
	if (!msg && code)
		msg = code;
	if (msg) {
		size_t pl = path ? strlen(path) : 0;

		if (pl && !(strncmp(msg, path, pl) == 0 && msg[pl] == ':'))
			return ctl_refused(ctl, "%s: %s", path, msg);
		return ctl_refused(ctl, "%s", msg);
	}
	{
		char snippet[201];
		size_t n = r->body_len < 200 ? r->body_len : 200;

		memcpy(snippet, r->body ? r->body : "", n);
		snippet[n] = '\0';
		for (char *p = snippet; *p; p++)
			if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
				*p = ' ';
		return ctl_refused(ctl, "the control answered HTTP %d%s%s", r->status, n ? ": " : "", snippet);
	}
}

/*
 * One API call. On a 2xx answer returns 0 with *resp filled (the caller
 * clears it). Otherwise prints why and returns the exit code: EXIT_REFUSED
 * (non-2xx, or the control unreachable), EXIT_USAGE (local problem).
 */
bool ctl_next_control(struct ctl *ctl, const char *why)
{
	if (ctl->control_at + 1 >= control_count(ctl))
		return false;
	fprintf(stderr, "%s: %s: %s; trying the next control\n", ctl->prog, ctl->control_url, why);
	httpc_free(ctl->http);
	ctl->http = NULL;
	ctl->control_at++;
	return true;
}

/* One attempt on the control in use; *retry: worth trying the next one
 * (unreachable, or a 5xx: that replica or its store is failing). */
static int api_call_once(struct ctl *ctl, const char *method, const char *path,
                         const json_t *body, const char *raw, size_t raw_len,
                         const char *const *headers, struct httpc_response *resp, bool *retry)
{
	char err[HTTPC_ERR_MAX] = "";
	int rc = ctl_connect(ctl);

	*retry = false;
	memset(resp, 0, sizeof(*resp));
	if (rc)
		return rc;
	rc = httpc_request(ctl->http, method, path, body, raw, raw_len, headers, resp, err);
	if (rc == HTTPC_EUSAGE)
		return ctl_usage_error(ctl, "%s", err);
	if (rc == HTTPC_ECONNECT && ctl_next_control(ctl, err)) {
		*retry = true;
		return rc;
	}
	if (rc)
		return ctl_refused(ctl, "%s: %s", ctl->control_url, err);
	if (resp->status >= 500) {
		char why[32];

		snprintf(why, sizeof(why), "HTTP %d", resp->status);
		if (ctl_next_control(ctl, why)) {
			httpc_response_clear(resp);
			*retry = true;
			return EXIT_REFUSED;
		}
	}
	return 0;
}

int ctl_api_call(struct ctl *ctl, const char *method, const char *path, const json_t *body,
                 const char *raw, size_t raw_len, const char *const *headers,
                 struct httpc_response *resp)
{
	bool retry = true;
	int rc = 0;

	while (retry) {
		rc = api_call_once(ctl, method, path, body, raw, raw_len, headers, resp, &retry);
		if (rc && !retry)
			return rc;
	}
	if (resp->status < 200 || resp->status > 299) {
		rc = ctl_api_error(ctl, resp);
		httpc_response_clear(resp);
		return rc;
	}
	return 0;
}

/* "/v1/<a><escaped b>" into out. Returns 0 or EXIT_USAGE. */
int ctl_api_path(const struct ctl *ctl, char *out, size_t len, const char *prefix, const char *seg)
{
	snprintf(out, len, "%s", prefix);
	if (httpc_escape(out, len, seg) < 0)
		return ctl_usage_error(ctl, "argument too long: %.40s...", seg);
	return 0;
}

/* The first array in an object response (or the response if it is an array). */
static const json_t *list_of(const json_t *resp, const char *key)
{
	const char *k;
	json_t *v;

	if (json_is_array(resp))
		return resp;
	if (json_is_array(json_object_get(resp, key)))
		return json_object_get(resp, key);
	json_object_foreach((json_t *)resp, k, v)
		if (json_is_array(v))
			return v;
	return NULL;
}

int ctl_list_command(struct ctl *ctl, const char *path, const char *key,
                     const char *const *cols)
{
	struct httpc_response r;
	const json_t *list;
	int rc = ctl_api_call(ctl, "GET", path, NULL, NULL, 0, NULL, &r);

	if (rc)
		return rc;
	list = list_of(r.json, key);
	if (ctl->output == OUT_JSON)
		ctl_print_json(r.json);
	else if (list)
		ctl_print_list(list, cols, true, stdout);
	else
		ctl_print_object(r.json, cols, stdout);
	httpc_response_clear(&r);
	return 0;
}

int ctl_send(struct ctl *ctl, const char *method, const char *path, json_t *body,
             const char *const *cols, const char *text)
{
	struct httpc_response r;
	int rc;

	if (!body)
		return ctl_usage_error(ctl, "out of memory");
	rc = ctl_api_call(ctl, method, path, body, NULL, 0, NULL, &r);
	json_decref(body);
	if (rc)
		return rc;
	if (ctl->output == OUT_JSON)
		ctl_print_json(r.json);
	else if (cols && (!text || (r.json && json_object_size(r.json))))
		ctl_print_object(r.json, cols, stdout);
	else
		fputs(text, stdout);
	httpc_response_clear(&r);
	return 0;
}
