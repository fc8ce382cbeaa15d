"""beam: serve an ``@endpoint`` function from a checkpointed worker.

Importing ``beam`` is deliberately cheap: the worker host imports it at every boot, so
only the decorator, its types, the hooks and the exceptions are loaded here. The client
(which needs ``msgpack``) is imported on first use of ``beam.Client``.

``beam.TimeoutError`` shadows the builtin of that name only inside this namespace: it is
not in ``__all__``, so ``from beam import *`` leaves the builtin alone.
"""
from __future__ import annotations

from typing import Any, List

from . import env
from .context import Context
from .endpoint import Endpoint, Image, Volume, endpoint
from .exceptions import BeamError, ConnectionClosed, RemoteError, TaskTimeout, TimeoutError  # noqa: A004
from .hooks import after_restore, before_checkpoint

__version__ = "0.1.0"

__all__ = [
    "endpoint", "Endpoint", "Image", "Volume", "Context", "Client",
    "RemoteError", "ConnectionClosed", "BeamError", "TaskTimeout",
    "before_checkpoint", "after_restore", "env", "__version__",
]

_LAZY = {"Client": ("client", "Client"), "client": ("client", None)}


def __getattr__(name: str) -> Any:
    """Import the client (and msgpack) only when it is asked for."""
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'beam' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f".{target[0]}", __name__)
    value = module if target[1] is None else getattr(module, target[1])
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
