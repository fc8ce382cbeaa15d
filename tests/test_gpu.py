"""GPU state in the checkpoint (issue 4), on machines without a GPU.

The NVIDIA driver is replaced by a TEST DOUBLE of libcuda.so.1 (tests/cuda_double), built
here into a temporary directory and made visible only to the workers these tests start
(LD_LIBRARY_PATH). The double records every call and keeps the CUDA process state inside
the target process, as the driver does, so CRIU carries it into the image: a replica
restored from an image dumped at the wrong moment would not be CHECKPOINTED. CRIU is
real: CI runs as root (tests/test_checkpoint.py)."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import APPS, ROOT

pytestmark = pytest.mark.timeout(240)

DOUBLE_SRC = ROOT / "tests" / "cuda_double" / "cuda_double.c"
GPU_NAME = "Tesla T4 (cuda double)"
CKPT = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock",
        "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
        "cuCheckpointProcessUnlock")


@pytest.fixture(scope="session")
def double():
    """{"dir", "lib", "nockpt_dir", "nockpt_lib"}: the double, and a build of it without
    the cuCheckpoint* entry points (a driver older than r570)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to build the libcuda test double"
    root = Path(tempfile.mkdtemp(prefix="beam-cuda-double-"))
    out = {}
    for key, flags in (("", []), ("nockpt_", ["-DCUDA_DOUBLE_NO_CKPT"])):
        d = root / f"{key or 'full_'}cuda_double"
        d.mkdir()
        lib = d / "libcuda.so.1"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", *flags,
                        "-o", str(lib), str(DOUBLE_SRC), "-ldl"], check=True)
        (d / "libnvidia-ml.so.1").symlink_to(lib.name)  # the double answers NVML too
        out[key + "dir"], out[key + "lib"] = str(d), str(lib)
    yield out
    shutil.rmtree(root, ignore_errors=True)


class Run:
    """Env for one worker start, and its own call log."""

    def __init__(self, workdir: Path, double: Dict[str, str], name: str, **env: str) -> None:
        self.log = workdir / f"cuda-{name}.log"
        self.env = {"LD_LIBRARY_PATH": double["dir"], "CUDA_DOUBLE_PATH": double["lib"],
                    "CUDA_DOUBLE_LOG": str(self.log),
                    "GPU_COUNTER_FILE": str(workdir / "counter"), **env}

    def calls(self, only_ckpt: bool = True) -> List[dict]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            fn, pid, *rest = line.split()
            kv = dict(p.split("=", 1) for p in rest if "=" in p and "->" not in p)
            if only_ckpt and fn not in CKPT:
                continue
            out.append({"fn": fn.replace("cuCheckpointProcess", ""), "pid": pid,
                        "rc": int(kv["rc"]), "t": float(kv["t"]), "args": kv, "line": line})
        return out


def start_gpu(start_worker, workdir, run, name, *extra, app="gpu_app.py:predict", **kw):
    sock = workdir / f"{name}.sock"
    return start_worker(app, "--socket", str(sock), "--checkpoint-key", "k1", *extra,
                        env=run.env, **kw)


def host_pid(w) -> str:
    # Every thread's: a restored host is a child of the pool thread that restored it
    # (csrc/job.h), a cold one of the supervisor's main thread.
    kids = [k for t in Path(f"/proc/{w.proc.pid}/task").iterdir()
            for k in (t / "children").read_text().split()]
    assert len(kids) == 1, kids
    return kids[0]


def on_start_runs(workdir) -> int:
    p = workdir / "counter"
    return len(p.read_text().splitlines()) if p.exists() else 0


def ckpt_dir(workdir) -> Path:
    return workdir / "checkpoints" / "k1"


def cuda_state(double, pid: str) -> int:
    """The CUDA state of pid as the driver (double) reports it: 0 RUNNING, 1 LOCKED..."""
    lib = ctypes.CDLL(double["lib"])
    s = ctypes.c_int(-1)
    assert lib.cuCheckpointProcessGetState(int(pid), ctypes.byref(s)) == 0
    return s.value


def served_ok(w):
    r = w.client().call()
    assert r["digest"] == r["expected"]
    return r


