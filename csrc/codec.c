/* codec.c - msgpack <-> Python conversion.
 *
 * Decoding follows docs/protocol.md's type table. Exact-type checks come first because
 * nearly every value is a plain str/int/float/list/dict and the subtype checks cost
 * more; bool is tested before int because it is a subclass of int. */
#include "codec.h"

#include <stdio.h>

static void set_err_from_python(char *err, size_t errlen, const char *what) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *s = value ? PyObject_Str(value) : NULL;
    const char *msg = s ? PyUnicode_AsUTF8(s) : NULL;
    snprintf(err, errlen, "%s: %s", what, msg ? msg : "unknown error");
    Py_XDECREF(s);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
}

static PyObject *map_to_py(const msgpack_object_map *m, char *err, size_t errlen) {
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (uint32_t i = 0; i < m->size; i++) {
        PyObject *k = bw_codec_to_py(&m->ptr[i].key, err, errlen);
        if (!k)
            goto fail;
        PyObject *v = bw_codec_to_py(&m->ptr[i].val, err, errlen);
        if (!v) {
            Py_DECREF(k);
            goto fail;
        }
        int rc = PyDict_SetItem(d, k, v);
        Py_DECREF(k);
        Py_DECREF(v);
        if (rc < 0) {
            set_err_from_python(err, errlen, "map key");
            goto fail;
        }
    }
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

PyObject *bw_codec_to_py(const msgpack_object *o, char *err, size_t errlen) {
    PyObject *r = NULL;
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        Py_RETURN_NONE;
    case MSGPACK_OBJECT_BOOLEAN:
        return PyBool_FromLong(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return PyLong_FromUnsignedLongLong(o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return PyLong_FromLongLong(o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return PyFloat_FromDouble(o->via.f64);
    case MSGPACK_OBJECT_STR:
        r = PyUnicode_DecodeUTF8(o->via.str.ptr, (Py_ssize_t)o->via.str.size, "strict");
        if (!r)
            set_err_from_python(err, errlen, "str is not valid UTF-8");
        return r;
    case MSGPACK_OBJECT_BIN:
        return PyBytes_FromStringAndSize(o->via.bin.ptr, (Py_ssize_t)o->via.bin.size);
    case MSGPACK_OBJECT_ARRAY: {
        r = PyList_New((Py_ssize_t)o->via.array.size);
        if (!r)
            break;
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            PyObject *item = bw_codec_to_py(&o->via.array.ptr[i], err, errlen);
            if (!item) {
                Py_DECREF(r);
                return NULL;
            }
            PyList_SET_ITEM(r, i, item);
        }
        return r;
    }
    case MSGPACK_OBJECT_MAP:
        return map_to_py(&o->via.map, err, errlen);
    default:
        snprintf(err, errlen, "msgpack ext types are not supported");
        return NULL;
    }
    set_err_from_python(err, errlen, "out of memory");
    return NULL;
}

static int pack_long(msgpack_packer *pk, PyObject *obj, char *err, size_t errlen) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow == 0) {
        if (v == -1 && PyErr_Occurred()) {
            set_err_from_python(err, errlen, "int");
            return -1;
        }
        return msgpack_pack_long_long(pk, v);
    }
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(obj);
        if (!(u == (unsigned long long)-1 && PyErr_Occurred()))
            return msgpack_pack_unsigned_long_long(pk, u);
        PyErr_Clear();
    }
    snprintf(err, errlen, "int does not fit in 64 bits");
    return -1;
}

static int pack_str(msgpack_packer *pk, PyObject *obj, char *err, size_t errlen) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
    if (!s) {
        set_err_from_python(err, errlen, "str cannot be encoded as UTF-8");
        return -1;
    }
    msgpack_pack_str(pk, (size_t)n);
    return msgpack_pack_str_body(pk, s, (size_t)n);
}

static int pack_bin(msgpack_packer *pk, const void *p, Py_ssize_t n) {
    msgpack_pack_bin(pk, (size_t)n);
    return msgpack_pack_bin_body(pk, p, (size_t)n);
}

