/* http.c - HTTP/1.1 server on libuv with Debian's http-parser.
 *
 * Ownership: a connection owns the requests parsed from it, in a FIFO that fixes the
 * response order. A request handed to the router stays alive until answered, even if
 * its connection closes first (the answer is then dropped); the connection's memory is
 * released when it is closed and its last request is answered. */
#define _GNU_SOURCE
#include "http.h"

#include <http_parser.h>
#include <msgpack.h>
#include <stdio.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "json.h"
#include "log.h"
#include "mp.h"
#include "stream.h"
#include "util.h"

#define MAX_PIPELINED 64 /* per connection; then stop reading until answers drain. Below the
                          * default max_pending_tasks (100): one connection alone never
                          * fills the queue */
#define MAX_URL 1024
#define MAX_AUTH 1024
/* Deadlines are checked by one sweep over the connections, not a timer per connection:
 * a connection costs no extra handle, and a deadline is late by at most this much. */
#define SWEEP_MS 100
#define MAX_PATH 256 /* kept per request for the access log */
#define TOKEN_COOKIE "beam_token" /* set by a GET /dashboard?token= visit (observe.c) */

struct conn;

/* Where a connection is between requests; each phase has its own deadline. */
enum target { T_ROOT, T_STATS, T_HEALTH, T_OTHER };

enum conn_phase {
    C_IDLE,    /* no request begun: keep-alive idle timeout, once nothing is owed */
    C_HEADERS, /* request line and headers arriving: header timeout */
    C_BODY,    /* body arriving: body timeout */
};

struct bw_http_req {
    struct conn *conn;
    struct bw_http_req *next;
    bool done, keep_alive, head; /* head: a HEAD request, answered without the body */
    char *resp;
    size_t resp_len;
    msgpack_sbuffer kwargs;
    double arrival;
    /* streamed answers */
    bool sse, streaming, over;  /* over: the caller was told to pause */
    msgpack_sbuffer sbuf;       /* stream bytes not handed to the connection yet */
    bw_http_stream_fn stream_cb;
    void *stream_arg;
    int method;             /* enum http_method; -1 before routing */
    char path[MAX_PATH];
    bool token_login;       /* authorized by ?token= on GET /dashboard */
    struct bw_http_trace trace;
};

struct conn {
    uv_tcp_t tcp;
    http_parser parser;
    char url[MAX_URL];
    size_t url_len;
    char field[32];
    size_t field_len;
    bool in_auth;
    bool expect_continue;   /* "Expect: 100-continue": the client waits before the body */
    bool accept_sse;        /* "Accept: text/event-stream": a stream is sent as SSE */
    int nauth;              /* Authorization fields in this request: more than one is refused */
    char auth[MAX_AUTH];
    size_t auth_len;
    bool in_cookie;         /* inside a Cookie field's value */
    char cookie[MAX_AUTH];  /* Cookie fields, "; "-joined; only the token cookie is read */
    size_t cookie_len;
    msgpack_sbuffer body;
    msgpack_sbuffer unparsed; /* bytes read while parsing was paused (too many pending) */
    int reject;             /* status to answer instead of parsing on (413) */
    struct bw_http_req *head, *tail;
    int pending;
    bool closed, reading, close_after_flush;
    bool eof;               /* the client finished sending: close once all is answered */
    size_t write_bytes;
    enum conn_phase phase;
    double deadline;        /* bw_now_ms() past which the phase took too long; 0: none */
    bool keep_body;         /* only POST / uses its body; others are counted, not kept */
    size_t body_seen;
    /* An authorized request was made on it. Until then it is a stranger's: idle, it gets
     * the header timeout, and at --max-connections it is the first to go. */
    bool proven;
    struct conn *prev, *next; /* open connections, oldest first, for the sweep */
};

static struct {
    uv_loop_t *loop;
    uv_tcp_t listener;
    bool listening;
    bool stopping; /* SIGTERM: every new request is answered 503, Connection: close */
    struct bw_http_options opts;
    struct bw_http_handlers h;
    http_parser_settings settings;
    uv_timer_t sweep;
    struct conn *conns, *last; /* not yet closed connections, oldest first */
    int nconns;
    int nclosing; /* of those, closing: their descriptor is gone, no longer counted */
} front;

static const char *status_text(int status) {
    switch (status) {
    case 200: return "OK";
    case 303: return "See Other";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Error";
    }
}

/* ---- connection lifetime ------------------------------------------------------------ */

static void conn_free_if_done(struct conn *c) {
    if (c->closed && c->pending == 0 && !c->head) {
        msgpack_sbuffer_destroy(&c->body);
        msgpack_sbuffer_destroy(&c->unparsed);
        free(c);
    }
}

static void streams_gone(struct conn *c);

static void on_closed(uv_handle_t *h) {
    struct conn *c = h->data;
    if (c->prev)
        c->prev->next = c->next;
    else
        front.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        front.last = c->prev;
    front.nconns--;
    front.nclosing--;
    c->closed = true;
    streams_gone(c);
    conn_free_if_done(c);
}

