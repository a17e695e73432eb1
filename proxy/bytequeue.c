/* bytequeue: a FIFO of copied byte pieces (see bytequeue.h). */
#include "bytequeue.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct bq_piece {
	struct bq_piece *next;
	size_t off, len;
	char data[];
};

int bq_add(struct bytequeue *q, const void *data, size_t len)
{
	struct bq_piece *k = malloc(sizeof(*k) + len);

	if (!k)
		return -ENOMEM;
	k->next = NULL;
	k->off = 0;
	k->len = len;
	memcpy(k->data, data, len);
	if (q->last)
		q->last->next = k;
	else
		q->first = k;
	q->last = k;
	q->len += len;
	return 0;
}

size_t bq_take(struct bytequeue *q, void *buf, size_t cap)
{
	char *out = buf;
	size_t got = 0;

	while (got < cap && q->first) {
		struct bq_piece *k = q->first;
		size_t n = k->len - k->off < cap - got ? k->len - k->off : cap - got;

		memcpy(out + got, k->data + k->off, n);
		k->off += n;
		got += n;
		if (k->off == k->len) {
			q->first = k->next;
			if (!q->first)
				q->last = NULL;
			free(k);
		}
	}
	q->len -= got;
	return got;
}

void bq_clear(struct bytequeue *q)
{
	while (q->first) {
		struct bq_piece *k = q->first;

		q->first = k->next;
		free(k);
	}
	q->last = NULL;
	q->len = 0;
}
