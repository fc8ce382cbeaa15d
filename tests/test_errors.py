"""End-to-end tests of error handling: every error the worker reports (docs/protocol.md),
each followed by a check that the worker still answers on a new connection.

The app is tests/apps/error_app.py (an endpoint with timeout=1); apps that must fail to
start are written into the test's temporary directory.
"""
from __future__ import annotations

import socket
import struct
import textwrap
import time
from pathlib import Path

import pytest

msgpack = pytest.importorskip("msgpack")

from beam.client import Client  # noqa: E402
from wire import connect, frame, raw_frame, recv_frame, roundtrip  # noqa: E402
from beam.exceptions import RemoteError  # noqa: E402

pytestmark = pytest.mark.timeout(60)

APPS = Path(__file__).resolve().parent / "apps"
APP = "error_app.py:handler"


# ------------------------------------------------------------------ raw protocol helpers
def assert_closed(s: socket.socket) -> None:
    """The worker closed this connection (EOF; a reset counts too)."""
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass


def assert_error(resp, type_, id_=None, task_id=False):
    assert resp["ok"] is False, resp
    assert resp["id"] == id_
    assert resp["error"]["type"] == type_, resp
    assert isinstance(resp["error"]["message"], str) and resp["error"]["message"]
    assert isinstance(resp["error"]["traceback"], str)
    assert ("task_id" in resp) == task_id, resp
    assert "result" not in resp


def assert_serving(w, address=None) -> None:
    """A fresh connection gets a correct answer."""
    with Client(address or w.unix, timeout=10) as c:
        assert c.call(op="ok", value="still here") == {"ok": True, "echo": "still here"}
        assert c.ping() == "pong"
    assert w.proc.poll() is None


@pytest.fixture
def worker(start_worker, workdir):
    return start_worker(APP, "--no-checkpoint", "--socket", str(workdir / "s.sock"),
                        "--tcp", "127.0.0.1:0")


# ------------------------------------------------------------------ handler errors
def test_handler_exception(worker):
    with Client(worker.unix, timeout=10) as c:
        with pytest.raises(RemoteError) as ei:
            c.call(op="raise", message="bad input: ü")
        err = ei.value
        assert err.type == "ValueError"
        assert err.message == "bad input: ü"
        assert err.task_id
        tb = err.remote_traceback
        assert tb.startswith("Traceback (most recent call last):")
        assert "error_app.py" in tb
        assert "in handler" in tb and "in failing_handler_helper" in tb
        assert tb.rstrip().endswith("ValueError: bad input: ü")

        with pytest.raises(RemoteError) as ei:
            c.call(op="keyerror")
        assert ei.value.type == "KeyError" and "missing-key" in ei.value.message
        # same connection keeps working
        assert c.call(value=1) == {"ok": True, "echo": 1}
    with connect(worker.tcp) as s:
        resp = roundtrip(s, {"id": 3, "kwargs": {"op": "raise"}})
        assert_error(resp, "ValueError", 3, task_id=True)
        assert resp["error"]["message"] == "boom"
    assert_serving(worker)


@pytest.mark.parametrize("op,type_,message", [
    ("sysexit", "SystemExit", "3"),
    ("kbint", "KeyboardInterrupt", "interrupted by the handler"),
])
def test_base_exceptions_do_not_stop_the_worker(worker, op, type_, message):
    with Client(worker.unix, timeout=10) as c:
        pid = c.stats()["pid"]
        with pytest.raises(RemoteError) as ei:
            c.call(op=op)
        assert ei.value.type == type_ and ei.value.message == message
        assert "error_app.py" in ei.value.remote_traceback
        assert c.stats()["pid"] == pid
    assert_serving(worker)


def test_exception_message_with_surrogate(worker):
    with Client(worker.unix, timeout=10) as c:
        with pytest.raises(RemoteError) as ei:
            c.call(op="surrogate")
        assert ei.value.type == "ValueError"
        assert "bad byte" in ei.value.message and "in input" in ei.value.message
        assert "error_app.py" in ei.value.remote_traceback
    assert_serving(worker)


def test_exception_with_failing_str(worker):
    with Client(worker.unix, timeout=10) as c:
        with pytest.raises(RemoteError) as ei:
            c.call(op="unprintable")
        assert ei.value.type == "UnprintableError"
        assert "error_app.py" in ei.value.remote_traceback
    assert_serving(worker)


