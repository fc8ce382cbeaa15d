#!/usr/bin/env python3
"""Benchmark beam-worker against uvicorn + FastAPI on a no-op handler.

Starts ``beam-worker`` serving ``bench/apps/noop.py:predict`` and drives it with
``beam-loadgen`` over its unix socket and over TCP; then starts uvicorn serving the same
handler with FastAPI (``bench/apps/noop_fastapi.py``, JSON over HTTP/1.1) and drives it
with the same client (same connections, pipeline depth, warm-up and duration). Prints a
table and, as the last line, ``serve_vs_fastapi_rps_ratio=<float>``: beam over the unix
socket / FastAPI with a plain ``def`` handler, both at the first ``--workers`` count.
See bench/README.md for the method and its caveats.

    PYTHONPATH=$PWD/python python bench/serve.py --quick

Exit status: 0 when every run completed without errors, 1 when a run saw errors or a
server failed, 2 on a setup problem (missing binary, missing package).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAM_APP = os.path.join(REPO, "bench", "apps", "noop.py") + ":predict"
FASTAPI_APPS = {"def": "bench.apps.noop_fastapi:app", "async def": "bench.apps.noop_fastapi:app_async"}


class BenchError(Exception):
    pass


class SetupError(Exception):
    pass


# ---- helpers ---------------------------------------------------------------------------


def cpu_plan(workers: int, mode: str) -> tuple:
    """(server CPUs, client CPUs) or (None, None) for no pinning.

    With pinning the load generator gets the last CPU and the servers the rest, the same
    for beam and uvicorn, so neither server shares a core with the client."""
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "off" or len(cpus) < 2:
        return None, None
    if mode == "auto" and workers > len(cpus) - 1:
        return None, None  # the servers would be squeezed onto fewer cores than workers
    return set(cpus[:-1]), {cpus[-1]}


def affinity(cpus: Optional[set]):
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.3f}"


class LogPump(threading.Thread):
    """Reads a child's stderr line by line (so the pipe never fills), keeps the tail."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: List[str] = []
        self.cond = threading.Condition()
        self.closed = False
        self.start()

    def run(self):
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append(line)
                del self.lines[:-200]
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def tail(self, n: int = 20) -> str:
        with self.cond:
            return "\n".join(self.lines[-n:])


