/* request.c - decode a request, call the handler, encode the response.
 *
 * The response is built straight into the connection's output buffer. When a result
 * cannot be encoded, the partial bytes are rolled back and an UnsupportedType error
 * takes their place (a ResultTooLarge error when it encodes above --max-frame), so a
 * client always gets exactly one well-formed frame it accepts. Streams follow the same
 * rule per chunk frame; a chunk that cannot be sent ends its stream with that error. */
#define _GNU_SOURCE
#include "request.h"

#include <stdio.h>
#include <string.h>
#include <sys/time.h>

#include "aio.h"
#include "app.h"
#include "codec.h"
#include "frame.h"
#include "mp.h"
#include "util.h"

static msgpack_zone zone;
static bool zone_ready;
static size_t max_frame; /* largest response body we send; 0: no limit */

/* A request's id, packed (msgpack nil when it had none), echoed in every frame. */
struct rid {
    const char *p;
    size_t n;
};
static const struct rid NIL_ID = {"\xc0", 1};

struct bw_call {
    char *id;
    size_t id_len;
    char task_id[BW_ID_LEN];
    PyObject *gen;     /* a sync generator being streamed (NULL: async call) */
    double t0;         /* bw_now_ms() when the handler was called */
    unsigned long long chunks;
    bool stream, async;
    bool counted;      /* counts in the worker's calls in progress until freed */
    void *owner;
};

/* Calls this worker has in progress (sync, streaming or async), published in memory
 * shared with the host: a long call is activity too, so its replica is not retired as
 * idle mid-call (host.c). */
static unsigned long long in_progress;

static void in_progress_add(int d) {
    in_progress += (unsigned long long)(long long)d;
    if (bw_worker.shared_in_call)
        __atomic_store_n(bw_worker.shared_in_call, in_progress, __ATOMIC_RELAXED);
}

void bw_request_set_max_frame(size_t n) { max_frame = n; }

static struct rid call_rid(const struct bw_call *k) { return (struct rid){k->id, k->id_len}; }

/* Begin a framed response map of n entries whose first one is id and, unless ok is
 * NULL (a chunk frame), the second is ok. Returns the header offset for bw_frame_end. */
static size_t frame_begin(msgpack_sbuffer *out, msgpack_packer *pk, struct rid id,
                          const bool *ok, size_t n) {
    msgpack_packer_init(pk, out, msgpack_sbuffer_write);
    size_t h = bw_frame_begin(out);
    msgpack_pack_map(pk, n);
    bw_mp_str(pk, "id");
    msgpack_sbuffer_write(out, id.p, id.n);
    if (ok)
        bw_mp_kv_bool(pk, "ok", *ok);
    return h;
}

static size_t response_begin(msgpack_sbuffer *out, msgpack_packer *pk, struct rid id, bool ok,
                             size_t n) {
    return frame_begin(out, pk, id, &ok, n);
}

static void error_frame(msgpack_sbuffer *out, struct rid id, const char *task_id,
                        const char *type, const char *message, const char *tb) {
    msgpack_packer packer, *pk = &packer;
    size_t h = response_begin(out, pk, id, false, task_id ? 4 : 3);
    if (task_id)
        bw_mp_kv_str(pk, "task_id", task_id);
    bw_mp_str(pk, "error");
    msgpack_pack_map(pk, 3);
    bw_mp_kv_str(pk, "type", type);
    bw_mp_kv_str(pk, "message", message);
    bw_mp_kv_str(pk, "traceback", tb ? tb : "");
    bw_frame_end(out, h);
}

void bw_request_error_frame(msgpack_sbuffer *out, const char *type, const char *message) {
    error_frame(out, NIL_ID, NULL, type, message, NULL);
}

static void timeout_frame(msgpack_sbuffer *out, struct rid id, const char *task_id) {
    char msg[128];
    snprintf(msg, sizeof msg, "handler ran longer than the timeout of %gs", bw_worker.timeout_s);
    error_frame(out, id, task_id, "Timeout", msg, NULL);
}

