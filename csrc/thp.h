/* thp.h - back a restored replica's large anonymous regions with huge pages (thp.c). */
#ifndef BW_THP_H
#define BW_THP_H

#include <sys/types.h>

/* In a background thread at the lowest priority, MADV_COLLAPSE (process_madvise) every
 * private anonymous region of pid of 2 MiB or more into huge pages, then log what it
 * did. Returns at once; a failure to start is logged. */
void bw_thp_collapse_async(pid_t pid);

#endif
