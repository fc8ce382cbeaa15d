/* hostlog.h - a host's channels: its control socket and stdout/stderr pipes, and the
 * forwarding of what it prints to our own stdout/stderr (hostlog.c). */
#ifndef BW_HOSTLOG_H
#define BW_HOSTLOG_H

#include <stdbool.h>
#include <uv.h>

struct bw_host_io {
    int ctl;                          /* our end of the control socket */
    int host_ctl, host_out, host_err; /* the host's ends, until handed over */
    int out_r, err_r;                 /* our read ends of its stdout/stderr */
};

/* cloexec_host_ends: for a cold boot, whose child dup2()s them; a restore hands them to
 * criu, which must inherit them. 0, or -1 with errno (nothing left open). */
int bw_host_io_open(struct bw_host_io *io, bool cloexec_host_ends);
void bw_host_io_close(struct bw_host_io *io);
/* Forward one of the host's output pipes (taken over) to our fd `to` (1 or 2), on loop. */
void bw_hostlog_forward(uv_loop_t *loop, int pipe_fd, int to);

#endif
