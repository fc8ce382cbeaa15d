/* stream.c - direct-then-queued writes to libuv streams. */
#include "stream.h"

#include <stdlib.h>

struct bw_write {
    uv_write_t req; /* first: the callback's uv_write_t* is the whole struct */
    char *data;
    size_t len;
};

int bw_stream_send(uv_stream_t *s, char *data, size_t len, int try_first, uv_write_cb cb,
                   size_t *queued) {
    uv_buf_t b = uv_buf_init(data, (unsigned)len);
    int n = try_first ? uv_try_write(s, &b, 1) : UV_EAGAIN;
    if (n < 0 && n != UV_EAGAIN) {
        free(data);
        return -1;
    }
    size_t done = n > 0 ? (size_t)n : 0;
    if (done == len) {
        free(data);
        return 1;
    }
    struct bw_write *w = malloc(sizeof *w);
    if (!w) {
        free(data);
        return -1;
    }
    w->data = data;
    w->len = len - done;
    b = uv_buf_init(data + done, (unsigned)w->len);
    if (uv_write(&w->req, s, &b, 1, cb) < 0) {
        free(data);
        free(w);
        return -1;
    }
    *queued += w->len;
    return 0;
}

size_t bw_stream_written(uv_write_t *req) {
    struct bw_write *w = (struct bw_write *)req;
    size_t len = w->len;
    free(w->data);
    free(w);
    return len;
}
