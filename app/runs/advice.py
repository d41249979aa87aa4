"""Did the run learn its training answers? A finished run's scored answers say so in one sentence, and when
it did not, suggest the one change most likely to get there, ready to launch with one click
(the run page posts the run's own settings, `app.runs.form.form_values`, with the change).

A training row is learned when its answer reproduces the reference (chrF at least
app.runs.evaluation.MATCHED_CHRF: long answers that share most of their text still differ there, in the
facts); a run has learned its answers when LEARNED percent of the scored training rows are. A long answer's
key fact usually sits in its first sentence (a leaflet names its product there), so the share of rows whose
opening is like the reference's (app.scoring.opening) is said beside it and counts as progress. The rules,
in order, at the run's last scored checkpoint:
1. learned: say so, and whether the held-out answers improved too;
2. the training rows' scores were still rising at the last checkpoint, or, under a schedule that decays to
   zero (the default cosine), in the interval before it: more epochs;
3. many rows were cut by max_length: a longer max length;
4. the openings are learned (the base model's were not) though whole answers are not, and nothing rises
   any more: say so, no change;
5. it stalled: a higher learning rate, up to MAX_LEARNING_RATE; then a higher rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from app.models import Run, RunStatus
from app.runs.config import RunConfig

LEARNED = 90.0  # percent of scored training rows answered like their reference
RISING = 3.0  # chrF points (or percent of rows) gained over the last checkpoint interval: still learning
CUT_SHARE = 0.25  # a share of training rows cut by max_length worth a longer one
MAX_LEARNING_RATE = 3e-3
MAX_RANK = 128


@dataclass
class Advice:
    learned: bool
    sentence: str
    change: dict[str, Any] = field(default_factory=dict)  # form names: {"training.num_train_epochs": 20}
    label: str = ""  # the change in a few words, for its button


def advise(run: Run, summary: dict[str, Any], *, truncated: int | None = None) -> Advice | None:
    """Advice for a finished run from its evaluation summary; None while it trains or when no training rows
    were scored. `truncated`: how many of the dataset's rows are longer than the run's max length."""
    if run.status != RunStatus.SUCCEEDED:
        return None
    scored = [s for s in summary["steps"] if s["step"] > 0 and "train" in s]
    base = summary["base"]
    if not scored or base is None or "train" not in base:
        return None
    config = RunConfig.model_validate(run.config)
    training = config.training
    last = scored[-1]
    matched, chrf, before = last["train"]["matched"], last["train"]["chrf"], base["train"]
    where = (
        f"{matched:.0f}% of the training rows answered like their reference at step {last['step']} "
        f"(base model {before['matched']:.0f}%; training-row chrF {chrf:.1f}, base {before['chrf']:.1f})"
    )
    opened = last["train"].get("opened")
    if opened is not None and opened > matched:  # a long answer's key opening, learned before its wording
        where += (
            f"; {opened:.0f}% began like it (the first sentence, where a long answer says what it is about; "
            f"base model {before.get('opened', 0):.0f}%)"
        )
    if matched >= LEARNED:
        held = last.get("validation")
        if held and summary["base"].get("validation"):
            gain = held["chrf"] - summary["base"]["validation"]["chrf"]
            generalises = (
                f"held-out answers improved by {gain:.1f} chrF points"
                if gain >= RISING
                else "held-out answers did not improve: it learned these answers rather than a skill, which "
                "is expected when the facts exist only in the training rows"
            )
            return Advice(True, f"Learned the training answers: {where}; {generalises}.")
        return Advice(True, f"Learned the training answers: {where}.")

    points = [before] + [s["train"] for s in scored]
    gains = [
        max(
            b["chrf"] - a["chrf"],
            b["matched"] - a["matched"],
            b["opened"] - a["opened"] if "opened" in a and "opened" in b else 0,
        )
        for a, b in pairwise(points)
    ]
    # A schedule that decays to zero takes almost no step in its last interval: a flat end says nothing
    # about a stall there, so the interval before it decides.
    decays = training.lr_scheduler_type not in ("constant", "constant_with_warmup")
    if gains[-1] >= RISING or (decays and len(gains) > 1 and gains[-2] >= RISING):
        epochs = training.num_train_epochs * 2
        when = (
            "still rising at the last checkpoint"
            if gains[-1] >= RISING
            else f"still rising until its {training.lr_scheduler_type} learning rate decayed to nearly zero "
            f"at the end (+{gains[-2]:.0f} in the interval before the last)"
        )
        return Advice(
            False,
            f"Has not learned the training answers yet: {where}, {when}. More epochs should get further.",
            {"training.num_train_epochs": epochs},
            f"{epochs:g} epochs",
        )
    rows = config.train_rows + (0 if config.evaluation_path else len(config.validation_rows))
    if truncated and rows and truncated / rows >= CUT_SHARE:
        longer = min(training.max_length * 2, 8192)
        return Advice(
            False,
            f"Has not learned the training answers: {where}. {truncated} of {rows} rows are longer than "
            f"max length {training.max_length} and were cut; a longer max length trains whole answers.",
            {"training.max_length": longer},
            f"max length {longer}",
        )
    if opened is not None and opened >= LEARNED and before.get("opened", 100) < LEARNED:
        return Advice(
            True,
            f"Learned how the training answers begin: {where}. The rest of each answer differs in wording "
            f"and stopped improving; the first sentences carry what each row is about.",
        )
    if training.learning_rate < MAX_LEARNING_RATE:
        rate = min(training.learning_rate * 2, MAX_LEARNING_RATE)
        return Advice(
            False,
            f"Has not learned the training answers: {where}, and it stopped improving. A higher learning "
            f"rate takes bigger steps.",
            {"training.learning_rate": rate},
            f"learning rate {rate:g}",
        )
    rank = config.peft.get("r")
    if isinstance(rank, int) and rank < MAX_RANK:
        return Advice(
            False,
            f"Has not learned the training answers: {where}, and it stopped improving at a high learning "
            f"rate. A higher adapter rank can hold more.",
            {"peft.r": rank * 2},
            f"rank {rank * 2}",
        )
    return Advice(False, f"Has not learned the training answers: {where}.")
