/* app.h - the embedded interpreter and the user's app inside it.
 *
 * GIL rule: the host's main thread holds the GIL from bw_app_init() on, except while a
 * worker waits for I/O (bw_app_release_gil() ... bw_app_acquire_gil()), so that threads
 * the app started can run. Every other function here needs the GIL. */
#ifndef BW_APP_H
#define BW_APP_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

struct bw_boot_profile {
    double interpreter_init_ms, import_ms, on_start_ms;
};

/* Start CPython for the environment of `python` (a venv's interpreter is fine).
 * scrub: wrap the allocators so that freed memory is zeroed until the checkpoint. */
int bw_app_init(const char *python, bool scrub, double *elapsed_ms);
/* Import APP (path/app.py:func or pkg.mod:func), set up volumes and env. */
int bw_app_load(const char *spec, const char *volume_root, double *elapsed_ms);
int bw_app_on_start(double *elapsed_ms);

/* Endpoint settings read at load. */
int bw_app_workers(void);
double bw_app_timeout(void);
bool bw_app_checkpoint_enabled(void);
/* The endpoint's gpu= as text ("" when none). */
void bw_app_gpu(char *buf, size_t cap);
/* Pack the endpoint's configuration (a map) for the supervisor. */
int bw_app_pack_config(msgpack_packer *pk);
/* Pack one value of it (nil when absent). */
int bw_app_pack_config_value(msgpack_packer *pk, const char *key);
/* Before on_start: put the secrets (a map from the supervisor) into os.environ. */
int bw_app_set_secrets(const msgpack_object *secrets);

/* Before the dump: hooks, then remove secrets and env (overwritten), collect garbage
 * and give free memory back to the kernel so the image holds live data only. */
int bw_app_before_checkpoint(void);
/* Every start: bring the environment to today's (env: the allowed variables of the
 * supervisor's environment, secrets: the declared secrets' values); after a restore
 * also reseed and run the after_restore hooks. Turns allocator zeroing off. */
int bw_app_after_start(bool restored, const msgpack_object *env, const msgpack_object *secrets,
                       double *hooks_ms);
/* Per worker process, after fork: bind the context fields; profile is a packed map. */
int bw_app_worker_init(int index, const char *container_id, const char *bind_address,
                       bool restored, const char *profile, size_t profile_len);

/* A worker that stops cleanly: run the app's atexit handlers, flush its output. */
void bw_app_worker_exit(void);

void bw_app_before_fork(void);
void bw_app_after_fork(bool child);
void bw_app_release_gil(void);
void bw_app_acquire_gil(void);

/* The last Python error, formatted, for boot failures (static buffer). */
const char *bw_app_error(void);

/* Per-process worker state used by request.c. */
struct bw_worker_state {
    void *func;            /* PyObject*: the endpoint's function */
    void *context_factory; /* PyObject*: f(task_id) -> Context, or NULL */
    void *timeout_error;   /* PyObject*: beam.exceptions.TaskTimeout */
    void *describe_exc;    /* PyObject*: beam._runtime.describe_exception */
    void *driver;          /* PyObject*: beam._aio.Driver for an async endpoint, else NULL */
    int concurrency;       /* async calls interleaved at most (concurrent_requests) */
    double timeout_s;      /* <= 0: no limit */
    int index;
    bool restored;
    char container_id[40];
    char *profile;         /* packed msgpack map */
    size_t profile_len;
    unsigned long long requests;
    unsigned long long *shared_requests; /* this worker's slot in the host's counters */
    unsigned long long *shared_in_call;  /* calls in progress, in the same memory */
};
extern struct bw_worker_state bw_worker;

#endif
