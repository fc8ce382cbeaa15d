/* replica_gpu.c - a replica's GPU steps around CRIU (replica_gpu.h). */
#include "replica_gpu.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>

#include "fleet.h"
#include "log.h"
#include "mp.h"

int bw_gpu_checkpoint(pid_t pid, struct bw_cuda_times *t, msgpack_sbuffer *meta, char *err,
                      size_t cap) {
    char why[768];
    struct bw_cuda_gpus g;
    if (bw_cuda_load(why, sizeof why) < 0) {
        snprintf(err, cap, "the app uses CUDA, but GPU checkpointing is unavailable: %s", why);
        return -1;
    }
    if (bw_cuda_list_gpus(&g, err, cap) < 0)
        return -1;
    int rc = bw_cuda_checkpoint(pid, bw_sup.o->cuda_lock_timeout_s, t, err, cap);
    if (rc == -2 && !bw_cuda_process_has_devices(pid)) {
        bw_info("the host loaded libcuda but holds no GPU (%s): checkpointing its CPU state only",
                err);
        return 0;
    }
    if (rc < 0)
        return -1;
    msgpack_packer pk;
    msgpack_packer_init(&pk, meta, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    bw_mp_str(&pk, "gpus");
    bw_cuda_pack_gpus(&pk, &g);
    bw_mp_kv_int(&pk, "bytes", t->bytes);
    bw_mp_kv_int(&pk, "driver_version", bw_cuda_driver_version());
    bw_mp_kv_str(&pk, "driver", bw_cuda_driver_release()); /* a restore needs the same */
    char d[512];
    bw_cuda_describe(&g, d, sizeof d);
    bw_info("GPU state checkpointed (%s): ~%.1f MiB; lock %.0f ms, checkpoint %.0f ms", d,
            (double)t->bytes / 1048576.0, t->lock_ms, t->checkpoint_ms);
    return 1;
}

int bw_gpu_compat(const struct bw_ckpt_image *img, struct bw_gpu_restore *g, char *err,
                  size_t cap) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object m;
    int rc = -1;
    if (bw_mp_unpack_exact(img->gpu, img->gpu_len, &z, &m) < 0 ||
        bw_cuda_unpack_gpus(bw_mp_get(&m, "gpus"), &g->saved) < 0) {
        snprintf(err, cap, "the image's GPU metadata is corrupt");
    } else {
        g->t.bytes = (long long)bw_mp_num(bw_mp_get(&m, "bytes"), 0);
        char rel[96];
        if (!bw_mp_strdup(bw_mp_get(&m, "driver"), rel, sizeof rel))
            rel[0] = '\0'; /* an image from before the release was recorded */
        rc = bw_cuda_check_compat(&g->saved, (int)bw_mp_num(bw_mp_get(&m, "driver_version"), 0),
                                  rel, &g->now, &g->npairs, err, cap);
    }
    msgpack_zone_destroy(&z);
    return rc;
}

int bw_gpu_restore(pid_t pid, struct bw_gpu_restore *g, char *err, size_t cap) {
    if (g->npairs)
        bw_info("this machine's GPUs have other UUIDs than the image's: remapping %d GPU(s)",
                g->npairs);
    if (bw_cuda_restore_replica(pid, &g->saved, &g->now, g->npairs > 0,
                                bw_sup.o->cuda_lock_timeout_s, &g->t, err, cap) < 0) {
        /* As Modal does: a replica whose GPU state cannot come back boots cold. */
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        return -1;
    }
    bw_info("GPU state restored on pid %d: restore %.0f ms, unlock %.0f ms (%d state "
            "poll(s)), driver restore thread %d", (int)pid, g->t.restore_ms, g->t.unlock_ms,
            g->t.unlock_polls, g->t.restore_tid);
    return 0;
}

void bw_gpu_pack_restore_times(msgpack_packer *pk, const struct bw_cuda_times *t) {
    bw_mp_kv_double(pk, "gpu_restore_ms", t->restore_ms);
    bw_mp_kv_double(pk, "gpu_unlock_ms", t->unlock_ms);
    bw_mp_kv_int(pk, "gpu_bytes", t->bytes);
    bw_mp_kv_int(pk, "gpu_restore_tid", t->restore_tid);
}

void bw_gpu_pack_dump_times(msgpack_packer *pk, const struct bw_cuda_times *t) {
    bw_mp_kv_double(pk, "gpu_lock_ms", t->lock_ms);
    bw_mp_kv_double(pk, "gpu_checkpoint_ms", t->checkpoint_ms);
    bw_gpu_pack_restore_times(pk, t);
}