static void conn_close(struct conn *c) {
    if (!uv_is_closing((uv_handle_t *)&c->tcp)) {
        front.nclosing++;
        uv_close((uv_handle_t *)&c->tcp, on_closed);
    }
}

static void req_free(struct bw_http_req *r) {
    free(r->resp);
    msgpack_sbuffer_destroy(&r->sbuf);
    msgpack_sbuffer_destroy(&r->kwargs);
    free(r);
}

/* ---- writing, in request order ------------------------------------------------------ */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf);
static void resume_parsing(struct conn *c);

static void read_start(struct conn *c) {
    if (!c->reading && !c->close_after_flush && !c->eof && !uv_is_closing((uv_handle_t *)&c->tcp) &&
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
}

static void read_stop(struct conn *c) {
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

static void stream_drained(struct conn *c);

static void on_write(uv_write_t *w, int status) {
    struct conn *c = w->handle->data;
    c->write_bytes -= bw_stream_written(w);
    if (status >= 0)
        stream_drained(c);
    if (status < 0 || ((c->close_after_flush || c->eof) && c->write_bytes == 0 && !c->head))
        conn_close(c);
}

static void send_bytes(struct conn *c, char *data, size_t len) {
    if (bw_stream_send((uv_stream_t *)&c->tcp, data, len, c->write_bytes == 0, on_write,
                       &c->write_bytes) < 0)
        conn_close(c);
}

/* Send every answered request at the head of the FIFO, in one write. */
static void stream_flush(struct bw_http_req *r);

/* The usual case, one answer ready: its buffer goes out as it is, without a copy. */
static bool flush_one(struct conn *c) {
    struct bw_http_req *r = c->head;
    if (!r || !r->done || (r->next && r->next->done) || uv_is_closing((uv_handle_t *)&c->tcp))
        return false;
    c->head = r->next;
    if (!c->head)
        c->tail = NULL;
    if (!r->keep_alive)
        c->close_after_flush = true;
    char *data = r->resp;
    size_t len = r->resp_len;
    r->resp = NULL; /* send_bytes owns it now */
    req_free(r);
    send_bytes(c, data, len);
    return true;
}

/* Keeping a stranger's connection open for its next request is not worth a slot for
 * long: it gets no more time idle than it had for its headers. */
static double idle_timeout_ms(const struct conn *c) {
    double s = front.opts.idle_timeout_s;
    if (!c->proven && front.opts.header_timeout_s < s)
        s = front.opts.header_timeout_s;
    return s * 1000;
}

static void flush(struct conn *c) {
    msgpack_sbuffer out;
    msgpack_sbuffer_init(&out);
    bool stop = flush_one(c) && c->close_after_flush;
    while (c->head && c->head->done) {
        struct bw_http_req *r = c->head;
        c->head = r->next;
        if (!c->head)
            c->tail = NULL;
        if (!uv_is_closing((uv_handle_t *)&c->tcp) && !stop)
            msgpack_sbuffer_write(&out, r->resp, r->resp_len);
        if (!r->keep_alive) {
            c->close_after_flush = true;
            stop = true; /* nothing after a "Connection: close" answer */
        }
        req_free(r);
    }
    if (out.size > 0 && !uv_is_closing((uv_handle_t *)&c->tcp))
        send_bytes(c, out.data, out.size);
    else
        msgpack_sbuffer_destroy(&out);
    if (c->head && c->head->streaming && !stop) /* its turn: what it gathered goes out */
        stream_flush(c->head);
    if (c->closed) {
        conn_free_if_done(c);
        return;
    }
    if (c->close_after_flush) {
        read_stop(c);
        if (c->write_bytes == 0)
            conn_close(c);
    } else {
        if (c->pending == 0 && c->phase == C_IDLE) /* nothing owed: the idle clock runs */
            c->deadline = bw_now_ms() + idle_timeout_ms(c);
        if (c->pending < MAX_PIPELINED / 2)
            resume_parsing(c);
        if (c->eof && !c->head && c->write_bytes == 0 && c->unparsed.size == 0)
            conn_close(c);
    }
}

static void finish(struct bw_http_req *r, msgpack_sbuffer *resp) {
    struct conn *c = r->conn;
    r->resp = resp->data;
    r->resp_len = resp->size;
    r->done = true;
    c->pending--;
    flush(c);
}

static void reply(struct bw_http_req *r, int status, const char *ctype, const char *extra,
                  const char *json, size_t len, const char *task_id, double wait_ms) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n",
                     status, status_text(status), ctype, len);
    msgpack_sbuffer out;
    msgpack_sbuffer_init(&out);
    msgpack_sbuffer_write(&out, head, (size_t)n);
    if (task_id && *task_id) {
        n = snprintf(head, sizeof head, "X-Task-ID: %s\r\n", task_id);
        msgpack_sbuffer_write(&out, head, (size_t)n);
    }
    if (wait_ms >= 0) {
        n = snprintf(head, sizeof head, "X-Beam-Wait-Ms: %.1f\r\n", wait_ms);
        msgpack_sbuffer_write(&out, head, (size_t)n);
    }
    if (status == 401)
        msgpack_sbuffer_write(&out, "WWW-Authenticate: Bearer\r\n", 26);
    if (extra)
        msgpack_sbuffer_write(&out, extra, strlen(extra));
    if (!r->keep_alive)
        msgpack_sbuffer_write(&out, "Connection: close\r\n", 19);
    msgpack_sbuffer_write(&out, "\r\n", 2);
    if (!r->head) /* a body after a HEAD answer would be read as the next response */
        msgpack_sbuffer_write(&out, json, len);
    if (front.h.done) /* before finish: it frees r */
        front.h.done(r, status, task_id, wait_ms, front.h.arg);
    finish(r, &out);
}

