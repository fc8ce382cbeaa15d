"""App for tests/test_async.py: an ``async def`` handler and an async on_start."""
import asyncio
import os

import beam


async def load():
    await asyncio.sleep(0.01)
    return {"loaded_by": os.getpid()}


@beam.endpoint(on_start=load, name="async-app", timeout=1)
async def handler(context, op="echo", value=None, seconds=0.0):
    if op == "echo":
        await asyncio.sleep(0)
        return value
    if op == "sleep":  # past the timeout: the task must be cancelled
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            open(os.environ["ASYNC_TEST_CANCEL_FILE"], "a").write("cancelled\n")
            raise
        return "slept"
    if op == "spin":  # timeout while the coroutine itself runs Python code
        while True:
            pass
    if op == "raise":
        await asyncio.sleep(0)
        raise ValueError("async boom")
    if op == "state":
        loop = asyncio.get_running_loop()
        return {"on_start": context.on_start_value, "pid": os.getpid(), "loop": id(loop)}
    raise ValueError(f"unknown op {op!r}")
