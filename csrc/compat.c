/* compat.c - detect, compare and record the compatibility key (compat.h). */
#define _GNU_SOURCE
#include "compat.h"

#include <errno.h>
#include <fcntl.h>
#include <gnu/libc-version.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include "cuda_ckpt.h"
#include "json.h"
#include "log.h"
#include "mp.h"
#include "util.h"

static const char *const field_names[] = {"cpu_flags", "kernel", "criu", "glibc", "gpu"};
#define NFIELDS (sizeof field_names / sizeof *field_names)

/* The fields as (pointer, capacity), in field_names order. */
static char *field(struct bw_compat *c, size_t i, size_t *cap) {
    char *f[] = {c->cpu_flags, c->kernel, c->criu, c->glibc, c->gpu};
    size_t n[] = {sizeof c->cpu_flags, sizeof c->kernel, sizeof c->criu, sizeof c->glibc,
                  sizeof c->gpu};
    if (cap)
        *cap = n[i];
    return f[i];
}

static const char *cfield(const struct bw_compat *c, size_t i) {
    return field((struct bw_compat *)c, i, NULL);
}

/* The `flags` line of the first processor: the same on every core of a machine. */
static void detect_cpu_flags(char *out, size_t cap) {
    char line[8192];
    FILE *f = fopen("/proc/cpuinfo", "r");
    out[0] = '\0';
    while (f && fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "flags", 5) != 0 || !colon)
            continue;
        colon += strspn(colon + 1, " \t") + 1;
        colon[strcspn(colon, "\n")] = '\0';
        snprintf(out, cap, "%s", colon);
        break;
    }
    if (f)
        fclose(f);
}

/* Bound on `criu --version`: a criu that hangs (docs/criu-provisioning.md) must not
 * hold the supervisor's start. */
#define CRIU_VERSION_MS 5000

/* Read what the child writes into fd until EOF or the deadline. */
static size_t read_until(int fd, char *buf, size_t cap, double deadline) {
    size_t got = 0;
    while (got < cap - 1) {
        struct pollfd pf = {fd, POLLIN, 0};
        int left = (int)(deadline - bw_now_ms()), r;
        if (left <= 0 || ((r = poll(&pf, 1, left)) < 0 && errno != EINTR) || r == 0)
            break;
        ssize_t n = r > 0 ? read(fd, buf + got, cap - 1 - got) : 0;
        if (r > 0 && n <= 0)
            break;
        got += n > 0 ? (size_t)n : 0;
    }
    buf[got] = '\0';
    return got;
}

/* The version number of `criu --version` ("Version: 4.2.1"). The child leads its own
 * process group, so a wrapper and what it forked go with it on a timeout. */
