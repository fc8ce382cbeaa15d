/* observe.c - the supervisor's observability endpoints and hooks (see observe.h).
 *
 * Everything here runs on the event loop and answers from memory, except the replica
 * memory figures of /dashboard/state: a few small /proc reads per replica, bounded by
 * the replica count (at most 64). */
#define _GNU_SOURCE
#include "observe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "accesslog.h"
#include "fleet.h"
#include "json.h"
#include "metrics.h"
#include "mp.h"
#include "replica.h"
#include "router.h"
#include "tasks.h"
#include "util.h"

/* csrc/dashboard.html, embedded at build time (CMakeLists.txt) */
extern const unsigned char bw_dashboard_html[];
extern const size_t bw_dashboard_html_len;

#define LIST_DEFAULT 100
#define MAX_PIDS 256 /* per replica: its host and workers */

static struct {
    bool access_log, json_logs;
} obs;

int bw_obs_init(int task_history, bool access_log, bool json_logs) {
    obs.access_log = access_log;
    obs.json_logs = json_logs;
    return bw_tasks_init((size_t)task_history);
}

/* ---- hooks ------------------------------------------------------------------------------ */

static int replica_id_of(const void *owner) {
    for (struct bw_replica *r = bw_sup.owner->replicas(); r && owner; r = r->next)
        if (r == owner) /* compared, never dereferenced unless still in the list */
            return r->id;
    return 0;
}

void bw_obs_done(struct bw_http_req *req, int status, const char *task_id, double wait_ms,
                 void *arg) {
    (void)arg;
    double total = bw_now_ms() - bw_http_req_arrival(req);
    const struct bw_http_trace *tr = bw_http_req_trace(req);
    bw_metrics_http(status);
    if (tr->call) {
        bool dispatched = tr->owner != NULL;
        double queued = wait_ms >= 0 ? wait_ms : 0;
        struct bw_task_rec t = {
            .id = task_id, .http_status = status, .replica = replica_id_of(tr->owner),
            .started = tr->started, .from_zero = tr->from_zero,
            .arrival = bw_http_req_arrival(req), .queued_ms = queued,
            .run_ms = dispatched && total > queued ? total - queued : 0,
        };
        task_id = bw_tasks_add(&t); /* one made here for calls no replica saw */
        bw_metrics_call(status, wait_ms, t.run_ms, dispatched);
    }
    if (obs.access_log)
        bw_access_log(obs.json_logs, bw_http_req_method(req), bw_http_req_path(req), status, total,
                      task_id);
}

void bw_obs_replica_started(const struct bw_replica *r, const char *mode) {
    bw_tasks_start_begin(r->id, mode, r->t0);
    bw_metrics_start(mode);
}

void bw_obs_replica_serving(const struct bw_replica *r) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object p;
    const struct bw_start *s = NULL;
    if (r->profile.size && bw_mp_unpack_exact(r->profile.data, r->profile.size, &z, &p) == 0)
        s = bw_tasks_start_ready(r->id, &p);
    if (s && s->ready)
        bw_metrics_start_ready(s);
    msgpack_zone_destroy(&z);
}

/* ---- /metrics --------------------------------------------------------------------------- */

static void write_gauges(msgpack_sbuffer *b) {
    static const enum bw_replica_phase phases[] = {BW_R_BOOT, BW_R_RESTORE, BW_R_SERVING,
                                                   BW_R_STOPPING};
    bw_metrics_family(b, "beam_replicas", "gauge", "Replicas by state.");
    for (size_t i = 0; i < sizeof phases / sizeof *phases; i++) {
        int n = 0;
        for (struct bw_replica *r = bw_sup.owner->replicas(); r; r = r->next)
            n += (r->pid > 0 || r->busy) && r->phase == phases[i]; /* busy: CRIU at work */
        bw_mp_printf(b, "beam_replicas{state=\"%s\"} %d\n", bw_replica_phase_name(phases[i]), n);
    }
    bw_metrics_family(b, "beam_queued_calls", "gauge", "Calls waiting for a replica.");
    bw_mp_printf(b, "beam_queued_calls %zu\n", bw_router_queued());
    bw_metrics_family(b, "beam_inflight_calls", "gauge", "Calls a replica is running.");
    bw_mp_printf(b, "beam_inflight_calls %zu\n", bw_router_inflight(NULL));
    bw_metrics_family(b, "beam_task_history_capacity", "gauge",
                      "Entries the task ring holds (--task-history).");
    bw_mp_printf(b, "beam_task_history_capacity %zu\n", bw_tasks_capacity());
}

