/* loadgen.c - closed-loop load generator for beam-worker (and an HTTP baseline).
 *
 *   beam-loadgen --proto msgpack --unix /tmp/s.sock --connections 16 --duration 10
 *   beam-loadgen --proto http --tcp 127.0.0.1:8000 --connections 16 --duration 10
 *
 * Every connection keeps --pipeline requests in flight: each time a response arrives
 * another request is sent, so the offered load adapts to the server (closed loop).
 * Responses are matched to requests in FIFO order (both protocols answer in order on
 * a connection), which gives the latency of each request: send to last response byte.
 *
 * msgpack: frames are a 4-byte big-endian length and one map (docs/protocol.md). The
 *   request is the pre-encoded map {"id": <uint32>, "kwargs": {}}; only the id is
 *   patched per request. A response counts as an error unless it is a map with
 *   "ok": true and the id that was sent.
 * http: HTTP/1.1 keep-alive `POST /` with the JSON body `{}`. Non-2xx statuses are
 *   errors. Bodies are delimited by Content-Length or chunked transfer encoding.
 *
 * Runs --warmup seconds unrecorded, then --duration seconds recorded, then stops; it
 * prints one JSON line with the request count, errors, throughput and latency
 * percentiles (a log-linear histogram, < 0.8% relative error). Exits 0 when the run
 * completed (errors are reported, not fatal), 1 on a setup failure, 2 on bad usage.
 * Loopback use only: there is no connect timeout and no TLS.
 *
 * Depends on libc only (threads are in glibc >= 2.34).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- options -------------------------------------------------------------------------- */

enum proto { PROTO_MSGPACK, PROTO_HTTP };

static struct {
    enum proto proto;
    const char *unix_path;
    const char *tcp;
    int connections;
    int threads;
    int pipeline;
    double duration_s;
    double warmup_s;
    bool quickack;
} opt = {PROTO_MSGPACK, NULL, NULL, 16, 1, 1, 10.0, 1.0, false};

static struct sockaddr_storage addr;
static socklen_t addrlen;

static const char usage[] =
    "usage: beam-loadgen [OPTIONS] (--unix PATH | --tcp HOST:PORT)\n"
    "\n"
    "Closed-loop load generator: every connection keeps --pipeline requests in flight.\n"
    "Prints one JSON line: requests, errors, seconds, rps, p50/p90/p99/p999/max in us.\n"
    "\n"
    "  --proto msgpack|http  length-prefixed msgpack (beam-worker) or HTTP/1.1 POST / with {}\n"
    "                        (default msgpack)\n"
    "  --unix PATH           connect to a unix socket\n"
    "  --tcp HOST:PORT       connect over TCP (loopback; TCP_NODELAY)\n"
    "  --connections C       concurrent connections (default 16)\n"
    "  --threads N           client threads, connections split between them (default 1)\n"
    "  --pipeline D          requests in flight per connection (default 1)\n"
    "  --duration S          measured seconds (default 10)\n"
    "  --warmup S            unmeasured seconds before that (default 1)\n"
    "  --quickack            TCP: ACK every response at once (TCP_QUICKACK after each read),\n"
    "                        so a server that writes one response in several segments without\n"
    "                        TCP_NODELAY is not held up by the client's delayed ACK\n"
    "  -h, --help            this text\n";

/* ---- clock ---------------------------------------------------------------------------- */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- latency histogram ---------------------------------------------------------------- */

/* Log-linear: values below 2^SUB_BITS ns have their own bucket; above, each power of two
 * is split into 2^(SUB_BITS-1) equal buckets, so a bucket spans < 1/128 of its value. */
#define SUB_BITS 8
#define SUB (1u << SUB_BITS)
#define HALF (SUB / 2)
#define MAX_EXP 40 /* 2^40 ns ~ 18 minutes; larger values are clamped */
#define NBUCKETS (SUB + (MAX_EXP - SUB_BITS + 1) * HALF)

