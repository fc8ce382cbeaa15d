/* replica.c - one host process: started cold (clone into a new PID namespace, exec
 * ourselves with --host) or restored by CRIU, talked to over its control socket.
 *
 *   supervisor ──clone(CLONE_NEWPID) or CRIU restore──▶ host (PID 1 of its namespace)
 *        ◀── "ready" (config, boot profile)   [cold only; the dump happens here]
 *        ──▶ "start" (restored?, container id, secrets, listening fds, profile)
 *        ◀── "serving" (workers, full profile), then "activity" while it serves
 *
 * A restore and a dump run off the event loop (job.h): the replica is busy meanwhile,
 * and its completion comes back on the loop (restore_done, dump_done). Its GPU steps are
 * in replica_gpu.c, its channels and output forwarding in hostlog.c. What to do when a
 * replica ends, or when a restore brought nothing up, is the supervisor's call, through
 * the callbacks of fleet.h. */
#define _GNU_SOURCE
#include "replica.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "control.h"
#include "cuda_ckpt.h"
#include "environ.h"
#include "fleet.h"
#include "hostlog.h"
#include "job.h"
#include "json.h"
#include "leakscan.h"
#include "log.h"
#include "metrics.h"
#include "mp.h"
#include "replica_gpu.h"
#include "util.h"
#include "workingset.h"

const char *bw_replica_phase_name(enum bw_replica_phase p) {
    static const char *names[] = {"booting", "restoring", "serving", "stopping"};
    return names[p];
}

static void free_handle(uv_handle_t *h) { free(h); }

struct bw_replica *bw_replica_new(int id) {
    struct bw_replica *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->id = id;
    r->ctl = -1;
    r->upstream.fd = -1;
    r->timer = malloc(sizeof *r->timer);
    if (!r->timer) {
        free(r);
        return NULL;
    }
    uv_timer_init(bw_sup.loop, r->timer);
    r->timer->data = r;
    msgpack_sbuffer_init(&r->start_profile);
    msgpack_sbuffer_init(&r->profile);
    return r;
}

void bw_replica_free(struct bw_replica *r) {
    uv_close((uv_handle_t *)r->timer, free_handle);
    if (r->upstream.fd >= 0) {
        close(r->upstream.fd);
        unlink(r->upstream.unix_path);
    }
    msgpack_sbuffer_destroy(&r->start_profile);
    msgpack_sbuffer_destroy(&r->profile);
    bw_ctl_reader_reset(&r->ctl_rd);
    free(r);
}

/* ---- channels ----------------------------------------------------------------------- */

static unsigned long inode_of(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (unsigned long)st.st_ino : 0;
}

static void on_ctl(uv_poll_t *p, int status, int events);

/* Take over our ends: forward output, watch the control socket; drop the host's ends. */
static void io_attach(struct bw_replica *r, struct bw_host_io *io) {
    close(io->host_ctl);
    close(io->host_out);
    close(io->host_err);
    r->ctl = io->ctl;
    bw_hostlog_forward(bw_sup.loop, io->out_r, 1);
    bw_hostlog_forward(bw_sup.loop, io->err_r, 2);
    r->ctl_poll = malloc(sizeof *r->ctl_poll);
    uv_poll_init(bw_sup.loop, r->ctl_poll, r->ctl);
    r->ctl_poll->data = r;
    uv_poll_start(r->ctl_poll, UV_READABLE | UV_DISCONNECT, on_ctl);
}

static void io_detach(struct bw_replica *r) {
    if (r->ctl < 0)
        return;
    uv_poll_stop(r->ctl_poll);
    uv_close((uv_handle_t *)r->ctl_poll, free_handle);
    r->ctl_poll = NULL;
    close(r->ctl);
    r->ctl = -1;
    bw_ctl_reader_reset(&r->ctl_rd);
}

void bw_replica_check_ctl(struct bw_replica *r, double now) {
    /* busy: a host frozen by its dump cannot finish a message. */
    if (r->ctl < 0 || r->busy || bw_ctl_reader_age(&r->ctl_rd, now) < BW_CTL_STALL_MS)
        return;
    bw_warn("replica %d sent part of a control message and nothing for %.0f ms; closing its "
            "channel", r->id, BW_CTL_STALL_MS);
    io_detach(r); /* the host stops when its channel closes; its exit is handled when reaped */
}

void bw_replica_reaped(struct bw_replica *r) {
    r->pid = 0;
    bw_lazy_abort(&r->lazy); /* it cannot outlive the process it fills */
    uv_timer_stop(r->timer);
    io_detach(r);
}

/* ---- cold boot ---------------------------------------------------------------------- */

struct child_args {
    char **argv;
    char **envp;
    const struct bw_host_io *io;
};

static int host_child(void *arg) {
    struct child_args *a = arg;
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0 || dup2(a->io->host_out, 1) < 0 ||
        dup2(a->io->host_err, 2) < 0 || dup2(a->io->host_ctl, BW_CTL_FD) < 0)
        _exit(127);
    for (int fd = BW_CTL_FD + 1; fd < 1024; fd++)
        close(fd);
    execve(bw_sup.exe, a->argv, a->envp);
    _exit(127);
}

