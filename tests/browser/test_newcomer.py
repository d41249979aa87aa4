"""A newcomer's first run, in the browser, on a fresh server: upload a made-up long-answer set, open New
run (a duration range before launch, from the worker's speed trial), launch with every default, see the
base model being scored, read the finished run's advice; the row numbers agree between the dataset page,
New run and the run page. Screenshots of each page at 1280 and 390 px go to the test's folder."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from app.model_registry import BUNDLED_ID
from app.processes import free_port
from tests.browser.conftest import WORKER, shoot
from tests.conftest import DEMO_DATASET
from tests.servers import running
from tests.waiting import wait_until

pytestmark = pytest.mark.browser

SERVICE_NOTES = DEMO_DATASET.parent / "service_notes.json"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_model_dir):
    """A server as `make run` leaves it: the bundled model converted (here the tiny model stands in for it,
    so New run picks it by default), the worker free to measure its speed when idle, nothing else."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / "data" / "models").mkdir(parents=True)
    (folder / "data" / "models" / BUNDLED_ID).symlink_to(tiny_model_dir, target_is_directory=True)
    rows = json.loads(SERVICE_NOTES.read_text(encoding="utf-8"))[:3]
    (folder / "service_notes.json").write_text(json.dumps(rows), encoding="utf-8")
    env = WORKER | {
        "TUNEBOARD_PREPARE_MODELS": "true",
        "TUNEBOARD_GENERATION_URL": f"http://127.0.0.1:{free_port()}",
    }
    with running("serve", folder / "data", log=folder / "serve.log", env_extra=env) as (base, _):
        yield {"base": base, "folder": folder, "rows": rows}


def test_a_newcomers_first_run(fresh, browser):
    base, folder = fresh["base"], fresh["folder"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(f"{base}/datasets")
    page.set_input_files("#file", str(folder / "service_notes.json"))
    page.click("#upload-button")
    page.wait_for_url(re.compile(r"/datasets/\d+$"))
    page.wait_for_selector("#stat-truncated")
    # the preview numbers rows from 1: row 3 is the third row of the file
    third = page.locator("#preview .conversation").nth(2)
    assert third.locator(".row-number").inner_text() == "Row 3"
    assert fresh["rows"][2]["instruction"] in third.inner_text()
    cut_here = page.inner_text("#stats")
    shoot(page, folder, "dataset")

    # New run: the worker's trial gives a duration range before anything has run on this server
    page.click("#train-on-this")
    page.wait_for_url(re.compile(r"/runs/new"))
    page.wait_for_function(
        "(document.getElementById('est-duration') || {}).textContent?.includes('speed trial')",
        timeout=120_000,
    )
    duration = page.inner_text("#est-duration")
    assert re.match(r"\S.* to \S.*\(about .*from a worker's short speed trial", duration), duration
    # every row trains (3 rows), and the rows the dataset page said are too long, New run says too
    assert "Every row trains" in page.inner_text("#every-row-trains")
    if "would be cut short" in cut_here:
        cut = re.search(r"\(rows ([\d, …]+)\)", cut_here).group(1)
        assert f"(rows {cut})" in page.inner_text("#rows-cut")
    shoot(page, folder, "new-run")

    page.click("#launch")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    # the base model's answers are scored first, and the page says so where the progress is
    page.wait_for_function(
        "(document.getElementById('run-phase') || {}).textContent?.includes(\"Scoring the base model\")",
        timeout=120_000,
        polling=100,
    )
    shoot(page, folder, "run-scoring-base")
    wait_until(
        lambda: httpx.get(f"{base}/api/runs/{run_id}").json()["status"] in ("succeeded", "failed"),
        300,
        "the first run to finish",
    )
    run = httpx.get(f"{base}/api/runs/{run_id}").json()
    assert run["status"] == "succeeded", run["error"]
    assert run["current_step"] == run["total_steps"]
    page.reload()
    page.wait_for_selector("#eval-advice")
    advice = httpx.get(f"{base}/api/runs/{run_id}/evaluation").json()["advice"]
    assert page.inner_text("#eval-advice").startswith(advice["sentence"][:40])
    # a scored training row's number is the dataset page's: its question is that row's
    first = page.locator("#eval-rows tbody tr").first
    number = int(re.search(r"row (\d+)", first.inner_text()).group(1))
    question = first.locator("[data-label='Question']").inner_text()
    assert fresh["rows"][number - 1]["instruction"].startswith(question.rstrip("…").strip()[:40])
    assert page.inner_text("#run-step") == f"{run['total_steps']} / {run['total_steps']}"
    shoot(page, folder, "run-finished")

    # the playground offers the rows it learned from (none was held out), numbered as everywhere else
    page.goto(f"{base}/playground?run={run_id}")
    page.wait_for_selector("#validation-rows .validation-rows li")
    assert "these are rows it learned from" in page.inner_text("#validation-rows")
    second = page.locator("#validation-rows .validation-rows li").nth(1)
    assert second.locator(".row-number").inner_text() == "Row 2"
    assert fresh["rows"][1]["instruction"] in second.inner_text()
    shoot(page, folder, "playground")
    page.goto(f"{base}/")
    page.wait_for_selector(f"#run-{run_id}")
    shoot(page, folder, "runs")
    assert errors == []
    page.close()
