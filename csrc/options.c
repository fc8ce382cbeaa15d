/* options.c - beam-worker's command line. */
#define _GNU_SOURCE
#include "options.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "control.h"
#include "environ.h"
#include "frame.h"
#include "privilege.h"
#include "store.h"
#include "pylib.h"
#include "tasks.h"
#include "util.h"

static const char usage[] =
    "usage: beam-worker [OPTIONS] APP\n"
    "\n"
    "Serve the @endpoint function APP (path/to/app.py:function or package.module:function)\n"
    "over length-prefixed msgpack (docs/protocol.md). Most users run it through\n"
    "`python -m beam serve`, which also computes the checkpoint key.\n"
    "\n"
    "Listening (default: --tcp 127.0.0.1:8765):\n"
    "  --socket PATH         listen on a unix socket (mode 0600; repeatable)\n"
    "  --tcp [HOST:]PORT     listen on TCP; HOST defaults to 127.0.0.1, PORT 0 picks one\n"
    "\n"
    "Serving:\n"
    "  --python PATH         interpreter whose environment (venv) the app runs in\n"
    "                        (default: $BEAM_PYTHON, else the build's interpreter)\n"
    "  --workers N           worker processes (default: the endpoint's `workers`)\n"
    "  --max-frame BYTES     largest accepted request frame (default 67108864)\n"
    "  --grace SECONDS       time to finish answered requests on SIGTERM (default 10)\n"
    "  --volume-root DIR     where Volume(name) directories live\n"
    "                        (default: $BEAM_VOLUME_ROOT, else ~/.cache/beam/volumes)\n"
    "  --json-logs           log as one JSON object per line\n"
    "  --pass-env NAME       also give the app this variable of our environment (repeatable);\n"
    "                        it gets only an allow-list plus env=/secrets= (docs/checkpoint.md)\n"
    "\n"
    "HTTP front and replicas (docs/http.md):\n"
    "  --port N              serve HTTP on this port: POST / with a JSON body, GET /health,\n"
    "                        GET /stats (0 picks a free port)\n"
    "  --host ADDR           HTTP bind address (default 127.0.0.1)\n"
    "  --no-auth             no bearer token, even if the endpoint says authorized=True\n"
    "                        (default token: $BEAM_AUTH_TOKEN, else generated and printed)\n"
    "  --max-body BYTES      largest HTTP request body (default 67108864)\n"
    "  --header-timeout SEC  close a connection whose request line and headers take longer\n"
    "                        (from the first byte, or the connect; default 10)\n"
    "  --body-timeout SEC    close a connection whose request body takes longer, counted\n"
    "                        from the end of its headers (default 60)\n"
    "  --idle-timeout SEC    close a keep-alive connection idle this long (default 60;\n"
    "                        one that made no authorized request: --header-timeout)\n"
    "  --max-connections N   open HTTP connections (default 1024); at N, the oldest idle\n"
    "                        one that made no authorized request is closed to make room,\n"
    "                        and without one the new connection is answered 503\n"
    "  --max-replicas N      restore up to N replicas when calls queue up (default 1)\n"
    "  --keep-warm SECONDS   stop an idle replica after this long; the next call restores\n"
    "                        one (default: the endpoint's keep_warm_seconds; -1: never)\n"
    "  --max-crashes N       give up (exit 1) after N host crashes within 60 s\n"
    "                        (default 5; 0: never give up; docs/reliability.md)\n"
    "  --task-history N      recent calls kept for GET /tasks and the dashboard\n"
    "                        (default 1000; memory is allocated once)\n"
    "  --access-log          log one line per HTTP response (JSON with --json-logs)\n"
    "\n"
    "Checkpointing (needs root and CRIU; see `python -m beam doctor`):\n"
    "  --checkpoint-dir DIR  local image cache (default: $BEAM_CHECKPOINT_DIR, else\n"
    "                        ~/.cache/beam/checkpoints); created with mode 0700\n"
    "  --checkpoint-key KEY  identity of app + config; without it nothing is checkpointed\n"
    "  --store DIR           shared store beside the local cache: a directory many machines\n"
    "                        mount (NFS, CephFS, RWX volume); images missing locally are\n"
    "                        fetched from it, the one machine holding a key's lease dumps\n"
    "                        and publishes it (docs/checkpoint.md, \"Shared store\")\n"
    "  --store-lease SEC     term of a store lease, renewed while held (default 30)\n"
    "  --no-checkpoint       never dump nor restore\n"
    "  --retry-checkpoint    try again for a key whose checkpoint failed before\n"
    "  --criu PATH           criu binary; default: the first of\n"
    "                        " BW_CRIU_SEARCH "\n"
    "  --print-criu          print the criu binary checkpoints would use, and exit\n"
    "                        (status 2 when there is none)\n"
    "  --criu-timeout SEC    bound on one CRIU dump or restore (default 120)\n"
    "  --restore-timeout SEC bound on a restored replica becoming ready (default 30)\n"
    "  --restore MODE        lazy: serve while the page daemon fills memory in; eager: copy\n"
    "                        every page first; auto (default): lazy for images of 256 MiB\n"
    "                        and more where userfaultfd works\n"
    "\n"
    "GPU (docs/gpu.md):\n"
    "  --allow-cpu           serve an endpoint with gpu= on a machine without a usable GPU\n"
    "                        (default: refuse to start, saying why)\n"
    "  --cuda-lock-timeout SEC  bound on locking the host's CUDA state before a GPU\n"
    "                        checkpoint (default 10)\n"
    "\n"
    "  -h, --help            this text\n"
    "  --version             print the version\n"
    "  --check-privileges    say whether this process may checkpoint: PID namespace, the\n"
    "                        capabilities CRIU needs (used by `beam doctor`)\n"
    "  --export-checkpoint KEY FILE  write the image KEY of --checkpoint-dir to FILE, a\n"
    "                        zstd-compressed tar (`beam checkpoints export`)\n"
    "  --import-checkpoint FILE  verify such an archive and add its image to\n"
    "                        --checkpoint-dir (`beam checkpoints import`)\n"
    "  --print-image-env     print the variables of this environment that an image depends\n"
    "                        on (NAME=value, with --pass-env names); `beam serve` keys on them\n";

