"""First contact, the way a new user goes: `python -m beam serve app.py:predict` from a
shell that exports its secrets and credentials, without PYTHONUNBUFFERED, as root with
and without CAP_SYS_ADMIN, restarted with other options. Real CRIU dumps and restores.

PYTHONUNBUFFERED is removed from the environment on purpose: a test that forces it hides
lost output (it is set on some CI machines)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict

import pytest

from beam.client import RemoteError
from usercli import app_copy


SECRET_READ = "sEcReT-read-in-on-start-5b1f0c9d7e"
SECRET_UNREAD = "sEcReT-never-read-a83e11f4c2"
UNDECLARED = "AKIA-undeclared-credential-77d02e"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU checkpoints need root")


@pytest.fixture
def app(workdir):
    return app_copy(workdir, "user_app.py")


def user_shell(**more: str) -> Dict[str, str]:
    return {"USER_SECRET_READ": SECRET_READ, "USER_SECRET_UNREAD": SECRET_UNREAD,
            "USER_UNDECLARED": UNDECLARED, **more}


@needs_root
def test_no_secret_and_no_undeclared_variable_in_any_image_file_or_log(serve_cli, workdir, app):
    s = serve_cli(app, user_shell())
    assert "checkpoint written" in s.log()
    env = s.call()["env"]
    assert env["USER_SECRET_READ"] == SECRET_READ and env["USER_SECRET_UNREAD"] == SECRET_UNREAD
    assert env["USER_DECLARED"] == "declared"
    assert env["USER_UNDECLARED"] is None, "an undeclared variable reached the app"
    assert s.stop() == 0
    files = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.name.startswith("pages-") for p in files)
    for value in (SECRET_READ, SECRET_UNREAD, UNDECLARED):
        for p in files + [s.log_path]:
            assert value.encode() not in p.read_bytes(), f"{value} found in {p}"
    # Told by name (never by value) what the app does not see.
    assert "USER_UNDECLARED" in s.log() and "not passed to the app" in s.log()

    # A restore gets today's secret values, and still no undeclared variable.
    s2 = serve_cli(app, user_shell(USER_SECRET_READ="rotated-" + SECRET_READ))
    assert "restored from checkpoint" in s2.log()
    env = s2.call()["env"]
    assert env["USER_SECRET_READ"] == "rotated-" + SECRET_READ
    assert env["USER_UNDECLARED"] is None and env["USER_DECLARED"] == "declared"


@needs_root
def test_pass_env_gives_the_app_a_variable_and_keys_the_image_on_it(serve_cli, workdir, app):
    s = serve_cli(app, user_shell(), "--pass-env", "USER_UNDECLARED")
    assert s.call()["env"]["USER_UNDECLARED"] == UNDECLARED
    s.stop()
    s = serve_cli(app, user_shell(USER_UNDECLARED="other"), "--pass-env",
              "USER_UNDECLARED")
    assert "mode=cold" in s.log(), "a passed variable is read at import: a new value, a new image"
    assert s.call()["env"]["USER_UNDECLARED"] == "other"


DROP_SYS_ADMIN = ["capsh", "--drop=cap_sys_admin", "--"]  # a default container's lack


@needs_root
def test_serves_without_cap_sys_admin_and_says_what_is_missing(serve_cli, workdir, app):
    assert shutil.which("capsh"), "scripts/install-deps.sh installs capsh (libcap2-bin)"
    s = serve_cli(app, user_shell(), wrap=DROP_SYS_ADMIN)
    log = s.log()
    assert "checkpointing off, serving cold" in log and "CAP_SYS_ADMIN" in log
    assert "cannot start the host" not in log
    for _ in range(3):
        assert s.call()["token_len"] == len(SECRET_READ)
    assert s.call()["env"]["USER_UNDECLARED"] is None
    assert s.stop() == 0
    assert not any((workdir / "checkpoints").rglob("pages-*.img"))

    doctor = subprocess.run([*DROP_SYS_ADMIN, "-c", f"{shlex.quote(sys.executable)} -m beam doctor"],
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 1
    assert "FAIL  pid namespace" in doctor.stdout and "CAP_SYS_ADMIN" in doctor.stdout


@needs_root
def test_restored_replica_runs_with_todays_options_and_environment(serve_cli, workdir, app):
    s = serve_cli(app, user_shell(TZ="UTC"))
    assert "checkpoint written" in s.log()
    assert s.call(big=10_000)["pad"]  # the default --max-frame takes it
    s.stop()

    s = serve_cli(app, user_shell(TZ="Asia/Tokyo"), "--max-frame", "4096",
              "--json-logs", "--grace", "1")
    assert "restored from checkpoint" in s.log()
    env = s.call()["env"]
    assert env["TZ"] == "Asia/Tokyo", "a live variable keeps the image's value after restore"
    with pytest.raises(RemoteError) as err:  # today's --max-frame, not the image's 64 MiB
        s.call(say="x" * 10_000)
    assert "frame" in str(err.value).lower() or "large" in str(err.value).lower()
    assert s.call()["token_len"] == len(SECRET_READ)
    with pytest.raises(Exception):
        s.call(crash=True)  # the host logs the replacement: in JSON, as asked today
    line = next(json.loads(l) for l in s.wait_for("replacing it").splitlines()
                if "replacing it" in l)
    assert "worker 0" in line["msg"] and line["who"] == "beam"
    # A call that outlives the grace period: today's --grace 1 cuts it, not the image's 10 s.
    slow = threading.Thread(target=lambda: pytest.raises(Exception, s.call, sleep=30), daemon=True)
    slow.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    s.stop()
    # (the image's 10 s would run into the supervisor's SIGKILL at grace + 5 = 6 s)
    assert time.monotonic() - t0 < 4, "today's --grace 1 was not applied"

    # A variable read at import (thread pools) is part of the image: a new value boots cold.
    s = serve_cli(app, user_shell(TZ="UTC", OMP_NUM_THREADS="1"))
    assert "mode=cold" in s.log()
    assert s.call()["env"]["OMP_NUM_THREADS"] == "1"


@needs_root
def test_output_is_line_buffered_flushed_once_and_atexit_runs(serve_cli, workdir, app):
    s = serve_cli(app, user_shell())
    assert s.log().count("on-start-printed-this-once") == 1
    s.call(say="handler-said-hello")
    s.wait_for("handler-said-hello", timeout=5)  # while serving, no flush in the handler
    assert s.stop() == 0
    assert "atexit-ran-in-worker" in s.log()

    s = serve_cli(app, user_shell())
    assert "restored from checkpoint" in s.log()
    s.call(say="restored-said-hello")
    s.wait_for("restored-said-hello", timeout=5)
    assert s.stop() == 0
    assert "on-start-printed-this-once" not in s.log(), "on_start's buffer was in the image"


LEAKY_APP = '''
import os
from beam import endpoint

def load():
    return {"kept": os.environ["USER_SECRET_READ"]}  # a copy that outlives on_start

@endpoint(on_start=load, checkpoint_enabled=True, secrets=["USER_SECRET_READ"])
def predict(context):
    return len(context.on_start_value["kept"])
'''


@needs_root
def test_an_image_that_would_hold_a_secret_is_never_kept(serve_cli, workdir):
    path = workdir / "leaky" / "app.py"
    path.parent.mkdir()
    path.write_text(LEAKY_APP)
    s = serve_cli(path, user_shell())
    log = s.log()
    assert "the value of secret USER_SECRET_READ is in the image" in log
    assert "serving without one" in log and SECRET_READ not in log
    assert s.call() == len(SECRET_READ)  # still serving, cold
    s.stop()
    for p in (workdir / "checkpoints").rglob("*"):
        assert not p.is_file() or SECRET_READ.encode() not in p.read_bytes(), p
    assert not any((workdir / "checkpoints").rglob("pages-*.img"))
