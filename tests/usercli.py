"""`python -m beam serve` the way a user runs it: from bash, with the variables exported
by `export` lines, without PYTHONUNBUFFERED (some CI machines set it; forcing it hides
lost output), on a TCP port of its own. Shared by the end-to-end tests that go the
user's path."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from beam.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`python -m beam serve` run by bash with `export` lines, as a user's shell does."""

    def __init__(self, workdir: Path, app: Path, exports: Dict[str, str], *flags: str,
                 wrap: Optional[List[str]] = None) -> None:
        self.port = free_port()
        self.log_path = workdir / f"serve-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        env.update(BEAM_CHECKPOINT_DIR=str(workdir / "checkpoints"),
                   BEAM_VOLUME_ROOT=str(workdir / "volumes"))
        serve = [sys.executable, "-m", "beam", "serve", f"{app}:predict",
                 "--tcp", f"127.0.0.1:{self.port}", *flags]
        script = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        script += "exec " + " ".join(shlex.quote(a) for a in serve)
        # capsh ... -- ARGS runs bash ARGS: the wrapper ends where bash's arguments start.
        cmd = [*wrap, "-c", script] if wrap else ["bash", "-c", script]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(workdir), start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}) before {text!r}:\n{log}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {text!r}:\n{self.log()}")

    def call(self, **kwargs):
        with Client(f"tcp://127.0.0.1:{self.port}", timeout=30) as c:
            return c.call(**kwargs)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode
