"""The job queue (app/jobs.py): one set of rules for every kind of job, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import text

from app import exports, jobs
from app.db import make_engine
from app.migrate import alembic_config
from app.models import Dataset, Export, ModelDownload, Publication, Run, utcnow
from app.runs import state

pytestmark = pytest.mark.databases

LATER = timedelta(minutes=5)


def add_job(db, kind: jobs.Kind, base_model: str = "m") -> int:
    """One queued job of `kind`: a run, an export of a run, a model's download, or a run's publication."""
    with db.write_session() as session:
        if kind is jobs.DOWNLOAD:
            download = ModelDownload(
                repo_id="org/m",
                revision="main",
                commit="main",
                endpoint="http://hub",
                files={},
                bytes_total=1,
            )
            session.add(download)
            session.commit()
            return download.id
        dataset = Dataset(
            name="d", filename="d.jsonl", format="alpaca", layout="jsonl", rows=1, size_bytes=1, sha256="0"
        )
        session.add(dataset)
        session.commit()
        run = state.enqueue(
            session=session, name="r", dataset_id=dataset.id, base_model=base_model, method="lora", config={}
        )
        if kind is jobs.TRAIN:
            return run.id
        run.status = "succeeded"  # an export is made of a finished run, which is published
        if kind is jobs.PUBLISH:
            publication = Publication(
                run_id=run.id, what="adapter", repo_id="me/r", endpoint="http://hub", card=""
            )
            session.add(publication)
            session.commit()
            return publication.id
        export = Export(run_id=run.id, step=0, format="merged", estimated_bytes=1)
        session.add(export)
        session.commit()
        return export.id


def row(db, kind: jobs.Kind, job_id: int):
    with db.session() as session:
        return session.get(kind.table, job_id)


def go_silent(db, kind: jobs.Kind) -> dict[str, list[int]]:
    with db.write_session() as session:
        return jobs.requeue_stale(session=session, stale_after=timedelta(seconds=30), now=utcnow() + LATER)


@pytest.mark.parametrize("kind", list(jobs.KINDS.values()), ids=list(jobs.KINDS))
def test_every_kind_follows_the_same_lease(db, kind):
    job_id = add_job(db, kind)
    with db.write_session() as session:
        if kind not in (
            jobs.DOWNLOAD,
            jobs.PUBLISH,
        ):  # any worker downloads or pushes; runs and exports need theirs
            assert jobs.claim(session=session, kind=kind, worker_id="w1", models=["other"]) is None
        held = jobs.claim(session=session, kind=kind, worker_id="w1", models=["m"])
        assert held is not None and held.id == job_id and held.status == "running" and held.attempts == 1
        assert jobs.claim(session=session, kind=kind, worker_id="w2") is None  # nothing else queued
        assert jobs.beat(session=session, kind=kind, job_id=job_id, worker_id="w1") == (True, job_id)
        assert jobs.beat(session=session, kind=kind, job_id=job_id, worker_id="w2") == (False, None)
        assert jobs.hand_back(session=session, kind=kind, job_id=job_id, worker_id="w1")
    assert row(db, kind, job_id).status == "queued" and row(db, kind, job_id).worker_id is None
    # silent twice, each time back in the queue; the third silence ends it
    for n in range(2, 2 + jobs.MAX_LOST):
        with db.write_session() as session:
            assert jobs.claim(session=session, kind=kind, worker_id=f"w{n}").id == job_id
        assert go_silent(db, kind) == {kind.name: [job_id]}
    ended = row(db, kind, job_id)
    assert ended.status == "failed" and f"stopped responding {jobs.MAX_LOST} times" in ended.error
    assert ended.worker_id is None and ended.finished_at is not None
    with db.session() as session:
        outcomes = [a.outcome for a in jobs.attempts_of(session=session, kind=kind, job_id=job_id)]
    assert outcomes == ["requeued", "lost", "lost", "failed"]  # a hand-back on purpose does not count
    assert go_silent(db, kind) == {}


@pytest.mark.parametrize("kind", list(jobs.KINDS.values()), ids=list(jobs.KINDS))
def test_only_the_holder_ends_a_job_and_its_attempt_closes(db, kind):
    job_id = add_job(db, kind)
    with db.write_session() as session:
        jobs.claim(session=session, kind=kind, worker_id="w1")
        assert not jobs.end(session=session, kind=kind, job_id=job_id, worker_id="w2", status="succeeded")
        assert jobs.end(session=session, kind=kind, job_id=job_id, worker_id="w1", status="succeeded")
        assert not jobs.hand_back(session=session, kind=kind, job_id=job_id, worker_id="w1")  # over
    with db.session() as session:
        (attempt,) = jobs.attempts_of(session=session, kind=kind, job_id=job_id)
    assert (attempt.worker_id, attempt.outcome) == ("w1", "succeeded") and attempt.ended_at is not None
    assert row(db, kind, job_id).status == "succeeded"


def test_a_worker_takes_an_export_before_a_run_and_kinds_keep_their_own_attempts(db):
    run_id = add_job(db, jobs.TRAIN)
    export_id = add_job(db, jobs.EXPORT)
    with db.write_session() as session:
        kind, first = jobs.claim_next(session=session, worker_id="w1")
        assert (kind, first.id) == (jobs.EXPORT, export_id)
        kind, second = jobs.claim_next(session=session, worker_id="w1")
        assert (kind, second.id) == (jobs.TRAIN, run_id)
        assert jobs.claim_next(session=session, worker_id="w1") is None
    with db.session() as session:
        trains = jobs.attempts_of(session=session, kind=jobs.TRAIN, job_id=run_id)
        makes = jobs.attempts_of(session=session, kind=jobs.EXPORT, job_id=export_id)
        assert [a.worker_id for a in trains] == [a.worker_id for a in makes] == ["w1"]
        assert [a.attempt for a in session.get(Run, run_id).history] == [1]


def test_a_silent_worker_on_a_run_it_was_asked_to_cancel_ends_it_cancelled(db):
    run_id = add_job(db, jobs.TRAIN)
    with db.write_session() as session:
        jobs.claim(session=session, kind=jobs.TRAIN, worker_id="w1")
        state.request_cancel(session=session, run_id=run_id)
    assert go_silent(db, jobs.TRAIN) == {"train": [run_id]}
    assert row(db, jobs.TRAIN, run_id).status == "cancelled"


def test_a_deleted_export_leaves_no_attempts_behind(db, settings):
    export_id = add_job(db, jobs.EXPORT)
    for n in range(jobs.MAX_LOST):
        with db.write_session() as session:
            jobs.claim(session=session, kind=jobs.EXPORT, worker_id=f"w{n}")
        go_silent(db, jobs.EXPORT)
    assert row(db, jobs.EXPORT, export_id).status == "failed"
    with db.write_session() as session:
        exports.delete(settings, session=session, export=session.get(Export, export_id))
        assert jobs.attempts_of(session=session, kind=jobs.EXPORT, job_id=export_id) == []


def test_a_worker_has_one_handler_for_each_kind():
    from worker.main import HANDLERS

    assert set(HANDLERS) == set(jobs.KINDS)


def test_the_runs_attempts_move_into_the_queue_and_back(settings, db):
    """Revision 0012 moves every run attempt into job_attempts (kind `train`), and its downgrade back."""
    config = alembic_config(settings)
    run_id = add_job(db, jobs.TRAIN)
    command.downgrade(config, "0011")
    engine = make_engine(settings.sqlalchemy_url)
    with engine.begin() as connection:
        for attempt, outcome in ((1, "lost"), (2, None)):
            connection.execute(
                text(
                    "INSERT INTO run_attempts (run_id, attempt, worker_id, started_at, outcome) "
                    "VALUES (:run, :attempt, :worker, :now, :outcome)"
                ),
                {"run": run_id, "attempt": attempt, "worker": f"w{attempt}", "now": "2026-12-01 10:00:00",
                 "outcome": outcome},
            )  # fmt: skip
    command.upgrade(config, "head")
    with db.session() as session:
        moved = jobs.attempts_of(session=session, kind=jobs.TRAIN, job_id=run_id)
        assert [(a.attempt, a.worker_id, a.outcome) for a in moved] == [(1, "w1", "lost"), (2, "w2", None)]
        assert jobs.lost_attempts(session, jobs.TRAIN, run_id) == 1
    command.downgrade(config, "0011")
    with engine.connect() as connection:
        query = "SELECT run_id, attempt, worker_id, outcome FROM run_attempts ORDER BY id"
        rows = connection.execute(text(query))
        assert [tuple(r) for r in rows] == [(run_id, 1, "w1", "lost"), (run_id, 2, "w2", None)]
    command.upgrade(config, "head")
    engine.dispose()


def test_a_worker_that_fetches_by_name_claims_runs_of_models_named_owner_name(db):
    """A worker without the web server's disk that reaches a hub announces FETCHES: it takes runs of models
    named owner/name it lacks (it fetches them), never runs of local models it lacks."""
    from app.workers import FETCHES, can_load

    local, by_name = (
        add_job(db, jobs.TRAIN, base_model="local-3"),
        add_job(db, jobs.TRAIN, base_model="org/m"),
    )
    with db.write_session() as session:
        assert jobs.claim(session=session, kind=jobs.TRAIN, worker_id="w1", models=["other"]) is None
        claimed = jobs.claim(session=session, kind=jobs.TRAIN, worker_id="w1", models=["other", FETCHES])
        assert claimed is not None and claimed.id == by_name
        assert jobs.claim(session=session, kind=jobs.TRAIN, worker_id="w1", models=["other", FETCHES]) is None
    assert row(db, jobs.TRAIN, local).status == "queued"
    assert can_load(["x", FETCHES], "org/m") and not can_load(["x", FETCHES], "local-3")


def test_a_job_that_needs_the_web_servers_disk_waits_only_for_workers_that_share_it(db):
    """What ends an idle worker's speed trial: a download waits for a worker on the web server's disk, not
    for one elsewhere (which could not take it)."""
    add_job(db, jobs.DOWNLOAD)
    with db.session() as session:
        assert jobs.waiting(session=session, models=["m"], gpus=0)
        assert not jobs.waiting(session=session, models=["m"], gpus=0, shared_disk=False)
    add_job(db, jobs.TRAIN)  # a run of a model it has: any worker
    with db.session() as session:
        assert jobs.waiting(session=session, models=["m"], gpus=0, shared_disk=False)
