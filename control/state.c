/* state: meshlet-control's state directory and store; see state.h. */
#include "state.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "meshlet/http.h"
#include "meshlet/identity.h"
#include "meshlet/policy.h"
#include "meshlet/store.h"

/* A CA rotation has at most two roots in the bundle; room for one more. */
#define STATE_ROOTS_MAX 3
/* Writes per batch when pruning (below STORE_BATCH_MAX, leaving room). */
#define STATE_PRUNE_CHUNK 100
/* Retries of a read-modify-write that lost a race with another writer. */
#define STATE_RETRIES 5
/* Ancestors followed when checking a renewal's lineage: a proxy's chain
 * of unexpired SVIDs is a few long (records go when certificates expire). */
#define STATE_LINEAGE_DEPTH_MAX 64
#define ADMIN_TOKEN_FILE "admin.token"
#define ADMIN_TOKEN_MAX 256
#define BUNDLE_FILE "ca.pem"

struct state_root {
	int id;
	struct ca *ca;
	char pin[CA_PIN_HEX_LEN];
	char *pem;
};

/* A proxy seen by control, keyed by the serial of the SVID it uses. */
struct state_proxy {
	char serial[CA_SERIAL_HEX_MAX];
	char service[SERVICE_NAME_MAX + 1];
	char address[64];
	json_t *ports;                 /* array, or NULL */
	int64_t not_after;
	int64_t last_seen;
	int64_t held;                  /* config version it holds, -1 unknown */
	int64_t bundle_rev;            /* revision of meta/bundle it last fetched */
	int polling;                   /* long polls pending now */
	bool dirty;                    /* not yet written to the store */
	struct state_proxy *next;
};

struct control_state {
	struct control_opts o;
	char dir[PATH_MAX];
	char td[TRUST_DOMAIN_MAX + 1];
	struct store *store;
	unsigned char admin_digest[32];
	struct state_root roots[STATE_ROOTS_MAX];
	X509 *root_certs[STATE_ROOTS_MAX];
	size_t n_roots;
	size_t signing;                /* index into roots */
	enum ca_phase phase;
	int next_id;
	X509 *cross;                   /* switched: the signing root cross-signed by the old */
	char **revoked;                /* sorted canonical serials */
	size_t n_revoked, cap_revoked;
	struct state_proxy *proxies;
	char **gone;                   /* proxies/<serial> keys to delete */
	size_t n_gone;
	/* Registry changes bump meta/endpoints at most once per
	 * CONTROL_ENDPOINTS_COALESCE_MS (state_endpoints_touch). */
	int64_t max_endpoints;         /* entries per service */
	bool endpoints_pending;        /* a change not yet in the version */
	bool endpoints_timer;          /* a state_endpoints_flush() call is due */
	int64_t endpoints_bumped_ms;   /* monotonic time of the last bump */
};

static const char *const phase_names[] = {
	[CA_PHASE_STABLE] = "stable",
	[CA_PHASE_PREPARED] = "prepared",
	[CA_PHASE_SWITCHED] = "switched",
};

/* ---- small helpers ---- */

static int64_t now_s(void)
{
	return (int64_t)time(NULL);
}

/* RFC 3339 of t into out (CA_TIME_LEN). */
static const char *fmt_time(int64_t t, char *out)
{
	if (ca_time_rfc3339(t, out) < 0)
		snprintf(out, CA_TIME_LEN, "1970-01-01T00:00:00Z");
	return out;
}

static int64_t jint(const json_t *o, const char *k)
{
	return (int64_t)json_integer_value(json_object_get(o, k));
}

