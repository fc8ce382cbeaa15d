"""Observability of the HTTP front (issue 14): the task ring (GET /tasks, /tasks/<id>),
Prometheus metrics (GET /metrics, checked by promtool), the access log, and the ring's
bound on memory. Through the user's path: ``python -m beam serve ... --port 0``."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from served import Served, sample, serve_fixture, wait_until

pytestmark = pytest.mark.timeout(120)
APP = "http_app.py:handler"


serve = serve_fixture(Served)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/install-deps.sh installs Debian's prometheus"
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr


def test_metrics_pass_promtool_and_count_the_calls(serve):
    s = serve(APP, "--workers", "1", "--keep-warm", "-1")
    before = s.metrics()
    promtool_check(before)
    assert sample(before, "beam_replica_starts_total", 'mode="cold"') == 1
    assert sample(before, "beam_replicas", 'state="serving"') == 1
    for i in range(5):
        assert s.call(op="echo", value=i)[0] == 200
    assert s.call(op="raise")[0] == 500
    m = s.metrics()
    promtool_check(m)
    assert sample(m, "beam_requests_total", 'status="ok"') == 5
    assert sample(m, "beam_requests_total", 'status="error"') == 1
    for h in ("beam_request_run_duration_seconds", "beam_request_queue_duration_seconds"):
        assert sample(m, h + "_count") == 6
        assert sample(m, h + "_bucket", 'le="+Inf"') == 6
    assert sample(m, "beam_http_responses_total", 'code="500"') == 1
    # the /metrics answer itself counts once it is sent: at least the first scrape
    assert sample(m, "beam_http_responses_total", 'code="200"') >= 6
    assert sample(m, "beam_replica_start_duration_seconds_count", 'mode="cold"') == 1
    assert sample(m, "beam_replica_start_phase_duration_seconds_count",
                  'mode="cold",phase="on_start"') == 1
    if sample(m, "beam_checkpoint_dumps_total", 'result="ok"') == 1:  # root + CRIU
        assert sample(m, "beam_checkpoint_size_bytes") > 0
        assert sample(m, "beam_checkpoint_dump_duration_seconds_count") == 1


def test_tasks_list_and_lookup(serve):
    s = serve(APP, "--workers", "1", "--keep-warm", "-1")
    ids = []
    for i in range(3):
        status, h, _ = s.call(op="sleep", seconds=0.05)
        assert status == 200
        ids.append(h["x-task-id"])
    assert s.call(op="raise")[0] == 500
    doc = s.get_json("/tasks?limit=2")
    assert doc["capacity"] == 1000 and doc["recorded"] == 4 and len(doc["tasks"]) == 2
    assert doc["tasks"][0]["status"] == "error" and doc["tasks"][0]["http_status"] == 500
    assert doc["tasks"][1]["id"] == ids[-1]  # newest first
    t = s.get_json(f"/tasks/{ids[0]}")
    assert t["status"] == "ok" and t["replica"] == 1 and t["woke_from_zero"] is False
    assert t["started_replica"] is None and t["start"] is None
    assert t["run_ms"] >= 50 and abs(t["total_ms"] - t["queued_ms"] - t["run_ms"]) < 0.01
    assert s.request("GET", "/tasks/no-such-task")[0] == 404
    assert s.request("GET", "/tasks", auth=False)[0] == 401
    assert s.request("GET", "/metrics", auth=False)[0] == 401
    assert s.request("POST", "/tasks")[0] == 405


@pytest.mark.timeout(150)
def test_restore_from_zero_is_attributed_to_the_call(serve):
    s = serve(APP, "--workers", "1", "--keep-warm", "1")
    if "checkpoint written" not in s.log():
        pytest.skip("no checkpoint here (needs root and CRIU)")
    s.wait_for("scale to zero", timeout=30)
    wait_until(lambda: not s.get_json("/dashboard/state")["replicas"], 20, "zero replicas")
    status, h, _ = s.call(op="echo", value="wake")
    assert status == 200
    t = s.get_json(f"/tasks/{h['x-task-id']}")
    assert t["woke_from_zero"] is True and t["started_replica"] == t["replica"]
    st = t["start"]
    assert st["mode"] == "restore" and st["queue_wait_ms"] == t["queued_ms"]
    names = [p["name"] for p in st["phases"]]
    assert names[0] == "spawn" and "criu_restore" in names and "after_start" in names
    assert abs(sum(p["ms"] for p in st["phases"]) - st["ready_ms"]) < 0.01
    assert abs(float(h["x-beam-wait-ms"]) - t["queued_ms"]) < 0.1
    m = s.metrics()
    assert sample(m, "beam_replica_starts_total", 'mode="restore"') == 1
    assert sample(m, "beam_replica_start_phase_duration_seconds_count",
                  'mode="restore",phase="criu_restore"') == 1


def test_access_log_json(serve):
    s = serve(APP, "--workers", "1", "--keep-warm", "-1", "--access-log", "--json-logs")
    status, h, _ = s.call(op="echo", value=1)
    assert status == 200
    assert s.request("GET", "/nope")[0] == 404
    s.wait_for('"path":"/nope"', timeout=10)
    lines = [json.loads(l) for l in s.log().splitlines() if '"event":"access"' in l]
    call = [l for l in lines if l["method"] == "POST"]
    assert len(call) == 1 and call[0]["path"] == "/" and call[0]["status"] == 200
    assert call[0]["task_id"] == h["x-task-id"] and call[0]["ms"] > 0
    assert any(l["path"] == "/nope" and l["status"] == 404 and l["task_id"] == "-" for l in lines)


def test_access_log_text_is_off_by_default(serve):
    s = serve(APP, "--workers", "1", "--keep-warm", "-1")
    assert s.call(op="echo", value=1)[0] == 200
    assert "access POST" not in s.log()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
def test_task_ring_keeps_memory_flat(serve):
    """--task-history 100: after a warm-up, 20000 more calls leave the supervisor's RSS
    where it was and the ring at its capacity (bench/task_ring.py runs 100k)."""
    import http.client
    s = serve(APP, "--workers", "1", "--keep-warm", "-1", "--task-history", "100")
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    hdr = {"Authorization": f"Bearer {s.token}", "Content-Type": "application/json"}

    def calls(n: int) -> None:
        for _ in range(n):
            c.request("POST", "/", body=b'{"op":"echo","value":1}', headers=hdr)
            r = c.getresponse()
            r.read()
            assert r.status == 200

    calls(1000)
    before = rss_kib(s.proc.pid)
    calls(20000)
    after = rss_kib(s.proc.pid)
    c.close()
    doc = s.get_json("/tasks?limit=100000")
    assert doc["recorded"] == 21000 and len(doc["tasks"]) == 100
    assert after - before < 512, f"supervisor RSS grew {after - before} KiB over 20000 calls"


def test_dashboard_cookie_is_read_only(serve):
    """?token= on /dashboard sets the cookie; the cookie opens read-only GETs, never a
    call (a cookie rides along on cross-site requests)."""
    s = serve(APP, "--workers", "1", "--keep-warm", "-1")
    status, h, _ = s.request("GET", f"/dashboard?token={s.token}", auth=False)
    assert status == 303 and h["location"] == "/dashboard"
    cookie = h["set-cookie"]
    assert cookie.startswith(f"beam_token={s.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": f"beam_token={s.token}"}
    status, h, body = s.request("GET", "/dashboard", auth=False, headers=jar)
    assert status == 200 and h["content-type"].startswith("text/html") and b"<script>" in body
    for path in ("/tasks", "/metrics", "/dashboard/state", "/stats"):
        assert s.request("GET", path, auth=False, headers=jar)[0] == 200, path
    assert s.request("POST", "/", {"op": "echo"}, auth=False, headers=jar)[0] == 401
    bad = {"Cookie": "beam_token=wrong"}
    assert s.request("GET", "/tasks", auth=False, headers=bad)[0] == 401
    assert s.request("GET", "/dashboard?token=wrong", auth=False)[0] == 401
    assert s.request("GET", f"/tasks?token={s.token}", auth=False)[0] == 401
