/*
 * store_etcd: the etcd backend of store.h (store_open_etcd()).
 *
 * Store key K is etcd key <prefix>K. A read is a /v3/kv/range; every write
 * is one /v3/kv/txn whose compares carry the batch's conditions (expected
 * > 0: mod_revision equal; 0: create_revision 0, the key is absent; a
 * delete: create_revision > 0, the key exists), so a batch is atomic and
 * gets one etcd revision, which is the store revision. When the compares
 * fail, the txn's failure branch reads the keys' revisions back so the
 * error (-ENOENT or -ECANCELED) is the one the SQLite backend gives.
 */
#include "store-int.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "meshlet/etcd.h"
#include "meshlet/log.h"

#define PREFIX_MAX 128

/* Pause between two attempts of the follow thread to restore its watch. */
#define FOLLOW_RETRY_MS 500

/* The revisions of the tracked keys (store_follow_track) as the follow
 * thread saw them: primed by a range read each time the watch (re)starts,
 * then fed by its events and by this handle's own writes; sorted by key. */
struct rev_entry {
	char *key;                     /* without the prefix */
	int64_t mod;                   /* its mod_revision, 0: deleted */
	int64_t seen;                  /* the revision of what set mod (events come late) */
};

struct revmap {
	pthread_mutex_t mu;
	bool primed;                   /* false: not yet, or the watch is being resumed */
	struct rev_entry *e;
	size_t n, cap;
	char *track[STORE_TRACK_MAX];  /* key prefixes tracked */
	size_t ntrack;
};

/* The follow thread's side: its own client, and the pipes it talks through. */
struct follower {
	pthread_t thread;
	bool running;
	struct etcd *c;                /* the thread's own connection */
	int notify[2];                 /* thread writes [1], the event loop reads [0] */
	int stop[2];                   /* store_close writes [1], the thread polls [0] */
	int64_t next_rev;              /* the revision to resume the watch at */
	bool lost;                     /* the last stream broke (logged once) */
	struct se *s;                  /* the store it follows (its revision map) */
};

struct se {
	struct store base;             /* first: a struct store * is a struct se * */
	struct etcd *c;
	char prefix[PREFIX_MAX + 1];
	size_t plen;
	struct etcd_opts eo;           /* copied: the follow thread opens its own client */
	char *endpoints, *cacert, *cert, *key;
	struct follower f;
	struct revmap rm;
	int64_t lease;                 /* the lock's lease, 0: none */
	char owner[96];                /* this handle's value in a lock key */
};

static const struct store_backend etcd_backend;

/* Records the client's error; maps it to the store's errors. */
static int fail(struct se *s, int r)
{
	snprintf(s->base.errmsg, sizeof(s->base.errmsg), "etcd: %s", etcd_strerror(s->c));
	return r == -EAGAIN || r == -ENOMEM ? r : -EIO;
}

/* base64 of prefix + key. */
static char *full_key_b64(const struct se *s, const char *key)
{
	char full[PREFIX_MAX + STORE_KEY_MAX + 1];

	snprintf(full, sizeof(full), "%s%s", s->prefix, key);
	return etcd_b64(full, strlen(full));
}

static int call(struct se *s, const char *path, json_t *req, json_t **resp, bool read)
{
	int r;

	if (!req)
		return -ENOMEM;
	r = etcd_call(s->c, path, req, resp, read);
	json_decref(req);
	return r ? fail(s, r) : 0;
}

/* One kv of a range answer: its key without the prefix, value, revision. */
static int decode_kv(struct se *s, const json_t *kv, struct store_entry *e)
{
	const char *k = json_string_value(json_object_get(kv, "key"));
	const char *v = json_string_value(json_object_get(kv, "value"));
	char *key = NULL;
	size_t klen;

	memset(e, 0, sizeof(*e));
	if (!k || etcd_unb64(k, &key, &klen) < 0 || klen < s->plen ||
	    memcmp(key, s->prefix, s->plen) != 0 || strlen(key) != klen)
		goto bad;
	e->key = strdup(key + s->plen);
	free(key);
	if (!e->key)
		return -ENOMEM;
	if (etcd_unb64(v ? v : "", &e->value, &e->len) < 0)   /* proto3 omits "" */
		goto bad;
	e->revision = etcd_int(kv, "mod_revision");
	if (e->revision <= 0)
		goto bad;
	return 0;
bad:
	free(key);
	free(e->key);
	free(e->value);
	memset(e, 0, sizeof(*e));
	snprintf(s->base.errmsg, sizeof(s->base.errmsg), "etcd: a malformed key-value in an answer");
	return -EIO;
}

