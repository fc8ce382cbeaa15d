"""The HTTP front (csrc/http.c, csrc/router.c, csrc/supervisor.c), end to end: the real
beam-worker binary, real sockets, apps in tests/apps/http_app.py.

Requests go through http.client or a raw socket (for pipelining, malformed input and
chunked bodies); responses are parsed by a small reader that never reads past one
response, so pipelined answers can be read one by one in order."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from typing import Dict, List, Optional, Tuple

import pytest

from usercli import wait_until

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0k-" + "5e" * 20
APP = "http_app.py:handler"


# ---- helpers ---------------------------------------------------------------------------


class Conn:
    """A raw HTTP/1.1 connection: send bytes, read whole responses one at a time."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> Tuple[int, Dict[str, str], bytes]:
        line = self.f.readline()
        if not line:
            raise EOFError("connection closed before a response")
        parts = line.decode("latin-1").split(" ", 2)
        assert parts[0] == "HTTP/1.1", line
        headers: Dict[str, str] = {}
        while True:
            h = self.f.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, v = h.decode("latin-1").split(":", 1)
            headers[k.strip().lower()] = v.strip()
        body = self.f.read(int(headers.get("content-length", "0")))
        return int(parts[1]), headers, body

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.f.read(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def request(method: str, path: str = "/", body: bytes = b"", token: Optional[str] = TOKEN,
            headers: Optional[Dict[str, str]] = None, version: str = "HTTP/1.1") -> bytes:
    h = {"Host": "127.0.0.1"}
    if method in ("POST", "PUT") or body:
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    return head.encode("latin-1") + b"\r\n" + body


def call_bytes(token: Optional[str] = TOKEN, **kwargs) -> bytes:
    return request("POST", "/", json.dumps(kwargs).encode(), token)


class Http:
    """A beam-worker started with --port 0; knows its port and token."""

    def __init__(self, worker, token: Optional[str]) -> None:
        self.w = worker
        log = worker.log()
        m = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", log)
        assert m, log
        self.port = int(m.group(1))
        self.token = token
        g = re.search(r"need 'Authorization: Bearer ([0-9a-f]+)'", log)
        if token is None and g:
            self.token = g.group(1)

    def request(self, method: str, path: str = "/", body=None, auth: bool = True,
                headers: Optional[Dict[str, str]] = None, timeout: float = 30.0):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = dict(headers or {})
            if auth and self.token:
                h["Authorization"] = f"Bearer {self.token}"
            data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
            if data is not None:
                h["Content-Type"] = "application/json"
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def call(self, **kwargs):
        status, headers, body = self.request("POST", "/", kwargs)
        return status, headers, json.loads(body)

    def stats(self) -> dict:
        status, _, body = self.request("GET", "/stats")
        assert status == 200, body
        return json.loads(body)

    def conn(self) -> Conn:
        return Conn(self.port)


def start_http(start_worker, app: str = APP, *args: str, env: Optional[Dict[str, str]] = None,
               token: Optional[str] = TOKEN) -> Http:
    e = dict(env or {})
    if token is not None:
        e["BEAM_AUTH_TOKEN"] = token
    else:
        e["BEAM_AUTH_TOKEN"] = ""
    w = start_worker(app, "--port", "0", *args, env=e)
    return Http(w, token)


def error_of(body: bytes) -> dict:
    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) >= {"type", "message"}, doc
    return doc["error"]


# ---- basics ----------------------------------------------------------------------------


def test_call_health_and_headers(start_worker):
    s = start_http(start_worker)
    status, h, body = s.request("GET", "/health", auth=False)
    assert status == 200 and json.loads(body) == {"status": "ok"}

    status, h, result = s.call(op="echo", value={"a": [1, 2.5, None, True, "é"]})
    assert status == 200 and result == {"a": [1, 2.5, None, True, "é"]}
    assert h["content-type"] == "application/json"
    uuid.UUID(h["x-task-id"])
    assert float(h["x-beam-wait-ms"]) >= 0
    # X-Task-ID is the handler's context.task_id.
    status, h, result = s.call(op="task")
    assert status == 200 and result == h["x-task-id"]
    # No body: no arguments; a query string does not change the path.
    status, _, body = s.request("POST", "/?x=1", None)
    assert status == 200 and json.loads(body) is None
    # HEAD: headers only, so the next response on the connection is read correctly.
    c = s.conn()
    c.send(request("HEAD", "/health", token=None) + request("GET", "/health", token=None))
    line = c.f.readline()
    assert line.startswith(b"HTTP/1.1 200")
    while c.f.readline() not in (b"\r\n", b""):
        pass
    status, _, body = c.response()
    assert status == 200 and json.loads(body) == {"status": "ok"}
    c.close()


