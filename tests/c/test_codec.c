/* test_codec.c - unit tests for msgpack <-> Python conversion (codec.c).
 *
 * Values are built with small Python snippets (clearer than C API calls), pushed
 * through the same path a request/response takes (bw_codec_from_py -> bytes ->
 * bw_mp_unpack_exact -> bw_codec_to_py) and compared in Python. The codec promises
 * that a failure leaves no Python exception set (callers carry on with the GIL in a
 * clean state), so every error path also checks PyErr_Occurred(). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>

#include "codec.h"
#include "mp.h"

#include "test_util.h"

static PyObject *globals; /* namespace shared by the snippets below */

/* Evaluate an expression; NULL (and a printed traceback) means the test itself is
 * broken, which is reported as a failure rather than crashing. */
static PyObject *py(const char *expr) {
    PyObject *r = PyRun_String(expr, Py_eval_input, globals, globals);
    if (!r) {
        fprintf(stderr, "  snippet failed: %s\n", expr);
        PyErr_Print();
    }
    return r;
}

static int py_exec(const char *stmts) {
    PyObject *r = PyRun_String(stmts, Py_file_input, globals, globals);
    if (!r) {
        fprintf(stderr, "  snippet failed: %s\n", stmts);
        PyErr_Print();
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* Decode raw msgpack bytes to Python; NULL with err set on any failure. */
static PyObject *decode(const char *buf, size_t len, char *err, size_t errlen) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 256);
    msgpack_object o;
    PyObject *r = NULL;
    if (bw_mp_unpack_exact(buf, len, &zone, &o) < 0)
        snprintf(err, errlen, "bad frame");
    else
        r = bw_codec_to_py(&o, err, errlen);
    msgpack_zone_destroy(&zone);
    return r;
}

/* Encode then decode; NULL with err set if either side refused. */
static PyObject *round_trip(PyObject *obj, char *err, size_t errlen) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    PyObject *r = NULL;
    if (bw_codec_from_py(&pk, obj, err, errlen) == 0)
        r = decode(sb.data, sb.size, err, errlen);
    msgpack_sbuffer_destroy(&sb);
    return r;
}

/* `expr` must come back equal to `expect`, of exactly the same type and with the
 * same repr. Equality alone is too weak: True == 1 and b"a" == bytearray(b"a"), and
 * repr catches a nested bool turned int. */
static int t_rt(const char *expr, const char *expect, const char *file, int line) {
    char err[256] = "";
    PyObject *obj = py(expr), *want = py(expect), *got = NULL;
    int ok = 0;
    if (obj && want) {
        got = round_trip(obj, err, sizeof err);
        if (!got) {
            fprintf(stderr, "  %s: %s\n", expr, err);
        } else {
            PyObject *rg = PyObject_Repr(got), *rw = PyObject_Repr(want);
            ok = Py_TYPE(got) == Py_TYPE(want) && PyObject_RichCompareBool(got, want, Py_EQ) == 1 &&
                 rg && rw && PyUnicode_Compare(rg, rw) == 0;
            if (!ok && rg && rw)
                fprintf(stderr, "  %s: got %s, expected %s\n", expr, PyUnicode_AsUTF8(rg),
                        PyUnicode_AsUTF8(rw));
            Py_XDECREF(rg);
            Py_XDECREF(rw);
        }
    }
    ok = ok && !PyErr_Occurred();
    PyErr_Clear();
    Py_XDECREF(obj);
    Py_XDECREF(want);
    Py_XDECREF(got);
    return t_check(ok, expr, file, line);
}
#define CHECK_RT(expr) t_rt(expr, expr, __FILE__, __LINE__)
#define CHECK_RT_AS(expr, expect) t_rt(expr, expect, __FILE__, __LINE__)

