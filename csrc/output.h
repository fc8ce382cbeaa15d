/* output.h - the supervisor's stdout and stderr, written without ever blocking.
 *
 * The hosts' output (what the app prints, the workers' log lines) and the supervisor's
 * own log lines go through here. A reader that stops reading (a full pipe, a stopped
 * terminal) must not stall the event loop that answers HTTP calls: what cannot be written
 * now is queued, up to a bound per stream; past it, output is dropped and the loss is
 * said in one counted line once the stream drains. */
#ifndef BW_OUTPUT_H
#define BW_OUTPUT_H

#include <stddef.h>
#include <uv.h>

#define BW_OUTPUT_MAX_QUEUED (1u << 20) /* per stream */

void bw_output_init(uv_loop_t *loop);
/* fd: 1 or 2. Copies what it cannot write now. */
void bw_output_write(int fd, const char *data, size_t len);
/* At exit: write what the streams take now; later writes go straight to the fds. */
void bw_output_close(void);

#endif
