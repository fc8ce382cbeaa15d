"""The HTTP router's failure paths (issue 12), through the user's path:
``python -m beam serve tests/apps/router_app.py:NAME --port P --no-auth`` (no
PYTHONUNBUFFERED: what the user runs is what is tested).

Capacity must survive a worker crash and an oversized result; a CRIU timeout must not
kill the replicas that serve; retiring and stopping must not answer errors for calls
that never ran."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List

import pytest

import usercli
from beam._paths import find_criu
from usercli import APPS, serve_fixture, wait_until

pytestmark = pytest.mark.timeout(120)


class Served(usercli.Served):
    """`python -m beam serve ... --port 0`, --no-auth unless a token is given."""

    def call(self, timeout: float = 20.0, **kwargs):
        status, _, body = self.request("POST", "/", kwargs, timeout=timeout)
        return status, json.loads(body)

    def stats(self) -> dict:
        status, _, body = self.request("GET", "/stats")
        assert status == 200, body
        return json.loads(body)


serve = serve_fixture(Served)


# ---- capacity after a worker crash or an oversized result -------------------------------


def test_worker_crash_does_not_lose_http_capacity(serve):
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1")
    assert s.call(op="echo", value="before") == (200, "before")
    status, body = s.call(op="crash")
    assert status == 502 and body["error"]["type"] == "ReplicaLost", body
    s.wait_for("worker 0 exited with status 3; replacing it")
    for i in range(5):  # hung for good before the router reconnected
        assert s.call(timeout=15, op="echo", value=i) == (200, i), s.log()
    # A second crash, then capacity again: reconnecting is not a one-off.
    assert s.call(op="crash")[0] == 502
    for i in range(3):
        assert s.call(timeout=15, op="echo", value=i) == (200, i), s.log()
    assert len(s.stats()["replicas"]) == 1


def test_result_larger_than_max_frame_is_an_error_and_the_next_call_works(serve):
    limit = 1 << 20
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1",
              "--max-frame", str(limit))
    status, body = s.call(op="big", n=2 * limit)
    assert status == 500, body
    assert body["error"]["type"] == "ResultTooLarge", body
    assert str(limit) in body["error"]["message"]
    for i in range(5):
        assert s.call(timeout=15, op="echo", value=i) == (200, i), s.log()
    status, body = s.call(op="big", n=limit // 2)  # under the limit: still served
    assert status == 200 and len(body) > limit // 2


# ---- a CRIU timeout kills criu, not the replicas that serve -----------------------------


def real_criu() -> str:
    path, why = find_criu()  # what beam-worker --print-criu says
    assert path, why
    return path


def criu_after_flag(workdir, then: str):
    """A criu wrapper that runs `then` (a shell command: `sleep 3`, `exec sleep 600`)
    before the real criu once the returned flag file exists; until then it is criu."""
    flag, fake = workdir / "criu-flag-now", workdir / "criu-after-flag"
    fake.write_text(f"#!/bin/sh\n[ -e {flag} ] && {then}\nexec {real_criu()} \"$@\"\n")
    fake.chmod(0o755)
    return flag, fake


def queue_three(s, **call) -> tuple:
    """Three concurrent calls (keyword arguments `call`, and i=0..2 when i is given): the
    first two are in the replica before the third queues, which makes the supervisor
    start a second replica. Returns (threads, results)."""
    results: List = [None] * 3

    def one(i):
        kw = dict(call, i=i) if "i" in call else call
        results[i] = s.call(timeout=60, **kw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for i, t in enumerate(threads):
        t.start()
        if i < 2:
            wait_until(lambda: s.stats()["inflight"] == i + 1, 10, "calls in flight")
    return threads, results


def test_criu_timeout_of_a_second_replica_spares_the_serving_one(serve, workdir):
    """As test_checkpoint.py::test_hanging_criu_times_out, with a criu that hangs only
    once a flag file exists: the first replica dumps with the real criu and serves; then
    HTTP calls queue up, a second replica is restored, and that restore (and the dump of
    the cold boot that replaces it) hangs past --criu-timeout. The watchdog must kill
    criu alone: the serving replica's calls are answered."""
    flag, fake = criu_after_flag(workdir, "exec sleep 600")
    s = serve("router_app.py:ckpt", "--max-replicas", "2", "--keep-warm", "-1",
              "--criu", str(fake), "--criu-timeout", "2")
    assert "checkpoint written" in s.log(), s.log()
    [first] = s.stats()["replicas"]
    flag.write_text("")
    threads, results = queue_three(s, op="sleep", seconds=3, i=0)
    for t in threads:
        t.join(60)
    log = s.log()
    assert "CRIU restore timed out after 2s" in log, log
    for i, r in enumerate(results):
        assert r is not None and r[0] == 200 and r[1]["i"] == i, (results, log)
    assert results[0][1]["pid"] == results[1][1]["pid"]
    replicas = {r["id"]: r for r in s.stats()["replicas"]}
    assert first["id"] in replicas and replicas[first["id"]]["pid"] == first["pid"], (replicas, log)
    assert replicas[first["id"]]["state"] == "serving"
    assert "killed by signal" not in log, log


