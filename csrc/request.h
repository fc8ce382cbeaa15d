/* request.h - one request frame in; one response frame out, or for a streamed answer a
 * sequence of chunk frames and then one final frame (docs/protocol.md, "Streaming").
 *
 * A request that cannot be answered before bw_request_handle returns (an async
 * handler's call, a streamed generator) becomes a struct bw_call, which the server keeps
 * in its connection's answer order and feeds: bw_call_pull for a sync generator,
 * bw_call_event for what the asyncio driver reports (csrc/aio.c).
 * GIL: everything here must be called with the GIL held. */
#ifndef BW_REQUEST_H
#define BW_REQUEST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

enum bw_req_outcome {
    BW_REQ_KEEP,    /* answered; the connection stays usable */
    BW_REQ_CLOSE,   /* answered (if possible); the stream is out of sync, close it */
    BW_REQ_PENDING, /* not answered yet: *call runs on (its frames come later) */
};

struct bw_call;

/* Decode `body`, run the request and append one framed response to `out`, or return
 * BW_REQ_PENDING with *call set (nothing appended). */
enum bw_req_outcome bw_request_handle(const char *body, size_t len, msgpack_sbuffer *out,
                                      struct bw_call **call);

/* Results that encode larger than this become ResultTooLarge errors (0: no limit). */
void bw_request_set_max_frame(size_t max_frame);

/* Append a framed error response for requests that never reached decoding
 * (oversized frames, shutdown). id is nil. */
void bw_request_error_frame(msgpack_sbuffer *out, const char *type, const char *message);

/* A stream sends chunk frames (false: an async call that answers once). */
bool bw_call_is_stream(const struct bw_call *k);
/* Runs on the asyncio driver (false: a sync generator, pulled with bw_call_pull). */
bool bw_call_is_async(const struct bw_call *k);
void bw_call_set_owner(struct bw_call *k, void *owner);
void *bw_call_owner(const struct bw_call *k);

/* Sync generator: pull one chunk and append its frame. Returns 1 while the stream goes
 * on, 0 once its final frame (end, error, Timeout) is appended. */
int bw_call_pull(struct bw_call *k, msgpack_sbuffer *out);
/* Driver event (kind: beam/_aio.py RESULT..END; value borrowed). Same return. */
int bw_call_event(struct bw_call *k, int kind, PyObject *value, msgpack_sbuffer *out);
/* A sync stream past the endpoint's timeout while it waits for its reader: append the
 * Timeout frame (the generator is closed by bw_call_free). */
bool bw_call_overdue(const struct bw_call *k);
void bw_call_expire(struct bw_call *k, msgpack_sbuffer *out);
/* Close a generator still open (its finally: runs) and free. The caller cancels an
 * async call on the driver first (bw_aio_cancel) if it did not finish. */
void bw_call_free(struct bw_call *k);

#endif
