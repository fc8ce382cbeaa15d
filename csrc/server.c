/* server.c - libuv serving loop of one worker process.
 *
 * Handle ownership: the loop owns listeners and connections; a connection frees itself
 * in its close callback, a write request frees its buffer in its write callback.
 * Requests are run synchronously inside the read callback, so the frames of one
 * connection are answered in order and all answers of one read go out in one write. */
#define _GNU_SOURCE
#include "server.h"

#include <msgpack.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <uv.h>

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

union bw_stream {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
};

struct conn {
    union bw_stream h;
    struct bw_buf in;
    size_t write_bytes;      /* queued, not yet written */
    bool reading, close_after_write;
    struct conn *prev, *next;
};

static struct {
    uv_loop_t *loop;
    union bw_stream listeners[BW_CTL_MAX_FDS]; /* as many as "start" can carry */
    int nlisteners;
    uv_signal_t sigterm, sigint;
    uv_timer_t grace;
    size_t max_frame;
    double grace_s;
    bool draining, stopped;
    struct conn *conns;
} srv;

static void conn_closed(uv_handle_t *h) {
    struct conn *c = h->data;
    bw_buf_free(&c->in);
    free(c);
}

static void stop_if_idle(void);

static void conn_close(struct conn *c) {
    if (uv_is_closing(&c->h.handle))
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    uv_close(&c->h.handle, conn_closed);
    stop_if_idle();
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
    if (uv_read_start(&c->h.stream, on_alloc, on_read) == 0)
        c->reading = true;
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

static void on_write(uv_write_t *req, int status) {
    struct conn *c = req->handle->data;
    c->write_bytes -= bw_stream_written(req);
    if (status < 0) {
        conn_close(c);
        return;
    }
    if (c->write_bytes == 0 && (c->close_after_write || srv.draining)) {
        conn_close(c);
        return;
    }
    if (!c->reading && !c->close_after_write && !srv.draining && c->write_bytes < WRITE_LOW)
        read_start(c);
}


/* Hand the answers to the kernel: try directly, queue the rest. Takes ownership. */
static void send_out(struct conn *c, msgpack_sbuffer *out) {
    int rc = bw_stream_send(&c->h.stream, out->data, out->size, c->write_bytes == 0, on_write,
                            &c->write_bytes);
    if (rc < 0 || (rc == 1 && c->close_after_write))
        conn_close(c);
    else if (rc == 0 && c->write_bytes > WRITE_HIGH)
        read_stop(c);
}

static void process(struct conn *c) {
    msgpack_sbuffer out;
    msgpack_sbuffer_init(&out);
    bw_app_acquire_gil();
    for (;;) {
        const char *body;
        size_t body_len, consumed, need;
        enum bw_frame_status st = bw_frame_next(bw_buf_head(&c->in), c->in.len, srv.max_frame,
                                                &body, &body_len, &consumed, &need);
        if (st == BW_FRAME_NEED_MORE)
            break;
        if (st == BW_FRAME_TOO_LARGE) {
            char msg[128];
            snprintf(msg, sizeof msg, "frame larger than the limit of %zu bytes", srv.max_frame);
            bw_request_error_frame(&out, "FrameTooLarge", msg);
            c->close_after_write = true;
            break;
        }
        enum bw_req_outcome o = bw_request_handle(body, body_len, &out);
        bw_buf_consume(&c->in, consumed);
        if (o == BW_REQ_CLOSE) {
            c->close_after_write = true;
            break;
        }
    }
    bw_app_release_gil();
    if (c->close_after_write)
        read_stop(c);
    if (out.size > 0)
        send_out(c, &out);
    else
        msgpack_sbuffer_destroy(&out);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    (void)buf;
    struct conn *c = s->data;
    if (nread < 0) {
        /* After a half-close (EOF) the client still reads the answers it is owed. */
        if (nread == UV_EOF && c->write_bytes > 0) {
            read_stop(c);
            c->close_after_write = true;
        } else {
            conn_close(c);
        }
        return;
    }
    c->in.len += (size_t)nread;
    if (nread > 0)
        process(c);
}

static void on_connection(uv_stream_t *server, int status) {
    if (status < 0 || srv.draining)
        return;
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
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

static void stop_if_idle(void) {
    if (!srv.draining || srv.conns || srv.stopped)
        return;
    srv.stopped = true;
    uv_close((uv_handle_t *)&srv.sigterm, NULL);
    uv_close((uv_handle_t *)&srv.sigint, NULL);
    uv_close((uv_handle_t *)&srv.grace, NULL);
}

static void on_grace(uv_timer_t *t) {
    (void)t;
    bw_warn("worker %d: grace period over, closing %s connections", bw_worker.index,
            srv.conns ? "remaining" : "no");
    while (srv.conns)
        conn_close(srv.conns);
}

/* Stop accepting; let queued answers drain; close connections once they have. */
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
        if (c->write_bytes == 0)
            conn_close(c);
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
    uv_signal_init(srv.loop, &srv.sigterm);
    uv_signal_init(srv.loop, &srv.sigint);
    uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv.sigint, on_signal, SIGINT);
    uv_timer_init(srv.loop, &srv.grace);
    bw_app_release_gil();
    uv_run(srv.loop, UV_RUN_DEFAULT);
    bw_app_acquire_gil();
    return 0;
}
