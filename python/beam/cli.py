"""``python -m beam`` / ``beam``: serve an app, call it, manage checkpoints, check the host."""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from ._paths import WorkerNotFound, default_checkpoint_dir, find_criu, worker_binary

#: CRIU fault-injection code 130 (FI_NO_BREAKPOINTS): makes ``criu check`` and dumps skip
#: hardware breakpoints, which many VMs do not virtualise.
CRIU_FAULT = "130"


class CLIError(Exception):
    """A user-facing failure: printed as ``beam: <message>``, exit status 1."""


# ---------------------------------------------------------------------------- helpers
def _start_worker_query(binary: str, args: Sequence[str]) -> subprocess.Popen:
    try:
        return subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    except OSError as exc:
        raise CLIError(f"cannot run {binary}: {exc}") from exc


def _worker_answer(p: subprocess.Popen, what: str) -> str:
    """The output of a query started by _start_worker_query (``what``: its flag)."""
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired as exc:
        p.kill()
        p.communicate()
        raise CLIError(f"beam-worker {what} did not answer within 30s") from exc
    if p.returncode != 0:
        raise CLIError(f"beam-worker {what} failed (exit {p.returncode}): {(err or out).strip()}")
    return out


def _worker_version(binary: str) -> str:
    return _worker_answer(_start_worker_query(binary, ["--version"]), "--version").strip()


def _image_env_query(binary: str, pass_env: Sequence[str]) -> subprocess.Popen:
    """The variables of our environment that an image depends on, as the worker decides
    (``beam-worker --print-image-env``): a changed ``OMP_NUM_THREADS`` means a new image,
    since a restored process keeps what its libraries read at import."""
    return _start_worker_query(binary, ["--print-image-env"] + [f"--pass-env={n}" for n in pass_env])


def _key_extra(workers: Optional[int], volume_root: Optional[str], image_env: str) -> Dict[str, Any]:
    root = volume_root or os.environ.get("BEAM_VOLUME_ROOT")
    return {"workers": workers, "volume_root": os.path.abspath(root) if root else None,
            "image_env": image_env}


def _current_key(app: str, workers: Optional[int], volume_root: Optional[str],
                 binary: Optional[str] = None, pass_env: Sequence[str] = ()) -> str:
    from .checkpoint_key import AppSpecError, compute_key

    binary = binary or _binary()
    # Both queries at once: each is an exec of the worker, on every `beam serve`.
    version = _start_worker_query(binary, ["--version"])
    image_env = _image_env_query(binary, pass_env)
    extra = _key_extra(workers, volume_root, _worker_answer(image_env, "--print-image-env"))
    try:
        return compute_key(app, sys.executable, _worker_answer(version, "--version").strip(),
                           extra, worker_binary=binary)
    except AppSpecError as exc:
        raise CLIError(str(exc)) from exc


def _binary() -> str:
    try:
        return worker_binary()
    except WorkerNotFound as exc:
        raise CLIError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {v}")
    return v


def _env_name(text: str) -> str:
    if not text or "=" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a variable name, got {text!r}")
    return text


