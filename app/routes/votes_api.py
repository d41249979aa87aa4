"""/api/votes: record a blind comparison from the playground, list votes, and make a preference dataset
from the votes of a conversation, a time range or a target."""

from __future__ import annotations

import functools
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from app import votes
from app.datasets.formats import DatasetInvalid, RowError
from app.datasets.store import create_dataset, too_large
from app.deps import SessionDep, SettingsDep, WriteSessionDep
from app.errors import problem
from app.models import Vote
from app.routes.datasets_api import invalid_response
from app.schemas import DatasetOut

router = APIRouter(prefix="/api/votes", tags=["votes"])


class VoteFilter(BaseModel):
    """Which votes: all of them, or those of one conversation, a time range, one target."""

    conversation_id: str | None = Field(None, max_length=64)
    since: datetime | None = None
    until: datetime | None = None
    target: str | None = Field(None, max_length=300)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """A time without a zone is UTC (as every time Tuneboard shows)."""
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class DatasetFromVotes(VoteFilter):
    name: str | None = Field(None, max_length=200)


def vote_out(vote: Vote) -> dict[str, Any]:
    return {
        "id": vote.id,
        "conversation_id": vote.conversation_id,
        "messages": vote.messages,
        "answers": vote.answers,
        "verdict": vote.verdict,
        "best": vote.best,
        "chosen": vote.chosen,
        "sampling": vote.sampling,
        "created_at": vote.created_at.isoformat(),
        "preferences": len(votes.pairs(vote)),
    }


@router.post("", status_code=201)
def record_vote(body: votes.VoteRequest, settings: SettingsDep, session: WriteSessionDep) -> dict[str, Any]:
    """Store a vote; the answer says which target wrote each answer (the reveal). Every target must be
    one of this server's models or runs."""
    if unknown := votes.unknown_target(settings, body, session=session):
        field, message = unknown
        raise HTTPException(422, [problem(message, field)])
    return vote_out(votes.record(session=session, request=body))


@router.get("")
def list_votes(session: SessionDep, filters: Annotated[VoteFilter, Query()]) -> list[dict[str, Any]]:
    return [vote_out(v) for v in votes.find(session=session, **filters.model_dump())]


@router.get("/leaderboard")
def leaderboard(session: SessionDep, filters: Annotated[VoteFilter, Query()]) -> list[dict[str, Any]]:
    """Each target's record and Bradley-Terry rating (Elo scale, with its 95% interval), best first."""
    table, _ = votes.leaderboard(session=session, **filters.model_dump())
    return [asdict(s) | {"win_rate": s.win_rate} for s in table]


@router.post("/dataset", status_code=201, response_model=None)
async def dataset_from_votes(
    request: Request, body: DatasetFromVotes, settings: SettingsDep, session: SessionDep
) -> dict[str, Any] | JSONResponse:
    """A preference dataset (prompt, chosen, rejected) from the chosen votes, checked and stored like an
    upload; it then appears among the datasets."""
    chosen = votes.find(session=session, **body.model_dump(exclude={"name"}))
    try:
        raw = votes.preference_file(chosen, settings.max_upload_bytes)
    except OverflowError as exc:
        return invalid_response(DatasetInvalid([RowError(None, None, too_large(settings, exc.args[0]))]))
    if not raw:
        return invalid_response(
            DatasetInvalid(
                [
                    RowError(
                        None,
                        None,
                        f"None of the {len(chosen)} votes chosen names a better answer (ties and answers "
                        "all bad without one written instead give no preference).",
                    )
                ]
            )
        )
    name = body.name or (f"Votes of {body.conversation_id}" if body.conversation_id else "Votes")
    try:
        dataset = await anyio.to_thread.run_sync(
            functools.partial(
                create_dataset, settings, request.app.state.db, raw=raw, filename="votes.jsonl", name=name
            )
        )
    except DatasetInvalid as exc:
        return invalid_response(exc)
    return DatasetOut.of(dataset).model_dump(mode="json")
