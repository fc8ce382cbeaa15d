"""Lazy and eager restore, end to end on real CRIU, through `python -m beam serve`.

Lazy: CRIU restores the process with its memory behind userfaultfd and a page daemon
(`criu lazy-pages`) fills it in while it already serves (csrc/lazy.c). What must hold:
every byte of the image ends up in the process; a daemon that dies before it is done
takes the replica with it (pages it never delivered would read as zeros) and later
restores are eager; where lazy restore cannot work, restore is eager."""
from __future__ import annotations

import errno
import http.client
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from beam._paths import find_criu
from usercli import app_copy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU checkpoints need root")


@pytest.fixture
def app(workdir):
    return app_copy(workdir, "memory_app.py")


def cold_then(serve_cli, app, *flags, ready=True):
    """Boot cold (writes the image), stop, serve again with flags: the restored replica
    (ready=False: do not wait for it to serve)."""
    env = {"MEMORY_APP_MB": "256"}
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB")
    assert "checkpoint written" in s.log()
    first = s.call(i=12345)
    assert s.stop() == 0
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", *flags, ready=ready)
    assert not ready or "restored from checkpoint" in s.log()
    return s, first


def fake_criu(workdir: Path, lazy_pages_script: str) -> str:
    """A criu that runs the real one, except for what `lazy_pages_script` does when
    called as `criu lazy-pages ...` (bash, with $REAL and "$@")."""
    real, _ = find_criu()
    path = workdir / "criu"
    path.write_text(f"#!/bin/bash\nREAL={real}\n"
                    f'if [ "$1" = lazy-pages ]; then\n{lazy_pages_script}\nfi\n'
                    'exec "$REAL" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_lazy_restore_serves_first_and_ends_bit_exact(serve_cli, app):
    s, first = cold_then(serve_cli, app, "--restore", "lazy")
    assert "restore=lazy" in s.log()
    assert s.call(i=12345) == first
    s.wait_for("all memory in", timeout=60)
    assert s.call(full=True) is True, "a page of the image did not come back"
    assert not list((Path(s.log_path).parent / "checkpoints" / ".logs").glob("lazy-*")), \
        "a finished page daemon's work directory was left behind"


def test_working_set_of_the_first_lazy_restore_is_restored_eagerly_and_bit_exact(serve_cli, app,
                                                                                 workdir):
    """The first lazy restore records the pages it faulted in; later restores, lazy and
    eager, read those from the rewritten pagemap themselves (csrc/workingset.c)."""
    s, first = cold_then(serve_cli, app, "--restore", "lazy")
    s.wait_for("working set recorded", timeout=60)
    assert s.stop() == 0
    assert list((workdir / "checkpoints").glob("*/workingset.bin"))
    env = {"MEMORY_APP_MB": "256"}
    for mode in ("lazy", "eager"):
        s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", "--restore", mode)
        log = s.log()
        assert f"restore={mode}" in log and "restored from checkpoint" in log, log
        assert s.call(i=12345) == first
        if mode == "lazy":
            s.wait_for("all memory in", timeout=60)
            assert "working set recorded" not in s.log()
        assert s.call(full=True) is True, "a page of the image did not come back"
        assert s.stop() == 0


def test_eager_restore_is_still_there(serve_cli, app):
    s, first = cold_then(serve_cli, app, "--restore", "eager")
    assert "restore=eager" in s.log() and "all memory in" not in s.log()
    assert s.call(full=True) is True


# The page daemon is frozen once the restored host has been handed to the supervisor
# (reparented to it: the restoring criu has exited, $PPID is the supervisor), or, with
# DURING, as soon as criu wrote the pidfile (the restore is still finishing); the test
# then kills it while pages are certainly still missing.
FREEZE = '''
"$REAL" "$@" &
daemon=$!
echo $daemon > {stopped}.tmp
# Builtins only, no sleep: the daemon fills 256 MiB in well under a second.
n=0
while [ $((n += 1)) -lt 5000000 ]; do
  [ -s "$5/pid" ] || continue
  [ {during} = 1 ] && break
  read -r restored < "$5/pid"
  ppid=
  while read -r k v; do [ "$k" = PPid: ] && ppid=$v && break; done < /proc/$restored/status
  [ "$ppid" = "$PPID" ] && break
done
kill -STOP $daemon
mv {stopped}.tmp {stopped}
wait $daemon
exit $?'''


@pytest.mark.parametrize("during", [0, 1], ids=["after-restore", "during-restore"])
def test_page_daemon_killed_mid_fill_kills_the_replica_and_restores_eagerly(serve_cli, app, workdir,
                                                                            during):
    stopped = workdir / "daemon.pid"
    criu = fake_criu(workdir, FREEZE.format(stopped=stopped, during=during))
    s, first = cold_then(serve_cli, app, "--restore", "lazy", "--criu", criu, ready=False)
    deadline = time.monotonic() + 30
    while not stopped.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(int(stopped.read_text()), signal.SIGKILL)
    # Dead before the supervisor holds the restored process's userfaultfd: the restore
    # fails; dead after: the replica is killed. Where the kill lands depends on when the
    # daemon received the userfaultfd, which the test cannot pin down. Both are safe.
    log = s.wait_for("restore=eager", 60)
    assert ("killing the replica, restoring eagerly from now on" in log or
            "lazy restore failed (criu restore --lazy-pages: the page daemon exited" in log), log
    assert "Segmentation fault" not in log and "booting cold" not in log, log
    s.wait_for("ready:", 30)
    assert log.count("restore=lazy") <= 1 and "restored from checkpoint" in s.wait_for("ready:", 30)
    assert s.call(full=True) is True
    assert s.call(i=12345) == first


def test_lazy_restore_of_corrupt_page_data_replaces_the_replica_with_a_cold_boot(serve_cli, app,
                                                                               workdir):
    """Page data is hashed while a lazy replica already serves (csrc/checkpoint.c): a
    mismatch found then kills it, discards the image and boots cold."""
    env = {"MEMORY_APP_MB": "256"}
    serve_cli(app, env, "--pass-env", "MEMORY_APP_MB").stop()
    pages = max((workdir / "checkpoints").glob("*/img/pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", "--restore", "lazy", ready=False)
    log = s.wait_for("(cold boot)", 60)
    assert f"checkpoint unusable (image file {pages.name} is corrupt (XXH3 mismatch)" in log, log
    assert "booting cold" in log and "restore=lazy" in log, log
    s.wait_for("checkpoint written", 60)
    assert s.call(full=True) is True


def test_without_a_working_page_daemon_restore_is_eager(serve_cli, app, workdir):
    criu = fake_criu(workdir, 'echo "userfaultfd: Operation not permitted" >&2\nexit 1')
    s, first = cold_then(serve_cli, app, "--restore", "lazy", "--criu", criu)
    log = s.log()
    assert "lazy restore failed" in log and "restore=eager" in log
    assert s.call(full=True) is True and s.call(i=12345) == first


def test_slow_dump_and_restore_report_progress_as_json_events(serve_cli, app, workdir):
    """A CRIU call that takes over a second shows progress: JSON events with --json-logs
    (on a terminal, a line redrawn in place). This criu starts 1.5 s late."""
    slow = workdir / "slow-criu"
    slow.write_text(f"#!/bin/bash\nsleep 1.5\nexec {find_criu()[0]} \"$@\"\n")
    slow.chmod(0o755)
    env = {"MEMORY_APP_MB": "64"}
    flags = ("--pass-env", "MEMORY_APP_MB", "--json-logs", "--criu", str(slow), "--restore",
             "eager")
    s = serve_cli(app, env, *flags)
    s.stop()
    s = serve_cli(app, env, *flags)
    assert s.call(full=True) is True
    events = [json.loads(line) for line in (serve_log_lines(workdir))
              if '"event":"progress"' in line]
    kinds = {e["what"] for e in events}
    assert {"checkpointing", "restoring"} <= kinds, events
    for e in events:
        assert 0 <= e["done_bytes"] <= e["total_bytes"] and e["elapsed_s"] >= 1.0, e


def serve_log_lines(workdir: Path):
    for log in sorted(workdir.glob("serve-*.log")):
        yield from log.read_text(errors="replace").splitlines()


# Like FREEZE, but the daemon itself runs as this script's pid (exec): it holds the
# userfaultfds the supervisor copies. A watcher, detached, stops it once the restored host
# is the supervisor's (the restore is over) and it holds a userfaultfd, and writes its pid.
HOLD = '''
( (
n=0
while [ $((n += 1)) -lt 5000000 ]; do
  [ -s "$5/pid" ] || continue
  read -r restored < "$5/pid"
  ppid=
  while read -r k v; do [ "$k" = PPid: ] && ppid=$v && break; done < /proc/$restored/status
  [ "$ppid" = "$PPID" ] || continue
  [ -n "$(find /proc/$$/fd -lname 'anon_inode:\\[userfaultfd\\]' 2>/dev/null)" ] && break
done
kill -STOP $$
echo $$ > {stopped}.tmp && mv {stopped}.tmp {stopped}
) & )
exec "$REAL" "$@"'''


def test_image_published_during_the_first_lazy_restore_keeps_its_own_pagemap(serve_cli, app,
                                                                              workdir):
    """A dump or a store fetch publishes a new image by renaming a directory into <key>/.
    One published while the first lazy restore's daemon still fills must not get that
    restore's working set: its pagemap stays as it was, no workingset.bin appears
    (csrc/lazy.c, record). The daemon is held stopped while the image is replaced; the new
    image is a hard-linked copy, a directory of its own as a real publish makes."""
    stopped = workdir / "daemon.pid"
    criu = fake_criu(workdir, HOLD.format(stopped=stopped))
    env = {"MEMORY_APP_MB": "256"}
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB")
    first = s.call(i=12345)
    assert s.stop() == 0
    key = next(p for p in (workdir / "checkpoints").iterdir() if (p / "img").is_dir())
    newer = workdir / "newer-image"
    subprocess.run(["cp", "-al", str(key), str(newer)], check=True)
    pagemaps = {p.name: p.read_bytes() for p in (newer / "img").glob("pagemap-*.img")}
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", "--restore", "lazy", "--criu", criu,
                  ready=False)
    deadline = time.monotonic() + 60
    while not stopped.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = int(stopped.read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nState:\tT" in status, "the page daemon was not held mid-fill: " + status
    os.rename(key, workdir / "older-image")
    os.rename(newer, key)
    os.kill(pid, signal.SIGCONT)
    s.wait_for("all memory in", 60)
    assert s.call(i=12345) == first and s.call(full=True) is True
    deadline = time.monotonic() + 30
    while not any(t in s.log() for t in ("working set recorded", "no longer holds the image")):
        assert time.monotonic() < deadline, s.log()
        time.sleep(0.02)
    assert not (key / "workingset.bin").exists(), "the older image's working set went into it"
    assert {p.name: p.read_bytes() for p in (key / "img").glob("pagemap-*.img")} == pagemaps
    assert "no longer holds the image" in s.log()


# The daemon logs to daemon.log; lazy-pages.log, which the supervisor reads the working
# set from once the daemon is done, is a FIFO the test feeds.
FIFO_LOG = '''
mkfifo "$5/lazy-pages.log"
args=("$@")
for i in "${!args[@]}"; do [ "${args[$i]}" = lazy-pages.log ] && args[$i]=daemon.log; done
exec "$REAL" "${args[@]}"'''


def writer_once_read(fifo: Path) -> int:
    """A non-blocking write end of fifo, once the recording has opened it to read (a
    writer's open fails with ENXIO until then)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO and time.monotonic() < deadline, e
            time.sleep(0.01)


def test_a_stop_during_the_recording_waits_for_it_and_keeps_the_image(serve_cli, app, workdir):
    """SIGTERM while the working set is being recorded (a job: pagemaps rewritten, then
    their hashes): the worker waits for the job instead of exiting in the middle, so the
    image stays whole and tuned, and the next start restores it."""
    criu = fake_criu(workdir, FIFO_LOG)
    env = {"MEMORY_APP_MB": "256"}
    serve_cli(app, env, "--pass-env", "MEMORY_APP_MB").stop()
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", "--restore", "lazy", "--criu", criu)
    s.wait_for("all memory in", 60)
    fifo = next((workdir / "checkpoints" / ".logs").glob("lazy-*/lazy-pages.log"))
    fd = writer_once_read(fifo)
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.wait_for("waiting for 1 background job(s) to end", 10)
        time.sleep(0.5)
        assert s.proc.poll() is None, "the worker exited while the working set was recorded"
    finally:
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as w:
            w.write((fifo.parent / "daemon.log").read_bytes())
    assert s.proc.wait(30) == 0  # by itself, once the job is done
    assert "working set recorded" in s.log()
    assert list((workdir / "checkpoints").glob("*/workingset.bin"))
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", "--restore", "lazy")
    assert "restored from checkpoint" in s.log() and "unusable" not in s.log(), s.log()
    assert s.call(full=True) is True


def test_recording_the_working_set_leaves_the_supervisor_serving(serve_cli, app, workdir):
    """The first lazy restore's working set is recorded from its daemon's log (MBs at
    -v4): parsed, pagemaps rewritten and rehashed, off the supervisor's loop (csrc/lazy.c,
    a job). Here the log is a FIFO that gives its bytes only once the supervisor has
    answered /health while the recording waits on it: a recording on the loop would
    leave /health unanswered."""
    criu = fake_criu(workdir, FIFO_LOG)
    env = {"MEMORY_APP_MB": "256"}
    serve_cli(app, env, "--pass-env", "MEMORY_APP_MB").stop()
    s = serve_cli(app, env, "--pass-env", "MEMORY_APP_MB", "--restore", "lazy", "--criu", criu,
                  "--port", "0", "--no-auth")
    port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)", s.log()).group(1))
    s.wait_for("all memory in", 60)
    fifo = next((workdir / "checkpoints" / ".logs").glob("lazy-*/lazy-pages.log"))
    fd = writer_once_read(fifo)
    status = None
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        status = c.getresponse().status
    except TimeoutError:
        pass
    finally:
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as w:
            w.write((fifo.parent / "daemon.log").read_bytes())
    assert status == 200, "the supervisor did not answer while it recorded the working set"
    s.wait_for("working set recorded", 30)
    assert list((workdir / "checkpoints").glob("*/workingset.bin"))
    assert s.call(full=True) is True
    assert not list((workdir / "checkpoints" / ".logs").glob("lazy-*")), \
        "a finished page daemon's work directory was left behind"
