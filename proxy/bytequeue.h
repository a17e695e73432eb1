/*
 * bytequeue: bytes one side of a proxied request has received and the
 * other side has not taken yet, as a list of copied pieces. HTTP/2 streams
 * (h2flow.c) and pooled HTTP/1.1 requests (httpflow.c) hold their bodies
 * in one each; how much may be held is their business (flow-control
 * windows, read-ahead limits), the queue only counts it.
 */
#ifndef MESHLET_PROXY_BYTEQUEUE_H
#define MESHLET_PROXY_BYTEQUEUE_H

#include <stddef.h>

struct bq_piece;

struct bytequeue {
	struct bq_piece *first, *last;
	size_t len;                     /* bytes held */
};

/* Appends a copy of data (len > 0). Returns 0, or -ENOMEM (q unchanged). */
int bq_add(struct bytequeue *q, const void *data, size_t len);

/* Moves up to cap bytes from the front of q into buf. Returns how many. */
size_t bq_take(struct bytequeue *q, void *buf, size_t cap);

/* Drops everything q holds. */
void bq_clear(struct bytequeue *q);

#endif