def stop(proc: subprocess.Popen, name: str, grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"warning: {name} ignored SIGTERM for {grace:.0f}s; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()


# ---- the load generator ----------------------------------------------------------------


def find_tool(build_dir: str, name: str) -> str:
    """A benchmark tool built by CMake (beam-loadgen, beam-http-floor); built if missing."""
    path = os.path.join(build_dir, name)
    if os.access(path, os.X_OK):
        return path
    if os.path.exists(os.path.join(build_dir, "CMakeCache.txt")) and shutil.which("cmake"):
        print(f"building {path} ...", file=sys.stderr)
        r = subprocess.run(["cmake", "--build", build_dir, "--target", name],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode == 0 and os.access(path, os.X_OK):
            return path
        sys.stderr.write(r.stderr[-2000:])
    raise SetupError(
        f"{path} not found. Build it with:\n"
        f"  cmake -S {REPO} -B {build_dir} -DBEAM_BUILD_BENCH=ON && "
        f"cmake --build {build_dir} --target {name}")


def find_worker(build_dir: str) -> str:
    path = os.path.join(build_dir, "beam-worker")
    for _ in range(30):  # someone may be relinking it right now
        if os.access(path, os.X_OK):
            return path
        time.sleep(1)
    raise SetupError(f"{path} not found; build it with cmake --build {build_dir}")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of pid and its live descendants, from /proc."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()  # comm may hold spaces
            except (OSError, IndexError):
                continue
            stats[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))  # ppid, ticks
    tree, grew = {pid}, True
    while grew:
        more = {p for p, (pp, _) in stats.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def loadgen(args, target: List[str], proto: str, cpus: Optional[set],
            server_pid: Optional[int] = None) -> Dict:
    """One load generator run. server_pid: also the server's CPU per request (its
    process tree's CPU over warm-up + run, over the requests of that time at the
    measured rate): unlike req/s, it hardly moves when other work shares the cores."""
    # --quickack for HTTP only: uvicorn --workers N (asyncio loop) loses TCP_NODELAY and
    # writes headers and body separately, so without it every response waits ~40 ms for
    # the client's delayed ACK. It only helps the baseline. beam answers in one write.
    extra = ["--quickack"] if proto == "http" else []
    cmd = [args.loadgen, "--proto", proto, *target, *extra,
           "--connections", str(args.connections), "--pipeline", str(args.pipeline),
           "--threads", str(args.threads),
           "--duration", str(args.duration), "--warmup", str(args.warmup)]
    timeout = args.duration + args.warmup + 30
    cpu0 = tree_cpu_s(server_pid) if server_pid else 0.0
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, preexec_fn=affinity(cpus))
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if server_pid and res["rps"] > 0:
        cpu = tree_cpu_s(server_pid) - cpu0
        res["server_cpu_us"] = cpu * 1e6 / (res["rps"] * (args.duration + args.warmup))
    return res


# ---- beam-worker -----------------------------------------------------------------------


def run_beam(args, workers: int, server_cpus, client_cpus) -> List[Dict]:
    tmp = tempfile.mkdtemp(prefix="beam-bench-")
    sock = os.path.join(tmp, "s.sock")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [os.path.join(REPO, "python"), env.get("PYTHONPATH", "")] if p)
    cmd = [args.worker, "--python", args.python, "--no-checkpoint", "--workers", str(workers),
           "--socket", sock, "--tcp", "127.0.0.1:0", BEAM_APP]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, preexec_fn=affinity(server_cpus))
    log = LogPump(proc.stderr)
    try:
        addrs: List[str] = []
        deadline = time.monotonic() + 60
        seen = 0
        ready = False
        while not ready:
            with log.cond:
                while len(log.lines) <= seen and not log.closed:
                    if not log.cond.wait(max(0.0, deadline - time.monotonic())):
                        break
                new, seen = log.lines[seen:], len(log.lines)
                closed = log.closed
            for line in new:
                if "listening on " in line:
                    addrs.append(line.split("listening on ", 1)[1].strip())
                elif "ready:" in line:
                    ready = True
            if not ready and (closed or time.monotonic() > deadline):
                raise BenchError(f"beam-worker did not become ready:\n{log.tail()}")
        unix = next((a[len("unix://"):] for a in addrs if a.startswith("unix://")), None)
        tcp = next((a[len("tcp://"):] for a in addrs if a.startswith("tcp://")), None)
        if not unix or not tcp:
            raise BenchError(f"beam-worker listening lines not understood: {addrs}")
        rows = []
        for transport, target in (("unix", ["--unix", unix]), ("tcp", ["--tcp", tcp])):
            res = loadgen(args, target, "msgpack", client_cpus)
            rows.append(dict(res, server="beam", transport=transport, workers=workers))
            if proc.poll() is not None:
                raise BenchError(f"beam-worker exited during the run:\n{log.tail()}")
        return rows
    finally:
        stop(proc, "beam-worker")
        shutil.rmtree(tmp, ignore_errors=True)


# ---- uvicorn + FastAPI -----------------------------------------------------------------


def http_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def uvicorn_impl(python: str) -> str:
    """Which HTTP parser and event loop uvicorn's `auto` settings pick in `python`."""
    code = ("import importlib.util as u, uvicorn\n"
            "h = 'httptools' if u.find_spec('httptools') else 'h11'\n"
            "l = 'uvloop' if u.find_spec('uvloop') else 'asyncio'\n"
            "import fastapi\n"
            "print(f'uvicorn {uvicorn.__version__} (http={h}, loop={l}), fastapi {fastapi.__version__}')")
    r = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SetupError(f"{python} cannot import uvicorn/fastapi; install them with\n"
                         f"  {python} -m pip install fastapi uvicorn\n{r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def run_fastapi(args, workers: int, variant: str, server_cpus, client_cpus) -> Dict:
    port = free_port()
    cmd = [args.python, "-m", "uvicorn", FASTAPI_APPS[variant], "--app-dir", REPO,
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=affinity(server_cpus))
    log = LogPump(proc.stderr)
    try:
        deadline = time.monotonic() + 60
        while not http_ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"uvicorn did not become ready:\n{log.tail()}")
            time.sleep(0.1)
        if workers > 1:
            time.sleep(1.0)  # the first worker answered; give the others time to import
        res = loadgen(args, ["--tcp", f"127.0.0.1:{port}"], "http", client_cpus, proc.pid)
        if proc.poll() is not None:
            raise BenchError(f"uvicorn exited during the run:\n{log.tail()}")
        return dict(res, server=f"fastapi ({variant})", transport="http/tcp", workers=workers)
    finally:
        stop(proc, "uvicorn")


