/* fuzz_codec.c - libFuzzer target: msgpack -> Python -> msgpack (codec.c) and
 * JSON <-> msgpack (json.c).
 *
 * Input: any bytes, read twice: as one msgpack value and as JSON text.
 *   msgpack: bw_mp_unpack_exact -> bw_codec_to_py; on success bw_codec_from_py must
 *     succeed too (decoded values are always sendable), and decoding its bytes again must
 *     give an equal object and the same bytes. The value is also rendered as JSON
 *     (bw_json_append_object), which must parse back (bw_json_to_msgpack).
 *   JSON: bw_json_to_msgpack; on success the msgpack must unpack, and JSON -> msgpack ->
 *     JSON must be stable after one round (j1 == j2).
 * After every call, success or failure, no Python exception may be left set.
 * CPython runs with the malloc allocator so ASan/LSan see every Python object: a
 * missing Py_DECREF shows up as a leak, a double one as a use-after-free. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "json.h"
#include "mp.h"

#define FAIL(...)                                                  \
    do {                                                           \
        fprintf(stderr, "fuzz_codec: " __VA_ARGS__);               \
        fputc('\n', stderr);                                       \
        if (PyErr_Occurred())                                      \
            PyErr_Print();                                         \
        abort();                                                   \
    } while (0)

static void no_error_left(const char *where) {
    if (PyErr_Occurred())
        FAIL("a Python exception is left set after %s", where);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;
    PyStatus st = Py_PreInitialize(&pre);
    if (PyStatus_Exception(st))
        FAIL("cannot pre-initialise Python: %s", st.err_msg ? st.err_msg : "?");
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.install_signal_handlers = 0;
    st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st))
        FAIL("cannot initialise Python: %s", st.err_msg ? st.err_msg : "?");
    return 0;
}

static bool has_nan(PyObject *o) {
    if (PyFloat_Check(o))
        return isnan(PyFloat_AS_DOUBLE(o));
    if (PyList_Check(o)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); i++)
            if (has_nan(PyList_GET_ITEM(o, i)))
                return true;
        return false;
    }
    if (PyDict_Check(o)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v))
            if (has_nan(k) || has_nan(v))
                return true;
    }
    return false;
}

static PyObject *decode(const char *buf, size_t len, char *err, size_t errlen) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 256);
    msgpack_object o;
    PyObject *r = NULL;
    if (bw_mp_unpack_exact(buf, len, &zone, &o) < 0)
        FAIL("the encoder's own output does not unpack");
    r = bw_codec_to_py(&o, err, errlen);
    msgpack_zone_destroy(&zone);
    return r;
}

static void encode(PyObject *obj, msgpack_sbuffer *sb, const char *what) {
    char err[512] = "";
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    if (bw_codec_from_py(&pk, obj, err, sizeof err) < 0)
        FAIL("bw_codec_from_py refused a %s value: %s", what, err);
    no_error_left("bw_codec_from_py");
}

static void check_msgpack(const msgpack_object *o) {
    char err[512] = "";
    PyObject *obj = bw_codec_to_py(o, err, sizeof err);
    no_error_left("bw_codec_to_py");
    if (!obj) {
        if (!err[0])
            FAIL("bw_codec_to_py failed without a message");
        return;
    }
    msgpack_sbuffer b1, b2;
    msgpack_sbuffer_init(&b1);
    msgpack_sbuffer_init(&b2);
    encode(obj, &b1, "decoded");
    PyObject *again = decode(b1.data, b1.size, err, sizeof err);
    no_error_left("bw_codec_to_py (round trip)");
    if (!again)
        FAIL("re-decoding the encoder's output failed: %s", err);
    encode(again, &b2, "re-decoded");
    if (b1.size != b2.size || memcmp(b1.data, b2.data, b1.size) != 0)
        FAIL("encode(decode(encode(x))) != encode(x)");
    int eq = PyObject_RichCompareBool(obj, again, Py_EQ);
    no_error_left("comparing");
    if (eq != 1 && !has_nan(obj)) /* NaN != NaN: the byte comparison above covers it */
        FAIL("round trip changed the value");
    Py_DECREF(again);
    Py_DECREF(obj);
    msgpack_sbuffer_destroy(&b1);
    msgpack_sbuffer_destroy(&b2);
}

