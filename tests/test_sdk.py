"""Unit tests of the pure-Python SDK: decorator, key, CLI, client (against an in-test
msgpack server on real sockets). No beam-worker binary is needed."""
from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import beam  # noqa: E402
from beam import checkpoint_key, cli  # noqa: E402
from beam.endpoint import Endpoint  # noqa: E402

msgpack = pytest.importorskip("msgpack")
from beam.client import Client, parse_address  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO / "python")}


# ------------------------------------------------------------------------ decorator
def test_endpoint_bare_and_called_forms():
    @beam.endpoint
    def a(x):
        return x + 1

    @beam.endpoint(workers=2, timeout=5, name="b-endpoint")
    def b(x, context):
        return x

    assert isinstance(a, Endpoint) and isinstance(b, beam.Endpoint)
    assert a(1) == 2 and a.config.name == "a" and a.__name__ == "a"
    assert b.config.workers == 2 and b.config.name == "b-endpoint"
    assert not a.wants_context and b.wants_context


def test_endpoint_context_detection_needs_the_name():
    @beam.endpoint
    def kw_only(*, context=None):
        return 1

    @beam.endpoint
    def other(ctx, **kwargs):
        return 1

    assert kw_only.wants_context
    assert not other.wants_context


@pytest.mark.parametrize("opts, exc", [
    ({"worker": 2}, TypeError),
    ({"checkpoint": True}, TypeError),
    ({"workers": 0}, ValueError),
    ({"workers": True}, ValueError),
    ({"timeout": "10"}, ValueError),
    ({"keep_warm_seconds": -1}, ValueError),
    ({"on_start": 3}, TypeError),
    ({"volumes": ["data"]}, TypeError),
    ({"secrets": [""]}, TypeError),
    ({"env": {"A": 1}}, TypeError),
])
def test_endpoint_rejects_bad_options(opts, exc):
    with pytest.raises(exc):
        @beam.endpoint(**opts)
        def f():
            pass


def test_volume_validation():
    v = beam.Volume(name="weights", mount_path="./weights")
    assert v.name == "weights"
    for name in ("", "a/b", ".", ".."):
        with pytest.raises(ValueError):
            beam.Volume(name=name, mount_path="/x")
    with pytest.raises(ValueError):
        beam.Volume(name="ok", mount_path="")

    @beam.endpoint(volumes=[v], image=beam.Image(python_packages=["numpy"]))
    def f():
        pass

    assert f.config.volumes == [v]


def test_public_names_and_light_import():
    for name in ("endpoint", "Endpoint", "Image", "Volume", "Context", "Client", "RemoteError",
                 "ConnectionClosed", "BeamError", "TimeoutError", "before_checkpoint",
                 "after_restore", "env", "__version__"):
        assert hasattr(beam, name), name
    assert beam.__version__ == "0.1.0"
    assert issubclass(beam.TimeoutError, beam.BeamError)
    assert "TimeoutError" not in beam.__all__  # star-import leaves the builtin alone
    code = ("import sys, beam; assert 'msgpack' not in sys.modules and 'beam.client' not in sys.modules;"
            "beam.Client; assert 'msgpack' in sys.modules")
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)


# ------------------------------------------------------- Beam's option set, is_remote
#: Every option of Beam's (beta9's) @endpoint, with values of the kinds Beam apps pass.
BEAM_OPTIONS = dict(
    app="my-app", cpu=2, memory="4Gi", gpu="T4", gpu_count=1, image=beam.Image(python_packages=["torch"]),
    timeout=60, workers=1, keep_warm_seconds=300, max_pending_tasks=50, on_start=None, on_deploy=None,
    volumes=[], secrets=[], env={"A": "1"}, name="beam-app", authorized=False, autoscaler=object(),
    callback_url="https://example.invalid/cb", task_policy=object(), retries=3, concurrent_requests=2,
    checkpoint_enabled=True, pricing=object(), inputs=object(), outputs=object(), block_network=True,
    docker_enabled=False,
)


