/* supervisor.c - beam-worker's outer process: the fleet of replicas.
 *
 *   clients ──msgpack──▶ public sockets ─────────────┐ (passed to every replica)
 *   clients ──HTTP────▶ http.c ─▶ router.c ─msgpack─▶ replica private sockets
 *                                                    ▼
 *   supervisor ── replica.c ──▶ host (PID 1 of its own namespace) ──fork──▶ workers
 *
 * The supervisor never runs Python. It starts one replica at once (restoring the
 * checkpoint of the app's key, or booting cold and dumping it), restores more when
 * HTTP calls queue up (--max-replicas), stops replicas idle for keep_warm_seconds
 * (down to zero), and restores one again when a call or a connection arrives. Any
 * checkpoint failure falls back to a cold boot; a crashed replica is replaced: at once
 * after a crash, with a growing delay when replicas keep dying right after they start,
 * from a cold boot when restored replicas keep dying (the image is discarded), and not
 * at all after --max-crashes crashes within a minute (docs/reliability.md). */
#define _GNU_SOURCE
#include "supervisor.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

#include "environ.h"
#include "http.h"
#include "job.h"
#include "json.h"
#include "log.h"
#include "metrics.h"
#include "mp.h"
#include "observe.h"
#include "output.h"
#include "privilege.h"
#include "replica.h"
#include "router.h"
#include "util.h"

#define CRASH_WINDOW_MS 60000.0
#define TICK_MS 250
/* A host that dies less than QUICK_MS after it reached "serving" crashed right after its
 * start: the next replacement waits BACKOFF_BASE_MS, doubling per such crash in a row up
 * to BACKOFF_MAX_MS. IMAGE_BAD_AFTER restored hosts in a row dying that way discard the
 * image: the replacement boots cold (and dumps a fresh image). A streak ends with a crash
 * that is not quick, or after CRASH_WINDOW_MS without one. */
#define QUICK_MS 3000.0
#define BACKOFF_BASE_MS 250.0
#define BACKOFF_MAX_MS 8000.0
#define IMAGE_BAD_AFTER 3


static struct {
    struct bw_replica *replicas;
    int next_id;
    int dumper;               /* id of the cold boot allowed to dump, 0 if none */
    bool stopping;
    double stop_deadline;     /* bw_now_ms(): stop replicas with HTTP calls in flight then */
    int exit_code;
    uv_signal_t sigterm, sigint, sigchld;
    uv_timer_t tick;
    uv_poll_t wake[BW_SUP_MAX_LISTENERS]; /* msgpack sockets, watched at zero replicas */
    bool waking;
    bool http;
    struct bw_listener http_l;
    char token[80];
    char rundir[64];
    double keep_warm_s;
    double *crashes;          /* times of the last max_crashes crashes (window) */
    int ncrashes;
    uv_timer_t backoff;       /* delays replacements of hosts that die right after start */
    int pending;              /* replacements waiting for it */
    int quick_streak;         /* hosts in a row that died within QUICK_MS of serving */
    int restored_quick;       /* restored hosts in a row that did */
    double last_quick;
    bool any_served;          /* some replica reached "serving" */
    double last_status;
    unsigned long long last_answered;
    char no_ns_reason[640];   /* why replicas run without a PID namespace, if they do */
    struct bw_http_req *submitting; /* the HTTP call being queued: a start is its doing */
    bool fallback;            /* a restore failed: the next cold boot is a fallback */
} sup;

static struct bw_replica *start_replica(const char *why);
static struct bw_replica *boot_cold(struct bw_replica *r, bool tried);

/* ---- bookkeeping -------------------------------------------------------------------- */

static struct bw_replica *replicas(void) { return sup.replicas; }

/* A replica mid-restore has no pid yet but counts: it is being started. */
static bool exists(const struct bw_replica *r) { return r->pid > 0 || r->busy; }

static int count_alive(void) {
    int n = 0;
    for (struct bw_replica *r = sup.replicas; r; r = r->next)
        n += exists(r) && r->phase != BW_R_STOPPING;
    return n;
}

static int count_starting(void) {
    int n = 0;
    for (struct bw_replica *r = sup.replicas; r; r = r->next)
        n += exists(r) && (r->phase == BW_R_BOOT || r->phase == BW_R_RESTORE);
    return n;
}

