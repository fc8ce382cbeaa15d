/* host.c - the host: PID 1 of its own PID namespace.
 *
 * Boot: start CPython, import the app, run on_start once, then tell the supervisor
 * "ready" and block until it answers "start". If the supervisor checkpoints, it does so
 * during that wait; a restored copy resumes inside the very same read, which is why
 * "start" is the only message that can arrive there and carries everything a replica
 * needs to be itself: restored or not, a container id, the environment, the sockets.
 *
 * Serve: fork `workers` processes that share the post-on_start memory copy-on-write;
 * each runs the libuv server. The host stays a small init: it reaps every child (also
 * orphans of the app's subprocesses), replaces crashed workers, and on SIGTERM stops
 * them and exits 0. */
#define _GNU_SOURCE
#include "host.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "app.h"
#include "control.h"
#include "cuda_ckpt.h"
#include "log.h"
#include "mp.h"
#include "server.h"
#include "util.h"

#define MAX_WORKERS 256
#define RESPAWN_WINDOW_MS 10000.0
#define RESPAWN_MAX 5

static volatile sig_atomic_t got_term, got_chld;

static void on_boot_term(int sig) { _exit(128 + sig); } /* nothing to drain yet */
static void on_term(int sig) { (void)sig; got_term = 1; }
static void on_chld(int sig) { (void)sig; got_chld = 1; }

static void set_handler(int sig, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static int send_msg(msgpack_sbuffer *sb) {
    int rc = bw_ctl_send(BW_CTL_FD, sb->data, sb->size, NULL, 0);
    msgpack_sbuffer_destroy(sb);
    return rc;
}

/* Begin a control message of n entries, the first being its type "t". */
static void msg_begin(msgpack_sbuffer *sb, msgpack_packer *pk, const char *type, size_t n) {
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
    msgpack_pack_map(pk, n);
    bw_mp_kv_str(pk, "t", type);
}

static int fatal(const char *message) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msg_begin(&sb, &pk, "fatal", 2);
    bw_mp_kv_str(&pk, "message", message);
    if (send_msg(&sb) < 0)
        bw_error("%s", message); /* no supervisor to tell: say it ourselves */
    return 1;
}

static int send_ready(bool checkpoint, const char *skipped, const struct bw_boot_profile *p) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msg_begin(&sb, &pk, "ready", skipped ? 5 : 4);
    bw_mp_kv_bool(&pk, "checkpoint", checkpoint);
    if (skipped)
        bw_mp_kv_str(&pk, "checkpoint_error", skipped);
    bw_mp_str(&pk, "config");
    if (bw_app_pack_config(&pk) < 0) {
        msgpack_sbuffer_destroy(&sb);
        return -1;
    }
    bw_mp_str(&pk, "profile");
    msgpack_pack_map(&pk, 3);
    bw_mp_kv_double(&pk, "interpreter_init_ms", p->interpreter_init_ms);
    bw_mp_kv_double(&pk, "import_ms", p->import_ms);
    bw_mp_kv_double(&pk, "on_start_ms", p->on_start_ms);
    return send_msg(&sb);
}

/* The replica's profile as the supervisor measured it, plus the host's own phase. */
static void pack_profile(msgpack_sbuffer *sb, const msgpack_object *sup, double hooks_ms) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    bw_mp_pack_map_plus(&pk, sup, 1);
    bw_mp_kv_double(&pk, "after_start_ms", hooks_ms);
}

/* Cold boot, after the app is imported: ask the supervisor for the declared secrets'
 * values (they are never in our exec'd environment: environ.c says why).
 * 0, or 1 once the failure was reported (fatal). */
static int fetch_secrets(void) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msg_begin(&sb, &pk, "need_secrets", 2);
    bw_mp_str(&pk, "names");
    if (bw_app_pack_config_value(&pk, "secrets") < 0) {
        msgpack_sbuffer_destroy(&sb);
        return fatal(bw_app_error());
    }
    if (send_msg(&sb) < 0)
        return fatal("host: control channel lost before on_start");
    char *body;
    size_t len;
    int fds[BW_CTL_MAX_FDS], nfds = 0;
    if (bw_ctl_recv(BW_CTL_FD, &body, &len, fds, &nfds, 30000) < 0)
        return fatal("host: the supervisor sent no secrets");
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    msgpack_zone zone;
    msgpack_zone_init(&zone, 1024);
    msgpack_object m;
    int rc = 0;
    if (bw_mp_unpack_exact(body, len, &zone, &m) < 0 || !bw_mp_is_str(bw_mp_get(&m, "t"), "secrets"))
        rc = fatal("host: expected a secrets message");
    else if (bw_app_set_secrets(bw_mp_get(&m, "secrets")) < 0)
        rc = fatal(bw_app_error());
    msgpack_zone_destroy(&zone);
    explicit_bzero(body, len);
    free(body);
    return rc;
}

