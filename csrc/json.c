/* json.c - msgpack values as JSON text, and JSON text as msgpack (a parser of our own). */
#include "json.h"

#include <math.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "mp.h"

static void put(msgpack_sbuffer *out, const char *s, size_t n) { msgpack_sbuffer_write(out, s, n); }
static void puts_(msgpack_sbuffer *out, const char *s) { put(out, s, strlen(s)); }

void bw_json_append_str(msgpack_sbuffer *out, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    put(out, "\"", 1);
    size_t run = 0; /* copy unescaped runs in one go */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        put(out, s + run, i - run);
        run = i + 1;
        char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
        if (c == '"' || c == '\\') {
            esc[1] = (char)c;
            put(out, esc, 2);
        } else if (c == '\n') {
            put(out, "\\n", 2);
        } else {
            put(out, esc, 6);
        }
    }
    if (n > run) /* s may be NULL when n == 0 (msgpack-c's empty str): no NULL + 0 */
        put(out, s + run, n - run);
    put(out, "\"", 1);
}

/* The shortest text that reads back as the same double (0.7, not 0.69999999999999996),
 * as Python's repr and JSON encoders print floats. */
static size_t shortest_double(char *buf, size_t cap, double v) {
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    /* keep it a JSON number that still reads as a float: 1e+20, 3.0 */
    if (!strpbrk(buf, ".eEn") && (size_t)n + 2 < cap) {
        buf[n++] = '.';
        buf[n++] = '0';
        buf[n] = '\0';
    }
    return (size_t)n;
}

static void append_base64(msgpack_sbuffer *out, const unsigned char *p, size_t n) {
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    put(out, "\"", 1);
    char q[4];
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        q[0] = tab[(v >> 18) & 63];
        q[1] = tab[(v >> 12) & 63];
        q[2] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        q[3] = i + 2 < n ? tab[v & 63] : '=';
        put(out, q, 4);
    }
    put(out, "\"", 1);
}

void bw_json_append_object(msgpack_sbuffer *out, const msgpack_object *o) {
    char num[40];
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: puts_(out, "null"); break;
    case MSGPACK_OBJECT_BOOLEAN: puts_(out, o->via.boolean ? "true" : "false"); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        put(out, num, (size_t)snprintf(num, sizeof num, "%llu", (unsigned long long)o->via.u64));
        break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        put(out, num, (size_t)snprintf(num, sizeof num, "%lld", (long long)o->via.i64));
        break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        if (isfinite(o->via.f64))
            put(out, num, shortest_double(num, sizeof num, o->via.f64));
        else
            puts_(out, "null");
        break;
    case MSGPACK_OBJECT_STR: bw_json_append_str(out, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
        append_base64(out, (const unsigned char *)o->via.bin.ptr, o->via.bin.size);
        break;
    case MSGPACK_OBJECT_ARRAY:
        put(out, "[", 1);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i)
                put(out, ",", 1);
            bw_json_append_object(out, &o->via.array.ptr[i]);
        }
        put(out, "]", 1);
        break;
    case MSGPACK_OBJECT_MAP:
        put(out, "{", 1);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (i)
                put(out, ",", 1);
            if (kv->key.type == MSGPACK_OBJECT_STR) {
                bw_json_append_object(out, &kv->key);
            } else if (kv->key.type == MSGPACK_OBJECT_ARRAY || kv->key.type == MSGPACK_OBJECT_MAP) {
                /* JSON keys are strings. A container key gets a fixed name: rendering it
                 * would re-escape it once per nesting level, doubling the output each time. */
                puts_(out, kv->key.type == MSGPACK_OBJECT_ARRAY ? "\"<array>\"" : "\"<map>\"");
            } else { /* a scalar key: its JSON text, as a string */
                msgpack_sbuffer k;
                msgpack_sbuffer_init(&k);
                bw_json_append_object(&k, &kv->key);
                bw_json_append_str(out, k.data, k.size);
                msgpack_sbuffer_destroy(&k);
            }
            put(out, ":", 1);
            bw_json_append_object(out, &kv->val);
        }
        put(out, "}", 1);
        break;
    default: puts_(out, "null"); break;
    }
}

static void write_buffer(FILE *f, msgpack_sbuffer *b) {
    fwrite(b->data, 1, b->size, f);
    msgpack_sbuffer_destroy(b);
}

