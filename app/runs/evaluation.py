"""A run's evaluation: which dataset rows are answered, the scored answers as stored, and what they say
(the score of each step against the base model's, the best checkpoint, each row's answers side by side).

The training process answers the rows (worker.evaluate) with the base model once, before the first step,
and with the adapter at every checkpoint it saves; it scores each answer with app.scoring.
"""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.models import Run, RunAnswer
from app.runs.config import RunConfig
from app.scoring import METRICS, Metric, Scores, mean

SPLITS = ("validation", "train")
SELECT_BY: Metric = "chrf"  # the best checkpoint is the one whose held-out answers score highest


def evaluation_rows(config: RunConfig) -> dict[str, list[int]]:
    """The dataset rows each evaluation answers: the first held-out rows, and a fixed sample (seeded by the
    run's seed) of training rows. The same rows at every step, so steps compare."""
    held_out = set(config.validation_rows)
    train = [i for i in range(config.train_rows + len(held_out)) if i not in held_out]
    sample = random.Random(config.training.seed).sample(
        train, min(config.evaluation.scored_train_rows, len(train))
    )
    return {
        "validation": config.validation_rows[: config.evaluation.scored_held_out_rows],
        "train": sorted(sample),
    }


def record_answers(
    *, session: Session, run_id: int, step: int, split: str, answers: list[dict[str, Any]], seconds: float
) -> None:
    """One evaluation's answers ({"row", "answer", "chrf", "rouge_l", "exact"}); a repeated step (a resumed
    run saving the same checkpoint again) replaces the earlier answers."""
    session.execute(
        delete(RunAnswer).where(RunAnswer.run_id == run_id, RunAnswer.step == step, RunAnswer.split == split)
    )
    session.add_all(RunAnswer(run_id=run_id, step=step, split=split, seconds=seconds, **a) for a in answers)
    session.commit()


def _scores(answer: RunAnswer) -> Scores:
    return Scores(chrf=answer.chrf, rouge_l=answer.rouge_l, exact=answer.exact)


def summary(*, session: Session, run_id: int) -> dict[str, Any]:
    """Mean scores per step and split (step 0 is the base model), the best checkpoint, and the seconds the
    evaluations took."""
    answers = session.scalars(
        select(RunAnswer).where(RunAnswer.run_id == run_id).order_by(RunAnswer.step, RunAnswer.row)
    ).all()
    by_step: dict[int, dict[str, list[RunAnswer]]] = {}
    for answer in answers:
        by_step.setdefault(answer.step, {}).setdefault(answer.split, []).append(answer)
    steps = []
    for step, splits in sorted(by_step.items()):
        entry: dict[str, Any] = {"step": step}
        for split, rows in splits.items():
            entry[split] = {**(mean([_scores(a) for a in rows]) or {}), "rows": len(rows)}
        entry["seconds"] = round(sum(max(a.seconds for a in rows) for rows in splits.values()), 2)
        steps.append(entry)
    means = {(s["step"], split): s[split][SELECT_BY] for s in steps for split in SPLITS if split in s}
    best, split = _pick(means)
    return {
        "metrics": list(METRICS),
        "select_by": SELECT_BY,
        "split": split,
        "steps": steps,
        "base": next((s for s in steps if s["step"] == 0), None),
        "best_step": best,
    }


def best_step(*, session: Session, run_id: int) -> int | None:
    """The best checkpoint's step (as `summary` chooses it), from the database's averages alone."""
    rows = session.execute(
        select(RunAnswer.step, RunAnswer.split, func.avg(RunAnswer.chrf))
        .where(RunAnswer.run_id == run_id)
        .group_by(RunAnswer.step, RunAnswer.split)
    ).all()
    return _pick({(step, split): round(value, 2) for step, split, value in rows})[0]


def _pick(means: dict[tuple[int, str], float]) -> tuple[int | None, str]:
    """The checkpoint (step > 0) with the highest mean score on held-out rows (training rows when none are
    held out; the earlier step on a tie), and that split."""
    split = "validation" if any(s == "validation" for _, s in means) else "train"
    scores = {step: value for (step, s), value in means.items() if s == split and step > 0}
    return max(scores, key=lambda step: (scores[step], -step), default=None), split


def row_answers(*, session: Session, run_id: int, step: int) -> dict[tuple[str, int], RunAnswer]:
    """The answers of one step, by (split, row)."""
    answers = session.scalars(select(RunAnswer).where(RunAnswer.run_id == run_id, RunAnswer.step == step))
    return {(a.split, a.row): a for a in answers}


def table(*, session: Session, run_id: int, rows: list[dict[str, Any]], best_step: int | None) -> list[dict]:
    """Each answered row: its question and reference, the base model's answer and the best checkpoint's,
    with their scores; held-out rows first, each split from the best-answered row to the worst."""
    base = row_answers(session=session, run_id=run_id, step=0)
    best = row_answers(session=session, run_id=run_id, step=best_step) if best_step else {}
    result = []
    for key in sorted(set(base) | set(best)):
        split, index = key
        messages = rows[index]["messages"] if index < len(rows) else []
        question = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), "")
        result.append(
            {
                "split": split,
                "row": index,
                "question": question,
                "reference": messages[-1]["content"] if messages else "",
                "base": _answer(base.get(key)),
                "best": _answer(best.get(key)),
            }
        )
    result.sort(key=_order)
    return result


def _order(row: dict[str, Any]) -> tuple[int, float]:
    shown = row["best"] or row["base"] or {}
    return SPLITS.index(row["split"]), -shown.get(SELECT_BY, 0.0)


def _answer(answer: RunAnswer | None) -> dict[str, Any] | None:
    return None if answer is None else {"text": answer.answer, **_scores(answer)}


def report(settings, *, session: Session, run: Run) -> dict[str, Any]:
    """The whole evaluation of a run: `summary` plus the answered rows (`table`)."""
    from app.datasets import store

    result = summary(session=session, run_id=run.id)
    rows = store.load_rows(settings, run.dataset_id) if result["steps"] else []
    result["rows"] = table(session=session, run_id=run.id, rows=rows, best_step=result["best_step"])
    return result
