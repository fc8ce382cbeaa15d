/* http.h - the HTTP/1.1 front (supervisor side).
 *
 * Parses requests with http-parser, enforces auth and body limits, turns JSON bodies
 * into msgpack kwargs and writes responses in request order (keep-alive and pipelining).
 * What to do with a call is the router's business: it gets the request and answers it
 * later with bw_http_reply*, even if the client has gone away meanwhile. */
#ifndef BW_HTTP_H
#define BW_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

struct bw_http_req;

struct bw_http_handlers {
    void (*call)(struct bw_http_req *req, void *arg);  /* POST / */
    void (*stats)(struct bw_http_req *req, void *arg); /* GET /stats */
    /* Observability (csrc/observe.c), all optional. owns: whether a GET path is served by
     * get (else 404); get runs once the request is authorized. done: every response, as
     * it is answered (access log, metrics, the task ring). */
    bool (*owns)(const char *path);
    void (*get)(struct bw_http_req *req, const char *path, const char *query, void *arg);
    void (*done)(struct bw_http_req *req, int status, const char *task_id, double wait_ms,
                 void *arg);
    void *arg;
};

/* What the supervisor learns about a call on its way, read by `done`: the router sets
 * owner when it dispatches the call, the supervisor `started` when its arrival started a
 * replica. */
struct bw_http_trace {
    bool call;        /* handed to the router: an authorized endpoint call */
    void *owner;      /* replica the call was sent to (router owner), NULL: none */
    int started;      /* id of the replica this call's arrival started, 0: none */
    bool from_zero;   /* ... while no replica was running */
};

struct bw_http_options {
    size_t max_body;   /* larger bodies: 413 */
    const char *token; /* required bearer token; NULL: no auth (--no-auth) */
    double header_timeout_s; /* request line + headers, from its first byte (or accept) */
    double body_timeout_s;   /* the whole body, from the end of the headers */
    double idle_timeout_s;   /* keep-alive connection with nothing owed */
    int max_conns;           /* open connections; beyond: 503 and close */
};

int bw_http_start(uv_loop_t *loop, int listen_fd, const struct bw_http_options *o,
                  const struct bw_http_handlers *h);
/* Stop accepting; requests already handed on are still answered, every later one on an
 * open connection gets 503 ShuttingDown with Connection: close. */
void bw_http_stop(void);
/* Change the required token (NULL: none), e.g. when the endpoint says authorized=False. */
void bw_http_set_token(const char *token);
const char *bw_http_token(void); /* NULL: none */

/* The request's kwargs: a packed msgpack map. */
const char *bw_http_req_kwargs(const struct bw_http_req *r, size_t *len);
double bw_http_req_arrival(const struct bw_http_req *r); /* bw_now_ms() at parse time */
struct bw_http_trace *bw_http_req_trace(struct bw_http_req *r);
const char *bw_http_req_method(const struct bw_http_req *r); /* "GET", ...; "-" if unparsed */
const char *bw_http_req_path(const struct bw_http_req *r);   /* without the query; "" */
/* A GET /dashboard?token=<valid token> visit (observe.c answers it with a cookie). */
bool bw_http_req_token_login(const struct bw_http_req *r);

/* Answer with a JSON body. task_id (may be NULL) goes into X-Task-ID; wait_ms >= 0 into
 * X-Beam-Wait-Ms (time spent waiting for a replica). The request is freed. */
void bw_http_reply(struct bw_http_req *r, int status, const char *json, size_t len,
                   const char *task_id, double wait_ms);
/* Any body: content_type, and extra (NULL or whole "Name: value\r\n" lines). */
void bw_http_reply_raw(struct bw_http_req *r, int status, const char *content_type,
                       const char *extra, const char *body, size_t len);
/* {"error": {"type": ..., "message": ...}} */
void bw_http_reply_error(struct bw_http_req *r, int status, const char *type,
                         const char *message, const char *task_id, double wait_ms);

/* ---- streamed answers (a generator handler; docs/http.md "Streaming") ----------------
 * Chunked transfer: Server-Sent Events when the request accepted text/event-stream, else
 * newline-delimited JSON. The caller pauses its source while a chunk call returns more
 * than BW_HTTP_STREAM_HIGH; cb(gone=false) says the client has read down to a quarter
 * of it, cb(gone=true) that the connection closed (the stream must still be ended). */
#define BW_HTTP_STREAM_HIGH (1024u * 1024u)
typedef void (*bw_http_stream_fn)(struct bw_http_req *r, void *arg, bool gone);

void bw_http_stream_begin(struct bw_http_req *r, const char *task_id, double wait_ms,
                          bw_http_stream_fn cb, void *arg);
/* One chunk, a JSON value. Returns the bytes not yet written to the client, or -1 once
 * it is gone. Chunks are gathered until bw_http_stream_flush. */
long bw_http_stream_chunk(struct bw_http_req *r, const char *json, size_t len);
void bw_http_stream_flush(struct bw_http_req *r);
/* The last chunk; error_type non-NULL: an error event first. The request is freed.
 * bw_http_reply_error on a streaming request ends it this way. */
void bw_http_stream_end(struct bw_http_req *r, const char *error_type, const char *message);
bool bw_http_req_streaming(const struct bw_http_req *r);

#endif
