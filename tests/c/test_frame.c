/* test_frame.c - unit tests for the byte-level layer: framing (frame.c), the input
 * buffer, msgpack helpers (mp.c), id generation (util.c) and control messages (control.c).
 *
 * These are the pieces that face untrusted bytes from the network, so the error
 * paths (short input, hostile lengths, garbage, deep nesting) matter as much as
 * the happy path. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "control.h"
#include "frame.h"
#include "mp.h"
#include "util.h"

#include "test_util.h"

/* Write a 4-byte big-endian header; the tests build frames by hand so that they do
 * not depend on the encoder they are checking. */
static void put_header(char *p, uint32_t n) { bw_store_be32((unsigned char *)p, n); }

/* ---- bw_frame_next ---------------------------------------------------------- */

static void test_frame_empty_and_partial_header(void) {
    char buf[4] = {0, 0, 0, 5};
    const char *body = NULL;
    size_t body_len = 99, consumed = 99;
    /* Fewer than 4 bytes: the length is unknown, so only the header is asked for. */
    for (size_t len = 0; len < BW_FRAME_HEADER; len++) {
        CHECK(bw_frame_next(buf, len, 100, &body, &body_len, &consumed) ==
              BW_FRAME_NEED_MORE);
    }
    /* NEED_MORE must not pretend a frame was taken. */
    CHECK(body == NULL);
    CHECK_EQ_SZ(consumed, 99);
}

static void test_frame_partial_body(void) {
    char buf[4 + 10];
    put_header(buf, 10);
    memset(buf + 4, 'x', 10);
    const char *body;
    size_t body_len, consumed;
    /* Every prefix from the bare header to one byte short wants the whole frame. */
    for (size_t len = 4; len < sizeof buf; len++) {
        CHECK(bw_frame_next(buf, len, 100, &body, &body_len, &consumed) ==
              BW_FRAME_NEED_MORE);
    }
}

static void test_frame_exact(void) {
    char buf[4 + 3] = {0, 0, 0, 3, 'a', 'b', 'c'};
    const char *body = NULL;
    size_t body_len = 0, consumed = 0;
    CHECK(bw_frame_next(buf, sizeof buf, 100, &body, &body_len, &consumed) ==
          BW_FRAME_OK);
    CHECK(body == buf + 4); /* in place: no copy of the body */
    CHECK_EQ_SZ(body_len, 3);
    CHECK_EQ_SZ(consumed, 7);
}

static void test_frame_back_to_back(void) {
    /* Pipelined clients put frames back to back; the second must parse from where the
     * first ended, and a trailing partial frame must be left alone. */
    char buf[7 + 6 + 2] = {0, 0, 0, 3, 'a', 'b', 'c', 0, 0, 0, 2, 'd', 'e', 0, 0};
    const char *body;
    size_t body_len, consumed, off = 0;
    CHECK(bw_frame_next(buf, sizeof buf, 100, &body, &body_len, &consumed) ==
          BW_FRAME_OK);
    CHECK(body_len == 3 && memcmp(body, "abc", 3) == 0);
    off += consumed;
    CHECK(bw_frame_next(buf + off, sizeof buf - off, 100, &body, &body_len, &consumed) ==
          BW_FRAME_OK);
    CHECK(body_len == 2 && memcmp(body, "de", 2) == 0);
    CHECK_EQ_SZ(consumed, 6);
    off += consumed;
    CHECK(bw_frame_next(buf + off, sizeof buf - off, 100, &body, &body_len, &consumed) ==
          BW_FRAME_NEED_MORE);
}

