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

/* Calls in flight per worker process: one running and one ready behind it (on one
 * connection or two: a worker reached by one connection only still gets both, since a
 * busy worker accepts no new connection). Everything beyond waits in the router queue, where it is visible to
 * the scaling decision (a deeper pipeline would hide the backlog inside the replicas).
 *
 * Which worker accepts a connection is the kernel's choice, and an idle replica's
 * workers do not share evenly: connections opened one after another mostly land on the
 * same one or two. So each connection first asks "stats", whose answer names the worker,
 * and calls go to the least-loaded worker, then the least-loaded replica. When every
 * worker reached so far is busy and a replica has workers no connection reaches, the
 * call waits for one more connection: a busy worker is inside a handler and does not
 * accept, so an idle one takes it. */
#define WORKER_DEPTH 2 /* a sync worker: one running, one ready */
/* ... unless no more capacity can come (the supervisor runs --max-replicas already):
 * then a queued call has nowhere else to go, and waiting in the router only costs a
 * context switch per call or two, as the worker and the supervisor take turns. A worker
 * answering quickly then takes up to this many, in one write, and answers them in one:
 * twice the requests per second of a no-op handler on one core (docs/performance.md).
 * Never into a worker that has not answered for BATCH_FRESH_MS: a batch must not wait
 * behind a call that runs long. */
#define BATCH_DEPTH 32
#define BATCH_FRESH_MS 2.0
#define MAX_WORKERS 256 /* as in host.c */
#define PROBE_ID 0      /* the id of the "stats" a new connection sends; calls count from 1 */
/* How long a call waits for a new connection's answer. A busy worker may have accepted
 * it before starting its call, and answers only when that call ends: past this, the
 * call goes to a worker already reached. */
#define PROBE_WAIT_MS 200.0
/* Reconnect delay after a lost connection: doubles per failure in a row, reset by an
 * answer. Short first: the host replaces a crashed worker within milliseconds, and
 * its listening socket queues our connect meanwhile. */
#define RETRY_MIN_MS 20.0
#define RETRY_MAX_MS 2000.0

struct call {
    struct bw_http_req *req;
    double dispatched;
    struct call *next;
    bool streaming; /* chunk frames came: the HTTP answer is a chunked stream */
};

/* One replica's connections and what each of its workers holds. */
struct rep {
    void *owner;
    char path[sizeof ((struct sockaddr_un *)0)->sun_path];
    int workers;              /* as the host said in "serving" */
    int nup;                  /* connections (upstreams) not removed */
    int want;                 /* opened one by one at attach: 2 per worker */
    int cap;                  /* at most this many, however they land */
    int probing;              /* connections waiting for their "stats" answer */
    double probe_t;           /* bw_now_ms() when the last one was opened */
    int inflight;
    bool draining;
    int depth;                /* calls in flight a worker may hold (bw_router_attach) */
    int load[MAX_WORKERS];    /* calls in flight per worker index */
    int conns[MAX_WORKERS];   /* connections that reach each worker */
    double progress[MAX_WORKERS]; /* bw_now_ms() of its last answer, or of the call
                                   * that found it idle */
    struct rep *next;
};

