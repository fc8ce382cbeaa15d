/* json.c - msgpack values as JSON text. bin becomes a string of its length, since a
 * manifest only needs to show that it is there. */
#include "json.h"

#include "mp.h"

static void write_strn(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

void bw_json_write_str(FILE *f, const char *s) {
    size_t n = 0;
    while (s[n])
        n++;
    write_strn(f, s, n);
}

void bw_json_write_object(FILE *f, const msgpack_object *o) {
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: fputs("null", f); break;
    case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", f); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: fprintf(f, "%llu", (unsigned long long)o->via.u64); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: fprintf(f, "%lld", (long long)o->via.i64); break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: fprintf(f, "%.17g", o->via.f64); break;
    case MSGPACK_OBJECT_STR: write_strn(f, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_ARRAY:
        fputc('[', f);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i)
                fputs(", ", f);
            bw_json_write_object(f, &o->via.array.ptr[i]);
        }
        fputc(']', f);
        break;
    case MSGPACK_OBJECT_MAP:
        fputc('{', f);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (i)
                fputs(", ", f);
            if (kv->key.type == MSGPACK_OBJECT_STR)
                bw_json_write_object(f, &kv->key);
            else
                fputs("\"?\"", f);
            fputs(": ", f);
            bw_json_write_object(f, &kv->val);
        }
        fputc('}', f);
        break;
    default: fprintf(f, "\"<%u bytes>\"", o->via.bin.size); break;
    }
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
