/* server.c - libuv serving loop of one worker process.
 *
 * Handle ownership: the loop owns listeners and connections; a connection frees itself,
 * and what it still owes (running async calls, open generators), in its close callback;
 * a write request frees its buffer in its write callback.
 *
 * Answer order: a connection keeps a FIFO of the answers it owes, in request order. A
 * sync handler's call runs inside the read callback as it always did; what cannot end
 * there (an async handler's call, a streamed generator: request.h's bw_call) takes a
 * slot, and what is answered behind it waits in its slot's buffer. Chunk frames of a
 * stream are sent only while it is at the head, so frames never interleave between
 * requests of one connection. A sync endpoint runs one request at a time: no frame is
 * started while its connection owes a stream. An async endpoint starts frames while
 * fewer than concurrent_requests calls run in this worker (bw_worker.concurrency).
 *
 * Backpressure: a stream's generator is pulled only while its connection has fewer than
 * STREAM_HIGH bytes waiting to be written; the write callback resumes it below
 * STREAM_LOW. A sync generator gets PULL_BATCH chunks (at most PULL_SLICE_MS) per loop
 * turn, then the other connections get theirs.
 *
 * GIL: taken once at the top of each libuv callback that may run Python (read, write,
 * pump, tick, close; aio.c's step) and released before it returns. */
#define _GNU_SOURCE
#include "server.h"

#include <msgpack.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <uv.h>

#include "aio.h"
#include "app.h"
#include "control.h"
#include "frame.h"
#include "log.h"
#include "request.h"
#include "stream.h"
#include "util.h"

#define READ_CHUNK (64 * 1024)
#define WRITE_HIGH (16u * 1024u * 1024u) /* stop reading a client that does not read */
#define WRITE_LOW (4u * 1024u * 1024u)
#define STREAM_HIGH (1024u * 1024u) /* stop pulling a stream's generator */
#define STREAM_LOW (256u * 1024u)
#define PULL_BATCH 64
#define PULL_SLICE_MS 1.0
#define MAX_SLOTS 1024             /* answers one connection may owe at once */
#define BLOCKED_READ_CAP (1u << 20) /* bytes read ahead of frames that must wait */
#define TICK_MS 100                /* sync streams' timeouts while their reader is slow */

union bw_stream {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
};

struct conn;

struct slot {
    struct slot *next;
    struct conn *conn;
    struct bw_call *call; /* still running; NULL once its final frame is written */
    msgpack_sbuffer out;  /* its frames while it is not at the head */
    unsigned pulled;      /* chunks a sync stream gave */
    bool awaiting;        /* an async stream was asked for a chunk */
};

struct conn {
    union bw_stream h;
    struct bw_buf in;
    msgpack_sbuffer wbuf;    /* frames for the head of the FIFO, sent at the end of a turn */
    size_t write_bytes;      /* queued, not yet written */
    struct slot *head, *tail;
    int nslots;
    bool reading, close_after_write;
    bool eof;     /* the client half-closed: answer what was read, then close */
    bool blocked; /* a whole frame waits in `in` for its turn */
    bool pumping; /* on srv.pumps */
    struct conn *prev, *next, *pump_next;
};

static struct {
    uv_loop_t *loop;
    union bw_stream listeners[BW_CTL_MAX_FDS]; /* as many as "start" can carry */
    int nlisteners;
    uv_signal_t sigterm, sigint;
    uv_timer_t grace, tick;
    uv_idle_t pump;      /* sync streams that used their turn's share */
    struct conn *pumps;
    size_t max_frame;
    double grace_s;
    bool draining, stopped;
    int inflight;        /* async calls running in this worker */
    struct conn *conns;
} srv;

static size_t backlog(const struct conn *c) { return c->write_bytes + c->wbuf.size; }
static bool closing(struct conn *c) { return uv_is_closing(&c->h.handle); }

/* ---- slots --------------------------------------------------------------------------- */

static struct slot *slot_push(struct conn *c, struct bw_call *k) {
    struct slot *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->conn = c;
    s->call = k;
    msgpack_sbuffer_init(&s->out);
    if (k)
        bw_call_set_owner(k, s);
    if (c->tail)
        c->tail->next = s;
    else
        c->head = s;
    c->tail = s;
    c->nslots++;
    return s;
}

