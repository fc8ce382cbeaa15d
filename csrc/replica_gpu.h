/* replica_gpu.h - a replica's GPU steps around CRIU (docs/gpu.md): the host's GPU state
 * into host memory before a dump, the image's GPUs checked against this machine's before
 * a restore, the GPU state brought back after it. Built on cuda_ckpt.h.
 *
 * Thread rule: these block up to --cuda-lock-timeout and run on a job thread (job.h);
 * they read only bw_sup.o and their arguments. */
#ifndef BW_REPLICA_GPU_H
#define BW_REPLICA_GPU_H

#include <msgpack.h>
#include <stddef.h>
#include <sys/types.h>

#include "checkpoint.h"
#include "cuda_ckpt.h"

/* A restore's GPU side: the image's GPUs, this machine's, and how they pair. */
struct bw_gpu_restore {
    struct bw_cuda_gpus saved, now;
    int npairs;              /* GPUs to remap by UUID; 0 when the UUIDs are the same */
    struct bw_cuda_times t;
};

/* The host's GPU state before the CRIU dump: 1 checkpointed (meta gets the GPU list for
 * restores), 0 nothing to save, -1 failed (the host is unlocked again). */
int bw_gpu_checkpoint(pid_t pid, struct bw_cuda_times *t, msgpack_sbuffer *meta, char *err,
                      size_t cap);
/* The image's GPU metadata against this machine's GPUs, before any CRIU work. 0 or -1. */
int bw_gpu_compat(const struct bw_ckpt_image *img, struct bw_gpu_restore *g, char *err,
                  size_t cap);
/* After the CRIU restore of pid: its GPU state back, unlocked, RUNNING. On failure pid is
 * killed and reaped (left CHECKPOINTED or LOCKED its first CUDA call would hang): -1. */
int bw_gpu_restore(pid_t pid, struct bw_gpu_restore *g, char *err, size_t cap);
/* The GPU phases of a restore, as start-profile entries: BW_GPU_RESTORE_ENTRIES of them. */
#define BW_GPU_RESTORE_ENTRIES 4
void bw_gpu_pack_restore_times(msgpack_packer *pk, const struct bw_cuda_times *t);
/* The GPU phases of a dump (the original's lock to unlock): BW_GPU_DUMP_ENTRIES entries. */
#define BW_GPU_DUMP_ENTRIES 6
void bw_gpu_pack_dump_times(msgpack_packer *pk, const struct bw_cuda_times *t);

#endif
