"""Votes: blind comparisons made in the playground, and the preference datasets made from them.

A vote keeps the conversation up to the question, every answer in the order it was shown with the target
that wrote it, the verdict (one answer better, a tie, or all bad), the answer saved as chosen (the better
one, possibly edited; or, when all were bad, one the voter wrote), the sampling settings and the time.
Each vote with a chosen answer gives one preference per other answer: (prompt, chosen, rejected), in TRL's
conversational layout, which becomes a dataset through the ordinary upload checks. No torch here.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Vote
from app.playground import MAX_PANES, SamplingSpec

Verdict = Literal["better", "tie", "both_bad"]


class VoteMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class VoteAnswer(BaseModel):
    target: str = Field(min_length=1, max_length=300)
    text: str = Field(max_length=200_000)


class VoteRequest(BaseModel):
    """What the playground sends once the voter has decided (before the targets are revealed to them)."""

    conversation_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    messages: list[VoteMessage] = Field(min_length=1, max_length=200)
    answers: list[VoteAnswer] = Field(min_length=2, max_length=MAX_PANES)
    verdict: Verdict
    best: int | None = Field(None, ge=0, lt=MAX_PANES)
    chosen: str | None = Field(None, max_length=200_000)  # the better answer as edited, or one written
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)

    @model_validator(mode="after")
    def _consistent(self):
        if self.messages[-1].role != "user":
            raise ValueError("The conversation must end with the question the answers reply to.")
        if self.verdict == "better":
            if self.best is None or self.best >= len(self.answers):
                raise ValueError("Say which answer is better: 'best' is its position among the answers.")
        elif self.best is not None:
            raise ValueError("'best' names the better answer, so it goes only with the verdict 'better'.")
        if self.verdict == "tie" and self.chosen is not None:
            raise ValueError("A tie has no chosen answer; pick the better one to save an edited answer.")
        if self.chosen is not None and not self.chosen.strip():
            raise ValueError("The chosen answer is empty.")
        return self


def record(*, session: Session, request: VoteRequest) -> Vote:
    chosen = request.chosen
    if chosen is None and request.verdict == "better" and request.best is not None:
        chosen = request.answers[request.best].text
    vote = Vote(
        conversation_id=request.conversation_id,
        messages=[m.model_dump() for m in request.messages],
        answers=[a.model_dump() for a in request.answers],
        verdict=request.verdict,
        best=request.best,
        chosen=chosen,
        sampling=request.sampling.model_dump(),
    )
    session.add(vote)
    session.commit()
    return vote


def pairs(vote: Vote) -> list[dict]:
    """The vote's preferences in TRL's conversational layout: its chosen answer against each other answer
    (a tie, or all bad with nothing written instead, gives none; an answer equal to the chosen one is no
    preference)."""
    if vote.chosen is None:
        return []
    chosen = [{"role": "assistant", "content": vote.chosen}]
    return [
        {"prompt": vote.messages, "chosen": chosen, "rejected": [{"role": "assistant", "content": a["text"]}]}
        for index, a in enumerate(vote.answers)
        if index != vote.best and a["text"].strip() and a["text"].strip() != vote.chosen.strip()
    ]


def find(
    *,
    session: Session,
    conversation_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    target: str | None = None,
) -> list[Vote]:
    """Votes, oldest first: of one conversation, in a time range, and/or with one target among the answers."""
    query = select(Vote).order_by(Vote.id)
    if conversation_id is not None:
        query = query.where(Vote.conversation_id == conversation_id)
    if since is not None:
        query = query.where(Vote.created_at >= since)
    if until is not None:
        query = query.where(Vote.created_at < until)
    votes = list(session.scalars(query))
    if target is not None:
        votes = [v for v in votes if any(a["target"] == target for a in v.answers)]
    return votes


def preference_file(votes: list[Vote]) -> bytes:
    """The votes' preferences as a JSON Lines file (empty when none of them gives one)."""
    lines = [json.dumps(p, ensure_ascii=False) for v in votes for p in pairs(v)]
    return "\n".join(lines).encode("utf-8")
