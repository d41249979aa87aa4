"""How long a run will take, before it starts and without torch.

A run's training work is counted batch by batch, in the batches the training process will cut (app.runs.
batching), from the model's shapes (app.runs.shapes): the frozen weights' matmuls, the adapters'
per-element work (dropout, casts and small matmuls on every adapted module's inputs and outputs), and
attention, which grows with the batch's longest row. Work becomes seconds through the latest run that
finished on this server: its measured training seconds over its own counted work, its start-up time (launch,
model load, first-step warm-up, the final save) and its seconds per scored answer. Before any run has
finished, a worker's speed trial gives the same three figures (worker.probe: a few steps of the real training
process on made-up rows), with a wider range. So the estimate follows this machine, whatever its speed;
the constants below only set how the parts weigh
against each other (`python -m bench --only training` checks the result against runs through the API)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Run, RunAnswer, RunMetric, RunStatus
from app.peft_methods import drops_inputs
from app.peft_methods import method as peft_method
from app.runs.batching import plan_batches
from app.runs.config import RunConfig
from app.runs.shapes import Shapes, adapted_modules

# Relative weights, per token (fitted to the runs of `python -m bench --only training` on a 2-core CPU, where
# a layer's element-wise work and the adapters' weigh more than the matmuls):
LINEAR_WORK = 4  # per frozen weight: the forward matmul and the backward pass's input gradient
ANSWER_SHARE = 0.5  # of a row's positions project onto the vocabulary (answer tokens only: worker.trainer)
ELEMENTWISE_WORK = 10_000  # per hidden and intermediate feature of each layer: norms, rotary, activation
ADAPTER_WORK = 2000  # per input and output feature of each adapted module: casts and thin matmuls
DROPOUT_WORK = 2100  # per input feature of each adapted module, with dropout: random mask, copies
ATTENTION_WORK = 48  # per key position × query/key feature, each layer: scores, softmax and their backward
RECOMPUTE = 1.5  # gradient checkpointing runs each layer's forward pass twice


@dataclass(frozen=True)
class Calibration:
    """What the latest finished run on this server measured, or else a worker's speed trial."""

    run_id: int | None  # None: a worker's speed trial (worker.probe), made before any run finished
    seconds_per_work: float
    startup_seconds: float
    seconds_per_answer: float | None  # None: it scored no answers

    @property
    def spread(self) -> tuple[float, float]:
        """How far the run may end from the estimate, as factors: a trial of a few steps on made-up rows
        knows less than a whole run did (docs/benchmarks.md: estimates from a run within −17% to +20% of
        the measured duration, from a trial −10% and −3% on the long-answer sets)."""
        return TRIAL_SPREAD if self.run_id is None else RUN_SPREAD


RUN_SPREAD = (0.8, 1.2)
TRIAL_SPREAD = (0.75, 1.35)


def token_work(config: RunConfig, shapes, checkpointing: bool) -> tuple[float, float]:
    """(work per padded token, work per padded token and key position) of one training step."""
    linear = shapes.linear()
    body = shapes.layers * sum(a * b for a, b in linear.values())
    per_token = LINEAR_WORK * (body + ANSWER_SHARE * shapes.vocab * shapes.hidden)
    per_token += ELEMENTWISE_WORK * shapes.layers * (shapes.hidden + shapes.intermediate)
    attention = ATTENTION_WORK * shapes.layers * shapes.heads * shapes.head_dim
    if checkpointing:
        per_token, attention = per_token * RECOMPUTE, attention * RECOMPUTE
    if peft_method(config.method).wraps_linear:
        targets = adapted_modules(shapes, config.peft.get("target_modules")).values()
        per_token += ADAPTER_WORK * shapes.layers * sum(a + b for a, b in targets)
        if drops_inputs(config.method, config.peft):
            per_token += DROPOUT_WORK * shapes.layers * sum(a for a, _ in targets)
    return per_token, attention


def epoch_work(config: RunConfig, lengths: list[int], shapes, checkpointing: bool) -> tuple[float, int]:
    """(the work of one pass over rows of these token lengths (already cut at max_length), its batches)."""
    per_token, attention = token_work(config, shapes, checkpointing)
    training = config.training
    batches = plan_batches(lengths, training.per_device_train_batch_size, training.batch_tokens)
    total = 0.0
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        total += len(batch) * longest * (per_token + attention * longest)
    return total, len(batches)


