/* frame.c - length-prefixed framing and the buffers around it. */
#include "frame.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

enum bw_frame_status bw_frame_next(const char *buf, size_t len, size_t max_body,
                                   const char **body, size_t *body_len, size_t *consumed) {
    if (len < BW_FRAME_HEADER)
        return BW_FRAME_NEED_MORE;
    uint32_t n = bw_load_be32((const unsigned char *)buf);
    /* Checked before any of the body is buffered: a hostile length costs nothing. */
    if ((size_t)n > max_body)
        return BW_FRAME_TOO_LARGE;
    if (len - BW_FRAME_HEADER < (size_t)n)
        return BW_FRAME_NEED_MORE;
    *body = buf + BW_FRAME_HEADER;
    *body_len = n;
    *consumed = BW_FRAME_HEADER + (size_t)n;
    return BW_FRAME_OK;
}

int bw_buf_reserve(struct bw_buf *b, size_t extra) {
    if (b->cap - b->start - b->len >= extra)
        return 0;
    /* Compact first: after many pipelined frames most of the buffer is consumed. */
    if (b->start > 0) {
        memmove(b->data, b->data + b->start, b->len);
        b->start = 0;
        if (b->cap - b->len >= extra)
            return 0;
    }
    if (extra > SIZE_MAX - b->len)
        return -1; /* len + extra would wrap and "succeed" with too little room */
    size_t want = b->len + extra, cap = b->cap ? b->cap : 4096;
    while (cap < want) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

void bw_buf_consume(struct bw_buf *b, size_t n) {
    b->start += n;
    b->len -= n;
    if (b->len == 0)
        b->start = 0;
}

void bw_buf_free(struct bw_buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

size_t bw_frame_begin(msgpack_sbuffer *sb) {
    static const char zero[BW_FRAME_HEADER];
    size_t at = sb->size;
    msgpack_sbuffer_write(sb, zero, sizeof zero);
    return at;
}

int bw_frame_end(msgpack_sbuffer *sb, size_t header) {
    size_t body = sb->size - header - BW_FRAME_HEADER;
    if (body > UINT32_MAX)
        return -1;
    bw_store_be32((unsigned char *)sb->data + header, (uint32_t)body);
    return 0;
}
