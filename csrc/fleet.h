/* fleet.h - what every replica shares, one per process like Redis's `server`, and the
 * owner's callbacks: replica.c and observe.c call back the supervisor through these
 * instead of naming it, as libuv handles call back their owner. */
#ifndef BW_FLEET_H
#define BW_FLEET_H

#include <limits.h>
#include <msgpack.h>
#include <stdbool.h>
#include <uv.h>

#include "checkpoint.h"
#include "listen.h"
#include "options.h"
#include "store.h"

#define BW_SUP_MAX_LISTENERS (2 * BW_MAX_LISTENERS)

struct bw_replica;

struct bw_fleet_owner {
    /* A host told its endpoint's configuration (cold boot, or read from the image). */
    void (*set_config)(const msgpack_object *config);
    /* A replica reached "serving". */
    void (*serving)(struct bw_replica *r);
    /* A restore job ended (bw_replica_restore). ok: r->pid runs (it may have died
     * already: reap). Not ok: nothing runs; boot r cold or let it go. */
    void (*restored)(struct bw_replica *r, bool ok);
    /* The replica list, read-only, linked by ->next. */
    struct bw_replica *(*replicas)(void);
};

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
    struct bw_store store; /* --store: the shared store (off without it) */
    char *config;      /* the endpoint's configuration (packed map), once known */
    size_t config_len;
    bool gpu_resume_failed;
    bool lazy_broken;  /* a lazy restore failed here: restore eagerly from now on */
    const struct bw_fleet_owner *owner; /* set by the supervisor before any replica */
};
extern struct bw_sup bw_sup;

/* The endpoint's configuration (a map), unpacked into z; NULL while it is unknown. */
const msgpack_object *bw_fleet_config(msgpack_zone *z);

#endif