static int be_get(struct store *st, const char *key, char **value, size_t *len,
                  int64_t *revision)
{
	struct se *s = (struct se *)st;
	char *k = full_key_b64(s, key);
	json_t *resp = NULL, *kvs;
	struct store_entry e;
	int r = k ? call(s, "/v3/kv/range", json_pack("{s:s}", "key", k), &resp, true) : -ENOMEM;

	free(k);
	if (r)
		return r;
	kvs = json_object_get(resp, "kvs");
	if (json_array_size(kvs) == 0) {
		json_decref(resp);
		return -ENOENT;
	}
	r = decode_kv(s, json_array_get(kvs, 0), &e);
	json_decref(resp);
	if (r)
		return r;
	free(e.key);
	if (value)
		*value = e.value;
	else
		free(e.value);
	if (len)
		*len = e.len;
	if (revision)
		*revision = e.revision;
	return 0;
}

/* The header revision of an answer (> 0), or -EIO. */
static int header_revision(struct se *s, const json_t *resp, int64_t *revision)
{
	int64_t rev = etcd_int(json_object_get(resp, "header"), "revision");

	if (rev <= 0) {
		snprintf(s->base.errmsg, sizeof(s->base.errmsg), "etcd: an answer without a revision");
		return -EIO;
	}
	*revision = rev;
	return 0;
}

/* A range request for every key starting with prefix + p. */
static json_t *range_req(const struct se *s, const char *p, bool count_only)
{
	char full[PREFIX_MAX + STORE_KEY_MAX + 1];
	char *k, *end;
	json_t *req;

	snprintf(full, sizeof(full), "%s%s", s->prefix, p);
	k = etcd_b64(full, strlen(full));
	end = etcd_prefix_end_b64(full, strlen(full));
	req = k && end ? json_pack("{s:s, s:s}", "key", k, "range_end", end) : NULL;
	if (req && count_only)
		json_object_set_new(req, "count_only", json_true());
	free(k);
	free(end);
	return req;
}

static int be_list(struct store *st, const char *prefix, struct store_entry **entries, size_t *n,
                   int64_t *revision)
{
	struct se *s = (struct se *)st;
	json_t *resp = NULL, *kvs;
	size_t i, count;
	int r = call(s, "/v3/kv/range", range_req(s, prefix, false), &resp, true);

	if (r)
		return r;
	if (revision && (r = header_revision(s, resp, revision)) < 0)
		goto out;
	kvs = json_object_get(resp, "kvs");
	count = json_array_size(kvs);
	if (count == 0)
		goto out;
	*entries = calloc(count, sizeof(**entries));
	if (!*entries) {
		r = -ENOMEM;
		goto out;
	}
	for (i = 0; i < count && !r; i++) {
		r = decode_kv(s, json_array_get(kvs, i), &(*entries)[i]);
		if (!r)
			(*n)++;
	}
out:
	json_decref(resp);
	if (r) {
		store_entries_free(*entries, *n);
		*entries = NULL;
		*n = 0;
	}
	return r;
}

static int be_revision(struct store *st, int64_t *revision)
{
	struct se *s = (struct se *)st;
	json_t *resp = NULL;
	int r = call(s, "/v3/kv/range", range_req(s, "", true), &resp, true);

	if (!r)
		r = header_revision(s, resp, revision);
	json_decref(resp);
	return r;
}

/* ---- writes ---- */

static json_t *compare(const char *k, const char *target, const char *result, const char *field,
                       int64_t v)
{
	char num[24];

	snprintf(num, sizeof(num), "%lld", (long long)v);
	return json_pack("{s:s, s:s, s:s, s:s}", "key", k, "target", target, "result", result,
	                 field, num);
}