/* r was the replica that held the store's lease to dump: it is done with it. */
static void dumper_over(const struct bw_replica *r) {
    if (sup.dumper == r->id) {
        sup.dumper = 0;
        bw_store_lease_release(&bw_sup.store);
    }
}

static void unlink_replica(struct bw_replica *r) {
    for (struct bw_replica **p = &sup.replicas; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            break;
        }
    dumper_over(r); /* its boot ended before a publication */
    bw_replica_free(r);
}

static bool crash_budget_left(void) {
    int max = bw_sup.o->max_crashes;
    if (max <= 0 || !sup.crashes) /* --max-crashes 0: never give up */
        return true;
    return bw_window_admit(sup.crashes, &sup.ncrashes, max, CRASH_WINDOW_MS, bw_now_ms());
}

static void shutdown_loop(int code) {
    sup.exit_code = code;
    uv_signal_stop(&sup.sigterm);
    uv_signal_stop(&sup.sigint);
    uv_signal_stop(&sup.sigchld);
    uv_timer_stop(&sup.tick);
    uv_timer_stop(&sup.backoff);
    sup.pending = 0;
    uv_stop(bw_sup.loop);
}

/* ---- configuration ------------------------------------------------------------------ */

static void set_config(const msgpack_object *cfg) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_object(&pk, *cfg);
    free(bw_sup.config);
    bw_sup.config = sb.data;
    bw_sup.config_len = sb.size;
    if (bw_sup.o->keep_warm_s < -0.5) {
        double kw = bw_mp_num(bw_mp_get(cfg, "keep_warm_seconds"), 180);
        sup.keep_warm_s = kw;
    }
    bw_router_set_max_pending((int)bw_mp_num(bw_mp_get(cfg, "max_pending_tasks"), 100));
    const msgpack_object *auth = bw_mp_get(cfg, "authorized");
    if (sup.http && sup.token[0] && auth && auth->type == MSGPACK_OBJECT_BOOLEAN &&
        !auth->via.boolean) {
        bw_info("the endpoint says authorized=False: HTTP calls need no token");
        sup.token[0] = '\0';
        bw_http_set_token(NULL);
    }
}

/* ---- scaling -------------------------------------------------------------------------- */

static void wake_stop(void) {
    if (!sup.waking)
        return;
    for (int i = 0; i < bw_sup.nl; i++)
        uv_poll_stop(&sup.wake[i]);
    sup.waking = false;
}

static void on_wake(uv_poll_t *p, int status, int events) {
    (void)p;
    (void)status;
    (void)events;
    wake_stop();
    if (!sup.stopping && count_alive() == 0 && !sup.pending) /* else the backoff timer starts one */
        start_replica("a connection is waiting");
}

/* At zero replicas nobody accepts on the msgpack sockets: watch them, so a client that
 * connects brings a replica back (its connection waits in the backlog meanwhile). */
static void wake_start(void) {
    if (sup.waking || sup.stopping || bw_sup.nl == 0)
        return;
    for (int i = 0; i < bw_sup.nl; i++)
        uv_poll_start(&sup.wake[i], UV_READABLE, on_wake);
    sup.waking = true;
}

/* The router has calls no replica can take now. True: more capacity may come. */
static bool on_demand(void *arg) {
    (void)arg;
    if (sup.stopping || sup.pending) /* a replacement is due when its backoff ends */
        return sup.pending;
    int alive = count_alive();
    if (alive == 0) {
        start_replica("an HTTP call is waiting");
    } else if (count_starting() == 0 && alive < bw_sup.o->max_replicas && sup.any_served) {
        char why[64];
        snprintf(why, sizeof why, "%zu call(s) queued", bw_router_queued());
        start_replica(why);
    }
    return count_starting() > 0 || count_alive() < bw_sup.o->max_replicas;
}

static void retire_idle(double now) {
    if (sup.keep_warm_s < 0)
        return;
    for (struct bw_replica *r = sup.replicas; r; r = r->next) {
        if (r->phase != BW_R_SERVING || r->pid <= 0)
            continue;
        if (bw_router_inflight(r) > 0 || r->in_call > 0) /* HTTP or msgpack calls running */
            r->last_active = now;
        if (now - r->last_active < sup.keep_warm_s * 1000)
            continue;
        bw_info("replica %d idle for %gs: stopping it (%s)", r->id, sup.keep_warm_s,
                count_alive() == 1 ? "scale to zero; the next call restores one" : "scale down");
        if (sup.http)
            bw_router_drain(r); /* calls arriving now wait for (or start) another replica */
        bw_replica_stop(r, bw_sup.o->grace_s);
    }
}

