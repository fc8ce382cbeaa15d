"""Checkpoint lifecycle hooks: ``@beam.before_checkpoint`` and ``@beam.after_restore``.

``before_checkpoint`` hooks run once, after ``on_start`` and before the image is taken,
in reverse registration order (last registered, first run — like ``atexit``).
``after_restore`` hooks run in each replica restored from the image, in registration
order. Both are bounded in time (``$BEAM_HOOK_TIMEOUT``, default 30 s).
"""
from __future__ import annotations

from typing import Any, Callable, List

before_checkpoint_hooks: List[Callable[[], Any]] = []
after_restore_hooks: List[Callable[[], Any]] = []


def before_checkpoint(fn: Callable[[], Any]) -> Callable[[], Any]:
    before_checkpoint_hooks.append(fn)
    return fn


def after_restore(fn: Callable[[], Any]) -> Callable[[], Any]:
    after_restore_hooks.append(fn)
    return fn
