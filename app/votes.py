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
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.model_registry import list_models
from app.models import MAX_ID, Run, Vote
from app.playground import MAX_PANES, TARGET_ID, SamplingSpec

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


def unknown_target(settings: Settings, request: VoteRequest, *, session: Session) -> tuple[str, str] | None:
    """(field, sentence) for the first answer whose target is no model or run of this server, else None.
    A vote's targets are what the leaderboard ranks: only real ones may enter it (a checkpoint that has
    since rotated away, or a model still preparing, is real)."""
    models = {m.id for m in list_models(settings, session=session)}
    for index, answer in enumerate(request.answers):
        match = TARGET_ID.match(answer.target)
        run_id = int(match.group(1)) if match else 0
        known = (
            answer.target in models
            if match is None
            else 0 < run_id <= MAX_ID and session.get(Run, run_id) is not None
        )
        if known:
            continue
        return (
            f"answers.{index}.target",
            f"There is no model or run called '{answer.target}' on this server; a vote compares the answers "
            "of its models and runs (GET /v1/models lists them).",
        )
    return None


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


def preference_file(votes: list[Vote], limit: int) -> bytes:
    """The votes' preferences as a JSON Lines file (empty when none of them gives one). OverflowError, with
    the size reached, as soon as it would pass `limit` bytes (the upload limit: a dataset made from votes is
    held to it like any other)."""
    lines, size = [], 0
    for vote in votes:
        for pair in pairs(vote):
            line = json.dumps(pair, ensure_ascii=False).encode("utf-8")
            size += len(line) + 1
            if size > limit:
                raise OverflowError(size)
            lines.append(line)
    return b"\n".join(lines)


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


MAX_RATED = 1000  # targets rated at once (the most compared); the rating's cost grows with its cube


def standings(votes: list[Vote]) -> list[Standing]:
    """Each target's record and Bradley-Terry rating with its uncertainty, best first: the most probable
    strengths under a weak prior (choix's penalised maximum likelihood) with a Laplace approximation of
    their 95% interval (the inverse Hessian there); a tie counts as one win each way. At most MAX_RATED
    targets, those with the most comparisons; the others' pairings are left out."""
    import choix
    import numpy as np

    pairings = outcomes(votes)
    counts = Counter(t for first, second, _ in pairings for t in (first, second))
    names = sorted(t for t, _ in counts.most_common(MAX_RATED))
    if not names:
        return []
    index = {name: i for i, name in enumerate(names)}
    record = {name: [0, 0, 0] for name in names}  # wins, ties, losses
    data = []
    for first, second, result in pairings:
        if first not in index or second not in index:
            continue
        data.append((index[first], index[second]))
        if result == "tie":
            data.append((index[second], index[first]))
            record[first][1] += 1
            record[second][1] += 1
        else:
            record[first][0] += 1
            record[second][2] += 1
    # choix penalises alpha·‖θ‖², a Gaussian prior of precision 2·alpha
    mean = choix.opt_pairwise(len(names), data, alpha=PRIOR / 2, method="Newton-CG")
    spread = np.sqrt(np.clip(np.diag(np.linalg.inv(_hessian(mean, data))), 0, None))
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


def _hessian(strengths, data: list[tuple[int, int]]):
    """The negative log-posterior's Hessian: the prior's precision plus p(1-p) for each comparison."""
    import numpy as np

    hessian = PRIOR * np.identity(len(strengths))
    if data:
        winners, losers = np.array(data).T
        won = 1 / (1 + np.exp(strengths[losers] - strengths[winners]))
        weight = won * (1 - won)
        np.add.at(hessian, (winners, winners), weight)
        np.add.at(hessian, (losers, losers), weight)
        np.add.at(hessian, (winners, losers), -weight)
        np.add.at(hessian, (losers, winners), -weight)
    return hessian


_board_cache: dict[tuple, list[Standing]] = {}
_board_lock = threading.Lock()


def leaderboard(*, session: Session, **filters) -> tuple[list[Standing], int]:
    """(standings, votes counted) for the votes `find` selects, computed once per set of votes: votes are
    never edited, so the database, the filters, their count and the newest id name the set. A page or API
    call repeated costs a query."""
    votes = find(session=session, **filters)
    chosen = tuple(sorted((k, str(v)) for k, v in filters.items() if v is not None))
    key = (str(session.get_bind().engine.url), chosen, len(votes), votes[-1].id if votes else 0)
    with _board_lock:
        if key not in _board_cache:
            if len(_board_cache) >= 32:
                _board_cache.pop(next(iter(_board_cache)))
            _board_cache[key] = standings(votes)
        return _board_cache[key], len(votes)