static void detect_criu(const char *criu, char *out, size_t cap) {
    int p[2];
    snprintf(out, cap, "unknown");
    if (pipe2(p, O_CLOEXEC) < 0)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (setpgid(0, 0) < 0 || null < 0 || dup2(p[1], 1) < 0 || dup2(null, 2) < 0 ||
            dup2(null, 0) < 0)
            _exit(127);
        execlp(criu, criu, "--version", (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    char buf[256] = "";
    if (pid > 0 && read_until(p[0], buf, sizeof buf, bw_now_ms() + CRIU_VERSION_MS) == 0)
        bw_warn("%s --version told no version (within %d s): recorded as unknown", criu,
                CRIU_VERSION_MS / 1000);
    close(p[0]);
    if (pid > 0) {
        kill(-pid, SIGKILL); /* exited already: its group is gone, or only a zombie */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
    }
    const char *v = strstr(buf, "Version:");
    if (v) {
        v += strspn(v + 8, " \t") + 8;
        snprintf(out, cap, "%.*s", (int)strcspn(v, " \n"), v);
    }
}

/* `criu --version` costs a fork and exec (3 ms here) on every start, restores included,
 * for an answer that changes only with the binary. So it is kept in cache_dir/.criu-version
 * beside the identity of the binary it came from (device, inode, size, mtime): a new
 * criu, installed in place or elsewhere, is asked again. A criu named without a path,
 * and the answer "unknown", are never kept. */
#define CRIU_CACHE_FMT "%lu %lu %lld %lld.%09ld %63s"

static bool cached_criu(const char *file, const struct stat *st, char *out, size_t cap) {
    unsigned long dev, ino;
    long long size, sec;
    long nsec;
    char v[64];
    FILE *f = fopen(file, "r");
    bool hit = f && fscanf(f, CRIU_CACHE_FMT, &dev, &ino, &size, &sec, &nsec, v) == 6 &&
               dev == (unsigned long)st->st_dev && ino == (unsigned long)st->st_ino &&
               size == (long long)st->st_size && sec == (long long)st->st_mtim.tv_sec &&
               nsec == st->st_mtim.tv_nsec;
    if (f)
        fclose(f);
    if (hit)
        snprintf(out, cap, "%s", v);
    return hit;
}

static void keep_criu(const char *file, const struct stat *st, const char *version) {
    char tmp[PATH_MAX + 32];
    snprintf(tmp, sizeof tmp, "%s.%d", file, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        return;
    }
    bool ok = fprintf(f, "%lu %lu %lld %lld.%09ld %s\n", (unsigned long)st->st_dev,
                      (unsigned long)st->st_ino, (long long)st->st_size,
                      (long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec, version) > 0;
    if (fclose(f) != 0 || !ok || rename(tmp, file) < 0) /* whole, or not at all */
        unlink(tmp);
}

static void criu_version(const char *criu, const char *cache_dir, char *out, size_t cap) {
    char file[PATH_MAX];
    struct stat st;
    bool known = cache_dir && strchr(criu, '/') && stat(criu, &st) == 0 &&
                 snprintf(file, sizeof file, "%s/.criu-version", cache_dir) < (int)sizeof file;
    if (known && cached_criu(file, &st, out, cap))
        return;
    detect_criu(criu, out, cap);
    if (known && strcmp(out, "unknown") != 0)
        keep_criu(file, &st, out);
}

void bw_compat_detect(struct bw_compat *c, const char *criu, const char *cache_dir) {
    memset(c, 0, sizeof *c);
    struct utsname u;
    detect_cpu_flags(c->cpu_flags, sizeof c->cpu_flags);
    snprintf(c->kernel, sizeof c->kernel, "%s", uname(&u) == 0 ? u.release : "unknown");
    criu_version(criu, cache_dir, c->criu, sizeof c->criu);
    snprintf(c->glibc, sizeof c->glibc, "%s", gnu_get_libc_version());
    const char *spec = getenv("BEAM_TEST_COMPAT");
    char err[256];
    if (spec && *spec && bw_compat_override(c, spec, err, sizeof err) < 0)
        bw_warn("BEAM_TEST_COMPAT ignored in part: %s", err);
}

/* "NVIDIA H200, driver 570.86.15": the first GPU's model stands for all (a restore maps
 * GPUs of one model by UUID, cuda_ckpt.c). */
static void gpu_string(char *out, size_t cap, const char *model, const char *driver) {
    snprintf(out, cap, "%s, driver %s", model, driver && *driver ? driver : "unknown");
}

void bw_compat_detect_gpu(struct bw_compat *c) {
    char why[512];
    struct bw_cuda_gpus g;
    const char *spec = getenv("BEAM_TEST_COMPAT");
    if (spec && strstr(spec, "gpu=")) /* the override already set it */
        return;
    if (bw_cuda_load(why, sizeof why) < 0 || bw_cuda_list_gpus(&g, why, sizeof why) < 0 ||
        g.n == 0)
        return;
    gpu_string(c->gpu, sizeof c->gpu, g.gpu[0].name, bw_cuda_driver_release());
}

void bw_compat_set_gpu(struct bw_compat *c, const char *gpu_meta, size_t len) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object m;
    struct bw_cuda_gpus g;
    char rel[96];
    if (bw_mp_unpack_exact(gpu_meta, len, &z, &m) == 0 &&
        bw_cuda_unpack_gpus(bw_mp_get(&m, "gpus"), &g) == 0 && g.n > 0) {
        if (!bw_mp_strdup(bw_mp_get(&m, "driver"), rel, sizeof rel))
            rel[0] = '\0';
        gpu_string(c->gpu, sizeof c->gpu, g.gpu[0].name, rel);
    }
    msgpack_zone_destroy(&z);
}

int bw_compat_override(struct bw_compat *c, const char *spec, char *err, size_t cap) {
    char buf[8192];
    snprintf(buf, sizeof buf, "%s", spec);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        size_t i = 0;
        while (eq && i < NFIELDS && (strlen(field_names[i]) != (size_t)(eq - kv) ||
                                     strncmp(kv, field_names[i], (size_t)(eq - kv)) != 0))
            i++;
        if (!eq || i == NFIELDS) {
            snprintf(err, cap, "%s: expected field=value with field one of cpu_flags, kernel, "
                     "criu, glibc, gpu", kv);
            return -1;
        }
        size_t fcap;
        char *f = field(c, i, &fcap);
        snprintf(f, fcap, "%s", eq + 1);
    }
    return 0;
}

/* Whether the space-separated word w (length n) is one of the words of list. */
static bool has_word(const char *list, const char *w, size_t n) {
    for (const char *p = list; *p;) {
        p += strspn(p, " ");
        size_t len = strcspn(p, " ");
        if (len == n && memcmp(p, w, n) == 0)
            return true;
        p += len;
    }
    return false;
}

/* The image's CPU flags this CPU lacks, into out ("avx512f avx512bw"); their count. */
static int missing_flags(const char *img, const char *here, char *out, size_t cap) {
    int missing = 0;
    size_t o = 0;
    out[0] = '\0';
    for (const char *p = img; *p;) {
        p += strspn(p, " ");
        size_t len = strcspn(p, " ");
        if (len && !has_word(here, p, len)) {
            if (missing < 8 && o < cap)
                o += (size_t)snprintf(out + o, cap - o, "%s%.*s", missing ? " " : "", (int)len, p);
            missing++;
        }
        p += len;
    }
    if (missing > 8 && o < cap)
        snprintf(out + o, cap - o, " and %d more", missing - 8);
    return missing;
}

int bw_compat_check(const struct bw_compat *img, const struct bw_compat *here, char *why,
                    size_t cap) {
    size_t o = 0;
    why[0] = '\0';
    char flags[512];
    if (missing_flags(img->cpu_flags, here->cpu_flags, flags, sizeof flags) > 0)
        o += (size_t)snprintf(why + o, cap - o, "cpu_flags: the image needs %s, which this "
                              "CPU lacks", flags);
    for (size_t i = 1; i < NFIELDS && o < cap; i++) {
        const char *a = cfield(img, i), *b = cfield(here, i);
        if (i == NFIELDS - 1 && !*a) /* no GPU state: any GPU, or none, will do */
            continue;
        if (strcmp(a, b) != 0)
            o += (size_t)snprintf(why + o, cap - o, "%s%s: %s here, %s in the image",
                                  o ? "; " : "", field_names[i], *b ? b : "none", a);
    }
    return why[0] == '\0';
}

void bw_compat_hash(const struct bw_compat *c, char out[BW_COMPAT_HASH_LEN]) {
    XXH3_state_t *st = XXH3_createState();
    unsigned long long h = 0;
    if (st && XXH3_64bits_reset(st) == XXH_OK) {
        for (size_t i = 0; i < NFIELDS; i++) /* NUL-separated: no two records hash alike */
            XXH3_64bits_update(st, cfield(c, i), strlen(cfield(c, i)) + 1);
        h = XXH3_64bits_digest(st);
    }
    XXH3_freeState(st);
    snprintf(out, BW_COMPAT_HASH_LEN, "%016llx", h);
}

void bw_compat_pack(msgpack_packer *pk, const struct bw_compat *c) {
    msgpack_pack_map(pk, NFIELDS);
    for (size_t i = 0; i < NFIELDS; i++)
        bw_mp_kv_str(pk, field_names[i], cfield(c, i));
}

int bw_compat_unpack(const msgpack_object *o, struct bw_compat *c) {
    memset(c, 0, sizeof *c);
    if (!o || o->type != MSGPACK_OBJECT_MAP)
        return -1;
    for (size_t i = 0; i < NFIELDS; i++) {
        size_t cap;
        char *f = field(c, i, &cap);
        if (!bw_mp_strdup(bw_mp_get(o, field_names[i]), f, cap))
            return -1;
    }
    return 0;
}

void bw_compat_write_json(FILE *f, const struct bw_compat *c) {
    char hash[BW_COMPAT_HASH_LEN];
    bw_compat_hash(c, hash);
    fprintf(f, "{\"hash\": \"%s\"", hash);
    for (size_t i = 0; i < NFIELDS; i++) {
        fprintf(f, ", \"%s\": ", field_names[i]);
        bw_json_write_str(f, cfield(c, i));
    }
    fputc('}', f);
}
