#!/usr/bin/env python3
"""Benchmark beam-worker's HTTP front: throughput against uvicorn + FastAPI, and the
time to answer a call from zero replicas (checkpoint restore) against a cold boot.

1. HTTP req/s and latency: ``beam-worker --port P --no-auth bench/apps/noop.py:predict``
   and uvicorn serving the same no-op handler with FastAPI (bench/apps/noop_fastapi.py),
   driven by the same client (``beam-loadgen --proto http``: keep-alive ``POST /`` with
   ``{}``), same connections, pipeline depth, warm-up and duration, in the same run.
2. Scale from zero vs cold, for the import-heavy examples/ml/app.py:
   * zero: a worker with ``--checkpoint-key`` and ``--keep-warm 1`` boots cold once
     (and writes the checkpoint); after each "idle for ...: stopping it" and /stats
     showing no replica, the time from sending a call to its response (the call
     restores a replica);
   * cold: ``--no-checkpoint``, the time from starting beam-worker to the first
     successful HTTP call.
   Medians of --runs runs. Needs root (CRIU); without it that part is skipped.

The last line is
``http_vs_fastapi_rps_ratio=<beam / fastapi (def) req/s>
http_vs_fastapi_async_ratio=<beam / fastapi (async def) req/s>
scale_from_zero_vs_cold=<zero / cold>`` on one line (nan where a part was skipped; below
1 the restore from zero answers sooner than a cold boot). Both servers speak HTTP/1.1 to
the same client; each ratio compares beam's HTTP front with one FastAPI flavour. The
table's "cpu us/req" is each server's own CPU (its whole process tree) per request, and
the line above the last compares it: req/s moves with whatever else runs on the cores,
CPU per request hardly does.

    PYTHONPATH=$PWD/python .venv/bin/python bench/http.py --quick     # ~60 s

Exit status: 0 when every run completed without errors, 1 when a run saw errors or a
server failed, 2 on a setup problem (missing binary or package).
"""
from __future__ import annotations

import os
import sys

# This file is bench/http.py: run as a script, its directory comes first on sys.path and
# would shadow the standard library's http package. Import that first, then serve.py.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
import http.client  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

sys.path.append(_HERE)
import serve as S  # noqa: E402  (bench/serve.py: loadgen, uvicorn and process helpers)

REPO = S.REPO
NOOP_APP = os.path.join(REPO, "bench", "apps", "noop.py") + ":predict"
ML_APP = os.path.join(REPO, "examples", "ml", "app.py") + ":predict"
ML_CALL = {"features": [[0.1, 0.2, 0.3, 0.4]]}


# ---- beam-worker with an HTTP port -------------------------------------------------------