static void get_metrics(struct bw_http_req *req) {
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    bw_metrics_write(&b);
    write_gauges(&b);
    bw_http_reply_raw(req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, b.data, b.size);
    msgpack_sbuffer_destroy(&b);
}

/* ---- /tasks ----------------------------------------------------------------------------- */

static size_t query_limit(const char *q) {
    const char *p = strstr(q, "limit=");
    if (!p || (p != q && p[-1] != '&'))
        return LIST_DEFAULT;
    long v = strtol(p + 6, NULL, 10);
    return v < 0 ? 0 : (size_t)v;
}

static void get_tasks(struct bw_http_req *req, const char *path, const char *query) {
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    if (strcmp(path, "/tasks") == 0) {
        bw_tasks_json_list(&b, query_limit(query));
        bw_http_reply(req, 200, b.data, b.size, NULL, -1);
    } else if (bw_tasks_json_one(&b, path + 7)) {
        bw_http_reply(req, 200, b.data, b.size, NULL, -1);
    } else {
        bw_http_reply_error(req, 404, "NotFound",
                            "no such task in the history (it keeps the last --task-history calls)",
                            NULL, -1);
    }
    msgpack_sbuffer_destroy(&b);
}

/* ---- /dashboard ------------------------------------------------------------------------- */

/* Proportional set size of a process and its descendants: forked workers share most of
 * their pages with the host, and PSS counts each shared page once in all. Bytes. */
static unsigned long long pss_of(pid_t pid, int depth, int *budget) {
    char path[96];
    if (--*budget < 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
    unsigned long long total = bw_proc_sum(path, "Pss: %llu kB") * 1024;
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pid, (int)pid);
    FILE *f = depth < 4 ? fopen(path, "r") : NULL;
    if (f) {
        int child;
        while (fscanf(f, "%d", &child) == 1)
            total += pss_of(child, depth + 1, budget);
        fclose(f);
    }
    return total;
}

static const char *start_mode(const struct bw_replica *r) {
    const struct bw_start *s = bw_tasks_start_of(r->id);
    return s ? s->mode : r->restored ? "restore" : "cold";
}

static void replicas_json(msgpack_sbuffer *b) {
    bool first = true;
    double now = bw_now_ms();
    bw_mp_printf(b, "\"replicas\":[");
    for (struct bw_replica *r = bw_sup.owner->replicas(); r; r = r->next) {
        if (r->pid <= 0)
            continue;
        int budget = MAX_PIDS;
        bw_mp_printf(b, "%s{\"id\":%d,\"pid\":%d,\"state\":\"%s\",\"restored\":%s,"
                       "\"mode\":\"%s\",\"workers\":%d,\"requests\":%llu,\"answered\":%llu,"
                       "\"inflight\":%zu,\"memory_bytes\":%llu,\"age_s\":%.1f}",
                       first ? "" : ",", r->id, (int)r->pid, bw_replica_phase_name(r->phase),
                       r->restored ? "true" : "false", start_mode(r), r->workers, r->requests,
                       bw_router_answered((void *)r), bw_router_inflight((void *)r),
                       pss_of(r->pid, 0, &budget), (now - r->t0) / 1000);
        first = false;
    }
    bw_mp_printf(b, "]");
}

