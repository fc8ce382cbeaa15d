"""The checkpoint key: one image per (code, config, interpreter, worker) combination.

A checkpoint may only be restored into the same program it was taken from, so the key
hashes everything that shapes the process image:

* the worker's version string and (when given) the worker binary's bytes;
* the interpreter: ``sys.version``, its path (a venv is a different program), and the
  names of the distributions in its site-packages (an upgraded numpy changes the key);
* this SDK's own sources;
* the app: its absolute directory (the restored process's working directory must exist at
  the same path), module and function name, and every ``*.py`` file under the app's
  directory, by relative path and content — so editing the app or its ``@endpoint(...)``
  arguments changes the key;
* ``extra``: the serve flags that change behaviour (``workers``, ...).

Hidden directories, ``__pycache__``, virtualenvs and ``site-packages`` are skipped, and at
most 2000 files / 50 MB are hashed (a warning says so when the cap is hit).
Nothing here imports the app: packages are located with ``importlib.util.find_spec``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

KEY_FORMAT = "1"
MAX_FILES = 2000
MAX_BYTES = 50 * 1024 * 1024
SKIP_DIRS = {"__pycache__", "venv", ".venv", "site-packages", "dist-packages", "node_modules"}
_SITE_DIR_NAMES = {"site-packages", "dist-packages"}


class AppSpecError(ValueError):
    """The app spec is malformed or names something that cannot be found."""


@dataclass
class AppLocation:
    spec: str
    kind: str                # "file" or "module"
    module: str              # file stem or dotted module name
    function: str
    app_dir: str             # the app's working directory
    roots: List[str] = field(default_factory=list)   # directories whose *.py are hashed
    files: List[str] = field(default_factory=list)   # single files hashed (no directory)


@dataclass
class KeyInfo:
    key: str
    location: AppLocation
    files_hashed: int
    bytes_hashed: int
    truncated: bool


def split_spec(app_spec: str) -> Tuple[str, str, bool]:
    """``(module part, function, is_file)``; same rules as ``beam._runtime.load``."""
    module_part, sep, func = app_spec.rpartition(":")
    if not sep or not module_part or not func:
        raise AppSpecError(f"app must look like 'app.py:function' or 'pkg.module:function', got {app_spec!r}")
    return module_part, func, module_part.endswith(".py") or os.sep in module_part


def locate_app(app_spec: str, cwd: Optional[str] = None) -> AppLocation:
    """Find the app's files without importing it."""
    cwd = os.path.abspath(cwd or os.getcwd())
    module_part, func, is_file = split_spec(app_spec)
    if is_file:
        path = Path(cwd, module_part).resolve()
        if not path.is_file():
            raise AppSpecError(f"app file not found: {path}")
        return AppLocation(app_spec, "file", path.stem, func, str(path.parent), roots=[str(path.parent)])
    top = module_part.split(".")[0]
    saved = list(sys.path)
    sys.path.insert(0, cwd)  # the worker puts its working directory first too
    try:
        spec = importlib.util.find_spec(top)  # top-level: locates, does not import
    except (ImportError, ValueError) as exc:
        raise AppSpecError(f"cannot locate module {top!r}: {exc}") from exc
    finally:
        sys.path[:] = saved
    if spec is None:
        raise AppSpecError(f"module {top!r} not found (searched {cwd} and sys.path)")
    loc = AppLocation(app_spec, "module", module_part, func, cwd)
    if spec.submodule_search_locations:
        loc.roots = [os.path.abspath(p) for p in spec.submodule_search_locations]
    elif spec.origin and os.path.isfile(spec.origin):
        parent = os.path.dirname(os.path.abspath(spec.origin))
        if os.path.basename(parent) in _SITE_DIR_NAMES or not spec.origin.endswith(".py"):
            loc.files = [os.path.abspath(spec.origin)]
        else:
            loc.roots = [parent]
    return loc


