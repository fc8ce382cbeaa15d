/* workingset.c - restore the pages a replica needs first eagerly, the rest lazily.
 *
 * A lazy restore answers each first touch of a page with a round trip to the page
 * daemon, which meanwhile copies the rest of the image in address order: the pages the
 * host touches between the restore and its first answer (the restorer's, after_start's,
 * the first call's) each wait behind the daemon, ~80 µs apiece here.
 *
 * The first lazy restore of an image records them: its daemon logs every fault it
 * serves (`#PF at ADDR`, criu -v4). Once that daemon is done, the faulted pages, widened
 * to WS_WINDOW, are marked not lazy in the image's pagemap (CRIU's PE_LAZY flag, set at
 * dump for all private anonymous memory): every later restore, eager or lazy, then reads
 * them itself, in large sequential reads, before the process runs, and the daemon is
 * left only the rest. The pagemap's entries keep their order, so the page data file
 * (pages-N.img) is untouched. The addresses are kept as <key>/workingset.bin (one
 * struct ws_page each), whose presence means the image has been tuned. */
#define _GNU_SOURCE
#include "workingset.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

#define PAGE 4096ull
/* Pages are made eager in aligned windows of this size: neighbours of a touched page
 * are likely touched next, and a window is one read at restore. */
#define WS_WINDOW (16 * PAGE)
#define PE_LAZY 2u /* CRIU's pagemap entry flags (images/pagemap.proto) */
#define PE_PRESENT 4u
#define MAX_WS (1 << 20)

struct ws_page {
    uint32_t pid; /* the image's pid, as in pagemap-<pid>.img */
    uint32_t pad;
    uint64_t addr;
};

struct pm_entry {
    uint64_t vaddr, nr_pages;
    uint32_t flags;
    int in_parent; /* -1 when absent */
};

int bw_ws_recorded(const char *ckdir) {
    char p[PATH_MAX + 300];
    snprintf(p, sizeof p, "%s/workingset.bin", ckdir);
    return access(p, F_OK) == 0;
}

static int cmp_page(const void *a, const void *b) {
    const struct ws_page *x = a, *y = b;
    if (x->pid != y->pid)
        return x->pid < y->pid ? -1 : 1;
    return x->addr < y->addr ? -1 : x->addr > y->addr;
}

/* Every "uffd: PID-FD: #PF at 0xADDR" of the daemon's log. */
static int read_faults(const char *log, struct ws_page **out, size_t *n) {
    FILE *f = fopen(log, "r");
    if (!f)
        return -1;
    struct ws_page *v = malloc(sizeof *v * 1024);
    size_t cap = 1024;
    char line[512];
    *n = 0;
    while (v && fgets(line, sizeof line, f) && *n < MAX_WS) {
        const char *u = strstr(line, "uffd: ");
        unsigned pid, fd;
        unsigned long long addr;
        if (!u || sscanf(u, "uffd: %u-%u: #PF at 0x%llx", &pid, &fd, &addr) != 3)
            continue;
        if (*n == cap) {
            struct ws_page *g = realloc(v, sizeof *v * (cap *= 2));
            if (!g) {
                free(v);
                v = NULL;
                break;
            }
            v = g;
        }
        v[(*n)++] = (struct ws_page){.pid = pid, .addr = addr & ~(WS_WINDOW - 1)};
    }
    fclose(f);
    if (!v)
        return -1;
    qsort(v, *n, sizeof *v, cmp_page);
    size_t k = 0; /* one entry per window */
    for (size_t i = 0; i < *n; i++)
        if (k == 0 || cmp_page(&v[k - 1], &v[i]) != 0)
            v[k++] = v[i];
    *n = k;
    *out = v;
    return 0;
}

/* ---- CRIU's pagemap image: two magics, then (u32 length, protobuf) objects ---------- */

static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 0;
    }
    return -1;
}

