"""Runs in the browser: launch from the page and watch the curve draw, reload and a second tab, the
Runs page live, Compare, and every page at desktop and phone width."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.browser.conftest import api_run, launch, points
from tests.waiting import wait_until

pytestmark = pytest.mark.browser


def test_launch_from_the_page_and_watch_the_curve_draw(app, context):
    page = context.new_page()
    page.goto(f"{app['base']}/runs/new")
    page.select_option("#base_model", app["model"])
    page.fill("[name='training.num_train_epochs']", "40")
    # 40 rows train every row by default: 10 steps an epoch at batch 4; one click holds 10% out instead,
    # and the estimate follows the form: 36 rows are 9 steps an epoch
    page.wait_for_function("(document.getElementById('est-steps') || {}).textContent?.startsWith('400')")

    def held_out() -> bool:  # under load the estimate beside may re-render as the click lands: click again
        page.click("#every-row-trains button")
        return page.input_value("[name='evaluation.held_out_fraction']") == "0.1"

    wait_until(held_out, 30, "the held-out fraction to take the button's 0.1", every=0.5)
    page.wait_for_function("(document.getElementById('est-steps') || {}).textContent?.startsWith('360')")
    # 8 training rows scored (32 by default) keep the test short
    scored = page.locator("[name='evaluation.scored_train_rows']")
    page.locator("details", has=scored).last.evaluate("d => d.open = true")
    page.fill("[name='evaluation.scored_train_rows']", "8")
    page.click("#launch")
    try:
        page.wait_for_url(re.compile(r"/runs/\d+$"), timeout=60_000)
    except PlaywrightTimeout:  # say what the page said instead of going to the run
        shown = page.inner_text("#estimate")
        raise AssertionError(f"no run page after Launch; the form shows: {shown}") from None
    run_id = int(page.url.rsplit("/", 1)[1])
    seen = set()

    def drawn_while_running() -> bool:  # the summary block the stream swaps in carries the status
        status = page.get_attribute("#run-summary", "data-status")
        if status == "running":
            seen.add(points(page))
        assert api_run(app, run_id)["status"] in ("queued", "running", "succeeded"), api_run(app, run_id)
        return status == "succeeded"

    wait_until(drawn_while_running, 180, "the page to show the run succeeded", every=0.25)
    assert len([n for n in seen if n > 0]) >= 2, f"the chart never grew while the run trained: {sorted(seen)}"
    page.wait_for_selector("#download-adapter")
    page.wait_for_function("document.getElementById('run-status').textContent.trim() === 'succeeded'")
    train_rows = [
        m for m in httpx.get(f"{app['base']}/api/runs/{run_id}/metrics").json() if m["kind"] == "train"
    ]
    page.wait_for_function(
        f"Number(document.getElementById('chart-loss').dataset.points) === {len(train_rows)}"
    )
    assert page.locator("#chart-loss canvas").count() == 1
    assert page.inner_text("#run-step") == "360 / 360"

    # Answers, scored: a chart by step against the base model, the best checkpoint, the rows side by side.
    report = httpx.get(f"{app['base']}/api/runs/{run_id}/evaluation").json()
    checkpoints = [s["step"] for s in report["steps"] if s["step"] > 0]
    chart = "(document.getElementById('chart-answers') || {dataset: {}})"
    page.wait_for_function(f"Number({chart}.dataset.points) === {len(checkpoints)}")
    assert page.locator("#chart-answers canvas").count() == 1 and len(checkpoints) >= 2
    assert page.inner_text("#eval-best").startswith(f"step {report['best_step']}")
    table = page.locator("#eval-rows tbody tr")
    assert table.count() == len(report["rows"]) > 0
    page.click("#eval-rows [data-sort='best']")
    best = page.eval_on_selector_all("#eval-rows tbody tr", "rows => rows.map(r => Number(r.dataset.best))")
    assert best == sorted(best, reverse=True)
    page.select_option("#answers-metric", "rouge_l")  # each metric by step, one at a time
    page.wait_for_function(f"{chart}.dataset.metric === 'rouge_l' && Number({chart}.dataset.points) > 0")
    assert page.locator("#chart-answers canvas").count() == 1
    assert "ROUGE-L" in page.inner_text("#chart-answers")

    # Did it learn? The advice says, and its suggestion launches with one click.
    advice = report["advice"]
    assert page.inner_text("#eval-advice").startswith(advice["sentence"][:40])
    if advice["change"]:
        page.click("#relaunch")
        page.wait_for_url(re.compile(rf"/runs/(?!{run_id}$)\d+$"))
        again = api_run(app, int(page.url.rsplit("/", 1)[1]))
        for key, value in advice["change"].items():
            group, name = key.split(".")
            assert again["config"][group][name] == value
        httpx.post(f"{app['base']}/api/runs/{again['id']}/cancel")
    assert context.errors == []


def test_reload_second_tab_and_cancel(app, context):
    run_id = launch(app, epochs=400, logging_steps=5)  # a point every 5 steps: 20 of them come quickly
    page = context.new_page()
    page.goto(f"{app['base']}/runs/{run_id}")
    page.wait_for_function(
        "Number(document.getElementById('chart-loss').dataset.points) >= 20", timeout=60_000
    )
    before = points(page)
    page.reload()
    page.wait_for_function(f"Number(document.getElementById('chart-loss').dataset.points) >= {before}")
    second = context.new_page()
    second.goto(f"{app['base']}/runs/{run_id}")
    second.wait_for_function(f"Number(document.getElementById('chart-loss').dataset.points) >= {before}")

    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#run-actions button.danger")
    page.wait_for_function(
        "document.getElementById('run-status').textContent.trim() === 'cancelled'", timeout=60_000
    )
    assert api_run(app, run_id)["status"] == "cancelled"
    second.wait_for_function("document.getElementById('run-status').textContent.trim() === 'cancelled'")
    assert points(second) == points(page)  # both tabs drew the same whole curve
    assert context.errors == []


def test_runs_page_updates_rows_live(app, context):
    page = context.new_page()
    page.goto(f"{app['base']}/")
    run_id = launch(app, epochs=5)
    page.wait_for_selector(f"#run-{run_id}")  # a new run appears without a reload
    page.wait_for_function(
        f"document.getElementById('run-{run_id}').dataset.status === 'succeeded'", timeout=60_000
    )
    assert "45 / 45" in page.inner_text(f"#run-{run_id}")
    assert context.errors == []


@pytest.fixture(scope="module")
def scored_runs(app) -> list[int]:
    """Two finished runs with scored answers (1 and 2 epochs: 9 and 18 steps), two checkpoints each (the
    pages draw answers by step from any number), for the tests that only look at them."""
    runs = [launch(app, 1, scored=True, save_steps=5), launch(app, 2, scored=True, save_steps=9)]
    for run in runs:
        wait_until(lambda run=run: api_run(app, run)["status"] == "succeeded", 180, f"run {run} to finish")
    return runs


def test_compare_finished_runs(app, context, scored_runs):
    runs = scored_runs
    page = context.new_page()
    page.goto(f"{app['base']}/compare?" + "&".join(f"runs={r}" for r in runs))
    page.wait_for_selector("#compare-chart canvas")
    assert page.get_attribute("#compare-chart", "data-series") == "2"
    page.wait_for_selector("#compare-answers canvas")  # both runs' scored answers by step
    assert page.get_attribute("#compare-answers", "data-series") == "2"
    assert "training.num_train_epochs" in page.inner_text("#differences")
    assert context.errors == []


# Buttons, links and fields whose right edge lies past the screen's (except inside a table that scrolls in
# its .table-wrap, which shows a shadow as its cue), and any cell of the two widest tables, the scored
# answers and the workers, which must show every cell: on a phone they become a card per row.
OUTSIDE_THE_SCREEN = """[
  ...[...document.querySelectorAll("button, a, input, select, textarea")]
    .filter(e => !e.closest(".table-wrap:not(:has(table.reflow))")),
  ...document.querySelectorAll("#eval-rows td, #workers-table td")]
  .filter(e => e.offsetParent !== null && e.getBoundingClientRect().right > window.innerWidth + 1)
  .map(e => e.id || e.textContent.trim().slice(0, 40) || e.tagName)"""


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_fits_the_screen(app, browser, tmp_path, width, scored_runs):
    """Screenshots at desktop and phone width; nothing may stick out sideways (the runs' pages show their
    scored answers too)."""
    first, second = scored_runs
    page = browser.new_page(viewport={"width": width, "height": 800})
    paths = ["/", "/runs/new", f"/runs/{second}", f"/compare?runs={first}&runs={second}", "/datasets",
             f"/datasets/{app['dataset']}", "/models", "/workers", f"/playground?run={second}",
             "/leaderboard"]  # fmt: skip
    for path in paths:
        page.goto(app["base"] + path)
        page.wait_for_load_state("networkidle")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a {width}px screen"
        # every action is within the screen, and the wide tables (scored answers, workers) show every
        # cell without scrolling: on a phone they become a card per row
        hidden = page.evaluate(OUTSIDE_THE_SCREEN)
        assert hidden == [], f"{path} at {width}px puts these beyond the right edge: {hidden}"
        page.screenshot(
            path=str(tmp_path / f"{path.strip('/').replace('/', '_') or 'runs'}-{width}.png"), full_page=True
        )
    if width == 390:  # New run's cost is read before its Launch button; the playground's toggles line up
        page.goto(app["base"] + "/runs/new")
        page.wait_for_load_state("networkidle")
        cost, launch = page.locator(".estimate-card").bounding_box(), page.locator("#launch").bounding_box()
        assert launch["y"] > cost["y"] + cost["height"]
        page.goto(app["base"] + f"/playground?run={second}")
        left = [page.locator(f"#{box}").bounding_box()["x"] for box in ("alpaca-mode", "blind-mode")]
        assert left[0] == left[1]
    page.close()