def _host_port(text: str) -> str:
    from .client import parse_address  # cheap: only reached when --tcp is given

    try:
        kind, _ = parse_address(text if "://" in text else "tcp://" + text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if kind != "tcp":
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text[len("tcp://"):] if text.startswith("tcp://") else text


# ------------------------------------------------------------------------------ serve
def _absolute_app(app: str) -> str:
    """File apps are passed on absolute, so manifests and logs name them unambiguously."""
    from .checkpoint_key import split_spec

    module_part, func, is_file = split_spec(app)
    return f"{os.path.abspath(module_part)}:{func}" if is_file else app


def _app_source(app: str) -> Optional[str]:
    """The file defining the app's module, found without importing it (None if unsure)."""
    from .checkpoint_key import locate_app, split_spec

    loc = locate_app(app)
    if loc.kind == "file":
        return os.path.abspath(split_spec(app)[0])
    top, *rest = loc.module.split(".")
    cands = list(loc.files)
    for root in loc.roots:  # a package's directory, or a plain module's parent directory
        if rest:
            cands += [os.path.join(root, *rest) + ".py", os.path.join(root, *rest, "__init__.py")]
        else:
            cands += [os.path.join(root, top + ".py"), os.path.join(root, "__init__.py")]
    return next((c for c in cands if os.path.isfile(c)), None)


def decorator_options(source: str, func: str) -> List[str]:
    """The keywords written in ``@endpoint(...)`` / ``@beam.endpoint(...)`` on the top-level
    function ``func`` of a Python source text."""
    import ast

    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != func:
            continue
        for d in node.decorator_list:
            if not isinstance(d, ast.Call):
                continue
            f = d.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name == "endpoint":
                return [k.arg for k in d.keywords if k.arg]
    return []


def unused_options_note(app: str) -> Optional[str]:
    """``not used by the local worker: ...`` for the Beam-only options the app sets.

    Read from the app's source, not by importing it: the CLI execs the worker, which
    imports the app once anyway, and an import here could take minutes (a model load)
    or have side effects. Options passed indirectly (``**opts``) are not seen."""
    from .endpoint import NOT_USED_LOCALLY

    try:
        path = _app_source(app)
        if path is None:
            return None
        with open(path, encoding="utf-8") as f:
            source = f.read()
        written = decorator_options(source, app.rpartition(":")[2])
    except (OSError, SyntaxError, ValueError):
        return None  # the worker reports a broken app properly; this is only a note
    unused = sorted(set(written) & NOT_USED_LOCALLY)
    func = app.rpartition(":")[2]
    if re.search(rf"async\s+def\s+{re.escape(func)}\b", source):  # interleaved on its loop
        unused = [o for o in unused if o != "concurrent_requests"]
    if not unused:
        return None
    return (f"not used by the local worker: {', '.join(unused)} (accepted for Beam "
            f"compatibility and recorded; see docs/sdk.md)")


def cmd_serve(args: argparse.Namespace) -> int:
    binary = _binary()
    key = _current_key(args.app, args.workers, args.volume_root, binary, args.pass_env or ())
    ckpt_dir = os.path.abspath(os.path.expanduser(args.checkpoint_dir or default_checkpoint_dir()))
    if not args.no_checkpoint and not os.path.isdir(ckpt_dir):
        try:
            os.makedirs(ckpt_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot create checkpoint dir {ckpt_dir}: {exc}") from exc
    argv = [binary, "--python", sys.executable, "--checkpoint-key", key, "--checkpoint-dir", ckpt_dir]
    if args.socket:
        argv += ["--socket", os.path.abspath(args.socket)]
    if args.tcp:
        argv += ["--tcp", args.tcp]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    if args.store:
        argv += ["--store", os.path.abspath(os.path.expanduser(args.store))]
    if args.store_lease is not None:
        argv += ["--store-lease", f"{args.store_lease:g}"]
    if args.no_checkpoint:
        argv.append("--no-checkpoint")
    if args.retry_checkpoint:
        argv.append("--retry-checkpoint")
    if args.volume_root:
        argv += ["--volume-root", os.path.abspath(args.volume_root)]
    if args.max_frame is not None:
        argv += ["--max-frame", str(args.max_frame)]
    if args.criu:
        argv += ["--criu", os.path.abspath(args.criu)]
    if args.grace is not None:
        argv += ["--grace", f"{args.grace:g}"]
    if args.criu_timeout is not None:
        argv += ["--criu-timeout", f"{args.criu_timeout:g}"]
    if args.restore_timeout is not None:
        argv += ["--restore-timeout", f"{args.restore_timeout:g}"]
    if args.restore:
        argv += ["--restore", args.restore]
    if args.json_logs:
        argv.append("--json-logs")
    for name in args.pass_env or ():
        argv += ["--pass-env", name]
    if args.allow_cpu:
        argv.append("--allow-cpu")
    if args.cuda_lock_timeout is not None:
        argv += ["--cuda-lock-timeout", f"{args.cuda_lock_timeout:g}"]
    if args.port is not None:
        argv += ["--port", str(args.port), "--host", args.host]
    if args.no_auth:
        argv.append("--no-auth")
    if args.max_body is not None:
        argv += ["--max-body", str(args.max_body)]
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                        ("--idle-timeout", args.idle_timeout)):
        if value is not None:
            argv += [flag, f"{value:g}"]
    if args.max_connections is not None:
        argv += ["--max-connections", str(args.max_connections)]
    if args.max_replicas is not None:
        argv += ["--max-replicas", str(args.max_replicas)]
    if args.keep_warm is not None:
        argv += ["--keep-warm", f"{args.keep_warm:g}"]
    if args.max_crashes is not None:
        argv += ["--max-crashes", str(args.max_crashes)]
    if args.task_history is not None:
        argv += ["--task-history", str(args.task_history)]
    if args.access_log:
        argv.append("--access-log")
    argv.append(_absolute_app(args.app))
    note = unused_options_note(args.app)
    if note:
        print(f"beam: note: {note}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(binary, argv)
    return 0  # not reached


# ------------------------------------------------------------------------------- call
def _jsonable(value: Any, saw_bytes: List[bool]) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        saw_bytes[0] = True
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {(_jsonable(k, saw_bytes) if isinstance(k, (bytes, bytearray)) else
                 k if isinstance(k, (str, int, float, bool)) or k is None else str(k)):
                _jsonable(v, saw_bytes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, saw_bytes) for v in value]
    return value


def _print_json(value: Any) -> None:
    saw_bytes = [False]
    print(json.dumps(_jsonable(value, saw_bytes), indent=2, ensure_ascii=False))
    if saw_bytes[0]:
        print("note: bytes values are shown base64-encoded", file=sys.stderr)


def cmd_call(args: argparse.Namespace) -> int:
    from .client import Client
    from .exceptions import BeamError, RemoteError

    if (args.ping or args.stats) and args.json is not None:
        raise CLIError("--ping/--stats take no JSON argument")
    kwargs: Dict[str, Any] = {}
    if args.json is not None:
        text = sys.stdin.read() if args.json == "-" else args.json
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"JSON argument is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise CLIError("JSON argument must be an object: its keys become keyword arguments")
    try:
        with Client(args.address, timeout=args.timeout or None) as client:
            if args.ping:
                result = client.ping()
            elif args.stats:
                result = client.stats()
            elif args.stream:
                for chunk in client.stream(**kwargs):  # one line each, as it arrives
                    print(json.dumps(_jsonable(chunk, [False]), ensure_ascii=False), flush=True)
                return 0
            else:
                result = client.call(**kwargs)
    except RemoteError as exc:
        if exc.remote_traceback:
            print(exc.remote_traceback.rstrip(), file=sys.stderr)
        print(f"{exc.type}: {exc.message}", file=sys.stderr)
        if exc.task_id:
            print(f"task_id: {exc.task_id}", file=sys.stderr)
        return 1
    except (BeamError, OSError, ValueError) as exc:
        raise CLIError(f"{args.address}: {exc}") from exc
    _print_json(result)
    return 0


# ------------------------------------------------------------------------ checkpoints
@dataclass
class Entry:
    key: str
    status: str
    path: str
    app: str = ""
    bytes: Optional[int] = None
    created: Optional[float] = None
    reason: str = ""
    manifest: Optional[Dict[str, Any]] = None
    extra_paths: List[str] = field(default_factory=list)

    @property
    def compat(self) -> Optional[Dict[str, Any]]:
        """The machine the image was made on (csrc/compat.h), with its "hash"."""
        c = (self.manifest or {}).get("compat") if self.status != "failed" else None
        return c if isinstance(c, dict) else None

    def as_json(self, now: float) -> Dict[str, Any]:
        return {"key": self.key, "status": self.status, "app": self.app, "bytes": self.bytes,
                "compat_hash": (self.compat or {}).get("hash"), "compat": self.compat,
                "created": self.created,
                "age_s": None if self.created is None else round(now - self.created, 3),
                "path": self.path, "reason": self.reason, "manifest": self.manifest}


def _du(path: str) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _tmp_key(rest: str) -> str:
    """Key of a ``.tmp-<key>[suffix]`` dir: its leading hex digits when there are enough."""
    n = 0
    while n < len(rest) and rest[n] in "0123456789abcdef":
        n += 1
    return rest[:n] if n >= 8 else rest


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_lease(path: str) -> Dict[str, Any]:
    """A store lease (csrc/store.c): host=, pid=, expires= (wall clock) lines."""
    out: Dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                out[k] = v
        out["expires"] = float(out["expires"])
    except (OSError, KeyError, ValueError):
        out.pop("expires", None)
    return out


def scan_checkpoints(directory: str) -> List[Entry]:
    """Every entry under the checkpoint dir: images, failure markers, leftovers."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    entries: List[Entry] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if name.startswith(".tmp-"):
            entries.append(Entry(_tmp_key(name[5:]), "incomplete", path, bytes=_du(path),
                                 created=st.st_mtime, reason="temporary dir of an unfinished dump"))
        elif name.endswith(".lease") and stat.S_ISREG(st.st_mode):
            lease = _read_lease(path)
            expires = lease.get("expires")
            live = expires is not None and expires > time.time()
            entries.append(Entry(name[:-len(".lease")], "leased" if live else "lease-expired", path,
                                 bytes=st.st_size, created=st.st_mtime,
                                 reason=f"host {lease.get('host', '?')} pid {lease.get('pid', '?')}"))
        elif name.endswith(".failed") and stat.S_ISREG(st.st_mode):
            marker = _read_json(path) or {}
            created = marker.get("time")
            entries.append(Entry(name[:-len(".failed")], "failed", path, bytes=st.st_size,
                                 created=float(created) if isinstance(created, (int, float)) else st.st_mtime,
                                 reason=str(marker.get("reason", "")), manifest=marker or None))
        elif is_dir and not name.startswith("."):
            manifest = _read_json(os.path.join(path, "manifest.json"))
            if manifest is None:
                entries.append(Entry(name, "incomplete", path, bytes=_du(path), created=st.st_mtime,
                                     reason="no readable manifest.json"))
                continue
            size = manifest.get("image_bytes")
            created = manifest.get("created")
            entries.append(Entry(
                str(manifest.get("key") or name), str(manifest.get("status", "unknown")), path,
                app=str(manifest.get("app", "")),
                bytes=size if isinstance(size, int) else _du(path),
                created=float(created) if isinstance(created, (int, float)) else st.st_mtime,
                reason=str(manifest.get("reason", "") or ""), manifest=manifest))
    return entries


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _ckpt_dir(args: argparse.Namespace) -> str:
    return os.path.abspath(os.path.expanduser(args.dir or default_checkpoint_dir()))


def cmd_checkpoints_ls(args: argparse.Namespace) -> int:
    directory = os.path.abspath(os.path.expanduser(args.store)) if args.store else _ckpt_dir(args)
    entries = scan_checkpoints(directory)
    now = time.time()
    if args.json:
        print(json.dumps({"dir": directory, "entries": [e.as_json(now) for e in entries]}, indent=2))
        return 0
    if not entries:
        print(f"no checkpoints in {directory}")
        return 0
    rows = [("KEY", "COMPAT", "STATUS", "APP / HOLDER", "SIZE MiB", "AGE")]
    for e in entries:
        size = "-" if e.bytes is None else f"{e.bytes / 2**20:.1f}"
        compat = str((e.compat or {}).get("hash") or "-")[:12]
        who = e.reason if e.status.startswith("lease") else e.app  # a lease: its holder
        rows.append((e.key[:12], compat, e.status, who or "-", size,
                     _age(None if e.created is None else now - e.created)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print("  ".join([c.rjust(w) if i >= 4 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))]).rstrip())
    return 0


def _one_image(directory: str, prefix: str) -> Entry:
    images = [e for e in scan_checkpoints(directory) if e.status == "ok" and e.key.startswith(prefix)]
    keys = sorted({e.key for e in images})
    if not keys:
        raise CLIError(f"no checkpoint key in {directory} starts with {prefix!r}")
    if len(keys) > 1:
        raise CLIError(f"prefix {prefix!r} is ambiguous: " + ", ".join(k[:16] for k in keys))
    return next(e for e in images if e.key == keys[0])


def _run_worker(argv: List[str]) -> int:
    """beam-worker's archive modes (csrc/image_archive.c) say what they did or why not."""
    try:
        return subprocess.run([_binary(), *argv]).returncode
    except OSError as exc:
        raise CLIError(f"cannot run beam-worker: {exc}") from exc


def cmd_checkpoints_export(args: argparse.Namespace) -> int:
    directory = _ckpt_dir(args)
    e = _one_image(directory, args.key)
    return _run_worker(["--checkpoint-dir", directory, "--export-checkpoint", e.key,
                        os.path.abspath(args.file)])


def cmd_checkpoints_import(args: argparse.Namespace) -> int:
    directory = _ckpt_dir(args)
    return _run_worker(["--checkpoint-dir", directory, "--import-checkpoint",
                        os.path.abspath(args.file)])


def _same_app(manifest_app: str, app: str) -> bool:
    if not manifest_app:
        return False
    if manifest_app == app:
        return True
    from .checkpoint_key import AppSpecError, split_spec

    try:
        m_mod, m_fn, m_file = split_spec(manifest_app)
        a_mod, a_fn, a_file = split_spec(app)
    except AppSpecError:
        return False
    if m_fn != a_fn or m_file != a_file:
        return False
    if m_file:
        return os.path.realpath(m_mod) == os.path.realpath(a_mod)
    return m_mod == a_mod


def cmd_checkpoints_rm(args: argparse.Namespace) -> int:
    directory = _ckpt_dir(args)
    selectors_given = sum(bool(x) for x in (args.keys, args.all, args.failed, args.stale))
    if selectors_given != 1:
        raise CLIError("give KEY-PREFIX..., or exactly one of --all, --failed, --stale")
    if args.app and not args.stale:
        raise CLIError("--app only makes sense with --stale")
    entries = scan_checkpoints(directory)
    if args.all:
        chosen = entries
    elif args.failed:
        chosen = [e for e in entries if e.status == "failed"]
    elif args.stale:
        broken = [e for e in entries if e.status in ("failed", "incomplete")]
        if args.app:
            current = _current_key(args.app, args.workers, args.volume_root)
            chosen = [e for e in entries if e in broken
                      or (e.key != current and _same_app(e.app, args.app))]
        else:
            chosen = broken
    else:
        chosen = []
        problems = []
        for prefix in args.keys:
            keys = sorted({e.key for e in entries if e.key.startswith(prefix)})
            if not keys:
                problems.append(f"no checkpoint key starts with {prefix!r}")
            elif len(keys) > 1:
                problems.append(f"prefix {prefix!r} is ambiguous: " + ", ".join(k[:16] for k in keys))
            else:
                chosen += [e for e in entries if e.key == keys[0] and e not in chosen]
        if problems:
            raise CLIError("; ".join(problems) + " (nothing removed)")
    # In a store: a live lease, and the publication it covers, belong to a machine at work.
    busy = {e.key for e in entries if e.status == "leased"}
    for e in [e for e in chosen if e.key in busy and e.status in ("leased", "incomplete")]:
        print(f"keeping {e.key[:12]} ({e.status}) {e.path}: leased by {e.reason}")
        chosen.remove(e)
    if not chosen:
        print(f"nothing to remove in {directory}")
        return 0
    failed = False
    for e in chosen:
        what = f"{e.key[:12]} ({e.status}{', ' + e.app if e.app else ''}) {e.path}"
        if args.dry_run:
            print(f"would remove {what}")
            continue
        try:
            if os.path.isdir(e.path) and not os.path.islink(e.path):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"beam: cannot remove {e.path}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"removed {what}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- doctor
def _check_dir(path: str) -> tuple:
    if os.path.lexists(path):
        try:
            st = os.stat(path)
        except OSError as exc:
            return False, f"{path}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return False, f"{path} exists and is not a directory"
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid():
            return False, f"{path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
        if mode & 0o022:
            return False, f"{path} has mode {mode:04o}: writable by group/others; chmod 700 it"
        if not os.access(path, os.W_OK | os.X_OK):
            return False, f"{path} is not writable"
        note = "" if mode & 0o077 == 0 else f" (mode {mode:04o}; 0700 recommended)"
        return True, f"{path} exists, mode {mode:04o}{note}"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.access(parent, os.W_OK | os.X_OK):
        return True, f"{path} does not exist yet; will be created with mode 0700"
    return False, f"{path} cannot be created: {parent} is not writable"


_CKPT_API = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock",
             "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
             "cuCheckpointProcessUnlock")


def _driver_release(ctypes) -> str:
    """The driver release ("570.86.15"): NVML, else the kernel module's version file."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() == 0 and nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
            return buf.value.decode(errors="replace")
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return "unknown"


def _persistence(ctypes) -> str:
    """"on", "off", "on for 1 of 2 GPUs" or "unknown" (NVML missing or not telling)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        n = ctypes.c_uint(0)
        if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetCount_v2(ctypes.byref(n)) != 0:
            return "unknown"
        on = 0
        for i in range(n.value):
            h, mode = ctypes.c_void_p(), ctypes.c_int(0)
            if (nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) != 0 or
                    nvml.nvmlDeviceGetPersistenceMode(h, ctypes.byref(mode)) != 0):
                return "unknown"
            on += mode.value == 1
    except (OSError, AttributeError):
        return "unknown"
    if n.value == 0:
        return "unknown"
    return "on" if on == n.value else "off" if on == 0 else f"on for {on} of {n.value} GPUs"