def _walk_py(root: str) -> Iterator[Tuple[str, str]]:
    """``(relative path, absolute path)`` of the *.py files under root, deterministic order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d not in SKIP_DIRS
            and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                yield os.path.relpath(full, root).replace(os.sep, "/"), full


def _interpreter_facts(python_executable: str) -> Tuple[str, List[str]]:
    """``(sys.version, site-packages dirs)`` of the target interpreter."""
    if os.path.abspath(python_executable) == os.path.abspath(sys.executable):
        dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
        if site.ENABLE_USER_SITE:
            dirs.append(site.getusersitepackages())
        return sys.version, dirs
    code = ("import json,site,sys;d=list(site.getsitepackages());"
            "d+= [site.getusersitepackages()] if site.ENABLE_USER_SITE else [];"
            "print(json.dumps([sys.version,d]))")
    out = subprocess.run([python_executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    version, dirs = json.loads(out)
    return version, dirs


def _distributions(site_dirs: List[str]) -> List[str]:
    names = []
    for d in site_dirs:
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        names += [f"{d}/{e}" for e in entries if e.endswith((".dist-info", ".egg-info", ".egg-link", ".pth"))]
    return sorted(names)


def compute_key_info(app_spec: str, python_executable: str, worker_version: str,
                     extra: Optional[Dict[str, Any]] = None, *,
                     worker_binary: Optional[str] = None, cwd: Optional[str] = None) -> KeyInfo:
    from . import __version__

    loc = locate_app(app_spec, cwd)
    h = hashlib.sha256()

    def put(label: str, data: Any) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "big") + data)

    put("format", KEY_FORMAT)
    put("beam", __version__)
    put("worker_version", worker_version)
    if worker_binary:
        put("worker_binary", _file_sha256(worker_binary))
    version, site_dirs = _interpreter_facts(python_executable)
    put("python_version", version)
    put("python_executable", os.path.abspath(python_executable))
    put("distributions", "\n".join(_distributions(site_dirs)))
    sdk_dir = os.path.dirname(os.path.abspath(__file__))
    for rel, full in _walk_py(sdk_dir):
        put("sdk:" + rel, Path(full).read_bytes())
    put("app_kind", loc.kind)
    put("app_module", loc.module)
    put("app_function", loc.function)
    put("app_dir", loc.app_dir)
    put("extra", json.dumps(extra or {}, sort_keys=True, default=str))

    files = bytes_ = 0
    truncated = False
    for f in loc.files:
        put("file", f)
        put("content", Path(f).read_bytes())
        files += 1
    for root in loc.roots:
        put("root", root)
        for rel, full in _walk_py(root):
            try:
                data = Path(full).read_bytes()
            except OSError as exc:  # a dangling link or unreadable file still counts
                data = f"<unreadable: {exc.strerror}>".encode()
            if files + 1 > MAX_FILES or bytes_ + len(data) > MAX_BYTES:
                truncated = True
                break
            put("file", rel)
            put("content", data)
            files += 1
            bytes_ += len(data)
        if truncated:
            break
    put("truncated", str(truncated))
    return KeyInfo(h.hexdigest(), loc, files, bytes_, truncated)


def compute_key(app_spec: str, python_executable: str, worker_version: str,
                extra: Optional[Dict[str, Any]] = None, *,
                worker_binary: Optional[str] = None, cwd: Optional[str] = None) -> str:
    """sha256 hex of everything that shapes the checkpoint image (see module doc).

    Warns on stderr when the file cap was hit (changes beyond it do not change the key)."""
    info = compute_key_info(app_spec, python_executable, worker_version, extra,
                            worker_binary=worker_binary, cwd=cwd)
    if info.truncated:
        print(f"beam: warning: the checkpoint key covers only the first {info.files_hashed} "
              f".py files ({info.bytes_hashed / 2**20:.1f} MB) under "
              f"{', '.join(info.location.roots)} (cap: {MAX_FILES} files / "
              f"{MAX_BYTES // 2**20} MB); edits past them will not invalidate the checkpoint. "
              "Put the app in a directory of its own.", file=sys.stderr)
    return info.key


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
