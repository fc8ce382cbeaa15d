"""The Python half of the host process. Called by ``csrc/host.c``, never by users.

The C host owns the process: it initialises the interpreter, runs the event loop, decodes
requests and encodes responses. It calls into this module only at boot, around the
checkpoint and after each start, where doing the work in Python is clearer than in C and
costs nothing per request.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import env, hooks
from .context import Context
from .endpoint import Endpoint
from .exceptions import TaskTimeout


def hook_timeout_s() -> float:
    """How long all hooks of one kind may run together before the start is failed
    (``$BEAM_HOOK_TIMEOUT``, read when used: a restored replica honours today's value)."""
    return float(os.environ.get("BEAM_HOOK_TIMEOUT", "30"))


class AppLoadError(Exception):
    """The app spec could not be imported or does not name an ``@endpoint`` function."""


_endpoint: Optional[Endpoint] = None
#: Names the host's environment had when it was exec'd (the supervisor's allow-list).
#: After a restore, those no longer set in the supervisor's environment are removed.
_inherited: frozenset = frozenset()


def load(spec: str) -> Tuple[Endpoint, str]:
    """Import ``path/to/app.py:func`` or ``package.module:func``; return the endpoint and
    the app's directory (which becomes the working directory)."""
    global _inherited
    _inherited = frozenset(os.environ)
    env._mark_remote()  # before the app's module-level code runs: it may ask
    module_part, sep, func_name = spec.rpartition(":")
    if not sep or not module_part or not func_name:
        raise AppLoadError(f"app must look like 'app.py:function' or 'pkg.module:function', got {spec!r}")
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            raise AppLoadError(f"app file not found: {path}")
        app_dir = str(path.parent)
        sys.path.insert(0, app_dir)
        os.chdir(app_dir)
        mod_name = path.stem
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise AppLoadError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        spec_obj.loader.exec_module(module)
    else:
        app_dir = os.getcwd()
        if app_dir not in sys.path:
            sys.path.insert(0, app_dir)
        module = importlib.import_module(module_part)
    obj = getattr(module, func_name, None)
    if obj is None:
        raise AppLoadError(f"{module_part} has no attribute {func_name!r}")
    if not isinstance(obj, Endpoint):
        raise AppLoadError(f"{module_part}:{func_name} is not decorated with @beam.endpoint")
    global _endpoint
    _endpoint = obj
    return obj, app_dir


def describe(ep: Endpoint) -> Dict[str, Any]:
    """The endpoint's configuration as plain data (sent to the supervisor, stored in the
    checkpoint manifest)."""
    c = ep.config
    return {
        "name": c.name,
        "timeout": float(c.timeout),
        "workers": c.workers,
        "concurrent_requests": c.concurrent_requests,
        "checkpoint_enabled": bool(c.checkpoint_enabled),
        "keep_warm_seconds": c.keep_warm_seconds,
        "max_pending_tasks": c.max_pending_tasks,
        "authorized": bool(c.authorized),
        "secrets": list(c.secrets),
        "env_keys": sorted(c.env),
        "volumes": [{"name": v.name, "mount_path": v.mount_path} for v in c.volumes],
        "gpu": str(c.gpu or ""),
        "cpu": str(c.cpu),
        "memory": str(c.memory),
        "wants_context": ep.wants_context,
        "is_async": ep.is_async,
        "has_on_start": c.on_start is not None,
        "unused_options": list(ep.unused_options),
    }


def prepare_volumes(ep: Endpoint, app_dir: str, volume_root: str) -> None:
    """Create each volume under ``volume_root`` and link ``mount_path`` to it."""
    for v in ep.config.volumes:
        target = Path(volume_root, v.name)
        target.mkdir(parents=True, exist_ok=True)
        mount = Path(v.mount_path)
        if not mount.is_absolute():
            mount = Path(app_dir, mount)
        if mount.is_symlink():
            if mount.resolve() == target.resolve():
                continue
            mount.unlink()
        elif mount.exists():
            if mount.resolve() == target.resolve():
                continue
            raise AppLoadError(f"volume {v.name!r}: {mount} exists and is not a link to {target}")
        mount.parent.mkdir(parents=True, exist_ok=True)
        mount.symlink_to(target, target_is_directory=True)


def apply_env(ep: Endpoint) -> None:
    """Put the endpoint's ``env={}`` into the environment before ``on_start``."""
    for k, v in ep.config.env.items():
        os.environ[k] = v


def run_on_start(ep: Endpoint) -> Any:
    fn = ep.config.on_start
    if fn is None:
        return None
    from . import _aio

    return _aio.run_on_start(fn())  # an async on_start is awaited here


def _run_bounded(fns: List[Callable[[], Any]], what: str) -> None:
    """Run hooks one by one; fail the start if together they exceed hook_timeout_s().

    Hooks run in the main thread (apps expect that); a hook that overruns is
    interrupted with SIGALRM, the same mechanism as request timeouts."""
    if not fns:
        return
    limit = hook_timeout_s()
    deadline = time.monotonic() + limit
    for fn in fns:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TaskTimeout(f"{what} hooks exceeded {limit:g}s")
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def before_checkpoint() -> None:
    """Run ``@beam.before_checkpoint`` hooks in reverse registration order."""
    _run_bounded(list(reversed(hooks.before_checkpoint_hooks)), "before_checkpoint")


def set_secrets(secrets: Dict[str, str]) -> None:
    """Before ``on_start`` of a cold boot: the declared secrets, from the supervisor
    (never from the exec'd environment, which would put them into the image)."""
    os.environ.update(secrets)


def after_start(restored: bool, environ: Dict[str, str], secrets: Dict[str, str]) -> None:
    """Called in every start, cold or restored, with the supervisor's environment as of
    this start (``environ``: its allowed variables) and the declared secrets' values.

    After a restore the process still has the environment of the image's cold boot: the
    inherited variables are brought to today's values (removed where unset today), then
    ``env={}`` from the decorator (removed before the dump like the secrets) and the
    secrets are put back, then the replica is made unique again."""
    if restored:
        for name in _inherited - environ.keys():
            os.environ.pop(name, None)
    os.environ.update(environ)
    if _endpoint is not None:
        apply_env(_endpoint)
    os.environ.update(secrets)
    if restored:
        reseed()
        _run_bounded(list(hooks.after_restore_hooks), "after_restore")


def configure_output() -> None:
    """Line-buffer stdout and stderr, as a terminal would: on a pipe Python would
    block-buffer them, and a handler's ``print()`` would appear late or never."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken by the app: nothing to keep
            pass


def worker_exit() -> None:
    """A worker stopping cleanly runs what the app registered with ``atexit`` (in each
    worker, as gunicorn's workers do) and flushes its output."""
    try:
        atexit._run_exitfuncs()
    finally:
        flush_output()


def reseed() -> None:
    """One image resumes many replicas: give each its own random streams."""
    random.seed(os.urandom(32))
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed(int.from_bytes(os.urandom(4), "little"))
        except Exception:  # numpy present but broken: not ours to fix here
            pass


def _on_alarm(signum: int, frame: Any) -> None:
    from . import _aio

    if _aio.alarm_in_step():  # interleaved async calls: only an overdue task times out
        return
    raise TaskTimeout("request exceeded the endpoint's timeout")


def install_alarm_handler() -> None:
    """Request timeouts: the C host arms ITIMER_REAL around each call; this turns the
    signal into an exception inside the handler (interrupting sleeps and waits too)."""
    signal.signal(signal.SIGALRM, _on_alarm)


def make_context_factory(ep: Endpoint, on_start_value: Any, container_id: str,
                         bind_address: str, worker: int) -> Callable[..., Context]:
    """Return ``f(task_id) -> Context`` with the per-replica fields bound once."""
    base = dict(
        on_start_value=on_start_value,
        container_id=container_id,
        timeout=ep.config.timeout,
        name=ep.config.name,
        python_version=f"python{sys.version_info[0]}.{sys.version_info[1]}",
        bind_address=bind_address,
        worker=worker,
        stub_id=ep.config.name,
        stub_type="endpoint",
        callback_url=ep.config.callback_url or "",
    )

    def factory(task_id: str) -> Context:
        return Context(task_id=task_id, **base)

    return factory


def _clean(text: str) -> str:
    """Strings go out as UTF-8: lone surrogates become escapes instead of failing."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_exception(exc: BaseException) -> Tuple[str, str, str]:
    """(type name, message, formatted traceback) for an error response. Never raises:
    an exception whose ``__str__`` fails is still reported, by its repr or type."""
    try:
        message = str(exc)
    except BaseException:  # noqa: B036 - a broken __str__ must not hide the error
        try:
            message = repr(exc)
        except BaseException:  # noqa: B036
            message = f"<{type(exc).__name__} with unprintable message>"
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: B036
        tb = f"{type(exc).__name__}: {message}\n"
    return _clean(type(exc).__name__), _clean(message), _clean(tb)