/* The handler raised `value` (borrowed; NULL: unknown): its type, message, traceback. */
static void exception_value_frame(msgpack_sbuffer *out, struct rid id, const char *task_id,
                                  PyObject *value, bool timed_out) {
    if (timed_out || (value && PyErr_GivenExceptionMatches(value, bw_worker.timeout_error))) {
        timeout_frame(out, id, task_id);
        return;
    }
    PyObject *d = value ? PyObject_CallOneArg(bw_worker.describe_exc, value) : NULL;
    const char *t = NULL, *m = NULL, *trace = NULL;
    if (d && PyTuple_Check(d) && PyTuple_GET_SIZE(d) == 3) {
        t = PyUnicode_AsUTF8(PyTuple_GET_ITEM(d, 0));
        m = PyUnicode_AsUTF8(PyTuple_GET_ITEM(d, 1));
        trace = PyUnicode_AsUTF8(PyTuple_GET_ITEM(d, 2));
    }
    PyErr_Clear();
    error_frame(out, id, task_id, t ? t : "Exception", m ? m : "", trace);
    Py_XDECREF(d);
}

/* The pending Python error, as above. */
static void exception_frame(msgpack_sbuffer *out, struct rid id, const char *task_id,
                            bool timed_out) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && tb)
        PyException_SetTraceback(value, tb);
    exception_value_frame(out, id, task_id, value, timed_out);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* After a value was packed from header offset h: keep it, or replace it with an error
 * frame when it could not be encoded (rc < 0) or is too large for a peer to accept.
 * Returns 0 when the frame was kept. */
static int value_frame_end(msgpack_sbuffer *out, size_t h, int rc, char *err, size_t errlen,
                           struct rid id, const char *task_id) {
    if (rc < 0) {
        out->size = h; /* roll back the partial frame */
        error_frame(out, id, task_id, "UnsupportedType", err, NULL);
        return -1;
    }
    if (max_frame && out->size - h - BW_FRAME_HEADER > max_frame + BW_FRAME_RESPONSE_SLACK) {
        /* A peer refuses frames above the limit and cannot resync after one (the router
         * would have to drop the connection): answer an error the size of a line. */
        size_t body = out->size - h - BW_FRAME_HEADER;
        out->size = h;
        snprintf(err, errlen, "the result is %zu bytes encoded, above the frame limit of %zu "
                 "bytes (--max-frame; responses may exceed it by %u)", body, max_frame,
                 BW_FRAME_RESPONSE_SLACK);
        error_frame(out, id, task_id, "ResultTooLarge", err, NULL);
        return -1;
    }
    bw_frame_end(out, h);
    return 0;
}

static void result_frame(msgpack_sbuffer *out, struct rid id, const char *task_id,
                         PyObject *result) {
    char err[512];
    msgpack_packer pk;
    size_t h = response_begin(out, &pk, id, true, 4);
    bw_mp_kv_str(&pk, "task_id", task_id);
    bw_mp_str(&pk, "result");
    int rc = bw_codec_from_py(&pk, result, err, sizeof err);
    value_frame_end(out, h, rc, err, sizeof err, id, task_id);
}

/* {"id", "chunk"} (the first also carries task_id). 0, or -1: an error frame ended it. */
static int chunk_frame(msgpack_sbuffer *out, struct bw_call *k, PyObject *value) {
    char err[512];
    msgpack_packer pk;
    bool first = k->chunks++ == 0;
    size_t h = frame_begin(out, &pk, call_rid(k), NULL, first ? 3 : 2);
    if (first)
        bw_mp_kv_str(&pk, "task_id", k->task_id);
    bw_mp_str(&pk, "chunk");
    int rc = bw_codec_from_py(&pk, value, err, sizeof err);
    return value_frame_end(out, h, rc, err, sizeof err, call_rid(k), k->task_id);
}

/* The last frame of a stream that ended well: ok, result nil, and how many chunks. */
static void end_frame(msgpack_sbuffer *out, struct bw_call *k) {
    msgpack_packer pk;
    size_t h = response_begin(out, &pk, call_rid(k), true, 5);
    bw_mp_kv_str(&pk, "task_id", k->task_id);
    bw_mp_str(&pk, "result");
    msgpack_pack_nil(&pk);
    bw_mp_kv_int(&pk, "chunks", (long long)k->chunks);
    bw_frame_end(out, h);
}

/* ---- timeouts of sync code ----------------------------------------------------------- */