/* One compact line of state when a person watches (stderr is a terminal). */
static void status_line(double now) {
    if (bw_sup.o->json_logs || !isatty(STDERR_FILENO) || now - sup.last_status < 1000)
        return;
    unsigned long long answered = bw_router_answered(NULL);
    double rps = (double)(answered - sup.last_answered) * 1000.0 / (now - sup.last_status);
    sup.last_answered = answered;
    sup.last_status = now;
    if (!sup.http)
        return;
    fprintf(stderr, "\rbeam: replicas %d (%d starting) | queued %zu | in flight %zu | %.0f req/s   ",
            count_alive(), count_starting(), bw_router_queued(), bw_router_inflight(NULL), rps);
}

/* Shutdown, after the router stopped dispatching: a replica is stopped once the HTTP
 * calls it holds are answered (a host's workers drop requests they have not read yet
 * when told to stop), or when the grace period is over. */
static void stop_drained(double now) {
    for (struct bw_replica *r = sup.replicas; r; r = r->next)
        if (exists(r) && r->phase != BW_R_STOPPING &&
            (!sup.http || bw_router_inflight(r) == 0 || now >= sup.stop_deadline))
            bw_replica_stop(r, bw_sup.o->grace_s);
}

static void on_tick(uv_timer_t *t) {
    (void)t;
    double now = bw_now_ms();
    if (sup.stopping) {
        stop_drained(now);
        return;
    }
    retire_idle(now);
    for (struct bw_replica *r = sup.replicas; r; r = r->next) {
        bw_replica_check_pager(r, now);
        bw_replica_check_ctl(r, now);
    }
    if (count_alive() == 0 && !sup.stopping && !sup.pending)
        wake_start();
    status_line(now);
}

/* ---- replicas --------------------------------------------------------------------------- */

/* Calls in flight one worker may hold: an async endpoint's worker interleaves up to
 * concurrent_requests of them (csrc/aio.c), and one more waits ready behind them. */
static int worker_depth(void) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    const msgpack_object *cfg = bw_fleet_config(&z);
    int depth = bw_mp_true(bw_mp_get(cfg, "is_async"))
                    ? (int)bw_mp_num(bw_mp_get(cfg, "concurrent_requests"), 1) + 1
                    : 0;
    msgpack_zone_destroy(&z);
    return depth;
}

static void replica_serving(struct bw_replica *r) {
    sup.any_served = true;
    r->serving_since = bw_now_ms();
    bw_obs_replica_serving(r);
    dumper_over(r); /* no dump (a publisher took it otherwise) */
    wake_stop();
    if (sup.http && r->upstream.fd >= 0)
        bw_router_attach(r, r->upstream.unix_path, r->workers > 0 ? r->workers : 1,
                         worker_depth());
}

static bool may_dump_now(void) {
    char reason[1024];
    if (!bw_sup.ckpt_on || sup.dumper)
        return false;
    if (bw_ckpt_exists(&bw_sup.ck))
        return false;
    if (bw_ckpt_failed_before(&bw_sup.ck, reason, sizeof reason)) {
        if (bw_sup.o->retry_checkpoint) {
            bw_ckpt_clear_failed(&bw_sup.ck);
            return bw_store_may_dump(&bw_sup.store);
        }
        bw_warn("checkpoint for this key failed before, booting cold without one "
                "(--retry-checkpoint tries again): %s", reason);
        return false;
    }
    return bw_store_may_dump(&bw_sup.store); /* with a store: one machine at a time */
}