def test_stats_shape(start_worker):
    s = start_http(start_worker, APP, "--keep-warm", "30")
    for i in range(3):
        assert s.call(op="echo", value=i)[0] == 200
    st = s.stats()
    assert set(st) == {"queued", "inflight", "answered", "max_replicas", "keep_warm_seconds",
                       "checkpoint", "replicas"}
    assert st["queued"] == 0 and st["inflight"] == 0 and st["answered"] == 3
    assert st["max_replicas"] == 1 and st["keep_warm_seconds"] == 30 and st["checkpoint"] is False
    [r] = st["replicas"]
    assert set(r) == {"id", "pid", "state", "restored", "workers", "answered", "requests",
                      "inflight", "profile"}
    assert r["state"] == "serving" and r["restored"] is False and r["workers"] == 1
    assert r["answered"] == 3 and r["inflight"] == 0 and r["pid"] > 0
    assert r["profile"]["mode"] == "cold" and r["profile"]["ready_ms"] > 0
    assert s.request("GET", "/stats", auth=False)[0] == 401


def test_client_errors_keep_the_connection(start_worker):
    s = start_http(start_worker)
    c = s.conn()
    cases = [
        (request("POST", "/", b"{not json"), 400, "BadRequest"),
        (request("POST", "/", b'{"a": 1} trailing'), 400, "BadRequest"),
        (request("POST", "/", b"[1, 2]"), 400, "BadRequest"),
        (request("POST", "/", b'"text"'), 400, "BadRequest"),
        (request("POST", "/", b"42"), 400, "BadRequest"),
        (request("POST", "/", b'{"value": "\xff\xfe"}'), 400, "BadRequest"),  # not UTF-8
        (request("GET", "/nope"), 404, "NotFound"),
        (request("GET", "/"), 405, "MethodNotAllowed"),
        (request("PUT", "/", b"{}"), 405, "MethodNotAllowed"),
        (request("POST", "/stats", b"{}"), 405, "MethodNotAllowed"),
        # more values than the front accepts (BW_JSON_MAX_VALUES)
        (request("POST", "/", b'{"v": [' + b"0," * (1 << 20) + b"0]}"), 400, "BadRequest"),
    ]
    for raw, status, etype in cases:
        c.send(raw)
        got, h, body = c.response()
        assert (got, error_of(body)["type"]) == (status, etype), (raw, body)
        assert "connection" not in h
    c.send(request("POST", "/health", b"{}"))
    assert c.response()[0] == 405
    # Same connection, still usable.
    c.send(call_bytes(op="echo", value="still here"))
    status, _, body = c.response()
    assert status == 200 and json.loads(body) == "still here"
    c.close()


def test_handler_error_is_500_with_type_and_message(start_worker):
    s = start_http(start_worker)
    status, h, body = s.request("POST", "/", {"op": "raise", "message": "boom-7731"})
    assert status == 500
    err = error_of(body)
    assert err["type"] == "ValueError" and "boom-7731" in err["message"]
    uuid.UUID(h["x-task-id"])
    assert s.call(op="echo", value=1)[:3:2] == (200, 1)


@pytest.mark.timeout(30)
def test_handler_timeout_is_504(start_worker):
    s = start_http(start_worker, "http_app.py:short_timeout")
    t = time.monotonic()
    status, h, body = s.request("POST", "/", {"op": "sleep", "seconds": 5})
    assert status == 504 and time.monotonic() - t < 4.5
    err = error_of(body)
    assert err["type"] == "Timeout" and "timeout" in err["message"]
    assert "x-task-id" in h
    status, _, result = s.call(op="sleep", seconds=0.01)
    assert status == 200 and result["slept"] == 0.01