static const char *jstr(const json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

/* A failed store call: logged once here, 500 for the client. */
static int store_failed(struct control_state *st, struct api_error *ae, const char *what, int r)
{
	log_error("store: %s failed: %s (%s)", what, strerror(-r), store_strerror(st->store));
	return api_fail(ae, 500, "", "the state store failed (%s); see control's log", strerror(-r));
}

/* Reads key as JSON. Returns 0 (*out a new reference), -ENOENT (*out NULL,
 * *rev 0) or -EIO (logged). rev may be NULL. */
static int kv_json(struct control_state *st, const char *key, json_t **out, int64_t *rev)
{
	char *v = NULL;
	size_t len = 0;
	int64_t r = 0;
	json_error_t je;
	int ret = store_get(st->store, key, &v, &len, &r);

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

/* The revision of key, 0 when it does not exist; -EIO on error. */
static int kv_rev(struct control_state *st, const char *key, int64_t *rev)
{
	int r = store_get(st->store, key, NULL, NULL, rev);

	if (r == -ENOENT) {
		*rev = 0;
		return 0;
	}
	if (r < 0)
		log_error("store: get %s: %s", key, store_strerror(st->store));
	return r < 0 ? -EIO : 0;
}

/* One atomic store write being assembled; keys and values are owned. */
struct batch {
	struct store_op ops[STORE_BATCH_MAX];
	char *mem[2 * STORE_BATCH_MAX];
	size_t n, nmem;
	int err;
};

/* Adds key = v (stolen; dumped compactly) with the condition expected. */
static void batch_put(struct batch *b, const char *key, json_t *v, int64_t expected)
{
	char *k = strdup(key), *val = v ? json_dumps(v, JSON_COMPACT) : NULL;

	json_decref(v);
	if (!k || !val || b->n >= STORE_BATCH_MAX) {
		free(k);
		free(val);
		if (!b->err)
			b->err = b->n >= STORE_BATCH_MAX ? -E2BIG : -ENOMEM;
		return;
	}
	b->mem[b->nmem++] = k;
	b->mem[b->nmem++] = val;
	b->ops[b->n++] = (struct store_op){ .kind = STORE_OP_PUT, .key = k, .value = val,
	                                    .len = strlen(val), .expected = expected };
}

static void batch_del(struct batch *b, const char *key, int64_t expected)
{
	char *k = strdup(key);

	if (!k || b->n >= STORE_BATCH_MAX) {
		free(k);
		if (!b->err)
			b->err = b->n >= STORE_BATCH_MAX ? -E2BIG : -ENOMEM;
		return;
	}
	b->mem[b->nmem++] = k;
	b->ops[b->n++] = (struct store_op){ .kind = STORE_OP_DELETE, .key = k,
	                                    .expected = expected };
}

static void batch_clear(struct batch *b)
{
	for (size_t i = 0; i < b->nmem; i++)
		free(b->mem[i]);
	b->n = b->nmem = 0;
	b->err = 0;
}

/* Applies and clears b. Returns 0 (*rev the new revision; may be NULL),
 * -ECANCELED/-ENOENT when a condition failed, or another negative errno. */
static int batch_commit(struct control_state *st, struct batch *b, int64_t *rev)
{
	int r = b->err;

	if (!r && b->n > 0)
		r = store_apply(st->store, b->ops, b->n, rev);
	batch_clear(b);
	return r;
}

/* ---- files ---- */

/* dir/name into out; a name that does not fit leaves "" (no such file). */
static void path_in(const struct control_state *st, char *out, size_t len, const char *name)
{
	int n = snprintf(out, len, "%s/%s", st->dir, name);

	if (n < 0 || (size_t)n >= len)
		out[0] = '\0';
}

static void root_paths(const struct control_state *st, int id, char *cert, char *key, size_t len)
{
	char name[32];

	snprintf(name, sizeof(name), "ca-%d.pem", id);
	path_in(st, cert, len, name);
	if (id == 0)
		snprintf(name, sizeof(name), "ca.key");
	else
		snprintf(name, sizeof(name), "ca-%d.key", id);
	path_in(st, key, len, name);
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int r = 0;

	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	return r;
}

static int write_all_fd(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Writes path atomically (temporary file, fsync, rename, fsync dir). */
static int write_file_atomic(struct control_state *st, const char *name, const char *data,
                             size_t len, mode_t mode)
{
	char path[PATH_MAX], tmp[PATH_MAX];
	int fd, r;

	path_in(st, path, sizeof(path), name);
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	unlink(tmp);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	if (fd < 0)
		return -errno;
	r = write_all_fd(fd, data, len);
	if (!r && fchmod(fd, mode) < 0)
		r = -errno;
	if (!r && fsync(fd) < 0)
		r = -errno;
	close(fd);
	if (!r && rename(tmp, path) < 0)
		r = -errno;
	if (r) {
		unlink(tmp);
		return r;
	}
	return fsync_dir(st->dir);
}

/* Rewrites ca.pem with the roots of the bundle, if it differs. */
static int write_bundle_file(struct control_state *st)
{
	char path[PATH_MAX], cur[64 * 1024];
	char *pem = ca_pem_encode(st->root_certs, st->n_roots);
	ssize_t n = -1;
	int fd, r = 0;

	if (!pem)
		return -ENOMEM;
	path_in(st, path, sizeof(path), BUNDLE_FILE);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd >= 0) {
		n = read(fd, cur, sizeof(cur));
		close(fd);
	}
	if (n < 0 || (size_t)n != strlen(pem) || memcmp(cur, pem, (size_t)n) != 0)
		r = write_file_atomic(st, BUNDLE_FILE, pem, strlen(pem), 0644);
	if (r)
		log_error("cannot write %s: %s", path, strerror(-r));
	free(pem);
	return r;
}

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

/* Reads admin.token (0600, one line) and keeps its SHA-256 only. */
static int load_admin_token(struct control_state *st, struct meshlet_err *err)
{
	char path[PATH_MAX], buf[ADMIN_TOKEN_MAX + 2];
	struct stat sb;
	ssize_t n;
	int fd;

	path_in(st, path, sizeof(path), ADMIN_TOKEN_FILE);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return err_set(err, "", "%s: %s", path, strerror(errno));
	if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
		close(fd);
		return err_set(err, "", "%s: not a regular file", path);
	}
	if (sb.st_mode & 077) {
		close(fd);
		err_set(err, "", "%s may be read by group or others (mode %04o): chmod 600 %s", path,
		        (unsigned)(sb.st_mode & 07777), path);
		return -EACCES;
	}
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		return err_set(err, "", "%s: %s", path, strerror(errno));
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
		n--;
	buf[n] = '\0';
	if (n < 16 || (size_t)n > ADMIN_TOKEN_MAX || strcspn(buf, " \t\r\n") != (size_t)n) {
		OPENSSL_cleanse(buf, sizeof(buf));
		return err_set(err, "", "%s: expected one token of 16..%d characters", path,
		               ADMIN_TOKEN_MAX);
	}
	EVP_Digest(buf, (size_t)n, st->admin_digest, NULL, EVP_sha256(), NULL);
	OPENSSL_cleanse(buf, sizeof(buf));
	return 0;
}

/* Creates admin.token: 32 random bytes in hex, 0600, never overwritten. */
static int create_admin_token(struct control_state *st, struct meshlet_err *err)
{
	char path[PATH_MAX], hex[2 * 32 + 2];
	unsigned char raw[32];
	int fd, r;

	if (RAND_bytes(raw, sizeof(raw)) != 1)
		return err_set(err, "", "no randomness for the admin token");
	for (size_t i = 0; i < sizeof(raw); i++)
		snprintf(hex + 2 * i, 3, "%02x", raw[i]);
	hex[64] = '\n';
	hex[65] = '\0';
	path_in(st, path, sizeof(path), ADMIN_TOKEN_FILE);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return err_set(err, "", "cannot create %s: %s", path, strerror(errno));
	r = write_all_fd(fd, hex, 65);
	if (!r && fsync(fd) < 0)
		r = -errno;
	close(fd);
	if (!r)
		r = fsync_dir(st->dir);
	OPENSSL_cleanse(raw, sizeof(raw));
	OPENSSL_cleanse(hex, sizeof(hex));
	if (r) {
		unlink(path);
		return err_set(err, "", "cannot write %s: %s", path, strerror(-r));
	}
	return 0;
}

/* ---- roots ---- */

static void roots_free(struct control_state *st)
{
	for (size_t i = 0; i < st->n_roots; i++) {
		ca_free(st->roots[i].ca);
		free(st->roots[i].pem);
	}
	memset(st->roots, 0, sizeof(st->roots));
	memset(st->root_certs, 0, sizeof(st->root_certs));
	st->n_roots = 0;
	X509_free(st->cross);
	st->cross = NULL;
}

/* The other root of a rotation (the one not signing), or NULL. */
static const struct state_root *old_root(const struct control_state *st)
{
	if (st->n_roots != 2)
		return NULL;
	return &st->roots[st->signing == 0 ? 1 : 0];
}

/* Keeps st->cross in step with the phase: while switched, the signing root
 * cross-signed by the old one, which control's server sends in its chain
 * so that a proxy that missed the prepared phase (it holds only the old
 * root) can still verify control, fetch the new bundle and renew. */
static void cross_update(struct control_state *st)
{
	const struct state_root *old = old_root(st);
	struct meshlet_err e = {0};

	X509_free(st->cross);
	st->cross = NULL;
	if (st->phase != CA_PHASE_SWITCHED || !old)
		return;
	if (ca_cross_sign(old->ca, st->roots[st->signing].ca, &st->cross, &e) < 0)
		log_warn("cannot cross-sign root %d with root %d: %s; proxies holding only the old "
		         "root cannot verify control until they join again", st->roots[st->signing].id,
		         old->id, e.message);
}

/* Fills roots[i] from ca (taken over). */
static int root_set(struct control_state *st, size_t i, int id, struct ca *ca)
{
	X509 *cert = ca_cert(ca);

	st->roots[i].id = id;
	st->roots[i].ca = ca;
	st->roots[i].pem = ca_pem_encode(&cert, 1);
	st->root_certs[i] = cert;
	if (!st->roots[i].pem || ca_pin_sha256(cert, st->roots[i].pin) < 0)
		return -ENOMEM;
	return 0;
}

static int load_root(struct control_state *st, size_t i, int id, struct meshlet_err *err)
{
	char cert[PATH_MAX], key[PATH_MAX];
	struct ca *ca = NULL;
	int r;

	root_paths(st, id, cert, key, sizeof(cert));
	r = ca_load(&ca, st->td, cert, key, err);
	if (r < 0)
		return r;
	return root_set(st, i, id, ca);
}

static int root_index(const struct control_state *st, int id)
{
	for (size_t i = 0; i < st->n_roots; i++) {
		if (st->roots[i].id == id)
			return (int)i;
	}
	return -1;
}

/* meta/ca as JSON. */
static json_t *ca_meta(const struct control_state *st)
{
	json_t *ids = json_array();

	for (size_t i = 0; i < st->n_roots; i++)
		json_array_append_new(ids, json_integer(st->roots[i].id));
	return json_pack("{s:s, s:o, s:i, s:i}", "phase", phase_names[st->phase], "roots", ids,
	                 "signing", st->roots[st->signing].id, "next_id", st->next_id);
}

static int parse_phase(const char *s, enum ca_phase *out)
{
	for (int i = 0; i <= CA_PHASE_SWITCHED; i++) {
		if (strcmp(s, phase_names[i]) == 0) {
			*out = (enum ca_phase)i;
			return 0;
		}
	}
	return -EINVAL;
}

static int load_roots(struct control_state *st, struct meshlet_err *err)
{
	json_t *meta = NULL, *ids;
	size_t i;
	int r, signing_id;

	if (kv_json(st, "meta/ca", &meta, NULL) < 0)
		return err_set(err, "", "the store has no readable meta/ca record");
	ids = json_object_get(meta, "roots");
	signing_id = (int)jint(meta, "signing");
	st->next_id = (int)jint(meta, "next_id");
	if (!json_is_array(ids) || json_array_size(ids) == 0 ||
	    json_array_size(ids) > STATE_ROOTS_MAX ||
	    parse_phase(jstr(meta, "phase"), &st->phase) < 0) {
		json_decref(meta);
		return err_set(err, "", "the store's meta/ca record is damaged");
	}
	for (i = 0; i < json_array_size(ids); i++) {
		r = load_root(st, i, (int)json_integer_value(json_array_get(ids, i)), err);
		if (r < 0) {
			json_decref(meta);
			return r;
		}
		st->n_roots++;
	}
	json_decref(meta);
	r = root_index(st, signing_id);
	if (r < 0)
		return err_set(err, "", "the store's meta/ca names a signing root not in the bundle");
	st->signing = (size_t)r;
	cross_update(st);
	return 0;
}

/* ---- revocations (in memory, sorted) ---- */

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

bool state_is_revoked(const struct control_state *st, const char *serial)
{
	return st->n_revoked &&
	       bsearch(&serial, st->revoked, st->n_revoked, sizeof(char *), cmp_str) != NULL;
}

static int revoked_add(struct control_state *st, const char *serial)
{
	char *s;

	if (state_is_revoked(st, serial))
		return 0;
	if (st->n_revoked == st->cap_revoked) {
		size_t cap = st->cap_revoked ? 2 * st->cap_revoked : 16;
		char **n = realloc(st->revoked, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		st->revoked = n;
		st->cap_revoked = cap;
	}
	s = strdup(serial);
	if (!s)
		return -ENOMEM;
	st->revoked[st->n_revoked++] = s;
	qsort(st->revoked, st->n_revoked, sizeof(char *), cmp_str);
	return 0;
}

static void revoked_remove(struct control_state *st, const char *serial)
{
	for (size_t i = 0; i < st->n_revoked; i++) {
		if (strcmp(st->revoked[i], serial) == 0) {
			free(st->revoked[i]);
			memmove(&st->revoked[i], &st->revoked[i + 1],
			        (st->n_revoked - i - 1) * sizeof(char *));
			st->n_revoked--;
			return;
		}
	}
}

static int load_revoked(struct control_state *st)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int r = store_list(st->store, "revoked/", &e, &n, NULL);

	for (size_t i = 0; r == 0 && i < n; i++)
		r = revoked_add(st, e[i].key + strlen("revoked/"));
	store_entries_free(e, n);
	return r;
}

/* ---- proxies registry (in memory; written by state_maintain) ---- */

static struct state_proxy *proxy_find(struct control_state *st, const char *serial)
{
	for (struct state_proxy *p = st->proxies; p; p = p->next) {
		if (strcmp(p->serial, serial) == 0)
			return p;
	}
	return NULL;
}

static struct state_proxy *proxy_add(struct control_state *st, const char *serial,
                                     const char *svc)
{
	struct state_proxy *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	snprintf(p->serial, sizeof(p->serial), "%s", serial);
	snprintf(p->service, sizeof(p->service), "%s", svc);
	p->held = -1;
	p->next = st->proxies;
	st->proxies = p;
	return p;
}

static void proxy_gone(struct control_state *st, const char *serial)
{
	char **n = realloc(st->gone, (st->n_gone + 1) * sizeof(*n));

	if (!n)
		return;
	st->gone = n;
	st->gone[st->n_gone] = strdup(serial);
	if (st->gone[st->n_gone])
		st->n_gone++;
}

static void proxy_unlink(struct control_state *st, struct state_proxy *p)
{
	for (struct state_proxy **pp = &st->proxies; *pp; pp = &(*pp)->next) {
		if (*pp == p) {
			*pp = p->next;
			break;
		}
	}
	json_decref(p->ports);
	free(p);
}

static void load_proxies(struct control_state *st)
{
	struct store_entry *e = NULL;
	size_t n = 0;

	if (store_list(st->store, "proxies/", &e, &n, NULL) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		struct state_proxy *p = v ? proxy_add(st, e[i].key + strlen("proxies/"),
		                                      jstr(v, "service")) : NULL;
		if (p) {
			snprintf(p->address, sizeof(p->address), "%s", jstr(v, "address"));
			p->ports = json_incref(json_object_get(v, "ports"));
			p->not_after = jint(v, "not_after");
			p->last_seen = jint(v, "last_seen");
			p->held = jint(v, "config_version");
		}
		json_decref(v);
	}
	store_entries_free(e, n);
}

static json_t *proxy_json(const struct state_proxy *p)
{
	return json_pack("{s:s, s:s, s:O?, s:I, s:I, s:I}", "service", p->service,
	                 "address", p->address, "ports", p->ports, "last_seen", (json_int_t)p->last_seen,
	                 "not_after", (json_int_t)p->not_after, "config_version", (json_int_t)p->held);
}

/* Writes dirty entries and deletes gone ones, in chunks. */
static int proxies_flush(struct control_state *st)
{
	struct batch b = {0};
	char key[STORE_KEY_MAX];
	int r = 0;

	for (struct state_proxy *p = st->proxies; p && !r; p = p->next) {
		if (!p->dirty)
			continue;
		snprintf(key, sizeof(key), "proxies/%s", p->serial);
		batch_put(&b, key, proxy_json(p), STORE_REV_ANY);
		p->dirty = false;
		if (b.n >= STATE_PRUNE_CHUNK)
			r = batch_commit(st, &b, NULL);
	}
	if (!r)
		r = batch_commit(st, &b, NULL);
	for (size_t i = 0; i < st->n_gone; i++) {
		snprintf(key, sizeof(key), "proxies/%s", st->gone[i]);
		int d = store_delete(st->store, key, STORE_REV_ANY, NULL);
		if (d < 0 && d != -ENOENT && !r)
			r = d;
		free(st->gone[i]);
	}
	st->n_gone = 0;
	batch_clear(&b);
	return r;
}

/* ---- open / close ---- */

static void endpoints_repair(struct control_state *st);

/* The first start: root, admin token, then the store records last, so a
 * store with meta/control means a complete state directory. */
static int first_start(struct control_state *st, const char *db, struct meshlet_err *err)
{
	char cert[PATH_MAX], key[PATH_MAX], tok[PATH_MAX];
	struct ca *ca = NULL;
	struct batch b = {0};
	int64_t now = now_s();
	int r;

	root_paths(st, 0, cert, key, sizeof(cert));
	r = ca_generate(&ca, st->td, 0, err);
	if (!r)
		r = ca_save(ca, cert, key, err);
	if (r) {
		ca_free(ca);
		return r;
	}
	r = root_set(st, 0, 0, ca);
	st->n_roots = 1;
	st->signing = 0;
	st->phase = CA_PHASE_STABLE;
	st->next_id = 1;
	if (r)
		return err_set(err, "", "out of memory");
	r = create_admin_token(st, err);
	if (!r)
		r = load_admin_token(st, err);
	if (r)
		return r;
	r = store_open(&st->store, db, err);
	if (r)
		return r;
	batch_put(&b, "meta/control", json_pack("{s:s, s:I}", "trust_domain", st->td,
	                                        "created_at", (json_int_t)now), 0);
	batch_put(&b, "meta/ca", ca_meta(st), 0);
	batch_put(&b, "meta/bundle", json_pack("{s:i}", "version", 1), 0);
	batch_put(&b, "meta/endpoints", json_pack("{s:i}", "version", 1), 0);
	batch_put(&b, "meta/rotate-all", json_pack("{s:i}", "cert_generation", 0), 0);
	r = batch_commit(st, &b, NULL);
	if (r)
		return err_set(err, "", "cannot initialise the store %s: %s (%s)", db, strerror(-r),
		               store_strerror(st->store));
	if (write_bundle_file(st) < 0)
		return err_set(err, "", "cannot write %s/%s", st->dir, BUNDLE_FILE);
	path_in(st, tok, sizeof(tok), ADMIN_TOKEN_FILE);
	log_info("first start: created root CA %s (key %s), trust bundle %s/%s, admin token %s, "
	         "store %s", cert, key, st->dir, BUNDLE_FILE, tok, db);
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
	r = load_roots(st, err);
	if (!r)
		r = load_admin_token(st, err);
	if (!r && load_revoked(st) < 0)
		r = err_set(err, "", "%s: cannot read the revocation list", db);
	if (r)
		return r;
	load_proxies(st);
	write_bundle_file(st);
	log_info("state %s: %zu root(s), phase %s, store %s", st->dir, st->n_roots,
	         phase_names[st->phase], db);
	return 0;
}

int state_open(struct control_state **out, const struct control_opts *o, struct meshlet_err *err)
{
	struct control_state *st = calloc(1, sizeof(*st));
	char db[PATH_MAX], key[PATH_MAX], tok[PATH_MAX];
	size_t n;
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
	n = strlen(o->state_dir);
	while (n > 1 && o->state_dir[n - 1] == '/')
		n--;
	if (n == 0 || n >= sizeof(st->dir) - 32) {
		r = err_set(err, "", "bad state dir '%s'", o->state_dir);
		goto fail;
	}
	memcpy(st->dir, o->state_dir, n);
	st->dir[n] = '\0';
	r = prepare_dir(st, err);
	if (r)
		goto fail;
	if (o->store_path)
		snprintf(db, sizeof(db), "%s", o->store_path);
	else
		path_in(st, db, sizeof(db), "state.db");
	path_in(st, key, sizeof(key), "ca.key");
	path_in(st, tok, sizeof(tok), ADMIN_TOKEN_FILE);
	if (exists(db)) {
		r = load_existing(st, db, err);
		if (!r)
			endpoints_repair(st);
	} else if (exists(key) || exists(tok)) {
		r = err_set(err, "", "state dir %s holds %s but there is no state database %s "
		            "(an interrupted first start, or a lost database); refusing to "
		            "re-initialise: restore the database or move %s away", st->dir,
		            exists(key) ? "ca.key" : ADMIN_TOKEN_FILE, db, st->dir);
	} else {
		r = first_start(st, db, err);
	}
	if (r)
		goto fail;
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
	if (st->store && proxies_flush(st) < 0)
		log_warn("could not write the proxies registry: %s", store_strerror(st->store));
	store_close(st->store);
	roots_free(st);
	for (size_t i = 0; i < st->n_revoked; i++)
		free(st->revoked[i]);
	free(st->revoked);
	while (st->proxies)
		proxy_unlink(st, st->proxies);
	for (size_t i = 0; i < st->n_gone; i++)
		free(st->gone[i]);
	free(st->gone);
	OPENSSL_cleanse(st->admin_digest, sizeof(st->admin_digest));
	free(st);
}

/* ---- identity ---- */

const char *state_trust_domain(const struct control_state *st)
{
	return st->td;
}

bool state_admin_ok(const struct control_state *st, const char *token)
{
	unsigned char d[32];

	if (!token)
		return false;
	EVP_Digest(token, strlen(token), d, NULL, EVP_sha256(), NULL);
	return CRYPTO_memcmp(d, st->admin_digest, sizeof(d)) == 0;
}

const struct ca *state_signing_ca(const struct control_state *st)
{
	return st->roots[st->signing].ca;
}

X509 *const *state_roots(const struct control_state *st, size_t *n)
{
	*n = st->n_roots;
	return st->root_certs;
}

size_t state_server_chain(const struct control_state *st, X509 **out)
{
	const struct state_root *old = old_root(st);

	if (st->cross && old) {
		out[0] = st->cross;
		out[1] = ca_cert(old->ca);
		return 2;
	}
	out[0] = ca_cert(st->roots[st->signing].ca);
	return 1;
}

/* ---- counters ---- */

/* Adds to b a write of the record key with its counter field += 1 (other
 * fields kept; a missing record starts at 0); *value the new value. */
static int bump_counter(struct control_state *st, struct batch *b, const char *key,
                        const char *field, int64_t *value)
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

static int64_t counter_value(struct control_state *st, const char *key, const char *field)
{
	json_t *v = NULL;
	int64_t n;

	kv_json(st, key, &v, NULL);
	n = jint(v, field);
	json_decref(v);
	return n;
}

/* ---- policies ---- */

static void key_of(char *out, size_t len, const char *prefix, const char *name)
{
	snprintf(out, len, "%s%s", prefix, name);
}

int state_policy_put(struct control_state *st, const char *svc, const json_t *doc,
                     int64_t if_match, int64_t *version, struct api_error *ae)
{
	char pkey[STORE_KEY_MAX], skey[STORE_KEY_MAX];
	struct batch b = {0};
	int r = 0;

	key_of(pkey, sizeof(pkey), "policies/", svc);
	key_of(skey, sizeof(skey), "services/", svc);
	for (int attempt = 0; attempt < STATE_RETRIES; attempt++) {
		int64_t prev = 0;

		if (kv_rev(st, pkey, &prev) < 0)
			return store_failed(st, ae, "read", -EIO);
		if (if_match == 0 && prev == 0)
			return api_fail(ae, 412, "If-Match", "there is no policy for %s to match", svc);
		if (if_match > 0 && prev != if_match)
			return api_fail(ae, 412, "If-Match", prev ?
			                "policy %s is at version %lld, not %lld" :
			                "there is no policy for %s (version %lld), not version %lld", svc,
			                (long long)prev, (long long)if_match);
		batch_put(&b, pkey, json_deep_copy(doc), if_match >= 0 ? prev : STORE_REV_ANY);
		if (bump_counter(st, &b, skey, "policy_writes", NULL) < 0) {
			batch_clear(&b);
			return store_failed(st, ae, "read", -EIO);
		}
		r = batch_commit(st, &b, version);
		if (r != -ECANCELED)
			break;
	}
	if (r == -E2BIG)
		return api_fail(ae, 413, "", "the policy is too large to store");
	if (r)
		return store_failed(st, ae, "policy write", r);
	return 0;
}

int state_policy_get(struct control_state *st, const char *svc, json_t **doc, int64_t *version,
                     struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	int r;

	key_of(key, sizeof(key), "policies/", svc);
	r = kv_json(st, key, doc, version);
	if (r == -ENOENT)
		return api_fail(ae, 404, "", "no policy for service %s", svc);
	if (r)
		return store_failed(st, ae, "read", r);
	return 0;
}

int state_policy_delete(struct control_state *st, const char *svc, int64_t if_match,
                        int64_t *revision, struct api_error *ae)
{
	char pkey[STORE_KEY_MAX], skey[STORE_KEY_MAX];
	struct batch b = {0};
	int r = 0;

	key_of(pkey, sizeof(pkey), "policies/", svc);
	key_of(skey, sizeof(skey), "services/", svc);
	for (int attempt = 0; attempt < STATE_RETRIES; attempt++) {
		int64_t prev = 0;

		if (kv_rev(st, pkey, &prev) < 0)
			return store_failed(st, ae, "read", -EIO);
		if (prev == 0)
			return api_fail(ae, 404, "", "no policy for service %s", svc);
		if (if_match > 0 && prev != if_match)
			return api_fail(ae, 412, "If-Match", "policy %s is at version %lld, not %lld", svc,
			                (long long)prev, (long long)if_match);
		batch_del(&b, pkey, prev);
		if (bump_counter(st, &b, skey, "policy_writes", NULL) < 0) {
			batch_clear(&b);
			return store_failed(st, ae, "read", -EIO);
		}
		r = batch_commit(st, &b, revision);
		if (r != -ECANCELED && r != -ENOENT)
			break;
	}
	if (r)
		return store_failed(st, ae, "policy delete", r);
	return 0;
}

int state_policy_list(struct control_state *st, json_t **out, struct api_error *ae)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	json_t *list;
	int r = store_list(st->store, "policies/", &e, &n, NULL);

	if (r)
		return store_failed(st, ae, "list", r);
	list = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(list, json_pack("{s:s, s:I}", "service",
		                                      e[i].key + strlen("policies/"),
		                                      "version", (json_int_t)e[i].revision));
	store_entries_free(e, n);
	*out = json_pack("{s:o}", "policies", list);
	return 0;
}

