#!/usr/bin/env python3
"""Soak test: many concurrent clients on the msgpack socket and the HTTP front of one
beam-worker while a killer thread crashes its replica's host every few seconds, another
kills one of that host's worker processes every few seconds, and slowloris clients hold
HTTP connections open sending a header byte at a time; then the RSS of one worker
process across many requests.

    PYTHONPATH=$PWD/python python bench/soak.py --seconds 60          # the documented run
    PYTHONPATH=$PWD/python python bench/soak.py --seconds 20 --rss-requests 0   # CI

Loopback only, bounded in time (--seconds) and in count (--max-requests). The worker
serves tests/apps/rel_app.py (checkpointed), with --max-crashes 0 so that the killing
never makes it give up. Every request ends in exactly one of:

  answered   the right answer (the echo of what was sent)
  errored    an explicit error: an HTTP status with a JSON error body (502 ReplicaLost,
             503, 429, ...), a msgpack error response, or beam.ConnectionClosed naming the
             request ids that got no answer (the worker's connection closed under them)
  lost       anything else: no answer and no error within --timeout, a wrong answer, an
             HTTP connection closed without a response. Must be 0.

A worker kill (SIGKILL of one process the host forked) ends the calls in flight on it:
HTTP ones with 502 ReplicaLost, msgpack ones with ConnectionClosed. The slowloris
connections are not calls: each must be cut by the server's --header-timeout (408), and
meanwhile the other clients keep being answered.

Exit status 0 when nothing was lost, every kill was recovered from, every slowloris
connection that outlived the header timeout was cut, the server survived and (with --rss-requests) the
RSS growth is under --rss-limit-mib; 1 otherwise; 2 on a setup problem. --json FILE
writes the figures (docs/reliability.md quotes them).

The helpers at the top (host_pids, worker_pids, real_pid, rss_kib) are also used by
tests/test_reliability.py and tests/test_security.py.
"""
from __future__ import annotations

import os
import sys

# Run as a script, bench/ is sys.path[0], and bench/http.py (the HTTP benchmark) would
# shadow the standard library's http package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

REPO = os.path.dirname(_HERE)
APP = os.path.join(REPO, "tests", "apps", "rel_app.py") + ":handler"
sys.path.insert(0, os.path.join(REPO, "python"))

# ---- processes --------------------------------------------------------------------------


def children(pid: int) -> List[int]:
    """Direct children of pid (every thread's), from /proc/PID/task/*/children."""
    out: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def status_field(pid: int, name: str) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def rss_kib(pid: int) -> int:
    """VmRSS of pid in KiB (0 if it is gone)."""
    v = status_field(pid, "VmRSS")
    return int(v.split()[0]) if v else 0


def nspids(pid: int) -> List[int]:
    """pid as seen from each PID namespace it is in, outermost first (NSpid)."""
    v = status_field(pid, "NSpid")
    return [int(x) for x in v.split()] if v else []


def host_pids(supervisor: int) -> List[int]:
    """The supervisor's host processes (each PID 1 of its own namespace), as pids here."""
    return [p for p in children(supervisor) if comm(p) != "criu" and nspids(p)[-1:] == [1]]


def worker_pids(host: int) -> List[int]:
    """The worker processes a host forked (the app's own subprocesses excluded)."""
    return [p for p in children(host) if comm(p) == comm(host)]


def real_pid(supervisor: int, inner_pid: int) -> int:
    """The pid here of the worker whose pid inside its namespace is inner_pid (what the
    `stats` request reports). With several replicas the inner pids repeat: the caller
    must have one replica."""
    found = [w for h in host_pids(supervisor) for w in worker_pids(h) if nspids(w)[-1:] == [inner_pid]]
    if len(found) != 1:
        raise RuntimeError(f"cannot tell which worker has inner pid {inner_pid}: {found}")
    return found[0]


# ---- the server -------------------------------------------------------------------------


