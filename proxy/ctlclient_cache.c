/*
 * ctlclient_cache: the client's files in state_dir (see ctlclient-int.h),
 * each replaced atomically through lib/file:
 *   svid.key    our private key (0600; never leaves this process otherwise)
 *   svid.pem    our SVID, leaf first
 *   bundle.pem  the trust bundle's roots
 *   state.json  versions, policy, endpoints, traffic documents and
 *               revocations last applied
 * At start they let the proxy serve while control is down, as long as the
 * SVID is valid.
 */
#include "ctlclient-int.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "meshlet/api.h"
#include "meshlet/file.h"
#include "meshlet/log.h"

/* Replaces state_dir/name with data atomically (file_replace). Returns 0,
 * or -errno with c->why set. */
int ctlc_write_file(struct ctlclient *c, const char *name, const void *data, size_t len,
                    mode_t mode)
{
	char path[PATH_MAX];
	int rc;

	snprintf(path, sizeof(path), "%s/%s", c->cfg->state_dir, name);
	rc = file_replace(path, mode, data, len);
	if (rc < 0)
		ctlc_fail(c, "cannot write %s: %s", path, strerror(-rc));
	return rc;
}

int ctlc_save_key(struct ctlclient *c, EVP_PKEY *key)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *data;
	long len;
	int rc;

	if (!b || PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL) != 1) {
		BIO_free(b);
		ERR_clear_error();
		return ctlc_fail(c, "cannot encode the private key");
	}
	len = BIO_get_mem_data(b, &data);
	rc = ctlc_write_file(c, F_KEY, data, (size_t)len, 0600);
	OPENSSL_cleanse(data, (size_t)len);
	BIO_free(b);
	return rc;
}

static json_t *state_doc(const struct ctl_state *s)
{
	return json_pack("{s:i, s:I, s:I, s:O, s:O, s:O, s:I, s:O, s:I, s:s}", "format", 1,
	                 "version", (json_int_t)s->version,
	                 "policy_version", (json_int_t)s->policy_version,
	                 "policy", s->policy ? s->policy : json_null(),
	                 "endpoints", s->endpoints, "traffic", s->traffic,
	                 "bundle_version", (json_int_t)s->bundle_version,
	                 "revoked", s->revoked,
	                 "cert_generation", (json_int_t)s->cert_generation,
	                 "serial", s->serial);
}

int ctlc_save_state(struct ctlclient *c)
{
	json_t *doc = state_doc(&c->st);
	char *text = doc ? json_dumps(doc, JSON_INDENT(1) | JSON_SORT_KEYS) : NULL;
	int rc;

	json_decref(doc);
	if (!text)
		return ctlc_fail(c, "out of memory");
	rc = ctlc_write_file(c, F_STATE, text, strlen(text), 0600);
	free(text);
	return rc;
}