def test_endpoint_accepts_every_beam_option():
    @beam.endpoint(**BEAM_OPTIONS)
    def predict(x: int) -> int:
        return x * 2

    assert predict(x=2) == 4 and predict.__name__ == "predict"
    for k, v in BEAM_OPTIONS.items():
        assert getattr(predict.config, k) == v, k
    assert predict.unused_options == sorted(
        {"app", "cpu", "memory", "gpu_count", "image", "on_deploy", "autoscaler", "callback_url",
         "task_policy", "retries", "concurrent_requests", "pricing", "inputs", "outputs",
         "block_network", "docker_enabled"})

    @beam.endpoint(workers=2)
    def plain():
        pass

    assert plain.unused_options == []


def test_endpoint_typo_is_a_type_error_with_a_hint():
    with pytest.raises(TypeError, match="'keep_warm_second' \\(did you mean 'keep_warm_seconds'\\?\\)"):
        @beam.endpoint(keep_warm_second=10)
        def f():
            pass
    with pytest.raises(TypeError, match="'zzz_option'$"):
        beam.endpoint(zzz_option=1)


def test_decorator_options_read_from_source():
    src = textwrap.dedent("""
        import beam
        from beam import endpoint
        @beam.endpoint(cpu=2, autoscaler=None, **extra)
        def a(): pass
        @endpoint(memory="1Gi")
        async def b(): pass
        def c(): pass
    """)
    assert cli.decorator_options(src, "a") == ["cpu", "autoscaler"]
    assert cli.decorator_options(src, "b") == ["memory"]
    assert cli.decorator_options(src, "c") == []


def test_is_remote_false_outside_a_worker(tmp_path):
    assert beam.env.is_remote() is False
    (tmp_path / "app.py").write_text("import beam\nprint('remote', beam.env.is_remote())\n")
    out = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, check=True).stdout
    assert out == "remote False\n"


BEAM_APP = """
import beam
from beam import env

AT_IMPORT = env.is_remote()

@beam.endpoint(app="shop", cpu="500m", memory=512, gpu_count=0, autoscaler=None, retries=2,
               callback_url="https://example.invalid/done", task_policy=None, pricing=None,
               keep_warm_seconds=60, name="beam-only")
def predict(context, x: int = 1):
    return {"x": x, "remote": env.is_remote(), "at_import": AT_IMPORT,
            "callback_url": context.callback_url}
"""


def _real_worker() -> str:
    from conftest import worker_binary

    path = worker_binary()
    if not os.access(path, os.X_OK):
        pytest.skip(f"no beam-worker binary at {path}")
    return path


@pytest.mark.timeout(90)
def test_serve_app_with_beam_only_options(tmp_path):
    """A Beam app with Beam-only options imports and serves through ``python -m beam serve``;
    the note naming them is printed once (the CLI execs the worker: it must not be lost in
    a buffer, so no PYTHONUNBUFFERED here); is_remote() is true in the worker."""
    binary = _real_worker()
    (tmp_path / "app.py").write_text(BEAM_APP)
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    env.update(BEAM_WORKER_BINARY=binary, BEAM_CHECKPOINT_DIR=str(tmp_path / "ck"),
               BEAM_VOLUME_ROOT=str(tmp_path / "vol"))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "beam", "serve", "app.py:predict", "--socket",
                              "s.sock", "--no-checkpoint"], cwd=tmp_path, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "s.sock").exists():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with Client(f"unix://{tmp_path / 's.sock'}", timeout=30) as c:
            got = c.call(x=3)
    finally:
        p.terminate()
        p.wait(timeout=30)
    assert got == {"x": 3, "remote": True, "at_import": True,
                   "callback_url": "https://example.invalid/done"}
    text = log.read_text()
    notes = [line for line in text.splitlines() if "not used by the local worker" in line]
    assert len(notes) == 1, text
    assert ("not used by the local worker: app, autoscaler, callback_url, cpu, gpu_count, memory, "
            "pricing, retries, task_policy") in notes[0]


