/* privilege.h - capabilities and namespaces that checkpointing needs (privilege.c). */
#ifndef BW_PRIVILEGE_H
#define BW_PRIVILEGE_H

#include <stdbool.h>
#include <stddef.h>

/* Whether a PID namespace can be created here; if not, why in `why`. */
bool bw_priv_pidns(char *why, size_t cap);
/* The capabilities CRIU needs that this process lacks, comma-separated in buf; their
 * count (0: none missing). */
size_t bw_priv_missing(char *buf, size_t cap);

#endif