/* ---- tokens ---- */

int state_token_create(struct control_state *st, const struct api_token_req *r, json_t **out,
                       struct api_error *ae)
{
	unsigned char secret[API_TOKEN_SECRET_BYTES];
	char token[API_TOKEN_MAX], hash[API_SHA256_HEX_LEN], key[STORE_KEY_MAX], t[CA_TIME_LEN];
	struct batch b = {0};
	int64_t now = now_s(), expires = now + r->ttl;
	int ret;

	if (RAND_bytes(secret, sizeof(secret)) != 1)
		return api_fail(ae, 500, "", "no randomness");
	ret = api_token_format(token, sizeof(token), r->service, st->roots[st->signing].pin, secret);
	OPENSSL_cleanse(secret, sizeof(secret));
	if (ret)
		return api_fail(ae, 500, "", "cannot format the token");
	api_sha256_hex(token, strlen(token), hash);
	key_of(key, sizeof(key), "tokens/", hash);
	batch_put(&b, key, json_pack("{s:s, s:I, s:I, s:I}", "service", r->service,
	                             "expires_at", (json_int_t)expires,
	                             "uses_left", (json_int_t)r->uses,
	                             "created_at", (json_int_t)now), 0);
	ret = batch_commit(st, &b, NULL);
	if (ret) {
		OPENSSL_cleanse(token, sizeof(token));
		return store_failed(st, ae, "token write", ret);
	}
	*out = json_pack("{s:s, s:s, s:s, s:I}", "token", token, "service", r->service,
	                 "expires_at", fmt_time(expires, t), "uses", (json_int_t)r->uses);
	OPENSSL_cleanse(token, sizeof(token));
	return 0;
}

/* ---- SVIDs ---- */

static json_t *roots_pem_array(const struct control_state *st)
{
	json_t *a = json_array();

	for (size_t i = 0; i < st->n_roots; i++)
		json_array_append_new(a, json_string(st->roots[i].pem));
	return a;
}

/* Checks the join token for service; fills *tok and *rev (the record). */
static int token_check(struct control_state *st, const char *token, const char *service,
                       const char *key, json_t **tok, int64_t *rev, struct api_error *ae)
{
	char t[CA_TIME_LEN];
	int r = kv_json(st, key, tok, rev);

	if (r == -ENOENT)
		return api_fail(ae, 403, "", "unknown join token");
	if (r)
		return store_failed(st, ae, "read", r);
	if (strcmp(jstr(*tok, "service"), service) != 0)
		return api_fail(ae, 403, "service", "this join token is for service %s, not %s",
		                jstr(*tok, "service"), service);
	if (jint(*tok, "expires_at") <= now_s())
		return api_fail(ae, 403, "", "join token expired at %s",
		                fmt_time(jint(*tok, "expires_at"), t));
	if (jint(*tok, "uses_left") <= 0)
		return api_fail(ae, 403, "", "join token has no uses left");
	(void)token;
	return 0;
}

/* Moves the endpoints registered under old_serial to the new SVID. */
static void migrate_endpoints(struct control_state *st, struct batch *b, const char *svc,
                              const char *old_serial, const char *serial, int64_t not_after)
{
	char prefix[STORE_KEY_MAX];
	struct store_entry *e = NULL;
	size_t n = 0;

	snprintf(prefix, sizeof(prefix), "endpoints/%s/", svc);
	if (store_list(st->store, prefix, &e, &n, NULL) < 0)
		return;
	for (size_t i = 0; i < n && b->n < STATE_PRUNE_CHUNK; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && strcmp(jstr(v, "serial"), old_serial) == 0) {
			json_object_set_new(v, "serial", json_string(serial));
			json_object_set_new(v, "not_after", json_integer(not_after));
			batch_put(b, e[i].key, json_incref(v), e[i].revision);
		}
		json_decref(v);
	}
	store_entries_free(e, n);
}

/* The SHA-256 of pubkey's SubjectPublicKeyInfo (DER) in hex into out
 * (API_SHA256_HEX_LEN bytes). Returns 0 or -ENOMEM. */
static int key_sha256(EVP_PKEY *pubkey, char *out)
{
	unsigned char *der = NULL;
	int len = i2d_PUBKEY(pubkey, &der);

	if (len <= 0)
		return -ENOMEM;
	api_sha256_hex((const char *)der, (size_t)len, out);
	OPENSSL_free(der);
	return 0;
}

/* Whether a child of the certificate *rec already has the key khash: the
 * parent lists its children's keys (child_keys, at most
 * CONTROL_RENEWALS_MAX, all unexpired while the parent is: a child is
 * issued after it, for the same lifetime). */
static bool child_has_key(const json_t *rec, const char *khash)
{
	const json_t *keys = json_object_get(rec, "child_keys"), *v;
	size_t i;

	json_array_foreach(keys, i, v)
		if (json_is_string(v) && strcmp(json_string_value(v), khash) == 0)
			return true;
	return false;
}

/* The record of the certificate a renewal is made with (*rec, *rev): it
 * must exist, have renewals left, and descend from no revoked certificate
 * (another control instance on the store may not know the revocation yet).
 * *retry: a child of it already has the key khash, so this is a proxy
 * retrying after a lost answer; it takes no renewal of the cap, which
 * therefore bounds distinct keys (the lineage cap still counts it). */