def test_dump_drives_gpu_around_the_real_criu_dump(start_worker, workdir, double):
    run = Run(workdir, double, "a")
    w = start_gpu(start_worker, workdir, run, "a")
    log = w.log()
    host = host_pid(w)
    assert "TEST DOUBLE" in log and "checkpoint written" in log and "GPU state checkpointed" in log
    calls = run.calls()
    # The last GetState confirms RUNNING after the unlock.
    assert [c["fn"] for c in calls] == ["GetState", "Lock", "Checkpoint", "Restore", "Unlock",
                                        "GetState"]
    assert all(c["pid"] == host and c["rc"] == 0 for c in calls), calls
    assert calls[5]["args"]["state"] == "RUNNING"
    assert calls[1]["args"]["timeoutMs"] == "10000"
    # The CRIU dump happened between Checkpoint and Restore: every file of the image was
    # written in that window (file times are jiffy-coarse: 20 ms of slack).
    t_ckpt, t_restore = calls[2]["t"], calls[3]["t"]
    times = [p.stat().st_mtime_ns / 1e9 for p in ckpt_dir(workdir).rglob("*") if p.is_file()]
    assert times and min(times) > t_ckpt - 0.02 and max(times) < t_restore + 0.02
    # The original keeps serving, unlocked, from one process (CUDA does not survive fork).
    assert cuda_state(double, host) == 0
    assert "serving from one process instead of 2 workers" in log
    assert served_ok(w)["pid"] == 1
    stats = w.client().stats()
    prof = stats["profile"]
    assert {"gpu_lock_ms", "gpu_checkpoint_ms", "gpu_restore_ms", "gpu_unlock_ms",
            "gpu_bytes"} <= set(prof)
    assert "gpu_lock=" in log and "gpu_bytes=" in log
    manifest = json.loads((ckpt_dir(workdir) / "manifest.json").read_text())
    assert manifest["gpu"]["gpus"][0]["name"] == GPU_NAME
    assert manifest["gpu"]["gpus"][0]["uuid"].startswith("GPU-")


def test_restore_drives_gpu_on_the_restored_pid_only(start_worker, workdir, double):
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    run = Run(workdir, double, "b")
    w = start_gpu(start_worker, workdir, run, "b")
    log = w.log()
    assert "restored from checkpoint" in log
    host = host_pid(w)
    calls = run.calls()
    # Nothing but GetState (CHECKPOINTED, as the image was taken) -> Restore -> Unlock, all
    # on the replica CRIU just restored: no GPU call can precede the CRIU restore.
    assert [c["fn"] for c in calls] == ["GetState", "Restore", "Unlock", "GetState"]
    assert all(c["pid"] == host and c["rc"] == 0 for c in calls), calls
    assert calls[0]["args"]["state"] == "CHECKPOINTED"
    assert calls[1]["args"]["pairs"] == "0"
    assert cuda_state(double, host) == 0
    served_ok(w)
    assert on_start_runs(workdir) == 1
    prof = w.client().stats()["profile"]
    assert prof["mode"] == "restore"
    assert {"gpu_restore_ms", "gpu_unlock_ms", "gpu_bytes"} <= set(prof)


def test_other_gpu_of_the_same_type_is_remapped_by_uuid(start_worker, workdir, double):
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    run = Run(workdir, double, "b", CUDA_DOUBLE_UUID_SEED="other-card")
    w = start_gpu(start_worker, workdir, run, "b")
    assert "restored from checkpoint" in w.log() and "remapping 1 GPU(s)" in w.log()
    restore = next(c for c in run.calls() if c["fn"] == "Restore")
    assert restore["args"]["pairs"] == "1" and restore["rc"] == 0
    old, new = restore["line"].split("pairs=1 ")[1].split()[0].split("->")
    assert old != new
    served_ok(w)


@pytest.mark.parametrize("env, here", [
    ({"CUDA_DOUBLE_DEVICES": "2"}, f"2x {GPU_NAME}"),
    ({"CUDA_DOUBLE_GPU_NAME": "NVIDIA H100 80GB HBM3"}, "1x NVIDIA H100 80GB HBM3"),
])
def test_gpu_type_or_count_mismatch_boots_cold(start_worker, workdir, double, env, here):
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    run = Run(workdir, double, "b", **env)
    w = start_gpu(start_worker, workdir, run, "b")
    log = w.log()
    assert (f"GPU type/count differs: image has 1x {GPU_NAME}, this machine has {here}"
            in log)
    assert "booting cold" in log and "mode=cold" in log and "checkpoint written" in log
    # CRIU never restored anything: the calls are those of the new cold host's dump.
    assert [c["fn"] for c in run.calls()] == ["GetState", "Lock", "Checkpoint", "Restore",
                                              "Unlock", "GetState"]
    assert on_start_runs(workdir) == 2
    served_ok(w)