/* Encoding `expr` must fail with a message containing `needle` and no exception. */
static int t_enc_err(const char *expr, const char *needle, const char *file, int line) {
    char err[256] = "";
    PyObject *obj = py(expr);
    int ok = 0;
    if (obj) {
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        ok = bw_codec_from_py(&pk, obj, err, sizeof err) == -1 && strstr(err, needle) != NULL &&
             !PyErr_Occurred();
        if (!ok)
            fprintf(stderr, "  %s: err \"%s\", exception %s\n", expr, err,
                    PyErr_Occurred() ? "set" : "clear");
        msgpack_sbuffer_destroy(&sb);
    }
    PyErr_Clear();
    Py_XDECREF(obj);
    return t_check(ok, expr, file, line);
}
#define CHECK_ENC_ERR(expr, needle) t_enc_err(expr, needle, __FILE__, __LINE__)

/* Encoding alone must succeed (for values the decoder could not take back). */
static int t_enc_ok(const char *expr, const char *file, int line) {
    char err[256] = "";
    PyObject *obj = py(expr);
    int ok = 0;
    if (obj) {
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        ok = bw_codec_from_py(&pk, obj, err, sizeof err) == 0 && sb.size > 0;
        if (!ok)
            fprintf(stderr, "  %s: err \"%s\"\n", expr, err);
        msgpack_sbuffer_destroy(&sb);
    }
    ok = ok && !PyErr_Occurred();
    PyErr_Clear();
    Py_XDECREF(obj);
    return t_check(ok, expr, file, line);
}
#define CHECK_ENC_OK(expr) t_enc_ok(expr, __FILE__, __LINE__)

