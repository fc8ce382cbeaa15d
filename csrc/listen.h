/* listen.h - creating the listening sockets the supervisor hands to every replica. */
#ifndef BW_LISTEN_H
#define BW_LISTEN_H

#include <stddef.h>

struct bw_listener {
    int fd;
    char address[320];   /* unix:///abs/path or tcp://host:port, as printed and in context */
    char unix_path[256]; /* removed at exit */
};

/* Bind and listen; fd is CLOEXEC. 0, or -1 with a reason in err. */
int bw_listen_unix(struct bw_listener *l, const char *path, char *err, size_t errlen);
int bw_listen_tcp(struct bw_listener *l, const char *spec, char *err, size_t errlen);

#endif
