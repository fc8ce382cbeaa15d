"""task_ring.py - the task ring keeps the supervisor's memory flat (issue 14).

Serves tests/apps/http_app.py:handler with `python -m beam serve --port 0`, makes N
calls over one keep-alive connection and prints the supervisor's RSS every N/10 calls.

    .venv/bin/python bench/task_ring.py [--calls 100000] [--task-history 1000]
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py would shadow the standard library's http package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import http.client  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-" + "ab" * 16


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--task-history", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="beam-ring-") as d:
        env = dict(os.environ, BEAM_AUTH_TOKEN=TOKEN, BEAM_CHECKPOINT_DIR=f"{d}/ck",
                   BEAM_VOLUME_ROOT=f"{d}/vol")
        log = open(f"{d}/log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "beam", "serve",
                              str(ROOT / "tests/apps/http_app.py:handler"), "--port", "0",
                              "--workers", "1", "--keep-warm", "-1", "--no-checkpoint",
                              "--task-history", str(a.task_history)],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            port = None
            for _ in range(600):
                text = Path(f"{d}/log").read_text(errors="replace")
                m = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", text)
                if m and "ready:" in text:
                    port = int(m.group(1))
                    break
                time.sleep(0.05)
            assert port, Path(f"{d}/log").read_text()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            hdr = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            step = max(a.calls // 10, 1)
            t0 = time.monotonic()
            print(f"task-history {a.task_history}; supervisor RSS (KiB) by calls made:")
            print(f"{0:>8} {rss_kib(p.pid):>8}")
            for i in range(1, a.calls + 1):
                c.request("POST", "/", body=b'{"op":"echo","value":1}', headers=hdr)
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise SystemExit(f"call {i}: HTTP {r.status}")
                if i % step == 0:
                    print(f"{i:>8} {rss_kib(p.pid):>8}")
            dt = time.monotonic() - t0
            c.request("GET", "/tasks?limit=0", headers=hdr)
            print(c.getresponse().read().decode())
            print(f"{a.calls} calls in {dt:.1f}s ({a.calls / dt:.0f}/s)")
        finally:
            p.terminate()
            p.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
