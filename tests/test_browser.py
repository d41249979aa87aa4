"""The real pages in Debian's Chromium (Playwright), against a real `tuneboard web` process."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import DEMO_DATASET
from tests.servers import running

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("browser")
    with running("web", folder / "data", log=folder / "web.log") as (base, _):
        registered = httpx.post(
            f"{base}/api/models", json={"path": str(tiny_model_dir), "name": "Tiny test model"}
        )
        assert registered.status_code == 201, registered.text
        yield base


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    # Chromium logs every 4xx response as a console error; a refused upload is expected here.
    page.on(
        "console",
        lambda msg: (
            msg.type == "error"
            and not msg.text.startswith("Failed to load resource")
            and page.errors.append(msg.text)
        ),
    )
    yield page
    context.close()


def test_upload_the_demo_file_and_see_the_preview(server, page, tmp_path):
    page.goto(f"{server}/datasets")
    page.set_input_files("#file", str(DEMO_DATASET))
    assert "demo_alpaca.json" in page.inner_text("#dropzone-file")
    page.click("#upload-button")
    page.wait_for_url(re.compile(r"/datasets/\d+$"))
    assert page.inner_text("#detected-format") == "Alpaca (JSON array)"
    assert page.inner_text("#row-count") == "40"
    assert int(page.inner_text("#stat-p50")) > 0
    assert int(page.inner_text("#stat-max")) >= int(page.inner_text("#stat-p95"))
    page.wait_for_selector("#length-histogram canvas")
    assert page.locator("#preview .conversation").count() == 10
    assert "What is the capital of Quillmere?" in page.inner_text("#preview")
    # Changing the maximum length re-renders the statistics in place.
    page.fill("#max_length", "60")
    page.press("#max_length", "Enter")
    page.wait_for_function("document.querySelector('#stat-truncated').textContent.trim() !== '0 rows'")
    assert "would be cut short" in page.inner_text("#stats")
    page.screenshot(path=str(tmp_path / "dataset.png"), full_page=True)
    assert page.errors == []


def test_drop_a_broken_file_and_see_the_problems(server, page):
    before = httpx.get(f"{server}/api/datasets").json()
    page.goto(f"{server}/datasets")
    broken = json.dumps([{"instruction": "fine", "output": "fine"}, {"instruction": 5, "output": ""}])
    transfer = page.evaluate_handle(
        """(text) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], 'broken.json', {type: 'application/json'}));
            return transfer;
        }""",
        broken,
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    assert "broken.json" in page.inner_text("#dropzone-file")
    page.click("#upload-button")
    page.wait_for_selector("#upload-result .problems")
    rows = page.locator("#upload-result .problems tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).inner_text().split("\t") == [
        "2",
        "instruction",
        "'instruction' must be a string, not a number.",
    ]
    assert rows.nth(1).inner_text().split("\t") == ["2", "output", "'output' is empty."]
    assert "Nothing was stored" in page.inner_text("#upload-result")
    assert httpx.get(f"{server}/api/datasets").json() == before
    assert page.url.endswith("/datasets")
    assert page.errors == []


def test_a_file_over_the_limit_is_stopped_in_the_browser(server, page):
    page.goto(f"{server}/datasets")
    page.evaluate("document.getElementById('upload-form').dataset.maxBytes = '10'")
    page.set_input_files("#file", str(DEMO_DATASET))
    page.click("#upload-button")
    page.wait_for_selector("#upload-result .alert-error")
    assert "over the 200 MB upload limit" in page.inner_text("#upload-result")
