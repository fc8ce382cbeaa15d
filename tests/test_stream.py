"""Streamed answers (issue 10) and interleaved async calls, against the real worker:
generators (sync and async) over msgpack, pipelined with ordinary calls; over HTTP with
curl -N (SSE and NDJSON); a slow reader (the worker stops pulling, its memory stays
bounded); a reader that leaves (the generator's finally: runs); an error mid-stream; a
stream from a restored replica; concurrent_requests for async handlers."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

pytest.importorskip("msgpack")

from beam.client import Client  # noqa: E402
from beam.exceptions import RemoteError  # noqa: E402
from wire import connect, frame, recv_frame  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SYNC, ASYNC = "stream_app.py:handler", "stream_app.py:ahandler"


def start(start_worker, workdir, app, env=None):
    return start_worker(app, "--no-checkpoint", "--socket", str(workdir / "s.sock"), env=env)


def wait_for_text(path, text, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.02)


def vm_rss_kib(address: str) -> int:
    """The worker's VmRSS, read inside it on a second connection (its pid is one of its
    own PID namespace). A sync worker answers it while the stream waits for its reader."""
    with Client(address, timeout=10) as c:
        return c.call(op="rss")

# ---------------------------------------------------------------- msgpack frame sequence
@pytest.mark.parametrize("app", [SYNC, ASYNC])
def test_stream_frames_interleave_in_request_order_with_calls(start_worker, workdir, app):
    w = start(start_worker, workdir, app)
    with connect(w.unix) as s:
        s.sendall(frame({"id": 1, "kwargs": {"n": 3}, "stream": True})
                  + frame({"id": 2, "kwargs": {"op": "echo", "value": 5}})
                  + frame({"id": 3, "kwargs": {"n": 2}})  # no "stream": one list result
                  + frame({"id": "s", "kwargs": {"n": 0}, "stream": True})
                  + frame({"id": 4, "kwargs": {"op": "echo", "value": 6}, "stream": True}))
        got = [recv_frame(s) for _ in range(8)]
    first = got[0]
    assert first["id"] == 1 and first["chunk"] == {"i": 0} and "ok" not in first and first["task_id"]
    assert [g["chunk"] for g in got[1:3]] == [{"i": 1}, {"i": 2}]
    assert all(g["id"] == 1 and "task_id" not in g for g in got[1:3])
    end = got[3]
    assert end["id"] == 1 and end["ok"] is True and end["result"] is None and end["chunks"] == 3
    assert end["task_id"] == first["task_id"]
    assert got[4]["id"] == 2 and got[4]["result"] == 5
    assert got[5]["id"] == 3 and got[5]["result"] == [{"i": 0}, {"i": 1}]
    assert got[6]["id"] == "s" and got[6]["ok"] is True and got[6]["chunks"] == 0
    # a handler that returns a plain value answers a streaming request with one frame
    assert got[7]["id"] == 4 and got[7]["result"] == 6 and "chunks" not in got[7]
    with Client(w.unix, timeout=10) as c:
        assert list(c.stream(n=4)) == [{"i": i} for i in range(4)]
        assert list(c.stream(op="echo", value=[1])) == [[1]]
        assert c.call(n=2) == [{"i": 0}, {"i": 1}]  # the same connection goes on


@pytest.mark.parametrize("app", [SYNC, ASYNC])
def test_error_mid_stream_is_the_final_frame(start_worker, workdir, app):
    w = start(start_worker, workdir, app)
    mark = workdir / "mark"
    with Client(w.unix, timeout=10) as c:
        got = []
        with pytest.raises(RemoteError) as ei:
            for chunk in c.stream(n=5, fail_at=2, mark=str(mark)):
                got.append(chunk)
        assert got == [{"i": 0}, {"i": 1}]
        assert ei.value.type == "ValueError" and "failed at 2" in ei.value.message
        assert mark.read_text() == "closed\n"
        assert c.call(op="echo", value="after") == "after"


@pytest.mark.parametrize("app", [SYNC, ASYNC])
def test_client_leaving_mid_stream_closes_the_generator(start_worker, workdir, app):
    w = start(start_worker, workdir, app)
    mark = workdir / "mark"
    with Client(w.unix, timeout=10) as c:
        for i, chunk in enumerate(c.stream(n=100000, delay=0.02, mark=str(mark))):
            if i == 2:
                break  # closes the connection
        wait_for_text(mark, "closed\n")
        progress = len((workdir / "mark.progress").read_text().splitlines())
        time.sleep(0.3)
        assert len((workdir / "mark.progress").read_text().splitlines()) == progress
        assert c.call(op="echo", value="next") == "next"


def test_stream_timeout_covers_the_whole_stream(start_worker, workdir):
    for app in (SYNC, ASYNC):
        w = start(start_worker, workdir, app, env={"STREAM_TIMEOUT": "1"})
        with Client(w.unix, timeout=10) as c:
            got = []
            with pytest.raises(RemoteError) as ei:
                for chunk in c.stream(n=100, delay=0.1):
                    got.append(chunk)
            assert ei.value.type == "Timeout" and 5 <= len(got) <= 11, got
            assert c.call(op="echo", value=1) == 1
        w.stop()


def test_slow_reader_bounds_the_workers_memory(start_worker, workdir):
    w = start(start_worker, workdir, SYNC)
    mark = workdir / "mark"
    with Client(w.unix, timeout=30) as c:
        base = vm_rss_kib(w.unix)
        n, size = 4000, 64 * 1024  # 256 MiB if it were all produced at once
        stream = c.stream(n=n, size=size, mark=str(mark))
        assert next(stream)["i"] == 0
        time.sleep(2.0)  # read nothing: the worker must stop pulling
        pulled = len((workdir / "mark.progress").read_text().splitlines())
        grown = vm_rss_kib(w.unix) - base
        assert pulled < 200, f"{pulled} chunks pulled for a reader that reads nothing"
        assert grown < 40 * 1024, f"worker grew by {grown} KiB"
        rest = sum(1 for _ in stream)
        assert rest == n - 1
        assert vm_rss_kib(w.unix) - base < 40 * 1024


# ---------------------------------------------------------------- async concurrency
def test_async_calls_interleave_up_to_concurrent_requests(start_worker, workdir):
    w = start(start_worker, workdir, ASYNC, env={"STREAM_TIMEOUT": "3"})
    mark = workdir / "cancelled"
    with Client(w.unix, timeout=20) as c:
        t0 = time.monotonic()
        assert c.pipeline([{"op": "sleep", "seconds": 1, "value": i} for i in range(50)]) == list(range(50))
        assert time.monotonic() - t0 < 3.0
        calls = [{"op": "sleep", "seconds": 1, "value": i} for i in range(49)]
        calls.insert(10, {"op": "sleep", "seconds": 30, "value": "late", "mark": str(mark)})
        t0 = time.monotonic()
        out = c.pipeline(calls)
        elapsed = time.monotonic() - t0
    assert isinstance(out[10], RemoteError) and out[10].type == "Timeout"
    assert [v for i, v in enumerate(out) if i != 10] == list(range(49))
    assert 2.5 < elapsed < 5.0  # one timed out at 3 s; the others were not held up
    assert mark.read_text() == "cancelled\n"  # CancelledError inside the handler
    with Client(w.unix, timeout=10) as c2:  # and the worker keeps serving
        assert c2.call(op="echo", value="ok") == "ok"


def test_concurrent_requests_one_runs_async_calls_one_at_a_time(start_worker, workdir):
    w = start(start_worker, workdir, ASYNC, env={"STREAM_CONCURRENCY": "1"})
    with Client(w.unix, timeout=20) as c:
        t0 = time.monotonic()
        c.pipeline([{"op": "sleep", "seconds": 0.3} for _ in range(4)])
        assert time.monotonic() - t0 >= 1.2


# ---------------------------------------------------------------- HTTP (curl -N)
def _curl(port, body, *headers):
    args = ["curl", "-sN", "--max-time", "20", "-D", "-", "-d", json.dumps(body)]
    for h in headers:
        args += ["-H", h]
    r = subprocess.run(args + [f"http://127.0.0.1:{port}/"], capture_output=True, timeout=30)
    head, _, text = r.stdout.decode().partition("\r\n\r\n")
    return head.lower(), text


@pytest.mark.parametrize("app", [SYNC, ASYNC])
def test_http_streams_sse_and_ndjson(workdir, app):
    from test_router import Served

    s = Served(workdir, app)
    try:
        head, text = _curl(s.port, {"n": 3}, "Accept: text/event-stream")
        assert "content-type: text/event-stream" in head and "transfer-encoding: chunked" in head
        assert "x-task-id:" in head
        assert text == "".join(f'data: {{"i":{i}}}\n\n' for i in range(3))
        head, text = _curl(s.port, {"n": 3, "fail_at": 2})
        assert "content-type: application/x-ndjson" in head
        lines = [json.loads(x) for x in text.splitlines()]
        assert lines[:2] == [{"i": 0}, {"i": 1}]
        assert lines[2]["error"]["type"] == "ValueError" and len(lines) == 3
        head, text = _curl(s.port, {"n": 3, "fail_at": 1}, "Accept: text/event-stream")
        assert text.startswith('data: {"i":0}\n\nevent: error\ndata: {"error":{"type":"ValueError"')
        status, body = s.call(op="echo", value=[1, 2])  # ordinary answers are unchanged
        assert status == 200 and body == [1, 2]
        # the client leaves: the router closes its upstream, the worker the generator
        mark = workdir / "mark"
        p = subprocess.Popen(["curl", "-sN", "-d", json.dumps({"n": 100000, "delay": 0.02,
                              "mark": str(mark)}), f"http://127.0.0.1:{s.port}/"],
                             stdout=subprocess.PIPE)
        assert p.stdout.readline().startswith(b'{"i":0}')
        p.kill()
        p.wait()
        wait_for_text(mark, "closed\n")
        status, body = s.call(op="echo", value="after")
        assert status == 200 and body == "after"
    finally:
        s.stop()


def test_first_chunk_arrives_before_the_stream_ends(workdir):
    from test_router import Served

    s = Served(workdir, SYNC)
    try:
        p = subprocess.Popen(["curl", "-sN", "-H", "Accept: text/event-stream", "-d",
                              json.dumps({"n": 3, "delay": 1.0}), f"http://127.0.0.1:{s.port}/"],
                             stdout=subprocess.PIPE)
        t0 = time.monotonic()
        assert p.stdout.readline() == b'data: {"i":0}\n'
        assert time.monotonic() - t0 < 2.0  # one chunk's delay, not the stream's
        p.wait(10)
    finally:
        s.stop()


# ---------------------------------------------------------------- after a restore
def test_stream_from_a_restored_replica(workdir):
    from test_router import Served

    first = Served(workdir, "stream_ckpt_app.py:handler", tag="one")
    assert "checkpoint written" in first.wait_for("checkpoint written")
    first.stop()
    second = Served(workdir, "stream_ckpt_app.py:handler", tag="two")
    try:
        assert "restored from checkpoint" in second.log()
        head, text = _curl(second.port, {"n": 3}, "Accept: text/event-stream")
        chunks = [json.loads(line[len("data: "):]) for line in text.split("\n\n") if line]
        assert [c["i"] for c in chunks] == [0, 1, 2]
        assert len({c["loaded_by"] for c in chunks}) == 1  # on_start's value, from the image
    finally:
        second.stop()


def test_async_calls_interleave_over_http_too(workdir):
    """concurrent_requests=N over the HTTP front: the router gives an async endpoint's
    worker up to N calls at once (a sync worker gets one running, one ready)."""
    from test_router import Served

    s = Served(workdir, ASYNC, "--no-checkpoint", "--workers", "1",
               "--pass-env", "STREAM_CONCURRENCY", env={"STREAM_CONCURRENCY": "16"})
    try:
        out: list = [None] * 16

        def call(i):
            out[i] = s.call(timeout=30, op="sleep", seconds=1, value=i)

        t0 = time.monotonic()
        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert out == [(200, i) for i in range(16)], out
        assert elapsed < 2.5, f"16 async calls of 1 s over HTTP took {elapsed:.1f} s"
    finally:
        s.stop()
