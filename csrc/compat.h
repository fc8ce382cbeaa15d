/* compat.h - the compatibility key: what a machine must share with the one that made an
 * image for a restore to be safe there. The code key (--checkpoint-key) says the program
 * is the same; this says the machine can run its frozen state: a process restored onto
 * a CPU without an instruction set extension its libraries chose at import dies of
 * SIGILL later, one restored onto another kernel, CRIU or glibc may not restore at all.
 *
 * Fields (BEAM_TEST_COMPAT names them; docs/checkpoint.md, "Shared store"):
 *   cpu_flags  the `flags` line of /proc/cpuinfo: the image's must be a subset of ours
 *   kernel     uname release, equal
 *   criu       `criu --version`, equal
 *   glibc      gnu_get_libc_version(), equal
 *   gpu        GPU model and driver release, equal; only when the image has GPU state */
#ifndef BW_COMPAT_H
#define BW_COMPAT_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define BW_COMPAT_HASH_LEN 17 /* 16 hex digits of XXH3-64, and the NUL */

struct bw_compat {
    char cpu_flags[4096];
    char kernel[128];
    char criu[64];
    char glibc[32];
    char gpu[256]; /* "" : no GPU state (image) / not detected yet (here) */
};

/* This machine's values (gpu left empty: bw_compat_detect_gpu fills it when an image
 * needs it), then BEAM_TEST_COMPAT applied. criu: the binary whose version counts;
 * cache_dir: a directory only this user writes, where that version is kept per binary. */
void bw_compat_detect(struct bw_compat *c, const char *criu, const char *cache_dir);
/* The GPU field of this machine (loads the driver); stays "" without a usable GPU. */
void bw_compat_detect_gpu(struct bw_compat *c);
/* The GPU field of an image from its GPU metadata (the "gpu" map of restore.msgpack). */
void bw_compat_set_gpu(struct bw_compat *c, const char *gpu_meta, size_t len);

/* Replace fields by those of spec, "field=value[,field=value...]" (test-only: lets one
 * machine play another). 0, or -1 naming the bad part in err. */
int bw_compat_override(struct bw_compat *c, const char *spec, char *err, size_t cap);

/* 1 if an image made on img can run on here; 0 if not, with the differing fields in why
 * ("kernel: 6.1.0 here, 0.0-test in the image; ..."). */
int bw_compat_check(const struct bw_compat *img, const struct bw_compat *here, char *why,
                    size_t cap);

/* Short identity of a variant, for people and `beam checkpoints ls`. */
void bw_compat_hash(const struct bw_compat *c, char out[BW_COMPAT_HASH_LEN]);

void bw_compat_pack(msgpack_packer *pk, const struct bw_compat *c);
/* 0, or -1 if o is not a compat map. */
int bw_compat_unpack(const msgpack_object *o, struct bw_compat *c);
/* As a JSON object, plus "hash". */
void bw_compat_write_json(FILE *f, const struct bw_compat *c);

#endif
