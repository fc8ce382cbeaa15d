/* job.h - slow work off the event loop: CRIU restores and dumps, CUDA lock/checkpoint/
 * restore steps, image hashing, the leak scan. Each can take seconds (up to
 * --criu-timeout or --cuda-lock-timeout); on the loop they would stall every HTTP and
 * msgpack call to the replicas already serving.
 *
 * A job's work() runs on a libuv thread-pool thread; its done() runs on the loop once
 * work() returned. Thread rules:
 *   work() touches only its own job struct and what its caller made read-only for its
 *   duration (bw_sup.o, bw_sup.ck); never a libuv handle, a replica or the fleet
 *   (bw_sup). It may log (output.c writes, never queues, off the loop thread).
 *   done() is the one place the results meet the loop's state.
 * No Python runs in the supervisor, so there is no GIL to mind. libuv's pool has 4
 * threads unless UV_THREADPOOL_SIZE says otherwise: a fifth job waits for one (CRIU's
 * watchdog bounds each call from its start, not from its queueing).
 *
 * Children a job forks (`criu swrk`, criu's page daemon, the restored host) are children
 * of its pool thread; the supervisor's reaper never waits for any pid but the ones it
 * knows while a job is in flight (supervisor.c, reap), so libcriu's own waitpid() for
 * its helper is never beaten to it. Pool threads live as long as the process: a host's
 * PR_SET_PDEATHSIG (host.c) follows the thread that made it, which so never goes away. */
#ifndef BW_JOB_H
#define BW_JOB_H

#include <stdbool.h>
#include <uv.h>

struct bw_job {
    uv_work_t req;
    void (*work)(struct bw_job *j); /* off the loop */
    void (*done)(struct bw_job *j); /* on the loop, after work; may free j */
};

/* Queue j on the loop's thread pool. 0, or a libuv error (then nothing ran). */
int bw_job_start(uv_loop_t *loop, struct bw_job *j);
/* Jobs queued or running whose done() has not run yet. */
int bw_jobs_in_flight(void);
/* fn runs on the loop after each job's done(): the supervisor reaps then what it left
 * unreaped while the job was in flight. */
void bw_job_set_after(void (*fn)(void));

#endif
