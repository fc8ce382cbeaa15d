"""App for tests/test_router.py: the HTTP router's failure paths, served the way a user
serves (``python -m beam serve router_app.py:NAME --port P --no-auth``).

``crashy`` has one worker, so a worker crash takes every router connection with it;
``op="crash"`` ends that worker at once (``os._exit(3)``), as a crashing C extension
would. ``op="big"`` returns ``n`` bytes, for results larger than ``--max-frame``."""
import os
import time

import beam


def _run(op, kwargs):
    if op == "echo":
        return kwargs.get("value")
    if op == "crash":
        os._exit(3)
    if op == "big":
        return b"x" * int(kwargs["n"])
    if op == "sleep":
        time.sleep(float(kwargs.get("seconds", 0.05)))
        return {"i": kwargs.get("i"), "pid": os.getpid()}
    if op == "pid":
        return os.getpid()
    raise ValueError(f"unknown op {op!r}")


@beam.endpoint(name="router-crashy", workers=1, timeout=60)
def crashy(op="echo", **kwargs):
    return _run(op, kwargs)


@beam.endpoint(name="router-ckpt", workers=1, timeout=60, checkpoint_enabled=True)
def ckpt(op="echo", **kwargs):
    return _run(op, kwargs)


@beam.endpoint(name="router-where", workers=1, timeout=60)
def where(seconds=0.0, out_bytes=0, context=None):
    """Which replica and worker ran the call (after sleeping ``seconds``); ``out_bytes``
    of output on stdout first, for a supervisor whose stdout nobody reads."""
    import sys
    if out_bytes:
        sys.stdout.write("o" * int(out_bytes) + "\n")
        sys.stdout.flush()
    time.sleep(float(seconds))
    return {"container": context.container_id, "worker": context.worker, "pid": os.getpid()}