def test_a_slow_restore_does_not_stall_the_serving_replica(serve, workdir):
    """Issue 12, defect 2: CRIU runs off the supervisor's event loop. A criu that takes
    3 s more once a flag file exists (after the first replica's dump): calls queue up, a
    second replica is restored with it, and meanwhile the HTTP calls to the first are
    answered as fast as ever. On the loop, the restore held every one of them 3 s."""
    flag, fake = criu_after_flag(workdir, "sleep 3")
    s = serve("router_app.py:ckpt", "--max-replicas", "2", "--keep-warm", "-1",
              "--criu", str(fake))
    assert "checkpoint written" in s.log(), s.log()
    flag.write_text("")
    threads, results = queue_three(s, op="sleep", seconds=0.3, i=0)
    s.wait_for("starting replica 2")
    t0 = time.monotonic()
    for t in threads:
        t.join(60)
    joined = time.monotonic() - t0
    latencies = []
    while time.monotonic() - t0 < 2.5:
        t = time.monotonic()
        assert s.call(timeout=30, op="echo", value=len(latencies)) == (200, len(latencies))
        latencies.append(time.monotonic() - t)
    log = s.log()
    assert log.count("ready:") == 1, "the slow restore was over before the calls: " + log
    for i, r in enumerate(results):
        assert r is not None and r[0] == 200 and r[1]["i"] == i, (results, log)
    assert joined < 2.0, f"the calls in flight waited {joined:.1f}s for the restore"
    assert max(latencies) < 0.5, latencies
    log = s.wait_for("ready:", count=2, timeout=30)  # the restore itself still succeeds
    assert "restored from checkpoint" in log, log
    assert len(s.stats()["replicas"]) == 2


def test_sigterm_during_a_slow_restore_stops_cleanly(serve, workdir):
    """A replica whose restore is still running when the supervisor is told to stop is
    neither served nor left behind: once CRIU is done it is killed, and the supervisor
    exits 0 (it would wait for good on a restored host never sent "start")."""
    flag, fake = criu_after_flag(workdir, "sleep 2")
    s = serve("router_app.py:ckpt", "--max-replicas", "2", "--keep-warm", "-1",
              "--criu", str(fake))
    flag.write_text("")
    threads, _ = queue_three(s, op="sleep", seconds=0.3)
    s.wait_for("starting replica 2")
    for t in threads:
        t.join(30)
    assert s.stop(timeout=20) == 0, s.log()
    log = s.log()
    assert log.count("ready:") == 1 and "restored from checkpoint" not in log, log


def test_serving_replica_killed_during_a_slow_restore_is_replaced(serve, workdir):
    """The reaper during a restore job: the serving host is SIGKILLed while CRIU restores
    a second replica on a pool thread. Its exit is handled at once (a replacement starts,
    a second restore in parallel) and the first restore is not disturbed: libcriu's own
    wait for its criu helper is never beaten to it (csrc/job.h)."""
    flag, fake = criu_after_flag(workdir, "sleep 2")
    s = serve("router_app.py:ckpt", "--max-replicas", "2", "--keep-warm", "-1",
              "--criu", str(fake))
    [first] = s.stats()["replicas"]
    flag.write_text("")
    threads, _ = queue_three(s, op="sleep", seconds=1)
    s.wait_for("starting replica 2")
    os.kill(first["pid"], signal.SIGKILL)
    log = s.wait_for("restored from checkpoint", count=2, timeout=30)
    for t in threads:
        t.join(30)
    assert "killed by signal 9" in log and "restore failed" not in log, log
    assert "booting cold" not in log, log
    assert s.call(op="echo", value=1) == (200, 1)
    assert len(s.stats()["replicas"]) == 2


def test_a_slow_dump_does_not_stall_the_supervisor(workdir):
    """As above for a dump: while a criu that takes 3 s more dumps the first replica, the
    supervisor's own HTTP answers (/stats) come at once; the replica then serves."""
    fake = workdir / "criu-slow"
    fake.write_text(f"#!/bin/sh\nsleep 3\nexec {real_criu()} \"$@\"\n")
    fake.chmod(0o755)
    cmd = [sys.executable, "-m", "beam", "serve", str(APPS / "router_app.py") + ":ckpt",
           "--port", "0", "--no-auth", "--criu", str(fake)]
    s = usercli.ServeProcess(cmd, usercli.serve_env(workdir), workdir, workdir / "dump.log")
    try:
        log = s.wait_for("checkpointing")
        port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", log).group(1))
        t = time.monotonic()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/stats")
        assert c.getresponse().status == 200
        took = time.monotonic() - t
        assert "checkpoint written" not in s.log(), "the dump was over before /stats"
        assert took < 0.5, f"/stats waited {took:.1f}s for the dump"
        assert "checkpoint written" in s.wait_for("ready:", timeout=60)
    finally:
        s.kill()


# ---- stopping: no errors for calls that never ran ---------------------------------------