@pytest.mark.parametrize("op", ["sleep", "busy"])
def test_timeout(worker, op):
    with connect(worker.unix) as s:
        t0 = time.monotonic()
        resp = roundtrip(s, {"id": op, "kwargs": {"op": op, "seconds": 5}})
        elapsed = time.monotonic() - t0
        assert_error(resp, "Timeout", op, task_id=True)
        assert "timeout" in resp["error"]["message"]
        assert 0.9 <= elapsed < 2.5, elapsed
        # the next request on the same connection works, and is not hit by a stale alarm
        resp = roundtrip(s, {"id": "next", "kwargs": {"op": "sleep", "seconds": 0.5}})
        assert resp == {"id": "next", "ok": True, "task_id": resp["task_id"], "result": "woke up"}
    assert_serving(worker)


def test_timeout_in_pipeline_does_not_disturb_neighbours(worker):
    with Client(worker.unix, timeout=10) as c:
        out = c.pipeline([{"value": 1}, {"op": "sleep", "seconds": 3}, {"value": 2},
                          {"op": "busy", "seconds": 3}, {"value": 3}])
    assert out[0] == {"ok": True, "echo": 1}
    assert isinstance(out[1], RemoteError) and out[1].type == "Timeout"
    assert out[2] == {"ok": True, "echo": 2}
    assert isinstance(out[3], RemoteError) and out[3].type == "Timeout"
    assert out[4] == {"ok": True, "echo": 3}


# ------------------------------------------------------------------ framing errors
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_frame_too_large(start_worker, workdir, transport):
    w = start_worker(APP, "--no-checkpoint", "--max-frame", "1024",
                     "--socket", str(workdir / "s.sock"), "--tcp", "127.0.0.1:0")
    address = w.unix if transport == "unix" else w.tcp
    # exactly the limit is accepted
    body = msgpack.packb({"id": 1, "kwargs": {"value": ""}})
    pad = 1024 - len(body) - 2  # value grows from fixstr to str8 (+1 byte header)
    body = msgpack.packb({"id": 1, "kwargs": {"value": "x" * pad}})
    assert len(body) == 1024
    with connect(address) as s:
        s.sendall(raw_frame(body))
        assert recv_frame(s)["result"] == {"ok": True, "echo": "x" * pad}
        # one byte more is rejected on the header alone, before any body is sent
        s.sendall(struct.pack(">I", 1025))
        resp = recv_frame(s)
        assert_error(resp, "FrameTooLarge")
        assert "1024" in resp["error"]["message"]
        assert_closed(s)
    with connect(address) as s:  # a huge announced length, body following
        s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 4096)
        resp = recv_frame(s)
        assert_error(resp, "FrameTooLarge")
        assert_closed(s)
    assert_serving(w, address)


@pytest.mark.parametrize("body", [
    b"\xc1",                                    # never-used msgpack byte
    b"\xc1\xc1\xc1\xc1",
    msgpack.packb({"id": 1}) + b"\x00",         # trailing bytes
    msgpack.packb({"id": 1}) + msgpack.packb({"id": 2}),
    b"\x82\xa2id\x01",                          # map of 2 truncated inside the frame
    b"",                                        # empty body
], ids=["c1", "c1x4", "trailing", "two-values", "truncated", "empty"])
def test_malformed_body(worker, body):
    with connect(worker.unix) as s:
        s.sendall(raw_frame(body))
        resp = recv_frame(s)
        assert_error(resp, "BadFrame")
        assert_closed(s)
    assert_serving(worker)


def test_bad_frame_after_good_ones_in_a_pipeline(worker):
    with connect(worker.tcp) as s:
        s.sendall(frame({"id": 1, "kwargs": {"value": 1}}) + raw_frame(b"\xc1")
                  + frame({"id": 3, "kwargs": {"value": 3}}))
        assert recv_frame(s)["result"] == {"ok": True, "echo": 1}
        assert_error(recv_frame(s), "BadFrame")
        assert_closed(s)  # the request after the bad frame is not run
    assert_serving(worker, worker.tcp)


