"""Server-sent event streams: order, resume, end, and release of a closed client's stream."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from app.runs import state
from tests.conftest import DEMO_DATASET, upload
from tests.servers import running
from tests.sse import parse

pytestmark = pytest.mark.databases


@pytest.fixture
def run_id(client, db) -> int:
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run = client.post("/api/runs", json={"dataset_id": dataset}).json()
    with db.write_session() as session:
        state.claim_next(session=session, worker_id="w")
    with db.write_session() as session:
        state.record_start(
            session=session, run_id=run["id"], total_steps=10, trainable=5, total=100, resumed_from=None
        )
    return run["id"]


def log(db, run_id: int, step: int) -> None:
    with db.write_session() as session:
        values = {"kind": "train", "step": step, "epoch": step / 10, "loss": 3 - step / 10, "step_time": 0.5}
        state.record_metric(session=session, run_id=run_id, values=values)


def finish(db, run_id: int) -> None:
    with db.write_session() as session:
        state.finish(session=session, run_id=run_id, worker_id="w", status="succeeded", exit_code=0)


def stream(client, url: str, **headers) -> list:
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse(response.iter_lines())


def test_a_finished_run_streams_its_history_then_done(client, db, run_id):
    for step in range(1, 6):
        log(db, run_id, step)
    finish(db, run_id)
    events = stream(client, f"/api/runs/{run_id}/events")
    metrics = [e for e in events if e.event == "metric"]
    assert [m.json["step"] for m in metrics] == [1, 2, 3, 4, 5]
    ids = [int(m.id) for m in metrics]
    assert ids == sorted(set(ids))  # strictly increasing
    assert metrics[0].json == {"kind": "train", "step": 1, "epoch": 0.1, "loss": 2.9, "step_time": 0.5}
    assert events[-1].event == "done" and events[-1].json["status"] == "succeeded"
    assert any(e.event == "status" for e in events)


def test_the_run_page_stream_sends_chart_points_and_rendered_blocks(client, db, run_id):
    """The run page's one stream: metric points for its charts, then its progress, summary and checkpoint
    blocks rendered by the server (each an element htmx swaps in by its sse-swap name), then done."""
    for step in range(1, 4):
        log(db, run_id, step)
    finish(db, run_id)
    events = stream(client, f"/runs/{run_id}/stream")
    assert [e.json["step"] for e in events if e.event == "metric"] == [1, 2, 3]
    blocks = {e.event: e.data for e in events if e.event in ("progress", "summary", "checkpoints")}
    assert 'sse-swap="progress"' in blocks["progress"] and 'id="run-step">3 / 10<' in blocks["progress"]
    assert "data-ticking" not in blocks["progress"]  # a finished run's elapsed time stands still
    assert 'sse-swap="summary"' in blocks["summary"] and ">succeeded</span>" in blocks["summary"]
    assert 'sse-swap="checkpoints"' in blocks["checkpoints"] and "None yet." in blocks["checkpoints"]
    assert [e.event for e in events][-1] == "done"
    page = client.get(f"/runs/{run_id}")
    assert f'sse-connect="/runs/{run_id}/stream"' in page.text and 'sse-close="done"' in page.text


def test_the_run_page_stream_of_a_missing_run_ends_at_once(client):
    events = stream(client, "/runs/999/stream")
    assert [e.event for e in events] == ["done"] and events[0].json == {"error": "There is no run 999."}


def test_last_event_id_resumes_exactly_after_that_row(client, db, run_id):
    for step in range(1, 8):
        log(db, run_id, step)
    finish(db, run_id)
    first = [e for e in stream(client, f"/api/runs/{run_id}/events") if e.event == "metric"]
    resumed = stream(client, f"/api/runs/{run_id}/events", **{"Last-Event-ID": first[2].id})
    again = [e for e in resumed if e.event == "metric"]
    assert [e.id for e in again] == [e.id for e in first[3:]]  # no gap, no duplicate
    assert [
        e.id for e in stream(client, f"/api/runs/{run_id}/events?after={first[5].id}") if e.event == "metric"
    ] == [first[6].id]


def test_points_logged_while_streaming_arrive_in_order(client, db, run_id):
    def trainer():
        for step in range(1, 11):
            log(db, run_id, step)
            time.sleep(0.1)
        finish(db, run_id)

    thread = threading.Thread(target=trainer)
    thread.start()
    events = stream(client, f"/api/runs/{run_id}/events")
    thread.join()
    assert [e.json["step"] for e in events if e.event == "metric"] == list(range(1, 11))
    statuses = [e.json for e in events if e.event == "status"]
    assert statuses[0]["status"] == "running" and statuses[-1]["status"] == "succeeded"
    assert any(s["step"] not in (0, 10) for s in statuses)  # progress arrived during the run
    assert events[-1].event == "done"


def test_unknown_run_is_404(client):
    assert client.get("/api/runs/404/events").status_code == 404


def test_a_closed_client_releases_its_stream(tmp_path, db, run_id, settings):
    web = running("web", settings.data_dir, log=tmp_path / "web.log", env_extra=settings.database_env())
    with web as (base, _):
        with httpx.stream("GET", f"{base}/api/runs/{run_id}/events", timeout=10) as response:
            lines = response.iter_lines()  # kept referenced: dropping it would close the response early
            for line in lines:
                if line.startswith("event: status"):
                    break
            assert httpx.get(f"{base}/healthz").json()["open_streams"] == 1
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/healthz").json()["open_streams"] != 0:
            assert time.monotonic() < deadline, "the stream of a closed client was never released"
            time.sleep(0.2)


def test_the_list_stream_sends_each_changed_run(tmp_path, db, run_id, settings):
    web = running("web", settings.data_dir, log=tmp_path / "web.log", env_extra=settings.database_env())
    with web as (base, _):
        with httpx.stream("GET", f"{base}/api/runs/events", timeout=10) as response:
            lines = response.iter_lines()
            first = parse(_until_blank(lines))
            assert first[0].event == "run" and first[0].json["id"] == run_id
            log(db, run_id, 3)
            update = parse(_until_blank(lines))
            assert update[0].json["step"] == 3 and update[0].json["loss"] == pytest.approx(2.7)


def _until_blank(lines):
    for line in lines:
        yield line
        if not line.strip():
            return


@pytest.mark.parametrize(("shown", "announced"), [(0, True), (1, False)])
def test_a_run_created_before_the_runs_page_connects_is_announced(
    tmp_path, run_id, settings, shown, announced
):
    """Regression: a run created between rendering the Runs page and opening its stream never appeared,
    because the stream took the new count as its starting point."""
    web = running("web", settings.data_dir, log=tmp_path / "web.log", env_extra=settings.database_env())
    with web as (base, _):
        with httpx.stream("GET", f"{base}/runs/stream?count={shown}", timeout=10) as response:
            lines = response.iter_lines()
            first = parse(_until_blank(lines))
            assert (first[0].event == "runs-changed") is announced
            assert first[0].data == "1" if announced else first[0].event == f"run-{run_id}"


def test_the_run_page_says_what_a_running_run_is_doing(client, db, run_id):
    """Scoring the base model's answers, loading, converting: the phase shows with the progress while the
    run runs (and in its progress API), and not once it has ended."""
    with db.write_session() as session:
        state.record_phase(session=session, run_id=run_id, phase="Scoring the base model's answers: 8 of 40")
    page = client.get(f"/runs/{run_id}").text
    shown = "Scoring the base model&#39;s answers: 8 of 40"
    assert f'<p class="phase small" id="run-phase" role="status">{shown}</p>' in page
    assert client.get(f"/api/runs/{run_id}").json()["phase"] == "Scoring the base model's answers: 8 of 40"
    finish(db, run_id)
    assert 'id="run-phase"' not in client.get(f"/runs/{run_id}").text
    assert client.get(f"/api/runs/{run_id}").json()["phase"] is None


def test_the_eta_counts_the_evaluations_still_to_come():
    """The training process's ETA: steps to go at the step time, and each evaluation still to come (one
    every save_steps from this step on, one at the end) at the latest one's time; the page counts it down
    from when it was logged."""
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from app.models import Run, RunMetric, RunStatus
    from app.runs.events import progress
    from worker.callbacks import ProgressCallback
    from worker.sink import Sink

    callback = ProgressCallback(Sink(), resumed_from=None, trainable=1, total=2)
    args = SimpleNamespace(save_steps=20)
    at = lambda step: SimpleNamespace(global_step=step, max_steps=90)  # noqa: E731
    assert callback.eta(args, at(10), 0.5) == 80 * 0.5  # no evaluation measured: steps alone
    callback._last_time = 0.0
    callback.exclude(3.0, step=0)  # the base model's answers: two splits, 5 s together
    callback.exclude(2.0, step=0)
    # at step 10 the checkpoints 20, 40, 60, 80 and the end (90) are still to be scored
    assert callback.eta(args, at(10), 0.5) == 80 * 0.5 + 5 * 5.0
    # step 20 is logged before its checkpoint is saved and scored: still five; after it, four
    assert callback.eta(args, at(20), 0.5) == 70 * 0.5 + 5 * 5.0
    callback.exclude(4.0, step=20)
    assert callback.eta(args, at(21), 0.5) == 69 * 0.5 + 4 * 4.0
    assert callback.eta(args, at(90), 0.5) == 1 * 4.0  # the last step logged: the end's evaluation

    logged = datetime(2026, 12, 7, 12, tzinfo=UTC)
    run = Run(status=RunStatus.RUNNING, current_step=21, total_steps=90, started_at=logged, attempts=1)
    values = {"step_time": 0.5, "eta_seconds": 50.5}
    point = RunMetric(step=21, kind="train", values=values, created_at=logged)
    assert progress(run, point, now=logged + timedelta(seconds=10))["eta_seconds"] == 40.5
    assert progress(run, point, now=logged + timedelta(minutes=5))["eta_seconds"] == 0.0
