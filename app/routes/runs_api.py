"""JSON API for runs: launch, list, show, metrics, cancel, download the adapter."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.config import Settings
from app.datasets.split import validation_rows
from app.datasets.store import ROWS_FILE, dataset_dir
from app.deps import SessionDep, SettingsDep, WriteSessionDep
from app.model_registry import BUNDLED_ID, find_model
from app.models import Dataset, Run, RunMetric
from app.runs import state
from app.runs.config import PRESETS, RunConfig, RunRequest, apply_preset, resolve_training, validate_peft
from app.runs.events import list_stream, progress, run_stream, tracked

router = APIRouter(prefix="/api/runs", tags=["runs"])


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
    trainable_params: int | None
    total_params: int | None
    resumed_from_step: int | None
    config: dict[str, Any]


class InvalidRun(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


def build_run_config(settings: Settings, request: RunRequest, *, session) -> RunConfig:
    """Validate a launch request against the dataset and model and fill every default."""
    request = apply_preset(request)
    dataset = session.get(Dataset, request.dataset_id)
    if dataset is None:
        raise InvalidRun("dataset_id", f"There is no dataset {request.dataset_id}.")
    model_id = request.base_model or BUNDLED_ID
    model = find_model(settings, model_id, session=session)
    if model is None:
        raise InvalidRun(
            "base_model", f"Unknown model '{model_id}'. GET /api/models lists the ones available."
        )
    if model.status in ("failed", "missing"):
        raise InvalidRun("base_model", f"{model.name} cannot be used: {model.error}")
    try:
        peft = validate_peft(request.method, request.peft)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["peft", *(str(p) for p in first["loc"])])
        raise InvalidRun(field, first["msg"].removeprefix("Value error, ")) from None
    held_out = validation_rows(
        dataset.rows,
        fraction=settings.validation_fraction,
        max_rows=settings.validation_max_rows,
        seed=request.training.seed,
    )
    train_rows = dataset.rows - len(held_out)
    try:
        training, total_steps = resolve_training(request.method, train_rows, request.training)
    except ValueError as exc:
        raise InvalidRun("training.packing", str(exc)) from None
    return RunConfig(
        name=(request.name or "").strip() or f"{dataset.name} · {request.method}",
        dataset_id=dataset.id,
        dataset_path=str(dataset_dir(settings, dataset.id) / ROWS_FILE),
        base_model=model.id,
        model_path=str(model.folder),
        method=request.method,
        prompt_format=request.prompt_format,
        peft=peft,
        training=training,
        train_rows=train_rows,
        validation_rows=held_out,
        total_steps=total_steps,
    )


def enqueue_run(config: RunConfig, *, session) -> Run:
    return state.enqueue(
        session=session,
        name=config.name,
        dataset_id=config.dataset_id,
        base_model=config.base_model,
        method=config.method,
        config=config.model_dump(mode="json"),
    )


def get_run_or_404(session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"There is no run {run_id}.")
    return run


@router.get("/presets")
def presets() -> dict[str, Any]:
    return PRESETS


@router.post("", status_code=201)
def launch_run(request: RunRequest, settings: SettingsDep, session: WriteSessionDep) -> RunOut:
    try:
        config = build_run_config(settings, request, session=session)
    except InvalidRun as exc:
        raise HTTPException(422, [{"row": None, "field": exc.field, "message": exc.message}]) from None
    return RunOut.model_validate(enqueue_run(config, session=session))


@router.get("")
def list_runs(session: SessionDep) -> list[RunOut]:
    return [RunOut.model_validate(r) for r in session.scalars(select(Run).order_by(Run.id.desc()))]


@router.get("/events")
async def runs_events(request: Request):
    """The list-level stream: `event: run` with a run's progress whenever it changes."""

    def encode(run, latest):
        return ServerSentEvent(json.dumps(progress(run, latest), default=str), event="run")

    return EventSourceResponse(tracked(request.app, list_stream(request.app.state.feeds, encode)), ping=15)


@router.get("/{run_id}/events")
async def run_events(
    request: Request,
    run_id: int,
    after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
):
    """`metric`, `status` and `done` events of one run; resumes after Last-Event-ID (or `after`)."""
    start = after if after is not None else int(last_event_id) if (last_event_id or "").isdigit() else 0
    with request.app.state.db.session() as session:
        get_run_or_404(session, run_id)
    return EventSourceResponse(
        tracked(request.app, run_stream(request.app.state.feeds, run_id, start)), ping=15
    )


@router.get("/{run_id}")
def show_run(run_id: int, session: SessionDep) -> RunOut:
    return RunOut.model_validate(get_run_or_404(session, run_id))


@router.get("/{run_id}/metrics")
def run_metrics(
    run_id: int, session: SessionDep, after: Annotated[int, Query(ge=0)] = 0
) -> list[dict[str, Any]]:
    get_run_or_404(session, run_id)
    rows = session.scalars(
        select(RunMetric).where(RunMetric.run_id == run_id, RunMetric.id > after).order_by(RunMetric.id)
    )
    columns = [c.name for c in RunMetric.__table__.columns if c.name not in ("run_id", "created_at")]
    return [{c: getattr(m, c) for c in columns} for m in rows]


@router.post("/{run_id}/cancel")
def cancel_run(run_id: int, session: WriteSessionDep) -> RunOut:
    try:
        run = state.request_cancel(session=session, run_id=run_id)
    except LookupError:
        raise HTTPException(404, f"There is no run {run_id}.") from None
    except state.TransitionError as exc:
        raise HTTPException(409, str(exc)) from None
    return RunOut.model_validate(run)


@router.get("/{run_id}/adapter")
def download_adapter(run_id: int, settings: SettingsDep, session: SessionDep) -> Response:
    run = get_run_or_404(session, run_id)
    folder = settings.run_dir(run_id) / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise HTTPException(404, f"Run {run_id} has no adapter yet (it is {run.status}).")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"run-{run_id}-adapter/{path.relative_to(folder)}")
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="run-{run_id}-adapter.zip"'},
    )
