/* tasks.h - the supervisor's memory of recent HTTP calls and replica starts.
 *
 * A ring of the last N answered calls (--task-history, allocated once: it never grows)
 * and a smaller ring of replica starts with their phases, which a call that caused a
 * start points to. Read as JSON by GET /tasks and GET /tasks/<id> (docs/http.md). */
#ifndef BW_TASKS_H
#define BW_TASKS_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

#define BW_TASKS_DEFAULT 1000
#define BW_TASKS_MAX 1000000
#define BW_TASK_ID_MAX 64
#define BW_START_PHASES 16

/* One answered call, as observe.c hands it in. */
struct bw_task_rec {
    const char *id;     /* X-Task-ID; NULL or "": the ring makes one */
    int http_status;
    int replica;        /* id of the replica that answered it, 0: none */
    int started;        /* id of the replica its arrival started, 0: none */
    bool from_zero;     /* ... while none was running */
    double arrival;     /* bw_now_ms() */
    double queued_ms;   /* waiting for a replica (includes a start it waited for) */
    double run_ms;      /* dispatched to answered */
};

struct bw_start_phase {
    char name[32];
    double ms;
};

/* A replica start and, once it serves, its phases in start order. */
struct bw_start {
    int replica;
    char mode[16];       /* cold, restore, fallback */
    double t0;           /* bw_now_ms() at the start */
    bool ready;
    double ready_ms;     /* start to serving */
    unsigned long long image_bytes;
    int nphases;
    struct bw_start_phase phases[BW_START_PHASES];
};

int bw_tasks_init(size_t capacity);
size_t bw_tasks_capacity(void);
/* The id the call is kept under (rec->id, or the one made for it). */
const char *bw_tasks_add(const struct bw_task_rec *rec);

void bw_tasks_start_begin(int replica, const char *mode, double t0);
/* The replica serves; profile: its start profile (msgpack map of "<phase>_ms", "mode",
 * "ready_ms", ...). Returns the completed record, NULL if the start was not seen. */
const struct bw_start *bw_tasks_start_ready(int replica, const msgpack_object *profile);
const struct bw_start *bw_tasks_start_of(int replica);

/* ok, bad_request, too_large, rejected, error, lost, unavailable, timeout, other */
const char *bw_task_status(int http_status);

/* {"capacity":N,"recorded":M,"tasks":[newest first, at most limit]} */
void bw_tasks_json_list(msgpack_sbuffer *out, size_t limit);
/* One task's object; false if the ring does not hold it (any more). */
bool bw_tasks_json_one(msgpack_sbuffer *out, const char *id);

#endif
