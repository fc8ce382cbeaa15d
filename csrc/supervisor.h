/* supervisor.h - the process outside: owns the sockets, starts the host in its own PID
 * namespace (cold) or restores it from a checkpoint, forwards its logs, and keeps a
 * serving host there. */
#ifndef BW_SUPERVISOR_H
#define BW_SUPERVISOR_H

#include "options.h"

int bw_supervisor_main(const struct bw_options *o, int argc, char **argv);

#endif
