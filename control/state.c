/*
 * state: meshlet-control's state directory, the admin token, store access
 * and the retry helper every domain writes through; see state.h and
 * state-int.h (which lists the domain files).
 */
#include "state-int.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "meshlet/file.h"

#define ADMIN_TOKEN_FILE "admin.token"

/* ---- small helpers ---- */

int64_t state_now(void)
{
	return (int64_t)time(NULL);
}

int64_t state_mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *state_fmt_time(int64_t t, char *out)
{
	if (ca_time_rfc3339(t, out) < 0)
		snprintf(out, CA_TIME_LEN, "1970-01-01T00:00:00Z");
	return out;
}

void state_key(char *out, size_t len, const char *prefix, const char *name)
{
	snprintf(out, len, "%s%s", prefix, name);
}

void state_path(const struct control_state *st, char *out, size_t len, const char *name)
{
	int n = snprintf(out, len, "%s/%s", st->dir, name);

	if (n < 0 || (size_t)n >= len)
		out[0] = '\0';
}

__attribute__((format(printf, 5, 0)))
static int fail_v(struct state_error *se, int err, const char *reason, const char *path,
                  const char *fmt, va_list ap)
{
	if (!se)
		return err;
	se->reason = reason;
	snprintf(se->e.path, sizeof(se->e.path), "%s", path ? path : "");
	vsnprintf(se->e.message, sizeof(se->e.message), fmt, ap);
	return err;
}

int state_fail(struct state_error *se, int err, const char *path, const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = fail_v(se, err, NULL, path, fmt, ap);
	va_end(ap);
	return r;
}

int state_refuse(struct state_error *se, int err, const char *reason, const char *path,
                 const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = fail_v(se, err, reason, path, fmt, ap);
	va_end(ap);
	return r;
}

int state_store_failed(struct control_state *st, struct state_error *se, const char *what, int r)
{
	log_error("store: %s failed: %s (%s)", what, strerror(-r), store_strerror(st->store));
	if (r == -EAGAIN || (r == -EIO && st->store_down))
		return state_fail(se, -EAGAIN, "", "the state store is unavailable (%s); nothing was "
		                  "acknowledged: retry later", store_strerror(st->store));
	return state_fail(se, -EIO, "", "the state store failed (%s); see control's log",
	                  strerror(-r));
}

/* ---- store access ---- */

int kv_json(struct control_state *st, const char *key, json_t **out, int64_t *rev)
{
	char *v = NULL;
	size_t len = 0;
	int64_t r = 0;
	json_error_t je;
	int ret = store_get(st->store, key, &v, &len, &r);

	st->store_down = ret == -EAGAIN;
	st->store_misses += ret == -EAGAIN;
	*out = NULL;
	if (rev)
		*rev = 0;
	if (ret == -ENOENT)
		return -ENOENT;
	if (ret < 0) {
		log_error("store: get %s: %s", key, store_strerror(st->store));
		return -EIO;
	}
	*out = json_loadb(v, len, JSON_REJECT_DUPLICATES, &je);
	free(v);
	if (!*out) {
		log_error("store: %s holds invalid JSON: %s", key, je.text);
		return -EIO;
	}
	if (rev)
		*rev = r;
	return 0;
}

int kv_rev(struct control_state *st, const char *key, int64_t *rev)
{
	int r = store_get(st->store, key, NULL, NULL, rev);

	st->store_down = r == -EAGAIN;
	st->store_misses += r == -EAGAIN;
	if (r == -ENOENT) {
		*rev = 0;
		return 0;
	}
	if (r < 0)
		log_error("store: get %s: %s", key, store_strerror(st->store));
	return r < 0 ? -EIO : 0;
}

int kv_rev_followed(struct control_state *st, const char *key, int64_t *rev)
{
	if (st->shared && store_follow_rev(st->store, key, rev) == 0)
		return 0;
	return kv_rev(st, key, rev);
}

/* Notes the first failure of assembling b. */
static void batch_error(struct batch *b)
{
	if (!b->err)
		b->err = b->n >= STORE_BATCH_MAX ? -E2BIG : -ENOMEM;
}