static int renewal_check(struct control_state *st, const char *parent, const char *khash,
                         json_t **rec, int64_t *rev, bool *retry, struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	const char *up;
	json_t *anc = NULL;
	int r;

	key_of(key, sizeof(key), "certs/", parent);
	r = kv_json(st, key, rec, rev);
	if (r == -ENOENT)
		return api_fail_code(ae, 403, "unknown_certificate", "", "control has no record of "
		                     "your SVID (serial %s); join again with a token", parent);
	if (r)
		return store_failed(st, ae, "read", r);
	*retry = child_has_key(*rec, khash);
	if (!*retry && jint(*rec, "renewals") >= CONTROL_RENEWALS_MAX)
		return api_fail_code(ae, 403, "renewal_limit", "", "your SVID (serial %s) was "
		                     "already renewed with %d keys, the most one certificate may be; "
		                     "renew with the SVID it gave you, retry with the same key, or "
		                     "join again with a token", parent, CONTROL_RENEWALS_MAX);
	up = json_string_value(json_object_get(*rec, "parent"));
	for (int depth = 0; up && depth < STATE_LINEAGE_DEPTH_MAX; depth++) {
		char serial[CA_SERIAL_HEX_MAX];
		int64_t rrev = 0;

		snprintf(serial, sizeof(serial), "%s", up);
		key_of(key, sizeof(key), "revoked/", serial);
		if (state_is_revoked(st, serial) || (kv_rev(st, key, &rrev) == 0 && rrev > 0)) {
			json_decref(anc);
			return api_fail_code(ae, 403, "ancestor_revoked", "", "your SVID (serial %s) "
			                     "descends from the revoked certificate %s", parent, serial);
		}
		key_of(key, sizeof(key), "certs/", serial);
		json_decref(anc);
		anc = NULL;
		if (kv_json(st, key, &anc, NULL) < 0)
			break;
		up = json_string_value(json_object_get(anc, "parent"));
	}
	json_decref(anc);
	return 0;
}

/* Counts a renewal in the lineage origin (lineages/<origin>: {service,
 * window_start, renewals, not_after}) into b, or refuses it: a lineage
 * renews at most CONTROL_LINEAGE_RENEWALS_MAX times per SVID lifetime,
 * however it branches (the per-certificate cap alone lets a tree of
 * renewals grow 3, 9, 27, ... wide). */
static int lineage_count(struct control_state *st, struct batch *b, const char *origin,
                         const char *service, int64_t now, struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	json_t *v = NULL;
	int64_t rev = 0, start, n;
	int r;

	key_of(key, sizeof(key), "lineages/", origin);
	r = kv_json(st, key, &v, &rev);
	if (r == -EIO)
		return store_failed(st, ae, "read", r);
	start = jint(v, "window_start");
	n = jint(v, "renewals");
	if (!v || now - start >= st->o.svid_ttl) {
		start = now;
		n = 0;
	}
	if (n >= CONTROL_LINEAGE_RENEWALS_MAX) {
		char t[CA_TIME_LEN];

		json_decref(v);
		return api_fail_code(ae, 403, "lineage_limit", "", "the SVIDs descending from the "
		                     "join of %s renewed %d times since %s, the most per SVID "
		                     "lifetime; retry later, or join again with a token", origin,
		                     CONTROL_LINEAGE_RENEWALS_MAX, fmt_time(start, t));
	}
	json_decref(v);
	/* not_after: no SVID of the lineage outlives it, so it is pruned then. */
	batch_put(b, key, json_pack("{s:s, s:I, s:I, s:I}", "service", service,
	                            "window_start", (json_int_t)start, "renewals", (json_int_t)n + 1,
	                            "not_after", (json_int_t)(now + st->o.svid_ttl)), rev);
	return 0;
}

int state_svid_issue(struct control_state *st, const char *service, const char *token,
                     const char *renew_serial, EVP_PKEY *pubkey, json_t **out,
                     struct api_error *ae)
{
	const struct state_root *root = &st->roots[st->signing];
	char key[STORE_KEY_MAX], hash[API_SHA256_HEX_LEN], serial[CA_SERIAL_HEX_MAX];
	char id[SPIFFE_ID_MAX + 1], t[CA_TIME_LEN], pkey[STORE_KEY_MAX];
	char origin[CA_SERIAL_HEX_MAX] = "", khash[API_SHA256_HEX_LEN];
	struct meshlet_err e = {0};
	struct batch b = {0};
	int64_t not_after = 0, now = now_s();
	X509 *cert = NULL;
	char *pem = NULL;
	int r = 0;

	if (identity_format(id, sizeof(id), st->td, service) < 0)
		return api_fail(ae, 400, "service", "not a service name");
	if (token) {
		api_sha256_hex(token, strlen(token), hash);
		key_of(key, sizeof(key), "tokens/", hash);
	}
	if (key_sha256(pubkey, khash) < 0)
		return api_fail(ae, 500, "", "out of memory");
	for (int attempt = 0; attempt < STATE_RETRIES; attempt++) {
		json_t *tok = NULL, *prec = NULL;
		int64_t trev = 0, prev = 0;
		bool retry = false;

		if (token) {
			r = token_check(st, token, service, key, &tok, &trev, ae);
			if (r) {
				json_decref(tok);
				return r;
			}
			json_object_set_new(tok, "uses_left", json_integer(jint(tok, "uses_left") - 1));
			batch_put(&b, key, tok, trev);
		} else if (renew_serial) {
			/* The renewal is counted in the same write that records the
			 * child: concurrent renewals race on the parent's revision. */
			r = renewal_check(st, renew_serial, khash, &prec, &prev, &retry, ae);
			if (r) {
				json_decref(prec);
				return r;
			}
			/* Records from before lineages were kept: the parent starts one. */
			snprintf(origin, sizeof(origin), "%s", json_string_value(json_object_get(
			         prec, "origin")) ? jstr(prec, "origin") : renew_serial);
			r = lineage_count(st, &b, origin, service, now, ae);
			if (r) {
				batch_clear(&b);
				json_decref(prec);
				return r;
			}
			if (!retry) {
				json_t *keys = json_object_get(prec, "child_keys");

				if (!json_is_array(keys)) {
					keys = json_array();
					json_object_set_new(prec, "child_keys", keys);
				}
				json_array_append_new(keys, json_string(khash));
				json_object_set_new(prec, "renewals",
				                    json_integer(jint(prec, "renewals") + 1));
			}
			/* A retry still writes the parent: its revision orders it
			 * against a concurrent renewal with a new key. */
			key_of(pkey, sizeof(pkey), "certs/", renew_serial);
			batch_put(&b, pkey, prec, prev);
		}
		X509_free(cert);
		cert = NULL;
		r = ca_issue_svid(root->ca, service, pubkey, st->o.svid_ttl, &cert, serial, &e);
		if (r) {
			batch_clear(&b);
			if (r == -EINVAL)
				return api_fail(ae, 400, "csr", "%s", e.message);
			return api_fail(ae, 500, "", "cannot issue: %s", e.message);
		}
		ca_cert_not_after(cert, &not_after);
		{
			char ckey[STORE_KEY_MAX];
			key_of(ckey, sizeof(ckey), "certs/", serial);
			batch_put(&b, ckey, json_pack("{s:s, s:I, s:I, s:i, s:s, s:s?, s:i, s:s, s:s}",
			                              "service", service,
			                              "not_after", (json_int_t)not_after,
			                              "issued_at", (json_int_t)now, "root", root->id,
			                              "via", token ? "token" : "svid",
			                              "parent", token ? NULL : renew_serial,
			                              "renewals", 0,
			                              "origin", origin[0] ? origin : serial,
			                              "key_sha256", khash), 0);
		}
		if (renew_serial)
			migrate_endpoints(st, &b, service, renew_serial, serial, not_after);
		r = batch_commit(st, &b, NULL);
		if (r != -ECANCELED)
			break;
	}
	if (r) {
		X509_free(cert);
		return store_failed(st, ae, "certificate record", r);
	}
	if (renew_serial) {
		struct state_proxy *p = proxy_find(st, renew_serial), *np;
		if (p && (np = proxy_add(st, serial, service)) != NULL) {
			memcpy(np->address, p->address, sizeof(np->address));
			np->ports = json_incref(p->ports);
			np->held = p->held;
			np->bundle_rev = p->bundle_rev;
			np->last_seen = now;
			np->not_after = not_after;
			np->dirty = true;
			proxy_gone(st, p->serial);
			proxy_unlink(st, p);
		}
	}
	pem = ca_pem_encode(&cert, 1);
	X509_free(cert);
	if (!pem)
		return api_fail(ae, 500, "", "out of memory");
	*out = json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:I}", "cert_chain", pem,
	                 "serial", serial, "expires_at", fmt_time(not_after, t), "spiffe_id", id,
	                 "trust_domain", st->td, "bundle", roots_pem_array(st),
	                 "bundle_version", (json_int_t)counter_value(st, "meta/bundle", "version"));
	free(pem);
	log_info("issued SVID %s serial %s until %s (%s)", id, serial, t,
	         token ? "join token" : "renewal");
	return 0;
}

/* ---- bundle and config ---- */

json_t *state_bundle(struct control_state *st)
{
	json_t *revoked = json_array();

	for (size_t i = 0; i < st->n_revoked; i++)
		json_array_append_new(revoked, json_string(st->revoked[i]));
	return json_pack("{s:s, s:o, s:o, s:I}", "trust_domain", st->td,
	                 "roots", roots_pem_array(st), "revoked", revoked,
	                 "version", (json_int_t)counter_value(st, "meta/bundle", "version"));
}

int state_config_version_shared(struct control_state *st, int64_t *version)
{
	static const char *const shared[] = {"meta/bundle", "meta/endpoints", "meta/rotate-all"};
	int64_t v = 0, rev;

	for (size_t i = 0; i < sizeof(shared) / sizeof(shared[0]); i++) {
		if (kv_rev(st, shared[i], &rev) < 0)
			return -EIO;
		if (rev > v)
			v = rev;
	}
	*version = v;
	return 0;
}

int state_config_version_own(struct control_state *st, const char *svc, int64_t *version)
{
	char key[STORE_KEY_MAX];

	key_of(key, sizeof(key), "services/", svc);
	return kv_rev(st, key, version);
}

int state_config_version(struct control_state *st, const char *svc, int64_t *version)
{
	int64_t shared = 0, own = 0;

	if (state_config_version_shared(st, &shared) < 0 ||
	    state_config_version_own(st, svc, &own) < 0)
		return -EIO;
	*version = shared > own ? shared : own;
	return 0;
}

/* ---- registry ----
 *
 * An entry endpoints/<svc>/<addr> claims, on the IP of <addr>, the port of
 * <addr> (the inbound listener) and its application ports (what
 * transparent sidecars map to <svc>). Entries of different services never
 * claim a common ip:port while both are live, so that a destination maps
 * to one service or to none. */

/* The <svc> of an endpoints/<svc>/<addr> key into name (SERVICE_NAME_MAX + 1). */
static bool endpoint_key_service(const char *key, char *name)
{
	const char *svc = key + strlen("endpoints/");
	const char *slash = strchr(svc, '/');

	if (!slash || slash == svc || (size_t)(slash - svc) > SERVICE_NAME_MAX)
		return false;
	memcpy(name, svc, (size_t)(slash - svc));
	name[slash - svc] = '\0';
	return true;
}

/* Its SVID is unexpired and unrevoked. */
static bool endpoint_live(struct control_state *st, const json_t *v, int64_t now)
{
	return jint(v, "not_after") > now && !state_is_revoked(st, jstr(v, "serial"));
}

/* port is the entry's address port or one of its application ports. */
static bool entry_claims_port(const json_t *v, uint16_t addr_port, uint16_t port)
{
	size_t i;
	json_t *p;

	if (port == addr_port)
		return true;
	json_array_foreach(json_object_get(v, "ports"), i, p) {
		if (json_integer_value(p) == port)
			return true;
	}
	return false;
}

/* The entry v and address a with its application ports claim a common ip:port. */
static bool claims_overlap(const json_t *v, const struct api_addr *a, const uint16_t *ports,
                           size_t n_ports)
{
	struct api_addr b;

	if (api_addr_parse(jstr(v, "address"), false, &b) < 0 || !api_addr_same_ip(a, &b))
		return false;
	if (entry_claims_port(v, b.port, a->port))
		return true;
	for (size_t i = 0; i < n_ports; i++) {
		if (entry_claims_port(v, b.port, ports[i]))
			return true;
	}
	return false;
}

