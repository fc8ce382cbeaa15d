/* cuda_ckpt.c - CUDA driver checkpoint API through dlopen (see cuda_ckpt.h). */
#define _GNU_SOURCE
#include "cuda_ckpt.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "mp.h"
#include "util.h"

#ifdef BW_HAVE_CUDA_H
/* The toolkit's header (CMake found it): the compiler checks every prototype below. */
#include <cuda.h>
#else
/* No toolkit at build time: the subset of cuda.h (CUDA 12.8+) this file uses, same
 * layouts (checked by the static assertions below). */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUuuid_st {
    char bytes[16];
} CUuuid;
typedef enum CUprocessState_enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED,
    CU_PROCESS_STATE_CHECKPOINTED,
    CU_PROCESS_STATE_FAILED,
} CUprocessState;
typedef struct CUcheckpointLockArgs_st {
    unsigned int timeoutMs;
    unsigned int reserved0;
    uint64_t reserved1[7];
} CUcheckpointLockArgs;
typedef struct CUcheckpointCheckpointArgs_st {
    uint64_t reserved[8];
} CUcheckpointCheckpointArgs;
typedef struct CUcheckpointGpuPair_st {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;
typedef struct CUcheckpointRestoreArgs_st {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    uint64_t reserved1;
} CUcheckpointRestoreArgs;
typedef struct CUcheckpointUnlockArgs_st {
    uint64_t reserved[8];
} CUcheckpointUnlockArgs;
#define CUDA_SUCCESS 0
#define CUDA_ERROR_NOT_READY 600
#define CUDA_ERROR_TIMEOUT 909
/* Declarations only, for __typeof__: nothing here links against libcuda. */
CUresult cuInit(unsigned int Flags);
CUresult cuDriverGetVersion(int *driverVersion);
CUresult cuDeviceGetCount(int *count);
CUresult cuDeviceGet(CUdevice *device, int ordinal);
CUresult cuDeviceGetName(char *name, int len, CUdevice dev);
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev);
CUresult cuGetErrorName(CUresult error, const char **pStr);
CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state);
CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args);
CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args);
CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args);
CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args);
CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid);
#endif

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "CUcheckpointLockArgs layout");
_Static_assert(sizeof(CUcheckpointCheckpointArgs) == 64, "CUcheckpointCheckpointArgs layout");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "CUcheckpointRestoreArgs layout");
_Static_assert(sizeof(CUcheckpointUnlockArgs) == 64, "CUcheckpointUnlockArgs layout");
_Static_assert(sizeof(CUcheckpointGpuPair) == 32, "CUcheckpointGpuPair layout");

/* cuda.h maps cuDeviceGetUuid to cuDeviceGetUuid_v2; both have this type. */
typedef __typeof__(cuDeviceGetUuid) uuid_fn;

static struct {
    bool base_tried, base_ok, ckpt_tried, ckpt_ok;
    char base_why[1024], ckpt_why[1024];
    void *h;
    char path[512];
    int version;
    __typeof__(cuInit) *init;
    __typeof__(cuDriverGetVersion) *driver_version;
    __typeof__(cuDeviceGetCount) *device_count;
    __typeof__(cuDeviceGet) *device_get;
    __typeof__(cuDeviceGetName) *device_name;
    uuid_fn *device_uuid;
    __typeof__(cuGetErrorName) *error_name; /* optional */
    __typeof__(cuCheckpointProcessGetState) *get_state;
    __typeof__(cuCheckpointProcessLock) *lock;
    __typeof__(cuCheckpointProcessCheckpoint) *checkpoint;
    __typeof__(cuCheckpointProcessRestore) *restore;
    __typeof__(cuCheckpointProcessUnlock) *unlock;
    __typeof__(cuCheckpointProcessGetRestoreThreadId) *restore_tid; /* optional */
} driver;

