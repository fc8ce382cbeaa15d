#!/usr/bin/env python3
"""Cold start vs restore, side by side in one run (issues 3 and 11).

For each reference app in examples/ — hello (no imports), ml (numpy/scipy/scikit-learn/
pandas with a model trained in on_start), weights (~500 MB held in memory), weights_2g
(the same app with 2 GB), weights_mmap (the ~500 MB memory-mapped from the Volume's
file, so not in the image) and opt125m (an OPT-125m-shaped model, only when torch and
transformers are importable) — measure:

  fresh       beam-worker started without a checkpoint, to its first response
  dump        time CRIU took to write the image, and the image size
  eager       beam-worker started with the image (--restore eager), to its first
              response (page cache warm, and after dropping the page cache)
  lazy        the same with --restore lazy: served while CRIU's page daemon fills
              memory in (csrc/lazy.c); page cache warm; after one untimed lazy restore
              that recorded the image's working set (csrc/workingset.c)
  ready       the supervisor's time from starting the replica to its being ready
              (its `start profile: ... ready=` line), per restore mode
  resident    the restored host's anonymous memory at its first response: all of the
              image for an eager restore, what was needed (plus what the page daemon
              had copied by then) for a lazy one
and the machine's bars for as many bytes as the image holds, in the same run:
  pop4k       mmap(MAP_POPULATE) of anonymous memory (4 KiB pages)
  pophuge     the same with MADV_HUGEPAGE, populated with MADV_POPULATE_WRITE
  memcpy      copying between two resident buffers
and the eager restore's rate (image bytes / CRIU's restore time) against them. On a VM
whose balloon reports free 2 MiB blocks to the hypervisor (this one: a line says so) a
huge page taken from a reported block is 20-50x slower to fill, and which blocks a run
draws depends on what was freed how recently: eager rows and bars vary with it.

Times are wall clock from spawning beam-worker to the first answered request, measured
by this script with the same client for every row. Medians of --repeat runs.
The last line is `coldstart_restore_vs_fresh=<best restore / fresh, ml>
weights_restore_vs_fresh=<best restore / fresh, weights> ready_2g_ms=<best time to
ready, weights_2g> eager_vs_hugepage_populate=<eager restore rate / huge-page populate
rate, the largest image>`.

    python bench/coldstart.py [--quick] [--repeat 5] [--apps hello,ml,weights] [--json out.json]
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
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

# name: (app, kwargs, environment). The apps read WEIGHTS_MB at import.
APPS = {
    "hello": ("examples/hello/app.py:predict", {"name": "bench"}, {}),
    "ml": ("examples/ml/app.py:predict", {"features": [[0.1, 0.2, 0.3, 0.4]]}, {}),
    "weights": ("examples/weights/app.py:predict", {"index": 12345}, {"WEIGHTS_MB": "500"}),
    "weights_2g": ("examples/weights/app.py:predict", {"index": 12345}, {"WEIGHTS_MB": "2048"}),
    "weights_mmap": ("examples/weights_mmap/app.py:predict", {"index": 12345},
                     {"WEIGHTS_MB": "500"}),
    "opt125m": ("examples/opt125m/app.py:predict", {"new_tokens": 4}, {}),
}
QUICK_APPS = "ml,weights,weights_2g,opt125m"


def importable(name: str) -> bool:
    app = APPS[name][0]
    needs = ("torch", "transformers") if "opt125m" in app else ()
    return all(importlib.util.find_spec(m) is not None for m in needs)


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
        self.resident = host_anon_bytes(self.proc.pid)

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

    def profile(self, key: str) -> float | None:
        """A figure of the supervisor's `start profile:` line (ready=12.3ms -> 12.3)."""
        if not self.says("start profile:"):
            return None
        line = next(l for l in self.text().splitlines() if "start profile:" in l)
        for word in line.split():
            if word.startswith(key + "="):
                return float(word[len(key) + 1:].rstrip("ms"))
        return None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def status_field(pid: int, field: str) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def host_anon_bytes(supervisor: int) -> int:
    """RssAnon of the host: the supervisor's child that is PID 1 of its own namespace."""
    for c in children(supervisor):
        if status_field(c, "NSpid").split()[-1:] == ["1"]:
            return int(status_field(c, "RssAnon").split()[0] or 0) * 1024
    return 0


MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module has no name for it