struct hist {
    uint64_t count[NBUCKETS];
    uint64_t total;
    uint64_t max_ns;
};

static inline unsigned bucket_of(uint64_t v) {
    if (v < SUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    if (msb > MAX_EXP) {
        msb = MAX_EXP;
        v = (2ull << MAX_EXP) - 1;
    }
    unsigned e = msb - (SUB_BITS - 1); /* >= 1 */
    unsigned sub = (unsigned)(v >> e);  /* in [HALF, SUB) */
    return SUB + (e - 1) * HALF + (sub - HALF);
}

/* The middle of bucket b, in ns. */
static double bucket_value(unsigned b) {
    if (b < SUB)
        return b;
    unsigned e = (b - SUB) / HALF + 1, sub = (b - SUB) % HALF + HALF;
    return (double)((uint64_t)sub << e) + (double)(1ull << e) / 2.0;
}

static inline void hist_add(struct hist *h, uint64_t ns) {
    h->count[bucket_of(ns)]++;
    h->total++;
    if (ns > h->max_ns)
        h->max_ns = ns;
}

static double hist_quantile_us(const struct hist *h, double q) {
    if (!h->total)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)h->total + 0.5);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < NBUCKETS; b++) {
        seen += h->count[b];
        if (seen >= rank) {
            double v = bucket_value(b);
            return (v > (double)h->max_ns ? (double)h->max_ns : v) / 1000.0;
        }
    }
    return (double)h->max_ns / 1000.0;
}

/* ---- requests ------------------------------------------------------------------------- */

/* {"id": <uint32 BE at offset 9 of the frame>, "kwargs": {}} behind its 4-byte length. */
static const uint8_t mp_request[] = {
    0x00, 0x00, 0x00, 0x11,                  /* length 17 */
    0x82,                                    /* fixmap, 2 entries */
    0xa2, 'i', 'd', 0xce, 0, 0, 0, 0,        /* "id": uint32 */
    0xa6, 'k', 'w', 'a', 'r', 'g', 's', 0x80 /* "kwargs": {} */
};
#define MP_ID_OFFSET 9

static const char http_request[] = "POST / HTTP/1.1\r\n"
                                   "Host: 127.0.0.1\r\n"
                                   "Content-Type: application/json\r\n"
                                   "Content-Length: 2\r\n"
                                   "\r\n"
                                   "{}";

/* ---- msgpack response check ----------------------------------------------------------- */

static inline uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Skip one msgpack value; returns the byte after it, or NULL if malformed/truncated. */
static const uint8_t *mp_skip(const uint8_t *p, const uint8_t *end, int depth) {
    if (p >= end || depth > 64)
        return NULL;
    uint8_t t = *p++;
    uint64_t n = 0, items = 0; /* bytes of payload to skip / nested values to skip */
    if (t <= 0x7f || t >= 0xe0 || (t >= 0xc0 && t <= 0xc3))
        return p; /* fixint, nil, bool (0xc1 is unused; tolerated) */
    if ((t & 0xe0) == 0xa0)
        n = t & 0x1f;
    else if ((t & 0xf0) == 0x90)
        items = t & 0x0f;
    else if ((t & 0xf0) == 0x80)
        items = 2u * (t & 0x0f);
    else {
        size_t need;
        switch (t) {
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xca: case 0xce: case 0xd2: n = 4; break;
        case 0xcb: case 0xcf: case 0xd3: n = 8; break;
        case 0xd4: n = 2; break; /* fixext: type byte + data */
        case 0xd5: n = 3; break;
        case 0xd6: n = 5; break;
        case 0xd7: n = 9; break;
        case 0xd8: n = 17; break;
        case 0xd9: case 0xc4: case 0xc7: /* str8, bin8, ext8 */
            need = 1;
            if ((size_t)(end - p) < need)
                return NULL;
            n = p[0] + (t == 0xc7);
            p += need;
            break;
        case 0xda: case 0xc5: case 0xc8:
            need = 2;
            if ((size_t)(end - p) < need)
                return NULL;
            n = be16(p) + (t == 0xc8);
            p += need;
            break;
        case 0xdb: case 0xc6: case 0xc9:
            need = 4;
            if ((size_t)(end - p) < need)
                return NULL;
            n = (uint64_t)be32(p) + (t == 0xc9);
            p += need;
            break;
        case 0xdc: case 0xdd:
            need = t == 0xdc ? 2 : 4;
            if ((size_t)(end - p) < need)
                return NULL;
            items = need == 2 ? be16(p) : be32(p);
            p += need;
            break;
        case 0xde: case 0xdf:
            need = t == 0xde ? 2 : 4;
            if ((size_t)(end - p) < need)
                return NULL;
            items = 2ull * (need == 2 ? be16(p) : be32(p));
            p += need;
            break;
        default: return NULL;
        }
    }
    if ((uint64_t)(end - p) < n)
        return NULL;
    p += n;
    while (items--) {
        if (!(p = mp_skip(p, end, depth + 1)))
            return NULL;
    }
    return p;
}

