/* checkpoint.c - image management and libcriu calls. */
#define _GNU_SOURCE
#include "checkpoint.h"

#include <criu/criu.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "json.h"
#include "log.h"
#include "mp.h"
#include "progress.h"
#include "thp.h"
#include "util.h"

#define PROVISIONED_CRIU "/usr/local/lib/beam/criu"
#define MAX_FILES 4096

static bool executable(const char *path) { return path && *path && access(path, X_OK) == 0; }

/* The first executable `criu` in $PATH, into buf; false if there is none. */
static bool criu_on_path(char *buf, size_t cap) {
    const char *path = getenv("PATH");
    while (path && *path) {
        size_t n = strcspn(path, ":");
        if (n > 0 && (size_t)snprintf(buf, cap, "%.*s/criu", (int)n, path) < cap && executable(buf))
            return true;
        path += n + (path[n] == ':');
    }
    return false;
}

const char *bw_ckpt_find_criu(const char *configured) {
    static char found[PATH_MAX];
    const char *env = getenv("BEAM_CRIU");
    if (configured && *configured)
        return configured;
    if (executable(env))
        return env;
    if (executable(PROVISIONED_CRIU))
        return PROVISIONED_CRIU;
    return criu_on_path(found, sizeof found) ? found : NULL;
}

static int mkdir_private(const char *path) {
    if (mkdir(path, 0700) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* mkdir -p, creating missing components 0700. */
static int mkdirs(const char *path) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir_private(tmp) < 0)
            return -1;
        *p = '/';
    }
    return mkdir_private(tmp);
}

static void remove_stale_dumps(const char *root);

int bw_ckpt_open(struct bw_ckpt *c, const char *root, const char *key, const char *criu,
                 double timeout_s, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    snprintf(c->root, sizeof c->root, "%s", root);
    snprintf(c->key, sizeof c->key, "%s", key);
    snprintf(c->dir, sizeof c->dir, "%s/%s", root, key);
    snprintf(c->failed, sizeof c->failed, "%s/%s.failed", root, key);
    /* None found: "criu" still, so that the first dump fails with libcriu's own reason
     * and the key is marked failed as for any other CRIU failure. */
    c->criu = bw_ckpt_find_criu(criu);
    if (!c->criu)
        c->criu = "criu";
    c->timeout_s = timeout_s;
    /* Read once, here: jobs run CRIU on other threads, and getenv races setenv. */
    const char *lvl = getenv("BEAM_CRIU_LOG_LEVEL");
    c->keep_logs = lvl && *lvl;
    c->log_level = c->keep_logs ? atoi(lvl) : 2;
    struct stat st;
    if (mkdirs(root) < 0 || stat(root, &st) < 0) {
        snprintf(err, errlen, "cannot create checkpoint dir %s: %s", root, strerror(errno));
        return -1;
    }
    /* Images hold the whole process memory: only their owner may touch them. */
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 022)) {
        snprintf(err, errlen, "refusing checkpoint dir %s: it must be a directory owned by "
                 "uid %d and not writable by group or others (mode is %03o)",
                 root, (int)geteuid(), st.st_mode & 0777);
        return -1;
    }
    if (st.st_mode & 077)
        chmod(root, 0700);
    bw_compat_detect(&c->compat, c->criu, root); /* the root: ours alone, checked above */
    remove_stale_dumps(root);
    return 0;
}

int bw_ckpt_exists(const struct bw_ckpt *c) {
    char p[PATH_MAX + 300];
    snprintf(p, sizeof p, "%s/restore.msgpack", c->dir);
    return access(p, R_OK) == 0;
}

int bw_ckpt_failed_before(const struct bw_ckpt *c, char *reason, size_t cap) {
    FILE *f = fopen(c->failed, "r");
    if (!f)
        return 0;
    size_t n = fread(reason, 1, cap - 1, f);
    reason[n] = '\0';
    fclose(f);
    return 1;
}