# ---- streaming: time to first chunk and chunks/s ---------------------------------------

STREAM_APP = os.path.join(REPO, "bench", "apps", "stream.py") + ":handler"
STREAM_FASTAPI = "bench.apps.stream_fastapi:app"
STREAM_CHUNKS = 1000


def stream_msgpack(path: str, n: int) -> tuple:
    """One streamed call over the unix socket: (seconds to the first chunk frame, to the
    final frame). Frames are parsed as a client must (length, then msgpack)."""
    import msgpack

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        body = msgpack.packb({"id": 1, "kwargs": {"n": n}, "stream": True})
        t0 = time.perf_counter()
        s.sendall(len(body).to_bytes(4, "big") + body)
        buf, first, chunks = b"", None, 0
        while True:
            data = s.recv(1 << 20)
            if not data:
                raise BenchError("worker closed the connection mid-stream")
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                m = msgpack.unpackb(buf[4:4 + size])
                buf = buf[4 + size:]
                if "chunk" in m:
                    chunks += 1
                    first = first or time.perf_counter() - t0
                elif chunks != n or not m.get("ok"):
                    raise BenchError(f"stream ended after {chunks} chunks: {m}")
                else:
                    return first, time.perf_counter() - t0


def stream_sse(port: int, n: int) -> tuple:
    """One POST with Accept: text/event-stream: (seconds to the first data: event, to the
    last chunk of the chunked body). The same client for beam and FastAPI."""
    req = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(str(n)) + 7}\r\n"
           f"Connection: close\r\n\r\n{{\"n\": {n}}}").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(req)
        buf, first = b"", None
        while True:
            data = s.recv(1 << 20)
            if data:
                buf += data
                if first is None and b"data: " in buf:
                    first = time.perf_counter() - t0
            if not data or buf.endswith(b"0\r\n\r\n"):
                end = time.perf_counter() - t0
                if buf.count(b"data: ") != n:
                    raise BenchError(f"SSE stream had {buf.count(b'data: ')} of {n} events")
                return first, end


