/* scrub.h - keeping secrets out of checkpoint images.
 *
 * Secrets reach the host through its environment and are read by on_start. Before the
 * dump every copy the runtime knows of must be gone, and "gone" means overwritten:
 * freed memory is dumped too. Three places hold copies:
 *   - the C environment (strings on the initial stack or from setenv),
 *   - os.environ / posix.environ (bytes objects),
 *   - freed Python memory that once held a decoded str (os.environ["X"] makes one).
 * The last is handled by an allocator wrapper that zeroes every block Python frees
 * until the dump is done. Copies the app keeps itself are the app's (docs/checkpoint.md).
 */
#ifndef BW_SCRUB_H
#define BW_SCRUB_H

#include <stdbool.h>

/* Wrap CPython's allocators (all three domains). Call after Py_PreInitialize and
 * before Py_InitializeFromConfig; zeroing starts enabled. */
void bw_scrub_install(void);
/* Zeroing on free on/off (off once the image is written: it only costs time then). */
void bw_scrub_set(bool on);
/* Overwrite the value of NAME in the C environment, then unset it. */
void bw_scrub_environ(const char *name);

#endif
