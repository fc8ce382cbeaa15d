#!/usr/bin/env python3
"""Cold start vs restore, side by side in one run (issue 3's benchmark).

For each reference app in examples/ — hello (no imports), ml (numpy/scipy/scikit-learn/
pandas with a model trained in on_start), weights (~500 MB held in memory) and weights_mmap
(the same ~500 MB memory-mapped from the Volume's file, so not in the image) — measure:

  fresh       beam-worker started without a checkpoint, to its first response
  dump        time CRIU took to write the image, and the image size
  eager       beam-worker started with the image (--restore eager), to its first
              response (page cache warm, and after dropping the page cache)
  lazy        the same with --restore lazy: served while CRIU's page daemon fills
              memory in (csrc/lazy.c); page cache warm
  populate    mmap(MAP_POPULATE) of as much anonymous memory as the image holds:
              the machine's own rate for making that memory resident, the physical bar

Times are wall clock from spawning beam-worker to the first answered request, measured
by this script with the same client for every row. Medians of --repeat runs.
The last line is `coldstart_restore_vs_fresh=<best restore / fresh, ml>
weights_restore_vs_fresh=<best restore / fresh, weights>`.

    python bench/coldstart.py [--repeat 5] [--apps hello,ml,weights] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from beam.client import Client  # noqa: E402

APPS = {
    "hello": ("examples/hello/app.py:predict", {"name": "bench"}),
    "ml": ("examples/ml/app.py:predict", {"features": [[0.1, 0.2, 0.3, 0.4]]}),
    "weights": ("examples/weights/app.py:predict", {"index": 12345}),
    "weights_mmap": ("examples/weights_mmap/app.py:predict", {"index": 12345}),
}


def worker_binary(build: str) -> str:
    env = os.environ.get("BEAM_WORKER_BINARY")
    if env:
        return env
    p = ROOT / build / "beam-worker"
    if p.exists():
        return str(p)
    from beam._paths import worker_binary as installed
    return installed()


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class Run:
    """One beam-worker process, timed from spawn to its first answered request."""

    def __init__(self, binary: str, app: str, kwargs: dict, tmp: Path, args: list[str],
                 env: dict) -> None:
        self.sock = tmp / f"s-{time.monotonic_ns()}.sock"
        self.log = tmp / f"log-{time.monotonic_ns()}.txt"
        cmd = [binary, "--python", sys.executable, "--socket", str(self.sock), *args,
               str(ROOT / app)]
        t0 = time.perf_counter()
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.result = self._first_response(kwargs, deadline=t0 + 300)
        self.seconds = time.perf_counter() - t0

    def _first_response(self, kwargs: dict, deadline: float):
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log.read_text()}")
            if self.sock.exists():
                try:
                    with Client(f"unix://{self.sock}", timeout=120) as c:
                        return c.call(**kwargs)
                except (ConnectionError, FileNotFoundError, OSError):
                    pass
            time.sleep(0.0005)
        raise RuntimeError(f"no response in time:\n{self.log.read_text()}")

    def text(self) -> str:
        return self.log.read_text()

    def says(self, what: str, timeout: float = 10) -> bool:
        """Whether the log has what, waiting for it: a small image can answer the first
        request before the supervisor has logged the start profile."""
        deadline = time.perf_counter() + timeout
        while what not in self.text() and time.perf_counter() < deadline:
            time.sleep(0.01)
        return what in self.text()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def populate_seconds(nbytes: int) -> float:
    """Time to make nbytes of fresh anonymous memory resident (MAP_POPULATE)."""
    nbytes = max(nbytes, mmap.PAGESIZE)
    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    dt = time.perf_counter() - t0
    m.close()
    return dt


def manifest(ckdir: Path, key: str) -> dict:
    return json.loads((ckdir / key / "manifest.json").read_text())


def bench_app(name: str, binary: str, repeat: int, tmp: Path, env: dict) -> dict:
    app, kwargs = APPS[name]
    ckdir = tmp / "checkpoints"
    key = f"bench-{name}"
    shutil.rmtree(ckdir / key, ignore_errors=True)
    # The apps read WEIGHTS_MB at import: the host sees only what is passed.
    base = ["--checkpoint-dir", str(ckdir), "--pass-env", "WEIGHTS_MB"]

    # Warm everything a fresh start reads (Python files, the weights cache) once.
    Run(binary, app, kwargs, tmp, base + ["--no-checkpoint"], env).stop()
    fresh = []
    for _ in range(repeat):
        r = Run(binary, app, kwargs, tmp, base + ["--no-checkpoint"], env)
        fresh.append(r.seconds)
        r.stop()

    r = Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", key], env)
    r.stop()
    m = manifest(ckdir, key)
    image_bytes, dump_ms = m["image_bytes"], m["dump_ms"]

    warm, lazy, cold = [], [], []
    for i in range(repeat):
        for mode, times in (("eager", warm), ("lazy", lazy)):
            r = Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", key, "--restore", mode],
                    env)
            if not r.says(f"restore={mode}"):
                r.stop()  # else it outlives the benchmark
                raise RuntimeError(f"{name}: expected a {mode} restore:\n{r.text()}")
            times.append(r.seconds)
            r.stop()
    dropped = drop_caches()
    for i in range(repeat if dropped else 0):
        drop_caches()
        r = Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", key, "--restore", "eager"],
                env)
        cold.append(r.seconds)
        r.stop()
    pop = statistics.median(populate_seconds(image_bytes) for _ in range(3))
    return {
        "app": name,
        "fresh_s": statistics.median(fresh),
        "restore_warm_s": statistics.median(warm),
        "lazy_warm_s": statistics.median(lazy),
        "restore_cold_s": statistics.median(cold) if cold else None,
        "image_mib": image_bytes / 2**20,
        "dump_s": dump_ms / 1000,
        "populate_s": pop,
        "restore_mib_s": image_bytes / 2**20 / statistics.median(warm),
        "populate_mib_s": image_bytes / 2**20 / pop,
        "fresh_all": fresh, "warm_all": warm, "lazy_all": lazy, "cold_all": cold,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--apps", default="hello,ml,weights")
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("coldstart: needs root (CRIU)", file=sys.stderr)
        return 2
    binary = worker_binary(a.build_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="beam-coldstart-") as d:
        tmp = Path(d)
        env["BEAM_VOLUME_ROOT"] = str(Path(os.environ.get("BEAM_BENCH_VOLUMES", tmp / "volumes")))
        for name in a.apps.split(","):
            rows.append(bench_app(name, binary, a.repeat, tmp, env))

    fmt = "{:<12} {:>9} {:>9} {:>8} {:>11} {:>9} {:>8} {:>9} {:>10} {:>10} {:>7} {:>7}"
    print(fmt.format("app", "fresh ms", "eager ms", "lazy ms", "e.cold ms", "image MiB",
                     "dump ms", "populate", "eagr MiB/s", "pop MiB/s", "eager/f", "lazy/f"))
    for r in rows:
        cold = f"{r['restore_cold_s'] * 1e3:.0f}" if r["restore_cold_s"] else "n/a"
        print(fmt.format(r["app"], f"{r['fresh_s'] * 1e3:.0f}", f"{r['restore_warm_s'] * 1e3:.0f}",
                         f"{r['lazy_warm_s'] * 1e3:.0f}",
                         cold, f"{r['image_mib']:.1f}", f"{r['dump_s'] * 1e3:.0f}",
                         f"{r['populate_s'] * 1e3:.0f}", f"{r['restore_mib_s']:.0f}",
                         f"{r['populate_mib_s']:.0f}",
                         f"{r['restore_warm_s'] / r['fresh_s']:.3f}",
                         f"{r['lazy_warm_s'] / r['fresh_s']:.3f}"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    def best(app: str) -> str:
        r = next((r for r in rows if r["app"] == app), None)
        return "n/a" if r is None else f"{min(r['restore_warm_s'], r['lazy_warm_s']) / r['fresh_s']:.4f}"
    print(f"coldstart_restore_vs_fresh={best('ml')} weights_restore_vs_fresh={best('weights')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