/* Adds op's compares, its write and its read-back to the txn's arrays. */
static int add_op(struct se *s, const struct store_op *op, json_t *cmp, json_t *ok, json_t *ko)
{
	char *k = full_key_b64(s, op->key), *v = NULL;
	int r = -ENOMEM;

	if (!k)
		return -ENOMEM;
	if (op->kind == STORE_OP_DELETE)
		json_array_append_new(cmp, compare(k, "CREATE", "GREATER", "create_revision", 0));
	if (op->expected == 0)
		json_array_append_new(cmp, compare(k, "CREATE", "EQUAL", "create_revision", 0));
	else if (op->expected > 0)
		json_array_append_new(cmp, compare(k, "MOD", "EQUAL", "mod_revision", op->expected));
	if (op->kind == STORE_OP_DELETE) {
		json_array_append_new(ok, json_pack("{s:{s:s}}", "request_delete_range", "key", k));
	} else {
		v = etcd_b64(op->len ? op->value : "", op->len);
		if (!v)
			goto out;
		json_array_append_new(ok, json_pack("{s:{s:s, s:s}}", "request_put", "key", k,
		                                    "value", v));
	}
	json_array_append_new(ko, json_pack("{s:{s:s, s:b}}", "request_range", "key", k,
	                                    "keys_only", 1));
	r = 0;
out:
	free(k);
	free(v);
	return r;
}

/* The revision of op's key from the failure branch's read-back i (0: absent). */
static int64_t readback_rev(const json_t *resp, size_t i)
{
	const json_t *rr = json_object_get(json_array_get(json_object_get(resp, "responses"), i),
	                                   "response_range");
	const json_t *kv = json_array_get(json_object_get(rr, "kvs"), 0);

	return kv ? etcd_int(kv, "mod_revision") : 0;
}

/* Why the compares failed, in the SQLite backend's order of checks. */
static int failed_why(struct se *s, const struct store_op *ops, size_t n, const json_t *resp)
{
	for (size_t i = 0; i < n; i++) {
		int64_t cur = readback_rev(resp, i);

		if (ops[i].kind == STORE_OP_DELETE && cur == 0)
			return -ENOENT;
		if (ops[i].expected != STORE_REV_ANY && ops[i].expected != cur)
			return -ECANCELED;
	}
	/* Changed again between the compare and the read-back: still a lost race. */
	snprintf(s->base.errmsg, sizeof(s->base.errmsg), "etcd: a condition failed");
	return -ECANCELED;
}

/* ---- the revisions of tracked keys ---- */

static bool tracked(const struct revmap *m, const char *key)
{
	for (size_t i = 0; i < m->ntrack; i++)
		if (strncmp(key, m->track[i], strlen(m->track[i])) == 0)
			return true;
	return false;
}