enum {
    OPT_SOCKET = 256, OPT_TCP, OPT_PYTHON, OPT_WORKERS, OPT_MAX_FRAME, OPT_GRACE,
    OPT_VOLUME_ROOT, OPT_JSON_LOGS, OPT_CKPT_DIR, OPT_CKPT_KEY, OPT_NO_CKPT, OPT_RETRY_CKPT,
    OPT_CRIU, OPT_CRIU_TIMEOUT, OPT_RESTORE_TIMEOUT, OPT_VERSION, OPT_HOST, OPT_MAY_CKPT,
    OPT_PORT, OPT_HTTP_HOST, OPT_NO_AUTH, OPT_MAX_BODY, OPT_MAX_REPLICAS, OPT_KEEP_WARM,
    OPT_ALLOW_CPU, OPT_CUDA_LOCK_TIMEOUT, OPT_MAX_CRASHES, OPT_PASS_ENV, OPT_PRINT_IMAGE_ENV, OPT_PRINT_CRIU, OPT_CHECK_PRIVILEGES, OPT_RESTORE,
    OPT_HEADER_TIMEOUT, OPT_BODY_TIMEOUT, OPT_IDLE_TIMEOUT, OPT_MAX_CONNS,
    OPT_TASK_HISTORY, OPT_ACCESS_LOG, OPT_STORE, OPT_STORE_LEASE, OPT_EXPORT, OPT_IMPORT,
};

