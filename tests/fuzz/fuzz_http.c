/* fuzz_http.c - libFuzzer target: the HTTP front (csrc/http.c) over a real socket.
 *
 * Once: a libuv loop, a TCP listener on 127.0.0.1:<ephemeral> and bw_http_start with
 * token "secret" and a 1 KiB body limit. The call handler answers at once when the
 * kwargs size is even and defers the answer otherwise (answered from the driver loop,
 * possibly after the connection has gone: the router's situation); GET /stats answers
 * at once. Both sides' socket buffers are small (4 KiB) so answers back up. Per input:
 * connect, write the input in two parts (split derived from a hash of the input),
 * shutdown(SHUT_WR), run the loop (UV_RUN_NOWAIT) until the client reads EOF; the hash
 * also makes 1/4 of clients slow readers and 1/8 reset the connection after 3 turns.
 * Then check (abort() on violation):
 *   - the bytes received are a sequence of "HTTP/1.1 NNN ..." responses, each with a
 *     Content-Length matching its body, and that body is JSON;
 *   - a call's kwargs, wrapped in a request as the router does, decode in the worker;
 *   - every request handed to a handler is answered, no connection handle or socket
 *     outlives the input, and the client always sees the connection end. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "http.h"
#include "json.h"
#include "mp.h"
#include "util.h"

#define FAIL(...)                                                  \
    do {                                                           \
        fprintf(stderr, "fuzz_http: " __VA_ARGS__);                \
        fputc('\n', stderr);                                       \
        abort();                                                   \
    } while (0)

#define MAX_DEFERRED 4096
#define BUDGET_MS 3000.0 /* the client must see EOF within this (loopback, one thread) */

static uv_loop_t loop;
static struct sockaddr_in addr;
static uv_os_fd_t listen_fd;
static struct bw_http_req *deferred[MAX_DEFERRED];
static size_t ndeferred;
static unsigned long handed, answered;
static int base_fds = -1;

static void answer(struct bw_http_req *r) {
    size_t len;
    const char *kw = bw_http_req_kwargs(r, &len);
    (void)kw;
    char json[64];
    int n = snprintf(json, sizeof json, "{\"kwargs_bytes\":%zu}", len);
    answered++;
    if (len % 4 == 1)
        bw_http_reply_error(r, 500, "Boom", "handler \"failed\"\n", "task-1", 1.5);
    else
        bw_http_reply(r, 200, json, (size_t)n, len % 3 ? "task-2" : NULL, len % 2 ? 0.25 : -1);
}

/* The router sends {"id": n, "kwargs": <kwargs>}: the worker must be able to decode it. */
static void check_kwargs(const char *kw, size_t len) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    bw_mp_kv_int(&pk, "id", 1);
    bw_mp_str(&pk, "kwargs");
    msgpack_sbuffer_write(&sb, kw, len);
    msgpack_zone zone;
    msgpack_zone_init(&zone, 1024);
    msgpack_object o;
    const msgpack_object *k;
    if (bw_mp_unpack_exact(sb.data, sb.size, &zone, &o) < 0 ||
        !(k = bw_mp_get(&o, "kwargs")) || k->type != MSGPACK_OBJECT_MAP)
        FAIL("a call's kwargs (%zu bytes) do not decode as a worker request", len);
    msgpack_zone_destroy(&zone);
    msgpack_sbuffer_destroy(&sb);
}

static void on_call(struct bw_http_req *r, void *arg) {
    (void)arg;
    handed++;
    size_t len;
    check_kwargs(bw_http_req_kwargs(r, &len), len);
    if (len % 2 == 1 && ndeferred < MAX_DEFERRED)
        deferred[ndeferred++] = r;
    else
        answer(r);
}

static void on_stats(struct bw_http_req *r, void *arg) {
    (void)arg;
    handed++;
    answered++;
    bw_http_reply(r, 200, "{\"stats\":1}", 11, NULL, -1);
}

static void answer_deferred(void) {
    /* Answers may resume parsing, which may defer more: take the batch first. */
    static struct bw_http_req *batch[MAX_DEFERRED];
    size_t n = ndeferred;
    memcpy(batch, deferred, n * sizeof *batch);
    ndeferred = 0;
    for (size_t i = 0; i < n; i++)
        answer(batch[i]);
}