void batch_put(struct batch *b, const char *key, json_t *v, int64_t expected)
{
	char *k = strdup(key), *val = v ? json_dumps(v, JSON_COMPACT) : NULL;

	json_decref(v);
	if (!k || !val || b->n >= STORE_BATCH_MAX) {
		free(k);
		free(val);
		batch_error(b);
		return;
	}
	b->mem[b->nmem++] = k;
	b->mem[b->nmem++] = val;
	b->ops[b->n++] = (struct store_op){ .kind = STORE_OP_PUT, .key = k, .value = val,
	                                    .len = strlen(val), .expected = expected };
}

void batch_del(struct batch *b, const char *key, int64_t expected)
{
	char *k = strdup(key);

	if (!k || b->n >= STORE_BATCH_MAX) {
		free(k);
		batch_error(b);
		return;
	}
	b->mem[b->nmem++] = k;
	b->ops[b->n++] = (struct store_op){ .kind = STORE_OP_DELETE, .key = k,
	                                    .expected = expected };
}

void batch_clear(struct batch *b)
{
	for (size_t i = 0; i < b->nmem; i++)
		free(b->mem[i]);
	b->n = b->nmem = 0;
	b->err = 0;
}

int batch_commit(struct control_state *st, struct batch *b, int64_t *rev)
{
	int r = b->err;

	if (!r && b->n > 0) {
		r = store_apply(st->store, b->ops, b->n, rev);
		st->store_down = r == -EAGAIN;
	}
	batch_clear(b);
	return r;
}

int bump_counter(struct control_state *st, struct batch *b, const char *key, const char *field,
                 int64_t *value)
{
	json_t *v = NULL;
	int64_t rev = 0, n;
	int r = kv_json(st, key, &v, &rev);

	if (r == -EIO)
		return r;
	if (!json_is_object(v)) {
		json_decref(v);
		v = json_object();
	}
	n = jint(v, field) + 1;
	json_object_set_new(v, field, json_integer(n));
	batch_put(b, key, v, rev);
	if (value)
		*value = n;
	return 0;
}

int64_t counter_value(struct control_state *st, const char *key, const char *field)
{
	json_t *v = NULL;
	int64_t n;

	kv_json(st, key, &v, NULL);
	n = jint(v, field);
	json_decref(v);
	return n;
}

/* A commit that lost a race: a condition on a revision read failed, or a
 * key read was deleted meanwhile. */
static bool raced(int r)
{
	return r == -ECANCELED || r == -ENOENT;
}

int state_txn(struct control_state *st, const char *what, state_txn_fn fn, void *arg,
              int64_t *rev, struct state_error *se)
{
	struct batch b = {0};
	int r = -ECANCELED;

	for (int attempt = 0; attempt < STATE_RETRIES && r == -ECANCELED; attempt++) {
		r = fn(st, &b, arg, se);
		if (r) {
			batch_clear(&b);
			if (r != -ECANCELED)
				return r;
			continue;
		}
		r = batch_commit(st, &b, rev);
		if (raced(r))
			r = -ECANCELED;
	}
	if (r == -E2BIG)
		return state_fail(se, -E2BIG, "", "the %s is too large to store", what);
	if (r)
		return state_store_failed(st, se, what, r);
	return 0;
}

/* ---- the state directory ---- */

static bool exists(const char *path)
{
	struct stat sb;
	return lstat(path, &sb) == 0;
}

/* Creates the state dir (first start) or checks its ownership and mode. */
static int prepare_dir(struct control_state *st, struct meshlet_err *err)
{
	struct stat sb;

	if (stat(st->dir, &sb) < 0) {
		if (errno != ENOENT)
			return err_set(err, "", "state dir %s: %s", st->dir, strerror(errno));
		if (mkdir(st->dir, 0700) < 0 || chmod(st->dir, 0700) < 0)
			return err_set(err, "", "cannot create state dir %s: %s", st->dir,
			               strerror(errno));
		return 0;
	}
	if (!S_ISDIR(sb.st_mode))
		return err_set(err, "", "state dir %s is not a directory", st->dir);
	if (sb.st_uid != geteuid())
		return err_set(err, "", "state dir %s is owned by uid %u, not by this user (uid %u)",
		               st->dir, (unsigned)sb.st_uid, (unsigned)geteuid());
	if (sb.st_mode & 077) {
		err_set(err, "", "state dir %s may be accessed by group or others (mode %04o); "
		        "it holds the CA keys: chmod 700 %s", st->dir, (unsigned)(sb.st_mode & 07777),
		        st->dir);
		return -EACCES;
	}
	return 0;
}

