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
import inspect
import os
import signal
from typing import Any, Callable, Coroutine, Dict, List, Optional, Set, Tuple

from .exceptions import TaskTimeout

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


# ---------------------------------------------------------------------------------------
# Interleaved async calls and streams, driven by the C worker's libuv loop (csrc/aio.c).

#: Event kinds step() reports to the C side, as (token, kind, value).
RESULT, ERROR, TIMEOUT, CHUNK, END = range(5)
#: Loop iterations per step while callbacks are ready: a task's done callbacks (queued
#: with call_soon) then run in the step that finished the task, not one libuv turn later.
STEP_ROUNDS = 4


async def _collect(agen: Any) -> List[Any]:
    """A request that did not ask for chunk frames gets the chunks as one list."""
    return [x async for x in agen]


async def _next(agen: Any) -> Tuple[bool, Any]:
    """One chunk: (True, value), or (False, None) at the end. StopAsyncIteration does not
    leave this coroutine (a Task would turn it into an error)."""
    try:
        return True, await agen.__anext__()
    except StopAsyncIteration:
        return False, None


class _Call:
    __slots__ = ("token", "deadline", "timer", "task", "agen", "timed_out", "pulling", "stream",
                 "want_pull")

    def __init__(self, token: int) -> None:
        self.token = token
        self.deadline = 0.0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.task: Optional[asyncio.Future] = None
        self.agen: Any = None
        self.timed_out = False
        self.pulling = False  # task is a _next(): its result is a chunk
        self.stream = False  # the request asked for chunk frames
        self.want_pull = False  # pull() came while the coroutine still ran


