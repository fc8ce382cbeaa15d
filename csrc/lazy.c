/* lazy.c - restore with CRIU's lazy pages: serve before all memory is in.
 *
 * An eager restore copies every page of the image into the new process before it runs,
 * so its time grows with the image (a model of hundreds of MB). With lazy pages, CRIU
 * restores the process with its anonymous memory registered with userfaultfd and a
 * second criu, the page daemon (`criu lazy-pages`), answers each fault from the image
 * and copies the rest in the background; the daemon exits 0 once every page is in.
 *
 * libcriu has no setter for lazy pages, so both run as the criu command line: the
 * daemon first (it listens on lazy-pages.socket in the shared work directory), then
 * `criu restore --lazy-pages --restore-detached`; the restored host is reparented to us
 * (the supervisor is a child subreaper) and reaped like any replica.
 *
 * Correctness rule: a page the daemon never delivered must never be read. When the last
 * holder of a userfaultfd closes it, the kernel unregisters the memory and later faults
 * fill missing pages with zeros: a daemon that dies would leave the process running on
 * zeroed memory (seen here: "free(): invalid pointer", then SIGSEGV). So once the
 * restore returns, the supervisor holds its own copies of the daemon's userfaultfds
 * (pidfd_getfd): if the daemon dies, faults stay blocked instead, the supervisor kills
 * the replica (replica.c, bw_replica_pager_exited), lets the copies go, and restores
 * eagerly from then on. A daemon that dies while the restore is still running makes
 * the restore fail (wait_restore) and the half-restored process is killed. */
#define _GNU_SOURCE
#include "lazy.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "job.h"
#include "log.h"
#include "thp.h"
#include "util.h"
#include "workingset.h"

/* fd numbers the restore criu gets the host's fresh pipes and control socket at. */
enum { FD_OUT = 10, FD_ERR = 11, FD_CTL = 12 };

int bw_lazy_supported(void) {
    static int known = -1;
    if (known >= 0)
        return known;
    /* What `criu check --feature uffd-noncoop` asks the kernel, asked directly: it costs
     * no criu process and cannot hang. A criu built without lazy pages fails at the
     * daemon's start instead, and that restore is done eagerly. */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
                                         UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE};
    known = fd >= 0 && ioctl(fd, UFFDIO_API, &api) == 0;
    if (fd >= 0)
        close(fd);
    return known;
}

/* fork + exec criu with argv; stdin/stdout/stderr on /dev/null (criu logs to -o);
 * `keep` fds (dup'ed to FD_OUT..FD_CTL first) stay open. Returns the pid or -1. */
