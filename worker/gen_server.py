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
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import func, select

from app import workers
from app.config import Settings, get_settings
from app.db import Database
from app.errors import problem
from app.models import Run, RunStatus
from app.playground import GenerateBody, GenerationEvent, QueuedEvent, TargetError, resolve_all
from app.security import BodyLimitMiddleware, HostCheckMiddleware, JsonBodyMiddleware, bearer_ok
from worker.child import stop_with_parent
from worker.remote import Server

log = logging.getLogger("tuneboard.generation")
MAX_BODY_KB = 1024  # the largest request (a conversation) the host reads: some 250,000 tokens of text


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


class GenerationHost:
    """The host's state (the engine, its one generation thread, the waiting count) and its endpoints.
    Auth follows the web tier's rule (`app.security.bearer_ok`); `create_host` wraps it in an app."""

    def __init__(self, settings: Settings, engine):
        self.settings, self.engine = settings, engine
        self.db = Database(settings.sqlalchemy_url)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.waiting = 0
        self.counts = {"answered": 0, "cancelled": 0}
        self.token = settings.token.get_secret_value() if settings.token else None
        self.server = Server(settings, f"{workers.worker_id()}-generation") if settings.server_url else None

    def authorised(self, request: Request) -> bool:
        return self.token is None or bearer_ok(request.headers.get("authorization", ""), self.token)

    def panes_for(self, body: GenerateBody) -> list:
        from worker.engine import AdapterRef, PaneRequest

        target_ids = [pane.target for pane in body.panes]
        if self.server is not None:  # no shared disk: fetch the adapters this machine does not hold yet
            self.server.fetch_adapters(self.db, target_ids)
        targets = resolve_all(self.settings, self.db, target_ids)
        return [
            PaneRequest(
                model_key=t.base_model,
                model_path=t.model_path,
                adapter=AdapterRef(t.id, t.adapter_path) if t.adapter_path else None,
                messages=[m.model_dump(exclude_none=True) for m in pane.messages],
                prompt_format=t.prompt_format,
                system=pane.system,
                quantization=t.quantization,
            )
            for t, pane in zip(targets, body.panes, strict=True)
        ]

    def training_now(self) -> int:
        query = select(func.count()).select_from(Run).where(Run.status == RunStatus.RUNNING)
        with self.db.session() as session:
            return session.scalar(query) or 0

    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "waiting": self.waiting, **self.counts, **self.engine.describe()}

    async def generate(self, body: GenerateBody, request: Request):
        """Check the request, queue it for the generation thread, stream its events as NDJSON."""
        from worker.engine import PromptTooLong, Sampling

        if not self.authorised(request):
            return JSONResponse(
                {"message": "The generation host needs the Tuneboard token."}, status_code=401
            )
        try:
            panes = await asyncio.to_thread(self.panes_for, body)
        except TargetError as exc:
            return JSONResponse({"message": str(exc)}, status_code=404)
        try:
            await asyncio.to_thread(self.engine.check_prompts, panes, body.sampling.max_new_tokens)
        except PromptTooLong as exc:
            return JSONResponse({"message": str(exc), "field": exc.field}, status_code=400)
        if self.waiting >= self.settings.generation_queue:
            message = (
                f"The generation host is busy: {self.waiting} questions are waiting. Try again in a moment."
            )
            return JSONResponse({"message": message}, status_code=503)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | None] = asyncio.Queue()  # None: the answer is over
        stop = threading.Event()
        ahead = self.waiting
        self.waiting += 1

        def emit(event: GenerationEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def done() -> None:
            self.waiting -= 1
            events.put_nowait(None)

        sampling = Sampling(**body.sampling.model_dump())
        loop.run_in_executor(
            self.executor, self._answer, panes, sampling, emit, stop, lambda: loop.call_soon_threadsafe(done)
        )

        async def stream():
            try:
                if ahead:
                    message = (
                        f"Waiting for {ahead} earlier question{'s' if ahead > 1 else ''} to be answered…"
                    )
                    queued = QueuedEvent(type="queued", ahead=ahead, message=message)
                    yield json.dumps(queued) + "\n"
                while True:
                    event = await events.get()
                    if event is None:
                        break
                    yield json.dumps(event) + "\n"
            finally:
                stop.set()  # the client left, or the answer is complete: either way, stop generating

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    def _answer(self, panes, sampling, emit, stop: threading.Event, done) -> None:
        """On the generation thread: answer every pane; every failure reaches the user as a sentence."""
        from worker.engine import GenerationError

        try:
            if stop.is_set():
                return
            if self.engine.device == "cpu" and self.training_now():
                for index in range(len(panes)):
                    emit({"type": "status", "pane": index, "message": SLOW_WHILE_TRAINING})
            results = self.engine.generate(panes, sampling, emit, stop)
            self.counts["answered"] += 1
            self.counts["cancelled"] += any(r.finish_reason == "cancelled" for r in results)
            emit({"type": "end", "results": [r.answer() for r in results]})
        except GenerationError as exc:
            emit({"type": "error", "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - every failure reaches the user as a sentence
            log.exception("generation failed")
            emit({"type": "error", "message": explain(exc)})
        finally:
            done()


async def refused_request(request: Request, exc: Exception) -> JSONResponse:
    """A request the host's own checks refuse: its sentence and the field it blames, in the shape the web
    server passes on (to the playground, and to `/v1` as OpenAI's `param`)."""
    first = cast(RequestValidationError, exc).errors()[0]
    field = ".".join(str(part) for part in first["loc"] if part != "body")
    return JSONResponse({"detail": [problem(first["msg"], field or None)]}, status_code=422)


def create_host(settings: Settings, engine=None) -> FastAPI:
    """The generation host's app: the Host check, the body limit and safe JSON around a GenerationHost."""
    import torch

    from worker.engine import Engine
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
    host = GenerationHost(settings, engine)
    app = FastAPI(title="Tuneboard generation host")
    app.state.engine = engine
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=MAX_BODY_KB * 1024,
        message=f"The conversation is larger than the generation host's {MAX_BODY_KB} KB limit.",
    )
    listen_host, _ = settings.generation_listen
    app.add_middleware(HostCheckMiddleware, names=settings.host_names(listen_host))
    app.add_exception_handler(RequestValidationError, refused_request)
    app.add_api_route("/healthz", host.healthz, methods=["GET"])
    app.add_api_route("/generate", host.generate, methods=["POST"])
    return app


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop_with_parent("generation host")
    settings = get_settings()
    host, port = settings.generation_listen
    settings.check_exposure(host, "the generation host")
    app = create_host(settings)
    log.info("generation host on %s", settings.generation_base_url)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
