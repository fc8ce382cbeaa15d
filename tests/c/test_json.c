/* test_json.c - JSON text -> msgpack (csrc/json.c): numbers and strings as Python's
 * json.loads reads them, and the refusals that replace silent rounding. */
#include "json.h"
#include "mp.h"
#include "test_util.h"

#include <stdint.h>

/* Parse `text` and unpack its msgpack; 0 on success, with the value in *o (zone-owned). */
static int parse(const char *text, size_t len, msgpack_zone *z, msgpack_sbuffer *m,
                 msgpack_object *o, char *err, size_t errlen) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, m, msgpack_sbuffer_write);
    err[0] = '\0';
    if (bw_json_to_msgpack(text, len, &pk, err, errlen) < 0)
        return -1;
    return bw_mp_unpack_exact(m->data, m->size, z, o);
}

/* The first element of a one-element array body, "[...]". */
#define WITH_VALUE(text, o, body)                                                          \
    do {                                                                                   \
        msgpack_zone z_;                                                                   \
        msgpack_sbuffer m_;                                                                \
        msgpack_zone_init(&z_, 256);                                                       \
        msgpack_sbuffer_init(&m_);                                                         \
        msgpack_object top_;                                                               \
        char err_[256];                                                                    \
        if (CHECK(parse(text, sizeof text - 1, &z_, &m_, &top_, err_, sizeof err_) == 0) && \
            CHECK(top_.type == MSGPACK_OBJECT_ARRAY && top_.via.array.size == 1)) {        \
            const msgpack_object *o = &top_.via.array.ptr[0];                              \
            body                                                                           \
        }                                                                                  \
        msgpack_sbuffer_destroy(&m_);                                                      \
        msgpack_zone_destroy(&z_);                                                         \
    } while (0)

static void refused(const char *text, const char *why) {
    msgpack_zone z;
    msgpack_sbuffer m;
    msgpack_zone_init(&z, 256);
    msgpack_sbuffer_init(&m);
    msgpack_object o;
    char err[256];
    if (!CHECK(parse(text, strlen(text), &z, &m, &o, err, sizeof err) < 0))
        fprintf(stderr, "  (accepted %s)\n", text);
    else
        t_check_contains(err, why, text, __FILE__, __LINE__);
    msgpack_sbuffer_destroy(&m);
    msgpack_zone_destroy(&z);
}

static void test_floats_stay_floats(void) {
    WITH_VALUE("[1.0]", o, CHECK(o->type == MSGPACK_OBJECT_FLOAT64 && o->via.f64 == 1.0););
    WITH_VALUE("[1e2]", o, CHECK(o->type == MSGPACK_OBJECT_FLOAT64 && o->via.f64 == 100.0););
    WITH_VALUE("[-0.0]", o, CHECK(o->type == MSGPACK_OBJECT_FLOAT64 && o->via.f64 == 0.0););
    WITH_VALUE("[0.1]", o, CHECK(o->type == MSGPACK_OBJECT_FLOAT64 && o->via.f64 == 0.1););
    WITH_VALUE("[1]", o, CHECK(o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 == 1););
}

static void test_integers_exact(void) {
    WITH_VALUE("[9007199254740993]", o, CHECK(o->via.u64 == 9007199254740993ull););
    WITH_VALUE("[18446744073709551615]", o,
               CHECK(o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 == UINT64_MAX););
    WITH_VALUE("[-9223372036854775808]", o,
               CHECK(o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER && o->via.i64 == INT64_MIN););
    WITH_VALUE("[-0]", o, CHECK(o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 == 0););
    refused("[18446744073709551616]", "does not fit in 64 bits");
    refused("[-9223372036854775809]", "does not fit in 64 bits");
    refused("[123456789012345678901234567890]", "does not fit in 64 bits");
}

static void test_malformed_numbers(void) {
    const char *bad[] = {"[01]", "[1.]", "[.5]", "[-]", "[+1]", "[1e]", "[1e+]", "[NaN]",
                         "[Infinity]", "[0x10]", "[1.5.3]"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        refused(bad[i], "not valid JSON");
}

static void test_strings_keep_every_code_point(void) {
    WITH_VALUE("[\"a\\u0000b\"]", o,
               CHECK(o->via.str.size == 3 && memcmp(o->via.str.ptr, "a\0b", 3) == 0););
    WITH_VALUE("[\"\\ud83d\\ude00\"]", o,
               CHECK(o->via.str.size == 4 && memcmp(o->via.str.ptr, "\xf0\x9f\x98\x80", 4) == 0););
    WITH_VALUE("[\"\\u00e9\\u20ac\\n\\/\"]", o,
               CHECK(o->via.str.size == 7 && memcmp(o->via.str.ptr, "\xc3\xa9\xe2\x82\xac\n/", 7) == 0););
    refused("[\"\\ud83d\"]", "surrogate");
    refused("[\"\\ude00\"]", "surrogate");
    refused("[\"\\ud83d\\u0041\"]", "surrogate");
    refused("[\"a\tb\"]", "control character");
    refused("[\"\\x\"]", "escape");
}

static void test_structure_errors(void) {
    refused("{\"a\":1,}", "not valid JSON");
    refused("[1,]", "not valid JSON");
    refused("{\"a\" 1}", "not valid JSON");
    refused("[1] x", "after the JSON value");
    refused("", "not valid JSON");
}

int main(void) {
    RUN(test_floats_stay_floats);
    RUN(test_integers_exact);
    RUN(test_malformed_numbers);
    RUN(test_strings_keep_every_code_point);
    RUN(test_structure_errors);
    return TEST_SUMMARY();
}
