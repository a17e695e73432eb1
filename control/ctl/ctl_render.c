/* meshletctl output: aligned tables and indented JSON (see ctl.h). */
#include "ctl.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- tables */


char *ctl_cell_dup(const char *s)
{
	char *d = strdup(s ? s : "");

	if (!d) {
		fputs("meshletctl: out of memory\n", stderr);
		exit(EXIT_USAGE);
	}
	for (char *p = d; *p; p++)         /* no terminal control characters from the wire */
		if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
			*p = '?';
	return d;
}

void ctl_table_init(struct ctl_table *t, size_t ncols)
{
	memset(t, 0, sizeof(*t));
	t->ncols = ncols;
}

/* Adds a row of t->ncols cells (copied). The first row is the header. */
void ctl_table_add(struct ctl_table *t, const char *const *cells)
{
	if (t->nrows == t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 8;
		char **nc = realloc(t->cells, cap * t->ncols * sizeof(char *));

		if (!nc) {
			fputs("meshletctl: out of memory\n", stderr);
			exit(EXIT_USAGE);
		}
		t->cells = nc;
		t->cap = cap;
	}
	for (size_t c = 0; c < t->ncols; c++)
		t->cells[t->nrows * t->ncols + c] = ctl_cell_dup(cells[c]);
	t->nrows++;
}

void ctl_table_print(struct ctl_table *t, FILE *out)
{
	size_t w[64] = { 0 };

	for (size_t r = 0; r < t->nrows; r++)
		for (size_t c = 0; c < t->ncols && c < 64; c++) {
			size_t l = strlen(t->cells[r * t->ncols + c]);

			if (l > w[c])
				w[c] = l;
		}
	for (size_t r = 0; r < t->nrows; r++) {
		for (size_t c = 0; c < t->ncols; c++) {
			const char *s = t->cells[r * t->ncols + c];

			if (c + 1 == t->ncols)
				fprintf(out, "%s", s);
			else
				fprintf(out, "%-*s  ", (int)w[c < 64 ? c : 63], s);
		}
		fputc('\n', out);
	}
}

void ctl_table_free(struct ctl_table *t)
{
	for (size_t i = 0; i < t->nrows * t->ncols; i++)
		free(t->cells[i]);
	free(t->cells);
	memset(t, 0, sizeof(*t));
}

/* A JSON value as a table cell (malloc'd): strings as is, arrays joined
 * with ",", objects as k=v pairs, null and empty as "-". */
char *ctl_json_cell(const json_t *v)
{
	char num[64];

	if (!v || json_is_null(v))
		return ctl_cell_dup("-");
	if (json_is_string(v))
		return ctl_cell_dup(json_string_length(v) ? json_string_value(v) : "-");
	if (json_is_integer(v)) {
		snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
		return ctl_cell_dup(num);
	}
	if (json_is_real(v)) {
		snprintf(num, sizeof(num), "%g", json_real_value(v));
		return ctl_cell_dup(num);
	}
	if (json_is_boolean(v))
		return ctl_cell_dup(json_is_true(v) ? "true" : "false");
	if (json_is_array(v) || json_is_object(v)) {
		size_t cap = 64, len = 0;
		char *s = malloc(cap);
		bool first = true;
		size_t i;
		const char *k;
		json_t *e;

		if (!s)
			return ctl_cell_dup("?");
		s[0] = '\0';
#define APPEND(str) do { \
		const char *a_ = (str); size_t al_ = strlen(a_); \
		while (len + al_ + 1 > cap) { char *ns_ = realloc(s, cap *= 2); if (!ns_) { free(s); return ctl_cell_dup("?"); } s = ns_; } \
		memcpy(s + len, a_, al_ + 1); len += al_; \
	} while (0)
		if (json_is_array(v)) {
			json_array_foreach((json_t *)v, i, e) {
				char *c = ctl_json_cell(e);

				if (!first)
					APPEND(",");
				APPEND(c);
				free(c);
				first = false;
			}
		} else {
			json_object_foreach((json_t *)v, k, e) {
				char *c = ctl_json_cell(e);

				if (!first)
					APPEND(",");
				APPEND(k);
				APPEND("=");
				APPEND(c);
				free(c);
				first = false;
			}
		}
#undef APPEND
		if (first) {
			free(s);
			return ctl_cell_dup("-");
		}
		{
			char *d = ctl_cell_dup(s);

			free(s);
			return d;
		}
	}
	return ctl_cell_dup("?");
}

