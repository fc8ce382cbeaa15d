/* pylib.c - the embedded libpython against the standard library of --python (pylib.h). */
#define _GNU_SOURCE
#include "pylib.h"

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* What the running standard library says about the Python it was installed with, and
 * what the embedded libpython says about itself (sys.* is compiled into libpython). */
struct pyside {
    char libdir[PATH_MAX], libpl[PATH_MAX], stdlib[PATH_MAX];
    char base_lib[PATH_MAX + 64];         /* sys.base_prefix/sys.platlibdir */
    char prefix[PATH_MAX], platlib[64];   /* sys.prefix: the venv, if one */
    char soabi[128], abiflags[32];        /* the stdlib's _sysconfigdata */
    char cache_tag[64], sys_abiflags[32]; /* the libpython's sys module */
};

/* The file the dynamic loader mapped for libpython (what runs, whatever RPATH or
 * LD_LIBRARY_PATH said), or NULL when libpython is linked into this executable. */
static const char *loaded_path(void) {
    Dl_info py, self;
    if (!dladdr((void *)Py_GetVersion, &py) || !py.dli_fname || !*py.dli_fname)
        return NULL;
    if (dladdr((void *)loaded_path, &self) && self.dli_fbase == py.dli_fbase)
        return NULL;
    return py.dli_fname;
}

void bw_pylib_describe(char *buf, size_t cap) {
    const char *path = loaded_path();
    const char *v = Py_GetVersion();
    int vlen = (int)strcspn(v, "\n"); /* some builds put the compiler on a second line */
    snprintf(buf, cap, "%s%s (Python %.*s)", path ? path : BW_BUILD_PYLIB,
             path ? "" : ", linked in", vlen, v);
}

/* The directory holding the embedded libpython (for a static one: its archive's). */
static void embedded_dir(char *out, size_t cap) {
    const char *path = loaded_path();
    snprintf(out, cap, "%s", path ? path : BW_BUILD_PYLIB);
    char *slash = strrchr(out, '/');
    if (slash)
        *slash = '\0';
}

/* a and b name the same directory once symlinks are resolved. */
static bool same_dir(const char *a, const char *b) {
    char ra[PATH_MAX], rb[PATH_MAX];
    return *a && *b && realpath(a, ra) && realpath(b, rb) && strcmp(ra, rb) == 0;
}

/* Copy the str v (a new reference, may be NULL) into buf; "" for anything else. */
static void take_str(PyObject *v, char *buf, size_t cap) {
    const char *s = v && PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    snprintf(buf, cap, "%s", s ? s : "");
    Py_XDECREF(v);
    PyErr_Clear();
}

static void config_var(PyObject *sysconfig, const char *name, char *buf, size_t cap) {
    take_str(PyObject_CallMethod(sysconfig, "get_config_var", "s", name), buf, cap);
}

static void sys_str(const char *name, char *buf, size_t cap) {
    PyObject *v = PySys_GetObject(name); /* borrowed */
    Py_XINCREF(v);
    take_str(v, buf, cap);
}

/* Fill s from sysconfig and sys. -1 when the stdlib cannot even import sysconfig. */
static int read_sides(struct pyside *s) {
    memset(s, 0, sizeof *s);
    PyObject *impl = PySys_GetObject("implementation"); /* borrowed */
    take_str(impl ? PyObject_GetAttrString(impl, "cache_tag") : NULL, s->cache_tag,
             sizeof s->cache_tag);
    sys_str("abiflags", s->sys_abiflags, sizeof s->sys_abiflags);
    char base[PATH_MAX];
    sys_str("base_prefix", base, sizeof base);
    sys_str("prefix", s->prefix, sizeof s->prefix);
    sys_str("platlibdir", s->platlib, sizeof s->platlib);
    snprintf(s->base_lib, sizeof s->base_lib, "%s/%s", base, s->platlib);

    PyObject *sysconfig = PyImport_ImportModule("sysconfig");
    if (!sysconfig) {
        PyErr_Clear();
        return -1;
    }
    take_str(PyObject_GetAttrString(sysconfig, "__file__"), s->stdlib, sizeof s->stdlib);
    char *slash = strrchr(s->stdlib, '/');
    if (slash)
        *slash = '\0';
    config_var(sysconfig, "LIBDIR", s->libdir, sizeof s->libdir);
    config_var(sysconfig, "LIBPL", s->libpl, sizeof s->libpl);
    config_var(sysconfig, "SOABI", s->soabi, sizeof s->soabi);
    config_var(sysconfig, "ABIFLAGS", s->abiflags, sizeof s->abiflags);
    Py_DECREF(sysconfig);
    return 0;
}

