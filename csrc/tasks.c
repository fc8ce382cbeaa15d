/* tasks.c - rings of recent calls and replica starts (see tasks.h).
 *
 * Both are arrays allocated once and overwritten oldest first, so memory stays flat
 * however many calls are made. Lookups scan: the ring is small next to the work of an
 * HTTP request (1000 entries by default), and a scan keeps no index to get wrong. */
#define _GNU_SOURCE
#include "tasks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json.h"
#include "mp.h"
#include "util.h"

#define STARTS 256 /* starts are rare (scale events): this covers a long history */

struct task {
    char id[BW_TASK_ID_MAX];
    int http_status;
    int replica, started;
    bool from_zero;
    double arrival;      /* bw_now_ms() */
    double arrived_unix; /* wall clock, ms since the epoch: for people */
    double queued_ms, run_ms;
};

static struct {
    struct task *ring;
    size_t cap, next;          /* next slot to write */
    unsigned long long added;  /* ever */
    struct bw_start starts[STARTS];
    size_t next_start;
} history;

int bw_tasks_init(size_t capacity) {
    if (capacity < 1)
        capacity = 1;
    history.ring = calloc(capacity, sizeof *history.ring);
    if (!history.ring)
        return -1;
    history.cap = capacity;
    return 0;
}

size_t bw_tasks_capacity(void) { return history.cap; }

static double unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

const char *bw_tasks_add(const struct bw_task_rec *rec) {
    if (!history.ring)
        return rec->id;
    struct task *t = &history.ring[history.next];
    history.next = (history.next + 1) % history.cap;
    history.added++;
    memset(t, 0, sizeof *t);
    if (rec->id && *rec->id) {
        snprintf(t->id, sizeof t->id, "%s", rec->id);
    } else { /* answered before any replica gave it one (429, 503, ...) */
        char id[BW_ID_LEN];
        bw_id_new(id);
        snprintf(t->id, sizeof t->id, "%s", id);
    }
    t->http_status = rec->http_status;
    t->replica = rec->replica;
    t->started = rec->started;
    t->from_zero = rec->from_zero;
    t->arrival = rec->arrival;
    t->arrived_unix = unix_ms() - (bw_now_ms() - rec->arrival);
    t->queued_ms = rec->queued_ms;
    t->run_ms = rec->run_ms;
    return t->id;
}

const char *bw_task_status(int s) {
    switch (s) {
    case 200: return "ok";
    case 400: return "bad_request";
    case 413: return "too_large";
    case 429: return "rejected";
    case 500: return "error";
    case 502: return "lost";
    case 503: return "unavailable";
    case 504: return "timeout";
    default: return s < 400 ? "ok" : "other";
    }
}

/* ---- starts --------------------------------------------------------------------------- */

void bw_tasks_start_begin(int replica, const char *mode, double t0) {
    struct bw_start *s = &history.starts[history.next_start];
    history.next_start = (history.next_start + 1) % STARTS;
    memset(s, 0, sizeof *s);
    s->replica = replica;
    snprintf(s->mode, sizeof s->mode, "%s", mode);
    s->t0 = t0;
}

static struct bw_start *find_start(int replica) {
    for (size_t i = 0; i < STARTS; i++)
        if (history.starts[i].replica == replica && replica > 0)
            return &history.starts[i];
    return NULL;
}

const struct bw_start *bw_tasks_start_of(int replica) { return find_start(replica); }

static void add_phase(struct bw_start *s, const char *name, size_t len, double ms) {
    if (s->nphases == BW_START_PHASES)
        return;
    struct bw_start_phase *p = &s->phases[s->nphases++];
    snprintf(p->name, sizeof p->name, "%.*s", (int)len, name);
    p->ms = ms;
}

/* Phases are the profile's "<name>_ms" entries in the order the host and supervisor
 * wrote them (their order in time). What they do not cover, from the start to the host
 * running (clone/exec, or CRIU's own setup, and the control round trips), is "spawn",
 * first. ready_ms is the total, not a phase. */