class Driver:
    """The worker's loop in steps: the C side never blocks in Python's select.

    csrc/aio.c polls the selector's fd (``fileno``) in its libuv loop, and runs ``step``
    when it is readable or when ``delay`` seconds have passed. One step is one iteration
    of the asyncio loop: ``loop.stop()`` queued behind the ready callbacks makes
    ``run_forever`` return after them. ``delay`` reads the loop's ready queue and timer
    heap (``_ready``, ``_scheduled``: BaseEventLoop's own, unchanged since 3.4); the
    loop is a plain ``SelectorEventLoop`` made here, never a policy's, so they exist.

    Calls are identified by the C side's token (an int). Once a call's final event is
    reported, or the C side cancelled it, its token is never reported again, so the C
    side may free what the token names right after ``cancel``.

    Timeouts: each call has a deadline for the whole call or stream; reaching it cancels
    the task (``CancelledError`` at the handler's ``await``) and reports TIMEOUT. A
    coroutine that never awaits is stopped by SIGALRM, armed around each step for the
    earliest deadline: ``on_alarm`` raises ``TaskTimeout`` only in the task whose
    deadline passed, so a busy handler cannot time out a sibling.
    """

    def __init__(self, func: Callable[..., Any], timeout: float) -> None:
        global _loop, _loop_pid
        self.loop = asyncio.SelectorEventLoop()
        asyncio.set_event_loop(self.loop)
        _loop, _loop_pid = self.loop, os.getpid()  # worker_loop() is this loop too
        self.func = func
        self.timeout = timeout
        self.calls: Dict[int, _Call] = {}
        self.by_task: Dict[asyncio.Future, _Call] = {}
        self.closing: Set[asyncio.Future] = set()  # aclose() tasks: the loop holds weak refs
        self.events: List[Tuple[int, int, Any]] = []
        self.stepping = False

    def fileno(self) -> int:
        return self.loop._selector.fileno()  # type: ignore[attr-defined]

    # -- called by the C side ------------------------------------------------------------
    def start(self, token: int, kwargs: Dict[str, Any], stream: bool) -> None:
        """Call the handler. A coroutine becomes a task; an async generator is collected
        into a list, or with ``stream`` waits for ``pull``. Raises what the call raised."""
        obj = self.func(**kwargs)
        call = _Call(token)
        call.stream = stream
        if inspect.isasyncgen(obj):
            self._stream(call, obj)
        elif inspect.isawaitable(obj):
            self._run(call, obj)
        else:  # a plain value (a sync function that the endpoint marked async)
            self.events.append((token, RESULT, obj))
            return
        self.calls[token] = call
        if self.timeout > 0:
            call.deadline = self.loop.time() + self.timeout
            call.timer = self.loop.call_at(call.deadline, self._expire, call)

    def pull(self, token: int) -> None:
        """Ask a stream for its next chunk (reported as CHUNK, or END)."""
        call = self.calls.get(token)
        if call is None:
            return
        if call.agen is not None and call.task is None:
            call.pulling = True
            self._run(call, _next(call.agen))
        elif call.agen is None:
            call.want_pull = True  # an async def that may return an async generator

    def cancel(self, token: int) -> None:
        """The client went away: cancel the task, close the generator (its ``finally``
        runs in a later step). Nothing more is reported for this token."""
        call = self.calls.pop(token, None)
        if call is not None:
            self._stop(call)

    def step(self) -> List[Tuple[int, int, Any]]:
        loop = self.loop
        self.stepping = True
        armed = False
        try:
            armed = self._arm_alarm()
            for _ in range(STEP_ROUNDS):
                loop.call_soon(loop.stop)
                loop.run_forever()
                if not loop._ready:  # type: ignore[attr-defined]
                    break
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.stepping = False
        events, self.events = self.events, []
        return events

    def delay(self) -> float:
        """Seconds until the next step is due: 0 now, -1 only when the fd says so."""
        loop = self.loop
        if loop._ready:  # type: ignore[attr-defined]
            return 0.0
        if loop._scheduled:  # type: ignore[attr-defined]
            return max(0.0, loop._scheduled[0].when() - loop.time())  # type: ignore[attr-defined]
        return -1.0

    def on_alarm(self) -> None:
        """SIGALRM during a step: time out the running task if its deadline passed."""
        task = asyncio.current_task(self.loop)
        call = self.by_task.get(task) if task is not None else None
        if call is None or not call.deadline:
            return  # the loop's own code: its timers cancel what is overdue
        left = call.deadline - self.loop.time()
        if left <= 0:
            call.timed_out = True
            raise TaskTimeout("request exceeded the endpoint's timeout")
        signal.setitimer(signal.ITIMER_REAL, left)

    # -- internals -----------------------------------------------------------------------
    def _run(self, call: _Call, coro: Any) -> None:
        task = asyncio.ensure_future(coro, loop=self.loop)
        call.task = task
        self.by_task[task] = call
        task.add_done_callback(functools.partial(self._done, call))

    def _arm_alarm(self) -> bool:
        deadlines = [c.deadline for c in self.calls.values() if c.deadline and c.task is not None]
        if not deadlines:
            return False
        signal.setitimer(signal.ITIMER_REAL, max(min(deadlines) - self.loop.time(), 1e-6))
        return True

    def _finish(self, call: _Call, kind: int, value: Any) -> None:
        if self.calls.pop(call.token, None) is not None:
            self.events.append((call.token, kind, value))
        if call.timer is not None:
            call.timer.cancel()

    def _done(self, call: _Call, task: asyncio.Future) -> None:
        self.by_task.pop(task, None)
        call.task = None
        pulling, call.pulling = call.pulling, False
        if call.token not in self.calls:
            return  # cancelled by the C side: nothing to report
        if task.cancelled():
            if call.timed_out:
                self._finish(call, TIMEOUT, None)
            else:
                self._finish(call, ERROR, asyncio.CancelledError("the handler's task was cancelled"))
            return
        exc = task.exception()  # a generator that raised is finished: nothing to close
        if exc is not None:
            timed_out = call.timed_out or isinstance(exc, TaskTimeout)
            self._finish(call, TIMEOUT if timed_out else ERROR, exc)
        elif not pulling and inspect.isasyncgen(task.result()):
            self._stream(call, task.result())  # an async def returned its generator
        elif not pulling:
            self._finish(call, RESULT, task.result())
        else:
            more, value = task.result()
            if more:
                self.events.append((call.token, CHUNK, value))
            else:
                self._finish(call, END, None)

    def _stream(self, call: _Call, agen: Any) -> None:
        call.agen = agen
        if not call.stream:
            self._run(call, _collect(agen))
        elif call.want_pull:
            call.want_pull = False
            self.pull(call.token)

    def _expire(self, call: _Call) -> None:
        call.timer = None
        call.timed_out = True
        if call.task is not None:
            call.task.cancel()  # reported by _done
        else:  # a stream between chunks (its reader is slow): end it here
            self._finish(call, TIMEOUT, None)
            self._close(call.agen)

    def _stop(self, call: _Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
        if call.task is not None:
            call.task.cancel()  # CancelledError inside the generator ends it too
        elif call.agen is not None:
            self._close(call.agen)

    def _close(self, agen: Any) -> None:
        task = asyncio.ensure_future(agen.aclose(), loop=self.loop)
        self.closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Future) -> None:
        self.closing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an error in a finally is not logged as unhandled


_driver: Optional[Driver] = None


def make_driver(func: Callable[..., Any], timeout: float) -> Driver:
    """Called by the C worker once per worker process, for an async endpoint."""
    global _driver
    _driver = Driver(func, timeout)
    return _driver


def alarm_in_step() -> bool:
    """In a worker with a driver SIGALRM is the driver's (see Driver.on_alarm): one that
    lands just after a step, before it was disarmed, is ignored (the loop's timers still
    end what is overdue) rather than raised into whatever runs next."""
    if _driver is None:
        return False
    if _driver.stepping:
        _driver.on_alarm()
    return True
