"""The shared store (--store), the compatibility key and export/import (issue 13), with
real CRIU and real processes. "Machines" are serves with their own --checkpoint-dir (the
local cache) and one shared --store directory, as pods on one RWX volume would be."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from usercli import app_copy, wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def app(workdir):
    return app_copy(workdir, "store_app.py")


@pytest.fixture
def exports(workdir):
    return {"STORE_MARKER": str(workdir / "marker")}


def flags(workdir, local, *more):
    return ("--checkpoint-dir", str(workdir / local), "--store", str(workdir / "store"),
            "--pass-env", "STORE_MARKER", "--pass-env", "STORE_SLEEP", "--pass-env", "STORE_MB",
            *more)


def on_start_runs(workdir) -> int:
    p = workdir / "marker"
    return len(p.read_text().splitlines()) if p.exists() else 0


def images(d: Path):
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if d.exists() else []


def publish(serve_cli, app, exports, workdir, local="m1", *more):
    """One machine boots cold, dumps and publishes; returns the store's image dir."""
    s = serve_cli(app, exports, *flags(workdir, local, *more))
    assert "checkpoint written" in s.log()
    s.wait_for("checkpoint published to store: ", 60)
    assert s.stop() == 0
    (img,) = images(workdir / "store")
    assert not (workdir / "store" / f"{img.name}.lease").exists(), "lease not released"
    return img


def test_publish_then_another_machine_restores_from_the_store(serve_cli, app, exports, workdir):
    img = publish(serve_cli, app, exports, workdir)
    assert on_start_runs(workdir) == 1
    assert (img / "img").is_dir() and (img / "restore.msgpack").is_file()
    assert [p.name for p in (workdir / "store").iterdir() if p.name.startswith(".tmp-")] == []

    s = serve_cli(app, exports, *flags(workdir, "m2"))
    log = s.log()
    assert "checkpoint fetched from store: " in log, log
    assert "restored from checkpoint" in log and "mode=restore" in log
    assert s.call()["blob_len"] == 0
    assert on_start_runs(workdir) == 1  # on_start did not run on the second machine
    assert (workdir / "m2" / img.name / "restore.msgpack").is_file()

    ls = subprocess.run([sys.executable, "-m", "beam", "checkpoints", "ls", "--store",
                         str(workdir / "store")], capture_output=True, text=True)
    assert ls.returncode == 0 and img.name[:12] in ls.stdout and "COMPAT" in ls.stdout, ls.stdout
    ls = subprocess.run([sys.executable, "-m", "beam", "checkpoints", "ls", "--json", "--dir",
                         str(workdir / "m2")], capture_output=True, text=True)
    assert re.search(r'"compat_hash": "[0-9a-f]{16}"', ls.stdout), ls.stdout
    assert '"kernel": "' + os.uname().release in ls.stdout


def test_two_machines_race_for_one_lease(serve_cli, app, exports, workdir):
    """Started together, both find the store empty; exactly one takes the lease, dumps
    and publishes; the other serves cold without dumping."""
    env = dict(exports, STORE_SLEEP="2")
    a = serve_cli(app, env, *flags(workdir, "a"), ready=False)
    b = serve_cli(app, env, *flags(workdir, "b"), ready=False)
    a.wait_for("ready:")
    b.wait_for("ready:")
    winner, loser = (a, b) if "checkpoint written" in a.log() else (b, a)
    winner.wait_for("checkpoint published to store: ", 60)
    assert "checkpoint written" not in loser.log(), loser.log()
    m = re.search(r"another machine \(host (\S+) pid (\d+)\) is checkpointing (\w+); serving cold",
                  loser.log())
    assert m, loser.log()
    assert m.group(1) == os.uname().nodename
    assert not images(workdir / ("a" if loser is a else "b"))
    assert len(images(workdir / "store")) == 1
    assert on_start_runs(workdir) == 2  # both booted cold


def test_lease_is_renewed_while_on_start_outlasts_its_term(serve_cli, app, exports, workdir):
    """on_start takes 5 s, the lease term is 1.5 s: the holder renews, so a machine that
    comes 3 s later still finds the lease held and does not break it."""
    env = dict(exports, STORE_SLEEP="5")
    a = serve_cli(app, env, *flags(workdir, "a", "--store-lease", "1.5"), ready=False)
    lease = wait_until(lambda: next((workdir / "store").glob("*.lease"), None), 60, "the lease")
    time.sleep(3)
    b = serve_cli(app, env, *flags(workdir, "b", "--store-lease", "1.5"))
    log = b.log()
    assert "another machine (host" in log and "breaking" not in log, log
    a.wait_for("checkpoint published to store: ", 60)
    assert "breaking" not in a.log() and not lease.exists()


