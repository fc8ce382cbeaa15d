"""App for tests/test_stream.py: sync and async generators that stream, plus ordinary
calls, on one endpoint per mode (sync: ``handler``; async: ``ahandler``)."""
import asyncio
import os
import time

import beam


def _mark(path, text):
    if path:
        with open(path, "a") as f:
            f.write(text)


@beam.endpoint(name="stream-app", timeout=float(os.environ.get("STREAM_TIMEOUT", "30")))
def handler(op="gen", n=3, size=0, delay=0.0, fail_at=-1, mark="", value=None):
    if op == "echo":
        return value
    if op == "rss":  # KiB, as /proc/self/status says
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return _gen(n, size, delay, fail_at, mark)


def _gen(n, size, delay, fail_at, mark):
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"failed at {i}")
            if delay:
                time.sleep(delay)
            _mark(mark and mark + ".progress", f"{i}\n")
            yield {"i": i, "pad": "x" * size} if size else {"i": i}
    finally:
        _mark(mark, "closed\n")


@beam.endpoint(name="astream-app", timeout=float(os.environ.get("STREAM_TIMEOUT", "30")),
               concurrent_requests=int(os.environ.get("STREAM_CONCURRENCY", "50")))
async def ahandler(op="gen", n=3, size=0, delay=0.0, fail_at=-1, mark="", value=None,
                   seconds=0.0):
    if op == "sleep":
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            _mark(mark, "cancelled\n")
            raise
        return value
    async def agen():
        try:
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"failed at {i}")
                await asyncio.sleep(delay)
                _mark(mark and mark + ".progress", f"{i}\n")
                yield {"i": i, "pad": "x" * size} if size else {"i": i}
        finally:
            _mark(mark, "closed\n")
    if op == "echo":
        return value
    return agen()