class Server:
    """beam-worker on a unix socket, an ephemeral TCP port and an ephemeral HTTP port."""

    def __init__(self, binary: str, python: str, workdir: str, args: List[str],
                 env: Dict[str, str], app: str = APP) -> None:
        self.workdir = workdir
        self.sock = os.path.join(workdir, "soak.sock")
        self.token = env["BEAM_AUTH_TOKEN"]
        self.log_path = os.path.join(workdir, "worker.log")
        self._log = open(self.log_path, "wb")
        cmd = [binary, "--python", python, "--socket", self.sock, "--tcp", "127.0.0.1:0",
               "--port", "0", *args, app]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=workdir, start_new_session=True)
        self.wait_for("ready:", 120)
        log = self.log()
        self.port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", log).group(1))
        self.tcp = re.search(r"listening on (tcp://\S+)", log).group(1)
        self.unix = "unix://" + self.sock

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"beam-worker exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {text!r}:\n{self.log()}")
            time.sleep(0.02)

    def stats(self, timeout: float = 10.0) -> dict:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request("GET", "/stats", headers={"Authorization": f"Bearer {self.token}"})
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"/stats answered {r.status}: {body!r}")
            return json.loads(body)
        finally:
            c.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# ---- accounting -------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.answered = self.lost = self.refused = 0
        self.errors: Dict[str, int] = collections.Counter()
        self.lost_examples: List[str] = []

    def add(self, answered: int = 0, error: Optional[str] = None, errors: int = 1,
            lost: int = 0, why: str = "") -> None:
        with self.lock:
            self.answered += answered
            if error:
                self.errors[error] += errors
            if lost:
                self.lost += lost
                if len(self.lost_examples) < 20:
                    self.lost_examples.append(why)

    def count_sent(self, n: int) -> None:
        with self.lock:
            self.sent += n

    def summary(self) -> dict:
        errored = sum(self.errors.values())
        return {"sent": self.sent, "answered": self.answered, "errored": errored,
                "lost": self.lost, "unaccounted": self.sent - self.answered - errored - self.lost,
                "errors": dict(self.errors), "refused_connections": self.refused,
                "lost_examples": self.lost_examples}


class Budget:
    """At most max_requests requests in all, and none after the deadline."""

    def __init__(self, max_requests: int, seconds: float) -> None:
        self.left = max_requests
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()

    def take(self, n: int) -> int:
        if time.monotonic() >= self.deadline:
            return 0
        with self.lock:
            n = min(n, self.left)
            self.left -= n
            return n


# ---- clients ------------------------------------------------------------------------------


def msgpack_client(i: int, address: str, pipeline: int, budget: Budget, tally: Tally,
                   timeout: float) -> None:
    from beam.client import Client
    from beam.exceptions import ConnectionClosed, RemoteError
    from beam.exceptions import TimeoutError as BeamTimeout

    c = None
    seq = 0
    while True:
        k = budget.take(pipeline)
        if k == 0:
            break
        if c is None:
            try:
                c = Client(address, timeout=timeout)
            except OSError as exc:  # not accepted: nothing was sent
                with tally.lock:
                    tally.refused += 1
                    if len(tally.lost_examples) < 20:
                        tally.lost_examples.append(f"connect refused (nothing sent): {exc!r}")
                time.sleep(0.05)
                continue
        values = [[i, seq + j] for j in range(k)]
        seq += k
        tally.count_sent(k)
        try:
            out = c.pipeline([{"op": "echo", "value": v} for v in values])
        except ConnectionClosed as exc:
            got = [r for r in getattr(exc, "results", [])]
            good = sum(1 for v, r in zip(values, got) if r == v)
            unanswered = list(getattr(exc, "unanswered", []))
            if len(got) + len(unanswered) != k or good != len(got):
                tally.add(answered=good, lost=k - good,
                          why=f"ConnectionClosed accounting: {len(got)} + {unanswered} of {k}")
            else:
                tally.add(answered=good, error="ConnectionClosed", errors=len(unanswered))
            c = None
            continue
        except BeamTimeout as exc:
            tally.add(lost=k, why=f"timeout: {exc}")
            c = None
            continue
        except Exception as exc:  # noqa: BLE001 - anything else is a silent failure
            tally.add(lost=k, why=f"{type(exc).__name__}: {exc}")
            c = None
            continue
        for v, r in zip(values, out):
            if isinstance(r, RemoteError):
                tally.add(error=f"RemoteError {r.type}")
            elif r == v:
                tally.add(answered=1)
            else:
                tally.add(lost=1, why=f"wrong answer {r!r} for {v!r}")
    if c is not None:
        c.close()


