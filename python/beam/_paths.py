"""Where things live on this machine: the worker binary, the checkpoint dir, CRIU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

class WorkerNotFound(FileNotFoundError):
    """The ``beam-worker`` binary is not where it should be."""


def _package_binary() -> Path:
    return Path(__file__).resolve().parent / "bin" / "beam-worker"


def worker_binary() -> str:
    """Path of the ``beam-worker`` executable.

    ``$BEAM_WORKER_BINARY`` if set; else ``<package dir>/bin/beam-worker`` (where
    ``pip install .`` puts it); else, for editable installs, ``<sys.prefix>/bin/beam-worker``.
    """
    env = os.environ.get("BEAM_WORKER_BINARY")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise WorkerNotFound(f"$BEAM_WORKER_BINARY={env} is not an executable file")
        return env
    candidates = [_package_binary(), Path(sys.prefix) / "bin" / "beam-worker"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise WorkerNotFound(
        f"beam-worker binary not found (looked at {candidates[0]}); "
        "reinstall with `pip install .` from the beam source tree, "
        "or set $BEAM_WORKER_BINARY to a built binary")


def default_checkpoint_dir() -> str:
    """``$BEAM_CHECKPOINT_DIR``, else ``$XDG_CACHE_HOME/beam/checkpoints``, else
    ``~/.cache/beam/checkpoints``."""
    env = os.environ.get("BEAM_CHECKPOINT_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")  # same rules as beam-worker's own default
    if xdg:
        base = Path(xdg)
    else:
        base = Path(os.environ.get("HOME") or "/tmp") / ".cache"
    return os.path.abspath(base / "beam" / "checkpoints")


def find_criu() -> Tuple[Optional[str], str]:
    """``(path, why)``: the criu binary beam-worker would use, asked of it
    (``beam-worker --print-criu``: the search is written once, in C); path is None when
    there is none or the worker cannot say, and why says so."""
    try:
        p = subprocess.run([worker_binary(), "--print-criu"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired, WorkerNotFound) as exc:
        return None, f"cannot ask beam-worker: {exc}"
    if p.returncode != 0:
        return None, p.stderr.strip() or f"beam-worker --print-criu exit {p.returncode}"
    return p.stdout.strip(), ""