int bw_replica_boot_cold(struct bw_replica *r, bool may_dump) {
    const struct bw_options *o = bw_sup.o;
    struct bw_host_io io;
    r->phase = BW_R_BOOT;
    r->restored = false;
    r->may_dump = may_dump;
    r->t0 = r->last_active = bw_now_ms();
    if (bw_host_io_open(&io, true) < 0) {
        bw_error("cannot create the host's channels: %s", strerror(errno));
        return -1;
    }
    r->ids.out_ino = inode_of(io.out_r);
    r->ids.err_ino = inode_of(io.err_r);
    r->ids.ctl_ino = inode_of(io.host_ctl);

    char mf[32], gr[32], wk[16];
    snprintf(mf, sizeof mf, "%zu", o->max_frame);
    snprintf(gr, sizeof gr, "%g", o->grace_s);
    snprintf(wk, sizeof wk, "%d", o->workers);
    char *argv[24];
    int n = 0;
    argv[n++] = (char *)"beam-worker";
    argv[n++] = (char *)"--run-host";
    argv[n++] = (char *)"--python";
    argv[n++] = (char *)o->python;
    argv[n++] = (char *)"--volume-root";
    argv[n++] = (char *)o->volume_root;
    argv[n++] = (char *)"--max-frame";
    argv[n++] = mf;
    argv[n++] = (char *)"--grace";
    argv[n++] = gr;
    if (o->workers > 0) {
        argv[n++] = (char *)"--workers";
        argv[n++] = wk;
    }
    if (may_dump)
        argv[n++] = (char *)"--may-checkpoint";
    if (o->json_logs)
        argv[n++] = (char *)"--json-logs";
    if (o->allow_cpu)
        argv[n++] = (char *)"--allow-cpu";
    argv[n++] = (char *)o->app;
    argv[n] = NULL;

    char **envp = bw_env_host(NULL); /* an allow-list: environ.c says why */
    if (!envp) {
        bw_error("cannot build the host's environment: out of memory");
        bw_host_io_close(&io);
        return -1;
    }
    struct child_args a = {argv, envp, &io};
    size_t stack_size = 256 * 1024;
    char *stack = malloc(stack_size);
    /* A PID namespace of its own (docs/checkpoint.md): every restored replica gets a
     * fresh one, so many can run from one image at the same time. */
    int flags = SIGCHLD | (bw_sup.use_ns ? CLONE_NEWPID : 0);
    pid_t pid = stack ? clone(host_child, stack + stack_size, flags, &a) : -1;
    free(stack);
    free(envp);
    if (pid < 0) {
        bw_error("cannot start the host: %s", strerror(errno));
        bw_host_io_close(&io);
        return -1;
    }
    r->pid = pid;
    io_attach(r, &io);
    return 0;
}

/* ---- messages ----------------------------------------------------------------------- */

/* The values of the secrets named in `names` (an array of str), read from our
 * environment now: a restore gets today's values, never those of the image's start.
 * Only declared names are asked for; the HTTP front's token is never given out. */
static void pack_secrets(msgpack_packer *pk, const msgpack_object *names) {
    char name[256];
    bool list = names && names->type == MSGPACK_OBJECT_ARRAY;
    uint32_t nset = 0;
    for (uint32_t i = 0; list && i < names->via.array.size; i++)
        if (bw_mp_strdup(&names->via.array.ptr[i], name, sizeof name) && getenv(name) &&
            strcmp(name, "BEAM_AUTH_TOKEN") != 0)
            nset++;
    msgpack_pack_map(pk, nset);
    for (uint32_t i = 0; list && i < names->via.array.size; i++) {
        if (!bw_mp_strdup(&names->via.array.ptr[i], name, sizeof name) ||
            strcmp(name, "BEAM_AUTH_TOKEN") == 0)
            continue;
        const char *v = getenv(name);
        if (v)
            bw_mp_kv_str(pk, name, v);
        else
            bw_warn("secret %s is not set in the environment", name);
    }
}

/* Pack the secrets the endpoint's configuration declares. */
static void pack_config_secrets(msgpack_packer *pk) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    pack_secrets(pk, bw_mp_get(bw_fleet_config(&z), "secrets"));
    msgpack_zone_destroy(&z);
}

/* Send a message that holds secret values, then wipe our copy of it. */
static void send_wiped(struct bw_replica *r, msgpack_sbuffer *sb, const int *fds, int nfds,
                       const char *what) {
    if (bw_ctl_send(r->ctl, sb->data, sb->size, fds, nfds) < 0)
        bw_error("replica %d: cannot send %s: %s", r->id, what, strerror(errno));
    explicit_bzero(sb->data, sb->size);
    msgpack_sbuffer_destroy(sb);
}

/* A cold host asks for its secrets once it knows their names, before on_start. */
static void send_secrets(struct bw_replica *r, const msgpack_object *names) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    bw_mp_kv_str(&pk, "t", "secrets");
    bw_mp_str(&pk, "secrets");
    pack_secrets(&pk, names);
    send_wiped(r, &sb, NULL, 0, "secrets");
}

