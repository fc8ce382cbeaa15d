/* aio.c - step an async endpoint's asyncio loop from libuv (see aio.h, beam/_aio.py). */
#include "aio.h"

#include "app.h"

static struct {
    uv_poll_t poll;   /* the asyncio selector's fd: I/O for the loop is ready */
    uv_timer_t timer; /* its next timer (or "ready now": 0) */
    PyObject *start, *pull, *cancel, *step, *delay; /* the driver's bound methods */
    bw_aio_event_fn on_event;
    void (*after)(void);
    bool active;
} aio;

static void on_timer(uv_timer_t *t);

/* Run a step soon: a ready callback was queued (libuv timers of 0 fire on the next turn,
 * and the turn's poll does not wait while one is due). */
static void kick(void) {
    if (aio.active)
        uv_timer_start(&aio.timer, on_timer, 0, 0);
}

/* Arm the timer for the driver's next due time (GIL held). */
static void schedule(void) {
    PyObject *d = PyObject_CallNoArgs(aio.delay);
    double s = d ? PyFloat_AsDouble(d) : 0.0;
    Py_XDECREF(d);
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(aio.delay);
        s = 0.001; /* keep stepping: a broken delay() must not strand the calls */
    }
    if (s < 0)
        uv_timer_stop(&aio.timer);
    else
        uv_timer_start(&aio.timer, on_timer, (uint64_t)(s * 1e3 + 0.999), 0);
}

/* Hand each (token, kind, value) of a step to the server. */
static void dispatch(PyObject *events) {
    Py_ssize_t n = PyList_Check(events) ? PyList_GET_SIZE(events) : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(events, i);
        if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3)
            continue;
        void *token = PyLong_AsVoidPtr(PyTuple_GET_ITEM(e, 0));
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(e, 1));
        if (PyErr_Occurred()) {
            PyErr_Clear();
            continue;
        }
        aio.on_event(token, (int)kind, PyTuple_GET_ITEM(e, 2));
    }
}

static void run_step(void) {
    bw_app_acquire_gil();
    PyObject *events = PyObject_CallNoArgs(aio.step);
    if (events)
        dispatch(events);
    else
        PyErr_WriteUnraisable(aio.step);
    Py_XDECREF(events);
    schedule();
    aio.after();
    bw_app_release_gil();
}

static void on_timer(uv_timer_t *t) {
    (void)t;
    run_step();
}

static void on_poll(uv_poll_t *p, int status, int events) {
    (void)p;
    (void)status;
    (void)events;
    run_step();
}

static PyObject *method(PyObject *o, const char *name) {
    return PyObject_GetAttrString(o, name);
}

int bw_aio_start(uv_loop_t *loop, bw_aio_event_fn on_event, void (*after)(void)) {
    PyObject *d = bw_worker.driver;
    if (!d)
        return 0;
    aio.on_event = on_event;
    aio.after = after;
    aio.start = method(d, "start");
    aio.pull = aio.start ? method(d, "pull") : NULL;
    aio.cancel = aio.pull ? method(d, "cancel") : NULL;
    aio.step = aio.cancel ? method(d, "step") : NULL;
    aio.delay = aio.step ? method(d, "delay") : NULL;
    PyObject *fd = aio.delay ? PyObject_CallMethod(d, "fileno", NULL) : NULL;
    long fdn = fd ? PyLong_AsLong(fd) : -1;
    Py_XDECREF(fd);
    if (fdn < 0 || PyErr_Occurred()) {
        PyErr_Print();
        return -1;
    }
    uv_timer_init(loop, &aio.timer);
    uv_poll_init(loop, &aio.poll, (int)fdn); /* an epoll fd is pollable: readable = events */
    uv_poll_start(&aio.poll, UV_READABLE, on_poll);
    uv_timer_start(&aio.timer, on_timer, 0, 0);
    aio.active = true;
    return 0;
}

void bw_aio_stop(void) {
    if (!aio.active)
        return;
    aio.active = false;
    uv_close((uv_handle_t *)&aio.poll, NULL);
    uv_close((uv_handle_t *)&aio.timer, NULL);
}

int bw_aio_call(void *token, PyObject *kwargs, bool stream) {
    PyObject *t = PyLong_FromVoidPtr(token);
    PyObject *r =
        t ? PyObject_CallFunctionObjArgs(aio.start, t, kwargs, stream ? Py_True : Py_False, NULL)
          : NULL;
    Py_XDECREF(t);
    kick();
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static void call_token(PyObject *fn, void *token) {
    PyObject *t = PyLong_FromVoidPtr(token);
    PyObject *r = t ? PyObject_CallOneArg(fn, t) : NULL;
    if (!r)
        PyErr_WriteUnraisable(fn);
    Py_XDECREF(r);
    Py_XDECREF(t);
    kick();
}

void bw_aio_pull(void *token) { call_token(aio.pull, token); }
void bw_aio_cancel(void *token) { call_token(aio.cancel, token); }