# ---- auth ------------------------------------------------------------------------------


def test_auth(start_worker):
    s = start_http(start_worker)
    body = json.dumps({"op": "echo", "value": 1}).encode()

    def status_with(auth: Optional[str]) -> int:
        c = s.conn()
        h = {"Authorization": auth} if auth is not None else {}
        c.send(request("POST", "/", body, token=None, headers=h))
        got, hdrs, b = c.response()
        if got == 401:
            assert hdrs.get("www-authenticate") == "Bearer"
            assert error_of(b)["type"] == "Unauthorized"
            assert TOKEN not in b.decode()
        c.close()
        return got

    assert status_with(None) == 401
    assert status_with("Bearer " + "x" * len(TOKEN)) == 401  # same length, wrong
    assert status_with("Bearer " + TOKEN[:-1]) == 401  # too short
    assert status_with("Bearer " + TOKEN + "0") == 401  # too long
    assert status_with("Bearer") == 401
    assert status_with("Bearer ") == 401
    assert status_with(TOKEN) == 401  # no scheme
    assert status_with("Basic " + TOKEN) == 401
    assert status_with("Bearer " + TOKEN) == 200
    # The scheme is case-insensitive (RFC 7235 section 2.1), the token is not.
    assert status_with("bearer " + TOKEN) == 200
    assert status_with("BEARER " + TOKEN) == 200
    assert status_with("Bearer " + TOKEN.upper()) == 401
    assert status_with("Bearer " + TOKEN + "  ") == 200  # trailing whitespace is not the value
    # Two Authorization fields are refused, even when together they spell the token.
    c = s.conn()
    c.send(request("POST", "/", body, token=None,
                   headers={"Authorization": "Bearer ", "authorization": TOKEN}))
    assert c.response()[0] == 401
    c.close()
    # /health needs none; /stats does.
    assert s.request("GET", "/health", auth=False)[0] == 200
    assert s.request("GET", "/stats", auth=False)[0] == 401


def test_generated_token_is_printed_and_required(start_worker):
    s = start_http(start_worker, token=None)
    assert s.token and re.fullmatch(r"[0-9a-f]{48}", s.token)
    assert s.request("POST", "/", {"value": 3}, auth=False)[0] == 401
    assert s.call(op="echo", value=3)[::2] == (200, 3)


def test_no_auth_flag(start_worker):
    s = start_http(start_worker, APP, "--no-auth")
    assert "HTTP auth off" in s.w.log()
    assert s.request("POST", "/", {"op": "echo", "value": 5}, auth=False)[0] == 200
    assert s.request("GET", "/stats", auth=False)[0] == 200


def test_endpoint_authorized_false_needs_no_token(start_worker):
    s = start_http(start_worker, "http_app.py:open_endpoint")
    assert "authorized=False" in s.w.log()
    status, _, body = s.request("POST", "/", {"op": "echo", "value": 6}, auth=False)
    assert status == 200 and json.loads(body) == 6


# ---- connections -----------------------------------------------------------------------


def test_keep_alive_many_requests_one_connection(start_worker):
    s = start_http(start_worker)
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    c.connect()
    sock = c.sock
    ids = set()
    for i in range(200):
        c.request("POST", "/", body=json.dumps({"value": i}),
                  headers={"Authorization": f"Bearer {TOKEN}"})
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read()) == i
        ids.add(r.getheader("X-Task-ID"))
    assert c.sock is sock and len(ids) == 200
    c.close()
    assert s.stats()["answered"] == 200


def test_connection_close_and_http10(start_worker):
    s = start_http(start_worker)
    c = s.conn()
    c.send(request("POST", "/", b'{"value": 1}', headers={"Connection": "close"}))
    status, h, body = c.response()
    assert status == 200 and h.get("connection") == "close" and json.loads(body) == 1
    assert c.closed_by_peer()
    c = s.conn()
    c.send(request("POST", "/", b'{"value": 2}', version="HTTP/1.0"))
    status, h, body = c.response()
    assert status == 200 and h.get("connection") == "close" and json.loads(body) == 2
    assert c.closed_by_peer()


