"""A real ``python -m beam serve APP --port 0`` with a bearer token, for the
observability tests (tests/test_observe.py, tests/test_dashboard.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

from usercli import Served as _Served
from usercli import serve_fixture, wait_until

__all__ = ["TOKEN", "Served", "sample", "serve_fixture", "wait_until"]

TOKEN = "obs-" + "7a" * 20


class Served(_Served):
    def __init__(self, workdir: Path, app: str, *args: str, token=TOKEN, **kw) -> None:
        super().__init__(workdir, app, *args, token=token, **kw)

    def call(self, **kwargs) -> Tuple[int, Dict[str, str], object]:
        status, h, body = self.request("POST", "/", kwargs)
        return status, h, json.loads(body)

    def metrics(self) -> str:
        status, h, body = self.request("GET", "/metrics")
        assert status == 200 and h["content-type"].startswith("text/plain"), (status, h)
        return body.decode()


def sample(metrics: str, name: str, labels: str = "") -> float:
    """The value of one series of the exposition text (labels as written, e.g.
    'status="ok"'); 0 when absent."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in metrics.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
