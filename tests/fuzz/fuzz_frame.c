/* fuzz_frame.c - libFuzzer target: the wire framing and the msgpack request lookups.
 *
 * Input: 2 bytes that seed the read-size generator, then the byte stream a client
 * sends. The stream goes through a struct bw_buf the way server.c reads it (reserve
 * the announced frame once its header is in, append reads of pseudo-random sizes,
 * bw_frame_next in a loop, consume), and every frame body through bw_mp_unpack_exact
 * and the bw_mp_* lookups request.c does. Checked properties (abort() on violation):
 *   - the frames found do not depend on how the stream was split into reads;
 *   - NEED_MORE asks for more than is buffered, OK frames lie inside the buffer;
 *   - TOO_LARGE happens exactly when the announced length is above the maximum. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "mp.h"
#include "util.h"

#define MAX_BODY (1u << 20) /* 1 MiB: small, so hostile lengths hit TOO_LARGE often */
#define MAX_FRAMES 4096

#define FAIL(...)                                                  \
    do {                                                           \
        fprintf(stderr, "fuzz_frame: " __VA_ARGS__);               \
        fputc('\n', stderr);                                       \
        abort();                                                   \
    } while (0)

struct result {
    size_t off[MAX_FRAMES], len[MAX_FRAMES];
    size_t n;
    int end; /* 0: ran out of input, 1: TOO_LARGE */
};

static void inspect_body(const char *body, size_t len) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 256);
    msgpack_object o;
    if (bw_mp_unpack_exact(body, len, &zone, &o) == 0) {
        /* What request.c looks at. bw_mp_get on a non-map must say "absent". */
        const msgpack_object *id = bw_mp_get(&o, "id");
        const msgpack_object *type = bw_mp_get(&o, "type");
        const msgpack_object *kw = bw_mp_get(&o, "kwargs");
        const msgpack_object *hd = bw_mp_get(&o, "headers");
        if (o.type != MSGPACK_OBJECT_MAP && (id || type || kw || hd))
            FAIL("bw_mp_get found a key in a non-map");
        char small[8], big[64];
        const char *s = bw_mp_strdup(type, small, sizeof small);
        if (s && strlen(s) >= sizeof small)
            FAIL("bw_mp_strdup overran its buffer");
        if (bw_mp_strdup(type, big, 0))
            FAIL("bw_mp_strdup with cap 0 returned a string");
        (void)bw_mp_strdup(id, big, sizeof big);
        volatile double d = bw_mp_num(bw_mp_get(kw, "timeout"), -1.0);
        (void)d;
        volatile bool t = bw_mp_true(bw_mp_get(hd, "x")) || bw_mp_is_str(type, "call") ||
                          bw_mp_is_str(type, "ping") || bw_mp_is_str(type, "stats");
        (void)t;
        if (kw && kw->type == MSGPACK_OBJECT_MAP)
            for (uint32_t i = 0; i < kw->via.map.size; i++)
                (void)bw_mp_get(kw, kw->via.map.ptr[i].key.type == MSGPACK_OBJECT_STR ? "a" : "");
    }
    msgpack_zone_destroy(&zone);
}

/* All at once: the reference answer. */
/* What NEED_MORE claims: no whole frame (header and announced body) is buffered. */
static bool incomplete(const char *p, size_t n) {
    return n < BW_FRAME_HEADER || n - BW_FRAME_HEADER < bw_load_be32((const unsigned char *)p);
}

static void parse_whole(const char *data, size_t size, struct result *r) {
    size_t at = 0;
    r->n = 0;
    r->end = 0;
    while (r->n < MAX_FRAMES) {
        const char *body = NULL;
        size_t body_len = 0, consumed = 0;
        enum bw_frame_status st =
            bw_frame_next(data + at, size - at, MAX_BODY, &body, &body_len, &consumed);
        if (st == BW_FRAME_TOO_LARGE) {
            if (size - at < BW_FRAME_HEADER ||
                bw_load_be32((const unsigned char *)data + at) <= MAX_BODY)
                FAIL("TOO_LARGE for an acceptable length");
            r->end = 1;
            return;
        }
        if (st == BW_FRAME_NEED_MORE) {
            if (!incomplete(data + at, size - at))
                FAIL("NEED_MORE with a whole frame of %zu bytes buffered", size - at);
            return;
        }
        if (body != data + at + BW_FRAME_HEADER || consumed != BW_FRAME_HEADER + body_len ||
            consumed > size - at)
            FAIL("OK frame outside the buffer");
        r->off[r->n] = at;
        r->len[r->n++] = body_len;
        inspect_body(body, body_len);
        at += consumed;
    }
}