static const struct option long_opts[] = {
    {"socket", required_argument, 0, OPT_SOCKET},
    {"tcp", required_argument, 0, OPT_TCP},
    {"python", required_argument, 0, OPT_PYTHON},
    {"workers", required_argument, 0, OPT_WORKERS},
    {"max-frame", required_argument, 0, OPT_MAX_FRAME},
    {"grace", required_argument, 0, OPT_GRACE},
    {"volume-root", required_argument, 0, OPT_VOLUME_ROOT},
    {"json-logs", no_argument, 0, OPT_JSON_LOGS},
    {"pass-env", required_argument, 0, OPT_PASS_ENV},
    {"checkpoint-dir", required_argument, 0, OPT_CKPT_DIR},
    {"checkpoint-key", required_argument, 0, OPT_CKPT_KEY},
    {"store", required_argument, 0, OPT_STORE},
    {"store-lease", required_argument, 0, OPT_STORE_LEASE},
    {"export-checkpoint", required_argument, 0, OPT_EXPORT},
    {"import-checkpoint", required_argument, 0, OPT_IMPORT},
    {"no-checkpoint", no_argument, 0, OPT_NO_CKPT},
    {"retry-checkpoint", no_argument, 0, OPT_RETRY_CKPT},
    {"criu", required_argument, 0, OPT_CRIU},
    {"criu-timeout", required_argument, 0, OPT_CRIU_TIMEOUT},
    {"restore-timeout", required_argument, 0, OPT_RESTORE_TIMEOUT},
    {"restore", required_argument, 0, OPT_RESTORE},
    {"allow-cpu", no_argument, 0, OPT_ALLOW_CPU},
    {"cuda-lock-timeout", required_argument, 0, OPT_CUDA_LOCK_TIMEOUT},
    {"port", required_argument, 0, OPT_PORT},
    {"host", required_argument, 0, OPT_HTTP_HOST},
    {"no-auth", no_argument, 0, OPT_NO_AUTH},
    {"max-body", required_argument, 0, OPT_MAX_BODY},
    {"header-timeout", required_argument, 0, OPT_HEADER_TIMEOUT},
    {"body-timeout", required_argument, 0, OPT_BODY_TIMEOUT},
    {"idle-timeout", required_argument, 0, OPT_IDLE_TIMEOUT},
    {"max-connections", required_argument, 0, OPT_MAX_CONNS},
    {"max-replicas", required_argument, 0, OPT_MAX_REPLICAS},
    {"keep-warm", required_argument, 0, OPT_KEEP_WARM},
    {"max-crashes", required_argument, 0, OPT_MAX_CRASHES},
    {"task-history", required_argument, 0, OPT_TASK_HISTORY},
    {"access-log", no_argument, 0, OPT_ACCESS_LOG},
    {"help", no_argument, 0, 'h'},
    {"version", no_argument, 0, OPT_VERSION},
    {"print-image-env", no_argument, 0, OPT_PRINT_IMAGE_ENV},
    {"print-criu", no_argument, 0, OPT_PRINT_CRIU},
    {"check-privileges", no_argument, 0, OPT_CHECK_PRIVILEGES},
    {"run-host", no_argument, 0, OPT_HOST},         /* internal: be the host */
    {"may-checkpoint", no_argument, 0, OPT_MAY_CKPT}, /* internal */
    {0, 0, 0, 0},
};

