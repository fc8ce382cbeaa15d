/* app.c - CPython embedding: interpreter start, app import, on_start, checkpoint
 * preparation and the per-start work. Per-request work is in request.c. */
#define _GNU_SOURCE
#include "app.h"

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <malloc.h>
#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "log.h"
#include "pylib.h"
#include "scrub.h"
#include "util.h"

struct bw_worker_state bw_worker;

static PyObject *runtime;    /* beam._runtime */
static PyObject *endpoint;   /* the Endpoint object */
static PyObject *config;     /* dict from _runtime.describe() */
static PyObject *on_start_value;
static PyThreadState *saved_ts;
static char last_error[8192];

/* Record the pending Python exception (with traceback) in last_error and clear it. */
static void capture_error(const char *what) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value)
        PyException_SetTraceback(value, tb);
    const char *text = NULL;
    PyObject *desc = NULL;
    if (value && runtime)
        desc = PyObject_CallMethod(runtime, "describe_exception", "O", value);
    if (desc && PyTuple_Check(desc) && PyTuple_GET_SIZE(desc) == 3)
        text = PyUnicode_AsUTF8(PyTuple_GET_ITEM(desc, 2));
    if (!text && value) {
        PyObject *s = PyObject_Str(value);
        snprintf(last_error, sizeof last_error, "%s: %s", what,
                 s ? PyUnicode_AsUTF8(s) : "unknown error");
        Py_XDECREF(s);
    } else {
        snprintf(last_error, sizeof last_error, "%s:\n%s", what, text ? text : "unknown error");
    }
    PyErr_Clear();
    Py_XDECREF(desc);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

const char *bw_app_error(void) { return last_error; }

static int status_failed(PyStatus st, const char *what) {
    if (!PyStatus_Exception(st))
        return 0;
    snprintf(last_error, sizeof last_error, "%s: %s%s%s", what, st.func ? st.func : "",
             st.func ? ": " : "", st.err_msg ? st.err_msg : "failed");
    return -1;
}

