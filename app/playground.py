"""What the playground and the OpenAI-compatible API can talk to: ready base models, every finished run's
adapter (`run-12`) and each of its complete checkpoints (`run-12-step-40`). No torch here: the web process
lists and checks targets by their files; the generation host loads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.model_registry import find_model, list_models
from app.models import MAX_ID, WITH_ADAPTER, Run
from app.runs import evaluation

TARGET_ID = re.compile(r"^run-(\d+)(?:-step-(\d+)|-(best))?$")  # run-3, run-3-step-40, run-3-best


MAX_PANES = 4


class TargetError(Exception):
    """A target that cannot answer; the text says why and what to do."""


@dataclass(frozen=True)
class Target:
    id: str  # the base model's id, or run-12 / run-12-step-40
    label: str
    base_model: str
    model_path: Path
    adapter_path: Path | None = None
    prompt_format: str = "chat"
    quantization: str = "none"  # a QLoRA run's base, as it trained: its adapter answers on the same
    run_id: int | None = None
    step: int | None = None
    created: int = 0  # unix seconds, for /v1/models


def has_adapter(settings: Settings, run_id: int, step: int | None) -> bool:
    """Whether the run's final adapter (step None) or that complete checkpoint's can answer."""
    folder = settings.run_folder(run_id)
    return folder.has_adapter if step is None else folder.checkpoint(step).has_adapter


def checkpoint_steps(settings: Settings, run_id: int) -> list[int]:
    return [c.step for c in settings.run_folder(run_id).checkpoints() if c.has_adapter]


def _run_target(
    settings: Settings, run: Run, model_path: Path, step: int | None, *, best: bool = False
) -> Target:
    if best:
        suffix, label = "-best", f"#{run.id} {run.name} · best checkpoint (step {step})"
    else:
        suffix = f"-step-{step}" if step is not None else ""
        label = f"#{run.id} {run.name}" + (f" · step {step}" if step is not None else "")
    return Target(
        id=f"run-{run.id}{suffix}",
        label=label,
        base_model=run.base_model,
        model_path=model_path,
        adapter_path=settings.run_folder(run.id).adapter_at(step),
        prompt_format=run.config.get("prompt_format", "chat"),
        quantization=run.config.get("training", {}).get("quantization", "none"),
        run_id=run.id,
        step=step,
        created=int(run.created_at.timestamp()),
    )


def list_targets(settings: Settings, *, session: Session, checkpoints: bool = True) -> list[Target]:
    """Ready base models first, then runs newest first, each followed by its checkpoints."""
    models = {m.id: m for m in list_models(settings, session=session) if m.ready}
    targets = [Target(id=m.id, label=m.name, base_model=m.id, model_path=m.folder) for m in models.values()]
    runs = session.scalars(select(Run).where(Run.status.in_(WITH_ADAPTER)).order_by(Run.id.desc()))
    for run in runs:
        model = models.get(run.base_model)
        if model is None:
            continue
        if has_adapter(settings, run.id, None):
            targets.append(_run_target(settings, run, model.folder, None))
        best = evaluation.best_step(session=session, run=run)
        if best is not None and has_adapter(settings, run.id, best):
            targets.append(_run_target(settings, run, model.folder, best, best=True))
        if checkpoints:
            targets += [
                _run_target(settings, run, model.folder, s) for s in checkpoint_steps(settings, run.id)
            ]
    return targets


def resolve_all(settings: Settings, db, target_ids: list[str]) -> list[Target]:
    """Every target of a request, in one database session (TargetError names the first that cannot answer).
    Blocking: async callers run it in a thread."""
    with db.session() as session:
        return [resolve(settings, target_id, session=session) for target_id in target_ids]


def resolve(settings: Settings, target_id: str, *, session: Session) -> Target:
    """The target with this id, or TargetError with a sentence saying why it cannot answer."""
    match = TARGET_ID.match(target_id)
    if match is None:
        model = find_model(settings, target_id, session=session)
        if model is None:
            raise TargetError(f"There is no model or run called '{target_id}'. GET /v1/models lists them.")
        if not model.ready:
            raise TargetError(f"The model '{target_id}' is not ready ({model.status}). See the Models page.")
        return Target(id=model.id, label=model.name, base_model=model.id, model_path=model.folder)
    run_id, step = int(match.group(1)), int(match.group(2)) if match.group(2) else None
    run = session.get(Run, run_id) if run_id <= MAX_ID else None
    if run is None:
        raise TargetError(f"There is no run {run_id}.")
    best = match.group(3) is not None
    if best:
        step = evaluation.best_step(session=session, run=run)
        if step is None:
            raise TargetError(
                f"Run {run_id} has no scored checkpoint yet; answers are scored at each checkpoint."
            )
        if not has_adapter(settings, run_id, step):
            raise TargetError(f"Run {run_id}'s best checkpoint (step {step}) is no longer on disk.")
    if not has_adapter(settings, run_id, step):
        if step is not None:
            raise TargetError(f"Run {run_id} has no complete checkpoint at step {step}.")
        raise TargetError(
            f"Run {run_id} has no adapter to chat with yet (it is {run.status}); "
            "a run's adapter is saved when it succeeds or is cancelled."
        )
    model = find_model(settings, run.base_model, session=session)
    if model is None or not model.ready:
        raise TargetError(f"Run {run_id}'s base model '{run.base_model}' is no longer available.")
    return _run_target(settings, run, model.folder, step, best=best)


# ---- what the web server sends the generation host -------------------------------------------------
class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str
    alpaca: dict[str, str] | None = None  # the Alpaca fields a user turn was written from


class PaneSpec(BaseModel):
    target: str = Field(min_length=1, max_length=300)
    messages: list[Message] = Field(min_length=1, max_length=200)
    system: str | None = Field(None, max_length=20_000)

    @model_validator(mode="after")
    def _ends_with_a_question(self):
        if self.messages[-1].role != "user" or not self.messages[-1].content.strip():
            raise ValueError("the conversation must end with the user's question, and it must not be empty")
        return self


class SamplingSpec(BaseModel):
    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, ge=0.5, le=3)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class GenerateBody(BaseModel):
    panes: list[PaneSpec] = Field(min_length=1, max_length=MAX_PANES)
    sampling: SamplingSpec = SamplingSpec()


# ---- what the generation host streams back (one JSON object per line) --------------------------------
class PaneAnswer(TypedDict):
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]
    first_token_seconds: float | None
    seconds: float


class QueuedEvent(TypedDict):
    type: Literal["queued"]
    ahead: int  # questions before this one
    message: str


class StatusEvent(TypedDict):
    type: Literal["status"]
    pane: int
    message: str  # loading, attaching, slow while training


class StartEvent(TypedDict):
    type: Literal["start"]
    pane: int
    prompt_tokens: int


class TextEvent(TypedDict):
    type: Literal["token", "replace"]  # append `text`, or replace the pane's text with it
    pane: int
    text: str


class EndEvent(TypedDict):
    type: Literal["end"]
    results: list[PaneAnswer]  # one per pane, in order


class ErrorEvent(TypedDict):
    type: Literal["error"]
    message: str
    status: NotRequired[int]  # the HTTP status when the host refused the request
    field: NotRequired[str | None]  # the request field at fault, when one is


GenerationEvent = QueuedEvent | StatusEvent | StartEvent | TextEvent | EndEvent | ErrorEvent
