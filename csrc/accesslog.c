/* accesslog.c - the access log line (see accesslog.h).
 *
 * Paths come from clients: in JSON they are escaped, in text they are cut at the first
 * byte a terminal or a log parser could misread (control characters, spaces), so one
 * request is always exactly one line of the expected shape. */
#define _GNU_SOURCE
#include "accesslog.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "json.h"

static void safe_path(char *dst, size_t cap, const char *src) {
    size_t o = 0;
    for (; *src && o + 1 < cap; src++) {
        unsigned char c = (unsigned char)*src;
        dst[o++] = c <= 0x20 || c == 0x7f || c == '"' ? '?' : (char)c;
    }
    dst[o] = '\0';
}

void bw_access_log(bool json, const char *method, const char *path, int status, double ms,
                   const char *task_id) {
    char p[300], line[768];
    int n;
    safe_path(p, sizeof p, *path ? path : "-");
    const char *tid = task_id && *task_id ? task_id : "-";
    if (json) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        /* safe_path left no quote, backslash escapes aside: escape those */
        msgpack_sbuffer esc;
        msgpack_sbuffer_init(&esc);
        bw_json_append_str(&esc, p, strlen(p));
        n = snprintf(line, sizeof line,
                     "{\"ts\":%lld.%03ld,\"level\":\"info\",\"who\":\"beam\",\"pid\":%d,"
                     "\"event\":\"access\",\"method\":\"%s\",\"path\":%.*s,\"status\":%d,"
                     "\"ms\":%.3f,\"task_id\":\"%s\"}\n",
                     (long long)ts.tv_sec, ts.tv_nsec / 1000000, (int)getpid(), method,
                     (int)esc.size, esc.data, status, ms, tid);
        msgpack_sbuffer_destroy(&esc);
    } else {
        n = snprintf(line, sizeof line, "beam: access %s %s %d %.1fms task=%s\n", method, p,
                     status, ms, tid);
    }
    if (n > (int)sizeof line - 1)
        n = (int)sizeof line - 1;
    if (write(STDERR_FILENO, line, (size_t)n) < 0) {
        /* nowhere left to report it */
    }
}
