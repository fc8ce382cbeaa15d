/* hostlog.c - a host's channels, and its output forwarded to ours (hostlog.h). */
#define _GNU_SOURCE
#include "hostlog.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "output.h"

int bw_host_io_open(struct bw_host_io *io, bool cloexec_host_ends) {
    int sv[2], out[2], err[2];
    int fl = cloexec_host_ends ? O_CLOEXEC : 0;
    if (socketpair(AF_UNIX, SOCK_STREAM | (cloexec_host_ends ? SOCK_CLOEXEC : 0), 0, sv) < 0)
        return -1;
    if (pipe2(out, fl) < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pipe2(err, fl) < 0) {
        close(sv[0]);
        close(sv[1]);
        close(out[0]);
        close(out[1]);
        return -1;
    }
    io->ctl = sv[0];
    io->host_ctl = sv[1];
    io->out_r = out[0];
    io->host_out = out[1];
    io->err_r = err[0];
    io->host_err = err[1];
    /* Our ends never go to a host or to criu (F_SETFD on an open fd cannot fail). */
    fcntl(io->ctl, F_SETFD, FD_CLOEXEC);
    fcntl(io->out_r, F_SETFD, FD_CLOEXEC);
    fcntl(io->err_r, F_SETFD, FD_CLOEXEC);
    return 0;
}

void bw_host_io_close(struct bw_host_io *io) {
    int fds[] = {io->ctl, io->host_ctl, io->host_out, io->host_err, io->out_r, io->err_r};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
        close(fds[i]);
}

static void free_handle(uv_handle_t *h) { free(h); }

/* Never a blocking write here: a reader of our stdout that stops reading would stall
 * the whole event loop (output.c queues, then drops and counts). The host's pipe is
 * always drained, so the host never blocks either. */
static void on_output(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    int fd = (int)(intptr_t)s->data;
    if (nread > 0)
        bw_output_write(fd, buf->base, (size_t)nread);
    free(buf->base);
    if (nread < 0)
        uv_close((uv_handle_t *)s, free_handle);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

/* Handles are per host: a previous host's may still be draining when the next starts. */
void bw_hostlog_forward(uv_loop_t *loop, int pipe_fd, int to) {
    uv_pipe_t *p = malloc(sizeof *p);
    if (!p || uv_pipe_init(loop, p, 0) < 0) {
        free(p);
        close(pipe_fd);
        return;
    }
    p->data = (void *)(intptr_t)to;
    if (uv_pipe_open(p, pipe_fd) < 0 || uv_read_start((uv_stream_t *)p, on_alloc, on_output) < 0)
        uv_close((uv_handle_t *)p, free_handle);
}
