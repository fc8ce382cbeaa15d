/* cuda_double.c - TEST DOUBLE of the NVIDIA driver library (libcuda.so.1).
 *
 * Built by tests/test_gpu.py into a temporary directory as libcuda.so.1 and made visible
 * only to the workers those tests start (LD_LIBRARY_PATH). Never installed, never on a
 * default library path. It exports `cuda_double_marker`, which beam-worker reports as
 * "TEST DOUBLE" whenever it loads this library.
 *
 * What it does:
 * - the device queries and the checkpoint entry points beam-worker uses (csrc/cuda_ckpt.c);
 * - appends one line per call to $CUDA_DOUBLE_LOG:
 *       <function> <target pid or -> <args...> rc=<CUresult> t=<realtime> caller=<pid>
 * - keeps the CUDA process state (RUNNING/LOCKED/CHECKPOINTED) where the real driver keeps
 *   it, in the target process: the variable `cuda_double_state` of the copy of this library
 *   the target mapped (the test app loads it), read and written through /proc/PID/mem. So a
 *   process CRIU restores from an image taken while CHECKPOINTED is CHECKPOINTED, a fresh
 *   one is RUNNING, and calls in the wrong state fail with CUDA_ERROR_ILLEGAL_STATE;
 * - fails on request: CUDA_DOUBLE_FAIL=lock_timeout|lock|checkpoint|restore|restore_oom|
 *   unlock|unlock_stuck|version_old, optionally `:N` (only the N-th call of that function
 *   in this process). A failed Restore leaves the process CHECKPOINTED (restore_oom: with
 *   CUDA_ERROR_OUT_OF_MEMORY, as a GPU without room for the state does), a failed Unlock
 *   leaves it LOCKED; unlock_stuck returns CUDA_SUCCESS yet leaves it LOCKED for good;
 * - lags on request: CUDA_DOUBLE_UNLOCK_LAG=N: after Unlock the process stays LOCKED for
 *   the next N GetState calls (of the caller), then turns RUNNING;
 * - CUDA_DOUBLE_VERSION: what cuDriverGetVersion reports (default 12080);
 * - the few NVML calls beam uses (the tests link this file as libnvidia-ml.so.1 too):
 *   CUDA_DOUBLE_DRIVER, the driver release (default "570.86.15"), and
 *   CUDA_DOUBLE_PERSISTENCE=0|1|unknown, each GPU's persistence mode (default 1;
 *   unknown: NVML_ERROR_NOT_SUPPORTED);
 *   `no_symbols` is a separate build (-DCUDA_DOUBLE_NO_CKPT) without the cuCheckpoint*
 *   entry points;
 * - devices: CUDA_DOUBLE_DEVICES (count, default 1), CUDA_DOUBLE_GPU_NAME (default
 *   "Tesla T4 (cuda double)"), CUDA_DOUBLE_UUID_SEED (default "a": UUIDs derive from it). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { unsigned int timeoutMs, reserved0; uint64_t reserved1[7]; } CUcheckpointLockArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointCheckpointArgs;
typedef struct { CUuuid oldUuid, newUuid; } CUcheckpointGpuPair;
typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    uint64_t reserved1;
} CUcheckpointRestoreArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointUnlockArgs;

enum { RUNNING = 0, LOCKED = 1, CHECKPOINTED = 2, FAILED = 3 };
enum {
    OK = 0, E_INVALID_VALUE = 1, E_OUT_OF_MEMORY = 2, E_NO_DEVICE = 100,
    E_ILLEGAL_STATE = 401, E_NOT_READY = 600, E_UNKNOWN = 999,
};

__attribute__((visibility("default"))) const int cuda_double_marker = 1;
/* The CUDA state of the process this copy is mapped into (see above). */
__attribute__((visibility("default"))) volatile int cuda_double_state = RUNNING;

__attribute__((unused)) static const char *state_names[] = {"RUNNING", "LOCKED", "CHECKPOINTED", "FAILED"};

static void logf_(const char *fn, int pid, CUresult rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void logf_(const char *fn, int pid, CUresult rc, const char *fmt, ...) {
    const char *path = getenv("CUDA_DOUBLE_LOG");
    if (!path || !*path)
        return;
    char args[512] = "", line[1024], who[16] = "-";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    if (pid >= 0)
        snprintf(who, sizeof who, "%d", pid);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int n = snprintf(line, sizeof line, "%s %s %s%src=%d t=%lld.%09ld caller=%d\n", fn, who, args,
                     *args ? " " : "", rc, (long long)ts.tv_sec, ts.tv_nsec, (int)getpid());
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) {
        }
        close(fd);
    }
}

/* CUDA_DOUBLE_FAIL=<what>[:N]: fail <what>, or only its N-th call in this process
 * (`calls` counts the calls of that entry point, this one included). */
__attribute__((unused)) static int should_fail(const char *what, int calls) {
    const char *f = getenv("CUDA_DOUBLE_FAIL");
    if (!f)
        return 0;
    size_t n = strlen(what);
    if (strncmp(f, what, n) != 0)
        return 0;
    if (f[n] == '\0')
        return 1;
    return f[n] == ':' && atoi(f + n + 1) == calls;
}