/* The admin token of text (trailing white space dropped) into its SHA-256. */
static int admin_digest(struct control_state *st, const char *path, char *text, size_t n,
                        struct meshlet_err *err)
{
	while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' '))
		n--;
	text[n] = '\0';
	if (n < 16 || n > ADMIN_TOKEN_MAX || strcspn(text, " \t\r\n") != n)
		return err_set(err, "", "%s: expected one token of 16..%d characters", path,
		               ADMIN_TOKEN_MAX);
	EVP_Digest(text, n, st->admin_digest, NULL, EVP_sha256(), NULL);
	return 0;
}

/* Reads an admin token file (0600, one line) and keeps its SHA-256 only.
 * flags: FILE_NOFOLLOW in the state dir; an operator's --admin-token-file
 * may be a symbolic link (a mounted Kubernetes Secret is one). */
static int token_file_digest(struct control_state *st, const char *path, unsigned flags,
                             struct meshlet_err *err)
{
	char *text = NULL;
	size_t len = 0;
	int r;

	/* Room for a line end or two after the longest token. */
	r = file_read(path, ADMIN_TOKEN_MAX + 8, flags | FILE_SECRET, &text, &len);
	if (r == -EACCES) {
		struct stat sb;

		err_set(err, "", "%s may be read by group or others (mode %04o): chmod 600 %s", path,
		        stat(path, &sb) == 0 ? (unsigned)(sb.st_mode & 07777) : 0u, path);
		return -EACCES;
	}
	if (r == -EINVAL)
		return err_set(err, "", "%s: not a regular file", path);
	if (r == -EFBIG)
		return err_set(err, "", "%s: expected one token of 16..%d characters", path,
		               ADMIN_TOKEN_MAX);
	if (r)
		return err_set(err, "", "%s: %s", path, strerror(-r));
	r = admin_digest(st, path, text, len, err);
	OPENSSL_cleanse(text, len);
	free(text);
	return r;
}

/* DIR/admin.token. */
static int load_admin_token(struct control_state *st, struct meshlet_err *err)
{
	char path[PATH_MAX];

	state_path(st, path, sizeof(path), ADMIN_TOKEN_FILE);
	return token_file_digest(st, path, FILE_NOFOLLOW, err);
}

/* Creates admin.token: 32 random bytes in hex, 0600, never overwritten. */
static int create_admin_token(struct control_state *st, struct meshlet_err *err)
{
	char path[PATH_MAX], hex[2 * 32 + 2];
	unsigned char raw[32];
	int r;

	if (RAND_bytes(raw, sizeof(raw)) != 1)
		return err_set(err, "", "no randomness for the admin token");
	for (size_t i = 0; i < sizeof(raw); i++)
		snprintf(hex + 2 * i, 3, "%02x", raw[i]);
	hex[64] = '\n';
	hex[65] = '\0';
	state_path(st, path, sizeof(path), ADMIN_TOKEN_FILE);
	r = file_write_new(path, 0600, hex, 65);
	OPENSSL_cleanse(raw, sizeof(raw));
	OPENSSL_cleanse(hex, sizeof(hex));
	if (r)
		return err_set(err, "", "cannot create %s: %s", path, strerror(-r));
	return 0;
}

/* ---- open / close ---- */

/* The first start: root, admin token, then the store records last, so a
 * store with meta/control means a complete state directory. */