static size_t put_varint(uint8_t *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* A PagemapEntry: vaddr = 1, compat_nr_pages = 2, in_parent = 3, flags = 4,
 * nr_pages = 5, all varints. Anything else is a layout we do not know: -1. */
static int parse_entry(const uint8_t *p, const uint8_t *end, struct pm_entry *e) {
    uint64_t compat = 0, v, key;
    int has_nr = 0;
    memset(e, 0, sizeof *e);
    e->in_parent = -1;
    while (p < end) {
        if (get_varint(&p, end, &key) < 0 || (key & 7) != 0 || get_varint(&p, end, &v) < 0)
            return -1;
        switch (key >> 3) {
        case 1: e->vaddr = v; break;
        case 2: compat = v; break;
        case 3: e->in_parent = (int)v; break;
        case 4: e->flags = (uint32_t)v; break;
        case 5: e->nr_pages = v; has_nr = 1; break;
        default: return -1;
        }
    }
    if (!has_nr)
        e->nr_pages = compat;
    return 0;
}

/* Append one entry as CRIU 4 writes it (compat_nr_pages 0, nr_pages set). */
static size_t put_entry(uint8_t *out, const struct pm_entry *e) {
    uint8_t body[64];
    size_t n = 0;
    body[n++] = 1 << 3;
    n += put_varint(body + n, e->vaddr);
    body[n++] = 2 << 3;
    body[n++] = 0;
    if (e->in_parent >= 0) {
        body[n++] = 3 << 3;
        n += put_varint(body + n, (uint64_t)e->in_parent);
    }
    body[n++] = 4 << 3;
    n += put_varint(body + n, e->flags);
    body[n++] = 5 << 3;
    n += put_varint(body + n, e->nr_pages);
    uint32_t len = (uint32_t)n;
    memcpy(out, &len, 4);
    memcpy(out + 4, body, n);
    return n + 4;
}

static bool in_ws(const struct ws_page *ws, size_t n, uint64_t addr) {
    uint64_t w = addr & ~(WS_WINDOW - 1);
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (ws[mid].addr < w)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ws[lo].addr == w;
}

/* Split a lazy entry into runs, the runs in the working set not lazy. Returns the
 * bytes written to out; *eager counts the pages made eager. */
static size_t split_entry(uint8_t *out, const struct pm_entry *e, const struct ws_page *ws,
                          size_t n, uint64_t *eager) {
    size_t o = 0;
    struct pm_entry run = *e;
    run.nr_pages = 0;
    for (uint64_t i = 0; i < e->nr_pages; i++) {
        uint64_t addr = e->vaddr + i * PAGE;
        uint32_t flags = in_ws(ws, n, addr) ? e->flags & ~PE_LAZY : e->flags;
        if (run.nr_pages && flags != run.flags) {
            o += put_entry(out + o, &run);
            run.nr_pages = 0;
        }
        if (!run.nr_pages) {
            run.vaddr = addr;
            run.flags = flags;
        }
        run.nr_pages++;
        *eager += !(flags & PE_LAZY);
    }
    return run.nr_pages ? o + put_entry(out + o, &run) : o;
}

/* A pagemap file: its 8-byte magic and at least the head entry, under 64 MiB. */
static uint8_t *read_pagemap(const char *path, size_t *len) {
    uint8_t *buf = bw_read_file(path, 1 << 26, len);
    if (buf && *len <= 8) {
        free(buf);
        buf = NULL;
    }
    return buf;
}

#define MAX_ENTRY 40 /* the longest PagemapEntry put_entry writes, with its length */

/* Room in *out for `more` bytes after the first o. */
static int reserve(uint8_t **out, size_t *cap, size_t o, size_t more) {
    if (o + more <= *cap)
        return 0;
    uint8_t *g = realloc(*out, (o + more) * 2);
    if (!g)
        return -1;
    *out = g;
    *cap = (o + more) * 2;
    return 0;
}

/* Rewrite pagemap-<pid>.img with the working set ws[0..n) (sorted) not lazy. An entry
 * we cannot read leaves the file as it was. */
static int tune_pagemap(const char *imgdir, uint32_t pid, const struct ws_page *ws, size_t n,
                        uint64_t *eager) {
    char path[PATH_MAX + 400];
    snprintf(path, sizeof path, "%s/pagemap-%u.img", imgdir, pid);
    size_t len = 0, cap = 0, o = 8, i = 8;
    uint8_t *in = read_pagemap(path, &len), *out = NULL;
    int rc = -1;
    if (!in || reserve(&out, &cap, 0, len) < 0)
        goto done;
    memcpy(out, in, 8);
    for (int first = 1; i + 4 <= len; first = 0) {
        uint32_t l;
        memcpy(&l, in + i, 4);
        struct pm_entry e = {0};
        if (l > len - i - 4 || (!first && parse_entry(in + i + 4, in + i + 4 + l, &e) < 0))
            goto done;
        bool lazy = !first && (e.flags & (PE_LAZY | PE_PRESENT)) == (PE_LAZY | PE_PRESENT);
        /* Split, an entry becomes at most one run per page and two more per window; a
         * count over 2^32 pages (16 TiB) is a corrupt file, left alone. */
        uint64_t runs = e.nr_pages < 2 * n + 1 ? e.nr_pages : 2 * n + 1;
        if (e.nr_pages > UINT32_MAX ||
            reserve(&out, &cap, o, lazy ? (size_t)(runs + 1) * MAX_ENTRY : l + 4) < 0)
            goto done;
        if (lazy) {
            o += split_entry(out + o, &e, ws, n, eager);
        } else { /* the head, and entries that stay as they are */
            memcpy(out + o, in + i, l + 4);
            o += l + 4;
        }
        i += 4 + l;
    }
    rc = i == len ? bw_write_replace(path, out, o) : -1;
done:
    free(in);
    free(out);
    return rc;
}

/* Pages of imgdir/name (a pagemap) marked PE_LAZY, added to *lazy. */
static int count_lazy(const char *imgdir, const char *name, unsigned long long *lazy) {
    char path[PATH_MAX + 600];
    snprintf(path, sizeof path, "%s/%s", imgdir, name);
    size_t len = 0, i = 8;
    uint8_t *in = read_pagemap(path, &len);
    for (int first = 1; in && i + 4 <= len; first = 0) {
        uint32_t l;
        struct pm_entry e;
        memcpy(&l, in + i, 4);
        if (l > len - i - 4 || (!first && parse_entry(in + i + 4, in + i + 4 + l, &e) < 0))
            break;
        if (!first && (e.flags & PE_LAZY))
            *lazy += e.nr_pages;
        i += 4 + l;
    }
    free(in);
    return in && i == len ? 0 : -1;
}

void bw_ws_check_dump(const char *imgdir) {
    DIR *d = opendir(imgdir);
    unsigned long long lazy = 0;
    int rc = d ? 0 : -1;
    struct dirent *e;
    while (d && rc == 0 && (e = readdir(d)) != NULL)
        if (strncmp(e->d_name, "pagemap-", 8) == 0)
            rc = count_lazy(imgdir, e->d_name, &lazy);
    if (d)
        closedir(d);
    if (rc < 0)
        bw_warn("cannot read the pagemaps in %s: lazy restores may not work", imgdir);
    else if (lazy == 0)
        bw_warn("CRIU marked no page of this image lazy (seen now and then here, cause "
                "unknown): a lazy restore of it is in fact eager");
    else
        bw_debug("%.1f MiB of the image can be restored lazily", lazy * PAGE / 1048576.0);
}

static int write_ws(const char *ckdir, const struct ws_page *ws, size_t n) {
    char path[PATH_MAX + 300];
    snprintf(path, sizeof path, "%s/workingset.bin", ckdir);
    return bw_write_replace(path, ws, n * sizeof *ws);
}

static int record(const struct bw_ckpt *c, const char *daemon_log, char *err, size_t errlen) {
    struct ws_page *ws = NULL;
    size_t n = 0;
    char imgdir[PATH_MAX + 300], name[64];
    snprintf(imgdir, sizeof imgdir, "%s/img", c->dir);
    if (read_faults(daemon_log, &ws, &n) < 0) {
        snprintf(err, errlen, "cannot read %s: %s", daemon_log, strerror(errno));
        return -1;
    }
    uint64_t eager = 0;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n;) {
        size_t j = i;
        while (j < n && ws[j].pid == ws[i].pid)
            j++;
        snprintf(name, sizeof name, "pagemap-%u.img", ws[i].pid);
        if (tune_pagemap(imgdir, ws[i].pid, ws + i, j - i, &eager) < 0 ||
            bw_ckpt_rehash(c, name, err, errlen) < 0) {
            if (!*err)
                snprintf(err, errlen, "cannot rewrite %s/%s", imgdir, name);
            rc = -1;
        }
        i = j;
    }
    if (rc == 0 && write_ws(c->dir, ws, n) < 0) {
        snprintf(err, errlen, "cannot write %s/workingset.bin: %s", c->dir, strerror(errno));
        rc = -1;
    }
    if (rc == 0)
        bw_info("working set recorded: %zu window(s) of %llu KiB faulted in by the first lazy "
                "restore; %.1f MiB of the image now restored eagerly, the rest lazily",
                n, WS_WINDOW / 1024, eager * PAGE / 1048576.0);
    free(ws);
    return rc;
}

int bw_ws_record(const struct bw_ckpt *c, const char *daemon_log, char *err, size_t errlen) {
    /* Recordings run as jobs (lazy.c), two replicas' at once now and then: they would
     * write the same temporary files. One at a time, and the first wins: a later one
     * would only add faults seen on the untuned image. */
    static pthread_mutex_t one = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&one);
    int rc = 0;
    if (bw_ws_recorded(c->dir))
        bw_debug("working set already recorded by another lazy restore of this image");
    else
        rc = record(c, daemon_log, err, errlen);
    pthread_mutex_unlock(&one);
    return rc;
}