/* What a registration finds in the registry. */
struct reg_scan {
	json_t *cur;                   /* the entry at the same key, or NULL */
	int64_t cur_rev;
	bool cur_live;
	size_t n_service;              /* live entries of svc, cur excluded */
	size_t n_instance;             /* live entries of the serial, cur excluded */
	char holder[SERVICE_NAME_MAX + 1];   /* a live other service claiming the same */
	char held[API_ADDRESS_MAX];          /* its address */
};

static int registry_scan(struct control_state *st, const char *svc, const char *serial,
                         const char *key, const struct api_addr *a, const uint16_t *ports,
                         size_t n_ports, struct reg_scan *sc)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = now_s();
	int r = store_list(st->store, "endpoints/", &e, &n, NULL);

	memset(sc, 0, sizeof(*sc));
	if (r)
		return r;
	for (size_t i = 0; i < n; i++) {
		char name[SERVICE_NAME_MAX + 1];
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		bool live = v && endpoint_live(st, v, now);

		if (!v || !endpoint_key_service(e[i].key, name)) {
			json_decref(v);
			continue;
		}
		if (strcmp(e[i].key, key) == 0) {
			sc->cur = v;
			sc->cur_rev = e[i].revision;
			sc->cur_live = live;
			continue;
		}
		if (live && strcmp(name, svc) == 0) {
			sc->n_service++;
			if (strcmp(jstr(v, "serial"), serial) == 0)
				sc->n_instance++;
		} else if (live && !sc->holder[0] && claims_overlap(v, a, ports, n_ports)) {
			snprintf(sc->holder, sizeof(sc->holder), "%s", name);
			snprintf(sc->held, sizeof(sc->held), "%s", jstr(v, "address"));
		}
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* Another service's admin assignment on a claimed ip:port: its name into
 * holder/held. Returns 0 or -EIO. */
static int assignment_conflict(struct control_state *st, const char *svc,
                               const struct api_addr *a, const uint16_t *ports, size_t n_ports,
                               struct reg_scan *sc)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int r = store_list(st->store, "assigned/", &e, &n, NULL);

	if (r)
		return -EIO;
	for (size_t i = 0; i < n && !sc->holder[0]; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		json_t *probe = v ? json_pack("{s:s, s:[]}", "address", jstr(v, "address"),
		                              "ports") : NULL;

		if (probe && strcmp(jstr(v, "service"), svc) != 0 &&
		    claims_overlap(probe, a, ports, n_ports)) {
			snprintf(sc->holder, sizeof(sc->holder), "%s", jstr(v, "service"));
			snprintf(sc->held, sizeof(sc->held), "%s", jstr(v, "address"));
		}
		json_decref(probe);
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* {"address", "ports"} of an entry, as the config answer carries it. */
static json_t *endpoint_answer(const json_t *v)
{
	json_t *ports = json_object_get(v, "ports");

	return json_pack("{s:s, s:O}", "address", jstr(v, "address"), "ports",
	                 json_is_array(ports) ? ports : json_array());
}

/* {svc: [{address, ports}]} of the live entries of the services q asks for. */
static int endpoints_json(struct control_state *st, const struct api_config_query *q,
                          json_t **out)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = now_s();
	json_t *all = json_object();
	int r = all ? 0 : -ENOMEM;

	*out = all;
	if (r || (!q->upstreams_all && q->n_upstreams == 0))
		return r;
	r = store_list(st->store, "endpoints/", &e, &n, NULL);
	if (r) {
		json_decref(all);
		*out = NULL;
		return r;
	}
	for (size_t i = 0; i < n; i++) {
		char name[SERVICE_NAME_MAX + 1];
		json_t *v, *list;

		if (!endpoint_key_service(e[i].key, name) || !api_config_query_wants(q, name))
			continue;
		v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (!v || !endpoint_live(st, v, now)) {
			json_decref(v);
			continue;
		}
		list = json_object_get(all, name);
		if (!list) {
			list = json_array();
			json_object_set_new(all, name, list);
		}
		json_array_append_new(list, endpoint_answer(v));
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

int state_config(struct control_state *st, const char *svc, const struct api_config_query *q,
                 json_t **out, struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	json_t *policy = NULL, *eps = NULL;
	int64_t version = 0, pver = 0, gen;
	int r;

	if (state_config_version(st, svc, &version) < 0)
		return store_failed(st, ae, "read", -EIO);
	key_of(key, sizeof(key), "policies/", svc);
	r = kv_json(st, key, &policy, &pver);
	if (r == -EIO)
		return store_failed(st, ae, "read", r);
	key_of(key, sizeof(key), "services/", svc);
	gen = counter_value(st, key, "cert_generation") +
	      counter_value(st, "meta/rotate-all", "cert_generation");
	r = endpoints_json(st, q, &eps);
	if (r) {
		json_decref(policy);
		return store_failed(st, ae, "list", r);
	}
	*out = json_pack("{s:s, s:I, s:o?, s:I, s:I, s:I, s:o}", "service", svc,
	                 "version", (json_int_t)version, "policy", policy ? policy : json_null(),
	                 "policy_version", (json_int_t)pver,
	                 "bundle_version", (json_int_t)counter_value(st, "meta/bundle", "version"),
	                 "cert_generation", (json_int_t)gen, "endpoints", eps);
	return 0;
}

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Bumps meta/endpoints now: every config version moves. 0 or -errno. */
static int endpoints_bump(struct control_state *st)
{
	struct batch b = {0};
	int r = -ECANCELED;

	for (int attempt = 0; attempt < STATE_RETRIES && r == -ECANCELED; attempt++) {
		r = bump_counter(st, &b, "meta/endpoints", "version", NULL);
		if (!r)
			r = batch_commit(st, &b, NULL);
		batch_clear(&b);
	}
	if (r) {
		log_error("store: cannot bump the endpoints version: %s", strerror(-r));
		return r;
	}
	st->endpoints_pending = false;
	st->endpoints_bumped_ms = mono_ms();
	return 0;
}

int64_t state_endpoints_touch(struct control_state *st)
{
	int64_t left;

	if (!st->endpoints_pending)
		return -1;
	left = st->endpoints_bumped_ms + CONTROL_ENDPOINTS_COALESCE_MS - mono_ms();
	if (left <= 0 && !st->endpoints_timer)
		return endpoints_bump(st) == 0 ? 0 : -1;
	if (st->endpoints_timer)
		return -1;
	st->endpoints_timer = true;
	return left > 0 ? left : 1;
}

bool state_endpoints_flush(struct control_state *st)
{
	st->endpoints_timer = false;
	return st->endpoints_pending && endpoints_bump(st) == 0;
}

/* Registrations written before a crash, whose bump was still pending:
 * an entry newer than meta/endpoints. Bumped at start. */
static void endpoints_repair(struct control_state *st)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t bumped = 0, newest = 0;

	if (kv_rev(st, "meta/endpoints", &bumped) < 0 ||
	    store_list(st->store, "endpoints/", &e, &n, NULL) < 0)
		return;
	for (size_t i = 0; i < n; i++) {
		if (e[i].revision > newest)
			newest = e[i].revision;
	}
	store_entries_free(e, n);
	if (newest > bumped)
		endpoints_bump(st);
}

/* May svc's proxy, connecting from remote, register a? Sets *via. */
static int endpoint_allowed(struct control_state *st, const char *svc, const struct api_addr *a,
                            const char *address, const char *remote, const char **via,
                            struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	struct api_addr from;
	json_t *asg = NULL;
	int r;

	key_of(key, sizeof(key), "assigned/", address);
	r = kv_json(st, key, &asg, NULL);
	if (r == -EIO)
		return store_failed(st, ae, "read", r);
	if (asg) {
		char holder[SERVICE_NAME_MAX + 1];

		snprintf(holder, sizeof(holder), "%s", jstr(asg, "service"));
		json_decref(asg);
		if (strcmp(holder, svc) != 0)
			return api_fail(ae, 409, "address", "%s is assigned to service %s by the admin",
			                address, holder);
		*via = "assignment";
		return 0;
	}
	if (!remote || api_addr_parse(remote, true, &from) < 0 || !api_addr_same_ip(a, &from))
		return api_fail(ae, 403, "address", "a proxy may register only addresses on the IP it "
		                "connects to control from (%s); an administrator may assign %s to %s "
		                "with: meshletctl endpoints add --service %s %s",
		                remote ? remote : "unknown", address, svc, svc, address);
	*via = "connection";
	return 0;
}

/* The caps of a new entry; 0 or the refusal. */
static int endpoint_caps(struct control_state *st, const struct reg_scan *sc, const char *svc,
                         const char *serial, struct api_error *ae)
{
	bool new_for_service = !(sc->cur && sc->cur_live);
	bool new_for_instance = new_for_service || strcmp(jstr(sc->cur, "serial"), serial) != 0;

	if (new_for_instance && sc->n_instance >= CONTROL_ENDPOINTS_PER_INSTANCE)
		return api_fail(ae, 429, "address", "this proxy (SVID %s) already has %d registry "
		                "entries, the limit per instance", serial, CONTROL_ENDPOINTS_PER_INSTANCE);
	if (new_for_service && (int64_t)sc->n_service >= st->max_endpoints)
		return api_fail(ae, 429, "address", "service %s already has %lld registry entries, the "
		                "limit per service (meshlet-control --max-endpoints-per-service)", svc,
		                (long long)st->max_endpoints);
	return 0;
}

int state_endpoint_register(struct control_state *st, const char *svc,
                            const struct api_endpoint_req *r, const char *serial,
                            int64_t not_after, const char *remote, json_t **out,
                            struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	struct batch b = {0};
	struct reg_scan sc = {0};
	struct api_addr a;
	json_t *ports = json_array();
	struct state_proxy *p;
	const char *via = NULL;
	bool visible = false;
	int64_t version = 0;
	int ret = 0;

	if (!ports || api_addr_parse(r->address, false, &a) < 0) {
		json_decref(ports);
		return api_fail(ae, 400, "address", "must be ip:port");
	}
	for (size_t i = 0; i < r->n_ports; i++)
		json_array_append_new(ports, json_integer(r->ports[i]));
	snprintf(key, sizeof(key), "endpoints/%s/%s", svc, r->address);
	ret = endpoint_allowed(st, svc, &a, r->address, remote, &via, ae);
	for (int attempt = 0; !ret && attempt < STATE_RETRIES; attempt++) {
		json_decref(sc.cur);
		if (registry_scan(st, svc, serial, key, &a, r->ports, r->n_ports, &sc) < 0 ||
		    assignment_conflict(st, svc, &a, r->ports, r->n_ports, &sc) < 0) {
			ret = store_failed(st, ae, "list", -EIO);
			break;
		}
		if (sc.holder[0]) {
			ret = api_fail(ae, 409, "address", "%s or one of its application ports is held by "
			               "service %s (%s)", r->address, sc.holder, sc.held);
			break;
		}
		visible = !sc.cur || !sc.cur_live || !json_equal(json_object_get(sc.cur, "ports"), ports);
		/* Re-registering the same thing changes nothing: no write, no bump. */
		if (!visible && strcmp(jstr(sc.cur, "serial"), serial) == 0 &&
		    strcmp(jstr(sc.cur, "via"), via) == 0)
			break;
		if ((ret = endpoint_caps(st, &sc, svc, serial, ae)) != 0)
			break;
		batch_put(&b, key, json_pack("{s:s, s:O, s:s, s:I, s:I, s:s}", "address", r->address,
		                             "ports", ports, "serial", serial,
		                             "not_after", (json_int_t)not_after,
		                             "registered_at", (json_int_t)now_s(), "via", via),
		          sc.cur ? sc.cur_rev : 0);
		ret = batch_commit(st, &b, NULL);
		if (ret == -ECANCELED)
			continue;
		if (ret)
			ret = store_failed(st, ae, "endpoint write", ret);
		else if (visible)
			st->endpoints_pending = true;
		break;
	}
	json_decref(sc.cur);
	if (ret) {
		json_decref(ports);
		return ret;
	}
	p = proxy_find(st, serial);
	if (!p)
		p = proxy_add(st, serial, svc);
	if (p) {
		snprintf(p->address, sizeof(p->address), "%s", r->address);
		json_decref(p->ports);
		p->ports = json_incref(ports);
		p->not_after = not_after;
		p->last_seen = now_s();
		p->dirty = true;
	}
	state_config_version(st, svc, &version);
	*out = json_pack("{s:s, s:s, s:o, s:I}", "service", svc, "address", r->address,
	                 "ports", ports, "version", (json_int_t)version);
	return 0;
}

/* ---- admin assignments ---- */

int state_endpoint_assign(struct control_state *st, const struct api_assign_req *r,
                          json_t **out, struct api_error *ae)
{
	char key[STORE_KEY_MAX], t[CA_TIME_LEN];
	struct batch b = {0};
	struct reg_scan sc = {0};
	struct api_addr a;
	json_t *cur = NULL;
	int64_t rev = 0, now = now_s();
	int ret;

	if (api_addr_parse(r->address, false, &a) < 0)
		return api_fail(ae, 400, "address", "must be ip:port");
	key_of(key, sizeof(key), "assigned/", r->address);
	ret = kv_json(st, key, &cur, &rev);
	if (ret == -EIO)
		return store_failed(st, ae, "read", ret);
	if (cur) {
		char holder[SERVICE_NAME_MAX + 1];
		int64_t at = jint(cur, "assigned_at");

		snprintf(holder, sizeof(holder), "%s", jstr(cur, "service"));
		json_decref(cur);
		if (strcmp(holder, r->service) != 0)
			return api_fail(ae, 409, "address", "%s is assigned to service %s; remove that "
			                "first (meshletctl endpoints remove --service %s %s)", r->address,
			                holder, holder, r->address);
		*out = json_pack("{s:s, s:s, s:s}", "service", r->service, "address", r->address,
		                 "assigned_at", fmt_time(at, t));
		return 0;
	}
	/* Another live service's entry on it: refused, as a registration would be. */
	if (registry_scan(st, r->service, "", "", &a, NULL, 0, &sc) < 0)
		return store_failed(st, ae, "list", -EIO);
	json_decref(sc.cur);
	if (sc.holder[0])
		return api_fail(ae, 409, "address", "%s is held by a live entry of service %s (%s)",
		                r->address, sc.holder, sc.held);
	batch_put(&b, key, json_pack("{s:s, s:s, s:I}", "service", r->service, "address",
	                             r->address, "assigned_at", (json_int_t)now), 0);
	ret = batch_commit(st, &b, NULL);
	if (ret == -ECANCELED)
		return api_fail(ae, 409, "address", "%s was assigned concurrently; retry", r->address);
	if (ret)
		return store_failed(st, ae, "assignment write", ret);
	log_info("admin assigned %s to service %s", r->address, r->service);
	*out = json_pack("{s:s, s:s, s:s}", "service", r->service, "address", r->address,
	                 "assigned_at", fmt_time(now, t));
	return 0;
}

int state_endpoint_unassign(struct control_state *st, const struct api_assign_req *r,
                            json_t **out, struct api_error *ae)
{
	char akey[STORE_KEY_MAX], ekey[STORE_KEY_MAX];
	struct batch b = {0};
	json_t *cur = NULL, *entry = NULL;
	int64_t arev = 0, erev = 0;
	bool drop;
	int ret;

	key_of(akey, sizeof(akey), "assigned/", r->address);
	snprintf(ekey, sizeof(ekey), "endpoints/%s/%s", r->service, r->address);
	ret = kv_json(st, akey, &cur, &arev);
	if (ret == -ENOENT)
		return api_fail(ae, 404, "address", "%s is not assigned to any service", r->address);
	if (ret)
		return store_failed(st, ae, "read", ret);
	if (strcmp(jstr(cur, "service"), r->service) != 0) {
		ret = api_fail(ae, 409, "service", "%s is assigned to service %s, not %s", r->address,
		               jstr(cur, "service"), r->service);
		json_decref(cur);
		return ret;
	}
	json_decref(cur);
	ret = kv_json(st, ekey, &entry, &erev);
	if (ret == -EIO)
		return store_failed(st, ae, "read", ret);
	/* The registration the assignment allowed goes with it. */
	drop = entry && strcmp(jstr(entry, "via"), "assignment") == 0;
	json_decref(entry);
	batch_del(&b, akey, arev);
	if (drop)
		batch_del(&b, ekey, erev);
	ret = batch_commit(st, &b, NULL);
	if (ret == -ECANCELED || ret == -ENOENT)
		return api_fail(ae, 409, "address", "%s changed concurrently; retry", r->address);
	if (ret)
		return store_failed(st, ae, "assignment delete", ret);
	if (drop)
		endpoints_bump(st);
	log_info("admin removed the assignment of %s to service %s%s", r->address, r->service,
	         drop ? " and its registry entry" : "");
	*out = json_pack("{s:s, s:s, s:b, s:b}", "service", r->service, "address", r->address,
	                 "removed", 1, "entry_removed", drop);
	return 0;
}

int state_endpoints_list(struct control_state *st, json_t **out, struct api_error *ae)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = now_s();
	json_t *eps = json_array(), *asg = json_array();
	int r = store_list(st->store, "endpoints/", &e, &n, NULL);

	if (r) {
		json_decref(eps);
		json_decref(asg);
		return store_failed(st, ae, "list", r);
	}
	for (size_t i = 0; i < n; i++) {
		char name[SERVICE_NAME_MAX + 1], t1[CA_TIME_LEN], t2[CA_TIME_LEN];
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);

		if (v && endpoint_key_service(e[i].key, name))
			json_array_append_new(eps, json_pack(
				"{s:s, s:s, s:O, s:s, s:s, s:s, s:s, s:b}", "service", name,
				"address", jstr(v, "address"), "ports", json_object_get(v, "ports"),
				"via", json_object_get(v, "via") ? jstr(v, "via") : "connection",
				"serial", jstr(v, "serial"),
				"registered_at", fmt_time(jint(v, "registered_at"), t1),
				"expires_at", fmt_time(jint(v, "not_after"), t2),
				"live", endpoint_live(st, v, now)));
		json_decref(v);
	}
	store_entries_free(e, n);
	e = NULL;
	n = 0;
	r = store_list(st->store, "assigned/", &e, &n, NULL);
	for (size_t i = 0; !r && i < n; i++) {
		char t[CA_TIME_LEN];
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);

		if (v)
			json_array_append_new(asg, json_pack("{s:s, s:s, s:s}", "service",
			                                     jstr(v, "service"), "address",
			                                     jstr(v, "address"), "assigned_at",
			                                     fmt_time(jint(v, "assigned_at"), t)));
		json_decref(v);
	}
	store_entries_free(e, n);
	if (r) {
		json_decref(eps);
		json_decref(asg);
		return store_failed(st, ae, "list", r);
	}
	*out = json_pack("{s:o, s:o}", "endpoints", eps, "assignments", asg);
	return 0;
}