static int first_start(struct control_state *st, const char *db, struct meshlet_err *err)
{
	char cert[PATH_MAX], key[PATH_MAX], tok[PATH_MAX];
	struct batch b = {0};
	int64_t now = state_now();
	int r;

	r = state_roots_create(st, err);
	if (!r)
		r = create_admin_token(st, err);
	if (!r)
		r = load_admin_token(st, err);
	if (!r)
		r = store_open(&st->store, db, err);
	if (r)
		return r;
	batch_put(&b, "meta/control", json_pack("{s:s, s:I}", "trust_domain", st->td,
	                                        "created_at", (json_int_t)now), 0);
	batch_put(&b, "meta/ca", state_ca_meta(st), 0);
	batch_put(&b, "meta/bundle", json_pack("{s:i}", "version", 1), 0);
	batch_put(&b, "meta/endpoints", json_pack("{s:i}", "version", 1), 0);
	batch_put(&b, "meta/rotate-all", json_pack("{s:i}", "cert_generation", 0), 0);
	r = batch_commit(st, &b, &st->ca_rev);
	if (r)
		return err_set(err, "", "cannot initialise the store %s: %s (%s)", db, strerror(-r),
		               store_strerror(st->store));
	if (state_bundle_write(st) < 0)
		return err_set(err, "", "cannot write %s/%s", st->dir, STATE_BUNDLE_FILE);
	state_root_paths(st, 0, cert, key, sizeof(cert));
	state_path(st, tok, sizeof(tok), ADMIN_TOKEN_FILE);
	log_info("first start: created root CA %s (key %s), trust bundle %s/%s, admin token %s, "
	         "store %s", cert, key, st->dir, STATE_BUNDLE_FILE, tok, db);
	return 0;
}

static int load_existing(struct control_state *st, const char *db, struct meshlet_err *err)
{
	json_t *meta = NULL;
	int r = store_open(&st->store, db, err);

	if (r)
		return r;
	r = kv_json(st, "meta/control", &meta, NULL);
	if (r == -ENOENT)
		return err_set(err, "", "%s holds no meshlet-control state (an interrupted first start?); "
		               "refusing to initialise over it: move %s away to start afresh", db, st->dir);
	if (r)
		return err_set(err, "", "%s: cannot read meta/control", db);
	if (strcmp(jstr(meta, "trust_domain"), st->td) != 0) {
		err_set(err, "", "state dir %s belongs to trust domain '%s', not '%s'", st->dir,
		        jstr(meta, "trust_domain"), st->td);
		json_decref(meta);
		return -EINVAL;
	}
	json_decref(meta);
	r = state_roots_load(st, err);
	if (!r)
		r = load_admin_token(st, err);
	if (!r && state_revoked_load(st) < 0)
		r = err_set(err, "", "%s: cannot read the revocation list", db);
	if (r)
		return r;
	state_proxies_load(st);
	state_bundle_write(st);
	state_endpoints_repair(st);
	log_info("state %s: %zu root(s), phase %s, store %s", st->dir, st->n_roots,
	         state_phase_name(st->phase), db);
	return 0;
}

/* ---- a shared store (etcd): several replicas ---- */

/* A new admin token: 32 random bytes in hex into hex (65 bytes). */
static int new_admin_token(char *hex)
{
	unsigned char raw[32];

	if (RAND_bytes(raw, sizeof(raw)) != 1)
		return -EIO;
	for (size_t i = 0; i < sizeof(raw); i++)
		snprintf(hex + 2 * i, 3, "%02x", raw[i]);
	OPENSSL_cleanse(raw, sizeof(raw));
	return 0;
}

