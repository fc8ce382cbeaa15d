/* scrub.c - zero-on-free allocator wrapper and environment scrubbing. */
#define _GNU_SOURCE
#include "scrub.h"

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

/* Each block carries its size in a 16-byte header (keeps the 16-byte alignment that
 * CPython's allocators guarantee), so free() knows how much to zero. */
#define HDR 16

struct wrapped {
    PyMemAllocatorEx inner;
};

static struct wrapped dom_raw, dom_mem, dom_obj;
static volatile bool scrub_on;

static void *w_malloc(void *ctx, size_t n) {
    struct wrapped *w = ctx;
    if (n > SIZE_MAX - HDR)
        return NULL;
    char *p = w->inner.malloc(w->inner.ctx, n + HDR);
    if (!p)
        return NULL;
    memcpy(p, &n, sizeof n);
    return p + HDR;
}

static void *w_calloc(void *ctx, size_t nelem, size_t elsize) {
    struct wrapped *w = ctx;
    if (elsize && nelem > (SIZE_MAX - HDR) / elsize)
        return NULL;
    size_t n = nelem * elsize;
    char *p = w->inner.calloc(w->inner.ctx, 1, n + HDR);
    if (!p)
        return NULL;
    memcpy(p, &n, sizeof n);
    return p + HDR;
}

static void w_free(void *ctx, void *ptr) {
    struct wrapped *w = ctx;
    if (!ptr)
        return;
    char *p = (char *)ptr - HDR;
    if (scrub_on) {
        size_t n;
        memcpy(&n, p, sizeof n);
        explicit_bzero(ptr, n);
    }
    w->inner.free(w->inner.ctx, p);
}

static void *w_realloc(void *ctx, void *ptr, size_t n) {
    struct wrapped *w = ctx;
    if (!ptr)
        return w_malloc(ctx, n);
    if (n > SIZE_MAX - HDR)
        return NULL;
    char *old = (char *)ptr - HDR;
    if (scrub_on) {
        /* A moving realloc would leave the old bytes behind unzeroed: copy by hand. */
        size_t oldn;
        memcpy(&oldn, old, sizeof oldn);
        char *q = w_malloc(ctx, n);
        if (!q)
            return NULL;
        memcpy(q, ptr, oldn < n ? oldn : n);
        w_free(ctx, ptr);
        return q;
    }
    char *p = w->inner.realloc(w->inner.ctx, old, n + HDR);
    if (!p)
        return NULL;
    memcpy(p, &n, sizeof n);
    return p + HDR;
}

static void wrap_domain(PyMemAllocatorDomain d, struct wrapped *w) {
    PyMem_GetAllocator(d, &w->inner);
    PyMemAllocatorEx a = {w, w_malloc, w_calloc, w_realloc, w_free};
    PyMem_SetAllocator(d, &a);
}

void bw_scrub_install(void) {
    wrap_domain(PYMEM_DOMAIN_RAW, &dom_raw);
    wrap_domain(PYMEM_DOMAIN_MEM, &dom_mem);
    wrap_domain(PYMEM_DOMAIN_OBJ, &dom_obj);
    scrub_on = true;
}

void bw_scrub_set(bool on) { scrub_on = on; }

void bw_scrub_environ(const char *name) {
    size_t n = strlen(name);
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=') {
            char *v = *e + n + 1;
            explicit_bzero(v, strlen(v));
        }
    }
    unsetenv(name);
}
