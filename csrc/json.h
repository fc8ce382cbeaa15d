/* json.h - JSON <-> msgpack: manifests on disk and the HTTP front's bodies. */
#ifndef BW_JSON_H
#define BW_JSON_H

#include <msgpack.h>
#include <stddef.h>
#include <stdio.h>

/* Levels of arrays/objects. An HTTP body becomes the kwargs map, one level inside the
 * request map, and the worker decodes at most 32 levels (msgpack-c): so 31. */
#define BW_JSON_MAX_DEPTH 31
/* cJSON spends ~64 bytes per value: 16 MiB of "[0,0,..." would take ~700 MiB. Bodies are
 * counted before parsing and refused above this many values (~64 MiB of nodes). */
#define BW_JSON_MAX_VALUES (1u << 20)

/* Append JSON text to `out` (a byte buffer). bin becomes a base64 string; NaN and
 * infinities become null (JSON has neither). */
void bw_json_append_object(msgpack_sbuffer *out, const msgpack_object *o);
void bw_json_append_str(msgpack_sbuffer *out, const char *s, size_t n);

/* Convenience for files. */
void bw_json_write_str(FILE *f, const char *s);
void bw_json_write_object(FILE *f, const msgpack_object *o);
void bw_json_write_msgpack(FILE *f, const char *buf, size_t len); /* "null" if unparsable */

/* Parse JSON text and pack it as one msgpack value. Integers that fit int64 stay
 * integers. 0, or -1 with a reason in err (not JSON, nested deeper than BW_JSON_MAX_DEPTH). */
int bw_json_to_msgpack(const char *text, size_t len, msgpack_packer *pk, char *err, size_t errlen);

#endif
