/* log.c - logging. Writes whole lines with one write(2) so that lines from the
 * supervisor, the host and its workers never interleave mid-line. */
#define _GNU_SOURCE
#include "log.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *log_who = "beam";
static int log_json;
static int log_min = BW_LOG_INFO;
static void (*log_sink)(const char *line, size_t len);

void bw_log_set_sink(void (*sink)(const char *line, size_t len)) { log_sink = sink; }

bool bw_log_json(void) { return log_json != 0; }

void bw_log_init(const char *who, int json) {
    log_who = who;
    log_json = json;
    const char *lvl = getenv("BEAM_LOG_LEVEL"); /* again after a restore: today's level */
    log_min = lvl && strcmp(lvl, "debug") == 0 ? BW_LOG_DEBUG : BW_LOG_INFO;
}

static const char *level_name(enum bw_log_level l) {
    switch (l) {
    case BW_LOG_DEBUG: return "debug";
    case BW_LOG_INFO: return "info";
    case BW_LOG_WARN: return "warning";
    default: return "error";
    }
}

/* Escape for a JSON string value; truncates rather than overflows. */
static size_t json_escape(char *dst, size_t cap, const char *src) {
    size_t o = 0;
    for (; *src && o + 7 < cap; src++) {
        unsigned char c = (unsigned char)*src;
        if (c == '"' || c == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(dst + o, cap - o, "\\u%04x", c);
        } else {
            dst[o++] = (char)c;
        }
    }
    dst[o] = '\0';
    return o;
}

void bw_log(enum bw_log_level level, const char *fmt, ...) {
    if ((int)level < log_min)
        return;
    char msg[2048], line[4200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int n;
    if (log_json) {
        char esc[4100];
        json_escape(esc, sizeof esc, msg);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        n = snprintf(line, sizeof line,
                     "{\"ts\":%lld.%03ld,\"level\":\"%s\",\"who\":\"%s\",\"pid\":%d,\"msg\":\"%s\"}\n",
                     (long long)ts.tv_sec, ts.tv_nsec / 1000000, level_name(level), log_who,
                     (int)getpid(), esc);
    } else if (level >= BW_LOG_WARN) {
        n = snprintf(line, sizeof line, "%s: %s: %s\n", log_who, level_name(level), msg);
    } else {
        n = snprintf(line, sizeof line, "%s: %s\n", log_who, msg);
    }
    if (n > (int)sizeof line - 1)
        n = (int)sizeof line - 1;
    if (log_sink)
        log_sink(line, (size_t)n);
    else if (write(STDERR_FILENO, line, (size_t)n) < 0) {
        /* nowhere left to report it */
    }
}
