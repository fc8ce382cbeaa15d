/* test_job.c - slow work off the loop (csrc/job.c): work() on a pool thread while the
 * loop keeps running its timers, done() and the after-hook back on the loop thread. */
#include <pthread.h>
#include <stdbool.h>
#include <time.h>
#include <uv.h>

#include "job.h"

#include "test_util.h"

struct probe {
    struct bw_job job;
    pthread_t loop, work_thread, done_thread;
    int in_flight_during, in_flight_at_done, ticks_at_done, after_calls_at_done;
    bool done;
};

static int ticks, after_calls;
static struct probe *running;

static void slow_work(struct bw_job *j) {
    struct probe *p = (struct probe *)j;
    p->work_thread = pthread_self();
    struct timespec ts = {0, 200 * 1000 * 1000}; /* as a CRIU call that takes a while */
    nanosleep(&ts, NULL);
}

static void probe_done(struct bw_job *j) {
    struct probe *p = (struct probe *)j;
    p->done_thread = pthread_self();
    p->in_flight_at_done = bw_jobs_in_flight();
    p->ticks_at_done = ticks;
    p->after_calls_at_done = after_calls;
    p->done = true;
}

static void on_tick(uv_timer_t *t) {
    if (ticks++ == 0)
        running->in_flight_during = bw_jobs_in_flight();
    if (running->done)
        uv_close((uv_handle_t *)t, NULL);
}

static void after(void) { after_calls++; }

static void test_work_runs_off_the_loop_and_done_on_it(void) {
    uv_loop_t loop;
    uv_timer_t tick;
    struct probe p = {.job = {.work = slow_work, .done = probe_done}, .loop = pthread_self()};
    running = &p;
    uv_loop_init(&loop);
    bw_job_set_after(after);
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, on_tick, 10, 10);
    CHECK(bw_job_start(&loop, &p.job) == 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(!pthread_equal(p.work_thread, p.loop));
    CHECK(pthread_equal(p.done_thread, p.loop));
    CHECK(p.in_flight_during == 1);
    CHECK(p.in_flight_at_done == 0);
    CHECK(p.ticks_at_done >= 5); /* the loop ran its timer while the work slept 200 ms */
    CHECK(p.after_calls_at_done == 0 && after_calls == 1); /* after done(), once */
    uv_loop_close(&loop);
}

int main(void) {
    RUN(test_work_runs_off_the_loop_and_done_on_it);
    return TEST_SUMMARY();
}
