"""Files between the web server and workers on other machines (no shared disk): a dataset's normalised
rows, a run's checkpoints and adapter as tar streams both ways, and its log. Uploads are accepted only
from the worker that owns the run (the `X-Tuneboard-Worker` header against the run's row), so a worker
that lost its run cannot overwrite the next one's files. The same token as every API call."""

from __future__ import annotations

import asyncio
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from app.config import Settings
from app.datasets.store import ROWS_FILE, dataset_dir
from app.deps import DatasetId, RunId, SessionDep, SettingsDep, get_dataset_or_404, get_run_or_404
from app.models import RunStatus
from app.runs.folder import pack
from app.workers import WORKER_HEADER

router = APIRouter(tags=["artifacts"])

WorkerHeader = Annotated[str | None, Header(alias=WORKER_HEADER)]
TAR = "application/x-tar"


@router.get("/api/datasets/{dataset_id}/rows.jsonl")
def dataset_rows_file(dataset_id: DatasetId, settings: SettingsDep, session: SessionDep) -> FileResponse:
    """The dataset's rows as training reads them: one normalised row per line."""
    get_dataset_or_404(session, dataset_id)
    path = dataset_dir(settings, dataset_id) / ROWS_FILE
    if not path.is_file():
        raise HTTPException(404, f"Dataset {dataset_id}'s rows are missing from the server's data folder.")
    return FileResponse(path, media_type="application/jsonl", filename=f"dataset-{dataset_id}.jsonl")


@router.get("/api/runs/{run_id}/checkpoints")
def list_checkpoints(run_id: RunId, settings: SettingsDep, session: SessionDep) -> list[dict[str, Any]]:
    """The run's complete checkpoints on this server, oldest first."""
    get_run_or_404(session, run_id)
    return [
        {"step": c.step, "bytes": c.size(), "has_adapter": c.has_adapter}
        for c in settings.run_folder(run_id).complete_checkpoints()
    ]


@router.get("/api/runs/{run_id}/checkpoints/{step}.tar")
def checkpoint_tar(run_id: RunId, step: int, settings: SettingsDep, session: SessionDep) -> FileResponse:
    get_run_or_404(session, run_id)
    checkpoint = settings.run_folder(run_id).checkpoint(step)
    if not checkpoint.complete:
        raise HTTPException(404, f"Run {run_id} has no complete checkpoint at step {step} on this server.")
    return _tar_response(settings, checkpoint.path, f"run-{run_id}-checkpoint-{step}.tar")


@router.get("/api/runs/{run_id}/adapter.tar")
def adapter_tar(run_id: RunId, settings: SettingsDep, session: SessionDep) -> FileResponse:
    run = get_run_or_404(session, run_id)
    folder = settings.run_folder(run_id)
    if not folder.has_adapter:
        raise HTTPException(404, f"Run {run_id} has no adapter yet (it is {run.status}).")
    return _tar_response(settings, folder.adapter, f"run-{run_id}-adapter.tar")


@router.put("/api/runs/{run_id}/checkpoints/{step}.tar", status_code=201)
async def upload_checkpoint(
    run_id: RunId,
    step: int,
    request: Request,
    settings: SettingsDep,
    worker: WorkerHeader = None,
    keep: str = "",
) -> dict[str, Any]:
    """A complete checkpoint from the worker training the run. `keep`: the steps it still holds (comma
    separated); the server drops the others, as the worker's rotation did."""
    if step < 0:
        raise HTTPException(422, "A checkpoint's step is 0 or more.")
    try:
        kept = {int(s) for s in keep.split(",") if s.strip()} if keep else None
    except ValueError:
        raise HTTPException(422, "keep: a comma-separated list of steps.") from None
    _check_owner(request, run_id, worker)
    folder = settings.run_folder(run_id)
    body = await _receive(request, settings)
    try:
        checkpoint = await asyncio.to_thread(folder.store_checkpoint, step, body, kept)
    except tarfile.TarError as exc:
        message = f"The checkpoint is not a readable tar stream ({exc}). Nothing was stored."
        raise HTTPException(422, message) from None
    finally:
        body.close()
    return {"step": step, "bytes": checkpoint.size()}


@router.put("/api/runs/{run_id}/adapter.tar", status_code=201)
async def upload_adapter(
    run_id: RunId, request: Request, settings: SettingsDep, worker: WorkerHeader = None
) -> dict[str, Any]:
    _check_owner(request, run_id, worker)
    folder = settings.run_folder(run_id)
    body = await _receive(request, settings)
    try:
        await asyncio.to_thread(folder.store_adapter, body)
    except (tarfile.TarError, ValueError) as exc:
        message = f"The adapter is not a readable tar stream ({exc}). Nothing was stored."
        raise HTTPException(422, message) from None
    finally:
        body.close()
    return {"stored": True}


@router.post("/api/runs/{run_id}/log", status_code=204)
async def append_log(
    run_id: RunId, request: Request, settings: SettingsDep, worker: WorkerHeader = None
) -> None:
    """The next bytes of the training process's log, appended to the run's log here."""
    _check_owner(request, run_id, worker)
    data = await request.body()
    await asyncio.to_thread(settings.run_folder(run_id).append_log, data)


def _check_owner(request: Request, run_id: int, worker: str | None) -> None:
    if not worker:
        raise HTTPException(400, f"The {WORKER_HEADER} header names the worker sending the run's files.")
    with request.app.state.db.session() as session:
        run = get_run_or_404(session, run_id)
        if run.status != RunStatus.RUNNING or run.worker_id != worker:
            raise HTTPException(
                409,
                f"Run {run_id} is not being trained by {worker} (it is {run.status}"
                + (f", on {run.worker_id}" if run.worker_id else "")
                + "); its files were not changed.",
            )


async def _receive(request: Request, settings: Settings):
    """The request body spooled to a temporary file in the data folder (it may be gigabytes)."""
    body = tempfile.TemporaryFile(dir=settings.tmp_dir)
    try:
        async for chunk in request.stream():
            await asyncio.to_thread(body.write, chunk)
    except BaseException:
        body.close()
        raise
    body.seek(0)
    return body


def _tar_response(settings: Settings, folder: Path, filename: str) -> FileResponse:
    handle, name = tempfile.mkstemp(dir=settings.tmp_dir, suffix=".tar")
    with os.fdopen(handle, "wb") as out:
        pack(folder, out)
    return FileResponse(name, media_type=TAR, filename=filename, background=BackgroundTask(os.unlink, name))
