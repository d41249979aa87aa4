"""A run's evaluation: which dataset rows are answered, the scored answers as stored, and what they say
(the score of each step against the base model's, the best checkpoint, each row's answers side by side).

The training process answers the rows (worker.evaluate) with the base model once, before the first step,
and with the adapter at every checkpoint it saves; it scores each answer with app.scoring.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal, cast

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.models import Run, RunAnswer, RunMetric
from app.runs.advice import advise
from app.runs.config import RunConfig
from app.scoring import METRICS, Metric, Scores, mean

SPLITS = ("validation", "train")
# An answer "like its reference": it reproduces it (exact answers score 100; a right beginning of a long
# answer scores 100 against the reference cut to the same length; one wrong name in it costs >10 points).
MATCHED_CHRF = 90.0
SelectBy = Metric | Literal["eval_loss"]
SELECT_BY: SelectBy = "chrf"  # by default the best checkpoint is the one whose held-out answers score highest


def select_by(run: Run) -> SelectBy:
    """What picks this run's best checkpoint: an answer metric, or the validation loss."""
    return cast(SelectBy, (run.config.get("evaluation") or {}).get("select_by", SELECT_BY))


def evaluation_rows(config: RunConfig) -> dict[str, list[int]]:
    """The dataset rows each evaluation answers: the first held-out rows, and a fixed sample (seeded by the
    run's seed) of training rows. The same rows at every step, so steps compare."""
    if config.evaluation_path:  # held out of another dataset: every row of this one trains
        train = list(range(config.train_rows))
    else:
        held_out = set(config.validation_rows)
        train = [i for i in range(config.train_rows + len(held_out)) if i not in held_out]
    sample = random.Random(config.training.seed).sample(
        train, min(config.evaluation.scored_train_rows, len(train))
    )
    return {
        "validation": config.validation_rows[: config.evaluation.scored_held_out_rows],
        "train": sorted(sample),
    }


def question_of(messages: list[dict[str, Any]]) -> str:
    """The last question of a row's conversation (the text its last answer replies to)."""
    return next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), "")


def held_out_questions(config: RunConfig, limit: int) -> list[dict[str, Any]]:
    """The first `limit` held-out rows: their 1-based numbers (as the dataset page counts) and questions,
    read from the start of the rows file up to the last one wanted."""
    from app.datasets.store import iter_rows

    wanted = set(config.validation_rows[:limit])
    found: dict[int, str] = {}
    for index, row in enumerate(iter_rows(Path(config.held_out_path))):
        if len(found) == len(wanted):
            break
        if index in wanted:
            found[index] = question_of(row["messages"])
    return [{"number": i + 1, "question": found[i]} for i in config.validation_rows[:limit] if i in found]


def record_answers(
    *, session: Session, run_id: int, step: int, split: str, answers: list[dict[str, Any]], seconds: float
) -> None:
    """One evaluation's answers ({"row", "answer", "chrf", "rouge_l", "exact", "opening"}); a repeated step
    (a resumed run saving the same checkpoint again) replaces the earlier answers."""
    session.execute(
        delete(RunAnswer).where(RunAnswer.run_id == run_id, RunAnswer.step == step, RunAnswer.split == split)
    )
    session.add_all(RunAnswer(run_id=run_id, step=step, split=split, seconds=seconds, **a) for a in answers)
    session.commit()


def record_verdicts(
    *, session: Session, run_id: int, step: int, split: str, verdicts: dict[int, tuple[float | None, str]]
) -> None:
    """The judge's (score, reason) for the answers of one evaluation, by row."""
    answers = session.scalars(
        select(RunAnswer).where(RunAnswer.run_id == run_id, RunAnswer.step == step, RunAnswer.split == split)
    )
    for answer in answers:
        if answer.row in verdicts:
            answer.judge_score, answer.judge_reason = verdicts[answer.row]
    session.commit()


def _scores(answer: RunAnswer) -> Scores:
    return Scores(chrf=answer.chrf, rouge_l=answer.rouge_l, exact=answer.exact)


def summary(*, session: Session, run: Run) -> dict[str, Any]:
    """Mean scores per step and split (step 0 is the base model), the best checkpoint, and the seconds the
    evaluations took."""
    answers = session.scalars(
        select(RunAnswer).where(RunAnswer.run_id == run.id).order_by(RunAnswer.step, RunAnswer.row)
    ).all()
    by_step: dict[int, dict[str, list[RunAnswer]]] = {}
    for answer in answers:
        by_step.setdefault(answer.step, {}).setdefault(answer.split, []).append(answer)
    steps = []
    for step, splits in sorted(by_step.items()):
        entry: dict[str, Any] = {"step": step}
        for split, rows in splits.items():
            entry[split] = {**(mean([_scores(a) for a in rows]) or {}), "rows": len(rows)}
            # the percentage of rows answered like their reference
            entry[split]["matched"] = round(100 * sum(a.chrf >= MATCHED_CHRF for a in rows) / len(rows), 1)
            if all(a.opening is not None for a in rows):  # and of rows whose first sentence is like it
                opened = sum(a.opening >= MATCHED_CHRF for a in rows)  # type: ignore[operator]
                entry[split]["opened"] = round(100 * opened / len(rows), 1)
            judged = [a.judge_score for a in rows if a.judge_score is not None]
            if judged:  # the judge's mean (1-10) over the answers it scored
                entry[split] |= {"judge": round(sum(judged) / len(judged), 2), "judged": len(judged)}
        entry["seconds"] = round(sum(max(a.seconds for a in rows) for rows in splits.values()), 2)
        steps.append(entry)
    chosen = select_by(run)
    if chosen == "eval_loss":
        best, split = _pick(_losses(session=session, run=run))[0], "validation"
    else:
        means = {(s["step"], split): s[split][chosen] for s in steps for split in SPLITS if split in s}
        best, split = _pick(means)
    if split not in {split for s in steps for split in SPLITS if split in s}:
        split = "train"
    return {
        "metrics": list(METRICS),
        "select_by": chosen,
        "split": split,
        "steps": steps,
        "base": next((s for s in steps if s["step"] == 0), None),
        "best_step": best,
        # whether any answer has a judge's score (a step may have one split's answers and not yet the other's)
        "judged": any("judge" in s[split] for s in steps for split in SPLITS if split in s),
    }