static uint32_t rng_next(uint32_t *s) { /* xorshift32 */
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

/* In reads of pseudo-random sizes through a bw_buf, like server.c's on_alloc/on_read. */
static void parse_split(const char *data, size_t size, uint32_t seed, struct result *r) {
    struct bw_buf in = {0};
    size_t fed = 0, stream_at = 0; /* stream offset of bw_buf_head */
    r->n = 0;
    r->end = 0;
    for (;;) {
        /* Drain complete frames (server.c only looks once a read has filled the buffer). */
        while (in.data && r->n < MAX_FRAMES) {
            const char *body = NULL;
            size_t body_len = 0, consumed = 0;
            enum bw_frame_status st = bw_frame_next(bw_buf_head(&in), in.len, MAX_BODY, &body,
                                                    &body_len, &consumed);
            if (st == BW_FRAME_TOO_LARGE) {
                r->end = 1;
                bw_buf_free(&in);
                return;
            }
            if (st == BW_FRAME_NEED_MORE) {
                if (!incomplete(bw_buf_head(&in), in.len))
                    FAIL("split: NEED_MORE with a whole frame of %zu bytes buffered", in.len);
                break;
            }
            if (memcmp(body, data + stream_at + BW_FRAME_HEADER, body_len) != 0)
                FAIL("split: frame body differs from the stream");
            r->off[r->n] = stream_at;
            r->len[r->n++] = body_len;
            bw_buf_consume(&in, consumed);
            stream_at += consumed;
        }
        if (r->n == MAX_FRAMES || fed == size)
            break;
        /* on_alloc: 64 KiB, or the rest of an announced frame when that is more. */
        size_t want = 64 * 1024;
        if (in.len >= BW_FRAME_HEADER) {
            size_t body = bw_load_be32((unsigned char *)bw_buf_head(&in));
            if (body <= MAX_BODY && BW_FRAME_HEADER + body > in.len &&
                BW_FRAME_HEADER + body - in.len > want)
                want = BW_FRAME_HEADER + body - in.len;
        }
        if (bw_buf_reserve(&in, want) < 0)
            FAIL("bw_buf_reserve failed for %zu bytes", want);
        size_t room = in.cap - in.start - in.len;
        if (room < want)
            FAIL("bw_buf_reserve gave %zu bytes of room for %zu", room, want);
        /* on_read: the kernel hands over 1..64 bytes, or everything, in one read. */
        uint32_t x = rng_next(&seed);
        size_t n = (x & 7) == 0 ? size - fed : 1 + (x >> 8) % 64;
        if (n > size - fed)
            n = size - fed;
        if (n > room)
            n = room;
        memcpy(bw_buf_tail(&in), data + fed, n);
        in.len += n;
        fed += n;
    }
    bw_buf_free(&in);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2)
        return 0;
    uint32_t seed = ((uint32_t)data[0] << 8 | data[1]) * 2654435761u;
    const char *stream = (const char *)data + 2;
    size -= 2;
    static struct result whole, split;
    parse_whole(stream, size, &whole);
    parse_split(stream, size, seed, &split);
    if (whole.n != split.n || whole.end != split.end)
        FAIL("split reads found %zu frames (end %d), one read %zu (end %d)", split.n, split.end,
             whole.n, whole.end);
    for (size_t i = 0; i < whole.n; i++)
        if (whole.off[i] != split.off[i] || whole.len[i] != split.len[i])
            FAIL("frame %zu differs between split and whole reads", i);
    return 0;
}