def test_pipelining_50_in_one_write(start_worker):
    s = start_http(start_worker)
    c = s.conn()
    c.send(b"".join(call_bytes(op="echo", value={"i": i, "pad": "x" * i}) for i in range(50)))
    ids = []
    for i in range(50):
        status, h, body = c.response()
        assert status == 200 and json.loads(body) == {"i": i, "pad": "x" * i}
        ids.append(h["x-task-id"])
    assert len(set(ids)) == 50
    c.close()


def test_pipelining_past_the_per_connection_limit_with_mixed_answers(start_worker):
    """300 requests in one write (the front parses at most 64 ahead, then pauses),
    with instant answers (404, 400, 401) between calls: all come back, in order."""
    s = start_http(start_worker)
    c = s.conn()
    expect = []
    parts = []
    for i in range(300):
        if i % 37 == 5:
            parts.append(request("GET", "/missing"))
            expect.append((404, None))
        elif i % 41 == 7:
            parts.append(request("POST", "/", b"{bad"))
            expect.append((400, None))
        elif i % 43 == 9:  # no body: a 401 with a body closes (test_front.py)
            parts.append(request("GET", "/stats", token="wrong"))
            expect.append((401, None))
        else:
            parts.append(call_bytes(op="echo", value=i))
            expect.append((200, i))
    c.send(b"".join(parts))
    for i, (status, value) in enumerate(expect):
        got, _, body = c.response()
        assert got == status, (i, body)
        if value is not None:
            assert json.loads(body) == value
    c.send(call_bytes(value="after"))
    assert c.response()[2] == b'"after"'
    c.close()


def test_client_gone_with_calls_in_flight(start_worker):
    s = start_http(start_worker)
    for _ in range(5):
        c = s.conn()
        c.send(b"".join(call_bytes(op="sleep", seconds=0.05) for _ in range(10)))
        c.close()
    c = s.conn()
    c.send(call_bytes(op="sleep", seconds=0.05))
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    st = wait_until(lambda: (lambda x: x if x["inflight"] == 0 else None)(s.stats()), 20,
                    "the abandoned calls to finish")
    assert st["queued"] == 0
    assert s.call(op="echo", value="alive")[::2] == (200, "alive")


def test_10mb_json_body_round_trip(start_worker):
    s = start_http(start_worker)
    big = "abcdefghij" * (1 << 20)
    status, h, body = s.request("POST", "/", {"op": "echo", "value": big}, timeout=60)
    assert status == 200 and json.loads(body) == big
    status, _, body = s.request("POST", "/", {"op": "len", "data": big}, timeout=60)
    assert status == 200 and json.loads(body) == len(big)


