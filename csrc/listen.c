/* listen.c - unix and TCP listening sockets. Loopback unless told otherwise. */
#define _GNU_SOURCE
#include "listen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define BACKLOG 1024

int bw_listen_unix(struct bw_listener *l, const char *path, char *err, size_t errlen) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char abs[PATH_MAX];
    if (path[0] != '/') {
        if (!getcwd(abs, sizeof abs)) {
            snprintf(err, errlen, "getcwd: %s", strerror(errno));
            return -1;
        }
        size_t n = strlen(abs);
        snprintf(abs + n, sizeof abs - n, "/%s", path);
    } else {
        snprintf(abs, sizeof abs, "%s", path);
    }
    if (strlen(abs) >= sizeof sa.sun_path) {
        snprintf(err, errlen, "unix socket path too long (max %zu): %s", sizeof sa.sun_path - 1, abs);
        return -1;
    }
    memcpy(sa.sun_path, abs, strlen(abs) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    struct stat st;
    if (lstat(abs, &st) == 0) {
        /* A socket file left by a process that died: remove it, but never steal the
         * address of a live server or delete something that is not a socket. */
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(err, errlen, "%s exists and is not a socket", abs);
            close(fd);
            return -1;
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            snprintf(err, errlen, "%s is in use by a running server", abs);
            close(fd);
            return -1;
        }
        unlink(abs);
        close(fd);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            goto fail;
    }
    mode_t old = umask(0177); /* the socket file is born 0600: owner only */
    int rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    if (rc < 0 || listen(fd, BACKLOG) < 0)
        goto fail;
    l->fd = fd;
    snprintf(l->unix_path, sizeof l->unix_path, "%s", abs);
    snprintf(l->address, sizeof l->address, "unix://%s", abs);
    return 0;
fail:
    snprintf(err, errlen, "cannot listen on unix socket %s: %s", abs, strerror(errno));
    if (fd >= 0)
        close(fd);
    return -1;
}

/* "[HOST:]PORT", "HOST:PORT" or "[v6]:PORT" -> host, port. Host defaults to loopback. */
static int split_host_port(const char *spec, char *host, size_t hcap, char *port, size_t pcap) {
    const char *colon = strrchr(spec, ':');
    if (!colon) {
        snprintf(host, hcap, "127.0.0.1");
        snprintf(port, pcap, "%s", spec);
    } else {
        const char *h = spec;
        size_t hn = (size_t)(colon - spec);
        if (hn >= 2 && h[0] == '[' && h[hn - 1] == ']') {
            h++;
            hn -= 2;
        }
        if (hn == 0)
            snprintf(host, hcap, "127.0.0.1");
        else
            snprintf(host, hcap, "%.*s", (int)hn, h);
        snprintf(port, pcap, "%s", colon + 1);
    }
    char *end;
    long p = strtol(port, &end, 10);
    return (*port && !*end && p >= 0 && p <= 65535) ? 0 : -1;
}

int bw_listen_tcp(struct bw_listener *l, const char *spec, char *err, size_t errlen) {
    char host[256], port[16];
    if (split_host_port(spec, host, sizeof host, port, sizeof port) < 0) {
        snprintf(err, errlen, "bad --tcp address %s (expected [HOST:]PORT)", spec);
        return -1;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV}, *ai;
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(g));
        return -1;
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, BACKLOG) < 0) {
        snprintf(err, errlen, "cannot listen on %s:%s: %s", host, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return -1;
    }
    freeaddrinfo(ai);
    /* The address actually bound: port 0 asked the kernel to pick one. */
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "?";
    int actual = 0;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        snprintf(err, errlen, "getsockname on %s:%s: %s", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        actual = ntohs(s6->sin6_port);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        actual = ntohs(s4->sin_port);
    }
    l->fd = fd;
    l->unix_path[0] = '\0';
    snprintf(l->address, sizeof l->address, ss.ss_family == AF_INET6 ? "tcp://[%s]:%d" : "tcp://%s:%d",
             ip, actual);
    return 0;
}
