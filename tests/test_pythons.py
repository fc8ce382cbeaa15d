"""A worker embeds exactly the Python it is installed for (issue 9).

Two builds of one Python version (Debian's /usr/bin/python3 3.11.2, pyenv's 3.11.7 on
PATH) are not interchangeable: a worker embedding one and running the other's stdlib
fails on extension modules. Installing from ONE source tree into a venv of each, in
either order, must give each venv a worker for its own Python, which serves, checkpoints
and restores an app importing extension modules; a worker run with the other venv's
--python must refuse with one clear error. Needs root and CRIU, like test_checkpoint."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import APPS, ROOT

pytestmark = pytest.mark.timeout(300)

DEBIAN = "/usr/bin/python3"
PROBE = ("import os, sys, sysconfig; "
         "print(os.path.realpath(getattr(sys, '_base_executable', sys.executable))); "
         "print(sysconfig.get_config_var('LIBDIR'))")
# What must not leak from the test's own environment (test.sh exports the worker binary).
DROP = ("BEAM_WORKER_BINARY", "BEAM_PYTHON", "PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV",
        "PYTHONUNBUFFERED")


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP}
    env.update(extra)
    return env


def probe(python: str) -> Tuple[str, str]:
    """(real path of the base interpreter, its LIBDIR)."""
    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         env=clean_env(), check=True).stdout.split("\n")
    return out[0], out[1]


def other_python() -> str:
    """A second interpreter whose libpython is not Debian's: python3 on PATH (a pyenv
    shim here, resolved by asking it), else the base of the Python running the tests."""
    debian_libdir = probe(DEBIAN)[1]
    for candidate in (shutil.which("python3", path=clean_env().get("PATH")), sys.executable):
        if not candidate:
            continue
        try:
            exe, libdir = probe(candidate)
        except (OSError, subprocess.SubprocessError):
            continue
        if os.path.realpath(libdir) != os.path.realpath(debian_libdir):
            return exe
    pytest.skip(f"no second Python besides {DEBIAN} (python3 on PATH and {sys.executable} "
                "share its libpython): nothing to mix up")


def run(cmd: List[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=kw.pop("env", clean_env()), **kw)
    assert p.returncode == 0, f"{cmd} exit {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pythons")


@pytest.fixture(scope="module")
def venvs(base) -> Dict[str, str]:
    """{"debian": venv python, "other": venv python}, with numpy; beam is not installed."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root (CRIU), like the rest of the suite")
    pythons = {"debian": DEBIAN, "other": other_python()}
    out = {}
    for name, python in pythons.items():
        venv = base / f"venv-{name}"
        run([python, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
             "--disable-pip-version-check", "numpy", "msgpack"])
        out[name] = str(venv / "bin" / "python")
    return out


def copy_tree(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored) only: no build state."""
    files = run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"]).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def install(venv_python: str, tree: Path) -> None:
    run([venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--force-reinstall", "--no-deps", "--no-cache-dir", str(tree)])


def worker_of(venv_python: str) -> str:
    return str(Path(venv_python).parent / "beam-worker")


def libpython_of(venv_python: str) -> str:
    """The shared libpython of the venv's Python, from its sysconfig (Debian's own
    python3 executable has libpython linked in, so its maps would not show it)."""
    code = ("import os, sysconfig as s; "
            "print(os.path.join(s.get_config_var('LIBDIR'), s.get_config_var('INSTSONAME')))")
    return run([venv_python, "-c", code]).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(venv_python: str, app_dir: Path, env: Dict[str, str]) -> str:
    """`python -m beam serve` as a user runs it, one call, SIGTERM; returns its output."""
    port = free_port()
    log = app_dir / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([venv_python, "-m", "beam", "serve", "app.py:predict",
                                 "--tcp", f"127.0.0.1:{port}"], cwd=app_dir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "ready:" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()}"
            time.sleep(0.05)
        answer = run([venv_python, "-m", "beam", "call", f"tcp://127.0.0.1:{port}", "{}"],
                     env=env, timeout=60).stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text(errors="replace")
    assert '"numpy": 45.0' in answer and '"ssl": "OpenSSL' in answer, answer + text
    assert f'"prefix": "{Path(venv_python).parent.parent}"' in answer, answer
    return text


@pytest.mark.parametrize("order", [("debian", "other"), ("other", "debian")])
def test_one_tree_installs_each_python(order, venvs, base):
    tree = copy_tree(base / f"src-{order[0]}-first")
    for name in order:
        install(venvs[name], tree)
    app_dir = base / f"app-{order[0]}-first"
    app_dir.mkdir()
    shutil.copy(APPS / "pythons_app.py", app_dir / "app.py")
    for name in order:
        py = venvs[name]
        env = clean_env(BEAM_CHECKPOINT_DIR=str(app_dir / f"ck-{name}"),
                        BEAM_VOLUME_ROOT=str(app_dir / "volumes"))
        assert "checkpoint written" in serve_once(py, app_dir, env)
        assert "restored from checkpoint" in serve_once(py, app_dir, env)
    for name in order:
        py = venvs[name]
        version = run([worker_of(py), "--version"]).stdout
        assert f"libpython: {libpython_of(py)} " in version, version
        doctor = subprocess.run([py, "-m", "beam", "doctor"], capture_output=True, text=True,
                                env=clean_env(), timeout=120).stdout
        assert re.search(r"^OK +python: .*they match$", doctor, re.M), doctor


@pytest.mark.parametrize("built_for,used_with", [("debian", "other"), ("other", "debian")])
def test_worker_refuses_another_pythons_venv(built_for, used_with, venvs, base):
    if not all(os.path.exists(worker_of(py)) for py in venvs.values()):
        tree = copy_tree(base / "src-mismatch")
        for py in venvs.values():
            install(py, tree)
    app_dir = base / f"mismatch-{built_for}"
    app_dir.mkdir()
    shutil.copy(APPS / "pythons_app.py", app_dir / "app.py")
    worker, python = worker_of(venvs[built_for]), venvs[used_with]
    env = clean_env(BEAM_VOLUME_ROOT=str(app_dir / "volumes"))
    direct = [worker, "--python", python, "--no-checkpoint", "--tcp", "127.0.0.1:0",
              "app.py:predict"]
    # The user's path: serve execs the worker, whose supervisor prints the host's fatal error.
    serve = [python, "-m", "beam", "serve", "app.py:predict", "--tcp", f"127.0.0.1:{free_port()}"]
    for cmd, extra in ((direct, {}), (serve, {"BEAM_WORKER_BINARY": worker,
                                              "BEAM_CHECKPOINT_DIR": str(app_dir / "ck")})):
        p = subprocess.run(cmd, cwd=app_dir, capture_output=True, text=True, timeout=90,
                           env={**env, **extra})
        out = p.stdout + p.stderr
        assert p.returncode != 0, out
        embedded, theirs = libpython_of(venvs[built_for]), libpython_of(python)
        assert f"beam-worker embeds {embedded} " in out, out
        assert f"--python {python} runs the standard library of another Python" in out, out
        assert f"its libpython is in {os.path.dirname(theirs)})" in out, out
        assert f"`{python} -m pip install --force-reinstall --no-cache-dir " in out, out
        # One clear error: the mismatch is caught before any import fails on it.
        assert "undefined symbol" not in out and "No module named" not in out, out
        assert out.count("error:") == 2, out  # the reason, then "the app failed to start"
