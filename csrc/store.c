/* store.c - fetch from, lease in and publish to the shared store (store.h). */
#define _GNU_SOURCE
#include "store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

#define COPY_BLOCK (1 << 20)

static double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int bw_store_open(struct bw_store *s, const char *root, const char *key, double term_s,
                  char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    s->lease_fd = -1;
    snprintf(s->root, sizeof s->root, "%s", root);
    snprintf(s->key, sizeof s->key, "%s", key);
    snprintf(s->dir, sizeof s->dir, "%s/%s", root, key);
    snprintf(s->lease, sizeof s->lease, "%s/%s.lease", root, key);
    s->term_s = term_s;
    if (gethostname(s->host, sizeof s->host) < 0)
        snprintf(s->host, sizeof s->host, "unknown");
    s->host[strcspn(s->host, "/")] = '\0'; /* it becomes part of a file name */
    struct stat st;
    if ((mkdir(root, 0700) < 0 && errno != EEXIST) || stat(root, &st) < 0) {
        snprintf(err, errlen, "cannot use store %s: %s", root, strerror(errno));
        return -1;
    }
    /* Images hold whole process memories, as in the local cache. */
    if (!S_ISDIR(st.st_mode) || (st.st_mode & 022)) {
        snprintf(err, errlen, "refusing store %s: it must be a directory not writable by "
                 "group or others (mode is %03o)", root, st.st_mode & 0777);
        return -1;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->on = true;
    return 0;
}

/* ---- copying ------------------------------------------------------------------------- */

static void lease_tick(struct bw_store *s);

/* Move one file's bytes, COPY_BLOCK at a time so that s (may be NULL) can renew its lease
 * between blocks: a copy of a large image may outlast the term. copy_file_range keeps the
 * bytes in the kernel (one copy instead of two); where it is refused (file systems of
 * other kinds, old kernels) read/write do the same. */
static int copy_bytes(int in, int out, char *buf, struct bw_store *s) {
    bool in_kernel = true;
    for (;;) {
        ssize_t n = in_kernel ? copy_file_range(in, NULL, out, NULL, COPY_BLOCK, 0) : -1;
        if (n < 0 && in_kernel && (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
                                   errno == EOPNOTSUPP)) {
            in_kernel = false; /* nothing was copied by the refused call */
            continue;
        }
        if (!in_kernel && (n = read(in, buf, COPY_BLOCK)) > 0 &&
            bw_write_full(out, buf, (size_t)n) < 0)
            n = -1;
        if (n <= 0)
            return n < 0 ? -1 : 0;
        if (s)
            lease_tick(s);
    }
}

/* Copy one regular file, mode 0600; durable: fsync'd. A publication must survive a crash
 * of the store; a fetched copy need not, because every restore checks the image's sizes
 * and hashes again and discards one that does not match. */
static int copy_file(int sdir, int ddir, const char *name, char *buf, struct bw_store *s,
                     bool durable) {
    int in = openat(sdir, name, O_RDONLY | O_CLOEXEC);
    int out = in < 0 ? -1 : openat(ddir, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    int rc = in < 0 || out < 0 || copy_bytes(in, out, buf, s) < 0 ? -1 : 0;
    if (rc == 0 && durable && fsync(out) < 0)
        rc = -1;
    if (out >= 0 && close(out) < 0)
        rc = -1;
    if (in >= 0)
        close(in);
    return rc;
}

/* Copy the image directory src (files and the img/ subdirectory) into dst, which must
 * not exist. s: a publication under s's lease, made durable (copy_file says why only
 * then). 0, or -1 with err naming what failed. */
static int copy_tree(const char *src, const char *dst, int depth, char *buf, struct bw_store *s,
                     char *err, size_t errlen) {
    if (mkdir(dst, 0700) < 0) {
        snprintf(err, errlen, "cannot create %s: %s", dst, strerror(errno));
        return -1;
    }
    DIR *d = opendir(src);
    int ddir = open(dst, O_DIRECTORY | O_CLOEXEC), rc = d && ddir >= 0 ? 0 : -1;
    if (rc < 0)
        snprintf(err, errlen, "cannot open %s: %s", d ? dst : src, strerror(errno));
    struct dirent *e;
    while (rc == 0 && (e = readdir(d))) {
        struct stat st;
        if (e->d_name[0] == '.' || fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue;
        if (S_ISDIR(st.st_mode) && depth == 0) {
            char a[PATH_MAX + 600], b[PATH_MAX + 600];
            snprintf(a, sizeof a, "%s/%s", src, e->d_name);
            snprintf(b, sizeof b, "%s/%s", dst, e->d_name);
            rc = copy_tree(a, b, depth + 1, buf, s, err, errlen);
        } else if (S_ISREG(st.st_mode) && copy_file(dirfd(d), ddir, e->d_name, buf, s, s != NULL) < 0) {
            snprintf(err, errlen, "cannot copy %s/%s: %s", src, e->d_name, strerror(errno));
            rc = -1;
        }
    }
    if (rc == 0 && s && fsync(ddir) < 0) { /* the names, not only the data, must survive */
        snprintf(err, errlen, "cannot fsync %s: %s", dst, strerror(errno));
        rc = -1;
    }
    if (d)
        closedir(d);
    if (ddir >= 0)
        close(ddir);
    return rc;
}

static int copy_image(const char *src, const char *dst, struct bw_store *s, char *err,
                      size_t errlen) {
    char *buf = malloc(COPY_BLOCK);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = copy_tree(src, dst, 0, buf, s, err, errlen);
    free(buf);
    return rc;
}

static int fsync_dir(const char *path) {
    int fd = open(path, O_DIRECTORY | O_CLOEXEC);
    int rc = fd >= 0 && fsync(fd) == 0 ? 0 : -1;
    if (fd >= 0)
        close(fd);
    return rc;
}

/* ---- picking the image at start -------------------------------------------------------- */

/* Whether the image in dir can run here: 1 yes, 0 no (said why, and then: what is done
 * about it), -1 no record (said). gpu: compare the GPU field too. A local image's GPU state is left to the restore's own
 * check (cuda_ckpt.c: model, count and CUDA version, before CRIU runs), which says more
 * precisely what differs; a store's is checked here, so that no unusable image is copied. */
static int image_runs_here(const struct bw_ckpt *ck, const char *dir, const char *where,
                           bool gpu, const char *then) {
    struct bw_compat img, here = ck->compat;
    char why[2048];
    if (bw_ckpt_compat_of(dir, &img, why, sizeof why) < 0) {
        bw_warn("checkpoint %.12s %s cannot be checked for compatibility: %s", ck->key, where,
                why);
        return -1;
    }
    if (!gpu)
        img.gpu[0] = '\0';
    if (img.gpu[0])
        bw_compat_detect_gpu(&here);
    if (bw_compat_check(&img, &here, why, sizeof why))
        return 1;
    bw_warn("checkpoint %.12s %s was made on an incompatible machine (%s); %s", ck->key, where,
            why, then);
    return 0;
}

/* The check of the store's copy (sizes and XXH3 of every file), run beside the copy. */
struct source_check {
    struct bw_ckpt ck; /* dir: the store's image */
    unsigned long long bytes;
    int rc;
    char err[1024];
};

static void *source_check_main(void *arg) {
    struct source_check *sc = arg;
    sc->rc = bw_ckpt_check(&sc->ck, &sc->bytes, sc->err, sizeof sc->err);
    return NULL;
}

/* Copy the store's image into the local cache: into a temporary directory, then renamed
 * into place, once the store's files proved sound (sizes and XXH3 of every file, page
 * data included). The check reads the store's files on the other core while the kernel
 * copies them (copy_bytes): it costs no time of its own. What the copy wrote is checked
 * again by every restore, as any local image is. */
static void fetch(struct bw_store *s, struct bw_ckpt *ck) {
    struct source_check sc = {.ck = *ck};
    snprintf(sc.ck.dir, sizeof sc.ck.dir, "%s", s->dir);
    pthread_t checker;
    bool beside = pthread_create(&checker, NULL, source_check_main, &sc) == 0;
    char err[1024];
    struct bw_ckpt tmp = *ck;
    snprintf(tmp.dir, sizeof tmp.dir, "%s/.tmp-%s-%d", ck->root, ck->key, (int)getpid());
    bw_rm_rf(tmp.dir);
    double t0 = bw_now_ms();
    int copied = copy_image(s->dir, tmp.dir, NULL, err, sizeof err);
    if (beside)
        pthread_join(checker, NULL);
    else
        source_check_main(&sc);
    if (copied < 0) {
        bw_warn("cannot fetch checkpoint %.12s from the store (%s); booting cold", ck->key, err);
    } else if (sc.rc < 0) {
        bw_warn("checkpoint %.12s in the store is corrupt (%s): not using it; booting cold "
                "(the machine that checkpoints next replaces it)", ck->key, sc.err);
        s->unusable = s->corrupt = true;
    } else if (rename(tmp.dir, ck->dir) < 0) {
        bw_warn("cannot install %s: %s; booting cold", ck->dir, strerror(errno));
    } else {
        bw_info("checkpoint fetched from store: %s -> %s (%.1f MiB in %.0f ms)", s->dir,
                ck->dir, (double)sc.bytes / 1048576.0, bw_now_ms() - t0);
        return;
    }
    bw_rm_rf(tmp.dir);
}

static bool store_has_image(const struct bw_store *s) {
    char p[PATH_MAX + 300];
    snprintf(p, sizeof p, "%s/restore.msgpack", s->dir);
    return access(p, F_OK) == 0;
}

void bw_store_pick_image(struct bw_store *s, struct bw_ckpt *ck) {
    if (bw_ckpt_exists(ck)) {
        /* Unreadable: bw_ckpt_load judges it at the restore (and discards it), as always. */
        if (image_runs_here(ck, ck->dir, "in the local cache", false,
                            s->on ? "discarding it, looking in the store"
                                  : "discarding it; booting cold") != 0)
            return;
        bw_ckpt_discard(ck); /* this machine's cache: make room for an image that runs */
    }
    if (!s->on || !store_has_image(s))
        return;
    if (image_runs_here(ck, s->dir, "in the store", true, "booting cold") > 0)
        fetch(s, ck);
    else
        s->unusable = true;
}

/* ---- the lease ------------------------------------------------------------------------- */

int bw_lease_parse(const char *text, struct bw_lease *l) {
    memset(l, 0, sizeof *l);
    int got = 0;
    for (const char *p = text; *p; p += strcspn(p, "\n"), p += *p == '\n') {
        size_t len = strcspn(p, "\n");
        char *end;
        if (strncmp(p, "host=", 5) == 0 && len > 5 && len - 5 < sizeof l->host) {
            memcpy(l->host, p + 5, len - 5);
            got |= 1;
        } else if (strncmp(p, "pid=", 4) == 0) {
            l->pid = strtol(p + 4, &end, 10);
            got |= (end == p + len && l->pid > 0) ? 2 : 0;
        } else if (strncmp(p, "expires=", 8) == 0) {
            l->expires = strtod(p + 8, &end);
            got |= (end == p + len && end > p + 8) ? 4 : 0;
        }
    }
    return got == 7 ? 0 : -1;
}

bool bw_lease_expired(const struct bw_lease *l, double now) { return now >= l->expires; }

/* Read the lease at path. One that cannot be parsed is being written (O_EXCL created
 * it empty; its holder fills it at once) or damaged: read again a few times, then its
 * expiry is its mtime plus the term. 0, or -1 (errno). */
static int read_lease(const char *path, double term_s, struct bw_lease *l) {
    char buf[512];
    struct stat st;
    int parsed = -1;
    for (int tries = 0; parsed < 0 && tries < 5; tries++) {
        if (tries)
            usleep(10000);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -1;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        int rc = fstat(fd, &st);
        close(fd);
        if (rc < 0)
            return -1;
        buf[n > 0 ? n : 0] = '\0';
        parsed = bw_lease_parse(buf, l);
    }
    if (parsed < 0) {
        snprintf(l->host, sizeof l->host, "?");
        l->pid = 0;
        l->expires = (double)st.st_mtim.tv_sec + st.st_mtim.tv_nsec / 1e9 + term_s;
    }
    return 0;
}

/* Write our lease through the fd we hold: after someone broke it and made their own,
 * our writes go to the old inode and never touch theirs. */
static int write_lease(struct bw_store *s) {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "host=%s\npid=%d\nexpires=%.3f\n", s->host, (int)getpid(),
                     wall_s() + s->term_s);
    s->renewed = bw_now_ms();
    if (pwrite(s->lease_fd, buf, (size_t)n, 0) != n || ftruncate(s->lease_fd, n) < 0 ||
        fsync(s->lease_fd) < 0)
        return -1;
    return 0;
}

/* Whether the lease file at its path is still the one we hold. */
static bool lease_ours(const struct bw_store *s) {
    struct stat a, b;
    return fstat(s->lease_fd, &a) == 0 && stat(s->lease, &b) == 0 && a.st_ino == b.st_ino &&
           a.st_dev == b.st_dev;
}

/* 0, -1 the write failed (errno), -2 another machine broke the lease. */
static int renew(struct bw_store *s) {
    if (write_lease(s) < 0)
        return -1;
    return lease_ours(s) ? 0 : -2;
}

static void say_trouble(const struct bw_store *s, int trouble, int err) {
    if (trouble == -1)
        bw_warn("cannot renew the store lease %s: %s", s->lease, strerror(err));
    else if (trouble == -2)
        bw_warn("the store lease %s was broken by another machine (this one did not renew it "
                "in time: clocks apart, or the store stalled)", s->lease);
}

/* The publishing child renews between blocks, and may log: it has no loop. */
static void lease_tick(struct bw_store *s) {
    if (s->lease_fd < 0 || bw_now_ms() - s->renewed <= s->term_s * 1000 / 3)
        return;
    int r = renew(s);
    if (r < 0 && !s->trouble)
        say_trouble(s, r, errno);
    s->trouble = s->trouble ? s->trouble : r;
}

static void *renewer_main(void *arg) {
    struct bw_store *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        long long ns = until.tv_nsec + (long long)(s->term_s * 1e9 / 3);
        until.tv_sec += (time_t)(ns / 1000000000LL);
        until.tv_nsec = (long)(ns % 1000000000LL);
        if (pthread_cond_timedwait(&s->cv, &s->mu, &until) != ETIMEDOUT || s->stop)
            continue;
        int r = renew(s);
        if (r < 0 && !s->trouble) { /* said by the loop's thread: logging is not thread-safe */
            s->trouble = r;
            s->trouble_errno = errno;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void renewer_stop(struct bw_store *s) {
    if (!s->renewing)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->renewer, NULL);
    s->renewing = false;
    say_trouble(s, s->trouble, s->trouble_errno);
}

/* An expired lease: move it aside (rename is atomic, so of two machines breaking it
 * one wins), and check that what we moved is the expired lease we judged, not a fresh
 * one another machine made in between; a fresh one is put back. */
static void break_lease(struct bw_store *s, const struct bw_lease *old) {
    char aside[PATH_MAX + 600];
    struct bw_lease l;
    snprintf(aside, sizeof aside, "%s.broken-%s-%d", s->lease, s->host, (int)getpid());
    if (rename(s->lease, aside) < 0)
        return; /* another machine broke or released it first */
    if (read_lease(aside, s->term_s, &l) == 0 && !bw_lease_expired(&l, wall_s())) {
        if (link(aside, s->lease) < 0 && errno != EEXIST)
            bw_warn("cannot put back the lease of host %s pid %ld: %s", l.host, l.pid,
                    strerror(errno));
    } else {
        bw_info("breaking the expired store lease of host %s pid %ld (expired %.1fs ago)",
                old->host, old->pid, wall_s() - old->expires);
    }
    unlink(aside);
}

/* What a holder whose lease expired left: holding the lease now, no one else may be
 * publishing this key, so every .tmp-<key>-<host>-<pid> is abandoned. */
static void remove_abandoned(const struct bw_store *s) {
    char prefix[200], path[PATH_MAX + 600];
    snprintf(prefix, sizeof prefix, ".tmp-%s-", s->key);
    DIR *d = opendir(s->root);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", s->root, e->d_name);
        bw_info("removing %s: a publication whose lease expired", path);
        bw_rm_rf(path);
    }
    if (d)
        closedir(d);
}

/* 1 taken, 0 held by another (who), -1 error. */
static int lease_take(struct bw_store *s, struct bw_lease *who) {
    for (int tries = 0; tries < 3; tries++) {
        int fd = open(s->lease, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd >= 0) {
            s->lease_fd = fd;
            if (write_lease(s) < 0) {
                bw_warn("cannot write the store lease %s: %s", s->lease, strerror(errno));
                bw_store_lease_release(s);
                return -1;
            }
            return 1;
        }
        if (errno != EEXIST) {
            bw_warn("cannot create the store lease %s: %s", s->lease, strerror(errno));
            return -1;
        }
        if (read_lease(s->lease, s->term_s, who) < 0)
            continue; /* released meanwhile */
        if (!bw_lease_expired(who, wall_s()))
            return 0;
        break_lease(s, who);
    }
    return 0;
}

bool bw_store_may_dump(struct bw_store *s) {
    struct bw_lease who;
    if (!s->on || s->lease_fd >= 0)
        return true;
    int rc = lease_take(s, &who);
    if (rc == 0)
        bw_info("another machine (host %s pid %ld) is checkpointing %s; serving cold", who.host,
                who.pid, s->key);
    if (rc < 0) /* a read-only store still feeds this machine; its own image stays here */
        bw_warn("checkpointing into the local cache only: no lease, no publication");
    if (rc <= 0)
        return rc < 0;
    if (!s->unusable && store_has_image(s)) { /* published since this start looked */
        bw_info("checkpoint %.12s is in the store now: serving cold, the next start restores it",
                s->key);
        bw_store_lease_release(s);
        return false;
    }
    remove_abandoned(s);
    s->stop = false;
    s->trouble = 0;
    int err = pthread_create(&s->renewer, NULL, renewer_main, s);
    s->renewing = err == 0;
    if (err)
        bw_warn("cannot start renewing the store lease (%s): it lapses after %gs, and another "
                "machine may then dump this key too", strerror(err), s->term_s);
    return true;
}

void bw_store_lease_release(struct bw_store *s) {
    if (!s->on || s->lease_fd < 0)
        return;
    renewer_stop(s);
    if (lease_ours(s))
        unlink(s->lease);
    close(s->lease_fd);
    s->lease_fd = -1;
}

/* ---- publishing -------------------------------------------------------------------------- */

/* The store's image failed its check here: under our lease, move it out of the way of
 * the new one. Renamed first, removed after, so that no machine fetching it meanwhile
 * sees a half-deleted directory by its key's name; a machine whose check passed it
 * (a transient read error here) loses nothing: the new image is as good. */
static void set_aside_corrupt(const struct bw_store *s) {
    char aside[PATH_MAX + 600];
    snprintf(aside, sizeof aside, "%s/.corrupt-%s-%s-%d", s->root, s->key, s->host,
             (int)getpid());
    if (rename(s->dir, aside) < 0) {
        if (errno != ENOENT)
            bw_warn("cannot move the corrupt checkpoint %s aside: %s", s->dir, strerror(errno));
        return;
    }
    bw_rm_rf(aside);
    bw_info("removed the corrupt checkpoint %.12s from the store", s->key);
}

/* In the child: copy, then rename into place (first publisher wins), then release. */
static int publish_child(struct bw_store *s, const struct bw_ckpt *ck) {
    char tmp[PATH_MAX + 600], err[1024];
    snprintf(tmp, sizeof tmp, "%s/.tmp-%s-%s-%d", s->root, s->key, s->host, (int)getpid());
    double t0 = bw_now_ms();
    int rc = copy_image(ck->dir, tmp, s, err, sizeof err);
    if (rc == 0 && s->corrupt)
        set_aside_corrupt(s);
    if (rc == 0 && rename(tmp, s->dir) < 0) {
        if (errno == EEXIST || errno == ENOTEMPTY) {
            bw_info("the store already has checkpoint %.12s: keeping it", s->key);
        } else {
            snprintf(err, sizeof err, "cannot rename %.400s to %.400s: %s", tmp, s->dir,
                     strerror(errno));
            rc = -1;
        }
    } else if (rc == 0) {
        if (fsync_dir(s->root) < 0) /* in place, but a crash of the store may lose the name */
            bw_warn("cannot fsync %s: %s", s->root, strerror(errno));
        bw_info("checkpoint published to store: %s (%.0f ms)", s->dir, bw_now_ms() - t0);
    }
    if (rc < 0)
        bw_warn("cannot publish checkpoint %.12s to the store: %s", s->key, err);
    bw_rm_rf(tmp); /* the copy that lost, or failed */
    bw_store_lease_release(s);
    return rc;
}

void bw_store_publish(struct bw_store *s, const struct bw_ckpt *ck) {
    if (!s->on || s->lease_fd < 0)
        return;
    if (!s->corrupt && store_has_image(s)) { /* one it could not use (else it was fetched) */
        bw_info("the store already has checkpoint %.12s, which this machine could not use "
                "(said above): keeping this one local", s->key);
        bw_store_lease_release(s);
        return;
    }
    renewer_stop(s); /* no thread may hold the mutex across fork */
    pid_t pid = fork();
    if (pid < 0) {
        bw_warn("cannot fork to publish to the store: %s", strerror(errno));
        bw_store_lease_release(s);
        return;
    }
    if (pid > 0) { /* the child holds the lease now; the supervisor reaps it */
        close(s->lease_fd);
        s->lease_fd = -1;
        bw_info("publishing checkpoint %.12s to the store (pid %d)", s->key, (int)pid);
        return;
    }
    /* As Redis's BGSAVE child: the loop's handlers and log queue are the parent's. */
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    bw_log_set_sink(NULL);
    if (s->lease_fd > 3)
        close_range(3, (unsigned)s->lease_fd - 1, 0);
    close_range((unsigned)s->lease_fd + 1, ~0U, 0);
    _exit(publish_child(s, ck) < 0 ? 1 : 0);
}
