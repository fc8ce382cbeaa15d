/* main.c - beam-worker: one binary, two roles. Run by a user (or `beam serve`) it is
 * the supervisor; the supervisor re-executes it with --run-host inside a new PID namespace
 * to become the Python host. */
#include <stdio.h>

#include "image_archive.h"
#include "host.h"
#include "options.h"
#include "supervisor.h"

int main(int argc, char **argv) {
    struct bw_options o;
    int rc = bw_options_parse(&o, argc, argv);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    if (o.export_key)
        return bw_archive_export(o.checkpoint_dir, o.export_key, o.export_file) == 0 ? 0 : 1;
    if (o.import_file)
        return bw_archive_import(o.checkpoint_dir, o.import_file) == 0 ? 0 : 1;
    return o.host ? bw_host_main(&o) : bw_supervisor_main(&o, argc, argv);
}
