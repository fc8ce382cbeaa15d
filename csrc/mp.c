/* mp.c - msgpack-c conveniences. */
#include "mp.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void bw_mp_strn(msgpack_packer *pk, const char *s, size_t n) {
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

void bw_mp_str(msgpack_packer *pk, const char *s) { bw_mp_strn(pk, s, strlen(s)); }

void bw_mp_kv_str(msgpack_packer *pk, const char *k, const char *v) {
    bw_mp_str(pk, k);
    bw_mp_str(pk, v);
}

void bw_mp_kv_double(msgpack_packer *pk, const char *k, double v) {
    bw_mp_str(pk, k);
    msgpack_pack_double(pk, v);
}

void bw_mp_kv_int(msgpack_packer *pk, const char *k, long long v) {
    bw_mp_str(pk, k);
    msgpack_pack_long_long(pk, v);
}

void bw_mp_kv_bool(msgpack_packer *pk, const char *k, bool v) {
    bw_mp_str(pk, k);
    if (v)
        msgpack_pack_true(pk);
    else
        msgpack_pack_false(pk);
}

bool bw_mp_is_str(const msgpack_object *o, const char *s) {
    size_t n = strlen(s);
    return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n &&
           memcmp(o->via.str.ptr, s, n) == 0;
}

const msgpack_object *bw_mp_get(const msgpack_object *map, const char *key) {
    if (!map || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (bw_mp_is_str(&map->via.map.ptr[i].key, key))
            return &map->via.map.ptr[i].val;
    return NULL;
}

char *bw_mp_strdup(const msgpack_object *o, char *buf, size_t cap) {
    if (!o || o->type != MSGPACK_OBJECT_STR || cap == 0)
        return NULL;
    size_t n = o->via.str.size < cap - 1 ? o->via.str.size : cap - 1;
    memcpy(buf, o->via.str.ptr, n);
    buf[n] = '\0';
    return buf;
}

double bw_mp_num(const msgpack_object *o, double dflt) {
    if (!o)
        return dflt;
    switch (o->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return (double)o->via.u64;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return (double)o->via.i64;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return o->via.f64;
    default: return dflt;
    }
}

bool bw_mp_true(const msgpack_object *o) {
    return o && o->type == MSGPACK_OBJECT_BOOLEAN && o->via.boolean;
}

/* msgpack-c allocates a container's elements as soon as it reads the count, so a 5-byte
 * "map32 of 2^31 entries" asks for 64 GiB. Every value takes at least one byte, so when
 * the values still expected (the counts of all containers open at this point, not just
 * the last one's: 28 nested array32 headers each claiming the rest of a 16 MiB frame made
 * msgpack-c reserve 14 GiB and touch 400 MiB) outnumber the bytes left, the input cannot
 * be complete: reject it up front. Then msgpack-c allocates at most one object per byte.
 * One linear pass over the headers (pre-order), skipping str/bin/ext payloads. */
static bool counts_fit(const unsigned char *p, size_t len) {
    /* 0xc4..0xdf: width of the length field, and payload bytes besides the length. */
#define X(b) [(b) - 0xc4]
    static const unsigned char lenw[28] = {X(0xc4) = 1, X(0xc5) = 2, X(0xc6) = 4, X(0xc7) = 1,
        X(0xc8) = 2, X(0xc9) = 4, X(0xd9) = 1, X(0xda) = 2, X(0xdb) = 4, X(0xdc) = 2,
        X(0xdd) = 4, X(0xde) = 2, X(0xdf) = 4};
    static const unsigned char fixed[28] = {X(0xc7) = 1, X(0xc8) = 1, X(0xc9) = 1, /* ext type */
        X(0xca) = 4, X(0xcb) = 8, X(0xcc) = 1, X(0xcd) = 2, X(0xce) = 4, X(0xcf) = 8,
        X(0xd0) = 1, X(0xd1) = 2, X(0xd2) = 4, X(0xd3) = 8,
        X(0xd4) = 2, X(0xd5) = 3, X(0xd6) = 5, X(0xd7) = 9, X(0xd8) = 17};
#undef X
    size_t i = 0, need = 1; /* values expected and not yet begun */
    while (i < len) {
        unsigned b = p[i++];
        size_t n, left = len - i;
        if (need > 0) /* 0: bytes after a complete value, which unpack_exact refuses */
            need--;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
            continue;
        if (b == 0xc1)
            return false;
        if (b < 0xa0) { /* fixmap, fixarray */
            need += (b & 0x0f) * (b < 0x90 ? 2u : 1u);
            if (need > left)
                return false;
            continue;
        }
        if (b < 0xc0) { /* fixstr */
            n = b & 0x1f;
        } else {
            unsigned w = lenw[b - 0xc4];
            if (w > left)
                return false;
            n = 0;
            for (unsigned k = 0; k < w; k++)
                n = n << 8 | p[i + k];
            i += w;
            left -= w;
            if (b >= 0xdc) { /* array16/32, map16/32: elements follow */
                need += b >= 0xde ? 2 * n : n; /* need <= len before: no overflow */
                if (need > left)
                    return false;
                continue;
            }
            n += fixed[b - 0xc4]; /* ext's type byte, fixed-size payloads */
        }
        if (n > left)
            return false;
        i += n;
    }
    return true;
}

int bw_mp_unpack_exact(const char *buf, size_t len, msgpack_zone *zone, msgpack_object *out) {
    if (!counts_fit((const unsigned char *)buf, len))
        return -1;
    size_t off = 0;
    /* msgpack-c bounds nesting at MSGPACK_EMBED_STACK_SIZE (32) and fails deeper input
     * as a parse error, which keeps hostile nesting from costing stack. */
    msgpack_unpack_return r = msgpack_unpack(buf, len, &off, zone, out);
    return (r == MSGPACK_UNPACK_SUCCESS && off == len) ? 0 : -1;
}

uint32_t bw_mp_pack_entries(msgpack_packer *pk, const msgpack_object *map) {
    uint32_t n = map && map->type == MSGPACK_OBJECT_MAP ? map->via.map.size : 0;
    for (uint32_t i = 0; i < n; i++) {
        msgpack_pack_object(pk, map->via.map.ptr[i].key);
        msgpack_pack_object(pk, map->via.map.ptr[i].val);
    }
    return n;
}

void bw_mp_pack_map_plus(msgpack_packer *pk, const msgpack_object *map, uint32_t extra) {
    uint32_t n = map && map->type == MSGPACK_OBJECT_MAP ? map->via.map.size : 0;
    msgpack_pack_map(pk, n + extra);
    bw_mp_pack_entries(pk, map);
}

void bw_mp_printf(msgpack_sbuffer *out, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0)
        msgpack_sbuffer_write(out, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}