def slow_criu(workdir) -> Path:
    """A criu whose RPC service (what libcriu runs for a dump) first sleeps: a dump that
    is still running when the test kills its machine."""
    real = os.environ.get("BEAM_CRIU") or "/usr/local/lib/beam/criu"
    path = workdir / "slow-criu"
    path.write_text(f'#!/bin/sh\n[ "$1" = swrk ] && sleep 60\nexec {real} "$@"\n')
    path.chmod(0o700)
    return path


@pytest.mark.parametrize("when", ["dump", "publication"])
def test_holder_killed_is_taken_over_after_expiry(serve_cli, app, exports, workdir, when):
    """The lease holder is SIGKILLed in its CRIU dump, or while it copies into the store:
    its lease stops being renewed and is respected until it expires; then another machine
    breaks it, removes the abandoned .tmp dir, dumps and publishes."""
    store = workdir / "store"
    env = dict(exports, STORE_MB="192" if when == "publication" else "0")
    extra = ("--criu", str(slow_criu(workdir))) if when == "dump" else ()
    s = serve_cli(app, env, *flags(workdir, "m1", "--store-lease", "8", *extra), ready=False)

    def tmp_dirs():
        return [p for p in store.iterdir() if p.name.startswith(".tmp-")] if store.exists() else []

    if when == "dump":
        s.wait_for("checkpointing ", 60)
        time.sleep(0.3)
        tmp = None
    else:
        (tmp,) = wait_until(tmp_dirs, 120, "the publication's .tmp dir in the store", every=0.002)
    s.kill()  # SIGKILL to the whole group: supervisor, host, criu and the publishing child
    assert not images(store), "publication finished before the kill"
    assert tmp_dirs() == ([tmp] if tmp else [])
    lease = next(store.glob("*.lease"))
    text = lease.read_text()
    assert re.fullmatch(r"host=\S+\npid=\d+\nexpires=\d+\.\d+\n", text), text
    expires = float(re.search(r"expires=(\S+)", text).group(1))

    b = serve_cli(app, env, *flags(workdir, "m2", "--store-lease", "8"))
    assert "another machine (host" in b.log(), b.log()  # within its term: still held
    assert "checkpoint written" not in b.log()
    assert b.stop() == 0
    ls = beam_ckpt("ls", "--store", str(store))
    assert re.search(r"leased .*host \S+ pid \d+", ls.stdout), ls.stdout
    if tmp:
        assert "incomplete" in ls.stdout, ls.stdout
        rm = beam_ckpt("rm", "--stale", "--dir", str(store))  # a person tidying up meanwhile
        assert "keeping" in rm.stdout and tmp.exists() and lease.exists(), rm.stdout
    assert time.time() < expires, "the test took longer than the lease term"

    time.sleep(max(0.0, expires - time.time()) + 0.3)  # the killed holder's lease expired
    c = serve_cli(app, env, *flags(workdir, "m3", "--store-lease", "8"))
    c.wait_for("checkpoint published to store: ", 90)
    log = c.log()
    assert "breaking the expired store lease of host" in log, log
    if tmp:
        assert f"removing {tmp}: a publication whose lease expired" in log, log
    assert tmp_dirs() == []
    assert len(images(store)) == 1 and not list(store.glob("*.lease"))


def test_corrupt_store_copy_boots_cold(serve_cli, app, exports, workdir):
    img = publish(serve_cli, app, exports, workdir)
    pages = img / "img" / "pages-1.img"
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    s = serve_cli(app, exports, *flags(workdir, "m2"))
    log = s.log()
    assert re.search(r"checkpoint \w{12} in the store is corrupt \(image file pages-1\.img is "
                     r"corrupt \(XXH3 mismatch\)\): not using it; booting cold", log), log
    assert "mode=cold" in log and "restored from checkpoint" not in log
    assert on_start_runs(workdir) == 2
    assert not [p for p in (workdir / "m2").iterdir() if p.name.startswith(".tmp-")]
    # The machine that found it corrupt checkpoints and, holding the lease, replaces it:
    # the fleet heals without anyone removing the store's copy by hand.
    log = s.wait_for("checkpoint published to store: ", 60)
    assert "removed the corrupt checkpoint" in log, log
    assert s.stop() == 0
    assert images(workdir / "store") == [img]
    assert not [p for p in (workdir / "store").iterdir() if p.name.startswith((".tmp-", ".corrupt-"))]
    s = serve_cli(app, exports, *flags(workdir, "m3"))
    log = s.log()
    assert "checkpoint fetched from store: " in log and "restored from checkpoint" in log, log
    assert on_start_runs(workdir) == 2


