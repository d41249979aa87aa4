"""Statistics of a large dataset are computed by a child process in the background: the request answers
at once with progress, the page shows a progress bar, and the result equals the inline computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.migrate import upgrade
from tests.conftest import DEMO_DATASET, upload
from tests.waiting import wait_until


def wait_done(client: TestClient, url: str, total: int = 80, **params) -> dict:
    def done():
        response = client.get(url, params=params)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "computing" and response.json()["total"] == total
        return None

    return wait_until(done, 60, "the background statistics")


@pytest.fixture
def two_ways(tmp_path, tiny_model_dir):
    """The same data dir read by an app that counts inline and one that counts in the background."""
    rows = json.loads(DEMO_DATASET.read_text(encoding="utf-8"))
    content = json.dumps(rows + rows[:40])  # 80 rows, the last 40 repeating the first
    clients = []
    for name, inline in (("inline", 100_000), ("background", 10)):
        settings = Settings(data_dir=tmp_path / name, stats_inline_rows=inline)
        upgrade(settings)
        client = TestClient(create_app(settings)).__enter__()
        model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
        dataset = upload(client, "big.json", content).json()["id"]
        clients.append((client, model, dataset))
    yield clients
    for client, _, _ in clients:
        client.__exit__(None, None, None)


def test_background_statistics_equal_the_inline_ones(two_ways):
    (inline, model, dataset), (background, model_b, dataset_b) = two_ways
    first = background.get(f"/api/datasets/{dataset_b}/stats", params={"model": model_b, "max_length": 60})
    assert first.status_code == 202 and "being computed" in first.json()["message"]
    for prompt_format in ("chat", "instruction"):
        params = {"max_length": 60, "prompt_format": prompt_format}
        expected = inline.get(f"/api/datasets/{dataset}/stats", params={"model": model, **params}).json()
        got = wait_done(background, f"/api/datasets/{dataset_b}/stats", model=model_b, **params)
        assert {k: v for k, v in got.items() if k != "model"} == {
            k: v for k, v in expected.items() if k != "model"
        }
    summary = wait_done_summary(background, dataset_b)
    assert summary["duplicates"] == inline.get(f"/api/datasets/{dataset}").json()["duplicates"]
    assert summary["duplicates"]["count"] == 40
    assert summary["split"] == inline.get(f"/api/datasets/{dataset}").json()["split"]
    folder = background.app.state.settings.datasets_dir / str(dataset_b)
    assert not list(folder.glob("*.lock")) and not list(folder.glob("*.progress"))


def wait_done_summary(client: TestClient, dataset: int) -> dict:
    def done():
        body = client.get(f"/api/datasets/{dataset}").json()
        assert "duplicates" in body or body["summary"]["status"] == "computing"
        return body if "duplicates" in body else None

    return wait_until(done, 60, "the duplicates and split")


def test_the_dataset_page_shows_progress_then_the_statistics(two_ways):
    _, (client, model, dataset) = two_ways
    page = client.get(f"/datasets/{dataset}", params={"model": model})
    assert page.status_code == 200
    assert 'id="stats-pending"' in page.text and "Counting tokens" in page.text
    assert 'id="quality-pending"' in page.text

    def filled():
        headers = {"HX-Request": "true", "HX-Target": "stats"}
        fragment = client.get(f"/datasets/{dataset}", params={"model": model}, headers=headers).text
        assert 'id="token-stats"' in fragment or "stats-pending" in fragment
        return 'id="token-stats"' in fragment

    wait_until(filled, 60, "the statistics to fill the page")
    quality = client.get(f"/datasets/{dataset}", headers={"HX-Request": "true", "HX-Target": "quality"}).text
    assert 'id="duplicates"' in quality and ">40<" in quality


def test_a_failed_job_says_why_and_the_next_request_tries_again(two_ways):
    _, (client, model, dataset) = two_ways
    rows = client.app.state.settings.datasets_dir / str(dataset) / "rows.jsonl"
    saved = rows.read_bytes()
    rows.write_text("not json\n" * 80)

    def answered():
        response = client.get(f"/api/datasets/{dataset}/stats", params={"model": model})
        return response if response.status_code != 202 else None

    response = wait_until(answered, 60, "the failed job")
    assert response.status_code == 422 and "could not be computed" in response.json()["detail"][0]["message"]
    rows.write_bytes(saved)
    assert wait_done(client, f"/api/datasets/{dataset}/stats", model=model)["rows"] == 80


def test_one_huge_row_costs_the_web_process_a_bounded_read(tmp_path, tiny_model_dir):
    """A 12 MB row: the page is small (the row is named with its size, not shown), long texts are cut
    with their true length, and the statistics come from a capped child process, measured on a bounded
    prefix of the row."""
    from app.datasets import jobs
    from app.datasets.stats import MEASURED_CHARS

    settings = Settings(data_dir=tmp_path / "data", max_upload_mb=20)
    upgrade(settings)
    huge = {"instruction": "Recite the ledger.", "output": "ledger entry " * 1_000_000}
    long = {"instruction": "Describe the harbour.", "output": "h" * 5_000}
    content = "\n".join(json.dumps(r) for r in (huge, long, {"instruction": "Hi", "output": "Hello."}))
    with TestClient(create_app(settings)) as client:
        model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
        dataset = upload(client, "huge.jsonl", content).json()["id"]
        page = client.get(f"/datasets/{dataset}", params={"model": model})
        assert page.status_code == 200 and len(page.content) < 100_000
        assert "This row is 13.0 MB, too long to show here." in page.text
        assert "Statistics are being computed" in page.text or "progress" in page.text
        rows = client.get(f"/api/datasets/{dataset}/rows").json()
        stored = (settings.datasets_dir / str(dataset) / "rows.jsonl").read_bytes()
        assert rows[0] == {"too_long": True, "bytes": stored.index(b"\n") + 1}  # its true size
        cut = rows[1]["messages"][1]["content"]
        assert (
            cut.startswith("h" * 1_000)
            and "h" * 1_001 not in cut
            and cut.endswith("(cut here for the preview: 5,000 characters in all)")
        )
        assert rows[2]["messages"][1]["content"] == "Hello."
        stats = wait_done(client, f"/api/datasets/{dataset}/stats", model=model, total=3)
        assert stats["rows"] == 3 and MEASURED_CHARS // 20 < stats["max"] <= MEASURED_CHARS
        whole = client.get(f"/api/datasets/{dataset}/rows.jsonl")  # the rows whole, from the file
        assert len(whole.content) > 13_000_000
    # the statistics job's address space is capped
    limits = subprocess.run(
        [sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"],
        preexec_fn=jobs._capped,  # noqa: PLW1509
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(limits.stdout) == jobs.STATS_MEMORY_BYTES


def test_large_json_arrays_and_datasets_from_votes_are_held_to_the_limits(client, monkeypatch):
    from app.datasets import formats

    monkeypatch.setattr(formats, "MAX_JSON_ARRAY_BYTES", 1_000)
    array = json.dumps([{"instruction": f"q{i}", "output": "a" * 20} for i in range(40)])
    refused = upload(client, "big.json", array)
    message = refused.json()["detail"][0]["message"]
    assert refused.status_code == 422 and "Tuneboard reads a JSON array whole" in message
    assert "Save it as JSON Lines" in message
    lines = "\n".join(json.dumps(r) for r in json.loads(array))
    assert upload(client, "big.jsonl", lines).status_code == 201  # the same rows as JSON Lines

    # a dataset made from votes is held to the upload limit (1 MB here) like an upload
    model = "smollm2-135m-instruct"
    for index in range(8):
        body = {
            "conversation_id": f"v{index}",
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "answers": [{"target": model, "text": "x" * 150_000}, {"target": model, "text": "short"}],
            "verdict": "better",
            "best": 0,
        }
        assert client.post("/api/votes", json=body).status_code == 201
    before = client.get("/api/datasets").json()
    made = client.post("/api/votes/dataset", json={})
    assert made.status_code == 422
    assert (
        "larger than the 1 MB upload limit (TUNEBOARD_MAX_UPLOAD_MB)" in made.json()["detail"][0]["message"]
    )
    assert client.get("/api/datasets").json() == before