void bw_http_reply(struct bw_http_req *r, int status, const char *json, size_t len,
                   const char *task_id, double wait_ms) {
    reply(r, status, "application/json", NULL, json, len, task_id, wait_ms);
}

void bw_http_reply_raw(struct bw_http_req *r, int status, const char *content_type,
                       const char *extra, const char *body, size_t len) {
    reply(r, status, content_type, extra, body, len, NULL, -1);
}

/* {"error":{"type":..., "message":...}} into a fresh buffer (the caller destroys it). */
static void error_body(msgpack_sbuffer *b, const char *type, const char *message) {
    msgpack_sbuffer_init(b);
    msgpack_sbuffer_write(b, "{\"error\":{\"type\":", 17);
    bw_json_append_str(b, type, strlen(type));
    msgpack_sbuffer_write(b, ",\"message\":", 11);
    bw_json_append_str(b, message, strlen(message));
    msgpack_sbuffer_write(b, "}}", 2);
}

void bw_http_reply_error(struct bw_http_req *r, int status, const char *type,
                         const char *message, const char *task_id, double wait_ms) {
    if (r->streaming) { /* the status line is sent: the error becomes the last event */
        bw_http_stream_end(r, type, message);
        return;
    }
    msgpack_sbuffer b;
    error_body(&b, type, message);
    bw_http_reply(r, status, b.data, b.size, task_id, wait_ms);
    msgpack_sbuffer_destroy(&b);
}

const char *bw_http_req_kwargs(const struct bw_http_req *r, size_t *len) {
    *len = r->kwargs.size;
    return r->kwargs.data;
}

double bw_http_req_arrival(const struct bw_http_req *r) { return r->arrival; }

struct bw_http_trace *bw_http_req_trace(struct bw_http_req *r) { return &r->trace; }

const char *bw_http_req_method(const struct bw_http_req *r) {
    return r->method < 0 ? "-" : http_method_str((enum http_method)r->method);
}

const char *bw_http_req_path(const struct bw_http_req *r) { return r->path; }

bool bw_http_req_token_login(const struct bw_http_req *r) { return r->token_login; }

/* ---- parsing ------------------------------------------------------------------------ */

static struct bw_http_req *req_new(struct conn *c, bool keep_alive) {
    struct bw_http_req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->conn = c;
    r->keep_alive = keep_alive;
    r->arrival = bw_now_ms();
    r->sse = c->accept_sse;
    r->method = -1;
    msgpack_sbuffer_init(&r->kwargs);
    msgpack_sbuffer_init(&r->sbuf);
    if (c->tail)
        c->tail->next = r;
    else
        c->head = r;
    c->tail = r;
    c->pending++;
    return r;
}