static pid_t spawn_criu(char **argv, const int keep[3]) {
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    int null = open("/dev/null", O_RDWR);
    if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
        _exit(127);
    if (keep) {
        int tmp[3];
        for (int i = 0; i < 3; i++) /* above FD_CTL first: a keep fd may sit at 10..12 */
            tmp[i] = fcntl(keep[i], F_DUPFD, FD_CTL + 1);
        if (tmp[0] < 0 || tmp[1] < 0 || tmp[2] < 0 || dup2(tmp[0], FD_OUT) < 0 ||
            dup2(tmp[1], FD_ERR) < 0 || dup2(tmp[2], FD_CTL) < 0)
            _exit(127);
    }
    for (int fd = 3; fd < 1024; fd++)
        if (!keep || fd < FD_OUT || fd > FD_CTL)
            close(fd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execv(argv[0], argv);
    _exit(127);
}

/* Wait for the restoring criu until deadline (bw_now_ms), watching the page daemon:
 * a daemon that fails meanwhile leaves the restore hanging on pages that never come, so
 * criu is killed then. One that exits 0 has delivered every page (lz->pager becomes 0).
 * criu's exit status, or -1 (why in *failed). */
static int wait_restore(pid_t criu, struct bw_lazy *lz, double deadline, const char **failed) {
    int status;
    for (;;) {
        pid_t r = waitpid(criu, &status, WNOHANG);
        if (r == criu)
            return status;
        if (r < 0 && errno != EINTR) {
            *failed = "cannot wait for criu";
            return -1;
        }
        int ds;
        if (lz->pager > 0 && waitpid(lz->pager, &ds, WNOHANG) == lz->pager) {
            lz->pager = 0;
            if (!WIFEXITED(ds) || WEXITSTATUS(ds) != 0)
                *failed = "the page daemon exited during the restore";
        }
        if (!*failed && bw_now_ms() > deadline)
            *failed = "timed out";
        if (*failed) {
            kill(criu, SIGKILL);
            waitpid(criu, &status, 0);
            return -1;
        }
        struct timespec ts = {0, 500 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* The daemon listens once its socket exists; a restore started earlier fails. */
static int wait_daemon_ready(const struct bw_lazy *lz, double deadline, char *err, size_t errlen) {
    char sock[sizeof lz->workdir + 32];
    snprintf(sock, sizeof sock, "%s/lazy-pages.socket", lz->workdir);
    while (access(sock, F_OK) != 0) {
        int status;
        if (waitpid(lz->pager, &status, WNOHANG) == lz->pager) {
            snprintf(err, errlen, "criu lazy-pages exited at start; log: %s/lazy-pages.log",
                     lz->workdir);
            return -1;
        }
        if (bw_now_ms() > deadline) {
            snprintf(err, errlen, "criu lazy-pages did not start listening in time");
            return -1;
        }
        struct timespec ts = {0, 200 * 1000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* Take copies of every userfaultfd the daemon holds (one per restored process). */
static void hold_uffds(struct bw_lazy *lz) {
    char dir[64], path[64 + 256], target[64];
    snprintf(dir, sizeof dir, "/proc/%d/fd", (int)lz->pager);
    int pidfd = (int)syscall(SYS_pidfd_open, lz->pager, 0);
    DIR *d = pidfd >= 0 ? opendir(dir) : NULL;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL && lz->nuffd < BW_LAZY_MAX_UFFD) {
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n <= 0)
            continue;
        target[n] = '\0';
        if (strcmp(target, "anon_inode:[userfaultfd]") != 0)
            continue;
        int fd = (int)syscall(SYS_pidfd_getfd, pidfd, atoi(e->d_name), 0);
        if (fd >= 0)
            lz->uffd[lz->nuffd++] = fd;
    }
    if (d)
        closedir(d);
    if (pidfd >= 0)
        close(pidfd);
}

static void release_uffds(struct bw_lazy *lz) {
    for (int i = 0; i < lz->nuffd; i++)
        close(lz->uffd[i]);
    lz->nuffd = 0;
}

/* Processes with memory in the image: one mm-<pid>.img each, one userfaultfd each. */
static int image_processes(const char *imgdir) {
    DIR *d = opendir(imgdir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL)
        n += strncmp(e->d_name, "mm-", 3) == 0;
    if (d)
        closedir(d);
    return n;
}

/* The replica answers nothing before it gets "start", which is sent only after the
 * restore returns: so it is enough that, by then, we hold a copy of every restored
 * process's userfaultfd, or the daemon has exited 0 (every page in). The daemon may
 * not have received them yet (they travel from the restoring criu over a socket): wait.
 * 0, or -1 when the daemon exited otherwise or the deadline passed. */
static int hold_all_uffds(struct bw_lazy *lz, const char *imgdir, double deadline) {
    int want = image_processes(imgdir);
    for (;;) {
        int ds;
        if (lz->pager <= 0)
            return 0;
        if (waitpid(lz->pager, &ds, WNOHANG) == lz->pager) {
            lz->pager = 0;
            return WIFEXITED(ds) && WEXITSTATUS(ds) == 0 ? 0 : -1;
        }
        release_uffds(lz);
        hold_uffds(lz);
        if (lz->nuffd >= want || bw_now_ms() > deadline)
            return lz->nuffd >= want ? 0 : -1;
        struct timespec ts = {0, 500 * 1000};
        nanosleep(&ts, NULL);
    }
}

static pid_t read_pidfile(const char *path) {
    FILE *f = fopen(path, "r");
    long pid = 0;
    if (f) {
        if (fscanf(f, "%ld", &pid) != 1)
            pid = 0;
        fclose(f);
    }
    return (pid_t)pid;
}

/* The first lazy restore of an image logs every fault (-v4: `#PF at`), its working set. */
static int start_daemon(const struct bw_ckpt *c, struct bw_lazy *lz, const char *imgdir) {
    lz->ck = c;
    lz->record = !bw_ws_recorded(c->dir);
    /* Which image it serves, seen before it opens imgdir: one renamed into <key>/ in
     * between is then another image, and nothing is recorded (record_faults). */
    struct stat st;
    if (lz->record && stat(c->dir, &st) == 0) {
        lz->image_dev = st.st_dev;
        lz->image_ino = st.st_ino;
    } else {
        lz->record = false;
    }
    char level[16];
    snprintf(level, sizeof level, "-v%d", lz->record && c->log_level < 4 ? 4 : c->log_level);
    char *argv[] = {(char *)c->criu, "lazy-pages", "-D", (char *)imgdir, "-W", lz->workdir,
                    "-o", "lazy-pages.log", level, NULL};
    lz->pager = spawn_criu(argv, NULL);
    return lz->pager > 0 ? 0 : -1;
}

static int run_restore(const struct bw_ckpt *c, const struct bw_ckpt_image *img,
                       const char *imgdir, const int fds[3], struct bw_lazy *lz, pid_t *pid,
                       double deadline, char *err, size_t errlen) {
    char out[64], errk[64], ctl[64], pidfile[sizeof lz->workdir + 16];
    snprintf(out, sizeof out, "fd[%d]:pipe:[%lu]", FD_OUT, img->ids.out_ino);
    snprintf(errk, sizeof errk, "fd[%d]:pipe:[%lu]", FD_ERR, img->ids.err_ino);
    snprintf(ctl, sizeof ctl, "fd[%d]:socket:[%lu]", FD_CTL, img->ids.ctl_ino);
    snprintf(pidfile, sizeof pidfile, "%s/pid", lz->workdir);
    char *argv[24];
    int n = 0;
    char level[16];
    snprintf(level, sizeof level, "-v%d", c->log_level);
    char *fixed[] = {(char *)c->criu, "restore", "-D", (char *)imgdir, "-W", lz->workdir,
                     "-o", "restore.log", level, "--lazy-pages", "--restore-detached",
                     "--pidfile", pidfile, "--inherit-fd", out, "--inherit-fd", ctl};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++)
        argv[n++] = fixed[i];
    if (img->ids.err_ino != img->ids.out_ino) {
        argv[n++] = (char *)"--inherit-fd";
        argv[n++] = errk;
    }
    argv[n] = NULL;
    mode_t old = umask(077);
    pid_t criu = spawn_criu(argv, fds);
    umask(old);
    const char *failed = criu > 0 ? NULL : "cannot start criu";
    int status = criu > 0 ? wait_restore(criu, lz, deadline, &failed) : -1;
    *pid = read_pidfile(pidfile);
    if (failed && *pid > 0) { /* half restored, reparented to us with criu's death */
        kill(*pid, SIGKILL);  /* the init of its PID namespace: all of it goes */
        waitpid(*pid, NULL, 0);
    }
    if (failed) {
        snprintf(err, errlen, "criu restore --lazy-pages: %s (bound %gs); log: %s/restore.log",
                 failed, c->timeout_s, lz->workdir);
        return -1;
    }
    if (status != 0 || *pid <= 0) {
        snprintf(err, errlen, "criu restore --lazy-pages failed (status %d); log: %s/restore.log",
                 status, lz->workdir);
        return -1;
    }
    return 0;
}

int bw_lazy_restore(const struct bw_ckpt *c, struct bw_ckpt_image *img, int out_fd,
                    int err_fd, int ctl_fd, pid_t *pid, struct bw_lazy *lz, char *err,
                    size_t errlen) {
    char imgdir[PATH_MAX + 300];
    snprintf(imgdir, sizeof imgdir, "%s/img", c->dir);
    memset(lz, 0, sizeof *lz);
    char logs[PATH_MAX + 16];
    snprintf(logs, sizeof logs, "%.*s/.logs", PATH_MAX - 1, c->root);
    mkdir(logs, 0700); /* exists already after any dump or eager restore */
    if (snprintf(lz->workdir, sizeof lz->workdir, "%.*s/.logs/lazy-XXXXXX", PATH_MAX - 1,
                 c->root) >= (int)sizeof lz->workdir || !mkdtemp(lz->workdir)) {
        snprintf(err, errlen, "cannot create %s: %s", lz->workdir, strerror(errno));
        lz->workdir[0] = '\0';
        return -1;
    }
    /* The criu children inherit our environment: CRIU_FAULT was set by checkpoint.c. */
    double deadline = bw_now_ms() + c->timeout_s * 1000;
    int fds[3] = {out_fd, err_fd, ctl_fd};
    if (start_daemon(c, lz, imgdir) < 0) {
        snprintf(err, errlen, "cannot start criu lazy-pages: %s", strerror(errno));
        return -1;
    }
    double t0 = bw_now_ms();
    if (wait_daemon_ready(lz, deadline, err, errlen) < 0) {
        bw_lazy_abort(lz);
        return -1;
    }
    double t1 = bw_now_ms();
    if (run_restore(c, img, imgdir, fds, lz, pid, deadline, err, errlen) < 0) {
        bw_lazy_abort(lz);
        return -1;
    }
    double t2 = bw_now_ms();
    int held = hold_all_uffds(lz, imgdir, deadline);
    bw_debug("lazy restore: page daemon listening %.1f ms, criu restore %.1f ms, "
             "userfaultfds held %.1f ms", t1 - t0, t2 - t1, bw_now_ms() - t2);
    if (held < 0) {
        kill(*pid, SIGKILL);
        waitpid(*pid, NULL, 0);
        snprintf(err, errlen, "criu restore --lazy-pages: the page daemon exited during the "
                 "restore; log: %s/lazy-pages.log", lz->workdir);
        bw_lazy_abort(lz);
        return -1;
    }
    /* Hashing 2 GB of pages takes ~0.3 s, CRIU's lazy restore 20-50 ms: the check starts
     * now, below the replica's priority, and goes on while it serves; a mismatch
     * replaces it (bw_lazy_pages_corrupt). */
    bw_ckpt_verify_start(img->pages, true);
    lz->verify = img->pages;
    img->pages = NULL;
    lz->host = *pid;
    return 0;
}

bool bw_lazy_pages_corrupt(struct bw_lazy *lz, char *err, size_t errlen) {
    if (bw_ckpt_verify_poll(lz->verify) > 0)
        return false;
    return bw_ckpt_verify_end(&lz->verify, err, errlen) < 0;
}

void bw_lazy_abort(struct bw_lazy *lz) {
    bw_ckpt_verify_cancel(&lz->verify);
    release_uffds(lz);
    if (lz->pager > 0) {
        kill(lz->pager, SIGKILL);
        while (waitpid(lz->pager, NULL, 0) < 0 && errno == EINTR) {
        }
        lz->pager = 0;
    }
}

/* The end of a daemon's run that takes time, off the loop: on it, parsing the log and
 * rewriting and hashing the pagemaps would stall every replica's calls meanwhile. */
struct finish_job {
    struct bw_job job;
    struct bw_ckpt ck; /* a copy: the job reads nothing that the loop owns */
    bool record, keep; /* keep: BEAM_CRIU_LOG_LEVEL asked for the logs */
    dev_t image_dev;
    ino_t image_ino;
    char workdir[sizeof ((struct bw_lazy *)0)->workdir];
};

/* Record the daemon's faults into the image it served, if <key>/ still holds it: a dump
 * or a store fetch may have renamed a newer one into place meanwhile, whose pagemap
 * these faults do not describe. The image is written through a descriptor of the
 * directory just checked (/proc/self/fd/N resolves to it, whatever its name now): a
 * newer image renamed in after the check is never touched; the old one, on its way out,
 * is written instead. */
static void record_faults(const struct finish_job *f) {
    char log[sizeof f->workdir + 32], err[512] = "";
    snprintf(log, sizeof log, "%s/lazy-pages.log", f->workdir);
    int fd = open(f->ck.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_dev != f->image_dev ||
        st.st_ino != f->image_ino) {
        bw_info("working set not recorded: %s no longer holds the image this lazy restore "
                "served (a newer one was published meanwhile)", f->ck.dir);
    } else {
        struct bw_ckpt c = f->ck;
        snprintf(c.dir, sizeof c.dir, "/proc/self/fd/%d", fd);
        if (bw_ws_record(&c, log, err, sizeof err) < 0)
            bw_warn("working set not recorded (%s); lazy restores fault every page in", err);
    }
    if (fd >= 0)
        close(fd);
}

static void finish_work(struct bw_job *j) {
    struct finish_job *f = (struct finish_job *)j;
    if (f->record)
        record_faults(f);
    if (!f->keep)
        bw_rm_rf(f->workdir); /* the socket, logs, pidfile, criu's stats: the log is read */
}

static void finish_done(struct bw_job *j) { free(j); }

void bw_lazy_finished(struct bw_lazy *lz, uv_loop_t *loop) {
    lz->pager = 0;
    release_uffds(lz); /* first: MADV_COLLAPSE skips memory still registered with them */
    if (lz->host > 0)
        bw_thp_collapse_async(lz->host);
    lz->host = 0;
    struct finish_job *f = calloc(1, sizeof *f);
    if (!f) {
        bw_warn("working set not recorded: out of memory");
        bw_rm_rf(lz->workdir);
    } else {
        f->job.work = finish_work;
        f->job.done = finish_done;
        f->record = lz->record;
        f->keep = lz->ck && lz->ck->keep_logs;
        if (lz->record)
            f->ck = *lz->ck;
        f->image_dev = lz->image_dev;
        f->image_ino = lz->image_ino;
        memcpy(f->workdir, lz->workdir, sizeof f->workdir);
        if (!loop || bw_job_start(loop, &f->job) < 0) { /* off the loop, or no pool: here */
            finish_work(&f->job);
            finish_done(&f->job);
        }
    }
    lz->record = false;
    lz->workdir[0] = '\0';
}
