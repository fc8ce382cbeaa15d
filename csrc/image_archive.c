/* image_archive.c - export and import one image as .tar.zst (image_archive.h).
 * libarchive writes and reads the tar and the zstd frames; the image's own manifest
 * (sizes and XXH3 of every file in restore.msgpack) is what an import is verified
 * against. */
#define _GNU_SOURCE
#include "image_archive.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "util.h"

#define BLOCK (1 << 20)

static void say(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "beam-worker: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
}

/* The image must be sound before it travels: a corrupt one would only be refused at
 * the other end. The root and key are those of the local cache. */
static int verify(const char *root, const char *key, const char *dir, char *err, size_t cap) {
    struct bw_ckpt c;
    memset(&c, 0, sizeof c);
    snprintf(c.root, sizeof c.root, "%s", root);
    snprintf(c.key, sizeof c.key, "%s", key);
    snprintf(c.dir, sizeof c.dir, "%s", dir);
    return bw_ckpt_check(&c, NULL, err, cap);
}

/* ---- export ------------------------------------------------------------------------- */

static int add_file(struct archive *a, const char *path, const char *name, char *buf) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    struct archive_entry *e = archive_entry_new();
    archive_entry_set_pathname(e, name);
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0600);
    archive_entry_set_size(e, st.st_size);
    archive_entry_set_mtime(e, st.st_mtime, 0);
    int rc = archive_write_header(a, e) == ARCHIVE_OK ? 0 : -1;
    ssize_t n;
    while (rc == 0 && (n = read(fd, buf, BLOCK)) > 0)
        if (archive_write_data(a, buf, (size_t)n) != n)
            rc = -1;
    if (n < 0)
        rc = -1;
    archive_entry_free(e);
    close(fd);
    return rc;
}

/* restore.msgpack, manifest.json, then every file of img/. */
static int add_image(struct archive *a, const char *dir, const char *key, char *err, size_t cap) {
    char path[PATH_MAX + 600], name[PATH_MAX];
    const char *top[] = {"restore.msgpack", "manifest.json"};
    char *buf = malloc(BLOCK);
    int rc = buf ? 0 : -1;
    for (size_t i = 0; rc == 0 && i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, top[i]);
        snprintf(name, sizeof name, "%s/%s", key, top[i]);
        rc = add_file(a, path, name, buf);
    }
    snprintf(path, sizeof path, "%s/img", dir);
    DIR *d = rc == 0 ? opendir(path) : NULL;
    struct dirent *ent;
    while (d && rc == 0 && (ent = readdir(d))) {
        if (ent->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "%s/img/%s", dir, ent->d_name);
        snprintf(name, sizeof name, "%s/img/%s", key, ent->d_name);
        rc = add_file(a, path, name, buf);
    }
    if (rc < 0)
        snprintf(err, cap, "cannot archive %.400s: %s", path,
                 archive_errno(a) ? archive_error_string(a) : strerror(errno));
    if (d)
        closedir(d);
    free(buf);
    return rc;
}

int bw_archive_export(const char *root, const char *key, const char *file) {
    char dir[PATH_MAX + 200], tmp[PATH_MAX + 64], err[1024];
    snprintf(dir, sizeof dir, "%s/%s", root, key);
    if (verify(root, key, dir, err, sizeof err) < 0) {
        say("not exporting %s: %s", dir, err);
        return -1;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", file, (int)getpid());
    mode_t old = umask(077); /* the archive holds a process's memory: 0600 */
    struct archive *a = archive_write_new();
    int rc = a && archive_write_add_filter_zstd(a) == ARCHIVE_OK &&
                     archive_write_set_format_pax_restricted(a) == ARCHIVE_OK &&
                     archive_write_open_filename(a, tmp) == ARCHIVE_OK
                 ? 0 : -1;
    if (rc < 0)
        snprintf(err, sizeof err, "%s", a ? archive_error_string(a) : "out of memory");
    if (rc == 0)
        rc = add_image(a, dir, key, err, sizeof err);
    if (rc == 0 && archive_write_close(a) != ARCHIVE_OK) {
        snprintf(err, sizeof err, "%s", archive_error_string(a));
        rc = -1;
    }
    archive_write_free(a);
    umask(old);
    if (rc == 0 && rename(tmp, file) < 0) {
        snprintf(err, sizeof err, "cannot rename %.400s: %s", tmp, strerror(errno));
        rc = -1;
    }
    if (rc < 0) {
        unlink(tmp);
        say("cannot export %s: %s", dir, err);
        return -1;
    }
    printf("exported %s to %s\n", dir, file);
    return 0;
}

/* ---- import ------------------------------------------------------------------------- */

/* The key of an entry name "<key>/...", into key; -1 if it is no plain key. */
static int entry_key(const char *name, char *key, size_t cap) {
    size_t n = strcspn(name, "/");
    if (n == 0 || n >= cap || n > 128 || name[0] == '.' || name[n] != '/')
        return -1;
    memcpy(key, name, n);
    key[n] = '\0';
    return 0;
}

/* Where entry rest (the name after "<key>/") goes under tmp: restore.msgpack,
 * manifest.json, img/FILE; NULL for anything else (a path that could escape, a stray). */
static const char *entry_path(const char *rest, const char *tmp, char *out, size_t cap) {
    const char *f = strncmp(rest, "img/", 4) == 0 ? rest + 4 : NULL;
    bool top = strcmp(rest, "restore.msgpack") == 0 || strcmp(rest, "manifest.json") == 0;
    if (!top && (!f || !*f || f[0] == '.' || strchr(f, '/')))
        return NULL;
    snprintf(out, cap, "%s/%s", tmp, rest);
    return out;
}

static int extract(struct archive *a, const char *path, char *err, size_t cap) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, cap, "cannot create %.400s: %s", path, strerror(errno));
        return -1;
    }
    char *buf = malloc(BLOCK);
    int rc = 0;
    la_ssize_t n;
    if (!buf) {
        snprintf(err, cap, "out of memory");
        rc = -1;
    }
    while (rc == 0 && (n = archive_read_data(a, buf, BLOCK)) != 0) {
        if (n < 0) { /* truncated or corrupt: libarchive says which */
            snprintf(err, cap, "%s", archive_error_string(a));
            rc = -1;
        } else if (bw_write_full(fd, buf, (size_t)n) < 0) {
            snprintf(err, cap, "cannot write %.400s: %s", path, strerror(errno));
            rc = -1;
        }
    }
    if (rc == 0 && fsync(fd) < 0) {
        snprintf(err, cap, "cannot write %.400s: %s", path, strerror(errno));
        rc = -1;
    }
    free(buf);
    close(fd);
    return rc;
}