static void test_frame_length_limits(void) {
    enum { MAX = 16 };
    char buf[4 + MAX + 1];
    memset(buf, 'y', sizeof buf);
    const char *body;
    size_t body_len, consumed;

    /* Exactly max is allowed: first asked for in full, then accepted. */
    put_header(buf, MAX);
    CHECK(bw_frame_next(buf, 4, MAX, &body, &body_len, &consumed) == BW_FRAME_NEED_MORE);
    CHECK(bw_frame_next(buf, 4 + MAX, MAX, &body, &body_len, &consumed) == BW_FRAME_OK);
    CHECK_EQ_SZ(body_len, MAX);

    /* max+1 is refused from the header alone, before any body byte is buffered; the
     * server relies on this to never allocate for a hostile length. */
    put_header(buf, MAX + 1);
    CHECK(bw_frame_next(buf, 4, MAX, &body, &body_len, &consumed) == BW_FRAME_TOO_LARGE);
    CHECK(bw_frame_next(buf, sizeof buf, MAX, &body, &body_len, &consumed) ==
          BW_FRAME_TOO_LARGE);

    /* The largest announceable length against the production default. */
    put_header(buf, UINT32_MAX);
    CHECK(bw_frame_next(buf, 4, BW_DEFAULT_MAX_FRAME, &body, &body_len, &consumed) ==
          BW_FRAME_TOO_LARGE);
    put_header(buf, BW_DEFAULT_MAX_FRAME);
    CHECK(bw_frame_next(buf, 4, BW_DEFAULT_MAX_FRAME, &body, &body_len, &consumed) ==
          BW_FRAME_NEED_MORE);
}

static void test_frame_zero_length(void) {
    /* An empty body is a frame (it decodes as a bad frame later, not here), even with a
     * limit of zero. */
    char buf[4] = {0, 0, 0, 0};
    const char *body = NULL;
    size_t body_len = 99, consumed = 0;
    CHECK(bw_frame_next(buf, 4, 0, &body, &body_len, &consumed) == BW_FRAME_OK);
    CHECK_EQ_SZ(body_len, 0);
    CHECK_EQ_SZ(consumed, 4);
    CHECK(body == buf + 4);
}

/* ---- struct bw_buf ---------------------------------------------------------- */

/* Deterministic xorshift so failures reproduce. */
static uint32_t rng_state = 0x12345678u;
static uint32_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static void test_buf_many_small_ops(void) {
    /* Simulates a long-lived connection: lots of small reads and frame-sized consumes.
     * Every byte is a running counter, so any data lost or reordered by compaction
     * shows up as a mismatch. */
    struct bw_buf b = {0};
    uint8_t wr = 0, rd = 0;
    size_t max_cap = 0, max_live = 0;
    int bad_data = 0, bad_room = 0;
    for (int i = 0; i < 200000; i++) {
        size_t add = rng() % 97;
        if (bw_buf_reserve(&b, add) < 0) {
            CHECK(!"bw_buf_reserve failed");
            break;
        }
        if (b.cap - b.start - b.len < add)
            bad_room++;
        char *t = bw_buf_tail(&b);
        for (size_t k = 0; k < add; k++)
            t[k] = (char)wr++;
        b.len += add;
        if (b.len > max_live)
            max_live = b.len;
        size_t take = rng() % 101;
        if (take > b.len)
            take = b.len;
        const char *h = bw_buf_head(&b);
        for (size_t k = 0; k < take; k++)
            if ((uint8_t)h[k] != rd++)
                bad_data++;
        bw_buf_consume(&b, take);
        if (b.cap > max_cap)
            max_cap = b.cap;
    }
    CHECK(bad_data == 0);
    CHECK(bad_room == 0);
    /* The live data stays small, so compaction (not growth) must absorb the churn. */
    CHECK(max_live < 4096);
    CHECK_EQ_SZ(max_cap, 4096);
    /* Whatever is left is still intact. */
    const char *h = bw_buf_head(&b);
    for (size_t k = 0; k < b.len; k++)
        if ((uint8_t)h[k] != (uint8_t)(rd + k))
            bad_data++;
    CHECK(bad_data == 0);
    bw_buf_free(&b);
    CHECK(b.data == NULL && b.cap == 0 && b.len == 0 && b.start == 0);
}

