"""GET /dashboard in a real browser (issue 14): headless Chromium driven by Selenium
(Debian's chromium + chromium-driver; nothing is downloaded at run time) against a real
``python -m beam serve`` of a checkpointed app with --keep-warm 1, after calls that
include a restore from zero.

The screenshot lands in the test's directory; BEAM_DASHBOARD_SCREENSHOT=PATH copies it
there too (docs/img/dashboard.png is made that way)."""
from __future__ import annotations

import os
import shutil

import pytest

from served import Served, serve_fixture, wait_until

pytestmark = pytest.mark.timeout(180)
APP = "http_app.py:handler"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(workdir):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    assert os.path.exists(CHROMEDRIVER), "chromium-driver missing: scripts/install-deps.sh"
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1100", f"--user-data-dir={workdir / 'chrome'}"):
        opts.add_argument(a)
    chromium = shutil.which("chromium")
    if chromium:
        opts.binary_location = chromium
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


served = serve_fixture(Served)


def test_dashboard_shows_tasks_and_the_restore_timeline(served, browser, workdir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = served(APP, "--workers", "1", "--keep-warm", "1")
    if "checkpoint written" not in s.log():
        pytest.skip("no checkpoint here (needs root and CRIU)")
    warm = s.call(op="echo", value="warm")[1]["x-task-id"]  # a warm call, likely
    failed = s.call(op="raise", message="on purpose")[1]["x-task-id"]
    s.wait_for("scale to zero", timeout=30)
    wait_until(lambda: not s.get_json("/dashboard/state")["replicas"], 20, "zero replicas")
    status, h, _ = s.call(op="echo", value="wake")
    assert status == 200
    restore = h["x-task-id"]
    want = s.get_json(f"/tasks/{restore}")
    assert want["woke_from_zero"] and want["start"]["mode"] == "restore"

    # No token, no cookie: refused, in the browser as over plain HTTP.
    assert s.request("GET", "/dashboard", auth=False)[0] == 401
    browser.get(s.base + "/dashboard")
    assert "Unauthorized" in browser.find_element(By.TAG_NAME, "body").text
    # ?token= sets an HttpOnly cookie and sends the browser to the bare URL.
    browser.get(s.base + f"/dashboard?token={s.token}")
    assert browser.current_url == s.base + "/dashboard"
    [cookie] = [c for c in browser.get_cookies() if c["name"] == "beam_token"]
    assert cookie["httpOnly"] is True
    assert "beam_token" not in browser.execute_script("return document.cookie")
    wait = WebDriverWait(browser, 20)

    def row_ids():
        return [r.get_attribute("data-task-id")
                for r in browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")]

    wait.until(lambda d: {warm, failed, restore} <= set(row_ids()))
    # Live: a call made now shows up without a reload, and a replica with it.
    s.call(op="echo", value="live")
    newest = s.get_json("/tasks?limit=1")["tasks"][0]["id"]
    wait.until(lambda d: newest in row_ids())
    browser.find_element(By.CSS_SELECTOR, f'#tasks tr[data-task-id="{restore}"]').click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#timeline .bar[data-kind="phase"]'))
    bars = browser.find_elements(By.CSS_SELECTOR, "#timeline .bar")
    got = [(b.get_attribute("data-kind"), b.get_attribute("data-phase"),
            float(b.get_attribute("data-ms"))) for b in bars]
    phases = [(n, ms) for k, n, ms in got if k == "phase"]
    assert [n for n, _ in phases] == [p["name"] for p in want["start"]["phases"]]
    for (_, ms), p in zip(phases, want["start"]["phases"]):
        assert abs(ms - p["ms"]) < 0.001
    [(_, _, queue)] = [g for g in got if g[0] == "queue"]
    [(_, _, call)] = [g for g in got if g[0] == "call"]
    assert abs(queue - want["queued_ms"]) < 0.001 and abs(call - want["run_ms"]) < 0.001
    # Bars are to scale: widths in proportion to their ms.
    widths = {b.get_attribute("data-phase"): b.size["width"] for b in bars}
    big = max(want["start"]["phases"], key=lambda p: p["ms"])
    assert widths[big["name"]] >= widths["call"]
    assert browser.find_element(By.CSS_SELECTOR, "#checkpoint").text.count("present") == 1

    shot = workdir / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("BEAM_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["BEAM_DASHBOARD_SCREENSHOT"])
