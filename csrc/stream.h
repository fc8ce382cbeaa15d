/* stream.h - writing to a libuv stream without blocking: what the kernel takes at once
 * is written directly, the rest is queued with uv_write. Shared by the worker's server,
 * the HTTP front and the router. */
#ifndef BW_STREAM_H
#define BW_STREAM_H

#include <stddef.h>
#include <uv.h>

/* Send data[0..len) (malloc'd; ownership is taken in every case). try_first: attempt a
 * direct write (only when nothing is queued on s, or bytes would be reordered).
 * Returns 1 when all was written now, 0 when the rest was queued (*queued grows by that
 * many bytes; cb runs when it is written), -1 on error (the caller closes s). */
int bw_stream_send(uv_stream_t *s, char *data, size_t len, int try_first, uv_write_cb cb,
                   size_t *queued);

/* In a write callback: release the queued buffer; returns how many bytes it held. */
size_t bw_stream_written(uv_write_t *req);

#endif
