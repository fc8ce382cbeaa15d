/* replica.c - one host process: started cold (clone into a new PID namespace, exec
 * ourselves with --host) or restored by CRIU, talked to over its control socket.
 *
 *   supervisor ──clone(CLONE_NEWPID) or CRIU restore──▶ host (PID 1 of its namespace)
 *        ◀── "ready" (config, boot profile)   [cold only; the dump happens here]
 *        ──▶ "start" (restored?, container id, secrets, listening fds, profile)
 *        ◀── "serving" (workers, full profile), then "activity" while it serves
 *
 * What to do when a replica ends is the supervisor's call (bw_sup_replica_*). */
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
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "control.h"
#include "cuda_ckpt.h"
#include "environ.h"
#include "fleet.h"
#include "json.h"
#include "leakscan.h"
#include "log.h"
#include "metrics.h"
#include "mp.h"
#include "output.h"
#include "util.h"

struct host_io {
    int ctl;                          /* our end of the control socket */
    int host_ctl, host_out, host_err; /* the host's ends, until handed over */
    int out_r, err_r;                 /* our read ends of its stdout/stderr */
};

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
    free(r);
}

/* ---- channels ----------------------------------------------------------------------- */

static int io_open(struct host_io *io, bool cloexec_host_ends) {
    int sv[2], out[2], err[2];
    int fl = cloexec_host_ends ? O_CLOEXEC : 0;
    if (socketpair(AF_UNIX, SOCK_STREAM | (cloexec_host_ends ? SOCK_CLOEXEC : 0), 0, sv) < 0)
        return -1;
    if (pipe2(out, fl) < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pipe2(err, fl) < 0) {
        close(sv[0]);
        close(sv[1]);
        close(out[0]);
        close(out[1]);
        return -1;
    }
    io->ctl = sv[0];
    io->host_ctl = sv[1];
    io->out_r = out[0];
    io->host_out = out[1];
    io->err_r = err[0];
    io->host_err = err[1];
    fcntl(io->ctl, F_SETFD, FD_CLOEXEC);
    fcntl(io->out_r, F_SETFD, FD_CLOEXEC);
    fcntl(io->err_r, F_SETFD, FD_CLOEXEC);
    return 0;
}

static void io_close_fds(struct host_io *io) {
    int fds[] = {io->ctl, io->host_ctl, io->host_out, io->host_err, io->out_r, io->err_r};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
        close(fds[i]);
}

static unsigned long inode_of(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (unsigned long)st.st_ino : 0;
}

/* Never a blocking write here: a reader of our stdout that stops reading would stall
 * the whole event loop (output.c queues, then drops and counts). The host's pipe is
 * always drained, so the host never blocks either. */