def test_nesting_too_deep(worker):
    deep = "leaf"
    for _ in range(40):
        deep = [deep]
    with connect(worker.unix) as s:
        resp = roundtrip(s, {"id": 1, "kwargs": {"value": deep}})
        assert_error(resp, "BadFrame")
        assert "32" in resp["error"]["message"]
        assert_closed(s)
    # moderately nested input is fine
    ok = "leaf"
    for _ in range(20):
        ok = [ok]
    with Client(worker.unix, timeout=10) as c:
        assert c.call(value=ok) == {"ok": True, "echo": ok}
    assert_serving(worker)


def test_result_nesting_limit(worker):
    with connect(worker.unix) as s:
        resp = roundtrip(s, {"id": 1, "kwargs": {"op": "deep", "depth": 50}})
        assert resp["ok"] is True
        value = resp["result"]
        for _ in range(50):
            value = value[0]
        assert value == "leaf"
        for op, extra in (("deep", {"depth": 100}), ("cycle", {})):
            resp = roundtrip(s, {"id": op, "kwargs": {"op": op, **extra}})
            assert_error(resp, "UnsupportedType", op, task_id=True)
        assert roundtrip(s, {"id": 2, "type": "ping"})["result"] == "pong"
    assert_serving(worker)


# ------------------------------------------------------------------ request errors
@pytest.mark.parametrize("body", [[1, 2, 3], "call", 42, None, b"bin"],
                         ids=["array", "str", "int", "nil", "bin"])
def test_body_not_a_map(worker, body):
    with connect(worker.unix) as s:
        resp = roundtrip(s, body)
        assert_error(resp, "BadRequest")
        # the connection stays open and in sync
        assert roundtrip(s, {"id": 2, "type": "ping"}) == {"id": 2, "ok": True, "result": "pong"}
    assert_serving(worker)


@pytest.mark.parametrize("kwargs", [[1, 2], "a=1", 5, {1: 2}, {b"key": 1}, {"ok": 1, None: 2}],
                         ids=["array", "str", "int", "int-key", "bin-key", "nil-key"])
def test_bad_kwargs(worker, kwargs):
    with connect(worker.unix) as s:
        resp = roundtrip(s, {"id": "k", "kwargs": kwargs})
        assert_error(resp, "BadRequest", "k")
        assert "kwargs" in resp["error"]["message"]
        assert roundtrip(s, {"id": 2, "kwargs": {"value": 2}})["result"] == {"ok": True, "echo": 2}
    assert_serving(worker)


@pytest.mark.parametrize("type_", ["explode", "CALL", "", 5, None, ["call"]])
def test_unknown_request_type(worker, type_):
    with connect(worker.unix) as s:
        resp = roundtrip(s, {"id": 9, "type": type_, "kwargs": {}})
        assert_error(resp, "BadRequest", 9)
        assert roundtrip(s, {"id": 10, "type": "ping"})["result"] == "pong"
    assert_serving(worker)


def test_invalid_utf8_str(worker):
    # msgpack str (0xa2) holding bytes that are not UTF-8, as a value and as a key
    as_value = b"\x82\xa2id\x01\xa6kwargs\x81\xa5value\xa2\xff\xfe"
    as_key = b"\x82\xa2id\x02\xa6kwargs\x81\xa2\xc3\x28\x01"
    with connect(worker.unix) as s:
        for n, body in ((1, as_value), (2, as_key)):
            s.sendall(raw_frame(body))
            resp = recv_frame(s)
            assert_error(resp, "BadRequest", n)
            assert "UTF-8" in resp["error"]["message"]
        assert roundtrip(s, {"id": 3, "type": "ping"})["result"] == "pong"
    assert_serving(worker)


def test_ext_type_rejected(worker):
    with connect(worker.unix) as s:
        resp = roundtrip(s, {"id": 1, "kwargs": {"value": msgpack.ExtType(5, b"xyz")}})
        assert_error(resp, "BadRequest", 1)
        assert "ext" in resp["error"]["message"]
        assert roundtrip(s, {"id": 2, "type": "ping"})["result"] == "pong"
    assert_serving(worker)


# ------------------------------------------------------------------ result errors
@pytest.mark.parametrize("op", ["set", "object", "nested_object", "bigint", "negbigint"])
def test_unsupported_result(worker, op):
    with connect(worker.unix) as s:
        resp = roundtrip(s, {"id": op, "kwargs": {"op": op}})
        assert_error(resp, "UnsupportedType", op, task_id=True)
        if op.endswith("bigint"):
            assert "64 bits" in resp["error"]["message"]
        # the partial result was rolled back: the stream is in sync
        assert roundtrip(s, {"id": 2, "kwargs": {"value": 2}})["result"] == {"ok": True, "echo": 2}
    assert_serving(worker)


