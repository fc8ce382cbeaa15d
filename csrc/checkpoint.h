/* checkpoint.h - CRIU images of the host: where they live, how they are made, checked
 * and restored. A thin layer over libcriu's RPC (the criu binary does the work).
 *
 * Layout under the checkpoint root (mode 0700, refused if group/other-writable):
 *   <key>/img/        CRIU's image files (0600)
 *   <key>/restore.msgpack  what a restore needs: fd identities, file sizes and CRCs,
 *                          the endpoint configuration
 *   <key>/manifest.json    the same for people and `beam checkpoints ls`, plus timings
 *                          (both carry the compatibility key, compat.h)
 *   <key>/workingset.bin   the pages the first lazy restore faulted in, since restored
 *                          eagerly (workingset.c)
 *   <key>.failed           a checkpoint of this key failed: boot cold, don't retry
 *   .tmp-<key>-<pid>/      a dump in progress; renamed to <key> only when complete,
 *                          so a half-written image is never used
 */
#ifndef BW_CHECKPOINT_H
#define BW_CHECKPOINT_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "compat.h"

struct bw_ckpt {
    char root[PATH_MAX];
    char dir[PATH_MAX + 200];
    char failed[PATH_MAX + 200];
    char key[160];
    const char *criu;
    double timeout_s;
    int log_level;  /* CRIU's -v: BEAM_CRIU_LOG_LEVEL, else 2 (errors and warnings) */
    bool keep_logs; /* BEAM_CRIU_LOG_LEVEL was set: logs of calls that worked stay too */
    struct bw_compat compat; /* this machine's (bw_ckpt_open): recorded in each image */
};

/* Identities of the host's stdout/stderr pipes and control socket as the image knows
 * them: a restore maps fresh ones in their place (CRIU inherit-fd). */
struct bw_ckpt_ids {
    unsigned long out_ino, err_ino, ctl_ino;
};

struct bw_ckpt_verify;

struct bw_ckpt_image {
    struct bw_ckpt_ids ids;
    struct bw_ckpt_verify *pages; /* the page files' XXH3 check, run beside the restore */
    char *config; /* packed msgpack map (the endpoint configuration); malloc'd */
    size_t config_len;
    unsigned long long bytes;
    char *gpu; /* packed msgpack map of the GPU state (docs/gpu.md), or NULL; malloc'd */
    size_t gpu_len;
};

/* Prepare the root directory. 0, or -1 with a reason in err. */
int bw_ckpt_open(struct bw_ckpt *c, const char *root, const char *key, const char *criu,
                 double timeout_s, char *err, size_t errlen);
/* The criu binary to use: --criu as given, else the first executable of $BEAM_CRIU,
 * /usr/local/lib/beam/criu (scripts/install-criu.sh), `criu` in $PATH; NULL if none is.
 * The one place this is decided: Python asks it with `beam-worker --print-criu`. */
#define BW_CRIU_SEARCH "$BEAM_CRIU, /usr/local/lib/beam/criu, criu in $PATH"
const char *bw_ckpt_find_criu(const char *configured);

int bw_ckpt_failed_before(const struct bw_ckpt *c, char *reason, size_t cap);
void bw_ckpt_mark_failed(const struct bw_ckpt *c, const char *reason);
void bw_ckpt_clear_failed(const struct bw_ckpt *c);
int bw_ckpt_exists(const struct bw_ckpt *c);

/* Dump the tree rooted at pid (left running). On success *ms and *bytes are set.
 * gpu (packed msgpack, may be NULL) is stored as "gpu" in restore.msgpack and manifest. */
int bw_ckpt_dump(const struct bw_ckpt *c, pid_t pid, const struct bw_ckpt_ids *ids,
                 const char *config, size_t config_len, const char *app, const char *profile_json,
                 const char *gpu, size_t gpu_len, double *ms, unsigned long long *bytes,
                 char *err, size_t errlen);

/* Read and check an image: sizes of all files, XXH3 of all but the page data, whose
 * check (img->pages) runs beside the restore instead. */
int bw_ckpt_load(const struct bw_ckpt *c, struct bw_ckpt_image *img, char *err, size_t errlen);
void bw_ckpt_image_free(struct bw_ckpt_image *img);
/* Check a whole image now, page data included, as before it travels (the store, an
 * export) or is installed from elsewhere. 0 (*bytes: its size), or -1 with a reason. */
int bw_ckpt_check(const struct bw_ckpt *c, unsigned long long *bytes, char *err,
                  size_t errlen);

/* The compatibility record of the image in dir (its restore.msgpack). 0, or -1 with
 * the reason in err (an image from before records were kept has none). */
int bw_ckpt_compat_of(const char *dir, struct bw_compat *c, char *err, size_t errlen);

/* The page data's check: started (a thread, at the lowest priority when background;
 * NULL is a no-op), polled (1 still hashing,
 * 0 good, -1 corrupt), ended (waits; 0, or -1 naming the corrupt file in err) or
 * cancelled. end and cancel free it and set the pointer to NULL. */
void bw_ckpt_verify_start(struct bw_ckpt_verify *v, bool background);
int bw_ckpt_verify_poll(const struct bw_ckpt_verify *v);
int bw_ckpt_verify_end(struct bw_ckpt_verify **v, char *err, size_t errlen);
void bw_ckpt_verify_cancel(struct bw_ckpt_verify **v);

/* A restore whose image turned out corrupt: its process was killed; boot cold. */
#define BW_CKPT_CORRUPT (-2)

/* Restore a replica as our child, with fresh stdout/stderr/control fds (not CLOEXEC).
 * The page data is checked while CRIU restores: 0, -1 (err says why) or BW_CKPT_CORRUPT. */
int bw_ckpt_restore(const struct bw_ckpt *c, struct bw_ckpt_image *img, int out_fd,
                    int err_fd, int ctl_fd, pid_t *pid, char *err, size_t errlen);

/* After img/<name> was rewritten in place (workingset.c): record its new size and XXH3
 * in restore.msgpack. 0, or -1 with a reason. */
int bw_ckpt_rehash(const struct bw_ckpt *c, const char *name, char *err, size_t errlen);

/* Remove an image that failed to restore, so the next start makes a new one. */
void bw_ckpt_discard(const struct bw_ckpt *c);

#endif