/* Call beam._runtime.<name>() for its effect. 0, or -1 with the error captured. */
static int call_runtime(const char *name, const char *what) {
    PyObject *r = PyObject_CallMethod(runtime, name, NULL);
    if (!r) {
        capture_error(what);
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

int bw_app_init(const char *python, bool scrub, double *elapsed_ms) {
    double t0 = bw_now_ms();
    PyPreConfig pre;
    PyPreConfig_InitPythonConfig(&pre);
    if (status_failed(Py_PreInitialize(&pre), "Python pre-initialisation"))
        return -1;
    if (scrub)
        bw_scrub_install();

    PyConfig cfg;
    PyConfig_InitPythonConfig(&cfg);
    cfg.parse_argv = 0;
    /* program_name decides sys.prefix: naming a venv's interpreter makes the embedded
     * Python see that venv's site-packages, exactly as that interpreter would. */
    PyStatus st = PyConfig_SetBytesString(&cfg, &cfg.program_name, python);
    if (!PyStatus_Exception(st)) {
        char *argv[] = {(char *)"beam-worker", NULL};
        st = PyConfig_SetBytesArgv(&cfg, 1, argv);
    }
    if (!PyStatus_Exception(st))
        st = Py_InitializeFromConfig(&cfg);
    PyConfig_Clear(&cfg);
    if (status_failed(st, "Python initialisation")) {
        /* Most often the stdlib of --python is another Python's: say which we embed. */
        char why[sizeof last_error];
        snprintf(why, sizeof why, "%s", last_error);
        bw_pylib_init_failed(python, why, last_error, sizeof last_error);
        return -1;
    }
    /* Before any import that needs an extension module (beam._runtime needs math): a
     * mismatched stdlib fails there with errors that do not name the cause. */
    if (bw_pylib_check(python, last_error, sizeof last_error) < 0)
        return -1;
    runtime = PyImport_ImportModule("beam._runtime");
    if (!runtime) {
        char lib[PATH_MAX + 256], what[PATH_MAX + 512];
        bw_pylib_describe(lib, sizeof lib);
        snprintf(what, sizeof what, "cannot import beam._runtime with %s (is the beam "
                 "package installed in the environment of --python?)", lib);
        capture_error(what);
        return -1;
    }
    if (call_runtime("configure_output", "cannot configure stdout/stderr") < 0)
        return -1;
    *elapsed_ms = bw_now_ms() - t0;
    return 0;
}

static long config_long(const char *key, long dflt) {
    PyObject *v = config ? PyDict_GetItemString(config, key) : NULL;
    long r = v ? PyLong_AsLong(v) : dflt;
    if (r == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return dflt;
    }
    return r;
}

int bw_app_workers(void) { return (int)config_long("workers", 1); }
bool bw_app_checkpoint_enabled(void) { return config_long("checkpoint_enabled", 0) != 0; }

void bw_app_gpu(char *buf, size_t cap) {
    PyObject *v = config ? PyDict_GetItemString(config, "gpu") : NULL;
    const char *s = v && PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (!s)
        PyErr_Clear();
    snprintf(buf, cap, "%s", s ? s : "");
}

double bw_app_timeout(void) {
    PyObject *v = config ? PyDict_GetItemString(config, "timeout") : NULL;
    return v ? PyFloat_AsDouble(v) : 0;
}

int bw_app_load(const char *spec, const char *volume_root, double *elapsed_ms) {
    double t0 = bw_now_ms();
    PyObject *r = PyObject_CallMethod(runtime, "load", "s", spec);
    if (!r) {
        capture_error("cannot load the app");
        return -1;
    }
    endpoint = PyTuple_GetItem(r, 0);
    PyObject *app_dir = PyTuple_GetItem(r, 1);
    Py_XINCREF(endpoint);
    PyObject *ok = NULL;
    if (endpoint && app_dir) {
        ok = PyObject_CallMethod(runtime, "prepare_volumes", "OOs", endpoint, app_dir,
                                 volume_root);
        if (ok) {
            Py_DECREF(ok);
            ok = PyObject_CallMethod(runtime, "apply_env", "O", endpoint);
        }
    }
    Py_DECREF(r);
    if (!ok) {
        capture_error("cannot prepare the app");
        return -1;
    }
    Py_DECREF(ok);
    config = PyObject_CallMethod(runtime, "describe", "O", endpoint);
    if (!config) {
        capture_error("cannot read the endpoint configuration");
        return -1;
    }
    *elapsed_ms = bw_now_ms() - t0;
    return 0;
}

int bw_app_on_start(double *elapsed_ms) {
    double t0 = bw_now_ms();
    on_start_value = PyObject_CallMethod(runtime, "run_on_start", "O", endpoint);
    if (!on_start_value) {
        capture_error("on_start failed");
        return -1;
    }
    if (call_runtime("install_alarm_handler", "cannot install the timeout handler") < 0)
        return -1;
    *elapsed_ms = bw_now_ms() - t0;
    return 0;
}

int bw_app_pack_config(msgpack_packer *pk) {
    char err[256];
    if (bw_codec_from_py(pk, config, err, sizeof err) < 0) {
        snprintf(last_error, sizeof last_error, "endpoint configuration: %s", err);
        return -1;
    }
    return 0;
}

int bw_app_pack_config_value(msgpack_packer *pk, const char *key) {
    char err[256];
    PyObject *v = config ? PyDict_GetItemString(config, key) : NULL;
    if (bw_codec_from_py(pk, v ? v : Py_None, err, sizeof err) < 0) {
        snprintf(last_error, sizeof last_error, "endpoint configuration %s: %s", key, err);
        return -1;
    }
    return 0;
}

/* Remove NAME from os.environ and posix.environ with the bytes zeroed first (the two
 * dicts share the value objects; both must let go), then from the C environment. */
static void scrub_env_name(PyObject *os_data, PyObject *posix_env, PyObject *name) {
    PyObject *bname = PyUnicode_EncodeFSDefault(name);
    if (!bname) {
        PyErr_Clear();
        return;
    }
    PyObject *dicts[2] = {os_data, posix_env};
    for (int i = 0; i < 2; i++) {
        if (!dicts[i] || !PyDict_Check(dicts[i]))
            continue;
        PyObject *v = PyDict_GetItem(dicts[i], bname);
        if (v && PyBytes_Check(v))
            explicit_bzero(PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v));
        if (v && PyDict_DelItem(dicts[i], bname) < 0)
            PyErr_Clear();
    }
    bw_scrub_environ(PyBytes_AS_STRING(bname));
    Py_DECREF(bname);
}

static void scrub_env_list(PyObject *os_data, PyObject *posix_env, const char *key) {
    PyObject *names = PyDict_GetItemString(config, key);
    if (!names || !PyList_Check(names))
        return;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(names); i++)
        scrub_env_name(os_data, posix_env, PyList_GET_ITEM(names, i));
}

int bw_app_before_checkpoint(void) {
    PyObject *r = PyObject_CallMethod(runtime, "before_checkpoint", NULL);
    if (!r) {
        capture_error("a before_checkpoint hook failed");
        return -1;
    }
    Py_DECREF(r);
    PyObject *os = PyImport_ImportModule("os");
    PyObject *posix = PyImport_ImportModule("posix");
    PyObject *environ_obj = os ? PyObject_GetAttrString(os, "environ") : NULL;
    PyObject *os_data = environ_obj ? PyObject_GetAttrString(environ_obj, "_data") : NULL;
    PyObject *posix_env = posix ? PyObject_GetAttrString(posix, "environ") : NULL;
    PyErr_Clear();
    scrub_env_list(os_data, posix_env, "secrets");
    scrub_env_list(os_data, posix_env, "env_keys");
    Py_XDECREF(os_data);
    Py_XDECREF(environ_obj);
    Py_XDECREF(posix_env);
    Py_XDECREF(os);
    Py_XDECREF(posix);
    /* What on_start printed must come out once, now, not from every replica's copy of
     * the buffers. */
    if (call_runtime("flush_output", "cannot flush stdout/stderr") < 0)
        return -1;
    fflush(NULL);
    PyGC_Collect();
    malloc_trim(0);
    return 0;
}

