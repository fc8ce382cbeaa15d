/* leakscan.h - look for secret values in an image's files (leakscan.c). */
#ifndef BW_LEAKSCAN_H
#define BW_LEAKSCAN_H

#include <stddef.h>

/* Search every file directly in dir for each of the n values. 1: values[*which] found
 * in `file`; 0: none found; -1: `file` could not be read. */
int bw_leakscan_dir(const char *dir, const char *const *values, size_t n, size_t *which,
                    char *file, size_t filecap);

#endif
