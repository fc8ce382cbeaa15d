/* control.h - the control channel between supervisor and host.
 *
 * A SOCK_STREAM socketpair carrying the same frames as the wire protocol (4-byte
 * length + one msgpack map with a "t" field naming the message). File descriptors
 * (the listening sockets) travel with a message as SCM_RIGHTS ancillary data.
 *
 * Messages, in the order they occur:
 *   host -> supervisor  {"t":"need_secrets", "names":[str..]}   cold boot, after import
 *   supervisor -> host  {"t":"secrets", "secrets":{name:value}}  their values, for on_start
 *   host -> supervisor  {"t":"ready", "checkpoint":bool, "config":{..}, "profile":{..}}
 *       after on_start; if "checkpoint" the host is quiescent and may be dumped now.
 *   supervisor -> host  {"t":"start", "restored":bool, "container_id":str,
 *                        "env":{..}, "secrets":{..}, "options":{..},
 *                        "listeners":[address..], "profile":{..}} + fds
 *       the first message a restored host reads: it resumes blocked in that read.
 *       "env" is today's allowed environment (environ.c), "options" today's command
 *       line settings that a host uses after start (max_frame, grace_s, workers,
 *       json_logs, allow_cpu).
 *   host -> supervisor  {"t":"serving", "workers":N}
 *   host -> supervisor  {"t":"fatal", "message":str} before the host exits on error.
 */
#ifndef BW_CONTROL_H
#define BW_CONTROL_H

#include <msgpack.h>
#include <stddef.h>

#include "frame.h"

#define BW_CTL_FD 3        /* the host's end, at this fd number in the host */
#define BW_CTL_MAX_FDS 8
#define BW_CTL_MAX_MSG (16u * 1024u * 1024u)

/* Send one framed message (body = msgpack bytes) with optional fds. 0 or -1 (errno). */
int bw_ctl_send(int sock, const char *body, size_t len, const int *fds, int nfds);

/* Receive one framed message; *body is malloc'd (caller frees). Received fds are
 * stored in fds[] and counted in *nfds. timeout_ms < 0 waits forever.
 * 0, or -1 with errno (EPIPE when the peer closed, ETIMEDOUT). */
int bw_ctl_recv(int sock, char **body, size_t *len, int *fds, int *nfds, int timeout_ms);

/* A message read without blocking, a piece per readable event: the supervisor's loop
 * reads its hosts this way, so that a host that sends a header and stalls holds nobody
 * (the owner gives up on a message begun too long ago: bw_ctl_reader_age). */
struct bw_ctl_reader {
    unsigned char hdr[BW_FRAME_HEADER];
    size_t have;     /* bytes of this message (header, then body) read so far */
    char *body;      /* malloc'd once the header is in */
    size_t len;
    double started;  /* bw_now_ms() at its first byte; 0 between messages */
};

/* Read what is there of one message, never past its end. 1: complete (*body malloc'd,
 * the caller frees; the reader is ready for the next), 0: not yet, -1 with errno
 * (EPIPE: the peer closed; EMSGSIZE). Fds that arrive are closed: hosts send none. */
int bw_ctl_read_some(struct bw_ctl_reader *rd, int sock, char **body, size_t *len);
/* Milliseconds since the message being read began; 0 when none is. */
double bw_ctl_reader_age(const struct bw_ctl_reader *rd, double now);
/* Drop a message half read. */
void bw_ctl_reader_reset(struct bw_ctl_reader *rd);

#endif
