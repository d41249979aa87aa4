"""Votes: blind comparisons made in the playground, and the preference datasets made from them.

A vote keeps the conversation up to the question, every answer in the order it was shown with the target
that wrote it, the verdict (one answer better, a tie, or all bad), the answer saved as chosen (the better
one, possibly edited; or, when all were bad, one the voter wrote), the sampling settings and the time.
Each vote with a chosen answer gives one preference per other answer: (prompt, chosen, rejected), in TRL's
conversational layout, which becomes a dataset through the ordinary upload checks. No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
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


# --- the leaderboard -------------------------------------------------------------------------------------

ELO_SCALE = 400 / math.log(10)  # Bradley-Terry strengths on the familiar Elo scale (centred on 1000)
PRIOR = 1.0  # the strengths' prior precision: a target with few votes stays near the middle


@dataclass(frozen=True)
class Standing:
    target: str
    comparisons: int  # pairings of this target with another in a vote
    wins: int
    ties: int
    losses: int
    rating: float  # Bradley-Terry strength, Elo scale
    low: float  # its 95% credible interval
    high: float

    @property
    def win_rate(self) -> float:
        """Wins, with a tie counted as half, over comparisons."""
        return (self.wins + self.ties / 2) / self.comparisons if self.comparisons else 0.0


def outcomes(votes: list[Vote]) -> list[tuple[str, str, str]]:
    """(target, other, result) for every pairing in every vote: "better" names the winner first; a tie or
    answers all bad is "tie". Pairings of a target with itself say nothing and are left out."""
    found = []
    for vote in votes:
        targets = [a["target"] for a in vote.answers]
        for i, first in enumerate(targets):
            for j in range(i + 1, len(targets)):
                second = targets[j]
                if first == second:
                    continue
                if vote.verdict == "better":
                    if vote.best == i:
                        found.append((first, second, "better"))
                    elif vote.best == j:
                        found.append((second, first, "better"))
                    # two answers the voter did not pick: no preference between them
                else:
                    found.append((first, second, "tie"))
    return found


def standings(votes: list[Vote]) -> list[Standing]:
    """Each target's record and Bradley-Terry rating with its uncertainty, best first. The ratings come
    from choix's expectation propagation (posterior mean and covariance under a weak prior); a tie counts
    as one win each way."""
    import choix
    import numpy as np

    pairings = outcomes(votes)
    names = sorted({t for first, second, _ in pairings for t in (first, second)})
    if not names:
        return []
    index = {name: i for i, name in enumerate(names)}
    record = {name: [0, 0, 0] for name in names}  # wins, ties, losses
    data = []
    for first, second, result in pairings:
        data.append((index[first], index[second]))
        if result == "tie":
            data.append((index[second], index[first]))
            record[first][1] += 1
            record[second][1] += 1
        else:
            record[first][0] += 1
            record[second][2] += 1
    mean, cov = choix.ep_pairwise(len(names), data, PRIOR, model="logit")
    spread = np.sqrt(np.clip(np.diag(cov), 0, None))
    table = [
        Standing(
            target=name,
            comparisons=sum(record[name]),
            wins=record[name][0],
            ties=record[name][1],
            losses=record[name][2],
            rating=1000 + ELO_SCALE * float(mean[i]),
            low=1000 + ELO_SCALE * float(mean[i] - 1.96 * spread[i]),
            high=1000 + ELO_SCALE * float(mean[i] + 1.96 * spread[i]),
        )
        for i, name in enumerate(names)
    ]
    return sorted(table, key=lambda s: (-s.rating, s.target))