struct upstream {
    uv_pipe_t pipe;
    struct rep *rep;
    int worker;               /* index of the worker that accepted it; -1 until known */
    bool probing;             /* its "stats" is not answered yet: no calls on it */
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
    bool paused; /* not reading: the streaming client is behind (BW_HTTP_STREAM_HIGH) */
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
    struct rep *reps;
    uv_timer_t hold;          /* dispatches again when calls stop waiting for a probe */
    struct call *qhead, *qtail; /* waiting for a replica */
    size_t queued;
    struct upstream *dirty;
    unsigned long long seq;
    unsigned long long answered_gone; /* answers of detached replicas, for totals */
} router;

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
        if (bw_mp_true(bw_mp_get(&m, "ok")) && k->streaming) {
            bw_http_stream_end(k->req, NULL, NULL);
        } else if (bw_mp_true(bw_mp_get(&m, "ok"))) {
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
    if (u->worker >= 0)
        u->rep->load[u->worker] -= u->inflight;
    u->rep->inflight -= u->inflight;
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

/* The connection no longer reaches its worker (lost or removed). */
static void up_unbind(struct upstream *u) {
    struct rep *p = u->rep;
    if (u->probing) {
        u->probing = false;
        p->probing--;
    }
    if (u->worker >= 0) {
        p->conns[u->worker]--;
        u->worker = -1;
    }
}

static void rep_release(struct rep *p) {
    if (--p->nup > 0)
        return;
    for (struct rep **q = &router.reps; *q; q = &(*q)->next)
        if (*q == p) {
            *q = p->next;
            break;
        }
    free(p);
}

static void up_forget(struct upstream *u) {
    for (int i = 0; i < router.nup; i++)
        if (router.up[i] == u) {
            router.up[i] = router.up[--router.nup];
            break;
        }
}

/* For good: the replica is gone (or going and drained). */
static void up_remove(struct upstream *u, const char *why) {
    if (u->dead)
        return;
    u->dead = true;
    up_fail_inflight(u, why);
    up_unbind(u);
    rep_release(u->rep);
    router.answered_gone += u->answered;
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
    up_unbind(u);
    u->connected = false;
    u->paused = false;
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

static struct upstream *up_new(struct rep *p);

/* Open the replica's connections one at a time: connections that arrive together are
 * all taken by the first worker to wake. */
static void rep_grow(struct rep *p) {
    if (!p->draining && p->probing == 0 && p->nup < p->want)
        up_new(p);
}

/* The answer to a new connection's "stats": which worker holds it. */
static void probe_answered(struct upstream *u, const char *body, size_t len) {
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object m;
    double w = 0;
    if (bw_mp_unpack_exact(body, len, &z, &m) == 0)
        w = bw_mp_num(bw_mp_get(bw_mp_get(&m, "result"), "worker"), 0);
    msgpack_zone_destroy(&z);
    u->worker = w >= 0 && w < MAX_WORKERS ? (int)w : 0;
    u->probing = false;
    u->rep->probing--;
    u->rep->conns[u->worker]++;
    rep_grow(u->rep);
}

/* ---- streamed answers --------------------------------------------------------------- */

static void up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);

/* Chunk frames are {id, [task_id,] chunk}, every other answer {id, ok, ...}: the key
 * after the id tells them apart without decoding the value. The id is one of ours, a
 * non-negative int (send_call), so its length is known from its first byte. */
static bool is_chunk_frame(const char *body, size_t n) {
    const unsigned char *p = (const unsigned char *)body;
    if (n < 8 || (p[0] & 0xf0) != 0x80 || memcmp(p + 1, "\xa2id", 3) != 0)
        return false;
    size_t id = p[4] <= 0x7f ? 1 : p[4] == 0xcc ? 2 : p[4] == 0xcd ? 3 : p[4] == 0xce ? 5
              : p[4] == 0xcf ? 9 : 0;
    return id && n >= 4 + id + 3 && memcmp(p + 4 + id, "\xa2ok", 3) != 0;
}

/* The HTTP client of a streaming call read its backlog, or went away. Only closing the
 * connection tells the worker to close the generator (docs/protocol.md); it is reopened
 * as after a worker crash. */
static void on_stream_client(struct bw_http_req *r, void *arg, bool gone) {
    struct upstream *u = arg;
    (void)r;
    if (gone) {
        up_lost(u, "the client went away during the stream");
        dispatch();
    } else if (u->paused && u->pipe_open && !u->dead) {
        u->paused = false;
        uv_read_start((uv_stream_t *)&u->pipe, up_alloc, up_read);
    }
}

/* One chunk for call k: the first starts the chunked answer. While the client has more
 * than BW_HTTP_STREAM_HIGH unread, stop reading the replica: its worker then stops
 * pulling the generator (backpressure end to end). False: not a chunk frame after all. */
static bool stream_chunk(struct upstream *u, struct call *k, const char *body, size_t len) {
    msgpack_zone z;
    msgpack_zone_init(&z, 2048);
    msgpack_object m;
    const msgpack_object *v = NULL;
    bool ok = bw_mp_unpack_exact(body, len, &z, &m) == 0 && (v = bw_mp_get(&m, "chunk"));
    if (ok && !k->streaming) {
        char task[64] = "";
        bw_mp_strdup(bw_mp_get(&m, "task_id"), task, sizeof task);
        bw_http_stream_begin(k->req, task, k->dispatched - bw_http_req_arrival(k->req),
                             on_stream_client, u);
        k->streaming = true;
    }
    if (ok) {
        msgpack_sbuffer j;
        msgpack_sbuffer_init(&j);
        bw_json_append_object(&j, v);
        long owed = bw_http_stream_chunk(k->req, j.data, j.size);
        msgpack_sbuffer_destroy(&j);
        if (owed > (long)BW_HTTP_STREAM_HIGH && !u->paused) {
            uv_read_stop((uv_stream_t *)&u->pipe);
            u->paused = true;
        }
    }
    msgpack_zone_destroy(&z);
    return ok;
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
        size_t blen, used;
        enum bw_frame_status st =
            bw_frame_next(bw_buf_head(&u->in), u->in.len,
                          router.max_frame + BW_FRAME_RESPONSE_SLACK, &body, &blen, &used);
        if (st == BW_FRAME_NEED_MORE)
            break;
        if (st == BW_FRAME_OK && u->probing) {
            probe_answered(u, body, blen);
            bw_buf_consume(&u->in, used);
            continue;
        }
        if (st == BW_FRAME_TOO_LARGE || !u->head) {
            up_lost(u, "the replica sent an unexpected answer");
            break;
        }
        if (is_chunk_frame(body, blen)) { /* the head call streams on; not its answer */
            if (!stream_chunk(u, u->head, body, blen)) {
                up_lost(u, "the replica sent an unexpected answer");
                break;
            }
            bw_buf_consume(&u->in, used);
            continue;
        }
        struct call *k = u->head;
        u->head = k->next;
        if (!u->head)
            u->tail = NULL;
        u->inflight--;
        u->rep->load[u->worker]--;
        u->rep->progress[u->worker] = bw_now_ms();
        u->rep->inflight--;
        u->answered++;
        u->retry_ms = 0; /* it answers: the next loss reconnects at once */
        answer(k, body, blen);
        bw_buf_consume(&u->in, used);
    }
    if (u->head && u->head->streaming) /* this read's chunks go out in one write */
        bw_http_stream_flush(u->head->req);
    dispatch();
}

