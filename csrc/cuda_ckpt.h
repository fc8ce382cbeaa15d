/* cuda_ckpt.h - the CUDA driver's checkpoint API (r570+), loaded at run time.
 *
 * beam-worker never links libcuda: it dlopen()s "libcuda.so.1" the first time a GPU step
 * is needed, so the same binary builds and runs on machines without CUDA. Every failure
 * comes back as a sentence for the user: no driver, driver too old, missing symbols, or
 * the CUresult (number and name) of the call that failed.
 *
 * The supervisor drives the host's GPU state from outside (a lock blocks the target's own
 * CUDA calls, so a process can never do this to itself):
 *   dump:     GetState(RUNNING) -> Lock(timeout) -> Checkpoint -> [CRIU dump]
 *             -> Restore -> Unlock                      (the original keeps serving)
 *   restore:  [check GPU type/count] -> [CRIU restore] -> Restore(UUID remap) -> Unlock
 * Any failure brings the process back to RUNNING where possible (docs/gpu.md). */
#ifndef BW_CUDA_CKPT_H
#define BW_CUDA_CKPT_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define BW_CUDA_MIN_VERSION 12080 /* CUDA 12.8 = driver r570: first with the API */
#define BW_CUDA_MAX_GPUS 16

struct bw_cuda_gpu {
    char name[128];
    unsigned char uuid[16];
};

struct bw_cuda_gpus {
    int n;
    struct bw_cuda_gpu gpu[BW_CUDA_MAX_GPUS];
};

/* GPU phases of one start, for the cold-start profile. bytes: estimated GPU state copied
 * into host memory (growth of the process's VmRSS across cuCheckpointProcessCheckpoint).
 * restore_tid: the driver's restore thread in the target
 * (cuCheckpointProcessGetRestoreThreadId; 0 when the driver does not say). unlock_polls:
 * GetState calls until the unlocked process was RUNNING. unlock_ms includes them. */
struct bw_cuda_times {
    double lock_ms, checkpoint_ms, restore_ms, unlock_ms;
    long long bytes;
    int restore_tid, unlock_polls;
};

/* Load the driver, resolve the symbols, cuInit, check the version. Cached: later calls
 * return the first result. 0, or -1 with the reason in why. */
int bw_cuda_load(char *why, size_t cap);
int bw_cuda_driver_version(void);
/* The driver's release ("570.86.15") from NVML, else /proc/driver/nvidia/version; "" when
 * neither says. Cached. */
const char *bw_cuda_driver_release(void);

/* Does the process use CUDA? Cheap, no driver call: a mapping of libcuda or of a
 * /dev/nvidia* device in /proc/PID/maps. pid 0: the calling process. */
bool bw_cuda_process_uses_gpu(pid_t pid);
/* Does it hold GPU device handles (/dev/nvidia* mapped or open)? */
bool bw_cuda_process_has_devices(pid_t pid);

/* The GPUs this process sees (names and UUIDs), in device order. */
int bw_cuda_list_gpus(struct bw_cuda_gpus *g, char *why, size_t cap);
/* "1x NVIDIA H100 80GB HBM3", "2x A + 1x B", "no GPU". */
void bw_cuda_describe(const struct bw_cuda_gpus *g, char *out, size_t cap);

/* Lock (bounded by lock_timeout_s) and checkpoint the GPU state of pid. On failure the
 * process is unlocked again (why says so, or says what state it was left in): -1, or -2
 * when the driver knows no CUDA state for pid at all (GetState failed). */
int bw_cuda_checkpoint(pid_t pid, double lock_timeout_s, struct bw_cuda_times *t, char *why,
                       size_t cap);
/* The original process after the dump: restore its GPU state, unlock it and wait (at
 * most timeout_s, polling with backoff) until the driver reports it RUNNING. No retry: on
 * failure (why names the state it is left in) the caller kills and replaces it. */
int bw_cuda_resume(pid_t pid, double timeout_s, struct bw_cuda_times *t, char *why, size_t cap);
/* Before a CRIU restore: does this machine have the image's GPUs (model and count) and
 * its driver (CUDA version of cuDriverGetVersion and, where both are known, the release)?
 * Fills the UUID pairs to remap (npairs 0 when the UUIDs are the same). */
int bw_cuda_check_compat(const struct bw_cuda_gpus *saved, int saved_version,
                         const char *saved_release, struct bw_cuda_gpus *now, int *npairs,
                         char *why, size_t cap);
/* After a CRIU restore: restore the replica's GPU state (onto `now` when remap), unlock
 * it and wait for RUNNING, as bw_cuda_resume. On failure the caller kills the replica:
 * one left CHECKPOINTED or LOCKED would hang on its first CUDA call. */
int bw_cuda_restore_replica(pid_t pid, const struct bw_cuda_gpus *saved,
                            const struct bw_cuda_gpus *now, bool remap, double timeout_s,
                            struct bw_cuda_times *t, char *why, size_t cap);

/* How many GPUs a fresh process could use, asked in a forked child so that the caller
 * never maps the driver itself: >= 1, or 0 with the reason in why. names gets the
 * description. */
int bw_cuda_probe_isolated(char *why, size_t cap, char *names, size_t ncap);

/* The GPU list in image metadata: [{"name": ..., "uuid": "GPU-xxxxxxxx-..."}, ...]. */
void bw_cuda_pack_gpus(msgpack_packer *pk, const struct bw_cuda_gpus *g);
int bw_cuda_unpack_gpus(const msgpack_object *o, struct bw_cuda_gpus *g);

#endif
