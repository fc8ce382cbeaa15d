"""App for tests/test_http.py: endpoints called over the HTTP front.

``handler`` does what ``op`` says; on_start appends a line to $HTTP_TEST_COUNT_FILE so a
test can tell a restore (on_start not run again) from a cold boot. The other endpoints
differ only in the @endpoint options a test needs (timeout, max_pending_tasks,
authorized)."""
import os
import time

import beam

COUNT_FILE = os.environ.get("HTTP_TEST_COUNT_FILE")


def load():
    if COUNT_FILE:
        with open(COUNT_FILE, "a") as f:
            f.write(f"{os.getpid()}\n")
    return {"loaded": True}


def _run(context, op, kwargs):
    if op == "echo":
        return kwargs.get("value")
    if op == "describe":  # what the handler received, for tests/test_http_json.py
        v = kwargs.get("value")
        return {"type": type(v).__name__, "repr": repr(v)}
    if op == "pow2":
        return 2 ** kwargs["k"] * kwargs.get("sign", 1)
    if op == "len":
        return len(kwargs["data"])
    if op == "sleep":
        time.sleep(kwargs.get("seconds", 0.05))
        return {"slept": kwargs.get("seconds", 0.05), "i": kwargs.get("i")}
    if op == "raise":
        raise ValueError(kwargs.get("message", "boom"))
    if op == "task":
        return context.task_id
    if op == "pid":
        return os.getpid()
    if op == "state":
        return {"on_start": context.on_start_value, "container_id": context.container_id}
    raise ValueError(f"unknown op {op!r}")


@beam.endpoint(on_start=load, name="http-app", timeout=20, checkpoint_enabled=True)
def handler(context, op="echo", **kwargs):
    return _run(context, op, kwargs)


@beam.endpoint(name="http-timeout", timeout=1)
def short_timeout(context, op="echo", **kwargs):
    return _run(context, op, kwargs)


@beam.endpoint(name="http-queue", max_pending_tasks=2, timeout=20)
def small_queue(context, op="echo", **kwargs):
    return _run(context, op, kwargs)


@beam.endpoint(name="http-open", authorized=False)
def open_endpoint(context, op="echo", **kwargs):
    return _run(context, op, kwargs)
