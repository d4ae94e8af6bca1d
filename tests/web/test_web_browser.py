"""The status page and a report in a real browser: Debian's chromium, headless, driven by
Selenium through chromium-driver (both installed by scripts/_setup.sh). Content, not pixels: the
rows match `xencr status --json` for a state with a breach, a skip, a failure and a detached
object; the breached VM's RPO bar says BREACH; each chart has one point per run; the page keeps
itself current (a new run shows without a reload); every request the browser makes goes to
127.0.0.1; the page works with JavaScript off. Screenshots are saved in the test's directory.

A missing browser fails these tests; only XENCR_SKIP_BROWSER_TESTS=1 skips them, on purpose."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
from typer.testing import CliRunner
from webtest import DIGEST, STATUS_PASSWORD, fill, now_utc, serving, write_config

from xencr.cli.history import history_command
from xencr.cli.plan import status_command
from xencr.cli.web import report_command
from xencr.config import format_duration, load_config
from xencr.state import StateDB

if os.environ.get("XENCR_SKIP_BROWSER_TESTS") == "1":
    pytest.skip("XENCR_SKIP_BROWSER_TESTS=1: browser tests skipped on request", allow_module_level=True)

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

app = typer.Typer()
app.command("status")(status_command)
app.command("history")(history_command)
app.command("report")(report_command)
runner = CliRunner()

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
AUTH = "Basic " + base64.b64encode(f"auditor:{STATUS_PASSWORD}".encode()).decode()


def browser(*, javascript: bool = True) -> webdriver.Chrome:
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not os.path.exists(path):
            pytest.fail(f"{path} missing: install Debian's {package} (scripts/_setup.sh does)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium must not look for a driver on the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2600",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": AUTH}})
    return driver


def requested(driver: webdriver.Chrome) -> list[str]:
    """Every URL the page asked for (from the browser's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def keep(shot: Path) -> None:
    """XENCR_DOCS_SCREENSHOTS=1 also copies a screenshot into the repository's docs/."""
    if os.environ.get("XENCR_DOCS_SCREENSHOTS") == "1":
        docs = Path(__file__).resolve().parents[2] / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs / shot.name)


def cli_json(*args: str) -> Any:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[Path]:
    path = write_config(tmp_path)
    fill(load_config(path), now_utc())
    yield path


def rows_on_page(driver: webdriver.Chrome) -> dict[str, dict[str, str]]:
    """The rows' cells as text; read again when the page's script swapped them meanwhile."""
    for _ in range(5):
        try:
            return _rows(driver)
        except StaleElementReferenceException:
            continue
    return _rows(driver)


def _rows(driver: webdriver.Chrome) -> dict[str, dict[str, str]]:
    out = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "table.rows tbody tr[data-key]"):
        cells = tr.find_elements(By.CSS_SELECTOR, "td")
        out[tr.get_attribute("data-key") or ""] = {
            "vm": tr.find_element(By.CSS_SELECTOR, "th").text,
            "target": cells[0].text,
            "age": cells[1].text,
            "bar": tr.find_element(By.CSS_SELECTOR, "svg.rpobar").get_attribute("class") or "",
            "outcome": cells[2].text,
            "detached": cells[4].text,
            "class": tr.get_attribute("class") or "",
        }
    return out


def check_rows(page: dict[str, dict[str, str]], status: list[dict[str, Any]]) -> None:
    """The page's rows are `status --json`'s rows, value by value."""
    assert sorted(page) == sorted(f"{r['job']}/{r['vm_uuid']}/{r['target_sr']}" for r in status)
    for r in status:
        row = page[f"{r['job']}/{r['vm_uuid']}/{r['target_sr']}"]
        assert row["vm"].splitlines() == [r["vm_name"], r["vm_uuid"]]
        assert row["target"].startswith(r["target"])
        assert f"RPO {format_duration(r['rpo_seconds'])}" in row["age"]
        assert ("BREACH" in row["age"]) == r["rpo_breach"] == ("breach" in row["bar"])
        if r["last_outcome"] in ("skipped", "failure"):
            assert r["last_error"] in row["outcome"]
        else:
            assert row["outcome"].startswith(r["last_outcome"])
        assert row["detached"].startswith(str(r["detached"]))