/* The index of key, or where it goes (*found false). */
static size_t rev_find(const struct revmap *m, const char *key, bool *found)
{
	size_t lo = 0, hi = m->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(m->e[mid].key, key);

		if (c == 0) {
			*found = true;
			return mid;
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = false;
	return lo;
}

/* key's revision is mod as of revision seen (mu held); an older report
 * than the one kept is ignored. false: out of memory (then unprimed). */
static bool rev_set(struct revmap *m, const char *key, int64_t mod, int64_t seen)
{
	bool found;
	size_t i = rev_find(m, key, &found);

	if (found) {
		if (seen > m->e[i].seen) {
			m->e[i].mod = mod;
			m->e[i].seen = seen;
		}
		return true;
	}
	if (m->n == m->cap) {
		size_t cap = m->cap ? 2 * m->cap : 32;
		struct rev_entry *e = realloc(m->e, cap * sizeof(*e));

		if (!e)
			return false;
		m->e = e;
		m->cap = cap;
	}
	char *k = strdup(key);
	if (!k)
		return false;
	memmove(&m->e[i + 1], &m->e[i], (m->n - i) * sizeof(*m->e));
	m->e[i] = (struct rev_entry){ .key = k, .mod = mod, .seen = seen };
	m->n++;
	return true;
}

static void rev_clear(struct revmap *m)
{
	for (size_t i = 0; i < m->n; i++)
		free(m->e[i].key);
	m->n = 0;
	m->primed = false;
}

/* A full etcd key (base64) without the prefix into out; false: not ours. */
static bool own_key(const struct se *s, const char *b64, char *out, size_t len)
{
	char *key = NULL;
	size_t klen;
	bool ok = b64 && etcd_unb64(b64, &key, &klen) == 0 && klen >= s->plen &&
	          memcmp(key, s->prefix, s->plen) == 0 && strlen(key) == klen &&
	          klen - s->plen < len;

	if (ok)
		memcpy(out, key + s->plen, klen - s->plen + 1);
	free(key);
	return ok;
}

/* The follow thread, before (re)starting its watch: the tracked keys'
 * revisions now. Returns the revision they are read at, or a negative
 * errno (then unprimed). */
static int64_t rev_prime(struct se *s)
{
	struct revmap *m = &s->rm;
	json_t *req = range_req(s, "", false), *resp = NULL, *kvs;
	char key[STORE_KEY_MAX + 1];
	int64_t rev;
	bool ok = true;
	int r;

	if (!req)
		return -ENOMEM;
	json_object_set_new(req, "keys_only", json_true());
	r = etcd_call(s->f.c, "/v3/kv/range", req, &resp, true);
	json_decref(req);
	if (r)
		return r;
	rev = etcd_int(json_object_get(resp, "header"), "revision");
	kvs = json_object_get(resp, "kvs");
	pthread_mutex_lock(&m->mu);
	rev_clear(m);
	for (size_t i = 0; ok && i < json_array_size(kvs); i++) {
		const json_t *kv = json_array_get(kvs, i);

		if (own_key(s, json_string_value(json_object_get(kv, "key")), key, sizeof(key)) &&
		    tracked(m, key))
			ok = rev_set(m, key, etcd_int(kv, "mod_revision"), rev);
	}
	m->primed = ok && rev > 0;
	pthread_mutex_unlock(&m->mu);
	json_decref(resp);
	return m->primed ? rev : -EIO;
}

static void rev_unprime(struct revmap *m)
{
	pthread_mutex_lock(&m->mu);
	m->primed = false;
	pthread_mutex_unlock(&m->mu);
}

/* The events of one watch message into the map. */
static void rev_events(struct se *s, const json_t *events)
{
	struct revmap *m = &s->rm;
	char key[STORE_KEY_MAX + 1];

	pthread_mutex_lock(&m->mu);
	for (size_t i = 0; m->primed && i < json_array_size(events); i++) {
		const json_t *ev = json_array_get(events, i);
		const json_t *kv = json_object_get(ev, "kv");
		int64_t mod = etcd_int(kv, "mod_revision");
		const char *type = json_string_value(json_object_get(ev, "type"));
		bool del = type && strcmp(type, "DELETE") == 0;   /* PUT is omitted (proto3) */

		if (own_key(s, json_string_value(json_object_get(kv, "key")), key, sizeof(key)) &&
		    tracked(m, key) && !rev_set(m, key, del ? 0 : mod, mod))
			m->primed = false;
	}
	pthread_mutex_unlock(&m->mu);
}

/* This handle's own committed write at revision rev: known at once, not
 * only when its watch event arrives. */
static void rev_own_write(struct se *s, const struct store_op *ops, size_t n, int64_t rev)
{
	struct revmap *m = &s->rm;

	pthread_mutex_lock(&m->mu);
	for (size_t i = 0; m->primed && i < n; i++)
		if (tracked(m, ops[i].key) &&
		    !rev_set(m, ops[i].key, ops[i].kind == STORE_OP_DELETE ? 0 : rev, rev))
			m->primed = false;
	pthread_mutex_unlock(&m->mu);
}

static int be_follow_track(struct store *st, const char *const *prefixes, size_t n)
{
	struct se *s = (struct se *)st;
	struct revmap *m = &s->rm;

	if (s->f.running || n > STORE_TRACK_MAX)
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		m->track[i] = strdup(prefixes[i]);
		if (!m->track[i])
			return -ENOMEM;
		m->ntrack = i + 1;
	}
	return 0;
}

static int be_follow_rev(struct store *st, const char *key, int64_t *rev)
{
	struct se *s = (struct se *)st;
	struct revmap *m = &s->rm;
	bool found;
	size_t i;
	int r = -EAGAIN;

	pthread_mutex_lock(&m->mu);
	if (m->primed && tracked(m, key)) {
		i = rev_find(m, key, &found);
		*rev = found ? m->e[i].mod : 0;
		r = 0;
	}
	pthread_mutex_unlock(&m->mu);
	return r;
}

