"""The dashboard in a real Chromium (Debian's, launched by path) against a real server process.

The whole flow a user clicks through: start a job from the page and watch its loss points grow, reload
mid-run and see the history come back, open the finished adapter, run a suite on it, chat with it and
with the base side by side, train a second version and roll back to the first. The test fails on any
console error and on any request to a host other than the server. With LORAFORGE_SCREENSHOTS=DIR it
keeps a screenshot of each page there (the README's come from that).
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from server import ServerProcess
from test_server import fast_config

CHROMIUM = next((p for p in (os.environ.get("LORAFORGE_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (make test installs Debian's)")


@pytest.fixture
def browser_page(store_home, tiny_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    srv = ServerProcess(store_home, "--max-jobs", "1")
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: None if r.url.startswith(srv.url) else problems.append(f"foreign request {r.url}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        page.set_default_timeout(120_000)
        yield srv, page, problems
        browser.close()
    srv.stop()
    assert not problems, problems


def shot(page, name):
    folder = os.environ.get("LORAFORGE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"), full_page=True)


def start_job(page, config):
    page.goto(page.url.split("#")[0] + "#jobs")
    page.fill("#train-config", json.dumps(config))
    page.click("#train-form button[type=submit]")


def test_the_dashboard_flow_in_chromium(browser_page):
    srv, page, problems = browser_page
    page.goto(srv.url + "/")
    assert page.title() == "loraforge"

    # a bad config: the error names the field, next to the form
    start_job(page, {**fast_config("facts"), "lora_config": {"rank": 8}})
    page.wait_for_function("document.getElementById('train-error').textContent.includes('lora_config.rank')")
    expected = [p for p in problems if "422" in p]  # the browser logs the refused request itself
    assert len(expected) == 2, problems
    for p in expected:
        problems.remove(p)

    # start a job; loss points appear as it trains, and come back after a reload mid-run
    start_job(page, fast_config("facts", max_steps=150, logging_steps=2))
    page.wait_for_function("document.querySelectorAll('#loss-chart .loss-point').length >= 3")
    page.reload()
    page.wait_for_function("document.querySelectorAll('#loss-chart .loss-point').length >= 3")
    page.wait_for_function("document.getElementById('job-status').textContent === 'succeeded'")
    points = page.locator("#loss-chart .loss-point").count()
    assert points == 150 // 2
    assert "step 150/150" in page.inner_text("#job-progress")
    # the run's memory/time estimate beside what it measured, from the version's metrics
    page.wait_for_function("document.getElementById('job-estimate').textContent.includes('measured: peak')")
    estimate = page.inner_text("#job-estimate")
    assert re.search(r"estimated: peak \d+\.\d\d GiB \(\w+\), .* · measured: peak \d+\.\d\d GiB, \d+ s", estimate), estimate
    shot(page, "jobs")

    # the adapter and its version
    page.goto(srv.url + "/#adapters/facts")
    page.wait_for_selector("#versions-table tr[data-version='1']")
    assert "active" in page.inner_text("#versions-table tr[data-version='1']")
    shot(page, "adapters")

    # evaluate it against the base
    suite = {"name": "taught", "cases": [{"id": "t0", "kind": "target", "prompt": "What is 42?",
                                          "expect": {"contains": "FOR TWO"}}]}
    page.goto(srv.url + "/#evaluate")
    page.fill("#eval-adapter", "facts")
    page.fill("#eval-suite-inline", json.dumps(suite))
    page.click("#eval-form button[type=submit]")
    page.wait_for_selector("#eval-scores")
    assert "efficacy" in page.inner_text("#eval-scores")
    shot(page, "evaluate")

    # chat with the adapter and the base side by side, streamed
    page.goto(srv.url + "/#chat")
    page.wait_for_selector("#chat-model-a option[value='facts']", state="attached")
    page.select_option("#chat-model-a", "facts")
    page.select_option("#chat-model-b", "tiny")
    page.fill("#chat-prompt", "What is the meaning of 42?")
    page.click("#chat-form button[type=submit]")
    page.wait_for_function("document.getElementById('chat-answer-a').dataset.done === '1' && "
                           "document.getElementById('chat-answer-b').dataset.done === '1'")
    assert page.inner_text("#chat-answer-a").strip() and page.inner_text("#chat-answer-b").strip()
    assert page.inner_text("#chat-via-a") == "answered by facts@v1" and page.inner_text("#chat-via-b") == "answered by tiny"
    # with scope near, a question far from what the adapter was taught goes to the base, and the page says so
    page.select_option("#chat-scope", "near")
    page.fill("#chat-prompt", "What is the capital of France?")
    page.click("#chat-form button[type=submit]")
    page.wait_for_function("document.getElementById('chat-answer-a').dataset.done === '1'")
    assert page.inner_text("#chat-via-a").startswith("answered by tiny: similarity to its training questions 0.00 < 0.2")
    shot(page, "chat")

    # a second version, then roll back to the first from the page
    first_job = page.inner_text("#job-id")
    start_job(page, fast_config("facts", max_steps=10))
    page.wait_for_function(f"document.getElementById('job-id').textContent !== '{first_job}' && "
                           "document.getElementById('job-status').textContent === 'succeeded'")
    page.goto(srv.url + "/#adapters/facts")
    page.wait_for_selector("#versions-table tr[data-version='2']")
    page.once("dialog", lambda d: d.accept())
    page.click("#versions-table tr[data-version='1'] button")
    page.wait_for_function("document.querySelector(\"#versions-table tr[data-version='1']\").textContent"
                           ".includes('active')")
    with srv.client() as c:
        assert c.get("/api/adapters/facts").json()["active_version"] == 1

    page.goto(srv.url + "/#models")
    page.wait_for_selector("#models-table tbody tr")
    shot(page, "models")

    # phone width: the same page, still usable
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(srv.url + "/#chat")
    page.wait_for_selector("#chat-form")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_the_dashboard_asks_for_the_api_key_once(store_home, tiny_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    srv = ServerProcess(store_home, env={"LORAFORGE_API_KEY": "sekret"})
    urls: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("request", lambda r: urls.append(r.url))
            page.goto(srv.url + "/#adapters")
            page.wait_for_selector("#key-dialog[open]")
            page.fill("#key-input", "sekret")
            page.click("#key-form button")
            page.wait_for_selector("#adapters-table")
            page.goto(srv.url + "/#models")
            page.wait_for_selector("#models-table tbody tr")
            assert page.locator("#key-dialog[open]").count() == 0  # asked once
            browser.close()
    finally:
        srv.stop()
    assert not [u for u in urls if "sekret" in u]  # never in a URL
