/* http_path: normalisation of a request path for policy matching (see
 * http_path_normalize() in include/meshlet/http.h). */
#include "meshlet/http.h"

#include <errno.h>

#include "http-int.h"

/* ---- path normalisation ---------------------------------------------------- */

/* UTF-8 (RFC 3629) decoder state for percent-encoded bytes >= 0x80. */
struct utf8 {
	unsigned need;            /* continuation bytes still expected */
	unsigned char lo, hi;     /* range of the next one */
};

static bool utf8_step(struct utf8 *u, unsigned char b)
{
	if (u->need) {
		if (b < u->lo || b > u->hi)
			return false;
		u->need--;
		u->lo = 0x80;
		u->hi = 0xbf;
		return true;
	}
	u->lo = 0x80;
	u->hi = 0xbf;
	if (b >= 0xc2 && b <= 0xdf)
		u->need = 1;
	else if (b >= 0xe0 && b <= 0xef) {
		u->need = 2;
		if (b == 0xe0)
			u->lo = 0xa0;
		else if (b == 0xed)
			u->hi = 0x9f;
	} else if (b >= 0xf0 && b <= 0xf4) {
		u->need = 3;
		if (b == 0xf0)
			u->lo = 0x90;
		else if (b == 0xf4)
			u->hi = 0x8f;
	} else
		return false;
	return true;
}

static const char hexdig[] = "0123456789ABCDEF";

static void put_escape(char *out, size_t *o, unsigned v)
{
	out[(*o)++] = '%';
	out[(*o)++] = hexdig[v >> 4];
	out[(*o)++] = hexdig[v & 15];
}

/* Decodes one percent-escape at in[*i] into out. */
static int put_pct(const char *in, size_t len, size_t *i, char *out, size_t *o,
                   struct utf8 *u, const char **why)
{
	int h, l;
	unsigned v;

	if (*i + 2 >= len || (h = hexval((unsigned char)in[*i + 1])) < 0 ||
	    (l = hexval((unsigned char)in[*i + 2])) < 0) {
		*why = "invalid percent escape";
		return -EINVAL;
	}
	v = (unsigned)(h * 16 + l);
	*i += 3;
	if (v == '/' || v == '\\') {
		*why = "encoded slash or backslash";
		return -EINVAL;
	}
	if (v == 0) {
		*why = "NUL in path";
		return -EINVAL;
	}
	if (v < 0x20 || v == 0x7f) {
		*why = "encoded control character";
		return -EINVAL;
	}
	if (v >= 0x80 ? !utf8_step(u, (unsigned char)v) : u->need != 0) {
		*why = "invalid UTF-8";
		return -EINVAL;
	}
	if (is_unreserved((unsigned char)v))
		out[(*o)++] = (char)v;
	else
		put_escape(out, o, v);
	return 0;
}

/* Copies one raw path character, or refuses it. */
static int put_raw(unsigned char c, char *out, size_t *o, const struct utf8 *u,
                   const char **why)
{
	if (u->need)
		*why = "invalid UTF-8";
	else if (c == 0)
		*why = "NUL in path";
	else if (c == '\\')
		*why = "backslash in path";
	else if (c < 0x20 || c == 0x7f)
		*why = "control character in path";
	else if (c >= 0x80)
		*why = "non-ASCII byte in path";
	else if (c == ';')
		*why = "path parameter (';') in path";
	else if (!is_path_char(c))
		*why = "character not allowed in path";
	else {
		out[(*o)++] = (char)c;
		return 0;
	}
	return -EINVAL;
}

/*
 * An encoded '%' ("%25") anywhere: an app that decodes twice reads "%25XX"
 * as the byte XX and IIS-style servers read "%25uXXXX" as a UTF-16 code
 * unit, so no narrower rule is safe. A literal '%' in a path is rare
 * enough to be worth refusing.
 */
static bool double_encoded(const char *s, size_t len)
{
	size_t i;

	for (i = 0; i + 2 < len; i++)
		if (s[i] == '%' && s[i + 1] == '2' && s[i + 2] == '5')
			return true;
	return false;
}

/* Decodes the segment starting at in[*i] into out as "/segment". */
static int put_segment(const char *in, size_t len, size_t *i, char *out, size_t *o,
                       const char **why)
{
	struct utf8 u = { 0, 0x80, 0xbf };
	size_t start = *o;
	int r;

	out[(*o)++] = '/';
	while (*i < len && in[*i] != '/') {
		if (in[*i] == '%')
			r = put_pct(in, len, i, out, o, &u, why);
		else
			r = put_raw((unsigned char)in[(*i)++], out, o, &u, why);
		if (r < 0)
			return r;
	}
	if (u.need) {
		*why = "invalid UTF-8";
		return -EINVAL;
	}
	if (double_encoded(out + start + 1, *o - start - 1)) {
		*why = "double percent-encoding";
		return -EINVAL;
	}
	return 0;
}

int http_path_normalize(const char *in, size_t len, char *out, size_t cap, size_t *out_len,
                        const char **why)
{
	size_t i = 1, o = 0;
	bool trailing = false;

	if (cap < len + 2)
		return -ENOSPC;
	if (len > 0 && in[0] != '/') {
		*why = "path does not start with '/'";
		return -EINVAL;
	}
	while (i <= len && len > 0) {
		size_t seg = o, slen;
		const char *s;
		bool kept = false;
		int r = put_segment(in, len, &i, out, &o, why);

		if (r < 0)
			return r;
		s = out + seg + 1;
		slen = o - seg - 1;
		if (slen == 0 || (slen == 1 && s[0] == '.')) {
			o = seg;
		} else if (slen == 2 && s[0] == '.' && s[1] == '.') {
			o = seg;
			if (o == 0) {
				*why = "path climbs above the root";
				return -EINVAL;
			}
			do
				o--;
			while (out[o] != '/');
		} else
			kept = true;
		trailing = !kept;
		i++;   /* the '/' ending the segment, or past the end */
	}
	if (trailing || o == 0)
		out[o++] = '/';
	out[o] = '\0';
	*out_len = o;
	return 0;
}
