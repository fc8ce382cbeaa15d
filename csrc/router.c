/* router.c - queue and dispatch of HTTP calls over msgpack to replicas.
 *
 * Answers on one upstream connection come back in the order the calls were sent, so
 * each connection keeps a FIFO of its in-flight calls. Writes to a connection are
 * gathered during a loop iteration and sent together from a check handle: under load
 * one write carries many calls.
 *
 * A connection belongs to one worker process of the replica (the kernel's accept picks
 * it). When that worker dies the connection ends while the replica keeps serving (its
 * host forks a replacement), so a lost connection is reopened, with a growing delay,
 * until the supervisor detaches or drains the replica: otherwise every worker crash
 * would take HTTP capacity away for good. */
#define _GNU_SOURCE
#include "router.h"

#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include "frame.h"
#include "json.h"
#include "log.h"
#include "mp.h"
#include "stream.h"
#include "util.h"

/* Calls in flight per upstream connection. The supervisor opens two connections per
 * worker, so a replica holds at most 2 x workers calls: one running and one ready in
 * each worker. Everything beyond waits in the router queue, where it is visible to the
 * scaling decision (a deeper pipeline would hide the backlog inside the replicas). */
#define DEPTH 1
/* Reconnect delay after a lost connection: doubles per failure in a row, reset by an
 * answer. Short first: the host replaces a crashed worker within milliseconds, and
 * its listening socket queues our connect meanwhile. */
#define RETRY_MIN_MS 20.0
#define RETRY_MAX_MS 2000.0

struct call {
    struct bw_http_req *req;
    double dispatched;
    struct call *next;
};

struct upstream {
    uv_pipe_t pipe;
    uv_timer_t retry;         /* reopens a lost connection */
    void *owner;
    char path[sizeof ((struct sockaddr_un *)0)->sun_path];
    bool pipe_open;           /* pipe initialised and not yet closed */
    bool connected, dead;
    bool draining;            /* the replica is stopping: no new calls, no reconnect */
    int handles;              /* open libuv handles; freed when it drops to 0 */
    double retry_ms;
    struct call *head, *tail; /* in flight, in send order */
    int inflight;
    unsigned long long answered;
    struct bw_buf in;
    msgpack_sbuffer out; /* gathered, not yet written */
    struct upstream *next_dirty;
    bool dirty;
};

static struct {
    uv_loop_t *loop;
    uv_check_t flusher;
    size_t max_frame;
    int max_pending;
    bw_router_demand_fn demand;
    void *demand_arg;
    struct upstream **up; /* every connection of every attached replica */
    int nup, capup;
    struct call *qhead, *qtail; /* waiting for a replica */
    size_t queued;
    struct upstream *dirty;
    unsigned long long seq;
    unsigned long long answered_gone; /* answers of detached replicas, for totals */
} R;

/* ---- answers ------------------------------------------------------------------------ */

static int status_for(const char *type) {
    if (strcmp(type, "Timeout") == 0)
        return 504;
    if (strcmp(type, "BadRequest") == 0 || strcmp(type, "BadFrame") == 0)
        return 400;
    if (strcmp(type, "FrameTooLarge") == 0)
        return 413;
    return 500; /* the handler raised, or returned something that cannot be sent
                 * (UnsupportedType, ResultTooLarge) */
}

static void answer(struct call *k, const char *body, size_t len) {
    double wait = k->dispatched - bw_http_req_arrival(k->req);
    msgpack_zone z;
    msgpack_zone_init(&z, 2048);
    msgpack_object m;
    char task[64] = "", type[128] = "Exception", msg[2048] = "";
    if (bw_mp_unpack_exact(body, len, &z, &m) < 0 || m.type != MSGPACK_OBJECT_MAP) {
        bw_http_reply_error(k->req, 502, "BadGateway", "replica sent an unreadable answer", NULL, wait);
    } else {
        bw_mp_strdup(bw_mp_get(&m, "task_id"), task, sizeof task);
        if (bw_mp_true(bw_mp_get(&m, "ok"))) {
            msgpack_sbuffer j;
            msgpack_sbuffer_init(&j);
            const msgpack_object *res = bw_mp_get(&m, "result");
            if (res)
                bw_json_append_object(&j, res);
            else
                msgpack_sbuffer_write(&j, "null", 4);
            bw_http_reply(k->req, 200, j.data, j.size, task, wait);
            msgpack_sbuffer_destroy(&j);
        } else {
            const msgpack_object *e = bw_mp_get(&m, "error");
            bw_mp_strdup(bw_mp_get(e, "type"), type, sizeof type);
            bw_mp_strdup(bw_mp_get(e, "message"), msg, sizeof msg);
            bw_http_reply_error(k->req, status_for(type), type, msg, task, wait);
        }
    }
    msgpack_zone_destroy(&z);
    free(k);
}