/* A restored host was exec'd with the options of the image's cold boot: take today's. */
static void apply_options(struct bw_options *o, const msgpack_object *m) {
    if (!m || m->type != MSGPACK_OBJECT_MAP)
        return;
    o->max_frame = (size_t)bw_mp_num(bw_mp_get(m, "max_frame"), (double)o->max_frame);
    o->grace_s = bw_mp_num(bw_mp_get(m, "grace_s"), o->grace_s);
    o->workers = (int)bw_mp_num(bw_mp_get(m, "workers"), o->workers);
    o->json_logs = bw_mp_true(bw_mp_get(m, "json_logs"));
    o->allow_cpu = bw_mp_true(bw_mp_get(m, "allow_cpu"));
}

struct start_info {
    bool restored;
    char container_id[40];
    char bind_address[512];
    int fds[BW_CTL_MAX_FDS];
    int nfds;
    msgpack_sbuffer profile;
};

static int wait_start(struct start_info *si, struct bw_options *o) {
    char *body;
    size_t len;
    if (bw_ctl_recv(BW_CTL_FD, &body, &len, si->fds, &si->nfds, -1) < 0) {
        bw_error("host: control channel lost before start: %s", strerror(errno));
        return -1;
    }
    msgpack_zone zone;
    msgpack_zone_init(&zone, 2048);
    msgpack_object m;
    int rc = -1;
    if (bw_mp_unpack_exact(body, len, &zone, &m) < 0 || !bw_mp_is_str(bw_mp_get(&m, "t"), "start")) {
        bw_error("host: expected a start message");
        goto out;
    }
    si->restored = bw_mp_true(bw_mp_get(&m, "restored"));
    if (!bw_mp_strdup(bw_mp_get(&m, "container_id"), si->container_id, sizeof si->container_id))
        bw_id_new(si->container_id);
    const msgpack_object *l = bw_mp_get(&m, "listeners");
    si->bind_address[0] = '\0';
    if (l && l->type == MSGPACK_OBJECT_ARRAY && l->via.array.size > 0)
        bw_mp_strdup(&l->via.array.ptr[0], si->bind_address, sizeof si->bind_address);
    apply_options(o, bw_mp_get(&m, "options"));
    double hooks_ms = 0;
    int started = bw_app_after_start(si->restored, bw_mp_get(&m, "env"),
                                     bw_mp_get(&m, "secrets"), &hooks_ms);
    bw_log_init("beam", o->json_logs); /* today's --json-logs and $BEAM_LOG_LEVEL */
    if (started < 0) {
        fatal(bw_app_error());
        goto out;
    }
    msgpack_sbuffer_init(&si->profile);
    pack_profile(&si->profile, bw_mp_get(&m, "profile"), hooks_ms);
    rc = 0;
out:
    msgpack_zone_destroy(&zone);
    explicit_bzero(body, len); /* it held secret values */
    free(body);
    return rc;
}

struct workers {
    pid_t pid[MAX_WORKERS];
    int n;
    /* Requests started, one slot per worker, and whether each is in a call now, in
     * memory shared with them (created after the checkpoint, so never in an image): the
     * host reports both to the supervisor, which keeps a busy replica from being retired
     * as idle, also while one call runs longer than keep_warm_seconds. */
    unsigned long long *served;
    unsigned long long *in_call;
    unsigned long long reported;
    int reported_in_call;
    double respawns[RESPAWN_MAX];
    int nrespawns;
};

static pid_t spawn_worker(const struct bw_options *o, const struct start_info *si, int index,
                          const sigset_t *orig_mask, unsigned long long *served,
                          unsigned long long *in_call) {
    bw_app_before_fork();
    pid_t pid = fork();
    if (pid != 0) {
        bw_app_after_fork(false);
        return pid;
    }
    bw_app_after_fork(true);
    bw_id_reseed(); /* sibling workers must not hand out the same task ids */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    set_handler(SIGTERM, SIG_DFL);
    set_handler(SIGINT, SIG_DFL);
    set_handler(SIGCHLD, SIG_DFL);
    sigprocmask(SIG_SETMASK, orig_mask, NULL);
    close(BW_CTL_FD);
    if (bw_app_worker_init(index, si->container_id, si->bind_address, si->restored,
                           si->profile.data, si->profile.size) < 0) {
        bw_error("worker %d: %s", index, bw_app_error());
        _exit(1);
    }
    if (served) {
        bw_worker.requests = served[index]; /* a replacement continues the count */
        bw_worker.shared_requests = &served[index];
        bw_worker.shared_in_call = &in_call[index];
    }
    int rc = bw_server_run(si->fds, si->nfds, o->max_frame, o->grace_s);
    bw_app_worker_exit();
    _exit(rc == 0 ? 0 : 1);
}

