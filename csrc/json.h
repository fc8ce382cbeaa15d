/* json.h - JSON <-> msgpack: manifests on disk and the HTTP front's bodies. */
#ifndef BW_JSON_H
#define BW_JSON_H

#include <msgpack.h>
#include <stddef.h>
#include <stdio.h>

/* Levels of arrays/objects. An HTTP body becomes the kwargs map, one level inside the
 * request map, and the worker decodes at most 32 levels (msgpack-c): so 31. */
#define BW_JSON_MAX_DEPTH 31
/* The parser builds no tree (4 bytes per container), but the worker turns every value into
 * a Python object (~30-100 bytes each): a body above this many values is refused. */
#define BW_JSON_MAX_VALUES (1u << 20)

/* Append JSON text to `out` (a byte buffer). bin becomes a base64 string; NaN and
 * infinities become null (JSON has neither). */
void bw_json_append_object(msgpack_sbuffer *out, const msgpack_object *o);
void bw_json_append_str(msgpack_sbuffer *out, const char *s, size_t n);

/* Convenience for files. */
void bw_json_write_str(FILE *f, const char *s);
void bw_json_write_object(FILE *f, const msgpack_object *o);
void bw_json_write_msgpack(FILE *f, const char *buf, size_t len); /* "null" if unparsable */

/* Parse JSON text (RFC 8259) and pack it as one msgpack value, as Python's json.loads reads
 * it: a number with a fraction or exponent is a float, any other an int, exact from -2**63
 * to 2**64-1; strings keep NULs and every code point (surrogate pairs). 0, or -1 with a
 * reason in err: not JSON, an integer past 64 bits, a lone surrogate, nested deeper than
 * BW_JSON_MAX_DEPTH, more than BW_JSON_MAX_VALUES values. */
int bw_json_to_msgpack(const char *text, size_t len, msgpack_packer *pk, char *err, size_t errlen);

#endif
