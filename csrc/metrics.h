/* metrics.h - the supervisor's counters and histograms, written as the Prometheus text
 * exposition format (version 0.0.4) for GET /metrics. Base units: seconds and bytes.
 * Everything lives in fixed tables: the set of series is bounded whatever the traffic. */
#ifndef BW_METRICS_H
#define BW_METRICS_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

#include "tasks.h"

/* An endpoint call (POST /) was answered. dispatched: a replica took it (run_ms is then
 * its run time); queued_ms < 0: it never waited in the queue (refused at once). */
void bw_metrics_call(int http_status, double queued_ms, double run_ms, bool dispatched);
/* Any HTTP response. */
void bw_metrics_http(int code);
void bw_metrics_start(const char *mode); /* cold, restore, fallback */
void bw_metrics_start_ready(const struct bw_start *s);
void bw_metrics_dump(bool ok, unsigned long long bytes, double ms);
void bw_metrics_image_bytes(unsigned long long bytes); /* size of the image in use */
unsigned long long bw_metrics_image_bytes_now(void);
/* unusable, gpu_incompatible, criu, gpu_restore, exited (died or timed out before ready) */
void bw_metrics_restore_failure(const char *reason);

/* The registry's families. */
void bw_metrics_write(msgpack_sbuffer *out);
/* For the gauges the caller adds (replicas by state, ...): a family's HELP and TYPE
 * lines; samples are written with bw_mp_printf (mp.h). */
void bw_metrics_family(msgpack_sbuffer *out, const char *name, const char *type, const char *help);

#endif