static int on_message_begin(http_parser *p) {
    struct conn *c = p->data;
    c->url_len = c->auth_len = c->field_len = 0;
    c->in_auth = c->expect_continue = c->accept_sse = c->in_cookie = false;
    c->nauth = 0;
    c->cookie_len = 0;
    c->body.size = c->body_seen = 0;
    if (c->phase != C_HEADERS) { /* a new connection's clock started at accept */
        c->phase = C_HEADERS;
        c->deadline = bw_now_ms() + front.opts.header_timeout_s * 1000;
    }
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
    struct conn *c = p->data;
    if (c->url_len + len >= MAX_URL)
        len = MAX_URL - 1 - c->url_len;
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
    struct conn *c = p->data;
    if (c->in_auth || c->in_cookie || c->field_len == sizeof c->field) /* a new field begins */
        c->field_len = 0;
    c->in_auth = c->in_cookie = false;
    size_t room = sizeof c->field - c->field_len;
    memcpy(c->field + c->field_len, at, len < room ? len : room);
    c->field_len += len < room ? len : room;
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
    struct conn *c = p->data;
    if (!c->in_auth && c->field_len == 13 && strncasecmp(c->field, "authorization", 13) == 0) {
        c->in_auth = true;
        c->nauth++; /* a second field would be appended to the first: "Bearer " + "TOKEN" */
    }
    if (!c->in_auth && c->field_len == 6 && strncasecmp(c->field, "expect", 6) == 0 &&
        len >= 12 && strncasecmp(at, "100-continue", 12) == 0)
        c->expect_continue = true;
    if (!c->in_auth && c->field_len == 6 && strncasecmp(c->field, "accept", 6) == 0 &&
        memmem(at, len, "text/event-stream", 17))
        c->accept_sse = true;
    if (!c->in_auth && !c->in_cookie && c->field_len == 6 &&
        strncasecmp(c->field, "cookie", 6) == 0) {
        c->in_cookie = true;
        if (c->cookie_len > 0 && c->cookie_len + 2 < MAX_AUTH) { /* a second Cookie field */
            memcpy(c->cookie + c->cookie_len, "; ", 2);
            c->cookie_len += 2;
        }
    }
    if (c->in_cookie) {
        size_t room = MAX_AUTH - c->cookie_len;
        memcpy(c->cookie + c->cookie_len, at, len < room ? len : room);
        c->cookie_len += len < room ? len : room;
        return 0;
    }
    if (c->in_auth) {
        size_t room = MAX_AUTH - c->auth_len;
        memcpy(c->auth + c->auth_len, at, len < room ? len : room);
        c->auth_len += len < room ? len : room;
    } else {
        c->field_len = sizeof c->field; /* marks "value seen": next field starts fresh */
    }
    return 0;
}

static bool token_ok(const struct conn *c);
static enum target target_of(const struct conn *c, char *path);

static bool has_body(const http_parser *p) {
    return (p->flags & F_CHUNKED) || (p->content_length > 0 && p->content_length != ULLONG_MAX);
}

/* Everything is known but the body: refuse what will be refused before reading it. An
 * unauthorized request with a body is answered 401 and closed here, so a client without
 * the token gets no 100 Continue and never has a byte of its body buffered. */
static int on_headers_complete(http_parser *p) {
    struct conn *c = p->data;
    char path[MAX_URL];
    enum target t = target_of(c, path);
    c->field_len = 0;
    c->phase = C_BODY;
    c->deadline = bw_now_ms() + front.opts.body_timeout_s * 1000;
    c->keep_body = t == T_ROOT;
    bool bearer = front.opts.token && token_ok(c);
    c->proven = c->proven || bearer; /* so an authorized upload mid-body is not evicted */
    if (front.opts.token && (t == T_ROOT || t == T_STATS) && has_body(p) && !front.stopping &&
        !bearer) {
        c->reject = 401;
        http_parser_pause(p, 1);
    } else if (p->content_length != ULLONG_MAX && p->content_length > front.opts.max_body) {
        c->reject = 413; /* refuse before reading a byte of the body */
        http_parser_pause(p, 1);
    } else if (c->expect_continue && !c->head && !uv_is_closing((uv_handle_t *)&c->tcp)) {
        /* curl waits a second for this before sending a large body. Only when nothing
         * is owed on the connection: an interim answer must not overtake final ones. */
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        char *copy = malloc(sizeof cont - 1);
        if (copy) {
            memcpy(copy, cont, sizeof cont - 1);
            send_bytes(c, copy, sizeof cont - 1);
        }
    }
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
    struct conn *c = p->data;
    if (c->body_seen + len > front.opts.max_body) { /* chunked bodies have no length up front */
        c->reject = 413;
        http_parser_pause(p, 1);
        return 0;
    }
    c->body_seen += len;
    if (c->keep_body)
        msgpack_sbuffer_write(&c->body, at, len);
    return 0;
}

/* Constant time in the secret: compares every byte of the expected value whatever the
 * input, and folds the length difference in rather than returning early. The scheme is
 * case-insensitive (RFC 7235 section 2.1: "bearer" works too), the token is not. */
static bool token_ok(const struct conn *c) {
    static const char prefix[] = "bearer ";
    const char *tok = front.opts.token;
    size_t tlen = strlen(tok), want = sizeof prefix - 1 + tlen;
    size_t len = c->auth_len; /* trailing whitespace is not part of the value (RFC 7230) */
    while (len > 0 && (c->auth[len - 1] == ' ' || c->auth[len - 1] == '\t'))
        len--;
    unsigned diff = (unsigned)(len ^ want) | (unsigned)(c->nauth != 1);
    for (size_t i = 0; i < want; i++) {
        bool scheme = i < sizeof prefix - 1;
        char expect = scheme ? prefix[i] : tok[i - (sizeof prefix - 1)];
        char got = i < len ? c->auth[i] : 0;
        if (scheme && got >= 'A' && got <= 'Z')
            got = (char)(got + ('a' - 'A'));
        diff |= (unsigned char)(expect ^ got);
    }
    return diff == 0;
}