static struct bw_replica *start_replica(const char *why) {
    struct bw_replica *r = bw_replica_new(++sup.next_id);
    if (!r)
        return NULL;
    char err[512];
    if (sup.http) {
        char path[128];
        snprintf(path, sizeof path, "%s/replica-%d.sock", sup.rundir, r->id);
        if (bw_listen_unix(&r->upstream, path, err, sizeof err) < 0) {
            bw_error("replica %d: %s", r->id, err);
            bw_replica_free(r);
            return NULL;
        }
    }
    if (sup.submitting) { /* the task ring shows which call paid for this start */
        bw_http_req_trace(sup.submitting)->started = r->id;
        bw_http_req_trace(sup.submitting)->from_zero = count_alive() == 0;
    }
    r->next = sup.replicas;
    sup.replicas = r;
    if (why)
        bw_info("starting replica %d: %s", r->id, why);
    bool tried = bw_sup.ckpt_on && bw_ckpt_exists(&bw_sup.ck);
    if (tried && bw_replica_restore(r) == 0)
        return r; /* replica_restored follows */
    return boot_cold(r, tried);
}

/* r (new, or its restore failed): boot it cold. tried: a restore was tried for it. */
static struct bw_replica *boot_cold(struct bw_replica *r, bool tried) {
    bool dump = may_dump_now();
    if (dump)
        sup.dumper = r->id;
    int rc = bw_replica_boot_cold(r, dump);
    if (rc == 0)
        bw_obs_replica_started(r, tried || sup.fallback ? "fallback" : "cold");
    sup.fallback = false;
    if (rc < 0) {
        unlink_replica(r);
        if (count_alive() == 0) {
            bw_router_fail_queued(503, "Unavailable", "no replica could be started");
            shutdown_loop(1);
        }
        return NULL;
    }
    return r;
}

static void replica_restored(struct bw_replica *r, bool ok) {
    if (ok) {
        bw_obs_replica_started(r, "restore");
    } else if (sup.stopping || r->phase == BW_R_STOPPING) {
        unlink_replica(r); /* stopped meanwhile: nothing to start in its place */
        if (sup.stopping && !sup.replicas)
            shutdown_loop(sup.exit_code);
    } else {
        boot_cold(r, true);
    }
}

static void on_backoff(uv_timer_t *t) {
    (void)t;
    int n = sup.pending;
    sup.pending = 0;
    for (int i = 0; i < n && !sup.stopping; i++)
        start_replica("the restart delay is over");
}

/* A serving host died (and the crash budget allows a replacement). */
static void replace_crashed(const char *why, bool restored, double served_ms) {
    double now = bw_now_ms();
    if (served_ms >= QUICK_MS || now - sup.last_quick > CRASH_WINDOW_MS)
        sup.quick_streak = sup.restored_quick = 0;
    if (served_ms >= QUICK_MS) {
        bw_warn("host %s; starting a new replica", why);
        start_replica(NULL);
        return;
    }
    sup.last_quick = now;
    sup.quick_streak++;
    sup.restored_quick = restored ? sup.restored_quick + 1 : 0;
    double delay = BACKOFF_BASE_MS;
    for (int i = 1; i < sup.quick_streak && delay < BACKOFF_MAX_MS; i++)
        delay *= 2;
    if (delay > BACKOFF_MAX_MS)
        delay = BACKOFF_MAX_MS;
    bw_warn("host %s %.1fs after it became ready (%d such crash%s in a row); starting a new "
            "replica in %.2fs", why, served_ms / 1000, sup.quick_streak,
            sup.quick_streak == 1 ? "" : "es", delay / 1000);
    if (sup.restored_quick >= IMAGE_BAD_AFTER && bw_sup.ckpt_on && bw_ckpt_exists(&bw_sup.ck)) {
        bw_warn("%d restored replicas in a row died within %.0fs of serving: discarding the "
                "checkpoint; the next replica boots cold and dumps a new one",
                sup.restored_quick, QUICK_MS / 1000);
        bw_ckpt_discard(&bw_sup.ck);
        sup.restored_quick = 0;
    }
    sup.pending++;
    uv_timer_start(&sup.backoff, on_backoff, (uint64_t)delay, 0);
}

