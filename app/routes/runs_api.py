"""JSON API for runs: estimate, launch, list, show, metrics, evaluation, cancel, download the adapter."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, model_validator
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.deps import AfterId, RunId, SessionDep, SettingsDep, WriteSessionDep, get_run_or_404
from app.errors import problem
from app.models import MAX_ID, Run, RunMetric
from app.routes.artifacts_api import packed_response
from app.runs import evaluation, state
from app.runs.config import PRESETS, InvalidRun, RunRequest
from app.runs.estimate import run_estimate
from app.runs.events import list_stream, metric_payload, progress, run_stream, tracked
from app.runs.folder import zip_folder
from app.runs.launch import build_run_config, enqueue_run

router = APIRouter(prefix="/api/runs", tags=["runs"])


class AttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    worker_id: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None  # succeeded | failed | cancelled | requeued (its worker stopped) | lost (went silent)


class ClusterJobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    provider: str
    job_id: str  # the scheduler's
    state: str  # the scheduler's word: PENDING, RUNNING, COMPLETED, PREEMPTED, CANCELLED…
    reason: str | None  # why it waits or ended (Resources, Priority, TimeLimit…)
    node: str | None
    log: str | None  # the job's output file, on the cluster
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    status: str
    dataset_id: int
    base_model: str
    method: str
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    error: str | None
    exit_code: int | None
    total_steps: int | None
    current_step: int
    phase: str | None  # what a running run is doing now, in words; None once it has ended
    trainable_params: int | None
    total_params: int | None
    resumed_from_step: int | None
    gpus: int
    provider: str | None  # the compute provider (providers.yaml) whose scheduler runs it
    cluster_jobs: list[ClusterJobOut]  # its scheduler jobs, oldest first (none for a worker's run)
    history: list[AttemptOut]  # each attempt: the worker that trained it, and how it ended
    config: dict[str, Any]

    @model_validator(mode="after")
    def _phase_while_running(self):
        if self.status != "running":
            self.phase = None
        return self


@router.get("/presets")
def presets() -> dict[str, Any]:
    return PRESETS


@router.post("", status_code=201)
def launch_run(request: RunRequest, settings: SettingsDep, session: WriteSessionDep) -> RunOut:
    try:
        config = build_run_config(settings, request, session=session)
    except InvalidRun as exc:
        raise HTTPException(422, [problem(exc.message, exc.field)]) from None
    return RunOut.model_validate(enqueue_run(config, session=session))


@router.post("/estimate")
def estimate_run(request: RunRequest, settings: SettingsDep, session: SessionDep) -> dict[str, Any]:
    """What a launch request would cost, without launching it: steps, trainable parameters, memory and
    (once a run on the model has measured its speed) seconds; plus the configuration it resolves to."""
    try:
        config = build_run_config(settings, request, session=session)
    except InvalidRun as exc:
        raise HTTPException(422, [problem(exc.message, exc.field)]) from None
    cost = run_estimate(settings, session, config)
    return {**cost, "config": config.model_dump(mode="json")}


@router.get("")
def list_runs(session: SessionDep) -> list[RunOut]:
    loaded = (selectinload(Run.history), selectinload(Run.cluster_jobs))
    runs = session.scalars(select(Run).options(*loaded).order_by(Run.id.desc()))
    return [RunOut.model_validate(r) for r in runs]


@router.get("/events")
async def runs_events(request: Request):
    """The list-level stream: `event: run` with a run's progress whenever it changes."""

    def encode(run, latest):
        return ServerSentEvent(json.dumps(progress(run, latest), default=str), event="run")

    return EventSourceResponse(tracked(request.app, list_stream(request.app.state.feeds, encode)), ping=15)


@router.get("/{run_id}/events")
async def run_events(
    request: Request,
    run_id: RunId,
    after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
):
    """`metric`, `status` and `done` events of one run; resumes after Last-Event-ID (or `after`)."""
    start = after if after is not None else _event_id(last_event_id)
    with request.app.state.db.session() as session:
        get_run_or_404(session, run_id)
    return EventSourceResponse(
        tracked(request.app, run_stream(request.app.state.feeds, run_id, start)), ping=15
    )


def _event_id(header: str | None) -> int:
    """A Last-Event-ID as a row id; anything else (or a number no row can have) starts from the beginning."""
    value = (header or "").strip()
    return int(value) if value.isdigit() and len(value) < 19 else 0


@router.get("/{run_id}")
def show_run(run_id: RunId, session: SessionDep) -> RunOut:
    return RunOut.model_validate(get_run_or_404(session, run_id))


@router.get("/{run_id}/metrics")
def run_metrics(run_id: RunId, session: SessionDep, after: AfterId = 0) -> list[dict[str, Any]]:
    get_run_or_404(session, run_id)
    rows = session.scalars(
        select(RunMetric).where(RunMetric.run_id == run_id, RunMetric.id > after).order_by(RunMetric.id)
    )
    return [{"id": m.id, **metric_payload(m)} for m in rows]


@router.get("/{run_id}/evaluation")
def run_evaluation(run_id: RunId, settings: SettingsDep, session: SessionDep) -> dict[str, Any]:
    """Scored answers: mean chrF, ROUGE-L and exact match per step (0 = the base model) for held-out and
    training rows, the best checkpoint, and each answered row with the base and best answers."""
    return evaluation.report(settings, session=session, run=get_run_or_404(session, run_id))


@router.post("/{run_id}/cancel")
def cancel_run(run_id: RunId, session: WriteSessionDep) -> RunOut:
    try:
        run = state.request_cancel(session=session, run_id=run_id)
    except LookupError:
        raise HTTPException(404, f"There is no run {run_id}.") from None
    except state.TransitionError as exc:
        raise HTTPException(409, str(exc)) from None
    return RunOut.model_validate(run)


@router.get("/{run_id}/adapter")
def download_adapter(run_id: RunId, settings: SettingsDep, session: SessionDep) -> Response:
    run = get_run_or_404(session, run_id)
    run_folder = settings.run_folder(run_id)
    folder = run_folder.adapter
    if not run_folder.has_adapter:
        raise HTTPException(404, f"Run {run_id} has no adapter yet (it is {run.status}).")
    prefix = f"run-{run_id}-adapter"
    return packed_response(
        settings, lambda out: zip_folder(folder, out, prefix), "application/zip", f"{prefix}.zip"
    )