def measure_stream(fn, target, runs: int) -> Dict:
    for _ in range(3):  # warm-up: imports, first connections
        fn(target, STREAM_CHUNKS)
    firsts, totals = [], []
    for _ in range(runs):
        first, total = fn(target, STREAM_CHUNKS)
        firsts.append(first)
        totals.append(total)
    firsts.sort()
    totals.sort()
    return {"first_chunk_ms": firsts[len(firsts) // 2] * 1e3,
            "chunks_per_s": STREAM_CHUNKS / totals[len(totals) // 2], "runs": runs}


def run_stream(args) -> List[Dict]:
    """The generator of bench/apps/stream.py streamed by beam over msgpack (unix socket)
    and over its HTTP front as SSE, and by FastAPI's StreamingResponse on uvicorn."""
    runs = 20 if args.quick else 100
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [os.path.join(REPO, "python"), env.get("PYTHONPATH", "")] if p)
    tmp = tempfile.mkdtemp(prefix="beam-bench-")
    rows = []
    procs = []
    try:
        sock = os.path.join(tmp, "s.sock")
        procs.append(subprocess.Popen([args.worker, "--python", args.python, "--no-checkpoint",
                                       "--socket", sock, STREAM_APP], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        wait_until(lambda: os.path.exists(sock), procs[-1], "beam-worker (stream)")
        time.sleep(0.3)
        rows.append(dict(measure_stream(stream_msgpack, sock, runs), server="beam",
                         transport="msgpack/unix"))
        port = free_port()
        procs.append(subprocess.Popen([args.worker, "--python", args.python, "--no-checkpoint",
                                       "--port", str(port), "--no-auth", STREAM_APP],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env, cwd=tmp))
        wait_until(lambda: http_ready(port), procs[-1], "beam-worker --port (stream)")
        rows.append(dict(measure_stream(stream_sse, port, runs), server="beam (HTTP front)",
                         transport="sse/tcp"))
        port = free_port()
        procs.append(subprocess.Popen([args.python, "-m", "uvicorn", STREAM_FASTAPI, "--app-dir", REPO,
                                       "--host", "127.0.0.1", "--port", str(port), "--log-level",
                                       "warning", "--no-access-log"], cwd=REPO,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_until(lambda: http_ready(port), procs[-1], "uvicorn (stream)")
        rows.append(dict(measure_stream(stream_sse, port, runs), server="fastapi StreamingResponse",
                         transport="sse/tcp"))
    finally:
        for p in procs:
            stop(p, "stream server")
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not become ready")
        time.sleep(0.05)


def print_stream_rows(rows) -> None:
    print(f"streaming: a generator of {STREAM_CHUNKS} small chunks, median of "
          f"{rows[0]['runs'] if rows else 0} runs")
    print(f"{'server':<28}{'transport':<15}{'first chunk':>13}{'chunks/s':>12}")
    for r in rows:
        print(f"{r['server']:<28}{r['transport']:<15}{r['first_chunk_ms']:>10.2f} ms"
              f"{r['chunks_per_s']:>12,.0f}")


# ---- main ------------------------------------------------------------------------------


def print_rows(rows) -> None:
    """The throughput table, as bench/serve.py and bench/http.py print it."""
    hdr = f"{'server':<20} {'transport':<9} {'workers':>7} {'req/s':>10} {'p50 ms':>8} " \
          f"{'p99 ms':>8} {'p99.9 ms':>9} {'errors':>7} {'cpu us/req':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        cpu = f"{r['server_cpu_us']:.1f}" if "server_cpu_us" in r else "-"
        print(f"{r['server']:<20} {r['transport']:<9} {r['workers']:>7} {r['rps']:>10.0f} "
              f"{fmt_ms(r['p50_us']):>8} {fmt_ms(r['p99_us']):>8} {fmt_ms(r['p999_us']):>9} "
              f"{r['errors']:>7} {cpu:>10}")


def add_client_options(ap) -> None:
    """The load generator's options, shared by bench/serve.py and bench/http.py."""
    ap.add_argument("--connections", type=int, default=16, help="client connections (default 16)")
    ap.add_argument("--pipeline", type=int, default=1,
                    help="requests in flight per connection (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="load generator threads (default 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help="measured seconds per run (default 10; 3 with --quick)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="unmeasured seconds before each run (default 1; 0.5 with --quick)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Requests/s and latency of beam-worker vs uvicorn+FastAPI on a no-op handler.",
        epilog="The last line printed is serve_vs_fastapi_rps_ratio=<beam unix rps / FastAPI rps>.")
    ap.add_argument("--quick", action="store_true",
                    help="short runs (3 s each, 0.5 s warm-up); finishes in well under a minute")
    add_client_options(ap)
    ap.add_argument("--workers", default="1",
                    help="server processes, or a comma list to compare several (e.g. 1,2); "
                         "the headline ratio uses the first (default 1)")
    ap.add_argument("--build-dir", default=os.path.join(REPO, "build"),
                    help="where beam-worker and beam-loadgen are (default build)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for both servers (default: this one)")
    ap.add_argument("--pin", choices=["auto", "on", "off"], default="auto",
                    help="pin the client to the last CPU and the servers to the others "
                         "(auto: only when the servers' workers fit on the others; default auto)")
    ap.add_argument("--no-async", action="store_true",
                    help="skip the FastAPI `async def` variant")
    ap.add_argument("--json", metavar="OUT", help="also write all results to this JSON file")
    ap.add_argument("--no-stream", action="store_true", help="skip the streaming rows")
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
        if not worker_counts or min(worker_counts) < 1:
            raise ValueError
    except ValueError:
        ap.error("--workers wants positive integers, e.g. 1 or 1,2")
    if args.connections < 1 or args.pipeline < 1 or args.threads < 1:
        ap.error("--connections, --pipeline and --threads must be >= 1")

    build = os.path.abspath(args.build_dir)
    try:
        args.loadgen = find_tool(build, "beam-loadgen")
        args.worker = find_worker(build)
        impl = uvicorn_impl(args.python)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    variants = ["def"] if args.no_async else ["def", "async def"]
    rows: List[Dict] = []
    failed = None
    try:
        for w in worker_counts:
            server_cpus, client_cpus = cpu_plan(w, args.pin)
            pin = (f"servers on CPUs {sorted(server_cpus)}, client on {sorted(client_cpus)}"
                   if server_cpus else "unpinned")
            print(f"workers={w}: {pin}", file=sys.stderr)
            for r in run_beam(args, w, server_cpus, client_cpus):
                rows.append(dict(r, pinning=pin))
            for v in variants:
                rows.append(dict(run_fastapi(args, w, v, server_cpus, client_cpus), pinning=pin))
        stream_rows = [] if args.no_stream or failed else run_stream(args)
    except BenchError as e:
        failed = str(e)
        stream_rows = []
    except subprocess.TimeoutExpired as e:
        failed = f"timed out: {e}"
        stream_rows = []

    print(f"no-op handler; {args.connections} connections x pipeline {args.pipeline}, "
          f"{args.threads} client thread(s), {args.warmup:g}s warm-up + {args.duration:g}s; {impl}")
    print_rows(rows)

    def rps(server: str, transport: Optional[str], w: int) -> Optional[float]:
        for r in rows:
            if r["server"] == server and r["workers"] == w and transport in (None, r["transport"]):
                return r["rps"]
        return None

    ratios = {}
    for w in worker_counts:
        base, base_async = rps("fastapi (def)", None, w), rps("fastapi (async def)", None, w)
        for transport in ("unix", "tcp"):
            beam = rps("beam", transport, w)
            if beam and base:
                ratios[f"workers{w}_{transport}_vs_fastapi"] = beam / base
            if beam and base_async:
                ratios[f"workers{w}_{transport}_vs_fastapi_async"] = beam / base_async
    for k, v in ratios.items():
        print(f"{k}={v:.2f}")
    stream_ratios = {}
    if stream_rows:
        print_stream_rows(stream_rows)
        by = {r["server"]: r for r in stream_rows}
        fa = by.get("fastapi StreamingResponse")
        for name, key in (("beam", "msgpack"), ("beam (HTTP front)", "sse")):
            if fa and name in by:
                stream_ratios[f"stream_{key}_chunks_vs_fastapi"] = by[name]["chunks_per_s"] / fa["chunks_per_s"]
                stream_ratios[f"stream_{key}_first_chunk_vs_fastapi"] = (
                    by[name]["first_chunk_ms"] / fa["first_chunk_ms"])
        for k, v in stream_ratios.items():
            print(f"{k}={v:.3f}")

    errors = sum(r["errors"] for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: getattr(args, k) for k in (
                "connections", "pipeline", "threads", "duration", "warmup", "workers", "python", "pin")},
                "uvicorn": impl, "runs": rows, "ratios": ratios, "stream": stream_rows,
                "stream_ratios": stream_ratios, "error": failed}, f, indent=2)
    if failed:
        print(f"error: {failed}", file=sys.stderr)
    if errors:
        print(f"error: {errors} request(s) failed", file=sys.stderr)
    head = ratios.get(f"workers{worker_counts[0]}_unix_vs_fastapi")
    sys.stdout.flush()
    # The streaming figures of the last line are the HTTP front's (SSE against SSE): the
    # same protocol, client and generator on both sides; the msgpack ones are above.
    chunks = stream_ratios.get("stream_sse_chunks_vs_fastapi")
    first = stream_ratios.get("stream_sse_first_chunk_vs_fastapi")
    print(f"serve_vs_fastapi_rps_ratio={head:.2f} " if head else "serve_vs_fastapi_rps_ratio=nan ",
          end="")
    print(f"stream_chunks_vs_fastapi={chunks:.2f} " if chunks else "stream_chunks_vs_fastapi=nan ",
          end="")
    print(f"stream_first_chunk_vs_fastapi={first:.3f}" if first else "stream_first_chunk_vs_fastapi=nan")
    return 1 if failed or errors or not head else 0


if __name__ == "__main__":
    sys.exit(main())