static int be_apply(struct store *st, const struct store_op *ops, size_t n, int64_t *revision)
{
	struct se *s = (struct se *)st;
	json_t *cmp = json_array(), *ok = json_array(), *ko = json_array(), *resp = NULL;
	int r = cmp && ok && ko ? 0 : -ENOMEM;

	for (size_t i = 0; i < n && !r; i++)
		r = add_op(s, &ops[i], cmp, ok, ko);
	if (r) {
		json_decref(cmp);
		json_decref(ok);
		json_decref(ko);
		return r;
	}
	r = call(s, "/v3/kv/txn", json_pack("{s:o, s:o, s:o}", "compare", cmp, "success", ok,
	                                    "failure", ko), &resp, false);
	if (r)
		return r;
	if (!json_is_true(json_object_get(resp, "succeeded"))) {
		r = failed_why(s, ops, n, resp);
	} else {
		int64_t rev = 0;

		r = header_revision(s, resp, &rev);
		if (!r && s->rm.ntrack)
			rev_own_write(s, ops, n, rev);
		if (!r && revision)
			*revision = rev;
	}
	json_decref(resp);
	return r;
}

/* ---- following (a thread with a watch on the prefix) ---- */

static void poke(int fd)
{
	ssize_t w = write(fd, "x", 1);   /* a full pipe already holds a wake-up */

	(void)w;
}

/* One message of the watch stream. */
static int on_watch_msg(void *arg, json_t *msg)
{
	struct follower *f = arg;
	const json_t *res = json_object_get(msg, "result");
	int64_t compacted = etcd_int(res, "compact_revision");
	int64_t rev = etcd_int(json_object_get(res, "header"), "revision");

	if (f->lost) {
		log_info("etcd watch restored");
		f->lost = false;
		poke(f->notify[1]);        /* what changed while it was down */
	}
	if (compacted > 0) {
		/* Resuming past etcd's compaction: start afresh at what it keeps;
		 * the caller re-reads everything anyway. */
		f->next_rev = compacted;
		rev_unprime(&f->s->rm);
		poke(f->notify[1]);
		return 1;
	}
	if (json_array_size(json_object_get(res, "events")) > 0) {
		if (rev >= f->next_rev)
			f->next_rev = rev + 1;
		/* The map before the wake-up: the loop reads it when woken. */
		rev_events(f->s, json_object_get(res, "events"));
		poke(f->notify[1]);
	}
	if (json_is_true(json_object_get(res, "canceled")))
		return 1;
	return 0;
}

static json_t *watch_req(struct se *s)
{
	json_t *r = range_req(s, "", false), *cr;

	if (!r)
		return NULL;
	cr = json_pack("{s:O, s:O, s:I}", "key", json_object_get(r, "key"), "range_end",
	               json_object_get(r, "range_end"), "start_revision",
	               (json_int_t)s->f.next_rev);
	json_decref(r);
	return cr ? json_pack("{s:o}", "create_request", cr) : NULL;
}

/* Sleeps ms unless told to stop; true when told to stop. */
static bool stop_requested(struct follower *f, int ms)
{
	struct pollfd p = { .fd = f->stop[0], .events = POLLIN };

	return poll(&p, 1, ms) > 0;
}

static void *follow_main(void *arg)
{
	struct se *s = arg;
	struct follower *f = &s->f;

	while (!stop_requested(f, 0)) {
		json_t *req;
		int r;

		if (s->rm.ntrack) {
			/* Primed at R, the watch goes on from R + 1, and the loop is
			 * woken for what the map learnt meanwhile. Not primed: the
			 * watch resumes where it was, readers read the store. */
			int64_t at = rev_prime(s);

			if (at > 0 && at + 1 > f->next_rev)
				f->next_rev = at + 1;
			poke(f->notify[1]);
		}
		req = watch_req(s);
		r = req ? etcd_stream(f->c, "/v3/watch", req, f->stop[0], on_watch_msg, f) : -ENOMEM;
		rev_unprime(&s->rm);
		json_decref(req);
		if (r == 0)
			break;                 /* stopped */
		if (r < 0 && !f->lost) {
			log_warn("etcd watch lost: %s; retrying every %d ms", etcd_strerror(f->c),
			         FOLLOW_RETRY_MS);
			f->lost = true;
		}
		if (r < 0 && stop_requested(f, FOLLOW_RETRY_MS))
			break;
	}
	return NULL;
}