static void replica_exited(struct bw_replica *r, int status) {
    enum bw_replica_phase phase = r->phase;
    bool replace = r->replace, restored = r->restored;
    double served_ms = r->serving_since > 0 ? bw_now_ms() - r->serving_since : 0;
    char why[128];
    bw_describe_status(status, why, sizeof why);
    /* Detach while r still counts as alive: detaching dispatches, and calls waiting then
     * must not make on_demand start a replica on top of the replacement started below. */
    if (sup.http)
        bw_router_detach(r); /* calls it had not answered get an explicit 502 */
    bw_replica_reaped(r);
    unlink_replica(r);
    if (sup.stopping) {
        if (!sup.replicas)
            shutdown_loop(sup.exit_code);
        return;
    }
    switch (phase) {
    case BW_R_STOPPING: /* retired: idle */
        return;
    case BW_R_BOOT:
        if (replace) {
            bw_warn("host %s; starting a replica in its place", why);
            start_replica(NULL);
            return;
        }
        bw_error("the app failed to start: host %s", why);
        if (count_alive() == 0) {
            bw_router_fail_queued(503, "Unavailable", "the app failed to start");
            shutdown_loop(1);
        }
        return;
    case BW_R_RESTORE:
        if (replace) { /* its page daemon failed: the image is sound, restore it eagerly */
            start_replica(NULL);
            return;
        }
        bw_warn("restored replica %s before it was ready; discarding the checkpoint, booting cold",
                why);
        bw_ckpt_discard(&bw_sup.ck);
        bw_metrics_restore_failure("exited");
        sup.fallback = true;
        start_replica(NULL);
        return;
    case BW_R_SERVING:
        if (!crash_budget_left()) {
            bw_error("host %s; %d crashes within %.0fs, giving up (--max-crashes)", why,
                     bw_sup.o->max_crashes, CRASH_WINDOW_MS / 1000);
            if (count_alive() == 0 && !sup.pending) {
                bw_router_fail_queued(503, "Unavailable", "the app keeps crashing");
                shutdown_loop(1);
            }
            return;
        }
        replace_crashed(why, restored, served_ms);
        return;
    }
}

/* One exited child we know (a replica not mid-job, or a page daemon), reaped and
 * handled; false when none is waiting. Handling changes the list: callers start over. */
static bool reap_known(void) {
    int status;
    for (struct bw_replica *r = sup.replicas; r; r = r->next) {
        if (r->pid > 0 && !r->busy && waitpid(r->pid, &status, WNOHANG) == r->pid) {
            replica_exited(r, status);
            return true;
        }
        if (r->lazy.pager > 0 && waitpid(r->lazy.pager, &status, WNOHANG) == r->lazy.pager) {
            bw_replica_pager_exited(r, status);
            return true;
        }
    }
    return false;
}

/* Reap by pid, never waitpid(-1) while a job is in flight (job.h): a job thread's
 * children are criu's (libcriu waits for its `criu swrk` itself; lazy.c waits for its
 * criu and page daemon) or a host whose pid the loop learns only when the job is done.
 * A host mid-dump is reaped once its dump is over. With no job in flight, what else
 * exited (orphans reparented to us, the child subreaper) is reaped and dropped;
 * __WNOTHREAD: only this thread's children, whatever a pool thread may have left. */
static void reap(void) {
    while (reap_known()) {
    }
    if (bw_jobs_in_flight() > 0)
        return;
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG | __WNOTHREAD)) > 0)
        for (struct bw_replica *r = sup.replicas; r; r = r->next)
            if (r->pid == pid) {
                replica_exited(r, status);
                break;
            } else if (r->lazy.pager == pid) {
                bw_replica_pager_exited(r, status);
                break;
            }
}

static void on_sigchld(uv_signal_t *h, int sig) {
    (void)h;
    (void)sig;
    reap();
}

/* First signal: stop dispatching (new HTTP requests get 503), let calls in flight
 * finish, then stop each replica (stop_drained). A second signal stops them all now,
 * and kills those already stopping. */
static void on_signal(uv_signal_t *h, int sig) {
    (void)h;
    bool again = sup.stopping;
    if (!again)
        bw_info("received %s, stopping (finishing requests for up to %gs)", strsignal(sig),
                bw_sup.o->grace_s);
    sup.stopping = true;
    sup.stop_deadline = bw_now_ms() + bw_sup.o->grace_s * 1000;
    wake_stop();
    uv_timer_stop(&sup.backoff);
    sup.pending = 0;
    if (sup.http) {
        bw_http_stop();
        bw_router_drain(NULL);
        bw_router_fail_queued(503, "ShuttingDown", "the server is stopping");
    }
    if (again) {
        for (struct bw_replica *r = sup.replicas; r; r = r->next)
            bw_replica_stop(r, bw_sup.o->grace_s);
    } else {
        stop_drained(bw_now_ms());
    }
    if (!sup.replicas)
        shutdown_loop(0);
}