static void test_buf_compaction_and_growth(void) {
    struct bw_buf b = {0};
    CHECK(bw_buf_reserve(&b, 10) == 0);
    CHECK_EQ_SZ(b.cap, 4096);
    memcpy(bw_buf_tail(&b), "0123456789", 10);
    b.len = 10;

    /* Consuming part leaves the rest in place (no memmove per consume). */
    bw_buf_consume(&b, 4);
    CHECK_EQ_SZ(b.start, 4);
    CHECK(memcmp(bw_buf_head(&b), "456789", 6) == 0);

    /* A reserve that fits only after compaction slides the data down, keeps it, and
     * does not grow. */
    char *old = b.data;
    CHECK(bw_buf_reserve(&b, 4096 - 6) == 0);
    CHECK_EQ_SZ(b.start, 0);
    CHECK_EQ_SZ(b.cap, 4096);
    CHECK(b.data == old);
    CHECK(memcmp(bw_buf_head(&b), "456789", 6) == 0);

    /* One byte more must grow (doubling) and still keep the data. */
    CHECK(bw_buf_reserve(&b, 4096 - 6 + 1) == 0);
    CHECK_EQ_SZ(b.cap, 8192);
    CHECK(memcmp(bw_buf_head(&b), "456789", 6) == 0);

    /* Draining resets the offset so the next read starts at the front. */
    bw_buf_consume(&b, 6);
    CHECK_EQ_SZ(b.len, 0);
    CHECK_EQ_SZ(b.start, 0);

    /* A large frame reservation in one step (the server reserves whole bodies). */
    CHECK(bw_buf_reserve(&b, 1u << 20) == 0);
    CHECK(b.cap - b.start - b.len >= (1u << 20));
    bw_buf_free(&b);
}

static void test_buf_reserve_impossible(void) {
    /* A request that cannot be met must fail, not wrap around and claim success. */
    struct bw_buf b = {0};
    CHECK(bw_buf_reserve(&b, SIZE_MAX) == -1);
    CHECK(bw_buf_reserve(&b, 5) == 0);
    memcpy(bw_buf_tail(&b), "hello", 5);
    b.len = 5;
    CHECK(bw_buf_reserve(&b, SIZE_MAX) == -1);
    CHECK(bw_buf_reserve(&b, SIZE_MAX - 2) == -1);
    CHECK(b.len == 5 && memcmp(bw_buf_head(&b), "hello", 5) == 0);
    bw_buf_free(&b);
}

/* ---- bw_frame_begin / bw_frame_end ------------------------------------------ */