static void arm_timer(double seconds) {
    struct itimerval it = {{0, 0}, {(time_t)seconds,
                                    (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)}};
    if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0)
        it.it_value.tv_usec = 1;
    setitimer(ITIMER_REAL, &it, NULL);
}

static void disarm_timer(void) {
    struct itimerval it = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &it, NULL);
}

/* Run fn(arg) with what is left of the endpoint's timeout since t0 (SIGALRM raises
 * TaskTimeout inside it). *timed_out: it failed and the time is up. NULL without an
 * error set is fn's own answer (a generator's end). */
static PyObject *timed(PyObject *(*fn)(void *), void *arg, double t0, bool *timed_out) {
    double limit = bw_worker.timeout_s;
    *timed_out = false;
    if (limit <= 0)
        return fn(arg);
    double left = limit - (bw_now_ms() - t0) / 1e3;
    if (left <= 0) {
        *timed_out = true;
        return NULL;
    }
    arm_timer(left);
    PyObject *result = fn(arg);
    disarm_timer();
    /* The alarm may have fired between return and disarm: run the pending Python
     * handler now, not inside the next request, and judge by the clock. */
    if (!result) {
        *timed_out = PyErr_Occurred() && bw_now_ms() - t0 >= limit * 1e3;
    } else if (PyErr_CheckSignals() < 0) {
        PyErr_Clear();
        *timed_out = bw_now_ms() - t0 >= limit * 1e3;
        if (*timed_out)
            Py_CLEAR(result);
    }
    return result;
}

/* ---- calls --------------------------------------------------------------------------- */

/* kwargs must be a map with str keys; the handler gets them as keyword arguments. */
static PyObject *build_kwargs(const msgpack_object *kw, char *err, size_t errlen) {
    if (!kw || kw->type == MSGPACK_OBJECT_NIL)
        return PyDict_New();
    if (kw->type != MSGPACK_OBJECT_MAP) {
        snprintf(err, errlen, "kwargs must be a map");
        return NULL;
    }
    for (uint32_t i = 0; i < kw->via.map.size; i++)
        if (kw->via.map.ptr[i].key.type != MSGPACK_OBJECT_STR) {
            snprintf(err, errlen, "kwargs keys must be strings");
            return NULL;
        }
    return bw_codec_to_py(kw, err, errlen);
}

static struct bw_call *call_new(struct rid id, const char *task_id, bool stream, bool async) {
    struct bw_call *k = calloc(1, sizeof *k);
    if (!k || !(k->id = malloc(id.n))) {
        free(k);
        return NULL;
    }
    memcpy(k->id, id.p, id.n);
    k->id_len = id.n;
    memcpy(k->task_id, task_id, BW_ID_LEN);
    k->stream = stream;
    k->async = async;
    k->t0 = bw_now_ms();
    return k;
}

struct invoke {
    PyObject *kwargs;
    bool stream;
};

/* The sync handler. A generator is streamed when the request asked (returned as is),
 * else collected into a list here, under the same timeout. */
static PyObject *invoke(void *arg) {
    struct invoke *a = arg;
    PyObject *empty = PyTuple_New(0);
    PyObject *result = empty ? PyObject_Call(bw_worker.func, empty, a->kwargs) : NULL;
    Py_XDECREF(empty);
    if (result && PyGen_Check(result) && !a->stream) {
        PyObject *list = PySequence_List(result); /* exhausted or raised: finished */
        Py_DECREF(result);
        result = list;
    }
    return result;
}

static enum bw_req_outcome start_async(msgpack_sbuffer *out, struct rid id, const char *task_id,
                                       PyObject *kwargs, bool stream, struct bw_call **call) {
    struct bw_call *k = call_new(id, task_id, stream, true);
    if (!k) {
        error_frame(out, id, task_id, "MemoryError", "out of memory", NULL);
        return BW_REQ_KEEP;
    }
    if (bw_aio_call(k, kwargs, stream) < 0) {
        exception_frame(out, id, task_id, false);
        bw_call_free(k);
        return BW_REQ_KEEP;
    }
    *call = k;
    return BW_REQ_PENDING;
}