static void dispatch(void);

static void up_fail_inflight(struct upstream *u, const char *why) {
    while (u->head) {
        struct call *k = u->head;
        u->head = k->next;
        /* Never silence: the caller learns its call may or may not have run. */
        bw_http_reply_error(k->req, 502, "ReplicaLost", why, NULL,
                            k->dispatched - bw_http_req_arrival(k->req));
        free(k);
    }
    u->tail = NULL;
    u->inflight = 0;
}

static void up_handle_closed(uv_handle_t *h) {
    struct upstream *u = h->data;
    if (h == (uv_handle_t *)&u->pipe)
        u->pipe_open = false;
    if (--u->handles > 0)
        return;
    bw_buf_free(&u->in);
    msgpack_sbuffer_destroy(&u->out);
    free(u);
}

static void up_forget(struct upstream *u) {
    for (int i = 0; i < R.nup; i++)
        if (R.up[i] == u) {
            R.up[i] = R.up[--R.nup];
            break;
        }
}

/* For good: the replica is gone (or going and drained). */
static void up_remove(struct upstream *u, const char *why) {
    if (u->dead)
        return;
    u->dead = true;
    up_fail_inflight(u, why);
    R.answered_gone += u->answered;
    up_forget(u);
    uv_timer_stop(&u->retry);
    uv_close((uv_handle_t *)&u->retry, up_handle_closed);
    if (u->pipe_open && !uv_is_closing((uv_handle_t *)&u->pipe))
        uv_close((uv_handle_t *)&u->pipe, up_handle_closed);
}

static void up_connect(struct upstream *u);

static void on_retry(uv_timer_t *t) {
    struct upstream *u = t->data;
    if (!u->dead && !u->draining && !u->pipe_open)
        up_connect(u);
}

/* The lost connection's handle is closed: open a new one after the delay. */
static void up_pipe_closed(uv_handle_t *h) {
    struct upstream *u = h->data;
    if (u->dead) { /* removed while this close was under way */
        up_handle_closed(h);
        return;
    }
    u->pipe_open = false;
    u->handles--;
    u->retry_ms = u->retry_ms < RETRY_MIN_MS ? RETRY_MIN_MS : u->retry_ms * 2;
    if (u->retry_ms > RETRY_MAX_MS)
        u->retry_ms = RETRY_MAX_MS;
    uv_timer_start(&u->retry, on_retry, (uint64_t)u->retry_ms, 0);
}

/* The connection ended (its worker died, or the stream went out of sync) but the
 * replica may still serve: fail what was in flight on it, close it, and reconnect
 * unless the replica is draining. */
static void up_lost(struct upstream *u, const char *why) {
    if (u->dead)
        return;
    if (u->draining) {
        up_remove(u, why);
        return;
    }
    up_fail_inflight(u, why);
    u->connected = false;
    u->in.start = u->in.len = 0;
    msgpack_sbuffer_clear(&u->out);
    if (u->pipe_open && !uv_is_closing((uv_handle_t *)&u->pipe))
        uv_close((uv_handle_t *)&u->pipe, up_pipe_closed);
}

static void up_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)suggested;
    struct upstream *u = h->data;
    if (bw_buf_reserve(&u->in, 64 * 1024) < 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    buf->base = bw_buf_tail(&u->in);
    buf->len = u->in.cap - u->in.start - u->in.len;
}