static int be_follow(struct store *st, int *fd)
{
	struct se *s = (struct se *)st;
	struct follower *f = &s->f;
	struct meshlet_err err = {0};
	int64_t rev;
	int r;

	if (f->running) {
		*fd = f->notify[0];
		return 0;
	}
	r = be_revision(st, &rev);
	if (r)
		return r;
	f->next_rev = rev + 1;
	f->s = s;
	if (etcd_new(&f->c, &s->eo, &err) < 0)
		return -ENOMEM;
	if (pipe2(f->notify, O_CLOEXEC | O_NONBLOCK) < 0)
		return -errno;
	if (pipe2(f->stop, O_CLOEXEC) < 0)
		return -errno;
	if (pthread_create(&f->thread, NULL, follow_main, s) != 0)
		return -ENOMEM;
	f->running = true;
	/* One wake-up at once: what changed between the caller's reads and
	 * the watch's start revision is looked at too. */
	poke(f->notify[1]);
	*fd = f->notify[0];
	return 0;
}

static void be_follow_drain(struct store *st)
{
	struct se *s = (struct se *)st;
	char buf[256];

	if (s->f.running)
		while (read(s->f.notify[0], buf, sizeof(buf)) > 0)
			;
}

static void follow_stop(struct follower *f)
{
	if (f->running) {
		poke(f->stop[1]);
		pthread_join(f->thread, NULL);
		f->running = false;
	}
	for (int i = 0; i < 2; i++) {
		if (f->notify[i] > 0)
			close(f->notify[i]);
		if (f->stop[i] > 0)
			close(f->stop[i]);
	}
	etcd_free(f->c);
}

/* ---- a lock on a lease (one replica at a time) ---- */

/* Keeps s->lease alive, or grants a new one. 0 or a negative errno. */
static int lease_keep(struct se *s, int ttl_s)
{
	char id[24];
	json_t *resp = NULL;
	int r;

	if (s->lease) {
		snprintf(id, sizeof(id), "%lld", (long long)s->lease);
		r = call(s, "/v3/lease/keepalive", json_pack("{s:s}", "ID", id), &resp, true);
		/* {"result": {"ID", "TTL"}}: no TTL means the lease is gone. */
		if (!r && etcd_int(json_object_get(resp, "result"), "TTL") > 0) {
			json_decref(resp);
			return 0;
		}
		json_decref(resp);
		resp = NULL;
		if (r)
			return r;
		s->lease = 0;
	}
	snprintf(id, sizeof(id), "%d", ttl_s);
	r = call(s, "/v3/lease/grant", json_pack("{s:s}", "TTL", id), &resp, false);
	if (!r) {
		s->lease = etcd_int(resp, "ID");
		if (s->lease <= 0) {
			s->lease = 0;
			r = -EIO;
		}
	}
	json_decref(resp);
	return r;
}

static int be_lock_hold(struct store *st, const char *name, int ttl_s)
{
	struct se *s = (struct se *)st;
	char *k = full_key_b64(s, name), *v = etcd_b64(s->owner, strlen(s->owner)), lease[24];
	json_t *resp = NULL, *kvs;
	const char *cur;
	int r = k && v ? lease_keep(s, ttl_s) : -ENOMEM;

	if (!r) {
		snprintf(lease, sizeof(lease), "%lld", (long long)s->lease);
		/* Take it if nobody holds it; either way read who does. */
		r = call(s, "/v3/kv/txn", json_pack(
			"{s:[{s:s, s:s, s:s, s:s}], s:[{s:{s:s, s:s, s:s}}], s:[{s:{s:s}}]}",
			"compare", "key", k, "target", "CREATE", "result", "EQUAL", "create_revision", "0",
			"success", "request_put", "key", k, "value", v, "lease", lease,
			"failure", "request_range", "key", k), &resp, false);
	}
	if (!r && !json_is_true(json_object_get(resp, "succeeded"))) {
		kvs = json_object_get(json_object_get(json_array_get(json_object_get(resp, "responses"),
		                                                     0), "response_range"), "kvs");
		cur = json_string_value(json_object_get(json_array_get(kvs, 0), "value"));
		r = cur && strcmp(cur, v) == 0 ? 1 : 0;
	} else if (!r) {
		r = 1;
	}
	json_decref(resp);
	free(k);
	free(v);
	return r;
}