static void count_conn(uv_handle_t *h, void *arg) {
    uv_os_fd_t f = -1;
    /* Every TCP handle but the listener; closing ones (no fd any more) count too. */
    if (h->type == UV_TCP && (uv_fileno(h, &f) != 0 || f != listen_fd))
        ++*(int *)arg;
}

static int open_conns(void) {
    int n = 0;
    uv_walk(&loop, count_conn, &n);
    return n;
}

/* Sockets this process holds: a connection the server failed to let go of shows up
 * here. Only sockets: libFuzzer itself opens pipes mid-run (to llvm-symbolizer, when it
 * first prints a new function), which are not ours to count. */
static int count_sockets(bool list) {
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    char path[300], target[256];
    while ((e = readdir(d)) != NULL) {
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t len = readlink(path, target, sizeof target - 1);
        if (len <= 0)
            continue;
        target[len] = '\0';
        if (strncmp(target, "socket:", 7) == 0)
            n++;
        if (list)
            fprintf(stderr, "  fd %s -> %s\n", e->d_name, target);
    }
    closedir(d);
    return n;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN); /* as the supervisor does */
    if (uv_loop_init(&loop) != 0)
        FAIL("uv_loop_init");
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof addr;
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        getsockname(listen_fd, (struct sockaddr *)&addr, &alen) < 0)
        FAIL("listener: %s", strerror(errno));
    int small = 4096; /* accepted sockets inherit it */
    if (setsockopt(listen_fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small) < 0)
        FAIL("SO_SNDBUF: %s", strerror(errno));
    static const struct bw_http_options opts = {.max_body = 1024, .token = "secret"};
    static const struct bw_http_handlers handlers = {.call = on_call, .stats = on_stats};
    if (bw_http_start(&loop, listen_fd, &opts, &handlers) < 0)
        FAIL("bw_http_start");
    base_fds = count_sockets(false);
    return 0;
}

/* Check the response stream: complete responses (100 Continue interim answers among
 * them), then (after a reset) maybe a tail.
 * Answers to HEAD have a Content-Length but no body: at most `heads` of those (the number
 * of "HEAD" in the input), recognised by what follows the head (the next response or
 * the end; bodies here are JSON, never "HTTP/1.1 "). */
static void check_responses(const char *p, size_t n, bool reset, size_t heads) {
    while (n > 0) {
        if (n < 9 || memcmp(p, "HTTP/1.1 ", 9) != 0) {
            if (reset && memcmp(p, "HTTP/1.1 ", n < 9 ? n : 9) == 0)
                return;
            FAIL("response does not start with \"HTTP/1.1 \": %.*s", (int)(n < 80 ? n : 80), p);
        }
        const char *end = memmem(p, n, "\r\n\r\n", 4);
        if (!end) {
            if (reset)
                return;
            FAIL("response head not terminated: %.*s", (int)(n < 200 ? n : 200), p);
        }
        size_t head = (size_t)(end - p) + 4;
        if (!(p[9] >= '1' && p[9] <= '5' && p[10] >= '0' && p[10] <= '9' && p[11] >= '0' &&
              p[11] <= '9' && p[12] == ' '))
            FAIL("bad status line: %.*s", (int)(head < 80 ? head : 80), p);
        if (p[9] == '1') { /* an interim answer ("100 Continue"): head only */
            if (head != 25 || memcmp(p, "HTTP/1.1 100 Continue\r\n\r\n", 25) != 0)
                FAIL("unexpected interim response: %.*s", (int)head, p);
            p += head;
            n -= head;
            continue;
        }
        const char *cl = memmem(p, head, "\r\nContent-Length: ", 18);
        if (!cl)
            FAIL("response without Content-Length: %.*s", (int)head, p);
        size_t body = strtoul(cl + 18, NULL, 10);
        if (heads > 0 && body > 0 &&
            (n == head || (n - head >= 9 && memcmp(p + head, "HTTP/1.1 ", 9) == 0))) {
            heads--;
            p += head;
            n -= head;
            continue;
        }
        if (head + body > n) {
            if (reset)
                return;
            FAIL("response body truncated (%zu of %zu bytes)", n - head, body);
        }
        msgpack_sbuffer m;
        msgpack_sbuffer_init(&m);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &m, msgpack_sbuffer_write);
        char err[256];
        if (bw_json_to_msgpack(p + head, body, &pk, err, sizeof err) < 0)
            FAIL("response body is not JSON (%s): %.*s", err, (int)body, p + head);
        msgpack_sbuffer_destroy(&m);
        p += head + body;
        n -= head + body;
    }
}

