/* request.h - one request frame in, one response frame out.
 * GIL: must be called with the GIL held (a worker takes it around each batch). */
#ifndef BW_REQUEST_H
#define BW_REQUEST_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

enum bw_req_outcome {
    BW_REQ_KEEP,  /* answered; the connection stays usable */
    BW_REQ_CLOSE, /* answered (if possible); the stream is out of sync, close it */
};

/* Decode `body`, run the request and append one framed response to `out`. */
enum bw_req_outcome bw_request_handle(const char *body, size_t len, msgpack_sbuffer *out);

/* Results that encode larger than this become ResultTooLarge errors (0: no limit). */
void bw_request_set_max_frame(size_t max_frame);

/* Append a framed error response for requests that never reached decoding
 * (oversized frames, shutdown). id is nil. */
void bw_request_error_frame(msgpack_sbuffer *out, const char *type, const char *message);

#endif
