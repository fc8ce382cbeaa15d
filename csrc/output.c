/* output.c - non-blocking, bounded writes to our stdout and stderr.
 *
 * Our fds 1 and 2 usually share their open file description with the process that
 * started us, so setting O_NONBLOCK on them would change that process's files too.
 * Instead each stream gets a way to write that cannot wait:
 *   a pipe or a terminal: reopened through /proc/self/fd/N with O_NONBLOCK, a new open
 *     file description of the same pipe or device, whose flags are ours alone;
 *   a socket (e.g. the journal's stdout stream): send() with MSG_DONTWAIT;
 *   a regular file: plain write(2), which never waits for a reader.
 * If a reopen fails, writes are made only when poll(2) says the stream is writable and
 * at most PIPE_BUF bytes at a time, which a pipe then takes without waiting.
 *
 * The queue and its retry timer belong to the loop thread. A job thread (job.h) that logs
 * gets one write that cannot wait and nothing queued: what does not fit is counted as
 * dropped and added to the loop's count when the loop next retries a write. */
#define _GNU_SOURCE
#include "output.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

#define RETRY_MS 20 /* how often a stream that would block is tried again */

enum way { W_PLAIN, W_NONBLOCK, W_SEND, W_POLL };

struct sink {
    int fd;
    enum way way;
    char *buf; /* queued bytes, in order */
    size_t len, cap;
    unsigned long long dropped; /* since the last note about it */
};

static struct {
    uv_loop_t *loop;
    uv_timer_t retry;
    bool ready, retrying;
    pthread_t loop_thread;
    struct sink s[3]; /* indexed by fd: 1 and 2 */
    unsigned long long dropped_off_loop[3]; /* by job threads; atomic adds */
} sinks;

static void sink_open(struct sink *s, int fd) {
    struct stat st;
    s->fd = fd;
    s->way = W_PLAIN;
    if (fstat(fd, &st) < 0 || S_ISREG(st.st_mode))
        return;
    if (S_ISSOCK(st.st_mode)) {
        s->way = W_SEND;
        return;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int nfd = open(path, O_WRONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (nfd >= 0) {
        s->fd = nfd;
        s->way = W_NONBLOCK;
    } else {
        s->way = W_POLL;
    }
}

/* One write that does not wait: bytes written, 0 when it would block, -1 when the
 * stream is gone (its reader closed it): then the output has nowhere to go. */
static ssize_t try_write(struct sink *s, const char *data, size_t len) {
    ssize_t n;
    if (s->way == W_POLL) {
        struct pollfd p = {.fd = s->fd, .events = POLLOUT};
        if (poll(&p, 1, 0) != 1 || !(p.revents & POLLOUT))
            return p.revents & (POLLERR | POLLHUP) ? -1 : 0;
        if (len > PIPE_BUF)
            len = PIPE_BUF;
    }
    do {
        n = s->way == W_SEND ? send(s->fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL)
                             : write(s->fd, data, len);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    return n;
}

/* Write what goes now; the rest stays queued. */
static ssize_t write_some(struct sink *s, const char *data, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = try_write(s, data + done, len - done);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return (ssize_t)done;
}

static bool queue(struct sink *s, const char *data, size_t len) {
    if (s->len + len > BW_OUTPUT_MAX_QUEUED)
        return false;
    if (s->len + len > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + len)
            cap *= 2;
        char *b = realloc(s->buf, cap);
        if (!b)
            return false;
        s->buf = b;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, data, len);
    s->len += len;
    return true;
}

static void on_retry(uv_timer_t *t);

static void want_retry(void) {
    if (!sinks.retrying && sinks.ready) {
        uv_timer_start(&sinks.retry, on_retry, RETRY_MS, RETRY_MS);
        sinks.retrying = true;
    }
}

/* Drain the queue; once empty, say what was dropped (itself queued like any output). */
static bool sink_flush(struct sink *s) {
    if (s->len > 0) {
        ssize_t n = write_some(s, s->buf, s->len);
        size_t done = n < 0 ? s->len : (size_t)n; /* gone: nothing can be delivered */
        memmove(s->buf, s->buf + done, s->len - done);
        s->len -= done;
    }
    if (s->len == 0 && s->dropped > 0) {
        char note[160];
        int k = snprintf(note, sizeof note, "beam: warning: %llu bytes of output dropped "
                         "(%s was not read fast enough)\n", s->dropped,
                         s == &sinks.s[1] ? "stdout" : "stderr");
        s->dropped = 0;
        ssize_t n = write_some(s, note, (size_t)k);
        if (n >= 0 && n < k)
            queue(s, note + n, (size_t)(k - n));
    }
    return s->len == 0;
}

static void on_retry(uv_timer_t *t) {
    for (int fd = 1; fd <= 2; fd++)
        sinks.s[fd].dropped +=
            __atomic_exchange_n(&sinks.dropped_off_loop[fd], 0, __ATOMIC_RELAXED);
    bool out_idle = sink_flush(&sinks.s[1]); /* both are flushed, whatever the first says */
    bool err_idle = sink_flush(&sinks.s[2]);
    if (out_idle && err_idle) {
        uv_timer_stop(t);
        sinks.retrying = false;
    }
}

void bw_output_write(int fd, const char *data, size_t len) {
    if (!sinks.ready || (fd != 1 && fd != 2)) {
        if (write(fd, data, len) < 0) {
            /* nowhere to report it */
        }
        return;
    }
    struct sink *s = &sinks.s[fd];
    if (!pthread_equal(pthread_self(), sinks.loop_thread)) {
        ssize_t n = write_some(s, data, len); /* s->fd and s->way never change once open */
        size_t lost = n < 0 ? len : len - (size_t)n;
        if (lost)
            __atomic_add_fetch(&sinks.dropped_off_loop[fd], lost, __ATOMIC_RELAXED);
        return;
    }
    size_t done = 0;
    if (s->len == 0) { /* nothing queued: write directly, keeping the order */
        ssize_t n = write_some(s, data, len);
        done = n < 0 ? len : (size_t)n;
    }
    if (done < len && !queue(s, data + done, len - done)) {
        bool first = s->dropped == 0;
        s->dropped += len - done;
        if (first) /* said at once, on the log; the count follows when the stream drains */
            bw_warn("%s is not being read: dropping output past %u KiB queued",
                    fd == 1 ? "stdout" : "stderr", BW_OUTPUT_MAX_QUEUED / 1024);
    }
    if (s->len > 0 || s->dropped > 0)
        want_retry();
}

void bw_output_init(uv_loop_t *loop) {
    sinks.loop = loop;
    sinks.loop_thread = pthread_self();
    sink_open(&sinks.s[1], 1);
    sink_open(&sinks.s[2], 2);
    uv_timer_init(loop, &sinks.retry);
    uv_unref((uv_handle_t *)&sinks.retry);
    sinks.ready = true;
}

void bw_output_close(void) {
    if (!sinks.ready)
        return;
    sink_flush(&sinks.s[1]);
    sink_flush(&sinks.s[2]);
    sinks.ready = false;
    uv_timer_stop(&sinks.retry);
    uv_close((uv_handle_t *)&sinks.retry, NULL);
    for (int fd = 1; fd <= 2; fd++) {
        if (sinks.s[fd].fd != fd)
            close(sinks.s[fd].fd);
        free(sinks.s[fd].buf);
    }
}
