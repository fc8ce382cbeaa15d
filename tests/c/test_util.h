/* test_util.h - a minimal assertion kit shared by the C unit tests.
 *
 * No framework on purpose: the tests must build wherever beamcore builds, with
 * nothing else installed. A failed check reports and continues (so one run shows
 * every broken behaviour), and TEST_SUMMARY() turns any failure into exit status 1
 * so ctest sees it. The last line is always "N passed, M failed". */
#ifndef BW_TEST_UTIL_H
#define BW_TEST_UTIL_H

#include <stdio.h>
#include <string.h>

static int t_passed, t_failed;

/* Returns the condition so a test can stop early when later steps depend on it. */
#define CHECK(cond) t_check(!!(cond), #cond, __FILE__, __LINE__)
#define CHECK_EQ_SZ(a, b) t_check_sz((size_t)(a), (size_t)(b), #a " == " #b, __FILE__, __LINE__)
#define CHECK_STR_CONTAINS(hay, needle)                                                    \
    t_check_contains((hay), (needle), #hay " contains \"" needle "\"", __FILE__, __LINE__)

static inline int t_check(int ok, const char *what, const char *file, int line) {
    if (ok) {
        t_passed++;
    } else {
        t_failed++;
        fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what);
    }
    return ok;
}

static inline int t_check_sz(size_t a, size_t b, const char *what, const char *file, int line) {
    if (a != b)
        fprintf(stderr, "  (got %zu, expected %zu)\n", a, b);
    return t_check(a == b, what, file, line);
}

static inline int t_check_contains(const char *hay, const char *needle, const char *what,
                            const char *file, int line) {
    int ok = hay && strstr(hay, needle) != NULL;
    if (!ok)
        fprintf(stderr, "  (got \"%s\")\n", hay ? hay : "(null)");
    return t_check(ok, what, file, line);
}

/* Each test function runs under its name so a FAIL line can be traced to it. */
#define RUN(fn)                                                                            \
    do {                                                                                   \
        int before_ = t_failed;                                                            \
        fn();                                                                              \
        if (t_failed != before_)                                                           \
            fprintf(stderr, "  in %s\n", #fn);                                             \
    } while (0)

#define TEST_SUMMARY()                                                                     \
    (printf("%d passed, %d failed\n", t_passed, t_failed), t_failed ? 1 : 0)

#endif
