/* supervisor.c - beam-worker's outer process.
 *
 *   supervisor (this) ──clone(CLONE_NEWPID)──▶ host, PID 1 of its namespace (host.c)
 *        │  control socketpair (fd 3 there), stdout/stderr pipes        └─ workers
 *        └─ listening sockets, passed to each host in its "start" message
 *
 * The supervisor never runs Python. It decides per start whether to boot cold or to
 * restore from the checkpoint of the app's key, dumps the host once on_start is done,
 * and falls back to a cold boot whenever anything about the checkpoint fails. */
#define _GNU_SOURCE
#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "checkpoint.h"
#include "control.h"
#include "cuda_ckpt.h"
#include "json.h"
#include "listen.h"
#include "log.h"
#include "mp.h"
#include "util.h"

#define MAX_LISTENERS (2 * BW_MAX_LISTENERS)
#define CRASH_WINDOW_MS 60000.0
#define CRASH_MAX 5

enum phase { P_BOOT, P_RESTORE, P_SERVING, P_STOPPING };

struct host_io {
    int ctl;              /* our end of the control socket */
    int host_ctl, host_out, host_err; /* the host's ends, until handed over */
    int out_r, err_r;     /* our read ends of its stdout/stderr */
};

static struct {
    const struct bw_options *o;
    uv_loop_t *loop;
    struct bw_listener l[MAX_LISTENERS];
    int nl;
    char exe[PATH_MAX];
    bool use_ns;
    bool ckpt_on;     /* checkpointing possible for this run */
    bool may_dump;    /* the next cold boot may be dumped */
    struct bw_ckpt ck;
    pid_t pid;
    int ctl;
    uv_poll_t *ctl_poll;
    struct bw_ckpt_ids ids;
    enum phase phase;
    bool restored;
    double t0, restore_ms;
    unsigned long long image_bytes;
    char *config;
    size_t config_len;
    msgpack_sbuffer profile; /* packed map sent to the host in "start" */
    uv_signal_t sigterm, sigint, sigchld;
    uv_timer_t timer;
    int exit_code;
    bool replace_host;       /* the host was killed on purpose; start a replica, not exit */
    bool gpu_resume_failed;  /* a host could not get its GPU back after a dump */
    double crashes[CRASH_MAX];
    int ncrashes;
} S;

static void start_replica(void);

/* ---- host process ---------------------------------------------------------------- */

struct child_args {
    char **argv;
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
    execv(S.exe, a->argv);
    _exit(127);
}