static enum bw_req_outcome run_sync(msgpack_sbuffer *out, struct rid id, const char *task_id,
                                    PyObject *kwargs, bool stream, struct bw_call **call) {
    struct invoke a = {kwargs, stream};
    bool timed_out;
    double t0 = bw_now_ms();
    PyObject *result = timed(invoke, &a, t0, &timed_out);
    if (!result) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "handler timed out");
        exception_frame(out, id, task_id, timed_out);
        return BW_REQ_KEEP;
    }
    if (stream && PyGen_Check(result)) {
        struct bw_call *k = call_new(id, task_id, true, false);
        if (k) {
            k->t0 = t0;
            k->gen = result; /* the reference moves to the call */
            *call = k;
            return BW_REQ_PENDING;
        }
        PyErr_NoMemory();
        exception_frame(out, id, task_id, false);
    } else {
        result_frame(out, id, task_id, result);
    }
    Py_DECREF(result);
    return BW_REQ_KEEP;
}

static enum bw_req_outcome call_handler(msgpack_sbuffer *out, struct rid id,
                                        const msgpack_object *kw, bool stream,
                                        struct bw_call **call) {
    char err[512], task_id[BW_ID_LEN];
    PyObject *kwargs = build_kwargs(kw, err, sizeof err);
    if (!kwargs) {
        error_frame(out, id, NULL, "BadRequest", err, NULL);
        return BW_REQ_KEEP;
    }
    bw_id_new(task_id);
    if (bw_worker.context_factory) {
        PyObject *ctx = PyObject_CallFunction(bw_worker.context_factory, "s", task_id);
        if (!ctx || PyDict_SetItemString(kwargs, "context", ctx) < 0) {
            Py_XDECREF(ctx);
            Py_DECREF(kwargs);
            exception_frame(out, id, task_id, false);
            return BW_REQ_KEEP;
        }
        Py_DECREF(ctx);
    }
    bw_worker.requests++;
    if (bw_worker.shared_requests)
        *bw_worker.shared_requests = bw_worker.requests;
    in_progress_add(1);
    enum bw_req_outcome o = bw_worker.driver
                                ? start_async(out, id, task_id, kwargs, stream, call)
                                : run_sync(out, id, task_id, kwargs, stream, call);
    if (o == BW_REQ_PENDING)
        (*call)->counted = true; /* over when it is freed */
    else
        in_progress_add(-1);
    Py_DECREF(kwargs);
    return o;
}

/* ---- what runs on after bw_request_handle -------------------------------------------- */

bool bw_call_is_stream(const struct bw_call *k) { return k->stream; }
bool bw_call_is_async(const struct bw_call *k) { return k->async; }
void bw_call_set_owner(struct bw_call *k, void *owner) { k->owner = owner; }
void *bw_call_owner(const struct bw_call *k) { return k->owner; }

static PyObject *next_chunk(void *gen) { return PyIter_Next(gen); }

int bw_call_pull(struct bw_call *k, msgpack_sbuffer *out) {
    bool timed_out;
    PyObject *v = timed(next_chunk, k->gen, k->t0, &timed_out);
    if (v) {
        int rc = chunk_frame(out, k, v);
        Py_DECREF(v);
        return rc == 0;
    }
    if (timed_out || PyErr_Occurred()) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "handler timed out");
        exception_frame(out, call_rid(k), k->task_id, timed_out);
    } else {
        end_frame(out, k);
    }
    Py_CLEAR(k->gen); /* finished: nothing left to close */
    return 0;
}

int bw_call_event(struct bw_call *k, int kind, PyObject *value, msgpack_sbuffer *out) {
    switch (kind) {
    case BW_AIO_RESULT:
        result_frame(out, call_rid(k), k->task_id, value);
        return 0;
    case BW_AIO_CHUNK:
        if (chunk_frame(out, k, value) == 0)
            return 1;
        bw_aio_cancel(k); /* the stream ended on this side: close its generator */
        return 0;
    case BW_AIO_END:
        end_frame(out, k);
        return 0;
    case BW_AIO_TIMEOUT:
        timeout_frame(out, call_rid(k), k->task_id);
        return 0;
    default:
        exception_value_frame(out, call_rid(k), k->task_id, value, false);
        return 0;
    }
}