# ---------------------------------------------------------------------- checkpoint key
def _make_app(tmp_path: Path, timeout: int = 10) -> Path:
    app = tmp_path / "app"
    (app / "lib").mkdir(parents=True, exist_ok=True)
    (app / "app.py").write_text(textwrap.dedent(f"""
        import beam
        @beam.endpoint(timeout={timeout})
        def handler(x=1):
            return x
    """))
    (app / "lib" / "util.py").write_text("A = 1\n")
    for skipped in (".git", "__pycache__", ".venv", "venv", "site-packages"):
        (app / skipped).mkdir(exist_ok=True)
        (app / skipped / "x.py").write_text("1\n")
    return app


def _key(spec: str, extra=None, cwd=None) -> str:
    return checkpoint_key.compute_key(spec, sys.executable, "w1", extra or {"workers": None}, cwd=cwd)


def test_key_stable_and_sensitive(tmp_path):
    app = _make_app(tmp_path)
    spec = f"{app}/app.py:handler"
    k = _key(spec)
    assert len(k) == 64 and k == _key(spec)
    assert _key("app.py:handler", cwd=str(app)) == k  # relative spec, same app
    assert checkpoint_key.compute_key(spec, sys.executable, "w2", {"workers": None}) != k
    assert _key(f"{app}/app.py:other") != k
    assert _key(spec, {"workers": 3}) != k
    for skipped in (".git", "__pycache__", ".venv", "venv", "site-packages"):
        (app / skipped / "x.py").write_text("2\n")
    (app / "notes.txt").write_text("not python")
    assert _key(spec) == k  # skipped dirs and non-.py files do not count
    (app / "lib" / "util.py").write_text("A = 2\n")
    k2 = _key(spec)
    assert k2 != k
    _make_app(tmp_path, timeout=11)  # the decorator's configuration changed
    (app / "lib" / "util.py").write_text("A = 2\n")
    assert _key(spec) not in (k, k2)
    (app / "lib" / "new.py").write_text("")
    assert _key(spec) not in (k, k2)


def test_key_file_cap(tmp_path, monkeypatch, capsys):
    app = _make_app(tmp_path)
    monkeypatch.setattr(checkpoint_key, "MAX_FILES", 1)
    info = checkpoint_key.compute_key_info(f"{app}/app.py:handler", sys.executable, "w", {})
    assert info.truncated and info.files_hashed == 1
    checkpoint_key.compute_key(f"{app}/app.py:handler", sys.executable, "w", {})
    assert "covers only the first 1" in capsys.readouterr().err


def test_key_for_package_does_not_import(tmp_path):
    pkg = tmp_path / "mypkg_for_key_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('must not be imported')\n")
    (pkg / "mod.py").write_text("X = 1\n")
    spec = "mypkg_for_key_test.mod:handler"
    loc = checkpoint_key.locate_app(spec, cwd=str(tmp_path))
    assert loc.kind == "module" and loc.roots == [str(pkg)]
    k = _key(spec, cwd=str(tmp_path))
    assert "mypkg_for_key_test" not in sys.modules
    (pkg / "mod.py").write_text("X = 2\n")
    assert _key(spec, cwd=str(tmp_path)) != k
    with pytest.raises(checkpoint_key.AppSpecError):
        _key("no_such_pkg_xyz.mod:f", cwd=str(tmp_path))
    with pytest.raises(checkpoint_key.AppSpecError):
        _key("app.py", cwd=str(tmp_path))


# ---------------------------------------------------------------------------- CLI
def _fake_worker(tmp_path: Path) -> Path:
    w = tmp_path / "fake-worker"
    w.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "beam-worker 9.9"; exit 0; fi\n'
                 'printf "%s\\n" "$@"\n')
    w.chmod(0o755)
    return w


