"""The HTTP front under hostile or careless clients, and the supervisor's event loop
under slow calls and a stuck stdout, through the user's path (``python -m beam serve
tests/apps/router_app.py:NAME --port 0``; the port is read from the log).

Auth comes before any work: an unauthorized request with a body is refused from its
headers. Slow or idle connections are closed after their timeout; at --max-connections
the oldest idle connection that never made an authorized request makes room, and only
when there is none are new connections refused, while an authorized client keeps being
answered."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from test_router import Served
from usercli import serve_fixture, wait_until

pytestmark = pytest.mark.timeout(120)

TOKEN = "front-test-token-0123456789"


serve = serve_fixture(Served)


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Caller(threading.Thread):
    """An authorized client calling in a loop, recording every status and latency."""

    def __init__(self, s: Served) -> None:
        super().__init__(daemon=True)
        self.s, self.stop, self.results = s, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                status, _ = self.s.call(timeout=10, op="echo", value=1)
            except Exception as exc:  # a refused or cut connection is a failure here
                status = repr(exc)
            self.results.append((status, time.monotonic() - t))
            time.sleep(0.02)

    def finish(self) -> list:
        self.stop.set()
        self.join(15)
        return self.results


def raw(port: int, timeout: float = 10.0) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def read_all(c: socket.socket, limit: float) -> bytes:
    """Bytes until the server closes (b'' or a reset) or `limit` seconds pass."""
    c.settimeout(limit)
    got = b""
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
    except (ConnectionResetError, socket.timeout):
        pass
    return got


def closed_by_server(c: socket.socket, within: float) -> bool:
    deadline = time.monotonic() + within
    c.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            if c.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def assert_closed_after_about_1s(c: socket.socket, what: str) -> None:
    """The server closes c about 1 s from now (a 1 s timeout, measured loosely)."""
    t = time.monotonic()
    assert closed_by_server(c, 4.0), f"{what} still open after 4 s"
    took = time.monotonic() - t
    print(f"{what} closed after {took:.2f}s")
    assert 0.8 < took < 2.5, took


# ---- auth before work ----------------------------------------------------------------------


def test_unauthenticated_64mib_uploads_get_401_before_the_body(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1", token=TOKEN)
    pid = s.proc.pid  # `beam serve` execs beam-worker: this is the supervisor
    assert s.call(op="echo", value=0) == (200, 0)
    rss_before = vm_kib(pid, "VmRSS")
    caller = Caller(s)
    caller.start()
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 67108864\r\nExpect: 100-continue\r\n\r\n")
    t0 = time.monotonic()
    answers, rounds, took = [], 0, 0.0
    while rounds < 1 or time.monotonic() - t0 < 2:  # rounds of 200 for 2 s
        socks = [raw(s.port) for _ in range(200)]
        for c in socks:
            c.sendall(head)
        deadline = time.monotonic() + 5  # for the whole round: a 401 needs no waiting
        for c in socks:
            answers.append(read_all(c, max(0.05, deadline - time.monotonic())))
            try:  # a client that sends its body anyway: the front no longer reads it
                c.sendall(b"0" * (1 << 20))
            except OSError:
                pass
            c.close()
        rounds += 1
        took = max(took, time.monotonic() - t0) if rounds == 1 else took
    results = caller.finish()
    rss_after, hwm = vm_kib(pid, "VmRSS"), vm_kib(pid, "VmHWM")
    print(f"{len(answers)} unauthenticated 64 MiB uploads ({rounds} rounds of 200, the first "
          f"in {took:.2f}s); supervisor VmRSS {rss_before} -> {rss_after} KiB, VmHWM {hwm} KiB; "
          f"{len(results)} authorized calls meanwhile")
    for a in answers:
        assert a.startswith(b"HTTP/1.1 401 "), a[:200]  # never "100 Continue" first
        assert b"Connection: close" in a and b"WWW-Authenticate: Bearer" in a
    assert took < 10, took
    assert hwm < 64 * 1024, hwm  # bodies were buffered: 200 x up to 64 MiB
    assert len(results) >= 5 and all(st == 200 for st, _ in results), results
    assert max(lat for _, lat in results) < 2.0, results
    # Authorized uploads with Expect: 100-continue still get it, and the call.
    c = raw(s.port)
    body = json.dumps({"op": "echo", "value": 5}).encode()
    c.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
              b"\r\nExpect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    c.settimeout(5)
    assert c.recv(4096).startswith(b"HTTP/1.1 100 Continue")
    c.sendall(body)
    assert c.recv(4096).startswith(b"HTTP/1.1 200 ")
    c.close()


def test_slowloris_is_cut_after_the_header_timeout_while_others_are_served(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1",
              "--header-timeout", "1", token=TOKEN)
    caller = Caller(s)
    caller.start()
    slow = [raw(s.port) for _ in range(20)]
    request = b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
    t0 = time.monotonic()
    cut_at = {}
    for i in range(len(request)):  # one byte every 50 ms: the headers never end in time
        for k, c in enumerate(slow):
            if k in cut_at:
                continue
            try:
                c.sendall(request[i:i + 1])
            except OSError:
                cut_at[k] = time.monotonic() - t0
        if len(cut_at) == len(slow) or time.monotonic() - t0 > 4:
            break
        time.sleep(0.05)
    for k, c in enumerate(slow):
        if k not in cut_at and closed_by_server(c, 4.0 - (time.monotonic() - t0)):
            cut_at[k] = time.monotonic() - t0
        c.close()
    results = caller.finish()
    print(f"slowloris connections cut after {min(cut_at.values(), default=-1):.2f}-"
          f"{max(cut_at.values(), default=-1):.2f}s; {len(results)} authorized calls")
    assert len(cut_at) == len(slow), cut_at
    assert all(0.9 < t < 2.5 for t in cut_at.values()), cut_at
    assert results and all(st == 200 for st, _ in results), results


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1",
              "--idle-timeout", "1", token=TOKEN)
    req = (b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
           b"\r\nContent-Length: 2\r\n\r\n{}")
    busy = raw(s.port)
    for _ in range(6):  # used every 0.5 s for 3 s: never idle long enough to be cut
        busy.sendall(req)
        busy.settimeout(5)
        assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.5)
    idle = raw(s.port)
    idle.sendall(req)
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert_closed_after_about_1s(idle, "idle keep-alive connection (--idle-timeout 1)")
    busy.close()


def test_connections_past_the_limit_get_503_and_existing_clients_keep_working(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1",
              "--max-connections", "8", token=TOKEN)
    req = (b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
           b"\r\nContent-Length: 2\r\n\r\n{}")
    mine = raw(s.port)
    mine.sendall(req)
    assert mine.recv(65536).startswith(b"HTTP/1.1 200 ")
    hogs = [raw(s.port) for _ in range(7)]  # the limit is reached, by clients with the token
    for c in hogs:
        c.sendall(req)
        assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
    refused = [raw(s.port) for _ in range(20)]
    for c in refused:
        a = read_all(c, 3.0)
        assert a.startswith(b"HTTP/1.1 503 ") and b"TooManyConnections" in a, a
        c.close()
    for _ in range(5):
        mine.sendall(req)
        assert mine.recv(65536).startswith(b"HTTP/1.1 200 ")
    for c in hogs:
        c.close()
    # Slots come back once connections close.
    wait_until(lambda: s.call(op="echo", value=2) == (200, 2), 5, "a new connection served")
    mine.close()


def test_idle_strangers_at_the_limit_make_room_for_clients_with_the_token(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1",
              "--max-connections", "8", token=TOKEN)
    req = (b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
           b"\r\nContent-Length: 2\r\n\r\n{}")
    mine = raw(s.port)  # proven before the flood: never the one to go
    mine.sendall(req)
    assert mine.recv(65536).startswith(b"HTTP/1.1 200 ")
    # Strangers fill every slot: keep-alive ones that asked /health, then silent sockets.
    strangers = []
    for _ in range(4):
        strangers.append(raw(s.port))
        strangers[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert strangers[-1].recv(65536).startswith(b"HTTP/1.1 200 ")
    strangers += [raw(s.port) for _ in range(16)]
    time.sleep(0.2)
    took = []
    for i in range(5):  # each a new connection, as a client arriving now would be
        t = time.monotonic()
        assert s.call(timeout=5, op="echo", value=i) == (200, i)
        took.append(time.monotonic() - t)
        strangers.append(raw(s.port))  # and the flood goes on
    mine.sendall(req)
    assert mine.recv(65536).startswith(b"HTTP/1.1 200 ")
    evicted = sum(closed_by_server(c, 0.05) for c in strangers[:10])
    print(f"5 calls past 20+ idle strangers at --max-connections 8: {max(took):.3f}s at most; "
          f"{evicted} of the 10 oldest strangers evicted")
    assert max(took) < 1.0, took
    assert evicted == 10, evicted
    for c in strangers:
        c.close()
    mine.close()


def test_an_idle_stranger_gets_the_header_timeout_not_the_idle_timeout(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1",
              "--header-timeout", "1", token=TOKEN)
    c = raw(s.port)
    c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert_closed_after_about_1s(c, "a stranger's idle keep-alive connection (--header-timeout 1)")


# ---- a long msgpack call is activity -----------------------------------------------------


def test_msgpack_call_longer_than_keep_warm_is_not_retired_mid_call(serve, workdir):
    from beam.client import Client
    sock = workdir / "front.sock"
    s = serve("router_app.py:where", "--no-checkpoint", "--keep-warm", "1", "--socket", str(sock))
    with Client(f"unix://{sock}", timeout=30) as c:
        first = c.stats()
        t = time.monotonic()
        out = c.call(seconds=3)  # three times keep_warm_seconds
        took = time.monotonic() - t
        assert 2.9 < took < 6, took
        assert out["pid"] == first["pid"], (out, first)
        log = s.log()
        assert "idle for 1s: stopping it" not in log, log
        # The same connection, the same worker: nothing was stopped under the call.
        again = c.stats()
        assert again["pid"] == first["pid"] and again["container_id"] == first["container_id"]
    # Once idle, it is retired as before.
    s.wait_for("idle for 1s: stopping it", timeout=10)


# ---- a stuck stdout ------------------------------------------------------------------------


def test_stdout_nobody_reads_does_not_stall_http(serve):
    r, w = os.pipe()  # we keep the read end and never read it
    try:
        s = serve("router_app.py:where", "--no-checkpoint", "--keep-warm", "-1", stdout=w)
        os.close(w)
        t0 = time.monotonic()
        for i in range(40):  # 40 x 100 kB printed by the app: far past the 64 KiB pipe
            t = time.monotonic()
            status, body = s.call(timeout=10, out_bytes=100_000)
            assert status == 200, body
            assert time.monotonic() - t < 2, (i, time.monotonic() - t)
        took = time.monotonic() - t0
        s.wait_for("stdout is not being read: dropping output", timeout=5)
        print(f"40 calls printing 100 kB each, stdout unread: {took:.2f}s")
        assert s.stats()["replicas"], s.log()
    finally:
        os.close(r)


# ---- least-loaded, worker-aware routing ------------------------------------------------------


def concurrent_calls(s: Served, n: int, seconds: float):
    out: list = [None] * n

    def one(i: int) -> None:
        out[i] = s.call(timeout=30, seconds=seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    took = time.monotonic() - t
    assert all(o and o[0] == 200 for o in out), out
    return took, [o[1] for o in out]


def test_concurrent_slow_calls_use_every_worker(serve):
    s = serve("router_app.py:where", "--no-checkpoint", "--keep-warm", "-1", "--workers", "4")
    assert s.call(seconds=0)[0] == 200
    took, results = concurrent_calls(s, 4, 1.0)
    workers = sorted(r["worker"] for r in results)
    print(f"4 concurrent 1 s calls, --workers 4: {took:.2f}s on workers {workers}")
    assert workers == [0, 1, 2, 3], results
    assert took < 2.0, took
    took, _ = concurrent_calls(s, 4, 1.0)  # and again, on the connections now open
    assert took < 2.0, took


def test_two_concurrent_calls_run_on_different_replicas(serve):
    s = serve("router_app.py:where", "--no-checkpoint", "--keep-warm", "-1", "--workers", "1",
              "--max-replicas", "2")
    concurrent_calls(s, 3, 1.5)  # more than one replica holds: a second one starts
    wait_until(lambda: sum(r["state"] == "serving" for r in s.stats()["replicas"]) == 2, 30,
               "a second replica serving")
    for _ in range(3):
        took, results = concurrent_calls(s, 2, 1.0)
        containers = {r["container"] for r in results}
        print(f"2 concurrent 1 s calls, 2 replicas: {took:.2f}s on {len(containers)} replica(s)")
        assert len(containers) == 2, results
        assert took < 1.9, took


def test_a_batch_never_waits_behind_a_slow_call(serve):
    # One replica, no more to come: queued calls are batched into the workers, but only
    # into one whose call runs briefly; worker 0 or 1 sleeps 2 s meanwhile.
    s = serve("router_app.py:where", "--no-checkpoint", "--keep-warm", "-1", "--workers", "2")
    wait_until(lambda: len({r["worker"] for r in concurrent_calls(s, 2, 0.3)[1]}) == 2, 30,
               "both workers reached")
    slow: list = []
    t = threading.Thread(target=lambda: slow.append(s.call(timeout=30, seconds=2.0)))
    t.start()
    time.sleep(0.3)
    lat: list = []

    def fast() -> None:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            status, _ = s.call(timeout=30, seconds=0)
            lat.append((status, time.monotonic() - t0))

    threads = [threading.Thread(target=fast) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads + [t]:
        th.join(30)
    behind = [x for _, x in lat if x > 0.5]
    print(f"{len(lat)} quick calls from 8 threads beside a 2 s call, --workers 2: "
          f"{len(behind)} waited behind it")
    assert slow and slow[0][0] == 200, slow
    assert lat and all(st == 200 for st, _ in lat), lat
    assert len(behind) <= 1, behind  # the one it may hold at depth 2, as before batching
