"""NVIZ in a real browser: Debian's headless Chromium (installed by .ci/run) driven by selenium.

The pages of a finished tiny run, of a live run, of the overlay and of the leaderboard must render their
charts (non-empty SVG) with no console error; a damaged run shows its message. Set NVIZ_SCREENSHOT=PATH
to also write the run page's screenshot there (docs/nviz.png was taken that way).
"""

import os
import shutil
import time
from pathlib import Path

import pytest

from nmoe.metrics.nviz.app import create_app
from nmoe.metrics.nviz.data import Sources
from nmoe.metrics.nviz.server import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"

# Per chart div: how many traces Plotly holds and how many drawn SVG line paths / heatmap images it has.
CHART_STATE_JS = """
return Array.from(document.querySelectorAll('.chart')).map(div => ({
  id: div.id,
  traces: (div.data || []).length,
  lines: Array.from(div.querySelectorAll('svg.main-svg path.js-line')).filter(p => (p.getAttribute('d') || '').length > 10).length,
  points: Array.from(div.querySelectorAll('svg.main-svg path.point')).length,
  images: Array.from(div.querySelectorAll('svg.main-svg g.hm image')).filter(i => (i.getAttribute('href') || '').startsWith('data:image')).length,
}));
"""


def _missing_browser() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's {package} ({INSTALL}; .ci/run does this)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(nviz_sources):
    src = Sources(nviz_sources.metrics_dir, nviz_sources.registry_db, nviz_sources.leaderboard)
    with running_server(create_app(src, poll_s=0.5)) as url:
        yield url


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _open(browser, url):
    browser.get("about:blank")  # a fresh document per page: no state carried over between tests
    browser.get(url)


def _console_errors(browser) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def _charts(browser) -> dict[str, dict]:
    return {chart["id"]: chart for chart in browser.execute_script(CHART_STATE_JS)}


def _all_drawn(browser, expected_ids):
    charts = _charts(browser)
    if not set(expected_ids) <= set(charts):
        return None
    drawn = all(c["lines"] + c["points"] + c["images"] > 0 for i, c in charts.items() if i in expected_ids)
    return charts if drawn else None


def test_finished_run_page_renders_every_chart(browser, server, tmp_path):
    _open(browser, f"{server}/#/run/tiny-done")
    expected = [
        "chart-loss", "chart-lr", "chart-grad_norm", "chart-tokens_per_s", "chart-mfu", "chart-memory",
        "chart-step_time", "chart-router_entropy_mean", "chart-router_max_gate_mean", "chart-router_collapse_frac",
        "chart-router_dropped_frac", "chart-router_load_cv", "chart-expert-load-layers", "chart-expert-load-steps",
        "chart-precision_flip_frac", "chart-precision_quant_err",
    ]  # fmt: skip
    charts = _wait(lambda: _all_drawn(browser, expected), what="every chart of tiny-done to draw")
    assert charts["chart-loss"]["traces"] == 3  # train, val, and the marker of the NaN at step 61
    assert charts["chart-step_time"]["lines"] == 2  # one line per rank
    assert charts["chart-memory"]["lines"] == 6  # three memory tags x two ranks
    assert charts["chart-expert-load-layers"]["images"] == 1 and charts["chart-expert-load-steps"]["images"] == 1
    assert browser.execute_script("return document.querySelectorAll('#router-table td.bad').length") == 2
    thresholds = browser.execute_script(
        "return document.getElementById('chart-router_entropy_mean').layout.shapes.map(s => s.y0)"
    )
    assert thresholds == [0.5]
    assert _console_errors(browser) == []
    browser.set_window_size(1400, 3900)  # the whole page, heatmaps included
    time.sleep(0.5)  # responsive charts re-layout
    shot = Path(os.environ.get("NVIZ_SCREENSHOT") or tmp_path / "nviz.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
    browser.set_window_size(1400, 1000)


def test_live_run_page_gains_points_by_itself(browser, server, live_run):
    _open(browser, f"{server}/#/run/{live_run.run_id}")
    last_step = "return Math.max(...(document.getElementById('chart-loss').data || [{x: [0]}])[0].x)"
    _wait(lambda: _all_drawn(browser, ["chart-loss", "chart-router_entropy_mean"]), what="the live run's charts")
    first = browser.execute_script(last_step)
    _wait(lambda: browser.execute_script(last_step) >= first + 10, what=f"points after step {first}")
    status = browser.execute_script("return document.querySelector('#run-header .badge.live') !== null")
    assert status, "a run being written is marked live"
    _wait(lambda: _charts(browser)["chart-expert-load-layers"]["images"] == 1, what="the live expert-load heatmap")
    assert _console_errors(browser) == []


def test_runs_list_filters_sorts_and_overlays(browser, server):
    _open(browser, f"{server}/#/")
    rows = "return Array.from(document.querySelectorAll('#runs-table tbody tr')).map(r => r.cells[1].innerText)"
    _wait(lambda: {"tiny-done", "tiny-base", "crashed", "broken"} <= set(browser.execute_script(rows)), what="rows")
    search = browser.find_element("css selector", "input[type=search]")
    search.send_keys("base")
    assert browser.execute_script(rows) == ["tiny-base"]
    search.send_keys(*["\b"] * 4)  # backspaces: an empty filter shows every run again
    assert len(browser.execute_script(rows)) >= 4
    browser.find_element("xpath", "//th[text()='val loss']").click()  # numeric columns sort descending first
    ordered = browser.execute_script(rows)
    assert ordered.index("tiny-base") < ordered.index("tiny-done")  # val loss 2.0 before 1.85
    for run_id in ("tiny-done", "tiny-base"):
        browser.find_element("xpath", f"//tr[td/a[text()='{run_id}']]//input[@type='checkbox']").click()
    browser.find_element("xpath", "//button[starts-with(text(), 'Overlay selected')]").click()
    charts = _wait(lambda: _all_drawn(browser, ["chart-cmp_loss", "chart-cmp_val_loss"]), what="the overlay")
    assert charts["chart-cmp_loss"]["lines"] == 2 and charts["chart-cmp_val_loss"]["lines"] == 2
    assert _console_errors(browser) == []


def test_leaderboard_page_lists_entries_fastest_first(browser, server):
    _open(browser, f"{server}/#/leaderboard")
    cells = "return Array.from(document.querySelectorAll('#leaderboard-table tbody tr')).map(r => r.cells[1].innerText)"
    assert _wait(lambda: browser.execute_script(cells), what="leaderboard rows") == ["tiny-done", "slow", "missed"]
    assert _console_errors(browser) == []


def test_damaged_run_shows_a_clear_message(browser, server):
    _open(browser, f"{server}/#/run/broken")
    text = _wait(
        lambda: browser.execute_script("const e = document.getElementById('run-error'); return e && e.innerText"),
        what="the error message",
    )
    assert "broken/rank_0.duckdb" in text and "move it out of" in text
    errors = _console_errors(browser)
    assert all("status of 500" in e for e in errors), errors  # only the failed API call itself is logged


def test_registry_only_and_unknown_runs_explain_themselves(browser, server):
    _open(browser, f"{server}/#/run/crashed")
    note = "const e = document.getElementById('no-metrics'); return e && e.innerText"
    assert "no metrics files yet" in _wait(lambda: browser.execute_script(note), what="the no-metrics note")
    assert "failed" in browser.find_element("id", "run-header").text
    assert _console_errors(browser) == []
    _open(browser, f"{server}/#/run/nope")
    message = "const e = document.getElementById('run-error'); return e && e.innerText"
    assert "unknown run 'nope'" in _wait(lambda: browser.execute_script(message), what="the unknown-run message")
