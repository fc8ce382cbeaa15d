/* control.c - framed messages with fd passing over a unix stream socket. */
#define _GNU_SOURCE
#include "control.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "frame.h"
#include "util.h"

int bw_ctl_send(int sock, const char *body, size_t len, const int *fds, int nfds) {
    unsigned char hdr[BW_FRAME_HEADER];
    if (len > BW_CTL_MAX_MSG || nfds > BW_CTL_MAX_FDS) {
        errno = EMSGSIZE;
        return -1;
    }
    bw_store_be32(hdr, (uint32_t)len);
    struct iovec iov[2] = {{hdr, sizeof hdr}, {(void *)body, len}};
    union {
        char buf[CMSG_SPACE(sizeof(int) * BW_CTL_MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    if (nfds > 0) {
        memset(&u, 0, sizeof u);
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t w;
    do {
        w = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (w < 0 && errno == EINTR);
    if (w < 0)
        return -1;
    /* The fds went with the first byte; finish a short write without them. */
    size_t total = sizeof hdr + len, done = (size_t)w;
    if (done < sizeof hdr) {
        if (bw_write_full(sock, hdr + done, sizeof hdr - done) < 0)
            return -1;
        done = sizeof hdr;
    }
    return bw_write_full(sock, body + (done - sizeof hdr), total - done);
}

static int wait_readable(int sock, int timeout_ms) {
    struct pollfd p = {.fd = sock, .events = POLLIN};
    int r;
    do {
        r = poll(&p, 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    if (r == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    return r < 0 ? -1 : 0;
}

/* Read exactly n bytes by the deadline (bw_now_ms(); < 0: none). A peer that sends a
 * header and then stalls must not hold a caller who gave a timeout. */
static int read_until(int sock, void *buf, size_t n, double deadline) {
    char *p = buf;
    while (n > 0) {
        if (deadline >= 0) {
            double left = deadline - bw_now_ms();
            if (left <= 0 || wait_readable(sock, (int)left + 1) < 0) {
                errno = ETIMEDOUT;
                return -1;
            }
        }
        ssize_t r = read(sock, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EPIPE;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* timeout_ms (>= 0) bounds the whole message, not only its first byte. */
int bw_ctl_recv(int sock, char **body, size_t *len, int *fds, int *nfds, int timeout_ms) {
    unsigned char hdr[BW_FRAME_HEADER];
    union {
        char buf[CMSG_SPACE(sizeof(int) * BW_CTL_MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {hdr, sizeof hdr};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    *nfds = 0;
    *body = NULL;
    double deadline = timeout_ms >= 0 ? bw_now_ms() + timeout_ms : -1;
    if (timeout_ms >= 0 && wait_readable(sock, timeout_ms) < 0)
        return -1;
    ssize_t r;
    do {
        r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    if (r <= 0) {
        if (r == 0)
            errno = EPIPE;
        return -1;
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        memcpy(fds + *nfds, CMSG_DATA(c), sizeof(int) * (size_t)n);
        *nfds += n;
    }
    if ((size_t)r < sizeof hdr && read_until(sock, hdr + r, sizeof hdr - (size_t)r, deadline) < 0) {
        for (int i = 0; i < *nfds; i++)
            close(fds[i]);
        *nfds = 0;
        return -1;
    }
    *len = bw_load_be32(hdr);
    if (*len > BW_CTL_MAX_MSG) {
        errno = EMSGSIZE;
        return -1;
    }
    *body = malloc(*len ? *len : 1);
    if (!*body)
        return -1;
    if (read_until(sock, *body, *len, deadline) < 0) {
        free(*body);
        *body = NULL;
        return -1;
    }
    return 0;
}

/* One recv that cannot wait; fds that came with it are closed. */
static ssize_t recv_now(int sock, void *buf, size_t n) {
    union {
        char buf[CMSG_SPACE(sizeof(int) * BW_CTL_MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {buf, n};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    ssize_t r;
    do {
        r = recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    for (struct cmsghdr *c = r >= 0 ? CMSG_FIRSTHDR(&msg) : NULL; c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof fd, sizeof fd);
                close(fd);
            }
    return r;
}

void bw_ctl_reader_reset(struct bw_ctl_reader *rd) {
    free(rd->body);
    memset(rd, 0, sizeof *rd);
}

double bw_ctl_reader_age(const struct bw_ctl_reader *rd, double now) {
    return rd->started > 0 ? now - rd->started : 0;
}

/* The header is in: room for the body. */
static int begin_body(struct bw_ctl_reader *rd) {
    rd->len = bw_load_be32(rd->hdr);
    if (rd->len > BW_CTL_MAX_MSG) {
        errno = EMSGSIZE;
        return -1;
    }
    rd->body = malloc(rd->len ? rd->len : 1);
    return rd->body ? 0 : -1;
}

int bw_ctl_read_some(struct bw_ctl_reader *rd, int sock, char **body, size_t *len) {
    for (;;) {
        size_t hl = sizeof rd->hdr;
        if (rd->have >= hl && rd->have - hl == rd->len) { /* complete */
            *body = rd->body;
            *len = rd->len;
            rd->body = NULL;
            bw_ctl_reader_reset(rd);
            return 1;
        }
        bool in_hdr = rd->have < hl;
        char *dst = in_hdr ? (char *)rd->hdr + rd->have : rd->body + (rd->have - hl);
        size_t want = in_hdr ? hl - rd->have : rd->len - (rd->have - hl);
        ssize_t n = recv_now(sock, dst, want);
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        if (n == 0) {
            errno = EPIPE;
            return -1;
        }
        if (rd->have == 0)
            rd->started = bw_now_ms();
        rd->have += (size_t)n;
        if (in_hdr && rd->have == hl && begin_body(rd) < 0)
            return -1;
    }
}