static void digest_hex(const unsigned char *d, char *out)
{
	for (size_t i = 0; i < 32; i++)
		snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/*
 * The first replica on an empty store: one transaction that creates
 * meta/control only if it is absent, with everything else of a complete
 * state (root 0 with its sealed key, the admin token's digest). Of several
 * replicas starting at once exactly one wins; the others get -ECANCELED
 * and load what the winner wrote. The admin token goes to this replica's
 * state dir only after the win, and only when the operator gave none
 * (--admin-token-file: st->admin_digest is already its digest).
 */
static int shared_init(struct control_state *st, const char *where, struct meshlet_err *err)
{
	char tok[PATH_MAX], hex[80], dhex[80];
	struct batch b = {0};
	int64_t now = state_now(), rev = 0;
	int r = state_roots_create(st, err);

	if (r)
		return r;
	if (!st->o.admin_token_file && new_admin_token(hex) < 0)
		return err_set(err, "", "no randomness for the admin token");
	if (!st->o.admin_token_file)
		EVP_Digest(hex, 64, st->admin_digest, NULL, EVP_sha256(), NULL);
	digest_hex(st->admin_digest, dhex);
	batch_put(&b, "meta/control", json_pack("{s:s, s:I}", "trust_domain", st->td,
	                                        "created_at", (json_int_t)now), 0);
	batch_put(&b, "meta/admin", json_pack("{s:s}", "sha256", dhex), 0);
	batch_put(&b, "ca/0", state_root_record(st, 0, st->roots[0].ca), 0);
	batch_put(&b, "meta/ca", state_ca_meta(st), 0);
	batch_put(&b, "meta/bundle", json_pack("{s:i}", "version", 1), 0);
	batch_put(&b, "meta/endpoints", json_pack("{s:i}", "version", 1), 0);
	batch_put(&b, "meta/rotate-all", json_pack("{s:i}", "cert_generation", 0), 0);
	r = batch_commit(st, &b, &rev);
	if (r == -ECANCELED || r == -ENOENT) {
		OPENSSL_cleanse(hex, sizeof(hex));
		state_roots_free(st);
		return -ECANCELED;
	}
	if (r) {
		OPENSSL_cleanse(hex, sizeof(hex));
		return err_set(err, "", "cannot initialise the store %s: %s (%s)", where,
		               strerror(-r), store_strerror(st->store));
	}
	st->bundle_rev = st->ca_rev = rev;
	state_bundle_write(st);
	if (st->o.admin_token_file) {
		log_info("first start: initialised the store %s (root CA 0, its key sealed under "
		         "--kek-file %s); the admin token is the one in --admin-token-file %s",
		         where, st->o.kek_file, st->o.admin_token_file);
		return 0;
	}
	hex[64] = '\n';
	state_path(st, tok, sizeof(tok), ADMIN_TOKEN_FILE);
	r = file_replace(tok, 0600, hex, 65);
	OPENSSL_cleanse(hex, sizeof(hex));
	if (r)
		return err_set(err, "", "initialised the store %s but cannot write %s: %s", where, tok,
		               strerror(-r));
	log_info("first start: initialised the store %s (root CA 0, its key sealed under "
	         "--kek-file %s); admin token %s", where, st->o.kek_file, tok);
	return 0;
}

/* The admin token's digest from meta/admin. */
static int load_admin_shared(struct control_state *st, const char *where, struct meshlet_err *err)
{
	json_t *v = NULL;
	const char *h;
	int r = kv_json(st, "meta/admin", &v, NULL);

	h = jstr(v, "sha256");
	if (r || strlen(h) != 64)
		r = err_set(err, "", "%s: meta/admin is missing or damaged", where);
	for (size_t i = 0; !r && i < 32; i++) {
		unsigned x;

		if (sscanf(h + 2 * i, "%2x", &x) != 1)
			r = err_set(err, "", "%s: meta/admin is damaged", where);
		st->admin_digest[i] = (unsigned char)x;
	}
	json_decref(v);
	return r;
}

/* A replica after the store was initialised: the roots (the KEK must open
 * their keys) and the admin digest, then the rest as load_existing(). */
static int shared_load(struct control_state *st, const char *where, struct meshlet_err *err)
{
	unsigned char given[sizeof(st->admin_digest)];   /* --admin-token-file's digest */
	json_t *meta = NULL;
	int r = kv_json(st, "meta/control", &meta, NULL);

	if (r)
		return err_set(err, "", "%s: cannot read meta/control%s", where,
		               r == -ENOENT ? " (store not initialised)" : "");
	if (strcmp(jstr(meta, "trust_domain"), st->td) != 0) {
		err_set(err, "", "the store %s belongs to trust domain '%s', not '%s'", where,
		        jstr(meta, "trust_domain"), st->td);
		json_decref(meta);
		return -EINVAL;
	}
	json_decref(meta);
	memcpy(given, st->admin_digest, sizeof(given));
	r = state_roots_load(st, err);
	if (!r)
		r = load_admin_shared(st, where, err);
	if (!r && st->o.admin_token_file &&
	    CRYPTO_memcmp(given, st->admin_digest, sizeof(given)) != 0)
		r = err_set(err, "", "--admin-token-file %s is not the admin token of the store %s "
		            "(its SHA-256 differs from meta/admin, set when the store was "
		            "initialised): give every replica the same file, or leave the option out",
		            st->o.admin_token_file, where);
	if (!r && state_revoked_load(st) < 0)
		r = err_set(err, "", "%s: cannot read the revocation list", where);
	if (r)
		return r;
	kv_rev(st, "meta/bundle", &st->bundle_rev);
	state_proxies_load(st);
	state_bundle_write(st);
	state_endpoints_repair(st);
	log_info("joined the store %s: %zu root(s), phase %s", where, st->n_roots,
	         state_phase_name(st->phase));
	return 0;
}

static int open_shared(struct control_state *st, struct meshlet_err *err)
{
	const struct control_opts *o = &st->o;
	char where[300];
	json_t *meta = NULL;
	int r;

	if (!o->kek_file)
		return err_set(err, "", "--store etcd: needs --kek-file FILE (the key that encrypts "
		               "the CA keys in the store; make one with meshlet-control init-kek FILE "
		               "and give every replica a copy)");
	r = kek_load(o->kek_file, st->kek, err);
	if (!r && o->admin_token_file)
		r = token_file_digest(st, o->admin_token_file, 0, err);
	if (r)
		return r;
	st->shared = true;
	snprintf(where, sizeof(where), "etcd:%s (prefix %s)", o->etcd.endpoints,
	         o->etcd.prefix ? o->etcd.prefix : "/meshlet/");
	r = store_open_etcd(&st->store, &o->etcd, err);
	if (r)
		return r;
	r = kv_json(st, "meta/control", &meta, NULL);
	json_decref(meta);
	if (r == -ENOENT) {
		r = shared_init(st, where, err);
		if (r != -ECANCELED)
			return r;
		log_info("another replica initialised the store %s first; loading it", where);
	} else if (r) {
		return err_set(err, "", "%s: cannot read meta/control (%s)", where,
		               store_strerror(st->store));
	}
	return shared_load(st, where, err);
}

int state_follow_fd(struct control_state *st)
{
	int fd = -1, r;

	if (!st->shared)
		return -1;
	/* The keys config versions are made of (state_config.c): the follower
	 * keeps their revisions, so waking long polls needs no store reads. */
	if (store_follow_track(st->store, (const char *const[]){"meta/", "services/"}, 2) < 0)
		log_warn("cannot track the config versions' keys in memory: long polls read them "
		         "from the store");
	r = store_follow(st->store, &fd);
	if (r < 0) {
		log_warn("cannot follow the store's changes (%s): long polls here learn of other "
		         "replicas' writes only when they time out", strerror(-r));
		return -1;
	}
	return fd;
}

/* The roots, when meta/ca moved (a CA step made elsewhere). */
static void refresh_roots(struct control_state *st, bool *tls_changed)
{
	int64_t rev = 0;

	if (kv_rev_followed(st, "meta/ca", &rev) < 0 || rev == st->ca_rev)
		return;
	if (state_roots_reload(st) == 0)      /* sets ca_rev to the revision it read */
		*tls_changed = true;
}

void state_refresh(struct control_state *st, bool *tls_changed)
{
	int64_t rev = 0;

	*tls_changed = false;
	store_follow_drain(st->store);
	refresh_roots(st, tls_changed);
	if (kv_rev_followed(st, "meta/bundle", &rev) < 0 || rev == st->bundle_rev)
		return;
	/* The bundle moved: a revocation (or a rotation step) elsewhere. */
	state_revoked_free(st);
	if (state_revoked_load(st) < 0) {
		log_error("cannot reload the revocation list; retrying with the next change");
		return;
	}
	st->bundle_rev = rev;
}

/* st->dir from the command line's state dir, trailing slashes dropped. */
static int set_dir(struct control_state *st, const char *dir, struct meshlet_err *err)
{
	size_t n = strlen(dir);

	while (n > 1 && dir[n - 1] == '/')
		n--;
	if (n == 0 || n >= sizeof(st->dir) - 32)
		return err_set(err, "", "bad state dir '%s'", dir);
	memcpy(st->dir, dir, n);
	st->dir[n] = '\0';
	return 0;
}

int state_open(struct control_state **out, const struct control_opts *o, struct meshlet_err *err)
{
	struct control_state *st = calloc(1, sizeof(*st));
	char db[PATH_MAX], key[PATH_MAX], tok[PATH_MAX];
	int r;

	*out = NULL;
	if (!st)
		return err_set(err, "", "out of memory");
	st->o = *o;
	st->max_endpoints = o->max_endpoints_per_service > 0 ? o->max_endpoints_per_service :
	                    CONTROL_ENDPOINTS_PER_SERVICE_DEFAULT;
	if (!identity_valid_trust_domain(o->trust_domain)) {
		r = err_set(err, "", "'%s' is not a trust domain", o->trust_domain);
		goto fail;
	}
	snprintf(st->td, sizeof(st->td), "%s", o->trust_domain);
	r = set_dir(st, o->state_dir, err);
	if (!r)
		r = prepare_dir(st, err);
	if (!r && o->etcd.endpoints)
		r = open_shared(st, err);
	if (r)
		goto fail;
	if (o->etcd.endpoints)
		goto opened;
	if (o->store_path)
		snprintf(db, sizeof(db), "%s", o->store_path);
	else
		state_path(st, db, sizeof(db), "state.db");
	state_path(st, key, sizeof(key), "ca.key");
	state_path(st, tok, sizeof(tok), ADMIN_TOKEN_FILE);
	if (exists(db))
		r = load_existing(st, db, err);
	else if (exists(key) || exists(tok))
		r = err_set(err, "", "state dir %s holds %s but there is no state database %s "
		            "(an interrupted first start, or a lost database); refusing to "
		            "re-initialise: restore the database or move %s away", st->dir,
		            exists(key) ? "ca.key" : ADMIN_TOKEN_FILE, db, st->dir);
	else
		r = first_start(st, db, err);
	if (r)
		goto fail;
opened:
	if (RAND_status() != 1) {
		r = err_set(err, "", "the OpenSSL random generator is not seeded");
		goto fail;
	}
	log_info("root CA pin (SHA-256 of the signing root's public key): %s",
	         st->roots[st->signing].pin);
	*out = st;
	return 0;
fail:
	state_close(st);
	return r < 0 ? r : -EINVAL;
}

void state_close(struct control_state *st)
{
	if (!st)
		return;
	if (st->store && state_proxies_flush(st) < 0)
		log_warn("could not write the proxies registry: %s", store_strerror(st->store));
	store_close(st->store);
	state_roots_free(st);
	state_revoked_free(st);
	state_proxies_free(st);
	state_config_cache_free(st);
	OPENSSL_cleanse(st->admin_digest, sizeof(st->admin_digest));
	OPENSSL_cleanse(st->kek, sizeof(st->kek));
	free(st);
}

/* ---- identity ---- */

const char *state_trust_domain(const struct control_state *st)
{
	return st->td;
}

json_t *state_store_status(struct control_state *st)
{
	int64_t rev = 0;
	int r = store_revision(st->store, &rev);
	json_t *o = json_pack("{s:s, s:b}", "backend", store_backend_name(st->store), "ok", r == 0);

	st->store_down = r == -EAGAIN;
	if (o && r == 0)
		json_object_set_new(o, "revision", json_integer(rev));
	else if (o)
		json_object_set_new(o, "error", json_string(r == -EAGAIN ? "unavailable" :
		                                            store_strerror(st->store)));
	return o;
}

uint64_t state_store_misses(const struct control_state *st)
{
	return st->store_misses;
}

bool state_store_down(const struct control_state *st)
{
	return st->store_down;
}

bool state_admin_ok(const struct control_state *st, const char *token)
{
	unsigned char d[32];

	if (!token)
		return false;
	EVP_Digest(token, strlen(token), d, NULL, EVP_sha256(), NULL);
	return CRYPTO_memcmp(d, st->admin_digest, sizeof(d)) == 0;
}

void state_set_store_observer(struct control_state *st, store_observer_fn fn, void *arg)
{
	store_set_observer(st->store, fn, arg);
}

void state_counts(const struct control_state *st, struct state_counts *c)
{
	c->revoked = st->n_revoked;
	c->roots = st->n_roots;
	c->phase = st->phase;
	c->proxies_polling = 0;
	for (const struct state_proxy *p = st->proxies; p; p = p->next)
		c->proxies_polling += p->polling > 0;
}
