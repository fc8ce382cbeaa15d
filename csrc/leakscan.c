/* leakscan.c - refuse an image that holds a secret's value.
 *
 * Before the dump the host drops the declared secrets from its environment and zeroes
 * the memory it frees (app.c, scrub.c). It cannot see copies the app or a library kept:
 * a token stored in a client object, an os.environ.copy() taken in on_start. The
 * supervisor knows the values, so it reads the image it has just written (still in the
 * page cache) and looks for each; an image that holds one is removed before any replica
 * can restore it (replica.c, do_checkpoint). */
#define _GNU_SOURCE
#include "leakscan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* 1: values[*which] is in the file; 0: none is; -1: it cannot be read. */
static int scan_file(int dirfd, const char *name, const char *const *values, size_t n,
                     size_t *which) {
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    int rc = 0;
    if (S_ISREG(st.st_mode) && st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            rc = -1;
        } else {
            for (size_t i = 0; i < n && rc == 0; i++)
                if (memmem(p, (size_t)st.st_size, values[i], strlen(values[i]))) {
                    *which = i;
                    rc = 1;
                }
            munmap(p, (size_t)st.st_size);
        }
    }
    close(fd);
    return rc;
}

int bw_leakscan_dir(const char *dir, const char *const *values, size_t n, size_t *which,
                    char *file, size_t filecap) {
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(file, filecap, "%s", dir);
        return -1;
    }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        rc = scan_file(dirfd(d), e->d_name, values, n, which);
        if (rc != 0)
            snprintf(file, filecap, "%s", e->d_name);
    }
    closedir(d);
    return rc;
}