static void test_frame_begin_end_round_trip(void) {
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);

    /* Two frames in one buffer: the second header sits at a non-zero offset, which is
     * how responses to pipelined requests are batched. */
    size_t h1 = bw_frame_begin(&sb);
    CHECK_EQ_SZ(h1, 0);
    msgpack_pack_map(&pk, 2);
    bw_mp_kv_str(&pk, "type", "ping");
    bw_mp_kv_int(&pk, "id", -7);
    CHECK(bw_frame_end(&sb, h1) == 0);
    size_t h2 = bw_frame_begin(&sb);
    CHECK_EQ_SZ(h2, sb.size - 4);
    msgpack_pack_map(&pk, 3);
    bw_mp_kv_bool(&pk, "ok", true);
    bw_mp_kv_double(&pk, "x", 1.5);
    bw_mp_kv_str(&pk, "s", "");
    CHECK(bw_frame_end(&sb, h2) == 0);

    const char *body;
    size_t body_len, consumed, off = 0;
    msgpack_zone zone;
    msgpack_zone_init(&zone, 1024);
    msgpack_object o;

    CHECK(bw_frame_next(sb.data, sb.size, 1024, &body, &body_len, &consumed) ==
          BW_FRAME_OK);
    CHECK_EQ_SZ(consumed, h2);
    if (CHECK(bw_mp_unpack_exact(body, body_len, &zone, &o) == 0)) {
        CHECK(bw_mp_is_str(bw_mp_get(&o, "type"), "ping"));
        const msgpack_object *id = bw_mp_get(&o, "id");
        CHECK(id && id->type == MSGPACK_OBJECT_NEGATIVE_INTEGER && id->via.i64 == -7);
    }
    off = consumed;
    CHECK(bw_frame_next(sb.data + off, sb.size - off, 1024, &body, &body_len, &consumed) == BW_FRAME_OK);
    CHECK_EQ_SZ(off + consumed, sb.size);
    if (CHECK(bw_mp_unpack_exact(body, body_len, &zone, &o) == 0)) {
        CHECK(bw_mp_true(bw_mp_get(&o, "ok")));
        CHECK(bw_mp_num(bw_mp_get(&o, "x"), 0) == 1.5);
        CHECK(bw_mp_is_str(bw_mp_get(&o, "s"), ""));
    }

    /* An empty frame still gets a valid (zero) header. */
    size_t h3 = bw_frame_begin(&sb);
    CHECK(bw_frame_end(&sb, h3) == 0);
    CHECK(bw_load_be32((unsigned char *)sb.data + h3) == 0);

    /* A body over 4 GiB cannot be described by the header. Faking the size avoids
     * allocating 4 GiB; bw_frame_end must refuse before writing anything. */
    size_t h4 = bw_frame_begin(&sb);
    size_t real = sb.size;
    sb.size = h4 + BW_FRAME_HEADER + (size_t)UINT32_MAX + 1;
    CHECK(bw_frame_end(&sb, h4) == -1);
    sb.size = h4 + BW_FRAME_HEADER + (size_t)UINT32_MAX;
    CHECK(bw_frame_end(&sb, h4) == 0); /* exactly 4 GiB - 1 still fits */
    CHECK(bw_load_be32((unsigned char *)sb.data + h4) == UINT32_MAX);
    sb.size = real;

    msgpack_zone_destroy(&zone);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- bw_mp_unpack_exact ----------------------------------------------------- */

static int unpack(const char *buf, size_t len) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 256);
    msgpack_object o;
    int rc = bw_mp_unpack_exact(buf, len, &zone, &o);
    msgpack_zone_destroy(&zone);
    return rc;
}

static void test_unpack_exact_errors(void) {
    /* {"a": 1} */
    const char ok[] = {(char)0x81, (char)0xa1, 'a', 0x01};
    CHECK(unpack(ok, sizeof ok) == 0);

    /* Trailing bytes: one frame must hold exactly one value. */
    const char trail[] = {(char)0x81, (char)0xa1, 'a', 0x01, (char)0xc0};
    CHECK(unpack(trail, sizeof trail) == -1);

    /* Every strict prefix of a valid value is truncated, including the empty body. */
    const char longer[] = {(char)0x82, (char)0xa1, 'a', (char)0xcd, 0x01, 0x00,
                           (char)0xa1, 'b', (char)0xc4, 0x02, 'x', 'y'};
    CHECK(unpack(longer, sizeof longer) == 0);
    int bad_prefix = 0;
    for (size_t n = 0; n < sizeof longer; n++)
        if (unpack(longer, n) != -1)
            bad_prefix++;
    CHECK(bad_prefix == 0);

    /* 0xc1 is the one byte msgpack never uses. */
    const char never[] = {(char)0xc1};
    CHECK(unpack(never, 1) == -1);
    const char in_map[] = {(char)0x81, (char)0xa1, 'a', (char)0xc1};
    CHECK(unpack(in_map, sizeof in_map) == -1);

    /* A str32 claiming 4 GiB against a few bytes must fail, not read past the end. */
    const char huge_str[] = {(char)0xdb, (char)0xff, (char)0xff, (char)0xff, (char)0xff, 'x'};
    CHECK(unpack(huge_str, sizeof huge_str) == -1);
}