void bw_ckpt_mark_failed(const struct bw_ckpt *c, const char *reason) {
    int fd = open(c->failed, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    FILE *f = fdopen(fd, "w");
    fputs("{\"reason\": ", f);
    bw_json_write_str(f, reason);
    fprintf(f, ", \"time\": %lld}\n", (long long)time(NULL));
    fclose(f);
}

void bw_ckpt_clear_failed(const struct bw_ckpt *c) { unlink(c->failed); }

void bw_ckpt_discard(const struct bw_ckpt *c) { bw_rm_rf(c->dir); }

/* A supervisor killed during a dump leaves its .tmp-KEY-PID directory behind. It is
 * never restored from (only a complete image is renamed to KEY); once no process PID
 * runs any more, it is removed here so it does not hold the disk forever. */
static void remove_stale_dumps(const char *root) {
    DIR *d = opendir(root);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *dash = strrchr(e->d_name, '-');
        if (strncmp(e->d_name, ".tmp-", 5) != 0 || !dash || dash < e->d_name + 5)
            continue;
        char *end;
        long pid = strtol(dash + 1, &end, 10);
        if (*end || pid <= 0 || pid == getpid() || kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        char path[PATH_MAX + 300];
        snprintf(path, sizeof path, "%s/%s", root, e->d_name);
        bw_info("removing %s: a dump that its supervisor (pid %ld) did not finish", path, pid);
        bw_rm_rf(path);
    }
    closedir(d);
}

/* ---- bounded CRIU calls ------------------------------------------------------------
 * libcriu forks `criu swrk` from the calling thread and blocks on its socket. A stuck
 * criu (dumps have hung forever on these VMs; docs/criu-provisioning.md) must become an
 * error: a watchdog thread kills the calling thread's `criu` children once the time is
 * up. The calling thread is a job thread of the supervisor (job.h): its children are
 * criu's and the hosts it restored before (CRIU makes a restored host a sibling of its
 * helper): the ones that existed before the call are snapshotted and never touched, and
 * replicas booted cold are the loop thread's children, which it never looks at. */

#define MAX_KIDS 256

struct watchdog {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done, fired;
    pid_t caller_tid, spare;
    pid_t before[MAX_KIDS]; /* the caller's children when the call began: replicas */
    int nbefore;
    double timeout_s;
    struct bw_progress progress;
    const char *pages_dir; /* a dump: where page files grow; NULL for a restore */
};

/* Read the pids listed in /proc/<pid>/task/<tid>/children. */
static int children_of(pid_t pid, pid_t tid, pid_t *out, int cap) {
    char path[96], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pid, (int)tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    int k = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, " \n", &save); tok && k < cap; tok = strtok_r(NULL, " \n", &save))
        out[k++] = (pid_t)atoi(tok);
    return k;
}

/* SIGKILL a process and everything below it: a criu that forked helpers must not keep
 * the RPC socket open (and libcriu blocked) after its parent is gone. */
static void kill_tree(pid_t pid, int depth) {
    pid_t kids[MAX_KIDS];
    kill(pid, SIGSTOP); /* no new children while we look */
    int n = depth < 8 ? children_of(pid, pid, kids, MAX_KIDS) : 0;
    for (int i = 0; i < n; i++)
        kill_tree(kids[i], depth + 1);
    kill(pid, SIGKILL);
}

static bool listed(const pid_t *pids, int n, pid_t pid) {
    for (int i = 0; i < n; i++)
        if (pids[i] == pid)
            return true;
    return false;
}

/* The children that appeared during the CRIU call are criu's: its helper and what it
 * forked. The replicas (the host being dumped among them) were there before: spared,
 * they keep serving. */
static void kill_criu_children(const struct watchdog *w) {
    pid_t kids[MAX_KIDS];
    int n = children_of(getpid(), w->caller_tid, kids, MAX_KIDS);
    for (int i = 0; i < n; i++)
        if (kids[i] != w->spare && !listed(w->before, w->nbefore, kids[i]))
            kill_tree(kids[i], 0);
}

/* Bytes of page files written so far into a dump's image directory. */
static unsigned long long pages_written(const char *dir) {
    DIR *d = opendir(dir);
    unsigned long long n = 0;
    struct dirent *e;
    struct stat st;
    while (d && (e = readdir(d)) != NULL)
        if (strncmp(e->d_name, "pages-", 6) == 0 && fstatat(dirfd(d), e->d_name, &st, 0) == 0)
            n += (unsigned long long)st.st_size;
    if (d)
        closedir(d);
    return n;
}

/* Bytes read so far by a process and what it forked: during a restore the process
 * being restored reads its own pages from the image. */
static unsigned long long tree_read(pid_t pid, int depth) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/io", (int)pid);
    unsigned long long n = bw_proc_sum(path, "rchar: %llu");
    pid_t kids[MAX_KIDS];
    int k = depth < 8 ? children_of(pid, pid, kids, MAX_KIDS) : 0;
    for (int i = 0; i < k; i++)
        n += tree_read(kids[i], depth + 1);
    return n;
}

/* Clamped to the total: both the total and the bytes read are estimates. */
static unsigned long long bytes_done(const struct watchdog *w) {
    unsigned long long n = 0;
    if (w->pages_dir) {
        n = pages_written(w->pages_dir);
    } else {
        pid_t kids[MAX_KIDS];
        int k = children_of(getpid(), w->caller_tid, kids, MAX_KIDS);
        for (int i = 0; i < k; i++)
            if (!listed(w->before, w->nbefore, kids[i]))
                n += tree_read(kids[i], 0);
    }
    return n < w->progress.total ? n : w->progress.total;
}

/* Wakes every PROGRESS_MS to report progress; at the deadline, kills criu. */
#define PROGRESS_MS 250

static void *watchdog_main(void *arg) {
    struct watchdog *w = arg;
    double deadline = bw_now_ms() + w->timeout_s * 1000;
    pthread_mutex_lock(&w->mu);
    while (!w->done) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        long long ns = until.tv_nsec + PROGRESS_MS * 1000000LL;
        until.tv_sec += (time_t)(ns / 1000000000LL);
        until.tv_nsec = (long)(ns % 1000000000LL);
        if (pthread_cond_timedwait(&w->cv, &w->mu, &until) != ETIMEDOUT || w->done)
            continue;
        if (bw_now_ms() > deadline) {
            w->fired = true;
            kill_criu_children(w);
            break;
        }
        bw_progress_update(&w->progress, bytes_done(w));
    }
    pthread_mutex_unlock(&w->mu);
    bw_progress_end(&w->progress);
    return NULL;
}

