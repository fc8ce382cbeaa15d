"""``beam.env.is_remote()``: is this code running inside a beam worker?

As in Beam's SDK, apps use it to skip work meant only for the container (loading a
model at import time) when the file is run or imported locally, e.g. ``python app.py``.
The worker's host sets the flag (``beam._runtime.load``) before it imports the app, so
module-level code sees it too; processes the worker forks inherit it, a fresh
interpreter started from the handler (subprocess) does not.
"""
from __future__ import annotations

_remote = False


def is_remote() -> bool:
    """True inside a running beam worker (at app import, in on_start and in handlers)."""
    return _remote


def _mark_remote() -> None:
    global _remote
    _remote = True