def populate_seconds(nbytes: int, huge: bool = False) -> float:
    """Time to make nbytes of fresh anonymous memory resident: MAP_POPULATE (4 KiB pages
    under THP `madvise`), or MADV_HUGEPAGE then MADV_POPULATE_WRITE (2 MiB pages)."""
    nbytes = max(nbytes, mmap.PAGESIZE)
    t0 = time.perf_counter()
    if huge:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        m.madvise(MADV_POPULATE_WRITE)
    else:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    dt = time.perf_counter() - t0
    m.close()
    return dt


def page_reporting() -> str:
    """"order N" when this machine's balloon driver reports free memory to the hypervisor
    (free page reporting: blocks of 2^N pages, a while after they are freed); else ""."""
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    try:
        balloon = Path("/sys/bus/virtio/drivers/virtio_balloon").exists()
        return f"order {order.read_text().strip()}" if balloon else ""
    except OSError:
        return ""


def memcpy_seconds(nbytes: int) -> float:
    """Time to copy nbytes between two resident buffers (capped at 512 MiB, scaled)."""
    n = min(max(nbytes, mmap.PAGESIZE), 512 << 20)
    a, b = bytearray(n), bytearray(n)
    a[::4096] = b"\1" * len(a[::4096])  # resident, not the shared zero page
    b[::4096] = b"\1" * len(b[::4096])
    src = (ctypes.c_char * n).from_buffer(a)
    dst = (ctypes.c_char * n).from_buffer(b)
    t0 = time.perf_counter()
    ctypes.memmove(dst, src, n)
    dt = time.perf_counter() - t0
    del src, dst
    return dt * nbytes / n


def manifest(ckdir: Path, key: str) -> dict:
    return json.loads((ckdir / key / "manifest.json").read_text())


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_app(name: str, binary: str, repeat: int, tmp: Path, env: dict, cold_runs: bool) -> dict:
    app, kwargs, app_env = APPS[name]
    env = dict(env, **app_env)
    ckdir = tmp / "checkpoints"
    key = f"bench-{name}"
    shutil.rmtree(ckdir / key, ignore_errors=True)
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

    # The first lazy restore of an image records its working set (csrc/workingset.c), as
    # the first restore after each checkpoint does in production: untimed.
    r = Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", key, "--restore", "lazy"], env)
    recorded = r.says("working set recorded", timeout=120)
    r.stop()
    if not recorded:
        raise RuntimeError(f"{name}: the first lazy restore recorded no working set:\n{r.text()}")
    t = {mode: {"first": [], "ready": [], "criu": [], "resident": []} for mode in ("eager", "lazy")}
    for i in range(repeat):
        for mode in ("eager", "lazy"):
            r = Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", key, "--restore", mode],
                    env)
            if not r.says(f"restore={mode}"):
                r.stop()  # else it outlives the benchmark
                raise RuntimeError(f"{name}: expected a {mode} restore:\n{r.text()}")
            t[mode]["first"].append(r.seconds)
            t[mode]["ready"].append(r.profile("ready"))
            t[mode]["criu"].append(r.profile("criu_restore"))
            t[mode]["resident"].append(r.resident)
            r.stop()
    cold = []
    for i in range(repeat if cold_runs and drop_caches() else 0):
        drop_caches()
        r = Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", key, "--restore", "eager"],
                env)
        cold.append(r.seconds)
        r.stop()
    shutil.rmtree(ckdir / key, ignore_errors=True)  # a 2 GB image must not outlive its row
    mib = image_bytes / 2**20
    bars = {"pop4k_s": med([populate_seconds(image_bytes) for _ in range(3)]),
            "pophuge_s": med([populate_seconds(image_bytes, huge=True) for _ in range(3)]),
            "memcpy_s": med([memcpy_seconds(image_bytes) for _ in range(3)])}
    eager_criu_s = med(t["eager"]["criu"]) / 1000
    return {
        "app": name,
        "fresh_s": med(fresh),
        "restore_warm_s": med(t["eager"]["first"]),
        "lazy_warm_s": med(t["lazy"]["first"]),
        "ready_eager_ms": med(t["eager"]["ready"]),
        "ready_lazy_ms": med(t["lazy"]["ready"]),
        "resident_eager_mib": med(t["eager"]["resident"]) / 2**20,
        "resident_lazy_mib": med(t["lazy"]["resident"]) / 2**20,
        "restore_cold_s": med(cold),
        "image_mib": mib,
        "dump_s": dump_ms / 1000,
        "eager_criu_s": eager_criu_s,
        **bars,
        "restore_gib_s": mib / 1024 / eager_criu_s,
        "pop4k_gib_s": mib / 1024 / bars["pop4k_s"],
        "pophuge_gib_s": mib / 1024 / bars["pophuge_s"],
        "memcpy_gib_s": mib / 1024 / bars["memcpy_s"],
        "fresh_all": fresh, "times": t, "cold_all": cold,
    }


