"""The generation host: a small HTTP service in the worker's machine that owns the generation engine.

The web server sends it one request per question (`POST /generate`: the panes' targets and conversations,
and the shared sampling settings) and relays the newline-delimited JSON events it streams back:
`queued`, `status`, `start`, `token`, `replace`, then `end` (every pane's result) or `error`.
Requests run one at a time on a single generation thread, with a bounded queue, so that answering never
takes more threads or memory than it was given and a training run on the same machine keeps going.

Run by `tuneboard worker` (which restarts it if it dies); `python -m worker.gen_server` runs it alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select

from app.config import Settings, get_settings
from app.db import Database
from app.models import Run, RunStatus
from app.playground import GenerateBody, TargetError, resolve_all
from app.security import BodyLimitMiddleware, HostCheckMiddleware, JsonBodyMiddleware, bearer_ok

log = logging.getLogger("tuneboard.generation")


SLOW_WHILE_TRAINING = "A training run is using this machine, so answers come more slowly."


def explain(exc: BaseException) -> str:
    """One sentence for the user about why an answer failed."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return (
            "Out of memory while answering: lower max new tokens, ask with fewer panes, "
            "or wait for the training run to end."
        )
    return f"Generation failed: {type(exc).__name__}: {exc}"


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def default_budget(device: str) -> int | None:
    from worker.hardware import free_memory

    free, _ = free_memory(device)
    return free // 2 if free else None


def create_host(settings: Settings, engine=None) -> FastAPI:
    import torch

    from worker.engine import AdapterRef, Engine, GenerationError, PaneRequest, PromptTooLong, Sampling
    from worker.hardware import choose_dtype

    torch.set_num_threads(settings.generation_threads or default_threads())
    if engine is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        budget = int(settings.generation_memory_mb * 2**20) if settings.generation_memory_mb else None
        engine = Engine(
            device=device,
            dtype=choose_dtype(settings.generation_dtype),
            budget_bytes=budget or default_budget(device),
        )
    db = Database(settings.sqlalchemy_url)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
    waiting = {"count": 0}
    counts = {"answered": 0, "cancelled": 0}
    token = settings.token.get_secret_value() if settings.token else None
    app = FastAPI(title="Tuneboard generation host")
    app.state.engine = engine
    limit_kb = settings.generation_max_body_kb
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=limit_kb * 1024,
        message=f"The conversation is larger than the generation host's {limit_kb} KB limit "
        "(TUNEBOARD_GENERATION_MAX_BODY_KB).",
    )
    app.add_middleware(HostCheckMiddleware, names=settings.host_names(settings.generation_host))

    def authorised(request: Request) -> bool:
        return token is None or bearer_ok(request.headers.get("authorization", ""), token)

    def panes_for(body: GenerateBody) -> list[PaneRequest]:
        targets = resolve_all(settings, db, [pane.target for pane in body.panes])
        return [
            PaneRequest(
                model_key=t.base_model,
                model_path=t.model_path,
                adapter=AdapterRef(t.id, t.adapter_path) if t.adapter_path else None,
                messages=[m.model_dump(exclude_none=True) for m in pane.messages],
                prompt_format=t.prompt_format,
                system=pane.system,
            )
            for t, pane in zip(targets, body.panes, strict=True)
        ]

    def training_now() -> int:
        with db.session() as session:
            return (
                session.scalar(select(func.count()).select_from(Run).where(Run.status == RunStatus.RUNNING))
                or 0
            )

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "waiting": waiting["count"], **counts, **engine.describe()}

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request):
        if not authorised(request):
            return JSONResponse(
                {"message": "The generation host needs the Tuneboard token."}, status_code=401
            )
        try:
            panes = await asyncio.to_thread(panes_for, body)
        except TargetError as exc:
            return JSONResponse({"message": str(exc)}, status_code=404)
        try:
            await asyncio.to_thread(engine.check_prompts, panes, body.sampling.max_new_tokens)
        except PromptTooLong as exc:
            return JSONResponse({"message": str(exc), "field": exc.field}, status_code=400)
        if waiting["count"] >= settings.generation_queue:
            return JSONResponse(
                {
                    "message": f"The generation host is busy: {waiting['count']} questions are waiting. "
                    "Try again in a moment."
                },
                status_code=503,
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        ahead = waiting["count"]
        waiting["count"] += 1
        sampling = Sampling(**body.sampling.model_dump())

        def emit(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def job() -> None:
            try:
                if stop.is_set():
                    return
                if engine.device == "cpu" and training_now():
                    for index in range(len(panes)):
                        emit({"type": "status", "pane": index, "message": SLOW_WHILE_TRAINING})
                results = engine.generate(panes, sampling, emit, stop)
                counts["answered"] += 1
                counts["cancelled"] += any(r.finish_reason == "cancelled" for r in results)
                emit({"type": "end", "results": [asdict(r) for r in results]})
            except GenerationError as exc:
                emit({"type": "error", "message": str(exc)})
            except Exception as exc:  # noqa: BLE001 - every failure reaches the user as a sentence
                log.exception("generation failed")
                emit({"type": "error", "message": explain(exc)})
            finally:
                loop.call_soon_threadsafe(_done)

        def _done() -> None:
            waiting["count"] -= 1
            events.put_nowait({"type": "_closed"})

        loop.run_in_executor(executor, job)

        async def stream():
            try:
                if ahead:
                    message = (
                        f"Waiting for {ahead} earlier question{'s' if ahead > 1 else ''} to be answered…"
                    )
                    yield json.dumps({"type": "queued", "ahead": ahead, "message": message}) + "\n"
                while True:
                    event = await events.get()
                    if event["type"] == "_closed":
                        break
                    yield json.dumps(event) + "\n"
            finally:
                stop.set()  # the client left, or the answer is complete: either way, stop generating

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return app


def stop_with_parent() -> None:
    """End this process when the worker that started it is gone (even after a SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        log.warning("the worker that started this generation host is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop_with_parent()
    settings = get_settings()
    settings.check_exposure(settings.generation_host, "the generation host")
    app = create_host(settings)
    log.info("generation host on http://%s:%s", settings.generation_host, settings.generation_port)
    uvicorn.run(app, host=settings.generation_host, port=settings.generation_port, log_level="warning")


if __name__ == "__main__":
    main()
