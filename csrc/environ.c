/* environ.c - the host's environment: an allow-list, never a copy of ours.
 *
 * Whatever the host has in its environment when it is exec'd sits in its initial stack,
 * in libc's environ and in os.environ, and so in every checkpoint image taken of it.
 * The shell that runs `beam serve` typically holds cloud keys and tokens the app never
 * declared. So the host gets only:
 *   - what Python and the usual native libraries read (bw_env_allowed below; the list is
 *     in docs/checkpoint.md, "Environment"),
 *   - the names an operator passes with --pass-env,
 * and nothing else. Secrets the endpoint declares with secrets=[...] travel over the
 * control channel instead, only while on_start runs and again after each start (see
 * replica.c: send_secrets, send_start), so they never enter the exec'd environment. */
#define _GNU_SOURCE
#include "environ.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mp.h"

extern char **environ;

/* Read by the interpreter, the C library, TLS, numeric and GPU libraries, or beam itself;
 * none is a credential. Two kinds:
 *   live:  read when used, so a restored replica simply gets today's value;
 *   image: read once at start-up or import (locale, interpreter flags, thread pools,
 *          devices), so their values are frozen into an image: they are part of its
 *          checkpoint key (`beam-worker --print-image-env`, used by `beam serve`).
 * Names given with --pass-env count as image variables: the app may read them at
 * import. */
static const char *const live_names[] = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "TMPDIR", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "BEAM_LOG_LEVEL",
    "BEAM_HOOK_TIMEOUT",
};
static const char *const image_names[] = {
    "LANG", "LANGUAGE", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "HF_HOME",
    "TORCH_HOME",
};
static const char *const image_prefixes[] = {
    "LC_", "PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA_", "NVIDIA_",
};

static const char *const *passed;
static int npassed;

void bw_env_pass(const char *const *names, int n) {
    passed = names;
    npassed = n;
}

static bool in_names(const char *const *names, size_t n, const char *name, size_t len) {
    for (size_t i = 0; i < n; i++)
        if (strlen(names[i]) == len && memcmp(names[i], name, len) == 0)
            return true;
    return false;
}

#define COUNT(a) (sizeof(a) / sizeof *(a))

/* An image variable: `name` is the first len bytes of "NAME=value". */
static bool image_variable(const char *name, size_t len) {
    for (size_t i = 0; i < COUNT(image_prefixes); i++) {
        size_t pl = strlen(image_prefixes[i]);
        if (len > pl && memcmp(image_prefixes[i], name, pl) == 0)
            return true;
    }
    return in_names(image_names, COUNT(image_names), name, len) ||
           in_names(passed, (size_t)npassed, name, len);
}

static size_t name_len(const char *entry) {
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

bool bw_env_allowed(const char *entry) {
    size_t len = name_len(entry);
    /* The HTTP front's token is the supervisor's alone, whatever --pass-env says. */
    if (len == 15 && memcmp(entry, "BEAM_AUTH_TOKEN", 15) == 0)
        return false;
    return len > 0 && (in_names(live_names, COUNT(live_names), entry, len) ||
                       image_variable(entry, len));
}

static int by_string(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int bw_env_print_image(FILE *f) {
    size_t n = 0;
    char **envp = bw_env_host(&n);
    if (!envp)
        return -1;
    qsort(envp, n, sizeof *envp, by_string);
    for (size_t i = 0; i < n; i++)
        if (image_variable(envp[i], name_len(envp[i])))
            fprintf(f, "%s\n", envp[i]);
    free(envp);
    return 0;
}

char **bw_env_host(size_t *n_out) {
    size_t n = 0;
    while (environ[n])
        n++;
    char **envp = calloc(n + 1, sizeof *envp);
    if (!envp)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strchr(environ[i], '=') && bw_env_allowed(environ[i]))
            envp[k++] = environ[i];
    if (n_out)
        *n_out = k;
    return envp;
}

size_t bw_env_pack_host(msgpack_packer *pk) {
    size_t n = 0;
    char **envp = bw_env_host(&n);
    msgpack_pack_map(pk, envp ? n : 0);
    for (size_t i = 0; envp && i < n; i++) {
        const char *eq = strchr(envp[i], '=');
        bw_mp_strn(pk, envp[i], (size_t)(eq - envp[i]));
        bw_mp_str(pk, eq + 1);
    }
    free(envp);
    return n;
}

/* Not worth naming when reporting what the app does not see: the shell's bookkeeping,
 * and beam's own settings (read by the supervisor or the CLI, not by the app). */
static bool unremarkable(const char *name, size_t len) {
    static const char *const shell[] = {"PWD", "OLDPWD", "SHLVL", "_", "PS1", "BEAM_AUTH_TOKEN"};
    for (size_t i = 0; i < sizeof shell / sizeof *shell; i++)
        if (strlen(shell[i]) == len && memcmp(shell[i], name, len) == 0)
            return true;
    return len > 5 && memcmp(name, "BEAM_", 5) == 0;
}

size_t bw_env_dropped(const char *const *declared, size_t ndeclared, char *buf, size_t cap) {
    size_t count = 0, o = 0;
    buf[0] = '\0';
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || bw_env_allowed(*e))
            continue;
        size_t len = (size_t)(eq - *e);
        bool skip = unremarkable(*e, len);
        for (size_t i = 0; i < ndeclared && !skip; i++)
            skip = strlen(declared[i]) == len && memcmp(declared[i], *e, len) == 0;
        if (skip)
            continue;
        if (o + len + 3 < cap)
            o += (size_t)snprintf(buf + o, cap - o, "%s%.*s", count ? ", " : "", (int)len, *e);
        count++;
    }
    return count;
}