const struct bw_start *bw_tasks_start_ready(int replica, const msgpack_object *p) {
    struct bw_start *s = find_start(replica);
    if (!s || !p || p->type != MSGPACK_OBJECT_MAP)
        return s;
    s->nphases = 0;
    add_phase(s, "spawn", 5, 0);
    double sum = 0;
    for (uint32_t i = 0; i < p->via.map.size; i++) {
        const msgpack_object_kv *kv = &p->via.map.ptr[i];
        if (kv->key.type != MSGPACK_OBJECT_STR)
            continue;
        const char *k = kv->key.via.str.ptr;
        size_t kl = kv->key.via.str.size;
        double v = bw_mp_num(&kv->val, 0);
        if (kl == 11 && memcmp(k, "image_bytes", 11) == 0)
            s->image_bytes = (unsigned long long)v;
        else if (kl == 8 && memcmp(k, "ready_ms", 8) == 0)
            s->ready_ms = v;
        else if (kl > 3 && memcmp(k + kl - 3, "_ms", 3) == 0) {
            add_phase(s, k, kl - 3, v);
            sum += v;
        }
    }
    s->phases[0].ms = s->ready_ms > sum ? s->ready_ms - sum : 0;
    s->ready = true;
    return s;
}

/* ---- JSON ----------------------------------------------------------------------------- */

static void start_json(msgpack_sbuffer *b, const struct task *t) {
    const struct bw_start *s = find_start(t->started);
    if (!s || !s->ready) { /* not serving yet, or gone from the start ring */
        bw_mp_printf(b, "null");
        return;
    }
    bw_mp_printf(b, "{\"replica\":%d,\"mode\":\"%s\",\"offset_ms\":%.3f,\"ready_ms\":%.3f,"
        "\"queue_wait_ms\":%.3f,\"image_bytes\":%llu,\"phases\":[", s->replica, s->mode,
        s->t0 - t->arrival, s->ready_ms, t->queued_ms, s->image_bytes);
    for (int i = 0; i < s->nphases; i++) {
        bw_mp_printf(b, "%s{\"name\":", i ? "," : "");
        bw_json_append_str(b, s->phases[i].name, strlen(s->phases[i].name));
        bw_mp_printf(b, ",\"ms\":%.3f}", s->phases[i].ms);
    }
    bw_mp_printf(b, "]}");
}

static void task_json(msgpack_sbuffer *b, const struct task *t) {
    bw_mp_printf(b, "{\"id\":");
    bw_json_append_str(b, t->id, strlen(t->id));
    bw_mp_printf(b, ",\"status\":\"%s\",\"http_status\":%d,\"replica\":", bw_task_status(t->http_status),
        t->http_status);
    bw_mp_printf(b, t->replica ? "%d" : "null", t->replica);
    bw_mp_printf(b, ",\"arrived_unix_ms\":%.3f,\"queued_ms\":%.3f,\"run_ms\":%.3f,\"total_ms\":%.3f,"
        "\"woke_from_zero\":%s,\"started_replica\":", t->arrived_unix, t->queued_ms, t->run_ms,
        t->queued_ms + t->run_ms, t->from_zero ? "true" : "false");
    bw_mp_printf(b, t->started ? "%d" : "null", t->started);
    bw_mp_printf(b, ",\"start\":");
    if (t->started)
        start_json(b, t);
    else
        bw_mp_printf(b, "null");
    bw_mp_printf(b, "}");
}

/* i-th newest entry, i < min(added, cap) */
static const struct task *nth_newest(size_t i) {
    return &history.ring[(history.next + history.cap - 1 - i) % history.cap];
}

static size_t held(void) {
    return history.added < history.cap ? (size_t)history.added : history.cap;
}

void bw_tasks_json_list(msgpack_sbuffer *out, size_t limit) {
    size_t n = held();
    if (limit < n)
        n = limit;
    bw_mp_printf(out, "{\"capacity\":%zu,\"recorded\":%llu,\"tasks\":[", history.cap, history.added);
    for (size_t i = 0; i < n; i++) {
        if (i)
            bw_mp_printf(out, ",");
        task_json(out, nth_newest(i));
    }
    bw_mp_printf(out, "]}");
}

bool bw_tasks_json_one(msgpack_sbuffer *out, const char *id) {
    for (size_t i = 0, n = held(); i < n; i++) {
        const struct task *t = nth_newest(i);
        if (strcmp(t->id, id) == 0) {
            task_json(out, t);
            return true;
        }
    }
    return false;
}