/* Today's options, for a restored host whose own were frozen at its cold boot. */
static void pack_options(msgpack_packer *pk) {
    const struct bw_options *o = bw_sup.o;
    msgpack_pack_map(pk, 5);
    bw_mp_kv_int(pk, "max_frame", (long long)o->max_frame);
    bw_mp_kv_double(pk, "grace_s", o->grace_s);
    bw_mp_kv_int(pk, "workers", o->workers);
    bw_mp_kv_bool(pk, "json_logs", o->json_logs);
    bw_mp_kv_bool(pk, "allow_cpu", o->allow_cpu);
}

static void send_start(struct bw_replica *r) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    char cid[BW_ID_LEN];
    bw_id_new(cid);
    msgpack_pack_map(&pk, 8);
    bw_mp_kv_str(&pk, "t", "start");
    bw_mp_kv_bool(&pk, "restored", r->restored);
    bw_mp_kv_str(&pk, "container_id", cid);
    bw_mp_str(&pk, "env");
    bw_env_pack_host(&pk);
    bw_mp_str(&pk, "secrets");
    pack_config_secrets(&pk);
    bw_mp_str(&pk, "options");
    pack_options(&pk);

    int fds[BW_CTL_MAX_FDS], nfds = 0;
    bool up = r->upstream.fd >= 0;
    bw_mp_str(&pk, "listeners");
    msgpack_pack_array(&pk, (size_t)(bw_sup.nl + up));
    for (int i = 0; i < bw_sup.nl && nfds < BW_CTL_MAX_FDS; i++) {
        bw_mp_str(&pk, bw_sup.l[i].address);
        fds[nfds++] = bw_sup.l[i].fd;
    }
    if (up && nfds < BW_CTL_MAX_FDS) {
        bw_mp_str(&pk, r->upstream.address);
        fds[nfds++] = r->upstream.fd;
    }
    bw_mp_str(&pk, "profile");
    msgpack_sbuffer_write(&sb, r->start_profile.data, r->start_profile.size);
    send_wiped(r, &sb, fds, nfds, "start");
}

static char *profile_json(const msgpack_object *p) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return NULL;
    if (p)
        bw_json_write_object(f, p);
    else
        fputs("{}", f);
    fclose(f);
    return buf;
}

static void checkpoint_failed(const char *what, const char *err) {
    /* A failed checkpoint never costs the user a serving worker (docs/checkpoint.md). */
    bw_warn("%s failed, serving without %s: %s", what,
            strcmp(what, "checkpoint") == 0 ? "one" : "a checkpoint", err);
    bw_warn("next starts boot cold; pass --retry-checkpoint to try again");
    bw_metrics_dump(false, 0, 0);
    bw_ckpt_mark_failed(&bw_sup.ck, err);
}

/* ---- dump (off the loop: job.h) ----------------------------------------------------- */

#define MAX_SECRETS 64

/* A dump: its inputs are copied on the loop before it starts, so that dump_work reads
 * nothing the loop may change meanwhile (bw_sup.config, the environment). */
struct dump_job {
    struct bw_job job;
    struct bw_replica *r;
    pid_t pid;
    struct bw_ckpt_ids ids;
    char *config, *profile_json;
    size_t config_len;
    char *secret_name[MAX_SECRETS], *secret_value[MAX_SECRETS]; /* searched for in the image */
    size_t nsecrets;
    msgpack_sbuffer body; /* the start profile's entries so far (nentries of them) */
    int nentries;
    /* results */
    int gpu;              /* bw_gpu_checkpoint's answer, 0 for a host without CUDA */
    struct bw_cuda_times gt;
    int rc;               /* bw_ckpt_dump's */
    double ms;
    unsigned long long bytes;
    const char *failed;   /* the step that failed: "GPU checkpoint", "checkpoint"; or NULL */
    bool resume_failed;   /* the host cannot get its GPU state back */
    char err[1024], gerr[1024];
};

/* The declared secrets whose values the image must not hold, copied. Values shorter than
 * 8 bytes would match by chance and are not searched for. */
static int copy_secrets(struct dump_job *d) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    const msgpack_object *names = bw_mp_get(bw_fleet_config(&z), "secrets");
    char name[256];
    int rc = 0;
    for (uint32_t i = 0; names && names->type == MSGPACK_OBJECT_ARRAY &&
                         i < names->via.array.size && d->nsecrets < MAX_SECRETS && rc == 0; i++) {
        const char *v = bw_mp_strdup(&names->via.array.ptr[i], name, sizeof name) ? getenv(name)
                                                                                  : NULL;
        if (v && strlen(v) < 8) {
            bw_warn("secret %s is shorter than 8 bytes: the image is not searched for it", name);
        } else if (v) {
            d->secret_name[d->nsecrets] = strdup(name);
            d->secret_value[d->nsecrets] = strdup(v);
            if (!d->secret_name[d->nsecrets] || !d->secret_value[d->nsecrets])
                rc = -1;
            d->nsecrets++; /* counted even when a copy failed: dump_job_free frees it */
        }
    }
    msgpack_zone_destroy(&z);
    return rc;
}

static void dump_job_free(struct dump_job *d) {
    for (size_t i = 0; i < d->nsecrets; i++) {
        if (d->secret_value[i])
            explicit_bzero(d->secret_value[i], strlen(d->secret_value[i]));
        free(d->secret_name[i]);
        free(d->secret_value[i]);
    }
    free(d->config);
    free(d->profile_json);
    msgpack_sbuffer_destroy(&d->body);
    free(d);
}

