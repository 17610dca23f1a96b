"""The dashboard in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright) against the app served by uvicorn on 127.0.0.1, on the real PostgreSQL.

Without Chromium or Playwright these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.app.conftest import REPO
from tests.app.dashboard.conftest import submit
from tests.app.jobs_driver import MET_TARGET, MISSED_TARGET, drive_to_success, three_outcomes
from tests.conftest import unavailable

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "var" / "screenshots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn in a background thread on a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # lifespan off: the session's `app` fixture owns the database and queue and closes them.
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists():
        unavailable(f"Chromium at {CHROMIUM}", FileNotFoundError("install Debian's chromium"))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable("the playwright package", exc)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, base_url: str):  # type: ignore[no-untyped-def]
    """A fresh browser context (no cookies) whose page records script errors and every URL
    it asks for."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    tab.problems = []
    tab.requested = []
    tab.on("pageerror", lambda error: tab.problems.append(str(error)))
    tab.on(
        "console",
        lambda message: tab.problems.append(message.text) if message.type == "error" else None,
    )
    tab.on("request", lambda request: tab.requested.append(request.url))
    yield tab
    context.close()


def sign_in(page, key: str, goal: str = "/dashboard/jobs") -> None:  # type: ignore[no-untyped-def]
    page.goto(goal)
    assert "/dashboard/sign-in" in page.url  # not signed in yet: sent to the form
    page.fill("#api_key", key)
    page.click("button[type=submit]:has-text('Sign in')")
    page.wait_for_url(f"**{goal}")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 1000 and height >= 900
    assert len(data) > 20_000  # a rendered page, not a blank image


def test_sign_in_then_the_list_and_a_finished_jobs_evidence(
    page, base_url, client: TestClient, registered, caller, finished_job, tmp_path: Path
):  # type: ignore[no-untyped-def]
    job_id, result = finished_job(
        subject_reference="DSR-2025-0042", legal_basis="GDPR Art. 17", target=MET_TARGET
    )
    running = submit(client, registered)
    sign_in(page, caller.key)

    row = page.locator(f'tr[data-job-id="{job_id}"]')
    assert row.locator(".badge").inner_text() == "SUCCEEDED · target met"
    assert "DSR-2025-0042" in row.inner_text()
    assert page.locator(f'tr[data-job-id="{running}"] .badge').inner_text() == "QUEUED"
    list_png = tmp_path / "dashboard-jobs.png"
    page.screenshot(path=str(list_png), full_page=True)

    row.locator("a").click()
    page.wait_for_url(f"**/dashboard/jobs/{job_id}")
    chart = page.locator("svg.curve-chart")
    assert chart.is_visible()
    assert page.locator("svg.curve-chart > title").text_content().startswith("Forget and retain")
    chosen = page.locator("svg.curve-chart g.chosen")
    assert chosen.get_attribute("data-chosen-lambda") == str(result["lambda"])
    assert chosen.locator("text").is_visible()
    assert chosen.locator("line").bounding_box()["height"] > 100  # a vertical line: no width
    assert chart.locator("g[data-threshold] line").count() == 1
    points = len(result["lambda_curve"])
    assert chart.locator('g[data-series="forget"] circle.point').count() == points
    assert chart.locator('g[data-series="retain"] circle.point').count() == points

    metrics = page.locator("table.metrics tbody tr")
    # The report's splits, and the chart's validation splits at lambda = 0 and the chosen one.
    assert metrics.count() == len(result["metrics"]["before"]) + 2
    assert page.locator("table.metrics tr.search-row").count() == 2
    assert page.locator("[data-verdict=met]").is_visible()
    # Who asked, what was forgotten and the verdict, at the top of the page.
    assert page.locator("[data-fact=summary-what]").is_visible()
    what = page.locator("[data-fact=summary-what]").inner_text()
    assert what.startswith("Forgot") and "2 samples" in what and "“shapes”" in what
    assert page.locator("[data-fact=summary-who]").inner_text() == "requested by API key “test”"
    assert page.locator("[data-fact=summary-verdict]").inner_text() == "verdict: target met"
    assert "“test”" in page.locator("[data-fact=requester]").inner_text()
    assert page.locator("[data-fact=dataset]").inner_text().startswith("shapes")
    # The audit trail: consecutive entries, no gaps.
    seqs = [int(s) for s in page.locator("table.audit tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.auditSeq)")]  # fmt: skip
    assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert (
        result["model"]["weights_sha256"]
        in page.locator('[data-hash="unlearned-model"]').inner_text()
    )

    shot = tmp_path / "dashboard-job.png"
    page.screenshot(path=str(shot), full_page=True)
    assert_png(shot)
    assert_png(list_png)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for png in (shot, list_png):
        shutil.copyfile(png, SCREENSHOTS / png.name)

    # Everything came from this origin (no CDN, no fonts) and ran without a script error.
    assert all(url.startswith((base_url, "data:")) for url in page.requested), page.requested
    assert page.problems == []