def run_work(config: RunConfig, epoch: tuple[float, int]) -> float:
    """The work of the whole run from one epoch's (`epoch_work`): its optimizer steps, as a share of the
    epochs they make."""
    work, batches = epoch
    per_epoch = max(1, -(-batches // config.training.gradient_accumulation_steps))
    return work * config.total_steps / per_epoch


def evaluations(config: RunConfig) -> tuple[int, int]:
    """(scored evaluations, answers each): the base model, then every checkpoint (one each save_steps
    and one at the end)."""
    from app.runs.evaluation import evaluation_rows

    steps, every = config.total_steps, config.training.save_steps
    count = 1 + steps // every + (1 if steps % every else 0)
    answers = sum(len(rows) for rows in evaluation_rows(config).values())
    return count, answers


def seconds_per_answer(session: Session, run_id: int) -> tuple[float | None, int]:
    """(a run's typical seconds per scored answer, answers it gave): the median over its evaluations (each
    answer stores its evaluation's seconds), so the first one's warm-up does not count."""
    groups = session.execute(
        select(func.max(RunAnswer.seconds), func.count())
        .where(RunAnswer.run_id == run_id)
        .group_by(RunAnswer.step, RunAnswer.split)
    ).all()
    if not groups:
        return None, 0
    return statistics.median(seconds / count for seconds, count in groups), sum(n for _, n in groups)


def calibrate(session: Session, run: Run, config: RunConfig, lengths: list[int] | None) -> Calibration | None:
    """What `run` (finished, its configuration `config`) says about this machine's speed; None when it
    cannot say (unknown model shape or lengths, no steps measured after the first, or a run resumed after a
    crash)."""
    if not lengths or run.started_at is None or run.finished_at is None or run.attempts != 1:
        return None
    shapes = Shapes.read(Path(config.model_path))
    points = session.scalars(
        select(RunMetric)
        .where(RunMetric.run_id == run.id, RunMetric.kind == "train")
        .order_by(RunMetric.step)
    ).all()
    if shapes is None or len(points) < 2:
        return None
    per_answer, answers = seconds_per_answer(session, run.id)
    wall = (run.finished_at - run.started_at).total_seconds()
    steps = [(p.step, p.get("step_time") or 0, p.get("tokens_per_second") or 0) for p in points]
    speed = speed_of(config, lengths, shapes, steps, wall, answers, per_answer)
    if speed is None:
        return None
    return Calibration(
        run_id=run.id, seconds_per_work=speed[0], startup_seconds=speed[1], seconds_per_answer=per_answer
    )


def speed_of(
    config: RunConfig,
    lengths: list[int],
    shapes,
    points: list[tuple[int, float, float]],
    wall: float,
    answers: int,
    per_answer: float | None,
) -> tuple[float, float] | None:
    """(seconds per unit of work, start-up seconds) of a training process that trained `config` on rows of
    these `lengths`, logging (step, step_time, tokens_per_second) `points`, in `wall` seconds of which
    `answers` scored answers took `per_answer` seconds each; None when too few steps were measured."""
    # as the run set it; one that left it to Tuneboard counts as off (it is on only when memory is short)
    epoch = epoch_work(config, lengths, shapes, bool(config.training.gradient_checkpointing))
    seconds = tokens = 0.0
    previous = points[0][0] if points else 0
    for step, step_time, tokens_per_second in points[1:]:  # the first carries the warm-up: start-up counts it
        elapsed = step_time * (step - previous)
        seconds, tokens = seconds + elapsed, tokens + elapsed * tokens_per_second
        previous = step
    if seconds <= 0 or tokens <= 0:
        return None
    seconds_per_work = seconds / (tokens * epoch[0] / sum(lengths))
    training = seconds_per_work * run_work(config, epoch)
    # what is neither steady training nor typical answering: launch, load, warm-ups, the last save
    return seconds_per_work, max(0.0, wall - training - answers * (per_answer or 0.0))


def latest_calibration(session: Session, base_model: str, lengths_of) -> Calibration | None:
    """The calibration of the latest finished run that gives one, on the same base model if there is one
    (`lengths_of(config)`: the training rows' token lengths of a run so configured, or None); the last few
    of each are tried. A run stored by an older version, whose configuration no longer reads, is skipped."""
    finished = select(Run).where(Run.status == RunStatus.SUCCEEDED).order_by(Run.finished_at.desc()).limit(5)
    for query in (finished.where(Run.base_model == base_model), finished.where(Run.base_model != base_model)):
        for run in session.scalars(query).all():
            try:
                config = RunConfig.model_validate(run.config)
            except ValueError:
                continue
            if (calibration := calibrate(session, run, config, lengths_of(config))) is not None:
                return calibration
    return None


def trial_calibration(session: Session, base_model: str, stale_after: float) -> Calibration | None:
    """A live worker's speed trial (announced with its hardware: worker.probe), on `base_model` if one
    measured it, else on another model (the work counted per model carries the difference)."""
    from app.workers import list_workers

    speeds = [
        (model, speed)
        for worker, alive in list_workers(session=session, stale_after=stale_after)
        if alive
        for model, speed in ((worker.hardware or {}).get("speed") or {}).items()
        if isinstance(speed, dict) and speed.get("seconds_per_work")
    ]
    if not speeds:
        return None
    # the model's own trial first; of several workers, the slowest (a run may land on any of them)
    _, speed = min(speeds, key=lambda entry: (entry[0] != base_model, -entry[1]["seconds_per_work"]))
    return Calibration(
        run_id=None,
        seconds_per_work=float(speed["seconds_per_work"]),
        startup_seconds=float(speed.get("startup_seconds") or 0.0),
        seconds_per_answer=speed.get("seconds_per_answer"),
    )


def duration(
    config: RunConfig, lengths: list[int], calibration: Calibration, shapes, *, checkpointing: bool
) -> dict:
    """Seconds the run will take from its start to its end, by part."""
    training = calibration.seconds_per_work * run_work(
        config, epoch_work(config, lengths, shapes, checkpointing)
    )
    count, answers = evaluations(config)
    answering = count * answers * (calibration.seconds_per_answer or 0.0)
    seconds = calibration.startup_seconds + training + answering
    low, high = calibration.spread
    return {
        "seconds": seconds,
        "seconds_range": [seconds * low, seconds * high],
        "duration_parts": {
            "startup": calibration.startup_seconds,
            "training": training,
            "evaluation": answering,
        },
        "calibrated_by": calibration.run_id,
        "evaluation_measured": calibration.seconds_per_answer is not None or not answers,
    }
