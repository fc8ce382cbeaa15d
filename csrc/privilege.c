/* privilege.c - whether this process may do what checkpointing needs.
 *
 * Docker, Podman and Kubernetes run containers as root but without CAP_SYS_ADMIN. Then
 * no PID namespace can be made and CRIU cannot dump or restore; the app can still be
 * served, cold, from a host that is a plain child. The supervisor asks here once at
 * start and says plainly what is missing (docs/checkpoint.md, "In a container"). */
#define _GNU_SOURCE
#include "privilege.h"

#include <errno.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* What CRIU 4 needs inside a container: the smallest set that dumped and restored in
 * podman + runc on these machines, found by taking one capability away at a time
 * (scripts/caps-probe.sh; docs/deploy.md, "Capabilities"): without CAP_NET_ADMIN restore
 * fails on a netlink request, without CAP_SYS_TIME on the time namespace's monotonic
 * offset. CAP_SYS_ADMIN covers what CAP_CHECKPOINT_RESTORE and CAP_SYS_PTRACE would add
 * (each could be dropped); CAP_SYS_RESOURCE is not needed (CRIU logs a harmless "Can't
 * setup RLIMIT_NOFILE"). seccomp must be unconfined too, which capabilities do not show. */
static const struct {
    int cap;
    const char *name;
} needed[] = {
    {CAP_SYS_ADMIN, "CAP_SYS_ADMIN"},
    {CAP_NET_ADMIN, "CAP_NET_ADMIN"},
    {CAP_SYS_TIME, "CAP_SYS_TIME"},
};

static bool effective(int cap, const uint32_t eff[2]) {
    return (eff[cap / 32] >> (cap % 32)) & 1u;
}

size_t bw_priv_missing(char *buf, size_t cap) {
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    buf[0] = '\0';
    if (syscall(SYS_capget, &hdr, data) < 0) {
        snprintf(buf, cap, "unknown (capget: %s)", strerror(errno));
        return 1;
    }
    uint32_t eff[2] = {data[0].effective, data[1].effective};
    size_t n = 0, o = 0;
    for (size_t i = 0; i < sizeof needed / sizeof *needed; i++)
        if (!effective(needed[i].cap, eff) && o < cap)
            o += (size_t)snprintf(buf + o, cap - o, "%s%s", n++ ? ", " : "", needed[i].name);
    return n;
}

static int exit_at_once(void *arg) {
    (void)arg;
    return 0;
}

bool bw_priv_pidns(char *why, size_t cap) {
    size_t stack_size = 64 * 1024;
    char *stack = malloc(stack_size);
    if (!stack) {
        snprintf(why, cap, "out of memory");
        return false;
    }
    pid_t pid = clone(exit_at_once, stack + stack_size, CLONE_NEWPID | SIGCHLD, NULL);
    int err = errno;
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
    free(stack);
    if (pid < 0) {
        snprintf(why, cap, "cannot create a PID namespace: %s", strerror(err));
        return false;
    }
    return true;
}