static void up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    (void)buf;
    struct upstream *u = s->data;
    if (n < 0) {
        up_lost(u, "the replica closed the connection before answering");
        dispatch();
        return;
    }
    u->in.len += (size_t)n;
    for (;;) {
        const char *body;
        size_t blen, used, need;
        enum bw_frame_status st = bw_frame_next(bw_buf_head(&u->in), u->in.len, R.max_frame + BW_FRAME_RESPONSE_SLACK,
                                                &body, &blen, &used, &need);
        if (st == BW_FRAME_NEED_MORE)
            break;
        if (st == BW_FRAME_TOO_LARGE || !u->head) {
            up_lost(u, "the replica sent an unexpected answer");
            break;
        }
        struct call *k = u->head;
        u->head = k->next;
        if (!u->head)
            u->tail = NULL;
        u->inflight--;
        u->answered++;
        u->retry_ms = 0; /* it answers: the next loss reconnects at once */
        answer(k, body, blen);
        bw_buf_consume(&u->in, used);
    }
    dispatch();
}

/* ---- sending ------------------------------------------------------------------------ */

static void on_written(uv_write_t *w, int status) {
    bw_stream_written(w);
    (void)status; /* a broken connection shows up as a read error */
}

static void flush_dirty(uv_check_t *h) {
    (void)h;
    while (R.dirty) {
        struct upstream *u = R.dirty;
        R.dirty = u->next_dirty;
        u->dirty = false;
        if (u->dead || u->out.size == 0)
            continue;
        size_t len = u->out.size, queued = 0;
        char *data = msgpack_sbuffer_release(&u->out); /* the next calls start a new one */
        if (bw_stream_send((uv_stream_t *)&u->pipe, data, len, 1, on_written, &queued) < 0)
            up_lost(u, "cannot write to the replica");
    }
}

static void send_call(struct upstream *u, struct call *k) {
    size_t kwlen;
    const char *kw = bw_http_req_kwargs(k->req, &kwlen);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &u->out, msgpack_sbuffer_write);
    size_t h = bw_frame_begin(&u->out);
    msgpack_pack_map(&pk, 2);
    bw_mp_kv_int(&pk, "id", (long long)++R.seq);
    bw_mp_str(&pk, "kwargs");
    msgpack_sbuffer_write(&u->out, kw, kwlen);
    bw_frame_end(&u->out, h);
    k->dispatched = bw_now_ms();
    bw_http_req_trace(k->req)->owner = u->owner; /* for the task ring (tasks.c) */
    k->next = NULL;
    if (u->tail)
        u->tail->next = k;
    else
        u->head = k;
    u->tail = k;
    u->inflight++;
    if (!u->dirty) {
        u->dirty = true;
        u->next_dirty = R.dirty;
        R.dirty = u;
    }
}

static struct upstream *least_loaded(void) {
    struct upstream *best = NULL;
    for (int i = 0; i < R.nup; i++) {
        struct upstream *u = R.up[i];
        if (u->connected && !u->dead && !u->draining && u->inflight < DEPTH &&
            (!best || u->inflight < best->inflight))
            best = u;
    }
    return best;
}

bool bw_router_has_capacity(void) { return least_loaded() != NULL; }

static void dispatch(void) {
    struct upstream *u;
    while (R.qhead && (u = least_loaded())) {
        struct call *k = R.qhead;
        R.qhead = k->next;
        if (!R.qhead)
            R.qtail = NULL;
        R.queued--;
        send_call(u, k);
    }
    if (R.qhead && R.demand)
        R.demand(R.demand_arg);
}

void bw_router_submit(struct bw_http_req *r) {
    if (R.queued >= (size_t)R.max_pending) {
        bw_http_reply_error(r, 429, "TooManyRequests",
                            "the queue is full (max_pending_tasks); retry later", NULL, -1);
        return;
    }
    struct call *k = calloc(1, sizeof *k);
    if (!k) {
        bw_http_reply_error(r, 503, "Overloaded", "out of memory", NULL, -1);
        return;
    }
    k->req = r;
    if (R.qtail)
        R.qtail->next = k;
    else
        R.qhead = k;
    R.qtail = k;
    R.queued++;
    dispatch();
}