void state_proxy_seen(struct control_state *st, const char *serial, const char *svc,
                      int64_t not_after, int64_t held, int polling)
{
	struct state_proxy *p = proxy_find(st, serial);

	if (!p)
		p = proxy_add(st, serial, svc);
	if (!p)
		return;
	p->not_after = not_after;
	p->last_seen = now_s();
	if (held >= 0)
		p->held = held;
	p->polling += polling;
	if (p->polling < 0)
		p->polling = 0;
	p->dirty = true;
}

void state_proxy_bundle_fetched(struct control_state *st, const char *serial)
{
	struct state_proxy *p = proxy_find(st, serial);
	int64_t rev = 0;

	if (p && kv_rev(st, "meta/bundle", &rev) == 0)
		p->bundle_rev = rev;
}

static int cmp_proxy(const void *a, const void *b)
{
	const struct state_proxy *x = *(struct state_proxy *const *)a;
	const struct state_proxy *y = *(struct state_proxy *const *)b;
	int c = strcmp(x->service, y->service);

	return c ? c : strcmp(x->address, y->address);
}

json_t *state_proxies(struct control_state *st)
{
	json_t *list = json_array();
	struct state_proxy **v;
	size_t n = 0, i = 0;
	int64_t now = now_s();

	for (struct state_proxy *p = st->proxies; p; p = p->next)
		n++;
	v = calloc(n ? n : 1, sizeof(*v));
	if (!v)
		return json_pack("{s:o}", "proxies", list);
	for (struct state_proxy *p = st->proxies; p; p = p->next)
		v[i++] = p;
	qsort(v, n, sizeof(*v), cmp_proxy);
	for (i = 0; i < n; i++) {
		struct state_proxy *p = v[i];
		char id[SPIFFE_ID_MAX + 1] = "", seen[CA_TIME_LEN], exp[CA_TIME_LEN];
		int64_t current = 0;

		if (p->not_after <= now && p->polling == 0)
			continue;
		identity_format(id, sizeof(id), st->td, p->service);
		state_config_version(st, p->service, &current);
		json_array_append_new(list, json_pack(
			"{s:s, s:s, s:s?, s:O?, s:s, s:s, s:s, s:I, s:I, s:b, s:b}",
			"service", p->service, "spiffe_id", id,
			"address", p->address[0] ? p->address : NULL, "ports", p->ports,
			"last_seen", fmt_time(p->last_seen, seen), "cert_serial", p->serial,
			"cert_expires_at", fmt_time(p->not_after, exp),
			"config_version", (json_int_t)p->held, "current_version", (json_int_t)current,
			"connected", p->polling > 0, "up_to_date", p->held >= current));
	}
	free(v);
	return json_pack("{s:o}", "proxies", list);
}

/* ---- certificates ---- */

int state_certs_list(struct control_state *st, json_t **out, struct api_error *ae)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = now_s();
	json_t *list;
	int r = store_list(st->store, "certs/", &e, &n, NULL);

	if (r)
		return store_failed(st, ae, "list", r);
	list = json_array();
	for (size_t i = 0; i < n; i++) {
		const char *serial = e[i].key + strlen("certs/");
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		char id[SPIFFE_ID_MAX + 1] = "", t1[CA_TIME_LEN], t2[CA_TIME_LEN];

		if (v && jint(v, "not_after") > now) {
			identity_format(id, sizeof(id), st->td, jstr(v, "service"));
			json_array_append_new(list, json_pack(
				"{s:s, s:s, s:s, s:s, s:s, s:b, s:i, s:s, s:O?, s:I}", "serial", serial,
				"service", jstr(v, "service"), "spiffe_id", id,
				"issued_at", fmt_time(jint(v, "issued_at"), t1),
				"expires_at", fmt_time(jint(v, "not_after"), t2),
				"revoked", state_is_revoked(st, serial), "root", (int)jint(v, "root"),
				"via", jstr(v, "via"), "parent", json_object_get(v, "parent"),
				"renewals", (json_int_t)jint(v, "renewals")));
			json_object_set_new(json_array_get(list, json_array_size(list) - 1), "lineage",
			                    json_string(json_string_value(json_object_get(v, "origin")) ?
			                                jstr(v, "origin") : serial));
		}
		json_decref(v);
	}
	store_entries_free(e, n);
	*out = json_pack("{s:o}", "certs", list);
	return 0;
}

int state_certs_rotate(struct control_state *st, const struct api_rotate_req *r, json_t **out,
                       struct api_error *ae)
{
	char key[STORE_KEY_MAX];
	struct batch b = {0};
	int64_t gen = 0, rev = 0;
	int ret = 0;

	if (r->service)
		key_of(key, sizeof(key), "services/", r->service);
	else
		snprintf(key, sizeof(key), "meta/rotate-all");
	for (int attempt = 0; attempt < STATE_RETRIES; attempt++) {
		if (bump_counter(st, &b, key, "cert_generation", &gen) < 0)
			return store_failed(st, ae, "read", -EIO);
		ret = batch_commit(st, &b, &rev);
		if (ret != -ECANCELED)
			break;
	}
	if (ret)
		return store_failed(st, ae, "rotate", ret);
	log_info("certificate rotation requested for %s", r->service ? r->service : "all services");
	*out = json_pack("{s:s?, s:b, s:I, s:I}", "service", r->service, "all", r->all,
	                 "generation", (json_int_t)gen, "version", (json_int_t)rev);
	return 0;
}

/* Unexpired certificates descending from serial (children, their
 * children, ...), not yet revoked, into *out (a new array of serials). */
