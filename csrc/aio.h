/* aio.h - an async endpoint's asyncio loop, run in steps from the worker's libuv loop.
 *
 * beam/_aio.py's Driver owns the asyncio loop and the tasks; this file polls the loop's
 * selector fd and its next timer in libuv, runs one step when either is due, and hands
 * each reported event to the server. The worker never blocks in Python's select, so
 * its sockets and the interleaved calls make progress together.
 * GIL: bw_aio_call, bw_aio_pull and bw_aio_cancel need it; the libuv callbacks here take
 * it themselves and call the event handler with it held. */
#ifndef BW_AIO_H
#define BW_AIO_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <uv.h>

/* beam/_aio.py RESULT, ERROR, TIMEOUT, CHUNK, END */
enum { BW_AIO_RESULT, BW_AIO_ERROR, BW_AIO_TIMEOUT, BW_AIO_CHUNK, BW_AIO_END };

/* token: what bw_aio_call was given; value: borrowed. After a step's events, after()
 * runs (GIL held). */
typedef void (*bw_aio_event_fn)(void *token, int kind, PyObject *value);

/* Start polling bw_worker.driver's loop (no-op without a driver). GIL held. */
int bw_aio_start(uv_loop_t *loop, bw_aio_event_fn on_event, void (*after)(void));
void bw_aio_stop(void);

/* Call the handler for token; -1 with a Python error set when the call itself raised. */
int bw_aio_call(void *token, PyObject *kwargs, bool stream);
/* A stream's next chunk (one CHUNK or final event follows). */
void bw_aio_pull(void *token);
/* Forget token (no event about it follows): cancel its task, close its generator. */
void bw_aio_cancel(void *token);

#endif
