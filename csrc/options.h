/* options.h - command line of beam-worker (supervisor) and of its host re-exec. */
#ifndef BW_OPTIONS_H
#define BW_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#define BW_MAX_LISTENERS 4
#define BW_MAX_PASS_ENV 64

struct bw_options {
    const char *app;             /* path/app.py:func or pkg.mod:func */
    const char *python;          /* interpreter whose environment the host uses */
    const char *sockets[BW_MAX_LISTENERS]; /* unix socket paths */
    int nsockets;
    const char *tcps[BW_MAX_LISTENERS];    /* HOST:PORT */
    int ntcps;
    int workers;                 /* 0: the endpoint's setting */
    size_t max_frame;
    double grace_s;
    const char *volume_root;
    const char *checkpoint_dir;
    const char *checkpoint_key;
    const char *store;           /* shared store (store.h), or NULL */
    double store_lease_s;        /* term of a store lease */
    const char *export_key, *export_file; /* --export-checkpoint KEY FILE (image_archive.h) */
    const char *import_file;     /* --import-checkpoint FILE */
    bool no_checkpoint, retry_checkpoint;
    const char *criu;
    double criu_timeout_s;
    double restore_timeout_s;
    enum bw_restore_mode { BW_RESTORE_AUTO, BW_RESTORE_LAZY, BW_RESTORE_EAGER } restore_mode;
    double cuda_lock_timeout_s;  /* bound on locking the host's CUDA state (docs/gpu.md) */
    bool allow_cpu;              /* gpu= asked for but no usable GPU: serve on CPU anyway */
    bool json_logs;
    const char *pass_env[BW_MAX_PASS_ENV]; /* extra variables the host may see */
    int npass_env;
    /* HTTP front and replicas (docs/http.md) */
    int http_port;               /* -1: no HTTP front */
    const char *http_host;       /* default 127.0.0.1 */
    bool no_auth;
    size_t max_body;
    double header_timeout_s;     /* HTTP: request line + headers must arrive within this */
    double body_timeout_s;       /* HTTP: the whole body, after the headers */
    double idle_timeout_s;       /* HTTP: keep-alive connection with nothing owed */
    int max_conns;               /* HTTP: open connections; beyond, 503 and close */
    int max_replicas;
    double keep_warm_s;          /* < -0.5: the endpoint's keep_warm_seconds */
    int max_crashes;             /* host crashes per 60 s before giving up; 0: never */
    int task_history;            /* calls kept for GET /tasks (observe.c) */
    bool access_log;             /* one line per HTTP response on stderr */
    /* internal: set when the supervisor re-executes itself as the host */
    bool host;
    bool may_checkpoint;
};

/* Fills defaults, parses argv. Returns 0, 1 (--help/--version printed: exit 0), -1. */
int bw_options_parse(struct bw_options *o, int argc, char **argv);

#endif