static int descendants(struct control_state *st, const char *serial, json_t **out)
{
	struct store_entry *e = NULL;
	size_t n = 0, done = 0;
	int64_t now = now_s();
	json_t *parents, *found = json_array(), *queue = json_array();
	int r = store_list(st->store, "certs/", &e, &n, NULL);

	*out = NULL;
	if (r || !found || !queue) {
		json_decref(found);
		json_decref(queue);
		return r ? r : -ENOMEM;
	}
	/* serial -> parent of every unexpired record */
	parents = json_object();
	for (size_t i = 0; i < n && parents; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		const char *p = json_string_value(json_object_get(v, "parent"));

		if (p && jint(v, "not_after") > now)
			json_object_set_new(parents, e[i].key + strlen("certs/"), json_string(p));
		json_decref(v);
	}
	store_entries_free(e, n);
	json_array_append_new(queue, json_string(serial));
	/* Breadth first; each record has one parent, so nothing is seen twice. */
	while (parents && done < json_array_size(queue)) {
		const char *cur = json_string_value(json_array_get(queue, done++)), *child;
		json_t *p;

		json_object_foreach(parents, child, p) {
			if (strcmp(json_string_value(p), cur) != 0)
				continue;
			json_array_append_new(queue, json_string(child));
			if (!state_is_revoked(st, child))
				json_array_append_new(found, json_string(child));
		}
	}
	r = parents ? 0 : -ENOMEM;
	json_decref(parents);
	json_decref(queue);
	if (r)
		json_decref(found);
	else
		*out = found;
	return r;
}

/* Adds the revocation record of serial (its certificate record cert). */
static void revoke_put(struct batch *b, const char *serial, const json_t *cert, int64_t now)
{
	char key[STORE_KEY_MAX];

	key_of(key, sizeof(key), "revoked/", serial);
	batch_put(b, key, json_pack("{s:s, s:I, s:I}", "service", jstr(cert, "service"),
	                            "not_after", (json_int_t)jint(cert, "not_after"),
	                            "revoked_at", (json_int_t)now), STORE_REV_ANY);
}

/* Writes the revocations of serial and of desc (serials) with one bundle
 * version bump. One atomic write when they fit in a batch; otherwise the
 * descendants go first, in chunks, and serial with the last one, so that a
 * failure part-way leaves serial unrevoked and the call can be repeated. */
static int revoke_write(struct control_state *st, const char *serial, const json_t *cert,
                        const json_t *desc, int64_t *version)
{
	struct batch b = {0};
	size_t n = json_array_size(desc), i = 0;
	int64_t now = now_s();
	int r = 0;

	for (;;) {
		for (; i < n && b.n < STORE_BATCH_MAX - 2; i++) {
			const char *s = json_string_value(json_array_get(desc, i));
			char key[STORE_KEY_MAX];
			json_t *v = NULL;

			key_of(key, sizeof(key), "certs/", s);
			if (kv_json(st, key, &v, NULL) == 0)
				revoke_put(&b, s, v, now);
			json_decref(v);
		}
		if (i == n && serial)
			revoke_put(&b, serial, cert, now);
		if (bump_counter(st, &b, "meta/bundle", "version", version) < 0) {
			batch_clear(&b);
			return -EIO;
		}
		r = batch_commit(st, &b, NULL);
		if (r || i == n)
			return r;
	}
}

int state_certs_revoke(struct control_state *st, const char *serial, json_t **out,
                       struct api_error *ae)
{
	char ckey[STORE_KEY_MAX], t[CA_TIME_LEN];
	json_t *cert = NULL, *desc = NULL;
	int64_t version = 0;
	bool self = false;
	int r;

	key_of(ckey, sizeof(ckey), "certs/", serial);
	r = kv_json(st, ckey, &cert, NULL);
	if (r == -ENOENT)
		return api_fail(ae, 404, "serial", "no unexpired certificate with serial %s was issued",
		                serial);
	if (r)
		return store_failed(st, ae, "read", r);
	for (int attempt = 0; attempt < STATE_RETRIES; attempt++) {
		json_decref(desc);
		r = descendants(st, serial, &desc);
		if (r)
			break;
		self = !state_is_revoked(st, serial);
		if (!self && json_array_size(desc) == 0) {
			version = counter_value(st, "meta/bundle", "version");
			break;
		}
		r = revoke_write(st, self ? serial : NULL, cert, desc, &version);
		if (r != -ECANCELED)
			break;
	}
	if (r) {
		json_decref(cert);
		json_decref(desc);
		load_revoked(st);       /* what a chunked write did store is refused */
		return store_failed(st, ae, "revoke", r);
	}
	revoked_add(st, serial);
	for (size_t i = 0; i < json_array_size(desc); i++)
		revoked_add(st, json_string_value(json_array_get(desc, i)));
	if (self || json_array_size(desc))
		log_info("revoked certificate %s of %s (valid until %s) and %zu descendant(s)", serial,
		         jstr(cert, "service"), fmt_time(jint(cert, "not_after"), t),
		         json_array_size(desc));
	*out = json_pack("{s:s, s:s, s:b, s:I, s:o}", "serial", serial, "service",
	                 jstr(cert, "service"), "revoked", 1, "bundle_version", (json_int_t)version,
	                 "descendants", desc);
	json_decref(cert);
	return 0;
}

/* ---- CA ---- */

/* Unexpired, unrevoked SVIDs signed by root id: count and last expiry. */
static int count_signed_by(struct control_state *st, int id, size_t *count, int64_t *last)
{
	struct store_entry *e = NULL;
	size_t n = 0;
	int64_t now = now_s();
	int r = store_list(st->store, "certs/", &e, &n, NULL);

	*count = 0;
	*last = 0;
	if (r)
		return r;
	for (size_t i = 0; i < n; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && jint(v, "root") == id && jint(v, "not_after") > now &&
		    !state_is_revoked(st, e[i].key + strlen("certs/"))) {
			(*count)++;
			if (jint(v, "not_after") > *last)
				*last = jint(v, "not_after");
		}
		json_decref(v);
	}
	store_entries_free(e, n);
	return 0;
}

/* The config version at which the new root joined the bundle: meta/ca is
 * written by the prepare step and not again until the switch. */
static int64_t new_root_version(struct control_state *st)
{
	int64_t rev = 0;

	if (st->phase != CA_PHASE_PREPARED || kv_rev(st, "meta/ca", &rev) < 0)
		return 0;
	return rev;
}

static int cmp_behind(const void *a, const void *b)
{
	const json_t *x = *(json_t *const *)a, *y = *(json_t *const *)b;
	int c = strcmp(jstr(x, "service"), jstr(y, "service"));

	return c ? c : strcmp(jstr(x, "serial"), jstr(y, "serial"));
}

/* The proxies the switch waits for: seen within the last SVID lifetime,
 * with an SVID that is unexpired and unrevoked (else it cannot come back),
 * that neither reported holding a config version >= since nor fetched the
 * bundle since then. A new array of {service, serial, config_version,
 * last_seen}, sorted. */
static json_t *proxies_behind(struct control_state *st, int64_t since)
{
	int64_t now = now_s();
	json_t *list = json_array();
	json_t **v;
	size_t n = 0, i = 0;

	for (struct state_proxy *p = st->proxies; p; p = p->next)
		n++;
	v = calloc(n ? n : 1, sizeof(*v));
	if (!v)
		return list;
	for (struct state_proxy *p = st->proxies; p; p = p->next) {
		char t[CA_TIME_LEN];

		if (p->last_seen < now - st->o.svid_ttl || p->not_after <= now ||
		    state_is_revoked(st, p->serial) || p->held >= since || p->bundle_rev >= since)
			continue;
		v[i++] = json_pack("{s:s, s:s, s:I, s:s}", "service", p->service, "serial", p->serial,
		                   "config_version", (json_int_t)p->held,
		                   "last_seen", fmt_time(p->last_seen, t));
	}
	qsort(v, i, sizeof(*v), cmp_behind);
	for (size_t k = 0; k < i; k++)
		json_array_append_new(list, v[k]);
	free(v);
	return list;
}

/* "orders (serial 1f..), frontend (serial 2e..) and 3 more" into out. */
static const char *name_proxies(const json_t *list, char *out, size_t len)
{
	size_t n = json_array_size(list), used = 0, i;

	out[0] = '\0';
	for (i = 0; i < n; i++) {
		const json_t *p = json_array_get(list, i);
		char one[SERVICE_NAME_MAX + CA_SERIAL_HEX_MAX + 16];
		int w = snprintf(one, sizeof(one), "%s%s (serial %s)", i ? ", " : "",
		                 jstr(p, "service"), jstr(p, "serial"));

		if (used + (size_t)w + 16 >= len)
			break;
		memcpy(out + used, one, (size_t)w + 1);
		used += (size_t)w;
	}
	if (i < n)
		snprintf(out + used, len - used, " and %zu more", n - i);
	return out;
}

/* What the next rotation step waits for: {next_phase, open, waiting_for,
 * proxies[] (prepared) | certs, until (switched)}. */
static json_t *ca_gate(struct control_state *st)
{
	char names[160], msg[256], t[CA_TIME_LEN];
	size_t count = 0;
	int64_t last = 0;
	json_t *behind;

	switch (st->phase) {
	case CA_PHASE_STABLE:
		return json_pack("{s:s, s:b, s:s}", "next_phase", "prepared", "open",
		                 st->n_roots < STATE_ROOTS_MAX, "waiting_for", "nothing");
	case CA_PHASE_PREPARED:
		behind = proxies_behind(st, new_root_version(st));
		if (json_array_size(behind))
			snprintf(msg, sizeof(msg), "%zu proxy(s) to acknowledge the new root: %s",
			         json_array_size(behind), name_proxies(behind, names, sizeof(names)));
		else
			snprintf(msg, sizeof(msg), "nothing");
		return json_pack("{s:s, s:b, s:s, s:o}", "next_phase", "switched",
		                 "open", json_array_size(behind) == 0, "waiting_for", msg,
		                 "proxies", behind);
	default: {
		const struct state_root *old = old_root(st);

		if (old && count_signed_by(st, old->id, &count, &last) < 0)
			return json_pack("{s:s, s:b, s:s}", "next_phase", "stable", "open", 0,
			                 "waiting_for", "the state store (see control's log)");
		if (count)
			snprintf(msg, sizeof(msg), "%zu SVID(s) signed by the old root to expire (the "
			         "last at %s) or be revoked", count, fmt_time(last, t));
		else
			snprintf(msg, sizeof(msg), "nothing");
		return json_pack("{s:s, s:b, s:s, s:I, s:s?}", "next_phase", "stable",
		                 "open", count == 0, "waiting_for", msg, "certs", (json_int_t)count,
		                 "until", count ? fmt_time(last, t) : NULL);
	}
	}
}

json_t *state_ca_show(struct control_state *st)
{
	json_t *pins = json_array(), *ids = json_array(), *out;

	for (size_t i = 0; i < st->n_roots; i++) {
		json_array_append_new(pins, json_string(st->roots[i].pin));
		json_array_append_new(ids, json_integer(st->roots[i].id));
	}
	out = json_pack("{s:o, s:i, s:s, s:o, s:o, s:I, s:s, s:o}", "roots", roots_pem_array(st),
	                "signing", (int)st->signing, "phase", phase_names[st->phase],
	                "pins", pins, "root_ids", ids,
	                "bundle_version", (json_int_t)counter_value(st, "meta/bundle", "version"),
	                "trust_domain", st->td, "gate", ca_gate(st));
	if (out && st->phase == CA_PHASE_PREPARED)
		json_object_set_new(out, "new_root_version", json_integer(new_root_version(st)));
	return out;
}