@pytest.mark.parametrize("garbage", [
    b"GARBAGE\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST / HTTP/9.9.9\r\n\r\n",
    b"POST / HTTP/1.1\r\nBad\x01Header: x\r\n\r\n",
    # with the token: an unauthorized body is refused (401) before it is parsed
    b"POST / HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() +
    b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_http_is_400_and_server_keeps_serving(start_worker, garbage):
    s = start_http(start_worker)
    c = s.conn()
    c.send(garbage)
    status, h, body = c.response()
    assert status == 400 and error_of(body)["type"] == "BadRequest"
    assert h.get("connection") == "close" and c.closed_by_peer()
    assert s.call(op="echo", value="ok")[::2] == (200, "ok")


def test_body_over_max_body_is_413_and_closes(start_worker):
    s = start_http(start_worker, APP, "--max-body", "1000")
    # Announced length: refused before the body is sent.
    c = s.conn()
    c.send(request("POST", "/", b"", headers={"Content-Length": "5000"}))
    status, h, body = c.response()
    assert status == 413 and error_of(body)["type"] == "PayloadTooLarge"
    assert h.get("connection") == "close" and c.closed_by_peer()
    # Chunked: refused once the chunks pass the limit.
    c = s.conn()
    head = request("POST", "/", b"", headers={"Transfer-Encoding": "chunked"})
    head = head.replace(b"Content-Length: 0\r\n", b"")
    c.send(head + b"".join(b"190\r\n" + b" " * 400 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n")
    status, h, body = c.response()
    assert status == 413 and c.closed_by_peer()
    # Exactly the limit is fine, and the server still serves.
    payload = json.dumps({"op": "echo", "value": ""}).encode()
    payload = payload[:-1] + b" " * (1000 - len(payload)) + b"}"
    status, _, body = s.request("POST", "/", payload)
    assert status == 200 and json.loads(body) == ""
    assert s.call(op="echo", value=1)[0] == 200


def test_chunked_request_body(start_worker):
    s = start_http(start_worker)
    doc = json.dumps({"op": "echo", "value": {"chunked": list(range(100))}}).encode()
    chunks = [doc[i:i + 17] for i in range(0, len(doc), 17)]
    enc = b"".join(b"%x\r\n%s\r\n" % (len(ch), ch) for ch in chunks) + b"0\r\n\r\n"
    head = request("POST", "/", b"", headers={"Transfer-Encoding": "chunked"})
    head = head.replace(b"Content-Length: 0\r\n", b"")
    c = s.conn()
    c.send((head + enc) * 2)  # two of them, pipelined
    for _ in range(2):
        status, _, body = c.response()
        assert status == 200 and json.loads(body) == {"chunked": list(range(100))}
    c.close()


# ---- replicas --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_scale_to_zero_and_restore_from_checkpoint(start_worker, workdir):
    assert os.geteuid() == 0, "checkpoint tests need root"
    count = workdir / "on_start_count"
    s = start_http(start_worker, APP, "--checkpoint-key", "khttp", "--keep-warm", "1",
                   "--workers", "1", env={"HTTP_TEST_COUNT_FILE": str(count)})
    assert "checkpoint written" in s.w.log()
    assert s.call(op="state")[0] == 200
    s.w.wait_for("idle for", timeout=20)
    st = wait_until(lambda: (lambda x: x if not x["replicas"] else None)(s.stats()), 20,
                    "zero replicas in /stats")
    assert st["checkpoint"] is True and st["keep_warm_seconds"] == 1
    assert "scale to zero" in s.w.log()

    status, h, result = s.call(op="state")
    assert status == 200 and result["on_start"] == {"loaded": True}
    assert float(h["x-beam-wait-ms"]) > 0
    assert "an HTTP call is waiting" in s.w.log()
    [r] = s.stats()["replicas"]
    assert r["restored"] is True and r["state"] == "serving"
    assert r["profile"]["mode"] == "restore"
    assert len(count.read_text().splitlines()) == 1  # on_start ran once, at the cold boot
    # And once more: down to zero, back up on the next call.
    s.w.wait_for("idle for", timeout=20, count=2)
    wait_until(lambda: not s.stats()["replicas"], 20, "zero replicas again")
    assert s.call(op="echo", value="again")[::2] == (200, "again")
    assert len(count.read_text().splitlines()) == 1


@pytest.mark.timeout(90)
def test_three_replicas_under_concurrent_load(start_worker):
    """--max-replicas 3, one worker each, a 50 ms handler and 40 clients: queued calls
    start replicas up to 3; every request sent is answered 200."""
    s = start_http(start_worker, APP, "--max-replicas", "3", "--workers", "1")
    clients, duration = 40, 5.0
    stop_at = time.monotonic() + duration
    sent = [0] * clients
    ok = [0] * clients
    bad: List[str] = []
    most = [0]
    done = threading.Event()

    def client(i: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        try:
            while time.monotonic() < stop_at:
                sent[i] += 1
                c.request("POST", "/", body=json.dumps({"op": "sleep", "seconds": 0.05, "i": i}),
                          headers={"Authorization": f"Bearer {TOKEN}"})
                r = c.getresponse()
                body = r.read()
                if r.status == 200 and json.loads(body)["i"] == i:
                    ok[i] += 1
                else:
                    bad.append(f"{r.status} {body[:200]!r}")
        except Exception as e:  # noqa: BLE001 - reported below
            bad.append(repr(e))
        finally:
            c.close()

    def monitor() -> None:
        while not done.is_set():
            st = s.stats()
            most[0] = max(most[0], sum(r["state"] == "serving" for r in st["replicas"]))
            time.sleep(0.1)

    m = threading.Thread(target=monitor)
    m.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    m.join()
    assert not bad, bad[:5]
    assert sum(sent) == sum(ok) > 0
    assert most[0] == 3, s.w.log()
    st = s.stats()
    assert len(st["replicas"]) == 3 and st["answered"] == sum(ok)
    assert all(r["answered"] > 0 for r in st["replicas"]), st
    assert "call(s) queued" in s.w.log()


@pytest.mark.timeout(60)
def test_queue_overflow_is_429_and_nothing_is_lost(start_worker):
    s = start_http(start_worker, "http_app.py:small_queue", "--workers", "1")
    conns = [s.conn() for _ in range(4)]
    per = 40
    for k, c in enumerate(conns):
        c.send(b"".join(call_bytes(op="sleep", seconds=0.02, i=k * per + j) for j in range(per)))
    counts: Dict[int, int] = {}
    for k, c in enumerate(conns):
        for j in range(per):
            status, _, body = c.response()
            counts[status] = counts.get(status, 0) + 1
            if status == 200:
                assert json.loads(body)["i"] == k * per + j
            else:
                assert status == 429 and error_of(body)["type"] == "TooManyRequests"
        c.close()
    assert set(counts) == {200, 429} and sum(counts.values()) == 4 * per, counts
    st = s.stats()
    assert st["answered"] == counts[200] and st["queued"] == 0
    assert s.call(op="echo", value="after")[::2] == (200, "after")


@pytest.mark.timeout(90)
def test_killed_replica_fails_inflight_calls_with_502_then_recovers(start_worker):
    # Two workers: the router keeps two calls in flight per worker, so all four are
    # inside the replica (none waits in the queue) when it dies.
    s = start_http(start_worker, APP, "--workers", "2")
    [r] = s.stats()["replicas"]
    c = s.conn()
    n = 4
    c.send(b"".join(call_bytes(op="sleep", seconds=10, i=i) for i in range(n)))
    wait_until(lambda: s.stats()["inflight"] == n, 10, "calls in flight")
    t = time.monotonic()
    os.kill(r["pid"], signal.SIGKILL)
    for _ in range(n):
        status, h, body = c.response()
        assert status == 502, body
        err = error_of(body)
        assert err["type"] == "ReplicaLost" and "replica" in err["message"]
        assert "x-beam-wait-ms" in h
    assert time.monotonic() - t < 8
    # A call sent while the replacement boots waits for it, then succeeds.
    status, h, result = s.call(op="pid")
    assert status == 200
    st = s.stats()
    assert len(st["replicas"]) == 1, (st, s.w.log())
    [r2] = st["replicas"]
    assert r2["id"] != r["id"] and r2["pid"] != r["pid"] and r2["state"] == "serving"
    assert "killed by signal 9" in s.w.log()
    for i in range(5):
        assert s.call(op="echo", value=i)[::2] == (200, i)


def test_half_closed_client_still_gets_every_answer(start_worker):
    """Requests, then shutdown(SHUT_WR) (curl --data @- and shell pipes do this): the
    calls are still running in a replica when the EOF arrives; every answer must come."""
    s = start_http(start_worker)
    c = s.conn()
    n = 10
    c.send(b"".join(call_bytes(op="sleep", seconds=0.05, i=i) for i in range(n)))
    c.sock.shutdown(socket.SHUT_WR)
    for i in range(n):
        status, _, body = c.response()
        assert status == 200 and json.loads(body)["i"] == i
    assert c.closed_by_peer()


def test_sigterm_finishes_the_call_in_flight(start_worker):
    """SIGTERM to the supervisor while an HTTP call runs: the call is answered, then the
    worker exits 0."""
    s = start_http(start_worker)
    c = s.conn()
    c.send(call_bytes(op="sleep", seconds=1, i=7))
    wait_until(lambda: s.stats()["inflight"] == 1, 10, "the call in flight")
    s.w.proc.send_signal(signal.SIGTERM)
    status, _, body = c.response()
    assert status == 200 and json.loads(body)["i"] == 7
    assert s.w.proc.wait(30) == 0
    assert "stopped" in s.w.log()
