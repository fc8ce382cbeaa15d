"""App for tests/test_reliability.py, tests/test_security.py and bench/soak.py.

Checkpointed. Crashes are real C-level faults in the *host* process (PID 1 of its
namespace; it runs no Python once it serves, the GIL stays with its main thread):

  * on_start installs, through ctypes, a SIGUSR1 handler at address 0x10. A SIGUSR1 to
    the host (from outside: ``kill -USR1 <host pid>``) makes the CPU jump there: a
    segmentation fault in C, as a crashing C extension would cause. A handler is needed
    at all because the kernel drops signals without one sent to a namespace's init.
  * REL_CRASH_AFTER_RESTORE=S (set at cold boot, so it is in the image's environment):
    every *restored* host segfaults S seconds after its after_restore hook ran (a helper
    process sends SIGUSR1 to PID 1); cold hosts never do. A bad image, in effect.
  * REL_BIG_MB=N: on_start fills N MiB, for a large image and a long dump.
"""
import ctypes
import os
import signal
import subprocess
import time

import beam

BIG_MB = int(os.environ.get("REL_BIG_MB", "0") or 0)
CRASH_AFTER_RESTORE = float(os.environ.get("REL_CRASH_AFTER_RESTORE", "0") or 0)


def _arm_segfault_on_sigusr1():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signal.SIGUSR1, 0x10)  # not SIG_DFL/SIG_IGN: a handler at a bad address


def load():
    _arm_segfault_on_sigusr1()
    return {"big": b"\x01" * (BIG_MB << 20) if BIG_MB else b"", "pid": os.getpid()}


@beam.after_restore
def maybe_crash_soon():
    if CRASH_AFTER_RESTORE > 0:
        subprocess.Popen(["/bin/sh", "-c", f"sleep {CRASH_AFTER_RESTORE}; kill -USR1 1"])


@beam.endpoint(on_start=load, checkpoint_enabled=True, name="rel", timeout=60,
               secrets=["REL_SECRET"])
def handler(context, op="echo", **kwargs):
    if op == "echo":
        return kwargs.get("value")
    if op == "sleep":
        time.sleep(kwargs.get("seconds", 0.05))
        return {"slept": kwargs.get("seconds", 0.05), "i": kwargs.get("i")}
    if op == "info":
        return {"pid": os.getpid(), "container_id": context.container_id,
                "big_len": len(context.on_start_value["big"])}
    if op == "has_secret":
        return os.environ.get("REL_SECRET") == kwargs.get("expect")
    raise ValueError(f"unknown op {op!r}")