def _assert_unlocked_serving_no_image(w, run, double, workdir, reason):
    log = w.log()
    assert "GPU checkpoint failed, serving without a checkpoint" in log and reason in log
    host = host_pid(w)
    assert cuda_state(double, host) == 0, "left locked"
    served_ok(w)
    assert not ckpt_dir(workdir).exists()
    assert not list((workdir / "checkpoints").glob(".tmp-*"))
    marker = json.loads((workdir / "checkpoints" / "k1.failed").read_text())
    assert reason in marker["reason"]
    return host


def test_lock_timeout_unlocks_and_keeps_serving(start_worker, workdir, double):
    run = Run(workdir, double, "a", CUDA_DOUBLE_FAIL="lock_timeout")
    w = start_gpu(start_worker, workdir, run, "a", "--cuda-lock-timeout", "1.5")
    host = _assert_unlocked_serving_no_image(w, run, double, workdir, "within 1.5s")
    calls = run.calls()
    assert [c["fn"] for c in calls] == ["GetState", "Lock", "GetState"]
    assert all(c["pid"] == host for c in calls)
    lock = calls[1]
    assert lock["args"]["timeoutMs"] == "1500" and lock["rc"] == 600
    assert lock["t"] - calls[0]["t"] >= 1.4, "the driver's timeout was not used"
    assert calls[2]["args"]["state"] == "RUNNING"
    assert "raise --cuda-lock-timeout" in w.log()


def test_checkpoint_error_unlocks_and_keeps_serving(start_worker, workdir, double):
    run = Run(workdir, double, "a", CUDA_DOUBLE_FAIL="checkpoint")
    w = start_gpu(start_worker, workdir, run, "a")
    _assert_unlocked_serving_no_image(w, run, double, workdir,
                                      "cuCheckpointProcessCheckpoint(pid")
    calls = run.calls()
    assert [c["fn"] for c in calls] == ["GetState", "Lock", "Checkpoint", "GetState", "Unlock",
                                        "GetState"]
    assert calls[2]["rc"] == 2 and calls[3]["args"]["state"] == "LOCKED"
    assert calls[5]["args"]["state"] == "RUNNING"
    # Marked failed: the next start does not try again.
    w.stop()
    run2 = Run(workdir, double, "b")
    w2 = start_gpu(start_worker, workdir, run2, "b")
    assert "failed before" in w2.log() and run2.calls() == []
    served_ok(w2)


def test_gpu_restore_error_on_a_replica_boots_cold(start_worker, workdir, double):
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    run = Run(workdir, double, "b", CUDA_DOUBLE_FAIL="restore:1")
    w = start_gpu(start_worker, workdir, run, "b")
    log = w.log()
    assert "GPU restore failed" in log and "booting cold" in log
    assert "mode=cold" in log and "checkpoint written" in log
    host = host_pid(w)
    calls = run.calls()
    fns = [c["fn"] for c in calls]
    # The replica's: GetState, the failed Restore, GetState (the state it is left in).
    assert fns == ["GetState", "Restore", "GetState", "GetState", "Lock", "Checkpoint",
                   "Restore", "Unlock", "GetState"]
    replica = calls[0]["pid"]
    assert replica != host and calls[1]["pid"] == replica and calls[1]["rc"] == 999
    assert calls[2]["pid"] == replica and calls[2]["args"]["state"] == "CHECKPOINTED"
    assert "the process is left in CUDA state CHECKPOINTED" in log
    assert not Path(f"/proc/{replica}").exists(), "the failed replica was not killed"
    assert all(c["pid"] == host and c["rc"] == 0 for c in calls[3:])
    assert on_start_runs(workdir) == 2
    served_ok(w)
    w.stop()
    # The new image restores.
    w3 = start_gpu(start_worker, workdir, Run(workdir, double, "c"), "c")
    assert "restored from checkpoint" in w3.log()
    assert on_start_runs(workdir) == 2