static int worker_index(const struct workers *w, pid_t pid) {
    for (int i = 0; i < w->n; i++)
        if (w->pid[i] == pid)
            return i;
    return -1;
}

static int alive(const struct workers *w) {
    int n = 0;
    for (int i = 0; i < w->n; i++)
        n += w->pid[i] > 0;
    return n;
}

/* A worker that crashes is replaced from the host's pristine post-on_start memory,
 * unless it keeps crashing: more than RESPAWN_MAX in RESPAWN_WINDOW_MS stops the host. */
static bool respawn_allowed(struct workers *w) {
    return bw_window_admit(w->respawns, &w->nrespawns, RESPAWN_MAX, RESPAWN_WINDOW_MS,
                           bw_now_ms());
}

static int reap(struct workers *w, bool stopping, const struct bw_options *o,
                const struct start_info *si, const sigset_t *orig_mask) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        int i = worker_index(w, pid);
        if (i < 0)
            continue; /* an orphan of the app's own children: reaped, as init must */
        w->pid[i] = 0;
        if (w->in_call) /* it died in a call: that call is over */
            __atomic_store_n(&w->in_call[i], 0, __ATOMIC_RELAXED);
        if (stopping)
            continue;
        char why[128];
        bw_describe_status(status, why, sizeof why);
        if (!respawn_allowed(w)) {
            bw_error("worker %d %s; too many crashes in %.0fs, stopping", i, why,
                     RESPAWN_WINDOW_MS / 1000);
            return -1;
        }
        bw_warn("worker %d %s; replacing it", i, why);
        bw_app_acquire_gil(); /* forking a Python process needs the GIL (PyOS_BeforeFork) */
        w->pid[i] = spawn_worker(o, si, i, orig_mask, w->served, w->in_call);
        bw_app_release_gil();
    }
    return 0;
}

/* Tell the supervisor when calls start or the number running changes: it counts a
 * replica with calls running as active however long they take. */
static void report_activity(struct workers *w) {
    if (!w->served)
        return;
    unsigned long long total = 0;
    int running = 0;
    for (int i = 0; i < w->n; i++) {
        total += w->served[i];
        running += __atomic_load_n(&w->in_call[i], __ATOMIC_RELAXED) != 0;
    }
    if (total == w->reported && running == w->reported_in_call)
        return;
    w->reported = total;
    w->reported_in_call = running;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msg_begin(&sb, &pk, "activity", 3);
    bw_mp_kv_int(&pk, "requests", (long long)total);
    bw_mp_kv_int(&pk, "in_call", running);
    send_msg(&sb);
}

static void signal_all(const struct workers *w, int sig) {
    for (int i = 0; i < w->n; i++)
        if (w->pid[i] > 0)
            kill(w->pid[i], sig);
}

/* A host that uses CUDA serves from its own process: a CUDA context does not survive
 * fork(), so a forked worker could not touch the GPU state on_start built. The app's
 * orphaned subprocesses are not reaped while it serves (docs/gpu.md). */
static int serve_in_process(const struct bw_options *o, const struct start_info *si,
                            const sigset_t *orig_mask) {
    set_handler(SIGTERM, SIG_DFL);
    set_handler(SIGINT, SIG_DFL);
    set_handler(SIGCHLD, SIG_DFL);
    sigprocmask(SIG_SETMASK, orig_mask, NULL);
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* the supervisor is gone: drain and stop */
    if (bw_app_worker_init(0, si->container_id, si->bind_address, si->restored,
                           si->profile.data, si->profile.size) < 0) {
        bw_error("host: %s", bw_app_error());
        return 1;
    }
    int rc = bw_server_run(si->fds, si->nfds, o->max_frame, o->grace_s);
    bw_app_worker_exit();
    return rc == 0 ? 0 : 1;
}

