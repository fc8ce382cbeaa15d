/* thp.c - huge pages for a restored replica.
 *
 * Restored memory comes back in 4 KiB pages, whatever MADV_HUGEPAGE the process had set
 * (numpy sets it on large arrays): CRIU's restorer reads all page data with one preadv
 * into freshly mapped memory, and a lazy restore's page daemon fills it with UFFDIO_COPY,
 * which installs 4 KiB pages. Seen here with the 500 MB app: AnonHugePages 0 kB after an
 * eager restore and after a complete lazy one. With THP at `madvise`, khugepaged would
 * take minutes to collapse them, if ever. MADV_COLLAPSE (Linux 6.1), applied from the
 * supervisor with process_madvise (once every page is in, for a lazy restore), collapses
 * them now, without the replica's help and whatever the THP sysfs settings other than
 * `never`: 0.3-1.8 s of one core per 500 MiB here, at nice 19 while the replica serves. */
#define _GNU_SOURCE
#include "thp.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define HUGE (2ul << 20)

struct collapse {
    pid_t pid;
    int pidfd; /* the replica, not whoever gets its pid after it exits */
};

static unsigned long long anon_huge_kib(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
    return bw_proc_sum(path, "AnonHugePages: %llu");
}

/* Collapse one "lo-hi rw-p off dev inode [path]" line of /proc/PID/maps if it is
 * private anonymous memory (no path, or the heap) holding at least one aligned 2 MiB.
 * Returns the bytes asked for, 0 if skipped or refused. */
static unsigned long collapse_line(int pidfd, const char *line) {
    unsigned long lo, hi;
    char perms[8], path[256] = "";
    if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %255s", &lo, &hi, perms, path) < 3 ||
        strncmp(perms, "rw-p", 4) != 0 || (path[0] && strcmp(path, "[heap]") != 0))
        return 0;
    lo = (lo + HUGE - 1) & ~(HUGE - 1);
    hi &= ~(HUGE - 1);
    if (hi <= lo)
        return 0;
    struct iovec iov = {.iov_base = (void *)lo, .iov_len = hi - lo};
    /* EINVAL for a region that cannot have huge pages (VM_NOHUGEPAGE, special): skip. */
    long r = syscall(SYS_process_madvise, pidfd, &iov, 1, MADV_COLLAPSE, 0);
    return r < 0 ? 0 : hi - lo;
}

static void *collapse_main(void *arg) {
    struct collapse *c = arg;
    setpriority(PRIO_PROCESS, (id_t)gettid(), 19); /* best effort: serving comes first */
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)c->pid);
    double t0 = bw_now_ms();
    unsigned long long before = anon_huge_kib(c->pid), asked = 0;
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f))
        asked += collapse_line(c->pidfd, line);
    if (f)
        fclose(f);
    bw_info("pid %d: MADV_COLLAPSE of %.0f MiB of anonymous memory in %.0f ms: AnonHugePages "
            "%llu -> %llu kB", (int)c->pid, asked / 1048576.0, bw_now_ms() - t0, before,
            anon_huge_kib(c->pid));
    close(c->pidfd);
    free(c);
    return NULL;
}

void bw_thp_collapse_async(pid_t pid) {
    struct collapse *c = malloc(sizeof *c);
    pthread_t t;
    int fd = c ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
    if (fd < 0) {
        bw_warn("pid %d: not collapsing its memory into huge pages: %s", (int)pid, strerror(errno));
        free(c);
        return;
    }
    *c = (struct collapse){.pid = pid, .pidfd = fd};
    int rc = pthread_create(&t, NULL, collapse_main, c);
    if (rc != 0) {
        bw_warn("pid %d: not collapsing its memory into huge pages: %s", (int)pid, strerror(rc));
        close(fd);
        free(c);
        return;
    }
    pthread_detach(t);
}