/* Whether the image just written holds the value of a declared secret (the app or a
 * library kept a copy past on_start): 0 if not; else -1 with the reason, naming the
 * secret, never its value. */
static int image_holds_secret(struct dump_job *d) {
    if (d->nsecrets == 0)
        return 0;
    char img[PATH_MAX + 210], file[256];
    size_t which = 0;
    snprintf(img, sizeof img, "%s/img", bw_sup.ck.dir);
    int rc = bw_leakscan_dir(img, (const char **)d->secret_value, d->nsecrets, &which, file,
                             sizeof file);
    if (rc > 0)
        snprintf(d->err, sizeof d->err, "the value of secret %s is in the image (%s): the app "
                 "or a library kept a copy past on_start; read it in the handler or an "
                 "@after_restore hook instead", d->secret_name[which], file);
    else if (rc < 0)
        snprintf(d->err, sizeof d->err, "cannot search the image for secrets: %s: %s", file,
                 strerror(errno));
    return rc == 0 ? 0 : -1;
}

/* Off the loop. A host that uses CUDA: its GPU state goes into host memory first, so the
 * CRIU image carries it; the supervisor drives this from outside (a lock blocks the
 * target's own CUDA calls). A failure here keeps it serving, without an image. */
static void dump_work(struct bw_job *j) {
    struct dump_job *d = (struct dump_job *)j;
    msgpack_sbuffer gmeta;
    msgpack_sbuffer_init(&gmeta);
    d->gpu = bw_cuda_process_uses_gpu(d->pid)
                 ? bw_gpu_checkpoint(d->pid, &d->gt, &gmeta, d->err, sizeof d->err)
                 : 0;
    if (d->gpu < 0) {
        d->failed = "GPU checkpoint";
        msgpack_sbuffer_destroy(&gmeta);
        return;
    }
    d->rc = bw_ckpt_dump(&bw_sup.ck, d->pid, &d->ids, d->config, d->config_len, bw_sup.o->app,
                         d->profile_json, d->gpu ? gmeta.data : NULL, gmeta.size, &d->ms,
                         &d->bytes, d->err, sizeof d->err);
    msgpack_sbuffer_destroy(&gmeta);
    /* The lock's bound also bounds waiting for RUNNING after the unlock. */
    if (d->gpu && bw_cuda_resume(d->pid, bw_sup.o->cuda_lock_timeout_s, &d->gt, d->gerr,
                                 sizeof d->gerr) < 0) {
        d->resume_failed = true;
        return;
    }
    if (d->rc == 0) {
        char imgdir[sizeof bw_sup.ck.dir + 8];
        snprintf(imgdir, sizeof imgdir, "%s/img", bw_sup.ck.dir);
        bw_ws_check_dump(imgdir);
    }
    if (d->rc == 0 && image_holds_secret(d) < 0) {
        bw_ckpt_discard(&bw_sup.ck);
        d->rc = -1;
    }
    if (d->rc < 0)
        d->failed = "checkpoint";
}

/* The profile of a cold start is complete: keep it and send "start". */
static void send_ready_start(struct bw_replica *r, const msgpack_sbuffer *body, int n) {
    msgpack_sbuffer_clear(&r->start_profile);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &r->start_profile, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, (size_t)n);
    msgpack_sbuffer_write(&r->start_profile, body->data, body->size);
    send_start(r);
}

static void stop_now(struct bw_replica *r, double grace_s);

/* On the loop. Appends the checkpoint's phases to the start profile, then sends "start". */
static void dump_done(struct bw_job *j) {
    struct dump_job *d = (struct dump_job *)j;
    struct bw_replica *r = d->r;
    msgpack_packer pk;
    msgpack_packer_init(&pk, &d->body, msgpack_sbuffer_write);
    r->busy = false;
    if (d->resume_failed) {
        /* It cannot use its GPU state again: a replica takes its place (from the image
         * just written, else cold). */
        bw_error("the host cannot get its GPU state back after the checkpoint: %s; replacing it",
                 d->gerr);
        if (d->rc < 0)
            bw_ckpt_mark_failed(&bw_sup.ck, d->err);
        bw_sup.gpu_resume_failed = true;
        r->replace = true;
        kill(r->pid, SIGKILL);
    } else if (d->failed) {
        checkpoint_failed(d->failed, d->err);
    } else {
        bw_info("checkpoint written: %s (%.1f MiB in %.0f ms)", bw_sup.ck.dir,
                (double)d->bytes / 1048576.0, d->ms);
        bw_metrics_dump(true, d->bytes, d->ms);
        bw_store_publish(&bw_sup.store, &bw_sup.ck); /* in a child: the loop goes on */
        bw_mp_kv_double(&pk, "checkpoint_ms", d->ms);
        bw_mp_kv_int(&pk, "image_bytes", (long long)d->bytes);
        d->nentries += 2;
        if (d->gpu) {
            bw_gpu_pack_dump_times(&pk, &d->gt);
            d->nentries += BW_GPU_DUMP_ENTRIES;
        }
    }
    if (r->phase == BW_R_STOPPING) /* asked to stop during the dump */
        stop_now(r, bw_sup.o->grace_s);
    else if (!r->replace)
        send_ready_start(r, &d->body, d->nentries);
    dump_job_free(d);
}