/* pages_dir: a dump's image directory (NULL for a restore); total: bytes expected. */
static void watchdog_start(struct watchdog *w, double timeout_s, pid_t spare,
                           const char *pages_dir, unsigned long long total) {
    memset(w, 0, sizeof *w);
    w->pages_dir = pages_dir;
    bw_progress_begin(&w->progress, pages_dir ? "checkpointing" : "restoring", total);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->caller_tid = gettid();
    w->timeout_s = timeout_s;
    w->spare = spare;
    w->nbefore = children_of(getpid(), w->caller_tid, w->before, MAX_KIDS);
    pthread_create(&w->thread, NULL, watchdog_main, w);
}

static bool watchdog_stop(struct watchdog *w) {
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    return w->fired;
}

/* CRIU's own error lines are the best explanation a user can get: quote the first that
 * says something (the root cause, e.g. "No space left on device"), not the closing
 * "Dumping FAILED." nor the RLIMIT_NOFILE line CRIU logs, harmlessly, without
 * CAP_SYS_RESOURCE (docs/checkpoint.md); else the last.
 * shown: where the log will be for the user to read. */
static void criu_log_reason(const char *log, const char *shown, char *err, size_t errlen,
                            const char *what, int rc) {
    char line[512], last[512] = "", first[512] = "";
    FILE *f = fopen(log, "r");
    if (f) {
        while (fgets(line, sizeof line, f)) {
            if (!strstr(line, "Error") && !strstr(line, "error"))
                continue;
            snprintf(last, sizeof last, "%s", line);
            if (!first[0] && !strstr(line, "RLIMIT_NOFILE") && !strstr(line, "Dumping FAILED") &&
                !strstr(line, "Restoring FAILED"))
                snprintf(first, sizeof first, "%s", line);
        }
        fclose(f);
    }
    if (first[0])
        memcpy(last, first, sizeof last);
    size_t n = strlen(last);
    while (n && (last[n - 1] == '\n' || last[n - 1] == '\r'))
        last[--n] = '\0';
    snprintf(err, errlen, "%s failed (libcriu %d%s%s); log: %s", what, rc, *last ? ": " : "",
             last, shown);
}

static void criu_call_done(criu_opts *o, int img_fd, int work_fd) {
    if (o)
        criu_local_free_opts(o);
    if (img_fd >= 0)
        close(img_fd);
    if (work_fd >= 0)
        close(work_fd);
}

static int criu_opts_new(const struct bw_ckpt *c, criu_opts **o, int img_fd, int work_fd,
                         const char *log_name) {
    if (criu_local_init_opts(o) < 0)
        return -1;
    criu_local_set_service_binary(*o, c->criu);
    criu_local_set_images_dir_fd(*o, img_fd);
    criu_local_set_work_dir_fd(*o, work_fd);
    criu_local_set_log_file(*o, log_name);
    criu_local_set_log_level(*o, c->log_level);
    /* Hardware breakpoints never fire in these VMs and dumps hang without
     * CRIU's FI_NO_BREAKPOINTS fault mode. The criu child inherits our environment. */
    const char *fault = getenv("BEAM_CRIU_FAULT");
    setenv("CRIU_FAULT", fault ? fault : "130", 1);
    return 0;
}

/* ---- image files ---------------------------------------------------------------- */

/* restore.msgpack's layout; an image written with another is not restored from. */
#define META_VERSION 2

struct file_entry {
    char name[256];
    unsigned long long size;
    unsigned long long hash; /* XXH3-64 of the whole file */
};

#define HASH_BLOCK (1 << 20)

/* XXH3 of a whole file, read in 1 MiB blocks: 7.2 GB/s from the page cache here, faster
 * than hashing a mapping of it (5.8 GB/s: the page faults cost more than read's copy), so
 * every byte of the image, page data included, is checked before each restore.
 * buf: HASH_BLOCK bytes, shared by the calls for one image (it has ~100 files). */
static int file_hash(int dirfd, const char *name, char *buf, unsigned long long *hash,
                     const atomic_bool *cancel) {
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    XXH3_state_t *st = XXH3_createState();
    ssize_t n = -1;
    if (fd >= 0 && buf && st && XXH3_64bits_reset(st) == XXH_OK) {
        while ((n = read(fd, buf, HASH_BLOCK)) > 0 && !(cancel && atomic_load(cancel)))
            XXH3_64bits_update(st, buf, (size_t)n);
        *hash = XXH3_64bits_digest(st);
    }
    XXH3_freeState(st);
    if (fd >= 0)
        close(fd);
    return n < 0 ? -1 : 0;
}

