/* util.h - small helpers shared by every part of beam-worker. */
#ifndef BW_UTIL_H
#define BW_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BW_VERSION "0.1.0"

/* Monotonic clock in milliseconds, as a double so phases keep sub-ms precision. */
double bw_now_ms(void);

/* Task and container ids: random UUID4 strings (37 bytes with the NUL).
 * The generator is seeded from getrandom(); bw_id_reseed() must run after every
 * restore, otherwise all replicas of one image would hand out the same ids. */
#define BW_ID_LEN 37
void bw_id_reseed(void);
void bw_id_new(char out[BW_ID_LEN]);

/* Read/write exactly n bytes, retrying on EINTR and short transfers. 0 or -1 (errno). */
int bw_read_full(int fd, void *buf, size_t n);
int bw_write_full(int fd, const void *buf, size_t n);

/* A sliding-window event budget: times[] holds the last *n events (at most max). Records
 * an event at now and returns true unless max events already fell within window_ms. */
bool bw_window_admit(double *times, int *n, int max, double window_ms, double now);

/* "exited with status N" or "was killed by signal N (NAME)" for a wait status. */
void bw_describe_status(int status, char *buf, size_t cap);

/* The whole of path, malloc'd and NUL-terminated (not counted in *len), when it opens and
 * holds fewer than max bytes; else NULL. */
void *bw_read_file(const char *path, size_t max, size_t *len);
/* Replaces path with buf whole or not at all: written to path.tmp (0600), fsync'd,
 * renamed over it. 0, or -1 and errno (the temporary removed). */
int bw_write_replace(const char *path, const void *buf, size_t len);

/* rm -rf: a directory tree, or a file; errors are ignored (what is left stays). */
void bw_rm_rf(const char *path);

/* A private directory dir/<prefix><pid>-XXXXXX (0700) for this process, its name into
 * path: returns the descriptor that holds an flock on it as long as the process lives
 * (keep it open), or -1 and errno. First removes those whose makers are gone: a process
 * killed with SIGKILL cannot remove what it made, so the next one of its kind does. */
int bw_private_dir(const char *dir, const char *prefix, char *path, size_t cap);

/* The sum of the values of the lines of a /proc file that match a scanf format with
 * one %llu (e.g. "AnonHugePages: %llu"); 0 when the file cannot be read. */
unsigned long long bw_proc_sum(const char *path, const char *fmt);

/* Big-endian 32-bit helpers for frame headers. */
static inline uint32_t bw_load_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void bw_store_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

#endif