/* `depth` nested containers (arrays, or maps when `maps`) around a scalar. */
static int unpack_nested(int depth, int maps) {
    char buf[256];
    size_t n = 0;
    for (int i = 0; i < depth; i++) {
        if (maps) {
            buf[n++] = (char)0x81; /* {0: ...} */
            buf[n++] = 0x00;
        } else {
            buf[n++] = (char)0x91; /* [...] */
        }
    }
    buf[n++] = 0x2a;
    return unpack(buf, n);
}

static void test_unpack_exact_nesting(void) {
    /* The decoder's limit is msgpack-c's fixed stack of 32 containers; anything deeper
     * must be a clean error rather than unbounded work. */
    CHECK(unpack_nested(1, 0) == 0);
    CHECK(unpack_nested(31, 0) == 0);
    CHECK(unpack_nested(32, 0) == 0);
    CHECK(unpack_nested(33, 0) == -1);
    CHECK(unpack_nested(100, 0) == -1);
    CHECK(unpack_nested(31, 1) == 0);
    CHECK(unpack_nested(33, 1) == -1);
}

/* ---- bw_mp_get / bw_mp_is_str / bw_mp_strdup ------------------------------- */

static void test_mp_accessors(void) {
    /* {"abc": "hello world", "ab": 1, 5: "int key", "bin": b"xyz"} */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    bw_mp_kv_str(&pk, "abc", "hello world");
    bw_mp_kv_int(&pk, "ab", 1);
    msgpack_pack_int(&pk, 5);
    bw_mp_str(&pk, "int key");
    bw_mp_str(&pk, "bin");
    msgpack_pack_bin(&pk, 3);
    msgpack_pack_bin_body(&pk, "xyz", 3);

    msgpack_zone zone;
    msgpack_zone_init(&zone, 256);
    msgpack_object m;
    if (!CHECK(bw_mp_unpack_exact(sb.data, sb.size, &zone, &m) == 0))
        goto out;

    const msgpack_object *v = bw_mp_get(&m, "abc");
    CHECK(bw_mp_is_str(v, "hello world"));
    /* Keys match whole, never by prefix. */
    CHECK(!bw_mp_is_str(v, "hello"));
    CHECK(!bw_mp_is_str(v, "hello world!"));
    const msgpack_object *ab = bw_mp_get(&m, "ab");
    CHECK(ab && ab->type == MSGPACK_OBJECT_POSITIVE_INTEGER && ab->via.u64 == 1);
    CHECK(bw_mp_get(&m, "a") == NULL);
    CHECK(bw_mp_get(&m, "") == NULL);
    /* Non-str keys are skipped, not mistaken for a str. */
    CHECK(bw_mp_get(&m, "5") == NULL);
    /* bin with the right bytes is still not a str. */
    CHECK(!bw_mp_is_str(bw_mp_get(&m, "bin"), "xyz"));
    /* Lookups on the wrong type or nothing at all are NULL, not a crash. */
    CHECK(bw_mp_get(v, "abc") == NULL);
    CHECK(bw_mp_get(NULL, "abc") == NULL);
    CHECK(!bw_mp_is_str(NULL, ""));

    char buf[16];
    CHECK(bw_mp_strdup(v, buf, sizeof buf) == buf);
    CHECK(strcmp(buf, "hello world") == 0);
    /* Truncation keeps the NUL inside cap. */
    memset(buf, 'Z', sizeof buf);
    CHECK(bw_mp_strdup(v, buf, 4) == buf);
    CHECK(strcmp(buf, "hel") == 0);
    CHECK(buf[4] == 'Z');
    CHECK(bw_mp_strdup(v, buf, 1) == buf && buf[0] == '\0');
    CHECK(bw_mp_strdup(v, buf, 12) == buf && strcmp(buf, "hello world") == 0);
    CHECK(bw_mp_strdup(v, buf, 11) == buf && strcmp(buf, "hello worl") == 0);
    CHECK(bw_mp_strdup(v, buf, 0) == NULL);
    CHECK(bw_mp_strdup(ab, buf, sizeof buf) == NULL);
    CHECK(bw_mp_strdup(bw_mp_get(&m, "bin"), buf, sizeof buf) == NULL);
    CHECK(bw_mp_strdup(NULL, buf, sizeof buf) == NULL);

    /* Numeric and bool helpers fall back rather than misread other types. */
    CHECK(bw_mp_num(ab, -1) == 1.0);
    CHECK(bw_mp_num(v, -1) == -1.0);
    CHECK(bw_mp_num(NULL, 3.5) == 3.5);
    CHECK(!bw_mp_true(ab));
    CHECK(!bw_mp_true(NULL));
out:
    msgpack_zone_destroy(&zone);
    msgpack_sbuffer_destroy(&sb);
}