void bw_router_fail_queued(int status, const char *type, const char *message) {
    while (R.qhead) {
        struct call *k = R.qhead;
        R.qhead = k->next;
        bw_http_reply_error(k->req, status, type, message, NULL, bw_now_ms() - bw_http_req_arrival(k->req));
        free(k);
    }
    R.qtail = NULL;
    R.queued = 0;
}

/* ---- replicas ----------------------------------------------------------------------- */

static void on_connect(uv_connect_t *c, int status) {
    struct upstream *u = c->handle->data;
    free(c);
    if (u->dead || uv_is_closing((uv_handle_t *)&u->pipe))
        return;
    if (status < 0) {
        /* The host may be between workers, or about to exit (then detach ends this). */
        bw_debug("router: cannot connect to a replica: %s; retrying", uv_strerror(status));
        up_lost(u, "cannot connect to the replica");
        return;
    }
    u->connected = true;
    uv_read_start((uv_stream_t *)&u->pipe, up_alloc, up_read);
    dispatch();
}

static void up_connect(struct upstream *u) {
    uv_connect_t *c = malloc(sizeof *c);
    if (!c) {
        uv_timer_start(&u->retry, on_retry, (uint64_t)RETRY_MAX_MS, 0);
        return;
    }
    uv_pipe_init(R.loop, &u->pipe, 0);
    u->pipe.data = u;
    u->pipe_open = true;
    u->handles++;
    uv_pipe_connect(c, &u->pipe, u->path, on_connect);
}

static int up_track(struct upstream *u) {
    if (R.nup == R.capup) {
        int cap = R.capup ? 2 * R.capup : 16;
        struct upstream **up = realloc(R.up, (size_t)cap * sizeof *up);
        if (!up)
            return -1;
        R.up = up;
        R.capup = cap;
    }
    R.up[R.nup++] = u;
    return 0;
}

int bw_router_attach(void *owner, const char *unix_path, int n) {
    if (strlen(unix_path) >= sizeof ((struct upstream *)0)->path) {
        bw_error("router: replica socket path too long: %s", unix_path);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        struct upstream *u = calloc(1, sizeof *u);
        if (!u || up_track(u) < 0) {
            free(u);
            bw_error("router: out of memory connecting to a replica (%d of %d connections)", i, n);
            return -1;
        }
        u->owner = owner;
        snprintf(u->path, sizeof u->path, "%s", unix_path);
        msgpack_sbuffer_init(&u->out);
        uv_timer_init(R.loop, &u->retry);
        u->retry.data = u;
        u->handles = 1;
        up_connect(u);
    }
    return 0;
}

void bw_router_drain(void *owner) {
    for (int i = R.nup - 1; i >= 0; i--) {
        struct upstream *u = R.up[i];
        if (owner && u->owner != owner)
            continue;
        u->draining = true;
        if (!u->connected) /* nothing in flight on it; do not reopen it */
            up_remove(u, "the replica is stopping");
    }
}

void bw_router_detach(void *owner) {
    for (int i = R.nup - 1; i >= 0; i--)
        if (R.up[i]->owner == owner)
            up_remove(R.up[i], "the replica serving this call exited before answering; "
                               "the call may or may not have run");
    dispatch();
}

size_t bw_router_queued(void) { return R.queued; }

size_t bw_router_inflight(void *owner) {
    size_t n = 0;
    for (int i = 0; i < R.nup; i++)
        if (!owner || R.up[i]->owner == owner)
            n += (size_t)R.up[i]->inflight;
    return n;
}

unsigned long long bw_router_answered(void *owner) {
    unsigned long long n = owner ? 0 : R.answered_gone;
    for (int i = 0; i < R.nup; i++)
        if (!owner || R.up[i]->owner == owner)
            n += R.up[i]->answered;
    return n;
}

void bw_router_set_max_pending(int n) { R.max_pending = n > 0 ? n : 1; }

void bw_router_init(uv_loop_t *loop, size_t max_frame, bw_router_demand_fn demand, void *arg) {
    R.loop = loop;
    R.max_frame = max_frame;
    R.max_pending = 100;
    R.demand = demand;
    R.demand_arg = arg;
    uv_check_init(loop, &R.flusher);
    uv_check_start(&R.flusher, flush_dirty);
    uv_unref((uv_handle_t *)&R.flusher);
}