static int list_files(const char *img, struct file_entry **out, int *n,
                      unsigned long long *bytes) {
    DIR *d = opendir(img);
    if (!d)
        return -1;
    struct file_entry *v = calloc(MAX_FILES, sizeof *v);
    char *buf = malloc(HASH_BLOCK);
    *n = 0;
    *bytes = 0;
    struct dirent *e;
    while (v && (e = readdir(d)) && *n < MAX_FILES) {
        struct stat st;
        if (e->d_name[0] == '.' || fstatat(dirfd(d), e->d_name, &st, 0) < 0 || !S_ISREG(st.st_mode))
            continue;
        struct file_entry *f = &v[(*n)++];
        snprintf(f->name, sizeof f->name, "%s", e->d_name);
        f->size = (unsigned long long)st.st_size;
        *bytes += f->size;
        fchmodat(dirfd(d), e->d_name, 0600, 0);
        if (file_hash(dirfd(d), f->name, buf, &f->hash, NULL) < 0) {
            free(v);
            v = NULL;
        }
    }
    closedir(d);
    free(buf);
    *out = v;
    return v ? 0 : -1;
}

static int write_restore_meta(const char *path, const struct bw_ckpt_ids *ids,
                              const struct file_entry *files, int n, const char *config,
                              size_t config_len, const char *gpu, size_t gpu_len,
                              const struct bw_compat *compat) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, gpu ? 6 : 5);
    bw_mp_kv_int(&pk, "v", META_VERSION);
    bw_mp_str(&pk, "compat");
    bw_compat_pack(&pk, compat);
    bw_mp_str(&pk, "ids");
    msgpack_pack_array(&pk, 3);
    msgpack_pack_unsigned_long(&pk, ids->out_ino);
    msgpack_pack_unsigned_long(&pk, ids->err_ino);
    msgpack_pack_unsigned_long(&pk, ids->ctl_ino);
    bw_mp_str(&pk, "files");
    msgpack_pack_array(&pk, (size_t)n);
    for (int i = 0; i < n; i++) {
        msgpack_pack_array(&pk, 3);
        bw_mp_str(&pk, files[i].name);
        msgpack_pack_unsigned_long_long(&pk, files[i].size);
        msgpack_pack_unsigned_long_long(&pk, files[i].hash);
    }
    bw_mp_str(&pk, "config");
    msgpack_sbuffer_write(&sb, config, config_len);
    if (gpu) {
        bw_mp_str(&pk, "gpu");
        msgpack_sbuffer_write(&sb, gpu, gpu_len);
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int rc = fd >= 0 ? bw_write_full(fd, sb.data, sb.size) : -1;
    if (fd >= 0 && (fsync(fd) < 0 || close(fd) < 0))
        rc = -1;
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

static void write_manifest(const char *path, const struct bw_ckpt *c, const char *app,
                           const char *config, size_t config_len, const char *profile_json,
                           const char *gpu, size_t gpu_len, int nfiles, unsigned long long bytes,
                           double dump_ms, const struct bw_compat *compat) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    FILE *f = fdopen(fd, "w");
    fprintf(f, "{\n  \"key\": ");
    bw_json_write_str(f, c->key);
    fprintf(f, ",\n  \"status\": \"ok\",\n  \"created\": %lld,\n  \"app\": ", (long long)time(NULL));
    bw_json_write_str(f, app);
    fprintf(f, ",\n  \"worker_version\": \"%s\",\n  \"criu\": ", BW_VERSION);
    bw_json_write_str(f, c->criu);
    fprintf(f, ",\n  \"image_bytes\": %llu,\n  \"files\": %d,\n  \"dump_ms\": %.1f,\n"
               "  \"profile\": %s,\n  \"config\": ", bytes, nfiles, dump_ms,
            profile_json ? profile_json : "{}");
    bw_json_write_msgpack(f, config, config_len);
    fprintf(f, ",\n  \"compat\": ");
    bw_compat_write_json(f, compat);
    if (gpu) {
        fprintf(f, ",\n  \"gpu\": ");
        bw_json_write_msgpack(f, gpu, gpu_len);
    }
    fprintf(f, "\n}\n");
    fclose(f);
}

/* What a dump will write, about: the process's resident memory. */
static unsigned long long resident_bytes(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    return bw_proc_sum(path, "VmRSS: %llu") * 1024;
}

