"""Where things live on this machine: the worker binary, the checkpoint dir, CRIU."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

#: Places ``find_criu`` looks, after ``$BEAM_CRIU``, before ``$PATH``.
CRIU_DEFAULT = "/usr/local/lib/beam/criu"


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


def criu_candidates() -> List[Tuple[str, Optional[str]]]:
    """``(where it came from, path or None)`` in search order."""
    return [
        ("$BEAM_CRIU", os.environ.get("BEAM_CRIU") or None),
        (CRIU_DEFAULT, CRIU_DEFAULT),
        ("$PATH", shutil.which("criu")),
    ]


def find_criu() -> Optional[str]:
    """First executable of ``$BEAM_CRIU``, ``/usr/local/lib/beam/criu``, ``criu`` on PATH."""
    for _, path in criu_candidates():
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None