def http_client(i: int, port: int, token: str, budget: Budget, tally: Tally,
                timeout: float) -> None:
    conn = None
    seq = 0
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    while budget.take(1):
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        value = [i, seq]
        seq += 1
        tally.count_sent(1)
        try:
            conn.request("POST", "/", json.dumps({"op": "echo", "value": value}), headers)
            r = conn.getresponse()
            body = r.read()
        except (socket.timeout, TimeoutError) as exc:
            tally.add(lost=1, why=f"HTTP timeout: {exc!r}")
            conn.close()
            conn = None
            continue
        except (OSError, http.client.HTTPException) as exc:
            tally.add(lost=1, why=f"HTTP connection closed without a response: {exc!r}")
            conn.close()
            conn = None
            continue
        if r.status == 200:
            if json.loads(body) == value:
                tally.add(answered=1)
            else:
                tally.add(lost=1, why=f"wrong answer {body!r} for {value!r}")
        else:
            try:
                kind = json.loads(body)["error"]["type"]
            except Exception:  # noqa: BLE001
                kind = "unparsable"
            tally.add(error=f"{r.status} {kind}")
        if r.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def killer(server: Server, every: float, stop: threading.Event, kills: list) -> None:
    """Every `every` s: crash the serving replica's host (SIGKILL, as the OOM killer
    does, and a segmentation fault in C, alternately); time until a new one serves."""
    n = 0
    while not stop.wait(every):
        try:
            reps = [r for r in server.stats()["replicas"] if r["state"] == "serving"]
        except Exception:  # noqa: BLE001 - the next round tries again
            continue
        if not reps:
            continue
        victim = reps[0]
        # SIGUSR1 makes rel_app's host jump to a bad address: a real SIGSEGV in C.
        sig = signal.SIGKILL if n % 2 == 0 else signal.SIGUSR1
        n += 1
        t0 = time.monotonic()
        try:
            os.kill(victim["pid"], sig)
        except ProcessLookupError:
            continue
        entry = {"signal": "SIGKILL" if sig == signal.SIGKILL else "SIGSEGV", "replica": victim["id"],
                 "recovery_ms": None, "restored": None}
        kills.append(entry)
        deadline = t0 + 60
        while time.monotonic() < deadline:
            try:
                new = [r for r in server.stats(5)["replicas"]
                       if r["state"] == "serving" and r["id"] != victim["id"]]
            except Exception:  # noqa: BLE001
                new = []
            if new:
                entry["recovery_ms"] = round((time.monotonic() - t0) * 1000, 1)
                entry["restored"] = bool(new[0]["restored"])
                break
            time.sleep(0.01)


def worker_killer(server: Server, every: float, stop: threading.Event, kills: list) -> None:
    """Every `every` s: SIGKILL one worker of the serving host; time until the host has
    forked its replacement. The host's own crash budget (5 worker crashes in 10 s) must
    not trip, so `every` stays above 2 s. A kill whose host dies meanwhile (the host
    killer) counts as recovered by that host's replacement."""
    while not stop.wait(every):
        hosts = host_pids(server.proc.pid)
        workers = worker_pids(hosts[0]) if len(hosts) == 1 else []
        if not workers:
            continue
        host, victim, t0 = hosts[0], workers[-1], time.monotonic()
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue
        entry = {"recovery_ms": None, "host_replaced": False}
        kills.append(entry)
        while time.monotonic() < t0 + 30:
            now = worker_pids(host)
            if victim not in now and len(now) >= len(workers):
                entry["recovery_ms"] = round((time.monotonic() - t0) * 1000, 1)
                break
            if host not in host_pids(server.proc.pid):
                entry["host_replaced"] = True
                break
            time.sleep(0.005)


