"""Files between the web server and workers on other machines (no shared disk): a dataset's normalised
rows, a run's checkpoints and adapter as tar streams both ways, and its log. Uploads are accepted only
from the worker that owns the run (the `X-Tuneboard-Worker` header against the run's row), so a worker
that lost its run cannot overwrite the next one's files. The same token as every API call."""

from __future__ import annotations

import asyncio
import os
import tarfile
import tempfile
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path as FolderPath
from typing import IO, Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from app import exports
from app.config import Settings
from app.datasets.store import ROWS_FILE, dataset_dir
from app.deps import DatasetId, RunId, SessionDep, SettingsDep, get_dataset_or_404, get_run_or_404
from app.models import MAX_ID, Export, ExportStatus, Run
from app.routes.exports_api import ExportId
from app.runs import state
from app.runs.folder import pack
from app.units import filesize
from app.workers import LOG_OFFSET_HEADER, WORKER_HEADER

router = APIRouter(tags=["artifacts"])

WorkerHeader = Annotated[str | None, Header(alias=WORKER_HEADER)]
TAR = "application/x-tar"
Step = Annotated[int, Path(ge=0, le=MAX_ID, description="a checkpoint's step")]


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
def checkpoint_tar(run_id: RunId, step: Step, settings: SettingsDep, session: SessionDep) -> FileResponse:
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
    step: Step,
    request: Request,
    settings: SettingsDep,
    worker: WorkerHeader = None,
    keep: str = "",
) -> dict[str, Any]:
    """A complete checkpoint (its marker inside) from the worker training the run. `keep`: the steps it
    still holds (comma separated); the server drops the others, as the worker's rotation did."""
    try:
        kept = {int(s) for s in keep.split(",") if s.strip()} if keep else None
    except ValueError:
        raise HTTPException(422, "keep: a comma-separated list of steps.") from None
    folder = settings.run_folder(run_id)
    async with _received(request, settings, lambda: _owned(request, run_id, worker)) as body:
        try:
            checkpoint = await asyncio.to_thread(folder.store_checkpoint, step, body, kept)
        except (tarfile.TarError, ValueError) as exc:
            message = f"The checkpoint could not be stored ({exc}). Nothing was stored."
            raise HTTPException(422, message) from None
    return {"step": step, "bytes": checkpoint.size()}


@router.put("/api/runs/{run_id}/adapter.tar", status_code=201)
async def upload_adapter(
    run_id: RunId, request: Request, settings: SettingsDep, worker: WorkerHeader = None
) -> dict[str, Any]:
    folder = settings.run_folder(run_id)
    async with _received(request, settings, lambda: _owned(request, run_id, worker)) as body:
        try:
            await asyncio.to_thread(folder.store_adapter, body)
        except (tarfile.TarError, ValueError) as exc:
            message = f"The adapter could not be stored ({exc}). Nothing was stored."
            raise HTTPException(422, message) from None
    return {"stored": True}


@router.post("/api/runs/{run_id}/log", status_code=204)
async def append_log(
    run_id: RunId,
    request: Request,
    settings: SettingsDep,
    worker: WorkerHeader = None,
    offset: Annotated[int, Header(alias=LOG_OFFSET_HEADER, ge=0)] = 0,
) -> None:
    """Bytes `offset`… of this attempt's log on the worker, appended to the run's log here (once: a
    request sent again after a lost answer adds nothing)."""
    run = await asyncio.to_thread(_owned, request, run_id, worker)
    data = await request.body()  # held to the upload limit, as every body
    sender = f"{worker}/{run.attempts}"
    try:
        await asyncio.to_thread(settings.run_folder(run_id).append_log, data, sender, offset)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _owned(request: Request, run_id: int, worker: str | None) -> Run:
    if not worker:
        raise HTTPException(400, f"The {WORKER_HEADER} header names the worker sending the run's files.")
    with request.app.state.db.session() as session:
        try:
            return state.owned_run(session=session, run_id=run_id, worker_id=worker)
        except LookupError:
            raise HTTPException(404, f"There is no run {run_id}.") from None
        except state.TransitionError as exc:
            raise HTTPException(409, f"{exc} Its files were not changed.") from None