bool bw_call_overdue(const struct bw_call *k) {
    return !k->async && bw_worker.timeout_s > 0 && bw_now_ms() - k->t0 >= bw_worker.timeout_s * 1e3;
}

void bw_call_expire(struct bw_call *k, msgpack_sbuffer *out) {
    timeout_frame(out, call_rid(k), k->task_id);
}

void bw_call_free(struct bw_call *k) {
    if (k->gen) {
        PyObject *r = PyObject_CallMethod(k->gen, "close", NULL);
        if (!r) /* its finally: raised: reported like an error in a __del__ */
            PyErr_WriteUnraisable(k->gen);
        Py_XDECREF(r);
        Py_DECREF(k->gen);
    }
    if (k->counted)
        in_progress_add(-1);
    free(k->id);
    free(k);
}

/* ---- ping and stats ------------------------------------------------------------------ */

static void stats_frame(msgpack_sbuffer *out, struct rid id) {
    msgpack_packer pk;
    size_t h = response_begin(out, &pk, id, true, 3);
    bw_mp_str(&pk, "result");
    msgpack_pack_map(&pk, 6);
    bw_mp_kv_int(&pk, "pid", getpid());
    bw_mp_kv_int(&pk, "worker", bw_worker.index);
    bw_mp_kv_str(&pk, "container_id", bw_worker.container_id);
    bw_mp_kv_bool(&pk, "restored", bw_worker.restored);
    bw_mp_kv_int(&pk, "requests", (long long)bw_worker.requests);
    bw_mp_str(&pk, "profile");
    msgpack_sbuffer_write(out, bw_worker.profile, bw_worker.profile_len);
    bw_frame_end(out, h);
}

static void pong_frame(msgpack_sbuffer *out, struct rid id) {
    msgpack_packer pk;
    size_t h = response_begin(out, &pk, id, true, 3);
    bw_mp_kv_str(&pk, "result", "pong");
    bw_frame_end(out, h);
}

/* The id as sent, packed once: every frame of the answer repeats it. */
static struct rid pack_id(const msgpack_object *id, msgpack_sbuffer *buf) {
    if (!id)
        return NIL_ID;
    msgpack_packer pk;
    msgpack_packer_init(&pk, buf, msgpack_sbuffer_write);
    msgpack_pack_object(&pk, *id);
    return (struct rid){buf->data, buf->size};
}

static enum bw_req_outcome dispatch(const msgpack_object *req, msgpack_sbuffer *out,
                                    struct bw_call **call) {
    static msgpack_sbuffer idbuf;
    idbuf.size = 0;
    struct rid id = pack_id(bw_mp_get(req, "id"), &idbuf);
    const msgpack_object *type = bw_mp_get(req, "type");
    if (!type || bw_mp_is_str(type, "call"))
        return call_handler(out, id, bw_mp_get(req, "kwargs"),
                            bw_mp_true(bw_mp_get(req, "stream")), call);
    if (bw_mp_is_str(type, "ping"))
        pong_frame(out, id);
    else if (bw_mp_is_str(type, "stats"))
        stats_frame(out, id);
    else
        error_frame(out, id, NULL, "BadRequest",
                    "unknown request type (expected call, ping or stats)", NULL);
    return BW_REQ_KEEP;
}

enum bw_req_outcome bw_request_handle(const char *body, size_t len, msgpack_sbuffer *out,
                                      struct bw_call **call) {
    if (!zone_ready) {
        msgpack_zone_init(&zone, 4096);
        zone_ready = true;
    }
    msgpack_object req;
    enum bw_req_outcome outcome = BW_REQ_KEEP;
    *call = NULL;
    if (bw_mp_unpack_exact(body, len, &zone, &req) < 0) {
        error_frame(out, NIL_ID, NULL, "BadFrame",
                    "frame body is not exactly one msgpack value (or nests deeper than 32)", NULL);
        outcome = BW_REQ_CLOSE;
    } else if (req.type != MSGPACK_OBJECT_MAP) {
        error_frame(out, NIL_ID, NULL, "BadRequest", "request must be a msgpack map", NULL);
    } else {
        outcome = dispatch(&req, out, call);
    }
    msgpack_zone_clear(&zone);
    return outcome;
}