def slowloris(port: int, drip: float, stop: threading.Event, out: list) -> None:
    """Hold connections open with a request whose headers never end (one byte every
    `drip` s), reconnecting when the server cuts one; record how each ended."""
    head = b"POST / HTTP/1.1\r\nHost: soak\r\nX-Slow: "
    while not stop.is_set():
        t0 = time.monotonic()
        rec = {"seconds": None, "status": None}
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            stop.wait(0.5)
            continue
        with s:
            try:
                s.sendall(head)
                s.settimeout(drip)
                while not stop.is_set():
                    try:
                        data = s.recv(4096)
                    except socket.timeout:
                        s.sendall(b"a")
                        continue
                    m = re.match(rb"HTTP/1\.1 (\d+)", data)
                    rec["status"] = int(m.group(1)) if m else None
                    break  # cut (answered, or closed without a word)
            except OSError:
                pass  # reset: cut too
        if stop.is_set() and rec["status"] is None:
            continue  # still held when the soak ended: not cut, not counted
        rec["seconds"] = round(time.monotonic() - t0, 2)
        out.append(rec)


# ---- RSS ---------------------------------------------------------------------------------


def measure_rss(address: str, supervisor: int, total: int, first: int = 10_000,
                batch: int = 250) -> dict:
    """Serve `total` echo requests on one connection (so one worker process) and read
    that worker's VmRSS after `first` and after all of them."""
    from beam.client import Client

    with Client(address, timeout=60) as c:
        inner = c.stats()["pid"]  # the same connection, so the same worker
        pid = real_pid(supervisor, inner)
        before = rss_kib(pid)
        done = 0
        at: Dict[int, int] = {}
        t0 = time.monotonic()
        payload = {"op": "echo", "value": {"text": "x" * 64, "n": [1, 2.5, None, True]}}
        while done < total:
            k = min(batch, total - done)
            out = c.pipeline([payload] * k)
            if len(out) != k or out[0] != payload["value"]:
                raise RuntimeError(f"unexpected answers: {out[:1]!r}")
            done += k
            if done == first:
                at[first] = rss_kib(pid)
        at[total] = rss_kib(pid)
        elapsed = time.monotonic() - t0
        if c.stats()["pid"] != inner:
            raise RuntimeError("the worker changed during the RSS run")
    return {"requests": total, "worker_pid": pid, "rss_kib_start": before,
            "rss_kib_at_first": at.get(first), "rss_kib_at_end": at[total],
            "growth_kib": at[total] - at.get(first, before), "first": first,
            "seconds": round(elapsed, 2), "req_per_s": round(total / elapsed)}