def test_state_updates_live_without_a_reload(page, client: TestClient, registered, caller):  # type: ignore[no-untyped-def]
    on_page, in_list = submit(client, registered), submit(client, registered)
    sign_in(page, caller.key, f"/dashboard/jobs/{on_page}")
    head = page.locator(f'section[data-job-id="{on_page}"]')
    assert head.locator(".badge").inner_text() == "QUEUED"
    assert head.locator("form[action$='/cancel']").is_visible()
    page.evaluate("window.__sameDocument = true")

    cancelled = client.post(f"/v1/unlearning-jobs/{on_page}:cancel", headers=caller.headers)
    assert cancelled.status_code == 200
    state = cancelled.json()["state"]
    head.locator(f".badge.state-{state.lower()}").wait_for()
    assert head.locator(".badge").inner_text() == state
    assert page.evaluate("window.__sameDocument") is True  # updated in place
    assert not head.locator("form[action$='/cancel']").is_visible()
    assert head.locator("[data-show-when-ended]").is_visible()

    page.goto("/dashboard/jobs")
    row = page.locator(f'tr[data-job-id="{in_list}"]')
    assert row.locator(".badge").inner_text() == "QUEUED"
    page.evaluate("window.__sameDocument = true")
    client.post(f"/v1/unlearning-jobs/{in_list}:cancel", headers=caller.headers)
    row.locator(".badge.state-cancelled").wait_for()
    assert page.evaluate("window.__sameDocument") is True
    assert page.problems == []


def background(locator) -> str:  # type: ignore[no-untyped-def]
    return locator.evaluate("node => getComputedStyle(node).backgroundColor")


def test_a_missed_target_is_never_the_green_of_a_met_one(
    page, app, client: TestClient, registered, caller, tmp_path: Path
):  # type: ignore[no-untyped-def]
    met, missed, unchanged = three_outcomes(app, client, registered)
    live = submit(client, registered, target=MISSED_TARGET)
    sign_in(page, caller.key)

    green = background(page.locator(f'tr[data-job-id="{met}"] .badge'))
    for job_id in (missed, unchanged):
        badge = page.locator(f'tr[data-job-id="{job_id}"] .badge')
        assert badge.inner_text() == "SUCCEEDED · target not met"
        assert background(badge) != green
    assert green == "rgb(23, 128, 61)"  # --succeeded
    assert background(page.locator(f'tr[data-job-id="{missed}"] .badge')) == "rgb(194, 65, 12)"
    shot = tmp_path / "dashboard-verdicts.png"
    page.screenshot(path=str(shot), full_page=True)

    page.goto(f"/dashboard/jobs/{missed}")
    panel = page.locator("[data-verdict=not_met]")
    assert panel.is_visible() and "Target not met" in panel.inner_text()
    assert panel.locator("tr.missed").count() == 2  # forget and forget test accuracy
    job_shot = tmp_path / "dashboard-job-not-met.png"
    page.screenshot(path=str(job_shot), full_page=True)
    assert_png(job_shot)
    page.goto(f"/dashboard/jobs/{unchanged}")
    assert "No new model version was made" in page.locator("[data-verdict=not_met]").inner_text()

    # A job that ends while its page is open turns amber in place, not green.
    page.goto(f"/dashboard/jobs/{live}")
    page.evaluate("window.__sameDocument = true")
    drive_to_success(app, live)
    head = page.locator(f'section[data-job-id="{live}"]')
    head.locator(".badge.state-not-met").wait_for()
    assert head.locator(".badge").inner_text() == "SUCCEEDED · target not met"
    assert page.evaluate("window.__sameDocument") is True
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for png in (shot, job_shot):
        shutil.copyfile(png, SCREENSHOTS / png.name)
    assert page.problems == []


