/* request.c - decode a request, call the handler, encode the response.
 *
 * The response is built straight into the connection's output buffer. When a result
 * cannot be encoded, the partial bytes are rolled back and an UnsupportedType error
 * takes their place (a ResultTooLarge error when it encodes above --max-frame), so a
 * client always gets exactly one well-formed frame it accepts. */
#define _GNU_SOURCE
#include "request.h"

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>

#include "app.h"
#include "codec.h"
#include "frame.h"
#include "mp.h"
#include "util.h"

static msgpack_zone zone;
static bool zone_ready;
static size_t max_frame; /* largest response body we send; 0: no limit */

void bw_request_set_max_frame(size_t n) { max_frame = n; }

/* Begin a framed response map of n entries whose first two are id (echoed, or nil) and
 * ok. Returns the frame's header offset for bw_frame_end. */
static size_t response_begin(msgpack_sbuffer *out, msgpack_packer *pk, const msgpack_object *id,
                             bool ok, size_t n) {
    msgpack_packer_init(pk, out, msgpack_sbuffer_write);
    size_t h = bw_frame_begin(out);
    msgpack_pack_map(pk, n);
    bw_mp_str(pk, "id");
    if (id)
        msgpack_pack_object(pk, *id);
    else
        msgpack_pack_nil(pk);
    bw_mp_kv_bool(pk, "ok", ok);
    return h;
}

static void error_frame(msgpack_sbuffer *out, const msgpack_object *id, const char *task_id,
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
    error_frame(out, NULL, NULL, type, message, NULL);
}

/* The handler raised: report its type, message and traceback. */
static void exception_frame(msgpack_sbuffer *out, const msgpack_object *id, const char *task_id,
                            bool timed_out) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && tb)
        PyException_SetTraceback(value, tb);
    if (timed_out || (value && PyErr_GivenExceptionMatches(value, bw_worker.timeout_error))) {
        char msg[128];
        snprintf(msg, sizeof msg, "handler ran longer than the timeout of %gs", bw_worker.timeout_s);
        error_frame(out, id, task_id, "Timeout", msg, NULL);
    } else {
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
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

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

static void call_handler(msgpack_sbuffer *out, const msgpack_object *id, const msgpack_object *kw) {
    char err[512], task_id[BW_ID_LEN];
    PyObject *kwargs = build_kwargs(kw, err, sizeof err);
    if (!kwargs) {
        error_frame(out, id, NULL, "BadRequest", err, NULL);
        return;
    }
    bw_id_new(task_id);
    if (bw_worker.context_factory) {
        PyObject *ctx = PyObject_CallFunction(bw_worker.context_factory, "s", task_id);
        if (!ctx || PyDict_SetItemString(kwargs, "context", ctx) < 0) {
            Py_XDECREF(ctx);
            Py_DECREF(kwargs);
            exception_frame(out, id, task_id, false);
            return;
        }
        Py_DECREF(ctx);
    }
    bw_worker.requests++;
    if (bw_worker.shared_requests)
        *bw_worker.shared_requests = bw_worker.requests;
    double limit = bw_worker.timeout_s, t0 = 0;
    if (limit > 0) {
        t0 = bw_now_ms();
        arm_timer(limit);
    }
    if (bw_worker.shared_in_call) /* a long call is activity too (host.c) */
        __atomic_store_n(bw_worker.shared_in_call, 1, __ATOMIC_RELAXED);
    PyObject *empty = PyTuple_New(0);
    PyObject *result = empty ? PyObject_Call(bw_worker.func, empty, kwargs) : NULL;
    if (bw_worker.shared_in_call)
        __atomic_store_n(bw_worker.shared_in_call, 0, __ATOMIC_RELAXED);
    Py_XDECREF(empty);
    Py_DECREF(kwargs);
    bool timed_out = false;
    if (limit > 0) {
        disarm_timer();
        /* The alarm may have fired between return and disarm: run the pending Python
         * handler now, not inside the next request, and judge by the clock. */
        if (!result) {
            timed_out = bw_now_ms() - t0 >= limit * 1e3;
        } else if (PyErr_CheckSignals() < 0) {
            PyErr_Clear();
            timed_out = bw_now_ms() - t0 >= limit * 1e3;
            if (timed_out)
                Py_CLEAR(result);
        }
    }
    if (!result) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "handler timed out");
        exception_frame(out, id, task_id, timed_out);
        return;
    }
    msgpack_packer pk;
    size_t h = response_begin(out, &pk, id, true, 4);
    bw_mp_kv_str(&pk, "task_id", task_id);
    bw_mp_str(&pk, "result");
    if (bw_codec_from_py(&pk, result, err, sizeof err) < 0) {
        out->size = h; /* roll back the partial frame */
        error_frame(out, id, task_id, "UnsupportedType", err, NULL);
    } else if (max_frame && out->size - h - BW_FRAME_HEADER > max_frame + BW_FRAME_RESPONSE_SLACK) {
        /* A peer refuses frames above the limit and cannot resync after one (the router
         * would have to drop the connection): answer an error the size of a line. */
        size_t body = out->size - h - BW_FRAME_HEADER;
        out->size = h;
        snprintf(err, sizeof err, "the result is %zu bytes encoded, above the frame limit of %zu "
                 "bytes (--max-frame; responses may exceed it by %u)", body, max_frame,
                 BW_FRAME_RESPONSE_SLACK);
        error_frame(out, id, task_id, "ResultTooLarge", err, NULL);
    } else {
        bw_frame_end(out, h);
    }
    Py_DECREF(result);
}

static void stats_frame(msgpack_sbuffer *out, const msgpack_object *id) {
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

static void pong_frame(msgpack_sbuffer *out, const msgpack_object *id) {
    msgpack_packer pk;
    size_t h = response_begin(out, &pk, id, true, 3);
    bw_mp_kv_str(&pk, "result", "pong");
    bw_frame_end(out, h);
}

enum bw_req_outcome bw_request_handle(const char *body, size_t len, msgpack_sbuffer *out) {
    if (!zone_ready) {
        msgpack_zone_init(&zone, 4096);
        zone_ready = true;
    }
    msgpack_object req;
    enum bw_req_outcome outcome = BW_REQ_KEEP;
    if (bw_mp_unpack_exact(body, len, &zone, &req) < 0) {
        error_frame(out, NULL, NULL, "BadFrame",
                    "frame body is not exactly one msgpack value (or nests deeper than 32)", NULL);
        outcome = BW_REQ_CLOSE;
    } else if (req.type != MSGPACK_OBJECT_MAP) {
        error_frame(out, NULL, NULL, "BadRequest", "request must be a msgpack map", NULL);
    } else {
        const msgpack_object *id = bw_mp_get(&req, "id");
        const msgpack_object *type = bw_mp_get(&req, "type");
        if (!type || bw_mp_is_str(type, "call"))
            call_handler(out, id, bw_mp_get(&req, "kwargs"));
        else if (bw_mp_is_str(type, "ping"))
            pong_frame(out, id);
        else if (bw_mp_is_str(type, "stats"))
            stats_frame(out, id);
        else
            error_frame(out, id, NULL, "BadRequest",
                        "unknown request type (expected call, ping or stats)", NULL);
    }
    msgpack_zone_clear(&zone);
    return outcome;
}