def test_serve_execs_worker_with_key(tmp_path):
    app = _make_app(tmp_path)
    env = {**ENV, "BEAM_WORKER_BINARY": str(_fake_worker(tmp_path)),
           "BEAM_CHECKPOINT_DIR": str(tmp_path / "ck")}
    cmd = [sys.executable, "-m", "beam", "serve", "app.py:handler", "--socket", "s.sock", "--workers", "2",
           "--no-checkpoint", "--grace", "1.5"]
    out = subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["--python", sys.executable] and out[2] == "--checkpoint-key"
    assert len(out[3]) == 64
    assert out[4:6] == ["--checkpoint-dir", str(tmp_path / "ck")]
    assert out[6:-1] == ["--socket", str(app / "s.sock"), "--workers", "2", "--no-checkpoint",
                         "--grace", "1.5", f"{app}/app.py:handler"]
    again = subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, check=True).stdout
    assert again.split("\n")[3] == out[3]
    bad = subprocess.run([sys.executable, "-m", "beam", "serve", "missing.py:f"], cwd=app, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "not found" in bad.stderr


def test_help_and_version():
    for args in ([], ["serve"], ["call"], ["checkpoints"], ["checkpoints", "ls"], ["checkpoints", "rm"],
                 ["doctor"]):
        p = subprocess.run([sys.executable, "-m", "beam", *args, "--help"], env=ENV,
                           capture_output=True, text=True)
        assert p.returncode == 0 and "usage: beam" in p.stdout, args
    p = subprocess.run([sys.executable, "-m", "beam", "--version"], env=ENV, capture_output=True, text=True)
    assert p.stdout.strip() == "beam 0.1.0"


def test_doctor_runs(tmp_path):
    env = {**ENV, "BEAM_WORKER_BINARY": str(_fake_worker(tmp_path))}
    p = subprocess.run([sys.executable, "-m", "beam", "doctor", "--dir", str(tmp_path / "ck")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), p.stderr
    assert "OK    worker:" in p.stdout and "beam-worker 9.9" in p.stdout
    assert "checkpoint dir:" in p.stdout and "gpu:" in p.stdout


def _fake_ckpt_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    now = time.time()
    for key, app, status in (("a" * 64, "app.py:f", "ready"), ("ab" + "c" * 62, "other.py:g", "ready")):
        (d / key).mkdir()
        (d / key / "manifest.json").write_text(json.dumps({
            "key": key, "status": status, "created": now - 3600, "app": app, "python_version": "3.11",
            "worker_version": "1", "image_bytes": 3 * 2**20, "profile": {}}))
    (d / ("e" * 64 + ".failed")).write_text(json.dumps({"reason": "dump failed", "time": now - 60}))
    (d / (".tmp-" + "f" * 64)).mkdir()
    (d / "1234nomanifest").mkdir()
    return d


def test_checkpoints_ls(tmp_path, capsys):
    d = _fake_ckpt_dir(tmp_path)
    assert cli.main(["checkpoints", "ls", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    # KEY, then COMPAT: "-" for manifests from before the compatibility key
    assert re.search(r"aaaaaaaaaaaa +- +ready", out) and "3.0" in out and "1h" in out
    assert re.search(r"eeeeeeeeeeee +- +failed", out) and re.search(r"ffffffffffff +- +incomplete", out)
    assert cli.main(["checkpoints", "ls", "--dir", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_key = {e["key"]: e for e in data["entries"]}
    assert by_key["a" * 64]["bytes"] == 3 * 2**20 and by_key["a" * 64]["app"] == "app.py:f"
    assert by_key["e" * 64]["status"] == "failed" and by_key["e" * 64]["reason"] == "dump failed"
    assert by_key["f" * 64]["status"] == "incomplete"
    assert by_key["1234nomanifest"]["status"] == "incomplete"
    assert cli.main(["checkpoints", "ls", "--dir", str(tmp_path / "none")]) == 0
    assert "no checkpoints" in capsys.readouterr().out


def test_checkpoints_rm(tmp_path, capsys):
    d = _fake_ckpt_dir(tmp_path)
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "a"]) == 1  # ambiguous: aaa…, abc…
    assert "ambiguous" in capsys.readouterr().err and (d / ("a" * 64)).exists()
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "zz"]) == 1
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "--failed"]) == 0
    assert "removed eeeeeeeeeeee" in capsys.readouterr().out
    assert not (d / ("e" * 64 + ".failed")).exists()
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "--stale", "-n"]) == 0
    assert (d / (".tmp-" + "f" * 64)).exists()
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "--stale"]) == 0
    assert sorted(os.listdir(d)) == ["a" * 64, "ab" + "c" * 62]
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "aa", "abc"]) == 0
    assert os.listdir(d) == []
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "--all", "--failed"]) == 1