void bw_json_write_str(FILE *f, const char *s) {
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    bw_json_append_str(&b, s, strlen(s));
    write_buffer(f, &b);
}

void bw_json_write_object(FILE *f, const msgpack_object *o) {
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    bw_json_append_object(&b, o);
    write_buffer(f, &b);
}

void bw_json_write_msgpack(FILE *f, const char *buf, size_t len) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object o;
    if (bw_mp_unpack_exact(buf, len, &z, &o) == 0)
        bw_json_write_object(f, &o);
    else
        fputs("null", f);
    msgpack_zone_destroy(&z);
}

/* ---- JSON text -> msgpack ------------------------------------------------------------
 *
 * Why our own parser rather than a Debian library: a body must reach the handler as
 * Python's json.loads would read it: 1.0 a float, 9007199254740993 and every int64 and
 * uint64 exact, "a\u0000b" three characters long, and integers past 64 bits refused
 * rather than rounded. None of the packaged parsers does all of that: cJSON 1.7 reads
 * every number as a double and returns strings NUL-terminated; Jansson 2.14 keeps
 * integers in a long long (no uint64 above 2**63) and object keys as C strings; json-c
 * 0.16, even with JSON_TOKENER_STRICT, clamps 2**64 to 2**64-1 and -2**63-1 to -2**63
 * without an error, and accepts NaN, Infinity and "1.". The grammar is small (RFC 8259);
 * tests/fuzz/fuzz_codec.c and fuzz_http.c exercise this code.
 *
 * msgpack writes a container's size before its elements, so the text is read twice by
 * the same code: the first pass validates it and records each container's size, in
 * the order they open; the second packs, reading those sizes back. */

struct parser {
    const char *text, *p, *end;
    msgpack_packer *pk; /* NULL in the first (validating) pass */
    uint32_t *sizes;    /* element counts of containers, in opening order */
    size_t nsizes, cap_sizes, next_size;
    size_t values;
    char *buf; /* a string with escapes, decoded; a float's text, NUL-terminated */
    size_t nbuf, cap_buf;
    char *err;
    size_t errlen;
};

static int fail(struct parser *j, const char *what) {
    snprintf(j->err, j->errlen, "body is not valid JSON: %s (near byte %zu)", what,
             (size_t)(j->p - j->text));
    return -1;
}

static int buf_add(struct parser *j, const char *s, size_t n) {
    if (n == 0) /* j->buf may still be NULL: no memcpy(NULL, ..., 0) */
        return 0;
    if (j->nbuf + n > j->cap_buf) {
        size_t cap = j->cap_buf ? j->cap_buf : 256;
        while (cap < j->nbuf + n)
            cap *= 2;
        char *b = realloc(j->buf, cap);
        if (!b)
            return fail(j, "out of memory");
        j->buf = b;
        j->cap_buf = cap;
    }
    memcpy(j->buf + j->nbuf, s, n);
    j->nbuf += n;
    return 0;
}

static void skip_ws(struct parser *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t'))
        j->p++;
}

static bool is_digit(const struct parser *j) { return j->p < j->end && *j->p >= '0' && *j->p <= '9'; }

/* An integer's digits as int64 (negative) or uint64, exactly: the handler sees the same
 * int the client sent, or the client is told why not. */
static int pack_integer(struct parser *j, const char *s, bool neg) {
    uint64_t u = 0;
    for (const char *q = s + neg; q < j->p; q++) {
        unsigned d = (unsigned)(*q - '0');
        if (u > (UINT64_MAX - d) / 10)
            goto range;
        u = u * 10 + d;
    }
    if (neg && u > (uint64_t)INT64_MAX + 1)
        goto range;
    if (!j->pk)
        return 0;
    if (neg) /* -u without overflowing at -2**63 */
        return msgpack_pack_int64(j->pk, u ? -(int64_t)(u - 1) - 1 : 0);
    return msgpack_pack_uint64(j->pk, u);
range:
    snprintf(j->err, j->errlen, "integer %.*s%s does not fit in 64 bits (-2**63 to 2**64-1); "
             "send it as a string", (int)(j->p - s > 40 ? 40 : j->p - s), s,
             j->p - s > 40 ? "..." : "");
    return -1;
}