/* How deeply non-str map keys nest inside non-str map keys. bw_json_append_object
 * writes such a key as its JSON in a string, escaped once per level, so the output
 * doubles with each level (see docs/fuzzing.md, "Known issues"). */
static int key_depth(const msgpack_object *o) {
    int d = 0;
    if (o->type == MSGPACK_OBJECT_ARRAY) {
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            int k = key_depth(&o->via.array.ptr[i]);
            d = k > d ? k : d;
        }
    } else if (o->type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            int k = kv->key.type == MSGPACK_OBJECT_STR ? 0 : 1 + key_depth(&kv->key);
            int v = key_depth(&kv->val);
            d = k > d ? k : d;
            d = v > d ? v : d;
        }
    }
    return d;
}

/* Levels of arrays/maps (msgpack-c decodes up to 32; JSON bodies may have 31). */
static int container_depth(const msgpack_object *o) {
    int d = 0;
    if (o->type == MSGPACK_OBJECT_ARRAY) {
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            int k = container_depth(&o->via.array.ptr[i]);
            d = k > d ? k : d;
        }
        return d + 1;
    }
    if (o->type == MSGPACK_OBJECT_MAP) {
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            int v = container_depth(&o->via.map.ptr[i].val); /* non-str keys become strings */
            d = v > d ? v : d;
        }
        return d + 1;
    }
    return 0;
}

/* Any decoded msgpack value renders as JSON that parses back (if not too deep for it). */
static void check_msgpack_json(const msgpack_object *o) {
    if (key_depth(o) > 6) /* the known exponential case: not what this check is for */
        return;
    bool too_deep = container_depth(o) > BW_JSON_MAX_DEPTH;
    msgpack_sbuffer j, m;
    msgpack_sbuffer_init(&j);
    msgpack_sbuffer_init(&m);
    bw_json_append_object(&j, o);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &m, msgpack_sbuffer_write);
    char err[256];
    if (bw_json_to_msgpack(j.data, j.size, &pk, err, sizeof err) < 0 && !too_deep)
        FAIL("bw_json_append_object wrote JSON that does not parse back: %s: %.*s", err,
             (int)(j.size < 200 ? j.size : 200), j.data);
    msgpack_sbuffer_destroy(&j);
    msgpack_sbuffer_destroy(&m);
}

/* JSON text -> msgpack -> JSON; returns 0 and the JSON in *out, or -1 (not JSON). */
static int json_round(const char *text, size_t len, msgpack_sbuffer *out) {
    msgpack_sbuffer m;
    msgpack_sbuffer_init(&m);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &m, msgpack_sbuffer_write);
    char err[256] = "";
    int rc = bw_json_to_msgpack(text, len, &pk, err, sizeof err);
    if (rc < 0) {
        if (!err[0])
            FAIL("bw_json_to_msgpack failed without a message");
    } else {
        msgpack_zone zone;
        msgpack_zone_init(&zone, 256);
        msgpack_object o;
        if (bw_mp_unpack_exact(m.data, m.size, &zone, &o) < 0)
            FAIL("bw_json_to_msgpack wrote msgpack that does not unpack");
        bw_json_append_object(out, &o);
        msgpack_zone_destroy(&zone);
    }
    msgpack_sbuffer_destroy(&m);
    return rc;
}

static void check_json(const char *text, size_t len) {
    msgpack_sbuffer j1, j2;
    msgpack_sbuffer_init(&j1);
    msgpack_sbuffer_init(&j2);
    if (json_round(text, len, &j1) == 0) {
        if (json_round(j1.data, j1.size, &j2) < 0)
            FAIL("JSON written from parsed JSON does not parse: %.*s",
                 (int)(j1.size < 200 ? j1.size : 200), j1.data);
        if (j1.size != j2.size || memcmp(j1.data, j2.data, j1.size) != 0)
            FAIL("JSON round trip is not stable: %.*s -> %.*s", (int)(j1.size < 200 ? j1.size : 200),
                 j1.data, (int)(j2.size < 200 ? j2.size : 200), j2.data);
    }
    msgpack_sbuffer_destroy(&j1);
    msgpack_sbuffer_destroy(&j2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 256);
    msgpack_object o;
    if (bw_mp_unpack_exact((const char *)data, size, &zone, &o) == 0) {
        check_msgpack(&o);
        check_msgpack_json(&o);
    }
    msgpack_zone_destroy(&zone);
    check_json((const char *)data, size);
    no_error_left("the input");
    return 0;
}