int bw_ckpt_dump(const struct bw_ckpt *c, pid_t pid, const struct bw_ckpt_ids *ids,
                 const char *config, size_t config_len, const char *app, const char *profile_json,
                 const char *gpu, size_t gpu_len, double *ms, unsigned long long *bytes,
                 char *err, size_t errlen) {
    char tmp[PATH_MAX + 200], img[PATH_MAX + 300], log[PATH_MAX + 300], key[64];
    char logs[PATH_MAX + 100], kept[PATH_MAX + 400];
    snprintf(tmp, sizeof tmp, "%s/.tmp-%s-%d", c->root, c->key, (int)getpid());
    snprintf(img, sizeof img, "%s/img", tmp);
    snprintf(log, sizeof log, "%s/dump.log", tmp);
    /* A failed dump's directory is removed (it may fill the disk); its log is kept. */
    bool keep_failed = getenv("BEAM_KEEP_FAILED_DUMP") != NULL;
    snprintf(logs, sizeof logs, "%s/.logs", c->root);
    snprintf(kept, sizeof kept, "%s/dump-%s.log", logs, c->key);
    const char *shown = keep_failed ? log : kept;
    bw_rm_rf(tmp);
    if (mkdir(tmp, 0700) < 0 || mkdir(img, 0700) < 0) {
        snprintf(err, errlen, "cannot create %s: %s", img, strerror(errno));
        return -1;
    }
    int img_fd = open(img, O_DIRECTORY | O_CLOEXEC), work_fd = open(tmp, O_DIRECTORY | O_CLOEXEC);
    criu_opts *o = NULL;
    int rc = -1;
    if (img_fd < 0 || work_fd < 0 || criu_opts_new(c, &o, img_fd, work_fd, "dump.log") < 0) {
        snprintf(err, errlen, "cannot prepare CRIU options: %s", strerror(errno));
        goto out;
    }
    criu_local_set_pid(o, pid);
    criu_local_set_leave_running(o, true);
    /* The host's stdio pipes and control socket lead to us, outside the tree: the image
     * records them as external, and each restore plugs in new ones. */
    snprintf(key, sizeof key, "pipe:[%lu]", ids->out_ino);
    criu_local_add_external(o, key);
    if (ids->err_ino != ids->out_ino) {
        snprintf(key, sizeof key, "pipe:[%lu]", ids->err_ino);
        criu_local_add_external(o, key);
    }
    snprintf(key, sizeof key, "unix[%lu]", ids->ctl_ino);
    criu_local_add_external(o, key);

    double t0 = bw_now_ms();
    struct watchdog w;
    watchdog_start(&w, c->timeout_s, pid, img, resident_bytes(pid));
    mode_t old_umask = umask(077); /* criu inherits it: every file it writes is 0600 */
    int r = criu_local_dump(o);
    umask(old_umask);
    bool timed_out = watchdog_stop(&w);
    *ms = bw_now_ms() - t0;
    if (timed_out) {
        kill(pid, SIGCONT); /* never leave the serving process frozen */
        snprintf(err, errlen, "CRIU dump timed out after %gs (criu: %s); log: %s", c->timeout_s,
                 c->criu, shown);
        goto out;
    }
    if (r < 0) {
        criu_log_reason(log, shown, err, errlen, "CRIU dump", r);
        goto out;
    }
    struct file_entry *files = NULL;
    int n = 0;
    char meta[PATH_MAX + 300], man[PATH_MAX + 300];
    if (list_files(img, &files, &n, bytes) < 0 || n == 0) {
        snprintf(err, errlen, "cannot read back the image in %s", img);
        free(files);
        goto out;
    }
    snprintf(meta, sizeof meta, "%s/restore.msgpack", tmp);
    snprintf(man, sizeof man, "%s/manifest.json", tmp);
    /* The machine it was made on; with GPU state, its GPUs too (compat.h). */
    struct bw_compat compat = c->compat;
    if (gpu)
        bw_compat_set_gpu(&compat, gpu, gpu_len);
    int wr = write_restore_meta(meta, ids, files, n, config, config_len, gpu, gpu_len, &compat);
    free(files);
    if (wr < 0) {
        snprintf(err, errlen, "cannot write %s: %s", meta, strerror(errno));
        goto out;
    }
    write_manifest(man, c, app, config, config_len, profile_json, gpu, gpu_len, n, *bytes, *ms,
                   &compat);
    syncfs(img_fd);
    /* Only a complete image gets the key's name. If another supervisor got there
     * first, theirs is as good as ours. */
    if (rename(tmp, c->dir) < 0 && errno != ENOTEMPTY && errno != EEXIST) {
        snprintf(err, errlen, "cannot publish %s: %s", c->dir, strerror(errno));
        goto out;
    }
    rc = 0;
out:
    criu_call_done(o, img_fd, work_fd);
    if (rc == 0 && access(tmp, F_OK) == 0)
        bw_rm_rf(tmp); /* lost the race: ours is redundant */
    if (rc < 0 && !keep_failed) {
        bw_rm_rf(img); /* first: on a full disk this makes room for what follows */
        mkdir_private(logs);
        rename(log, kept);
        bw_rm_rf(tmp);
    }
    return rc;
}

/* dir's restore.msgpack, read and unpacked into m (its path left in path). The buffer
 * (which m points into) to free and the zone to destroy after use, or NULL with err set
 * (nothing to free). */
static char *read_record(const char *dir, char *path, size_t pathcap, msgpack_zone *zone,
                         msgpack_object *m, char *err, size_t errlen) {
    snprintf(path, pathcap, "%s/restore.msgpack", dir);
    size_t len = 0;
    char *buf = bw_read_file(path, 1 << 24, &len);
    if (!buf) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        return NULL;
    }
    msgpack_zone_init(zone, 4096);
    if (bw_mp_unpack_exact(buf, len, zone, m) < 0) {
        snprintf(err, errlen, "%s is corrupt", path);
        msgpack_zone_destroy(zone);
        free(buf);
        return NULL;
    }
    return buf;
}

/* Page data is hashed off the restore's path (bw_ckpt_verify_*): at 7 GB/s a 2 GB
 * image would otherwise add ~0.3 s before every restore. */
static bool is_pages(const char *name) { return strncmp(name, "pages-", 6) == 0; }