static void lease_revoke(struct se *s)
{
	char id[24];
	json_t *resp = NULL;

	if (!s->lease)
		return;
	snprintf(id, sizeof(id), "%lld", (long long)s->lease);
	if (call(s, "/v3/lease/revoke", json_pack("{s:s}", "ID", id), &resp, true) == 0)
		json_decref(resp);
	s->lease = 0;
}

/* ---- opening ---- */

static void be_close(struct store *st)
{
	struct se *s = (struct se *)st;

	follow_stop(&s->f);
	rev_clear(&s->rm);
	free(s->rm.e);
	for (size_t i = 0; i < s->rm.ntrack; i++)
		free(s->rm.track[i]);
	pthread_mutex_destroy(&s->rm.mu);
	lease_revoke(s);
	etcd_free(s->c);
	free(s->endpoints);
	free(s->cacert);
	free(s->cert);
	free(s->key);
	free(s);
}

static char *dup_or_null(const char *p, bool *oom)
{
	char *d = p ? strdup(p) : NULL;

	*oom |= p && !d;
	return d;
}

static int check_prefix(const char *p, struct meshlet_err *err)
{
	size_t n = strlen(p);

	if (n == 0 || n > PREFIX_MAX)
		return err_set(err, "", "--etcd-prefix: 1..%d characters", PREFIX_MAX);
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)p[i] < 0x21 || (unsigned char)p[i] > 0x7e)
			return err_set(err, "", "--etcd-prefix: printable characters without spaces");
	return 0;
}

int store_open_etcd(struct store **out, const struct store_etcd_opts *o, struct meshlet_err *err)
{
	struct etcd_opts eo = { .endpoints = o->endpoints, .cacert = o->cacert, .cert = o->cert,
	                        .key = o->key,
	                        .timeout_ms = o->timeout_ms > 0 ? o->timeout_ms :
	                                      STORE_ETCD_TIMEOUT_MS };
	const char *prefix = o->prefix ? o->prefix : "/meshlet/";
	struct se *s;
	bool oom = false;
	int64_t rev;
	int r;

	*out = NULL;
	r = check_prefix(prefix, err);
	if (r)
		return r;
	s = calloc(1, sizeof(*s));
	if (!s)
		return err_set(err, "", "out of memory"), -ENOMEM;
	s->base.be = &etcd_backend;
	pthread_mutex_init(&s->rm.mu, NULL);
	snprintf(s->prefix, sizeof(s->prefix), "%s", prefix);
	s->plen = strlen(s->prefix);
	{
		char host[64] = "?";
		unsigned char rnd[6];

		gethostname(host, sizeof(host) - 1);
		RAND_bytes(rnd, sizeof(rnd));
		snprintf(s->owner, sizeof(s->owner), "%.60s/%d/%02x%02x%02x%02x%02x%02x", host,
		         (int)getpid(), rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5]);
	}
	s->endpoints = dup_or_null(o->endpoints, &oom);
	s->cacert = dup_or_null(o->cacert, &oom);
	s->cert = dup_or_null(o->cert, &oom);
	s->key = dup_or_null(o->key, &oom);
	s->eo = (struct etcd_opts){ .endpoints = s->endpoints, .cacert = s->cacert,
	                            .cert = s->cert, .key = s->key, .timeout_ms = eo.timeout_ms };
	r = oom ? err_set(err, "", "out of memory") : etcd_new(&s->c, &s->eo, err);
	if (!r) {
		r = be_revision(&s->base, &rev);
		if (r)
			err_set(err, "", "etcd %s: %s", o->endpoints, s->base.errmsg);
	}
	if (r) {
		be_close(&s->base);
		return r;
	}
	*out = &s->base;
	return 0;
}

static const struct store_backend etcd_backend = {
	.name = "etcd",
	.get = be_get,
	.list = be_list,
	.apply = be_apply,
	.revision = be_revision,
	.follow = be_follow,
	.follow_drain = be_follow_drain,
	.follow_track = be_follow_track,
	.follow_rev = be_follow_rev,
	.lock_hold = be_lock_hold,
	.close = be_close,
};
