/* supervisor.h - the process outside: owns the sockets, keeps replicas (host processes,
 * each in its own PID namespace) booted cold or restored from the checkpoint, routes
 * HTTP calls to them, scales them up under load and down to zero when idle. */
#ifndef BW_SUPERVISOR_H
#define BW_SUPERVISOR_H

#include <limits.h>
#include <msgpack.h>
#include <stdbool.h>
#include <uv.h>

#include "checkpoint.h"
#include "listen.h"
#include "options.h"

#define BW_SUP_MAX_LISTENERS (2 * BW_MAX_LISTENERS)

struct bw_replica;

/* What every replica shares. One supervisor per process, like Redis's `server`. */
struct bw_sup {
    const struct bw_options *o;
    uv_loop_t *loop;
    struct bw_listener l[BW_SUP_MAX_LISTENERS]; /* public msgpack listeners */
    int nl;
    char exe[PATH_MAX];
    bool use_ns;       /* root: PID namespaces and checkpoints */
    bool ckpt_on;      /* checkpointing possible for this run */
    struct bw_ckpt ck;
    char *config;      /* the endpoint's configuration (packed map), once known */
    size_t config_len;
    bool gpu_resume_failed;
    bool lazy_broken;  /* a lazy restore failed here: restore eagerly from now on */
};
extern struct bw_sup bw_sup;

int bw_supervisor_main(const struct bw_options *o, int argc, char **argv);

/* Called by replica.c. */
void bw_sup_set_config(const msgpack_object *config);
void bw_sup_replica_serving(struct bw_replica *r);
/* The replica list, for observe.c (read-only; linked by ->next). */
struct bw_replica *bw_sup_replicas(void);

#endif
