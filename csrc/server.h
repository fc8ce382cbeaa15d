/* server.h - a worker process's event loop: accept connections on the listening
 * sockets it was handed, read frames, answer them in order. */
#ifndef BW_SERVER_H
#define BW_SERVER_H

#include <stddef.h>

/* Serve until SIGTERM/SIGINT, then stop accepting, flush what was answered and
 * return 0 (or after grace_s, whatever is left). Call with the GIL held. */
int bw_server_run(const int *listen_fds, int nfds, size_t max_frame, double grace_s);

#endif
