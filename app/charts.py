"""The run page's charts, declared once: which logged values each draws, on which axis, with which labels.

A logged point is data (app.models.RunMetric.values): a training process may log any numeric key, and it is
stored and streamed as it is. Drawing one more is one more entry here; static/run.js draws whatever this
spec says from the page's `metric` events. A series names the kind of point it reads (`train` or `eval`)
and the key, so a held-out value and a training value of the same name are two series.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Format = Literal["plain", "scientific", "percent"]


@dataclass(frozen=True)
class Series:
    key: str  # a key of the logged values
    label: str
    color: str
    kind: Literal["train", "eval"] = "train"
    points: bool = False  # dots at each value (sparse series: one value per checkpoint)


@dataclass(frozen=True)
class Chart:
    id: str  # the element's id on the page: chart-<id>
    title: str
    axis: str  # the y axis's label
    series: tuple[Series, ...]
    note: str = ""  # a short line beside the title
    format: Format = "plain"  # how the y axis writes its numbers
    objectives: tuple[str, ...] = ()  # shown only for runs of these objectives; empty: every run
    best: bool = False  # also mark the best checkpoint (app.runs.evaluation), at its train or validation loss

    def shown_for(self, objective: str) -> bool:
        return not self.objectives or objective in self.objectives


PREFERENCE = ("dpo", "kto")

RUN_CHARTS: tuple[Chart, ...] = (
    Chart(
        "loss", "Loss", "loss", note="train and validation", best=True,
        series=(
            Series("loss", "train loss", "#4f46e5"),
            Series("eval_loss", "validation loss", "#d97706", kind="eval", points=True),
        ),
    ),
    Chart(
        "rewards", "Rewards", "reward", objectives=PREFERENCE,
        note="how much more likely than at the start, chosen and rejected answers",
        series=(
            Series("reward_margin", "margin", "#4f46e5"),
            Series("rewards_chosen", "chosen", "#16a34a"),
            Series("rewards_rejected", "rejected", "#dc2626"),
            Series("reward_margin", "held-out margin", "#d97706", kind="eval", points=True),
        ),
    ),
    Chart(
        "accuracy", "Preference accuracy", "accuracy", note="pairs whose chosen answer wins",
        objectives=("dpo",), format="percent",
        series=(
            Series("reward_accuracy", "training pairs", "#4f46e5"),
            Series("reward_accuracy", "held-out pairs", "#d97706", kind="eval", points=True),
        ),
    ),
    Chart(
        "lr", "Learning rate", "learning rate", format="scientific",
        series=(Series("learning_rate", "learning rate", "#0e9384"),),
    ),
    Chart("grad", "Gradient norm", "norm", series=(Series("grad_norm", "grad norm", "#c11574"),)),
    Chart(
        "speed", "Throughput", "tokens/s", note="real tokens per second",
        series=(Series("tokens_per_second", "tokens/s", "#2e90fa"),),
    ),
)  # fmt: skip


def charts_for(objective: str) -> list[Chart]:
    """The charts a run of `objective` shows, in page order."""
    return [chart for chart in RUN_CHARTS if chart.shown_for(objective)]


def spec(charts: list[Chart]) -> list[dict]:
    """The charts as static/run.js reads them (JSON)."""
    return [asdict(chart) for chart in charts]