/* ---- sending ------------------------------------------------------------------------ */

static void on_written(uv_write_t *w, int status) {
    bw_stream_written(w);
    (void)status; /* a broken connection shows up as a read error */
}

static void flush_dirty(uv_check_t *h) {
    (void)h;
    while (router.dirty) {
        struct upstream *u = router.dirty;
        router.dirty = u->next_dirty;
        u->dirty = false;
        if (u->dead || u->out.size == 0)
            continue;
        size_t len = u->out.size, queued = 0;
        char *data = msgpack_sbuffer_release(&u->out); /* the next calls start a new one */
        if (bw_stream_send((uv_stream_t *)&u->pipe, data, len, 1, on_written, &queued) < 0)
            up_lost(u, "cannot write to the replica");
    }
}

static void mark_dirty(struct upstream *u) {
    if (!u->dirty) {
        u->dirty = true;
        u->next_dirty = router.dirty;
        router.dirty = u;
    }
}

static void send_probe(struct upstream *u) {
    msgpack_packer pk;
    msgpack_packer_init(&pk, &u->out, msgpack_sbuffer_write);
    size_t h = bw_frame_begin(&u->out);
    msgpack_pack_map(&pk, 2);
    bw_mp_kv_int(&pk, "id", PROBE_ID);
    bw_mp_kv_str(&pk, "type", "stats");
    bw_frame_end(&u->out, h);
    mark_dirty(u);
}

static void send_call(struct upstream *u, struct call *k) {
    size_t kwlen;
    const char *kw = bw_http_req_kwargs(k->req, &kwlen);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &u->out, msgpack_sbuffer_write);
    size_t h = bw_frame_begin(&u->out);
    msgpack_pack_map(&pk, 3);
    bw_mp_kv_int(&pk, "id", (long long)++router.seq);
    bw_mp_kv_bool(&pk, "stream", true); /* a generator handler answers in chunk frames */
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
    if (u->rep->load[u->worker]++ == 0)
        u->rep->progress[u->worker] = k->dispatched;
    u->rep->inflight++;
    mark_dirty(u);
}

/* Is u a better place for the next call than best (whose worker has *load calls)? The
 * least-loaded worker first, then the least-loaded replica, then the emptier connection. */