/* ---- HTTP ---------------------------------------------------------------------------- */

static void on_http_call(struct bw_http_req *req, void *arg) {
    (void)arg;
    bw_http_req_trace(req)->call = true;
    sup.submitting = req; /* a replica started while queueing it is its start */
    bw_router_submit(req); /* may answer, and free, req */
    sup.submitting = NULL;
}

static void on_http_stats(struct bw_http_req *req, void *arg) {
    (void)arg;
    msgpack_sbuffer j;
    msgpack_sbuffer_init(&j);
    char buf[256];
    int n = snprintf(buf, sizeof buf,
                     "{\"queued\":%zu,\"inflight\":%zu,\"answered\":%llu,\"max_replicas\":%d,"
                     "\"keep_warm_seconds\":%g,\"checkpoint\":%s,\"replicas\":[",
                     bw_router_queued(), bw_router_inflight(NULL), bw_router_answered(NULL),
                     bw_sup.o->max_replicas, sup.keep_warm_s,
                     bw_sup.ckpt_on && bw_ckpt_exists(&bw_sup.ck) ? "true" : "false");
    msgpack_sbuffer_write(&j, buf, (size_t)n);
    bool first = true;
    for (struct bw_replica *r = sup.replicas; r; r = r->next) {
        if (r->pid <= 0)
            continue;
        n = snprintf(buf, sizeof buf,
                     "%s{\"id\":%d,\"pid\":%d,\"state\":\"%s\",\"restored\":%s,\"workers\":%d,"
                     "\"answered\":%llu,\"requests\":%llu,\"inflight\":%zu,\"profile\":",
                     first ? "" : ",", r->id, (int)r->pid, bw_replica_phase_name(r->phase),
                     r->restored ? "true" : "false", r->workers, bw_router_answered(r),
                     r->requests, bw_router_inflight(r));
        msgpack_sbuffer_write(&j, buf, (size_t)n);
        msgpack_zone z;
        msgpack_zone_init(&z, 1024);
        msgpack_object p;
        if (r->profile.size && bw_mp_unpack_exact(r->profile.data, r->profile.size, &z, &p) == 0)
            bw_json_append_object(&j, &p);
        else
            msgpack_sbuffer_write(&j, "null", 4);
        msgpack_zone_destroy(&z);
        msgpack_sbuffer_write(&j, "}", 1);
        first = false;
    }
    msgpack_sbuffer_write(&j, "]}", 2);
    bw_http_reply(req, 200, j.data, j.size, NULL, -1);
    msgpack_sbuffer_destroy(&j);
}

static int setup_http(void) {
    const struct bw_options *o = bw_sup.o;
    char spec[320], err[512];
    /* 0700: the replicas' private sockets. Its descriptor stays open: the lock on it. */
    if (bw_private_dir("/tmp", "beam-", sup.rundir, sizeof sup.rundir) < 0) {
        bw_error("cannot create a private directory: %s", strerror(errno));
        return -1;
    }
    snprintf(spec, sizeof spec, strchr(o->http_host, ':') ? "[%s]:%d" : "%s:%d", o->http_host,
             o->http_port);
    if (bw_listen_tcp(&sup.http_l, spec, err, sizeof err) < 0) {
        bw_error("%s", err);
        return -1;
    }
    const char *env = getenv("BEAM_AUTH_TOKEN");
    if (o->no_auth) {
        sup.token[0] = '\0';
    } else if (env && *env) {
        snprintf(sup.token, sizeof sup.token, "%s", env);
    } else {
        unsigned char raw[24];
        if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
            bw_error("cannot generate an auth token: %s", strerror(errno));
            return -1;
        }
        for (size_t i = 0; i < sizeof raw; i++)
            snprintf(sup.token + 2 * i, 3, "%02x", raw[i]);
    }
    struct bw_http_options ho = {
        .max_body = o->max_body,
        .token = sup.token[0] ? sup.token : NULL,
        .header_timeout_s = o->header_timeout_s,
        .body_timeout_s = o->body_timeout_s,
        .idle_timeout_s = o->idle_timeout_s,
        .max_conns = o->max_conns,
    };
    struct bw_http_handlers hh = {on_http_call, on_http_stats, bw_obs_owns, bw_obs_get,
                                  bw_obs_done, NULL};
    if (bw_obs_init(o->task_history, o->access_log, o->json_logs) < 0) {
        bw_error("cannot allocate the task history (--task-history %d)", o->task_history);
        return -1;
    }
    bw_router_init(bw_sup.loop, o->max_frame, on_demand, NULL);
    if (bw_http_start(bw_sup.loop, sup.http_l.fd, &ho, &hh) < 0)
        return -1;
    bw_info("HTTP on http://%s", sup.http_l.address + 6);
    if (o->no_auth)
        bw_info("HTTP auth off (--no-auth)");
    else if (env && *env)
        bw_info("HTTP calls need 'Authorization: Bearer $BEAM_AUTH_TOKEN'");
    else /* generated for this run: the user needs to see it to call us */
        bw_info("HTTP calls need 'Authorization: Bearer %s' (set BEAM_AUTH_TOKEN to choose one, "
                "--no-auth for none)", sup.token);
    return 0;
}