def best_step(*, session: Session, run: Run) -> int | None:
    """The best checkpoint's step (as `summary` chooses it), from the database's averages alone."""
    chosen = select_by(run)
    if chosen == "eval_loss":
        return _pick(_losses(session=session, run=run))[0]
    column = getattr(RunAnswer, chosen)
    rows = session.execute(
        select(RunAnswer.step, RunAnswer.split, func.avg(column))
        .where(RunAnswer.run_id == run.id)
        .group_by(RunAnswer.step, RunAnswer.split)
    ).all()
    return _pick({(step, split): round(value, 2) for step, split, value in rows})[0]


def _losses(*, session: Session, run: Run) -> dict[tuple[int, str], float]:
    """The validation loss at each saved checkpoint, negated (higher is better, as for the answer metrics).
    A checkpoint is saved every `save_steps` and at the last step; every one is scored, and every one has a
    validation loss because `eval_steps` divides `save_steps` (the launch checks)."""
    save_steps = int((run.config.get("training") or {}).get("save_steps") or 1)
    points = session.scalars(
        select(RunMetric).where(RunMetric.run_id == run.id, RunMetric.kind == "eval")
    ).all()
    saved = {step for (step,) in session.execute(select(RunAnswer.step).where(RunAnswer.run_id == run.id))}
    return {
        (point.step, "validation"): -loss
        for point in points
        if (loss := point.get("eval_loss")) is not None
        and point.step > 0
        and (point.step % save_steps == 0 or point.step in saved)
    }


def _pick(means: dict[tuple[int, str], float]) -> tuple[int | None, str]:
    """The checkpoint (step > 0) with the highest mean score on held-out rows (training rows when none are
    held out; the earlier step on a tie), and that split."""
    split = "validation" if any(s == "validation" for _, s in means) else "train"
    return best_of({step: value for (step, s), value in means.items() if s == split and step > 0}), split


def best_of(scores: dict[int, float]) -> int | None:
    """The step with the highest score (higher is better), the earlier one on a tie: the one rule the
    training process and the pages both pick the best checkpoint by."""
    return max(scores, key=lambda step: (scores[step], -step), default=None)


def row_answers(*, session: Session, run_id: int, step: int) -> dict[tuple[str, int], RunAnswer]:
    """The answers of one step, by (split, row)."""
    answers = session.scalars(select(RunAnswer).where(RunAnswer.run_id == run_id, RunAnswer.step == step))
    return {(a.split, a.row): a for a in answers}


def table(
    *, session: Session, run_id: int, sources: dict[str, list[dict[str, Any]]], best_step: int | None
) -> list[dict]:
    """Each answered row: its question and reference, the base model's answer and the best checkpoint's,
    with their scores; held-out rows first, each split from the best-answered row to the worst."""
    base = row_answers(session=session, run_id=run_id, step=0)
    best = row_answers(session=session, run_id=run_id, step=best_step) if best_step else {}
    result = []
    for key in sorted(set(base) | set(best)):
        split, index = key
        rows = sources.get(split, [])
        messages = rows[index]["messages"] if index < len(rows) else []
        question = question_of(messages)
        result.append(
            {
                "split": split,
                "row": index + 1,  # the row's number in its dataset, counted from 1 as every page does
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
    return SPLITS.index(row["split"]), -shown.get("chrf", 0.0)


def _answer(answer: RunAnswer | None) -> dict[str, Any] | None:
    if answer is None:
        return None
    verdict = {"judge": answer.judge_score, "judge_reason": answer.judge_reason}
    return {"text": answer.answer, **_scores(answer), "opening": answer.opening, **verdict}


def report(settings, *, session: Session, run: Run) -> dict[str, Any]:
    """The whole evaluation of a run: `summary` plus the answered rows (`table`)."""
    from app.datasets import store

    result = summary(session=session, run=run)
    sources: dict[str, list[dict[str, Any]]] = {}
    if result["steps"]:
        sources["train"] = store.load_rows(settings, run.dataset_id)
        other = (run.config.get("evaluation") or {}).get("dataset_id")
        sources["validation"] = store.load_rows(settings, other) if other else sources["train"]
    result["rows"] = table(session=session, run_id=run.id, sources=sources, best_step=result["best_step"])
    result["advice"] = advise(run, result, truncated=_truncated(settings, session, run))
    return result


def _truncated(settings, session: Session, run: Run) -> int | None:
    """How many of the run's dataset rows are longer than its max length (from the cached statistics)."""
    from app.runs.estimate import length_stats

    if run.status != "succeeded":
        return None
    stats = length_stats(
        settings,
        session,
        dataset_id=run.dataset_id,
        base_model=run.base_model,
        max_length=int((run.config.get("training") or {}).get("max_length", 1024)),
        prompt_format=run.config.get("prompt_format", "chat"),
    )
    return None if stats is None else int(stats["truncated"])