def test_failed_resume_after_dump_hands_over_to_a_replica(start_worker, workdir, double):
    run = Run(workdir, double, "a", CUDA_DOUBLE_FAIL="restore:1")
    w = start_gpu(start_worker, workdir, run, "a")
    log = w.wait_for("restored from checkpoint")
    assert "cannot get its GPU state back after the checkpoint" in log
    calls = run.calls()
    fns = [c["fn"] for c in calls]
    assert fns[:4] == ["GetState", "Lock", "Checkpoint", "Restore"] and calls[3]["rc"] == 999
    host = host_pid(w)
    assert fns[-4:] == ["GetState", "Restore", "Unlock", "GetState"]
    assert all(c["pid"] == host and c["rc"] == 0 for c in calls[-4:])
    assert on_start_runs(workdir) == 1
    served_ok(w)


def test_gpu_restores_that_keep_failing_stop_checkpointing(start_worker, workdir, double):
    """Resume after the dump fails, then the replica's restore fails too: boot cold once
    more, and without dumping again (no dump/restore loop)."""
    run = Run(workdir, double, "a", CUDA_DOUBLE_FAIL="restore")
    w = start_gpu(start_worker, workdir, run, "a")
    log = w.log()
    assert "cannot get its GPU state back" in log and "GPU restore failed" in log
    assert "failed before, booting cold without one" in log
    assert [c["fn"] for c in run.calls()] == ["GetState", "Lock", "Checkpoint", "Restore",
                                              "GetState", "GetState", "Restore", "GetState"]
    assert on_start_runs(workdir) == 2
    assert not ckpt_dir(workdir).exists() and (workdir / "checkpoints" / "k1.failed").exists()
    served_ok(w)


@pytest.mark.parametrize("case", ["no_driver", "version_old", "no_symbols"])
def test_gpu_checkpointing_unavailable_is_explained(start_worker, workdir, double, case):
    env = {}
    if case == "no_driver":     # the app maps a libcuda, but none is on the library path
        env["LD_LIBRARY_PATH"] = ""
        reason = "no NVIDIA driver: cannot load libcuda.so.1"
    elif case == "version_old":
        env["CUDA_DOUBLE_FAIL"] = "version_old"
        reason = "NVIDIA driver too old: it supports CUDA 12.4; GPU checkpointing needs driver r570+"
    else:
        env["LD_LIBRARY_PATH"] = double["nockpt_dir"]
        env["CUDA_DOUBLE_PATH"] = double["nockpt_lib"]
        reason = "has no cuCheckpointProcessGetState: GPU checkpointing needs driver r570+"
    run = Run(workdir, double, "a", **env)
    w = start_gpu(start_worker, workdir, run, "a", "--allow-cpu")
    log = w.log()
    assert "the app uses CUDA, but GPU checkpointing is unavailable" in log and reason in log
    assert "checkpoint written" not in log and run.calls() == []
    served_ok(w)
    assert reason in json.loads((workdir / "checkpoints" / "k1.failed").read_text())["reason"]


def test_app_without_cuda_makes_no_cuda_calls(start_worker, workdir, double):
    run = Run(workdir, double, "a")
    w = start_gpu(start_worker, workdir, run, "a", app="gpu_app.py:cpu_predict")
    assert "checkpoint written" in w.log()
    w.stop()
    w2 = start_gpu(start_worker, workdir, run, "b", app="gpu_app.py:cpu_predict")
    assert "restored from checkpoint" in w2.log()
    served_ok(w2)
    assert not run.log.exists() or run.log.read_text() == ""
    assert "gpu_" not in w2.log()


def _serve_cli(workdir, *extra):
    env = dict(os.environ, BEAM_CHECKPOINT_DIR=str(workdir / "checkpoints"),
               BEAM_VOLUME_ROOT=str(workdir / "volumes"), PYTHONUNBUFFERED="1",
               GPU_COUNTER_FILE=str(workdir / "counter"))
    for k in ("LD_LIBRARY_PATH", "CUDA_DOUBLE_PATH", "CUDA_DOUBLE_LOG"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "beam", "serve", str(APPS / "gpu_app.py") + ":predict",
           "--socket", str(workdir / "cli.sock"), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, text=True)


def _real_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_real_driver(), reason="this machine has an NVIDIA driver")
def test_gpu_endpoint_without_gpu_refuses_to_serve(workdir):
    p = _serve_cli(workdir)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0, out
    assert 'the endpoint asks for gpu="T4", but this machine has no usable GPU: ' in out
    assert "no NVIDIA driver" in out and "--allow-cpu" in out
    assert on_start_runs(workdir) == 0, "on_start ran although the start was refused"