def test_the_api_docs_render_with_no_internet(page, base_url: str) -> None:  # type: ignore[no-untyped-def]
    # Everything but this origin is refused, as on a machine without internet.
    page.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith((base_url, "data:"))
            else route.abort()
        ),
    )
    page.goto("/docs")
    page.locator(".swagger-ui .info .title").wait_for()
    assert "NegMerge Service" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".swagger-ui .opblock").count() > 10  # the operations are listed
    assert all(url.startswith((base_url, "data:")) for url in page.requested), page.requested
    assert page.problems == []


def _overlaps(box: dict, other: dict) -> bool:
    return not (
        box["x"] + box["width"] <= other["x"]
        or other["x"] + other["width"] <= box["x"]
        or box["y"] + box["height"] <= other["y"]
        or other["y"] + other["height"] <= box["y"]
    )


def test_the_charts_labels_stay_off_the_curves_and_changes_are_coloured_by_meaning(
    page, client: TestClient, registered, caller, finished_job
):  # type: ignore[no-untyped-def]
    job_id, _ = finished_job(target=MET_TARGET)
    sign_in(page, caller.key, f"/dashboard/jobs/{job_id}")
    chart = page.locator("svg.curve-chart")
    # The plot area: the grid lines span it.
    grid = chart.locator("g.grid").bounding_box()
    assert grid is not None and grid["width"] > 300
    labels = chart.locator("g.chosen text, g.legend text")
    assert labels.count() >= 3
    for index in range(labels.count()):
        label = labels.nth(index)
        box = label.bounding_box()
        assert box is not None and not _overlaps(box, grid), label.text_content()
    assert "Retain threshold" in chart.locator("g.legend").text_content()

    # Forget accuracy falling is what was asked: green; retain accuracy falling: red.
    green, red = "rgb(23, 128, 61)", "rgb(180, 35, 24)"
    for key, colour in (("forget_acc", green), ("search_forget_acc", green),
                        ("retain_acc", red), ("test_acc", red), ("mia", green)):  # fmt: skip
        cell = page.locator(f'tr[data-metric="{key}"] td.delta')
        assert cell.evaluate("node => getComputedStyle(node).color") == colour, key
    assert page.problems == []


