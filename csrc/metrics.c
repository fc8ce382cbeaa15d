/* metrics.c - counters and histograms for GET /metrics (see metrics.h).
 *
 * Plain arrays, no allocation after start: an observation is a few additions on the
 * event loop. Label values come from fixed lists (statuses, modes, reasons) or small
 * bounded tables (HTTP codes, start phases), so no client can grow the series set. */
#define _GNU_SOURCE
#include "metrics.h"

#include <stdio.h>
#include <string.h>

#include "mp.h"

/* Seconds: from a fast call (1 ms) to a slow cold start (2 min). */
static const double BOUNDS[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                1, 2.5, 5, 10, 30, 60, 120};
#define NB (sizeof BOUNDS / sizeof *BOUNDS)

struct hist {
    unsigned long long bucket[NB]; /* not cumulative; summed when written */
    unsigned long long count;
    double sum;
};

static const char *const STATUSES[] = {"ok", "bad_request", "too_large", "rejected", "error",
                                       "lost", "unavailable", "timeout", "other"};
#define NSTATUS (sizeof STATUSES / sizeof *STATUSES)
static const char *const MODES[] = {"cold", "restore", "fallback"};
#define NMODE 3
static const char *const REASONS[] = {"unusable", "gpu_incompatible", "criu", "gpu_restore",
                                      "exited"};
#define NREASON (sizeof REASONS / sizeof *REASONS)
#define MAX_PHASE_SERIES 64

struct phase_series {
    int mode;
    char phase[32];
    struct hist h;
};

static struct {
    unsigned long long requests[NSTATUS];
    unsigned long long http[600];
    struct hist queue, run;
    unsigned long long starts[NMODE];
    struct hist start[NMODE];
    struct phase_series phases[MAX_PHASE_SERIES];
    int nphases;
    unsigned long long dumps_ok, dumps_failed;
    struct hist dump;
    unsigned long long image_bytes;
    unsigned long long restore_failures[NREASON];
} metrics;

static void observe(struct hist *h, double seconds) {
    if (seconds < 0)
        seconds = 0;
    for (size_t i = 0; i < NB; i++)
        if (seconds <= BOUNDS[i]) {
            h->bucket[i]++;
            break;
        }
    h->count++;
    h->sum += seconds;
}

static int index_of(const char *const *names, size_t n, const char *s) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], s) == 0)
            return (int)i;
    return -1;
}

void bw_metrics_call(int http_status, double queued_ms, double run_ms, bool dispatched) {
    int i = index_of(STATUSES, NSTATUS, bw_task_status(http_status));
    metrics.requests[i < 0 ? (int)NSTATUS - 1 : i]++;
    if (queued_ms >= 0)
        observe(&metrics.queue, queued_ms / 1000);
    if (dispatched)
        observe(&metrics.run, run_ms / 1000);
}

void bw_metrics_http(int code) {
    if (code >= 100 && code < 600)
        metrics.http[code]++;
}

void bw_metrics_start(const char *mode) {
    int i = index_of(MODES, NMODE, mode);
    if (i >= 0)
        metrics.starts[i]++;
}

static struct hist *phase_hist(int mode, const char *phase) {
    for (int i = 0; i < metrics.nphases; i++)
        if (metrics.phases[i].mode == mode && strcmp(metrics.phases[i].phase, phase) == 0)
            return &metrics.phases[i].h;
    if (metrics.nphases == MAX_PHASE_SERIES)
        return NULL;
    struct phase_series *p = &metrics.phases[metrics.nphases++];
    p->mode = mode;
    snprintf(p->phase, sizeof p->phase, "%s", phase);
    return &p->h;
}

void bw_metrics_start_ready(const struct bw_start *s) {
    int mode = index_of(MODES, NMODE, s->mode);
    if (mode < 0)
        return;
    observe(&metrics.start[mode], s->ready_ms / 1000);
    for (int i = 0; i < s->nphases; i++) {
        struct hist *h = phase_hist(mode, s->phases[i].name);
        if (h)
            observe(h, s->phases[i].ms / 1000);
    }
    if (s->image_bytes)
        metrics.image_bytes = s->image_bytes;
}

void bw_metrics_dump(bool ok, unsigned long long bytes, double ms) {
    if (!ok) {
        metrics.dumps_failed++;
        return;
    }
    metrics.dumps_ok++;
    observe(&metrics.dump, ms / 1000);
    metrics.image_bytes = bytes;
}

void bw_metrics_image_bytes(unsigned long long bytes) { metrics.image_bytes = bytes; }
unsigned long long bw_metrics_image_bytes_now(void) { return metrics.image_bytes; }

void bw_metrics_restore_failure(const char *reason) {
    int i = index_of(REASONS, NREASON, reason);
    if (i >= 0)
        metrics.restore_failures[i]++;
}

/* ---- exposition ------------------------------------------------------------------------ */

