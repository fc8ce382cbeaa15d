/* frame.h - the wire framing: 4-byte big-endian length + one msgpack body.
 * Pure functions over byte buffers (no I/O), so they are unit-tested directly. */
#ifndef BW_FRAME_H
#define BW_FRAME_H

#include <msgpack.h>
#include <stddef.h>

#define BW_FRAME_HEADER 4
#define BW_DEFAULT_MAX_FRAME (64u * 1024u * 1024u)
/* A response may exceed --max-frame by this much: its envelope (id, task_id, ok) around
 * a value as large as a request may be, e.g. an echo. Beyond it the worker answers
 * ResultTooLarge, and the router (which accepts up to max_frame + this) stays in sync. */
#define BW_FRAME_RESPONSE_SLACK 4096u

enum bw_frame_status {
    BW_FRAME_NEED_MORE, /* not a whole frame yet */
    BW_FRAME_OK,        /* body, body_len: the frame body; consumed: its full size */
    BW_FRAME_TOO_LARGE, /* announced length above max: the stream cannot be resynced */
};

enum bw_frame_status bw_frame_next(const char *buf, size_t len, size_t max_body,
                                   const char **body, size_t *body_len, size_t *consumed);

/* A growable byte buffer with a read offset: bytes are appended at the end and
 * consumed from the front without moving memory until compaction is worth it. */
struct bw_buf {
    char *data;
    size_t start, len, cap; /* live bytes are data[start .. start+len) */
};

int bw_buf_reserve(struct bw_buf *b, size_t extra); /* room for `extra` more bytes; 0/-1 */
void bw_buf_consume(struct bw_buf *b, size_t n);
void bw_buf_free(struct bw_buf *b);
static inline char *bw_buf_head(struct bw_buf *b) { return b->data + b->start; }
static inline char *bw_buf_tail(struct bw_buf *b) { return b->data + b->start + b->len; }

/* Framed output: a msgpack_sbuffer whose frames get their length patched in. */
size_t bw_frame_begin(msgpack_sbuffer *sb);          /* returns the header offset */
int bw_frame_end(msgpack_sbuffer *sb, size_t header); /* -1 if the body exceeds 4 GiB */

#endif