# ------------------------------------------------------------------ misbehaving clients
@pytest.mark.parametrize("sent", [b"\x00\x00", struct.pack(">I", 100) + b"\x81\xa2id",
                                  struct.pack(">I", 100)],
                         ids=["half-header", "half-body", "header-only"])
def test_client_disconnects_mid_frame(worker, sent):
    with Client(worker.unix, timeout=10) as c:
        before = c.stats()
    s = connect(worker.unix)
    s.sendall(sent)
    s.close()
    s = connect(worker.tcp)
    s.sendall(sent)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # reset, not FIN
    assert_serving(worker)
    with Client(worker.unix, timeout=10) as c:
        after = c.stats()
    assert after["pid"] == before["pid"]  # the same worker process, not a replacement
    assert "replacing" not in worker.log()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_disconnects_while_request_runs(worker, workdir, how):
    with Client(worker.unix, timeout=10) as c:
        before = c.stats()
    marker = workdir / "running"
    s = connect(worker.tcp)
    s.sendall(frame({"id": 1, "kwargs": {"op": "sleep", "seconds": 0.3, "marker": str(marker)}})
              + frame({"id": 2, "kwargs": {"op": "ok"}}))
    deadline = time.monotonic() + 10
    while not marker.exists():  # the handler is running when the client leaves
        assert time.monotonic() < deadline
        time.sleep(0.01)
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert_serving(worker)
    with Client(worker.unix, timeout=10) as c:
        after = c.stats()
    assert after["pid"] == before["pid"]
    assert after["requests"] >= before["requests"] + 1
    assert "replacing" not in worker.log()


# ------------------------------------------------------------------ apps that cannot start
def write_app(workdir: Path, name: str, source: str) -> str:
    path = workdir / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def failed_start(start_worker, app: str, *args: str) -> str:
    w = start_worker(app, "--no-checkpoint", "--tcp", "127.0.0.1:0", *args, wait_ready=False)
    rc = w.proc.wait(30)
    log = w.log()
    assert rc != 0, log
    assert "ready:" not in log
    return log


def test_app_with_syntax_error(start_worker, workdir):
    app = write_app(workdir, "broken_syntax.py", """\
        import beam

        @beam.endpoint
        def handler(x):
            return x +
        """)
    log = failed_start(start_worker, app + ":handler")
    assert "SyntaxError" in log
    assert "broken_syntax.py" in log
    assert "Traceback" in log or "line 5" in log


def test_app_raising_at_import(start_worker, workdir):
    app = write_app(workdir, "broken_import.py", """\
        import beam

        def configure():
            raise ImportError("no module named totally_missing_dependency")

        configure()

        @beam.endpoint
        def handler():
            return 1
        """)
    log = failed_start(start_worker, app + ":handler")
    assert "Traceback" in log
    assert "configure" in log and "broken_import.py" in log
    assert "totally_missing_dependency" in log


def test_spec_naming_a_plain_function(start_worker):
    log = failed_start(start_worker, "error_app.py:not_an_endpoint")
    assert "not_an_endpoint" in log
    assert "not decorated with @beam.endpoint" in log


@pytest.mark.parametrize("spec,expected", [
    ("error_app.py:no_such_function", "has no attribute 'no_such_function'"),
    ("/nonexistent/dir/app.py:handler", "app file not found"),
    ("error_app.py:", "app must look like"),
])
def test_bad_app_spec(start_worker, spec, expected):
    log = failed_start(start_worker, spec)
    assert expected in log


def test_on_start_raising(start_worker, workdir):
    app = write_app(workdir, "bad_on_start.py", """\
        import beam

        def load_weights():
            raise RuntimeError("cannot load weights from /nowhere")

        @beam.endpoint(on_start=load_weights)
        def handler(context):
            return context.on_start_value
        """)
    log = failed_start(start_worker, app + ":handler")
    assert "on_start failed" in log
    assert "Traceback" in log
    assert "load_weights" in log and "bad_on_start.py" in log
    assert "RuntimeError: cannot load weights from /nowhere" in log
    assert "the app failed to start" in log
