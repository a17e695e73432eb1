/*
 * log: diagnostics on stderr, access log on stdout.
 *
 * Each line is built on the stack and handed to the kernel in one call, so
 * lines from different threads never interleave and logging never
 * allocates. Nothing here buffers: a crash loses no line already logged.
 */
#include "meshlet/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Longest diagnostic line; longer ones end in "...". */
#define LOG_LINE_MAX 4096
#define LOG_PROGRAM_MAX 64

/* An atomic so that log_set_level() from the main thread (e.g. on SIGHUP)
 * is race-free against workers reading it; relaxed is enough, as a line
 * or two logged at the old level is harmless. */
static atomic_int log_level = LOG_INFO;
/* Written by log_init() before threads start, read-only afterwards. */
static char log_program[LOG_PROGRAM_MAX] = "meshlet";

static const char *const level_names[] = {
	[LOG_DEBUG] = "debug",
	[LOG_INFO] = "info",
	[LOG_WARN] = "warn",
	[LOG_ERROR] = "error",
};

/* Sets the level and the program name of every line. Call once, before
 * threads start; program may be NULL (keeps "meshlet"). */
void log_init(enum log_level level, const char *program)
{
	if (program && *program)
		snprintf(log_program, sizeof(log_program), "%s", program);
	log_set_level(level);
}

/* Changes the level; safe from any thread. Out-of-range values are ignored. */
void log_set_level(enum log_level level)
{
	if ((unsigned)level > LOG_OFF)
		return;
	atomic_store_explicit(&log_level, (int)level, memory_order_relaxed);
}

/* True when a line at level would be written (LOG_OFF never is). */
bool log_enabled(enum log_level level)
{
	return (unsigned)level < LOG_OFF &&
	       (int)level >= atomic_load_explicit(&log_level, memory_order_relaxed);
}

bool log_limit_pass(struct log_limit *l, uint64_t now_ms, uint64_t *suppressed)
{
	if (l->next_ms && now_ms < l->next_ms) {
		l->suppressed++;
		return false;
	}
	*suppressed = l->suppressed;
	l->suppressed = 0;
	l->next_ms = now_ms + (l->interval_ms ? l->interval_ms : 1);
	return true;
}

/* Parses "debug"|"info"|"warn"|"error". Returns 0 or -EINVAL (*out untouched). */
int log_level_parse(const char *s, enum log_level *out)
{
	if (!s || !out)
		return -EINVAL;
	for (int i = LOG_DEBUG; i < LOG_OFF; i++) {
		if (strcmp(s, level_names[i]) == 0) {
			*out = (enum log_level)i;
			return 0;
		}
	}
	return -EINVAL;
}

/* Writes all of iov to fd, retrying on EINTR and short writes. Gives up
 * silently on other errors: there is nowhere left to report them. */
static void write_all(int fd, struct iovec *iov, int iovcnt)
{
	while (iovcnt > 0) {
		ssize_t n = writev(fd, iov, iovcnt);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
			n -= (ssize_t)iov->iov_len;
			iov++;
			iovcnt--;
		}
		if (iovcnt > 0) {
			iov->iov_base = (char *)iov->iov_base + n;
			iov->iov_len -= (size_t)n;
		}
	}
}

/* Replaces control characters, so that a peer-controlled string inside a
 * message cannot forge extra log lines or drive the terminal. */
static void sanitize(char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if ((c < 0x20 && c != '\t') || c == 0x7f)
			s[i] = '?';
	}
}

/* Formats the message part after the prefix at buf[off], ending in "...\n"
 * when it does not fit. Returns the total line length. */
__attribute__((format(printf, 3, 0)))
static size_t format_message(char *buf, size_t off, const char *fmt, va_list ap)
{
	static const char ellipsis[] = "...\n";
	size_t room = LOG_LINE_MAX - off; /* including the final '\n' */
	int n = vsnprintf(buf + off, room, fmt, ap);

	if (n < 0)
		n = 0;
	if ((size_t)n < room) {
		sanitize(buf + off, (size_t)n);
		buf[off + (size_t)n] = '\n';
		return off + (size_t)n + 1;
	}
	/* Truncated: keep what fits before the ellipsis. */
	size_t keep = room - (sizeof(ellipsis) - 1);
	sanitize(buf + off, keep);
	memcpy(buf + off + keep, ellipsis, sizeof(ellipsis) - 1);
	return off + keep + sizeof(ellipsis) - 1;
}

/* "2026-11-27T10:00:00.123Z info meshlet-proxy: message\n" on stderr, in
 * one write. Does nothing when level is filtered out. */