static int parse_double(const char *name, const char *s, double min, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || v < min) {
        fprintf(stderr, "beam-worker: %s: invalid value %s\n", name, s);
        return -1;
    }
    if (!isfinite(v)) { /* strtod takes "nan" and "inf"; NaN passes every comparison */
        fprintf(stderr, "beam-worker: %s: expected a finite number, got %s\n", name, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* A path under the user's cache dir, honouring XDG_CACHE_HOME. */
static const char *cache_path(const char *env, const char *leaf) {
    const char *v = getenv(env);
    if (v && *v)
        return v;
    static char bufs[2][4096];
    static int which;
    char *b = bufs[which++ & 1];
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && *xdg)
        snprintf(b, 4096, "%s/beam/%s", xdg, leaf);
    else
        snprintf(b, 4096, "%s/.cache/beam/%s", home && *home ? home : "/tmp", leaf);
    return b;
}

static void print_privileges(void) {
    char why[256] = "", missing[256];
    bool ns = bw_priv_pidns(why, sizeof why);
    size_t n = bw_priv_missing(missing, sizeof missing);
    printf("pid_namespace: %s\nmissing_capabilities: %s\n", ns ? "ok" : why, n ? missing : "none");
}

/* Line 1 is the version; then the Python this binary embeds, because a worker runs only
 * the stdlib of that one Python (beam doctor compares it with the running interpreter). */
/* What `beam doctor` reports (python/beam/_paths.py asks here: one search, in C). */
static int print_criu_path(const char *configured) {
    const char *criu = bw_ckpt_find_criu(configured);
    if (!criu) {
        fprintf(stderr, "no criu binary found (looked at %s)\n", BW_CRIU_SEARCH);
        return -1;
    }
    printf("%s\n", criu);
    return 1;
}

static void print_version(void) {
    char lib[PATH_MAX + 256];
    bw_pylib_describe(lib, sizeof lib);
    printf("beam-worker %s\nlibpython: %s\nbuilt for: %s\n", BW_VERSION, lib, BW_BUILD_PYTHON);
}

int bw_options_parse(struct bw_options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->max_frame = BW_DEFAULT_MAX_FRAME;
    o->grace_s = 10;
    o->criu_timeout_s = 120;
    o->restore_timeout_s = 30;
    o->store_lease_s = BW_STORE_DEFAULT_LEASE_S;
    o->http_port = -1;
    o->http_host = "127.0.0.1";
    o->max_body = BW_DEFAULT_MAX_FRAME;
    o->header_timeout_s = 10;
    o->body_timeout_s = 60;
    o->idle_timeout_s = 60;
    o->max_conns = 1024;
    o->max_replicas = 1;
    o->max_crashes = 5;
    o->task_history = BW_TASKS_DEFAULT;
    o->keep_warm_s = -1000;
    o->cuda_lock_timeout_s = 10;
    o->python = getenv("BEAM_PYTHON");
    if (!o->python || !*o->python)
        o->python = BW_BUILD_PYTHON;
    o->volume_root = cache_path("BEAM_VOLUME_ROOT", "volumes");
    o->checkpoint_dir = cache_path("BEAM_CHECKPOINT_DIR", "checkpoints");
    double d;
    int c;
    bool print_image_env = false, print_criu = false;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (c) {
        case OPT_SOCKET:
        case OPT_TCP: {
            int *n = c == OPT_SOCKET ? &o->nsockets : &o->ntcps;
            if (*n >= BW_MAX_LISTENERS) {
                fprintf(stderr, "beam-worker: at most %d of each listener kind\n", BW_MAX_LISTENERS);
                return -1;
            }
            (c == OPT_SOCKET ? o->sockets : o->tcps)[(*n)++] = optarg;
            break;
        }
        case OPT_PYTHON: o->python = optarg; break;
        case OPT_WORKERS:
            if (parse_double("--workers", optarg, 1, &d) < 0 || d > 256 || d != (int)d) {
                fprintf(stderr, "beam-worker: --workers must be an integer from 1 to 256\n");
                return -1;
            }
            o->workers = (int)d;
            break;
        case OPT_MAX_FRAME:
            if (parse_double("--max-frame", optarg, 16, &d) < 0 || d > 4294967295.0)
                return -1;
            o->max_frame = (size_t)d;
            break;
        case OPT_GRACE:
            if (parse_double("--grace", optarg, 0, &o->grace_s) < 0)
                return -1;
            break;
        case OPT_VOLUME_ROOT: o->volume_root = optarg; break;
        case OPT_JSON_LOGS: o->json_logs = true; break;
        case OPT_PASS_ENV:
            if (o->npass_env >= BW_MAX_PASS_ENV || !*optarg || strchr(optarg, '=')) {
                fprintf(stderr, "beam-worker: --pass-env takes a variable name (at most %d)\n",
                        BW_MAX_PASS_ENV);
                return -1;
            }
            o->pass_env[o->npass_env++] = optarg;
            break;
        case OPT_CKPT_DIR: o->checkpoint_dir = optarg; break;
        case OPT_CKPT_KEY: o->checkpoint_key = optarg; break;
        case OPT_STORE: o->store = optarg; break;
        case OPT_STORE_LEASE:
            if (parse_double("--store-lease", optarg, 1, &o->store_lease_s) < 0)
                return -1;
            break;
        case OPT_EXPORT: o->export_key = optarg; break;
        case OPT_IMPORT: o->import_file = optarg; break;
        case OPT_NO_CKPT: o->no_checkpoint = true; break;
        case OPT_RETRY_CKPT: o->retry_checkpoint = true; break;
        case OPT_CRIU: o->criu = optarg; break;
        case OPT_CRIU_TIMEOUT:
            if (parse_double("--criu-timeout", optarg, 1, &o->criu_timeout_s) < 0)
                return -1;
            break;
        case OPT_RESTORE_TIMEOUT:
            if (parse_double("--restore-timeout", optarg, 1, &o->restore_timeout_s) < 0)
                return -1;
            break;
        case OPT_RESTORE:
            if (strcmp(optarg, "auto") == 0)
                o->restore_mode = BW_RESTORE_AUTO;
            else if (strcmp(optarg, "lazy") == 0)
                o->restore_mode = BW_RESTORE_LAZY;
            else if (strcmp(optarg, "eager") == 0)
                o->restore_mode = BW_RESTORE_EAGER;
            else {
                fprintf(stderr, "beam-worker: --restore must be auto, lazy or eager\n");
                return -1;
            }
            break;
        case OPT_PORT:
            if (parse_double("--port", optarg, 0, &d) < 0 || d > 65535 || d != (int)d)
                return -1;
            o->http_port = (int)d;
            break;
        case OPT_HTTP_HOST: o->http_host = optarg; break;
        case OPT_NO_AUTH: o->no_auth = true; break;
        case OPT_MAX_BODY:
            if (parse_double("--max-body", optarg, 16, &d) < 0 || d > 4294967295.0)
                return -1;
            o->max_body = (size_t)d;
            break;
        case OPT_HEADER_TIMEOUT:
            if (parse_double("--header-timeout", optarg, 0.01, &o->header_timeout_s) < 0)
                return -1;
            break;
        case OPT_BODY_TIMEOUT:
            if (parse_double("--body-timeout", optarg, 0.01, &o->body_timeout_s) < 0)
                return -1;
            break;
        case OPT_IDLE_TIMEOUT:
            if (parse_double("--idle-timeout", optarg, 0.01, &o->idle_timeout_s) < 0)
                return -1;
            break;
        case OPT_MAX_CONNS:
            if (parse_double("--max-connections", optarg, 1, &d) < 0 || d > 1000000 || d != (int)d) {
                fprintf(stderr, "beam-worker: --max-connections must be an integer from 1 to 1000000\n");
                return -1;
            }
            o->max_conns = (int)d;
            break;
        case OPT_MAX_REPLICAS:
            if (parse_double("--max-replicas", optarg, 1, &d) < 0 || d > 64 || d != (int)d) {
                fprintf(stderr, "beam-worker: --max-replicas must be an integer from 1 to 64\n");
                return -1;
            }
            o->max_replicas = (int)d;
            break;
        case OPT_KEEP_WARM:
            if (parse_double("--keep-warm", optarg, -1, &o->keep_warm_s) < 0)
                return -1;
            break;
        case OPT_MAX_CRASHES:
            if (parse_double("--max-crashes", optarg, 0, &d) < 0 || d > 1000000 || d != (int)d) {
                fprintf(stderr, "beam-worker: --max-crashes must be an integer from 0 to 1000000\n");
                return -1;
            }
            o->max_crashes = (int)d;
            break;
        case OPT_TASK_HISTORY:
            if (parse_double("--task-history", optarg, 1, &d) < 0 || d > BW_TASKS_MAX ||
                d != (int)d) {
                fprintf(stderr, "beam-worker: --task-history must be an integer from 1 to %d\n",
                        BW_TASKS_MAX);
                return -1;
            }
            o->task_history = (int)d;
            break;
        case OPT_ACCESS_LOG: o->access_log = true; break;
        case OPT_HOST: o->host = true; break;
        case OPT_MAY_CKPT: o->may_checkpoint = true; break;
        case OPT_ALLOW_CPU: o->allow_cpu = true; break;
        case OPT_CUDA_LOCK_TIMEOUT:
            if (parse_double("--cuda-lock-timeout", optarg, 0.001, &o->cuda_lock_timeout_s) < 0)
                return -1;
            break;
        case 'h': fputs(usage, stdout); return 1;
        case OPT_VERSION: print_version(); return 1;
        case OPT_PRINT_IMAGE_ENV: print_image_env = true; break;
        case OPT_PRINT_CRIU: print_criu = true; break;
        case OPT_CHECK_PRIVILEGES: print_privileges(); return 1;
        default: fputs(usage, stderr); return -1;
        }
    }
    if (print_criu) /* after the loop: --criu may come after it */
        return print_criu_path(o->criu);
    if (print_image_env) {
        bw_env_pass(o->pass_env, o->npass_env);
        return bw_env_print_image(stdout) == 0 ? 1 : -1;
    }
    if (o->import_file && optind == argc)
        return 0;
    if (optind != argc - 1) {
        fprintf(stderr, "beam-worker: expected exactly one %s argument\n\n%s",
                o->export_key ? "FILE" : "APP", usage);
        return -1;
    }
    if (o->export_key) {
        o->export_file = argv[optind];
        return 0;
    }
    o->app = argv[optind];
    /* Every listener travels to each host as one fd of the "start" message, the HTTP
     * router's private socket included: more than it can carry would start no host. */
    int nl = o->nsockets + o->ntcps + (o->http_port >= 0);
    if (nl > BW_CTL_MAX_FDS) {
        fprintf(stderr, "beam-worker: at most %d listeners in all (--socket, --tcp, and one for "
                "--port); got %d\n", BW_CTL_MAX_FDS, nl);
        return -1;
    }
    if (o->checkpoint_key && (strlen(o->checkpoint_key) > 128 || strchr(o->checkpoint_key, '/') ||
                              o->checkpoint_key[0] == '.')) {
        fprintf(stderr, "beam-worker: --checkpoint-key must be a plain name of at most 128 characters\n");
        return -1;
    }
    return 0;
}
