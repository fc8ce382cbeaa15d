/* lazy.h - restore with CRIU lazy pages and a page daemon (lazy.c). */
#ifndef BW_LAZY_H
#define BW_LAZY_H

#include <limits.h>
#include <stdbool.h>
#include <sys/types.h>
#include <uv.h>

#include "checkpoint.h"

#define BW_LAZY_MAX_UFFD 8

struct bw_lazy {
    pid_t pager;              /* the criu lazy-pages daemon, 0 when none */
    int uffd[BW_LAZY_MAX_UFFD]; /* our copies of its userfaultfds (lazy.c says why) */
    int nuffd;
    struct bw_ckpt_verify *verify; /* the page data's XXH3 check, still running */
    const struct bw_ckpt *ck;      /* the image's, to record its working set in */
    bool record;                   /* the daemon logs its faults: the working set */
    dev_t image_dev;               /* the image it serves (its <key>/ directory), */
    ino_t image_ino;               /* seen before it opened it */
    pid_t host;                    /* the restored host, once restored */
    char workdir[PATH_MAX + 32]; /* its socket and logs; "" once removed */
};

/* Whether the kernel offers what lazy restore needs: non-cooperative userfaultfd
 * (asked once, then cached). */
int bw_lazy_supported(void);
/* Restore with lazy pages; the page daemon keeps running (lz->pager) until every page
 * is in (lz->pager is 0 if it was already done). 0, or -1 with a reason (nothing left
 * running). */
int bw_lazy_restore(const struct bw_ckpt *c, struct bw_ckpt_image *img, int out_fd,
                    int err_fd, int ctl_fd, pid_t *pid, struct bw_lazy *lz, char *err,
                    size_t errlen);
/* Kill and reap the page daemon (its logs stay for diagnosis); let its userfaultfds go;
 * stop checking the page data. Call it once the restored process is dead. */
void bw_lazy_abort(struct bw_lazy *lz);
/* The daemon exited 0 (reaped by the caller): let its userfaultfds go; collapse the
 * host's memory, all 4 KiB pages so far, into huge pages (thp.c); then record the
 * image's working set if this restore was the one to (workingset.c) and remove the
 * daemon's work directory. Those last take time (the log is MBs): a job on loop's
 * thread pool (job.h), or done here when loop is NULL (the caller is off the loop). */
void bw_lazy_finished(struct bw_lazy *lz, uv_loop_t *loop);
/* Whether the page data's check, which goes on while the replica serves, found it
 * corrupt (err names the file). Poll it; the check's state is freed when it is done. */
bool bw_lazy_pages_corrupt(struct bw_lazy *lz, char *err, size_t errlen);

#endif
