/*
 * http-int.h: what lib/http.c (the parser), lib/http_path.c (path
 * normalisation) and lib/http_head.c (lookups and serialisation of a parsed
 * head) share: ASCII character classes and field-name comparisons, without
 * locale and without allocation. Private to lib/; the interface is
 * include/meshlet/http.h.
 */
#ifndef MESHLET_LIB_HTTP_INT_H
#define MESHLET_LIB_HTTP_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* ---- character classes (ASCII, locale-free) ------------------------------ */

static inline bool is_alpha(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static inline bool is_digit(unsigned char c)
{
	return c >= '0' && c <= '9';
}

static inline int hexval(unsigned char c)
{
	if (is_digit(c))
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static inline unsigned char lower(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* RFC 9110 tchar. */
static inline bool is_tchar(unsigned char c)
{
	if (is_alpha(c) || is_digit(c))
		return true;
	switch (c) {
	case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
	case '-': case '.': case '^': case '_': case '`': case '|': case '~':
		return true;
	default:
		return false;
	}
}

/* RFC 3986 sub-delims. */
static inline bool is_sub_delim(unsigned char c)
{
	switch (c) {
	case '!': case '$': case '&': case '\'': case '(': case ')': case '*': case '+':
	case ',': case ';': case '=':
		return true;
	default:
		return false;
	}
}

/* Field value octets: HTAB, SP, VCHAR, obs-text. */
static inline bool is_value_char(unsigned char c)
{
	return c == '\t' || (c >= 0x20 && c != 0x7f);
}

static inline bool is_ows(unsigned char c)
{
	return c == ' ' || c == '\t';
}

static inline bool is_unreserved(unsigned char c)
{
	return is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_' || c == '~';
}

/* pchar minus pct-encoded and ';' (refused: path parameters). */
static inline bool is_path_char(unsigned char c)
{
	return is_unreserved(c) || (is_sub_delim(c) && c != ';') || c == ':' || c == '@';
}

/* Characters of a host[:port] (reg-name, IP literal, port). */
static inline bool is_host_char(unsigned char c)
{
	return is_unreserved(c) || is_sub_delim(c) || c == ':' || c == '[' || c == ']' ||
	       c == '%';
}

/* Case-insensitive, '_' == '-': how CGI-style apps compare field names. */
static inline bool name_eq_loose(const char *a, size_t alen, const char *b)
{
	size_t i;

	if (strlen(b) != alen)
		return false;
	for (i = 0; i < alen; i++) {
		unsigned char x = lower((unsigned char)a[i]), y = lower((unsigned char)b[i]);

		if (x == '_')
			x = '-';
		if (y == '_')
			y = '-';
		if (x != y)
			return false;
	}
	return true;
}

static inline bool name_eq(const char *a, size_t alen, const char *b)
{
	size_t i;

	if (strlen(b) != alen)
		return false;
	for (i = 0; i < alen; i++)
		if (lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
			return false;
	return true;
}

static inline bool mem_eq(const char *a, size_t alen, const char *b)
{
	return alen == strlen(b) && memcmp(a, b, alen) == 0;
}

static inline bool mem_ieq(const char *a, size_t alen, const char *b, size_t blen)
{
	size_t i;

	if (alen != blen)
		return false;
	for (i = 0; i < alen; i++)
		if (lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
			return false;
	return true;
}

/*
 * Next element of a comma-separated list in [*s, end), OWS trimmed.
 * Returns false at the end. Empty elements come back with len 0.
 */
static inline bool list_next(const char **s, const char *end, const char **tok, size_t *len)
{
	const char *p = *s, *e;

	if (p > end)
		return false;
	while (p < end && is_ows((unsigned char)*p))
		p++;
	e = p;
	while (e < end && *e != ',')
		e++;
	*s = e + 1;
	*tok = p;
	while (e > p && is_ows((unsigned char)e[-1]))
		e--;
	*len = (size_t)(e - p);
	return true;
}

/* close, keep-alive and upgrade: kept in Connection, name no field to drop. */
static inline bool standard_option(const char *t, size_t tl)
{
	return mem_ieq(t, tl, "close", 5) || mem_ieq(t, tl, "keep-alive", 10) ||
	       mem_ieq(t, tl, "upgrade", 7);
}

static inline bool is_token(const char *s, size_t len)
{
	size_t i;

	if (len == 0)
		return false;
	for (i = 0; i < len; i++)
		if (!is_tchar((unsigned char)s[i]))
			return false;
	return true;
}

#endif
