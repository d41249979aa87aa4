"""The run state machine (app/runs/state.py) against a real database: SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import jobs
from app.db import Database
from app.models import Dataset, Run, RunMetric, RunStatus, utcnow
from app.runs import state

pytestmark = pytest.mark.databases


@pytest.fixture
def dataset_id(db) -> int:
    with db.write_session() as session:
        dataset = Dataset(
            name="d", filename="d.jsonl", format="alpaca", layout="jsonl", rows=1, size_bytes=1, sha256="0"
        )
        session.add(dataset)
        session.commit()
        return dataset.id


def queue(db, dataset_id: int, count: int = 1) -> list[int]:
    ids = []
    for n in range(count):
        with db.write_session() as session:
            run = state.enqueue(
                session=session, name=f"r{n}", dataset_id=dataset_id, base_model="m", method="lora", config={}
            )
            ids.append(run.id)
    return ids


def claim(db, worker: str) -> Run | None:
    with db.write_session() as session:
        return state.claim_next(session=session, worker_id=worker)


def test_a_run_goes_from_queued_to_succeeded_through_its_worker(db, dataset_id):
    (run_id,) = queue(db, dataset_id)
    run = claim(db, "w1")
    assert run is not None and run.id == run_id and run.status == RunStatus.RUNNING
    assert run.attempts == 1 and run.worker_id == "w1" and run.started_at is not None
    assert claim(db, "w2") is None  # nothing else queued
    with db.write_session() as session:
        assert state.heartbeat(session=session, run_id=run_id, worker_id="w1") is False
        with pytest.raises(state.TransitionError):
            state.heartbeat(session=session, run_id=run_id, worker_id="w2")  # not its run
        state.finish(session=session, run_id=run_id, worker_id="w2", status="succeeded")  # ignored
        assert session.get(Run, run_id, populate_existing=True).status == RunStatus.RUNNING
        state.finish(session=session, run_id=run_id, worker_id="w1", status="succeeded", exit_code=0)
        done = session.get(Run, run_id, populate_existing=True)
        assert done.status == RunStatus.SUCCEEDED and done.worker_id is None and done.finished_at is not None
        with pytest.raises(state.TransitionError):
            state.request_cancel(session=session, run_id=run_id)


def test_cancel_queued_at_once_running_by_flag(db, dataset_id):
    queued, running = queue(db, dataset_id, 2)
    with db.write_session() as session:
        assert state.request_cancel(session=session, run_id=queued).status == RunStatus.CANCELLED
    run = claim(db, "w1")
    assert run is not None and run.id == running
    with db.write_session() as session:
        state.request_cancel(session=session, run_id=running)
        assert state.heartbeat(session=session, run_id=running, worker_id="w1") is True  # stop, says the flag


def test_a_silent_worker_loses_its_run_which_resumes_elsewhere_then_gives_up(db, dataset_id):
    (run_id,) = queue(db, dataset_id)
    later = utcnow() + timedelta(minutes=5)
    for attempt in range(1, jobs.MAX_LOST + 1):
        run = claim(db, f"w{attempt}")
        assert run is not None and run.attempts == attempt
        with db.write_session() as session:
            silent = jobs.requeue_stale(session=session, stale_after=timedelta(seconds=30), now=later)
            assert silent == {"train": [run_id]}
    with db.session() as session:
        run = session.get(Run, run_id)
        assert run.status == RunStatus.FAILED and "stopped responding 3 times" in run.error
        outcomes = [(a.worker_id, a.outcome) for a in state.attempts_of(session=session, run_id=run_id)]
        assert outcomes == [("w1", "lost"), ("w2", "lost"), ("w3", "failed")]


def start(db, run_id: int, resumed_from: int | None) -> None:
    with db.write_session() as session:
        state.record_start(
            session=session, run_id=run_id, total_steps=10, trainable=1, total=2, resumed_from=resumed_from
        )


def log(db, run_id: int, steps: range) -> None:
    with db.write_session() as session:
        for step in steps:
            values = {"kind": "train", "step": step, "loss": 1.0}
            state.record_metric(session=session, run_id=run_id, values=values)


def test_a_resumed_attempt_forgets_the_metrics_it_will_redo(db, dataset_id):
    (run_id,) = queue(db, dataset_id)
    claim(db, "w1")
    start(db, run_id, None)
    log(db, run_id, range(1, 8))  # its last checkpoint was step 5
    with db.write_session() as session:
        state.requeue(session=session, run_id=run_id, worker_id="w1")
    claim(db, "w2")
    start(db, run_id, 5)
    log(db, run_id, range(6, 11))
    with db.session() as session:
        steps = select(RunMetric.step).where(RunMetric.run_id == run_id).order_by(RunMetric.id)
        assert list(session.scalars(steps)) == list(range(1, 11))  # each step once
        assert session.get(Run, run_id).current_step == 10


def test_claims_are_atomic_under_many_workers(settings, db, dataset_id):
    ids = set(queue(db, dataset_id, 40))
    claimed: dict[str, list[int]] = {f"w{n}": [] for n in range(6)}

    def claim_all(name: str) -> None:
        database = Database(settings.sqlalchemy_url)
        try:
            while (run := claim(database, name)) is not None:
                claimed[name].append(run.id)
        finally:
            database.dispose()

    workers = [threading.Thread(target=claim_all, args=(name,)) for name in claimed]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    every = [run_id for runs in claimed.values() for run_id in runs]
    assert sorted(every) == sorted(ids)  # each run claimed exactly once


def test_a_worker_claims_only_runs_it_can_serve_and_each_attempt_names_its_worker(db, dataset_id):
    with db.write_session() as session:
        needs = {"dataset_id": dataset_id, "method": "lora", "config": {}}
        big = state.enqueue(session=session, name="big", base_model="m", gpus=2, **needs).id
        other = state.enqueue(
            session=session, name="other", dataset_id=dataset_id, base_model="n", method="lora", config={}
        ).id
    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="cpu", models=["m"], gpus=0) is None
        run = state.claim_next(session=session, worker_id="cpu", models=["m", "n"], gpus=0)
        assert run is not None and run.id == other  # the older run needs GPUs this worker lacks
    with db.write_session() as session:
        run = state.claim_next(session=session, worker_id="gpu-1", models=["m"], gpus=2)
        assert run is not None and run.id == big
        state.requeue(session=session, run_id=big, worker_id="gpu-1")
    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="gpu-2", models=["m"], gpus=4).id == big
        state.finish(session=session, run_id=big, worker_id="gpu-2", status="succeeded", exit_code=0)
    with db.session() as session:
        attempts = state.attempts_of(session=session, run_id=big)
        expected = [(1, "gpu-1", "requeued"), (2, "gpu-2", "succeeded")]
        assert [(a.attempt, a.worker_id, a.outcome) for a in attempts] == expected
        assert all(a.ended_at is not None for a in attempts)
        (open_attempt,) = state.attempts_of(session=session, run_id=other)
        assert open_attempt.worker_id == "cpu" and open_attempt.outcome is None


def test_runs_handed_back_on_purpose_do_not_count_as_lost(db, dataset_id):
    """A worker that cannot reach the web server hands its run back; only silent workers use up tries."""
    (run_id,) = queue(db, dataset_id)
    for worker in ("w1", "w2", "w3"):
        claim(db, worker)
        with db.write_session() as session:
            state.requeue(session=session, run_id=run_id, worker_id=worker)
    claim(db, "w4")
    with db.write_session() as session:
        later = utcnow() + timedelta(minutes=5)
        stale = jobs.requeue_stale(session=session, stale_after=timedelta(seconds=30), now=later)
        assert stale == {"train": [run_id]}
        run = session.get(Run, run_id, populate_existing=True)
        assert run.status == RunStatus.QUEUED and run.attempts == 4