/* Creates state_dir (0700) when missing; refuses one others may write to. */
int ctlc_state_dir_prepare(const struct config *cfg, struct meshlet_err *err)
{
	const char *dir = cfg->state_dir;
	struct stat st;

	if (mkdir(dir, 0700) == 0)
		log_info("created the state directory %s", dir);
	else if (errno != EEXIST)
		return err_set(err, "state_dir", "cannot create %s: %s", dir, strerror(errno));
	if (stat(dir, &st) < 0)
		return err_set(err, "state_dir", "%s: %s", dir, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return err_set(err, "state_dir", "%s is not a directory", dir);
	if (st.st_mode & 022)
		return err_set(err, "state_dir", "%s is writable by group or others (mode %03o): "
		               "chmod 700 it", dir, (unsigned)(st.st_mode & 0777));
	if (st.st_uid != geteuid())
		return err_set(err, "state_dir", "%s belongs to uid %u, not to this user (uid %u)",
		               dir, (unsigned)st.st_uid, (unsigned)geteuid());
	return 0;
}

/* state.json into c->st (versions, policy, endpoints, traffic, revoked). 0 or -1. */
static int cache_load_state(struct ctlclient *c)
{
	char path[PATH_MAX];
	struct meshlet_err e = { { 0 }, { 0 } };
	json_t *doc, *policy = NULL, *eps = NULL, *revoked = NULL;
	json_int_t version = 0, pver = 0, bver = 0, gen = 0;
	int fmt = 0;

	snprintf(path, sizeof(path), "%s/%s", c->cfg->state_dir, F_STATE);
	doc = json_load_strict(path, CTL_STATE_MAX, 64, &e);
	if (!doc)
		return -1;
	if (json_unpack(doc, "{s:i, s:I, s:I, s:o, s:o, s:I, s:o, s:I}", "format", &fmt,
	                "version", &version, "policy_version", &pver, "policy", &policy,
	                "endpoints", &eps, "bundle_version", &bver, "revoked", &revoked,
	                "cert_generation", &gen) < 0 || fmt != 1 ||
	    !(json_is_object(policy) || json_is_null(policy)) || !json_is_object(eps) ||
	    !api_valid_serial_list(revoked)) {
		log_warn("ignoring %s: not a state file of this version", path);
		json_decref(doc);
		return -1;
	}
	c->st.version = version;
	c->st.policy_version = pver;
	json_decref(c->st.policy);
	c->st.policy = json_incref(policy);
	json_decref(c->st.endpoints);
	c->st.endpoints = ctlc_relevant_endpoints(c->cfg, eps);
	/* Absent from caches written before traffic documents: none. */
	json_decref(c->st.traffic);
	c->st.traffic = ctlc_relevant_traffic(c->cfg, json_object_get(doc, "traffic"));
	c->st.bundle_version = bver;
	json_decref(c->st.revoked);
	c->st.revoked = json_incref(revoked);
	c->st.cert_generation = gen;
	json_decref(doc);
	return 0;
}

/*
 * Loads the cached SVID and bundle and, when present, the last state, and
 * installs them when the SVID is currently valid. Nothing cached, or
 * nothing usable: a join follows.
 */
void ctlc_cache_load(struct ctlclient *c)
{
	const char *dir = c->cfg->state_dir;
	char path[PATH_MAX], msg[400];
	char *key_pem = NULL, *cert_pem = NULL, *bundle_pem = NULL;
	EVP_PKEY *key = NULL;
	BIO *b;

	snprintf(path, sizeof(path), "%s/%s", dir, F_KEY);
	if (file_read(path, 64 * 1024, FILE_NOFOLLOW, &key_pem, NULL) < 0)
		key_pem = NULL;
	snprintf(path, sizeof(path), "%s/%s", dir, F_CERT);
	if (file_read(path, 1024 * 1024, FILE_NOFOLLOW, &cert_pem, NULL) < 0)
		cert_pem = NULL;
	snprintf(path, sizeof(path), "%s/%s", dir, F_BUNDLE);
	if (file_read(path, 1024 * 1024, FILE_NOFOLLOW, &bundle_pem, NULL) < 0)
		bundle_pem = NULL;
	if (!key_pem || !cert_pem || !bundle_pem) {
		log_info("no cached SVID in %s: joining %s", dir, ctlc_url(c));
		goto out;
	}
	b = BIO_new_mem_buf(key_pem, -1);
	key = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
	BIO_free(b);
	ERR_clear_error();
	if (!key) {
		log_warn("the cached key %s/%s is unreadable: joining again", dir, F_KEY);
		goto out;
	}
	c->st.bundle_pem = bundle_pem;
	bundle_pem = NULL;
	if (ctlc_adopt_svid(c, key, cert_pem, NULL) < 0) {
		/* Expired, another service's, not matching the key, ... */
		log_warn("the cached SVID in %s is unusable (%s): joining again", dir, c->why);
		goto out;
	}
	key = NULL;
	c->need_renew = false;
	if (cache_load_state(c) < 0) {
		log_info("using the cached SVID %s; no cached config yet", c->st.serial);
		c->st.bundle_version = -1;
		c->need_bundle = true;
		goto out;
	}
	if (ctlc_install(c, c->st.policy, c->st.policy_version, c->st.endpoints, c->st.traffic,
	                 c->st.version) < 0) {
		log_warn("cannot serve from the cache in %s: %s", dir, c->why);
		goto out;
	}
	log_info("serving from the cache in %s (SVID %s valid until %s) while connecting to %s",
	         dir, c->st.serial, ctlc_when(c->st.not_after, msg), ctlc_url(c));
out:
	EVP_PKEY_free(key);
	if (key_pem) {
		OPENSSL_cleanse(key_pem, strlen(key_pem));
		free(key_pem);
	}
	free(cert_pem);
	free(bundle_pem);
}