/* Every entry into tmp (created at the first). key: the image's key, from the names. */
static int extract_all(struct archive *a, const char *root, char *key, size_t kcap, char *tmp,
                       size_t tcap, char *err, size_t cap) {
    struct archive_entry *e;
    char k[160], path[PATH_MAX + 700];
    int r;
    while ((r = archive_read_next_header(a, &e)) == ARCHIVE_OK) {
        const char *name = archive_entry_pathname(e);
        if (!name || entry_key(name, k, sizeof k) < 0 || (key[0] && strcmp(k, key) != 0)) {
            snprintf(err, cap, "unexpected entry %.400s (an image archive holds one KEY/ tree)",
                     name ? name : "(unnamed)");
            return -1;
        }
        if (!key[0]) {
            snprintf(key, kcap, "%s", k);
            snprintf(tmp, tcap, "%s/.tmp-%s-%d", root, key, (int)getpid());
            bw_rm_rf(tmp);
            snprintf(path, sizeof path, "%s/img", tmp);
            if (mkdir(tmp, 0700) < 0 || mkdir(path, 0700) < 0) {
                snprintf(err, cap, "cannot create %.400s: %s", path, strerror(errno));
                return -1;
            }
        }
        const char *rest = name + strlen(key) + 1;
        if (archive_entry_filetype(e) == AE_IFDIR && (!*rest || strcmp(rest, "img/") == 0))
            continue;
        if (archive_entry_filetype(e) != AE_IFREG || !entry_path(rest, tmp, path, sizeof path)) {
            snprintf(err, cap, "unexpected entry %.400s (only an image's files belong here)", name);
            return -1;
        }
        if (extract(a, path, err, cap) < 0)
            return -1;
    }
    if (r != ARCHIVE_EOF) {
        snprintf(err, cap, "%s", archive_error_string(a));
        return -1;
    }
    if (!key[0]) {
        snprintf(err, cap, "the archive is empty");
        return -1;
    }
    return 0;
}

int bw_archive_import(const char *root, const char *file) {
    char key[160] = "", tmp[PATH_MAX + 200] = "", dir[PATH_MAX + 200], err[1024];
    struct bw_ckpt c;
    if (bw_ckpt_open(&c, root, "import", NULL, 120, err, sizeof err) < 0) { /* checks root */
        say("cannot import %s: %s", file, err);
        return -1;
    }
    struct archive *a = archive_read_new();
    int rc = a && archive_read_support_filter_zstd(a) == ARCHIVE_OK &&
                     archive_read_support_format_tar(a) == ARCHIVE_OK &&
                     archive_read_open_filename(a, file, BLOCK) == ARCHIVE_OK
                 ? 0 : -1;
    if (rc < 0)
        snprintf(err, sizeof err, "%s", a ? archive_error_string(a) : "out of memory");
    if (rc == 0)
        rc = extract_all(a, root, key, sizeof key, tmp, sizeof tmp, err, sizeof err);
    archive_read_free(a);
    snprintf(dir, sizeof dir, "%s/%s", root, key);
    if (rc == 0 && verify(root, key, tmp, err, sizeof err) < 0)
        rc = -1;
    if (rc == 0 && access(dir, F_OK) == 0) {
        snprintf(err, sizeof err, "%.400s already exists (remove it first: beam checkpoints rm)", dir);
        rc = -1;
    }
    if (rc == 0 && rename(tmp, dir) < 0) {
        snprintf(err, sizeof err, "cannot rename %.400s: %s", tmp, strerror(errno));
        rc = -1;
    }
    if (rc < 0) {
        if (tmp[0])
            bw_rm_rf(tmp); /* a refused archive leaves nothing behind */
        say("refusing %s: %s", file, err);
        return -1;
    }
    printf("imported %s into %s\n", file, dir);
    return 0;
}
