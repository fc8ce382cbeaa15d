"""Security checks (issue 6): loopback-only defaults, private sockets and checkpoint
directories, secrets kept out of logs and images, HTTP auth bypass attempts, and hostile
inputs (deep nesting, huge declared sizes, oversized headers) rejected without memory
blow-ups. Limits are documented in docs/reliability.md.

Covered elsewhere, not repeated here: image files 0600 and the root 0700
(test_checkpoint.py::test_image_files_are_private), a world-writable root refused
(::test_unsafe_checkpoint_dir_is_refused), the secret absent from every image file
(::test_secret_never_in_image_and_fresh_after_restore), missing/wrong/short/long tokens and
the scheme's case (test_http.py::test_auth), nesting just past 32 levels and frames above
--max-frame (test_errors.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beam.client import Client
from conftest import APPS, ROOT, worker_binary
from wire import connect, raw_frame, recv_frame

pytestmark = pytest.mark.timeout(90)

APP = "rel_app.py:handler"
TOKEN = "sec-" + "9c" * 20
SECRET = "hunter2-" + "ab" * 12


def _load_soak():
    if "soak" not in sys.modules:  # not via sys.path: bench/http.py would shadow http
        spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["soak"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["soak"]


soak = _load_soak()


def http_port(w) -> int:
    m = re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", w.log())
    assert m, w.log()
    return int(m.group(1))


def http_raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server sends until it closes the connection
    (the last request carries "Connection: close", a refused one closes it anyway)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        s.sendall(data)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass  # refused mid-upload: what was answered before is in out
    finally:
        s.close()
    return out


def statuses(resp: bytes):
    return [int(x) for x in re.findall(rb"HTTP/1\.1 (\d{3}) ", resp)]


def post(body: bytes = b'{"value": 1}', auth_lines=(), path: str = "/", close: bool = True) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(line + "\r\n" for line in auth_lines)
    head += "Connection: close\r\n" if close else ""
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


def the_worker_pid(w, address: str) -> int:
    with Client(address, timeout=10) as c:
        return soak.real_pid(w.proc.pid, c.stats()["pid"])


# ---- defaults: loopback only, private sockets -------------------------------------------------


# In a fresh network namespace: bring lo up (SIOCSIFFLAGS: IFF_UP | IFF_LOOPBACK |
# IFF_RUNNING; no iproute2 needed), then become the worker.
LO_UP_THEN_EXEC = (
    "import fcntl, os, socket, struct, sys\n"
    "s = socket.socket()\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH22s', b'lo', 0x1 | 0x8 | 0x40, b''))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n")


def _listening(pid: int):
    """(address, port) of every TCP socket in LISTEN state in pid's network namespace."""
    out = []
    for name, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/{pid}/net/{name}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state != "0A":
                    continue
                addr, port = local.split(":")
                out.append((name, addr, int(port, 16)))
    return out


@pytest.mark.parametrize("args, port", [([], 8765), (["--port", "0"], None),
                                        (["--tcp", "0"], None)],
                         ids=["no-listener-flags", "http-port", "tcp-port-only"])
