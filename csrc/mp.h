/* mp.h - small conveniences over msgpack-c used by every component. */
#ifndef BW_MP_H
#define BW_MP_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

void bw_mp_str(msgpack_packer *pk, const char *s);
void bw_mp_strn(msgpack_packer *pk, const char *s, size_t n);
void bw_mp_kv_str(msgpack_packer *pk, const char *k, const char *v);
void bw_mp_kv_double(msgpack_packer *pk, const char *k, double v);
void bw_mp_kv_int(msgpack_packer *pk, const char *k, long long v);
void bw_mp_kv_bool(msgpack_packer *pk, const char *k, bool v);

/* Pack the entries of `map` (nothing if it is NULL or not a map); returns their count. */
uint32_t bw_mp_pack_entries(msgpack_packer *pk, const msgpack_object *map);
/* Pack a map header for map's entries plus `extra`, then the entries: the caller packs
 * the extra key/value pairs next. */
void bw_mp_pack_map_plus(msgpack_packer *pk, const msgpack_object *map, uint32_t extra);

/* printf onto a buffer of text (metrics, JSON); a line longer than 511 bytes is cut. */
void bw_mp_printf(msgpack_sbuffer *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Value of `key` in a msgpack map (NULL if absent or `map` is not a map). */
const msgpack_object *bw_mp_get(const msgpack_object *map, const char *key);
bool bw_mp_is_str(const msgpack_object *o, const char *s);
/* Copy a str object into buf (NUL-terminated, truncated); returns buf or NULL. */
char *bw_mp_strdup(const msgpack_object *o, char *buf, size_t cap);
double bw_mp_num(const msgpack_object *o, double dflt);
bool bw_mp_true(const msgpack_object *o);

/* Decode exactly one msgpack value filling all of buf[0..len). 0 or -1 (bad frame). */
int bw_mp_unpack_exact(const char *buf, size_t len, msgpack_zone *zone, msgpack_object *out);

#endif
