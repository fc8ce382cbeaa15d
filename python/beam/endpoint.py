"""The ``@endpoint`` decorator and the types it takes (``Image``, ``Volume``).

Names and defaults mirror Beam's SDK (beta9's ``Endpoint``) so existing apps import and run
unchanged. Locally, only the options that make sense on one machine have an effect (see
``docs/sdk.md``); the rest are accepted, recorded, and named once by ``beam serve`` ("not
used by the local worker: ..."), so nothing a user wrote is silently dropped, and a typo
is still a ``TypeError``.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import sys
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Generic, List, Optional, Sequence,
                    TypeVar, Union, overload)

if sys.version_info >= (3, 10):
    from typing import ParamSpec

    P = ParamSpec("P")
elif TYPE_CHECKING:
    from typing_extensions import ParamSpec

    P = ParamSpec("P")
else:  # 3.9 at run time: annotations are strings (never evaluated), Generic needs a TypeVar
    P = TypeVar("P")
R = TypeVar("R")


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
    callback_url: Optional[str] = None
    # Beam options with no local meaning: kept as given, for the manifest and the note.
    app: str = ""
    gpu_count: int = 0
    on_deploy: Any = None
    autoscaler: Any = None
    task_policy: Any = None
    retries: Any = None
    pricing: Any = None
    inputs: Any = None
    outputs: Any = None
    block_network: bool = False
    docker_enabled: bool = False

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
        if self.callback_url is not None and not isinstance(self.callback_url, str):
            raise TypeError("callback_url must be a str")


OPTIONS: FrozenSet[str] = frozenset(EndpointConfig.__dataclass_fields__)

#: Accepted for Beam compatibility and recorded, but nothing on one machine acts on them:
#: resources are the machine's, the image is the current venv, there is no autoscaler,
#: no retries of crashed tasks, no network policy and no callback (``callback_url``
#: only shows up as ``context.callback_url``). ``beam serve`` names the ones an app sets.
NOT_USED_LOCALLY: FrozenSet[str] = frozenset({
    "app", "cpu", "memory", "gpu_count", "image", "concurrent_requests", "callback_url",
    "on_deploy", "autoscaler", "task_policy", "retries", "pricing", "inputs", "outputs",
    "block_network", "docker_enabled",
})


class Endpoint(Generic[P, R]):
    """A function decorated with ``@endpoint``. Calling it calls the function."""

    def __init__(self, func: Callable[P, R], config: EndpointConfig,
                 options_set: Sequence[str] = ()) -> None:
        if not callable(func):
            raise TypeError("@endpoint must decorate a function")
        config.validate()
        #: What the worker calls: the function itself, or for ``async def`` a plain
        #: function that runs the coroutine to completion on the worker's loop.
        self.func: Callable[..., Any] = func
        if inspect.iscoroutinefunction(func):
            from . import _aio

            self.func = _aio.sync_runner(func)
        #: ``async def`` (a coroutine or an async generator): the worker runs up to
        #: ``concurrent_requests`` calls of it interleaved on its loop (beam/_aio.py
        #: Driver), calling ``func`` as written.
        self.is_async = inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)
        self.config = config
        if config.name is None:
            config.name = func.__name__
        #: The options the app set that the local worker does not act on (sorted).
        unused = set(options_set) & NOT_USED_LOCALLY
        if self.is_async:  # interleaved calls on the worker's loop
            unused.discard("concurrent_requests")
        self.unused_options: List[str] = sorted(unused)
        params = inspect.signature(func).parameters
        #: Beam passes ``context`` only to handlers that declare a parameter so named.
        self.wants_context = "context" in params
        self.__wrapped__: Callable[P, R] = func
        functools.update_wrapper(self, func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)  # an async def gives its coroutine, as usual

    def __repr__(self) -> str:
        return f"<beam.endpoint {self.config.name!r} of {self.func!r}>"


def _check_options(options: Dict[str, Any]) -> None:
    unknown = sorted(set(options) - OPTIONS)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(OPTIONS), n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise TypeError(f"@endpoint got unknown option(s): {', '.join(hints)}")


# The overloads are for type checkers: keyword-only options with Beam's names, and the
# decorated function keeps its signature (ParamSpec). At run time the implementation
# takes **options so that a typo gets a "did you mean" instead of Python's plain error.
@overload
def endpoint(func: Callable[P, R], /) -> Endpoint[P, R]: ...


@overload
def endpoint(
    *,
    app: str = "",
    cpu: Union[int, float, str] = 1.0,
    memory: Union[int, str] = "1Gi",
    gpu: Union[str, List[str]] = "",
    gpu_count: int = 0,
    image: Optional[Image] = None,
    timeout: float = 180.0,
    workers: int = 1,
    concurrent_requests: int = 1,
    keep_warm_seconds: int = 180,
    max_pending_tasks: int = 100,
    on_start: Optional[Callable[[], Any]] = None,
    on_deploy: Any = None,
    volumes: Optional[Sequence[Volume]] = None,
    secrets: Optional[Sequence[str]] = None,
    env: Optional[Dict[str, str]] = None,
    name: Optional[str] = None,
    authorized: bool = True,
    autoscaler: Any = None,
    callback_url: Optional[str] = None,
    task_policy: Any = None,
    retries: Any = None,
    checkpoint_enabled: bool = False,
    pricing: Any = None,
    inputs: Any = None,
    outputs: Any = None,
    block_network: bool = False,
    docker_enabled: bool = False,
) -> Callable[[Callable[P, R]], Endpoint[P, R]]: ...


def endpoint(func: Optional[Callable[..., Any]] = None, /, **options: Any) -> Any:
    """Declare a function as a served endpoint.

    Use as ``@endpoint`` or ``@endpoint(on_start=load, checkpoint_enabled=True, ...)``.
    Every option of Beam's ``@endpoint`` is accepted; an unknown one raises ``TypeError``
    (with the closest known name) so typos do not pass silently.
    """
    _check_options(options)
    given = list(options)
    options["volumes"] = list(options.get("volumes") or [])
    options["secrets"] = list(options.get("secrets") or [])
    options["env"] = dict(options.get("env") or {})

    def wrap(f: Callable[..., Any]) -> Endpoint[Any, Any]:
        return Endpoint(f, EndpointConfig(**options), given)

    return wrap(func) if func is not None else wrap
