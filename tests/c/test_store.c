/* test_store.c - the pure parts of the shared store: lease files (csrc/store.c) and the
 * compatibility key's comparison, override and record (csrc/compat.c). */
#include "compat.h"
#include "cuda_ckpt.h"
#include "mp.h"
#include "store.h"
#include "test_util.h"

#include <string.h>

static void test_lease_parse(void) {
    struct bw_lease l;
    CHECK(bw_lease_parse("host=node-a.example\npid=4242\nexpires=1700000000.250\n", &l) == 0);
    CHECK(strcmp(l.host, "node-a.example") == 0);
    CHECK(l.pid == 4242);
    CHECK(l.expires > 1700000000.2 && l.expires < 1700000000.3);
    CHECK(!bw_lease_expired(&l, 1700000000.0));
    CHECK(bw_lease_expired(&l, 1700000000.25));
    /* What a reader sees while the holder writes, or a damaged file: not a lease. */
    CHECK(bw_lease_parse("", &l) < 0);
    CHECK(bw_lease_parse("host=a\npid=12", &l) < 0);
    CHECK(bw_lease_parse("host=a\npid=12\nexpires=", &l) < 0);
    CHECK(bw_lease_parse("host=a\npid=x\nexpires=5\n", &l) < 0);
    CHECK(bw_lease_parse("host=a\npid=-3\nexpires=5\n", &l) < 0);
    CHECK(bw_lease_parse("pid=1\nexpires=5\n", &l) < 0);
}

static void machine(struct bw_compat *c) {
    memset(c, 0, sizeof *c);
    strcpy(c->cpu_flags, "fpu sse sse2 avx avx2");
    strcpy(c->kernel, "6.18.0");
    strcpy(c->criu, "4.2.1");
    strcpy(c->glibc, "2.36");
}

static void test_compat_check(void) {
    struct bw_compat img, here;
    char why[1024];
    machine(&img);
    machine(&here);
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 1);
    /* Fewer flags in the image: it runs on this superset. */
    strcpy(img.cpu_flags, "sse2 avx");
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 1);
    /* One the CPU lacks: never restored (a SIGILL later). */
    strcpy(img.cpu_flags, "sse2 avx512f avx");
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 0);
    CHECK_STR_CONTAINS(why, "cpu_flags: the image needs avx512f");
    machine(&img);
    strcpy(img.kernel, "0.0-test");
    strcpy(img.glibc, "2.31");
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 0);
    CHECK_STR_CONTAINS(why, "kernel: 6.18.0 here, 0.0-test in the image");
    CHECK_STR_CONTAINS(why, "; glibc: 2.36 here, 2.31 in the image");
    /* GPU: compared only when the image has GPU state. */
    machine(&img);
    strcpy(here.gpu, "NVIDIA H200, driver 570.86.15");
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 1);
    strcpy(img.gpu, "NVIDIA A100, driver 570.86.15");
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 0);
    CHECK_STR_CONTAINS(why, "gpu: NVIDIA H200, driver 570.86.15 here, NVIDIA A100");
    here.gpu[0] = '\0';
    CHECK(bw_compat_check(&img, &here, why, sizeof why) == 0);
    CHECK_STR_CONTAINS(why, "gpu: none here");
}

static void test_override_and_hash(void) {
    struct bw_compat a, b;
    char err[256], ha[BW_COMPAT_HASH_LEN], hb[BW_COMPAT_HASH_LEN];
    machine(&a);
    b = a;
    CHECK(bw_compat_override(&b, "kernel=0.0-test,cpu_flags=fpu sse", err, sizeof err) == 0);
    CHECK(strcmp(b.kernel, "0.0-test") == 0 && strcmp(b.cpu_flags, "fpu sse") == 0);
    CHECK(strcmp(b.criu, a.criu) == 0);
    CHECK(bw_compat_override(&b, "kernels=1", err, sizeof err) < 0);
    CHECK_STR_CONTAINS(err, "kernels=1");
    CHECK(bw_compat_override(&b, "kernel", err, sizeof err) < 0);
    bw_compat_hash(&a, ha);
    bw_compat_hash(&b, hb);
    CHECK(strlen(ha) == 16 && strcmp(ha, hb) != 0);
    b = a;
    bw_compat_hash(&b, hb);
    CHECK(strcmp(ha, hb) == 0);
}

static void test_pack_round_trip(void) {
    struct bw_compat a, b;
    machine(&a);
    strcpy(a.gpu, "NVIDIA H200, driver 570.86.15");
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    bw_compat_pack(&pk, &a);
    msgpack_zone z;
    msgpack_zone_init(&z, 1024);
    msgpack_object o;
    size_t off = 0;
    CHECK(msgpack_unpack(sb.data, sb.size, &off, &z, &o) == MSGPACK_UNPACK_SUCCESS);
    CHECK(bw_compat_unpack(&o, &b) == 0);
    CHECK(memcmp(&a, &b, sizeof a) == 0);
    CHECK(bw_compat_unpack(NULL, &b) < 0);
    msgpack_zone_destroy(&z);
    msgpack_sbuffer_destroy(&sb);
}

/* An image's GPU field comes from the GPU metadata a GPU dump stores (replica.c). */
static void test_gpu_field_from_metadata(void) {
    struct bw_cuda_gpus g;
    memset(&g, 0, sizeof g);
    g.n = 2;
    strcpy(g.gpu[0].name, "NVIDIA H200");
    strcpy(g.gpu[1].name, "NVIDIA H200");
    g.gpu[1].uuid[0] = 1;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    bw_mp_str(&pk, "gpus");
    bw_cuda_pack_gpus(&pk, &g);
    bw_mp_kv_str(&pk, "driver", "570.86.15");
    struct bw_compat c;
    machine(&c);
    bw_compat_set_gpu(&c, sb.data, sb.size);
    CHECK(strcmp(c.gpu, "NVIDIA H200, driver 570.86.15") == 0);
    machine(&c);
    bw_compat_set_gpu(&c, "\xc0", 1); /* nil: no GPU list, no GPU field */
    CHECK(c.gpu[0] == '\0');
    msgpack_sbuffer_destroy(&sb);
}

int main(void) {
    RUN(test_lease_parse);
    RUN(test_compat_check);
    RUN(test_override_and_hash);
    RUN(test_pack_round_trip);
    RUN(test_gpu_field_from_metadata);
    return TEST_SUMMARY();
}