/* Its final frame is written (or it is abandoned): free the call (GIL held). */
static void call_done(struct slot *s) {
    if (bw_call_is_async(s->call))
        srv.inflight--;
    bw_call_free(s->call);
    s->call = NULL;
}

static void slot_pop(struct conn *c) {
    struct slot *s = c->head;
    c->head = s->next;
    if (!c->head)
        c->tail = NULL;
    c->nslots--;
    if (s->call) { /* the connection is gone before the answer: stop what runs */
        if (bw_call_is_async(s->call))
            bw_aio_cancel(s->call);
        call_done(s);
    }
    msgpack_sbuffer_destroy(&s->out);
    free(s);
}

static msgpack_sbuffer *slot_out(struct slot *s) {
    return s->conn->head == s ? &s->conn->wbuf : &s->out;
}

static bool owes_stream(const struct conn *c) {
    for (const struct slot *s = c->head; s; s = s->next)
        if (s->call && bw_call_is_stream(s->call))
            return true;
    return false;
}

/* ---- connection lifetime ------------------------------------------------------------- */

static void conn_closed(uv_handle_t *h) {
    struct conn *c = h->data;
    if (c->head) {
        bw_app_acquire_gil(); /* generators' finally: blocks run here */
        while (c->head)
            slot_pop(c);
        bw_app_release_gil();
    }
    bw_buf_free(&c->in);
    msgpack_sbuffer_destroy(&c->wbuf);
    free(c);
}

static void stop_if_idle(void);

static void pump_forget(struct conn *c) {
    for (struct conn **p = &srv.pumps; *p; p = &(*p)->pump_next)
        if (*p == c) {
            *p = c->pump_next;
            c->pumping = false;
            return;
        }
}

static void conn_close(struct conn *c) {
    if (closing(c))
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->pumping)
        pump_forget(c);
    uv_close(&c->h.handle, conn_closed);
    stop_if_idle();
}

static bool conn_idle(const struct conn *c) {
    return !c->head && !c->blocked && c->write_bytes == 0 && c->wbuf.size == 0;
}

static void maybe_close(struct conn *c) {
    if ((c->close_after_write || c->eof || srv.draining) && conn_idle(c))
        conn_close(c);
}

