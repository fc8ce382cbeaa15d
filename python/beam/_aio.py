"""``async def`` handlers and ``on_start``, run to completion on the worker's own loop.

The C request path calls ``Endpoint.func`` and expects a result; for a coroutine
function that is ``sync_runner(func)``, which drives the coroutine on an event loop
owned by the calling process. The loop is made on the first call in each process, so
it is created after fork (and after a restore) and never shared with the host or a
sibling worker. One call runs at a time (as for sync handlers); interleaving
concurrent calls on the loop is not done here.

Timeouts stay the C host's ITIMER_REAL: SIGALRM raises ``TaskTimeout`` wherever Python
is running. If that is inside the coroutine, the task ends with it; if it is in the
loop's select, the task is still pending and is cancelled here (its ``finally``
blocks get up to CANCEL_GRACE_S), then ``TaskTimeout`` goes on to the C side.
"""
from __future__ import annotations

import asyncio
import functools
import os
from typing import Any, Callable, Coroutine, Optional

CANCEL_GRACE_S = 1.0

_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_pid = 0


def worker_loop() -> asyncio.AbstractEventLoop:
    """This process's loop, created on first use in it (a fork child makes its own)."""
    global _loop, _loop_pid
    if _loop is None or _loop_pid != os.getpid() or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        _loop_pid = os.getpid()
        asyncio.set_event_loop(_loop)
    return _loop


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    loop = worker_loop()
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:  # TaskTimeout from SIGALRM, or the coroutine's own error
        if not task.done():
            task.cancel()
            loop.run_until_complete(asyncio.wait([task], timeout=CANCEL_GRACE_S))
        raise


def sync_runner(func: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """A plain function the C host can call: it runs ``func``'s coroutine to the end."""

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        return run(func(*args, **kwargs))

    return call


def run_on_start(result: Any) -> Any:
    """``on_start`` runs in the host before any fork: an awaitable result is run on a
    loop of its own that is closed afterwards, so no loop is inherited by workers."""
    if asyncio.iscoroutine(result):
        return asyncio.run(result)
    return result