/* The page files of an image, hashed by a thread while CRIU restores from them. */
struct bw_ckpt_verify {
    pthread_t thread;
    bool started;
    atomic_bool cancel; /* the replica is gone: stop reading */
    atomic_int state;   /* VERIFY_RUNNING, VERIFY_OK, VERIFY_BAD */
    bool background; /* the replica may already serve: yield the CPU to it */
    bool in_thread;  /* else hashed by the caller, whose priority is left alone */
    int dirfd;
    int n;
    struct file_entry *files; /* as many as the image lists */
    char bad[256]; /* the first corrupt file */
    unsigned long long bytes;
    double ms;
};

enum { VERIFY_RUNNING, VERIFY_OK, VERIFY_BAD };

static int verify_files(const char *img, const msgpack_object *files, unsigned long long *bytes,
                        struct bw_ckpt_verify *pages, char *err, size_t errlen) {
    int dfd = open(img, O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        snprintf(err, errlen, "image directory %s missing", img);
        return -1;
    }
    char *buf = malloc(HASH_BLOCK);
    int rc = 0;
    *bytes = 0;
    for (uint32_t i = 0; rc == 0 && i < files->via.array.size; i++) {
        const msgpack_object *e = &files->via.array.ptr[i];
        char name[256];
        if (e->type != MSGPACK_OBJECT_ARRAY || e->via.array.size != 3 ||
            !bw_mp_strdup(&e->via.array.ptr[0], name, sizeof name) || strchr(name, '/')) {
            snprintf(err, errlen, "corrupt restore.msgpack");
            rc = -1;
            break;
        }
        unsigned long long size = e->via.array.ptr[1].via.u64;
        unsigned long long want = e->via.array.ptr[2].via.u64, got = 0;
        struct stat st;
        if (fstatat(dfd, name, &st, 0) < 0) {
            snprintf(err, errlen, "image file %s is missing", name);
            rc = -1;
        } else if ((unsigned long long)st.st_size != size) {
            snprintf(err, errlen, "image file %s has %lld bytes, expected %llu (truncated?)",
                     name, (long long)st.st_size, size);
            rc = -1;
        } else if (is_pages(name)) {
            struct file_entry *f = &pages->files[pages->n++];
            snprintf(f->name, sizeof f->name, "%s", name);
            f->size = size;
            f->hash = want;
            pages->bytes += size;
        } else if (file_hash(dfd, name, buf, &got, NULL) < 0 || got != want) {
            snprintf(err, errlen, "image file %s is corrupt (XXH3 mismatch)", name);
            rc = -1;
        }
        *bytes += size;
    }
    free(buf);
    if (rc == 0)
        pages->dirfd = dfd;
    else
        close(dfd);
    return rc;
}

static void *verify_main(void *arg) {
    struct bw_ckpt_verify *v = arg;
    if (v->background && v->in_thread) /* a thread's own nice value (Linux); best effort */
        setpriority(PRIO_PROCESS, (id_t)gettid(), 19);
    char *buf = malloc(HASH_BLOCK);
    double t0 = bw_now_ms();
    int state = buf ? VERIFY_OK : VERIFY_BAD;
    for (int i = 0; state == VERIFY_OK && i < v->n && !atomic_load(&v->cancel); i++) {
        unsigned long long got = 0;
        if (file_hash(v->dirfd, v->files[i].name, buf, &got, &v->cancel) < 0 ||
            got != v->files[i].hash) {
            snprintf(v->bad, sizeof v->bad, "%s", v->files[i].name);
            state = VERIFY_BAD;
        }
    }
    if (!buf)
        snprintf(v->bad, sizeof v->bad, "(out of memory)");
    free(buf);
    v->ms = bw_now_ms() - t0;
    atomic_store(&v->state, state);
    return NULL;
}

/* Start hashing the page files; a thread that cannot start hashes them here and now. */
void bw_ckpt_verify_start(struct bw_ckpt_verify *v, bool background) {
    if (!v || v->started)
        return;
    v->background = background;
    v->in_thread = true; /* before the thread reads it */
    v->started = pthread_create(&v->thread, NULL, verify_main, v) == 0;
    if (!v->started) {
        v->in_thread = false;
        verify_main(v);
    }
}

int bw_ckpt_verify_poll(const struct bw_ckpt_verify *v) {
    if (!v)
        return 0;
    int s = atomic_load(&v->state);
    return s == VERIFY_RUNNING ? 1 : s == VERIFY_OK ? 0 : -1;
}

static void verify_free(struct bw_ckpt_verify *v) {
    if (v->started)
        pthread_join(v->thread, NULL);
    if (v->dirfd >= 0)
        close(v->dirfd);
    free(v->files);
    free(v);
}

int bw_ckpt_verify_end(struct bw_ckpt_verify **vp, char *err, size_t errlen) {
    struct bw_ckpt_verify *v = *vp;
    if (!v)
        return 0;
    if (v->started)
        pthread_join(v->thread, NULL);
    else if (atomic_load(&v->state) == VERIFY_RUNNING) /* nothing started it: check here */
        verify_main(v);
    v->started = false;
    int rc = atomic_load(&v->state) == VERIFY_OK ? 0 : -1;
    if (rc < 0)
        snprintf(err, errlen, "image file %s is corrupt (XXH3 mismatch)", v->bad);
    else
        bw_debug("page data checked (XXH3, %d files): %.1f MiB in %.1f ms", v->n,
                 v->bytes / 1048576.0, v->ms);
    verify_free(v);
    *vp = NULL;
    return rc;
}