/* The path (without the query) into path[MAX_URL], and what it names. */
static enum target target_of(const struct conn *c, char *path) {
    size_t n = c->url_len;
    const char *q = memchr(c->url, '?', n);
    if (q)
        n = (size_t)(q - c->url);
    memcpy(path, c->url, n);
    path[n] = '\0';
    if (strcmp(path, "/") == 0)
        return T_ROOT;
    if (strcmp(path, "/stats") == 0)
        return T_STATS;
    return strcmp(path, "/health") == 0 ? T_HEALTH : T_OTHER;
}

/* The token as the value of a cookie or query parameter, compared in constant time. */
static bool token_eq(const char *got, size_t len) {
    const char *tok = front.opts.token;
    size_t tlen = strlen(tok);
    unsigned diff = (unsigned)(len ^ tlen);
    for (size_t i = 0; i < tlen; i++)
        diff |= (unsigned char)(tok[i] ^ (i < len ? got[i] : 0));
    return diff == 0;
}

/* Cookie: ...; beam_token=<token>; ... */
static bool cookie_ok(const struct conn *c) {
    static const char name[] = TOKEN_COOKIE "=";
    size_t nl = sizeof name - 1;
    for (size_t i = 0; i + nl <= c->cookie_len; i++) {
        if ((i > 0 && c->cookie[i - 1] != ' ' && c->cookie[i - 1] != ';') ||
            memcmp(c->cookie + i, name, nl) != 0)
            continue;
        size_t v = i + nl, e = v;
        while (e < c->cookie_len && c->cookie[e] != ';')
            e++;
        return token_eq(c->cookie + v, e - v);
    }
    return false;
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch = (char)(ch | 0x20);
    return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* token=<percent-encoded token> among the query's parameters. */
static bool query_token_ok(const char *q) {
    char v[MAX_AUTH];
    for (const char *p = q; p && *p; p = strchr(p, '&') ? strchr(p, '&') + 1 : NULL) {
        if (strncmp(p, "token=", 6) != 0)
            continue;
        size_t n = 0;
        for (p += 6; *p && *p != '&' && n < sizeof v; p++) {
            int hi, lo;
            if (*p == '%' && (hi = hexval(p[1])) >= 0 && (lo = hexval(p[2])) >= 0) {
                v[n++] = (char)(hi * 16 + lo);
                p += 2;
            } else {
                v[n++] = *p == '+' ? ' ' : *p;
            }
        }
        return token_eq(v, n);
    }
    return false;
}

/* The bearer token always works. Read-only GETs (the dashboard, its data, /metrics) also
 * take the dashboard's cookie; never POST /: a cookie rides along on cross-site requests,
 * so it must not be able to call the endpoint. */
static bool authorized(const struct conn *c, struct bw_http_req *r, bool read_only,
                       const char *path, const char *query) {
    if (!front.opts.token || token_ok(c))
        return true;
    if (!read_only)
        return false;
    if (cookie_ok(c))
        return true;
    if (strcmp(path, "/dashboard") == 0 && query_token_ok(query))
        return r->token_login = true;
    return false;
}

/* The query (after '?') into query[MAX_URL], "" when there is none. */
static void query_of(const struct conn *c, char *query) {
    const char *q = memchr(c->url, '?', c->url_len);
    size_t n = q ? c->url_len - (size_t)(q - c->url) - 1 : 0;
    memcpy(query, q ? q + 1 : "", n);
    query[n] = '\0';
}

static void route(struct conn *c, struct bw_http_req *r, enum http_method m) {
    char path[MAX_URL], query[MAX_URL];
    enum target t = target_of(c, path);
    query_of(c, query);
    bool is_root = t == T_ROOT, is_stats = t == T_STATS;
    bool is_get = m == HTTP_GET || m == HTTP_HEAD;
    bool observe = t == T_OTHER && front.h.owns && front.h.owns(path);
    r->head = m == HTTP_HEAD;
    r->method = (int)m;
    size_t pl = strlen(path) < sizeof r->path - 1 ? strlen(path) : sizeof r->path - 1;
    memcpy(r->path, path, pl); /* truncated: the access log's copy */
    r->path[pl] = '\0';
    if (front.stopping) {
        /* Keep-alive clients still send here after SIGTERM: tell them plainly, and close
         * so they go elsewhere, rather than queue a call no replica will take. */
        r->keep_alive = false;
        bw_http_reply_error(r, 503, "ShuttingDown", "the server is stopping; retry elsewhere",
                            NULL, -1);
        return;
    }
    if (t == T_HEALTH) {
        bw_http_reply(r, m == HTTP_GET || m == HTTP_HEAD ? 200 : 405, "{\"status\":\"ok\"}", 15,
                      NULL, -1);
        return;
    }
    if (!is_root && !is_stats && !observe) {
        bw_http_reply_error(r, 404, "NotFound", "no such path (POST / calls the endpoint)", NULL, -1);
        return;
    }
    if (!authorized(c, r, is_get && !is_root, path, query)) {
        bw_http_reply_error(r, 401, "Unauthorized",
                            "missing or wrong 'Authorization: Bearer <token>'", NULL, -1);
        return;
    }
    c->proven = true;
    if (observe) {
        if (!is_get)
            bw_http_reply_error(r, 405, "MethodNotAllowed", "use GET", NULL, -1);
        else
            front.h.get(r, path, query, front.h.arg);
        return;
    }
    if (is_stats) {
        if (m != HTTP_GET)
            bw_http_reply_error(r, 405, "MethodNotAllowed", "use GET /stats", NULL, -1);
        else
            front.h.stats(r, front.h.arg);
        return;
    }
    if (m != HTTP_POST) {
        bw_http_reply_error(r, 405, "MethodNotAllowed", "use POST / with a JSON object", NULL, -1);
        return;
    }
    char err[256];
    msgpack_packer pk;
    msgpack_packer_init(&pk, &r->kwargs, msgpack_sbuffer_write);
    size_t i = 0;
    while (i < c->body.size && strchr(" \t\r\n", c->body.data[i]))
        i++;
    if (i == c->body.size) {
        msgpack_pack_map(&pk, 0); /* no body: no arguments */
    } else if (c->body.data[i] != '{') {
        bw_http_reply_error(r, 400, "BadRequest", "body must be a JSON object", NULL, -1);
        return;
    } else if (bw_json_to_msgpack(c->body.data, c->body.size, &pk, err, sizeof err) < 0) {
        bw_http_reply_error(r, 400, "BadRequest", err, NULL, -1);
        return;
    }
    front.h.call(r, front.h.arg);
}

static int on_message_complete(http_parser *p) {
    struct conn *c = p->data;
    c->phase = C_IDLE;
    c->deadline = 0; /* a request is owed an answer: no clock until it is sent */
    struct bw_http_req *r = req_new(c, http_should_keep_alive(p) != 0);
    if (!r)
        return -1;
    route(c, r, (enum http_method)p->method);
    if (c->pending >= MAX_PIPELINED)
        http_parser_pause(p, 1); /* resume reading when answers drain */
    return 0;
}

/* ---- reading ------------------------------------------------------------------------ */

/* One read buffer for every connection: feed() parses what arrived before on_read
 * returns, and whatever it keeps (URL, headers, body, bytes after a pause) is copied
 * into the connection. libuv never nests read callbacks, so nothing else sees it. A
 * malloc + free of 64 KiB per read is not free: glibc consolidates its fastbins on
 * every free of a chunk that size. */
static char read_buf[64 * 1024];

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    (void)suggested;
    buf->base = read_buf;
    buf->len = sizeof read_buf;
}