/* ---- setup ---------------------------------------------------------------------------- */

static int open_listeners(void) {
    char err[512];
    const struct bw_options *o = bw_sup.o;
    static const char *dflt[] = {"127.0.0.1:8765"};
    bool any = o->ntcps || o->nsockets || o->http_port >= 0;
    const char *const *tcps = any ? o->tcps : dflt;
    int ntcp = any ? o->ntcps : 1;
    for (int i = 0; i < o->nsockets; i++, bw_sup.nl++)
        if (bw_listen_unix(&bw_sup.l[bw_sup.nl], o->sockets[i], err, sizeof err) < 0)
            goto fail;
    for (int i = 0; i < ntcp; i++, bw_sup.nl++)
        if (bw_listen_tcp(&bw_sup.l[bw_sup.nl], tcps[i], err, sizeof err) < 0)
            goto fail;
    for (int i = 0; i < bw_sup.nl; i++) {
        bw_info("listening on %s", bw_sup.l[i].address);
        uv_poll_init(bw_sup.loop, &sup.wake[i], bw_sup.l[i].fd);
    }
    return 0;
fail:
    bw_error("%s", err);
    return -1;
}

/* Replicas get PID namespaces (and so checkpoints) only where we may make them: root
 * with CAP_SYS_ADMIN. Elsewhere, e.g. a container with the default capabilities, hosts
 * are plain children and serve cold; the reason is said once. */
static void find_namespaces(void) {
    char why[256], missing[256];
    if (geteuid() != 0) {
        snprintf(sup.no_ns_reason, sizeof sup.no_ns_reason,
                 "checkpointing needs root (CRIU, PID namespaces)");
        return;
    }
    bw_sup.use_ns = bw_priv_pidns(why, sizeof why);
    if (bw_sup.use_ns)
        return;
    if (bw_priv_missing(missing, sizeof missing) > 0)
        snprintf(sup.no_ns_reason, sizeof sup.no_ns_reason,
                 "%s; this process lacks %s (add them to the container to checkpoint: "
                 "docs/checkpoint.md, \"In a container\")", why, missing);
    else
        snprintf(sup.no_ns_reason, sizeof sup.no_ns_reason, "%s", why);
    bw_debug("%s: serving without a PID namespace", why);
}

static void setup_checkpointing(void) {
    const struct bw_options *o = bw_sup.o;
    char err[1024];
    if (o->no_checkpoint)
        return;
    if (!o->checkpoint_key) {
        bw_debug("no --checkpoint-key: checkpointing off (python -m beam serve sets it)");
        return;
    }
    if (!bw_sup.use_ns) {
        bw_warn("checkpointing off, serving cold: %s", sup.no_ns_reason);
        return;
    }
    if (bw_ckpt_open(&bw_sup.ck, o->checkpoint_dir, o->checkpoint_key, o->criu,
                     o->criu_timeout_s, err, sizeof err) < 0) {
        bw_warn("checkpointing off: %s", err);
        return;
    }
    bw_sup.ckpt_on = true;
    if (o->store && bw_store_open(&bw_sup.store, o->store, o->checkpoint_key, o->store_lease_s,
                                  err, sizeof err) < 0)
        bw_warn("shared store off: %s", err);
    bw_store_pick_image(&bw_sup.store, &bw_sup.ck); /* nothing serves yet: may block */
}