/* ---- ids -------------------------------------------------------------------- */

static int is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

static int valid_uuid4(const char *s) {
    if (strlen(s) != 36)
        return 0;
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return 0;
        } else if (!is_hex(s[i])) {
            return 0;
        }
    }
    return s[14] == '4' && strchr("89ab", s[19]) != NULL;
}

static int cmp_id(const void *a, const void *b) { return memcmp(a, b, BW_ID_LEN); }

static void test_id_format_and_uniqueness(void) {
    enum { N = 100000 };
    char(*ids)[BW_ID_LEN] = malloc((size_t)N * BW_ID_LEN);
    if (!CHECK(ids != NULL))
        return;
    int bad_format = 0, dups = 0;
    for (int i = 0; i < N; i++) {
        bw_id_new(ids[i]);
        if (!valid_uuid4(ids[i])) {
            if (!bad_format)
                fprintf(stderr, "  bad id: %s\n", ids[i]);
            bad_format++;
        }
    }
    CHECK(bad_format == 0);
    qsort(ids, N, BW_ID_LEN, cmp_id);
    for (int i = 1; i < N; i++)
        if (memcmp(ids[i - 1], ids[i], BW_ID_LEN) == 0)
            dups++;
    CHECK(dups == 0);
    free(ids);
}

/* Run bw_id_new in a forked child (optionally reseeding first) and return its id. A
 * fork is exactly what a CRIU restore looks like to the generator: same memory,
 * same state. */
static int id_in_child(int reseed, char out[BW_ID_LEN]) {
    int p[2];
    if (pipe(p) < 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        char id[BW_ID_LEN];
        if (reseed)
            bw_id_reseed();
        bw_id_new(id);
        _exit(bw_write_full(p[1], id, BW_ID_LEN) == 0 ? 0 : 1);
    }
    close(p[1]);
    int rc = bw_read_full(p[0], out, BW_ID_LEN);
    close(p[0]);
    int st;
    if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        rc = -1;
    return rc;
}

static void test_id_reseed(void) {
    char parent[BW_ID_LEN], same[BW_ID_LEN], fresh[BW_ID_LEN];
    bw_id_new(parent); /* make sure the generator is seeded before forking */
    CHECK(id_in_child(0, same) == 0);
    CHECK(id_in_child(1, fresh) == 0);
    bw_id_new(parent);
    /* Without a reseed a copy of the process repeats the parent's next id (the
     * restore hazard); with one it does not. */
    CHECK(memcmp(parent, same, BW_ID_LEN) == 0);
    CHECK(memcmp(parent, fresh, BW_ID_LEN) != 0);
    CHECK(valid_uuid4(fresh));

    /* Reseeding in-process also moves to an unrelated stream. */
    char a[BW_ID_LEN], b[BW_ID_LEN];
    bw_id_reseed();
    bw_id_new(a);
    bw_id_reseed();
    bw_id_new(b);
    CHECK(memcmp(a, b, BW_ID_LEN) != 0);
}

/* ---- bw_ctl_recv --------------------------------------------------------------- */

/* A peer that sends a header and part of the body, then stalls: the timeout bounds the
 * whole message (the host reads its supervisor's messages with it). Run in a
 * child so that a receive that blocks for good fails the test instead of hanging it. */
