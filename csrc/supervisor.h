/* supervisor.h - the process outside: owns the sockets, keeps replicas (host processes,
 * each in its own PID namespace) booted cold or restored from the checkpoint, routes
 * HTTP calls to them, scales them up under load and down to zero when idle. */
#ifndef BW_SUPERVISOR_H
#define BW_SUPERVISOR_H

#include "fleet.h"
#include "options.h"

int bw_supervisor_main(const struct bw_options *o, int argc, char **argv);

#endif
