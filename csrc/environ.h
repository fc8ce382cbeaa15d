/* environ.h - what of the supervisor's environment a host may see (environ.c). */
#ifndef BW_ENVIRON_H
#define BW_ENVIRON_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* Names from --pass-env, allowed in addition to the built-in list (kept, not copied). */
void bw_env_pass(const char *const *names, int n);
/* Whether "NAME=value" (or "NAME") may reach the host. */
bool bw_env_allowed(const char *entry);
/* The host's exec environment: pointers into ours, NULL-terminated, calloc'd (free the
 * array only). *n (may be NULL) is set to the count. NULL when out of memory. */
char **bw_env_host(size_t *n);
/* Pack that environment as one map of n entries; returns n. */
size_t bw_env_pack_host(msgpack_packer *pk);
/* Print, sorted, the NAME=value lines of that environment that a checkpoint image
 * depends on (read at start-up or import, so frozen in it). 0 or -1. */
int bw_env_print_image(FILE *f);
/* Names in our environment that no host sees (neither allowed nor in declared[]): a
 * comma-separated list in buf (truncated to cap), and their count. */
size_t bw_env_dropped(const char *const *declared, size_t ndeclared, char *buf, size_t cap);

#endif
