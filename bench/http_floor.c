/* http_floor.c - the floor under any HTTP server's cost on this machine.
 *
 *   beam-http-floor PORT      (listens on 127.0.0.1:PORT; runs until killed)
 *
 * Answers every request that beam-loadgen --proto http sends (`POST /` with the body
 * `{}`) with a fixed `200` and the body `null`, doing nothing else: no parsing beyond
 * finding the end of each request, no handler, no allocation. One epoll loop, one
 * read and one write per turn of a connection, as few as a server can make.
 * bench/http.py runs it beside beam's front and FastAPI, on the same core, with the same
 * client: its req/s and CPU per request are what the kernel and the loopback TCP path
 * cost on their own, so they bound every ratio a real server can reach here.
 *
 * A request is taken to end with "\r\n\r\n{}" (what the client sends); the last bytes of
 * a read are kept per connection so a request split between two reads still counts.
 * Depends on libc only. Loopback benchmarking only: no limits, no timeouts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FDS 4096
#define END "\r\n\r\n{}"
#define END_LEN (sizeof END - 1)

static const char response[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               "Content-Length: 4\r\n\r\nnull";

/* The tail of the last read of each connection: a request's end may straddle reads. */
static char tails[MAX_FDS][END_LEN];
static unsigned char tail_len[MAX_FDS];

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 1024) < 0) {
        perror("beam-http-floor: listen");
        exit(1);
    }
    return fd;
}

static void accept_all(int ep, int l) {
    int s, one = 1;
    while ((s = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
        if (s >= MAX_FDS) {
            close(s);
            continue;
        }
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        tail_len[s] = 0;
        struct epoll_event e = {.events = EPOLLIN, .data.fd = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
    }
}

/* Reads what fd has and answers each request that ended in it. The tail of the last read
 * goes before the new bytes, so an end split between reads is found once; a match can
 * never lie wholly in the tail, which is shorter than END. */
static void serve(int fd) {
    char buf[END_LEN + 65536], out[64 * (sizeof response - 1)];
    ssize_t n = read(fd, buf + END_LEN, sizeof buf - END_LEN);
    if (n <= 0) {
        if (n == 0 || errno != EAGAIN)
            close(fd);
        return;
    }
    char *from = buf + END_LEN - tail_len[fd], *end = buf + END_LEN + n;
    memcpy(from, tails[fd], tail_len[fd]);
    size_t len = 0;
    for (char *p = from; (p = memmem(p, (size_t)(end - p), END, END_LEN)); p += END_LEN) {
        if (len + sizeof response - 1 > sizeof out) {
            if (write(fd, out, len) < 0)
                break;
            len = 0;
        }
        memcpy(out + len, response, sizeof response - 1);
        len += sizeof response - 1;
    }
    size_t keep = (size_t)(end - from) < END_LEN - 1 ? (size_t)(end - from) : END_LEN - 1;
    memcpy(tails[fd], end - keep, keep);
    tail_len[fd] = (unsigned char)keep;
    if (len && write(fd, out, len) < 0)
        close(fd);
}

int main(int argc, char **argv) {
    if (argc != 2 || atoi(argv[1]) <= 0) {
        fprintf(stderr, "usage: beam-http-floor PORT\n");
        return 2;
    }
    int l = listen_on(atoi(argv[1])), ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = l}, ev[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &e);
    for (;;) {
        int n = epoll_wait(ep, ev, 64, -1);
        for (int i = 0; i < n; i++) {
            if (ev[i].data.fd == l)
                accept_all(ep, l);
            else
                serve(ev[i].data.fd);
        }
    }
}