static void cleanup(void) {
    bw_store_lease_release(&bw_sup.store);
    for (int i = 0; i < bw_sup.nl; i++)
        if (bw_sup.l[i].unix_path[0])
            unlink(bw_sup.l[i].unix_path);
    while (sup.replicas)
        unlink_replica(sup.replicas); /* removes their private sockets */
    if (sup.rundir[0])
        rmdir(sup.rundir);
}

static void on_jobs_deadline(uv_timer_t *t) { (void)t; }

/* The loop has stopped with no replica left, but a job that belongs to none may still
 * run: a working set being recorded (lazy.c) rewrites an image's pagemaps and then its
 * hashes, and killed between the two it would leave an image that the next start
 * discards. Let such jobs end, for up to --grace seconds. */
static void finish_jobs(void) {
    double until = bw_now_ms() + bw_sup.o->grace_s * 1000;
    if (bw_jobs_in_flight() > 0)
        bw_info("waiting for %d background job(s) to end", bw_jobs_in_flight());
    uv_timer_start(&sup.tick, on_jobs_deadline, (uint64_t)(bw_sup.o->grace_s * 1000) + 1, 0);
    while (bw_jobs_in_flight() > 0 && bw_now_ms() < until)
        uv_run(bw_sup.loop, UV_RUN_ONCE); /* a job's end, or the timer, wakes it */
    uv_timer_stop(&sup.tick);
    if (bw_jobs_in_flight() > 0)
        bw_warn("%d background job(s) still running after %gs; exiting anyway",
                bw_jobs_in_flight(), bw_sup.o->grace_s);
}

static void log_to_stderr(const char *line, size_t len) { bw_output_write(2, line, len); }

int bw_supervisor_main(const struct bw_options *o, int argc, char **argv) {
    (void)argc;
    (void)argv;
    static const struct bw_fleet_owner owner = {set_config, replica_serving, replica_restored,
                                                replicas};
    bw_sup.o = o;
    bw_sup.owner = &owner;
    bw_log_init("beam", o->json_logs);
    bw_env_pass(o->pass_env, o->npass_env);
    signal(SIGPIPE, SIG_IGN);
    ssize_t n = readlink("/proc/self/exe", bw_sup.exe, sizeof bw_sup.exe - 1);
    if (n <= 0) {
        bw_error("cannot find my own executable: %s", strerror(errno));
        return 1;
    }
    bw_sup.exe[n] = '\0';
    /* A lazily restored host is left by the criu that restored it (lazy.c): it must be
     * reparented to us, not to init, to be reaped and supervised like any replica. */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    find_namespaces();
    bw_sup.loop = uv_default_loop();
    bw_output_init(bw_sup.loop);
    bw_log_set_sink(log_to_stderr);
    sup.keep_warm_s = o->keep_warm_s < -0.5 ? 180 : o->keep_warm_s;
    sup.http = o->http_port >= 0;
    if (open_listeners() < 0 || (sup.http && setup_http() < 0)) {
        cleanup();
        return 1;
    }
    setup_checkpointing();
    uv_signal_init(bw_sup.loop, &sup.sigterm);
    uv_signal_init(bw_sup.loop, &sup.sigint);
    uv_signal_init(bw_sup.loop, &sup.sigchld);
    uv_timer_init(bw_sup.loop, &sup.tick);
    uv_timer_init(bw_sup.loop, &sup.backoff);
    if (o->max_crashes > 0)
        sup.crashes = calloc((size_t)o->max_crashes, sizeof *sup.crashes);
    uv_signal_start(&sup.sigterm, on_signal, SIGTERM);
    uv_signal_start(&sup.sigint, on_signal, SIGINT);
    uv_signal_start(&sup.sigchld, on_sigchld, SIGCHLD);
    bw_job_set_after(reap);
    uv_timer_start(&sup.tick, on_tick, TICK_MS, TICK_MS);
    if (start_replica(NULL)) {
        uv_run(bw_sup.loop, UV_RUN_DEFAULT);
        finish_jobs();
    } else {
        sup.exit_code = 1;
    }
    if (isatty(STDERR_FILENO) && sup.http && !o->json_logs)
        fputc('\n', stderr);
    cleanup();
    bw_log_set_sink(NULL);
    bw_output_close();
    if (sup.exit_code == 0)
        bw_info("stopped");
    return sup.exit_code;
}
