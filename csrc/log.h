/* log.h - one line per event on stderr, human or JSON (--json-logs). */
#ifndef BW_LOG_H
#define BW_LOG_H

#include <stdbool.h>
#include <stddef.h>

enum bw_log_level { BW_LOG_DEBUG, BW_LOG_INFO, BW_LOG_WARN, BW_LOG_ERROR };

void bw_log_init(const char *who, int json);
/* Whether lines are JSON (--json-logs). */
bool bw_log_json(void);
/* Where whole lines go instead of write(2) on stderr (NULL: back to that). The
 * supervisor sends them through output.c, which never blocks. */
void bw_log_set_sink(void (*sink)(const char *line, size_t len));
void bw_log(enum bw_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define bw_info(...) bw_log(BW_LOG_INFO, __VA_ARGS__)
#define bw_warn(...) bw_log(BW_LOG_WARN, __VA_ARGS__)
#define bw_error(...) bw_log(BW_LOG_ERROR, __VA_ARGS__)
#define bw_debug(...) bw_log(BW_LOG_DEBUG, __VA_ARGS__)

#endif
