/* progress.c - a progress line for a dump or restore that takes a while.
 *
 * A CRIU call blocks the thread that made it; the watchdog thread that bounds it
 * (checkpoint.c) measures the bytes done about four times a second and calls
 * bw_progress_update. Nothing shows for the first second: most calls are over by then.
 * On a terminal the line is redrawn in place; with --json-logs each update is one JSON
 * event. Written straight to stderr from that thread, and only when a write cannot
 * block (poll says writable): an update is worth less than never stalling. */
#define _GNU_SOURCE
#include "progress.h"

#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

#define QUIET_MS 1000.0

void bw_progress_begin(struct bw_progress *p, const char *what, unsigned long long total) {
    memset(p, 0, sizeof *p);
    p->what = what;
    p->total = total;
    p->t0 = bw_now_ms();
    p->tty = isatty(STDERR_FILENO) == 1;
}

static void emit(const char *line, int n) {
    struct pollfd pf = {.fd = STDERR_FILENO, .events = POLLOUT};
    if (n > 0 && poll(&pf, 1, 0) == 1 && (pf.revents & POLLOUT) && write(STDERR_FILENO, line, (size_t)n) < 0) {
        /* stderr is gone: nothing to report to */
    }
}

void bw_progress_update(struct bw_progress *p, unsigned long long done) {
    double ms = bw_now_ms() - p->t0;
    bool json = bw_log_json();
    if (ms < QUIET_MS || (!p->tty && !json))
        return;
    double rate = ms > 0 ? (double)done / (ms / 1000.0) : 0;
    char line[256];
    int n;
    if (json)
        n = snprintf(line, sizeof line,
                     "{\"ts\":%.3f,\"level\":\"info\",\"who\":\"beam\",\"event\":\"progress\","
                     "\"what\":\"%s\",\"done_bytes\":%llu,\"total_bytes\":%llu,"
                     "\"bytes_per_s\":%.0f,\"elapsed_s\":%.2f}\n",
                     (double)time(NULL), p->what, done, p->total, rate, ms / 1000.0);
    else
        n = snprintf(line, sizeof line, "\rbeam: %s %.1f / %.1f MiB (%.2f GB/s)\033[K", p->what,
                     (double)done / 1048576.0, (double)p->total / 1048576.0, rate / 1e9);
    p->shown = true;
    emit(line, n < (int)sizeof line ? n : (int)sizeof line - 1);
}

void bw_progress_end(struct bw_progress *p) {
    if (p->shown && p->tty && !bw_log_json())
        emit("\n", 1);
}