static void reject(struct conn *c, int status, const char *type, const char *msg) {
    struct bw_http_req *r = req_new(c, false);
    read_stop(c);
    if (r)
        bw_http_reply_error(r, status, type, msg, NULL, -1);
    else
        conn_close(c);
}

/* Parse what arrived. Parsing pauses when a connection has MAX_PIPELINED unanswered
 * requests; the bytes after that point are kept, not dropped, and parsed on resume. */
static void feed(struct conn *c, const char *data, size_t len) {
    size_t used = http_parser_execute(&c->parser, &front.settings, data, len);
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (c->reject == 401) {
        reject(c, 401, "Unauthorized", "missing or wrong 'Authorization: Bearer <token>'");
    } else if (c->reject) {
        char msg[96];
        snprintf(msg, sizeof msg, "body larger than the limit of %zu bytes", front.opts.max_body);
        reject(c, 413, "PayloadTooLarge", msg);
    } else if (e == HPE_PAUSED) {
        read_stop(c);
        if (used < len) /* paused on the last byte: nothing to keep (and no NULL + 0) */
            msgpack_sbuffer_write(&c->unparsed, data + used, len - used);
    } else if (e != HPE_OK) {
        reject(c, 400, "BadRequest", http_errno_description(e));
    }
}

static void resume_parsing(struct conn *c) {
    if (c->reject) /* refused mid-request: the rest of its bytes are never parsed */
        return;
    if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED) {
        http_parser_pause(&c->parser, 0);
        msgpack_sbuffer rest = c->unparsed;
        msgpack_sbuffer_init(&c->unparsed);
        feed(c, rest.data, rest.size);
        msgpack_sbuffer_destroy(&rest);
        if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED)
            return;
    }
    read_start(c);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    struct conn *c = s->data;
    if (n < 0) {
        read_stop(c);
        /* A half-close (EOF) after pipelined requests still wants their answers. */
        c->eof = n == UV_EOF;
        if (!c->eof || (!c->head && c->write_bytes == 0 && c->unparsed.size == 0))
            conn_close(c);
        return;
    }
    if (n > 0)
        feed(c, buf->base, (size_t)n);
}

/* ---- deadlines and the connection limit --------------------------------------------- */