static int ndevices(void) {
    const char *v = getenv("CUDA_DOUBLE_DEVICES");
    return v ? atoi(v) : 1;
}

static void uuid_of(int ordinal, const char *seed, unsigned char out[16]) {
    uint32_t h = 2166136261u;
    for (const char *p = seed; *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    for (int i = 0; i < 16; i++) {
        h = (h ^ (unsigned)(ordinal + i)) * 16777619u;
        out[i] = (unsigned char)(h >> 8);
    }
}

static const char *seed(void) {
    const char *s = getenv("CUDA_DOUBLE_UUID_SEED");
    return s && *s ? s : "a";
}

__attribute__((unused)) static void hex(const char *b, char *out) {
    for (int i = 0; i < 16; i++)
        sprintf(out + 2 * i, "%02x", (unsigned char)b[i]);
}

CUresult cuInit(unsigned int flags) {
    CUresult rc = ndevices() > 0 ? OK : E_NO_DEVICE;
    logf_("cuInit", -1, rc, "flags=%u", flags);
    return rc;
}

CUresult cuDriverGetVersion(int *v) {
    const char *f = getenv("CUDA_DOUBLE_FAIL");
    const char *want = getenv("CUDA_DOUBLE_VERSION");
    *v = f && strcmp(f, "version_old") == 0 ? 12040 : want && *want ? atoi(want) : 12080;
    logf_("cuDriverGetVersion", -1, OK, "version=%d", *v);
    return OK;
}

CUresult cuDeviceGetCount(int *n) {
    *n = ndevices();
    logf_("cuDeviceGetCount", -1, OK, "count=%d", *n);
    return OK;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal < 0 || ordinal >= ndevices())
        return E_INVALID_VALUE;
    *d = ordinal;
    return OK;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    const char *n = getenv("CUDA_DOUBLE_GPU_NAME");
    snprintf(name, (size_t)len, "%s", n && *n ? n : "Tesla T4 (cuda double)");
    (void)d;
    return OK;
}

CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) {
    uuid_of(d, seed(), (unsigned char *)u->bytes);
    return OK;
}

CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }

CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case OK: *s = "CUDA_SUCCESS"; break;
    case E_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case E_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case E_NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; break;
    case E_ILLEGAL_STATE: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
    case E_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
    case E_UNKNOWN: *s = "CUDA_ERROR_UNKNOWN"; break;
    default: *s = NULL; return E_INVALID_VALUE;
    }
    return OK;
}

/* ---- NVML ---- */
enum { NVML_OK = 0, NVML_E_INVALID = 2, NVML_E_NOT_SUPPORTED = 3, NVML_E_SIZE = 7 };

int nvmlInit_v2(void) { return NVML_OK; }
int nvmlShutdown(void) { return NVML_OK; }

int nvmlSystemGetDriverVersion(char *out, unsigned int len) {
    const char *v = getenv("CUDA_DOUBLE_DRIVER");
    v = v && *v ? v : "570.86.15";
    if (strlen(v) + 1 > len)
        return NVML_E_SIZE;
    snprintf(out, len, "%s", v);
    logf_("nvmlSystemGetDriverVersion", -1, NVML_OK, "version=%s", v);
    return NVML_OK;
}

int nvmlDeviceGetCount_v2(unsigned int *n) {
    *n = (unsigned int)ndevices();
    return NVML_OK;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) {
    if ((int)i >= ndevices())
        return NVML_E_INVALID;
    *h = (void *)(uintptr_t)(i + 1);
    return NVML_OK;
}

int nvmlDeviceGetPersistenceMode(void *h, int *mode) {
    const char *v = getenv("CUDA_DOUBLE_PERSISTENCE");
    (void)h;
    if (v && strcmp(v, "unknown") == 0)
        return NVML_E_NOT_SUPPORTED;
    *mode = v && *v ? atoi(v) : 1;
    return NVML_OK;
}

#ifndef CUDA_DOUBLE_NO_CKPT
/* Address of `cuda_double_state` in pid: the base of this same file (matched by inode)
 * in its maps, plus the variable's offset from our own base. 0 if pid did not map it. */
static uintptr_t state_addr(int pid) {
    Dl_info info;
    struct stat st;
    if (!dladdr((const void *)&cuda_double_state, &info) || stat(info.dli_fname, &st) < 0)
        return 0;
    uintptr_t off = (uintptr_t)&cuda_double_state - (uintptr_t)info.dli_fbase;
    char path[64], line[1024];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    uintptr_t base = 0;
    while (!base && fgets(line, sizeof line, f)) {
        unsigned long start, pgoff, ino;
        if (sscanf(line, "%lx-%*x %*s %lx %*x:%*x %lu", &start, &pgoff, &ino) == 3 &&
            ino == (unsigned long)st.st_ino && pgoff == 0)
            base = start;
    }
    fclose(f);
    return base ? base + off : 0;
}

