"""`python -m beam serve` run as a child the way users run it, for the end-to-end tests
that go the user's path: without PYTHONUNBUFFERED (some CI machines set it; forcing it
hides lost output), its log read for what it says.

* ServeProcess: the process, its log, wait_for, stop, kill.
* Served: `... --port 0` (the port is read from the log: one picked here could be taken
  by a parallel run before serve binds it), with HTTP helpers.
* Serve: run by bash with `export` lines, as a user's shell does, on a TCP socket."""
from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from beam.client import Client

APPS = Path(__file__).resolve().parent / "apps"


def serve_env(workdir: Path, env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "BEAM_AUTH_TOKEN")}
    e.setdefault("BEAM_CHECKPOINT_DIR", str(workdir / "checkpoints"))
    e.setdefault("BEAM_VOLUME_ROOT", str(workdir / "volumes"))
    e.update(env or {})
    return e


class ServeProcess:
    def __init__(self, cmd: List[str], env: Dict[str, str], workdir: Path, log_path: Path,
                 stdout=None) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as f:
            # stdout: another destination for the stdout half (e.g. a pipe nobody reads)
            self.proc = subprocess.Popen(cmd, stdout=f if stdout is None else stdout,
                                         stderr=f, env=env, cwd=str(workdir),
                                         start_new_session=True)

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


class Served(ServeProcess):
    """`python -m beam serve APP --port 0`, with the bearer token exported (or --no-auth
    when token is None)."""

    def __init__(self, workdir: Path, app: str, *args: str, token: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, tag: str = "serve", stdout=None) -> None:
        self.token = token
        e = serve_env(workdir, env)
        if token:  # auth on, as a user who exports BEAM_AUTH_TOKEN serves
            e["BEAM_AUTH_TOKEN"] = token
        cmd = [sys.executable, "-m", "beam", "serve", str(APPS / app), "--port", "0",
               *([] if token else ["--no-auth"]), *args]
        super().__init__(cmd, e, workdir, workdir / f"{tag}.log", stdout)
        m = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", self.wait_for("ready:"))
        assert m, self.log()
        self.port = int(m.group(1))
        self.base = f"http://127.0.0.1:{self.port}"

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

    def get_json(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)


def serve_fixture(cls):
    """A fixture serve(app, *args, **kw) -> cls(workdir, app, ...); all killed after."""

    @pytest.fixture
    def serve(workdir):
        started: List = []

        def start(app: str, *args: str, **kw):
            s = cls(workdir, app, *args, **kw)
            started.append(s)
            return s

        yield start
        for s in started:
            s.kill()

    return serve


def wait_until(pred, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def app_copy(workdir: Path, name: str) -> Path:
    """tests/apps/NAME copied to WORKDIR/app/app.py: the app's directory is the user's
    own, as served (its checkpoint key hashes it; its Volumes link into it)."""
    path = workdir / "app" / "app.py"
    path.parent.mkdir()
    path.write_bytes((APPS / name).read_bytes())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve(ServeProcess):
    """`python -m beam serve` run by bash with `export` lines, as a user's shell does."""

    def __init__(self, workdir: Path, app: Path, exports: Dict[str, str], *flags: str,
                 wrap: Optional[List[str]] = None) -> None:
        self.port = free_port()
        serve = [sys.executable, "-m", "beam", "serve", f"{app}:predict",
                 "--tcp", f"127.0.0.1:{self.port}", *flags]
        script = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        script += "exec " + " ".join(shlex.quote(a) for a in serve)
        # capsh ... -- ARGS runs bash ARGS: the wrapper ends where bash's arguments start.
        cmd = [*wrap, "-c", script] if wrap else ["bash", "-c", script]
        super().__init__(cmd, serve_env(workdir), workdir,
                         workdir / f"serve-{time.monotonic_ns()}.log")

    def call(self, **kwargs):
        with Client(f"tcp://127.0.0.1:{self.port}", timeout=30) as c:
            return c.call(**kwargs)