static bool better(const struct upstream *u, int l, const struct upstream *best, int load) {
    if (!best || l != load)
        return !best || l < load;
    if (u->rep->inflight != best->rep->inflight)
        return u->rep->inflight < best->rep->inflight;
    return u->inflight < best->inflight;
}

/* May u take one more call? batch: past its depth, while its worker answers quickly. */
static bool has_room(const struct upstream *u, int load, bool batch, double now) {
    if (load < u->rep->depth)
        return true;
    return batch && load < BATCH_DEPTH && now - u->rep->progress[u->worker] < BATCH_FRESH_MS;
}

static struct upstream *least_loaded(int *load, bool batch) {
    struct upstream *best = NULL;
    double now = batch ? bw_now_ms() : 0;
    for (int i = 0; i < router.nup; i++) {
        struct upstream *u = router.up[i];
        if (!u->connected || u->dead || u->draining || u->worker < 0)
            continue;
        int l = u->rep->load[u->worker];
        if (has_room(u, l, batch, now) && better(u, l, best, *load)) {
            best = u;
            *load = l;
        }
    }
    return best;
}

static int reached(const struct rep *p) {
    int n = 0;
    for (int w = 0; w < p->workers; w++)
        n += p->conns[w] > 0;
    return n;
}

static void on_hold(uv_timer_t *t) {
    (void)t;
    dispatch();
}

/* The replica with workers no connection reaches yet (the least busy), or NULL. */
static struct rep *growing(void) {
    struct rep *grow = NULL;
    for (struct rep *p = router.reps; p; p = p->next)
        if (!p->draining && p->nup < p->cap && reached(p) < p->workers &&
            (!grow || p->inflight < grow->inflight))
            grow = p;
    return grow;
}

/* Where a call goes now; NULL: it waits. When the best worker already runs a call and
 * some replica has workers no connection reaches, the call waits for a new connection
 * to find one (one opened at a time, at most rep->cap per replica). */
static struct upstream *pick(void) {
    int load = 0;
    struct upstream *best = least_loaded(&load, false);
    if (best && load == 0)
        return best;
    struct rep *grow = growing();
    if (!grow)
        return best;
    /* A probe that has not answered in PROBE_WAIT_MS sits behind a busy worker's call
     * (that worker accepted the connection before its call began): try one more
     * connection, which an idle worker takes, before giving the call to a busy one. */
    double waited = bw_now_ms() - grow->probe_t;
    bool stuck = waited >= PROBE_WAIT_MS;
    if (grow->probing == 0 || (stuck && (!best || grow->probing < 2))) {
        up_new(grow);
        waited = 0;
    } else if (stuck) {
        return best;
    }
    if (!uv_is_active((uv_handle_t *)&router.hold))
        uv_timer_start(&router.hold, on_hold, (uint64_t)(PROBE_WAIT_MS - waited) + 1, 0);
    return NULL;
}

static void send_head(struct upstream *u) {
    struct call *k = router.qhead;
    router.qhead = k->next;
    if (!router.qhead)
        router.qtail = NULL;
    router.queued--;
    send_call(u, k);
}

static void dispatch(void) {
    struct upstream *u;
    while (router.qhead && (u = pick()))
        send_head(u);
    if (!router.qhead || !router.demand || router.demand(router.demand_arg) || growing())
        return; /* more capacity is coming: the calls wait for it, visible in the queue */
    int load = 0;
    while (router.qhead && (u = least_loaded(&load, true)))
        send_head(u);
}

