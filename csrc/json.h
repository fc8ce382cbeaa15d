/* json.h - writing JSON for manifests (reading it is the Python CLI's job). */
#ifndef BW_JSON_H
#define BW_JSON_H

#include <msgpack.h>
#include <stddef.h>
#include <stdio.h>

void bw_json_write_str(FILE *f, const char *s);
void bw_json_write_object(FILE *f, const msgpack_object *o);
/* Decode one packed msgpack value and write it as JSON ("null" if it does not parse). */
void bw_json_write_msgpack(FILE *f, const char *buf, size_t len);

#endif