static int pack(msgpack_packer *pk, PyObject *obj, int depth, char *err, size_t errlen);

static int pack_seq(msgpack_packer *pk, PyObject *obj, int depth, char *err, size_t errlen) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject **items = PySequence_Fast_ITEMS(obj);
    msgpack_pack_array(pk, (size_t)n);
    for (Py_ssize_t i = 0; i < n; i++)
        if (pack(pk, items[i], depth + 1, err, errlen) < 0)
            return -1;
    return 0;
}

static int pack_dict(msgpack_packer *pk, PyObject *obj, int depth, char *err, size_t errlen) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    msgpack_pack_map(pk, (size_t)PyDict_GET_SIZE(obj));
    while (PyDict_Next(obj, &pos, &k, &v)) {
        if (!(PyUnicode_Check(k) || PyLong_Check(k) || PyBytes_Check(k) || PyFloat_Check(k) ||
              k == Py_None)) {
            snprintf(err, errlen, "dict key of type %.100s cannot be sent", Py_TYPE(k)->tp_name);
            return -1;
        }
        if (pack(pk, k, depth + 1, err, errlen) < 0 || pack(pk, v, depth + 1, err, errlen) < 0)
            return -1;
    }
    return 0;
}

static int pack(msgpack_packer *pk, PyObject *obj, int depth, char *err, size_t errlen) {
    if (depth > BW_ENCODE_MAX_DEPTH) {
        snprintf(err, errlen, "value nested deeper than %d levels", BW_ENCODE_MAX_DEPTH);
        return -1;
    }
    PyTypeObject *t = Py_TYPE(obj);
    if (t == &PyUnicode_Type)
        return pack_str(pk, obj, err, errlen);
    if (obj == Py_None)
        return msgpack_pack_nil(pk);
    if (obj == Py_True)
        return msgpack_pack_true(pk);
    if (obj == Py_False)
        return msgpack_pack_false(pk);
    if (t == &PyLong_Type)
        return pack_long(pk, obj, err, errlen);
    if (t == &PyFloat_Type)
        return msgpack_pack_double(pk, PyFloat_AS_DOUBLE(obj));
    if (t == &PyDict_Type)
        return pack_dict(pk, obj, depth, err, errlen);
    if (t == &PyList_Type || t == &PyTuple_Type)
        return pack_seq(pk, obj, depth, err, errlen);
    if (t == &PyBytes_Type)
        return pack_bin(pk, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
    /* Subclasses and buffer types: slower paths. */
    if (PyBool_Check(obj))
        return obj == Py_True ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
    if (PyLong_Check(obj))
        return pack_long(pk, obj, err, errlen);
    if (PyFloat_Check(obj))
        return msgpack_pack_double(pk, PyFloat_AsDouble(obj));
    if (PyUnicode_Check(obj))
        return pack_str(pk, obj, err, errlen);
    if (PyDict_Check(obj))
        return pack_dict(pk, obj, depth, err, errlen);
    if (PyList_Check(obj) || PyTuple_Check(obj))
        return pack_seq(pk, obj, depth, err, errlen);
    if (PyBytes_Check(obj))
        return pack_bin(pk, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj));
    if (PyByteArray_Check(obj))
        return pack_bin(pk, PyByteArray_AS_STRING(obj), PyByteArray_GET_SIZE(obj));
    if (PyMemoryView_Check(obj)) {
        /* Via the buffer protocol, not PyMemoryView_GET_BUFFER: a released view still
         * holds a pointer into memory its exporter may have freed since. */
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0) {
            set_err_from_python(err, errlen, "cannot send memoryview");
            return -1;
        }
        int rc = pack_bin(pk, view.buf, view.len);
        PyBuffer_Release(&view);
        return rc;
    }
    snprintf(err, errlen, "cannot send a value of type %.100s (use None, bool, int, float, "
             "str, bytes, list, tuple or dict)", t->tp_name);
    return -1;
}

int bw_codec_from_py(msgpack_packer *pk, PyObject *obj, char *err, size_t errlen) {
    return pack(pk, obj, 0, err, errlen);
}