/* Read a non-negative integer; false if the value is not one. */
static bool mp_uint(const uint8_t *p, const uint8_t *end, uint64_t *out) {
    if (p >= end)
        return false;
    uint8_t t = *p++;
    size_t n = (size_t)(end - p);
    if (t <= 0x7f) *out = t;
    else if (t == 0xcc && n >= 1) *out = p[0];
    else if (t == 0xcd && n >= 2) *out = be16(p);
    else if (t == 0xce && n >= 4) *out = be32(p);
    else if (t == 0xcf && n >= 8) *out = (uint64_t)be32(p) << 32 | be32(p + 4);
    else return false;
    return true;
}

/* A good response is one map holding "ok": true and "id": the id that was sent. */
static bool mp_response_ok(const uint8_t *p, size_t len, uint32_t want_id) {
    const uint8_t *end = p + len;
    uint64_t entries;
    if (!len)
        return false;
    if ((p[0] & 0xf0) == 0x80) {
        entries = p[0] & 0x0f;
        p += 1;
    } else if (p[0] == 0xde && len >= 3) {
        entries = be16(p + 1);
        p += 3;
    } else if (p[0] == 0xdf && len >= 5) {
        entries = be32(p + 1);
        p += 5;
    } else {
        return false;
    }
    bool ok = false, id_ok = false;
    while (entries--) {
        const uint8_t *k = p;
        if (!(p = mp_skip(p, end, 0)))
            return false;
        const uint8_t *v = p;
        if (!(p = mp_skip(p, end, 0)))
            return false;
        if (p - k == 4 && k[0] == 0xa2 && k[1] == 'o' && k[2] == 'k')
            ok = k[3] == 0xc3;
        else if (v - k == 3 && k[0] == 0xa2 && k[1] == 'i' && k[2] == 'd') {
            uint64_t id;
            id_ok = mp_uint(v, p, &id) && id == want_id;
        }
    }
    return ok && id_ok && p == end;
}

/* ---- HTTP response parse -------------------------------------------------------------- */

