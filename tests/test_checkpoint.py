"""Checkpoint and restore with real CRIU (issue 3). CI runs as root: nothing here skips.

Each test boots an app cold (CRIU dumps it after on_start), then starts again and
checks what the restored replica does. The checkpoint root is per test (conftest)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import APPS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.timeout(180)

SECRET = "s3cr3t-VALUE-7f3a9c1d2e4b"


def test_criu_is_usable():
    """A missing or broken CRIU must fail CI, not skip the checkpoint tests."""
    assert os.geteuid() == 0, "checkpoint tests need root"
    r = subprocess.run([sys.executable, "-m", "beam", "doctor"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_criu_search_for_the_worker_and_python(tmp_path):
    """The criu path is decided once, in C (bw_ckpt_find_criu): `beam doctor` and the
    tests ask `beam-worker --print-criu`. $BEAM_CRIU counts only when executable;
    --criu wins over everything."""
    from beam._paths import find_criu, worker_binary

    def ask(*args, **env):
        p = subprocess.run([worker_binary(), "--print-criu", *args], capture_output=True,
                           text=True, env={**os.environ, **env})
        return p.returncode, p.stdout.strip()

    rc, default = ask()
    assert rc == 0 and os.access(default, os.X_OK)
    assert find_criu() == (default, "")
    # What it picks without $BEAM_CRIU: the suite may itself run with BEAM_CRIU set
    # (a patched criu under test), and then that is `default`.
    rc, unset = ask(BEAM_CRIU="")
    assert rc == 0 and os.access(unset, os.X_OK)
    mine = tmp_path / "criu"
    mine.write_text("#!/bin/sh\n")
    assert ask(BEAM_CRIU=str(mine)) == (0, unset)  # not executable: skipped
    mine.chmod(0o755)
    assert ask(BEAM_CRIU=str(mine)) == (0, str(mine))
    assert ask("--criu", "/opt/x/criu", BEAM_CRIU=str(mine)) == (0, "/opt/x/criu")


@pytest.fixture
def ckpt_env(workdir):
    return {
        "CKPT_COUNTER_FILE": str(workdir / "counter"),
        "CKPT_EVENTS_FILE": str(workdir / "events"),
        "BEAM_TEST_SECRET": SECRET,
    }


def start_ckpt(start_worker, workdir, env, name="s", *extra, key="k1", app="ckpt_app.py:predict"):
    sock = workdir / f"{name}.sock"
    return start_worker(app, "--socket", str(sock), "--checkpoint-key", key, *extra, env=env)


def on_start_runs(workdir) -> int:
    p = workdir / "counter"
    return len(p.read_text().splitlines()) if p.exists() else 0


def ckpt_dir(workdir, key="k1") -> Path:
    return workdir / "checkpoints" / key


def test_cold_boot_writes_image_and_restore_skips_on_start(start_worker, workdir, ckpt_env):
    w1 = start_ckpt(start_worker, workdir, ckpt_env, "a")
    assert "checkpoint written" in w1.log()
    before = w1.client().call()
    assert before["digest"] == before["expected"]
    assert w1.stop() == 0

    d = ckpt_dir(workdir)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["key"] == "k1"
    assert manifest["image_bytes"] > 1 << 20
    assert manifest["config"]["secrets"] == ["BEAM_TEST_SECRET"]
    assert {"interpreter_init_ms", "import_ms", "on_start_ms"} <= set(manifest["profile"])

    w2 = start_ckpt(start_worker, workdir, ckpt_env, "b")
    assert "restored from checkpoint" in w2.log()
    assert "mode=restore" in w2.log()
    after = w2.client().call()
    assert on_start_runs(workdir) == 1
    # Memory built by on_start is there, bit for bit, without running on_start again.
    assert after["digest"] == before["digest"] == after["expected"]
    assert after["token_len"] == len(SECRET)
    assert after["container_id"] != before["container_id"]
    # env={} and secrets are back in the environment after the restore.
    assert after["mode"] == "on"
    assert after["secret_now"] == SECRET
    stats = w2.client().stats()
    assert stats["restored"] is True
    assert stats["profile"]["mode"] == "restore" and stats["profile"]["criu_restore_ms"] > 0


def test_hooks_run_in_documented_order(start_worker, workdir, ckpt_env):
    start_ckpt(start_worker, workdir, ckpt_env, "a").stop()
    start_ckpt(start_worker, workdir, ckpt_env, "b").stop()
    events = [line.split()[0] for line in (workdir / "events").read_text().splitlines()]
    assert events == ["before_checkpoint:second", "before_checkpoint:first",
                      "after_restore:a", "after_restore:b"]


def test_image_files_are_private(start_worker, workdir, ckpt_env):
    start_ckpt(start_worker, workdir, ckpt_env).stop()
    root = workdir / "checkpoints"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for p in ckpt_dir(workdir).rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is mode {mode:o}"


def test_secret_never_in_image_and_fresh_after_restore(start_worker, workdir, ckpt_env):
    w1 = start_ckpt(start_worker, workdir, ckpt_env, "a")
    assert w1.client().call()["secret_now"] == SECRET
    w1.stop()
    needle = SECRET.encode()
    files = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.name.startswith("pages-") for p in files)
    for p in files:
        assert needle not in p.read_bytes(), f"secret found in {p}"
    assert needle not in w1.log_path.read_bytes()
    # A restore gets the value of *this* start, not the one the image was made with.
    env = dict(ckpt_env, BEAM_TEST_SECRET="rotated-" + SECRET)
    w2 = start_ckpt(start_worker, workdir, env, "b")
    assert "restored from checkpoint" in w2.log()
    assert w2.client().call()["secret_now"] == "rotated-" + SECRET


def test_three_replicas_from_one_image_serve_concurrently(start_worker, workdir, ckpt_env):
    start_ckpt(start_worker, workdir, ckpt_env, "seed").stop()
    replicas = [start_ckpt(start_worker, workdir, ckpt_env, f"r{i}") for i in range(3)]
    results = {}

    def hammer(i, w):
        with w.client() as c:
            results[i] = [c.call() for _ in range(20)]

    threads = [threading.Thread(target=hammer, args=(i, w)) for i, w in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all("restored from checkpoint" in w.log() for w in replicas)
    assert on_start_runs(workdir) == 1
    assert len(results) == 3 and all(len(r) == 20 for r in results.values())
    firsts = [r[0]["random"] for r in results.values()]
    assert len(set(firsts)) == 3, "replicas must not share random streams"
    assert len({r[0]["container_id"] for r in results.values()}) == 3
    assert all(x["digest"] == x["expected"] for r in results.values() for x in r)


def _corrupt_metadata(d: Path):
    core = next(p for p in (d / "img").iterdir() if p.name.startswith("core-"))
    data = bytearray(core.read_bytes())
    data[len(data) // 2] ^= 0xFF
    core.write_bytes(bytes(data))


def _truncate_pages(d: Path):
    pages = next(p for p in (d / "img").iterdir() if p.name.startswith("pages-"))
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)


def _delete_images(d: Path):
    for p in (d / "img").iterdir():
        p.unlink()


def _flip_page_byte(d: Path):
    """One byte of page data, same size: only the XXH3 of the file can tell."""
    with open(d / "img" / "pages-1.img", "r+b") as f:
        f.seek(f.seek(0, os.SEEK_END) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("damage,named", [(_corrupt_metadata, "core-"), (_truncate_pages, "pages-"),
                                          (_delete_images, "image file"),
                                          (_flip_page_byte, "pages-1.img")])
def test_damaged_image_boots_cold_and_rechecks(start_worker, workdir, ckpt_env, damage, named):
    start_ckpt(start_worker, workdir, ckpt_env, "a").stop()
    damage(ckpt_dir(workdir))
    w = start_ckpt(start_worker, workdir, ckpt_env, "b")
    log = w.log()
    unusable = next((l for l in log.splitlines() if "checkpoint unusable" in l), "")
    assert named in unusable and "booting cold" in unusable, log
    assert "mode=cold" in log and "checkpoint written" in log
    assert w.client().call()["digest"]
    assert on_start_runs(workdir) == 2
    w.stop()
    # The fresh image is good again.
    w3 = start_ckpt(start_worker, workdir, ckpt_env, "c")
    assert "restored from checkpoint" in w3.log()
    assert on_start_runs(workdir) == 2


@pytest.fixture
def external_server():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield str(srv.getsockname()[1])
    srv.close()


def test_checkpoint_failure_keeps_serving_and_is_not_retried(start_worker, workdir, external_server):
    env = {"CKPT_EXTERNAL_PORT": external_server}
    w1 = start_ckpt(start_worker, workdir, env, "a", app="ckpt_unsupported.py:predict")
    log = w1.log()
    assert "checkpoint failed, serving without one" in log
    assert w1.client().call() == "still serving"
    w1.stop()
    marker = workdir / "checkpoints" / "k1.failed"
    assert json.loads(marker.read_text())["reason"]
    assert not ckpt_dir(workdir).exists()
    assert not list((workdir / "checkpoints").glob(".tmp-*")), "half-written image left behind"

    w2 = start_ckpt(start_worker, workdir, env, "b", app="ckpt_unsupported.py:predict")
    assert "failed before" in w2.log() and "checkpointing" not in w2.log()
    assert w2.client().call() == "still serving"
    w2.stop()

    w3 = start_ckpt(start_worker, workdir, env, "c", "--retry-checkpoint",
                    app="ckpt_unsupported.py:predict")
    assert "checkpointing" in w3.log() and "checkpoint failed" in w3.log()
    assert w3.client().call() == "still serving"


def test_missing_criu_binary_is_a_clear_error(start_worker, workdir, ckpt_env):
    w = start_ckpt(start_worker, workdir, ckpt_env, "a", "--criu", "/nonexistent/criu")
    assert "checkpoint failed" in w.log()
    assert w.client().call()["digest"]


def test_hanging_criu_times_out(start_worker, workdir, ckpt_env):
    fake = workdir / "criu-hangs"
    fake.write_text("#!/bin/sh\nsleep 600\n")  # a child keeps the RPC socket open
    fake.chmod(0o755)
    w = start_ckpt(start_worker, workdir, ckpt_env, "a", "--criu", str(fake),
                   "--criu-timeout", "2")
    log = w.log()
    assert "timed out after 2s" in log
    assert w.client().call()["digest"]


def test_criu_version_is_asked_once_per_binary(serve_cli, workdir):
    """`criu --version` (the image's compatibility key) is a fork and exec on every start,
    restores included: it is kept per criu binary in the checkpoint root and asked again
    only when the binary changes. The restore it feeds must still work."""
    from test_router import real_criu
    from usercli import app_copy
    calls, fake = workdir / "criu-calls", workdir / "criu-counting"
    fake.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec {real_criu()} "$@"\n')
    fake.chmod(0o755)
    versions = lambda: calls.read_text().split().count("--version")  # noqa: E731
    app, shell = app_copy(workdir, "user_app.py"), {"USER_SECRET_READ": "s3cr3t-for-on-start"}
    s = serve_cli(app, shell, "--criu", str(fake))
    assert "checkpoint written" in s.log()
    assert s.stop() == 0
    assert versions() == 1
    s = serve_cli(app, shell, "--criu", str(fake))
    assert "restored from checkpoint" in s.log()
    assert s.stop() == 0
    assert versions() == 1, "asked again although the binary is the same"
    cache = workdir / "checkpoints" / ".criu-version"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    said = subprocess.run([real_criu(), "--version"], capture_output=True, text=True).stdout
    assert f"Version: {cache.read_text().split()[-1]}\n" in said
    os.utime(fake, ns=(0, 10**18))  # a new binary in place
    s = serve_cli(app, shell, "--criu", str(fake))
    assert "restored from checkpoint" in s.log()
    assert versions() == 2


def test_unsafe_checkpoint_dir_is_refused(start_worker, workdir, ckpt_env):
    root = workdir / "checkpoints"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    w = start_ckpt(start_worker, workdir, ckpt_env, "a")
    assert "refusing checkpoint dir" in w.log()
    assert "checkpoint written" not in w.log()
    assert w.client().call()["digest"]


def test_serve_cli_keys_on_source(workdir, ckpt_env):
    """`beam serve` computes the key: same source restores, edited source boots cold."""
    app = workdir / "app" / "app.py"
    app.parent.mkdir()
    app.write_text((APPS / "ckpt_app.py").read_text())
    env = dict(os.environ, **ckpt_env, BEAM_CHECKPOINT_DIR=str(workdir / "checkpoints"),
               BEAM_VOLUME_ROOT=str(workdir / "volumes"), PYTHONUNBUFFERED="1")

    def serve(tag):
        from conftest import Worker
        sock = workdir / f"{tag}.sock"
        cmd = [sys.executable, "-m", "beam", "serve", f"{app}:predict", "--socket", str(sock)]
        log = workdir / f"{tag}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        w = Worker.__new__(Worker)
        w.proc, w.log_path, w.addresses = p, log, []
        w.wait_for("ready:", 90)
        text = w.log()
        w.stop()
        return text

    assert "checkpoint written" in serve("one")
    assert "restored from checkpoint" in serve("two")
    app.write_text(app.read_text() + "\n# a change\n")
    three = serve("three")
    assert "mode=cold" in three and "checkpoint written" in three
    keys = [p for p in (workdir / "checkpoints").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(keys) == 2


def test_failing_before_checkpoint_hook_serves_without_image(start_worker, workdir):
    w = start_ckpt(start_worker, workdir, {}, "a", app="ckpt_badhook.py:predict")
    log = w.log()
    assert "not checkpointing, serving without one" in log
    assert "cannot close the database" in log
    assert w.client().call() == 42
    assert (workdir / "checkpoints" / "k1.failed").exists()
    assert not ckpt_dir(workdir).exists()


def test_mmapped_weights_stay_out_of_the_image(serve_cli, workdir):
    """examples/weights_mmap: 256 MiB mapped read-only from a Volume file are clean
    file-backed pages, which CRIU does not copy: the image stays small, and the restored
    replica reads the same bytes through its restored mapping without running on_start."""
    import numpy as np
    app = EXAMPLES / "weights_mmap" / "app.py"
    env = {"WEIGHTS_MB": "256"}
    s = serve_cli(app, env, "--pass-env", "WEIGHTS_MB")
    assert "checkpoint written" in s.log()
    first = s.call(index=12345, full=True)
    assert s.stop() == 0
    (man,) = (workdir / "checkpoints").glob("*/manifest.json")
    image_bytes = json.loads(man.read_text())["image_bytes"]
    assert image_bytes < 64 << 20, f"image holds the mapped weights: {image_bytes} bytes"

    s = serve_cli(app, env, "--pass-env", "WEIGHTS_MB")
    assert "restored from checkpoint" in s.log()
    again = s.call(index=12345, full=True)
    assert again == first  # "loaded" is on_start's random token: it did not run again
    (npy,) = (workdir / "volumes").rglob("weights-256mb.npy")
    w = np.load(npy, mmap_mode="r")
    assert w.size == 256 << 18 and again["value"] == float(w[12345])
    assert again["full_sha256"] == hashlib.sha256(memoryview(w).cast("B")).hexdigest()