/* Dump the host while it waits for "start", off the loop; dump_done sends "start". The
 * profile being built (body, n entries) goes with the job. 0, or -1: nothing started
 * (the dump is skipped, body is left to the caller). */
static int do_checkpoint(struct bw_replica *r, const msgpack_object *prof,
                         msgpack_sbuffer *body, int n) {
    struct dump_job *d = calloc(1, sizeof *d);
    if (!d)
        return -1;
    d->job.work = dump_work;
    d->job.done = dump_done;
    d->r = r;
    d->pid = r->pid;
    d->ids = r->ids;
    d->profile_json = profile_json(prof);
    d->config = bw_sup.config ? malloc(bw_sup.config_len) : NULL;
    d->config_len = bw_sup.config_len;
    msgpack_sbuffer_init(&d->body);
    if (!d->profile_json || (bw_sup.config && !d->config) || copy_secrets(d) < 0) {
        dump_job_free(d);
        return -1;
    }
    if (d->config)
        memcpy(d->config, bw_sup.config, bw_sup.config_len);
    msgpack_sbuffer swap = d->body; /* the job owns the profile once it starts */
    d->body = *body;
    *body = swap;
    d->nentries = n;
    if (bw_job_start(bw_sup.loop, &d->job) < 0) {
        swap = d->body;
        d->body = *body;
        *body = swap;
        dump_job_free(d);
        return -1;
    }
    r->busy = true;
    bw_info("checkpointing %s ...", bw_sup.o->app);
    return 0;
}

/* Say once, by name only, which variables of the caller's environment the app does not
 * see: a user who exported MODEL_NAME and reads it in on_start learns why it is unset. */
static void report_dropped_env(const msgpack_object *cfg) {
    static bool reported;
    const char *declared[128];
    size_t nd = 0;
    const char *keys[] = {"secrets", "env_keys"};
    if (reported)
        return;
    reported = true;
    char names[128][256];
    for (size_t k = 0; k < 2; k++) {
        const msgpack_object *a = bw_mp_get(cfg, keys[k]);
        for (uint32_t i = 0; a && a->type == MSGPACK_OBJECT_ARRAY && i < a->via.array.size &&
                             nd < 128; i++)
            if (bw_mp_strdup(&a->via.array.ptr[i], names[nd], sizeof names[nd]))
                declared[nd] = names[nd], nd++;
    }
    char list[1024];
    size_t n = bw_env_dropped(declared, nd, list, sizeof list);
    if (n > 0)
        bw_info("%zu environment variable(s) not passed to the app (declare them with "
                "env=/secrets=, or --pass-env NAME): %s", n, list);
}

static void handle_ready(struct bw_replica *r, const msgpack_object *m) {
    const msgpack_object *cfg = bw_mp_get(m, "config"), *prof = bw_mp_get(m, "profile");
    if (cfg) {
        bw_sup.owner->set_config(cfg);
        report_dropped_env(cfg);
    }

    /* Profile: the host's boot phases, then ours. Built as entries, counted at the end. */
    msgpack_sbuffer body;
    msgpack_sbuffer_init(&body);
    msgpack_packer bp;
    msgpack_packer_init(&bp, &body, msgpack_sbuffer_write);
    int n = 1;
    bw_mp_kv_str(&bp, "mode", "cold");
    n += (int)bw_mp_pack_entries(&bp, prof);
    const msgpack_object *skipped = bw_mp_get(m, "checkpoint_error");
    if (skipped && skipped->type == MSGPACK_OBJECT_STR && r->may_dump) {
        char why[2048];
        bw_mp_strdup(skipped, why, sizeof why);
        bw_warn("not checkpointing, serving without one: %s", why);
        bw_ckpt_mark_failed(&bw_sup.ck, why);
    } else if (bw_mp_true(bw_mp_get(m, "checkpoint")) && r->may_dump) {
        if (do_checkpoint(r, prof, &body, n) == 0)
            return; /* dump_done sends "start" */
        checkpoint_failed("checkpoint", "cannot start the dump off the event loop (out of memory)");
    }
    send_ready_start(r, &body, n);
    msgpack_sbuffer_destroy(&body);
}

static void print_profile(const struct bw_replica *r, const msgpack_object *p) {
    char line[1024] = "";
    size_t o = 0;
    double ready = bw_now_ms() - r->t0;
    if (p && p->type == MSGPACK_OBJECT_MAP)
        for (uint32_t i = 0; i < p->via.map.size && o < sizeof line - 64; i++) {
            const msgpack_object_kv *kv = &p->via.map.ptr[i];
            if (kv->key.type != MSGPACK_OBJECT_STR)
                continue;
            int kl = (int)kv->key.via.str.size;
            const char *k = kv->key.via.str.ptr;
            if (kv->val.type == MSGPACK_OBJECT_STR)
                o += (size_t)snprintf(line + o, sizeof line - o, "%.*s=%.*s ", kl, k,
                                      (int)kv->val.via.str.size, kv->val.via.str.ptr);
            else if (kl > 3 && memcmp(k + kl - 3, "_ms", 3) == 0)
                o += (size_t)snprintf(line + o, sizeof line - o, "%.*s=%.1fms ", kl - 3, k,
                                      bw_mp_num(&kv->val, 0));
            else
                o += (size_t)snprintf(line + o, sizeof line - o, "%.*s=%.0f ", kl, k,
                                      bw_mp_num(&kv->val, 0));
        }
    bw_info("start profile: %sready=%.1fms", line, ready);
}