void bw_ckpt_verify_cancel(struct bw_ckpt_verify **vp) {
    if (!*vp)
        return;
    atomic_store(&(*vp)->cancel, true);
    verify_free(*vp);
    *vp = NULL;
}

int bw_ckpt_load(const struct bw_ckpt *c, struct bw_ckpt_image *img, char *err, size_t errlen) {
    char path[PATH_MAX + 300], imgdir[PATH_MAX + 300];
    memset(img, 0, sizeof *img);
    snprintf(imgdir, sizeof imgdir, "%s/img", c->dir);
    msgpack_zone zone;
    msgpack_object m;
    char *buf = read_record(c->dir, path, sizeof path, &zone, &m, err, errlen);
    if (!buf)
        return -1;
    int rc = -1;
    const msgpack_object *ids, *files, *config;
    if (!(ids = bw_mp_get(&m, "ids")) ||
        ids->type != MSGPACK_OBJECT_ARRAY || ids->via.array.size != 3 ||
        !(files = bw_mp_get(&m, "files")) || files->type != MSGPACK_OBJECT_ARRAY ||
        !(config = bw_mp_get(&m, "config"))) {
        snprintf(err, errlen, "%s is corrupt", path);
        goto out;
    }
    const msgpack_object *v = bw_mp_get(&m, "v");
    if (!v || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER || v->via.u64 != META_VERSION) {
        snprintf(err, errlen, "%s has another layout (written by another worker version)", path);
        goto out;
    }
    img->ids.out_ino = (unsigned long)ids->via.array.ptr[0].via.u64;
    img->ids.err_ino = (unsigned long)ids->via.array.ptr[1].via.u64;
    img->ids.ctl_ino = (unsigned long)ids->via.array.ptr[2].via.u64;
    img->pages = calloc(1, sizeof *img->pages);
    if (img->pages) {
        img->pages->dirfd = -1;
        img->pages->files = calloc(files->via.array.size + 1, sizeof *img->pages->files);
    }
    if (!img->pages || !img->pages->files) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    double t0 = bw_now_ms();
    if (verify_files(imgdir, files, &img->bytes, img->pages, err, errlen) < 0)
        goto out;
    double dt = bw_now_ms() - t0;
    bw_debug("image checked (sizes; XXH3 of all but page data): %.1f MiB in %.1f ms",
             img->bytes / 1048576.0, dt);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_object(&pk, *config);
    img->config = sb.data;
    img->config_len = sb.size;
    const msgpack_object *gpu = bw_mp_get(&m, "gpu");
    if (gpu) {
        msgpack_sbuffer_init(&sb);
        msgpack_pack_object(&pk, *gpu);
        img->gpu = sb.data;
        img->gpu_len = sb.size;
    }
    rc = 0;
out:
    msgpack_zone_destroy(&zone);
    free(buf);
    if (rc < 0)
        bw_ckpt_image_free(img);
    return rc;
}

/* restore.msgpack with the size and hash of one file as it is now. */
static int pack_rehashed(msgpack_packer *pk, const msgpack_object *m, const char *name,
                         unsigned long long size, unsigned long long hash) {
    int found = 0;
    msgpack_pack_map(pk, m->via.map.size);
    for (uint32_t i = 0; i < m->via.map.size; i++) {
        const msgpack_object_kv *kv = &m->via.map.ptr[i];
        msgpack_pack_object(pk, kv->key);
        if (!bw_mp_is_str(&kv->key, "files") || kv->val.type != MSGPACK_OBJECT_ARRAY) {
            msgpack_pack_object(pk, kv->val);
            continue;
        }
        msgpack_pack_array(pk, kv->val.via.array.size);
        for (uint32_t j = 0; j < kv->val.via.array.size; j++) {
            const msgpack_object *e = &kv->val.via.array.ptr[j];
            if (e->type != MSGPACK_OBJECT_ARRAY || e->via.array.size != 3 ||
                !bw_mp_is_str(&e->via.array.ptr[0], name)) {
                msgpack_pack_object(pk, *e);
                continue;
            }
            msgpack_pack_array(pk, 3);
            bw_mp_str(pk, name);
            msgpack_pack_unsigned_long_long(pk, size);
            msgpack_pack_unsigned_long_long(pk, hash);
            found = 1;
        }
    }
    return found ? 0 : -1;
}

