/* job.c - slow work on the thread pool, completion on the loop (job.h). */
#include "job.h"

static int in_flight;            /* touched on the loop only */
static void (*after_each)(void);

static void run_work(uv_work_t *req) {
    struct bw_job *j = req->data;
    j->work(j);
}

static void after_work(uv_work_t *req, int status) {
    struct bw_job *j = req->data;
    (void)status; /* UV_ECANCELED is impossible: nothing here calls uv_cancel */
    in_flight--;
    j->done(j);
    if (after_each)
        after_each();
}

int bw_job_start(uv_loop_t *loop, struct bw_job *j) {
    j->req.data = j;
    int rc = uv_queue_work(loop, &j->req, run_work, after_work);
    if (rc == 0)
        in_flight++;
    return rc;
}

int bw_jobs_in_flight(void) { return in_flight; }

void bw_job_set_after(void (*fn)(void)) { after_each = fn; }
