"""The ``context`` object handed to handlers that declare a ``context`` parameter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Context:
    """Per-request information, with Beam's field names.

    ``on_start_value`` is what ``on_start`` returned, computed once per container (and
    carried through checkpoints). ``task_id`` is unique per request. ``container_id`` is
    unique per replica: a replica restored from a checkpoint gets a new one.
    """

    on_start_value: Any
    task_id: str
    container_id: str
    timeout: float
    name: str
    python_version: str
    bind_address: str
    worker: int = 0
    stub_id: str = ""
    stub_type: str = "endpoint"
    callback_url: str = ""
