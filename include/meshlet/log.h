/*
 * log: diagnostics on stderr (one text line each, level-filtered before any
 * formatting), access log lines on stdout (one JSON object each).
 *
 * The level is process-wide and set once by log_init() before threads
 * start; lines are written with a single write(2) so threads do not
 * interleave within a line.
 */
#ifndef MESHLET_LOG_H
#define MESHLET_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_OFF };

void log_init(enum log_level level, const char *program);
void log_set_level(enum log_level level);
bool log_enabled(enum log_level level);

/* Parses "debug"|"info"|"warn"|"error". Returns 0 or -EINVAL. */
int log_level_parse(const char *s, enum log_level *out);

/* "2026-11-27T10:00:00.123Z info meshlet-proxy: message\n" on stderr. */
void log_write(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) do { if (log_enabled(LOG_DEBUG)) log_write(LOG_DEBUG, __VA_ARGS__); } while (0)
#define log_info(...)  do { if (log_enabled(LOG_INFO))  log_write(LOG_INFO,  __VA_ARGS__); } while (0)
#define log_warn(...)  do { if (log_enabled(LOG_WARN))  log_write(LOG_WARN,  __VA_ARGS__); } while (0)
#define log_error(...) do { if (log_enabled(LOG_ERROR)) log_write(LOG_ERROR, __VA_ARGS__); } while (0)

/*
 * A rate limit for one recurring diagnostic (a failing accept(), say), so
 * that a condition that repeats thousands of times a second cannot fill
 * the disk: at most one line per interval_ms, and that line says how many
 * were held back. Not locked: one per object that a single thread owns.
 */
struct log_limit {
	uint32_t interval_ms;
	uint64_t next_ms;              /* when the next line may go out */
	uint64_t suppressed;           /* lines held back since the last one */
};

#define LOG_LIMIT_INIT(ms) ((struct log_limit){ .interval_ms = (ms) })

/*
 * Called each time the condition occurs, now_ms on any monotonic clock.
 * Returns true when the line may be written now; then *suppressed is the
 * number of occurrences held back since the previous line (and starts
 * again from 0). Returns false, counting this one, otherwise.
 */
bool log_limit_pass(struct log_limit *l, uint64_t now_ms, uint64_t *suppressed);

/* Writes one access-log line (a JSON object without the newline) to stdout. */
void log_access(const char *json, size_t len);

/*
 * Appends s to out as the inside of a JSON string (quotes not included),
 * escaping ", \ and control characters, and replacing invalid UTF-8 by
 * U+FFFD. Returns the bytes written (excluding NUL), truncating at len - 1.
 */
size_t log_json_escape(char *out, size_t len, const char *s);

/* RFC 3339 UTC time with milliseconds of a CLOCK_REALTIME value, into out (>= 32). */
void log_format_time(char *out, size_t len, long long sec, long nsec);

#endif