/* Length of the header value of `name` in [p, end) (a header block), or NULL. */
static const char *http_header(const char *p, const char *end, const char *name, size_t *vlen) {
    size_t nl = strlen(name);
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol)
            eol = end;
        if ((size_t)(eol - p) > nl && p[nl] == ':' && strncasecmp(p, name, nl) == 0) {
            const char *v = p + nl + 1;
            while (v < eol && (*v == ' ' || *v == '\t'))
                v++;
            const char *ve = eol;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *vlen = (size_t)(ve - v);
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

/* Parse one response at the start of buf. Returns its length, 0 if incomplete, -1 if
 * malformed. *status gets the status code. */
static long http_parse(const char *buf, size_t len, int *status) {
    const char *hend = memmem(buf, len, "\r\n\r\n", 4);
    if (!hend)
        return len > 65536 ? -1 : 0;
    if (len < 12 || memcmp(buf, "HTTP/1.", 7) != 0 || buf[8] != ' ')
        return -1;
    *status = (buf[9] - '0') * 100 + (buf[10] - '0') * 10 + (buf[11] - '0');
    const char *hdrs = memmem(buf, (size_t)(hend - buf) + 2, "\r\n", 2) + 2;
    const char *body = hend + 4, *end = buf + len;
    size_t vlen;
    const char *v = http_header(hdrs, hend + 2, "transfer-encoding", &vlen);
    if (v && vlen >= 7 && strncasecmp(v + vlen - 7, "chunked", 7) == 0) {
        const char *p = body;
        for (;;) {
            const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
            if (!eol)
                return 0;
            char *num_end;
            unsigned long n = strtoul(p, &num_end, 16);
            if (num_end == p)
                return -1;
            p = eol + 2;
            if (n == 0) { /* trailers, then an empty line */
                for (;;) {
                    eol = memmem(p, (size_t)(end - p), "\r\n", 2);
                    if (!eol)
                        return 0;
                    bool empty = eol == p;
                    p = eol + 2;
                    if (empty)
                        return (long)(p - buf);
                }
            }
            if ((size_t)(end - p) < n + 2)
                return 0;
            p += n + 2;
        }
    }
    size_t clen = 0;
    if ((v = http_header(hdrs, hend + 2, "content-length", &vlen))) {
        char tmp[24];
        if (vlen == 0 || vlen >= sizeof tmp)
            return -1;
        memcpy(tmp, v, vlen);
        tmp[vlen] = 0;
        char *e;
        clen = strtoul(tmp, &e, 10);
        if (*e)
            return -1;
    } else if (!(*status == 204 || *status == 304 || *status / 100 == 1)) {
        return -1; /* close-delimited bodies are not keep-alive */
    }
    if ((size_t)(end - body) < clen)
        return 0;
    return (long)(body - buf) + (long)clen;
}

/* ---- connections ---------------------------------------------------------------------- */

struct conn {
    int fd;
    uint32_t next_id;
    /* requests in flight, FIFO: send time and id */
    uint64_t *sent_ns;
    uint32_t *ids;
    int head, inflight;
    uint8_t *in;
    size_t in_len, in_cap;
    uint8_t *out;
    size_t out_off, out_len, out_cap;
    bool want_out;
};

struct worker {
    pthread_t tid;
    int index;
    int nconns;
    struct conn *conns;
    int ep;
    struct hist hist;
    uint64_t errors;
    uint64_t reconnects;
    const char *fatal;
};

static uint64_t t_start_ns, t_measure_ns, t_end_ns;

static int connect_one(void) {
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (addr.ss_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void out_append(struct conn *c, const void *p, size_t n) {
    if (c->out_off && c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        while (c->out_len + n > c->out_cap)
            c->out_cap = c->out_cap ? c->out_cap * 2 : 4096;
        c->out = realloc(c->out, c->out_cap);
        if (!c->out) {
            perror("beam-loadgen: realloc");
            exit(1);
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void queue_request(struct conn *c, uint64_t t) {
    int slot = (c->head + c->inflight) % opt.pipeline;
    c->sent_ns[slot] = t;
    c->ids[slot] = c->next_id;
    if (opt.proto == PROTO_MSGPACK) {
        uint8_t frame[sizeof mp_request];
        memcpy(frame, mp_request, sizeof frame);
        uint32_t id = c->next_id;
        frame[MP_ID_OFFSET] = (uint8_t)(id >> 24);
        frame[MP_ID_OFFSET + 1] = (uint8_t)(id >> 16);
        frame[MP_ID_OFFSET + 2] = (uint8_t)(id >> 8);
        frame[MP_ID_OFFSET + 3] = (uint8_t)id;
        out_append(c, frame, sizeof frame);
    } else {
        out_append(c, http_request, sizeof http_request - 1);
    }
    c->next_id++;
    c->inflight++;
}

/* Write what is queued; returns -1 on a broken connection. */
static int flush_out(struct worker *w, struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -1;
        }
        c->out_off += (size_t)n;
    }
    bool want = c->out_off < c->out_len;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
}

static int conn_open(struct worker *w, struct conn *c) {
    c->fd = connect_one();
    if (c->fd < 0)
        return -1;
    c->head = c->inflight = 0;
    c->in_len = c->out_off = c->out_len = 0;
    c->want_out = false;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return -1;
    uint64_t t = now_ns();
    for (int i = 0; i < opt.pipeline; i++)
        queue_request(c, t);
    return flush_out(w, c);
}

/* The server closed or broke the connection: the requests in flight are errors (when
 * measured); open a new connection so the offered load stays the same. */
static void conn_reset(struct worker *w, struct conn *c, uint64_t t) {
    if (t >= t_measure_ns)
        w->errors += (uint64_t)c->inflight;
    epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    w->reconnects++;
    if (t < t_end_ns && conn_open(w, c) < 0)
        w->fatal = "reconnect failed";
}

/* One response finished at time t. */
static void complete(struct worker *w, struct conn *c, uint64_t t, bool good) {
    uint64_t sent = c->sent_ns[c->head];
    c->head = (c->head + 1) % opt.pipeline;
    c->inflight--;
    if (t >= t_measure_ns && sent >= t_measure_ns && t < t_end_ns) {
        hist_add(&w->hist, t - sent);
        if (!good)
            w->errors++;
    }
    if (t < t_end_ns)
        queue_request(c, t);
}

/* Consume whole responses from c->in; returns -1 if the stream is broken. */
static int parse_input(struct worker *w, struct conn *c, uint64_t t) {
    size_t off = 0;
    while (off < c->in_len && c->inflight > 0) {
        const uint8_t *p = c->in + off;
        size_t avail = c->in_len - off, used;
        bool good;
        if (opt.proto == PROTO_MSGPACK) {
            if (avail < 4)
                break;
            uint32_t len = be32(p);
            if (len > (64u << 20))
                return -1;
            if (avail - 4 < len) {
                if (4 + (size_t)len > c->in_cap) { /* grow to fit one whole frame */
                    c->in_cap = 4 + (size_t)len;
                    if (!(c->in = realloc(c->in, c->in_cap))) {
                        perror("beam-loadgen: realloc");
                        exit(1);
                    }
                }
                break;
            }
            good = mp_response_ok(p + 4, len, c->ids[c->head]);
            used = 4 + (size_t)len;
        } else {
            int status = 0;
            long n = http_parse((const char *)p, avail, &status);
            if (n < 0)
                return -1;
            if (n == 0) {
                if (avail == c->in_cap) {
                    c->in_cap *= 2;
                    if (!(c->in = realloc(c->in, c->in_cap))) {
                        perror("beam-loadgen: realloc");
                        exit(1);
                    }
                }
                break;
            }
            good = status >= 200 && status < 300;
            used = (size_t)n;
        }
        complete(w, c, t, good);
        off += used;
    }
    if (off) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
    if (c->in_len && c->inflight == 0)
        return -1; /* bytes nobody asked for */
    return 0;
}

static void on_readable(struct worker *w, struct conn *c) {
    for (;;) {
        size_t room = c->in_cap - c->in_len;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        uint64_t t = now_ns();
        if (n <= 0) {
            conn_reset(w, c, t);
            return;
        }
        c->in_len += (size_t)n;
        if (opt.quickack) /* re-armed after every read: the kernel clears it */
            setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &(int){1}, sizeof(int));
        if (parse_input(w, c, t) < 0) {
            if (t >= t_measure_ns)
                w->errors++; /* the malformed response itself */
            conn_reset(w, c, t);
            return;
        }
        if ((size_t)n < room)
            break; /* a short read: the socket is drained */
    }
    if (c->out_off < c->out_len && flush_out(w, c) < 0)
        conn_reset(w, c, now_ns());
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    struct epoll_event evs[256];
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    if (w->ep < 0) {
        w->fatal = "epoll_create1 failed";
        return NULL;
    }
    for (int i = 0; i < w->nconns; i++) {
        struct conn *c = &w->conns[i];
        c->in_cap = 16384;
        c->in = malloc(c->in_cap);
        c->sent_ns = calloc((size_t)opt.pipeline, sizeof *c->sent_ns);
        c->ids = calloc((size_t)opt.pipeline, sizeof *c->ids);
        c->next_id = (uint32_t)w->index << 24 | (uint32_t)i << 12;
        if (!c->in || !c->sent_ns || !c->ids) {
            w->fatal = "out of memory";
            return NULL;
        }
        if (conn_open(w, c) < 0) {
            w->fatal = strerror(errno);
            return NULL;
        }
    }
    for (;;) {
        uint64_t t = now_ns();
        if (t >= t_end_ns || w->fatal)
            break;
        int timeout_ms = (int)((t_end_ns - t) / 1000000u) + 1;
        int n = epoll_wait(w->ep, evs, 256, timeout_ms > 100 ? 100 : timeout_ms);
        if (n < 0 && errno != EINTR) {
            w->fatal = "epoll_wait failed";
            break;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(w, c);
            else if ((evs[i].events & EPOLLOUT) && flush_out(w, c) < 0)
                conn_reset(w, c, now_ns());
        }
    }
    for (int i = 0; i < w->nconns; i++)
        if (w->conns[i].fd >= 0)
            close(w->conns[i].fd);
    close(w->ep);
    return NULL;
}

/* ---- main ----------------------------------------------------------------------------- */

static int parse_int(const char *name, const char *s, int min, int max) {
    char *e;
    long v = strtol(s, &e, 10);
    if (*s == 0 || *e || v < min || v > max) {
        fprintf(stderr, "beam-loadgen: %s must be an integer from %d to %d\n", name, min, max);
        exit(2);
    }
    return (int)v;
}

static double parse_secs(const char *name, const char *s, double min) {
    char *e;
    double v = strtod(s, &e);
    if (*s == 0 || *e || !(v >= min) || v > 86400) {
        fprintf(stderr, "beam-loadgen: %s must be a number of seconds >= %g\n", name, min);
        exit(2);
    }
    return v;
}

static int resolve(void) {
    memset(&addr, 0, sizeof addr);
    if (opt.unix_path) {
        struct sockaddr_un *un = (struct sockaddr_un *)&addr;
        if (strlen(opt.unix_path) >= sizeof un->sun_path) {
            fprintf(stderr, "beam-loadgen: unix socket path too long\n");
            return -1;
        }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, opt.unix_path);
        addrlen = sizeof *un;
        return 0;
    }
    char host[256];
    const char *colon = strrchr(opt.tcp, ':');
    if (!colon || colon == opt.tcp || (size_t)(colon - opt.tcp) >= sizeof host) {
        fprintf(stderr, "beam-loadgen: --tcp wants HOST:PORT\n");
        return -1;
    }
    memcpy(host, opt.tcp, (size_t)(colon - opt.tcp));
    host[colon - opt.tcp] = 0;
    if (host[0] == '[' && host[strlen(host) - 1] == ']') { /* [::1]:port */
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = 0;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc) {
        fprintf(stderr, "beam-loadgen: %s: %s\n", opt.tcp, gai_strerror(rc));
        return -1;
    }
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

int main(int argc, char **argv) {
    static const struct option longs[] = {
        {"proto", required_argument, 0, 'P'},   {"unix", required_argument, 0, 'u'},
        {"tcp", required_argument, 0, 't'},     {"connections", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 'T'}, {"pipeline", required_argument, 0, 'd'},
        {"duration", required_argument, 0, 'D'}, {"warmup", required_argument, 0, 'w'},
        {"quickack", no_argument, 0, 'q'},      {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
        switch (ch) {
        case 'P':
            if (strcmp(optarg, "msgpack") == 0)
                opt.proto = PROTO_MSGPACK;
            else if (strcmp(optarg, "http") == 0)
                opt.proto = PROTO_HTTP;
            else {
                fprintf(stderr, "beam-loadgen: --proto is msgpack or http\n");
                return 2;
            }
            break;
        case 'u': opt.unix_path = optarg; break;
        case 't': opt.tcp = optarg; break;
        case 'c': opt.connections = parse_int("--connections", optarg, 1, 100000); break;
        case 'T': opt.threads = parse_int("--threads", optarg, 1, 256); break;
        case 'd': opt.pipeline = parse_int("--pipeline", optarg, 1, 4096); break;
        case 'D': opt.duration_s = parse_secs("--duration", optarg, 0.001); break;
        case 'w': opt.warmup_s = parse_secs("--warmup", optarg, 0); break;
        case 'q': opt.quickack = true; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind != argc || !opt.unix_path == !opt.tcp) {
        fputs(usage, stderr);
        return 2;
    }
    if (opt.unix_path)
        opt.quickack = false;
    if (opt.threads > opt.connections)
        opt.threads = opt.connections;
    if (resolve() < 0)
        return 1;

    struct worker *ws = calloc((size_t)opt.threads, sizeof *ws);
    struct conn *conns = calloc((size_t)opt.connections, sizeof *conns);
    if (!ws || !conns) {
        perror("beam-loadgen: calloc");
        return 1;
    }
    t_start_ns = now_ns();
    t_measure_ns = t_start_ns + (uint64_t)(opt.warmup_s * 1e9);
    t_end_ns = t_measure_ns + (uint64_t)(opt.duration_s * 1e9);
    for (int i = 0, first = 0; i < opt.threads; i++) {
        ws[i].index = i;
        ws[i].nconns = opt.connections / opt.threads + (i < opt.connections % opt.threads);
        ws[i].conns = conns + first;
        first += ws[i].nconns;
        if (opt.threads == 1)
            worker_main(&ws[i]);
        else if (pthread_create(&ws[i].tid, NULL, worker_main, &ws[i]) != 0) {
            fprintf(stderr, "beam-loadgen: pthread_create failed\n");
            return 1;
        }
    }
    if (opt.threads > 1)
        for (int i = 0; i < opt.threads; i++)
            pthread_join(ws[i].tid, NULL);
    uint64_t t_done = now_ns();

    static struct hist h; /* merged */
    uint64_t errors = 0, reconnects = 0;
    for (int i = 0; i < opt.threads; i++) {
        if (ws[i].fatal) {
            fprintf(stderr, "beam-loadgen: %s: %s\n", opt.unix_path ? opt.unix_path : opt.tcp,
                    ws[i].fatal);
            return 1;
        }
        for (unsigned b = 0; b < NBUCKETS; b++)
            h.count[b] += ws[i].hist.count[b];
        h.total += ws[i].hist.total;
        if (ws[i].hist.max_ns > h.max_ns)
            h.max_ns = ws[i].hist.max_ns;
        errors += ws[i].errors;
        reconnects += ws[i].reconnects;
    }
    double secs = (double)((t_done < t_end_ns ? t_done : t_end_ns) - t_measure_ns) / 1e9;
    printf("{\"proto\":\"%s\",\"connections\":%d,\"pipeline\":%d,\"threads\":%d,"
           "\"requests\":%llu,\"errors\":%llu,\"reconnects\":%llu,\"seconds\":%.3f,"
           "\"rps\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
           "\"max_us\":%.1f}\n",
           opt.proto == PROTO_MSGPACK ? "msgpack" : "http", opt.connections, opt.pipeline,
           opt.threads, (unsigned long long)h.total, (unsigned long long)errors,
           (unsigned long long)reconnects, secs, secs > 0 ? (double)h.total / secs : 0.0,
           hist_quantile_us(&h, 0.50), hist_quantile_us(&h, 0.90), hist_quantile_us(&h, 0.99),
           hist_quantile_us(&h, 0.999), (double)h.max_ns / 1000.0);
    return 0;
}