/* stable -> prepared: a new root, saved to its files, joins the bundle. */
static int ca_prepare(struct control_state *st, struct api_error *ae)
{
	char cert[PATH_MAX], key[PATH_MAX];
	struct meshlet_err e = {0};
	struct ca *ca = NULL;
	struct batch b = {0};
	int id = st->next_id, r;
	int64_t rev = 0;

	if (st->n_roots >= STATE_ROOTS_MAX)
		return api_fail(ae, 409, "", "too many roots in the bundle");
	root_paths(st, id, cert, key, sizeof(cert));
	/* Left over by a rotation whose store write failed: never referenced. */
	unlink(cert);
	unlink(key);
	r = ca_generate(&ca, st->td, 0, &e);
	if (!r)
		r = ca_save(ca, cert, key, &e);
	if (r) {
		ca_free(ca);
		return api_fail(ae, 500, "", "cannot create the new root: %s", e.message);
	}
	if (root_set(st, st->n_roots, id, ca) < 0) {
		ca_free(st->roots[st->n_roots].ca);
		free(st->roots[st->n_roots].pem);
		memset(&st->roots[st->n_roots], 0, sizeof(st->roots[0]));
		st->root_certs[st->n_roots] = NULL;
		return api_fail(ae, 500, "", "out of memory");
	}
	st->n_roots++;
	st->phase = CA_PHASE_PREPARED;
	st->next_id = id + 1;
	kv_rev(st, "meta/ca", &rev);
	batch_put(&b, "meta/ca", ca_meta(st), rev);
	r = bump_counter(st, &b, "meta/bundle", "version", NULL);
	if (!r)
		r = batch_commit(st, &b, NULL);
	batch_clear(&b);
	if (r) {
		st->n_roots--;
		ca_free(st->roots[st->n_roots].ca);
		free(st->roots[st->n_roots].pem);
		memset(&st->roots[st->n_roots], 0, sizeof(st->roots[0]));
		st->root_certs[st->n_roots] = NULL;
		st->phase = CA_PHASE_STABLE;
		st->next_id = id;
		unlink(cert);
		unlink(key);
		return store_failed(st, ae, "CA rotation", r);
	}
	log_info("CA rotation: new root %d (pin %s) joined the bundle; signing stays with root %d",
	         id, st->roots[st->n_roots - 1].pin, st->roots[st->signing].id);
	return 0;
}

/* prepared -> switched: the new root signs; every proxy renews. Refused
 * (unless force) while a recent proxy has not acknowledged the new root:
 * it would refuse peers with certificates of the new root. */
static int ca_switch(struct control_state *st, bool force, struct api_error *ae)
{
	struct batch b = {0};
	size_t old = st->signing;
	int64_t rev = 0, since = new_root_version(st);
	json_t *behind = proxies_behind(st, since);
	size_t n_behind = json_array_size(behind);
	char names[140];
	int r;

	if (n_behind && !force) {
		r = api_fail_code(ae, 409, "proxies_not_updated", "", "not switching: %zu recent "
		                  "proxy(s) have not acknowledged the new root (config version %lld; "
		                  "wait, or --force): %s", n_behind, (long long)since,
		                  name_proxies(behind, names, sizeof(names)));
		json_decref(behind);
		return r;
	}
	if (n_behind)
		log_warn("CA rotation: switching by force; %zu proxy(s) have not acknowledged the new "
		         "root: %s", n_behind, name_proxies(behind, names, sizeof(names)));
	json_decref(behind);
	st->signing = st->n_roots - 1;
	st->phase = CA_PHASE_SWITCHED;
	kv_rev(st, "meta/ca", &rev);
	batch_put(&b, "meta/ca", ca_meta(st), rev);
	r = bump_counter(st, &b, "meta/rotate-all", "cert_generation", NULL);
	if (!r)
		r = batch_commit(st, &b, NULL);
	batch_clear(&b);
	if (r) {
		st->signing = old;
		st->phase = CA_PHASE_PREPARED;
		return store_failed(st, ae, "CA rotation", r);
	}
	cross_update(st);
	log_info("CA rotation: root %d signs now; all proxies were asked to renew",
	         st->roots[st->signing].id);
	return 0;
}

/* switched -> stable: the old root leaves the bundle. */
static int ca_finish(struct control_state *st, bool force, struct api_error *ae)
{
	struct state_root saved[STATE_ROOTS_MAX], old;
	X509 *saved_certs[STATE_ROOTS_MAX];
	struct batch b = {0};
	char t[CA_TIME_LEN];
	size_t count = 0, keep = st->signing, saved_n = st->n_roots;
	int64_t last = 0, rev = 0;
	int r;

	if (st->n_roots != 2)
		return api_fail(ae, 409, "", "no old root to remove");
	old = st->roots[keep == 0 ? 1 : 0];
	r = count_signed_by(st, old.id, &count, &last);
	if (r)
		return store_failed(st, ae, "list", r);
	if (count > 0 && !force)
		return api_fail_code(ae, 409, "old_root_in_use", "", "%zu SVID(s) signed by the old "
		                     "root are still valid (the last until %s); retry then, or pass "
		                     "{\"force\": true} to remove the old root now and cut them off",
		                     count, fmt_time(last, t));
	memcpy(saved, st->roots, sizeof(saved));
	memcpy(saved_certs, st->root_certs, sizeof(saved_certs));
	kv_rev(st, "meta/ca", &rev);
	st->roots[0] = saved[keep];
	st->root_certs[0] = saved_certs[keep];
	memset(&st->roots[1], 0, sizeof(st->roots[1]));
	st->root_certs[1] = NULL;
	st->n_roots = 1;
	st->signing = 0;
	st->phase = CA_PHASE_STABLE;
	batch_put(&b, "meta/ca", ca_meta(st), rev);
	r = bump_counter(st, &b, "meta/bundle", "version", NULL);
	if (!r)
		r = batch_commit(st, &b, NULL);
	batch_clear(&b);
	if (r) {
		memcpy(st->roots, saved, sizeof(saved));
		memcpy(st->root_certs, saved_certs, sizeof(saved_certs));
		st->n_roots = saved_n;
		st->signing = keep;
		st->phase = CA_PHASE_SWITCHED;
		return store_failed(st, ae, "CA rotation", r);
	}
	cross_update(st);
	log_info("CA rotation complete: root %d left the bundle%s", old.id,
	         count ? " (forced while SVIDs it signed were still valid)" : "");
	ca_free(old.ca);
	free(old.pem);
	return 0;
}

int state_ca_rotate(struct control_state *st, bool force, json_t **out, bool *tls_changed,
                    struct api_error *ae)
{
	enum ca_phase from = st->phase;
	int r;

	*tls_changed = false;
	switch (st->phase) {
	case CA_PHASE_STABLE: r = ca_prepare(st, ae); break;
	case CA_PHASE_PREPARED: r = ca_switch(st, force, ae); break;
	default: r = ca_finish(st, force, ae); break;
	}
	if (r)
		return r;
	*tls_changed = true;
	write_bundle_file(st);
	*out = state_ca_show(st);
	json_object_set_new(*out, "previous_phase", json_string(phase_names[from]));
	return 0;
}

/* ---- dry run ---- */

static const char *check_header(const void *ctx, const char *lname)
{
	const char *k;
	json_t *v;

	if (!ctx)
		return NULL;
	json_object_foreach((json_t *)ctx, k, v) {
		if (strcasecmp(k, lname) == 0)
			return json_string_value(v);
	}
	return NULL;
}

int state_check(struct control_state *st, const struct api_check_req *r, json_t **out,
                struct api_error *ae)
{
	struct policy_request req = {0};
	struct policy_decision d;
	struct meshlet_err e = {0};
	struct policy *p;
	json_t *doc = NULL;
	int64_t version = 0;
	char *norm = NULL;
	int ret;

	ret = state_policy_get(st, r->service, &doc, &version, ae);
	if (ret == -404) {
		*out = json_pack("{s:s, s:s}", "decision", "deny", "rule", "no_policy");
		return 0;
	}
	if (ret)
		return ret;
	p = policy_parse(doc, &e);
	json_decref(doc);
	if (!p)
		return api_fail(ae, 500, e.path, "the stored policy does not parse: %s", e.message);
	req.peer_id = r->from;
	req.port = r->port;
	req.http = r->http;
	req.method = r->method ? r->method : "GET";
	req.path = "/";
	if (r->path) {
		size_t cap = strlen(r->path) + 2, len = 0;
		const char *why = NULL;

		norm = malloc(cap);
		if (!norm || http_path_normalize(r->path, strlen(r->path), norm, cap, &len, &why) < 0) {
			free(norm);
			policy_free(p);
			*out = json_pack("{s:s, s:s, s:s, s:I}", "decision", "deny", "rule", "invalid_path",
			                 "message", why ? why : "path refused", "policy_version",
			                 (json_int_t)version);
			return 0;
		}
		req.path = norm;
	}
	req.header = check_header;
	req.header_ctx = r->headers;
	d = policy_eval(p, &req);
	*out = json_pack("{s:s, s:s, s:I}", "decision", policy_action_str(d.action),
	                 "rule", policy_decision_rule(&d), "policy_version", (json_int_t)version);
	if (norm && strcmp(norm, r->path) != 0)
		json_object_set_new(*out, "path", json_string(norm));
	free(norm);
	policy_free(p);
	return 0;
}

/* ---- housekeeping ---- */

/* Deletes the keys under prefix for which expired(value) holds, in chunks;
 * meta counter (may be NULL) bumped with each chunk. *n counts deletions. */
static int prune(struct control_state *st, const char *prefix, const char *counter,
                 const char *field, bool (*expired)(struct control_state *, const char *,
                                                    const json_t *, int64_t),
                 size_t *n_deleted)
{
	struct store_entry *e = NULL;
	struct batch b = {0};
	size_t n = 0;
	int64_t now = now_s();
	int r = store_list(st->store, prefix, &e, &n, NULL);

	*n_deleted = 0;
	for (size_t i = 0; i < n && !r; i++) {
		json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
		if (v && expired(st, e[i].key, v, now)) {
			batch_del(&b, e[i].key, e[i].revision);
			(*n_deleted)++;
		}
		json_decref(v);
		if (b.n >= STATE_PRUNE_CHUNK || (i + 1 == n && b.n > 0)) {
			if (counter)
				r = bump_counter(st, &b, counter, field, NULL);
			if (!r)
				r = batch_commit(st, &b, NULL);
			batch_clear(&b);
		}
	}
	store_entries_free(e, n);
	return r == -ECANCELED || r == -ENOENT ? 0 : r;   /* raced: next round */
}

static bool token_expired(struct control_state *st, const char *key, const json_t *v,
                          int64_t now)
{
	return jint(v, "expires_at") <= now;
}

static bool cert_expired(struct control_state *st, const char *key, const json_t *v, int64_t now)
{
	return jint(v, "not_after") <= now;
}

static bool endpoint_stale(struct control_state *st, const char *key, const json_t *v,
                           int64_t now)
{
	return jint(v, "not_after") <= now || state_is_revoked(st, jstr(v, "serial"));
}

static int endpoints_bump(struct control_state *st);

int state_maintain(struct control_state *st, bool *changed)
{
	size_t n = 0;
	int64_t now = now_s();
	int r, ret = 0;

	*changed = false;
	r = prune(st, "tokens/", NULL, NULL, token_expired, &n);
	if (r)
		ret = r;
	r = prune(st, "certs/", NULL, NULL, cert_expired, &n);
	if (r)
		ret = r;
	r = prune(st, "lineages/", NULL, NULL, cert_expired, &n);
	if (r)
		ret = r;
	r = prune(st, "endpoints/", "meta/endpoints", "version", endpoint_stale, &n);
	if (r)
		ret = r;
	if (n)
		*changed = true;
	/* A coalesced bump whose timer was lost: never later than this. */
	if (st->endpoints_pending && !st->endpoints_timer && endpoints_bump(st) == 0)
		*changed = true;
	/* Revocations of expired certificates: the certificate is refused anyway. */
	{
		struct store_entry *e = NULL;
		size_t ne = 0;

		if (store_list(st->store, "revoked/", &e, &ne, NULL) == 0) {
			n = 0;
			r = prune(st, "revoked/", "meta/bundle", "version", cert_expired, &n);
			if (r)
				ret = r;
			for (size_t i = 0; i < ne && n; i++) {
				json_t *v = json_loadb(e[i].value, e[i].len, 0, NULL);
				if (v && jint(v, "not_after") <= now)
					revoked_remove(st, e[i].key + strlen("revoked/"));
				json_decref(v);
			}
			if (n)
				*changed = true;
			store_entries_free(e, ne);
		}
	}
	for (struct state_proxy *p = st->proxies, *next; p; p = next) {
		next = p->next;
		if (p->not_after <= now && p->polling == 0) {
			proxy_gone(st, p->serial);
			proxy_unlink(st, p);
		}
	}
	r = proxies_flush(st);
	if (r)
		ret = r;
	if (ret)
		log_warn("housekeeping: %s (%s)", strerror(-ret), store_strerror(st->store));
	return ret;
}