/* A last word that must not wait: written only if the kernel takes it now, then close. */
static void say_and_close(struct conn *c, int status, const char *type, const char *message) {
    if (!c->head && c->write_bytes == 0) { /* else it would overtake owed answers */
        char body[256], msg[512];
        int blen = snprintf(body, sizeof body, "{\"error\":{\"type\":\"%s\",\"message\":\"%s\"}}",
                            type, message);
        int n = snprintf(msg, sizeof msg, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                         "Content-Length: %d\r\nConnection: close\r\n%s\r\n%s", status,
                         status_text(status), blen, status == 503 ? "Retry-After: 1\r\n" : "",
                         body);
        uv_buf_t b = uv_buf_init(msg, (unsigned)n);
        uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    }
    conn_close(c);
}

/* Slow clients lose their connection: one that trickles its headers (slowloris) or its
 * body would otherwise hold a connection, and its buffers, for as long as it likes. */
static void on_sweep(uv_timer_t *t) {
    (void)t;
    double now = bw_now_ms();
    for (struct conn *c = front.conns; c; c = c->next) {
        if (c->deadline <= 0 || now < c->deadline || uv_is_closing((uv_handle_t *)&c->tcp))
            continue;
        c->deadline = 0;
        if (c->phase == C_IDLE) /* keep-alive idle, or not reading what it was sent */
            conn_close(c);
        else
            say_and_close(c, 408, "RequestTimeout", c->phase == C_HEADERS
                              ? "headers not received in time (--header-timeout)"
                              : "body not received in time (--body-timeout)");
    }
}

/* At --max-connections, the oldest connection that never made an authorized request
 * and is owed nothing makes room: else anyone could open that many idle sockets and
 * lock every client with the token out. False: none (all are proven or busy). */
static bool evict_stranger(const struct conn *newcomer) {
    for (struct conn *c = front.conns; c; c = c->next) {
        if (c == newcomer || c->proven || c->head || c->write_bytes > 0 ||
            uv_is_closing((uv_handle_t *)&c->tcp))
            continue;
        conn_close(c);
        return true;
    }
    return false;
}

static void on_connection(uv_stream_t *server, int status) {
    if (status < 0)
        return;
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    uv_tcp_init(front.loop, &c->tcp);
    c->tcp.data = c;
    msgpack_sbuffer_init(&c->body);
    msgpack_sbuffer_init(&c->unparsed);
    c->prev = front.last;
    if (front.last)
        front.last->next = c;
    else
        front.conns = c;
    front.last = c;
    front.nconns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        conn_close(c);
        return;
    }
    if (front.nconns - front.nclosing > front.opts.max_conns && !evict_stranger(c)) {
        /* Accepted only to be refused: costs one write and a close, and the clients
         * already connected keep their connections. */
        say_and_close(c, 503, "TooManyConnections",
                      "the server has --max-connections connections open; retry later");
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->phase = C_HEADERS; /* the first request's headers are due from now */
    c->deadline = bw_now_ms() + front.opts.header_timeout_s * 1000;
    read_start(c);
}

/* Every connection is a descriptor: raise the soft limit to fit max_conns (as far as the
 * hard limit allows), else lower max_conns, so the limit is ours and not EMFILE's. */
static void fit_fd_limit(void) {
    struct rlimit rl;
    rlim_t want = (rlim_t)front.opts.max_conns + 256; /* + replicas, listeners, pipes */
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= want)
        return;
    rlim_t cur = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
        rl.rlim_cur = cur;
    if (rl.rlim_cur < want) {
        int fit = rl.rlim_cur > 512 ? (int)(rl.rlim_cur - 256) : (int)rl.rlim_cur / 2;
        bw_warn("http: the open-file limit (%llu) leaves room for %d connections, not %d",
                (unsigned long long)rl.rlim_cur, fit, front.opts.max_conns);
        front.opts.max_conns = fit;
    }
}

int bw_http_start(uv_loop_t *loop, int listen_fd, const struct bw_http_options *o,
                  const struct bw_http_handlers *h) {
    front.loop = loop;
    front.opts = *o;
    front.h = *h;
    http_parser_settings_init(&front.settings);
    front.settings.on_message_begin = on_message_begin;
    front.settings.on_url = on_url;
    front.settings.on_header_field = on_header_field;
    front.settings.on_header_value = on_header_value;
    front.settings.on_headers_complete = on_headers_complete;
    front.settings.on_body = on_body;
    front.settings.on_message_complete = on_message_complete;
    fit_fd_limit();
    uv_timer_init(loop, &front.sweep);
    uv_timer_start(&front.sweep, on_sweep, SWEEP_MS, SWEEP_MS);
    uv_unref((uv_handle_t *)&front.sweep);
    int rc = uv_tcp_init(loop, &front.listener);
    if (rc == 0)
        rc = uv_tcp_open(&front.listener, listen_fd);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&front.listener, 1024, on_connection);
    if (rc < 0) {
        bw_error("http: cannot listen: %s", uv_strerror(rc));
        return -1;
    }
    front.listening = true;
    return 0;
}

void bw_http_set_token(const char *token) { front.opts.token = token; }

const char *bw_http_token(void) { return front.opts.token; }

