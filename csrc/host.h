/* host.h - the process inside the PID namespace that runs Python (PID 1 there). */
#ifndef BW_HOST_H
#define BW_HOST_H

#include "options.h"

int bw_host_main(const struct bw_options *o);

#endif