def test_a_phone_sees_the_whole_page_and_scrolls_the_table(
    browser, base_url, client: TestClient, registered, caller, finished_job, tmp_path: Path
):  # type: ignore[no-untyped-def]
    job_id, _ = finished_job(subject_reference="DSR-2025-0042-a-long-subject-reference")
    context = browser.new_context(base_url=base_url, viewport={"width": 390, "height": 844})
    context.set_default_timeout(15_000)
    phone = context.new_page()
    try:
        sign_in(phone, caller.key)
        for goal in ("/dashboard/jobs", f"/dashboard/jobs/{job_id}"):
            phone.goto(goal)
            page_width = phone.evaluate("document.documentElement.scrollWidth")
            assert page_width <= 390, f"{goal} is {page_width}px wide on a 390px screen"
            phone.screenshot(path=str(tmp_path / f"phone-{goal.count('/')}.png"), full_page=True)
        phone.goto("/dashboard/jobs")
        # The job list fits: nothing of it is cut off or hidden sideways, the job's link and
        # its subject reference included.
        wrap = phone.locator("div.table-wrap").first
        inner, outer = wrap.evaluate("node => [node.scrollWidth, node.clientWidth]")
        assert inner <= outer <= 390, (inner, outer)
        row = phone.locator(f'tr[data-job-id="{job_id}"]')
        for cell in ("a", "td.subject", "td[data-field=stage]", ".badge"):
            box = row.locator(cell).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, cell
        label = row.locator("td.subject").evaluate(
            "node => getComputedStyle(node, '::before').content"
        )
        assert label == '"Subject"'  # each value says what it is
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("phone-*.png"):
            shutil.copyfile(png, SCREENSHOTS / png.name)
    finally:
        context.close()


def test_a_requests_and_its_jobs_pages_show_who_what_due_verdict_and_deletion(
    page, caller, carried_requests, tmp_path: Path
):  # type: ignore[no-untyped-def]
    alice = carried_requests.forgotten["DSR-ALICE"]
    sign_in(page, caller.key, "/dashboard/requests")
    pending = page.locator(f'tr[data-request-id="{carried_requests.pending["id"]}"]')
    assert pending.locator("[data-field=due]").inner_text() == "2026-02-05 09:00:00 UTC · overdue"
    assert pending.locator("[data-field=deletion]").inner_text() == "not batched yet"
    row = page.locator(f'tr[data-request-id="{alice["id"]}"]')
    assert row.locator("td.subject").inner_text() == "DSR-ALICE"
    assert row.locator("[data-field=what]").inner_text() == "2 samples"
    assert row.locator("[data-field=state]").inner_text() == "FORGOTTEN"
    assert row.locator("[data-field=deletion]").inner_text() == "data deleted"
    list_png = tmp_path / "dashboard-requests.png"
    page.screenshot(path=str(list_png), full_page=True)

    row.locator("a").click()
    page.wait_for_url(f"**/dashboard/requests/{alice['id']}")
    assert page.locator("[data-fact=summary-who]").inner_text() == "Subject “DSR-ALICE”"
    what = page.locator("[data-fact=summary-what]").inner_text()
    assert what.startswith("asked to forget 2 samples of data set “faces”")
    assert "overdue" not in page.locator("[data-fact=summary-due]").inner_text()
    assert page.locator("tr[data-evidence=acc] td").all_inner_texts() == ["100.00", "0.00"]
    assert page.locator("#deletion-heading .badge").inner_text() == "data deleted"
    assert (
        page.locator("[data-fact=forget-data]")
        .inner_text()
        .startswith("deleted: 3 samples, 3 files,")
    )
    request_png = tmp_path / "dashboard-request.png"
    page.screenshot(path=str(request_png), full_page=True)

    page.locator("[data-fact=job] a").click()
    page.wait_for_url(f"**/dashboard/jobs/{carried_requests.job_id}")
    assert page.locator("[data-fact=summary-verdict]").inner_text() == "verdict: target met"
    carried = page.locator("table.requests tbody tr")
    assert carried.count() == 2
    assert sorted(carried.locator("td.subject").all_inner_texts()) == ["DSR-ALICE", "DSR-BOB"]
    assert page.locator("#deletion-heading .badge").inner_text() == "data deleted"
    assert page.locator("[data-fact=deleted-at]").is_visible()
    job_png = tmp_path / "dashboard-job-requests.png"
    page.screenshot(path=str(job_png), full_page=True)

    for png in (list_png, request_png, job_png):
        assert_png(png)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, SCREENSHOTS / png.name)
    assert page.problems == []