/* The complete profile, as the host sent it, plus the time to ready. */
static void keep_profile(struct bw_replica *r, const msgpack_object *p) {
    msgpack_sbuffer_clear(&r->profile);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &r->profile, msgpack_sbuffer_write);
    bw_mp_pack_map_plus(&pk, p, 1);
    bw_mp_kv_double(&pk, "ready_ms", bw_now_ms() - r->t0);
}

static void handle_serving(struct bw_replica *r, const msgpack_object *m) {
    const msgpack_object *p = bw_mp_get(m, "profile");
    r->phase = BW_R_SERVING;
    r->last_active = bw_now_ms();
    r->workers = (int)bw_mp_num(bw_mp_get(m, "workers"), 1);
    uv_timer_stop(r->timer);
    print_profile(r, p);
    keep_profile(r, p);
    bw_info("ready: %d worker(s) serving %s", r->workers,
            r->restored ? "(restored from checkpoint)" : "(cold boot)");
    bw_sup.owner->serving(r);
}

static void on_ctl(uv_poll_t *p, int status, int events) {
    (void)events;
    struct bw_replica *r = p->data;
    char *body = NULL;
    size_t len = 0;
    int rc = status < 0 ? -1 : bw_ctl_read_some(&r->ctl_rd, r->ctl, &body, &len);
    if (rc < 0) {
        io_detach(r); /* the host is gone or going; its exit is handled when reaped */
        return;
    }
    if (rc == 0) /* the rest when it comes; bw_replica_check_ctl bounds the wait */
        return;
    msgpack_zone z;
    msgpack_zone_init(&z, 4096);
    msgpack_object m;
    if (bw_mp_unpack_exact(body, len, &z, &m) == 0) {
        const msgpack_object *t = bw_mp_get(&m, "t");
        if (bw_mp_is_str(t, "activity")) {
            r->last_active = bw_now_ms();
            r->requests = (unsigned long long)bw_mp_num(bw_mp_get(&m, "requests"), 0);
            r->in_call = (int)bw_mp_num(bw_mp_get(&m, "in_call"), 0);
        } else if (bw_mp_is_str(t, "need_secrets")) {
            send_secrets(r, bw_mp_get(&m, "names"));
        } else if (bw_mp_is_str(t, "ready")) {
            handle_ready(r, &m);
        } else if (bw_mp_is_str(t, "serving")) {
            handle_serving(r, &m);
        } else if (bw_mp_is_str(t, "fatal")) {
            const msgpack_object *msg = bw_mp_get(&m, "message");
            if (msg && msg->type == MSGPACK_OBJECT_STR)
                bw_error("%.*s", (int)msg->via.str.size, msg->via.str.ptr);
        }
    }
    msgpack_zone_destroy(&z);
    free(body);
}

/* ---- restore (off the loop: job.h) -------------------------------------------------- */

static void on_restore_timeout(uv_timer_t *t) {
    struct bw_replica *r = t->data;
    if (r->phase != BW_R_RESTORE || r->pid <= 0)
        return;
    bw_warn("restored replica did not become ready in %gs; killing it",
            bw_sup.o->restore_timeout_s);
    kill(r->pid, SIGKILL);
}

/* auto restores lazily from this image size up. Below it, starting the page daemon
 * costs more than it saves: bench/coldstart.py, docs/performance.md (113 MiB: eager
 * 80 ms, lazy 92 ms; 520 MiB: eager 240 ms, lazy 80 ms). */
#define LAZY_MIN_BYTES (256ull << 20)

/* Whether a lazy restore may be tried: where it works and has not failed here. Asked on
 * the loop, which owns bw_sup.lazy_broken; the image's size is weighed in the job. */
static bool lazy_allowed(void) {
    static bool said;
    enum bw_restore_mode m = bw_sup.o->restore_mode;
    if (m == BW_RESTORE_EAGER || bw_sup.lazy_broken)
        return false;
    if (bw_lazy_supported())
        return true;
    if (m == BW_RESTORE_LAZY && !said)
        bw_warn("--restore lazy: this kernel offers no non-cooperative userfaultfd; "
                "restoring eagerly");
    said = true;
    return false;
}

struct restore_job {
    struct bw_job job;
    struct bw_replica *r;
    bool lazy_allowed;        /* in: lazy_allowed() on the loop */
    ino_t image;              /* in: image_id() of the image it restores */
    struct bw_host_io io;     /* in: the fresh channels criu hands the host */
    /* results */
    struct bw_ckpt_image img;
    bool loaded, gpu;
    const char *reason;       /* NULL, or the label of beam_restore_failures_total */
    const char *what;         /* what failed, for the log */
    char err[1024];
    bool lazy_failed;         /* a lazy restore failed (lazy_err), then eager was tried */
    char lazy_err[1024];
    int mode;                 /* 1 lazy, 0 eager */
    pid_t pid;
    struct bw_lazy lz;        /* copied into the replica by restore_done */
    struct bw_gpu_restore g;
    double restore_ms, restored_at;
};