void bw_metrics_family(msgpack_sbuffer *out, const char *name, const char *type,
                       const char *help) {
    bw_mp_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* labels: "" or `a="x",b="y"` (no braces) */
static void write_hist(msgpack_sbuffer *out, const char *name, const char *labels,
                       const struct hist *h) {
    const char *sep = *labels ? "," : "";
    unsigned long long cum = 0;
    for (size_t i = 0; i < NB; i++) {
        cum += h->bucket[i];
        bw_mp_printf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, BOUNDS[i], cum);
    }
    bw_mp_printf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep, h->count);
    const char *ob = *labels ? "{" : "", *cb = *labels ? "}" : "";
    bw_mp_printf(out, "%s_sum%s%s%s %.6f\n", name, ob, labels, cb, h->sum);
    bw_mp_printf(out, "%s_count%s%s%s %llu\n", name, ob, labels, cb, h->count);
}

static void write_calls(msgpack_sbuffer *out) {
    bw_metrics_family(out, "beam_requests_total", "counter",
                      "Endpoint calls (POST /) answered, by outcome.");
    for (size_t i = 0; i < NSTATUS; i++)
        bw_mp_printf(out, "beam_requests_total{status=\"%s\"} %llu\n", STATUSES[i],
                       metrics.requests[i]);
    bw_metrics_family(out, "beam_request_queue_duration_seconds", "histogram",
                      "Time a call waited for a replica, a start it waited for included.");
    write_hist(out, "beam_request_queue_duration_seconds", "", &metrics.queue);
    bw_metrics_family(out, "beam_request_run_duration_seconds", "histogram",
                      "Time from handing a call to a replica to its answer.");
    write_hist(out, "beam_request_run_duration_seconds", "", &metrics.run);
    bw_metrics_family(out, "beam_http_responses_total", "counter",
                      "HTTP responses of the front, by status code.");
    for (int c = 100; c < 600; c++)
        if (metrics.http[c])
            bw_mp_printf(out, "beam_http_responses_total{code=\"%d\"} %llu\n", c,
                           metrics.http[c]);
}

static void write_starts(msgpack_sbuffer *out) {
    char labels[96];
    bw_metrics_family(out, "beam_replica_starts_total", "counter",
                      "Replica starts: cold boot, restore from the checkpoint, or cold boot "
                      "after a failed restore (fallback).");
    for (int i = 0; i < NMODE; i++)
        bw_mp_printf(out, "beam_replica_starts_total{mode=\"%s\"} %llu\n", MODES[i],
                       metrics.starts[i]);
    bw_metrics_family(out, "beam_replica_start_duration_seconds", "histogram",
                      "Time from a replica's start to serving.");
    for (int i = 0; i < NMODE; i++) {
        snprintf(labels, sizeof labels, "mode=\"%s\"", MODES[i]);
        write_hist(out, "beam_replica_start_duration_seconds", labels, &metrics.start[i]);
    }
    bw_metrics_family(out, "beam_replica_start_phase_duration_seconds", "histogram",
                      "Duration of each phase of a replica start (its start profile).");
    for (int i = 0; i < metrics.nphases; i++) {
        snprintf(labels, sizeof labels, "mode=\"%s\",phase=\"%s\"", MODES[metrics.phases[i].mode],
                 metrics.phases[i].phase);
        write_hist(out, "beam_replica_start_phase_duration_seconds", labels, &metrics.phases[i].h);
    }
    bw_metrics_family(out, "beam_restore_failures_total", "counter",
                      "Restores from the checkpoint that failed, by reason.");
    for (size_t i = 0; i < NREASON; i++)
        bw_mp_printf(out, "beam_restore_failures_total{reason=\"%s\"} %llu\n", REASONS[i],
                       metrics.restore_failures[i]);
}

static void write_checkpoint(msgpack_sbuffer *out) {
    bw_metrics_family(out, "beam_checkpoint_dumps_total", "counter", "Checkpoint dumps, by result.");
    bw_mp_printf(out, "beam_checkpoint_dumps_total{result=\"ok\"} %llu\n", metrics.dumps_ok);
    bw_mp_printf(out, "beam_checkpoint_dumps_total{result=\"failed\"} %llu\n",
                   metrics.dumps_failed);
    bw_metrics_family(out, "beam_checkpoint_dump_duration_seconds", "histogram",
                      "Duration of successful checkpoint dumps.");
    write_hist(out, "beam_checkpoint_dump_duration_seconds", "", &metrics.dump);
    bw_metrics_family(out, "beam_checkpoint_size_bytes", "gauge",
                      "Size of the checkpoint image last dumped or restored (0: none seen).");
    bw_mp_printf(out, "beam_checkpoint_size_bytes %llu\n", metrics.image_bytes);
}

void bw_metrics_write(msgpack_sbuffer *out) {
    write_calls(out);
    write_starts(out);
    write_checkpoint(out);
}