static void on_output(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    int fd = (int)(intptr_t)s->data;
    if (nread > 0)
        bw_output_write(fd, buf->base, (size_t)nread);
    free(buf->base);
    if (nread < 0)
        uv_close((uv_handle_t *)s, free_handle);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

/* Forward one of the host's output pipes to our own fd (1 or 2). Handles are per host:
 * a previous host's may still be draining when the next one starts. */
static void forward_output(int pipe_fd, int to) {
    uv_pipe_t *p = malloc(sizeof *p);
    if (!p || uv_pipe_init(bw_sup.loop, p, 0) < 0) {
        free(p);
        close(pipe_fd);
        return;
    }
    p->data = (void *)(intptr_t)to;
    if (uv_pipe_open(p, pipe_fd) < 0 || uv_read_start((uv_stream_t *)p, on_alloc, on_output) < 0)
        uv_close((uv_handle_t *)p, free_handle);
}

static void on_ctl(uv_poll_t *p, int status, int events);

/* Take over our ends: forward output, watch the control socket; drop the host's ends. */
static void io_attach(struct bw_replica *r, struct host_io *io) {
    close(io->host_ctl);
    close(io->host_out);
    close(io->host_err);
    r->ctl = io->ctl;
    forward_output(io->out_r, 1);
    forward_output(io->err_r, 2);
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
    const struct host_io *io;
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
    struct host_io io;
    r->phase = BW_R_BOOT;
    r->restored = false;
    r->may_dump = may_dump;
    r->t0 = r->last_active = bw_now_ms();
    if (io_open(&io, true) < 0) {
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
        io_close_fds(&io);
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
        io_close_fds(&io);
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

/* The host's GPU state before the CRIU dump (docs/gpu.md): 1 checkpointed (meta gets
 * the GPU list for restores), 0 nothing to save, -1 failed (the host is unlocked again). */
static int gpu_checkpoint(pid_t pid, struct bw_cuda_times *t, msgpack_sbuffer *meta, char *err,
                          size_t cap) {
    char why[768];
    struct bw_cuda_gpus g;
    if (bw_cuda_load(why, sizeof why) < 0) {
        snprintf(err, cap, "the app uses CUDA, but GPU checkpointing is unavailable: %s", why);
        return -1;
    }
    if (bw_cuda_list_gpus(&g, err, cap) < 0)
        return -1;
    int rc = bw_cuda_checkpoint(pid, bw_sup.o->cuda_lock_timeout_s, t, err, cap);
    if (rc == -2 && !bw_cuda_process_has_devices(pid)) {
        bw_info("the host loaded libcuda but holds no GPU (%s): checkpointing its CPU state only",
                err);
        return 0;
    }
    if (rc < 0)
        return -1;
    msgpack_packer pk;
    msgpack_packer_init(&pk, meta, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    bw_mp_str(&pk, "gpus");
    bw_cuda_pack_gpus(&pk, &g);
    bw_mp_kv_int(&pk, "bytes", t->bytes);
    bw_mp_kv_int(&pk, "driver_version", bw_cuda_driver_version());
    bw_mp_kv_str(&pk, "driver", bw_cuda_driver_release()); /* a restore needs the same */
    char d[512];
    bw_cuda_describe(&g, d, sizeof d);
    bw_info("GPU state checkpointed (%s): ~%.1f MiB; lock %.0f ms, checkpoint %.0f ms", d,
            (double)t->bytes / 1048576.0, t->lock_ms, t->checkpoint_ms);
    return 1;
}

static void checkpoint_failed(const char *what, const char *err) {
    /* A failed checkpoint never costs the user a serving worker (docs/checkpoint.md). */
    bw_warn("%s failed, serving without %s: %s", what,
            strcmp(what, "checkpoint") == 0 ? "one" : "a checkpoint", err);
    bw_warn("next starts boot cold; pass --retry-checkpoint to try again");
    bw_metrics_dump(false, 0, 0);
    bw_ckpt_mark_failed(&bw_sup.ck, err);
}

/* Whether the image just written holds the value of a declared secret (the app or a
 * library kept a copy past on_start): 0 if not; else -1 with the reason, naming the
 * secret, never its value. Values shorter than 8 bytes would match by chance. */
static int image_holds_secret(char *err, size_t errlen) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    const msgpack_object *names = bw_mp_get(bw_fleet_config(&z), "secrets");
    const char *values[64];
    char name[64][256];
    size_t n = 0;
    for (uint32_t i = 0; names && names->type == MSGPACK_OBJECT_ARRAY &&
                         i < names->via.array.size && n < 64; i++) {
        const char *v = bw_mp_strdup(&names->via.array.ptr[i], name[n], sizeof name[n])
                            ? getenv(name[n]) : NULL;
        if (v && strlen(v) >= 8)
            values[n++] = v;
        else if (v)
            bw_warn("secret %s is shorter than 8 bytes: the image is not searched for it", name[n]);
    }
    msgpack_zone_destroy(&z);
    if (n == 0)
        return 0;
    char img[PATH_MAX + 210], file[256];
    size_t which = 0;
    snprintf(img, sizeof img, "%s/img", bw_sup.ck.dir);
    int rc = bw_leakscan_dir(img, values, n, &which, file, sizeof file);
    if (rc > 0)
        snprintf(err, errlen, "the value of secret %s is in the image (%s): the app or a "
                 "library kept a copy past on_start; read it in the handler or an "
                 "@after_restore hook instead", name[which], file);
    else if (rc < 0)
        snprintf(err, errlen, "cannot search the image for secrets: %s: %s", file, strerror(errno));
    return rc == 0 ? 0 : -1;
}

/* Dump the host while it waits for "start". Appends the checkpoint's phases to the
 * profile being built (pk, *n entries). */
static void do_checkpoint(struct bw_replica *r, const msgpack_object *prof, msgpack_packer *pk,
                          int *n) {
    char err[1024], *pj = profile_json(prof);
    double ms = 0;
    unsigned long long bytes = 0;
    bw_info("checkpointing %s ...", bw_sup.o->app);
    /* A host that uses CUDA: its GPU state goes into host memory first, so the CRIU
     * image carries it; the supervisor drives this from outside (a lock blocks the
     * target's own CUDA calls). A failure here keeps it serving, without an image. */
    struct bw_cuda_times gt = {0};
    msgpack_sbuffer gmeta;
    msgpack_sbuffer_init(&gmeta);
    int gpu = bw_cuda_process_uses_gpu(r->pid) ? gpu_checkpoint(r->pid, &gt, &gmeta, err, sizeof err)
                                                 : 0;
    if (gpu < 0) {
        free(pj);
        msgpack_sbuffer_destroy(&gmeta);
        checkpoint_failed("GPU checkpoint", err);
        return;
    }
    int rc = bw_ckpt_dump(&bw_sup.ck, r->pid, &r->ids, bw_sup.config, bw_sup.config_len,
                          bw_sup.o->app, pj, gpu ? gmeta.data : NULL, gmeta.size, &ms, &bytes, err,
                          sizeof err);
    free(pj);
    msgpack_sbuffer_destroy(&gmeta);
    char gerr[1024];
    /* The lock's bound also bounds waiting for RUNNING after the unlock. */
    if (gpu && bw_cuda_resume(r->pid, bw_sup.o->cuda_lock_timeout_s, &gt, gerr, sizeof gerr) < 0) {
        /* It cannot use its GPU state again: a replica takes its place (from the image
         * just written, else cold). */
        bw_error("the host cannot get its GPU state back after the checkpoint: %s; replacing it",
                 gerr);
        if (rc < 0)
            bw_ckpt_mark_failed(&bw_sup.ck, err);
        bw_sup.gpu_resume_failed = true;
        r->replace = true;
        kill(r->pid, SIGKILL);
        return;
    }
    if (rc == 0 && image_holds_secret(err, sizeof err) < 0) {
        bw_ckpt_discard(&bw_sup.ck);
        rc = -1;
    }
    if (rc < 0) {
        checkpoint_failed("checkpoint", err);
        return;
    }
    bw_info("checkpoint written: %s (%.1f MiB in %.0f ms)", bw_sup.ck.dir,
            (double)bytes / 1048576.0, ms);
    bw_metrics_dump(true, bytes, ms);
    bw_mp_kv_double(pk, "checkpoint_ms", ms);
    bw_mp_kv_int(pk, "image_bytes", (long long)bytes);
    *n += 2;
    if (gpu) {
        bw_mp_kv_double(pk, "gpu_lock_ms", gt.lock_ms);
        bw_mp_kv_double(pk, "gpu_checkpoint_ms", gt.checkpoint_ms);
        bw_mp_kv_double(pk, "gpu_restore_ms", gt.restore_ms);
        bw_mp_kv_double(pk, "gpu_unlock_ms", gt.unlock_ms);
        bw_mp_kv_int(pk, "gpu_bytes", gt.bytes);
        bw_mp_kv_int(pk, "gpu_restore_tid", gt.restore_tid);
        *n += 6;
    }
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
        do_checkpoint(r, prof, &bp, &n);
    }
    if (r->replace) { /* killed after a failed GPU resume: the supervisor goes on */
        msgpack_sbuffer_destroy(&body);
        return;
    }
    msgpack_sbuffer_clear(&r->start_profile);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &r->start_profile, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, (size_t)n);
    msgpack_sbuffer_write(&r->start_profile, body.data, body.size);
    msgpack_sbuffer_destroy(&body);
    send_start(r);
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
    int fds[BW_CTL_MAX_FDS], nfds = 0;
    if (status < 0 || bw_ctl_recv(r->ctl, &body, &len, fds, &nfds, 1000) < 0) {
        io_detach(r); /* the host is gone or going; its exit is handled when reaped */
        return;
    }
    for (int i = 0; i < nfds; i++)
        close(fds[i]); /* hosts send none; never keep what arrives */
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

/* ---- restore ------------------------------------------------------------------------ */

static void on_restore_timeout(uv_timer_t *t) {
    struct bw_replica *r = t->data;
    if (r->phase != BW_R_RESTORE || r->pid <= 0)
        return;
    bw_warn("restored replica did not become ready in %gs; killing it",
            bw_sup.o->restore_timeout_s);
    kill(r->pid, SIGKILL);
}

/* The image's GPU metadata against this machine's GPUs (before any CRIU work). */
static int gpu_compat(const struct bw_ckpt_image *img, struct bw_cuda_gpus *saved,
                      struct bw_cuda_gpus *now, int *npairs, long long *bytes, char *err,
                      size_t cap) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object m;
    int rc = -1;
    if (bw_mp_unpack_exact(img->gpu, img->gpu_len, &z, &m) < 0 ||
        bw_cuda_unpack_gpus(bw_mp_get(&m, "gpus"), saved) < 0) {
        snprintf(err, cap, "the image's GPU metadata is corrupt");
    } else {
        *bytes = (long long)bw_mp_num(bw_mp_get(&m, "bytes"), 0);
        char rel[96];
        if (!bw_mp_strdup(bw_mp_get(&m, "driver"), rel, sizeof rel))
            rel[0] = '\0'; /* an image from before the release was recorded */
        rc = bw_cuda_check_compat(saved, (int)bw_mp_num(bw_mp_get(&m, "driver_version"), 0),
                                  rel, now, npairs, err, cap);
    }
    msgpack_zone_destroy(&z);
    return rc;
}

/* reason: the label of beam_restore_failures_total (metrics.h) */
static int restore_failed(struct bw_ckpt_image *img, struct host_io *io, const char *reason,
                          const char *what, const char *err) {
    bw_warn("%s (%s); discarding the checkpoint and booting cold", what, err);
    bw_metrics_restore_failure(reason);
    if (io)
        io_close_fds(io);
    bw_ckpt_image_free(img);
    bw_ckpt_discard(&bw_sup.ck);
    return -1;
}

/* auto restores lazily from this image size up. Below it, starting the page daemon
 * costs more than it saves: bench/coldstart.py, docs/performance.md (113 MiB: eager
 * 80 ms, lazy 92 ms; 520 MiB: eager 240 ms, lazy 80 ms). */
#define LAZY_MIN_BYTES (256ull << 20)

/* Lazy where it works, pays and has not failed here; eager otherwise (lazy.c). */
static bool want_lazy(unsigned long long image_bytes) {
    static bool said;
    enum bw_restore_mode m = bw_sup.o->restore_mode;
    if (m == BW_RESTORE_EAGER || bw_sup.lazy_broken ||
        (m == BW_RESTORE_AUTO && image_bytes < LAZY_MIN_BYTES))
        return false;
    if (bw_lazy_supported())
        return true;
    if (m == BW_RESTORE_LAZY && !said)
        bw_warn("--restore lazy: this kernel offers no non-cooperative userfaultfd; "
                "restoring eagerly");
    said = true;
    return false;
}

/* CRIU restore, lazy or eager; a failed lazy restore is retried eagerly at once. */
static int criu_restore(struct bw_replica *r, struct bw_ckpt_image *img,
                        const struct host_io *io, pid_t *pid, char *err, size_t errlen) {
    if (want_lazy(img->bytes)) {
        if (bw_lazy_restore(&bw_sup.ck, img, io->host_out, io->host_err, io->host_ctl, pid,
                            &r->lazy, err, errlen) == 0) {
            if (r->lazy.pager == 0) /* every page was in before the restore returned */
                bw_lazy_finished(&r->lazy);
            return 1;
        }
        bw_warn("lazy restore failed (%s); restoring eagerly from now on", err);
        bw_sup.lazy_broken = true;
    }
    return bw_ckpt_restore(&bw_sup.ck, img, io->host_out, io->host_err, io->host_ctl, pid, err,
                           errlen);
}

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
        bw_lazy_finished(&r->lazy);
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

int bw_replica_restore(struct bw_replica *r) {
    char err[1024];
    struct bw_ckpt_image img;
    r->t0 = r->last_active = bw_now_ms();
    if (bw_ckpt_load(&bw_sup.ck, &img, err, sizeof err) < 0) {
        bw_warn("checkpoint unusable (%s); discarding it and booting cold", err);
        bw_metrics_restore_failure("unusable");
        bw_ckpt_discard(&bw_sup.ck);
        return -1;
    }
    /* An image with GPU state needs the same GPUs here (other cards of the same type are
     * remapped by UUID). Checked before CRIU does any work. */
    struct bw_cuda_gpus saved, now;
    struct bw_cuda_times gt = {0};
    int npairs = 0;
    bool gpu = img.gpu != NULL;
    if (gpu && gpu_compat(&img, &saved, &now, &npairs, &gt.bytes, err, sizeof err) < 0)
        return restore_failed(&img, NULL, "gpu_incompatible", "cannot restore the checkpoint's GPU state here", err);
    struct host_io io;
    if (io_open(&io, false) < 0) {
        bw_ckpt_image_free(&img);
        return -1;
    }
    pid_t pid;
    double t = bw_now_ms();
    int rc = criu_restore(r, &img, &io, &pid, err, sizeof err);
    r->restored_at = bw_now_ms();
    double restore_ms = r->restored_at - t;
    if (rc == BW_CKPT_CORRUPT)
        return restore_failed(&img, &io, "unusable", "checkpoint unusable", err);
    if (rc < 0)
        return restore_failed(&img, &io, "criu", "restore failed", err);
    if (gpu) {
        if (npairs)
            bw_info("this machine's GPUs have other UUIDs than the image's: remapping %d GPU(s)",
                    npairs);
        if (bw_cuda_restore_replica(pid, &saved, &now, npairs > 0, bw_sup.o->cuda_lock_timeout_s,
                                    &gt, err, sizeof err) < 0) {
            /* As Modal does: a replica whose GPU state cannot come back boots cold. Left
             * CHECKPOINTED (a restore that failed on OOM stays so for good) or LOCKED,
             * its first CUDA call would hang: it never gets a request. */
            kill(pid, SIGKILL);
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
            }
            if (bw_sup.gpu_resume_failed) /* GPU restores keep failing here: stop dumping */
                bw_ckpt_mark_failed(&bw_sup.ck, err);
            return restore_failed(&img, &io, "gpu_restore", "GPU restore failed", err);
        }
        bw_info("GPU state restored on pid %d: restore %.0f ms, unlock %.0f ms (%d state "
                "poll(s)), driver restore thread %d", (int)pid, gt.restore_ms, gt.unlock_ms,
                gt.unlock_polls, gt.restore_tid);
    }
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object cfg;
    if (bw_mp_unpack_exact(img.config, img.config_len, &z, &cfg) == 0)
        bw_sup.owner->set_config(&cfg);
    msgpack_zone_destroy(&z);
    unsigned long long image_bytes = img.bytes;
    bw_ckpt_image_free(&img);
    r->pid = pid;
    r->restored = true;
    r->phase = BW_R_RESTORE;
    io_attach(r, &io);

    msgpack_sbuffer_clear(&r->start_profile);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &r->start_profile, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, gpu ? 8 : 4);
    bw_mp_kv_str(&pk, "mode", "restore");
    bw_mp_kv_str(&pk, "restore", rc == 1 ? "lazy" : "eager");
    bw_mp_kv_double(&pk, "criu_restore_ms", restore_ms);
    bw_mp_kv_int(&pk, "image_bytes", (long long)image_bytes);
    if (gpu) {
        bw_mp_kv_double(&pk, "gpu_restore_ms", gt.restore_ms);
        bw_mp_kv_double(&pk, "gpu_unlock_ms", gt.unlock_ms);
        bw_mp_kv_int(&pk, "gpu_bytes", gt.bytes);
        bw_mp_kv_int(&pk, "gpu_restore_tid", gt.restore_tid);
    }
    send_start(r);
    uv_timer_start(r->timer, on_restore_timeout, (uint64_t)(bw_sup.o->restore_timeout_s * 1000), 0);
    return 0;
}

/* ---- stopping ----------------------------------------------------------------------- */

static void on_stop_timeout(uv_timer_t *t) {
    struct bw_replica *r = t->data;
    if (r->pid > 0) {
        bw_warn("replica %d did not stop in time; killing it", r->id);
        kill(r->pid, SIGKILL);
    }
}

void bw_replica_stop(struct bw_replica *r, double grace_s) {
    if (r->pid <= 0)
        return;
    if (r->phase == BW_R_STOPPING) {
        kill(r->pid, SIGKILL); /* asked twice: no more waiting */
        return;
    }
    r->phase = BW_R_STOPPING;
    kill(r->pid, SIGTERM);
    uv_timer_stop(r->timer);
    uv_timer_start(r->timer, on_stop_timeout, (uint64_t)((grace_s + 5) * 1000), 0);
}
