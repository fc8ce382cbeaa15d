/* store.h - the shared store (--store DIR): a directory many machines mount (NFS,
 * CephFS, a ReadWriteMany volume) beside each machine's local cache (--checkpoint-dir).
 * A machine restores from its local cache; what is missing there it fetches from the
 * store; the one machine holding a key's lease dumps it and publishes it to the store.
 *
 * Layout (docs/checkpoint.md, "Shared store"):
 *   <store>/<key>/                         a published image (as in the local cache)
 *   <store>/<key>.lease                    who is dumping the key: host, pid, expiry
 *   <store>/.tmp-<key>-<host>-<pid>/       a publication in progress
 *
 * Leases are judged by their expiry (wall clock), never by kill(pid, 0): the holder may
 * run on another machine. A holder renews its lease while it boots, dumps and
 * publishes; a holder that dies stops renewing, and after the term anyone may break it. */
#ifndef BW_STORE_H
#define BW_STORE_H

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

#include "checkpoint.h"

#define BW_STORE_DEFAULT_LEASE_S 30.0

struct bw_lease {
    char host[256];
    long pid;
    double expires; /* wall clock, seconds since the epoch */
};

struct bw_store {
    bool on;
    char root[PATH_MAX];
    char dir[PATH_MAX + 200];   /* <store>/<key> */
    char lease[PATH_MAX + 200]; /* <store>/<key>.lease */
    char key[160];
    char host[256];
    double term_s;
    bool unusable;              /* its image of the key cannot run here (said why) */
    bool corrupt;               /* ... because it failed its check: replace it on publishing */
    int lease_fd;               /* the lease we hold, or -1 */
    double renewed;             /* bw_now_ms() of the last renewal */
    /* Renews the lease while the loop is busy booting or dumping (it cannot tick). */
    pthread_t renewer;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool renewing, stop;
    int trouble, trouble_errno; /* the first failed renewal (store.c renew), said later */
};

/* Use root as the store for key. 0, or -1 with the reason in err. */
int bw_store_open(struct bw_store *s, const char *root, const char *key, double term_s,
                  char *err, size_t errlen);

/* At start, before any replica: keep the local image if it can run here, else drop it;
 * without one, fetch a compatible, verified copy from the store (if s->on). */
void bw_store_pick_image(struct bw_store *s, struct bw_ckpt *ck);

/* Whether this machine may dump the key now: always without a store; with one, only
 * while holding its lease (taken here if free or expired), and not once another machine
 * published an image this one can use (its next start restores that). */
bool bw_store_may_dump(struct bw_store *s);
/* Give the lease up (no-op if not held, or handed to a publisher). */
void bw_store_lease_release(struct bw_store *s);

/* After a successful dump into ck: copy the image to the store in a forked child (the
 * lease goes with it, and is released when the copy is in place). */
void bw_store_publish(struct bw_store *s, const struct bw_ckpt *ck);

/* Parse a lease file's text ("host=H\npid=N\nexpires=T\n"). 0, or -1 if malformed. */
int bw_lease_parse(const char *text, struct bw_lease *l);
/* Whether a lease with this expiry has expired at wall clock now. */
bool bw_lease_expired(const struct bw_lease *l, double now);

#endif