static void checkpoint_json(msgpack_sbuffer *b) {
    const struct bw_ckpt *c = &bw_sup.ck;
    bool on = bw_sup.ckpt_on, exists = on && bw_ckpt_exists(c);
    char meta[PATH_MAX + 220];
    struct stat st;
    double age = -1;
    snprintf(meta, sizeof meta, "%s/restore.msgpack", c->dir);
    if (exists && stat(meta, &st) == 0)
        age = difftime(time(NULL), st.st_mtime);
    bw_mp_printf(b, "\"checkpoint\":{\"enabled\":%s,\"exists\":%s,\"key\":", on ? "true" : "false",
                   exists ? "true" : "false");
    if (on)
        bw_json_append_str(b, c->key, strlen(c->key));
    else
        bw_mp_printf(b, "null");
    bw_mp_printf(b, ",\"bytes\":%llu,\"age_s\":%.0f}", exists ? bw_metrics_image_bytes_now() : 0,
                   age);
}

static void get_state(struct bw_http_req *req) {
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    bw_mp_printf(&b, "{\"queued\":%zu,\"inflight\":%zu,\"answered\":%llu,\"max_replicas\":%d,",
                   bw_router_queued(), bw_router_inflight(NULL), bw_router_answered(NULL),
                   bw_sup.o->max_replicas);
    replicas_json(&b);
    bw_mp_printf(&b, ",");
    checkpoint_json(&b);
    bw_mp_printf(&b, "}");
    bw_http_reply(req, 200, b.data, b.size, NULL, -1);
    msgpack_sbuffer_destroy(&b);
}

/* A ?token= visit: keep the token in an HttpOnly cookie (page scripts cannot read it) and
 * send the browser to the bare URL, so the token leaves the address bar and history. */
static bool cookie_safe(const char *v) { /* RFC 6265 cookie-octets, and short */
    size_t n = 0;
    for (; *v; v++, n++)
        if (*v < 0x21 || *v > 0x7e || *v == '"' || *v == ',' || *v == ';' || *v == '\\')
            return false;
    return n < 300;
}

static void login(struct bw_http_req *req) {
    char extra[512];
    if (!cookie_safe(bw_http_token())) { /* would break (or inject into) the header */
        bw_http_reply_error(req, 400, "BadRequest",
                            "this token cannot be a cookie (spaces, quotes, ';' or ','): "
                            "choose a BEAM_AUTH_TOKEN without them", NULL, -1);
        return;
    }
    snprintf(extra, sizeof extra,
             "Location: /dashboard\r\nSet-Cookie: beam_token=%s; Path=/; HttpOnly; "
             "SameSite=Strict\r\nCache-Control: no-store\r\n", bw_http_token());
    bw_http_reply_raw(req, 303, "text/plain; charset=utf-8", extra, "see /dashboard\n", 15);
}

static void get_dashboard(struct bw_http_req *req) {
    if (bw_http_req_token_login(req) && bw_http_token()) {
        login(req);
        return;
    }
    bw_http_reply_raw(req, 200, "text/html; charset=utf-8",
                      "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                      "X-Frame-Options: DENY\r\n",
                      (const char *)bw_dashboard_html, bw_dashboard_html_len);
}

/* ---- routes ----------------------------------------------------------------------------- */

bool bw_obs_owns(const char *path) {
    return strcmp(path, "/metrics") == 0 || strcmp(path, "/tasks") == 0 ||
           (strncmp(path, "/tasks/", 7) == 0 && path[7]) || strcmp(path, "/dashboard") == 0 ||
           strcmp(path, "/dashboard/state") == 0;
}

void bw_obs_get(struct bw_http_req *req, const char *path, const char *query, void *arg) {
    (void)arg;
    if (strcmp(path, "/metrics") == 0)
        get_metrics(req);
    else if (strncmp(path, "/tasks", 6) == 0)
        get_tasks(req, path, query);
    else if (strcmp(path, "/dashboard") == 0)
        get_dashboard(req);
    else
        get_state(req);
}