static int mem_io(int pid, int *value, int write_it) {
    uintptr_t a = state_addr(pid);
    if (!a)
        return -1;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/mem", pid);
    int fd = open(path, (write_it ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write_it ? pwrite(fd, value, sizeof *value, (off_t)a)
                         : pread(fd, value, sizeof *value, (off_t)a);
    close(fd);
    return n == sizeof *value ? 0 : -1;
}

static int get(int pid, int *s) { return mem_io(pid, s, 0); }
static void set(int pid, int s) { mem_io(pid, &s, 1); }

static int c_lock, c_ckpt, c_restore, c_unlock; /* calls so far, for CUDA_DOUBLE_FAIL=x:N */
/* An unlock still in progress (CUDA_DOUBLE_UNLOCK_LAG, unlock_stuck): lag_pid turns RUNNING
 * after lag_left more GetState calls; -1: never. */
static int lag_pid, lag_left;

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    int s = -1;
    if (pid == lag_pid && lag_left > 0 && --lag_left == 0) {
        set(pid, RUNNING);
        lag_pid = 0;
    }
    CUresult rc = get(pid, &s) < 0 ? E_INVALID_VALUE : OK;
    if (rc == OK)
        *state = s;
    logf_("cuCheckpointProcessGetState", pid, rc, "state=%s",
          rc == OK && s >= 0 && s <= 3 ? state_names[s] : "?");
    return rc;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    unsigned int tmo = args ? args->timeoutMs : 0;
    int s;
    CUresult rc = OK;
    if (get(pid, &s) < 0)
        rc = E_INVALID_VALUE;
    else if (s != RUNNING)
        rc = E_ILLEGAL_STATE;
    else if (should_fail("lock_timeout", ++c_lock)) {
        /* work that never finishes: the driver gives up after timeoutMs, still RUNNING */
        usleep((useconds_t)(tmo ? tmo : 1000) * 1000u);
        rc = E_NOT_READY;
    } else if (should_fail("lock", c_lock))
        rc = E_UNKNOWN;
    else
        set(pid, LOCKED);
    logf_("cuCheckpointProcessLock", pid, rc, "timeoutMs=%u", tmo);
    return rc;
}

CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args) {
    (void)args;
    int s;
    CUresult rc = OK;
    if (get(pid, &s) < 0)
        rc = E_INVALID_VALUE;
    else if (s != LOCKED)
        rc = E_ILLEGAL_STATE;
    else if (should_fail("checkpoint", ++c_ckpt))
        rc = E_OUT_OF_MEMORY;
    else
        set(pid, CHECKPOINTED);
    logf_("cuCheckpointProcessCheckpoint", pid, rc, "%s", "");
    return rc;
}

CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
    int s;
    CUresult rc = OK;
    char pairs[16 * 70 + 32] = "";
    unsigned int np = args ? args->gpuPairsCount : 0;
    snprintf(pairs, sizeof pairs, "pairs=%u", np);
    for (unsigned int i = 0; i < np && i < 16; i++) {
        char o[33], n[33], mine[16];
        hex(args->gpuPairs[i].oldUuid.bytes, o);
        hex(args->gpuPairs[i].newUuid.bytes, n);
        snprintf(pairs + strlen(pairs), sizeof pairs - strlen(pairs), " %s->%s", o, n);
        uuid_of((int)i, seed(), (unsigned char *)mine);
        if (memcmp(mine, args->gpuPairs[i].newUuid.bytes, 16) != 0)
            rc = E_INVALID_VALUE; /* not a GPU of this machine */
    }
    if (rc != OK)
        ;
    else if (get(pid, &s) < 0)
        rc = E_INVALID_VALUE;
    else if (s != CHECKPOINTED)
        rc = E_ILLEGAL_STATE;
    else if (should_fail("restore_oom", ++c_restore))
        rc = E_OUT_OF_MEMORY;
    else if (should_fail("restore", c_restore))
        rc = E_UNKNOWN;
    else
        set(pid, LOCKED);
    logf_("cuCheckpointProcessRestore", pid, rc, "%s", pairs);
    return rc;
}

CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args) {
    (void)args;
    int s;
    CUresult rc = OK;
    if (get(pid, &s) < 0)
        rc = E_INVALID_VALUE;
    else if (s != LOCKED)
        rc = E_ILLEGAL_STATE;
    else if (should_fail("unlock_stuck", ++c_unlock))
        lag_pid = pid, lag_left = -1;
    else if (should_fail("unlock", c_unlock))
        rc = E_UNKNOWN;
    else if (getenv("CUDA_DOUBLE_UNLOCK_LAG") && atoi(getenv("CUDA_DOUBLE_UNLOCK_LAG")) > 0)
        lag_pid = pid, lag_left = atoi(getenv("CUDA_DOUBLE_UNLOCK_LAG"));
    else
        set(pid, RUNNING);
    logf_("cuCheckpointProcessUnlock", pid, rc, "%s", "");
    return rc;
}

/* The driver's restore thread lives in the target; the double has none: its main thread. */
CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
    int s;
    CUresult rc = get(pid, &s) < 0 ? E_INVALID_VALUE : OK;
    if (rc == OK)
        *tid = pid;
    logf_("cuCheckpointProcessGetRestoreThreadId", pid, rc, "tid=%d", rc == OK ? *tid : -1);
    return rc;
}
#endif
