"""The playground: ask the base model and tuned adapters the same question, answers streaming side by side."""

from __future__ import annotations

import json
from typing import Annotated

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from app import generation_client
from app.datasets import store
from app.deps import IdQuery, SessionDep, SettingsDep
from app.errors import problem
from app.model_registry import BUNDLED_ID
from app.models import Run
from app.playground import MAX_PANES, GenerateBody, Target, TargetError, list_targets, resolve, resolve_all
from app.runs import evaluation
from app.runs.events import tracked
from app.web import render

router = APIRouter()
VALIDATION_ROWS_SHOWN = 50


def default_panes(targets: list[Target], run_id: int | None) -> list[str]:
    """Base on the left, the chosen run (or the newest one) on the right."""
    runs = [t for t in targets if t.run_id is not None and t.step is None]
    chosen = next((t for t in runs if t.run_id == run_id), runs[0] if runs else None)
    bases = [t.id for t in targets if t.run_id is None]
    if chosen is None:
        return [BUNDLED_ID if BUNDLED_ID in bases else bases[0]] if bases else []
    return [chosen.base_model, chosen.id]


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
def playground_page(
    request: Request, settings: SettingsDep, session: SessionDep, run: Annotated[int | None, IdQuery] = None
):
    targets = list_targets(settings, session=session)
    panes = default_panes(targets, run)
    missing = None
    if run is not None and f"run-{run}" not in panes:
        try:
            resolve(settings, f"run-{run}", session=session)
        except TargetError as exc:
            missing = str(exc)
    context = {
        "targets": targets,
        "panes": panes,
        "max_panes": MAX_PANES,
        "missing": missing,
        "host_down": None if generation_client.is_up(settings) else generation_client.NOT_RUNNING,
        "validation_run": next((t.run_id for t in targets if t.id in panes and t.run_id), None),
    }
    return render(request, "playground.html", context)


@router.get("/playground/validation", response_class=HTMLResponse, include_in_schema=False)
def validation_rows(
    request: Request, settings: SettingsDep, session: SessionDep, run: Annotated[int, IdQuery]
):
    """The run's held-out rows, each ready to be asked (question, Alpaca fields, reference answer); of a run
    that held none out (a small dataset trains every row), the first rows it trained on: asking one shows
    whether the adapter learned it."""
    record = session.get(Run, run)
    rows = []
    held_out = bool(record and record.config.get("validation_rows"))
    if record is not None:
        indexes = record.config.get("validation_rows", []) if held_out else range(VALIDATION_ROWS_SHOWN)
        wanted = set(list(indexes)[:VALIDATION_ROWS_SHOWN])
        other = (record.config.get("evaluation") or {}).get("dataset_id")
        dataset_rows = store.load_rows(settings, other if held_out and other else record.dataset_id)
        for index in sorted(wanted):
            if index >= len(dataset_rows):
                continue
            messages = dataset_rows[index]["messages"]
            if messages[-1]["role"] != "assistant":
                continue
            question = messages[:-1]
            rows.append(
                {
                    "number": index + 1,
                    "question": question,
                    "alpaca": dataset_rows[index].get("alpaca"),
                    "reference": messages[-1]["content"],
                    "preview": evaluation.question_of(messages),
                }
            )
    total = 0
    if record is not None:
        total = len(record.config["validation_rows"]) if held_out else record.config.get("train_rows") or 0
    context = {"run": record, "rows": rows, "total": total, "held_out": held_out}
    return render(request, "_validation_rows.html", context)


@router.post("/api/playground/chat", tags=["playground"])
async def chat(body: GenerateBody, request: Request, settings: SettingsDep):
    """Ask every pane the same question; a text/event-stream of the generation host's events
    (`queued`, `status`, `start`, `token`, `replace`, then `end` or `error`)."""
    targets = [pane.target for pane in body.panes]
    try:
        await anyio.to_thread.run_sync(resolve_all, settings, request.app.state.db, targets)
    except TargetError as exc:
        return JSONResponse({"detail": [problem(str(exc), "panes")]}, status_code=404)

    async def events():
        async for event in generation_client.generate(settings, body.model_dump(exclude_none=True)):
            yield ServerSentEvent(json.dumps(event), event=event["type"])

    return EventSourceResponse(tracked(request.app, events()), ping=15)


@router.get("/api/playground/status", tags=["playground"])
async def host_status(settings: SettingsDep):
    """Whether the generation host is up, and what it has loaded."""
    status = await generation_client.status(settings)
    if status is None:
        return JSONResponse({"status": "down", "message": generation_client.NOT_RUNNING}, status_code=503)
    return status
