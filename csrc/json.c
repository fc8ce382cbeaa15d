/* json.c - msgpack values as JSON text, and JSON text (parsed by cJSON) as msgpack. */
#include "json.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
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

static int pack_json(const cJSON *j, msgpack_packer *pk, int depth) {
    if (cJSON_IsNull(j))
        return msgpack_pack_nil(pk);
    if (cJSON_IsTrue(j))
        return msgpack_pack_true(pk);
    if (cJSON_IsFalse(j))
        return msgpack_pack_false(pk);
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0)
            return msgpack_pack_int64(pk, (int64_t)d);
        return msgpack_pack_double(pk, d);
    }
    if (cJSON_IsString(j)) {
        bw_mp_str(pk, j->valuestring);
        return 0;
    }
    if (depth >= BW_JSON_MAX_DEPTH) /* containers at depth 0 .. MAX-1 */
        return -1;
    int n = 0;
    for (const cJSON *c = j->child; c; c = c->next)
        n++;
    if (cJSON_IsArray(j)) {
        msgpack_pack_array(pk, (size_t)n);
        for (const cJSON *c = j->child; c; c = c->next)
            if (pack_json(c, pk, depth + 1) < 0)
                return -1;
        return 0;
    }
    msgpack_pack_map(pk, (size_t)n);
    for (const cJSON *c = j->child; c; c = c->next) {
        bw_mp_str(pk, c->string ? c->string : "");
        if (pack_json(c, pk, depth + 1) < 0)
            return -1;
    }
    return 0;
}

/* An upper bound on the values in a JSON text: separators and openers outside strings. */
static size_t count_values(const char *text, size_t len) {
    size_t n = 1;
    bool in_str = false;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (in_str) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = false;
        } else if (c == '"') {
            in_str = true;
        } else if (c == ',' || c == '[' || c == '{') {
            n++;
        }
    }
    return n;
}

int bw_json_to_msgpack(const char *text, size_t len, msgpack_packer *pk, char *err, size_t errlen) {
    if (count_values(text, len) > BW_JSON_MAX_VALUES) {
        snprintf(err, errlen, "JSON body has more than %u values (send bulk data as one string, "
                 "or over the msgpack socket)", BW_JSON_MAX_VALUES);
        return -1;
    }
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!j) {
        snprintf(err, errlen, "body is not valid JSON (near byte %zu)",
                 end ? (size_t)(end - text) : (size_t)0);
        return -1;
    }
    /* Trailing garbage after the value is an error too (only whitespace may follow). */
    for (const char *p = end; p && p < text + len; p++)
        if (*p != ' ' && *p != '\n' && *p != '\r' && *p != '\t') {
            cJSON_Delete(j);
            snprintf(err, errlen, "unexpected data after the JSON value");
            return -1;
        }
    int rc = pack_json(j, pk, 0);
    cJSON_Delete(j);
    if (rc < 0)
        snprintf(err, errlen, "JSON nested deeper than %d levels", BW_JSON_MAX_DEPTH);
    return rc;
}
