/* codec.h - msgpack <-> Python objects, in C.
 * GIL: every function here must be called with the GIL held. */
#ifndef BW_CODEC_H
#define BW_CODEC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <msgpack.h>

#define BW_ENCODE_MAX_DEPTH 64

/* New reference, or NULL with a message in err (no Python exception left set). */
PyObject *bw_codec_to_py(const msgpack_object *o, char *err, size_t errlen);

/* Pack obj; 0 on success, -1 with a message in err (no Python exception left set).
 * On failure the packer's buffer holds a partial value: callers roll it back. */
int bw_codec_from_py(msgpack_packer *pk, PyObject *obj, char *err, size_t errlen);

#endif