static void upper_header(char *dst, size_t len, const char *key)
{
	size_t i;

	for (i = 0; key[i] && i + 1 < len; i++)
		dst[i] = (char)toupper((unsigned char)key[i]);
	dst[i] = '\0';
}

/*
 * Prints an array of objects as a table: the preferred columns that any
 * element has, then (unless only_preferred and some preferred column was
 * found) every other key in the order first seen, so that fields the CLI
 * does not know about still show. Non-object elements are printed one per
 * line.
 */
void ctl_print_list(const json_t *arr, const char *const *preferred, bool only_preferred,
                    FILE *out)
{
	const char *cols[64];
	size_t ncols = 0, i;
	json_t *e;
	struct ctl_table t;

	for (size_t p = 0; preferred && preferred[p]; p++)
		json_array_foreach((json_t *)arr, i, e)
			if (json_is_object(e) && json_object_get(e, preferred[p])) {
				if (ncols < 64)
					cols[ncols++] = preferred[p];
				break;
			}
	if (ncols > 0 && only_preferred)
		goto header;
	json_array_foreach((json_t *)arr, i, e) {
		const char *k;
		json_t *v;

		if (!json_is_object(e)) {
			char *c = ctl_json_cell(e);

			fprintf(out, "%s\n", c);
			free(c);
			continue;
		}
		json_object_foreach(e, k, v) {
			bool seen = false;

			for (size_t c = 0; c < ncols; c++)
				if (strcmp(cols[c], k) == 0)
					seen = true;
			if (!seen && ncols < 64)
				cols[ncols++] = k;
		}
	}
header:
	if (ncols == 0) {
		if (json_array_size(arr) == 0)
			fprintf(out, "(none)\n");
		return;
	}
	ctl_table_init(&t, ncols);
	{
		char hdr[64][64];
		const char *row[64];

		for (size_t c = 0; c < ncols; c++) {
			upper_header(hdr[c], sizeof(hdr[c]), cols[c]);
			row[c] = hdr[c];
		}
		ctl_table_add(&t, row);
	}
	json_array_foreach((json_t *)arr, i, e) {
		char *row[64];

		if (!json_is_object(e))
			continue;
		for (size_t c = 0; c < ncols; c++)
			row[c] = ctl_json_cell(json_object_get(e, cols[c]));
		ctl_table_add(&t, (const char *const *)row);
		for (size_t c = 0; c < ncols; c++)
			free(row[c]);
	}
	ctl_table_print(&t, out);
	ctl_table_free(&t);
}

/* Prints an object's scalar fields as one table row (preferred keys first),
 * and each array of objects it holds as a table of its own. */
void ctl_print_object(const json_t *obj, const char *const *preferred, FILE *out)
{
	json_t *arr = json_array();
	const char *k;
	json_t *v;
	bool printed = false;

	if (!json_is_object(obj)) {
		if (json_is_array(obj)) {
			ctl_print_list(obj, preferred, false, out);
		} else if (obj) {
			char *c = ctl_json_cell(obj);

			fprintf(out, "%s\n", c);
			free(c);
		}
		json_decref(arr);
		return;
	}
	{
		json_t *scalars = json_object();

		json_object_foreach((json_t *)obj, k, v) {
			bool list = json_is_array(v) && json_array_size(v) > 0 &&
			            json_is_object(json_array_get(v, 0));

			if (!list)
				json_object_set(scalars, k, v);
		}
		if (json_object_size(scalars)) {
			json_array_append_new(arr, scalars);
			ctl_print_list(arr, preferred, false, out);
			printed = true;
		} else {
			json_decref(scalars);
		}
	}
	json_object_foreach((json_t *)obj, k, v) {
		if (json_is_array(v) && json_array_size(v) > 0 && json_is_object(json_array_get(v, 0))) {
			if (printed)
				fputc('\n', out);
			ctl_print_list(v, NULL, false, out);
			printed = true;
		}
	}
	json_decref(arr);
}

void ctl_print_json(const json_t *v)
{
	if (!v) {
		return;
	}
	json_dumpf(v, stdout, JSON_INDENT(2) | JSON_ENCODE_ANY);
	fputc('\n', stdout);
}