# ---- main -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    workdir = args.workdir or tempfile.mkdtemp(prefix="beam-soak-")
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               BEAM_CHECKPOINT_DIR=os.path.join(workdir, "checkpoints"),
               BEAM_VOLUME_ROOT=os.path.join(workdir, "volumes"),
               BEAM_AUTH_TOKEN=secrets.token_hex(16))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(REPO, "python"),
                                                      env.get("PYTHONPATH")]))
    server = Server(args.binary, args.python, workdir,
                    ["--checkpoint-key", "soak", "--max-crashes", "0", "--keep-warm", "-1",
                     "--workers", str(args.workers), "--max-replicas", "1",
                     "--header-timeout", str(args.header_timeout)], env)
    result: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("json",)},
                    "workdir": workdir}
    try:
        if "checkpoint written" not in server.log():
            raise RuntimeError(f"no checkpoint was made:\n{server.log()}")
        sup_rss0 = rss_kib(server.proc.pid)
        fronts = {"msgpack": Tally(), "http": Tally()}
        budget = Budget(args.max_requests, args.seconds)
        stop = threading.Event()
        kills: list = []
        threads = []
        for i in range(args.msgpack_clients):
            address = server.unix if i % 2 == 0 else server.tcp
            pipe = 1 if i % 4 < 2 else args.pipeline
            threads.append(threading.Thread(target=msgpack_client, daemon=True, args=(
                i, address, pipe, budget, fronts["msgpack"], args.timeout)))
        for i in range(args.http_clients):
            threads.append(threading.Thread(target=http_client, daemon=True, args=(
                i, server.port, server.token, budget, fronts["http"], args.timeout)))
        kt = threading.Thread(target=killer, args=(server, args.kill_every, stop, kills), daemon=True)
        wkills: list = []
        side = []  # the killers and slowloris clients: run until the load is over
        if args.kill_every > 0:
            side.append(kt)
        if args.worker_kill_every > 0:
            side.append(threading.Thread(target=worker_killer, daemon=True,
                                         args=(server, args.worker_kill_every, stop, wkills)))
        loris: list = []
        for _ in range(args.slowloris):
            side.append(threading.Thread(target=slowloris, daemon=True,
                                         args=(server.port, args.slowloris_drip, stop, loris)))
        t0 = time.monotonic()
        for t in threads + side:
            t.start()
        for t in threads:
            t.join(args.seconds + 2 * args.timeout + 30)
        stop.set()
        for t in side:
            t.join(90)
        duration = time.monotonic() - t0
        hung = sum(t.is_alive() for t in threads)
        alive = server.proc.poll() is None
        log = server.log()
        recoveries = [k["recovery_ms"] for k in kills if k["recovery_ms"] is not None]
        result.update({
            "duration_s": round(duration, 1),
            "fronts": {name: t.summary() for name, t in fronts.items()},
            "kills": len(kills),
            "recovered": len(recoveries),
            "restored_replacements": sum(1 for k in kills if k["restored"]),
            "recovery_ms": {"min": min(recoveries, default=None),
                            "median": sorted(recoveries)[len(recoveries) // 2] if recoveries else None,
                            "max": max(recoveries, default=None)},
            "worker_kills": len(wkills),
            "worker_kills_recovered": sum(1 for k in wkills
                                          if k["recovery_ms"] is not None or k["host_replaced"]),
            "worker_recovery_ms": _spread([k["recovery_ms"] for k in wkills
                                           if k["recovery_ms"] is not None]),
            "slowloris": {"connections": args.slowloris, "cut": len(loris),
                          "cut_408": sum(1 for x in loris if x["status"] == 408),
                          "held_s": _spread([x["seconds"] for x in loris])},
            "log_restores": log.count("(restored from checkpoint)"),
            "log_cold_boots": log.count("mode=cold"),
            "client_threads_hung": hung,
            "server_alive": alive,
            "supervisor_rss_kib": {"start": sup_rss0, "end": rss_kib(server.proc.pid)},
        })
        if args.rss_requests > 0 and alive:
            result["rss"] = measure_rss(server.unix, server.proc.pid, args.rss_requests,
                                        first=min(10_000, args.rss_requests))
    finally:
        result["exit_code"] = server.stop()
    return result


def _spread(xs: list) -> dict:
    xs = sorted(xs)
    return {"min": xs[0] if xs else None, "median": xs[len(xs) // 2] if xs else None,
            "max": xs[-1] if xs else None}


def verdict(r: dict, args: argparse.Namespace) -> List[str]:
    bad = []
    for name, f in r.get("fronts", {}).items():
        if f["lost"] or f["unaccounted"]:
            bad.append(f"{name}: {f['lost']} lost, {f['unaccounted']} unaccounted: {f['lost_examples'][:3]}")
        if f["answered"] == 0:
            bad.append(f"{name}: nothing answered")
    if not r.get("server_alive"):
        bad.append("the server died")
    if r.get("client_threads_hung"):
        bad.append(f"{r['client_threads_hung']} client threads never finished")
    if r.get("kills", 0) != r.get("recovered", 0):
        bad.append(f"{r['kills'] - r['recovered']} kill(s) without a recovery")
    if r.get("worker_kills", 0) != r.get("worker_kills_recovered", 0):
        bad.append(f"{r['worker_kills'] - r['worker_kills_recovered']} worker kill(s) without "
                   f"a replacement worker")
    loris = r.get("slowloris", {})
    if args.slowloris and args.seconds > args.header_timeout + 2 and not loris.get("cut"):
        bad.append("no slowloris connection was cut by --header-timeout")
    held = (loris.get("held_s") or {}).get("max")
    if held is not None and held > args.header_timeout + 5:
        bad.append(f"a slowloris connection was held {held} s (--header-timeout "
                   f"{args.header_timeout:g})")
    rss = r.get("rss")
    if rss and rss["growth_kib"] > args.rss_limit_mib * 1024:
        bad.append(f"worker RSS grew {rss['growth_kib']} KiB over {rss['requests']} requests")
    return bad


def print_report(r: dict) -> None:
    print(f"soak: {r.get('duration_s')} s, {r.get('kills')} host kills, {r.get('recovered')} "
          f"recovered ({r.get('restored_replacements')} by restore), recovery ms "
          f"{r.get('recovery_ms')}")
    print(f"worker kills: {r.get('worker_kills')}, {r.get('worker_kills_recovered')} recovered, "
          f"new worker in ms {r.get('worker_recovery_ms')}")
    print(f"slowloris: {r.get('slowloris')}")
    print(f"{'front':8} {'sent':>9} {'answered':>9} {'errored':>8} {'lost':>5}  errors")
    for name, f in r.get("fronts", {}).items():
        print(f"{name:8} {f['sent']:>9} {f['answered']:>9} {f['errored']:>8} {f['lost']:>5}  {f['errors']}")
    print(f"supervisor RSS KiB: {r.get('supervisor_rss_kib')}")
    if "rss" in r:
        x = r["rss"]
        print(f"worker RSS KiB: start {x['rss_kib_start']}, after {x['first']} requests "
              f"{x['rss_kib_at_first']}, after {x['requests']} {x['rss_kib_at_end']} "
              f"(growth {x['growth_kib']} KiB; {x['req_per_s']} req/s)")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="load duration (default 60)")
    p.add_argument("--max-requests", type=int, default=5_000_000, help="bound on requests sent")
    p.add_argument("--msgpack-clients", type=int, default=8)
    p.add_argument("--http-clients", type=int, default=8)
    p.add_argument("--pipeline", type=int, default=4, help="depth of the pipelining msgpack clients")
    p.add_argument("--kill-every", type=float, default=4.0,
                   help="seconds between host kills, counted from the last recovery (0: none)")
    p.add_argument("--worker-kill-every", type=float, default=3.0,
                   help="seconds between SIGKILLs of one worker of the serving host (0: none)")
    p.add_argument("--slowloris", type=int, default=8,
                   help="HTTP connections that send their headers a byte at a time (0: none)")
    p.add_argument("--slowloris-drip", type=float, default=0.5, help="seconds between their bytes")
    p.add_argument("--header-timeout", type=float, default=5.0,
                   help="the server's --header-timeout, which must cut them (default 5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout")
    p.add_argument("--rss-requests", type=int, default=100_000, help="0 skips the RSS run")
    p.add_argument("--rss-limit-mib", type=float, default=5.0)
    p.add_argument("--binary", default=os.environ.get("BEAM_WORKER_BINARY")
                   or os.path.join(REPO, "build", "beam-worker"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--workdir", help="default: a new temporary directory")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    args.binary = os.path.abspath(args.binary)
    if not os.access(args.binary, os.X_OK):
        print(f"soak: no beam-worker at {args.binary} (--binary)", file=sys.stderr)
        return 2
    r = run(args)
    bad = verdict(r, args)
    r["failures"] = bad
    print_report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    for b in bad:
        print(f"soak: FAIL: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