static int supervise(const struct bw_options *o, struct start_info *si, const sigset_t *orig) {
    struct workers w = {.n = o->workers > 0 ? o->workers : bw_app_workers()};
    if (w.n < 1)
        w.n = 1;
    if (w.n > MAX_WORKERS)
        w.n = MAX_WORKERS;
    bool in_process = bw_cuda_process_uses_gpu(0);
    if (in_process && w.n > 1)
        bw_warn("the app uses CUDA, and CUDA contexts do not survive fork(): serving from one "
                "process instead of %d workers", w.n);
    if (in_process)
        w.n = 1;
    w.served = mmap(NULL, 2 * MAX_WORKERS * sizeof *w.served, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (w.served == MAP_FAILED)
        w.served = NULL;
    else
        w.in_call = w.served + MAX_WORKERS;
    for (int i = 0; i < w.n && !in_process; i++)
        w.pid[i] = spawn_worker(o, si, i, orig, w.served, w.in_call);

    msgpack_sbuffer sb;
    msgpack_packer pk;
    msg_begin(&sb, &pk, "serving", 3);
    bw_mp_kv_int(&pk, "workers", w.n);
    bw_mp_str(&pk, "profile");
    msgpack_sbuffer_write(&sb, si->profile.data, si->profile.size);
    send_msg(&sb);
    if (in_process)
        return serve_in_process(o, si, orig);

    /* The host runs no Python from here on: let threads the app started in on_start
     * (which live in this process only: fork copies just the calling thread) run. */
    bw_app_release_gil();
    bool stopping = false;
    double deadline = 0;
    int rc = 0;
    for (;;) {
        if (got_chld) {
            got_chld = 0;
            if (reap(&w, stopping, o, si, orig) < 0) {
                rc = 1;
                got_term = 1;
            }
        }
        if (got_term && !stopping) {
            stopping = true;
            deadline = bw_now_ms() + (o->grace_s + 2) * 1000;
            for (int i = 0; i < si->nfds; i++)
                close(si->fds[i]); /* no one may queue on a socket no worker serves */
            signal_all(&w, SIGTERM);
        }
        if (stopping && alive(&w) == 0)
            return rc;
        if (stopping && bw_now_ms() > deadline) {
            signal_all(&w, SIGKILL);
            deadline = bw_now_ms() + 5000;
        }
        report_activity(&w);
        struct pollfd p = {.fd = BW_CTL_FD, .events = POLLIN};
        struct timespec ts = {0, 200 * 1000 * 1000};
        int r = ppoll(&p, stopping ? 0 : 1, &ts, orig);
        if (r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
            char buf[256];
            if (read(BW_CTL_FD, buf, sizeof buf) <= 0) {
                bw_warn("host: supervisor went away, stopping");
                got_term = 1;
            }
        }
    }
}

/* gpu= on the endpoint needs a usable GPU, asked in a child process so that this one
 * never maps the driver itself (a mapped libcuda marks a host as a CUDA process). */
static int check_gpu(const struct bw_options *o) {
    char gpu[128], why[1024] = "", names[1024] = "", msg[2400];
    bw_app_gpu(gpu, sizeof gpu);
    if (!gpu[0])
        return 0;
    if (bw_cuda_probe_isolated(why, sizeof why, names, sizeof names) > 0) {
        bw_info("gpu=\"%s\": this machine has %s", gpu, names);
        return 0;
    }
    if (o->allow_cpu) {
        bw_warn("the endpoint asks for gpu=\"%s\", but this machine has no usable GPU (%s); "
                "serving on CPU because of --allow-cpu", gpu, why);
        return 0;
    }
    snprintf(msg, sizeof msg, "the endpoint asks for gpu=\"%s\", but this machine has no usable "
             "GPU: %s. Serve it on a GPU machine, or pass --allow-cpu to serve it on CPU",
             gpu, why);
    fatal(msg);
    return -1;
}

int bw_host_main(const struct bw_options *argv_opts) {
    struct bw_options opts = *argv_opts, *o = &opts; /* a restore replaces some (start) */
    bw_log_init("beam", o->json_logs);
    setsid(); /* a session of our own: CRIU restores sessions only inside the tree */
    /* Without a PID namespace (no CAP_SYS_ADMIN) we are not PID 1: still be the init of
     * the app's process tree, so orphans of its subprocesses are reaped here. */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    set_handler(SIGTERM, on_boot_term);
    set_handler(SIGINT, on_boot_term);

    struct bw_boot_profile prof = {0};
    if (bw_app_init(o->python, o->may_checkpoint, &prof.interpreter_init_ms) < 0)
        return fatal(bw_app_error());
    if (bw_app_load(o->app, o->volume_root, &prof.import_ms) < 0)
        return fatal(bw_app_error());
    if (fetch_secrets() != 0)
        return 1;
    if (check_gpu(o) < 0)
        return 1;
    if (bw_app_on_start(&prof.on_start_ms) < 0)
        return fatal(bw_app_error());

    /* A failing before_checkpoint hook costs the checkpoint, not the service. */
    bool checkpoint = o->may_checkpoint && bw_app_checkpoint_enabled();
    const char *skipped = NULL;
    if (checkpoint && bw_app_before_checkpoint() < 0) {
        skipped = bw_app_error();
        checkpoint = false;
    }
    if (send_ready(checkpoint, skipped, &prof) < 0)
        return fatal(bw_app_error());

    /* From here until "start" arrives the supervisor may dump this process. */
    struct start_info si;
    memset(&si, 0, sizeof si);
    if (wait_start(&si, o) < 0)
        return 1;

    sigset_t block, orig;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, &orig);
    set_handler(SIGTERM, on_term);
    set_handler(SIGINT, on_term);
    set_handler(SIGCHLD, on_chld);
    return supervise(o, &si, &orig);
}
