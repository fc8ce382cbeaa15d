"""Shared fixtures: run the real beam-worker binary against apps in tests/apps/."""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from usercli import ServeProcess

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def worker_binary() -> str:
    env = os.environ.get("BEAM_WORKER_BINARY")
    if env:
        return env
    try:
        from beam._paths import worker_binary as installed
        return installed()
    except Exception:
        return str(ROOT / "build" / "beam-worker")


class Worker(ServeProcess):
    """One running beam-worker (supervisor + host), its log and its addresses."""

    def __init__(self, app: str, args: List[str], env: Dict[str, str], tmp: Path,
                 wait_ready: bool = True, timeout: float = 90.0) -> None:
        self.tmp = tmp
        self.cmd = [worker_binary(), "--python", sys.executable, *args, app]
        self.addresses: List[str] = []
        super().__init__(self.cmd, env, tmp, tmp / f"worker-{time.monotonic_ns()}.log")
        if wait_ready:
            self.wait_for("ready:", timeout)

    def wait_for(self, text: str, timeout: float = 60.0, count: int = 1) -> str:
        try:
            return super().wait_for(text, timeout, count)
        finally:
            self.addresses = re.findall(r"listening on (\S+)", self.log())

    @property
    def unix(self) -> str:
        return next(a for a in self.addresses if a.startswith("unix://"))

    @property
    def tcp(self) -> str:
        return next(a for a in self.addresses if a.startswith("tcp://"))

    def client(self, address: Optional[str] = None, timeout: float = 30.0):
        from beam.client import Client
        return Client(address or self.addresses[0], timeout=timeout)


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="beam-test-") as d:
        yield Path(d)


@pytest.fixture
def start_worker(workdir):
    """start_worker(app, *args, env={}, wait_ready=True) -> Worker; all are stopped after.

    The app sees only the worker's allow-listed environment plus what it declares. The
    variables a test puts in ``env`` to steer its app are passed explicitly with
    ``--pass-env``, as an operator would; those named ``*SECRET*`` are not: the apps
    declare them in ``secrets=``, which is what those tests check."""
    started: List[Worker] = []

    def start(app: str, *args: str, env: Optional[Dict[str, str]] = None,
              wait_ready: bool = True, timeout: float = 90.0) -> Worker:
        passed = [f"--pass-env={k}" for k in sorted(env or {}) if "SECRET" not in k]
        args = (*passed, *args)
        full_env = dict(os.environ)
        full_env.setdefault("BEAM_VOLUME_ROOT", str(workdir / "volumes"))
        full_env.setdefault("BEAM_CHECKPOINT_DIR", str(workdir / "checkpoints"))
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        if not app.startswith("/") and ".py:" in app:
            app = str(APPS / app)
        w = Worker(app, list(args), full_env, workdir, wait_ready, timeout)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


@pytest.fixture
def serve_cli(workdir):
    """serve_cli(app_path, exports, *flags, wrap=None, ready=True) -> usercli.Serve:
    `python -m beam serve` from bash with `exports` exported, as a user runs it."""
    from usercli import Serve
    started: List[Serve] = []

    def start(app: Path, exports: Dict[str, str], *flags: str, wrap=None, ready: bool = True):
        s = Serve(workdir, app, exports, *flags, wrap=wrap)
        started.append(s)
        if ready:
            s.wait_for("ready:")
        return s

    yield start
    for s in started:
        s.kill()