/* CRIU restore, lazy or eager; a failed lazy restore is retried eagerly at once.
 * 1 lazy, 0 eager, -1 failed. */
static int criu_restore(struct restore_job *rj) {
    const struct bw_host_io *io = &rj->io;
    if (rj->lazy_allowed &&
        (bw_sup.o->restore_mode != BW_RESTORE_AUTO || rj->img.bytes >= LAZY_MIN_BYTES)) {
        if (bw_lazy_restore(&bw_sup.ck, &rj->img, io->host_out, io->host_err, io->host_ctl,
                            &rj->pid, &rj->lz, rj->lazy_err, sizeof rj->lazy_err) == 0) {
            if (rj->lz.pager == 0) /* every page was in before the restore returned */
                bw_lazy_finished(&rj->lz, NULL); /* off the loop already */
            return 1;
        }
        rj->lazy_failed = true;
    }
    return bw_ckpt_restore(&bw_sup.ck, &rj->img, io->host_out, io->host_err, io->host_ctl,
                           &rj->pid, rj->err, sizeof rj->err);
}

/* Off the loop: check the image (its hash over every file), check its GPUs, restore it
 * with CRIU, bring its GPU state back. Everything that takes time in a restore. */
static void restore_work(struct bw_job *j) {
    struct restore_job *rj = (struct restore_job *)j;
    if (bw_ckpt_load(&bw_sup.ck, &rj->img, rj->err, sizeof rj->err) < 0) {
        rj->reason = "unusable";
        rj->what = "checkpoint unusable";
        return;
    }
    rj->loaded = true;
    /* An image with GPU state needs the same GPUs here (other cards of the same type are
     * remapped by UUID). Checked before CRIU does any work. */
    rj->gpu = rj->img.gpu != NULL;
    if (rj->gpu && bw_gpu_compat(&rj->img, &rj->g, rj->err, sizeof rj->err) < 0) {
        rj->reason = "gpu_incompatible";
        rj->what = "made on an incompatible machine: its GPU state cannot be restored here";
        return;
    }
    double t = bw_now_ms();
    rj->mode = criu_restore(rj);
    rj->restored_at = bw_now_ms();
    rj->restore_ms = rj->restored_at - t;
    if (rj->mode == BW_CKPT_CORRUPT) { /* the page data's check failed; the host is dead */
        rj->reason = "unusable";
        rj->what = "checkpoint unusable";
    } else if (rj->mode < 0) {
        rj->reason = "criu";
        rj->what = "restore failed";
    } else if (rj->gpu && bw_gpu_restore(rj->pid, &rj->g, rj->err, sizeof rj->err) < 0) {
        /* Left CHECKPOINTED or LOCKED its first CUDA call would hang: it is gone. */
        bw_lazy_abort(&rj->lz);
        rj->reason = "gpu_restore";
        rj->what = "GPU restore failed";
    }
}

/* Which image <key>/ is: a dump publishes a new one by rename, so a new directory. */
static ino_t image_id(void) {
    struct stat st;
    return stat(bw_sup.ck.dir, &st) == 0 ? st.st_ino : 0;
}

static void restore_job_free(struct restore_job *rj) {
    if (rj->loaded)
        bw_ckpt_image_free(&rj->img);
    free(rj);
}

/* Nothing runs: the image goes (the next start makes a new one), the supervisor boots a
 * cold host in this replica's place. */
static void restore_failed(struct restore_job *rj) {
    struct bw_replica *r = rj->r;
    if (!rj->loaded)
        bw_warn("checkpoint unusable (%s); discarding it and booting cold", rj->err);
    else
        bw_warn("%s (%s); discarding the checkpoint and booting cold", rj->what, rj->err);
    bw_metrics_restore_failure(rj->reason);
    bw_host_io_close(&rj->io);
    if (strcmp(rj->reason, "gpu_restore") == 0 && bw_sup.gpu_resume_failed)
        bw_ckpt_mark_failed(&bw_sup.ck, rj->err); /* GPU restores keep failing: stop dumping */
    if (image_id() == rj->image) /* not a newer one, dumped while this restore ran */
        bw_ckpt_discard(&bw_sup.ck);
    restore_job_free(rj);
    bw_sup.owner->restored(r, false);
}

/* The start profile of a restored host: what this supervisor measured. */
static void pack_restore_profile(struct bw_replica *r, const struct restore_job *rj) {
    msgpack_sbuffer_clear(&r->start_profile);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &r->start_profile, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, rj->gpu ? 4 + BW_GPU_RESTORE_ENTRIES : 4);
    bw_mp_kv_str(&pk, "mode", "restore");
    bw_mp_kv_str(&pk, "restore", rj->mode == 1 ? "lazy" : "eager");
    bw_mp_kv_double(&pk, "criu_restore_ms", rj->restore_ms);
    bw_mp_kv_int(&pk, "image_bytes", (long long)rj->img.bytes);
    if (rj->gpu)
        bw_gpu_pack_restore_times(&pk, &rj->g.t);
}

