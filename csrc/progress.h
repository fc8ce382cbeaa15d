/* progress.h - progress of a long dump or restore, on a terminal or as JSON events. */
#ifndef BW_PROGRESS_H
#define BW_PROGRESS_H

#include <stdbool.h>

struct bw_progress {
    const char *what;          /* "checkpointing", "restoring" */
    unsigned long long total;  /* bytes expected (an estimate for a dump) */
    double t0;
    bool tty, shown;
};

void bw_progress_begin(struct bw_progress *p, const char *what, unsigned long long total);
/* done bytes so far; shows nothing during the first second. */
void bw_progress_update(struct bw_progress *p, unsigned long long done);
/* Ends the terminal line if one was drawn. */
void bw_progress_end(struct bw_progress *p);

#endif
