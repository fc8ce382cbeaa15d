"""A real ``python -m beam serve APP --port 0`` with a bearer token, for the
observability tests (tests/test_observe.py, tests/test_dashboard.py): its log, its port
(read from the log) and small HTTP helpers."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from conftest import APPS

TOKEN = "obs-" + "7a" * 20


class Served:
    def __init__(self, workdir: Path, app: str, *args: str, token: Optional[str] = TOKEN,
                 env: Optional[Dict[str, str]] = None, tag: str = "serve") -> None:
        self.token = token
        self.log_path = workdir / f"{tag}.log"
        e = dict(os.environ)
        e.pop("PYTHONUNBUFFERED", None)
        e["BEAM_AUTH_TOKEN"] = token or ""
        e.setdefault("BEAM_CHECKPOINT_DIR", str(workdir / "checkpoints"))
        e.setdefault("BEAM_VOLUME_ROOT", str(workdir / "volumes"))
        e.update(env or {})
        cmd = [sys.executable, "-m", "beam", "serve", str(APPS / app), "--port", "0", *args]
        if token is None:
            cmd.append("--no-auth")
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=e,
                                         cwd=str(workdir), start_new_session=True)
        m = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", self.wait_for("ready:"))
        assert m, self.log()
        self.port = int(m.group(1))
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 90.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if log.count(text) >= count:
                return log
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}) before {text!r}:\n{log}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {text!r}:\n{self.log()}")

    def request(self, method: str, path: str = "/", body=None, auth: bool = True,
                headers: Optional[Dict[str, str]] = None,
                timeout: float = 30.0) -> Tuple[int, Dict[str, str], bytes]:
        h = dict(headers or {})
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        if data:
            h["Content-Type"] = "application/json"
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def call(self, **kwargs) -> Tuple[int, Dict[str, str], object]:
        status, h, body = self.request("POST", "/", kwargs)
        return status, h, json.loads(body)

    def get_json(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def metrics(self) -> str:
        status, h, body = self.request("GET", "/metrics")
        assert status == 200 and h["content-type"].startswith("text/plain"), (status, h)
        return body.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)


def wait_until(pred, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def sample(metrics: str, name: str, labels: str = "") -> float:
    """The value of one series of the exposition text (labels as written, e.g.
    'status="ok"'); 0 when absent."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in metrics.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