/* A msgpack map from the supervisor as a dict (an empty one for NULL). */
static PyObject *env_dict(const msgpack_object *m, const char *what) {
    char err[256];
    PyObject *d = m ? bw_codec_to_py(m, err, sizeof err) : PyDict_New();
    if (!d)
        snprintf(last_error, sizeof last_error, "%s from supervisor: %s", what, err);
    else if (!PyDict_Check(d)) {
        snprintf(last_error, sizeof last_error, "%s from supervisor: not a map", what);
        Py_CLEAR(d);
    }
    return d;
}

int bw_app_set_secrets(const msgpack_object *secrets) {
    PyObject *d = env_dict(secrets, "secrets");
    if (!d)
        return -1;
    PyObject *r = PyObject_CallMethod(runtime, "set_secrets", "O", d);
    Py_DECREF(d);
    if (!r) {
        capture_error("cannot set the secrets");
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

int bw_app_after_start(bool restored, const msgpack_object *env, const msgpack_object *secrets,
                       double *hooks_ms) {
    double t0 = bw_now_ms();
    bw_scrub_set(false);
    if (restored)
        bw_id_reseed();
    PyObject *e = env_dict(env, "environment"), *s = e ? env_dict(secrets, "secrets") : NULL;
    PyObject *r = s ? PyObject_CallMethod(runtime, "after_start", "OOO",
                                          restored ? Py_True : Py_False, e, s) : NULL;
    bool ours = e && s; /* a NULL r with both dicts made is a Python error */
    Py_XDECREF(e);
    Py_XDECREF(s);
    if (!r) {
        if (ours)
            capture_error(restored ? "after_restore failed" : "start failed");
        return -1;
    }
    Py_DECREF(r);
    *hooks_ms = bw_now_ms() - t0;
    return 0;
}

void bw_app_worker_exit(void) {
    if (call_runtime("worker_exit", "worker exit") < 0)
        bw_warn("%s", last_error);
    fflush(NULL);
}

/* An async endpoint (coroutine or async generator): its calls interleave on a loop this
 * worker process owns, created here, after fork or restore (beam/_aio.py Driver). */
static int make_driver(struct bw_worker_state *w) {
    w->driver = NULL;
    w->concurrency = 1;
    PyObject *is_async = PyDict_GetItemString(config, "is_async");
    if (!is_async || PyObject_IsTrue(is_async) != 1)
        return 0;
    PyObject *n = PyDict_GetItemString(config, "concurrent_requests");
    long c = n ? PyLong_AsLong(n) : 1;
    if (c < 1 || PyErr_Occurred()) {
        PyErr_Clear();
        c = 1;
    }
    w->concurrency = c > 1000000 ? 1000000 : (int)c;
    PyObject *aio = PyImport_ImportModule("beam._aio");
    PyObject *fn = aio ? PyObject_GetAttrString(endpoint, "__wrapped__") : NULL;
    w->driver = fn ? PyObject_CallMethod(aio, "make_driver", "Od", fn, w->timeout_s) : NULL;
    Py_XDECREF(fn);
    Py_XDECREF(aio);
    return w->driver ? 0 : -1;
}

int bw_app_worker_init(int index, const char *container_id, const char *bind_address,
                       bool restored, const char *profile, size_t profile_len) {
    struct bw_worker_state *w = &bw_worker;
    w->index = index;
    w->restored = restored;
    w->timeout_s = bw_app_timeout();
    snprintf(w->container_id, sizeof w->container_id, "%s", container_id);
    w->profile = malloc(profile_len ? profile_len : 1);
    if (!w->profile)
        return -1;
    memcpy(w->profile, profile, profile_len);
    w->profile_len = profile_len;
    w->func = PyObject_GetAttrString(endpoint, "func");
    PyObject *exc_mod = PyImport_ImportModule("beam.exceptions");
    w->timeout_error = exc_mod ? PyObject_GetAttrString(exc_mod, "TaskTimeout") : NULL;
    Py_XDECREF(exc_mod);
    w->describe_exc = PyObject_GetAttrString(runtime, "describe_exception");
    w->context_factory = NULL;
    if (w->func && PyObject_IsTrue(PyDict_GetItemString(config, "wants_context")) == 1)
        w->context_factory = PyObject_CallMethod(runtime, "make_context_factory", "OOssi",
                                                 endpoint, on_start_value, container_id,
                                                 bind_address, index);
    if (w->func && make_driver(w) < 0) {
        capture_error("cannot start the async handler's loop");
        return -1;
    }
    if (!w->func || !w->timeout_error || !w->describe_exc ||
        (PyObject_IsTrue(PyDict_GetItemString(config, "wants_context")) == 1 &&
         !w->context_factory)) {
        capture_error("cannot prepare the worker");
        return -1;
    }
    return 0;
}

void bw_app_before_fork(void) { PyOS_BeforeFork(); }

void bw_app_after_fork(bool child) {
    if (child)
        PyOS_AfterFork_Child();
    else
        PyOS_AfterFork_Parent();
}

void bw_app_release_gil(void) { saved_ts = PyEval_SaveThread(); }
void bw_app_acquire_gil(void) { PyEval_RestoreThread(saved_ts); }
