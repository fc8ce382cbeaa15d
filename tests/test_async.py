"""``async def`` handlers and on_start on the real worker (python/beam/_aio.py): the
coroutine runs to completion on a loop owned by each worker process, errors and
timeouts come back as for sync handlers, and a timed-out task is cancelled."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("msgpack")

import beam  # noqa: E402
from beam.exceptions import RemoteError  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def test_async_handler_on_start_errors_and_timeouts(start_worker, workdir):
    cancel_file = workdir / "cancelled.txt"
    w = start_worker("async_app.py:handler", "--no-checkpoint", "--socket", str(workdir / "s.sock"),
                     env={"ASYNC_TEST_CANCEL_FILE": str(cancel_file)})
    with w.client(timeout=20) as c:
        assert c.call(value={"a": [1, 2.5]}) == {"a": [1, 2.5]}
        st = c.call(op="state")
        assert st["on_start"]["loaded_by"] != st["pid"]  # on_start ran in the host, once
        assert c.call(op="state")["loop"] == st["loop"]  # one loop per worker, reused
        with pytest.raises(RemoteError) as ei:
            c.call(op="raise")
        assert ei.value.type == "ValueError" and "async boom" in ei.value.message
        with pytest.raises(RemoteError) as ei:
            c.call(op="sleep", seconds=30)
        assert ei.value.type == "Timeout"
        assert cancel_file.read_text() == "cancelled\n"
        with pytest.raises(RemoteError) as ei:
            c.call(op="spin")
        assert ei.value.type == "Timeout"
        assert c.call(value="after") == "after"  # the loop still works


def test_calling_an_async_endpoint_directly_gives_its_coroutine():
    @beam.endpoint
    async def f(x: int) -> int:
        return x + 1

    assert asyncio.run(f(1)) == 2
    assert f.func(x=2) == 3  # what the worker calls runs it to completion