@router.put("/api/exports/{export_id}/files.tar", status_code=201)
async def upload_export(
    export_id: ExportId, request: Request, settings: SettingsDep, worker: WorkerHeader = None
) -> dict[str, Any]:
    """A finished export's files (its main file, and a GGUF's Modelfile) from the worker making it on
    another machine; the worker marks the export made once they are stored."""
    check = lambda: _owned_export(request, export_id, worker)  # noqa: E731
    export = await asyncio.to_thread(check)
    folder = settings.run_folder(export.run_id)
    async with _received(request, settings, check) as body:
        try:
            stored = await asyncio.to_thread(
                folder.store_export, export.format, export.step, body, exports.file_name(export)
            )
        except (tarfile.TarError, ValueError) as exc:
            raise HTTPException(422, f"The export could not be stored ({exc}). Nothing was stored.") from None
    return {"bytes": (stored / exports.file_name(export)).stat().st_size}


def _owned_export(request: Request, export_id: int, worker: str | None) -> Export:
    if not worker:
        raise HTTPException(400, f"The {WORKER_HEADER} header names the worker sending the export's files.")
    with request.app.state.db.session() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise HTTPException(404, f"There is no export {export_id}.")
        if export.status != ExportStatus.RUNNING or export.worker_id != worker:
            raise HTTPException(
                409,
                f"Export {export_id} is not being made by {worker} (it is {export.status}). "
                "Nothing was stored.",
            )
        session.expunge(export)
        return export


ARTIFACT_SLACK = 256_000_000  # tokenizer files, trainer state and the tar framing, beside the weights
BYTES_PER_TRAINABLE = 16  # a checkpoint holds each trainable weight and the optimizer's two moments (fp32)


def artifact_budget(settings: Settings, row: Run | Export) -> int:
    """The most bytes a worker may send for this run's checkpoint or adapter, or this export's files: what
    the run's size allows (a 135M model's checkpoint is megabytes, never gigabytes), and never more than
    TUNEBOARD_MAX_ARTIFACT_MB."""
    ceiling = int(settings.max_artifact_mb * 1_000_000)
    if isinstance(row, Export):
        return min(ceiling, int(row.estimated_bytes * 1.5) + ARTIFACT_SLACK)
    params = row.trainable_params or row.total_params
    return min(ceiling, BYTES_PER_TRAINABLE * params + ARTIFACT_SLACK) if params else ceiling


@asynccontextmanager
async def _received(request: Request, settings: Settings, owned: Callable[[], Run | Export]):
    """The request body spooled to a temporary file in the data folder (it may be gigabytes), from the
    worker that owns the run or export (`owned` raises otherwise): checked before the body is read and
    again once it has arrived (the run may have been requeued meanwhile). A body larger than the run's or
    export's budget (`artifact_budget`) is refused with 413 as soon as it passes it."""
    budget = artifact_budget(settings, await asyncio.to_thread(owned))
    body = tempfile.TemporaryFile(dir=settings.tmp_dir)
    try:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > budget:
                raise HTTPException(
                    413,
                    f"These files are larger than the {filesize(budget)} this run's size allows "
                    "(its trainable weights and their optimizer state, plus tokenizer and trainer files). "
                    "Nothing was stored.",
                )
            await asyncio.to_thread(body.write, chunk)
        body.seek(0)
        await asyncio.to_thread(owned)
        yield body
    finally:
        body.close()


def _tar_response(settings: Settings, folder: FolderPath, filename: str) -> FileResponse:
    return packed_response(settings, lambda out: pack(folder, out), TAR, filename)


def packed_response(
    settings: Settings, write: Callable[[IO[bytes]], None], media_type: str, filename: str
) -> FileResponse:
    """A download written by `write` into a temporary file of the data folder and streamed from there (it
    may be gigabytes: never held in memory); the file goes once sent. 404 when the folder being packed was
    replaced or removed meanwhile (FileNotFoundError from `write`)."""
    handle, name = tempfile.mkstemp(dir=settings.tmp_dir)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
    except FileNotFoundError:
        os.unlink(name)
        message = "That folder was replaced or removed while it was being packed; ask again."
        raise HTTPException(404, message) from None
    except BaseException:
        os.unlink(name)
        raise
    cleanup = BackgroundTask(os.unlink, name)
    return FileResponse(name, media_type=media_type, filename=filename, background=cleanup)
