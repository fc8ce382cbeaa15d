/* router.h - HTTP calls to replicas (supervisor side).
 *
 * Each serving replica has a private unix socket; the router keeps a few msgpack
 * connections to it and pipelines calls over them, least-loaded first. Calls wait in
 * one queue (bounded by max_pending_tasks: beyond it, 429) until a replica can take
 * them; the supervisor is told when calls wait, so it can start replicas. */
#ifndef BW_ROUTER_H
#define BW_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "http.h"

/* Calls wait that no replica can take now. Returns whether more capacity may come (a
 * replica is starting or may be started); false lets the router batch them into the
 * workers it has (BATCH_DEPTH in router.c). */
typedef bool (*bw_router_demand_fn)(void *arg);

void bw_router_init(uv_loop_t *loop, size_t max_frame, bw_router_demand_fn demand, void *arg);
void bw_router_set_max_pending(int n);

/* Connect to a replica's private socket, served by `workers` worker processes; `owner`
 * names it. Connections are opened one at a time until each worker is reached (2 per
 * worker at first, more on demand while some worker is not). A connection that ends
 * while the replica serves is reopened (its worker died and was replaced), until
 * bw_router_drain or bw_router_detach. depth: calls in flight per worker (at least 2; an
 * async endpoint's worker interleaves concurrent_requests calls, so it gets one more).
 */
int bw_router_attach(void *owner, const char *unix_path, int workers, int depth);
/* The replica is stopping: send it no new calls and reopen none of its connections;
 * calls in flight are still answered. owner NULL: every replica (shutdown). */
void bw_router_drain(void *owner);
/* The replica is gone or going: calls it had not answered get an explicit 502. */
void bw_router_detach(void *owner);

void bw_router_submit(struct bw_http_req *r);
/* Answer every waiting call with an error (no replica can be started; shutdown). */
void bw_router_fail_queued(int status, const char *type, const char *message);

size_t bw_router_queued(void);
size_t bw_router_inflight(void *owner); /* owner NULL: all replicas */
unsigned long long bw_router_answered(void *owner);

#endif
