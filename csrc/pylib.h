/* pylib.h - which libpython this worker embeds, and whether the environment --python
 * names belongs to it.
 *
 * A libpython runs only the standard library it was built with: Debian's 3.11.2 with
 * pyenv's 3.11.7 stdlib fails on extension modules (undefined symbols), the reverse on
 * `import math`. Both are "Python 3.11", so the version alone cannot tell; what does is
 * where each side says its libpython lives (the loaded library's directory against the
 * stdlib's sysconfig LIBDIR). */
#ifndef BW_PYLIB_H
#define BW_PYLIB_H

#include <stddef.h>

/* "<path of the loaded libpython> (Python <Py_GetVersion()>)"; a statically linked
 * libpython is named by the archive it was built from. Works before Python starts. */
void bw_pylib_describe(char *buf, size_t cap);

/* After Py_InitializeFromConfig, with the GIL: 0 when the running standard library
 * belongs to the embedded libpython, else -1 with the user-facing reason in err. */
int bw_pylib_check(const char *python, char *err, size_t cap);

/* err for a failed Py_InitializeFromConfig: `why`, then which Python is embedded and how
 * to rebuild the worker for the interpreter `python`, the likeliest cause. */
void bw_pylib_init_failed(const char *python, const char *why, char *err, size_t cap);

#endif
