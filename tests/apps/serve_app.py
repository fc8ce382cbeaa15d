"""App for tests/test_serve.py: one endpoint that takes ``context`` and does what ``op``
says, and one (``plain``) that does not declare ``context``."""
import os
import signal
import sys
import time
from pathlib import Path

import beam

COUNT_FILE = os.environ.get("BEAM_TEST_COUNT_FILE")


def load():
    print(f"serve_app on_start in pid {os.getpid()}", flush=True)
    if COUNT_FILE:
        with open(COUNT_FILE, "a") as f:
            f.write(f"{os.getpid()}\n")
    return {"model": "loaded", "answer": 42}


@beam.endpoint(on_start=load, name="serve-app", timeout=30,
               env={"BEAM_TEST_FROM_DECORATOR": "decorator-value"})
def handler(context, op="echo", **kwargs):
    if op == "echo":
        return kwargs.get("value")
    if op == "kwargs":
        return {"keys": sorted(kwargs), "types": {k: type(v).__name__ for k, v in kwargs.items()}}
    if op == "context":
        return {
            "on_start_value": context.on_start_value,
            "task_id": context.task_id,
            "container_id": context.container_id,
            "timeout": context.timeout,
            "name": context.name,
            "python_version": context.python_version,
            "bind_address": context.bind_address,
            "is_context": type(context).__name__,
        }
    if op == "pid":
        return os.getpid()
    if op == "env":
        return os.environ.get(kwargs["name"])
    if op == "sleep":
        if kwargs.get("marker"):
            Path(kwargs["marker"]).write_text(str(os.getpid()))
        time.sleep(kwargs["seconds"])
        return {"slept": kwargs["seconds"], "tag": kwargs.get("tag")}
    if op == "hold":
        # Block this worker until the test creates ``<path>.release``.
        path = kwargs["path"]
        Path(path + ".started").write_text(str(os.getpid()))
        deadline = time.monotonic() + 20
        while not os.path.exists(path + ".release") and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.getpid()
    if op == "bytes":
        return bytes(range(256)) * kwargs.get("repeat", 1)
    if op == "bytearray":
        return bytearray(b"\x00\xffbytearray")
    if op == "memoryview":
        return memoryview(b"memoryview\x00")
    if op == "len":
        return len(kwargs["data"])
    if op == "ints":
        return list(range(kwargs["n"]))
    if op == "print":
        print(f"handler print: {kwargs['text']}", flush=True)
        return "printed"
    if op == "write_volume":
        Path("weights", kwargs["name"]).write_text(kwargs["text"])
        return os.path.realpath("weights")
    if op == "read_volume":
        return Path("weights", kwargs["name"]).read_text()
    if op == "exit":
        os._exit(3)
    if op == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(5)
    raise ValueError(f"unknown op {op!r}")


@beam.endpoint(name="plain")
def plain(**kwargs):
    return {"keys": sorted(kwargs)}


@beam.endpoint(name="positional")
def positional(a, b=2):
    return [a, b]