void log_write(enum log_level level, const char *fmt, ...)
{
	char buf[LOG_LINE_MAX];
	char ts[32];
	struct timespec now;
	va_list ap;

	if (!log_enabled(level) || !fmt)
		return;
	clock_gettime(CLOCK_REALTIME, &now);
	log_format_time(ts, sizeof(ts), (long long)now.tv_sec, now.tv_nsec);
	int off = snprintf(buf, sizeof(buf), "%s %s %s: ", ts, level_names[level], log_program);
	if (off < 0 || (size_t)off >= sizeof(buf) / 2)
		return; /* cannot happen with the bounded program name */

	va_start(ap, fmt);
	size_t len = format_message(buf, (size_t)off, fmt, ap);
	va_end(ap);

	struct iovec iov = { .iov_base = buf, .iov_len = len };
	write_all(STDERR_FILENO, &iov, 1);
}

/* Writes json (len bytes, no newline) and a '\n' to stdout in one writev,
 * completing short writes. json is written as given: callers escape. */
void log_access(const char *json, size_t len)
{
	struct iovec iov[2] = {
		{ .iov_base = (void *)json, .iov_len = json ? len : 0 },
		{ .iov_base = "\n", .iov_len = 1 },
	};
	write_all(STDOUT_FILENO, iov, 2);
}

/*
 * Length of the UTF-8 sequence at p (NUL-terminated), and whether it is
 * valid (RFC 3629: no overlongs, surrogates or code points past U+10FFFF).
 * An invalid sequence's length is its maximal valid prefix (at least 1),
 * so it becomes one U+FFFD, as Unicode recommends.
 */
static size_t utf8_seq(const unsigned char *p, bool *valid)
{
	unsigned char c = p[0], lo = 0x80, hi = 0xBF;
	size_t need;

	*valid = false;
	if (c < 0x80) {
		*valid = true;
		return 1;
	}
	if (c >= 0xC2 && c <= 0xDF) {
		need = 1;
	} else if (c >= 0xE0 && c <= 0xEF) {
		need = 2;
		lo = c == 0xE0 ? 0xA0 : 0x80;
		hi = c == 0xED ? 0x9F : 0xBF;
	} else if (c >= 0xF0 && c <= 0xF4) {
		need = 3;
		lo = c == 0xF0 ? 0x90 : 0x80;
		hi = c == 0xF4 ? 0x8F : 0xBF;
	} else {
		return 1;
	}
	/* A NUL is never a continuation byte, so this stops at the string's end. */
	for (size_t i = 1; i <= need; i++) {
		if (p[i] < lo || p[i] > hi)
			return i;
		lo = 0x80;
		hi = 0xBF;
	}
	*valid = true;
	return need + 1;
}

/* The JSON form of the ASCII byte c into esc (>= 7 bytes); returns its length. */
static size_t escape_ascii(unsigned char c, char *esc)
{
	switch (c) {
	case '"': memcpy(esc, "\\\"", 2); return 2;
	case '\\': memcpy(esc, "\\\\", 2); return 2;
	case '\n': memcpy(esc, "\\n", 2); return 2;
	case '\r': memcpy(esc, "\\r", 2); return 2;
	case '\t': memcpy(esc, "\\t", 2); return 2;
	default: break;
	}
	if (c < 0x20 || c == 0x7f) {
		snprintf(esc, 7, "\\u%04x", c);
		return 6;
	}
	esc[0] = (char)c;
	return 1;
}

/*
 * Appends s to out as the inside of a JSON string: ", \ and control
 * characters escaped, invalid UTF-8 replaced by \ufffd. Stops before an
 * escape or character that would not fit whole in len - 1 bytes. Always
 * NUL-terminates when len > 0. Returns the bytes written (excluding NUL).
 */
size_t log_json_escape(char *out, size_t len, const char *s)
{
	const unsigned char *p = (const unsigned char *)(s ? s : "");
	size_t pos = 0;

	if (!out || len == 0)
		return 0;
	while (*p) {
		char esc[8];
		const char *piece = esc;
		bool valid;
		size_t n = utf8_seq(p, &valid), plen;

		if (!valid) {
			piece = "\\ufffd";
			plen = 6;
		} else if (n > 1) {
			piece = (const char *)p;
			plen = n;
		} else {
			plen = escape_ascii(*p, esc);
		}
		if (plen > len - 1 - pos)
			break;
		memcpy(out + pos, piece, plen);
		pos += plen;
		p += n;
	}
	out[pos] = '\0';
	return pos;
}

/* "2026-11-27T10:00:00.123Z" of a CLOCK_REALTIME value into out (>= 32;
 * shorter buffers get a truncated, NUL-terminated string). */
void log_format_time(char *out, size_t len, long long sec, long nsec)
{
	struct tm tm;
	time_t t = (time_t)sec;

	if (!out || len == 0)
		return;
	if (nsec < 0 || nsec > 999999999L)
		nsec = 0;
	if (!gmtime_r(&t, &tm)) {
		snprintf(out, len, "%s", "1970-01-01T00:00:00.000Z");
		return;
	}
	snprintf(out, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ",
	         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
	         tm.tm_hour, tm.tm_min, tm.tm_sec, nsec / 1000000L);
}