/* Decoding raw bytes must fail with a message containing `needle`, no exception. */
static int t_dec_err(const char *buf, size_t len, const char *needle, const char *what,
                     const char *file, int line) {
    char err[256] = "";
    PyObject *r = decode(buf, len, err, sizeof err);
    int ok = r == NULL && strstr(err, needle) != NULL && !PyErr_Occurred();
    if (!ok)
        fprintf(stderr, "  %s: result %s, err \"%s\", exception %s\n", what,
                r ? "non-NULL" : "NULL", err, PyErr_Occurred() ? "set" : "clear");
    PyErr_Clear();
    Py_XDECREF(r);
    return t_check(ok, what, file, line);
}
#define CHECK_DEC_ERR(bytes, needle)                                                       \
    t_dec_err(bytes, sizeof bytes - 1, needle, #bytes, __FILE__, __LINE__)

/* Decoding raw bytes must give a value equal (same type and repr) to `expect`. */
static int t_dec(const char *buf, size_t len, const char *expect, const char *file, int line) {
    char err[256] = "";
    PyObject *want = py(expect), *got = decode(buf, len, err, sizeof err);
    int ok = 0;
    if (!got)
        fprintf(stderr, "  decoding for %s failed: %s\n", expect, err);
    if (want && got) {
        PyObject *rg = PyObject_Repr(got), *rw = PyObject_Repr(want);
        ok = Py_TYPE(got) == Py_TYPE(want) && PyObject_RichCompareBool(got, want, Py_EQ) == 1 &&
             rg && rw && PyUnicode_Compare(rg, rw) == 0;
        if (!ok && rg && rw)
            fprintf(stderr, "  got %s, expected %s\n", PyUnicode_AsUTF8(rg), PyUnicode_AsUTF8(rw));
        Py_XDECREF(rg);
        Py_XDECREF(rw);
    }
    ok = ok && !PyErr_Occurred();
    PyErr_Clear();
    Py_XDECREF(want);
    Py_XDECREF(got);
    return t_check(ok, expect, file, line);
}
/* String literals: sizeof - 1 drops the terminator, so embedded NULs are fine. */
#define CHECK_DEC(bytes, expect) t_dec(bytes, sizeof bytes - 1, expect, __FILE__, __LINE__)

/* ---- encode + decode round trips ------------------------------------------- */

static void test_scalars(void) {
    CHECK_RT("None");
    /* bool is a subclass of int: it must not come back as 1/0. */
    CHECK_RT("True");
    CHECK_RT("False");
    CHECK_RT("[True, False, 1, 0]");
    CHECK_RT("0");
    CHECK_RT("-1");
    CHECK_RT("1");
    CHECK_RT("-(2**63)");      /* INT64_MIN */
    CHECK_RT("2**63 - 1");     /* INT64_MAX */
    CHECK_RT("2**63");         /* only fits as uint64 */
    CHECK_RT("2**64 - 1");     /* UINT64_MAX */
    CHECK_RT("0.0");
    CHECK_RT("-2.5");
    CHECK_RT("1e308");
    CHECK_RT("float('inf')");
    CHECK_RT("float('-inf')");
    CHECK_RT("5e-324");
}

static void test_float_special(void) {
    char err[256] = "";
    /* nan != nan, so compare with isnan rather than equality. */
    PyObject *nan = py("float('nan')"), *got = nan ? round_trip(nan, err, sizeof err) : NULL;
    CHECK(got && PyFloat_CheckExact(got) && isnan(PyFloat_AS_DOUBLE(got)));
    Py_XDECREF(got);
    Py_XDECREF(nan);
    /* -0.0 == 0.0 too; the sign must survive, so check it explicitly. */
    PyObject *nz = py("-0.0");
    got = nz ? round_trip(nz, err, sizeof err) : NULL;
    CHECK(got && PyFloat_CheckExact(got) && PyFloat_AS_DOUBLE(got) == 0.0 &&
          signbit(PyFloat_AS_DOUBLE(got)));
    Py_XDECREF(got);
    Py_XDECREF(nz);
    CHECK(!PyErr_Occurred());
}

static void test_int_out_of_range(void) {
    CHECK_ENC_ERR("2**64", "does not fit");
    CHECK_ENC_ERR("-(2**63) - 1", "does not fit");
    CHECK_ENC_ERR("10**40", "does not fit");
    CHECK_ENC_ERR("-(10**40)", "does not fit");
    /* Nested: the failure propagates out of containers. */
    CHECK_ENC_ERR("{'a': [1, 2**64]}", "does not fit");
}

static void test_strings_and_bytes(void) {
    CHECK_RT("''");
    CHECK_RT("'hello'");
    CHECK_RT("'h\\u00e9llo w\\u00f6rld'");
    CHECK_RT("'\\U0001F600 emoji'");
    CHECK_RT("'\\u4e2d\\u6587 \\u65e5\\u672c\\u8a9e'"); /* CJK */
    CHECK_RT("'nul\\x00inside'");
    CHECK_RT("'x' * 70000"); /* str32 */
    CHECK_RT("b''");
    CHECK_RT("b'\\x00\\xff\\x80'");
    CHECK_RT("bytes(range(256)) * 300"); /* bin32 */
    /* Buffer types travel as bin and come back as plain bytes. */
    CHECK_RT_AS("bytearray(b'ab\\x00c')", "b'ab\\x00c'");
    CHECK_RT_AS("bytearray()", "b''");
    CHECK_RT_AS("memoryview(b'xyz')", "b'xyz'");
    CHECK_RT_AS("memoryview(b'abcdef')[1:4]", "b'bcd'");
    CHECK_RT_AS("memoryview(b'abcdefgh').cast('I')", "b'abcdefgh'");
    /* A str that is not encodable as UTF-8 (lone surrogate) is an error, not a crash. */
    CHECK_ENC_ERR("'\\ud800'", "UTF-8");
    /* A strided view has no contiguous bytes to send. */
    CHECK_ENC_ERR("memoryview(b'abcdef')[::2]", "memoryview");
}

static void test_released_memoryview(void) {
    /* A handler may return a view it already released (`with memoryview(b) as m:
     * return m`). Its buffer may be gone, so it must be refused, never read; the
     * bytearray is resized here so a stale read would hit freed memory (ASan). */
    if (py_exec("_ba = bytearray(b'secret' * 100)\n"
                "_mv = memoryview(_ba)\n"
                "_mv.release()\n"
                "_ba.extend(b'z' * 100000)\n") < 0) {
        CHECK(!"setup");
        return;
    }
    CHECK_ENC_ERR("_mv", "released");
    py_exec("del _ba, _mv");
}

static void test_sequences_and_maps(void) {
    CHECK_RT("[]");
    CHECK_RT("[1, 'a', None, 2.5, b'x', [True]]");
    /* Tuples are sent as arrays and come back as lists, recursively. */
    CHECK_RT_AS("(1, (2, 3), [(4,)])", "[1, [2, 3], [[4]]]");
    CHECK_RT_AS("()", "[]");
    CHECK_RT("{}");
    CHECK_RT("{'a': {'b': [1, {'c': None}], 'd': {}}, 'e': 'f'}");
    CHECK_RT("{1: 'one', -2: 'minus two', 2**64 - 1: 'max'}");
    CHECK_RT("{b'k': 1, 1.5: 2, None: 3, True: 4}");
    /* Order is part of the value for the client (msgpack maps are ordered). */
    CHECK_RT("{'z': 1, 'a': 2, 'm': 3}");
}

static void test_subclasses(void) {
    /* Subclasses (IntEnum, str enums, OrderedDict...) take the slow path and arrive as
     * their base type. */
    if (py_exec("import collections, enum\n"
                "class _I(int): pass\n"
                "class _S(str): pass\n"
                "class _F(float): pass\n"
                "class _L(list): pass\n"
                "class _E(enum.IntEnum):\n"
                "    A = 7\n") < 0) {
        CHECK(!"setup");
        return;
    }
    CHECK_RT_AS("_I(5)", "5");
    CHECK_RT_AS("_E.A", "7");
    CHECK_RT_AS("_S('s')", "'s'");
    CHECK_RT_AS("_F(1.5)", "1.5");
    CHECK_RT_AS("_L([1, _I(2)])", "[1, 2]");
    CHECK_RT_AS("collections.OrderedDict([('b', 1), ('a', 2)])", "{'b': 1, 'a': 2}");
    CHECK_ENC_ERR("_I(2**64)", "does not fit");
}

static void test_unsupported_values(void) {
    CHECK_ENC_ERR("{(1, 2): 'v'}", "tuple");
    CHECK_ENC_ERR("{'ok': {frozenset(): 1}}", "frozenset");
    CHECK_ENC_ERR("{1, 2}", "set");
    CHECK_ENC_ERR("object()", "object");
    CHECK_ENC_ERR("[1, object()]", "object");
    CHECK_ENC_ERR("1j", "complex");
}

static void test_depth(void) {
    /* 64 levels of containers are allowed, the 65th is refused; the limit guards the
     * C stack against pathological (or cyclic) results. */
    if (py_exec("def _nest(n, leaf=1, kind='list'):\n"
                "    x = leaf\n"
                "    for _ in range(n):\n"
                "        x = [x] if kind == 'list' else {'k': x}\n"
                "    return x\n"
                "_cyc = []\n"
                "_cyc.append(_cyc)\n"
                "_cyd = {}\n"
                "_cyd['self'] = _cyd\n") < 0) {
        CHECK(!"setup");
        return;
    }
    CHECK_ENC_OK("_nest(63)");
    CHECK_ENC_OK("_nest(64)");
    CHECK_ENC_OK("_nest(64, kind='dict')");
    CHECK_ENC_ERR("_nest(65)", "nested deeper than 64");
    CHECK_ENC_ERR("_nest(65, kind='dict')", "nested deeper than 64");
    CHECK_ENC_ERR("_nest(5000)", "nested deeper than 64");
    /* Cycles hit the depth limit instead of recursing forever. */
    CHECK_ENC_ERR("_cyc", "nested deeper than 64");
    CHECK_ENC_ERR("_cyd", "nested deeper than 64");
    /* The decoder's own limit is lower (32, docs/protocol.md), so deep results are
     * sendable but such requests are not: check both sides of that boundary. */
    CHECK_RT("_nest(32)");
    char err[256] = "";
    PyObject *deep = py("_nest(33)"), *back = deep ? round_trip(deep, err, sizeof err) : NULL;
    CHECK(deep && !back && strcmp(err, "bad frame") == 0 && !PyErr_Occurred());
    Py_XDECREF(back);
    Py_XDECREF(deep);
    py_exec("_cyc.clear(); _cyd.clear()");
}

/* ---- decode-only paths (bytes a client could send) ------------------------- */

static void test_decode(void) {
    CHECK_DEC("\xc0", "None");
    CHECK_DEC("\xc3", "True");
    CHECK_DEC("\xc2", "False");
    CHECK_DEC("\xcf\xff\xff\xff\xff\xff\xff\xff\xff", "2**64 - 1");
    CHECK_DEC("\xd3\x80\x00\x00\x00\x00\x00\x00\x00", "-(2**63)");
    CHECK_DEC("\xd0\x05", "5"); /* a signed encoding of a positive number is still int */
    CHECK_DEC("\xc4\x03" "a\x00" "c", "b'a\\x00c'"); /* split: \x00c would be one escape */
    CHECK_DEC("\xc4\x00", "b''");
    CHECK_DEC("\xca\x3f\xc0\x00\x00", "1.5"); /* float32 */
    CHECK_DEC("\xca\x3d\xcc\xcc\xcd", "0.10000000149011612"); /* float32 0.1, widened */
    CHECK_DEC("\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00", "1.5");
    CHECK_DEC("\xa0", "''");
    CHECK_DEC("\xa4\xf0\x9f\x98\x80", "'\\U0001F600'");
    /* Non-str keys are fine on the way in, as long as Python can hash them. */
    CHECK_DEC("\x82\x01\xa1" "a\xc0\x02", "{1: 'a', None: 2}");
    /* Map keys repeat: the last one wins, as in a dict literal. */
    CHECK_DEC("\x82\xa1k\x01\xa1k\x02", "{'k': 2}");

    /* Invalid UTF-8, alone and nested (the partial containers must be released). */
    CHECK_DEC_ERR("\xa2\xff\xfe", "UTF-8");
    CHECK_DEC_ERR("\xa3\xed\xa0\x80", "UTF-8"); /* an encoded surrogate is not UTF-8 */
    CHECK_DEC_ERR("\x92\xa1" "a\xa1\xff", "UTF-8");
    CHECK_DEC_ERR("\x81\xa1k\xa1\xff", "UTF-8");
    CHECK_DEC_ERR("\x81\xa1\xff\x01", "UTF-8");
    /* ext types have no Python meaning here. */
    CHECK_DEC_ERR("\xd4\x01\x00", "ext");
    CHECK_DEC_ERR("\xc7\x02\x05xy", "ext");
    CHECK_DEC_ERR("\x81\xa1k\xd4\x01\x00", "ext");
    /* A map key that decodes to a list or dict is unhashable in Python. */
    CHECK_DEC_ERR("\x81\x91\x01\x02", "unhashable");
    CHECK_DEC_ERR("\x81\x81\x01\x01\x02", "unhashable");
    CHECK_DEC_ERR("\x82\x01\x01\x91\x01\x02", "map key");
}

int main(void) {
    PyConfig config;
    /* Isolated: no user site-packages or PYTHON* variables can change the result. */
    PyConfig_InitIsolatedConfig(&config);
    PyStatus st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {
        fprintf(stderr, "cannot initialise Python: %s\n", st.err_msg ? st.err_msg : "?");
        printf("0 passed, 1 failed\n");
        return 1;
    }
    globals = PyDict_New();
    if (!globals || PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0) {
        PyErr_Print();
        printf("0 passed, 1 failed\n");
        return 1;
    }

    RUN(test_scalars);
    RUN(test_float_special);
    RUN(test_int_out_of_range);
    RUN(test_strings_and_bytes);
    RUN(test_released_memoryview);
    RUN(test_sequences_and_maps);
    RUN(test_subclasses);
    RUN(test_unsupported_values);
    RUN(test_depth);
    RUN(test_decode);
    CHECK(!PyErr_Occurred());

    Py_CLEAR(globals);
    CHECK(Py_FinalizeEx() == 0);
    return TEST_SUMMARY();
}