static int io_open(struct host_io *io, bool cloexec_host_ends) {
    int sv[2], out[2], err[2];
    int fl = cloexec_host_ends ? O_CLOEXEC : 0;
    if (socketpair(AF_UNIX, SOCK_STREAM | (cloexec_host_ends ? SOCK_CLOEXEC : 0), 0, sv) < 0)
        return -1;
    if (pipe2(out, fl) < 0 || pipe2(err, fl) < 0)
        return -1;
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

static unsigned long inode_of(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (unsigned long)st.st_ino : 0;
}

static void free_handle(uv_handle_t *h) { free(h); }

static void on_output(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    int fd = (int)(intptr_t)s->data;
    if (nread > 0 && bw_write_full(fd, buf->base, (size_t)nread) < 0) {
        /* our own stdout is gone; keep draining so the host never blocks */
    }
    free(buf->base);
    if (nread < 0)
        uv_close((uv_handle_t *)s, free_handle);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

static void on_ctl(uv_poll_t *p, int status, int events);

/* Forward one of the host's output pipes to our own fd (1 or 2). Each host gets new
 * handles: the previous host's may still be draining or closing. */
static void forward_output(int pipe_fd, int to) {
    uv_pipe_t *p = malloc(sizeof *p);
    if (!p || uv_pipe_init(S.loop, p, 0) < 0) {
        free(p);
        close(pipe_fd);
        return;
    }
    p->data = (void *)(intptr_t)to;
    if (uv_pipe_open(p, pipe_fd) < 0 || uv_read_start((uv_stream_t *)p, on_alloc, on_output) < 0)
        uv_close((uv_handle_t *)p, free_handle);
}

/* Take over our ends: forward output, watch the control socket; drop the host's ends. */
static void io_attach(struct host_io *io) {
    close(io->host_ctl);
    close(io->host_out);
    close(io->host_err);
    S.ctl = io->ctl;
    forward_output(io->out_r, 1);
    forward_output(io->err_r, 2);
    S.ctl_poll = malloc(sizeof *S.ctl_poll);
    uv_poll_init(S.loop, S.ctl_poll, S.ctl);
    uv_poll_start(S.ctl_poll, UV_READABLE | UV_DISCONNECT, on_ctl);
}

static void io_detach(void) {
    if (S.ctl < 0)
        return;
    uv_poll_stop(S.ctl_poll);
    uv_close((uv_handle_t *)S.ctl_poll, free_handle);
    S.ctl_poll = NULL;
    close(S.ctl);
    S.ctl = -1;
}

static void io_close_fds(struct host_io *io) {
    int fds[] = {io->ctl, io->host_ctl, io->host_out, io->host_err, io->out_r, io->err_r};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
        close(fds[i]);
}

static int spawn_host(bool may_dump) {
    struct host_io io;
    if (io_open(&io, true) < 0) {
        bw_error("cannot create the host's channels: %s", strerror(errno));
        return -1;
    }
    S.ids.out_ino = inode_of(io.out_r);
    S.ids.err_ino = inode_of(io.err_r);
    S.ids.ctl_ino = inode_of(io.host_ctl);

    char mf[32], gr[32], wk[16];
    snprintf(mf, sizeof mf, "%zu", S.o->max_frame);
    snprintf(gr, sizeof gr, "%g", S.o->grace_s);
    snprintf(wk, sizeof wk, "%d", S.o->workers);
    char *argv[24];
    int n = 0;
    argv[n++] = (char *)"beam-worker";
    argv[n++] = (char *)"--host";
    argv[n++] = (char *)"--python";
    argv[n++] = (char *)S.o->python;
    argv[n++] = (char *)"--volume-root";
    argv[n++] = (char *)S.o->volume_root;
    argv[n++] = (char *)"--max-frame";
    argv[n++] = mf;
    argv[n++] = (char *)"--grace";
    argv[n++] = gr;
    if (S.o->workers > 0) {
        argv[n++] = (char *)"--workers";
        argv[n++] = wk;
    }
    if (may_dump)
        argv[n++] = (char *)"--may-checkpoint";
    if (S.o->json_logs)
        argv[n++] = (char *)"--json-logs";
    if (S.o->allow_cpu)
        argv[n++] = (char *)"--allow-cpu";
    argv[n++] = (char *)S.o->app;
    argv[n] = NULL;

    struct child_args a = {argv, &io};
    size_t stack_size = 256 * 1024;
    char *stack = malloc(stack_size);
    /* A PID namespace of its own (notes, section 4): every restored replica gets a
     * fresh one, so many can run from one image at the same time. */
    int flags = SIGCHLD | (S.use_ns ? CLONE_NEWPID : 0);
    pid_t pid = stack ? clone(host_child, stack + stack_size, flags, &a) : -1;
    free(stack);
    if (pid < 0) {
        bw_error("cannot start the host: %s", strerror(errno));
        io_close_fds(&io);
        return -1;
    }
    S.pid = pid;
    io_attach(&io);
    return 0;
}

/* ---- messages -------------------------------------------------------------------- */

static void profile_reset(void) {
    msgpack_sbuffer_destroy(&S.profile);
    msgpack_sbuffer_init(&S.profile);
}

static void send_start(bool restored) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    char cid[BW_ID_LEN];
    bw_id_new(cid);
    msgpack_pack_map(&pk, 6);
    bw_mp_kv_str(&pk, "t", "start");
    bw_mp_kv_bool(&pk, "restored", restored);
    bw_mp_kv_str(&pk, "container_id", cid);

    /* Secrets are read from our environment at every start and never stored. */
    bw_mp_str(&pk, "env");
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object cfg;
    const msgpack_object *secrets = NULL;
    if (S.config && bw_mp_unpack_exact(S.config, S.config_len, &z, &cfg) == 0)
        secrets = bw_mp_get(&cfg, "secrets");
    uint32_t nset = 0;
    char name[256];
    if (secrets && secrets->type == MSGPACK_OBJECT_ARRAY)
        for (uint32_t i = 0; i < secrets->via.array.size; i++)
            if (bw_mp_strdup(&secrets->via.array.ptr[i], name, sizeof name) && getenv(name))
                nset++;
    msgpack_pack_map(&pk, nset);
    if (secrets && secrets->type == MSGPACK_OBJECT_ARRAY)
        for (uint32_t i = 0; i < secrets->via.array.size; i++) {
            if (!bw_mp_strdup(&secrets->via.array.ptr[i], name, sizeof name))
                continue;
            const char *v = getenv(name);
            if (v)
                bw_mp_kv_str(&pk, name, v);
            else
                bw_warn("secret %s is not set in the environment", name);
        }
    msgpack_zone_destroy(&z);

    int fds[MAX_LISTENERS];
    bw_mp_str(&pk, "listeners");
    msgpack_pack_array(&pk, (size_t)S.nl);
    for (int i = 0; i < S.nl; i++) {
        bw_mp_str(&pk, S.l[i].address);
        fds[i] = S.l[i].fd;
    }
    bw_mp_str(&pk, "profile");
    msgpack_sbuffer_write(&sb, S.profile.data, S.profile.size);
    if (bw_ctl_send(S.ctl, sb.data, sb.size, fds, S.nl) < 0)
        bw_error("cannot send start to the host: %s", strerror(errno));
    explicit_bzero(sb.data, sb.size); /* it held secret values */
    msgpack_sbuffer_destroy(&sb);
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
static int gpu_checkpoint(struct bw_cuda_times *t, msgpack_sbuffer *meta, char *err, size_t cap) {
    char why[768];
    struct bw_cuda_gpus g;
    if (bw_cuda_load(why, sizeof why) < 0) {
        snprintf(err, cap, "the app uses CUDA, but GPU checkpointing is unavailable: %s", why);
        return -1;
    }
    if (bw_cuda_list_gpus(&g, err, cap) < 0)
        return -1;
    int rc = bw_cuda_checkpoint(S.pid, S.o->cuda_lock_timeout_s, t, err, cap);
    if (rc == -2 && !bw_cuda_process_has_devices(S.pid)) {
        bw_info("the host loaded libcuda but holds no GPU (%s): checkpointing its CPU state only",
                err);
        return 0;
    }
    if (rc < 0)
        return -1;
    msgpack_packer pk;
    msgpack_packer_init(&pk, meta, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    bw_mp_str(&pk, "gpus");
    bw_cuda_pack_gpus(&pk, &g);
    bw_mp_kv_int(&pk, "bytes", t->bytes);
    bw_mp_kv_int(&pk, "driver_version", bw_cuda_driver_version());
    char d[512];
    bw_cuda_describe(&g, d, sizeof d);
    bw_info("GPU state checkpointed (%s): ~%.1f MiB; lock %.0f ms, checkpoint %.0f ms", d,
            (double)t->bytes / 1048576.0, t->lock_ms, t->checkpoint_ms);
    return 1;
}

static void do_checkpoint(const msgpack_object *prof, msgpack_packer *pk, int *extra) {
    char err[1024], *pj = profile_json(prof);
    double ms = 0;
    unsigned long long bytes = 0;
    bw_info("checkpointing %s ...", S.o->app);
    /* A host that uses CUDA: its GPU state goes into host memory first, so the CRIU
     * image carries it; the supervisor drives this from outside (a lock blocks the
     * target's own CUDA calls). A failure here keeps it serving, without an image. */
    struct bw_cuda_times gt = {0};
    msgpack_sbuffer gmeta;
    msgpack_sbuffer_init(&gmeta);
    int gpu = bw_cuda_process_uses_gpu(S.pid) ? gpu_checkpoint(&gt, &gmeta, err, sizeof err) : 0;
    if (gpu < 0) {
        free(pj);
        msgpack_sbuffer_destroy(&gmeta);
        bw_warn("GPU checkpoint failed, serving without a checkpoint: %s", err);
        bw_warn("next starts boot cold; pass --retry-checkpoint to try again");
        bw_ckpt_mark_failed(&S.ck, err);
        return;
    }
    int rc = bw_ckpt_dump(&S.ck, S.pid, &S.ids, S.config, S.config_len, S.o->app, pj,
                          gpu ? gmeta.data : NULL, gmeta.size, &ms, &bytes, err, sizeof err);
    free(pj);
    msgpack_sbuffer_destroy(&gmeta);
    char gerr[1024];
    if (gpu && bw_cuda_resume(S.pid, &gt, gerr, sizeof gerr) < 0) {
        /* It cannot use its GPU state again: a replica takes its place (from the image
         * just written, else cold). */
        bw_error("the host cannot get its GPU state back after the checkpoint: %s; replacing it",
                 gerr);
        if (rc < 0)
            bw_ckpt_mark_failed(&S.ck, err);
        S.gpu_resume_failed = true;
        S.replace_host = true;
        kill(S.pid, SIGKILL);
        return;
    }
    if (rc < 0) {
        /* The seed's rule: a failed checkpoint never costs the user a serving worker. */
        bw_warn("checkpoint failed, serving without one: %s", err);
        bw_warn("next starts boot cold; pass --retry-checkpoint to try again");
        bw_ckpt_mark_failed(&S.ck, err);
        return;
    }
    bw_info("checkpoint written: %s (%.1f MiB in %.0f ms)", S.ck.dir, (double)bytes / 1048576.0, ms);
    bw_mp_kv_double(pk, "checkpoint_ms", ms);
    bw_mp_kv_int(pk, "image_bytes", (long long)bytes);
    *extra += 2;
    if (gpu) {
        bw_mp_kv_double(pk, "gpu_lock_ms", gt.lock_ms);
        bw_mp_kv_double(pk, "gpu_checkpoint_ms", gt.checkpoint_ms);
        bw_mp_kv_double(pk, "gpu_restore_ms", gt.restore_ms);
        bw_mp_kv_double(pk, "gpu_unlock_ms", gt.unlock_ms);
        bw_mp_kv_int(pk, "gpu_bytes", gt.bytes);
        *extra += 5;
    }
}

static void handle_ready(const msgpack_object *m) {
    const msgpack_object *cfg = bw_mp_get(m, "config"), *prof = bw_mp_get(m, "profile");
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    if (cfg)
        msgpack_pack_object(&pk, *cfg);
    free(S.config);
    S.config = sb.data;
    S.config_len = sb.size;

    /* Profile: the host's boot phases, then ours. Built as entries, counted at the end. */
    msgpack_sbuffer body;
    msgpack_sbuffer_init(&body);
    msgpack_packer bp;
    msgpack_packer_init(&bp, &body, msgpack_sbuffer_write);
    int n = 1;
    bw_mp_kv_str(&bp, "mode", "cold");
    if (prof && prof->type == MSGPACK_OBJECT_MAP)
        for (uint32_t i = 0; i < prof->via.map.size; i++, n++) {
            msgpack_pack_object(&bp, prof->via.map.ptr[i].key);
            msgpack_pack_object(&bp, prof->via.map.ptr[i].val);
        }
    const msgpack_object *skipped = bw_mp_get(m, "checkpoint_error");
    if (skipped && skipped->type == MSGPACK_OBJECT_STR && S.may_dump) {
        char why[2048];
        bw_mp_strdup(skipped, why, sizeof why);
        bw_warn("not checkpointing, serving without one: %s", why);
        bw_ckpt_mark_failed(&S.ck, why);
    } else if (bw_mp_true(bw_mp_get(m, "checkpoint")) && S.may_dump) {
        do_checkpoint(prof, &bp, &n);
    }
    if (S.replace_host) { /* killed after a failed GPU resume: host_exited goes on */
        msgpack_sbuffer_destroy(&body);
        return;
    }
    profile_reset();
    msgpack_packer_init(&pk, &S.profile, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, (size_t)n);
    msgpack_sbuffer_write(&S.profile, body.data, body.size);
    msgpack_sbuffer_destroy(&body);
    send_start(false);
}

static void print_profile(const msgpack_object *p) {
    char line[1024];
    size_t o = 0;
    double ready = bw_now_ms() - S.t0;
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

static void handle_serving(const msgpack_object *m) {
    S.phase = P_SERVING;
    uv_timer_stop(&S.timer);
    print_profile(bw_mp_get(m, "profile"));
    bw_info("ready: %d worker(s) serving %s", (int)bw_mp_num(bw_mp_get(m, "workers"), 1),
            S.restored ? "(restored from checkpoint)" : "(cold boot)");
}

static void on_ctl(uv_poll_t *p, int status, int events) {
    (void)p;
    (void)events;
    char *body = NULL;
    size_t len = 0;
    int fds[BW_CTL_MAX_FDS], nfds = 0;
    if (status < 0 || bw_ctl_recv(S.ctl, &body, &len, fds, &nfds, 1000) < 0) {
        io_detach(); /* the host is gone or going; its exit is handled in on_sigchld */
        return;
    }
    msgpack_zone z;
    msgpack_zone_init(&z, 4096);
    msgpack_object m;
    if (bw_mp_unpack_exact(body, len, &z, &m) == 0) {
        const msgpack_object *t = bw_mp_get(&m, "t");
        if (bw_mp_is_str(t, "ready"))
            handle_ready(&m);
        else if (bw_mp_is_str(t, "serving"))
            handle_serving(&m);
        else if (bw_mp_is_str(t, "fatal")) {
            const msgpack_object *msg = bw_mp_get(&m, "message");
            if (msg && msg->type == MSGPACK_OBJECT_STR)
                bw_error("%.*s", (int)msg->via.str.size, msg->via.str.ptr);
        }
    }
    msgpack_zone_destroy(&z);
    free(body);
}

/* ---- starting a replica ------------------------------------------------------------ */

static int boot_cold(void) {
    S.phase = P_BOOT;
    S.restored = false;
    S.t0 = bw_now_ms();
    return spawn_host(S.may_dump);
}

static void on_restore_timeout(uv_timer_t *t) {
    (void)t;
    if (S.phase != P_RESTORE)
        return;
    bw_warn("restored replica did not become ready in %gs; killing it", S.o->restore_timeout_s);
    kill(S.pid, SIGKILL);
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
        rc = bw_cuda_check_compat(saved, now, npairs, err, cap);
    }
    msgpack_zone_destroy(&z);
    return rc;
}

static int try_restore(void) {
    char err[1024];
    struct bw_ckpt_image img;
    S.t0 = bw_now_ms();
    if (bw_ckpt_load(&S.ck, &img, err, sizeof err) < 0) {
        bw_warn("checkpoint unusable (%s); discarding it and booting cold", err);
        bw_ckpt_discard(&S.ck);
        return -1;
    }
    /* An image with GPU state needs the same GPUs here (other cards of the same type are
     * remapped by UUID). Checked before CRIU does any work. */
    struct bw_cuda_gpus saved, now;
    struct bw_cuda_times gt = {0};
    int npairs = 0;
    bool gpu = img.gpu != NULL;
    if (gpu && gpu_compat(&img, &saved, &now, &npairs, &gt.bytes, err, sizeof err) < 0) {
        bw_warn("cannot restore the checkpoint's GPU state here (%s); discarding it and "
                "booting cold", err);
        bw_ckpt_image_free(&img);
        bw_ckpt_discard(&S.ck);
        return -1;
    }
    struct host_io io;
    if (io_open(&io, false) < 0) {
        bw_ckpt_image_free(&img);
        return -1;
    }
    pid_t pid;
    double t = bw_now_ms();
    int rc = bw_ckpt_restore(&S.ck, &img, io.host_out, io.host_err, io.host_ctl, &pid, err,
                             sizeof err);
    S.restore_ms = bw_now_ms() - t;
    if (rc < 0) {
        bw_warn("restore failed (%s); discarding the checkpoint and booting cold", err);
        io_close_fds(&io);
        bw_ckpt_image_free(&img);
        bw_ckpt_discard(&S.ck);
        return -1;
    }
    if (gpu) {
        if (npairs)
            bw_info("this machine's GPUs have other UUIDs than the image's: remapping %d GPU(s)",
                    npairs);
        if (bw_cuda_restore_replica(pid, &saved, &now, npairs > 0, &gt, err, sizeof err) < 0) {
            /* As Modal does: a replica whose GPU state cannot come back boots cold. */
            bw_warn("GPU restore failed (%s); discarding the checkpoint and booting cold", err);
            kill(pid, SIGKILL);
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
            }
            io_close_fds(&io);
            bw_ckpt_image_free(&img);
            bw_ckpt_discard(&S.ck);
            if (S.gpu_resume_failed) /* GPU restores keep failing here: stop dumping */
                bw_ckpt_mark_failed(&S.ck, err);
            return -1;
        }
    }
    free(S.config);
    free(img.gpu);
    S.config = img.config;
    S.config_len = img.config_len;
    S.image_bytes = img.bytes;
    S.pid = pid;
    S.restored = true;
    S.phase = P_RESTORE;
    io_attach(&io);

    profile_reset();
    msgpack_packer pk;
    msgpack_packer_init(&pk, &S.profile, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, gpu ? 6 : 3);
    bw_mp_kv_str(&pk, "mode", "restore");
    bw_mp_kv_double(&pk, "criu_restore_ms", S.restore_ms);
    bw_mp_kv_int(&pk, "image_bytes", (long long)S.image_bytes);
    if (gpu) {
        bw_mp_kv_double(&pk, "gpu_restore_ms", gt.restore_ms);
        bw_mp_kv_double(&pk, "gpu_unlock_ms", gt.unlock_ms);
        bw_mp_kv_int(&pk, "gpu_bytes", gt.bytes);
    }
    send_start(true);
    uv_timer_start(&S.timer, on_restore_timeout, (uint64_t)(S.o->restore_timeout_s * 1000), 0);
    return 0;
}

static void start_replica(void) {
    char reason[1024];
    if (S.ckpt_on && bw_ckpt_exists(&S.ck) && try_restore() == 0)
        return;
    S.may_dump = S.ckpt_on;
    if (S.ckpt_on && bw_ckpt_failed_before(&S.ck, reason, sizeof reason)) {
        if (S.o->retry_checkpoint) {
            bw_ckpt_clear_failed(&S.ck);
        } else {
            bw_warn("checkpoint for this key failed before, booting cold without one "
                    "(--retry-checkpoint tries again): %s", reason);
            S.may_dump = false;
        }
    }
    if (boot_cold() < 0) {
        S.exit_code = 1;
        uv_stop(S.loop);
    }
}

/* ---- process events ---------------------------------------------------------------- */

static bool crash_budget_left(void) {
    double now = bw_now_ms();
    int keep = 0;
    for (int i = 0; i < S.ncrashes; i++)
        if (now - S.crashes[i] < CRASH_WINDOW_MS)
            S.crashes[keep++] = S.crashes[i];
    S.ncrashes = keep;
    if (keep >= CRASH_MAX)
        return false;
    S.crashes[S.ncrashes++] = now;
    return true;
}

static void shutdown_loop(int code) {
    S.exit_code = code;
    uv_signal_stop(&S.sigterm);
    uv_signal_stop(&S.sigint);
    uv_signal_stop(&S.sigchld);
    uv_timer_stop(&S.timer);
    uv_stop(S.loop);
}

static void host_exited(int status) {
    io_detach();
    char why[128];
    if (WIFSIGNALED(status))
        snprintf(why, sizeof why, "was killed by signal %d", WTERMSIG(status));
    else
        snprintf(why, sizeof why, "exited with status %d", WEXITSTATUS(status));
    switch (S.phase) {
    case P_STOPPING:
        shutdown_loop(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
        return;
    case P_BOOT:
        if (S.replace_host) {
            S.replace_host = false;
            bw_warn("host %s; starting a replica in its place", why);
            start_replica();
            return;
        }
        bw_error("the app failed to start: host %s", why);
        shutdown_loop(1);
        return;
    case P_RESTORE:
        bw_warn("restored replica %s before it was ready; discarding the checkpoint, booting cold",
                why);
        uv_timer_stop(&S.timer);
        bw_ckpt_discard(&S.ck);
        start_replica();
        return;
    case P_SERVING:
        if (!crash_budget_left()) {
            bw_error("host %s; %d crashes within %.0fs, giving up", why, CRASH_MAX,
                     CRASH_WINDOW_MS / 1000);
            shutdown_loop(1);
            return;
        }
        bw_warn("host %s; starting a new replica", why);
        start_replica();
        return;
    }
}

static void on_sigchld(uv_signal_t *h, int sig) {
    (void)h;
    (void)sig;
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        if (pid == S.pid) {
            S.pid = 0;
            host_exited(status);
        }
}

static void on_kill_timer(uv_timer_t *t) {
    (void)t;
    if (S.pid > 0) {
        bw_warn("host did not stop in time; killing it");
        kill(S.pid, SIGKILL);
    }
}

static void on_signal(uv_signal_t *h, int sig) {
    (void)h;
    if (S.phase == P_STOPPING) {
        if (S.pid > 0)
            kill(S.pid, SIGKILL); /* second signal: no more waiting */
        return;
    }
    bw_info("received %s, stopping (finishing requests for up to %gs)", strsignal(sig),
            S.o->grace_s);
    S.phase = P_STOPPING;
    if (S.pid <= 0) {
        shutdown_loop(0);
        return;
    }
    kill(S.pid, SIGTERM);
    uv_timer_stop(&S.timer);
    uv_timer_start(&S.timer, on_kill_timer, (uint64_t)((S.o->grace_s + 5) * 1000), 0);
}

/* ---- setup ------------------------------------------------------------------------- */

static int open_listeners(void) {
    char err[512];
    const struct bw_options *o = S.o;
    static const char *dflt[] = {"127.0.0.1:8765"};
    const char *const *tcps = o->ntcps || o->nsockets ? o->tcps : dflt;
    int ntcp = o->ntcps || o->nsockets ? o->ntcps : 1;
    for (int i = 0; i < o->nsockets; i++, S.nl++)
        if (bw_listen_unix(&S.l[S.nl], o->sockets[i], err, sizeof err) < 0)
            goto fail;
    for (int i = 0; i < ntcp; i++, S.nl++)
        if (bw_listen_tcp(&S.l[S.nl], tcps[i], err, sizeof err) < 0)
            goto fail;
    for (int i = 0; i < S.nl; i++)
        bw_info("listening on %s", S.l[i].address);
    return 0;
fail:
    bw_error("%s", err);
    return -1;
}

static void setup_checkpointing(void) {
    const struct bw_options *o = S.o;
    char err[1024];
    if (o->no_checkpoint)
        return;
    if (!o->checkpoint_key) {
        bw_debug("no --checkpoint-key: checkpointing off (python -m beam serve sets it)");
        return;
    }
    if (!S.use_ns) {
        bw_warn("checkpointing needs root (CRIU, PID namespaces); serving without it");
        return;
    }
    if (bw_ckpt_open(&S.ck, o->checkpoint_dir, o->checkpoint_key, o->criu, o->criu_timeout_s,
                     err, sizeof err) < 0) {
        bw_warn("checkpointing off: %s", err);
        return;
    }
    S.ckpt_on = true;
}

int bw_supervisor_main(const struct bw_options *o, int argc, char **argv) {
    (void)argc;
    (void)argv;
    S.o = o;
    S.ctl = -1;
    bw_log_init("beam", o->json_logs);
    signal(SIGPIPE, SIG_IGN);
    ssize_t n = readlink("/proc/self/exe", S.exe, sizeof S.exe - 1);
    if (n <= 0) {
        bw_error("cannot find my own executable: %s", strerror(errno));
        return 1;
    }
    S.exe[n] = '\0';
    S.use_ns = geteuid() == 0;
    S.loop = uv_default_loop();
    msgpack_sbuffer_init(&S.profile);
    if (open_listeners() < 0)
        return 1;
    setup_checkpointing();
    uv_signal_init(S.loop, &S.sigterm);
    uv_signal_init(S.loop, &S.sigint);
    uv_signal_init(S.loop, &S.sigchld);
    uv_timer_init(S.loop, &S.timer);
    uv_signal_start(&S.sigterm, on_signal, SIGTERM);
    uv_signal_start(&S.sigint, on_signal, SIGINT);
    uv_signal_start(&S.sigchld, on_sigchld, SIGCHLD);
    start_replica();
    uv_run(S.loop, UV_RUN_DEFAULT);
    for (int i = 0; i < S.nl; i++)
        if (S.l[i].unix_path[0])
            unlink(S.l[i].unix_path);
    if (S.exit_code == 0)
        bw_info("stopped");
    return S.exit_code;
}
