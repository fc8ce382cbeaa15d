/* replica.h - one replica: a host process (booted cold or restored from the image),
 * its control channel, its checkpoint. The supervisor decides how many there are and
 * what happens when one ends (supervisor.c). A restore and a dump run off the event
 * loop (job.h); the replica is `busy` while one does. */
#ifndef BW_REPLICA_H
#define BW_REPLICA_H

#include <msgpack.h>
#include <stdbool.h>
#include <sys/types.h>
#include <uv.h>

#include "checkpoint.h"
#include "control.h"
#include "lazy.h"
#include "listen.h"

/* BW_R_RESTORE begins when the restore job is queued: pid stays 0 (and busy true) until
 * CRIU has made the process. */
enum bw_replica_phase { BW_R_BOOT, BW_R_RESTORE, BW_R_SERVING, BW_R_STOPPING };

struct bw_replica {
    int id;
    pid_t pid;                 /* 0 before a restore made it, and once reaped */
    bool busy;                 /* a restore or dump job is in flight: not to be reaped or
                                * freed; a stop waits for the job's end */
    int ctl;                   /* our end of the control socket, -1 when closed */
    uv_poll_t *ctl_poll;
    struct bw_ctl_reader ctl_rd; /* the control message being read */
    struct bw_ckpt_ids ids;    /* of a cold host, for its dump */
    enum bw_replica_phase phase;
    bool restored, may_dump;
    bool replace;              /* killed on purpose: start another in its place */
    double t0, last_active;    /* bw_now_ms() */
    double serving_since;      /* bw_now_ms() when it reached "serving", 0 before */
    msgpack_sbuffer start_profile; /* what the supervisor measured, sent in "start" */
    msgpack_sbuffer profile;   /* the complete profile, from "serving" */
    struct bw_listener upstream; /* private socket for the HTTP router; fd -1 if none */
    uv_timer_t *timer;         /* restore timeout, then stop timeout */
    int workers;
    unsigned long long requests; /* served, as the host last reported */
    struct bw_lazy lazy;       /* a lazy restore's page daemon, while it fills memory in */
    double restored_at;        /* bw_now_ms() when CRIU's restore returned */
    int in_call;                 /* workers running a call, as the host last reported */
    struct bw_replica *next;
};

struct bw_replica *bw_replica_new(int id);
/* Boot a host from scratch; may_dump: checkpoint it after on_start. 0 or -1. */
int bw_replica_boot_cold(struct bw_replica *r, bool may_dump);
/* Restore from the checkpoint, off the loop. 0: started; its end is told through
 * bw_sup.owner->restored (false: nothing runs, the image was discarded where it was at
 * fault; boot cold instead). -1: not started (no memory, no thread): boot cold. */
int bw_replica_restore(struct bw_replica *r);
/* SIGTERM now, SIGKILL after the grace period; mid-job, once the job is done (a
 * restored host that never served is killed at once). */
void bw_replica_stop(struct bw_replica *r, double grace_s);
/* A page daemon still filling memory in after --restore-timeout is stuck: the replica
 * is killed (calls that fault on a missing page would hang). Called on each tick. */
void bw_replica_check_pager(struct bw_replica *r, double now);
/* A host that began a control message over BW_CTL_STALL_MS ago and has not finished
 * it: its channel is closed (it stops), as for one that closed it. Called on each tick. */
#define BW_CTL_STALL_MS 1000.0
void bw_replica_check_ctl(struct bw_replica *r, double now);
/* The page daemon of a lazy restore exited (reaped by the caller). */
void bw_replica_pager_exited(struct bw_replica *r, int status);
/* The process is gone (reaped): close the channel. */
void bw_replica_reaped(struct bw_replica *r);
void bw_replica_free(struct bw_replica *r);
const char *bw_replica_phase_name(enum bw_replica_phase p);

#endif