void bw_http_stop(void) {
    front.stopping = true;
    if (front.listening) {
        uv_close((uv_handle_t *)&front.listener, NULL);
        front.listening = false;
    }
}

/* ---- streamed answers --------------------------------------------------------------- */

bool bw_http_req_streaming(const struct bw_http_req *r) { return r->streaming; }

static bool conn_gone(const struct conn *c) {
    return c->closed || uv_is_closing((uv_handle_t *)&c->tcp);
}

/* Only the head of the FIFO writes: a stream behind another answer gathers in sbuf. */
static void stream_flush(struct bw_http_req *r) {
    struct conn *c = r->conn;
    if (c->head != r || r->sbuf.size == 0 || conn_gone(c))
        return;
    size_t len = r->sbuf.size;
    send_bytes(c, msgpack_sbuffer_release(&r->sbuf), len);
}

void bw_http_stream_flush(struct bw_http_req *r) { stream_flush(r); }

static void chunk_put(struct bw_http_req *r, const char *a, size_t alen, const char *b,
                      size_t blen, const char *z, size_t zlen) {
    char size[24];
    int n = snprintf(size, sizeof size, "%zx\r\n", alen + blen + zlen);
    msgpack_sbuffer_write(&r->sbuf, size, (size_t)n);
    msgpack_sbuffer_write(&r->sbuf, a, alen);
    msgpack_sbuffer_write(&r->sbuf, b, blen);
    msgpack_sbuffer_write(&r->sbuf, z, zlen);
    msgpack_sbuffer_write(&r->sbuf, "\r\n", 2);
}

void bw_http_stream_begin(struct bw_http_req *r, const char *task_id, double wait_ms,
                          bw_http_stream_fn cb, void *arg) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n"
                     "Cache-Control: no-cache\r\n",
                     r->sse ? "text/event-stream" : "application/x-ndjson");
    msgpack_sbuffer_write(&r->sbuf, head, (size_t)n);
    if (task_id && *task_id) {
        n = snprintf(head, sizeof head, "X-Task-ID: %s\r\n", task_id);
        msgpack_sbuffer_write(&r->sbuf, head, (size_t)n);
    }
    if (wait_ms >= 0) {
        n = snprintf(head, sizeof head, "X-Beam-Wait-Ms: %.1f\r\n", wait_ms);
        msgpack_sbuffer_write(&r->sbuf, head, (size_t)n);
    }
    if (!r->keep_alive)
        msgpack_sbuffer_write(&r->sbuf, "Connection: close\r\n", 19);
    msgpack_sbuffer_write(&r->sbuf, "\r\n", 2);
    r->streaming = true;
    r->stream_cb = cb;
    r->stream_arg = arg;
}

long bw_http_stream_chunk(struct bw_http_req *r, const char *json, size_t len) {
    struct conn *c = r->conn;
    if (conn_gone(c))
        return -1;
    if (r->sse)
        chunk_put(r, "data: ", 6, json, len, "\n\n", 2);
    else
        chunk_put(r, "", 0, json, len, "\n", 1);
    size_t owed = r->sbuf.size + (c->head == r ? c->write_bytes : 0);
    r->over = owed > BW_HTTP_STREAM_HIGH;
    return (long)owed;
}

void bw_http_stream_end(struct bw_http_req *r, const char *error_type, const char *message) {
    if (error_type) {
        msgpack_sbuffer e;
        error_body(&e, error_type, message);
        if (r->sse)
            chunk_put(r, "event: error\ndata: ", 19, e.data, e.size, "\n\n", 2);
        else
            chunk_put(r, "", 0, e.data, e.size, "\n", 1);
        msgpack_sbuffer_destroy(&e);
    }
    msgpack_sbuffer_write(&r->sbuf, "0\r\n\r\n", 5);
    stream_flush(r);
    r->streaming = false;
    r->stream_cb = NULL;
    msgpack_sbuffer rest = r->sbuf; /* still owed when another answer is ahead of it */
    msgpack_sbuffer_init(&r->sbuf);
    finish(r, &rest);
}

/* The client read down to a quarter of the bound: the paused source may go on. */
static void stream_drained(struct conn *c) {
    struct bw_http_req *r = c->head;
    if (r && r->streaming && r->over && r->stream_cb &&
        c->write_bytes < BW_HTTP_STREAM_HIGH / 4) {
        r->over = false;
        r->stream_cb(r, r->stream_arg, false);
    }
}

/* The connection closed under open streams: each owner is told once, and ends its
 * stream (which may free the request) while the pending count keeps c alive. */
static void streams_gone(struct conn *c) {
    c->pending++;
    for (;;) {
        struct bw_http_req *r = c->head;
        while (r && !(r->streaming && r->stream_cb))
            r = r->next;
        if (!r)
            break;
        bw_http_stream_fn cb = r->stream_cb;
        r->stream_cb = NULL;
        cb(r, r->stream_arg, true);
    }
    c->pending--;
}