static int pack_float(struct parser *j, const char *s) {
    if (!j->pk)
        return 0;
    j->nbuf = 0;
    if (buf_add(j, s, (size_t)(j->p - s)) < 0 || buf_add(j, "", 1) < 0)
        return -1;
    /* Out-of-range exponents give +-inf or 0, as float() and json.loads do. */
    return msgpack_pack_double(j->pk, strtod(j->buf, NULL));
}

/* -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?  An integer without a fraction or an
 * exponent, anything else a float: 1 and 1.0 stay different, as in Python. */
static int parse_number(struct parser *j) {
    const char *s = j->p;
    bool neg = *j->p == '-', is_float = false;
    j->p += neg;
    if (!is_digit(j))
        return fail(j, "malformed number");
    if (*j->p++ == '0' && is_digit(j))
        return fail(j, "malformed number (leading zero)");
    while (is_digit(j))
        j->p++;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!is_digit(j))
            return fail(j, "malformed number (no digit after '.')");
        while (is_digit(j))
            j->p++;
        is_float = true;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!is_digit(j))
            return fail(j, "malformed number (no digit in the exponent)");
        while (is_digit(j))
            j->p++;
        is_float = true;
    }
    return is_float ? pack_float(j, s) : pack_integer(j, s, neg);
}

static int hex4(struct parser *j, unsigned *cp) {
    if (j->end - j->p < 4)
        return fail(j, "truncated \\u escape");
    *cp = 0;
    for (int i = 0; i < 4; i++) {
        char c = *j->p++;
        unsigned d = c >= '0' && c <= '9'   ? (unsigned)(c - '0')
                     : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                     : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10)
                                            : 16u;
        if (d == 16)
            return fail(j, "bad hex digit in a \\u escape");
        *cp = *cp << 4 | d;
    }
    return 0;
}

/* \uXXXX, at the 'u': a code point as UTF-8. A surrogate pair is one code point; a lone
 * surrogate has no UTF-8 form (msgpack str is UTF-8), so it is refused, not replaced. */
static int unicode_escape(struct parser *j) {
    unsigned cp, lo;
    j->p++;
    if (hex4(j, &cp) < 0)
        return -1;
    if (cp >= 0xDC00 && cp <= 0xDFFF)
        return fail(j, "unpaired UTF-16 surrogate in a \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u')
            return fail(j, "unpaired UTF-16 surrogate in a \\u escape");
        j->p += 2;
        if (hex4(j, &lo) < 0)
            return -1;
        if (lo < 0xDC00 || lo > 0xDFFF)
            return fail(j, "unpaired UTF-16 surrogate in a \\u escape");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp, n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3F)), n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12), u[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F)), n = 3;
    } else {
        u[0] = (char)(0xF0 | cp >> 18), u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3F)), u[3] = (char)(0x80 | (cp & 0x3F)), n = 4;
    }
    return j->pk ? buf_add(j, u, n) : 0;
}

/* One escape, at the backslash, appended decoded. */
static int escape(struct parser *j) {
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    if (++j->p == j->end)
        return fail(j, "unterminated string");
    if (*j->p == 'u')
        return unicode_escape(j);
    const char *e = *j->p ? strchr(from, *j->p) : NULL;
    if (!e)
        return fail(j, "unknown escape in a string");
    j->p++;
    return j->pk ? buf_add(j, &to[e - from], 1) : 0;
}

/* A string, at its opening quote. Bytes other than escapes and control characters pass
 * through as they are (the worker checks UTF-8 when it makes the Python str). */
static int parse_string(struct parser *j) {
    const char *s = ++j->p;
    bool escaped = false;
    j->nbuf = 0;
    for (;;) {
        const char *run = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && (unsigned char)*j->p >= 0x20)
            j->p++;
        if (j->p == j->end)
            return fail(j, "unterminated string");
        if (escaped && j->pk && buf_add(j, run, (size_t)(j->p - run)) < 0)
            return -1;
        if (*j->p == '"')
            break;
        if (*j->p != '\\')
            return fail(j, "control character in a string (escape it)");
        if (!escaped && j->pk && buf_add(j, s, (size_t)(j->p - s)) < 0)
            return -1;
        escaped = true;
        if (escape(j) < 0)
            return -1;
    }
    size_t n = escaped ? j->nbuf : (size_t)(j->p - s);
    j->p++;
    if (!j->pk)
        return 0;
    msgpack_pack_str(j->pk, n);
    return msgpack_pack_str_body(j->pk, escaped ? j->buf : s, n);
}