def test_incompatible_machine_boots_cold(serve_cli, app, exports, workdir):
    img = publish(serve_cli, app, exports, workdir)
    other = dict(exports, BEAM_TEST_COMPAT="kernel=0.0-test")
    s = serve_cli(app, other, *flags(workdir, "m2"))
    log = s.log()
    assert re.search(rf"checkpoint {img.name[:12]} in the store was made on an incompatible "
                     rf"machine \(kernel: 0\.0-test here, {re.escape(os.uname().release)} in "
                     r"the image\); booting cold", log), log
    assert "mode=cold" in log
    # Its own dump stays local: the store's image is not replaced by one it cannot use.
    assert "keeping this one local" in s.log()
    assert s.stop() == 0
    assert images(workdir / "store") == [img]
    # The local cache is checked too; CPU flags must be a subset of this CPU's.
    cpu = dict(exports, BEAM_TEST_COMPAT="cpu_flags=fpu")
    s = serve_cli(app, cpu, *flags(workdir, "m1"))
    log = s.log()
    assert re.search(r"in the local cache was made on an incompatible machine \(cpu_flags: the "
                     r"image needs \S+.*\); discarding it, looking in the store", log), log
    assert "mode=cold" in log


def test_read_only_store_feeds_but_takes_no_dump(serve_cli, app, exports, workdir):
    """A consumer's read-only mount of the store: it restores what is there; for a key
    the store lacks it dumps into its local cache only."""
    img = publish(serve_cli, app, exports, workdir)
    store = str(workdir / "store")
    ro = ["unshare", "-m", "--", "sh", "-c", f'mount --bind {store} {store} && mount -o '
          f'remount,bind,ro {store} && exec bash "$@"', "sh"]
    s = serve_cli(app, exports, *flags(workdir, "m2"), wrap=ro)
    assert "checkpoint fetched from store: " in s.log() and on_start_runs(workdir) == 1
    assert s.stop() == 0
    (workdir / "m2" / img.name).rename(workdir / "m2" / "set-aside")
    bw = workdir / "app" / "app.py"
    bw.write_text(bw.read_text() + "\n# another key\n")
    s = serve_cli(app, exports, *flags(workdir, "m2"), wrap=ro)
    log = s.log()
    assert "cannot create the store lease" in log and "Read-only file system" in log, log
    assert "checkpointing into the local cache only: no lease, no publication" in log
    assert "checkpoint written" in log and "publish" not in log
    assert images(workdir / "store") == [img]


def beam_ckpt(*args):
    return subprocess.run([sys.executable, "-m", "beam", "checkpoints", *args],
                          capture_output=True, text=True)


def test_export_import_round_trip_and_damaged_archives(serve_cli, app, exports, workdir):
    s = serve_cli(app, exports, "--checkpoint-dir", str(workdir / "m1"), "--pass-env",
                  "STORE_MARKER")
    assert "checkpoint written" in s.log()
    assert s.stop() == 0
    (img,) = images(workdir / "m1")
    archive = workdir / "image.tar.zst"
    r = beam_ckpt("export", img.name[:8], str(archive), "--checkpoint-dir", str(workdir / "m1"))
    assert r.returncode == 0, r.stderr
    assert archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert archive.stat().st_mode & 0o077 == 0

    r = beam_ckpt("import", str(archive), "--checkpoint-dir", str(workdir / "m2"))
    assert r.returncode == 0, r.stderr
    s = serve_cli(app, exports, "--checkpoint-dir", str(workdir / "m2"), "--pass-env",
                  "STORE_MARKER")
    assert "restored from checkpoint" in s.log()
    assert on_start_runs(workdir) == 1
    assert s.stop() == 0

    data = archive.read_bytes()
    truncated = workdir / "truncated.tar.zst"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = workdir / "flipped.tar.zst"
    flipped.write_bytes(data[:len(data) // 3] + bytes([data[len(data) // 3] ^ 0x55]) +
                        data[len(data) // 3 + 1:])
    for bad in (truncated, flipped):
        r = beam_ckpt("import", str(bad), "--checkpoint-dir", str(workdir / "m3"))
        assert r.returncode != 0, r.stdout
        assert f"refusing {bad}: " in r.stderr, r.stderr
        left = {p.name for p in (workdir / "m3").iterdir()}
        assert left <= {".logs", ".criu-version"}, left  # no image, whole or partial