def test_checkpoints_rm_stale_for_app(tmp_path, monkeypatch, capsys):
    d = _fake_ckpt_dir(tmp_path)
    monkeypatch.setattr(cli, "_current_key", lambda *a, **k: "a" * 64)
    monkeypatch.chdir(tmp_path)
    # abc… belongs to another app: kept; aaa… is app.py:f's current key: kept.
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "--stale", "--app", "app.py:f"]) == 0
    assert sorted(os.listdir(d)) == ["a" * 64, "ab" + "c" * 62]
    monkeypatch.setattr(cli, "_current_key", lambda *a, **k: "0" * 64)
    assert cli.main(["checkpoints", "rm", "--dir", str(d), "--stale", "--app", "app.py:f"]) == 0
    assert os.listdir(d) == ["ab" + "c" * 62]


# ------------------------------------------------------------------------- client
def test_parse_address():
    assert parse_address("unix:///tmp/a.sock") == ("unix", "/tmp/a.sock")
    assert parse_address("tcp://127.0.0.1:8765") == ("tcp", ("127.0.0.1", 8765))
    assert parse_address("tcp://[::1]:80/") == ("tcp", ("::1", 80))
    assert parse_address("localhost:9000") == ("tcp", ("localhost", 9000))
    assert parse_address("/run/x.sock") == ("unix", "/run/x.sock")
    assert parse_address("rel.sock") == ("unix", os.path.abspath("rel.sock"))
    for bad in ("", "unix://rel.sock", "tcp://host", "tcp://h:99999", "http://x:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


def _read_exact(f, n):
    data = f.read(n)
    return data if data is not None and len(data) == n else None


class _Handler(socketserver.StreamRequestHandler):
    """Speaks the worker protocol: echo kwargs; a few magic kwargs misbehave on purpose."""

    def handle(self):
        self.server.connections += 1
        held = []
        barrier = 0
        while True:
            head = _read_exact(self.rfile, 4)
            if head is None:
                return
            body = _read_exact(self.rfile, struct.unpack(">I", head)[0])
            req = msgpack.unpackb(body, raw=False, strict_map_key=False)
            self.server.seen.append(req)
            kw = req.get("kwargs") or {}
            rid = req.get("id")
            if req.get("type") == "ping":
                resp = {"id": rid, "ok": True, "result": "pong"}
            elif req.get("type") == "stats":
                resp = {"id": rid, "ok": True, "result": {"pid": os.getpid(), "requests": len(self.server.seen)}}
            elif kw.get("close"):
                return
            elif kw.get("fail"):
                resp = {"id": rid, "ok": False, "task_id": "t-1",
                        "error": {"type": "ValueError", "message": "boom", "traceback": "Traceback: boom"}}
            elif kw.get("wrong_id"):
                resp = {"id": 424242, "ok": True, "result": None}
            elif kw.get("sleep"):
                time.sleep(kw["sleep"])
                resp = {"id": rid, "ok": True, "result": "late"}
            else:
                resp = {"id": rid, "ok": True, "task_id": f"t-{rid}", "result": kw}
            barrier = max(barrier, kw.get("barrier", 0))
            held.append(resp)
            if len(held) >= barrier:  # with a barrier, answer only once N requests arrived
                for r in held:
                    data = msgpack.packb(r, use_bin_type=True)
                    self.wfile.write(struct.pack(">I", len(data)) + data)
                held = []


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(params=["unix", "tcp"])
def server(request, tmp_path):
    if request.param == "unix":
        srv = _UnixServer(str(tmp_path / "s.sock"), _Handler)
        address = f"unix://{tmp_path / 's.sock'}"
    else:
        srv = _TCPServer(("127.0.0.1", 0), _Handler)
        address = f"tcp://127.0.0.1:{srv.server_address[1]}"
    srv.seen, srv.connections, srv.address = [], 0, address
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_client_call_ping_stats(server):
    with Client(server.address, timeout=5) as c:
        assert c.call(x=1, data=b"\x00\xff", s="é", nested={"a": [1, 2.5, None]}) == \
            {"x": 1, "data": b"\x00\xff", "s": "é", "nested": {"a": [1, 2.5, None]}}
        info = c.call_with_info(x=2)
        assert info["ok"] is True and info["result"] == {"x": 2} and info["task_id"].startswith("t-")
        assert c.ping() == "pong"
        assert c.stats()["pid"] == os.getpid()
        c.call(self=1)  # a kwarg named self reaches the handler
    ids = [r["id"] for r in server.seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    assert server.seen[0]["kwargs"]["data"] == b"\x00\xff"  # bin type on the wire


def test_client_remote_error(server):
    with Client(server.address, timeout=5) as c:
        with pytest.raises(beam.RemoteError) as ei:
            c.call(fail=True)
        e = ei.value
        assert (e.type, e.message, e.remote_traceback, e.task_id) == ("ValueError", "boom", "Traceback: boom", "t-1")
        assert c.call_with_info(fail=True)["error"]["type"] == "ValueError"
        assert c.call(x=3) == {"x": 3}  # the connection stays usable


def test_client_pipeline_order(server):
    with Client(server.address, timeout=5) as c:
        calls = [{"i": i, "barrier": 50} for i in range(50)]  # server answers after all 50 arrive
        calls[7] = {"fail": True, "barrier": 50}
        out = c.pipeline(calls)
        assert [r["i"] for k, r in enumerate(out) if k != 7] == [i for i in range(50) if i != 7]
        assert isinstance(out[7], beam.RemoteError) and out[7].type == "ValueError"
        assert server.connections == 1


def test_client_pipeline_large_does_not_deadlock(server):
    blob = b"x" * 200_000
    with Client(server.address, timeout=10) as c:
        out = c.pipeline([{"i": i, "blob": blob} for i in range(100)])  # ~20 MB each way
    assert [r["i"] for r in out] == list(range(100)) and all(r["blob"] == blob for r in out)


def test_client_connection_closed_and_reconnect(server):
    c = Client(server.address, timeout=5)
    with pytest.raises(beam.ConnectionClosed):
        c.call(close=True)
    assert c.call(x=1) == {"x": 1}  # reconnected
    with pytest.raises(beam.ConnectionClosed) as ei:
        c.pipeline([{"x": 1}, {"close": True}, {"x": 3}])
    assert ei.value.results == [{"x": 1}]
    assert c.ping() == "pong"
    assert server.connections == 3
    c.close()
    with pytest.raises(beam.BeamError):
        c.call(x=1)


def test_client_id_mismatch_and_timeout(server):
    c = Client(server.address, timeout=0.3)
    with pytest.raises(beam.BeamError, match="does not match"):
        c.call(wrong_id=True)
    with pytest.raises(beam.TimeoutError):
        c.call(sleep=1.0)
    c.timeout = 5
    assert c.call(x=1) == {"x": 1}
    c.close()


def test_client_connect_refused(tmp_path):
    with pytest.raises(OSError):
        Client(f"unix://{tmp_path}/nobody.sock")


def test_cli_call(server, capsys):
    assert cli.main(["call", server.address, '{"x": 1, "y": [1, 2]}']) == 0
    assert json.loads(capsys.readouterr().out) == {"x": 1, "y": [1, 2]}
    assert cli.main(["call", server.address, "--ping"]) == 0
    assert json.loads(capsys.readouterr().out) == "pong"
    assert cli.main(["call", server.address, "--stats"]) == 0
    assert "pid" in json.loads(capsys.readouterr().out)
    assert cli.main(["call", server.address, '{"fail": true}']) == 1
    err = capsys.readouterr().err
    assert "ValueError: boom" in err and "Traceback: boom" in err
    assert cli.main(["call", server.address, "[1]"]) == 1
    assert "must be an object" in capsys.readouterr().err


def test_cli_call_bytes_as_base64(server, capsys, monkeypatch):
    from beam import client as client_mod

    monkeypatch.setattr(client_mod.Client, "call", lambda self, **kw: {"b": b"\x01\x02", b"k": 1})
    assert cli.main(["call", server.address]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"b": "AQI=", "aw==": 1} and "base64" in cap.err