/* Same build: the stdlib's Python keeps its libpython where ours was loaded from (LIBDIR;
 * LIBPL holds a static one; base_prefix/lib covers builds relocated after configure).
 * Same ABI: the stdlib's extension-module tag and abiflags are the libpython's. */
static bool same_build(const struct pyside *s, const char *libdir) {
    return same_dir(libdir, s->libdir) || same_dir(libdir, s->libpl) ||
           same_dir(libdir, s->base_lib);
}

static bool same_abi(const struct pyside *s) {
    return (!*s->soabi || !*s->cache_tag ||
            strncmp(s->soabi, s->cache_tag, strlen(s->cache_tag)) == 0) &&
           strcmp(s->abiflags, s->sys_abiflags) == 0;
}

/* A venv of another Python version passes both (getpath, not finding that
 * version's stdlib beside the venv's base, falls back to our own build's) but lacks our
 * site-packages: a venv has lib/<stdlib dir name>, e.g. lib/python3.11. */
static bool venv_matches(const struct pyside *s) {
    char cfg[PATH_MAX + 16], dir[2 * PATH_MAX + 64];
    snprintf(cfg, sizeof cfg, "%s/pyvenv.cfg", s->prefix);
    if (access(cfg, F_OK) != 0)
        return true; /* not a venv: its stdlib is its own */
    const char *name = strrchr(s->stdlib, '/');
    name = name ? name + 1 : s->stdlib;
    snprintf(dir, sizeof dir, "%s/%s/%s", s->prefix, s->platlib, name);
    if (access(dir, F_OK) == 0)
        return true;
    snprintf(dir, sizeof dir, "%s/lib/%s", s->prefix, name);
    return access(dir, F_OK) == 0;
}

/* "`PY -m pip install --force-reinstall --no-cache-dir SRC`" into buf, and a word on
 * $PYTHONHOME, which moves the stdlib search away from --python's as well. */
static void rebuild_hint(const char *python, char *buf, size_t cap) {
    bool have_src = access(BW_SOURCE_DIR "/setup.py", R_OK) == 0;
    const char *home = getenv("PYTHONHOME");
    snprintf(buf, cap, "`%s -m pip install --force-reinstall --no-cache-dir %s`%s%s%s", python,
             have_src ? BW_SOURCE_DIR : "<the beam source tree>",
             home && *home ? " (or unset PYTHONHOME=" : "", home && *home ? home : "",
             home && *home ? ", which overrides where the stdlib is looked for)" : "");
}

int bw_pylib_check(const char *python, char *err, size_t cap) {
    struct pyside s;
    char libdir[PATH_MAX], lib[PATH_MAX + 256], hint[2 * PATH_MAX];
    embedded_dir(libdir, sizeof libdir);
    int readable = read_sides(&s);
    bool abi = readable == 0 && same_abi(&s);
    bool stdlib_ok = abi && same_build(&s, libdir);
    if (stdlib_ok && venv_matches(&s))
        return 0;
    bw_pylib_describe(lib, sizeof lib);
    rebuild_hint(python, hint, sizeof hint);
    if (readable < 0)
        snprintf(err, cap, "beam-worker embeds %s, but --python %s runs a standard library "
                 "that cannot import sysconfig: it belongs to another Python. Rebuild the "
                 "worker with that interpreter: %s", lib, python, hint);
    else if (!stdlib_ok)
        snprintf(err, cap, "beam-worker embeds %s, but --python %s runs the standard library "
                 "of another Python: %s (its libpython is in %s%s%s%s%s). A worker must "
                 "embed the Python it serves; rebuild it with that interpreter: %s", lib,
                 python, s.stdlib, s.libdir, abi ? "" : "; its extension tag is ", abi ? "" :
                 s.soabi, abi ? "" : ", this libpython's ", abi ? "" : s.cache_tag, hint);
    else
        snprintf(err, cap, "beam-worker embeds %s, but --python %s belongs to a venv %s of "
                 "another Python version (it has no %s/%s). Rebuild the worker with that "
                 "interpreter: %s", lib, python, s.prefix, s.platlib,
                 strrchr(s.stdlib, '/') ? strrchr(s.stdlib, '/') + 1 : s.stdlib, hint);
    return -1;
}

void bw_pylib_init_failed(const char *python, const char *why, char *err, size_t cap) {
    char lib[PATH_MAX + 256], hint[2 * PATH_MAX];
    bw_pylib_describe(lib, sizeof lib);
    rebuild_hint(python, hint, sizeof hint);
    snprintf(err, cap, "%s. beam-worker embeds %s; if --python %s is another Python, the "
             "worker was built for a different interpreter: rebuild it with this one: %s",
             why, lib, python, hint);
}