def test_gpu_endpoint_without_gpu_serves_on_cpu_with_allow_cpu(start_worker, workdir, double):
    run = Run(workdir, double, "a", LD_LIBRARY_PATH="", CUDA_DOUBLE_PATH="")
    w = start_gpu(start_worker, workdir, run, "a", "--allow-cpu", "--no-checkpoint")
    assert "serving on CPU because of --allow-cpu" in w.log()
    served_ok(w)
    # The same through `beam serve --allow-cpu`.
    p = _serve_cli(workdir, "--allow-cpu", "--no-checkpoint")
    try:
        deadline = time.monotonic() + 90
        sock = workdir / "cli.sock"
        while not sock.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), p.stdout.read() if p.poll() is not None else "no socket"
        from beam.client import Client
        with Client(str(sock), timeout=30) as c:
            r = c.call()
        assert r["digest"] == r["expected"]
    finally:
        p.terminate()
        p.wait(30)


# ---- issue 15: no replica left CHECKPOINTED or LOCKED; bounded state waits -------------

@pytest.mark.parametrize("fail, step, left", [
    ("restore_oom:1", "cuCheckpointProcessRestore", "CHECKPOINTED"),
    ("unlock:1", "cuCheckpointProcessUnlock", "LOCKED"),
])
def test_replica_left_checkpointed_or_locked_is_killed_and_cold_boot_serves(
        start_worker, workdir, double, fail, step, left):
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    run = Run(workdir, double, "b", CUDA_DOUBLE_FAIL=fail)
    t0 = time.monotonic()
    w = start_gpu(start_worker, workdir, run, "b")
    log = w.log()
    assert f"{step}(pid" in log and f"the process is left in CUDA state {left}" in log, log
    assert "GPU restore failed" in log and "booting cold" in log and "mode=cold" in log
    calls = run.calls()
    replica = calls[0]["pid"]
    assert any(c["fn"] == "GetState" and c["pid"] == replica and c["args"]["state"] == left
               for c in calls), calls
    assert not Path(f"/proc/{replica}").exists(), "the stuck replica was not killed"
    assert host_pid(w) != replica and on_start_runs(workdir) == 2
    served_ok(w)
    assert time.monotonic() - t0 < 60


def test_replica_stuck_locked_after_unlock_is_killed_within_the_bound(start_worker, workdir,
                                                                       double):
    """Unlock returns success but the process stays LOCKED: its first CUDA call would hang.
    The supervisor polls GetState with backoff for --cuda-lock-timeout, then kills it."""
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    run = Run(workdir, double, "b", CUDA_DOUBLE_FAIL="unlock_stuck:1")
    w = start_gpu(start_worker, workdir, run, "b", "--cuda-lock-timeout", "1")
    log = w.log()
    assert "cuCheckpointProcessUnlock(pid" in log and "returned, but" in log
    assert "is still LOCKED after 1s" in log and "booting cold" in log and "mode=cold" in log
    calls = run.calls()
    replica = calls[0]["pid"]
    polls = [c for c in calls if c["pid"] == replica and c["fn"] == "GetState"][1:]
    assert polls and all(c["args"]["state"] == "LOCKED" for c in polls)
    span = polls[-1]["t"] - polls[0]["t"]
    assert 0.8 <= span <= 1.5, span          # bounded by the timeout
    assert len(polls) < 30, len(polls)        # backed off, not a busy loop
    gaps = [b["t"] - a["t"] for a, b in zip(polls, polls[1:])]
    assert gaps[-1] > 4 * gaps[0] and max(gaps) < 0.2, gaps   # exponential, capped
    assert not Path(f"/proc/{replica}").exists()
    served_ok(w)