/* connect(2), finished if a signal interrupts it (libFuzzer's own timers send them):
 * the connection then completes on its own; wait for it and read its result. */
static int connect_once(int fd) {
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
        return 0;
    if (errno != EINTR)
        return -1;
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int err = 0;
    socklen_t len = sizeof err;
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR)
            return -1;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    errno = err;
    return err ? -1 : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), small = 4096;
    /* Small buffers both ways so answers back up: the server's queued-write path. */
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small) < 0 ||
        connect_once(fd) < 0)
        FAIL("connect: %s", strerror(errno));
    /* Non-blocking only after connect: loopback connects complete at once. */
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        FAIL("fcntl");
    uint32_t h = 2166136261u; /* FNV-1a: the split point follows the input */
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 16777619u;
    size_t split = size ? h % (size + 1) : 0, sent = 0;
    /* Some clients read only every 4th turn, some reset the connection after 3 turns
     * (the server then writes into a dead socket and has answers still owed). */
    bool slow = (h >> 24) % 4 == 0, abort_early = (h >> 26) % 8 == 1;
    bool shut = false, eof = false, reset = false;
    static char rbuf[1 << 16];
    static char *resp;
    static size_t resp_cap;
    size_t resp_len = 0;
    double t0 = bw_now_ms();
    for (unsigned iter = 0; !eof; iter++) {
        if (bw_now_ms() - t0 > BUDGET_MS)
            FAIL("connection still open %.0f ms after the client shut down its side "
                 "(sent %zu of %zu bytes, %zu received)", BUDGET_MS, sent, size, resp_len);
        /* Write the first part, let the server read it, then the rest. */
        size_t limit = iter == 0 ? split : size;
        while (!shut && sent < limit) {
            ssize_t w = write(fd, data + sent, limit - sent);
            if (w > 0) {
                sent += (size_t)w;
            } else if (w < 0 && (errno == EPIPE || errno == ECONNRESET)) {
                sent = size; /* the server closed: nothing more to say */
            } else {
                break; /* EAGAIN: the server must read first */
            }
        }
        if (!shut && sent == size) {
            shutdown(fd, SHUT_WR);
            shut = true;
        }
        uv_run(&loop, UV_RUN_NOWAIT);
        answer_deferred();
        if (abort_early && iter == 2) {
            struct linger lg = {1, 0}; /* close() sends RST */
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            reset = true;
            break;
        }
        for (; !slow || iter % 4 == 3;) {
            ssize_t r = read(fd, rbuf, sizeof rbuf);
            if (r > 0) {
                if (resp_len + (size_t)r > resp_cap) {
                    resp_cap = (resp_len + (size_t)r) * 2;
                    resp = realloc(resp, resp_cap);
                    if (!resp)
                        FAIL("out of memory");
                }
                memcpy(resp + resp_len, rbuf, (size_t)r);
                resp_len += (size_t)r;
            } else if (r == 0 || errno == ECONNRESET) {
                reset = r < 0;
                eof = true;
                break;
            } else {
                break;
            }
        }
    }
    close(fd);
    size_t heads = 0;
    for (const uint8_t *q = data; size >= 4 && (q = memmem(q, size - (size_t)(q - data), "HEAD", 4));
         q += 4)
        heads++;
    check_responses(resp, resp_len, reset, heads);
    /* The server side must let go of the connection too: run until it has. */
    t0 = bw_now_ms();
    while (open_conns() > 0 || ndeferred > 0) {
        if (bw_now_ms() - t0 > BUDGET_MS)
            FAIL("%d connection handle(s) still open after the client closed", open_conns());
        uv_run(&loop, UV_RUN_NOWAIT);
        answer_deferred();
    }
    if (handed != answered)
        FAIL("%lu requests handed to handlers, %lu answered", handed, answered);
    int fds = count_sockets(false);
    if (fds != base_fds) {
        count_sockets(true);
        FAIL("%d sockets open after the input, %d before the first", fds, base_fds);
    }
    return 0;
}