static void read_stop(struct conn *c) {
    if (c->reading) {
        uv_read_stop(&c->h.stream);
        c->reading = false;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void read_start(struct conn *c) {
    if (!c->reading && uv_read_start(&c->h.stream, on_alloc, on_read) == 0)
        c->reading = true;
}

/* Read unless the client is done, we are, it does not read its answers (hysteresis
 * between WRITE_LOW and WRITE_HIGH), or enough is read ahead of frames that wait. */
static void update_reading(struct conn *c) {
    if (closing(c))
        return;
    if (c->eof || c->close_after_write || srv.draining || c->write_bytes > WRITE_HIGH ||
        (c->blocked && c->in.len >= BLOCKED_READ_CAP))
        read_stop(c);
    else if (c->write_bytes < WRITE_LOW)
        read_start(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)suggested;
    struct conn *c = h->data;
    /* Once the header is in, reserve the whole frame so a large body is read in place. */
    size_t want = READ_CHUNK;
    if (c->in.len >= BW_FRAME_HEADER) {
        size_t body = bw_load_be32((unsigned char *)bw_buf_head(&c->in));
        if (body <= srv.max_frame && BW_FRAME_HEADER + body > c->in.len &&
            BW_FRAME_HEADER + body - c->in.len > want)
            want = BW_FRAME_HEADER + body - c->in.len;
    }
    if (bw_buf_reserve(&c->in, want) < 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    buf->base = bw_buf_tail(&c->in);
    buf->len = c->in.cap - c->in.start - c->in.len;
}

/* ---- writing ------------------------------------------------------------------------- */

static void conn_run(struct conn *c);

static void on_write(uv_write_t *req, int status) {
    struct conn *c = req->handle->data;
    c->write_bytes -= bw_stream_written(req);
    if (status < 0) {
        conn_close(c);
        return;
    }
    struct slot *s = c->head;
    if (s && s->call && bw_call_is_stream(s->call) && backlog(c) < STREAM_LOW) {
        bw_app_acquire_gil(); /* the reader caught up: feed the stream again */
        conn_run(c);
        bw_app_release_gil();
        return;
    }
    maybe_close(c);
    update_reading(c);
}

/* Hand this turn's frames to the kernel: try directly, queue the rest. */
static void conn_send(struct conn *c) {
    if (c->wbuf.size == 0 || closing(c))
        return;
    size_t len = c->wbuf.size;
    char *data = msgpack_sbuffer_release(&c->wbuf);
    if (bw_stream_send(&c->h.stream, data, len, c->write_bytes == 0, on_write, &c->write_bytes) < 0)
        conn_close(c);
}

/* ---- running requests (GIL held) ----------------------------------------------------- */

static void on_pump(uv_idle_t *h);

static void pump_later(struct conn *c) {
    if (c->pumping)
        return;
    c->pumping = true;
    c->pump_next = srv.pumps;
    srv.pumps = c;
    uv_idle_start(&srv.pump, on_pump);
}

/* A sync generator at the head: pull while the reader keeps up, a batch per turn (the
 * first chunk alone: it goes out at once). True once the stream has ended. */
static bool pull_sync(struct conn *c, struct slot *s) {
    if (bw_call_overdue(s->call)) {
        bw_call_expire(s->call, &c->wbuf);
        call_done(s);
        return true;
    }
    double t0 = bw_now_ms();
    for (int n = 0; backlog(c) < STREAM_HIGH; n++) {
        if (n == PULL_BATCH || (n > 0 && (s->pulled == 1 || bw_now_ms() - t0 > PULL_SLICE_MS))) {
            pump_later(c); /* what was pulled goes out now; more next turn */
            return false;
        }
        if (!bw_call_pull(s->call, &c->wbuf)) {
            call_done(s);
            return true;
        }
        if (s->pulled < 2)
            s->pulled++;
    }
    return false; /* on_write resumes it */
}

/* The head still runs: feed it if it is a stream. True once it has finished. A sync
 * generator is pulled once per conn_run (*pulled): what it gave goes out first. */
static bool feed(struct conn *c, struct slot *s, bool *pulled) {
    if (!bw_call_is_stream(s->call))
        return false; /* an async call: its event ends it */
    if (!bw_call_is_async(s->call)) {
        if (*pulled) {
            pump_later(c);
            return false;
        }
        *pulled = true;
        return pull_sync(c, s);
    }
    if (!s->awaiting && backlog(c) < STREAM_HIGH) {
        s->awaiting = true;
        bw_aio_pull(s->call);
    }
    return false;
}

/* Move finished answers at the head into this turn's frames. Returns how many. */
static int advance(struct conn *c, bool *pulled) {
    int n = 0;
    while (c->head && !closing(c)) {
        struct slot *s = c->head;
        if (s->call && !feed(c, s, pulled))
            break;
        if (s->out.size)
            msgpack_sbuffer_write(&c->wbuf, s->out.data, s->out.size);
        slot_pop(c);
        n++;
    }
    return n;
}

static bool can_start(const struct conn *c) {
    if (!bw_worker.driver)
        return c->head == NULL; /* sync: one request at a time, streams included */
    return srv.inflight < bw_worker.concurrency && c->nslots < MAX_SLOTS;
}

/* Answer one frame: into this turn's frames, or behind the answers still owed. */
static bool start_one(struct conn *c, const char *body, size_t len) {
    struct slot *s = c->head ? slot_push(c, NULL) : NULL;
    if (c->head && !s)
        return false;
    struct bw_call *k;
    msgpack_sbuffer *out = s ? &s->out : &c->wbuf;
    enum bw_req_outcome o = bw_request_handle(body, len, out, &k);
    if (o == BW_REQ_PENDING) {
        if (s) {
            s->call = k;
            bw_call_set_owner(k, s);
        } else if (!slot_push(c, k)) {
            bw_call_free(k); /* cannot happen without an async call being lost: close */
            return false;
        }
        if (bw_call_is_async(k))
            srv.inflight++;
    } else if (o == BW_REQ_CLOSE) {
        c->close_after_write = true;
    }
    return true;
}

/* Start the frames that may start now. Returns how many. */
static int parse(struct conn *c) {
    int n = 0;
    while (!c->close_after_write && !closing(c)) {
        const char *body;
        size_t body_len, consumed;
        enum bw_frame_status st = bw_frame_next(bw_buf_head(&c->in), c->in.len, srv.max_frame,
                                                &body, &body_len, &consumed);
        c->blocked = st != BW_FRAME_NEED_MORE && !can_start(c);
        if (st == BW_FRAME_NEED_MORE || c->blocked)
            break;
        if (st == BW_FRAME_TOO_LARGE) {
            char msg[128];
            struct slot *s = c->head ? slot_push(c, NULL) : NULL;
            snprintf(msg, sizeof msg, "frame larger than the limit of %zu bytes", srv.max_frame);
            bw_request_error_frame(s ? &s->out : &c->wbuf, "FrameTooLarge", msg);
            c->close_after_write = true;
            break;
        }
        if (!start_one(c, body, body_len)) {
            conn_close(c);
            break;
        }
        bw_buf_consume(&c->in, consumed);
        n++;
    }
    return n;
}

/* Everything a connection can do now, then send what it produced. */
static void conn_run(struct conn *c) {
    bool pulled = false;
    while (!closing(c) && parse(c) + advance(c, &pulled) > 0) {
    }
    conn_send(c);
    /* A stream paused at STREAM_HIGH is resumed by on_write; but when the kernel took
     * all of it at once no write was queued and no callback will come: go on next turn. */
    struct slot *h = closing(c) ? NULL : c->head;
    if (h && h->call && bw_call_is_stream(h->call) && c->write_bytes == 0 &&
        !(bw_call_is_async(h->call) && h->awaiting)) /* an awaited chunk wakes it itself */
        pump_later(c);
    if (!closing(c)) {
        maybe_close(c);
        update_reading(c);
    }
}

static void on_pump(uv_idle_t *h) {
    struct conn *list = srv.pumps;
    srv.pumps = NULL;
    bw_app_acquire_gil();
    while (list) {
        struct conn *c = list;
        list = c->pump_next;
        c->pumping = false;
        conn_run(c);
    }
    bw_app_release_gil();
    if (!srv.pumps)
        uv_idle_stop(h);
}

/* A sync stream whose reader is slow is not pulled, so nothing else notices its timeout. */
static void on_tick(uv_timer_t *t) {
    (void)t;
    bool gil = false;
    for (struct conn *c = srv.conns, *next; c; c = next) {
        next = c->next;
        struct slot *s = c->head;
        if (!s || !s->call || bw_call_is_async(s->call) || !bw_call_overdue(s->call))
            continue;
        if (!gil)
            bw_app_acquire_gil();
        gil = true;
        conn_run(c);
    }
    if (gil)
        bw_app_release_gil();
}

/* An event of the asyncio driver for one call (GIL held). */
static void on_aio_event(void *token, int kind, PyObject *value) {
    struct bw_call *k = token;
    struct slot *s = bw_call_owner(k);
    if (closing(s->conn))
        return; /* its close callback frees the call */
    s->awaiting = false;
    if (!bw_call_event(k, kind, value, slot_out(s)))
        call_done(s);
}

/* After a driver step: answers are done, calls may have freed room for waiting frames. */
static void after_aio_step(void) {
    for (struct conn *c = srv.conns, *next; c; c = next) {
        next = c->next;
        conn_run(c);
    }
}

/* ---- reading ------------------------------------------------------------------------- */

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    (void)buf;
    struct conn *c = s->data;
    if (nread < 0) {
        /* After a half-close (EOF) the client still reads the answers it is owed. Not
         * while a stream is owed: a reader that is gone cannot be told from one that
         * half-closed, and only closing tells the generator to stop. */
        if (nread == UV_EOF && !owes_stream(c)) {
            c->eof = true;
            read_stop(c);
            maybe_close(c);
        } else {
            conn_close(c);
        }
        return;
    }
    c->in.len += (size_t)nread;
    if (nread > 0) {
        bw_app_acquire_gil();
        conn_run(c);
        bw_app_release_gil();
    }
}

static void on_connection(uv_stream_t *server, int status) {
    if (status < 0 || srv.draining)
        return;
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    msgpack_sbuffer_init(&c->wbuf);
    int rc = server->type == UV_TCP ? uv_tcp_init(srv.loop, &c->h.tcp)
                                    : uv_pipe_init(srv.loop, &c->h.pipe, 0);
    if (rc < 0) {
        free(c);
        return;
    }
    c->h.handle.data = c;
    if (uv_accept(server, &c->h.stream) < 0) {
        uv_close(&c->h.handle, conn_closed);
        return;
    }
    if (server->type == UV_TCP)
        uv_tcp_nodelay(&c->h.tcp, 1);
    c->next = srv.conns;
    if (srv.conns)
        srv.conns->prev = c;
    srv.conns = c;
    read_start(c);
}

/* ---- start and stop ------------------------------------------------------------------ */

static void stop_if_idle(void) {
    if (!srv.draining || srv.conns || srv.stopped)
        return;
    srv.stopped = true;
    uv_close((uv_handle_t *)&srv.sigterm, NULL);
    uv_close((uv_handle_t *)&srv.sigint, NULL);
    uv_close((uv_handle_t *)&srv.grace, NULL);
    uv_close((uv_handle_t *)&srv.tick, NULL);
    uv_close((uv_handle_t *)&srv.pump, NULL);
    bw_aio_stop();
}

static void on_grace(uv_timer_t *t) {
    (void)t;
    bw_warn("worker %d: grace period over, closing %s connections", bw_worker.index,
            srv.conns ? "remaining" : "no");
    while (srv.conns)
        conn_close(srv.conns);
}

/* Stop accepting; let owed answers finish and drain; close connections once they have. */
static void on_signal(uv_signal_t *h, int signum) {
    (void)h;
    (void)signum;
    if (srv.draining)
        return;
    srv.draining = true;
    for (int i = 0; i < srv.nlisteners; i++)
        uv_close(&srv.listeners[i].handle, NULL);
    uv_timer_start(&srv.grace, on_grace, (uint64_t)(srv.grace_s * 1000), 0);
    for (struct conn *c = srv.conns, *next; c; c = next) {
        next = c->next;
        read_stop(c);
        maybe_close(c);
    }
    stop_if_idle();
}

static int open_listener(union bw_stream *l, int fd) {
    int domain = 0;
    socklen_t len = sizeof domain;
    getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len);
    int rc = domain == AF_UNIX ? uv_pipe_init(srv.loop, &l->pipe, 0) : uv_tcp_init(srv.loop, &l->tcp);
    if (rc == 0)
        rc = domain == AF_UNIX ? uv_pipe_open(&l->pipe, fd) : uv_tcp_open(&l->tcp, fd);
    if (rc == 0)
        rc = uv_listen(&l->stream, 1024, on_connection);
    if (rc < 0)
        bw_error("worker: cannot listen on fd %d: %s", fd, uv_strerror(rc));
    return rc;
}

int bw_server_run(const int *listen_fds, int nfds, size_t max_frame, double grace_s) {
    srv.loop = uv_default_loop();
    srv.max_frame = max_frame;
    srv.grace_s = grace_s;
    bw_request_set_max_frame(max_frame);
    for (int i = 0; i < nfds && i < BW_CTL_MAX_FDS; i++) {
        if (open_listener(&srv.listeners[i], listen_fds[i]) < 0)
            return -1;
        srv.nlisteners++;
    }
    if (bw_aio_start(srv.loop, on_aio_event, after_aio_step) < 0)
        return -1;
    uv_signal_init(srv.loop, &srv.sigterm);
    uv_signal_init(srv.loop, &srv.sigint);
    uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv.sigint, on_signal, SIGINT);
    uv_timer_init(srv.loop, &srv.grace);
    uv_idle_init(srv.loop, &srv.pump);
    uv_timer_init(srv.loop, &srv.tick);
    uv_timer_start(&srv.tick, on_tick, TICK_MS, TICK_MS);
    uv_unref((uv_handle_t *)&srv.tick);
    bw_app_release_gil();
    uv_run(srv.loop, UV_RUN_DEFAULT);
    bw_app_acquire_gil();
    return 0;
}