def test_default_binds_are_loopback(workdir, args, port):
    """Run in a network namespace of its own, so the fixed default port is free and
    every listening socket there is the worker's."""
    log = workdir / "w.log"
    cmd = ["unshare", "-n", sys.executable, "-c", LO_UP_THEN_EXEC, worker_binary(), "--python",
           sys.executable, "--no-checkpoint", str(APPS / "rel_app.py") + ":handler", *args]
    env = dict(os.environ, BEAM_VOLUME_ROOT=str(workdir / "v"), BEAM_AUTH_TOKEN=TOKEN)
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        listening = _listening(p.pid)
        assert listening, log.read_text()
        for kind, addr, _ in listening:
            assert (kind, addr) == ("tcp", "0100007F"), f"not loopback: {listening}"
        if port:
            assert [x[2] for x in listening] == [port]
            assert "listening on tcp://127.0.0.1:8765" in log.read_text()
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def test_sockets_and_private_dirs_are_owner_only(start_worker, workdir):
    w = start_worker(APP, "--no-checkpoint", "--socket", str(workdir / "s.sock"), "--port", "0",
                     env={"BEAM_AUTH_TOKEN": TOKEN})
    st = os.stat(workdir / "s.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    # The replicas' private sockets (HTTP front -> replica) live in a 0700 directory.
    rundirs = rundirs_of(w.proc.pid)
    assert len(rundirs) == 1
    assert stat.S_IMODE(rundirs[0].stat().st_mode) == 0o700
    for s in rundirs[0].iterdir():
        assert stat.S_IMODE(s.stat().st_mode) & 0o077 == 0, s


def rundirs_of(pid: int):
    return [Path(f"/tmp/{d}") for d in os.listdir("/tmp") if d.startswith(f"beam-{pid}-")]


def test_private_dirs_of_killed_workers_are_removed_by_the_next(serve_cli, workdir):
    """kill -9 (the kubelet after its grace period, the OOM killer) leaves the front's
    private directory behind; the next worker removes those whose maker is gone, and only
    those: a live process's stays, another user's stays, and so does one whose pid runs
    no more here but whose lock is held (a worker in another PID namespace sharing /tmp)."""
    import fcntl
    from usercli import app_copy
    app, shell = app_copy(workdir, "user_app.py"), {"USER_SECRET_READ": "s3cr3t-for-on-start"}
    first = serve_cli(app, shell, "--no-checkpoint", "--port", "0", "--no-auth")
    left = rundirs_of(first.proc.pid)
    assert len(left) == 1
    first.kill()
    assert left[0].is_dir(), "SIGKILL cannot clean up; the next worker must"
    live = Path(f"/tmp/beam-{os.getpid()}-livetest")
    theirs = Path(f"/tmp/beam-{first.proc.pid}-nottheirs")
    held = Path(f"/tmp/beam-{first.proc.pid}-heldelsewhere")
    for d in (live, theirs, held):
        d.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    lock = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        second = serve_cli(app, shell, "--no-checkpoint", "--port", "0", "--no-auth")
        assert not left[0].exists()
        assert live.is_dir() and theirs.is_dir() and held.is_dir()
        mine = rundirs_of(second.proc.pid)
        assert len(mine) == 1
        # Its own is held the same way while it runs.
        probe = os.open(mine[0], os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        os.close(lock)
        for d in (live, theirs, held):
            d.rmdir()


@pytest.mark.parametrize("mode, owner", [(0o770, 0), (0o707, 0), (0o700, 65534)],
                         ids=["group-writable", "other-writable", "not-ours"])
def test_checkpoint_root_writable_by_others_is_refused(start_worker, workdir, mode, owner):
    root = workdir / "checkpoints"
    root.mkdir()
    root.chmod(mode)
    os.chown(root, owner, owner)
    w = start_worker(APP, "--socket", str(workdir / "s.sock"), "--checkpoint-key", "k1")
    assert "refusing checkpoint dir" in w.log() and "checkpoint written" not in w.log()
    assert w.client().call(value=1) == 1
    assert not list(root.iterdir())


def test_group_readable_checkpoint_root_is_tightened(start_worker, workdir):
    root = workdir / "checkpoints"
    root.mkdir()
    root.chmod(0o755)
    w = start_worker(APP, "--socket", str(workdir / "s.sock"), "--checkpoint-key", "k1")
    assert "checkpoint written" in w.log()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


# ---- secrets -------------------------------------------------------------------------------------


def test_secret_and_token_never_in_logs_or_checkpoint_files(start_worker, workdir):
    env = {"REL_SECRET": SECRET, "BEAM_AUTH_TOKEN": TOKEN}
    args = ("--socket", str(workdir / "s.sock"), "--checkpoint-key", "k1", "--port", "0")
    w1 = start_worker(APP, *args, env=env)
    assert "checkpoint written" in w1.log()
    auth = (f"Authorization: Bearer {TOKEN}",)
    ok = post(json.dumps({"op": "has_secret", "expect": SECRET}).encode(), auth)
    assert b"\r\n\r\ntrue" in http_raw(http_port(w1), ok)
    assert statuses(http_raw(http_port(w1), post(b'{"op": "nope"}', auth))) == [500]
    os.kill(soak.host_pids(w1.proc.pid)[0], signal.SIGKILL)  # a crash and a restore
    w1.wait_for("ready:", 30, count=2)
    assert b"\r\n\r\ntrue" in http_raw(http_port(w1), ok)
    w1.stop()
    w2 = start_worker(APP, *args, "--json-logs", env=env)
    assert "restored from checkpoint" in w2.log()
    assert b"\r\n\r\ntrue" in http_raw(http_port(w2), ok)
    w2.stop()
    files = [p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.endswith(".log") for p in files)
    assert any(p.name.startswith("pages-") for p in files)
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data, f"secret in {p}"
        assert TOKEN.encode() not in data, f"auth token in {p}"


# ---- HTTP auth bypass attempts ---------------------------------------------------------------


@pytest.fixture
def http_worker(start_worker, workdir):
    return start_worker(APP, "--no-checkpoint", "--port", "0", "--socket",
                        str(workdir / "s.sock"), env={"BEAM_AUTH_TOKEN": TOKEN})


@pytest.mark.parametrize("lines", [
    ["Authorization: Bearer ", f"Authorization: {TOKEN}"],        # split over two fields
    [f"Authorization: Bearer {TOKEN}", f"Authorization: Bearer {TOKEN}"],
    [f"Authorization: Bearer {TOKEN}", "Authorization: Bearer wrong"],
    ["Authorization: Bearer wrong", f"Authorization: Bearer {TOKEN}"],
    [f"Authorization: Bearer {TOKEN[:5]}", "X-Other: 1", f"Authorization: {TOKEN[5:]}"],
    [f"Authorization: Bearer  {TOKEN}"],                          # two spaces
    [f"Authorization: Bearer\t{TOKEN}"],
    [f"Authorization: Bearer {TOKEN}" + "x" * 5000],              # past the 1 KiB buffer
    [f"Authorization: Bearer {TOKEN[:-1]}" + chr(ord(TOKEN[-1]) ^ 1)],
    [f"Proxy-Authorization: Bearer {TOKEN}"],
    [f"X-Authorization: Bearer {TOKEN}"],
], ids=["split", "duplicate", "right-then-wrong", "wrong-then-right", "split-around-other",
        "double-space", "tab", "overlong", "last-char", "proxy-authorization", "x-authorization"])
def test_auth_bypass_attempts_are_refused(http_worker, lines):
    port = http_port(http_worker)
    got = statuses(http_raw(port, post(auth_lines=lines)))
    assert got in ([401], [400]), got
    assert statuses(http_raw(port, post(auth_lines=[f"Authorization: Bearer {TOKEN}"]))) == [200]


def test_auth_is_per_request_not_per_connection(http_worker):
    port = http_port(http_worker)
    good = [f"Authorization: Bearer {TOKEN}"]
    got = statuses(http_raw(port, post(auth_lines=good, close=False) + post(close=False)
                            + post(auth_lines=["Authorization: Bearer x"], close=False)
                            + post(auth_lines=good)))
    assert got == [200, 401]  # a 401 with a body ends the connection: its body is not read
    stats = [f"GET /stats HTTP/1.1\r\nHost: x\r\n{h}\r\n".encode() for h in
             (good[0] + "\r\n", "", "Authorization: Bearer x\r\n", good[0] + "\r\n")]
    got = statuses(http_raw(port, b"".join(stats) + post(auth_lines=good)))
    assert got == [200, 401, 401, 200, 200]  # without a body the connection is kept
    for path in (f"/?token={TOKEN}", f"/?access_token={TOKEN}", f"/stats?token={TOKEN}"):
        method = b"GET" if "stats" in path else b"POST"
        req = post(path=path).replace(b"POST", method, 1)
        assert statuses(http_raw(port, req)) == [401], path
    assert statuses(http_raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == [200]


# ---- hostile inputs -----------------------------------------------------------------------------


def test_deeply_nested_json_is_400_quickly(http_worker):
    port = http_port(http_worker)
    auth = [f"Authorization: Bearer {TOKEN}"]
    sup = http_worker.proc.pid
    for depth in (40, 10_000, 1_000_000):
        body = b'{"value": ' + b"[" * depth + b"]" * depth + b"}"
        t = time.monotonic()
        resp = http_raw(port, post(body, auth))
        assert statuses(resp) == [400], resp[:300]
        assert b"BadRequest" in resp
        assert time.monotonic() - t < 2
    assert soak.rss_kib(sup) < 64 * 1024
    assert statuses(http_raw(port, post(auth_lines=auth))) == [200]


def test_oversized_http_header_url_and_body_are_refused(start_worker, workdir):
    w = start_worker(APP, "--no-checkpoint", "--port", "0", "--max-body", "1048576",
                     env={"BEAM_AUTH_TOKEN": TOKEN})
    port = http_port(w)
    auth = f"Authorization: Bearer {TOKEN}"
    big_header = post(auth_lines=[auth, "X-Big: " + "a" * 200_000])
    assert statuses(http_raw(port, big_header)) == [400]
    many_headers = post(auth_lines=[auth] + [f"X-H{i}: v" for i in range(20_000)])
    assert statuses(http_raw(port, many_headers)) == [400]
    long_url = post(auth_lines=[auth], path="/" + "u" * 200_000)
    assert statuses(http_raw(port, long_url)) == [400]
    # A declared body over --max-body: refused before a byte of it is read.
    huge = (f"POST / HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: {100 << 30}\r\n\r\n").encode()
    t = time.monotonic()
    resp = http_raw(port, huge + b"{" * 1000)
    assert statuses(resp) == [413] and time.monotonic() - t < 2
    assert soak.rss_kib(w.proc.pid) < 64 * 1024
    assert statuses(http_raw(port, post(auth_lines=[auth]))) == [200]


def _nested_claims(size: int, depth: int = 28) -> bytes:
    """kwargs {x: [[[...]]]}: `depth` array32 headers, each claiming as many elements
    as bytes follow it, then nils. Each count alone fits the bytes left."""
    body = bytearray(b"\x81\xa6kwargs\x81\xa1x")
    for _ in range(depth):
        body += b"\xdd" + struct.pack(">I", size - len(body) - 5)
    return bytes(body + b"\xc0" * (size - len(body)))


HOSTILE = {
    "map32-4G": b"\xdf\xff\xff\xff\xff",
    "array32-4G": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 16,
    "kwargs-array32-2G": b"\x81\xa6kwargs\x81\xa1x\xdd\x7f\xff\xff\xff" + b"\xc0" * 64,
    "str32-4G": b"\x81\xa6kwargs\x81\xa1x\xdb\xff\xff\xff\xff" + b"a" * 64,
    "bin32-4G": b"\x81\xa6kwargs\x81\xa1x\xc6\xff\xff\xff\xff" + b"a" * 64,
    "ext32-4G": b"\x81\xa6kwargs\x81\xa1x\xc9\xff\xff\xff\xff\x01" + b"a" * 64,
    "nested-100k": b"\x81\xa6kwargs\x81\xa1x" + b"\x91" * 100_000 + b"\xc0",
    "nested-claims-1M": _nested_claims(1 << 20),
    "nested-claims-16M": _nested_claims(16 << 20),
}


def test_hostile_msgpack_is_a_bad_frame_without_memory_growth(start_worker, workdir):
    w = start_worker(APP, "--no-checkpoint", "--workers", "1", "--socket", str(workdir / "s.sock"))
    pid = the_worker_pid(w, w.unix)
    hwm0 = int(soak.status_field(pid, "VmHWM").split()[0])
    for name, body in HOSTILE.items():
        with connect(w.unix, timeout=30) as s:
            t = time.monotonic()
            s.sendall(raw_frame(body))
            resp = recv_frame(s)
            assert resp["ok"] is False and resp["error"]["type"] == "BadFrame", (name, resp)
            assert time.monotonic() - t < 2, name
            assert s.recv(1) == b""  # closed: the stream cannot be trusted any more
    assert the_worker_pid(w, w.unix) == pid, "the worker was replaced"
    assert "replacing" not in w.log()
    # Peak RSS: the 16 MiB frame's own buffer, not msgpack-c objects for its claims.
    hwm = int(soak.status_field(pid, "VmHWM").split()[0])
    assert hwm - hwm0 < 40 * 1024, f"peak RSS grew {hwm - hwm0} KiB"
    assert Client(w.unix, timeout=10).call(value=[1, 2]) == [1, 2]