def _check_gpu() -> tuple:
    """Driver version, checkpoint API, persistence mode, and whether a GPU checkpoint can
    work here (and why not): the checks beam-worker makes before it drives the driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return False, f"libcuda.so.1 not loadable ({exc}); CPU-only checkpoints"
    v = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return False, "libcuda.so.1 loaded, but cuDriverGetVersion failed: GPU checkpoint cannot work here"
    cuda = f"CUDA {v.value // 1000}.{v.value % 1000 // 10}"
    missing = [s for s in _CKPT_API if not hasattr(lib, s)]
    api = "checkpoint API present" if not missing else f"no checkpoint API (no {missing[0]})"
    pm = _persistence(ctypes)
    facts = f"driver {_driver_release(ctypes)} ({cuda}), {api}, persistence mode {pm}"
    n = ctypes.c_int(0)
    if v.value < 12080 or missing:
        why = "the driver is older than r570 (CUDA 12.8), the first with cuCheckpointProcess*"
    elif lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value == 0:
        why = "the driver reports no usable GPU (cuInit / cuDeviceGetCount)"
    else:
        # The worker calls cuInit itself, so persistence mode is not required; without it
        # each restore pays the driver's start-up.
        note = "" if pm != "off" else " (restores are slower: nvidia-smi -pm 1)"
        return True, f"{facts}, {n.value} GPU(s): GPU checkpoint can work here{note}"
    return False, f"{facts}: GPU checkpoint cannot work here: {why}"


def _same_dir(a: str, b: Optional[str]) -> bool:
    return bool(b) and os.path.realpath(a) == os.path.realpath(b)


def _check_python(version_text: str) -> tuple:
    """Whether the worker embeds this interpreter's libpython (its ``--version`` names
    the library): the same test the worker makes at start, by directory and version."""
    import re
    import sysconfig

    m = re.search(r"^libpython: (.*?)(, linked in)? \(Python (.*)\)$", version_text, re.M)
    if not m:
        return False, "the worker's --version names no libpython (an older worker: reinstall beam)"
    lib, version = m.group(1), m.group(3)
    libdir = os.path.dirname(lib)
    ours = [sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LIBPL"),
            os.path.join(sys.base_prefix, sys.platlibdir)]
    same = any(_same_dir(libdir, d) for d in ours) and version == sys.version.split("\n")[0]
    what = (f"worker embeds {lib} (Python {version.split()[0]}); this interpreter is "
            f"{sys.executable} (Python {sys.version.split()[0]}, libpython in {ours[0]})")
    if same:
        return True, what + ": they match"
    return False, (what + ": they do NOT match, `beam serve` will refuse to start; rebuild "
                   f"with `{sys.executable} -m pip install --force-reinstall --no-cache-dir "
                   "<beam source tree>`")


KDAT_DIR = "/run/beam-criu"  # RUNDIR of the CRIU that scripts/install-criu.sh builds


def _report_kdat_cache(report) -> None:
    """CRIU keeps its kernel-feature probe only on a tmpfs; without one, every dump and
    restore probes again (docs/criu-provisioning.md)."""
    if not os.path.isdir(KDAT_DIR):
        return
    with open("/proc/mounts") as f:
        on_tmpfs = any(len(p) > 2 and p[1] == KDAT_DIR and p[2] == "tmpfs"
                       for p in (line.split() for line in f))
    report("criu feature cache", on_tmpfs,
           f"{KDAT_DIR} is a tmpfs" if on_tmpfs else
           f"{KDAT_DIR} is not a tmpfs: every dump and restore re-probes the kernel "
           "(~30-45 ms more); run scripts/install-criu.sh again (the mount is lost at reboot)",
           required=False)


def _report_privileges(report, binary: str) -> None:
    """PID namespace and capabilities, as the worker itself sees them: a container with
    the default capabilities serves, but cold."""
    try:
        p = subprocess.run([binary, "--check-privileges"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        report("privileges", False, f"cannot run {binary} --check-privileges: {exc}")
        return
    facts = dict(line.split(": ", 1) for line in p.stdout.splitlines() if ": " in line)
    ns, missing = facts.get("pid_namespace", "unknown"), facts.get("missing_capabilities", "unknown")
    report("pid namespace", ns == "ok", "can be created" if ns == "ok" else
           f"{ns}: the worker serves, but cold (no checkpoints)")
    report("capabilities", missing == "none", "all that CRIU needs are effective" if missing == "none"
           else f"missing {missing}; in a container add them (docs/checkpoint.md, In a container)",
           required=False)


def cmd_doctor(args: argparse.Namespace) -> int:
    results = []

    def report(name: str, ok: Optional[bool], reason: str, required: bool = True) -> None:
        results.append((ok, required))
        tag = "OK" if ok else ("FAIL" if required else "INFO")
        print(f"{tag:<5} {name}: {reason}")

    binary_ok = False
    try:
        binary = worker_binary()
        try:
            version = _worker_version(binary)
        except CLIError as exc:
            report("worker", False, str(exc))
        else:
            binary_ok = True
            report("worker", True, f"{binary} ({version.splitlines()[0]})")
            report("python", *_check_python(version))
    except WorkerNotFound as exc:
        report("worker", False, str(exc))

    euid = os.geteuid()
    report("root", euid == 0, "running as root" if euid == 0 else
           f"running as uid {euid}; CRIU needs root to checkpoint and restore")
    if euid == 0 and binary_ok:
        _report_privileges(report, binary)

    criu, why = find_criu()
    if criu is None:
        report("criu", False, f"{why}; run scripts/install-criu.sh")
    else:
        try:
            v = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=30)
            version = (v.stdout.strip().splitlines() or ["unknown version"])[0]
            c = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "CRIU_FAULT": CRIU_FAULT})
        except (OSError, subprocess.TimeoutExpired) as exc:
            report("criu", False, f"{criu}: cannot run: {exc}")
        else:
            out = (c.stdout + c.stderr).strip()
            tail = " | ".join(out.splitlines()[-3:]) if out else "(no output)"
            report("criu", True, f"{criu}: {version}")
            report("criu check", c.returncode == 0,
                   f"CRIU_FAULT={CRIU_FAULT} criu check exit {c.returncode}: {tail}")
            _report_kdat_cache(report)

    ok, reason = _check_dir(os.path.abspath(os.path.expanduser(args.dir or default_checkpoint_dir())))
    report("checkpoint dir", ok, reason)

    ok, reason = _check_gpu()
    report("gpu", ok, reason, required=False)

    can = all(ok for ok, required in results if required)
    print("checkpointing can work on this host" if can else
          "checkpointing will NOT work on this host; the worker will still serve, cold-starting every time")
    return 0 if can else 1


# ------------------------------------------------------------------------------ parser
def _add_dir_argument(p: argparse.ArgumentParser,
                      text: str = "checkpoint dir (default: as for serve)") -> None:
    p.add_argument("--dir", "--checkpoint-dir", dest="dir", metavar="DIR", help=text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beam", description="Serve a @beam.endpoint function from a checkpointed worker.")
    p.add_argument("--version", action="version", version=f"beam {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="serve an app (execs beam-worker)",
                       description="Compute the app's checkpoint key and exec beam-worker. "
                       "Without --socket/--tcp the worker listens on tcp 127.0.0.1:8765.")
    s.add_argument("app", metavar="APP", help="path/to/app.py:function or package.module:function")
    s.add_argument("--socket", metavar="PATH", help="listen on this unix socket")
    s.add_argument("--tcp", metavar="HOST:PORT", type=_host_port, help="listen on this TCP address")
    s.add_argument("--workers", metavar="N", type=_positive_int,
                   help="worker processes (default: the endpoint's workers=)")
    s.add_argument("--checkpoint-dir", metavar="DIR",
                   help="where images are kept (default: $BEAM_CHECKPOINT_DIR, "
                   "$XDG_CACHE_HOME/beam/checkpoints or ~/.cache/beam/checkpoints)")
    s.add_argument("--store", metavar="DIR",
                   help="shared store many machines mount (NFS, CephFS, RWX volume): restore "
                   "from it what the local cache lacks, publish this machine's dumps to it "
                   "(docs/checkpoint.md, Shared store)")
    s.add_argument("--store-lease", metavar="SECONDS", type=_positive_float,
                   help="term of the store lease a dumping machine holds (worker default 30)")
    s.add_argument("--no-checkpoint", action="store_true", help="never checkpoint or restore")
    s.add_argument("--retry-checkpoint", action="store_true",
                   help="try again even if this key's checkpoint failed before")
    s.add_argument("--volume-root", metavar="DIR", help="where volumes live (default: $BEAM_VOLUME_ROOT "
                   "or ~/.cache/beam/volumes)")
    s.add_argument("--max-frame", metavar="BYTES", type=_positive_int, help="largest request frame accepted")
    s.add_argument("--criu", metavar="PATH", help="criu binary to use")
    s.add_argument("--grace", metavar="SECONDS", type=_nonneg_float,
                   help="how long in-flight requests may finish on shutdown")
    s.add_argument("--criu-timeout", metavar="SECONDS", type=_nonneg_float,
                   help="bound on one CRIU dump (worker default 120)")
    s.add_argument("--restore-timeout", metavar="SECONDS", type=_nonneg_float,
                   help="bound on one restore before booting cold (worker default 30)")
    s.add_argument("--restore", choices=("auto", "lazy", "eager"),
                   help="lazy: serve while memory is filled in behind; eager: copy it all first; "
                        "auto (default): lazy for images of 256 MiB and more where userfaultfd works "
                        "(docs/checkpoint.md)")
    s.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    s.add_argument("--pass-env", metavar="NAME", action="append", type=_env_name,
                   help="also give the app this variable of the environment (repeatable); it "
                        "otherwise sees only an allow-list plus its env=/secrets= "
                        "(docs/checkpoint.md, Environment)")
    s.add_argument("--allow-cpu", action="store_true",
                   help="serve an endpoint with gpu= even without a usable GPU (default: refuse)")
    s.add_argument("--cuda-lock-timeout", metavar="SECONDS", type=_nonneg_float,
                   help="bound on locking the app's CUDA state before a GPU checkpoint "
                   "(worker default 10)")
    h = s.add_argument_group("HTTP front and replicas (docs/http.md)")
    h.add_argument("--port", metavar="N", type=int,
                   help="serve HTTP on this port: POST / with a JSON body, GET /health, GET /stats")
    h.add_argument("--host", metavar="ADDR", default="127.0.0.1",
                   help="HTTP bind address (default 127.0.0.1)")
    h.add_argument("--no-auth", action="store_true",
                   help="no bearer token (default: $BEAM_AUTH_TOKEN, else one is generated and printed)")
    h.add_argument("--max-body", metavar="BYTES", type=_positive_int, help="largest HTTP body (default 64 MiB)")
    h.add_argument("--header-timeout", metavar="SECONDS", type=_positive_float,
                   help="close a connection whose request line and headers take longer (default 10)")
    h.add_argument("--body-timeout", metavar="SECONDS", type=_positive_float,
                   help="close a connection whose body takes longer after its headers (default 60)")
    h.add_argument("--idle-timeout", metavar="SECONDS", type=_positive_float,
                   help="close a keep-alive connection idle this long (default 60; one that "
                   "made no authorized request: --header-timeout)")
    h.add_argument("--max-connections", metavar="N", type=_positive_int,
                   help="open HTTP connections (default 1024); at N the oldest idle one that "
                   "made no authorized request makes room, else new ones get 503")
    h.add_argument("--max-replicas", metavar="N", type=_positive_int,
                   help="restore up to N replicas when calls queue up (default 1)")
    h.add_argument("--keep-warm", metavar="SECONDS", type=float,
                   help="stop a replica idle this long; the next call restores one "
                   "(default: the endpoint's keep_warm_seconds; -1: never)")
    h.add_argument("--task-history", metavar="N", type=_positive_int,
                   help="recent calls kept for GET /tasks and /dashboard (default 1000)")
    h.add_argument("--access-log", action="store_true",
                   help="log one line per HTTP response (JSON with --json-logs)")
    s.add_argument("--max-crashes", metavar="N", type=int,
                   help="give up after N replica crashes within a minute (default 5; 0: never)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("call", help="call a running worker",
                       description="Call the endpoint with the JSON object's keys as keyword "
                       "arguments and print the result as JSON. Exit 1 on a remote error.",
                       epilog="examples: beam call tcp://127.0.0.1:8765 '{\"x\": 2}'   "
                       "beam call unix:///tmp/app.sock --stats")
    c.add_argument("address", metavar="ADDRESS", help="tcp://HOST:PORT, HOST:PORT, unix:///abs/path or a socket path")
    c.add_argument("json", metavar="JSON", nargs="?", help="kwargs as a JSON object ('-' reads stdin; default {})")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--ping", action="store_true", help="send a ping instead of a call")
    g.add_argument("--stats", action="store_true", help="print the serving worker's stats")
    g.add_argument("--stream", action="store_true",
                   help="ask for a streamed answer: print each chunk as one JSON line as it arrives")
    c.add_argument("--timeout", metavar="SECONDS", type=_nonneg_float, default=30.0,
                   help="give up after this long without an answer (0: wait forever; default 30)")
    c.set_defaults(func=cmd_call)

    k = sub.add_parser("checkpoints", help="list, remove, export or import checkpoint images",
                       description="Manage the checkpoint dir.")
    ksub = k.add_subparsers(dest="ckpt_command", metavar="ACTION")
    ls = ksub.add_parser("ls", help="list checkpoints", description="List checkpoints, failure "
                         "markers and incomplete dumps.")
    _add_dir_argument(ls)
    ls.add_argument("--store", metavar="DIR", help="list this shared store instead")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_checkpoints_ls)
    ex = ksub.add_parser("export", help="write one checkpoint to a .tar.zst file",
                         description="Write the image whose key starts with KEY-PREFIX to FILE, "
                         "a zstd-compressed tar (beam-worker --export-checkpoint).")
    ex.add_argument("key", metavar="KEY-PREFIX")
    ex.add_argument("file", metavar="FILE")
    _add_dir_argument(ex)
    ex.set_defaults(func=cmd_checkpoints_export)
    im = ksub.add_parser("import", help="add a checkpoint from an exported file",
                         description="Verify FILE (sizes and XXH3 of every image file) and add its "
                         "image to the checkpoint dir; a corrupt or truncated file is refused "
                         "and leaves nothing behind.")
    im.add_argument("file", metavar="FILE")
    _add_dir_argument(im)
    im.set_defaults(func=cmd_checkpoints_import)
    rm = ksub.add_parser("rm", help="remove checkpoints",
                         description="Remove checkpoints by key prefix, or by kind. --stale removes "
                         "failed/incomplete entries, and with --app also APP's checkpoints whose key "
                         "is not APP's current key.")
    rm.add_argument("keys", metavar="KEY-PREFIX", nargs="*", help="key prefixes (must be unambiguous)")
    rm.add_argument("--all", action="store_true", help="remove everything")
    rm.add_argument("--failed", action="store_true", help="remove failed entries")
    rm.add_argument("--stale", action="store_true", help="remove failed/incomplete (and, with --app, outdated) entries")
    rm.add_argument("--app", metavar="APP", help="with --stale: the app whose current key is kept")
    rm.add_argument("--workers", metavar="N", type=_positive_int,
                    help="with --app: the --workers the app is served with (part of the key)")
    rm.add_argument("--volume-root", metavar="DIR", help="with --app: the --volume-root it is served with")
    _add_dir_argument(rm, "checkpoint dir, or a store (default: as for serve)")
    rm.add_argument("-n", "--dry-run", action="store_true", help="print what would be removed")
    rm.set_defaults(func=cmd_checkpoints_rm)
    k.set_defaults(func=None, subparser=k)

    d = sub.add_parser("doctor", help="check that this host can checkpoint",
                       description="Check the worker binary, root, CRIU, the checkpoint dir and "
                       "the GPU driver. Exit 0 if checkpointing can work.")
    d.add_argument("--dir", metavar="DIR", help="checkpoint dir to check (default: as for serve)")
    d.set_defaults(func=cmd_doctor)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "subparser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except CLIError as exc:
        print(f"beam: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `beam checkpoints ls | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
