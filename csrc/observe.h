/* observe.h - what the supervisor shows about itself over HTTP: the task ring
 * (GET /tasks, /tasks/<id>), Prometheus metrics (GET /metrics), the dashboard
 * (GET /dashboard and its data, /dashboard/state) and the access log. The glue between
 * http.c's hooks, the supervisor's replicas and tasks.c / metrics.c. */
#ifndef BW_OBSERVE_H
#define BW_OBSERVE_H

#include <stdbool.h>

#include "http.h"

struct bw_replica;

int bw_obs_init(int task_history, bool access_log, bool json_logs);

/* http.c handlers (struct bw_http_handlers: owns, get, done) */
bool bw_obs_owns(const char *path);
void bw_obs_get(struct bw_http_req *req, const char *path, const char *query, void *arg);
void bw_obs_done(struct bw_http_req *req, int status, const char *task_id, double wait_ms,
                 void *arg);

/* The supervisor's hooks. mode: cold, restore or fallback (cold after a failed restore). */
void bw_obs_replica_started(const struct bw_replica *r, const char *mode);
void bw_obs_replica_serving(const struct bw_replica *r);

#endif
