/* workingset.h - record the pages a lazy restore's first moments touch and restore
 * them eagerly from then on (workingset.c). */
#ifndef BW_WORKINGSET_H
#define BW_WORKINGSET_H

#include <stddef.h>

#include "checkpoint.h"

/* Whether the image in ckdir (a key's directory) has its working set recorded. */
int bw_ws_recorded(const char *ckdir);
/* From the log of a finished page daemon run at -v4: mark the pages it faulted in as
 * eager in the image, rehash what changed, write <key>/workingset.bin. 0, or -1 with
 * a reason (the image stays as it was, or is rewritten consistently). Recordings run one
 * at a time; one of an image already recorded does nothing. */
int bw_ws_record(const struct bw_ckpt *c, const char *daemon_log, char *err, size_t errlen);

/* After a dump: warn when CRIU marked no page of the image in imgdir lazy. */
void bw_ws_check_dump(const char *imgdir);

#endif