def test_page_in_chromium(filled: Path, tmp_path: Path) -> None:
    status = cli_json("status", "--config", str(filled), "--json")
    runs = cli_json("history", "--config", str(filled), "--json", "--since", "7d")
    by_vm = {r["vm_name"]: r for r in status}
    assert by_vm["web-2"]["rpo_breach"] and by_vm["web-2"]["last_outcome"] == "skipped"
    assert by_vm["web-3"]["last_outcome"] == "failure" and by_vm["web-4"]["detached"] == 2
    with serving(filled) as (url, cfg):
        driver = browser()
        try:
            driver.get(url)
            WebDriverWait(driver, 20).until(
                lambda d: d.find_element(By.ID, "live").text.startswith("Live: updated")
            )
            page = rows_on_page(driver)
            check_rows(page, status)
            assert (
                "BREACH" in page["web/uuid-web-2/sr-b"]["age"]
                and page["web/uuid-web-2/sr-b"]["class"] == "breach"
            )
            assert page["web/uuid-web-4/sr-b"]["detached"].startswith("2 detached")
            # One point per run in each job's chart.
            for job in ("web", "db"):
                points = driver.find_elements(By.CSS_SELECTOR, f"#job-{job} svg.chart.runs g.run")
                assert len(points) == sum(1 for r in runs if r["job"] == job) > 0
            timeline = driver.find_elements(By.CSS_SELECTOR, "#plan-site-b svg.timeline g.group")
            assert [g.get_attribute("class") for g in timeline] == ["group passed", "group passed"]
            driver.save_screenshot(str(tmp_path / "status-page.png"))
            keep(tmp_path / "status-page.png")

            # A new restore point of web-2: the page shows it without a reload.
            marker = driver.execute_script("window.__kept = 1; return window.__kept;")
            with StateDB(cfg.state.path) as db:
                r = db.start_run(cfg.jobs["web"].id, "web", "ten", "manual")
                t = db.start_task(r, "uuid-web-2", "web-2", "sr-b", "b/SR1")
                db.finish_task(
                    t,
                    "success",
                    transfer="delta",
                    reasons={"0": "delta"},
                    bytes_sent=1 << 20,
                    restore_point="rp-web-2-new",
                    snapshot_time=datetime.now(UTC),
                )
                db.finish_run(r, "success")
            WebDriverWait(driver, 30).until(
                lambda d: rows_on_page(d)["web/uuid-web-2/sr-b"]["class"] != "breach"
            )
            assert driver.execute_script("return window.__kept;") == marker  # no reload happened
            assert (
                len(driver.find_elements(By.CSS_SELECTOR, "#job-web svg.chart.runs g.run"))
                == len([r for r in runs if r["job"] == "web"]) + 1
            )
            urls = requested(driver)
        finally:
            driver.quit()
    assert urls and all(urlsplit(u).hostname == "127.0.0.1" for u in urls), urls
    assert {urlsplit(u).path for u in urls} >= {"/", "/static/status.css", "/static/status.js", "/api/status"}


def test_page_without_javascript(filled: Path, tmp_path: Path) -> None:
    status = cli_json("status", "--config", str(filled), "--json")
    with serving(filled) as (url, _):
        driver = browser(javascript=False)
        try:
            driver.get(url)
            assert driver.find_element(By.ID, "live").text.startswith("Without JavaScript")
            check_rows(rows_on_page(driver), status)
            # The restore points open without script (a <details>).
            driver.find_element(By.CSS_SELECTOR, 'tr[data-key="web/uuid-web-1/sr-b"] details summary').click()
            points = driver.find_elements(By.CSS_SELECTOR, 'tr[data-key="web/uuid-web-1/sr-b"] ul.points li')
            assert len(points) == 5 and "rp-web-1-5" in points[0].text
            urls = requested(driver)
        finally:
            driver.quit()
    assert all(urlsplit(u).hostname == "127.0.0.1" for u in urls)
    assert "/api/status" not in {urlsplit(u).path for u in urls}  # nothing polled


def test_report_in_chromium(filled: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    r = runner.invoke(
        app, ["report", "web", "--config", str(filled), "--since", "30d", "--html", str(report)]
    )
    assert r.exit_code == 0, r.stderr
    plan_report = tmp_path / "plan.html"
    r = runner.invoke(app, ["report", "site-b", "--config", str(filled), "--html", str(plan_report)])
    assert r.exit_code == 0, r.stderr
    driver = browser()
    try:
        driver.get(report.as_uri())
        rows = {
            tr.find_element(By.CSS_SELECTOR, "th").text.splitlines()[0]: tr
            for tr in driver.find_elements(By.CSS_SELECTOR, "table.compliance tbody tr")
        }
        assert sorted(rows) == ["web-1", "web-2", "web-3", "web-4"]
        # Watched from the first run, 2 days ago; runs 2d, 1d, 2h, 8m and 4m ago; RPO 10m. web-1
        # breached 23h50m + 21h50m + 1h42m of 48h (1.32% within); web-2 (skipped since 2h ago)
        # 23h50m + 21h50m + 1h50m (1.04%).
        cells = {vm: [td.text for td in tr.find_elements(By.CSS_SELECTOR, "td")] for vm, tr in rows.items()}
        assert cells["web-1"][1:3] == ["1.32%", "1d23h22m BREACH"]
        assert cells["web-2"][1] == "1.04%" and cells["web-2"][2].startswith("1d23h30m")
        assert cells["web-1"][5] == "5" and cells["web-2"][5] == "3"  # restore points made
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart.runs g.run")) == 5
        verify = driver.find_element(By.CSS_SELECTOR, "table.verify").text
        assert DIGEST in verify and "read back, matched" in verify
        driver.save_screenshot(str(tmp_path / "report.png"))
        keep(tmp_path / "report.png")
        driver.get(plan_report.as_uri())
        assert driver.find_elements(By.CSS_SELECTOR, "svg.timeline g.group")
        assert re.search(r"Test failover \(run \d+\): passed", driver.find_element(By.TAG_NAME, "body").text)
        urls = requested(driver)
    finally:
        driver.quit()
    assert {urlsplit(u).scheme for u in urls} == {"file"}  # self-contained: nothing else fetched