def test_lagging_unlock_is_waited_for_and_restore_thread_reported(start_worker, workdir,
                                                                  double):
    first = Run(workdir, double, "a")
    w = start_gpu(start_worker, workdir, first, "a")
    # Every driver call comes from the long-lived supervisor itself: no cuda-checkpoint
    # process is exec'd per step.
    assert {c["args"]["caller"] for c in first.calls()} == {str(w.proc.pid)}
    w.stop()
    run = Run(workdir, double, "b", CUDA_DOUBLE_UNLOCK_LAG="3")
    w = start_gpu(start_worker, workdir, run, "b")
    log = w.log()
    assert "restored from checkpoint" in log
    host = host_pid(w)
    calls = run.calls(only_ckpt=False)
    fns = [c["fn"] for c in calls if c["pid"] == host]
    assert fns == ["GetState", "Restore", "GetRestoreThreadId", "Unlock", "GetState",
                   "GetState", "GetState"], fns
    assert [c["args"]["state"] for c in calls if c["fn"] == "GetState"][-3:] == [
        "LOCKED", "LOCKED", "RUNNING"]
    assert {c["args"]["caller"] for c in calls} == {str(w.proc.pid)}
    assert f"driver restore thread {host}" in log and "(3 state poll(s))" in log
    prof = w.client().stats()["profile"]
    assert prof["gpu_restore_tid"] == int(host)
    assert cuda_state(double, host) == 0
    served_ok(w)


@pytest.mark.parametrize("env, here", [
    ({"CUDA_DOUBLE_DRIVER": "575.51.03"}, "driver 575.51.03 (CUDA 12.8)"),
    ({"CUDA_DOUBLE_VERSION": "12090"}, "driver 570.86.15 (CUDA 12.9)"),
])
def test_other_driver_version_boots_cold_with_the_reason(start_worker, workdir, double, env,
                                                         here):
    start_gpu(start_worker, workdir, Run(workdir, double, "a"), "a").stop()
    meta = json.loads((ckpt_dir(workdir) / "manifest.json").read_text())["gpu"]
    assert meta["driver"] == "570.86.15" and meta["driver_version"] == 12080
    assert [g["name"] for g in meta["gpus"]] == [GPU_NAME]    # model and count
    run = Run(workdir, double, "b", **env)
    w = start_gpu(start_worker, workdir, run, "b")
    log = w.log()
    assert ("NVIDIA driver differs: image taken with driver 570.86.15 (CUDA 12.8), this "
            f"machine has {here}") in log, log
    assert "booting cold" in log and "mode=cold" in log and "checkpoint written" in log
    # Refused before CRIU restored anything: only the new cold host's dump touched the GPU.
    assert run.calls()[0]["fn"] == "GetState" and run.calls()[1]["fn"] == "Lock"
    assert on_start_runs(workdir) == 2
    served_ok(w)


def _doctor_gpu_line(lib_dir: str, **env: str) -> str:
    e = dict(os.environ, LD_LIBRARY_PATH=lib_dir, **env)
    e.pop("CUDA_DOUBLE_LOG", None)
    p = subprocess.run([sys.executable, "-m", "beam", "doctor"], capture_output=True,
                       text=True, env=e, timeout=120)
    lines = [ln for ln in p.stdout.splitlines() if " gpu: " in ln]
    assert len(lines) == 1, p.stdout + p.stderr
    return lines[0]


@pytest.mark.parametrize("lib, env, want", [
    ("dir", {}, "OK    gpu: driver 570.86.15 (CUDA 12.8), checkpoint API present, "
                "persistence mode on, 1 GPU(s): GPU checkpoint can work here"),
    ("dir", {"CUDA_DOUBLE_PERSISTENCE": "0", "CUDA_DOUBLE_DEVICES": "2"},
     "OK    gpu: driver 570.86.15 (CUDA 12.8), checkpoint API present, persistence mode "
     "off, 2 GPU(s): GPU checkpoint can work here (restores are slower: nvidia-smi -pm 1)"),
    ("dir", {"CUDA_DOUBLE_PERSISTENCE": "unknown", "CUDA_DOUBLE_DEVICES": "0"},
     "INFO  gpu: driver 570.86.15 (CUDA 12.8), checkpoint API present, persistence mode "
     "unknown: GPU checkpoint cannot work here: the driver reports no usable GPU"),
    ("nockpt_dir", {"CUDA_DOUBLE_DRIVER": "550.54.15", "CUDA_DOUBLE_FAIL": "version_old"},
     "INFO  gpu: driver 550.54.15 (CUDA 12.4), no checkpoint API (no "
     "cuCheckpointProcessGetState), persistence mode on: GPU checkpoint cannot work here: "
     "the driver is older than r570"),
])
def test_doctor_reports_driver_api_persistence_and_verdict(double, lib, env, want):
    assert _doctor_gpu_line(double[lib], **env).startswith(want)
