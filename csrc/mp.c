/* mp.c - msgpack-c conveniences. */
#include "mp.h"

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

int bw_mp_unpack_exact(const char *buf, size_t len, msgpack_zone *zone, msgpack_object *out) {
    size_t off = 0;
    /* msgpack-c bounds nesting at MSGPACK_EMBED_STACK_SIZE (32) and fails deeper input
     * as a parse error, which keeps hostile nesting from costing stack. */
    msgpack_unpack_return r = msgpack_unpack(buf, len, &off, zone, out);
    return (r == MSGPACK_UNPACK_SUCCESS && off == len) ? 0 : -1;
}
