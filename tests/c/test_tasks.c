/* test_tasks.c - the task ring (csrc/tasks.c): bounded, newest first, lookups by id,
 * start phases from a profile; and the metrics text (csrc/metrics.c) counting them. */
#include "metrics.h"
#include "mp.h"
#include "tasks.h"
#include "test_util.h"
#include "util.h"

#include <stdio.h>

static char *json_list(size_t limit) {
    static char buf[1 << 16];
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    bw_tasks_json_list(&b, limit);
    snprintf(buf, sizeof buf, "%.*s", (int)b.size, b.data);
    msgpack_sbuffer_destroy(&b);
    return buf;
}

static void test_ring_wraps_and_keeps_the_newest(void) {
    char id[32];
    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof id, "t%d", i);
        struct bw_task_rec r = {.id = id, .http_status = 200, .replica = 1,
                                .arrival = bw_now_ms(), .queued_ms = 1, .run_ms = 2};
        bw_tasks_add(&r);
    }
    char *j = json_list(100);
    CHECK_STR_CONTAINS(j, "\"capacity\":4,\"recorded\":10,\"tasks\":[{\"id\":\"t9\"");
    CHECK(strstr(j, "\"t6\"") && !strstr(j, "\"t5\""));
    CHECK_STR_CONTAINS(json_list(1), "\"t9\"");
    CHECK(!strstr(json_list(1), "\"t8\""));
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    CHECK(bw_tasks_json_one(&b, "t7"));
    CHECK(!bw_tasks_json_one(&b, "t5")); /* overwritten */
    msgpack_sbuffer_destroy(&b);
}

static void test_call_without_id_gets_one(void) {
    struct bw_task_rec r = {.http_status = 429, .arrival = bw_now_ms()};
    const char *id = bw_tasks_add(&r);
    CHECK(id && strlen(id) == BW_ID_LEN - 1);
    CHECK_STR_CONTAINS(json_list(1), "\"status\":\"rejected\"");
}

static void test_start_phases_from_profile(void) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5);
    bw_mp_kv_str(&pk, "mode", "restore");
    bw_mp_kv_double(&pk, "criu_restore_ms", 15.0);
    bw_mp_kv_int(&pk, "image_bytes", 1000);
    bw_mp_kv_double(&pk, "after_start_ms", 1.0);
    bw_mp_kv_double(&pk, "ready_ms", 20.0);
    msgpack_zone z;
    msgpack_zone_init(&z, 256);
    msgpack_object p;
    CHECK(bw_mp_unpack_exact(sb.data, sb.size, &z, &p) == 0);
    double t0 = bw_now_ms();
    bw_tasks_start_begin(7, "restore", t0);
    const struct bw_start *s = bw_tasks_start_ready(7, &p);
    if (CHECK(s && s->ready && s->nphases == 3)) {
        CHECK(strcmp(s->phases[0].name, "spawn") == 0 && s->phases[0].ms == 4.0);
        CHECK(strcmp(s->phases[1].name, "criu_restore") == 0);
        CHECK(strcmp(s->phases[2].name, "after_start") == 0);
        CHECK(s->image_bytes == 1000);
        bw_metrics_start("restore");
        bw_metrics_start_ready(s);
    }
    struct bw_task_rec r = {.id = "woke", .http_status = 200, .replica = 7, .started = 7,
                            .from_zero = true, .arrival = t0, .queued_ms = 21, .run_ms = 1};
    bw_tasks_add(&r);
    char *j = json_list(1);
    CHECK_STR_CONTAINS(j, "\"woke_from_zero\":true,\"started_replica\":7");
    CHECK_STR_CONTAINS(j, "\"phases\":[{\"name\":\"spawn\",\"ms\":4.000}");
    msgpack_zone_destroy(&z);
    msgpack_sbuffer_destroy(&sb);
}

static void test_metrics_text(void) {
    bw_metrics_call(200, 1.5, 3.0, true);
    bw_metrics_call(429, -1, 0, false);
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    bw_metrics_write(&b);
    msgpack_sbuffer_write(&b, "", 1);
    CHECK_STR_CONTAINS(b.data, "beam_requests_total{status=\"ok\"} 1\n");
    CHECK_STR_CONTAINS(b.data, "beam_requests_total{status=\"rejected\"} 1\n");
    CHECK_STR_CONTAINS(b.data, "beam_request_run_duration_seconds_count 1\n");
    CHECK_STR_CONTAINS(b.data, "beam_request_run_duration_seconds_bucket{le=\"0.005\"} 1\n");
    CHECK_STR_CONTAINS(b.data, "beam_request_run_duration_seconds_bucket{le=\"0.0025\"} 0\n");
    CHECK_STR_CONTAINS(b.data, "beam_replica_starts_total{mode=\"restore\"} 1\n");
    CHECK_STR_CONTAINS(b.data, "beam_replica_start_phase_duration_seconds_count{mode=\"restore\","
                               "phase=\"criu_restore\"} 1\n");
    msgpack_sbuffer_destroy(&b);
}

int main(void) {
    if (bw_tasks_init(4) < 0)
        return 1;
    RUN(test_ring_wraps_and_keeps_the_newest);
    RUN(test_call_without_id_gets_one);
    RUN(test_start_phases_from_profile);
    RUN(test_metrics_text);
    return TEST_SUMMARY();
}