def print_table(rows: list) -> None:
    fmt = ("{:<12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>7} {:>7}"
           " {:>7} {:>7} {:>7} {:>7}")
    print(fmt.format("app", "fresh ms", "eager ms", "lazy ms", "e.cold", "rdy.e ms", "rdy.l ms",
                     "res.e MB", "res.l MB", "img MiB", "dump s", "rst GB/s", "pop4k", "pophuge",
                     "memcpy", "eager/f", "lazy/f"))
    for r in rows:
        ms = lambda v: "n/a" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
        print(fmt.format(r["app"], ms(r["fresh_s"]), ms(r["restore_warm_s"]), ms(r["lazy_warm_s"]),
                         ms(r["restore_cold_s"]), f"{r['ready_eager_ms']:.0f}",
                         f"{r['ready_lazy_ms']:.0f}", f"{r['resident_eager_mib']:.0f}",
                         f"{r['resident_lazy_mib']:.0f}", f"{r['image_mib']:.0f}",
                         f"{r['dump_s']:.2f}", f"{r['restore_gib_s']:.2f}",
                         f"{r['pop4k_gib_s']:.2f}", f"{r['pophuge_gib_s']:.2f}",
                         f"{r['memcpy_gib_s']:.2f}",
                         f"{r['restore_warm_s'] / r['fresh_s']:.3f}",
                         f"{r['lazy_warm_s'] / r['fresh_s']:.3f}"))
    print("(GB/s are GiB/s: the eager restore = image / CRIU's restore time; the bars for as "
          "many bytes as the image)")


def last_line(rows: list) -> str:
    by = {r["app"]: r for r in rows}

    def best(app: str) -> str:
        r = by.get(app)
        return "n/a" if r is None else f"{min(r['restore_warm_s'], r['lazy_warm_s']) / r['fresh_s']:.4f}"
    big = by.get("weights_2g")
    ready = "n/a" if big is None else f"{min(big['ready_eager_ms'], big['ready_lazy_ms']):.1f}"
    largest = max(rows, key=lambda r: r["image_mib"], default=None)
    ratio = "n/a" if largest is None else f"{largest['restore_gib_s'] / largest['pophuge_gib_s']:.3f}"
    return (f"coldstart_restore_vs_fresh={best('ml')} weights_restore_vs_fresh={best('weights')} "
            f"ready_2g_ms={ready} eager_vs_hugepage_populate={ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"--repeat 3 --apps {QUICK_APPS}, no page-cache-dropped runs")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure (default 5)")
    ap.add_argument("--apps", default=None, help="default hello,ml,weights")
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    repeat = a.repeat or (3 if a.quick else 5)
    apps = (a.apps or (QUICK_APPS if a.quick else "hello,ml,weights")).split(",")
    if os.geteuid() != 0:
        print("coldstart: needs root (CRIU)", file=sys.stderr)
        return 2
    binary = worker_binary(a.build_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="beam-coldstart-") as d:
        tmp = Path(d)
        env["BEAM_VOLUME_ROOT"] = str(Path(os.environ.get("BEAM_BENCH_VOLUMES", tmp / "volumes")))
        for name in apps:
            if not importable(name):
                print(f"coldstart: skipping {name}: torch and transformers are not importable "
                      "(examples/opt125m/app.py says how to install them)", file=sys.stderr)
                continue
            rows.append(bench_app(name, binary, repeat, tmp, env, cold_runs=not a.quick))
    print_table(rows)
    reported = page_reporting()
    if reported:
        print(f"this VM reports free memory to its hypervisor in 2 MiB blocks ({reported}): a "
              "huge page taken from a reported block costs the host's faults, so eager "
              "restores and the pophuge bar vary 10-40x from run to run (docs/performance.md)")
    if a.json:
        Path(a.json).write_text(json.dumps({"apps": rows, "page_reporting": reported}, indent=2))
    print(last_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