static void test_ctl_recv_timeout_covers_the_body(void) {
    int sv[2];
    if (!CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0))
        return;
    char msg[4 + 10] = {0};
    put_header(msg, 100); /* 100 announced, 10 sent */
    CHECK(write(sv[1], msg, sizeof msg) == (ssize_t)sizeof msg);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(5);
        char *body;
        size_t len;
        int fds[BW_CTL_MAX_FDS], nfds;
        double t = bw_now_ms();
        int rc = bw_ctl_recv(sv[0], &body, &len, fds, &nfds, 200);
        double took = bw_now_ms() - t;
        _exit(rc == -1 && errno == ETIMEDOUT && took >= 150 && took < 2000 ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(sv[0]);
    close(sv[1]);
}

/* The supervisor's loop reads its hosts with bw_ctl_read_some: a header and part of the
 * body, then silence, must return at once (0, the age of the message known), and the
 * rest, when it comes, complete the message; a frame announcing more than
 * BW_CTL_MAX_MSG is refused; a closed peer is EPIPE. In a child: a read that blocks
 * fails the test instead of hanging it. */
static int read_some_child(int sock, int peer) {
    struct bw_ctl_reader rd = {0};
    char *body = NULL, msg[4 + 10] = {0}, rest[90];
    size_t len = 0;
    put_header(msg, 100); /* 100 announced, 10 sent */
    memset(rest, 'x', sizeof rest);
    if (write(peer, msg, sizeof msg) != (ssize_t)sizeof msg)
        return 1;
    double t = bw_now_ms();
    if (bw_ctl_read_some(&rd, sock, &body, &len) != 0 || bw_now_ms() - t > 100)
        return 2;
    if (bw_ctl_reader_age(&rd, bw_now_ms() + 1000) < 1000)
        return 3;
    if (write(peer, rest, sizeof rest) != (ssize_t)sizeof rest ||
        bw_ctl_read_some(&rd, sock, &body, &len) != 1 || len != 100 || body[99] != 'x')
        return 4;
    free(body);
    if (bw_ctl_reader_age(&rd, bw_now_ms()) != 0 || bw_ctl_read_some(&rd, sock, &body, &len) != 0)
        return 5;
    put_header(msg, BW_CTL_MAX_MSG + 1);
    if (write(peer, msg, 4) != 4 || bw_ctl_read_some(&rd, sock, &body, &len) != -1 ||
        errno != EMSGSIZE)
        return 6;
    bw_ctl_reader_reset(&rd);
    close(peer);
    if (bw_ctl_read_some(&rd, sock, &body, &len) != -1 || errno != EPIPE)
        return 7;
    return 0;
}

static void test_ctl_read_some_never_waits(void) {
    int sv[2];
    if (!CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0))
        return;
    pid_t pid = fork();
    if (pid == 0) {
        alarm(5);
        _exit(read_some_child(sv[0], sv[1]));
    }
    close(sv[0]); /* the child's peer end must be the last one open: EPIPE at its close */
    close(sv[1]);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        fprintf(stderr, "  read_some_child failed at step %d\n", WEXITSTATUS(status));
}

int main(void) {
    RUN(test_frame_empty_and_partial_header);
    RUN(test_frame_partial_body);
    RUN(test_frame_exact);
    RUN(test_frame_back_to_back);
    RUN(test_frame_length_limits);
    RUN(test_frame_zero_length);
    RUN(test_buf_many_small_ops);
    RUN(test_buf_compaction_and_growth);
    RUN(test_buf_reserve_impossible);
    RUN(test_frame_begin_end_round_trip);
    RUN(test_unpack_exact_errors);
    RUN(test_unpack_exact_nesting);
    RUN(test_mp_accessors);
    RUN(test_id_format_and_uniqueness);
    RUN(test_id_reseed);
    RUN(test_ctl_recv_timeout_covers_the_body);
    RUN(test_ctl_read_some_never_waits);
    return TEST_SUMMARY();
}