void bw_router_submit(struct bw_http_req *r) {
    if (router.queued >= (size_t)router.max_pending) {
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
    if (router.qtail)
        router.qtail->next = k;
    else
        router.qhead = k;
    router.qtail = k;
    router.queued++;
    dispatch();
}

void bw_router_fail_queued(int status, const char *type, const char *message) {
    while (router.qhead) {
        struct call *k = router.qhead;
        router.qhead = k->next;
        bw_http_reply_error(k->req, status, type, message, NULL, bw_now_ms() - bw_http_req_arrival(k->req));
        free(k);
    }
    router.qtail = NULL;
    router.queued = 0;
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
    send_probe(u); /* calls wait until the answer says which worker this is */
}

static void up_connect(struct upstream *u) {
    uv_connect_t *c = malloc(sizeof *c);
    if (!c) {
        uv_timer_start(&u->retry, on_retry, (uint64_t)RETRY_MAX_MS, 0);
        return;
    }
    uv_pipe_init(router.loop, &u->pipe, 0);
    u->pipe.data = u;
    u->pipe_open = true;
    u->handles++;
    u->probing = true;
    u->rep->probing++;
    u->rep->probe_t = bw_now_ms();
    uv_pipe_connect(c, &u->pipe, u->path, on_connect);
}

static int up_track(struct upstream *u) {
    if (router.nup == router.capup) {
        int cap = router.capup ? 2 * router.capup : 16;
        struct upstream **up = realloc(router.up, (size_t)cap * sizeof *up);
        if (!up)
            return -1;
        router.up = up;
        router.capup = cap;
    }
    router.up[router.nup++] = u;
    return 0;
}

static struct upstream *up_new(struct rep *p) {
    struct upstream *u = calloc(1, sizeof *u);
    if (!u || up_track(u) < 0) {
        free(u);
        bw_error("router: out of memory connecting to a replica");
        return NULL;
    }
    u->owner = p->owner;
    u->rep = p;
    u->worker = -1;
    p->nup++;
    snprintf(u->path, sizeof u->path, "%s", p->path);
    msgpack_sbuffer_init(&u->out);
    uv_timer_init(router.loop, &u->retry);
    u->retry.data = u;
    u->handles = 1;
    up_connect(u);
    return u;
}

int bw_router_attach(void *owner, const char *unix_path, int workers, int depth) {
    struct rep *p = calloc(1, sizeof *p);
    if (!p || strlen(unix_path) >= sizeof p->path) {
        free(p);
        bw_error("router: cannot connect to replica socket %s", unix_path);
        return -1;
    }
    p->owner = owner;
    snprintf(p->path, sizeof p->path, "%s", unix_path);
    p->workers = workers < 1 ? 1 : workers > MAX_WORKERS ? MAX_WORKERS : workers;
    p->depth = depth < WORKER_DEPTH ? WORKER_DEPTH : depth;
    p->want = 2 * p->workers;
    p->cap = 4 * p->workers;
    p->next = router.reps;
    router.reps = p;
    if (!up_new(p)) {
        router.reps = p->next;
        free(p);
        return -1;
    }
    return 0;
}

void bw_router_drain(void *owner) {
    for (struct rep *p = router.reps; p; p = p->next)
        if (!owner || p->owner == owner)
            p->draining = true;
    for (int i = router.nup - 1; i >= 0; i--) {
        struct upstream *u = router.up[i];
        if (owner && u->owner != owner)
            continue;
        u->draining = true;
        if (!u->connected) /* nothing in flight on it; do not reopen it */
            up_remove(u, "the replica is stopping");
    }
}

void bw_router_detach(void *owner) {
    for (int i = router.nup - 1; i >= 0; i--)
        if (router.up[i]->owner == owner)
            up_remove(router.up[i], "the replica serving this call exited before answering; "
                               "the call may or may not have run");
    dispatch();
}

size_t bw_router_queued(void) { return router.queued; }

size_t bw_router_inflight(void *owner) {
    size_t n = 0;
    for (int i = 0; i < router.nup; i++)
        if (!owner || router.up[i]->owner == owner)
            n += (size_t)router.up[i]->inflight;
    return n;
}

unsigned long long bw_router_answered(void *owner) {
    unsigned long long n = owner ? 0 : router.answered_gone;
    for (int i = 0; i < router.nup; i++)
        if (!owner || router.up[i]->owner == owner)
            n += router.up[i]->answered;
    return n;
}

void bw_router_set_max_pending(int n) { router.max_pending = n > 0 ? n : 1; }

void bw_router_init(uv_loop_t *loop, size_t max_frame, bw_router_demand_fn demand, void *arg) {
    router.loop = loop;
    router.max_frame = max_frame;
    router.max_pending = 100;
    router.demand = demand;
    router.demand_arg = arg;
    uv_timer_init(loop, &router.hold);
    uv_unref((uv_handle_t *)&router.hold);
    uv_check_init(loop, &router.flusher);
    uv_check_start(&router.flusher, flush_dirty);
    uv_unref((uv_handle_t *)&router.flusher);
}