class Raw:
    """A raw keep-alive HTTP/1.1 connection: send requests, read responses in order."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.f = self.sock.makefile("rb")

    def send_call(self, **kwargs) -> None:
        body = json.dumps(kwargs).encode()
        self.sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def response(self):
        line = self.f.readline()
        if not line:
            raise EOFError("connection closed before a response")
        status = int(line.split()[1])
        headers = {}
        while True:
            h = self.f.readline()
            if h in (b"\r\n", b""):
                break
            k, v = h.decode("latin-1").split(":", 1)
            headers[k.strip().lower()] = v.strip()
        return status, headers, json.loads(self.f.read(int(headers["content-length"])))

    def closed_by_peer(self) -> bool:
        try:
            return self.f.read(1) == b""
        except ConnectionResetError:
            return True


def test_sigterm_answers_calls_in_flight_and_503_for_new_ones(serve):
    """SIGTERM with one call running and one dispatched behind it (one worker, two router
    connections): both are answered, not 502. A keep-alive connection opened before the
    signal then gets 503 ShuttingDown with Connection: close, not silence."""
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "-1")
    a, b, idle = Raw(s.port), Raw(s.port), Raw(s.port)
    idle.send_call(op="echo", value="warm")
    assert idle.response()[2] == "warm"
    a.send_call(op="sleep", seconds=1.5, i=1)
    b.send_call(op="sleep", seconds=0.2, i=2)  # waits in the replica behind the first
    wait_until(lambda: s.stats()["inflight"] == 2, 10, "two calls in flight")
    s.proc.send_signal(signal.SIGTERM)
    s.wait_for("received Terminated")
    idle.send_call(op="echo", value="late")
    status, h, body = idle.response()
    assert status == 503 and body["error"]["type"] == "ShuttingDown", body
    assert h.get("connection") == "close"
    assert idle.closed_by_peer()
    for conn, i in ((a, 1), (b, 2)):
        status, _, body = conn.response()
        assert status == 200 and body["i"] == i, (body, s.log())
    assert s.proc.wait(30) == 0, s.log()


def test_replica_being_retired_gets_no_new_calls(serve, workdir):
    """A replica is retired while a direct msgpack call still runs in it (the host
    reports request starts as activity, so a call longer than keep_warm looks idle);
    HTTP calls that arrive while it stops must not be sent to it (they were answered
    502 ReplicaLost without running): they start a new replica and succeed."""
    from beam.client import Client
    sock = workdir / "m.sock"
    s = serve("router_app.py:crashy", "--no-checkpoint", "--keep-warm", "1",
              "--socket", str(sock))
    out: List = []
    t = threading.Thread(target=lambda: out.append(
        Client(f"unix://{sock}", timeout=30).call(op="sleep", seconds=4, i=0)))
    t.start()
    s.wait_for("idle for 1s: stopping it", timeout=10)
    results: List = []
    calls = threading.Thread(target=lambda: results.extend(
        s.call(timeout=30, op="echo", value=i) for i in range(3)))
    calls.start()
    time.sleep(0.3)  # the first call is parsed and routed by now
    for r in s.stats()["replicas"]:
        assert r["state"] != "stopping" or r["inflight"] == 0, (r, s.log())
    calls.join(30)
    assert results == [(200, 0), (200, 1), (200, 2)], (results, s.log())
    t.join(30)


# ---- options that cannot work are refused up front ---------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_seconds_are_refused(workdir, value):
    """float("nan") passes argparse and every comparison in C: --keep-warm nan retired
    replicas at once, --grace inf never killed a stuck one."""
    env = dict(os.environ, BEAM_CHECKPOINT_DIR=str(workdir / "c"))
    env.pop("PYTHONUNBUFFERED", None)
    for opt in ("--keep-warm", "--grace"):
        p = subprocess.run([sys.executable, "-m", "beam", "serve",
                            str(APPS / "router_app.py:crashy"), "--port", "0", "--no-auth",
                            "--no-checkpoint", f"{opt}={value}"],
                           capture_output=True, text=True, timeout=30, env=env, cwd=str(workdir))
        assert p.returncode != 0, (opt, p.stdout, p.stderr)
        assert "finite number" in p.stderr and opt in p.stderr, p.stderr


def test_listeners_beyond_what_start_can_carry_are_refused(start_worker, workdir):
    """Eight fds travel in "start"; 4 --socket + 4 --tcp + --port is nine, and used to
    give every host a listener list longer than its fds. Eight in all still serve."""
    from conftest import worker_binary
    socks = [f"--socket={workdir / f's{i}.sock'}" for i in range(4)]
    tcps = ["--tcp=127.0.0.1:0"] * 4
    p = subprocess.run([worker_binary(), "--python", sys.executable, "--no-checkpoint", *socks,
                        *tcps, "--port", "0", str(APPS / "router_app.py:crashy")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "at most 8 listeners" in p.stderr, (p.stdout, p.stderr)
    w = start_worker("router_app.py:crashy", "--no-checkpoint", *socks, *tcps[:3], "--port", "0",
                     "--no-auth")
    from beam.client import Client
    for a in w.addresses:
        with Client(a, timeout=10) as c:
            assert c.call(op="echo", value=a) == a
    port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", w.log()).group(1))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/", body=b'{"op": "echo", "value": 8}')
    assert c.getresponse().read() == b"8"