static int literal(struct parser *j, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return fail(j, "unexpected character");
    j->p += n;
    if (!j->pk)
        return 0;
    return word[0] == 'n' ? msgpack_pack_nil(j->pk)
           : word[0] == 't' ? msgpack_pack_true(j->pk) : msgpack_pack_false(j->pk);
}

static int parse_value(struct parser *j, int depth);

/* The first pass reserves a slot for the container's size and fills it at the end;
 * the second packs the header from it. */
static int container_open(struct parser *j, size_t *slot, bool is_map) {
    if (j->pk) {
        uint32_t n = j->sizes[j->next_size++];
        return is_map ? msgpack_pack_map(j->pk, n) : msgpack_pack_array(j->pk, n);
    }
    if (j->nsizes == j->cap_sizes) {
        size_t cap = j->cap_sizes ? j->cap_sizes * 2 : 64;
        uint32_t *s = realloc(j->sizes, cap * sizeof *s);
        if (!s)
            return fail(j, "out of memory");
        j->sizes = s;
        j->cap_sizes = cap;
    }
    *slot = j->nsizes++;
    j->sizes[*slot] = 0;
    return 0;
}

/* An array or object, at its opening bracket. */
static int parse_container(struct parser *j, int depth) {
    bool is_map = *j->p == '{';
    char close = is_map ? '}' : ']';
    size_t slot = 0;
    uint32_t n = 0;
    if (depth >= BW_JSON_MAX_DEPTH) { /* containers at depth 0 .. MAX-1 */
        snprintf(j->err, j->errlen, "JSON nested deeper than %d levels", BW_JSON_MAX_DEPTH);
        return -1;
    }
    j->p++;
    if (container_open(j, &slot, is_map) < 0)
        return -1;
    skip_ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return 0;
    }
    for (;; n++) {
        if (is_map) {
            skip_ws(j);
            if (j->p == j->end || *j->p != '"')
                return fail(j, "expected a string key");
            if (parse_string(j) < 0)
                return -1;
            skip_ws(j);
            if (j->p == j->end || *j->p++ != ':')
                return fail(j, "expected ':' after a key");
        }
        if (parse_value(j, depth + 1) < 0)
            return -1;
        skip_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
        } else if (j->p < j->end && *j->p == close) {
            j->p++;
            break;
        } else {
            return fail(j, is_map ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    if (!j->pk)
        j->sizes[slot] = n + 1;
    return 0;
}

static int parse_value(struct parser *j, int depth) {
    skip_ws(j);
    if (j->p == j->end)
        return fail(j, "unexpected end of the body");
    if (++j->values > BW_JSON_MAX_VALUES) {
        snprintf(j->err, j->errlen, "JSON body has more than %u values (send bulk data as one "
                 "string, or over the msgpack socket)", BW_JSON_MAX_VALUES);
        return -1;
    }
    char c = *j->p;
    if (c == '{' || c == '[')
        return parse_container(j, depth);
    if (c == '"')
        return parse_string(j);
    if (c == '-' || (c >= '0' && c <= '9'))
        return parse_number(j);
    if (c == 't')
        return literal(j, "true");
    if (c == 'f')
        return literal(j, "false");
    if (c == 'n')
        return literal(j, "null");
    return fail(j, "unexpected character");
}

/* One pass over the whole text: a value, then only whitespace. */
static int parse_text(struct parser *j, msgpack_packer *pk) {
    j->p = j->text;
    j->pk = pk;
    j->values = 0;
    j->next_size = 0;
    if (parse_value(j, 0) < 0)
        return -1;
    skip_ws(j);
    if (j->p != j->end) {
        snprintf(j->err, j->errlen, "unexpected data after the JSON value");
        return -1;
    }
    return 0;
}

int bw_json_to_msgpack(const char *text, size_t len, msgpack_packer *pk, char *err, size_t errlen) {
    struct parser j = {.text = text, .end = text + len, .err = err, .errlen = errlen};
    int rc = parse_text(&j, NULL);
    if (rc == 0)
        rc = parse_text(&j, pk);
    free(j.sizes);
    free(j.buf);
    return rc;
}
