"""The ``@endpoint`` decorator and the types it takes (``Image``, ``Volume``).

Names and defaults mirror Beam's SDK so existing apps run unchanged. Locally, only the
fields that make sense on one machine have an effect (see ``docs/sdk.md``); the rest are
recorded and reported so that nothing a user wrote is silently dropped.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Image:
    """Container image description. Recorded only: locally the current venv is the image."""

    python_version: str = "python3"
    python_packages: Sequence[str] = ()
    commands: Sequence[str] = ()
    base_image: Optional[str] = None


@dataclass(frozen=True)
class Volume:
    """A persistent directory, ``name``, exposed to the app at ``mount_path``.

    Locally a volume lives under the volume root (``--volume-root``, ``$BEAM_VOLUME_ROOT``,
    default ``~/.cache/beam/volumes``) and ``mount_path`` is linked to it. A relative
    ``mount_path`` is relative to the app's directory, which is also the app's working
    directory, so ``cache_dir="./weights"`` finds the volume.
    """

    name: str
    mount_path: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"Volume name must be a plain directory name, got {self.name!r}")
        if not self.mount_path:
            raise ValueError("Volume mount_path must not be empty")


@dataclass
class EndpointConfig:
    """Everything ``@endpoint`` accepts, validated."""

    on_start: Optional[Callable[[], Any]] = None
    checkpoint_enabled: bool = False
    keep_warm_seconds: int = 180
    workers: int = 1
    concurrent_requests: int = 1
    timeout: float = 180.0
    max_pending_tasks: int = 100
    volumes: List[Volume] = field(default_factory=list)
    secrets: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    name: Optional[str] = None
    authorized: bool = True
    cpu: Any = 1.0
    memory: Any = "1Gi"
    gpu: Any = ""
    image: Optional[Image] = None

    def validate(self) -> None:
        if self.on_start is not None and not callable(self.on_start):
            raise TypeError("on_start must be callable")
        for attr in ("workers", "concurrent_requests", "max_pending_tasks"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{attr} must be an int >= 1, got {value!r}")
        if not isinstance(self.keep_warm_seconds, int) or self.keep_warm_seconds < 0:
            raise ValueError("keep_warm_seconds must be an int >= 0")
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool):
            raise ValueError("timeout must be a number of seconds (<= 0 means no limit)")
        for v in self.volumes:
            if not isinstance(v, Volume):
                raise TypeError(f"volumes must hold beam.Volume objects, got {v!r}")
        if not all(isinstance(s, str) and s for s in self.secrets):
            raise TypeError("secrets must be a list of environment variable names")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise TypeError("env must map str to str")


class Endpoint:
    """A function decorated with ``@endpoint``. Calling it calls the function."""

    def __init__(self, func: Callable[..., Any], config: EndpointConfig) -> None:
        if not callable(func):
            raise TypeError("@endpoint must decorate a function")
        config.validate()
        self.func = func
        self.config = config
        if config.name is None:
            config.name = func.__name__
        params = inspect.signature(func).parameters
        #: Beam passes ``context`` only to handlers that declare a parameter so named.
        self.wants_context = "context" in params
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<beam.endpoint {self.config.name!r} of {self.func!r}>"


def endpoint(func: Optional[Callable[..., Any]] = None, **options: Any) -> Any:
    """Declare a function as a served endpoint.

    Use as ``@endpoint`` or ``@endpoint(on_start=load, checkpoint_enabled=True, ...)``.
    Unknown options raise ``TypeError`` so typos do not pass silently.
    """
    known = set(EndpointConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"@endpoint got unknown option(s): {', '.join(unknown)}")
    options["volumes"] = list(options.get("volumes") or [])
    options["secrets"] = list(options.get("secrets") or [])
    options["env"] = dict(options.get("env") or {})

    def wrap(f: Callable[..., Any]) -> Endpoint:
        return Endpoint(f, EndpointConfig(**options))

    return wrap(func) if func is not None else wrap
