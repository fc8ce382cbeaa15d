/* accesslog.h - one line per HTTP response on stderr (--access-log), text or JSON
 * (--json-logs), written like log.c's lines: whole, with one write(2). */
#ifndef BW_ACCESSLOG_H
#define BW_ACCESSLOG_H

#include <stdbool.h>

void bw_access_log(bool json, const char *method, const char *path, int status, double ms,
                   const char *task_id);

#endif
