"""An OpenAI-compatible API on the same server: `GET /v1/models` and `POST /v1/chat/completions`, so that
the official `openai` client (and the tools built on it) can talk to base models and tuned runs.

`model` is a base model's id or a run's (`run-12`, or `run-12-step-40` for a checkpoint). Errors come in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a sentence that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse, ServerSentEvent

from app import generation_client
from app.deps import SettingsDep
from app.errors import openai_error
from app.playground import ErrorEvent, GenerationEvent, Target, TargetError, list_targets, resolve_all

router = APIRouter(prefix="/v1", tags=["openai"])


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise ValueError("only text content is supported")
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. frequency_penalty, user, logprobs: accepted, not used
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    n: int = Field(1, ge=1, le=1)

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return messages


def model_card(target: Target) -> dict[str, Any]:
    return {"id": target.id, "object": "model", "created": target.created, "owned_by": "tuneboard"}


@router.get("/models")
async def models(request: Request, settings: SettingsDep):
    """Every ready base model and every finished run's adapter."""

    def read() -> list[Target]:
        with request.app.state.db.session() as session:
            return list_targets(settings, session=session, checkpoints=False)

    targets = await anyio.to_thread.run_sync(read)
    return {"object": "list", "data": [model_card(t) for t in targets]}


def host_body(body: ChatRequest) -> dict[str, Any]:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    sampling = {
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or 512,
        "temperature": body.temperature,
        "top_p": body.top_p,
    }
    if body.seed is not None:
        sampling["seed"] = body.seed
    return {"panes": [{"target": body.model, "messages": messages}], "sampling": sampling}


FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}
# The generation host names fields of its own request shape; OpenAI clients know these names.
PARAMS = {"sampling": "max_tokens", "max_new_tokens": "max_tokens"}


def openai_param(field: str) -> str | None:
    """The OpenAI request's name for a field of the host's request (`panes.0.messages.3` → messages)."""
    if field.startswith("panes"):
        return "messages"
    if field.startswith("sampling"):
        name = field.removeprefix("sampling").strip(".") or "sampling"
        return PARAMS.get(name, name)
    return field or None


def host_error(event: ErrorEvent) -> JSONResponse:
    message = event["message"]
    param = openai_param(event.get("field") or "")
    return openai_error(event.get("status", 500), message, param=param)


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, settings: SettingsDep):
    try:
        payload = host_body(body)
        await anyio.to_thread.run_sync(resolve_all, settings, request.app.state.db, [body.model])
    except TargetError as exc:
        return openai_error(404, str(exc), code="model_not_found", param="model")
    except ValueError as exc:
        return openai_error(400, f"Unsupported message: {exc}.", param="messages")

    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    events = generation_client.generate(settings, payload)
    first = await anext(events)  # a refusal (too long, host down, busy) is an HTTP error, not a stream
    if first["type"] == "error":
        await events.aclose()
        return host_error(first)
    if body.stream:
        return EventSourceResponse(stream_chunks(first, events, completion_id, created, body.model), ping=15)

    collecting = asyncio.create_task(final_event(chain_first(first, events)))
    while not (await asyncio.wait({collecting}, timeout=DISCONNECT_POLL_SECONDS))[0]:
        if await request.is_disconnected():  # nobody waits for this answer: the host stops generating
            collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collecting
            await events.aclose()
            return Response(status_code=499)
    last = collecting.result()
    if last is not None and last["type"] == "error":
        return host_error(last)
    if last is None or last["type"] != "end":
        return openai_error(502, "The generation host ended the answer early.")
    result = last["results"][0]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": FINISH[result["finish_reason"]],
            }
        ],
        "usage": {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["tokens"],
            "total_tokens": result["prompt_tokens"] + result["tokens"],
        },
    }


DISCONNECT_POLL_SECONDS = 0.5  # how soon a non-streaming answer notices its client has gone


async def final_event(events: AsyncIterator[GenerationEvent]) -> GenerationEvent | None:
    """The answer's last event (its end, or an error), read to the end of the host's stream."""
    last = None
    async for event in events:
        if event["type"] in ("end", "error"):
            last = event
            if event["type"] == "error":
                break
    return last


async def chain_first(
    first: GenerationEvent, events: AsyncIterator[GenerationEvent]
) -> AsyncIterator[GenerationEvent]:
    yield first
    async for event in events:
        yield event


async def stream_chunks(first, events, completion_id: str, created: int, model: str):
    def chunk(delta: dict, finish: str | None = None, **extra) -> ServerSentEvent:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return ServerSentEvent(json.dumps(data))

    yield chunk({"role": "assistant", "content": ""})
    async for event in chain_first(first, events):
        if event["type"] == "token":
            yield chunk({"content": event["text"]})
        elif event["type"] == "end":
            result = event["results"][0]
            usage = {
                "prompt_tokens": result["prompt_tokens"],
                "completion_tokens": result["tokens"],
                "total_tokens": result["prompt_tokens"] + result["tokens"],
            }
            yield chunk({}, FINISH[result["finish_reason"]], usage=usage)
        elif event["type"] == "error":
            yield ServerSentEvent(
                json.dumps({"error": {"message": event["message"], "type": "server_error"}})
            )
            break
    yield ServerSentEvent("[DONE]")