class Beam:
    """A beam-worker serving HTTP; its stderr is pumped, its port parsed from the log."""

    def __init__(self, args, app: str, extra: List[str], cpus=None, wait_ready: bool = True,
                 port: int = 0, timeout: float = 180.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [os.path.join(REPO, "python"), env.get("PYTHONPATH", "")] if p)
        env.pop("BEAM_AUTH_TOKEN", None)
        self.cmd = [args.worker, "--python", args.python, "--port", str(port), "--no-auth",
                    *extra, app]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, preexec_fn=S.affinity(cpus))
        self.log = S.LogPump(self.proc.stderr)
        self.port = port
        if wait_ready:
            self.wait_for("ready:", timeout)

    def count(self, text: str) -> int:
        with self.log.cond:
            return sum(text in line for line in self.log.lines)

    def wait_for(self, text: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        with self.log.cond:
            while True:
                seen = sum(text in line for line in self.log.lines)
                if not self.port:
                    for line in self.log.lines:
                        m = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", line)
                        if m:
                            self.port = int(m.group(1))
                if seen >= count:
                    return
                if self.log.closed or time.monotonic() > deadline:
                    raise S.BenchError(f"beam-worker: no {text!r} in its log:\n{self.log.tail()}")
                self.log.cond.wait(max(0.01, min(0.5, deadline - time.monotonic())))

    def stats(self) -> dict:
        status, _, body = post(self.port, None, method="GET", path="/stats")
        if status != 200:
            raise S.BenchError(f"GET /stats: {status} {body[:200]!r}")
        return json.loads(body)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise S.BenchError(f"beam-worker exited ({self.proc.returncode}):\n{self.log.tail()}")

    def stop(self) -> None:
        S.stop(self.proc, "beam-worker")


def post(port: int, body: Optional[dict], method: str = "POST", path: str = "/",
         timeout: float = 300.0) -> Tuple[int, Dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data,
                  headers={"Content-Type": "application/json"} if data is not None else {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


# ---- 1. throughput -----------------------------------------------------------------------


def run_beam_http(args, workers: int, server_cpus, client_cpus) -> Dict:
    b = Beam(args, NOOP_APP, ["--no-checkpoint", "--workers", str(workers)], server_cpus)
    try:
        res = S.loadgen(args, ["--tcp", f"127.0.0.1:{b.port}"], "http", client_cpus, b.proc.pid)
        b.alive()
        return dict(res, server="beam (HTTP front)", transport="http/tcp", workers=workers)
    finally:
        b.stop()


def run_floor(args, server_cpus, client_cpus) -> Dict:
    """beam-http-floor (bench/http_floor.c): a C responder that does nothing but read and
    write, on the same core and with the same client: the most any server gets here."""
    port = S.free_port()
    proc = subprocess.Popen([args.floor, str(port)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=S.affinity(server_cpus))
    try:
        try:
            S.wait_until(lambda: S.http_ready(port), proc, "beam-http-floor", 10)
        except S.BenchError as e:
            raise S.BenchError(f"{e}: {proc.stderr.read()!r}") from None
        res = S.loadgen(args, ["--tcp", f"127.0.0.1:{port}"], "http", client_cpus, proc.pid)
        return dict(res, server="floor (C, no work)", transport="http/tcp", workers=1)
    finally:
        S.stop(proc, "beam-http-floor")


# ---- 2. scale from zero vs cold ------------------------------------------------------------


def wait_zero(b: Beam, idle_seen: int, timeout: float = 60.0) -> None:
    """Until the replica was retired ("idle for" line number idle_seen) and /stats lists none."""
    b.wait_for("idle for", timeout, count=idle_seen)
    deadline = time.monotonic() + timeout
    while b.stats()["replicas"]:
        if time.monotonic() > deadline:
            raise S.BenchError(f"replicas did not go to zero:\n{b.log.tail()}")
        time.sleep(0.02)


def scale_from_zero(args) -> Dict:
    ckdir = tempfile.mkdtemp(prefix="beam-bench-ckpt-")
    key = "bench-http-" + uuid.uuid4().hex[:12]
    b = Beam(args, ML_APP, ["--checkpoint-dir", ckdir, "--checkpoint-key", key,
                            "--keep-warm", "1", "--workers", "1"])
    try:
        if not b.count("checkpoint written"):
            raise S.BenchError(f"the ml app was not checkpointed:\n{b.log.tail()}")
        times, waits, restore = [], [], []
        for i in range(args.runs):
            wait_zero(b, i + 1)
            t = time.perf_counter()
            status, h, body = post(b.port, ML_CALL)
            times.append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise S.BenchError(f"call from zero: {status} {body[:300]!r}")
            waits.append(float(h.get("x-beam-wait-ms", "nan")))
            reps = b.stats()["replicas"]
            if len(reps) != 1 or not reps[0]["restored"]:
                raise S.BenchError(f"the call from zero did not restore a replica: {reps}")
            restore.append(reps[0]["profile"].get("criu_restore_ms", float("nan")))
        return {"times_ms": times, "wait_ms": waits, "criu_restore_ms": restore}
    finally:
        b.stop()
        shutil.rmtree(ckdir, ignore_errors=True)


def cold_boot(args) -> Dict:
    times = []
    for _ in range(args.runs):
        port = S.free_port()
        b = Beam(args, ML_APP, ["--no-checkpoint", "--workers", "1"], wait_ready=False, port=port)
        try:
            while True:  # connect as soon as the port listens; the call waits for the boot
                try:
                    status, _, body = post(port, ML_CALL)
                    break
                except ConnectionRefusedError:
                    b.alive()
                    time.sleep(0.002)
            times.append((time.monotonic() - b.t0) * 1000)
            if status != 200:
                raise S.BenchError(f"first call after a cold boot: {status} {body[:300]!r}")
        finally:
            b.stop()
    return {"times_ms": times}


# ---- main -------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="beam-worker's HTTP front vs uvicorn+FastAPI, and scale from zero vs cold.",
        epilog="The last line is http_vs_fastapi_rps_ratio=<float> "
               "http_vs_fastapi_async_ratio=<float> scale_from_zero_vs_cold=<float>.")
    ap.add_argument("--quick", action="store_true",
                    help="3 s runs after 0.5 s warm-up, 3 starts each; about a minute")
    S.add_client_options(ap)
    ap.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    ap.add_argument("--runs", type=int, default=None,
                    help="starts per scale-from-zero / cold row (default 5; 3 with --quick)")
    ap.add_argument("--build-dir", default=os.path.join(REPO, "build"),
                    help="where beam-worker and beam-loadgen are (default build)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for the apps (needs msgpack; numpy, scipy, scikit-learn "
                         "and pandas for the ml app; default: this one)")
    ap.add_argument("--fastapi-python", default=None,
                    help="interpreter for uvicorn + FastAPI (default: --python)")
    ap.add_argument("--pin", choices=["auto", "on", "off"], default="auto",
                    help="pin the client to the last CPU and the servers to the others "
                         "(as bench/serve.py; default auto)")
    ap.add_argument("--no-async", action="store_true", help="skip the FastAPI `async def` row")
    ap.add_argument("--skip-throughput", action="store_true", help="only the scale-from-zero part")
    ap.add_argument("--skip-scale", action="store_true", help="only the throughput part")
    ap.add_argument("--json", metavar="OUT", help="also write all results to this JSON file")
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if min(args.connections, args.pipeline, args.threads, args.workers, args.runs) < 1:
        ap.error("--connections, --pipeline, --threads, --workers and --runs must be >= 1")

    build = os.path.abspath(args.build_dir)
    try:
        args.loadgen = S.find_tool(build, "beam-loadgen")
        args.worker = S.find_worker(build)
        args.floor = S.find_tool(build, "beam-http-floor")
        impl = None if args.skip_throughput else S.uvicorn_impl(args.fastapi_python or args.python)
    except S.SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows: List[Dict] = []
    scale: Dict[str, Dict] = {}
    failed = None
    note = ""
    try:
        if not args.skip_throughput:
            server_cpus, client_cpus = S.cpu_plan(args.workers, args.pin)
            pin = (f"servers on CPUs {sorted(server_cpus)}, client on {sorted(client_cpus)}"
                   if server_cpus else "unpinned")
            print(f"throughput: {pin}", file=sys.stderr)
            rows.append(run_beam_http(args, args.workers, server_cpus, client_cpus))
            if args.workers == 1:
                rows.append(run_floor(args, server_cpus, client_cpus))
            fa = SimpleNamespace(**vars(args))
            fa.python = args.fastapi_python or args.python
            for v in (["def"] if args.no_async else ["def", "async def"]):
                rows.append(S.run_fastapi(fa, args.workers, v, server_cpus, client_cpus))
        if not args.skip_scale:
            if os.geteuid() != 0:
                note = "scale from zero skipped: checkpoints need root (CRIU)"
                print(note, file=sys.stderr)
            else:
                print("scale from zero (examples/ml) ...", file=sys.stderr)
                scale["zero"] = scale_from_zero(args)
                print("cold boots (examples/ml) ...", file=sys.stderr)
                scale["cold"] = cold_boot(args)
    except S.BenchError as e:
        failed = str(e)
    except subprocess.TimeoutExpired as e:
        failed = f"timed out: {e}"

    if rows:
        print(f"no-op handler over HTTP; {args.connections} connections x pipeline "
              f"{args.pipeline}, {args.threads} client thread(s), {args.warmup:g}s warm-up + "
              f"{args.duration:g}s; {impl}")
        S.print_rows(rows)
    med: Dict[str, float] = {}
    if scale:
        print()
        print(f"examples/ml/app.py: call to response (median of {args.runs})")
        hdr = f"{'start':<34} {'median ms':>10}  runs ms"
        print(hdr)
        print("-" * len(hdr))
        labels = {"zero": "scale from zero (CRIU restore)", "cold": "cold boot (no checkpoint)"}
        for k in ("zero", "cold"):
            if k in scale:
                t = scale[k]["times_ms"]
                med[k] = statistics.median(t)
                print(f"{labels[k]:<34} {med[k]:>10.0f}  {' '.join(f'{x:.0f}' for x in t)}")
        if "zero" in scale:
            z = scale["zero"]
            print(f"  of which X-Beam-Wait-Ms (queued until the restored replica took it): median "
                  f"{statistics.median(z['wait_ms']):.0f} ms; criu restore median "
                  f"{statistics.median(z['criu_restore_ms']):.0f} ms")
    if note:
        print(note)

    def rps(server: str) -> Optional[float]:
        return next((r["rps"] for r in rows if r["server"] == server), None)

    beam, base = rps("beam (HTTP front)"), rps("fastapi (def)")
    ratio = beam / base if beam and base else float("nan")
    base_async = rps("fastapi (async def)")
    ratio_async = beam / base_async if beam and base_async else float("nan")
    zc = med["zero"] / med["cold"] if "zero" in med and "cold" in med else float("nan")
    cpu = {r["server"]: r.get("server_cpu_us") for r in rows}
    if cpu.get("beam (HTTP front)") and cpu.get("fastapi (async def)"):
        # The servers' own CPU per request: what req/s would say on an otherwise idle core.
        print(f"server CPU per request: beam {cpu['beam (HTTP front)']:.1f} us, fastapi (async "
              f"def) {cpu['fastapi (async def)']:.1f} us: "
              f"{cpu['fastapi (async def)'] / cpu['beam (HTTP front)']:.1f}x less for beam")
    floor, floor_cpu = rps("floor (C, no work)"), cpu.get("floor (C, no work)")
    if floor and base_async and floor_cpu and cpu.get("fastapi (async def)"):
        # What bounds the async ratio here: a server that did no work at all would reach this.
        print(f"floor: a server doing nothing gets {floor:.0f} req/s at {floor_cpu:.1f} us/req: "
              f"{floor / base_async:.1f}x fastapi (async def) by req/s, "
              f"{cpu['fastapi (async def)'] / floor_cpu:.1f}x by CPU; beam reaches "
              f"{beam / floor:.0%} of the floor's req/s")
    errors = sum(r["errors"] for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: getattr(args, k) for k in (
                "connections", "pipeline", "threads", "duration", "warmup", "workers", "runs",
                "python", "fastapi_python", "pin")},
                "uvicorn": impl, "runs": rows, "scale": scale,
                "ratios": {"http_vs_fastapi_rps_ratio": ratio,
                           "http_vs_fastapi_async_ratio": ratio_async,
                           "scale_from_zero_vs_cold": zc},
                "error": failed}, f, indent=2)
    if failed:
        print(f"error: {failed}", file=sys.stderr)
    if errors:
        print(f"error: {errors} request(s) failed", file=sys.stderr)
    sys.stdout.flush()
    # One line, so a script can take all three with a single `tail -1`.
    print(f"http_vs_fastapi_rps_ratio={ratio:.2f} http_vs_fastapi_async_ratio={ratio_async:.2f} "
          f"scale_from_zero_vs_cold={zc:.3f}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
