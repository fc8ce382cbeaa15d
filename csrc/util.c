/* util.c - clock, ids, full reads/writes and file-tree removal. */
#define _GNU_SOURCE
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

double bw_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* splitmix64: ids need uniqueness, not cryptographic strength, and a syscall per
 * request would cost more than the rest of the id. Seeded from the kernel. */
static uint64_t id_state;
static int id_seeded;

void bw_id_reseed(void) {
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)getpid();
    }
    id_state = seed;
    id_seeded = 1;
}

static uint64_t id_next(void) {
    uint64_t z = (id_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void bw_id_new(char out[BW_ID_LEN]) {
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    if (!id_seeded)
        bw_id_reseed();
    uint64_t a = id_next(), c = id_next();
    for (int i = 0; i < 8; i++) {
        b[i] = (unsigned char)(a >> (8 * i));
        b[8 + i] = (unsigned char)(c >> (8 * i));
    }
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    int o = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[b[i] >> 4];
        out[o++] = hex[b[i] & 15];
    }
    out[o] = '\0';
}

int bw_read_full(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0) {
            errno = EPIPE;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

int bw_write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

void bw_describe_status(int status, char *buf, size_t cap) {
    if (WIFSIGNALED(status))
        snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
}

bool bw_window_admit(double *times, int *n, int max, double window_ms, double now) {
    int keep = 0;
    for (int i = 0; i < *n; i++)
        if (now - times[i] < window_ms)
            times[keep++] = times[i];
    *n = keep;
    if (keep >= max)
        return false;
    times[(*n)++] = now;
    return true;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void *bw_read_file(const char *path, size_t max, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    char *buf = NULL;
    if (fd >= 0 && fstat(fd, &st) == 0 && (size_t)st.st_size < max) {
        buf = malloc((size_t)st.st_size + 1);
        if (buf && bw_read_full(fd, buf, (size_t)st.st_size) < 0) {
            free(buf);
            buf = NULL;
        }
        if (buf) {
            buf[st.st_size] = '\0';
            *len = (size_t)st.st_size;
        }
    }
    if (fd >= 0)
        close(fd);
    return buf;
}

int bw_write_replace(const char *path, const void *buf, size_t len) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int rc = fd >= 0 ? bw_write_full(fd, buf, len) : -1;
    if (rc == 0 && fsync(fd) < 0)
        rc = -1;
    if (fd >= 0 && close(fd) < 0)
        rc = -1;
    if (rc == 0 && rename(tmp, path) < 0)
        rc = -1;
    if (rc < 0) {
        int saved = errno;
        unlink(tmp);
        errno = saved;
    }
    return rc;
}

void bw_rm_rf(const char *path) { nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static bool pid_gone(long pid) {
    return pid == (long)getpid() || (kill((pid_t)pid, 0) < 0 && errno == ESRCH);
}

/* Whether dir/name, a directory of this user, is held by no process: its maker's flock
 * went with it. A pid says the same only within one PID namespace: containers that share
 * /tmp see each other's directories but not each other's processes. */
static bool unheld(int dirfd, const char *name) {
    struct stat st;
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    bool free_ = fd >= 0 && fstat(fd, &st) == 0 && st.st_uid == geteuid() &&
                 flock(fd, LOCK_EX | LOCK_NB) == 0;
    if (fd >= 0)
        close(fd);
    return free_;
}

/* Removes dir's <prefix><pid>-… directories (and the .<prefix>… ones not yet renamed)
 * whose maker is gone: its pid runs no more (or is ours: an earlier process of the same
 * pid made it) and nothing holds its lock. Directories of makers older than the lock
 * have only the pid to go by. */
static void rm_dead_dirs(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    if (!d)
        return;
    size_t plen = strlen(prefix);
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *name = e->d_name + (e->d_name[0] == '.');
        char *end;
        if (strncmp(name, prefix, plen) != 0)
            continue;
        long pid = strtol(name + plen, &end, 10);
        if (end == name + plen || *end != '-' || pid <= 0 || !pid_gone(pid) ||
            !unheld(dirfd(d), e->d_name))
            continue;
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) < (int)sizeof path)
            bw_rm_rf(path);
    }
    closedir(d);
}

int bw_private_dir(const char *dir, const char *prefix, char *path, size_t cap) {
    char tmp[4096];
    rm_dead_dirs(dir, prefix); /* those of processes killed with SIGKILL */
    /* Made under a hidden name and locked before it takes its own: a sweeper in another
     * PID namespace never sees it unheld. */
    if (snprintf(tmp, sizeof tmp, "%s/.%s%d-XXXXXX", dir, prefix, (int)getpid()) >=
            (int)sizeof tmp || !mkdtemp(tmp)) {
        return -1;
    }
    int fd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    const char *suffix = strrchr(tmp, '-');
    if (fd < 0 || flock(fd, LOCK_EX) < 0 ||
        snprintf(path, cap, "%s/%s%d%s", dir, prefix, (int)getpid(), suffix) >= (int)cap ||
        rename(tmp, path) < 0) {
        int saved = errno;
        if (fd >= 0)
            close(fd);
        rmdir(tmp);
        errno = saved;
        return -1;
    }
    return fd;
}

unsigned long long bw_proc_sum(const char *path, const char *fmt) {
    char line[256];
    unsigned long long sum = 0, v;
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, fmt, &v) == 1)
            sum += v;
    if (f)
        fclose(f);
    return sum;
}