/* On the loop, once restore_work returned. */
static void restore_done(struct bw_job *j) {
    struct restore_job *rj = (struct restore_job *)j;
    struct bw_replica *r = rj->r;
    r->busy = false;
    if (rj->lazy_failed) {
        bw_warn("lazy restore failed (%s); restoring eagerly from now on", rj->lazy_err);
        bw_sup.lazy_broken = true;
    }
    if (rj->reason) {
        restore_failed(rj);
        return;
    }
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object cfg;
    if (bw_mp_unpack_exact(rj->img.config, rj->img.config_len, &z, &cfg) == 0)
        bw_sup.owner->set_config(&cfg);
    msgpack_zone_destroy(&z);
    r->pid = rj->pid;
    r->lazy = rj->lz;
    r->restored = true;
    r->restored_at = rj->restored_at;
    io_attach(r, &rj->io);
    pack_restore_profile(r, rj);
    restore_job_free(rj);
    if (r->phase == BW_R_STOPPING) { /* asked to stop meanwhile: it never served */
        kill(r->pid, SIGKILL);
    } else {
        send_start(r);
        uv_timer_start(r->timer, on_restore_timeout,
                       (uint64_t)(bw_sup.o->restore_timeout_s * 1000), 0);
    }
    bw_sup.owner->restored(r, true);
}

int bw_replica_restore(struct bw_replica *r) {
    struct restore_job *rj = calloc(1, sizeof *rj);
    if (!rj)
        return -1;
    if (bw_host_io_open(&rj->io, false) < 0) {
        bw_error("cannot create the host's channels: %s", strerror(errno));
        free(rj);
        return -1;
    }
    rj->job.work = restore_work;
    rj->job.done = restore_done;
    rj->r = r;
    rj->lazy_allowed = lazy_allowed();
    rj->image = image_id();
    r->t0 = r->last_active = bw_now_ms();
    r->phase = BW_R_RESTORE;
    if (bw_job_start(bw_sup.loop, &rj->job) < 0) {
        bw_host_io_close(&rj->io);
        free(rj);
        return -1;
    }
    r->busy = true;
    return 0;
}

/* ---- lazy restore's page daemon ------------------------------------------------------ */

void bw_replica_check_pager(struct bw_replica *r, double now) {
    char err[320];
    if (bw_lazy_pages_corrupt(&r->lazy, err, sizeof err) && r->pid > 0) {
        bw_error("replica %d: checkpoint unusable (%s, found while it served); killing it, "
                 "discarding the checkpoint and booting cold", r->id, err);
        bw_metrics_restore_failure("unusable");
        bw_ckpt_discard(&bw_sup.ck);
        r->replace = true;
        kill(r->pid, SIGKILL);
    }
    if (r->lazy.pager <= 0 || now - r->restored_at < bw_sup.o->restore_timeout_s * 1000)
        return;
    bw_error("replica %d: the page daemon has not filled its memory in %gs; killing both, "
             "restoring eagerly from now on", r->id, bw_sup.o->restore_timeout_s);
    bw_sup.lazy_broken = true;
    kill(r->lazy.pager, SIGKILL); /* reaped, and so handled, like any pager exit */
}

void bw_replica_pager_exited(struct bw_replica *r, int status) {
    r->lazy.pager = 0;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        bw_info("replica %d: all memory in %.0f ms after its lazy restore", r->id,
                bw_now_ms() - r->restored_at);
        bw_lazy_finished(&r->lazy, bw_sup.loop); /* its slow part as a job */
        return;
    }
    char why[128];
    bw_describe_status(status, why, sizeof why);
    /* Pages it never delivered would read as zeros: the replica must not answer again. */
    bw_error("replica %d: the page daemon %s before all memory was in (log: %s); killing the "
             "replica, restoring eagerly from now on", r->id, why, r->lazy.workdir);
    bw_sup.lazy_broken = true;
    if (r->pid > 0) {
        r->replace = true;
        kill(r->pid, SIGKILL);
    }
}

/* ---- stopping ----------------------------------------------------------------------- */

static void on_stop_timeout(uv_timer_t *t) {
    struct bw_replica *r = t->data;
    if (r->pid > 0) {
        bw_warn("replica %d did not stop in time; killing it", r->id);
        kill(r->pid, SIGKILL);
    }
}

static void stop_now(struct bw_replica *r, double grace_s) {
    r->phase = BW_R_STOPPING;
    kill(r->pid, SIGTERM);
    uv_timer_stop(r->timer);
    uv_timer_start(r->timer, on_stop_timeout, (uint64_t)((grace_s + 5) * 1000), 0);
}

void bw_replica_stop(struct bw_replica *r, double grace_s) {
    if (r->busy) { /* mid-restore or mid-dump: its job's done() stops it */
        r->phase = BW_R_STOPPING;
        return;
    }
    if (r->pid <= 0)
        return;
    if (r->phase == BW_R_STOPPING) {
        kill(r->pid, SIGKILL); /* asked twice: no more waiting */
        return;
    }
    stop_now(r, grace_s);
}