int bw_ckpt_rehash(const struct bw_ckpt *c, const char *name, char *err, size_t errlen) {
    char meta[PATH_MAX + 300], imgdir[PATH_MAX + 300];
    snprintf(imgdir, sizeof imgdir, "%s/img", c->dir);
    msgpack_zone zone;
    msgpack_object m;
    char *buf = read_record(c->dir, meta, sizeof meta, &zone, &m, err, errlen);
    if (!buf)
        return -1;
    char *hb = malloc(HASH_BLOCK);
    int dfd = open(imgdir, O_DIRECTORY | O_CLOEXEC), rc = -1;
    struct stat st;
    unsigned long long hash = 0;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    if (!hb || dfd < 0 || fstatat(dfd, name, &st, 0) < 0 ||
        file_hash(dfd, name, hb, &hash, NULL) < 0 || m.type != MSGPACK_OBJECT_MAP ||
        pack_rehashed(&pk, &m, name, (unsigned long long)st.st_size, hash) < 0)
        snprintf(err, errlen, "cannot rehash %s in %s", name, meta);
    else if ((rc = bw_write_replace(meta, sb.data, sb.size)) < 0)
        snprintf(err, errlen, "cannot write %s: %s", meta, strerror(errno));
    msgpack_sbuffer_destroy(&sb);
    msgpack_zone_destroy(&zone);
    if (dfd >= 0)
        close(dfd);
    free(hb);
    free(buf);
    return rc;
}

int bw_ckpt_compat_of(const char *dir, struct bw_compat *c, char *err, size_t errlen) {
    char path[PATH_MAX + 300];
    msgpack_zone zone;
    msgpack_object m;
    char *buf = read_record(dir, path, sizeof path, &zone, &m, err, errlen);
    if (!buf)
        return -1;
    int rc = 0;
    if (bw_compat_unpack(bw_mp_get(&m, "compat"), c) < 0) {
        snprintf(err, errlen, "%s records no compatibility key (made by an older worker)", path);
        rc = -1;
    }
    msgpack_zone_destroy(&zone);
    free(buf);
    return rc;
}

int bw_ckpt_check(const struct bw_ckpt *c, unsigned long long *bytes, char *err,
                  size_t errlen) {
    struct bw_ckpt_image img;
    if (bw_ckpt_load(c, &img, err, errlen) < 0)
        return -1;
    int rc = bw_ckpt_verify_end(&img.pages, err, errlen); /* starts it and waits */
    if (bytes)
        *bytes = img.bytes;
    bw_ckpt_image_free(&img);
    return rc;
}

void bw_ckpt_image_free(struct bw_ckpt_image *img) {
    bw_ckpt_verify_cancel(&img->pages);
    free(img->config);
    img->config = NULL;
    free(img->gpu);
    img->gpu = NULL;
}

/* The process restored from a corrupt image never got "start": it goes unseen. */
static int restored_corrupt(pid_t pid) {
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return BW_CKPT_CORRUPT;
}

int bw_ckpt_restore(const struct bw_ckpt *c, struct bw_ckpt_image *img, int out_fd,
                    int err_fd, int ctl_fd, pid_t *pid, char *err, size_t errlen) {
    char imgdir[PATH_MAX + 300], logdir[PATH_MAX + 100], logname[64], log[PATH_MAX + 200],
        key[64];
    snprintf(imgdir, sizeof imgdir, "%s/img", c->dir);
    snprintf(logdir, sizeof logdir, "%s/.logs", c->root);
    mkdir_private(logdir);
    snprintf(logname, sizeof logname, "restore-%d.log", (int)getpid());
    snprintf(log, sizeof log, "%s/%s", logdir, logname);
    int img_fd = open(imgdir, O_DIRECTORY | O_CLOEXEC), work_fd = open(logdir, O_DIRECTORY | O_CLOEXEC);
    criu_opts *o = NULL;
    int rc = -1;
    if (img_fd < 0 || work_fd < 0 || criu_opts_new(c, &o, img_fd, work_fd, logname) < 0) {
        snprintf(err, errlen, "cannot prepare CRIU restore: %s", strerror(errno));
        goto out;
    }
    snprintf(key, sizeof key, "pipe:[%lu]", img->ids.out_ino);
    criu_local_add_inherit_fd(o, out_fd, key);
    if (img->ids.err_ino != img->ids.out_ino) {
        snprintf(key, sizeof key, "pipe:[%lu]", img->ids.err_ino);
        criu_local_add_inherit_fd(o, err_fd, key);
    }
    snprintf(key, sizeof key, "socket:[%lu]", img->ids.ctl_ino);
    criu_local_add_inherit_fd(o, ctl_fd, key);

    struct watchdog w;
    watchdog_start(&w, c->timeout_s, 0, NULL, img->bytes);
    bw_ckpt_verify_start(img->pages, false); /* the other core hashes while CRIU copies */
    mode_t old_umask = umask(077);
    int r = criu_local_restore_child(o);
    umask(old_umask);
    bool timed_out = watchdog_stop(&w);
    if (timed_out)
        snprintf(err, errlen, "CRIU restore timed out after %gs; log: %s", c->timeout_s, log);
    else if (r <= 0)
        criu_log_reason(log, log, err, errlen, "CRIU restore", r);
    else if (bw_ckpt_verify_end(&img->pages, err, errlen) < 0)
        rc = restored_corrupt(r);
    else {
        *pid = r;
        rc = 0;
        if (!c->keep_logs)
            unlink(log);
        bw_thp_collapse_async(r); /* CRIU filled it with 4 KiB pages (thp.c) */
    }
out:
    criu_call_done(o, img_fd, work_fd);
    return rc;
}