/* "CUDA_ERROR_NOT_READY (600)" */
static const char *err_str(CUresult r) {
    static char buf[160];
    const char *name = NULL;
    if (!driver.error_name || driver.error_name(r, &name) != CUDA_SUCCESS || !name)
        name = "CUresult";
    snprintf(buf, sizeof buf, "%s (%d)", name, (int)r);
    return buf;
}

static const char *state_name(CUprocessState s) {
    switch (s) {
    case CU_PROCESS_STATE_RUNNING: return "RUNNING";
    case CU_PROCESS_STATE_LOCKED: return "LOCKED";
    case CU_PROCESS_STATE_CHECKPOINTED: return "CHECKPOINTED";
    case CU_PROCESS_STATE_FAILED: return "FAILED";
    }
    return "UNKNOWN";
}

static void append(char *why, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void append(char *why, size_t cap, const char *fmt, ...) {
    size_t n = strlen(why);
    if (n + 1 >= cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why + n, cap - n, fmt, ap);
    va_end(ap);
}

static void *sym(const char *name) {
    dlerror();
    return dlsym(driver.h, name);
}

/* dlopen + the symbols every use needs + cuInit. */
static bool load_base(void) {
    if (driver.base_tried)
        return driver.base_ok;
    driver.base_tried = true;
    dlerror();
    driver.h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!driver.h) {
        const char *e = dlerror();
        bool dev = access("/dev/nvidiactl", F_OK) == 0 || access("/dev/nvidia0", F_OK) == 0;
        snprintf(driver.base_why, sizeof driver.base_why,
                 "no NVIDIA driver: cannot load libcuda.so.1 (%s)%s", e ? e : "not found",
                 dev ? "; /dev/nvidia* exists, so the driver's user-space library is not on "
                       "the library path"
                     : "; no /dev/nvidia* device either");
        return false;
    }
    struct link_map *lm = NULL;
    if (dlinfo(driver.h, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name)
        snprintf(driver.path, sizeof driver.path, "%s", lm->l_name);
    struct {
        const char *name;
        void **slot;
    } need[] = {
        {"cuInit", (void **)&driver.init},
        {"cuDriverGetVersion", (void **)&driver.driver_version},
        {"cuDeviceGetCount", (void **)&driver.device_count},
        {"cuDeviceGet", (void **)&driver.device_get},
        {"cuDeviceGetName", (void **)&driver.device_name},
    };
    for (size_t i = 0; i < sizeof need / sizeof *need; i++)
        if (!(*need[i].slot = sym(need[i].name))) {
            snprintf(driver.base_why, sizeof driver.base_why,
                     "%s has no %s: not a usable NVIDIA driver library", driver.path, need[i].name);
            return false;
        }
    driver.device_uuid = (uuid_fn *)sym("cuDeviceGetUuid_v2");
    if (!driver.device_uuid)
        driver.device_uuid = (uuid_fn *)sym("cuDeviceGetUuid");
    if (!driver.device_uuid) {
        snprintf(driver.base_why, sizeof driver.base_why,
                 "%s has neither cuDeviceGetUuid_v2 nor cuDeviceGetUuid", driver.path);
        return false;
    }
    driver.error_name = (__typeof__(driver.error_name))sym("cuGetErrorName");
    CUresult r = driver.driver_version(&driver.version);
    if (r != CUDA_SUCCESS) {
        snprintf(driver.base_why, sizeof driver.base_why, "cuDriverGetVersion failed: %s",
                 err_str(r));
        return false;
    }
    r = driver.init(0);
    if (r != CUDA_SUCCESS) {
        snprintf(driver.base_why, sizeof driver.base_why,
                 "cuInit failed: %s (driver %s, CUDA %d.%d)", err_str(r), driver.path,
                 driver.version / 1000, driver.version % 1000 / 10);
        return false;
    }
    if (sym("cuda_double_marker"))
        bw_warn("%s is the TEST DOUBLE of libcuda (tests/cuda_double): GPU state is simulated",
                driver.path);
    driver.base_ok = true;
    return true;
}

int bw_cuda_load(char *why, size_t cap) {
    if (!load_base()) {
        snprintf(why, cap, "%s", driver.base_why);
        return -1;
    }
    if (!driver.ckpt_tried) {
        driver.ckpt_tried = true;
        if (driver.version < BW_CUDA_MIN_VERSION) {
            snprintf(driver.ckpt_why, sizeof driver.ckpt_why,
                     "NVIDIA driver too old: it supports CUDA %d.%d; GPU checkpointing needs "
                     "driver r570+ (CUDA 12.8)", driver.version / 1000, driver.version % 1000 / 10);
        } else {
            struct {
                const char *name;
                void **slot;
            } need[] = {
                {"cuCheckpointProcessGetState", (void **)&driver.get_state},
                {"cuCheckpointProcessLock", (void **)&driver.lock},
                {"cuCheckpointProcessCheckpoint", (void **)&driver.checkpoint},
                {"cuCheckpointProcessRestore", (void **)&driver.restore},
                {"cuCheckpointProcessUnlock", (void **)&driver.unlock},
            };
            driver.ckpt_ok = true;
            for (size_t i = 0; i < sizeof need / sizeof *need && driver.ckpt_ok; i++)
                if (!(*need[i].slot = sym(need[i].name))) {
                    snprintf(driver.ckpt_why, sizeof driver.ckpt_why,
                             "%s (CUDA %d.%d) has no %s: GPU checkpointing needs driver r570+",
                             driver.path, driver.version / 1000, driver.version % 1000 / 10,
                             need[i].name);
                    driver.ckpt_ok = false;
                }
            driver.restore_tid =
                (__typeof__(driver.restore_tid))sym("cuCheckpointProcessGetRestoreThreadId");
        }
    }
    if (!driver.ckpt_ok) {
        snprintf(why, cap, "%s", driver.ckpt_why);
        return -1;
    }
    return 0;
}

int bw_cuda_driver_version(void) { return driver.version; }

/* NVML's answer: the library the driver ships next to libcuda. */
static bool nvml_release(char *out, size_t cap) {
    void *h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return false;
    int (*init)(void) = (int (*)(void))dlsym(h, "nvmlInit_v2");
    int (*version)(char *, unsigned int) =
        (int (*)(char *, unsigned int))dlsym(h, "nvmlSystemGetDriverVersion");
    int (*shutdown)(void) = (int (*)(void))dlsym(h, "nvmlShutdown");
    bool ok = init && version && init() == 0;
    if (ok) {
        ok = version(out, (unsigned int)cap) == 0 && out[0];
        if (shutdown)
            shutdown();
    }
    dlclose(h);
    return ok;
}

/* The kernel module's: "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  ..." */
static bool proc_release(char *out, size_t cap) {
    FILE *f = fopen("/proc/driver/nvidia/version", "re");
    char line[512];
    bool ok = false;
    if (!f)
        return false;
    if (fgets(line, sizeof line, f)) {
        const char *p = strstr(line, "Kernel Module");
        char v[64];
        ok = p && sscanf(p + strlen("Kernel Module"), " %63s", v) == 1;
        if (ok)
            snprintf(out, cap, "%s", v);
    }
    fclose(f);
    return ok;
}

const char *bw_cuda_driver_release(void) {
    static bool tried;
    static char rel[96];
    if (!tried) {
        tried = true;
        if (!nvml_release(rel, sizeof rel) && !proc_release(rel, sizeof rel))
            rel[0] = '\0';
    }
    return rel;
}

/* ---- /proc ------------------------------------------------------------------------ */

/* pid 0: this process (inside a PID namespace /proc still shows the outer pids). */
static bool maps_have(pid_t pid, bool libcuda_too) {
    char path[64];
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    else
        snprintf(path, sizeof path, "/proc/self/maps");
    FILE *f = fopen(path, "re");
    if (!f)
        return false;
    char *line = NULL;
    size_t cap = 0;
    bool found = false;
    while (!found && getline(&line, &cap, f) > 0)
        found = strstr(line, "/dev/nvidia") || (libcuda_too && strstr(line, "/libcuda.so"));
    free(line);
    fclose(f);
    return found;
}

bool bw_cuda_process_uses_gpu(pid_t pid) { return maps_have(pid, true); }

bool bw_cuda_process_has_devices(pid_t pid) {
    if (maps_have(pid, false))
        return true;
    char path[64], link[PATH_MAX], target[PATH_MAX];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return false;
    struct dirent *e;
    bool found = false;
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(link, sizeof link, "%s/%s", path, e->d_name);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n > 0) {
            target[n] = '\0';
            found = strncmp(target, "/dev/nvidia", 11) == 0;
        }
    }
    closedir(d);
    return found;
}

static long long vm_rss(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    long long kb = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %lld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* ---- devices ---------------------------------------------------------------------- */

int bw_cuda_list_gpus(struct bw_cuda_gpus *g, char *why, size_t cap) {
    memset(g, 0, sizeof *g);
    if (!load_base()) {
        snprintf(why, cap, "%s", driver.base_why);
        return -1;
    }
    int n = 0;
    CUresult r = driver.device_count(&n);
    if (r != CUDA_SUCCESS) {
        snprintf(why, cap, "cuDeviceGetCount failed: %s", err_str(r));
        return -1;
    }
    if (n > BW_CUDA_MAX_GPUS) {
        snprintf(why, cap, "%d GPUs visible; at most %d are supported", n, BW_CUDA_MAX_GPUS);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        CUdevice dev;
        CUuuid u;
        if ((r = driver.device_get(&dev, i)) != CUDA_SUCCESS ||
            (r = driver.device_name(g->gpu[i].name, (int)sizeof g->gpu[i].name, dev)) !=
                CUDA_SUCCESS ||
            (r = driver.device_uuid(&u, dev)) != CUDA_SUCCESS) {
            snprintf(why, cap, "cannot read GPU %d: %s", i, err_str(r));
            return -1;
        }
        g->gpu[i].name[sizeof g->gpu[i].name - 1] = '\0';
        memcpy(g->gpu[i].uuid, u.bytes, 16);
    }
    g->n = n;
    return 0;
}

void bw_cuda_describe(const struct bw_cuda_gpus *g, char *out, size_t cap) {
    out[0] = '\0';
    if (g->n == 0) {
        snprintf(out, cap, "no GPU");
        return;
    }
    for (int i = 0; i < g->n; i++) {
        bool seen = false;
        for (int j = 0; j < i && !seen; j++)
            seen = strcmp(g->gpu[j].name, g->gpu[i].name) == 0;
        if (seen)
            continue;
        int count = 0;
        for (int j = i; j < g->n; j++)
            count += strcmp(g->gpu[j].name, g->gpu[i].name) == 0;
        append(out, cap, "%s%dx %s", out[0] ? " + " : "", count, g->gpu[i].name);
    }
}

/* NVIDIA's notation, as nvidia-smi prints it: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx */
static void uuid_str(const unsigned char *u, char out[41]) {
    char *p = out + sprintf(out, "GPU-");
    for (int i = 0; i < 16; i++)
        p += sprintf(p, "%s%02x", i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "", u[i]);
}

static bool uuid_parse(const char *s, unsigned char *u) {
    if (strncmp(s, "GPU-", 4) != 0)
        return false;
    s += 4;
    for (int i = 0; i < 16; i++) {
        if (*s == '-')
            s++;
        unsigned int b;
        if (sscanf(s, "%2x", &b) != 1)
            return false;
        u[i] = (unsigned char)b;
        s += 2;
    }
    return *s == '\0';
}

void bw_cuda_pack_gpus(msgpack_packer *pk, const struct bw_cuda_gpus *g) {
    char u[41];
    msgpack_pack_array(pk, (size_t)g->n);
    for (int i = 0; i < g->n; i++) {
        msgpack_pack_map(pk, 2);
        bw_mp_kv_str(pk, "name", g->gpu[i].name);
        uuid_str(g->gpu[i].uuid, u);
        bw_mp_kv_str(pk, "uuid", u);
    }
}

int bw_cuda_unpack_gpus(const msgpack_object *o, struct bw_cuda_gpus *g) {
    memset(g, 0, sizeof *g);
    if (!o || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size > BW_CUDA_MAX_GPUS)
        return -1;
    for (uint32_t i = 0; i < o->via.array.size; i++) {
        const msgpack_object *e = &o->via.array.ptr[i];
        char u[64];
        if (!bw_mp_strdup(bw_mp_get(e, "name"), g->gpu[i].name, sizeof g->gpu[i].name) ||
            !bw_mp_strdup(bw_mp_get(e, "uuid"), u, sizeof u) || !uuid_parse(u, g->gpu[i].uuid))
            return -1;
    }
    g->n = (int)o->via.array.size;
    return 0;
}

/* ---- process state ------------------------------------------------------------------ */

static int get_state(pid_t pid, CUprocessState *st, char *why, size_t cap) {
    CUresult r = driver.get_state((int)pid, st);
    if (r != CUDA_SUCCESS) {
        snprintf(why, cap, "cuCheckpointProcessGetState(pid %d) failed: %s", (int)pid, err_str(r));
        return -1;
    }
    return 0;
}

/* After a failure: bring pid back to RUNNING (restore if checkpointed, unlock if locked)
 * and say in why where it ended up. */
static bool recover(pid_t pid, char *why, size_t cap) {
    CUprocessState st;
    char e[256];
    if (get_state(pid, &st, e, sizeof e) < 0) {
        append(why, cap, "; its GPU state is unknown (%s)", e);
        return false;
    }
    if (st == CU_PROCESS_STATE_CHECKPOINTED) {
        CUcheckpointRestoreArgs ra;
        memset(&ra, 0, sizeof ra);
        CUresult r = driver.restore((int)pid, &ra);
        if (r != CUDA_SUCCESS)
            append(why, cap, "; restoring its GPU state failed too: %s", err_str(r));
        if (get_state(pid, &st, e, sizeof e) < 0) {
            append(why, cap, "; its GPU state is unknown (%s)", e);
            return false;
        }
    }
    if (st == CU_PROCESS_STATE_LOCKED) {
        CUcheckpointUnlockArgs ua;
        memset(&ua, 0, sizeof ua);
        CUresult r = driver.unlock((int)pid, &ua);
        if (r != CUDA_SUCCESS)
            append(why, cap, "; unlocking failed too: %s", err_str(r));
        if (get_state(pid, &st, e, sizeof e) < 0) {
            append(why, cap, "; its GPU state is unknown (%s)", e);
            return false;
        }
    }
    if (st == CU_PROCESS_STATE_RUNNING) {
        append(why, cap, "; the process's CUDA state is unlocked again (RUNNING)");
        return true;
    }
    append(why, cap, "; the process is left in CUDA state %s", state_name(st));
    return false;
}

int bw_cuda_checkpoint(pid_t pid, double lock_timeout_s, struct bw_cuda_times *t, char *why,
                       size_t cap) {
    if (bw_cuda_load(why, cap) < 0)
        return -1;
    CUprocessState st;
    if (get_state(pid, &st, why, cap) < 0)
        return -2;
    if (st != CU_PROCESS_STATE_RUNNING) {
        snprintf(why, cap, "the host's CUDA state (pid %d) is %s, expected RUNNING", (int)pid,
                 state_name(st));
        return -1;
    }
    CUcheckpointLockArgs la;
    memset(&la, 0, sizeof la);
    double ms = lock_timeout_s * 1000.0;
    la.timeoutMs = ms < 1 ? 1 : ms > 4e9 ? 4000000000u : (unsigned int)ms;
    double t0 = bw_now_ms();
    CUresult r = driver.lock((int)pid, &la);
    t->lock_ms = bw_now_ms() - t0;
    if (r != CUDA_SUCCESS) {
        if (r == CUDA_ERROR_NOT_READY || r == CUDA_ERROR_TIMEOUT || t->lock_ms >= ms * 0.95)
            snprintf(why, cap, "cannot lock the host's CUDA state (pid %d) within %gs: %s; CUDA "
                     "work kept running (raise --cuda-lock-timeout)", (int)pid, lock_timeout_s,
                     err_str(r));
        else
            snprintf(why, cap, "cuCheckpointProcessLock(pid %d) failed: %s", (int)pid, err_str(r));
        recover(pid, why, cap);
        return -1;
    }
    long long rss0 = vm_rss(pid);
    CUcheckpointCheckpointArgs ca;
    memset(&ca, 0, sizeof ca);
    t0 = bw_now_ms();
    r = driver.checkpoint((int)pid, &ca);
    t->checkpoint_ms = bw_now_ms() - t0;
    long long rss1 = vm_rss(pid);
    if (r != CUDA_SUCCESS) {
        snprintf(why, cap, "cuCheckpointProcessCheckpoint(pid %d) failed: %s", (int)pid, err_str(r));
        recover(pid, why, cap);
        return -1;
    }
    t->bytes = rss0 >= 0 && rss1 > rss0 ? rss1 - rss0 : 0;
    return 0;
}

/* "; the process is left in CUDA state CHECKPOINTED": after a failed step, so the log says
 * what the caller is about to kill. */
static void note_state(pid_t pid, char *why, size_t cap) {
    CUprocessState st;
    char e[256];
    if (get_state(pid, &st, e, sizeof e) < 0)
        append(why, cap, "; its GPU state is unknown (%s)", e);
    else
        append(why, cap, "; the process is left in CUDA state %s", state_name(st));
}

static void sleep_ms(double ms) {
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000),
                          .tv_nsec = (long)((ms - (double)(time_t)(ms / 1000) * 1000) * 1e6)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* Poll GetState until pid is in `want`, for at most timeout_s. A state that lags or never
 * comes must not hand over a process whose first CUDA call would hang. The delay doubles
 * from 1 ms to 100 ms: a quick transition costs about a millisecond, a stuck one a few
 * dozen driver calls. *polls: how many GetState calls it took. */
#define STATE_POLL_FIRST_MS 1.0
#define STATE_POLL_MAX_MS 100.0
static int wait_state(pid_t pid, CUprocessState want, double timeout_s, int *polls, char *why,
                      size_t cap) {
    double deadline = bw_now_ms() + timeout_s * 1000.0, delay = STATE_POLL_FIRST_MS;
    CUprocessState st;
    for (*polls = 1;; ++*polls) {
        if (get_state(pid, &st, why, cap) < 0)
            return -1;
        if (st == want)
            return 0;
        double left = deadline - bw_now_ms();
        if (left <= 0) {
            snprintf(why, cap, "the CUDA state of pid %d is still %s after %gs (%d polls), "
                     "expected %s", (int)pid, state_name(st), timeout_s, *polls, state_name(want));
            return -1;
        }
        sleep_ms(delay < left ? delay : left);
        delay = delay * 2 < STATE_POLL_MAX_MS ? delay * 2 : STATE_POLL_MAX_MS;
    }
}

static void restore_thread(pid_t pid, struct bw_cuda_times *t) {
    int tid = 0;
    t->restore_tid =
        driver.restore_tid && driver.restore_tid((int)pid, &tid) == CUDA_SUCCESS ? tid : 0;
}

/* Restore -> Unlock -> wait for RUNNING (bounded by timeout_s). On failure why names the
 * step and the state the process is left in; the caller kills it. */
static int restore_unlock(pid_t pid, CUcheckpointGpuPair *pairs, int npairs, double timeout_s,
                          struct bw_cuda_times *t, char *why, size_t cap) {
    CUcheckpointRestoreArgs ra;
    memset(&ra, 0, sizeof ra);
    ra.gpuPairs = npairs ? pairs : NULL;
    ra.gpuPairsCount = (unsigned int)npairs;
    double t0 = bw_now_ms();
    CUresult r = driver.restore((int)pid, &ra);
    t->restore_ms = bw_now_ms() - t0;
    if (r != CUDA_SUCCESS) {
        snprintf(why, cap, "cuCheckpointProcessRestore(pid %d%s) failed: %s", (int)pid,
                 npairs ? ", GPU UUIDs remapped" : "", err_str(r));
        note_state(pid, why, cap);
        return -1;
    }
    restore_thread(pid, t);
    CUcheckpointUnlockArgs ua;
    memset(&ua, 0, sizeof ua);
    t0 = bw_now_ms();
    r = driver.unlock((int)pid, &ua);
    if (r != CUDA_SUCCESS) {
        t->unlock_ms = bw_now_ms() - t0;
        snprintf(why, cap, "cuCheckpointProcessUnlock(pid %d) failed: %s", (int)pid, err_str(r));
        note_state(pid, why, cap);
        return -1;
    }
    char e[512];
    int rc = wait_state(pid, CU_PROCESS_STATE_RUNNING, timeout_s, &t->unlock_polls, e, sizeof e);
    t->unlock_ms = bw_now_ms() - t0;
    if (rc < 0) {
        snprintf(why, cap, "cuCheckpointProcessUnlock(pid %d) returned, but %s", (int)pid, e);
        return -1;
    }
    return 0;
}

int bw_cuda_resume(pid_t pid, double timeout_s, struct bw_cuda_times *t, char *why,
                   size_t cap) {
    if (bw_cuda_load(why, cap) < 0)
        return -1;
    return restore_unlock(pid, NULL, 0, timeout_s, t, why, cap);
}

/* "driver 570.86.15 (CUDA 12.8)", or "CUDA 12.8" when the release is unknown. */
static void driver_str(int version, const char *release, char *out, size_t cap) {
    snprintf(out, cap, "%s%s%sCUDA %d.%d%s", release[0] ? "driver " : "", release,
             release[0] ? " (" : "", version / 1000, version % 1000 / 10, release[0] ? ")" : "");
}

/* The driver's checkpoint format is its own: users report restores failing across driver
 * versions, patch levels included. The release is compared only when both sides know it
 * (older images lack it). */
static int driver_compat(int saved_version, const char *saved_release, char *why, size_t cap) {
    const char *rel = bw_cuda_driver_release();
    if (saved_version == driver.version && (!saved_release[0] || !rel[0] ||
                                       strcmp(saved_release, rel) == 0))
        return 0;
    char a[160], b[160];
    driver_str(saved_version, saved_release, a, sizeof a);
    driver_str(driver.version, rel, b, sizeof b);
    snprintf(why, cap, "NVIDIA driver differs: image taken with %s, this machine has %s", a, b);
    return -1;
}

int bw_cuda_check_compat(const struct bw_cuda_gpus *saved, int saved_version,
                         const char *saved_release, struct bw_cuda_gpus *now, int *npairs,
                         char *why, size_t cap) {
    char e[768];
    *npairs = 0;
    if (bw_cuda_load(e, sizeof e) < 0) {
        snprintf(why, cap, "the image holds GPU state, but GPU checkpointing is unavailable "
                 "here: %s", e);
        return -1;
    }
    if (bw_cuda_list_gpus(now, why, cap) < 0)
        return -1;
    bool same = now->n == saved->n;
    for (int i = 0; same && i < saved->n; i++)
        same = strcmp(now->gpu[i].name, saved->gpu[i].name) == 0;
    if (!same) {
        char a[512], b[512];
        bw_cuda_describe(saved, a, sizeof a);
        bw_cuda_describe(now, b, sizeof b);
        snprintf(why, cap, "GPU type/count differs: image has %s, this machine has %s", a, b);
        return -1;
    }
    if (driver_compat(saved_version, saved_release, why, cap) < 0)
        return -1;
    for (int i = 0; i < saved->n; i++)
        if (memcmp(now->gpu[i].uuid, saved->gpu[i].uuid, 16) != 0)
            *npairs = saved->n; /* the pairs must name every checkpointed GPU */
    return 0;
}

int bw_cuda_restore_replica(pid_t pid, const struct bw_cuda_gpus *saved,
                            const struct bw_cuda_gpus *now, bool remap, double timeout_s,
                            struct bw_cuda_times *t, char *why, size_t cap) {
    if (bw_cuda_load(why, cap) < 0)
        return -1;
    CUprocessState st;
    if (get_state(pid, &st, why, cap) < 0)
        return -1;
    if (st != CU_PROCESS_STATE_CHECKPOINTED) {
        snprintf(why, cap, "the restored process's CUDA state (pid %d) is %s, expected "
                 "CHECKPOINTED", (int)pid, state_name(st));
        return -1;
    }
    CUcheckpointGpuPair pairs[BW_CUDA_MAX_GPUS];
    int n = remap ? saved->n : 0;
    for (int i = 0; i < n; i++) {
        memcpy(pairs[i].oldUuid.bytes, saved->gpu[i].uuid, 16);
        memcpy(pairs[i].newUuid.bytes, now->gpu[i].uuid, 16);
    }
    return restore_unlock(pid, pairs, n, timeout_s, t, why, cap);
}

/* ---- probe ------------------------------------------------------------------------- */

int bw_cuda_probe_isolated(char *why, size_t cap, char *names, size_t ncap) {
    int p[2];
    names[0] = '\0';
    if (pipe2(p, O_CLOEXEC) < 0) {
        snprintf(why, cap, "cannot probe the GPU: %s", strerror(errno));
        return 0;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(why, cap, "cannot probe the GPU: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        return 0;
    }
    if (pid == 0) {
        char out[2048];
        struct bw_cuda_gpus g;
        char e[768] = "", d[1024] = "";
        int n = bw_cuda_list_gpus(&g, e, sizeof e) < 0 ? 0 : g.n;
        if (n == 0 && !e[0])
            snprintf(e, sizeof e, "the NVIDIA driver reports no GPU (cuDeviceGetCount = 0)");
        if (n > 0)
            bw_cuda_describe(&g, d, sizeof d);
        int len = snprintf(out, sizeof out, "%d\n%s\n", n, n > 0 ? d : e);
        if (len > (int)sizeof out - 1)
            len = (int)sizeof out - 1;
        if (bw_write_full(p[1], out, (size_t)len) < 0)
            _exit(1);
        _exit(0);
    }
    close(p[1]);
    char buf[2048];
    size_t got = 0;
    double deadline = bw_now_ms() + 30000;
    for (;;) {
        struct pollfd pf = {.fd = p[0], .events = POLLIN};
        int left = (int)(deadline - bw_now_ms());
        if (left <= 0 || poll(&pf, 1, left) == 0) {
            kill(pid, SIGKILL);
            snprintf(buf, sizeof buf, "0\nthe NVIDIA driver did not answer within 30s\n");
            got = strlen(buf);
            break;
        }
        ssize_t r = read(p[0], buf + got, sizeof buf - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || (got += (size_t)r) >= sizeof buf - 1)
            break;
    }
    buf[got] = '\0';
    close(p[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    const char *nl = strchr(buf, '\n');
    int n = nl ? atoi(buf) : 0;
    const char *text = nl ? nl + 1 : "the GPU probe crashed";
    int tl = (int)strcspn(text, "\n"); /* its first line */
    if (n > 0)
        snprintf(names, ncap, "%.*s", tl, text);
    else
        snprintf(why, cap, "%.*s", tl, text);
    return n > 0 ? n : 0;
}
